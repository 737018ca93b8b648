"""jaxcl.models.convolution: the same convolution, parameters and gradients as XLA's and flax's,
with the kernel gradient from TensorFlow's CPU kernel, the taps' sum for one input channel and
2x2 pixel blocks for few outputs on CPU.

References are `jax.lax.conv_general_dilated` differentiated by XLA and `flax.linen.Conv`.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from jaxcl.models import convolution
from jaxcl.models.convolution import Conv, conv_same

# Every kernel shape the UNet uses: 3x3 convolutions, the up-convolution's phases, 1x1 heads.
KERNEL_SIZES = [(3, 3), (2, 2), (1, 2), (2, 1), (1, 1)]


def _xla_conv(x, kernel):
    return jax.lax.conv_general_dilated(
        x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


def _case(seed, kernel_size, dtype, batch=3, channels=(5, 4)):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(batch, 7, 6, channels[0]))
    kernel = rng.normal(size=(*kernel_size, *channels))
    weights = rng.normal(size=(batch, 7, 6, channels[1]))
    return (jnp.asarray(a, dtype) for a in (x, kernel, weights))


def _value_and_gradients(conv, x, kernel, weights):
    def loss(x, kernel):
        return jnp.sum(conv(x, kernel) * weights)

    return jax.value_and_grad(loss, argnums=(0, 1))(x, kernel)


@pytest.fixture(autouse=True)
def _host_kernel_gradients_at_any_size(monkeypatch):
    """These tests' small convolutions take the host kernel gradient too (in training only
    those of at least `_HOST_MIN_FLOPS` do; `test_small_kernel_gradients_stay_xlas`)."""
    monkeypatch.setattr(convolution, "_HOST_MIN_FLOPS", 0)


# (C_in, C_out): one input channel (the shifted taps' sum on CPU) and more.
CHANNELS = [(1, 6), (5, 4)]


@pytest.mark.parametrize("kernel_size", KERNEL_SIZES)
@pytest.mark.parametrize("channels", CHANNELS)
def test_float64_values_and_gradients_equal_xla(kernel_size, channels):
    with jax.enable_x64(True):
        x, kernel, weights = _case(0, kernel_size, jnp.float64, channels=channels)
        got = jax.jit(lambda *a: _value_and_gradients(conv_same, *a))(x, kernel, weights)
        want = jax.jit(lambda *a: _value_and_gradients(_xla_conv, *a))(x, kernel, weights)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-10)


def test_the_kernel_gradient_on_cpu_comes_from_the_host_deterministically_at_any_alignment():
    x, _, cotangent = _case(1, (3, 3), jnp.float32, batch=4, channels=(6, 6))
    kernel_shape = (3, 3, 6, 6)
    lowered = jax.jit(lambda x, c: convolution.kernel_gradient(x, c, kernel_shape)).lower(
        x, cotangent
    )
    assert "callback" in lowered.as_text()  # float32 on CPU: TensorFlow's kernel
    misaligned = np.frombuffer(bytearray(x.size * 4 + 4), np.float32, x.size, offset=4)
    misaligned = misaligned.reshape(x.shape)  # not on a 64-byte boundary: copied, not aborted
    misaligned[...] = x
    host = [
        convolution.host_kernel_gradient(inputs, np.array(cotangent), kernel_shape)
        for inputs in (np.array(x), np.array(x), misaligned)
    ]
    np.testing.assert_array_equal(host[0], host[1])
    np.testing.assert_array_equal(host[0], host[2])
    np.testing.assert_allclose(
        host[0], convolution.xla_kernel_gradient(x, cotangent, kernel_shape), rtol=1e-4, atol=1e-4
    )
    bfloat16 = jax.jit(lambda x, c: convolution.kernel_gradient(x, c, kernel_shape)).lower(
        x.astype(jnp.bfloat16), cotangent.astype(jnp.bfloat16)
    )
    assert "callback" not in bfloat16.as_text()  # other dtypes: XLA's gradient


def test_gradients_per_device_and_under_vmap_equal_the_whole_batch():
    x, kernel, weights = _case(2, (3, 3), jnp.float32, batch=8)
    _, want = _value_and_gradients(_xla_conv, x, kernel, weights)
    mesh = jax.make_mesh((jax.device_count(),), ("data",))

    @jax.jit
    @jax.shard_map(
        mesh=mesh,
        in_specs=(PartitionSpec("data"), PartitionSpec(), PartitionSpec("data")),
        out_specs=(PartitionSpec("data"), PartitionSpec()),
        check_vma=False,  # per-device gradients, as jaxcl.train.parallel maps its steps
    )
    def sharded(x, kernel, weights):
        _, (grad_x, grad_kernel) = _value_and_gradients(conv_same, x, kernel, weights)
        return grad_x, jax.lax.psum(grad_kernel, "data")

    split = jax.sharding.NamedSharding(mesh, PartitionSpec("data"))
    for grad_x, grad_kernel in (
        sharded(jax.device_put(x, split), kernel, jax.device_put(weights, split)),
        jax.tree.map(  # two halves of the batch under vmap: per-example callbacks
            lambda g, axis: g if axis else g.sum(0),
            jax.vmap(lambda x, w: _value_and_gradients(conv_same, x, kernel, w)[1])(
                x.reshape(2, 4, *x.shape[1:]), weights.reshape(2, 4, *weights.shape[1:])
            ),
            (True, False),
        ),
    ):
        np.testing.assert_allclose(grad_x.reshape(x.shape), want[0], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(grad_kernel, want[1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kernel_size", KERNEL_SIZES)
@pytest.mark.parametrize("use_bias", [False, True])
def test_module_has_flax_conv_parameters_and_outputs(kernel_size, use_bias):
    x = next(_case(3, kernel_size, jnp.float32))
    ours = Conv(4, kernel_size, use_bias=use_bias)
    theirs = nn.Conv(4, kernel_size, padding="SAME", use_bias=use_bias)
    variables = ours.init(jax.random.key(0), x)
    reference = theirs.init(jax.random.key(0), x)
    assert jax.tree.structure(variables) == jax.tree.structure(reference)
    for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(reference), strict=True):
        np.testing.assert_array_equal(a, b)  # same paths, shapes and initial values
    bias = {"bias": jnp.linspace(-1, 1, 4)} if use_bias else {}
    trained = {"params": {**variables["params"], **bias}}
    np.testing.assert_allclose(
        ours.apply(trained, x), theirs.apply(trained, x), rtol=1e-5, atol=1e-5
    )


def test_module_computes_in_its_dtype_with_float32_parameters():
    x = next(_case(4, (3, 3), jnp.float32))
    module = Conv(4, (3, 3), dtype=jnp.bfloat16)
    variables = module.init(jax.random.key(0), x)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(variables))
    assert module.apply(variables, x).dtype == jnp.bfloat16
    grads = jax.grad(lambda v: jnp.sum(module.apply(v, x).astype(jnp.float32)))(variables)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(grads))


def test_the_taps_sum_is_traced_for_one_input_channel_on_cpu_only():
    def convolution_outputs(channels, dtype=jnp.float32):
        """The output channels of each convolution in the CPU program."""
        x, kernel, _ = _case(6, (3, 3), dtype, channels=channels)
        function = lambda x, kernel: conv_same(x, kernel)  # noqa: E731 - a new trace each time
        text = jax.jit(function).lower(x, kernel).as_text()
        return [
            int(line.rsplit("x", 2)[-2])  # "... -> tensor<3x7x6xCxf32>"
            for line in text.splitlines()
            if "stablehlo.convolution" in line
        ]

    assert convolution_outputs((1, 6)) == []  # the shifted taps' sum
    assert convolution_outputs((5, 4)) == [4]
    assert convolution_outputs((1, 6), jnp.bfloat16) == [6]
    with convolution.xla_convolutions():
        assert convolution_outputs((1, 6)) == [6]


def test_xla_kernel_gradients_are_taken_inside_the_context_and_without_cpu_tuning(monkeypatch):
    x, _, cotangent = _case(5, (3, 3), jnp.float32)

    def lowered_text():  # a new function each time: jit's trace cache would keep the first path
        function = lambda x, c: convolution.kernel_gradient(x, c, (3, 3, 5, 4))  # noqa: E731
        return jax.jit(function).lower(x, cotangent).as_text()

    assert "callback" in lowered_text()
    with convolution.xla_convolutions():
        assert "callback" not in lowered_text()
    assert "callback" in lowered_text()
    monkeypatch.setenv("JAXCL_CPU_TUNING", "0")
    assert "callback" not in lowered_text()


def test_small_kernel_gradients_stay_xlas(monkeypatch):
    monkeypatch.undo()  # the real threshold

    def host_call(size):  # 3x3, 128 -> 128 channels, 20 images: 0.05 GFLOP at 3², 0.21 at 6²
        x = jax.ShapeDtypeStruct((20, size, size, 128), jnp.float32)
        function = lambda x, c: convolution.kernel_gradient(x, c, (3, 3, 128, 128))  # noqa: E731
        return "callback" in jax.jit(function).lower(x, x).as_text()

    assert not host_call(3)
    assert host_call(6)


@pytest.mark.parametrize(("height", "width", "channels"), [(8, 6, (5, 4)), (4, 10, (3, 1))])
def test_the_2x2_block_form_equals_xlas_convolution_in_float64(height, width, channels):
    rng = np.random.default_rng(7)
    with jax.enable_x64(True):
        x = jnp.asarray(rng.normal(size=(2, height, width, channels[0])))
        kernel = jnp.asarray(rng.normal(size=(3, 3, *channels)))
        weights = jnp.asarray(rng.normal(size=(2, height, width, channels[1])))
        got = jax.jit(lambda *a: _value_and_gradients(convolution.space_to_depth_conv, *a))(
            x, kernel, weights
        )
        want = jax.jit(lambda *a: _value_and_gradients(_xla_conv, *a))(x, kernel, weights)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-10)


def test_few_outputs_take_the_2x2_block_form_on_cpu_with_xlas_gradients():
    rng = np.random.default_rng(8)

    def arrays(height, c_out, dtype):
        x = jnp.asarray(rng.normal(size=(3, height, 6, 5)), dtype)
        kernel = jnp.asarray(rng.normal(size=(3, 3, 5, c_out)), dtype)
        return x, kernel

    x, kernel = arrays(8, 4, jnp.float32)
    assert convolution._cpu_form(x, kernel) is convolution.space_to_depth_conv
    assert convolution._cpu_form(*arrays(7, 4, jnp.float32)) is None  # odd height
    assert convolution._cpu_form(*arrays(8, 5, jnp.float32)) is None  # 5 outputs
    assert convolution._cpu_form(*arrays(8, 4, jnp.bfloat16)) is None
    with convolution.xla_convolutions():
        assert convolution._cpu_form(x, kernel) is None
    with jax.enable_x64(True):
        x, kernel = arrays(8, 4, jnp.float64)
        weights = jnp.asarray(rng.normal(size=(3, 8, 6, 4)))
        got = jax.jit(lambda *a: _value_and_gradients(conv_same, *a))(x, kernel, weights)
        want = jax.jit(lambda *a: _value_and_gradients(_xla_conv, *a))(x, kernel, weights)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-10)
