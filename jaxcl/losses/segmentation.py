"""Segmentation losses and the hard Dice metric (docs/METHOD.md §9, §11).

- `soft_dice_loss`: the fine-tuning loss, soft Dice of the softmax against one-hot labels per
  image and class over (H, W), loss = 1 - mean Dice (background included by default).
- `cross_entropy`: mean pixel-wise softmax cross-entropy, as an optional extra term.
- `dice_per_class`: hard Dice of predicted against reference label maps per class, pooled over all
  voxels given (a batch of slices or a whole volume); Dice of an empty prediction against an empty
  reference is 1.
"""

import jax
import jax.numpy as jnp
import optax

# Added to the soft Dice denominator only, to avoid 0/0 (the original code's 1e-10). Nothing is
# added to the numerator, so a class absent from an image contributes a Dice of 0 to the mean and
# no gradient, exactly as in the original; the softmax still moves probability mass out of the
# absent class through the classes that are present.
SOFT_DICE_EPSILON = 1e-10


def _check_logits(logits: jax.Array, labels: jax.Array, num_classes: int, caller: str) -> None:
    if logits.shape[:-1] != labels.shape or logits.shape[-1] != num_classes:
        raise ValueError(
            f"segmentation.{caller} expects logits (..., {num_classes}) and integer labels "
            f"with the leading shape of the logits, got logits {logits.shape} and labels "
            f"{labels.shape}; check that the model's num_classes matches the dataset's number "
            "of classes."
        )


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
    _check_logits(logits, labels, num_classes, "soft_dice_loss")
    if logits.ndim != 4:
        raise ValueError(
            f"segmentation.soft_dice_loss expects logits (B, H, W, C), got shape {logits.shape}."
        )
    probabilities = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    one_hot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
    intersection = jnp.sum(probabilities * one_hot, axis=(1, 2))
    denominator = jnp.sum(probabilities, axis=(1, 2)) + jnp.sum(one_hot, axis=(1, 2)) + epsilon
    dice = 2.0 * intersection / denominator  # (B, C)
    if not include_background:
        dice = dice[:, 1:]
    return 1.0 - jnp.mean(dice)


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy over all pixels.

    Args:
      logits: (..., C) unnormalised class scores.
      labels: (...) integer labels in [0, C).

    Returns:
      Scalar float32 loss.
    """
    _check_logits(logits, labels, logits.shape[-1], "cross_entropy")
    return jnp.mean(
        optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
    )


def dice_per_class(predictions: jax.Array, labels: jax.Array, *, num_classes: int) -> jax.Array:
    """Hard Dice per class, pooled over every voxel given (docs/METHOD.md §11).

    `Dice[c] = 2·|P_c ∩ Y_c| / (|P_c| + |Y_c|)`, and 1 when both are empty.

    Args:
      predictions: integer predicted labels of any shape, e.g. `argmax(logits, -1)` for a batch of
        slices (B, H, W) or a whole volume (Z, H, W).
      labels: integer reference labels of the same shape.
      num_classes: C; index 0 of the result is the background. Both maps must hold values in
        [0, C) (checked by the data loaders; values outside would be miscounted).

    Returns:
      (C,) float32 Dice scores.
    """
    if predictions.shape != labels.shape:
        raise ValueError(
            "segmentation.dice_per_class expects predictions and labels of the same shape, got "
            f"{predictions.shape} and {labels.shape}; take the argmax over the class axis first."
        )
    predictions = jnp.asarray(predictions).reshape(-1)
    labels = jnp.asarray(labels).reshape(-1)
    # Integer counts (exact for any volume size) without materialising one-hot maps.
    matches = (predictions == labels).astype(jnp.int32)
    intersection = jnp.bincount(labels, weights=matches, length=num_classes)
    total = jnp.bincount(predictions, length=num_classes) + jnp.bincount(labels, length=num_classes)
    safe_total = jnp.maximum(total, 1).astype(jnp.float32)
    return jnp.where(total > 0, 2.0 * intersection.astype(jnp.float32) / safe_total, 1.0)
