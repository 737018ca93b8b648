"""Restoration pretext tasks: inpainting (Pathak et al., CVPR 2016) and context restoration
(Chen et al., MedIA 2019), two of the paper's Table 2 baselines (docs/METHOD.md §15).

A whole UNet with one linear output channel learns to undo a corruption of a slice, the target
being the slice itself:

  Inpainting          one square box of side 100/192 of the image, at a uniformly random
                      position, is set to 0; the loss is the mean squared error over the box.
  ContextRestoration  N = 10 pairs of square patches of side 5/192 of the image (at least 1
                      pixel) swap places; the patches do not overlap (they are 2N distinct cells
                      of a grid of patch-sized cells); the loss is the mean squared error over the
                      whole image.

Both apply to the slices as stored (normalised intensities), without other augmentation. The
whole network except its output layer is passed on to fine-tuning (`decoder_paths`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax

from jaxcl.methods.parts import BuildInputs, StageParts, train_outputs
from jaxcl.models.unet import UNet
from jaxcl.train import steps

PAPER_SIZE = 192  # the paper's image side: box and patch sides scale with the image
BOX_SIDE = 100
PATCH_SIDE = 5
NUM_SWAPS = 10
# Fine-tuning loads everything but the output layer of the restoration UNet.
TRANSFERRED_PATHS = (("decoder",), ("segmentation_head", "conv1"), ("segmentation_head", "conv2"))


def scaled_side(side: int, image_size: int) -> int:
    """A side in pixels at 192², scaled to `image_size` (at least 1 pixel)."""
    return max(1, round(side * image_size / PAPER_SIZE))


def inpainting_mask(key: jax.Array, image_size: int) -> jax.Array:
    """(S, S) float32: 1 inside one randomly placed box of side `scaled_side(100, S)`, else 0."""
    side = scaled_side(BOX_SIDE, image_size)
    top, left = jax.random.randint(key, (2,), 0, image_size - side + 1)
    rows = jnp.arange(image_size)[:, None]
    cols = jnp.arange(image_size)[None, :]
    inside = (rows >= top) & (rows < top + side) & (cols >= left) & (cols < left + side)
    return inside.astype(jnp.float32)


def swap_coordinates(key: jax.Array, image_size: int) -> tuple[jax.Array, jax.Array]:
    """Where each pixel reads from after `NUM_SWAPS` swaps of non-overlapping patch pairs.

    Returns:
      (rows, cols), each (S, S) int32: output pixel (r, c) is input pixel (rows[r, c], cols[r, c]).
    """
    side = scaled_side(PATCH_SIDE, image_size)
    cells_per_side = image_size // side
    cells = jax.random.permutation(key, cells_per_side**2)[: 2 * NUM_SWAPS]
    tops, lefts = (cells // cells_per_side) * side, (cells % cells_per_side) * side
    rows = jnp.broadcast_to(jnp.arange(image_size)[:, None], (image_size, image_size))
    cols = jnp.broadcast_to(jnp.arange(image_size)[None, :], (image_size, image_size))
    source_rows, source_cols = rows, cols
    for pair in range(NUM_SWAPS):
        first, second = 2 * pair, 2 * pair + 1
        for here, there in ((first, second), (second, first)):
            inside = (
                (rows >= tops[here])
                & (rows < tops[here] + side)
                & (cols >= lefts[here])
                & (cols < lefts[here] + side)
            )
            source_rows = jnp.where(inside, rows - tops[here] + tops[there], source_rows)
            source_cols = jnp.where(inside, cols - lefts[here] + lefts[there], source_cols)
    return source_rows.astype(jnp.int32), source_cols.astype(jnp.int32)


def inpainting_pair(key: jax.Array, image: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(corrupted image, loss weights), both (S, S, 1): the box zeroed, weights 1 on the box."""
    mask = inpainting_mask(key, image.shape[0])[..., None]
    return image * (1.0 - mask), mask


def context_pair(key: jax.Array, image: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(corrupted image, loss weights), both (S, S, 1): patches swapped, weights 1 everywhere."""
    rows, cols = swap_coordinates(key, image.shape[0])
    return image[rows, cols], jnp.ones_like(image)


def restoration_loss(prediction: jax.Array, target: jax.Array, weights: jax.Array) -> jax.Array:
    """Weighted mean squared error Σ w (p - t)² / Σ w over one device's batch, float32.

    Per device: every device weighs the same number of pixels (the same box size, or all), so
    the `pmean` of per-device gradients is the gradient over the global batch.
    """
    squared = jnp.square(prediction.astype(jnp.float32) - target.astype(jnp.float32))
    return jnp.sum(weights * squared) / jnp.maximum(jnp.sum(weights), 1.0)


def corrupted_views(
    corrupt: Callable, batch: dict[str, jax.Array], rng: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """(corrupted images, loss weights) of this device's slices, one key per example."""
    keys = steps.example_keys(rng, batch["image"].shape[0])
    return jax.vmap(corrupt)(keys, batch["image"].astype(jnp.float32))


def restoration_step(state, batch, rng, *, model, corrupt: Callable):
    """One update of the restoration UNet: corrupt, restore, regress onto the original slice."""
    corrupted, weights = corrupted_views(corrupt, batch, rng)

    def loss_fn(params):
        restored, batch_stats = steps.train_apply(model, params, state.batch_stats, corrupted)
        return restoration_loss(restored, batch["image"], weights), batch_stats

    return steps.mean_loss_update(state, loss_fn)


def decoder_paths(config: ml_collections.ConfigDict) -> tuple[tuple[str, ...], ...]:
    """What fine-tuning loads besides the encoder: all decoder blocks and the head's convs."""
    del config
    return TRANSFERRED_PATHS


def build(inputs: BuildInputs, *, corrupt: Callable) -> StageParts:
    """The stage of one restoration task (`corrupt` = `inpainting_pair` or `context_pair`)."""
    model = UNet(num_classes=1, **inputs.model_options())
    tx = optax.adam(inputs.section.learning_rate)
    state = steps.create_train_state(model, inputs.key, inputs.example_input, tx)

    def loss(restored, batch):
        # The weights of the step's corruption are drawn per key; the whole image stands in here.
        return restoration_loss(restored, batch["image"], jnp.ones_like(restored))

    return StageParts(
        state=state,
        step=functools.partial(restoration_step, model=model, corrupt=corrupt),
        export=lambda final: final,
        views=lambda batch, rng: corrupted_views(corrupt, batch, rng)[0],
        outputs=lambda s, x: train_outputs(model, s.params, s.batch_stats, x),
        loss=loss,
    )
