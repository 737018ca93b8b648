"""Mixup (Zhang et al., ICLR 2018) for fine-tuning, a Table 2 baseline (docs/METHOD.md §16).

After the fine-tuning augmentation, every example of a device's batch is mixed with a partner
drawn from the same batch (a random permutation): image `λ x_i + (1 - λ) x_j` and target
`λ y_i + (1 - λ) y_j` with one-hot labels y, `λ ~ Beta(α, α)` per example (α = 0.1: most λ near
0 or 1). The loss is the soft Dice against the soft targets.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxcl import augment
from jaxcl.losses import segmentation
from jaxcl.methods import parts, supervised
from jaxcl.methods.parts import FineTuneInputs, FineTuneParts
from jaxcl.train import steps
from jaxcl.train.parallel import AXIS_NAME
from jaxcl.train.state import TrainState

PAPER_ALPHA = 0.1


def mix(
    key: jax.Array, images: jax.Array, targets: jax.Array, alpha: float
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Mixes each example with a partner from the batch.

    Args:
      key: PRNG key of this batch.
      images: (B, H, W, 1) float images.
      targets: (B, H, W, C) class probabilities (one-hot labels).
      alpha: α of the Beta(α, α) mixing weights.

    Returns:
      (mixed images, mixed targets, λ (B,), partner index (B,)).
    """
    lambda_key, partner_key = jax.random.split(key)
    weights = jax.random.beta(lambda_key, alpha, alpha, (images.shape[0],))
    partners = jax.random.permutation(partner_key, images.shape[0])

    def blend(x):
        w = weights.reshape(-1, *([1] * (x.ndim - 1))).astype(x.dtype)
        return w * x + (1 - w) * x[partners]

    return blend(images), blend(targets), weights, partners


def mixup_step(
    state: TrainState,
    batch: dict[str, jax.Array],
    rng: jax.Array,
    *,
    model: nn.Module,
    num_classes: int,
    alpha: float,
    augment_config: augment.AugmentConfig,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One fine-tuning update of the UNet on mixed examples (`steps.finetune_step`'s batch)."""
    pair_fn = functools.partial(augment.finetune_pair, config=augment_config)
    keys = steps.example_keys(rng, batch["image"].shape[0])
    images, labels = jax.vmap(pair_fn)(keys, batch["image"], batch["label"])
    # Each device mixes its own examples with a key of its own.
    mix_key = jax.random.fold_in(jax.random.fold_in(rng, 1), jax.lax.axis_index(AXIS_NAME))
    one_hot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
    images, targets, _, _ = mix(mix_key, images, one_hot, alpha)

    def loss_fn(params):
        logits, batch_stats = steps.train_apply(model, params, state.batch_stats, images)
        return segmentation.soft_target_dice_loss(logits, targets), batch_stats

    return steps.mean_loss_update(state, loss_fn)


def build(inputs: FineTuneInputs) -> FineTuneParts:
    """`mixup_step` on the supervised fine-tuning's batches (`config.finetune.mixup_alpha`)."""
    step = functools.partial(
        mixup_step,
        model=inputs.model,
        num_classes=inputs.num_classes,
        alpha=inputs.config.finetune.mixup_alpha,
        augment_config=parts.augment_config(inputs.config),
    )
    return dataclasses.replace(supervised.build(inputs), step=step)
