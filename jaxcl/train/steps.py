"""Per-device training steps of every stage, evaluation logits, and state creation.

Every step is a pure function `step(state, batch, rng, *, <static config>) -> (state, metrics)`
written for one device of the data-parallel axis `"batch"` (bind the config with
`functools.partial`, then map it with `jaxcl.train.parallel.DataParallel.map_step`):

- `pretrain_global_step`: G^R, G^{D-}, G^D on encoder + g1 (docs/METHOD.md §4);
- `byol_step`: BYOL / BYOL-D, online network trained, target network an EMA (§6);
- `pretrain_local_step`: L^R, L^D on the first l decoder blocks + g2, encoder frozen (§5, §9);
- `finetune_step`: the UNet with the soft Dice loss (§9).

Each step augments its views on device (docs/METHOD.md §8), runs the model in train mode, `pmean`s
the gradients and the new BatchNorm statistics over `"batch"` (so the state stays identical on
every device, also when BatchNorm is not cross-replica) and returns the global-batch `loss`. The
losses follow the `global_loss` convention, so the `pmean` of per-device gradients is the gradient
of the single-device loss on the concatenated batch.

Augmentation keys: example i of device d gets `fold_in(rng, d * per_device_batch + i)`, its index
in the global batch. The views therefore do not depend on how the global batch is split over
devices, and a run on one device with the concatenated batch sees the same augmentations as a
run on eight.

Batches follow the layouts of `jaxcl.data.pipeline` (per device): `image (B, H, W, 1)`,
`sample_id`, `partition_id`, `view_id` `(B,)`, and `label (B, H, W)` for fine-tuning.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from jaxcl import augment
from jaxcl.losses import byol, contrastive, local, segmentation
from jaxcl.train.parallel import AXIS_NAME
from jaxcl.train.schedules import byol_tau
from jaxcl.train.state import ByolState, TrainState

PyTree = Any
Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]

_FROZEN, _TRAINED = "frozen", "trained"
_DEFAULT_AUGMENT = augment.AugmentConfig()  # frozen dataclass: docs/METHOD.md §8 values


# ----------------------------------------------------------------------------------------------
# Views.


def example_keys(rng: jax.Array, per_device_batch: int) -> jax.Array:
    """(per_device_batch,) keys `fold_in(rng, global example index)` of this device's examples.

    Must run inside a mapping over `"batch"`; the global index of example i on device d is
    `d * per_device_batch + i`, independent of the number of devices.
    """
    first = jax.lax.axis_index(AXIS_NAME) * per_device_batch
    indices = first + jnp.arange(per_device_batch)
    return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(rng, indices)


def augmented_views(
    view_fn: Callable[[jax.Array, jax.Array], jax.Array],
    rng: jax.Array,
    images: jax.Array,
    augment_mask: jax.Array | None = None,
) -> jax.Array:
    """Applies `view_fn(key, image)` per example; rows where `augment_mask` is False are kept.

    images: (B, H, W, C); augment_mask: (B,) bool or None (all augmented). Returns (B, H, W, C).
    """
    views = jax.vmap(view_fn)(example_keys(rng, images.shape[0]), images)
    if augment_mask is None:
        return views
    return jnp.where(augment_mask[:, None, None, None], views, images.astype(views.dtype))


def global_augment_mask(view_ids: jax.Array, keep_original_view: bool) -> jax.Array | None:
    """(B,) True for the views a global strategy augments: all (None), or all but view 0.

    G^{D-} and G^D keep view 0 of every slice un-augmented (docs/METHOD.md §4), G^R does not.
    """
    return view_ids != 0 if keep_original_view else None


def train_apply(model: nn.Module, params: PyTree, batch_stats: PyTree, x: jax.Array):
    """Train-mode forward pass: (outputs, new batch_stats)."""
    outputs, updates = model.apply(
        {"params": params, "batch_stats": batch_stats}, x, train=True, mutable=["batch_stats"]
    )
    return outputs, updates["batch_stats"]


def _pmean(tree: PyTree) -> PyTree:
    return jax.lax.pmean(tree, AXIS_NAME)


# ----------------------------------------------------------------------------------------------
# Steps.


def pretrain_global_step(
    state: TrainState,
    batch: Batch,
    rng: jax.Array,
    *,
    model: nn.Module,
    strategy: str,
    temperature: float,
    keep_original_view: bool = False,
    augment_config: augment.AugmentConfig = _DEFAULT_AUGMENT,
) -> tuple[TrainState, Metrics]:
    """One G^R / G^{D-} / G^D update of encoder + g1 (`GlobalContrastiveModel`).

    Args:
      state: the replicated train state.
      batch: this device's `image`, `sample_id`, `partition_id`, `view_id` (random or
        structured layout).
      rng: step key, the same on every device.
      model: the global contrastive model (axis_name="batch" for cross-replica BatchNorm).
      strategy: "GR", "GD-" or "GD".
      temperature: τ of the contrastive kernel.
      keep_original_view: view 0 of every slice stays the un-augmented slice (G^{D-}, G^D;
        `global_augment_mask`).
      augment_config: augmentation parameters.
    """
    mask = global_augment_mask(batch["view_id"], keep_original_view)
    view_fn = functools.partial(augment.global_view, config=augment_config)
    views = augmented_views(view_fn, rng, batch["image"], mask)

    def loss_fn(params):
        embeddings, batch_stats = train_apply(model, params, state.batch_stats, views)
        loss = contrastive.global_loss(
            embeddings,
            batch["sample_id"],
            batch["partition_id"],
            strategy=strategy,
            temperature=temperature,
            axis_name=AXIS_NAME,
        )
        return loss, batch_stats

    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    new_state = state.apply_gradients(_pmean(grads), _pmean(batch_stats))
    return new_state, {"loss": loss}


def byol_step(
    state: ByolState,
    batch: Batch,
    rng: jax.Array,
    *,
    online_model: nn.Module,
    target_model: nn.Module,
    total_steps: int,
    tau_base: float,
    augment_config: augment.AugmentConfig = _DEFAULT_AUGMENT,
) -> tuple[ByolState, Metrics]:
    """One BYOL / BYOL-D update: online network by gradient, target by EMA (docs/METHOD.md §6).

    The batch holds view pairs as adjacent rows (example 2u + v is view v of unit u): two copies
    of one slice (random layout, 2 views: BYOL) or two slices of the same partition of two
    volumes (paired layout: BYOL-D). Every view gets a global augmentation. Online and target run
    once over all views in train mode, each with its own BatchNorm statistics; the loss is the
    symmetrised regression of each view's online prediction onto the other view's target
    projection. After the optimiser step, `ξ ← τ_k ξ + (1 - τ_k) θ` with the new online
    parameters θ and `τ_k = byol_tau(k, total_steps, tau_base)` at the step k being taken.

    Args:
      state: the replicated BYOL state.
      batch: this device's `image (2U, H, W, 1)` in view-pair layout.
      rng: step key, the same on every device.
      online_model: `ByolNetwork(predict=True)`.
      target_model: `ByolNetwork(predict=False)` with the same encoder and projector.
      total_steps: K of the τ schedule (the stage's number of steps).
      tau_base: τ_base (0.996).
      augment_config: augmentation parameters.
    """
    images = batch["image"]
    if images.shape[0] % 2:
        raise ValueError(
            f"byol_step needs view pairs (2 views per unit), but the per-device batch has "
            f"{images.shape[0]} images; build it with num_views=2 or paired_volume_batches."
        )
    view_fn = functools.partial(augment.global_view, config=augment_config)
    views = augmented_views(view_fn, rng, images)

    def pairs(x: jax.Array) -> tuple[jax.Array, jax.Array]:
        x = x.reshape(-1, 2, x.shape[-1])
        return x[:, 0], x[:, 1]

    target_projections, target_batch_stats = train_apply(
        target_model, state.target_params, state.target_batch_stats, views
    )
    target_1, target_2 = pairs(target_projections)

    def loss_fn(params):
        predictions, batch_stats = train_apply(
            online_model, params, state.online.batch_stats, views
        )
        prediction_1, prediction_2 = pairs(predictions)
        loss = byol.symmetric_loss(
            prediction_1, prediction_2, target_1, target_2, axis_name=AXIS_NAME
        )
        return loss, batch_stats

    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.online.params)
    tau = byol_tau(state.step, total_steps, tau_base)
    new_state = state.replace(
        online=state.online.apply_gradients(_pmean(grads), _pmean(batch_stats)),
        target_batch_stats=_pmean(target_batch_stats),
    ).update_target(tau)
    return new_state, {"loss": loss, "tau": tau}


def pretrain_local_step(
    state: TrainState,
    batch: Batch,
    rng: jax.Array,
    *,
    model: nn.Module,
    strategy: str,
    temperature: float,
    views_per_group: int,
    negatives: str = "all",
    num_anchors: int | None = None,
    augment_config: augment.AugmentConfig = _DEFAULT_AUGMENT,
) -> tuple[TrainState, Metrics]:
    """One L^R / L^D update of decoder blocks 1..l + g2 + region embedding (docs/METHOD.md §5).

    Every view gets a local (intensity-only) augmentation. With `model.freeze_encoder` the
    encoder runs BatchNorm on its running statistics and they are carried over unchanged; its
    parameters receive zero gradients, and the optimiser must leave them alone too: build the
    state's `tx` with `frozen_encoder_tx`.

    Args:
      state: the replicated train state (encoder loaded from global pre-training).
      batch: this device's `image`, `sample_id`, `partition_id` (random layout for L^R,
        structured for L^D), 2 or more views per slice.
      rng: step key, the same on every device.
      model: `LocalContrastiveModel` (positions static in the model).
      strategy: "LR" or "LD".
      temperature: τ.
      views_per_group: views per group id in this device's batch (L^R: views per slice; L^D:
        volumes per device x views per slice), see `local_loss`.
      negatives: "all" or "paper".
      num_anchors: the first num_anchors positions are anchors (None: all, 13 for "paper").
      augment_config: augmentation parameters.
    """
    view_fn = functools.partial(augment.local_view, config=augment_config)
    views = augmented_views(view_fn, rng, batch["image"])

    def loss_fn(params):
        regions, batch_stats = train_apply(model, params, state.batch_stats, views)
        loss = local.local_loss(
            regions,
            batch["sample_id"],
            batch["partition_id"],
            strategy=strategy,
            temperature=temperature,
            negatives=negatives,
            num_anchors=num_anchors,
            views_per_group=views_per_group,
            axis_name=AXIS_NAME,
        )
        return loss, batch_stats

    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    batch_stats = _pmean(batch_stats)
    if model.freeze_encoder:
        # Bit-identical, not a pmean of identical copies (which may round differently).
        batch_stats = {**batch_stats, "encoder": state.batch_stats["encoder"]}
    return state.apply_gradients(_pmean(grads), batch_stats), {"loss": loss}


def finetune_step(
    state: TrainState,
    batch: Batch,
    rng: jax.Array,
    *,
    model: nn.Module,
    num_classes: int,
    augment_config: augment.AugmentConfig = _DEFAULT_AUGMENT,
) -> tuple[TrainState, Metrics]:
    """One fine-tuning update of the UNet, soft Dice loss with background (docs/METHOD.md §9).

    Args:
      state: the replicated train state.
      batch: this device's `image (B, H, W, 1)` and `label (B, H, W)` int.
      rng: step key, the same on every device.
      model: `UNet`.
      num_classes: classes including background.
      augment_config: augmentation parameters (image and label share the geometry).
    """
    pair_fn = functools.partial(augment.finetune_pair, config=augment_config)
    keys = example_keys(rng, batch["image"].shape[0])
    images, labels = jax.vmap(pair_fn)(keys, batch["image"], batch["label"])

    def loss_fn(params):
        logits, batch_stats = train_apply(model, params, state.batch_stats, images)
        loss = segmentation.soft_dice_loss(logits, labels, num_classes=num_classes)
        return loss, batch_stats

    return mean_loss_update(state, loss_fn)


def mean_loss_update(
    state: TrainState, loss_fn: Callable[[PyTree], tuple[jax.Array, PyTree]]
) -> tuple[TrainState, Metrics]:
    """One optimiser step on a loss that is a mean over this device's examples.

    `loss_fn(params) -> (loss, new batch_stats)`. Per-device batches are equal, so the `pmean`
    of the per-device gradients is the gradient of the mean over the global batch; the reported
    `loss` is that global mean.
    """
    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    new_state = state.apply_gradients(_pmean(grads), _pmean(batch_stats))
    return new_state, {"loss": _pmean(loss)}


def predict_logits(state: TrainState, images: jax.Array, *, model: nn.Module) -> jax.Array:
    """Segmentation logits with BatchNorm in inference mode (validation and test).

    Args:
      state: a fine-tuning train state.
      images: (B, H, W, 1) float32 slices.
      model: the `UNet` the state belongs to.

    Returns:
      (B, H, W, num_classes) float32 logits. Usable with `DataParallel.map_eval` directly.
    """
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    return model.apply(variables, images, train=False)


# ----------------------------------------------------------------------------------------------
# States.


def init_variables(model: nn.Module, rng: jax.Array, example_input: jax.Array) -> dict:
    """`{"params": ..., "batch_stats": ...}` of `model` for inputs shaped like `example_input`.

    Initialised under jit in inference mode (no mapped axis is needed for cross-replica
    BatchNorm); only the shape and dtype of `example_input` matter.

    On CPU the initialiser is compiled without backend optimisations: LLVM spends ~30 s
    optimising the unrolled threefry rounds of the full-size UNet's ~60 initialisers, for a
    function that runs once (3-5 s at -O0, same values up to float32 rounding of the last bit).
    Under a trace (`jax.eval_shape` in `jaxcl.config_validation`) it is traced, not compiled.
    """
    init = functools.partial(model.init, train=False)
    if isinstance(rng, jax.core.Tracer):
        variables = init(rng, example_input)
    else:
        options = {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else None
        lowered = jax.jit(init).lower(rng, example_input)
        variables = lowered.compile(compiler_options=options)(rng, example_input)
    return {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}


def create_train_state(
    model: nn.Module,
    rng: jax.Array,
    example_input: jax.Array,
    tx: optax.GradientTransformation,
) -> TrainState:
    """A fresh `TrainState` of `model` (parameters from `rng`, optimiser state of `tx`)."""
    variables = init_variables(model, rng, example_input)
    return TrainState.create(
        params=variables["params"], batch_stats=variables["batch_stats"], tx=tx
    )


def create_byol_state(
    online_model: nn.Module,
    target_model: nn.Module,
    rng: jax.Array,
    example_input: jax.Array,
    tx: optax.GradientTransformation,
) -> ByolState:
    """A fresh `ByolState`: the target starts as a copy of the online encoder + projector.

    The target's paths are read from `target_model`'s own (shape-only) initialisation, so any
    network the target lacks (the predictor) stays online-only.
    """
    online = create_train_state(online_model, rng, example_input, tx)
    target_shapes = jax.eval_shape(
        functools.partial(target_model.init, train=False), rng, example_input
    )

    def shared(collection: PyTree, name: str) -> PyTree:
        target_names = target_shapes.get(name, {})
        missing = sorted(set(target_names) - set(collection))
        if missing:
            raise ValueError(
                f"create_byol_state: the target network has {name} {missing} that the online "
                "network lacks; build both from ByolNetwork with the same filters and sizes."
            )
        # Copies: the target must not share buffers with the online network (donation).
        return jax.tree.map(jnp.array, {key: collection[key] for key in target_names})

    return ByolState(
        online=online,
        target_params=shared(online.params, "params"),
        target_batch_stats=shared(online.batch_stats, "batch_stats"),
    )


def frozen_encoder_tx(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """`tx` on every top-level network except `encoder`, whose updates are exactly zero.

    The local pre-training stage keeps the encoder of global pre-training fixed
    (docs/METHOD.md §9, stage 2); the frozen part carries no optimiser state.
    """

    def labels(params: PyTree) -> PyTree:
        return {
            name: jax.tree.map(lambda _, n=name: _FROZEN if n == "encoder" else _TRAINED, subtree)
            for name, subtree in params.items()
        }

    return optax.multi_transform({_TRAINED: tx, _FROZEN: optax.set_to_zero()}, labels)
