"""The networks of task-driven augmentation: shapes, ranges, noise dependence, parameter counts."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcl.models.task_augmentation import (
    NOISE_FEATURES,
    DeformationGenerator,
    ImageDiscriminator,
    IntensityGenerator,
)

FEATURES = (4, 8, 8, 16)
SIZE = 64


def _count(tree) -> int:
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


def _conv(kernel: int, channels_in: int, channels_out: int, *, bn: bool) -> int:
    """A k x k conv: with BatchNorm no bias but BN scale and bias, else a bias."""
    return kernel * kernel * channels_in * channels_out + (2 if bn else 1) * channels_out


def _trunk_count(features, size) -> int:
    """The generator trunk's parameters from the layer list of docs/METHOD.md §19."""
    f1, f2, f3, f4 = features
    side = size // 32
    count = NOISE_FEATURES * side * side * f4 + side * side * f4  # noise dense
    channels = f4
    for out in (f4, f3, f2, f1):  # 2x2 convs after the bilinear upsamplings
        count += _conv(2, channels, out, bn=True)
        channels = out
    count += _conv(2, f1, f1, bn=False)  # the last, linear
    count += _conv(3, 1, f1, bn=True) + _conv(3, f1, f1, bn=True)  # image branch
    count += _conv(3, 2 * f1, f1, bn=True) + _conv(3, f1, f1, bn=True)  # joined
    return count


def _discriminator_count(features, size, hidden=128) -> int:
    f1, f2, f3, f4 = features
    count, channels = 0, 1
    for out in (f1, f2, f3, f4, f4):
        count += _conv(5, channels, out, bn=True)
        channels = out
    flat = (size // 32) ** 2 * f4
    return count + flat * hidden + hidden + hidden * hidden + hidden + hidden + 1


@functools.cache
def _initialised(kind: str):
    network = {
        "deformation": DeformationGenerator(FEATURES),
        "intensity": IntensityGenerator(FEATURES),
    }[kind]
    z = jnp.zeros((2, NOISE_FEATURES))
    variables = jax.jit(functools.partial(network.init, train=False))(
        jax.random.key(0), z, jnp.zeros((2, SIZE, SIZE, 1))
    )
    return network, variables


def _inputs(seed: int):
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(3, NOISE_FEATURES)).astype(np.float32)
    images = rng.uniform(0.0, 1.0, (3, SIZE, SIZE, 1)).astype(np.float32)
    return z, images


@pytest.mark.parametrize("kind, channels", [("deformation", 2), ("intensity", 1)])
def test_generators_keep_the_image_grid_and_depend_on_z(kind, channels):
    network, variables = _initialised(kind)
    z, images = _inputs(0)
    apply = jax.jit(functools.partial(network.apply, variables, train=False))
    output = apply(z, images)
    assert output.shape == (3, SIZE, SIZE, channels) and output.dtype == jnp.float32
    assert np.all(np.isfinite(output))
    if kind == "intensity":
        assert np.all(np.abs(output) < 1.0)  # tanh
    other_z, _ = _inputs(1)
    assert not np.allclose(apply(other_z, images), output)
    assert not np.allclose(apply(z, images[::-1]), output)
    # Train mode keeps the shapes and returns batch statistics for every BatchNorm.
    trained, updates = network.apply(variables, z, images, train=True, mutable=["batch_stats"])
    assert trained.shape == output.shape
    assert jax.tree.structure(updates["batch_stats"]) == jax.tree.structure(
        variables["batch_stats"]
    )


@pytest.mark.parametrize("kind, head", [("deformation", 3 * 3 * 4 * 2 + 2), ("intensity", 4)])
def test_generator_parameter_counts(kind, head):
    """The trunk as the reference code's layer list plus the head: a 3x3 conv with bias to the
    2-channel field, or a bias-free 1x1 conv to the mask."""
    _, variables = _initialised(kind)
    assert _count(variables["params"]) == _trunk_count(FEATURES, SIZE) + head


def test_discriminator_gives_one_logit_per_image_and_its_parameter_count():
    network = ImageDiscriminator(FEATURES)
    images = jnp.asarray(_inputs(0)[1])
    variables = jax.jit(functools.partial(network.init, train=False))(jax.random.key(0), images)
    logits = network.apply(variables, images, train=False)
    assert logits.shape == (3,) and logits.dtype == jnp.float32
    assert _count(variables["params"]) == _discriminator_count(FEATURES, SIZE)


def test_image_size_must_survive_five_halvings():
    network = ImageDiscriminator(FEATURES)
    with pytest.raises(ValueError, match="divisible by 32"):
        network.init(jax.random.key(0), jnp.zeros((1, 48, 48, 1)), train=False)
