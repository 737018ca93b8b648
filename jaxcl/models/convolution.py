"""Stride-1 SAME 2D convolutions whose kernel gradient comes from oneDNN on CPU.

XLA:CPU computes a convolution's kernel (weight) gradient as a second convolution with a
batch-minor layout: it transposes both operands and hands Eigen a contraction over
batch x height x width with a (kh, kw, C_in, C_out) result. At the UNet's shapes that runs at
25-85 GFLOP/s, against 115-280 GFLOP/s for the same layers' forward pass, and was the largest
part of a CPU training step. TensorFlow's CPU kernel for the same gradient
(`Conv2DBackpropFilter`, oneDNN) runs at 150-340 GFLOP/s (`benchmarks/conv_gradients.py`).
TensorFlow is a dependency already (TFDS), so on CPU `conv_same`'s backward pass computes the
kernel gradient there:

- `jax.experimental.buffer_callback` hands the callback XLA's buffers; TensorFlow reads them
  through DLPack without a copy (a copy only if one is not 64-byte aligned, which its kernels
  require) and the small result is written into XLA's output buffer;
- TensorFlow runs on a thread of its own (on XLA's worker threads its convolutions crashed,
  their stacks being too small), one call at a time;
- the input gradient (XLA's) waits for the kernel gradient, so that the two do not compete for
  the cores: that made both slower;
- kernel gradients under 0.1 GFLOP stay XLA's (the small images of the tests): a call costs
  about 1 ms beyond its arithmetic. Above it TensorFlow's is faster in the step even where XLA's
  is as fast alone (the first layer at batch 20, 0.2 GFLOP), because XLA's first transposes both
  operands to a batch-minor layout (docs/TRAINING.md).

Two kinds of layer that Eigen (XLA:CPU's convolution) runs far below its usual speed are
written differently on CPU:

- a layer with one input channel (the UNet's first) is the sum over the taps of the shifted
  image times the tap's weights, one elementwise pass (forward at 192², 20 images: 14 → 2 ms,
  `benchmarks/conv_gradients.py`); its input gradient, which training does not need, stays
  XLA's;
- a 3x3 layer with at most 4 outputs (the segmentation logits) is a 2x2 convolution of 2x2 pixel
  blocks (`space_to_depth_conv`): 4x the input channels and outputs on a quarter of the
  positions, which Eigen runs at its usual speed (192², 20 images, 16 -> 4 channels: forward
  39 → 20 ms, input gradient 23 → 13 ms, transposes included, `benchmarks/conv_gradients.py`),
  forward and input gradient.

The other forward passes and the input gradients stay XLA's. GPU and TPU
(`jax.lax.platform_dependent`), dtypes other than float32 / float64, `JAXCL_CPU_TUNING=0` and
code inside `xla_convolutions()` use XLA's convolution and gradients throughout. The results
agree with XLA's up to float rounding (equal to 1e-10 in float64,
tests/models/test_convolution.py) and are deterministic.

`Conv` is the flax module: the parameters (`kernel`, optional `bias`), their shapes, initial
values and dtype promotion are those of `flax.linen.Conv` with padding "SAME".
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import contextvars
import functools
import os
from collections.abc import Callable, Iterator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.linen.dtypes import promote_dtype

try:
    from jax.experimental import buffer_callback
except ImportError:  # an older jax: XLA's kernel gradients everywhere
    buffer_callback = None

from jaxcl import runtime

Dtype = Any

# Dtypes whose kernel gradient TensorFlow computes on CPU (oneDNN for float32).
_HOST_DTYPES = (jnp.float32, jnp.float64)
# Smaller kernel gradients (in FLOPs) stay XLA's: a TensorFlow call costs about 1 ms beyond its
# arithmetic. Alone, XLA's is as fast up to about 0.5 GFLOP (`benchmarks/conv_gradients.py`: 3x3,
# 128 -> 128 channels, 20 images at 6² 1.8 ms in XLA against 2.3 ms, at 12² 4.0 against 3.6), but
# in a training step its operands' transposes cost more: the first layer's 0.2 GFLOP in
# TensorFlow made the fine-tuning step 20 ms faster (docs/TRAINING.md).
_HOST_MIN_FLOPS = 0.1e9
# 3x3 layers with at most this many outputs run as 2x2 convolutions of 2x2 pixel blocks on CPU.
_BLOCK_MAX_OUTPUTS = 4


def _xla_conv(x: jnp.ndarray, kernel: jnp.ndarray) -> jnp.ndarray:
    return jax.lax.conv_general_dilated(
        x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


def _shifted_taps_conv(x: jnp.ndarray, kernel: jnp.ndarray) -> jnp.ndarray:
    """`_xla_conv` for one input channel: Σ over taps of the shifted x times the tap's weights."""
    kernel_height, kernel_width, _, _ = kernel.shape
    _, height, width, _ = x.shape
    padded = jnp.pad(x, ((0, 0), _same_padding(kernel_height), _same_padding(kernel_width), (0, 0)))
    taps = (
        padded[:, row : row + height, column : column + width, :] * kernel[row, column, 0]
        for row in range(kernel_height)
        for column in range(kernel_width)
    )
    return functools.reduce(jnp.add, taps)


def _same_padding(size: int) -> tuple[int, int]:
    return (size - 1) // 2, size - 1 - (size - 1) // 2


def space_to_depth_conv(x: jnp.ndarray, kernel: jnp.ndarray) -> jnp.ndarray:
    """`_xla_conv` for a 3x3 kernel and even H, W, as a 2x2 convolution of 2x2 pixel blocks.

    The input, padded by one pixel on every side, is cut into 2x2 blocks (the first block starts
    on the padding row and column) whose 4·C_in values are one position's channels. Output block
    (i, j) (pixels 2i + a, 2j + b) reads input blocks i..i + 1, j..j + 1 only: a 2x2 VALID
    convolution to 4·C_out channels, whose kernel (`_block_kernel`) holds tap
    (2s + p - a, 2t + q - b) of the 3x3 kernel for input block (i + s, j + t), phase (p, q), and
    zeros where that tap lies outside the 3x3 kernel.

    Args:
      x: (B, H, W, C_in), H and W even.
      kernel: (3, 3, C_in, C_out).

    Returns:
      (B, H, W, C_out), equal to `_xla_conv(x, kernel)` up to float rounding.
    """
    batch, height, width, c_in = x.shape
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    blocks = padded.reshape(batch, height // 2 + 1, 2, width // 2 + 1, 2, c_in)
    blocks = blocks.transpose(0, 1, 3, 2, 4, 5).reshape(*blocks.shape[:2], blocks.shape[3], -1)
    y = jax.lax.conv_general_dilated(
        blocks, _block_kernel(kernel), (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    c_out = kernel.shape[-1]
    y = y.reshape(batch, height // 2, width // 2, 2, 2, c_out).transpose(0, 1, 3, 2, 4, 5)
    return y.reshape(batch, height, width, c_out)


def _block_kernel(kernel: jnp.ndarray) -> jnp.ndarray:
    """(3, 3, C_in, C_out) -> (2, 2, 4·C_in, 4·C_out) kernel of `space_to_depth_conv`.

    Entry [s, t, (p, q, c_in), (a, b, c_out)] is kernel[2s + p - a, 2t + q - b, c_in, c_out], or
    0 where a tap index falls outside 0..2.
    """
    c_in, c_out = kernel.shape[2:]
    with_zero = jnp.pad(kernel, ((0, 1), (0, 1), (0, 0), (0, 0)))  # index 3: zeros
    s, p, a = np.meshgrid(range(2), range(2), range(2), indexing="ij")
    tap = 2 * s + p - a
    tap = np.where((tap >= 0) & (tap <= 2), tap, 3)  # (s, p, a)
    taps = with_zero[tap[:, None, :, None, :, None], tap[None, :, None, :, None, :]]
    # (s, t, p, q, a, b, C_in, C_out) -> (s, t, p, q, C_in, a, b, C_out)
    taps = taps.transpose(0, 1, 2, 3, 6, 4, 5, 7)
    return taps.reshape(2, 2, 4 * c_in, 4 * c_out)


def _in_blocks(x: jnp.ndarray, kernel: jnp.ndarray) -> bool:
    """Whether `conv_same` computes this layer as `space_to_depth_conv` on CPU."""
    return (
        kernel.shape[:2] == (3, 3)
        and kernel.shape[3] <= _BLOCK_MAX_OUTPUTS
        and x.shape[1] % 2 == 0
        and x.shape[2] % 2 == 0
    )


def _cpu_form(x, kernel) -> Callable | None:
    """The function that computes `conv_same`'s forward pass on CPU in place of `_xla_conv`:
    the taps' sum for one input channel, the 2x2-block form for a few outputs, or None."""
    if x.dtype not in _HOST_DTYPES or not cpu_paths_enabled():
        return None
    if kernel.shape[2] == 1:
        return _shifted_taps_conv
    return space_to_depth_conv if _in_blocks(x, kernel) else None


def _forward(x, kernel):
    """`_xla_conv`, or on CPU its `_cpu_form`."""
    cpu_form = _cpu_form(x, kernel)
    if cpu_form is None:
        return _xla_conv(x, kernel)
    return jax.lax.platform_dependent(x, kernel, cpu=cpu_form, default=_xla_conv)


def _input_gradient_form(x, kernel) -> Callable:
    """The function whose vjp gives `conv_same`'s input gradient: `_forward` where it uses the
    2x2-block form on CPU, else XLA's convolution (also for the taps' sum, whose input gradient
    training does not need)."""
    return _forward if _cpu_form(x, kernel) is space_to_depth_conv else _xla_conv


@jax.custom_vjp
def conv_same(x: jnp.ndarray, kernel: jnp.ndarray) -> jnp.ndarray:
    """A stride-1 SAME convolution, `jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME")`.

    SAME pads (k - 1) // 2 before and the rest after, as XLA and TensorFlow both do.

    Args:
      x: (B, H, W, C_in).
      kernel: (kh, kw, C_in, C_out), same dtype as x.

    Returns:
      (B, H, W, C_out); on CPU, the kernel gradient comes from `kernel_gradient`, a layer
      with one input channel is a sum over its taps and a 3x3 layer with at most 4 outputs a
      convolution of 2x2 pixel blocks (module docstring).
    """
    return _forward(x, kernel)


def _conv_same_fwd(x, kernel):
    return _forward(x, kernel), (x, kernel)


def _conv_same_bwd(residuals, cotangent):
    x, kernel = residuals
    kernel_grad, cotangent = _kernel_gradient_first(x, cotangent, kernel.shape)
    convolve = _input_gradient_form(x, kernel)
    _, input_vjp = jax.vjp(lambda inputs: convolve(inputs, kernel), x)
    (input_grad,) = input_vjp(cotangent)
    return input_grad, kernel_grad


conv_same.defvjp(_conv_same_fwd, _conv_same_bwd)


def xla_kernel_gradient(
    x: jnp.ndarray, cotangent: jnp.ndarray, kernel_shape: tuple[int, ...]
) -> jnp.ndarray:
    """d<cotangent, conv_same(x, k)>/dk by XLA: (kh, kw, C_in, C_out) in x's dtype."""
    _, kernel_vjp = jax.vjp(lambda k: _xla_conv(x, k), jnp.zeros(kernel_shape, x.dtype))
    return kernel_vjp(cotangent)[0]


def kernel_gradient(
    x: jnp.ndarray, cotangent: jnp.ndarray, kernel_shape: tuple[int, ...]
) -> jnp.ndarray:
    """d<cotangent, conv_same(x, k)>/dk: TensorFlow's CPU kernel on CPU for float32 / float64,
    XLA's elsewhere.

    Args:
      x: (B, H, W, C_in).
      cotangent: (B, H, W, C_out), same dtype as x.
      kernel_shape: (kh, kw, C_in, C_out).

    Returns:
      (kh, kw, C_in, C_out) in x's dtype.
    """
    return _kernel_gradient_first(x, cotangent, kernel_shape)[0]


def _kernel_gradient_first(x, cotangent, kernel_shape):
    """(`kernel_gradient`, cotangent); on CPU the cotangent returned is only ready once the
    kernel gradient is, so that XLA computes the input gradient after TensorFlow's kernel
    gradient and not at the same time (the two competing for the cores made both slower)."""
    kernel_shape = tuple(kernel_shape)

    def on_other_platforms(x, cotangent):
        return xla_kernel_gradient(x, cotangent, kernel_shape), cotangent

    if (
        x.dtype not in _HOST_DTYPES
        or not cpu_paths_enabled()
        or 2 * np.prod(cotangent.shape) * np.prod(kernel_shape[:-1]) < _HOST_MIN_FLOPS
    ):
        return on_other_platforms(x, cotangent)
    # The callback reads XLA's buffers in place and writes the result into XLA's output buffer:
    # no copies of the (B, H, W, C) operands.
    host = buffer_callback.buffer_callback(
        functools.partial(_write_host_kernel_gradient, kernel_shape=kernel_shape),
        jax.ShapeDtypeStruct(kernel_shape, x.dtype),
        vmap_method="sequential",
    )

    def on_cpu(x, cotangent):
        return jax.lax.optimization_barrier((host(x, cotangent), cotangent))

    return jax.lax.platform_dependent(x, cotangent, cpu=on_cpu, default=on_other_platforms)


def cpu_paths_enabled() -> bool:
    """Whether `conv_same` traces its CPU paths (TensorFlow's kernel gradient, the taps' sum for
    one input channel, the 2x2-block form for few outputs): yes, unless inside
    `xla_convolutions()`, with JAXCL_CPU_TUNING=0 (`jaxcl.runtime.tuning_enabled`) or with a jax
    without `jax.experimental.buffer_callback`."""
    return buffer_callback is not None and _CPU_PATHS.get() and runtime.tuning_enabled(os.environ)


@contextlib.contextmanager
def xla_convolutions() -> Iterator[None]:
    """Within it, `conv_same` traces XLA's convolution and gradients on every platform: what
    XLA's cost analysis can count (`benchmarks/train_step.py` takes the step's FLOPs from it)."""
    token = _CPU_PATHS.set(False)
    try:
        yield
    finally:
        _CPU_PATHS.reset(token)


_CPU_PATHS = contextvars.ContextVar("cpu_paths", default=True)


def _write_host_kernel_gradient(context, out, x, cotangent, *, kernel_shape):
    del context  # a stream on GPU; nothing on CPU
    np.asarray(out)[...] = host_kernel_gradient(x, cotangent, kernel_shape)


def host_kernel_gradient(x, cotangent, kernel_shape: tuple[int, ...]) -> np.ndarray:
    """`xla_kernel_gradient` on the host by TensorFlow's `Conv2DBackpropFilter` (oneDNN for
    float32).

    Args:
      x: (B, H, W, C_in) and
      cotangent: (B, H, W, C_out) host arrays exporting DLPack (numpy arrays, XLA:CPU buffers),
        read in place.
      kernel_shape: (kh, kw, C_in, C_out).

    Returns:
      (kh, kw, C_in, C_out) numpy array in x's dtype.
    """

    def compute():
        tf = _tensorflow()
        return tf.raw_ops.Conv2DBackpropFilter(
            input=_tensor(tf, x),
            filter_sizes=kernel_shape,
            out_backprop=_tensor(tf, cotangent),
            strides=[1, 1, 1, 1],
            padding="SAME",
        ).numpy()

    # On a thread of its own: XLA runs callbacks on its worker threads, whose stacks are too
    # small for TensorFlow's convolution (it crashed there).
    return _TENSORFLOW_THREAD.submit(compute).result()


def _tensor(tf, array):
    """A TensorFlow tensor of a host array exporting DLPack: the same memory when it is aligned
    as TensorFlow's kernels require (they abort the process otherwise), else a copy."""
    if np.asarray(array).ctypes.data % _TENSORFLOW_ALIGNMENT:
        return tf.constant(np.asarray(array))
    return tf.experimental.dlpack.from_dlpack(array.__dlpack__())


_TENSORFLOW_ALIGNMENT = 64  # bytes (Eigen's EIGEN_MAX_ALIGN_BYTES in TensorFlow's CPU build)
_TENSORFLOW_THREAD = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="tensorflow")


@functools.cache
def _tensorflow():
    """TensorFlow (imported on `_TENSORFLOW_THREAD` only), its eager context started."""
    import tensorflow as tf  # noqa: PLC0415 - only the CPU backward pass needs it

    tf.constant(0.0).numpy()
    return tf


class Conv(nn.Module):
    """`flax.linen.Conv` with padding "SAME" and stride 1, computed by `conv_same`.

    Attributes:
      features: output channels.
      kernel_size: (kh, kw).
      use_bias: add a learned (features,) bias.
      dtype: computation dtype (None: from the inputs and parameters, as flax).
      param_dtype: parameter dtype.
      kernel_init, bias_init: as flax's defaults (LeCun normal, zeros) unless given.
      promote_dtype: casts (inputs, kernel, bias) to the computation dtype, as flax's.
    """

    features: int
    kernel_size: tuple[int, int]
    use_bias: bool = True
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    kernel_init: Callable = nn.initializers.lecun_normal()
    bias_init: Callable = nn.initializers.zeros_init()
    promote_dtype: Callable = promote_dtype

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        """x: (B, H, W, C_in) -> (B, H, W, features)."""
        kernel_shape = (*self.kernel_size, x.shape[-1], self.features)
        kernel = self.param("kernel", self.kernel_init, kernel_shape, self.param_dtype)
        bias = (
            self.param("bias", self.bias_init, (self.features,), self.param_dtype)
            if self.use_bias
            else None
        )
        x, kernel, bias = self.promote_dtype(x, kernel, bias, dtype=self.dtype)
        y = conv_same(x, kernel)
        return y if bias is None else y + bias
