"""BYOL regression loss against hand-computed cosines and a numpy reference (docs/METHOD.md §6)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcl.losses import byol


def _numpy_regression_loss(prediction, target):
    """2 - 2 cos per row, written directly from the definition in float64."""
    losses = []
    prediction, target = np.asarray(prediction, np.float64), np.asarray(target, np.float64)
    for q, z in zip(prediction, target, strict=True):
        cosine = q @ z / (np.linalg.norm(q) * np.linalg.norm(z))
        losses.append(2.0 - 2.0 * cosine)
    return np.array(losses)


def test_regression_loss_hand_cases():
    prediction = jnp.array([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [3.0, 4.0], [2.0, 2.0]])
    target = jnp.array([[0.0, 1.0], [5.0, 0.0], [-1.0, 0.0], [4.0, 3.0], [-7.0, 7.0]])
    # orthogonal, parallel (scale-invariant), opposite, cos = 24/25, orthogonal.
    expected = [2.0, 0.0, 4.0, 2.0 - 2.0 * 24.0 / 25.0, 2.0]
    np.testing.assert_allclose(byol.regression_loss(prediction, target), expected, atol=1e-6)


def test_regression_loss_matches_numpy_reference():
    rng = np.random.default_rng(0)
    prediction = rng.normal(size=(6, 16)).astype(np.float32)
    target = rng.normal(size=(6, 16)).astype(np.float32)
    np.testing.assert_allclose(
        byol.regression_loss(prediction, target),
        _numpy_regression_loss(prediction, target),
        rtol=1e-5,
        atol=1e-6,
    )


def test_regression_loss_computes_in_float32_from_bfloat16():
    prediction = jnp.array([[3.0, 4.0]], jnp.bfloat16)
    target = jnp.array([[4.0, 3.0]], jnp.bfloat16)
    loss = byol.regression_loss(prediction, target)
    assert loss.dtype == jnp.float32
    np.testing.assert_allclose(loss, [2.0 / 25.0], rtol=1e-6)


def test_no_gradient_reaches_the_target():
    rng = np.random.default_rng(1)
    prediction = jnp.asarray(rng.normal(size=(4, 8)), jnp.float32)
    target = jnp.asarray(rng.normal(size=(4, 8)), jnp.float32)

    def total(p, t):
        return jnp.sum(byol.regression_loss(p, t))

    grad_prediction, grad_target = jax.grad(total, argnums=(0, 1))(prediction, target)
    assert np.all(np.asarray(grad_target) == 0.0)
    assert np.any(np.abs(np.asarray(grad_prediction)) > 1e-3)


def test_gradient_matches_analytic_derivative():
    # d/dq (2 - 2 q·ẑ/|q|) = -2 (ẑ - (q̂·ẑ) q̂) / |q|.
    q = np.array([3.0, 4.0, 0.0])
    z = np.array([0.0, 1.0, 1.0]) / np.sqrt(2.0)
    q_hat = q / np.linalg.norm(q)
    expected = -2.0 * (z - (q_hat @ z) * q_hat) / np.linalg.norm(q)
    grad = jax.grad(lambda p: byol.regression_loss(p[None], jnp.asarray(z[None]))[0])(
        jnp.asarray(q, jnp.float32)
    )
    np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-7)


def test_zero_vectors_give_finite_loss_and_gradients():
    zeros = jnp.zeros((2, 4))
    loss, grad = jax.value_and_grad(lambda p: jnp.sum(byol.regression_loss(p, zeros)))(zeros)
    np.testing.assert_allclose(loss, 4.0)  # cosine 0 for each of the two rows
    assert np.all(np.isfinite(np.asarray(grad)))


def test_symmetric_loss_matches_numpy_reference():
    rng = np.random.default_rng(2)
    q1, q2, z1, z2 = (rng.normal(size=(5, 12)).astype(np.float32) for _ in range(4))
    expected = np.mean(_numpy_regression_loss(q1, z2) + _numpy_regression_loss(q2, z1))
    np.testing.assert_allclose(byol.symmetric_loss(q1, q2, z1, z2), expected, rtol=1e-5)


def test_symmetric_loss_pmean_equals_global_batch_mean():
    devices = jax.local_device_count()
    rng = np.random.default_rng(3)
    q1, q2, z1, z2 = (rng.normal(size=(devices * 3, 8)).astype(np.float32) for _ in range(4))
    expected = np.mean(_numpy_regression_loss(q1, z2) + _numpy_regression_loss(q2, z1))

    def shard(x):
        return x.reshape(devices, 3, 8)

    per_device = jax.pmap(functools.partial(byol.symmetric_loss, axis_name="batch"), "batch")
    losses = per_device(shard(q1), shard(q2), shard(z1), shard(z2))
    np.testing.assert_allclose(losses, np.full(devices, expected), rtol=1e-5)


def test_mismatched_shapes_raise():
    with pytest.raises(ValueError, match="same shape"):
        byol.regression_loss(jnp.ones((2, 4)), jnp.ones((2, 5)))
