"""Soft Dice loss against hand-computed cases and a numpy loop (docs/METHOD.md §9).

The hard evaluation Dice (§11) is `jaxcl.evaluate.dice_per_class`, tested in tests/test_evaluate.py.
"""

import math

import jax
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
