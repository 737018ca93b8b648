"""Step functions of every stage: data-parallel equivalence, frozen encoder, BYOL EMA, learning.

The central check: a few steps mapped over 8 devices (pmap and shard_map) give the same losses
and parameters as the same step on one device fed the concatenated global batch. That holds only
if gradients, BatchNorm statistics (cross-replica), contrastive negatives and augmentation keys
are all global-batch quantities, so it tests each of them at once. Models are tiny (filters
(4, 4, 8, 8, 8, 8), 32² images) to keep compile times low.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxcl.augment import AugmentConfig, global_view, local_view
from jaxcl.data import pipeline
from jaxcl.losses.local import region_positions
from jaxcl.models import ByolNetwork, GlobalContrastiveModel, LocalContrastiveModel, UNet
from jaxcl.train import steps
from jaxcl.train.parallel import AXIS_NAME, DataParallel
from jaxcl.train.state import ByolState

NUM_DEVICES = 8
SIZE = 32
FILTERS = (4, 4, 8, 8, 8, 8)
NUM_PARTITIONS = 2
NUM_CLASSES = 3
NUM_STEPS = 3
# Plain SGD, so that parameter updates are proportional to gradients. (Adam's first steps are
# ~lr·sign(g): a gradient that is zero up to rounding, such as the BYOL projector's output bias,
# which the predictor's BatchNorm cancels exactly, gets an update of random sign and size ~lr.)
LEARNING_RATE = 1e-4
AUGMENT = AugmentConfig()
# Fine-tuning geometry limited to flips (exact pixel permutations): rotations, zooms and the
# elastic field read outside the image and pad with flat zero regions (see `_blob_volume`).
FINETUNE_AUGMENT = AugmentConfig(geometry_weights=(0.0, 0.0, 1.0, 0.0, 1.0), elastic_sigma=0.0)
# Tolerances. One device and eight devices sum float32 reductions (BatchNorm moments, the gathered
# contrastive terms, the gradient pmean) in different orders and compile convolutions for
# different batch sizes. Observed: losses agree to ~1e-6 relative (at most 1.3e-5, L^R), single
# gradients to ~1e-4 per array (BatchNorm's backward pass and flax's E[x²] - E[x]² variance
# cancel digits). Over three steps a ReLU or max-pool decision that sits within rounding of its
# switching point can flip and reroute a few gradient contributions: the update of one network
# (all its parameters, or all its BatchNorm statistics, as one vector) then differs by up to
# ~3e-2 of its norm. A real defect is far outside both bounds: without the gradient pmean
# device 0 applies its own gradient, a missing 1/n or n is a factor 8, per-device BatchNorm,
# per-device negatives or device-dependent augmentation change the losses by ~1e-2 or more.
# The first step's loss is a continuous function of the same parameters on both sides, so it
# agrees to rounding (LOSS_RTOL). Later losses carry a flip's rerouted update: after changes
# that only reorder float sums (the up-convolution's phases interleaved in one pass, the first
# layer summed over its taps), L^D's second loss differed by 8e-4 relative (LATER_LOSS_RTOL).
LOSS_RTOL = 1e-4
LATER_LOSS_RTOL = 5e-3
UPDATE_RTOL = 1e-1


@dataclasses.dataclass(frozen=True)
class _Volume:
    """Stands in for preprocess.Volume: the pipeline reads only these fields."""

    subject_id: str
    image: np.ndarray
    label: np.ndarray


def _blob_volume(subject: int, rng: np.random.Generator) -> _Volume:
    """Smooth slices (1-3 blobs plus noise) rescaled to [0.4, 1]; labels are intensity bands.

    No flat regions: pre-training intensity views of [0.4, 1] stay inside the clip range
    [0, 1.5], so no pixel is clipped. Flat regions make 2x2 max-pool windows tie exactly in
    value, and which pixel then receives the gradient depends on 1-ulp differences between the
    1-device and 8-device programs (observed: a 6% change of some gradients) — a property of
    max-pooling, not of data parallelism.
    """
    num_slices = int(rng.integers(NUM_PARTITIONS, 6))
    rows, cols = np.mgrid[:SIZE, :SIZE]
    image = 0.1 * rng.normal(size=(num_slices, SIZE, SIZE))
    for z in range(num_slices):
        for _ in range(int(rng.integers(1, 4))):
            centre = rng.uniform(6, SIZE - 6, size=2)
            radius = rng.uniform(3, 8)
            image[z] += np.exp(-((rows - centre[0]) ** 2 + (cols - centre[1]) ** 2) / radius**2)
    low = image.min(axis=(1, 2), keepdims=True)
    high = image.max(axis=(1, 2), keepdims=True)
    image = (0.4 + 0.6 * (image - low) / (high - low)).astype(np.float32)
    label = np.digitize(image, [0.6, 0.8]).astype(np.uint8)
    return _Volume(f"{subject:03d}", image, label)


@functools.cache
def _pool() -> pipeline.SlicePool:
    rng = np.random.default_rng(0)
    volumes = [_blob_volume(subject, rng) for subject in range(16)]
    return pipeline.build_slice_pool(volumes, num_partitions=NUM_PARTITIONS)


def _layout(num_devices: int) -> dict:
    return {"seed": 3, "local_device_count": num_devices, "process_index": 0, "process_count": 1}


def _batches(stage: str, num_devices: int) -> pipeline.StepBatches:
    """Global batches of 8 units (slices, volumes or pairs), split over `num_devices`."""
    pool, layout = _pool(), _layout(num_devices)
    if stage in ("GR", "BYOL", "LR"):
        return pipeline.random_slice_batches(pool, num_slices=8, num_views=2, **layout)
    if stage in ("GD-", "GD", "LD"):
        views = 3 if stage == "GD-" else 2
        return pipeline.structured_batches(pool, num_volumes=8, num_views=views, **layout)
    if stage == "BYOL-D":
        return pipeline.paired_volume_batches(pool, num_pairs=8, **layout)
    return pipeline.labelled_batches(pool, batch_size=8, **layout)


def _local_model(negatives: str) -> LocalContrastiveModel:
    # After 3 decoder blocks a 32² input gives an 8x8 map.
    kind = {"paper": ("paper", None), "all": ("grid", 3)}[negatives]
    positions = region_positions(8, *kind)
    return LocalContrastiveModel(
        positions=tuple(map(tuple, positions.tolist())),
        filters=FILTERS,
        features=8,
        axis_name=AXIS_NAME,
    )


def _byol_models() -> tuple[ByolNetwork, ByolNetwork]:
    sizes = {"filters": FILTERS, "hidden_features": 16, "features": 8, "axis_name": AXIS_NAME}
    return ByolNetwork(predict=True, **sizes), ByolNetwork(predict=False, **sizes)


def _example_input() -> jax.Array:
    return jnp.zeros((1, SIZE, SIZE, 1), jnp.float32)


def _stage(stage: str, num_devices: int):
    """(host initial state, per-device step) of a stage for `num_devices` devices."""
    rng, tx = jax.random.key(42), optax.sgd(LEARNING_RATE)
    if stage in ("GR", "GD-", "GD"):
        model = GlobalContrastiveModel(FILTERS, 16, 8, axis_name=AXIS_NAME)
        state = steps.create_train_state(model, rng, _example_input(), tx)
        step = functools.partial(
            steps.pretrain_global_step,
            model=model,
            strategy=stage,
            temperature=0.1,
            keep_original_view=stage != "GR",
            augment_config=AUGMENT,
        )
    elif stage in ("BYOL", "BYOL-D"):
        online, target = _byol_models()
        state = steps.create_byol_state(online, target, rng, _example_input(), tx)
        step = functools.partial(
            steps.byol_step,
            online_model=online,
            target_model=target,
            total_steps=10,
            tau_base=0.9,
            augment_config=AUGMENT,
        )
    elif stage in ("LR", "LD"):
        negatives = "paper" if stage == "LR" else "all"
        model = _local_model(negatives)
        state = steps.create_train_state(model, rng, _example_input(), steps.frozen_encoder_tx(tx))
        # LR: a group is one slice's 2 views; LD: a partition's slices on this device x 2 views.
        views_per_group = 2 if stage == "LR" else 2 * 8 // num_devices
        step = functools.partial(
            steps.pretrain_local_step,
            model=model,
            strategy=stage,
            temperature=0.1,
            views_per_group=views_per_group,
            negatives=negatives,
            augment_config=AUGMENT,
        )
    else:
        model = UNet(NUM_CLASSES, FILTERS, axis_name=AXIS_NAME)
        state = steps.create_train_state(model, rng, _example_input(), tx)
        step = functools.partial(
            steps.finetune_step,
            model=model,
            num_classes=NUM_CLASSES,
            augment_config=FINETUNE_AUGMENT,
        )
    # Host (numpy) copy: put_state copies it, so donation never consumes the initial state.
    return jax.device_get(state), step


def _run(parallel: DataParallel, step, state, batches, num_steps: int = NUM_STEPS):
    """Runs `num_steps` mapped steps; returns (losses, final host state)."""
    mapped = parallel.map_step(step)
    device_state = parallel.put_state(state)
    losses = []
    for k in range(num_steps):
        rng = jax.random.fold_in(jax.random.key(7), k)
        device_state, metrics = mapped(device_state, parallel.put_batch(batches[k]), rng)
        losses.append(parallel.get_metrics(metrics)["loss"])
    return np.array(losses), parallel.get_state(device_state)


STAGES = ("GR", "GD-", "GD", "BYOL", "BYOL-D", "LR", "LD", "finetune")


@functools.cache
def _single_device_run(stage: str):
    state, step = _stage(stage, 1)
    parallel = DataParallel("pmap", devices=jax.devices()[:1])
    return state, _run(parallel, step, state, _batches(stage, 1))


def _assert_trees_close(actual, expected, atol):
    paths, expected_leaves = zip(*jax.tree_util.tree_leaves_with_path(expected), strict=True)
    for path, a, e in zip(paths, jax.tree.leaves(actual), expected_leaves, strict=True):
        np.testing.assert_allclose(a, e, rtol=0, atol=atol, err_msg=jax.tree_util.keystr(path))


def _networks(state) -> dict[str, np.ndarray]:
    """Every top-level network of every collection of a state, flattened to one float64 vector."""
    if isinstance(state, ByolState):
        collections = {
            "params": state.online.params,
            "batch_stats": state.online.batch_stats,
            "target_params": state.target_params,
            "target_batch_stats": state.target_batch_stats,
        }
    else:
        collections = {"params": state.params, "batch_stats": state.batch_stats}
    return {
        f"{collection}/{network}": np.concatenate(
            [np.ravel(leaf).astype(np.float64) for leaf in jax.tree.leaves(subtree)]
        )
        for collection, tree in collections.items()
        for network, subtree in tree.items()
    }


def _assert_same_updates(initial, actual, expected):
    """Each network's update (final - initial) matches to UPDATE_RTOL of its norm."""
    start, got, want = _networks(initial), _networks(actual), _networks(expected)
    assert got.keys() == want.keys()
    for name, origin in start.items():
        expected_update, actual_update = want[name] - origin, got[name] - origin
        error = np.linalg.norm(actual_update - expected_update)
        assert error <= UPDATE_RTOL * np.linalg.norm(expected_update), (
            f"{name}: update differs by {error:.3g}, norm {np.linalg.norm(expected_update):.3g}"
        )


@pytest.mark.parametrize("mode", ["pmap", "shard_map"])
@pytest.mark.parametrize("stage", STAGES)
def test_data_parallel_step_matches_one_device_on_the_global_batch(stage, mode):
    assert jax.device_count() >= NUM_DEVICES
    initial, (expected_losses, expected_state) = _single_device_run(stage)
    state, step = _stage(stage, NUM_DEVICES)
    parallel = DataParallel(mode, devices=jax.devices()[:NUM_DEVICES])
    losses, final_state = _run(parallel, step, state, _batches(stage, NUM_DEVICES))

    assert np.all(np.isfinite(losses))
    np.testing.assert_allclose(losses[0], expected_losses[0], rtol=LOSS_RTOL)
    np.testing.assert_allclose(losses[1:], expected_losses[1:], rtol=LATER_LOSS_RTOL)
    _assert_same_updates(initial, final_state, expected_state)
    assert int(final_state.step) == NUM_STEPS


@pytest.mark.parametrize("stage", ["LR", "LD"])
def test_local_stage_keeps_the_encoder_frozen(stage):
    initial, (_, final) = _single_device_run(stage)
    for collection in ("params", "batch_stats"):
        before, after = getattr(initial, collection), getattr(final, collection)
        _assert_trees_close(after["encoder"], before["encoder"], atol=0.0)
        for network in ("decoder", "g2"):
            moved = [
                np.max(np.abs(a - b))
                for a, b in zip(
                    jax.tree.leaves(after[network]), jax.tree.leaves(before[network]), strict=True
                )
            ]
            assert min(moved) > 0, f"{collection}/{network} did not change"
    # The frozen part carries no optimiser state: Adam moments exist for trained paths only.
    assert jax.tree.leaves(final.opt_state.inner_states["frozen"]) == []


def test_byol_target_is_the_ema_of_the_online_network():
    tau_base, total_steps = 0.9, 10
    state, step = _stage("BYOL", 1)
    parallel = DataParallel("pmap", devices=jax.devices()[:1])
    losses, new = _run(parallel, step, state, _batches("BYOL", 1), num_steps=1)
    # Step k = 0: τ_0 = 1 - (1 - τ_base)·(cos 0 + 1)/2 = τ_base.
    tau = 1.0 - (1.0 - tau_base) * (np.cos(np.pi * 0 / total_steps) + 1.0) / 2.0
    assert set(new.target_params) == {"encoder", "projector"}
    for name in new.target_params:
        target_before = jax.tree.leaves(state.target_params[name])
        online_after = jax.tree.leaves(new.online.params[name])
        online_before = jax.tree.leaves(state.online.params[name])
        for actual, xi, theta, theta0 in zip(
            jax.tree.leaves(new.target_params[name]),
            target_before,
            online_after,
            online_before,
            strict=True,
        ):
            # The target moved only by the EMA (no gradient step of its own) ...
            np.testing.assert_allclose(actual, tau * xi + (1 - tau) * theta, rtol=1e-6, atol=1e-7)
            # ... towards an online network that did take one.
            assert np.max(np.abs(theta - theta0)) > 0
    # The target runs BatchNorm in train mode on the same views with (at step 0) the same
    # parameters as the online network, so its new statistics equal the online ones.
    for name in new.target_batch_stats:
        _assert_trees_close(new.target_batch_stats[name], new.online.batch_stats[name], 1e-6)
        moved = jax.tree.map(
            lambda a, b: np.max(np.abs(a - b)),
            new.target_batch_stats[name],
            state.target_batch_stats[name],
        )
        assert min(jax.tree.leaves(moved)) > 0
    assert np.isfinite(losses).all()


def test_byol_state_starts_with_target_equal_to_online():
    online, target = _byol_models()
    state = steps.create_byol_state(
        online, target, jax.random.key(0), _example_input(), optax.sgd(0.1)
    )
    assert set(state.online.params) == {"encoder", "projector", "predictor"}
    assert set(state.target_params) == {"encoder", "projector"}
    for name in state.target_params:
        _assert_trees_close(state.target_params[name], state.online.params[name], 0.0)
        _assert_trees_close(state.target_batch_stats[name], state.online.batch_stats[name], 0.0)


def test_finetune_loss_decreases():
    model = UNet(NUM_CLASSES, FILTERS, axis_name=AXIS_NAME)
    state = steps.create_train_state(model, jax.random.key(1), _example_input(), optax.adam(1e-2))
    step = functools.partial(
        steps.finetune_step, model=model, num_classes=NUM_CLASSES, augment_config=AUGMENT
    )
    parallel = DataParallel("pmap", devices=jax.devices()[:1])
    losses, _ = _run(parallel, step, state, _batches("finetune", 1), num_steps=20)
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.05, losses


def test_example_keys_follow_the_global_example_index():
    """Keys of example i of device d are fold_in(rng, d * per_device + i), whatever the split."""
    rng, per_device = jax.random.key(5), 3
    parallel = DataParallel("pmap", devices=jax.devices()[:NUM_DEVICES])

    def keys_of_batch(rng_data, batch):
        keys = steps.example_keys(jax.random.wrap_key_data(rng_data), batch.shape[0])
        return jax.random.key_data(keys)

    keys = parallel.map_eval(keys_of_batch)
    rng_data = np.asarray(jax.random.key_data(rng))
    actual = keys(parallel.put_state(rng_data), np.zeros((NUM_DEVICES, per_device)))
    expected = [
        jax.random.key_data(jax.random.fold_in(rng, index))
        for index in range(NUM_DEVICES * per_device)
    ]
    np.testing.assert_array_equal(actual.reshape(len(expected), -1), np.reshape(expected, (24, -1)))


def test_predict_logits_is_inference_mode_and_split_independent():
    model = UNet(NUM_CLASSES, FILTERS, axis_name=AXIS_NAME)
    state = jax.device_get(
        steps.create_train_state(model, jax.random.key(2), _example_input(), optax.sgd(0.1))
    )
    # Non-trivial running statistics so that inference mode is distinguishable from train mode.
    state = state.replace(
        batch_stats=jax.tree.map(lambda x: x + 0.5, state.batch_stats),
    )
    images = _pool().images[:16, ..., None]
    parallel = DataParallel("shard_map", devices=jax.devices()[:NUM_DEVICES])
    evaluate = parallel.map_eval(functools.partial(steps.predict_logits, model=model))
    logits = evaluate(parallel.put_state(state), images.reshape(NUM_DEVICES, 2, SIZE, SIZE, 1))
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    expected = UNet(NUM_CLASSES, FILTERS).apply(variables, images, train=False)
    np.testing.assert_allclose(logits.reshape(expected.shape), expected, rtol=1e-5, atol=1e-5)


def test_gd_strategies_keep_view_zero_un_augmented():
    view_ids = jnp.array([0, 1, 2, 0, 1, 2])
    np.testing.assert_array_equal(steps.global_augment_mask(view_ids, True), [0, 1, 1, 0, 1, 1])
    assert steps.global_augment_mask(view_ids, False) is None  # G^R: every view


@pytest.mark.parametrize("view_fn", [global_view, local_view], ids=["global", "local"])
def test_views_outside_the_augmented_views_are_the_input(view_fn):
    images = jax.random.uniform(jax.random.key(13), (6, SIZE, SIZE, 1), minval=0.1, maxval=1.4)
    mask = steps.global_augment_mask(jnp.array([0, 1, 2, 0, 1, 2]), keep_original_view=True)

    def views(images):  # one device of the "batch" axis, for `example_keys`
        return steps.augmented_views(view_fn, jax.random.key(14), images, mask)

    out = np.asarray(jax.vmap(views, axis_name=AXIS_NAME)(images[None])[0])
    np.testing.assert_array_equal(out[[0, 3]], np.asarray(images)[[0, 3]])
    for row in (1, 2, 4, 5):
        assert not np.allclose(out[row], images[row], atol=1e-3), row
