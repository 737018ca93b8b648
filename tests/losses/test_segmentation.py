"""Soft Dice, cross-entropy and hard Dice against hand-computed cases and numpy loops.

Definitions: docs/METHOD.md §9 (fine-tuning loss) and §11 (evaluation Dice).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcl.losses import segmentation

LOG3 = math.log(3.0)
# One row of two pixels whose softmax is [0.25, 0.75] and [0.75, 0.25].
HAND_LOGITS = np.array([[[[0.0, LOG3], [LOG3, 0.0]]]] * 2, np.float32)  # (2, 1, 2, 2)
HAND_LABELS = np.array([[[1, 0]], [[0, 0]]])  # (2, 1, 2)


def _numpy_soft_dice_loss(logits, labels, num_classes, include_background):
    logits = np.asarray(logits, np.float64)
    probabilities = np.exp(logits - logits.max(-1, keepdims=True))
    probabilities /= probabilities.sum(-1, keepdims=True)
    dices = []
    for b in range(logits.shape[0]):
        for c in range(0 if include_background else 1, num_classes):
            p = probabilities[b, ..., c]
            y = (labels[b] == c).astype(np.float64)
            dices.append(2.0 * np.sum(p * y) / (np.sum(p) + np.sum(y) + 1e-10))
    return 1.0 - np.mean(dices)


def _numpy_hard_dice(predictions, labels, num_classes):
    scores = []
    for c in range(num_classes):
        p, y = predictions == c, labels == c
        total = p.sum() + y.sum()
        scores.append(1.0 if total == 0 else 2.0 * np.sum(p & y) / total)
    return np.array(scores)


def test_soft_dice_hand_case():
    # Image 0: class 0 Dice 2·0.75/(1 + 1), class 1 the same -> 0.75, 0.75.
    # Image 1 (all background): class 0 Dice 2·1/(1 + 2) = 2/3; class 1 absent -> 0.
    loss = segmentation.soft_dice_loss(HAND_LOGITS, HAND_LABELS, num_classes=2)
    np.testing.assert_allclose(loss, 1.0 - (0.75 + 0.75 + 2.0 / 3.0 + 0.0) / 4.0, rtol=1e-6)
    foreground = segmentation.soft_dice_loss(
        HAND_LOGITS, HAND_LABELS, num_classes=2, include_background=False
    )
    np.testing.assert_allclose(foreground, 1.0 - (0.75 + 0.0) / 2.0, rtol=1e-6)


@pytest.mark.parametrize("include_background", [True, False])
def test_soft_dice_matches_numpy_reference(include_background):
    rng = np.random.default_rng(0)
    logits = rng.normal(scale=3.0, size=(3, 5, 6, 4)).astype(np.float32)
    labels = rng.integers(0, 4, size=(3, 5, 6))
    labels[1] = np.minimum(labels[1], 2)  # image 1 lacks class 3
    loss = segmentation.soft_dice_loss(
        logits, labels, num_classes=4, include_background=include_background
    )
    expected = _numpy_soft_dice_loss(logits, labels, 4, include_background)
    np.testing.assert_allclose(loss, expected, rtol=1e-5)


def test_soft_dice_perfect_prediction_and_finite_gradients():
    labels = np.array([[[0, 1], [2, 1]]])
    confident = 50.0 * jax.nn.one_hot(labels, 3)
    loss, grad = jax.value_and_grad(
        lambda x: segmentation.soft_dice_loss(x, labels, num_classes=3)
    )(confident)
    np.testing.assert_allclose(loss, 0.0, atol=1e-6)
    assert np.all(np.isfinite(np.asarray(grad)))


def test_soft_dice_rejects_wrong_class_count():
    with pytest.raises(ValueError, match="num_classes"):
        segmentation.soft_dice_loss(HAND_LOGITS, HAND_LABELS, num_classes=3)


def test_cross_entropy_hand_case_and_reference():
    # Pixels: p(label) = 0.75, 0.75 (image 0); 0.25, 0.75 (image 1).
    expected = -(3.0 * math.log(0.75) + math.log(0.25)) / 4.0
    np.testing.assert_allclose(
        segmentation.cross_entropy(HAND_LOGITS, HAND_LABELS), expected, rtol=1e-6
    )
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(2, 3, 3, 5))
    labels = rng.integers(0, 5, size=(2, 3, 3))
    log_probabilities = logits - np.log(np.sum(np.exp(logits), -1, keepdims=True))
    reference = -np.mean(np.take_along_axis(log_probabilities, labels[..., None], -1))
    np.testing.assert_allclose(segmentation.cross_entropy(logits, labels), reference, rtol=1e-5)


def test_dice_per_class_hand_case():
    predictions = np.array([[0, 1, 1], [2, 0, 0]])
    labels = np.array([[0, 1, 2], [2, 2, 0]])
    # class 0: |P|=3, |Y|=2, ∩=2; class 1: 2, 1, 1; class 2: 1, 3, 1; class 3: empty vs empty.
    expected = [4.0 / 5.0, 2.0 / 3.0, 2.0 / 4.0, 1.0]
    np.testing.assert_allclose(
        segmentation.dice_per_class(predictions, labels, num_classes=4), expected, rtol=1e-6
    )
    # A class predicted but absent from the reference scores 0, and the reverse as well.
    np.testing.assert_allclose(
        segmentation.dice_per_class(np.array([1, 0]), np.array([0, 0]), num_classes=2),
        [2.0 / 3.0, 0.0],
        rtol=1e-6,
    )
    np.testing.assert_allclose(
        segmentation.dice_per_class(np.array([0, 0]), np.array([1, 0]), num_classes=2),
        [2.0 / 3.0, 0.0],
        rtol=1e-6,
    )


def test_dice_per_class_matches_numpy_reference_on_a_volume_under_jit():
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 3, size=(4, 16, 16))  # class 3 of 4 never occurs
    predictions = np.where(rng.random(labels.shape) < 0.7, labels, rng.integers(0, 4, labels.shape))
    dice = jax.jit(lambda p, y: segmentation.dice_per_class(p, y, num_classes=4))(
        predictions, labels
    )
    np.testing.assert_allclose(dice, _numpy_hard_dice(predictions, labels, 4), rtol=1e-6)


def test_dice_per_class_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="argmax"):
        segmentation.dice_per_class(jnp.zeros((2, 4, 4, 3)), jnp.zeros((2, 4, 4)), num_classes=3)
