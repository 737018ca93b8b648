"""Rotation prediction (Gidaris et al., ICLR 2018): the encoder pre-trained as a pretext task.

Every slice of the batch appears at all four rotations, 0°, 90°, 180° and 270° (view v of a slice
is turned v quarter turns, counter-clockwise in the (H, W) plane), after the global pre-training
augmentation (crop and intensity, no rotation). The encoder and a small classifier (flatten,
Dense 1024 + ReLU, Dense 4: the g1 architecture with 4 outputs) predict the number of quarter
turns; the loss is the 4-way cross-entropy, averaged over the global batch. Only the encoder is
transferred, like G^D's (docs/METHOD.md §14).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from jaxcl import augment
from jaxcl.methods.parts import BuildInputs, StageParts, train_outputs
from jaxcl.models import stages as stage_models
from jaxcl.train import steps
from jaxcl.train.state import TrainState

NUM_ROTATIONS = 4


def rotate(image: jax.Array, quarter_turns: jax.Array) -> jax.Array:
    """`image` (S, S, C) turned `quarter_turns` (0-3, traced) times by 90° in the (H, W) plane.

    The image must be square, so that every rotation has its shape.
    """
    turns = [functools.partial(jnp.rot90, k=k, axes=(0, 1)) for k in range(NUM_ROTATIONS)]
    return jax.lax.switch(quarter_turns, turns, image)


def rotation_loss(logits: jax.Array, quarter_turns: jax.Array) -> jax.Array:
    """Mean 4-way softmax cross-entropy of (B, 4) logits against (B,) quarter turns, float32.

    Per device: the mean over equal per-device batches, so the `pmean` of per-device gradients is
    the gradient of the loss over the global batch.
    """
    log_probabilities = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    picked = jnp.take_along_axis(log_probabilities, quarter_turns[:, None], axis=-1)
    return -jnp.mean(picked)


def rotated_views(
    batch: dict[str, jax.Array], rng: jax.Array, config: augment.AugmentConfig
) -> tuple[jax.Array, jax.Array]:
    """(views (B, S, S, 1), quarter turns (B,)): view v of a slice augmented, turned v times."""
    view_fn = functools.partial(augment.global_view, config=config)
    views = steps.augmented_views(view_fn, rng, batch["image"])
    quarter_turns = batch["view_id"] % NUM_ROTATIONS
    return jax.vmap(rotate)(views, quarter_turns), quarter_turns


def rotation_step(
    state: TrainState,
    batch: dict[str, jax.Array],
    rng: jax.Array,
    *,
    model: nn.Module,
    augment_config: augment.AugmentConfig,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One update of encoder + classifier on this device's random batch of 4 views per slice."""
    views, quarter_turns = rotated_views(batch, rng, augment_config)

    def loss_fn(params):
        logits, batch_stats = steps.train_apply(model, params, state.batch_stats, views)
        return rotation_loss(logits, quarter_turns), batch_stats

    return steps.mean_loss_update(state, loss_fn)


def build(inputs: BuildInputs) -> StageParts:
    """The rotation pre-training stage."""
    config, section = inputs.config, inputs.section
    model = stage_models.GlobalContrastiveModel(
        hidden_features=config.model.global_hidden_features,
        features=NUM_ROTATIONS,
        **inputs.model_options(),
    )
    tx = optax.adam(section.learning_rate)
    state = steps.create_train_state(model, inputs.key, inputs.example_input, tx)
    aug = inputs.augment_config()
    return StageParts(
        state=state,
        step=functools.partial(rotation_step, model=model, augment_config=aug),
        export=lambda final: final,
        views=lambda batch, rng: rotated_views(batch, rng, aug)[0],
        outputs=lambda s, x: train_outputs(model, s.params, s.batch_stats, x),
        loss=lambda logits, batch: rotation_loss(logits, batch["view_id"] % NUM_ROTATIONS),
    )
