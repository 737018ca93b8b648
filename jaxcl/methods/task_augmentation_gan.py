"""The GAN rounds of task-driven data augmentation (docs/METHOD.md §19): one conditional generator,
the image discriminator and the UNet, trained together by one step.

A round trains one kind of transformation (`TRANSFORMATIONS`): a generator maps noise z and an
affine-augmented labelled image to a displacement field (`deform`: image and one-hot label warped
bilinearly, so the label turns soft) or to an additive intensity mask (`change_intensity`: the
label is kept). Each step:

- the UNet sees the labelled batch with its first n slices (global batch order) kept original
  and the rest replaced by their generated versions, n drawn per step as in the reference code
  (`ORIGINAL_BOUNDS`); its loss is the soft Dice against the (soft) targets;
- the generator minimises `ADVERSARIAL_WEIGHT · adversarial + SEGMENTATION_WEIGHT · segmentation
  - l1_weight · mean|output|`: the non-saturating adversarial term (the discriminator's
  cross-entropy of the generated images against "real"), the UNet's loss above (whose gradient
  reaches the generator through its generated slices) and a negative L1 term that rewards
  larger transformations, so the generator cannot settle on the identity, which trivially looks
  real;
- the discriminator minimises the cross-entropy of the unlabelled images against "real" plus
  that of the generated ones against "fake", with the gradient stopped at the generator.

All three networks use BatchNorm in train mode; gradients and statistics of all three are
`pmean`ed over the "batch" axis. Per-example randomness (augmentation, z) is keyed by the
example's index in the global batch, so one device and eight see the same numbers.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxcl import augment
from jaxcl.losses import gan as gan_losses
from jaxcl.losses import segmentation
from jaxcl.methods import supervised
from jaxcl.models.task_augmentation import (
    NOISE_FEATURES,
    DeformationGenerator,
    IntensityGenerator,
)
from jaxcl.train import steps
from jaxcl.train.parallel import AXIS_NAME
from jaxcl.train.state import TrainState

PyTree = Any
Batch = dict[str, jax.Array]

ADVERSARIAL_WEIGHT = 1.0  # the reference's lamda_adv
SEGMENTATION_WEIGHT = 1.0  # the reference's lamda_dsc
# The reference code mixes batches of 20 slices; its counts are scaled to other batch sizes.
REFERENCE_BATCH = 20
# Original slices in the UNet's batch: np.random.randint(5, 15) of 20, the rest generated.
ORIGINAL_BOUNDS = ((5, 15),)


@flax.struct.dataclass
class GanState:
    """The UNet's, the generator's and the discriminator's train states."""

    segmenter: TrainState
    generator: TrainState
    discriminator: TrainState

    @property
    def step(self) -> jax.Array:
        return self.segmenter.step


# ----------------------------------------------------------------------------------------------
# Transformations.


def deform(images: jax.Array, targets: jax.Array, field: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Images (B, H, W, 1) and targets (B, H, W, C) warped by `field` (B, H, W, 2), bilinearly
    (`augment.warp`), both read at the same positions."""
    warped = jax.vmap(augment.warp)(jnp.concatenate([images, targets], axis=-1), field)
    return warped[..., :1], warped[..., 1:]


def change_intensity(
    images: jax.Array, targets: jax.Array, mask: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Images (B, H, W, 1) plus the additive mask (B, H, W, 1); targets unchanged."""
    return images + mask, targets


@dataclasses.dataclass(frozen=True)
class Transformation:
    """One kind of generated transformation.

    Attributes:
      name: "deformation" or "intensity".
      network: the generator's class (`models.task_augmentation`).
      apply: `apply(images, targets, generator output) -> (images, targets)`.
    """

    name: str
    network: type[nn.Module]
    apply: Callable[[jax.Array, jax.Array, jax.Array], tuple[jax.Array, jax.Array]]


TRANSFORMATIONS = {
    t.name: t
    for t in (
        Transformation("deformation", DeformationGenerator, deform),
        Transformation("intensity", IntensityGenerator, change_intensity),
    )
}


# ----------------------------------------------------------------------------------------------
# Losses and per-step draws.


def generator_loss(
    adversarial: jax.Array, segmentation_loss: jax.Array, output: jax.Array, l1_weight: float
) -> jax.Array:
    """`ADVERSARIAL_WEIGHT · adversarial + SEGMENTATION_WEIGHT · segmentation_loss
    - l1_weight · mean|output|` (output: the generated fields or masks, any shape)."""
    return (
        ADVERSARIAL_WEIGHT * adversarial
        + SEGMENTATION_WEIGHT * segmentation_loss
        - l1_weight * jnp.mean(jnp.abs(output))
    )


def global_indices(per_device_batch: int) -> jax.Array:
    """(per_device_batch,) int32 indices of this device's examples in the global batch (inside a
    mapping over "batch")."""
    return jax.lax.axis_index(AXIS_NAME) * per_device_batch + jnp.arange(per_device_batch)


def mixing_thresholds(
    key: jax.Array, batch_size: int, bounds: tuple[tuple[int, int], ...]
) -> jax.Array:
    """(K,) int32 thresholds, threshold k uniform on the integers [low_k, high_k) of a
    `REFERENCE_BATCH`-slice batch (the reference's `np.random.randint(low, high)`), scaled to
    `batch_size` slices (rounded down)."""
    low, high = (jnp.asarray(values, jnp.float32) for values in zip(*bounds, strict=True))
    drawn = low + (high - low) * jax.random.uniform(key, (len(bounds),))
    return jnp.floor(drawn * (batch_size / REFERENCE_BATCH)).astype(jnp.int32)


def mixing_groups(
    key: jax.Array, per_device_batch: int, batch_size: int, bounds: tuple[tuple[int, int], ...]
) -> jax.Array:
    """(per_device_batch,) int32 group of each example, 0..K: how many of the step's
    `mixing_thresholds` its global index reaches (group 0: index below the first)."""
    thresholds = mixing_thresholds(key, batch_size, bounds)
    indices = global_indices(per_device_batch)
    return jnp.sum(indices[:, None] >= thresholds[None, :], axis=1)


def noise(key: jax.Array, per_device_batch: int) -> jax.Array:
    """(per_device_batch, NOISE_FEATURES) z ~ N(0, 1), keyed by global example index."""
    keys = steps.example_keys(key, per_device_batch)
    return jax.vmap(lambda k: jax.random.normal(k, (NOISE_FEATURES,)))(keys)


def augmented_batch(
    batch: Batch, rng: jax.Array, num_classes: int, augment_config: augment.AugmentConfig
) -> tuple[jax.Array, jax.Array]:
    """The fine-tuning augmentation of a labelled batch: images (B, H, W, 1) and one-hot
    targets (B, H, W, C) float32."""
    pair_fn = functools.partial(augment.finetune_pair, config=augment_config)
    keys = steps.example_keys(rng, batch["image"].shape[0])
    images, labels = jax.vmap(pair_fn)(keys, batch["image"], batch["label"])
    return images, jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)


def _select(use_first: jax.Array, first: jax.Array, second: jax.Array) -> jax.Array:
    """Per example (leading axis) `first` where `use_first` (B,) is True, else `second`."""
    return jnp.where(use_first.reshape(-1, *([1] * (first.ndim - 1))), first, second)


def _train_apply(network: nn.Module, state: TrainState, params: PyTree, *inputs):
    """Train-mode forward pass with `params` and the state's statistics: (output, statistics)."""
    output, updates = network.apply(
        {"params": params, "batch_stats": state.batch_stats},
        *inputs,
        train=True,
        mutable=["batch_stats"],
    )
    return output, updates["batch_stats"]


# ----------------------------------------------------------------------------------------------
# The step.


def gan_step(
    state: GanState,
    batch: Batch,
    rng: jax.Array,
    *,
    model: nn.Module,
    generator: nn.Module,
    discriminator: nn.Module,
    transform: Callable[[jax.Array, jax.Array, jax.Array], tuple[jax.Array, jax.Array]],
    num_classes: int,
    batch_size: int,
    l1_weight: float,
    augment_config: augment.AugmentConfig,
) -> tuple[GanState, dict[str, jax.Array]]:
    """One update of the UNet, the generator and the discriminator (module docstring).

    Args:
      state: the replicated `GanState`.
      batch: this device's `image (B, H, W, 1)`, `label (B, H, W)` and `unlabelled_image
        (B_u, H, W, 1)`.
      rng: step key, the same on every device.
      model: the `UNet`.
      generator: a generator of `models.task_augmentation`.
      discriminator: the `ImageDiscriminator`.
      transform: the generator's `Transformation.apply`.
      num_classes: classes including background.
      batch_size: labelled slices of the global batch (scales `ORIGINAL_BOUNDS`).
      l1_weight: weight of the negative L1 term on the generator's output.
      augment_config: the fine-tuning augmentation, applied to both kinds of slices first.
    """
    images, targets = augmented_batch(batch, rng, num_classes, augment_config)
    unlabelled = batch[supervised.UNLABELLED_IMAGE]
    pair_fn = functools.partial(augment.finetune_pair, config=augment_config)
    unlabelled, _ = jax.vmap(pair_fn)(
        steps.example_keys(jax.random.fold_in(rng, 1), unlabelled.shape[0]),
        unlabelled,
        jnp.zeros(unlabelled.shape[:3], jnp.int32),
    )
    count = images.shape[0]
    z = noise(jax.random.fold_in(rng, 2), count)
    original = mixing_groups(jax.random.fold_in(rng, 3), count, batch_size, ORIGINAL_BOUNDS) == 0
    segmenter, generator_state, critic = state.segmenter, state.generator, state.discriminator

    def judge(params, fakes):
        return _train_apply(discriminator, critic, params, jnp.concatenate([fakes, unlabelled]))

    def joint_loss(params):
        segmenter_params, generator_params = params
        output, generator_stats = _train_apply(
            generator, generator_state, generator_params, z, images
        )
        fake_images, fake_targets = transform(images, targets, output)
        logits, segmenter_stats = steps.train_apply(
            model,
            segmenter_params,
            segmenter.batch_stats,
            _select(original, images, fake_images),
        )
        segmentation_loss = segmentation.soft_target_dice_loss(
            logits, _select(original, targets, fake_targets)
        )
        fake_logits, _ = judge(critic.params, fake_images)
        adversarial = gan_losses.non_saturating_loss(fake_logits[:count])
        loss = generator_loss(adversarial, segmentation_loss, output, l1_weight)
        measured = {
            "segmentation_loss": segmentation_loss,
            "adversarial_loss": adversarial,
            "magnitude": jnp.mean(jnp.abs(output)),
        }
        return loss, (segmenter_stats, generator_stats, fake_images, measured)

    (loss, (segmenter_stats, generator_stats, fake_images, measured)), grads = jax.value_and_grad(
        joint_loss, has_aux=True
    )((segmenter.params, generator_state.params))
    fake_images = jax.lax.stop_gradient(fake_images)

    def critic_loss(params):
        logits, critic_stats = judge(params, fake_images)
        return gan_losses.discriminator_loss(logits[count:], logits[:count]), critic_stats

    (critic_value, critic_stats), critic_grads = jax.value_and_grad(critic_loss, has_aux=True)(
        critic.params
    )
    segmenter_grads, generator_grads = jax.lax.pmean(grads, AXIS_NAME)
    new_state = GanState(
        segmenter=segmenter.apply_gradients(
            segmenter_grads, jax.lax.pmean(segmenter_stats, AXIS_NAME)
        ),
        generator=generator_state.apply_gradients(
            generator_grads, jax.lax.pmean(generator_stats, AXIS_NAME)
        ),
        discriminator=critic.apply_gradients(
            jax.lax.pmean(critic_grads, AXIS_NAME), jax.lax.pmean(critic_stats, AXIS_NAME)
        ),
    )
    metrics = {"loss": loss, "discriminator_loss": critic_value, **measured}
    return new_state, jax.lax.pmean(metrics, AXIS_NAME)
