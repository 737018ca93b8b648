"""Adversarial training (Zhang et al., MICCAI 2017), a Table 2 semi-supervised baseline
(docs/METHOD.md §18).

A discriminator (`models.discriminator.SegmentationDiscriminator`) sees a softmax map with its
image and tells maps of labelled slices (target 1) from maps of unlabelled ones (target 0). The
UNet is trained on the supervised soft Dice loss of its labelled slices plus `w(t)` times the
non-saturating adversarial term: the discriminator's cross-entropy of its unlabelled maps against
target 1, so that its predictions on unlabelled slices look like those on labelled ones. The
weight ramps up from 0 with the sigmoid-shaped schedule of Laine & Aila (2017),
`w(t) = w_max exp(-5 (1 - t/T)^2)` for t < T, then `w_max`; `w_max` is
`config.finetune.adversarial_weight` and T `config.finetune.adversarial_rampup` x the steps.

Each step updates both networks from the same forward passes: the UNet runs on the labelled and
on the unlabelled slices in two passes, each normalised by its own batch statistics, and only the
labelled pass updates the running statistics (so with weight 0 the step is the supervised one);
the discriminator is trained on those maps with the gradient stopped at the UNet. Both gradients
are `pmean`ed over devices like every other step's.
"""

from __future__ import annotations

import functools

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from jaxcl import augment
from jaxcl.losses import gan, segmentation
from jaxcl.methods import parts, supervised
from jaxcl.methods.parts import FineTuneInputs, FineTuneParts
from jaxcl.models.discriminator import SegmentationDiscriminator
from jaxcl.train import steps
from jaxcl.train.parallel import AXIS_NAME
from jaxcl.train.state import TrainState


@flax.struct.dataclass
class AdversarialState:
    """The UNet's and the discriminator's train states (the discriminator has no BatchNorm)."""

    segmenter: TrainState
    discriminator: TrainState

    @property
    def step(self) -> jax.Array:
        return self.segmenter.step


def rampup_weight(step: jax.typing.ArrayLike, maximum: float, rampup_steps: int) -> jax.Array:
    """`maximum · exp(-5 (1 - t/T)²)` for t < T = `rampup_steps`, then `maximum` (T = 0: always)."""
    if rampup_steps <= 0:
        return jnp.asarray(maximum, jnp.float32)
    progress = jnp.clip(jnp.asarray(step, jnp.float32) / rampup_steps, 0.0, 1.0)
    return maximum * jnp.exp(-5.0 * (1.0 - progress) ** 2)


def discriminator_loss(labelled_logits: jax.Array, unlabelled_logits: jax.Array) -> jax.Array:
    """Mean cross-entropy over both halves: labelled maps target 1, unlabelled maps target 0."""
    return 0.5 * gan.discriminator_loss(labelled_logits, unlabelled_logits)


def adversarial_step(
    state: AdversarialState,
    batch: dict[str, jax.Array],
    rng: jax.Array,
    *,
    model: nn.Module,
    discriminator: nn.Module,
    num_classes: int,
    max_weight: float,
    rampup_steps: int,
    augment_config: augment.AugmentConfig,
) -> tuple[AdversarialState, dict[str, jax.Array]]:
    """One update of the UNet and the discriminator.

    Args:
      state: the replicated `AdversarialState`.
      batch: this device's `image (B, H, W, 1)`, `label (B, H, W)` and `unlabelled_image
        (B_u, H, W, 1)`.
      rng: step key, the same on every device.
      model: the `UNet`.
      discriminator: the `SegmentationDiscriminator`.
      num_classes: classes including background.
      max_weight, rampup_steps: the adversarial weight schedule (`rampup_weight`).
      augment_config: the fine-tuning augmentation, applied to both kinds of slices.
    """
    pair_fn = functools.partial(augment.finetune_pair, config=augment_config)
    images, labels = jax.vmap(pair_fn)(
        steps.example_keys(rng, batch["image"].shape[0]), batch["image"], batch["label"]
    )
    unlabelled = batch[supervised.UNLABELLED_IMAGE]
    unlabelled, _ = jax.vmap(pair_fn)(
        steps.example_keys(jax.random.fold_in(rng, 1), unlabelled.shape[0]),
        unlabelled,
        jnp.zeros(unlabelled.shape[:3], jnp.int32),
    )
    count = images.shape[0]
    segmenter, critic = state.segmenter, state.discriminator
    weight = rampup_weight(segmenter.step, max_weight, rampup_steps)

    def judge(params, probabilities, x):
        return discriminator.apply({"params": params}, probabilities, x)

    def segmenter_loss(params):
        # Two passes, each normalised by its own batch statistics; only the labelled pass
        # updates the running statistics, so weight 0 is the supervised step exactly. (One pass
        # over both kinds made the labelled slices' normalisation depend on the unlabelled ones,
        # and even at weight 0 it fine-tuned far worse than the supervised step.)
        logits, batch_stats = steps.train_apply(model, params, segmenter.batch_stats, images)
        unlabelled_logits, _ = steps.train_apply(model, params, segmenter.batch_stats, unlabelled)
        supervised_loss = segmentation.soft_dice_loss(logits, labels, num_classes=num_classes)
        probabilities = jax.nn.softmax(
            jnp.concatenate([logits, unlabelled_logits]).astype(jnp.float32), axis=-1
        )
        fooling = gan.non_saturating_loss(judge(critic.params, probabilities[count:], unlabelled))
        return supervised_loss + weight * fooling, (batch_stats, probabilities, supervised_loss)

    (loss, (batch_stats, probabilities, supervised_loss)), grads = jax.value_and_grad(
        segmenter_loss, has_aux=True
    )(segmenter.params)
    probabilities = jax.lax.stop_gradient(probabilities)

    def critic_loss(params):
        return discriminator_loss(
            judge(params, probabilities[:count], images),
            judge(params, probabilities[count:], unlabelled),
        )

    critic_value, critic_grads = jax.value_and_grad(critic_loss)(critic.params)
    new_state = AdversarialState(
        segmenter=segmenter.apply_gradients(
            jax.lax.pmean(grads, AXIS_NAME), jax.lax.pmean(batch_stats, AXIS_NAME)
        ),
        discriminator=critic.apply_gradients(jax.lax.pmean(critic_grads, AXIS_NAME), {}),
    )
    metrics = {
        "loss": loss,
        "supervised_loss": supervised_loss,
        "discriminator_loss": critic_value,
        "adversarial_weight": weight,
    }
    return new_state, jax.lax.pmean(metrics, AXIS_NAME)


def build(inputs: FineTuneInputs) -> FineTuneParts:
    """The UNet's and a fresh discriminator's states, and batches of `config.finetune.batch_size`
    labelled plus as many unlabelled slices."""
    config = inputs.config
    cfg = config.finetune
    discriminator = SegmentationDiscriminator(dtype=parts.DTYPES[config.model.dtype])
    example = parts.example_input(config)
    critic_params = jax.jit(discriminator.init)(
        inputs.key, jnp.zeros((*example.shape[:3], inputs.num_classes)), example
    )["params"]
    state = AdversarialState(
        segmenter=inputs.state,
        discriminator=TrainState.create(
            params=critic_params, batch_stats={}, tx=optax.adam(cfg.learning_rate)
        ),
    )
    step = functools.partial(
        adversarial_step,
        model=inputs.model,
        discriminator=discriminator,
        num_classes=inputs.num_classes,
        max_weight=cfg.adversarial_weight,
        rampup_steps=round(cfg.adversarial_rampup * cfg.steps),
        augment_config=parts.augment_config(config),
    )
    batches = supervised.with_unlabelled_images(inputs, stream=1)
    return FineTuneParts(state, step, batches, 2 * cfg.batch_size, segmenter=lambda s: s.segmenter)
