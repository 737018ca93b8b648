"""bfloat16 compute (config.model.dtype="bfloat16"): bf16 convolutions and matmuls, float32 rest.

- Losses: each loss given bf16 inputs returns what it returns for the same values in float32
  (they cast on entry and compute in float32; checked against float64 references too), and
  hands back bf16 gradients.
- Jaxprs: in bf16 mode every convolution and matmul of the stage models has bf16 operands and
  every sum over batch and pixels is float32; every step computes its exp / log (log-sum-exp,
  softplus, softmax) in float32.
- Models: bias gradients are exact float32 sums; the bf16 error of a model's outputs is of the
  size of its float32 sensitivity to a bf16-rounded input.
- Steps: a few steps of every stage in bf16 follow the float32 run from the same initial state
  on the same batches, and parameters, optimiser state and BatchNorm statistics stay float32.
"""

import dataclasses
import functools
import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxcl.augment import AugmentConfig
from jaxcl.data import pipeline
from jaxcl.losses import byol, contrastive, local, region_kernel, segmentation
from jaxcl.models import (
    ByolNetwork,
    GlobalContrastiveModel,
    LocalContrastiveModel,
    ProjectionMLP,
    UNet,
)
from jaxcl.train import steps
from jaxcl.train.parallel import AXIS_NAME, DataParallel


def _load_reference():
    path = pathlib.Path(__file__).parents[1] / "losses" / "reference.py"
    spec = importlib.util.spec_from_file_location("losses_reference", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


reference = _load_reference()

SIZE = 32
FILTERS = (4, 4, 8, 8, 8, 8)
NUM_PARTITIONS = 2
NUM_CLASSES = 3
NUM_STEPS = 3
# Step runs: SGD with momentum and a small learning rate keep the steps near the shared
# initialisation, so each step measures the bf16 error of a step rather than the divergence of
# two chaotic trajectories; τ = 1 instead of the paper's 0.1 (see STEP_LOSS_RTOL).
LEARNING_RATE = 1e-4
STEP_TEMPERATURE = 1.0
STAGES = ("GR", "GD-", "GD", "BYOL", "BYOL-D", "LR", "LD", "finetune")
# Fine-tuning geometry limited to flips, as in test_steps.py.
FINETUNE_AUGMENT = AugmentConfig(geometry_weights=(0.0, 0.0, 1.0, 0.0, 1.0), elastic_sigma=0.0)
TRANSCENDENTALS = ("exp", "exp2", "expm1", "log", "log1p", "logistic")

# The bf16 path of a loss casts its inputs to float32 first, so it must equal the float32 path
# on the same values up to float32 rounding of a different fusion (observed: bit-identical).
SAME_VALUES_RTOL = 1e-5
# bf16 vs float32 step losses, relative. One bf16 rounding is a relative error <= 2^-9 (~2^-8
# for an operation on rounded operands), but these tiny randomly initialised BatchNorm-ReLU
# networks in train mode amplify any perturbation by ~1.2-1.5x per layer (BatchNorm divides by
# the small batch standard deviations of the 2x2 and 1x1 levels of 32² inputs): their outputs move
# by 5-45% whether every layer rounds to bf16 or only the input is rounded
# (test_bf16_error_is_the_models_sensitivity_to_a_rounded_input). A contrastive loss moves with
# its logits, Δcos / τ, hence τ = 1 here (at τ = 0.1 the step losses differed by up to 48%).
# Measured over 4 data seeds x 3 steps: contrastive stages <= 2.4% (median 0.16%), BYOL
# (2 - 2 cos, no τ) <= 5.0%, soft Dice (an average over all pixels) <= 0.08% (<= 0.15% at larger
# learning rates). Tolerances: about twice the largest.
STEP_LOSS_RTOL = {"BYOL": 0.1, "BYOL-D": 0.1, "finetune": 0.003}
CONTRASTIVE_STEP_LOSS_RTOL = 0.05


# ----------------------------------------------------------------------------------------------
# Losses on bf16 inputs.


def _bf16(x: np.ndarray) -> jax.Array:
    return jnp.asarray(x, jnp.bfloat16)


def _assert_bf16_path_equals_float32(loss_fn, *inputs):
    """loss_fn(bf16 inputs) == loss_fn(same values in float32); bf16 gradients = rounded f32 ones.

    Returns the float32 value.
    """
    as_float32 = [x.astype(jnp.float32) for x in inputs]
    argnums = tuple(range(len(inputs)))
    value_and_grad = jax.jit(jax.value_and_grad(loss_fn, argnums))
    value_16, grads_16 = value_and_grad(*inputs)
    value_32, grads_32 = value_and_grad(*as_float32)
    assert value_16.dtype == jnp.float32
    np.testing.assert_allclose(value_16, value_32, rtol=SAME_VALUES_RTOL)
    for grad_16, grad_32 in zip(grads_16, grads_32, strict=True):
        assert grad_16.dtype == jnp.bfloat16
        np.testing.assert_allclose(
            np.asarray(grad_16, np.float32),
            np.asarray(grad_32.astype(jnp.bfloat16), np.float32),
            rtol=1e-2,
            atol=1e-3 * float(jnp.max(jnp.abs(grad_32))),
        )
    return value_32


@pytest.mark.parametrize("strategy", ["GR", "GD-", "GD"])
def test_global_loss_scores_bf16_embeddings_in_float32(strategy):
    rng = np.random.default_rng(0)
    z = _bf16(rng.normal(size=(12, 16)))
    sample_ids = np.repeat(np.arange(6), 2)
    partition_ids = sample_ids % 3
    loss_fn = functools.partial(
        contrastive.global_loss,
        sample_ids=sample_ids,
        partition_ids=partition_ids,
        strategy=strategy,
        temperature=0.1,
    )
    value = _assert_bf16_path_equals_float32(loss_fn, z)
    expected = reference.global_loss(
        np.asarray(z, np.float64), sample_ids, partition_ids, strategy, 0.1
    )
    np.testing.assert_allclose(value, expected, rtol=SAME_VALUES_RTOL)


@pytest.mark.parametrize(("strategy", "negatives"), [("LR", "paper"), ("LD", "all")])
def test_local_loss_scores_bf16_regions_in_float32(strategy, negatives):
    rng = np.random.default_rng(1)
    sample_ids = np.repeat(np.arange(4), 2)
    partition_ids = np.repeat(np.arange(4) % 2, 2)
    regions = _bf16(rng.normal(size=(8, 17, 8)))
    loss_fn = functools.partial(
        local.local_loss,
        sample_ids=sample_ids,
        partition_ids=partition_ids,
        strategy=strategy,
        temperature=0.1,
        negatives=negatives,
    )
    value = _assert_bf16_path_equals_float32(loss_fn, regions)
    num_anchors = 13 if negatives == "paper" else 17
    expected = reference.local_loss(
        np.asarray(regions, np.float64),
        sample_ids,
        partition_ids,
        strategy,
        0.1,
        negatives,
        num_anchors,
    )
    np.testing.assert_allclose(value, expected, rtol=SAME_VALUES_RTOL)


def test_region_kernel_computes_in_float32_and_returns_gradients_in_the_input_dtype():
    rng = np.random.default_rng(2)
    anchors = _bf16(reference.normalize(rng.normal(size=(2, 2, 3, 8))))
    candidates = _bf16(reference.normalize(rng.normal(size=(2, 2, 5, 8))))
    is_pair = jnp.asarray(~np.eye(2, dtype=bool)[None].repeat(2, axis=0))
    kernel = functools.partial(
        region_kernel.all_negatives_term_sum, is_pair=is_pair, temperature=0.1, chunk=2
    )
    value = _assert_bf16_path_equals_float32(kernel, anchors, candidates)
    # Independent value: the NT-Xent terms of every anchor (g, v, j) and positive (g, w, j), w != v,
    # against all regions of group g at positions r != j, in float64.
    a, c = np.asarray(anchors, np.float64) / 0.1, np.asarray(candidates, np.float64)
    expected = 0.0
    for g, v, j, w in np.ndindex(2, 2, 3, 2):
        if v != w:
            negatives = [a[g, v, j] @ c[g, u, r] for u in range(2) for r in range(5) if r != j]
            expected += reference.pair_term(a[g, v, j] @ c[g, w, j], negatives)
    np.testing.assert_allclose(value, expected, rtol=SAME_VALUES_RTOL)


def test_byol_loss_scores_bf16_vectors_in_float32():
    rng = np.random.default_rng(3)
    p1, p2, t1, t2 = (_bf16(rng.normal(size=(6, 8))) for _ in range(4))
    value = _assert_bf16_path_equals_float32(
        lambda p1, p2: byol.symmetric_loss(p1, p2, t1, t2), p1, p2
    )
    cosine = [
        np.sum(reference.normalize(x) * reference.normalize(y), axis=-1)
        for x, y in ((p1, t2), (p2, t1))
    ]
    np.testing.assert_allclose(
        value, np.mean(4.0 - 2.0 * cosine[0] - 2.0 * cosine[1]), rtol=SAME_VALUES_RTOL
    )


def test_soft_dice_scores_bf16_logits_in_float32():
    rng = np.random.default_rng(4)
    logits = _bf16(3.0 * rng.normal(size=(2, 8, 8, NUM_CLASSES)))
    labels = rng.integers(0, NUM_CLASSES, size=(2, 8, 8))
    loss_fn = functools.partial(segmentation.soft_dice_loss, labels=labels, num_classes=NUM_CLASSES)
    value = _assert_bf16_path_equals_float32(loss_fn, logits)
    x = np.asarray(logits, np.float64)
    p = np.exp(x - x.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    y = np.eye(NUM_CLASSES)[labels]
    dice = 2 * (p * y).sum((1, 2)) / (p.sum((1, 2)) + y.sum((1, 2)) + 1e-10)
    np.testing.assert_allclose(value, 1.0 - dice.mean(), rtol=SAME_VALUES_RTOL)


# ----------------------------------------------------------------------------------------------
# Stages: data, models, states and steps at tiny sizes.


@dataclasses.dataclass(frozen=True)
class _Volume:
    """Stands in for preprocess.Volume: the pipeline reads only these fields."""

    subject_id: str
    image: np.ndarray
    label: np.ndarray


def _volume(subject: int, rng: np.random.Generator) -> _Volume:
    """Slices of 1-3 bright blobs on a dark noisy background, min-max scaled to [0, 1] like the
    preprocessed data; labels are intensity bands."""
    num_slices = int(rng.integers(NUM_PARTITIONS, 6))
    rows, cols = np.mgrid[:SIZE, :SIZE]
    image = 0.1 * rng.normal(size=(num_slices, SIZE, SIZE))
    for z in range(num_slices):
        for _ in range(int(rng.integers(1, 4))):
            centre, radius = rng.uniform(6, SIZE - 6, size=2), rng.uniform(3, 8)
            image[z] += np.exp(-((rows - centre[0]) ** 2 + (cols - centre[1]) ** 2) / radius**2)
    low = image.min(axis=(1, 2), keepdims=True)
    high = image.max(axis=(1, 2), keepdims=True)
    image = ((image - low) / (high - low)).astype(np.float32)
    return _Volume(f"{subject:03d}", image, np.digitize(image, [0.3, 0.6]).astype(np.uint8))


@functools.cache
def _pool() -> pipeline.SlicePool:
    rng = np.random.default_rng(0)
    volumes = [_volume(subject, rng) for subject in range(16)]
    return pipeline.build_slice_pool(volumes, num_partitions=NUM_PARTITIONS)


def _batches(stage: str) -> pipeline.StepBatches:
    """Global batches of 8 units (slices, volumes or pairs) on one device."""
    layout = {"seed": 3, "local_device_count": 1, "process_index": 0, "process_count": 1}
    if stage in ("GR", "BYOL", "LR"):
        return pipeline.random_slice_batches(_pool(), num_slices=8, num_views=2, **layout)
    if stage in ("GD-", "GD", "LD"):
        return pipeline.structured_batches(_pool(), num_volumes=8, num_views=2, **layout)
    if stage == "BYOL-D":
        return pipeline.paired_volume_batches(_pool(), num_pairs=8, **layout)
    return pipeline.labelled_batches(_pool(), batch_size=8, **layout)


def _models(stage: str, dtype, axis_name: str | None = AXIS_NAME) -> dict:
    """The stage's models (keyword arguments of its step) computing in `dtype`."""
    common = {"filters": FILTERS, "dtype": dtype, "axis_name": axis_name}
    if stage in ("GR", "GD-", "GD"):
        return {"model": GlobalContrastiveModel(hidden_features=16, features=8, **common)}
    if stage in ("BYOL", "BYOL-D"):
        sizes = {"hidden_features": 16, "features": 8, **common}
        return {
            "online_model": ByolNetwork(predict=True, **sizes),
            "target_model": ByolNetwork(predict=False, **sizes),
        }
    if stage in ("LR", "LD"):
        # After 3 decoder blocks a 32² input gives an 8x8 map.
        kind = ("paper",) if stage == "LR" else ("grid", 3)
        positions = tuple(map(tuple, local.region_positions(8, *kind).tolist()))
        return {"model": LocalContrastiveModel(positions=positions, features=8, **common)}
    return {"model": UNet(NUM_CLASSES, **common)}


@functools.cache
def _initial_state(stage: str):
    """The stage's initial host state (SGD with momentum), shared by its float32 and bf16 runs.

    Parameters and BatchNorm statistics are float32 in both modes, so one initialisation (with
    the float32 models) serves both.
    """
    models, rng = _models(stage, jnp.float32), jax.random.key(42)
    example = jnp.zeros((1, SIZE, SIZE, 1), jnp.float32)
    tx = optax.sgd(LEARNING_RATE, momentum=0.9)
    if stage in ("BYOL", "BYOL-D"):
        return jax.device_get(steps.create_byol_state(*models.values(), rng, example, tx))
    if stage in ("LR", "LD"):
        tx = steps.frozen_encoder_tx(tx)
    return jax.device_get(steps.create_train_state(models["model"], rng, example, tx))


def _step(stage: str, dtype):
    """The stage's per-device step with models computing in `dtype`."""
    models = _models(stage, dtype)
    if stage in ("GR", "GD-", "GD"):
        return functools.partial(
            steps.pretrain_global_step,
            strategy=stage,
            temperature=STEP_TEMPERATURE,
            keep_original_view=stage != "GR",
            **models,
        )
    if stage in ("BYOL", "BYOL-D"):
        return functools.partial(steps.byol_step, total_steps=10, tau_base=0.9, **models)
    if stage in ("LR", "LD"):
        return functools.partial(
            steps.pretrain_local_step,
            strategy=stage,
            temperature=STEP_TEMPERATURE,
            # LR: a group is one slice's 2 views; LD: a partition's 8 slices x 2 views.
            views_per_group=2 if stage == "LR" else 16,
            negatives="paper" if stage == "LR" else "all",
            **models,
        )
    return functools.partial(
        steps.finetune_step,
        num_classes=NUM_CLASSES,
        augment_config=FINETUNE_AUGMENT,
        **models,
    )


def _run(stage: str, dtype) -> tuple[np.ndarray, object]:
    """Losses of NUM_STEPS steps on one device, and the final host state."""
    parallel = DataParallel("pmap", devices=jax.devices()[:1])
    mapped, device_state, batches = (
        parallel.map_step(_step(stage, dtype)),
        parallel.put_state(_initial_state(stage)),
        _batches(stage),
    )
    losses = []
    for k in range(NUM_STEPS):
        rng = jax.random.fold_in(jax.random.key(7), k)
        device_state, metrics = mapped(device_state, parallel.put_batch(batches[k]), rng)
        losses.append(parallel.get_metrics(metrics)["loss"])
    return np.array(losses), parallel.get_state(device_state)


# ----------------------------------------------------------------------------------------------
# Jaxprs.


def _equations(jaxpr):
    """Every equation of `jaxpr` and of the jaxprs nested in it (jit, scan, custom VJP, ...)."""
    for eqn in jaxpr.eqns:
        yield eqn
        for param in eqn.params.values():
            for sub in param if isinstance(param, tuple | list) else (param,):
                if hasattr(sub, "eqns"):
                    yield from _equations(sub)
                elif hasattr(getattr(sub, "jaxpr", None), "eqns"):
                    yield from _equations(sub.jaxpr)


def _operand_dtypes(jaxpr, primitive: str) -> list[tuple]:
    return [
        tuple(var.aval.dtype for var in eqn.invars)
        for eqn in _equations(jaxpr)
        if eqn.primitive.name == primitive
    ]


@pytest.mark.parametrize("stage", ["GR", "BYOL", "LD", "finetune"])
def test_stage_models_convolve_and_multiply_in_bf16(stage):
    """Forward and backward pass of every model of a stage: all convs and matmuls in bf16, all
    sums, outputs, gradients and BatchNorm statistics in float32."""
    for model in _models(stage, jnp.bfloat16, axis_name=None).values():
        example = jnp.zeros((4, SIZE, SIZE, 1), jnp.float32)
        variables = steps.init_variables(model, jax.random.key(0), example)

        def loss(params, batch_stats, x, model=model):
            outputs, updates = model.apply(
                {"params": params, "batch_stats": batch_stats},
                x,
                train=True,
                mutable=["batch_stats"],
            )
            return jnp.sum(outputs), (outputs, updates)

        grad_fn = jax.grad(loss, has_aux=True)
        jaxpr = jax.make_jaxpr(grad_fn)(variables["params"], variables["batch_stats"], example)
        convs = _operand_dtypes(jaxpr.jaxpr, "conv_general_dilated")
        dots = _operand_dtypes(jaxpr.jaxpr, "dot_general")
        assert len(convs) > 2 * len(FILTERS)  # forward and backward of every encoder conv
        assert all(dtypes == (jnp.bfloat16, jnp.bfloat16) for dtypes in convs + dots), convs + dots
        # Sums over batch and pixels (BatchNorm moments, bias gradients) accumulate in float32.
        sums = _operand_dtypes(jaxpr.jaxpr, "reduce_sum")
        assert sums and all(dtypes == (jnp.float32,) for dtypes in sums), sums
        grads, (outputs, updates) = jax.eval_shape(
            grad_fn, variables["params"], variables["batch_stats"], example
        )
        assert outputs.dtype == jnp.float32
        assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves((grads, updates)))


@pytest.mark.parametrize("stage", ["GR", "BYOL", "LD", "finetune"])
def test_bf16_error_is_the_models_sensitivity_to_a_rounded_input(stage):
    """bf16 compute moves a stage model's outputs about as far as float32 compute moves them when
    only the input images are rounded to bf16 (the model's first cast).

    Randomly initialised BatchNorm-ReLU networks in train mode amplify a perturbation by ~1.2-1.5x
    per layer, so a 2^-9 rounding of the input alone changes these tiny models' outputs by 4-45%
    in float32. Rounding every layer in bf16 adds less than a factor 3 to that (measured ratios
    0.9-2.2 over 3 seeds x 2 intensity ranges x 4 models): the bf16 error is the networks' own
    sensitivity. This is the basis of the step tolerances (STEP_LOSS_RTOL).
    """
    model_32, model_16 = (
        next(iter(_models(stage, d, axis_name=None).values())) for d in (jnp.float32, jnp.bfloat16)
    )
    images = jnp.asarray(_batches(stage)[0]["image"][0])
    variables = steps.init_variables(model_32, jax.random.key(0), images[:1])

    def outputs(model, x):
        return np.asarray(model.apply(variables, x, train=True, mutable=["batch_stats"])[0])

    reference_outputs = outputs(model_32, images)
    rounded_input = outputs(model_32, images.astype(jnp.bfloat16).astype(jnp.float32))
    bf16_compute = outputs(model_16, images)
    norm = np.linalg.norm(reference_outputs)
    rounding_error = np.linalg.norm(rounded_input - reference_outputs) / norm
    bf16_error = np.linalg.norm(bf16_compute - reference_outputs) / norm
    assert 0 < bf16_error <= 3 * rounding_error


def test_bias_gradients_are_summed_in_float32():
    """d(Σ outputs)/d(output bias) is the number of summed positions, exactly, in bf16 mode.

    (A bfloat16 sum of 4096 ones stalls at 256: 257 is not a bfloat16.)
    """
    unet = UNet(NUM_CLASSES, FILTERS, dtype=jnp.bfloat16)
    images = jnp.ones((4, SIZE, SIZE, 1), jnp.float32)
    mlp = ProjectionMLP(hidden_features=4, features=2, dtype=jnp.bfloat16)
    vectors = jnp.ones((1024, 3), jnp.float32)
    for model, x, path in (
        (unet, images, ("segmentation_head", "logits")),
        (mlp, vectors, ("output",)),
    ):
        variables = steps.init_variables(model, jax.random.key(0), x)

        def total(params, model=model, x=x, batch_stats=variables["batch_stats"]):
            outputs, _ = model.apply(
                {"params": params, "batch_stats": batch_stats},
                x,
                train=True,
                mutable=["batch_stats"],
            )
            return jnp.sum(outputs)

        grads = jax.jit(jax.grad(total))(variables["params"])
        bias_grad = functools.reduce(lambda tree, name: tree[name], path, grads)["bias"]
        np.testing.assert_array_equal(bias_grad, np.full(bias_grad.shape, x.size // x.shape[-1]))


@pytest.mark.parametrize("stage", STAGES)
def test_steps_convolve_in_bf16_and_exponentiate_in_float32(stage):
    parallel = DataParallel("pmap", devices=jax.devices()[:1])
    mapped = parallel.map_step(_step(stage, jnp.bfloat16), donate_state=False)
    state = parallel.put_state(_initial_state(stage))
    batch = parallel.put_batch(_batches(stage)[0])
    jaxpr = jax.make_jaxpr(mapped)(state, batch, jax.random.key(0))
    convs = _operand_dtypes(jaxpr.jaxpr, "conv_general_dilated")
    assert convs and all(dtypes == (jnp.bfloat16, jnp.bfloat16) for dtypes in convs)
    transcendentals = [
        dtypes for name in TRANSCENDENTALS for dtypes in _operand_dtypes(jaxpr.jaxpr, name)
    ]
    assert all(dtypes == (jnp.float32,) for dtypes in transcendentals), transcendentals
    if not stage.startswith("BYOL"):  # BYOL's loss is 2 - 2 cos: no exp / log
        assert transcendentals


@pytest.mark.parametrize("stage", STAGES)
def test_bf16_steps_track_float32_and_keep_float32_state(stage):
    losses_32, state_32 = _run(stage, jnp.float32)
    losses_16, state_16 = _run(stage, jnp.bfloat16)
    assert np.all(np.isfinite(losses_16))
    rtol = STEP_LOSS_RTOL.get(stage, CONTRASTIVE_STEP_LOSS_RTOL)
    np.testing.assert_allclose(losses_16, losses_32, rtol=rtol)
    assert jax.tree.structure(state_16) == jax.tree.structure(state_32)
    for leaf_16, leaf_32 in zip(jax.tree.leaves(state_16), jax.tree.leaves(state_32), strict=True):
        assert leaf_16.dtype == leaf_32.dtype and leaf_16.shape == leaf_32.shape
        if np.issubdtype(leaf_32.dtype, np.floating):
            assert leaf_16.dtype == np.float32
