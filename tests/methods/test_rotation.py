"""Rotation prediction against independent computations: the turns, the labels and the loss."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcl import augment
from jaxcl.methods import rotation
from jaxcl.train.parallel import AXIS_NAME

# Global views with the crop and intensity switched off: the view is the slice itself.
IDENTITY_VIEWS = dataclasses.replace(
    augment.AugmentConfig(),
    crop_fraction=1.0,
    pretrain_brightness=0.0,
    pretrain_contrast=(1.0, 1.0),
    pretrain_clip=(-10.0, 10.0),
)


@pytest.mark.parametrize("turns", range(4))
def test_rotate_is_numpys_rot90(turns):
    image = np.arange(5 * 5, dtype=np.float32).reshape(5, 5, 1)
    rotated = rotation.rotate(image, jnp.int32(turns))
    np.testing.assert_array_equal(rotated, np.rot90(image, turns, axes=(0, 1)))


def test_a_quarter_turn_is_counter_clockwise():
    image = np.arange(5 * 5, dtype=np.float32).reshape(5, 5, 1)
    rotated = rotation.rotate(image, jnp.int32(1))
    assert rotated[0, 0, 0] == image[0, 4, 0]  # the top-right corner moves to the top-left


def test_view_v_of_a_slice_is_turned_v_times():
    rng = np.random.default_rng(0)
    slices = rng.uniform(0.1, 1.0, (2, 8, 8, 1)).astype(np.float32)
    images = np.repeat(slices, 4, axis=0)  # the random layout: 4 views of each slice, adjacent
    view_ids = np.tile(np.arange(4), 2)
    batch = {"image": jnp.asarray(images), "view_id": jnp.asarray(view_ids)}

    def one_device(batch):
        return rotation.rotated_views(batch, jax.random.key(0), IDENTITY_VIEWS)

    views, turns = jax.vmap(one_device, axis_name=AXIS_NAME)(jax.tree.map(lambda x: x[None], batch))
    np.testing.assert_array_equal(turns[0], view_ids)
    for row, (image, view_id) in enumerate(zip(images, view_ids, strict=True)):
        np.testing.assert_allclose(views[0, row], np.rot90(image, view_id), atol=1e-6)


def test_loss_is_the_mean_cross_entropy():
    logits = np.array([[2.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [1.0, 3.0, -1.0, 0.5]])
    turns = np.array([0, 2, 1])
    expected = np.mean(
        [-np.log(np.exp(row[t]) / np.exp(row).sum()) for row, t in zip(logits, turns, strict=True)]
    )
    loss = rotation.rotation_loss(jnp.asarray(logits), jnp.asarray(turns))
    np.testing.assert_allclose(loss, expected, rtol=1e-6)
    np.testing.assert_allclose(
        rotation.rotation_loss(jnp.zeros((3, 4)), jnp.asarray(turns)), np.log(4), rtol=1e-6
    )
