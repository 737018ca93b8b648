"""Tests for the UNet's rewritten operations (max-pool with explicit gradient, phase up-conv).

Both must equal the plain formulation they replace: numpy loops written from the definitions, and
flax / XLA's own max-pool gradient as a second, independent reference.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxcl.models import unet


def _upsample_nearest_2x(x):
    """Reference nearest-neighbour 2x upsampling, (B, H, W, C) -> (B, 2H, 2W, C)."""
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def _max_pool_numpy(x):
    """Forward and the gradient map of each window's first maximum (row-major order)."""
    batch, height, width, channels = x.shape
    pooled = np.zeros((batch, height // 2, width // 2, channels), x.dtype)
    first = np.zeros(x.shape, bool)
    for b in range(batch):
        for i in range(height // 2):
            for j in range(width // 2):
                for c in range(channels):
                    window = [(2 * i + a, 2 * j + d) for a in (0, 1) for d in (0, 1)]
                    values = [x[b, r, s, c] for r, s in window]
                    k = int(np.argmax(values))  # argmax returns the first maximum
                    pooled[b, i, j, c] = values[k]
                    first[b, window[k][0], window[k][1], c] = True
    return pooled, first


def test_max_pool_2x2_value_and_gradient_with_ties():
    rng = np.random.default_rng(0)
    x = np.maximum(rng.normal(size=(2, 6, 8, 3)), 0.0).astype(np.float32)  # ReLU zeros tie
    x[0, 0, 0, 0] = x[0, 0, 1, 0] = x[0, 1, 1, 0] = 5.0  # positive tie, first in the top row
    x[1, 2, 3, 2] = x[1, 3, 2, 2] = 4.0  # tie between the top-right and bottom-left
    x[1, 4, 4, 1] = x[1, 5, 5, 1] = 3.0
    cotangent = rng.normal(size=(2, 3, 4, 3)).astype(np.float32)
    pooled, first = _max_pool_numpy(x)
    expected_grad = np.where(first, np.repeat(np.repeat(cotangent, 2, 1), 2, 2), 0.0)

    value, vjp = jax.vjp(unet.max_pool_2x2, jnp.asarray(x))
    np.testing.assert_array_equal(value, pooled)
    np.testing.assert_array_equal(vjp(jnp.asarray(cotangent))[0], expected_grad)
    # XLA's select-and-scatter (flax's max_pool gradient) gives the same map.
    _, flax_vjp = jax.vjp(lambda v: nn.max_pool(v, (2, 2), strides=(2, 2)), jnp.asarray(x))
    np.testing.assert_array_equal(flax_vjp(jnp.asarray(cotangent))[0], expected_grad)


def _upsample_conv_numpy(x, kernel):
    """2x2 SAME convolution (zero row/column added at the bottom/right) of the 2x-upsampled x."""
    up = np.repeat(np.repeat(x.astype(np.float64), 2, axis=1), 2, axis=2)
    up = np.pad(up, ((0, 0), (0, 1), (0, 1), (0, 0)))
    batch, height, width, _ = up.shape
    out = np.zeros((batch, height - 1, width - 1, kernel.shape[-1]))
    for dy in (0, 1):
        for dx in (0, 1):
            window = up[:, dy : dy + height - 1, dx : dx + width - 1]
            out += np.einsum("bhwc,cd->bhwd", window, kernel[dy, dx].astype(np.float64))
    return out


def test_upsample_conv_2x_matches_convolution_of_upsampled_map():
    """Values and float64 gradients of the plain formulation: a 2x2 SAME convolution of the
    nearest-upsampled map."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 5, 3, 4))  # non-square: rows and columns differ
    kernel = rng.normal(size=(2, 2, 4, 6))
    np.testing.assert_allclose(
        unet.upsample_conv_2x(jnp.asarray(x, jnp.float32), jnp.asarray(kernel, jnp.float32)),
        _upsample_conv_numpy(x, kernel),
        rtol=1e-5,
        atol=1e-5,
    )

    def plain(x, kernel):
        return jax.lax.conv_general_dilated(
            _upsample_nearest_2x(x),
            kernel,
            (1, 1),
            "SAME",
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )

    with jax.enable_x64(True):
        cotangent = jnp.asarray(rng.normal(size=(2, 10, 6, 6)))
        x, kernel = jnp.asarray(x), jnp.asarray(kernel)
        value, vjp = jax.vjp(unet.upsample_conv_2x, x, kernel)
        plain_value, plain_vjp = jax.vjp(plain, x, kernel)
        np.testing.assert_allclose(value, plain_value, rtol=1e-12, atol=1e-12)
        for got, want in zip(vjp(cotangent), plain_vjp(cotangent), strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def _taps_to_phases_numpy(taps):
    """Phase (a, b) at (i, j) = Σ_{s,t} taps[i + a·s, j + b·t, s, t], zero past the edge."""
    batch, height, width, _, _, channels = taps.shape
    padded = np.pad(taps, ((0, 0), (0, 1), (0, 1), (0, 0), (0, 0), (0, 0)))
    phases = np.zeros((batch, height, width, 4, channels))
    for a in (0, 1):
        for b in (0, 1):
            for s in (0, 1):
                for t in (0, 1):
                    rows, columns = slice(a * s, a * s + height), slice(b * t, b * t + width)
                    phases[:, :, :, 2 * a + b] += padded[:, rows, columns, s, t]
    return phases


def test_taps_to_phases_and_its_gradient_are_the_shifted_sum_and_its_transpose():
    rng = np.random.default_rng(5)
    with jax.enable_x64(True):
        taps = rng.normal(size=(2, 5, 3, 2, 2, 4))  # non-square
        cotangent = rng.normal(size=(2, 5, 3, 4, 4))
        phases, vjp = jax.vjp(unet.taps_to_phases, jnp.asarray(taps))
        np.testing.assert_allclose(phases, _taps_to_phases_numpy(taps), rtol=1e-12, atol=1e-12)
        # The written-out gradient is the transpose: the gradient of the numpy definition,
        # entry by entry (it is linear).
        (taps_grad,) = vjp(jnp.asarray(cotangent))
        basis_grads = [
            np.sum(_taps_to_phases_numpy(unit.reshape(taps.shape)) * cotangent)
            for unit in np.eye(taps.size)
        ]
        np.testing.assert_allclose(taps_grad.reshape(-1), basis_grads, rtol=1e-12, atol=1e-12)
    bf16 = unet.taps_to_phases(jnp.asarray(taps, jnp.bfloat16))
    assert bf16.dtype == jnp.bfloat16


def test_upsample_conv_keeps_the_plain_conv_parameter():
    """Same path, shape and initial value as nn.Conv(features, (2, 2)) named `conv`."""
    x = jnp.zeros((1, 4, 4, 3))
    key = jax.random.key(7)
    fast = unet.ConvBNReLU(5, (2, 2), upsample=True).init(key, x, train=False)
    plain = unet.ConvBNReLU(5, (2, 2)).init(key, _upsample_nearest_2x(x), train=False)
    assert jax.tree.map(np.shape, fast) == jax.tree.map(np.shape, plain)
    np.testing.assert_array_equal(
        fast["params"]["conv"]["kernel"], plain["params"]["conv"]["kernel"]
    )


def test_upsampling_conv_bn_relu_equals_batch_norm_of_the_upsampled_convolution():
    """BatchNorm + ReLU on the 4 phases, then interleaved: the values, running statistics and
    float64 gradients of flax's BatchNorm + ReLU on the interleaved map."""

    class Plain(nn.Module):
        @nn.compact
        def __call__(self, x):
            kernel = self.param("kernel", nn.initializers.normal(), (2, 2, x.shape[-1], 5))
            z = unet.upsample_conv_2x(x, kernel)
            return nn.relu(
                nn.BatchNorm(
                    use_running_average=False, momentum=0.99, epsilon=1e-3, param_dtype=jnp.float64
                )(z)
            )

    rng = np.random.default_rng(3)
    with jax.enable_x64(True):
        x = jnp.asarray(rng.normal(size=(3, 4, 6, 2)))
        weights = jnp.asarray(rng.normal(size=(3, 8, 12, 5)))
        fast = unet.ConvBNReLU(5, (2, 2), dtype=jnp.float64, upsample=True)
        variables = fast.init(jax.random.key(0), x, train=True)
        variables = jax.tree.map(lambda v: v + rng.normal(size=v.shape) * 0.1, variables)
        plain_variables = {
            "params": {
                "kernel": variables["params"]["conv"]["kernel"],
                "BatchNorm_0": variables["params"]["bn"],
            },
            "batch_stats": {"BatchNorm_0": variables["batch_stats"]["bn"]},
        }

        def loss(params, stats, module, x):
            y, updated = module.apply(
                {"params": params, "batch_stats": stats},
                x,
                mutable=["batch_stats"],
                **({"train": True} if module is fast else {}),
            )
            return jnp.sum(y * weights), updated

        got = jax.grad(loss, argnums=(0, 3), has_aux=True)(
            variables["params"], variables["batch_stats"], fast, x
        )
        want = jax.grad(loss, argnums=(0, 3), has_aux=True)(
            plain_variables["params"], plain_variables["batch_stats"], Plain(), x
        )
        (got_params, got_x), got_stats = got
        (want_params, want_x), want_stats = want
        np.testing.assert_allclose(got_x, want_x, rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(
            got_params["conv"]["kernel"], want_params["kernel"], rtol=1e-10, atol=1e-10
        )
        for name in ("scale", "bias"):
            np.testing.assert_allclose(
                got_params["bn"][name], want_params["BatchNorm_0"][name], rtol=1e-10, atol=1e-10
            )
        for name in ("mean", "var"):
            np.testing.assert_allclose(
                got_stats["batch_stats"]["bn"][name],
                want_stats["batch_stats"]["BatchNorm_0"][name],
                rtol=1e-10,
                atol=1e-10,
            )
