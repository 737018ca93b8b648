"""Adversarial fine-tuning: its losses by hand, its ramp-up, its networks, and data parallelism."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import synthetic
from jaxcl import config_validation
from jaxcl.augment import AugmentConfig
from jaxcl.losses import gan
from jaxcl.methods import adversarial, supervised
from jaxcl.models.discriminator import SegmentationDiscriminator
from jaxcl.models.unet import UNet
from jaxcl.train import steps
from jaxcl.train.parallel import AXIS_NAME, DataParallel
from jaxcl.train.state import TrainState


def test_rampup_is_the_sigmoid_shaped_schedule():
    weights = [float(adversarial.rampup_weight(t, 0.1, 100)) for t in (0, 50, 100, 500)]
    np.testing.assert_allclose(
        weights, [0.1 * np.exp(-5.0), 0.1 * np.exp(-1.25), 0.1, 0.1], rtol=1e-6
    )
    assert float(adversarial.rampup_weight(0, 0.3, 0)) == pytest.approx(0.3)


def test_losses_equal_a_hand_computation():
    def softplus(x):
        return np.log1p(np.exp(x))

    labelled, unlabelled = jnp.array([2.0, 0.0]), jnp.array([-1.0, 0.5])
    # Target 1: -log sigmoid(x) = softplus(-x); target 0: -log(1 - sigmoid(x)) = softplus(x).
    expected = 0.5 * ((softplus(-2.0) + softplus(0.0)) / 2 + (softplus(-1.0) + softplus(0.5)) / 2)
    np.testing.assert_allclose(
        adversarial.discriminator_loss(labelled, unlabelled), expected, rtol=1e-6
    )
    np.testing.assert_allclose(
        gan.non_saturating_loss(unlabelled), (softplus(1.0) + softplus(-0.5)) / 2, rtol=1e-6
    )


def test_discriminator_gives_one_logit_per_slice():
    network = SegmentationDiscriminator(features=(8, 16))
    probabilities = jax.nn.softmax(jnp.ones((3, 32, 32, 4)))
    params = network.init(jax.random.key(0), probabilities, jnp.zeros((3, 32, 32, 1)))
    logits = network.apply(params, probabilities, jnp.zeros((3, 32, 32, 1)))
    assert logits.shape == (3,) and logits.dtype == jnp.float32
    kernel = params["params"]["Conv_0"]["kernel"]
    assert kernel.shape == (3, 3, 5, 8)  # 4 class maps + the image


_FILTERS = (8, 8, 16, 16, 16, 16)
_GLOBAL_BATCH = 8


def _setup(num_devices: int):
    model = UNet(num_classes=3, filters=_FILTERS, axis_name=AXIS_NAME)
    discriminator = SegmentationDiscriminator(features=(8, 16))
    example = jnp.zeros((1, 32, 32, 1))
    # SGD: the updates are the gradients (Adam's first steps turn rounding noise into ±lr).
    segmenter = steps.create_train_state(model, jax.random.key(0), example, optax.sgd(0.1))
    critic = discriminator.init(jax.random.key(1), jnp.zeros((1, 32, 32, 3)), example)
    state = adversarial.AdversarialState(
        segmenter=segmenter,
        discriminator=TrainState.create(params=critic["params"], batch_stats={}, tx=optax.sgd(0.1)),
    )
    step = functools.partial(
        adversarial.adversarial_step,
        model=model,
        discriminator=discriminator,
        num_classes=3,
        max_weight=0.5,
        rampup_steps=0,
        augment_config=AugmentConfig(geometry_weights=(0.0, 0.0, 1.0, 0.0, 1.0), elastic_sigma=0.0),
    )
    rng = np.random.default_rng(0)
    per_device = _GLOBAL_BATCH // num_devices

    def layout(x):
        return x.reshape(num_devices, per_device, *x.shape[1:])

    batch = {
        "image": layout(rng.uniform(0, 1, (_GLOBAL_BATCH, 32, 32, 1)).astype(np.float32)),
        "label": layout(rng.integers(0, 3, (_GLOBAL_BATCH, 32, 32)).astype(np.int32)),
        supervised.UNLABELLED_IMAGE: layout(
            rng.uniform(0, 1, (_GLOBAL_BATCH, 32, 32, 1)).astype(np.float32)
        ),
    }
    return state, step, batch


@functools.cache
def _two_steps(num_devices: int):
    """(initial state, [metrics of step 1, 2], [host state after step 1, 2])."""
    state, step, batch = _setup(num_devices)
    parallel = DataParallel("pmap", devices=jax.devices()[:num_devices])
    mapped, device_state = parallel.map_step(step), parallel.put_state(state)
    metrics, states = [], []
    for k in range(2):
        device_state, values = mapped(device_state, parallel.put_batch(batch), jax.random.key(k))
        metrics.append(parallel.get_metrics(values))
        states.append(parallel.get_state(device_state))
    return state, metrics, states


def _flat(state, network: str) -> np.ndarray:
    return np.concatenate([np.ravel(x) for x in jax.tree.leaves(getattr(state, network).params)])


def test_four_devices_equal_one_device_on_the_global_batch():
    """Losses agree to float32 rounding; the first update to 1% of its norm. After two SGD steps
    at a large learning rate a few ReLU decisions flip (up to ~15% observed); a missing pmean or
    per-device BatchNorm is far outside either bound."""
    initial, expected_metrics, expected_states = _two_steps(1)
    _, metrics, states = _two_steps(4)
    for got, want in zip(metrics, expected_metrics, strict=True):
        for name in ("loss", "supervised_loss", "discriminator_loss"):
            np.testing.assert_allclose(got[name], want[name], rtol=1e-4, err_msg=name)
    for tolerance, actual, expected in zip((1e-2, 0.3), states, expected_states, strict=True):
        for network in ("segmenter", "discriminator"):
            start, want = _flat(initial, network), _flat(expected, network)
            error = np.linalg.norm(_flat(actual, network) - want)
            assert np.linalg.norm(want - start) > 0, f"{network} was not updated"
            assert error <= tolerance * np.linalg.norm(want - start), network
    assert int(states[1].step) == 2 == int(states[1].discriminator.step)


def test_bad_settings_are_reported_before_any_work():
    config = synthetic.get_config("quick")
    config.stages = ("finetune", "evaluate")
    config.finetune.method = "adversarial"
    config_validation.validate(config, num_devices=1)
    config.finetune.adversarial_weight = -1.0
    config.finetune.adversarial_rampup = 2.0
    with pytest.raises(config_validation.ConfigError) as error:
        config_validation.validate(config, num_devices=1)
    problems = "\n".join(error.value.problems)
    assert "config.finetune.adversarial_weight=-1.0: the adversarial term's weight" in problems
    assert "config.finetune.adversarial_rampup=2.0: the ramp-up is a fraction" in problems


def test_at_weight_zero_the_unet_update_is_the_supervised_step():
    """The unlabelled pass normalises with its own statistics and leaves the running ones alone:
    without the adversarial term the UNet's update is `steps.finetune_step`'s."""
    state, step, batch = _setup(1)
    step = functools.partial(step.func, **{**step.keywords, "max_weight": 0.0})
    supervised = functools.partial(
        steps.finetune_step,
        model=step.keywords["model"],
        num_classes=3,
        augment_config=step.keywords["augment_config"],
    )
    parallel = DataParallel("pmap", devices=jax.devices()[:1])
    rng = jax.random.key(3)
    adversarial_state, _ = parallel.map_step(step)(
        parallel.put_state(state), parallel.put_batch(batch), rng
    )
    labelled = {key: batch[key] for key in ("image", "label")}
    supervised_state, _ = parallel.map_step(supervised)(
        parallel.put_state(state.segmenter), parallel.put_batch(labelled), rng
    )
    actual = parallel.get_state(adversarial_state).segmenter
    expected = parallel.get_state(supervised_state)
    for got, want in zip(
        jax.tree.leaves((actual.params, actual.batch_stats)),
        jax.tree.leaves((expected.params, expected.batch_stats)),
        strict=True,
    ):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
