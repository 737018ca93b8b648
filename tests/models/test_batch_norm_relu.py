"""jaxcl.models.batch_norm_relu: the fused BatchNorm + ReLU equals flax's, gradients included."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcl.models import unet
from jaxcl.models.batch_norm_relu import BatchNormReLU, batch_norm_relu

EPSILON = unet.BATCH_NORM_EPSILON


def _flax_batch_norm_relu(z, scale, bias, axis_name):
    """The plain formulation: flax's BatchNorm in train mode, then ReLU; with its statistics."""
    norm = nn.BatchNorm(
        use_running_average=False,
        momentum=0.0,  # the new running statistics are the batch statistics
        epsilon=EPSILON,
        dtype=z.dtype,
        param_dtype=z.dtype,
        axis_name=axis_name,
    )
    variables = {
        "params": {"scale": scale, "bias": bias},
        "batch_stats": {"mean": jnp.zeros_like(scale), "var": jnp.ones_like(scale)},
    }
    y, updates = norm.apply(variables, z, mutable=["batch_stats"])
    return nn.relu(y), updates["batch_stats"]["mean"], updates["batch_stats"]["var"]


def _gradients(function, z, weights, scale, bias, axis_name):
    """Per replica: value, statistics and d/d(z, scale, bias) of sum(y * weights)."""

    def loss(z, scale, bias):
        y, mean, var = function(z, scale, bias, axis_name)
        return jnp.sum(y * weights), (mean, var)

    (value, stats), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(
        z, scale, bias
    )
    return value, stats, grads


def _case(seed, shape):
    rng = np.random.default_rng(seed)
    channels = shape[-1]
    z = rng.normal(0.3, 2.0, shape)
    weights = rng.normal(size=shape)
    scale = rng.uniform(0.5, 1.5, channels)
    bias = rng.normal(0, 0.5, channels)  # some channels mostly off, some mostly on
    return z, weights, scale, bias


@pytest.mark.parametrize("replicas", [None, 2])
def test_values_statistics_and_float64_gradients_equal_flax(replicas):
    with jax.enable_x64(True):
        shape = (3, 5, 4, 6) if replicas is None else (replicas, 3, 5, 4, 6)
        z, weights, scale, bias = (jnp.asarray(a, jnp.float64) for a in _case(0, shape))
        fused = lambda *a: batch_norm_relu(a[0], a[1], a[2], EPSILON, a[3])  # noqa: E731
        if replicas is None:
            got = _gradients(fused, z, weights, scale, bias, None)
            want = _gradients(_flax_batch_norm_relu, z, weights, scale, bias, None)
        else:

            def per_replica(function):
                return jax.vmap(
                    lambda z, w: _gradients(function, z, w, scale, bias, "r"), axis_name="r"
                )(z, weights)

            got, want = per_replica(fused), per_replica(_flax_batch_norm_relu)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


def test_module_matches_flax_batch_norm_then_relu_in_both_modes():
    z = jnp.asarray(_case(1, (4, 6, 6, 8))[0], jnp.float32)
    common = {"momentum": 0.9, "epsilon": EPSILON}
    ours = BatchNormReLU(use_running_average=False, **common)
    theirs = nn.BatchNorm(use_running_average=False, **common)
    variables = ours.init(jax.random.key(0), z)
    assert jax.tree.map(jnp.shape, variables) == jax.tree.map(
        jnp.shape, theirs.init(jax.random.key(0), z)
    )
    y, updates = ours.apply(variables, z, mutable=["batch_stats"])
    y_ref, updates_ref = theirs.apply(variables, z, mutable=["batch_stats"])
    np.testing.assert_allclose(y, nn.relu(y_ref), rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(updates), jax.tree.leaves(updates_ref), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    evaluate = {**variables, **updates}
    y = BatchNormReLU(use_running_average=True, **common).apply(evaluate, z)
    y_ref = nn.BatchNorm(use_running_average=True, **common).apply(evaluate, z)
    np.testing.assert_allclose(y, nn.relu(y_ref), rtol=1e-5, atol=1e-5)


def test_bfloat16_output_with_float32_statistics():
    z = jnp.asarray(_case(2, (2, 4, 4, 3))[0], jnp.bfloat16)
    module = BatchNormReLU(use_running_average=False, momentum=0.9, epsilon=EPSILON, dtype=z.dtype)
    variables = module.init(jax.random.key(0), z)
    y, updates = module.apply(variables, z, mutable=["batch_stats"])
    assert y.dtype == jnp.bfloat16
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(updates))
    grads = jax.grad(lambda z: jnp.sum(module.apply(variables, z, mutable=["batch_stats"])[0]))(z)
    assert grads.dtype == jnp.bfloat16


@pytest.mark.parametrize("offset", [0.3, 10.0])
def test_float32_gradients_as_close_to_float64_as_flax(offset):
    """The backward pass's mean(g·z) - mean·mean(g) costs no float32 accuracy beyond flax's own
    float32 BatchNorm, also when the pre-activations sit far from 0 (|mean| = 10 std)."""
    rng = np.random.default_rng(3)
    shape = (8, 16, 16, 6)
    z = rng.normal(offset, 1.0, shape)
    weights, scale, bias = rng.normal(size=shape), rng.uniform(0.5, 1.5, 6), rng.normal(0, 0.5, 6)
    fused = lambda *a: batch_norm_relu(a[0], a[1], a[2], EPSILON, a[3])  # noqa: E731

    def gradients(function, dtype):
        arrays = (jnp.asarray(a, dtype) for a in (z, weights, scale, bias))
        return _gradients(function, *arrays, None)[2]

    with jax.enable_x64(True):
        exact = [np.asarray(g) for g in gradients(_flax_batch_norm_relu, jnp.float64)]
    ours = gradients(fused, jnp.float32)
    flax_float32 = gradients(_flax_batch_norm_relu, jnp.float32)
    for mine, theirs, reference in zip(ours, flax_float32, exact, strict=True):
        scale_of = np.max(np.abs(reference))
        error = np.max(np.abs(np.asarray(mine, np.float64) - reference)) / scale_of
        flax_error = np.max(np.abs(np.asarray(theirs, np.float64) - reference)) / scale_of
        assert error <= 2 * flax_error + 1e-6, (error, flax_error)
