"""The fine-tuning loss (docs/METHOD.md §9).

`soft_dice_loss`: soft Dice of the softmax against one-hot labels per image and class over
(H, W), loss = 1 - mean Dice (background included by default). The hard Dice of evaluation
(§11) is `jaxcl.evaluate.dice_per_class`, on numpy volumes.
"""

import jax
import jax.numpy as jnp

# Added to the soft Dice denominator only, to avoid 0/0 (the original code's 1e-10). Nothing is
# added to the numerator, so a class absent from an image contributes a Dice of 0 to the mean and
# no gradient, exactly as in the original; the softmax still moves probability mass out of the
# absent class through the classes that are present.
SOFT_DICE_EPSILON = 1e-10


def soft_dice_loss(
    logits: jax.Array,
    labels: jax.Array,
    *,
    num_classes: int,
    include_background: bool = True,
    epsilon: float = SOFT_DICE_EPSILON,
) -> jax.Array:
    """Soft Dice loss `1 - mean_{b, c} Dice[b, c]` (docs/METHOD.md §9).

    `Dice[b, c] = 2·Σ p·y / (Σ p + Σ y + epsilon)` with sums over (H, W) of image b, `p` the softmax
    probability of class c and `y` the one-hot label.

    Args:
      logits: (B, H, W, C) unnormalised class scores.
      labels: (B, H, W) integer labels in [0, num_classes).
      num_classes: C.
      include_background: average over all classes (the paper's setting) or only classes 1..C-1.
      epsilon: denominator floor, see `SOFT_DICE_EPSILON`.

    Returns:
      Scalar float32 loss in [0, 1].
    """
    if logits.shape[:-1] != labels.shape or logits.shape[-1] != num_classes:
        raise ValueError(
            f"segmentation.soft_dice_loss expects logits (..., {num_classes}) and integer labels "
            f"with the leading shape of the logits, got logits {logits.shape} and labels "
            f"{labels.shape}; check that the model's num_classes matches the dataset's number "
            "of classes."
        )
    if logits.ndim != 4:
        raise ValueError(
            f"segmentation.soft_dice_loss expects logits (B, H, W, C), got shape {logits.shape}."
        )
    one_hot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
    return soft_target_dice_loss(
        logits, one_hot, include_background=include_background, epsilon=epsilon
    )


def soft_target_dice_loss(
    logits: jax.Array,
    targets: jax.Array,
    *,
    include_background: bool = True,
    epsilon: float = SOFT_DICE_EPSILON,
) -> jax.Array:
    """`soft_dice_loss` against class probabilities instead of labels (mixup's soft targets).

    Args:
      logits: (B, H, W, C) unnormalised class scores.
      targets: (B, H, W, C) target probabilities (one-hot labels give `soft_dice_loss`).
      include_background, epsilon: as in `soft_dice_loss`.
    """
    if logits.shape != targets.shape or logits.ndim != 4:
        raise ValueError(
            f"segmentation.soft_target_dice_loss expects logits and targets (B, H, W, C) of one "
            f"shape, got {logits.shape} and {targets.shape}."
        )
    probabilities = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    targets = targets.astype(jnp.float32)
    intersection = jnp.sum(probabilities * targets, axis=(1, 2))
    denominator = jnp.sum(probabilities, axis=(1, 2)) + jnp.sum(targets, axis=(1, 2)) + epsilon
    dice = 2.0 * intersection / denominator  # (B, C)
    if not include_background:
        dice = dice[:, 1:]
    return 1.0 - jnp.mean(dice)
