"""Inpainting and context restoration against independent computations of their corruptions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcl.methods import restoration

SIZE = 64


def _image(seed=0):
    return np.random.default_rng(seed).uniform(0.1, 1.0, (SIZE, SIZE, 1)).astype(np.float32)


def test_sides_scale_with_the_image():
    assert restoration.scaled_side(100, 192) == 100
    assert restoration.scaled_side(100, 64) == 33
    assert restoration.scaled_side(5, 64) == 2
    assert restoration.scaled_side(5, 32) == 1  # at least one pixel


@pytest.mark.parametrize("seed", range(5))
def test_inpainting_zeroes_exactly_one_box(seed):
    image = _image(seed)
    corrupted, weights = restoration.inpainting_pair(jax.random.key(seed), jnp.asarray(image))
    corrupted, weights = np.asarray(corrupted), np.asarray(weights)
    rows, cols = np.nonzero(weights[..., 0])
    side = restoration.scaled_side(100, SIZE)
    # One solid side x side box inside the image ...
    assert rows.max() - rows.min() + 1 == side and cols.max() - cols.min() + 1 == side
    assert weights.sum() == side * side
    # ... whose pixels are 0; every other pixel is the original.
    np.testing.assert_array_equal(corrupted[weights == 1], 0.0)
    np.testing.assert_array_equal(corrupted[weights == 0], image[weights == 0])


def test_inpainting_boxes_move():
    corners = set()
    for seed in range(20):
        weights = np.asarray(restoration.inpainting_mask(jax.random.key(seed), SIZE))
        rows, cols = np.nonzero(weights)
        corners.add((rows.min(), cols.min()))
    assert len(corners) > 10


@pytest.mark.parametrize("seed", range(5))
def test_context_restoration_swaps_ten_disjoint_patch_pairs(seed):
    image = _image(seed)
    corrupted, weights = restoration.context_pair(jax.random.key(seed), jnp.asarray(image))
    corrupted = np.asarray(corrupted)
    np.testing.assert_array_equal(np.asarray(weights), 1.0)  # the loss covers the whole image
    side = restoration.scaled_side(5, SIZE)
    rows, cols = restoration.swap_coordinates(jax.random.key(seed), SIZE)
    rows, cols = np.asarray(rows), np.asarray(cols)
    moved = (rows != np.arange(SIZE)[:, None]) | (cols != np.arange(SIZE)[None, :])
    # 2 x 10 patches of side x side pixels moved, and the mapping is a permutation of pixels.
    assert moved.sum() == 2 * restoration.NUM_SWAPS * side * side
    flat = rows * SIZE + cols
    assert len(np.unique(flat)) == SIZE * SIZE
    # Each moved patch reads one other whole patch: a pure translation, and applying the swaps
    # twice gives the image back.
    np.testing.assert_array_equal(corrupted[..., 0], image[rows, cols, 0])
    np.testing.assert_array_equal(corrupted[rows, cols], image)
    assert not np.array_equal(corrupted, image)


def test_restoration_loss_is_the_weighted_mean_squared_error():
    prediction = np.array([[1.0, 2.0], [3.0, 4.0]])
    target = np.array([[1.0, 0.0], [0.0, 0.0]])
    weights = np.array([[0.0, 1.0], [1.0, 0.0]])
    loss = restoration.restoration_loss(
        jnp.asarray(prediction), jnp.asarray(target), jnp.asarray(weights)
    )
    np.testing.assert_allclose(loss, (2.0**2 + 3.0**2) / 2, rtol=1e-6)


def test_fine_tuning_loads_all_but_the_output_layer():
    assert restoration.decoder_paths(None) == (
        ("decoder",),
        ("segmentation_head", "conv1"),
        ("segmentation_head", "conv2"),
    )
