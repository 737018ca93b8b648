"""Task-driven augmentation: its losses and batch draws by hand, its schedule, the frozen
generators' views, and data parallelism of its GAN and final steps."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from jaxcl.augment import AugmentConfig
from jaxcl.losses import gan as gan_losses
from jaxcl.methods import supervised, task_augmentation
from jaxcl.methods import task_augmentation_gan as gan
from jaxcl.models.task_augmentation import (
    NOISE_FEATURES,
    DeformationGenerator,
    ImageDiscriminator,
    IntensityGenerator,
)
from jaxcl.models.unet import UNet
from jaxcl.train import steps
from jaxcl.train.parallel import AXIS_NAME, DataParallel
from jaxcl.train.state import TrainState


def _softplus(x):
    return np.log1p(np.exp(x))


def test_gan_losses_equal_a_hand_computation():
    fake, real = jnp.array([2.0, -1.0]), jnp.array([0.5, -0.5])
    # Target 1: -log sigmoid(x) = softplus(-x); target 0: -log(1 - sigmoid(x)) = softplus(x).
    expected = (_softplus(-0.5) + _softplus(0.5)) / 2 + (_softplus(2.0) + _softplus(-1.0)) / 2
    np.testing.assert_allclose(gan_losses.discriminator_loss(real, fake), expected, rtol=1e-6)
    np.testing.assert_allclose(
        gan_losses.non_saturating_loss(fake), (_softplus(-2.0) + _softplus(1.0)) / 2, rtol=1e-6
    )
    field = jnp.array([[-2.0, 1.0], [0.5, 0.5]])  # mean |field| = 1
    # The L1 term is subtracted: larger transformations lower the generator's loss.
    np.testing.assert_allclose(gan.generator_loss(0.3, 0.4, field, 0.1), 0.3 + 0.4 - 0.1, rtol=1e-6)


def _drawn(batch_size, bounds, draws=400):
    keys = jax.random.split(jax.random.key(0), draws)
    draw = jax.vmap(lambda key: gan.mixing_thresholds(key, batch_size, bounds))
    return np.asarray(jax.jit(draw)(keys))


def test_mixing_thresholds_are_the_reference_draws_scaled_to_the_batch():
    final = _drawn(20, task_augmentation.FINAL_BOUNDS)
    for column, (low, high) in enumerate(task_augmentation.FINAL_BOUNDS):
        assert set(final[:, column]) == set(range(low, high))  # np.random.randint(low, high)
    assert set(_drawn(20, gan.ORIGINAL_BOUNDS)[:, 0]) == set(range(5, 15))
    # 8 slices: floor(k * 8 / 20) for the reference's k in 5..14.
    assert set(_drawn(8, gan.ORIGINAL_BOUNDS)[:, 0]) == {2, 3, 4, 5}


def test_mixing_groups_count_the_thresholds_a_global_index_reaches():
    key = jax.random.key(3)
    thresholds = np.asarray(gan.mixing_thresholds(key, 20, task_augmentation.FINAL_BOUNDS))
    groups = jax.vmap(
        lambda _: gan.mixing_groups(key, 5, 20, task_augmentation.FINAL_BOUNDS),
        axis_name=AXIS_NAME,
    )(jnp.arange(4))  # 4 devices x 5 examples
    expected = np.sum(np.arange(20)[:, None] >= thresholds[None, :], axis=1)
    np.testing.assert_array_equal(np.asarray(groups).reshape(-1), expected)


def _section(**overrides):
    section = ml_collections.ConfigDict(
        {"steps": 10_000, "task_aug_warmup": 0.04, "task_aug_l1_weight": 1e-3}
    )
    section.update(overrides)
    return section


def test_round_steps_scale_the_reference_schedule():
    assert task_augmentation.round_steps(_section()) == (400, 9600, 9600, 10_000)
    assert task_augmentation.round_steps(_section(steps=6)) == (1, 5, 5, 6)


@pytest.mark.parametrize(
    "overrides, key",
    [
        ({"task_aug_warmup": 0.0}, "task_aug_warmup"),
        ({"task_aug_warmup": 1.0}, "task_aug_warmup"),
        ({"task_aug_l1_weight": -0.1}, "task_aug_l1_weight"),
        ({"steps": 1}, "steps"),
    ],
)
def test_round_steps_name_the_bad_key(overrides, key):
    with pytest.raises(ValueError, match=rf"config\.finetune\.{key}="):
        task_augmentation.round_steps(_section(**overrides))


_FEATURES = (4, 4, 8, 8)
_SIZE = 32


def _generators():
    """A deformation generator whose field is the constant (0, 2) and an intensity generator
    whose mask is 0: their output layers zeroed (and the field's bias set)."""
    deformation, intensity = DeformationGenerator(_FEATURES), IntensityGenerator(_FEATURES)
    z, example = jnp.zeros((1, NOISE_FEATURES)), jnp.zeros((1, _SIZE, _SIZE, 1))
    variables = [
        network.init(jax.random.key(0), z, example, train=False)
        for network in (deformation, intensity)
    ]
    field = variables[0]["params"]["field"]
    field["kernel"] = jnp.zeros_like(field["kernel"])
    field["bias"] = jnp.array([0.0, 2.0])
    variables[1]["params"]["mask"]["kernel"] *= 0.0
    return deformation, intensity, variables


def test_generated_views_in_order_original_deformed_intensity_both():
    deformation, intensity, (deformation_variables, intensity_variables) = _generators()
    rng = np.random.default_rng(0)
    images = rng.uniform(0.0, 1.0, (2, _SIZE, _SIZE, 1)).astype(np.float32)
    targets = np.eye(3, dtype=np.float32)[rng.integers(0, 3, (2, _SIZE, _SIZE))]
    z = rng.normal(size=(2, NOISE_FEATURES)).astype(np.float32)
    view_images, view_targets = task_augmentation.generated_views(
        deformation, intensity, deformation_variables, intensity_variables, z, images, targets
    )
    assert view_images.shape == (4, 2, _SIZE, _SIZE, 1)
    assert view_targets.shape == (4, 2, _SIZE, _SIZE, 3)
    columns = np.minimum(np.arange(_SIZE) + 2, _SIZE - 1)  # read 2 columns to the right
    for view, shifted in zip(task_augmentation.VIEWS, (False, True, False, True), strict=True):
        index = task_augmentation.VIEWS.index(view)
        want_images = images[:, :, columns] if shifted else images
        want_targets = targets[:, :, columns] if shifted else targets
        np.testing.assert_allclose(view_images[index], want_images, atol=1e-5, err_msg=view)
        np.testing.assert_allclose(view_targets[index], want_targets, atol=1e-5, err_msg=view)


# ----------------------------------------------------------------------------------------------
# Data parallelism: 4 devices equal 1 device on the global batch, for one step.

_UNET_FILTERS = (4, 4, 8, 8, 8, 8)
_GLOBAL_BATCH = 8
_AUGMENT = AugmentConfig(geometry_weights=(0.0, 0.0, 1.0, 0.0, 1.0), elastic_sigma=0.0)


def _state(network, key, *inputs):
    variables = network.init(key, *inputs, train=False)
    # SGD: the updates are the gradients (Adam's first steps turn rounding noise into ±lr).
    return TrainState.create(
        params=variables["params"], batch_stats=variables["batch_stats"], tx=optax.sgd(0.1)
    )


def _layout(x, num_devices):
    return x.reshape(num_devices, -1, *x.shape[1:])


def _batch(num_devices, unlabelled: bool):
    rng = np.random.default_rng(0)
    batch = {
        "image": rng.uniform(0, 1, (_GLOBAL_BATCH, _SIZE, _SIZE, 1)).astype(np.float32),
        "label": rng.integers(0, 3, (_GLOBAL_BATCH, _SIZE, _SIZE)).astype(np.int32),
    }
    if unlabelled:
        batch[supervised.UNLABELLED_IMAGE] = rng.uniform(
            0, 1, (_GLOBAL_BATCH, _SIZE, _SIZE, 1)
        ).astype(np.float32)
    return {name: _layout(x, num_devices) for name, x in batch.items()}


def _networks():
    model = UNet(num_classes=3, filters=_UNET_FILTERS, axis_name=AXIS_NAME)
    generator = DeformationGenerator(_FEATURES, axis_name=AXIS_NAME)
    discriminator = ImageDiscriminator(_FEATURES, axis_name=AXIS_NAME)
    return model, generator, discriminator


def _gan_setup(num_devices):
    model, generator, discriminator = _networks()
    example, z = jnp.zeros((1, _SIZE, _SIZE, 1)), jnp.zeros((1, NOISE_FEATURES))
    state = gan.GanState(
        segmenter=steps.create_train_state(model, jax.random.key(0), example, optax.sgd(0.1)),
        generator=_state(generator, jax.random.key(1), z, example),
        discriminator=_state(discriminator, jax.random.key(2), example),
    )
    step = functools.partial(
        gan.gan_step,
        model=model,
        generator=generator,
        discriminator=discriminator,
        transform=gan.deform,
        num_classes=3,
        batch_size=_GLOBAL_BATCH,
        l1_weight=0.01,
        augment_config=_AUGMENT,
    )
    return state, step, _batch(num_devices, unlabelled=True)


def _final_setup(num_devices):
    model, _, _ = _networks()
    deformation = DeformationGenerator(_FEATURES, axis_name=AXIS_NAME)
    intensity = IntensityGenerator(_FEATURES, axis_name=AXIS_NAME)
    example, z = jnp.zeros((1, _SIZE, _SIZE, 1)), jnp.zeros((1, NOISE_FEATURES))
    state = task_augmentation.FinalState(
        segmenter=steps.create_train_state(model, jax.random.key(0), example, optax.sgd(0.1)),
        deformation=deformation.init(jax.random.key(1), z, example, train=False),
        intensity=intensity.init(jax.random.key(2), z, example, train=False),
    )
    step = functools.partial(
        task_augmentation.final_step,
        model=model,
        deformation=deformation,
        intensity=intensity,
        num_classes=3,
        batch_size=_GLOBAL_BATCH,
        mixup_alpha=None,
        augment_config=_AUGMENT,
    )
    return state, step, _batch(num_devices, unlabelled=False)


@functools.cache
def _one_step(kind: str, num_devices: int):
    """(initial host state, metrics, host state after one step)."""
    state, step, batch = {"gan": _gan_setup, "final": _final_setup}[kind](num_devices)
    parallel = DataParallel("pmap", devices=jax.devices()[:num_devices])
    new_state, metrics = parallel.map_step(step)(
        parallel.put_state(state), parallel.put_batch(batch), jax.random.key(5)
    )
    return state, parallel.get_metrics(metrics), parallel.get_state(new_state)


def _flat(tree) -> np.ndarray:
    return np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])


def _assert_same_update(initial, expected, actual, network):
    """The 4-device update equals the 1-device one to 5% of its norm.

    Observed: 0.5-1.7% for the UNet and the generator (2, 4 and 8 devices), 2e-5 for the
    discriminator: float32 reductions in another order, amplified by BatchNorm's backward pass
    and by the ReLU, max-pool and bilinear-warp decisions in the generator's gradient, which
    runs through the discriminator and the UNet (tests/train/test_steps.py allows 10% over
    three steps). Per-device BatchNorm in the generator alone gives ~150%.
    """
    start = _flat(getattr(initial, network).params)
    want = _flat(getattr(expected, network).params)
    got = _flat(getattr(actual, network).params)
    assert np.linalg.norm(want - start) > 0, f"{network} was not updated"
    assert np.linalg.norm(got - want) <= 5e-2 * np.linalg.norm(want - start), network
    np.testing.assert_allclose(
        _flat(getattr(actual, network).batch_stats),
        _flat(getattr(expected, network).batch_stats),
        rtol=1e-3,
        atol=1e-5,
        err_msg=network,
    )


def test_gan_step_on_four_devices_equals_one_device():
    initial, expected_metrics, expected = _one_step("gan", 1)
    _, metrics, actual = _one_step("gan", 4)
    for name in ("loss", "segmentation_loss", "adversarial_loss", "discriminator_loss"):
        np.testing.assert_allclose(metrics[name], expected_metrics[name], rtol=1e-4, err_msg=name)
    for network in ("segmenter", "generator", "discriminator"):
        _assert_same_update(initial, expected, actual, network)
    # The reported generator loss is the weighted sum of its terms.
    np.testing.assert_allclose(
        metrics["loss"],
        metrics["adversarial_loss"] + metrics["segmentation_loss"] - 0.01 * metrics["magnitude"],
        rtol=1e-5,
    )


def test_final_step_on_four_devices_equals_one_device_and_keeps_the_generators():
    initial, expected_metrics, expected = _one_step("final", 1)
    _, metrics, actual = _one_step("final", 4)
    np.testing.assert_allclose(metrics["loss"], expected_metrics["loss"], rtol=1e-4)
    _assert_same_update(initial, expected, actual, "segmenter")
    for network in ("deformation", "intensity"):
        np.testing.assert_array_equal(
            _flat(getattr(actual, network)), _flat(getattr(initial, network))
        )
