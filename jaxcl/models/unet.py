"""The 2D UNet of the paper (docs/METHOD.md §1): Encoder, Decoder, segmentation head.

Every stage model (global / local / BYOL pre-training, fine-tuning) builds its network from the
same `Encoder` and `Decoder`, always bound to the submodule names `encoder` and `decoder`, so a
stage's parameters transfer to the next one by path (`encoder/...`, `decoder/block1/...`).
Decoder block k is always named `block{k}` whatever `num_blocks` is, so the first l blocks
trained by the local model map onto the UNet's.

Layouts are NHWC. `dtype` is the computation dtype of convolutions and dense layers (float32 or
bfloat16); parameters and BatchNorm statistics stay float32 and BatchNorm normalises in float32.

Four operations are written in an equivalent form that XLA:CPU runs much faster (see
benchmarks/model_step.py and benchmarks/conv_gradients.py): the 2x2 max-pooling
(`max_pool_2x2`, explicit gradient), the decoder's up-convolution (`upsample_conv_2x`, computed on
the low-resolution map), each BatchNorm + ReLU (`BatchNormReLU`, explicit gradient) and each
convolution (`convolution.Conv` / `conv_same`, whose kernel gradient TensorFlow's oneDNN kernel
computes on CPU).
"""

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.linen.dtypes import promote_dtype

from jaxcl.models.batch_norm_relu import BatchNormReLU
from jaxcl.models.convolution import Conv, conv_same

DEFAULT_FILTERS = (16, 32, 64, 128, 128, 128)
NUM_LEVELS = 6
NUM_POOLS = NUM_LEVELS - 1
INPUT_MULTIPLE = 2**NUM_POOLS  # H and W must be multiples of 32 to survive 5 poolings.

# TensorFlow's BatchNorm defaults as used by the original code; flax's momentum has the same
# meaning (running = momentum * running + (1 - momentum) * batch).
BATCH_NORM_MOMENTUM = 0.99
BATCH_NORM_EPSILON = 1e-3

he_normal = nn.initializers.he_normal()

Dtype = Any


def batch_norm(
    train: bool, dtype: Dtype, axis_name: str | None, name: str | None = None
) -> nn.BatchNorm:
    """The BatchNorm layer used everywhere in jaxcl.

    Batch statistics in train mode, running averages otherwise. Reductions, scale/bias and the
    running statistics (initialised at mean 0, variance 1) are float32; the output is cast to
    `dtype`. `axis_name` makes the statistics cross-replica (e.g. "batch" under pmap).
    """
    return nn.BatchNorm(
        use_running_average=not train,
        momentum=BATCH_NORM_MOMENTUM,
        epsilon=BATCH_NORM_EPSILON,
        dtype=dtype,
        param_dtype=jnp.float32,
        axis_name=axis_name,
        name=name,
    )


def float32_bias(
    inputs: jnp.ndarray, kernel: jnp.ndarray, bias: jnp.ndarray | None, *, dtype: Dtype = None
) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray | None]:
    """`promote_dtype` for a flax Dense / Conv with a bias: inputs and kernel in `dtype`, the bias
    left float32.

    The layer multiplies in `dtype` and adds the bias in float32, so its output is float32 and the
    bias gradient is a float32 sum of the output's cotangent over batch and pixels. (With a
    bfloat16 bias that sum runs in bfloat16: XLA:CPU accumulates it in bfloat16, and over the
    B·H·W terms of the segmentation logits it loses all its digits.)
    """
    inputs, kernel = promote_dtype(inputs, kernel, dtype=dtype)
    return inputs, kernel, bias


def check_filters(filters: Sequence[int]) -> None:
    """Raises ValueError unless `filters` holds one positive channel count per encoder level."""
    if len(filters) != NUM_LEVELS or any(int(f) <= 0 for f in filters):
        raise ValueError(
            f"model.filters must be {NUM_LEVELS} positive channel counts (one per encoder level), "
            f"e.g. {DEFAULT_FILTERS}; got {tuple(filters)}."
        )


def check_input_size(height: int, width: int) -> None:
    """Raises ValueError unless the image size survives the encoder's 5 max-poolings."""
    if height % INPUT_MULTIPLE or width % INPUT_MULTIPLE:
        raise ValueError(
            f"UNet input height and width must be divisible by {INPUT_MULTIPLE} (the encoder "
            f"halves them {NUM_POOLS} times); got {height}x{width}. Set data.image_size to a "
            f"multiple of {INPUT_MULTIPLE} (e.g. 192 or 160)."
        )


def upsample_conv_2x(x: jnp.ndarray, kernel: jnp.ndarray) -> jnp.ndarray:
    """A 2x2 SAME convolution of the nearest-2x-upsampled x, without the upsampled map.

    `interleave_phases(upsample_conv_phases(x, kernel))`: (B, H, W, C_in) -> (B, 2H, 2W, C_out).
    """
    return interleave_phases(upsample_conv_phases(x, kernel))


def upsample_conv_phases(x: jnp.ndarray, kernel: jnp.ndarray) -> jnp.ndarray:
    """`upsample_conv_2x`'s output as its 4 phases, computed on the low-resolution map.

    Output pixel (2i + a, 2j + b) sees input rows i, i + a and columns j, j + b only (SAME pads a
    2x2 kernel at the bottom/right): phase (a, b) is Σ over the taps (s, t) of tap s, t's
    contribution x[i + a·s, j + b·t] @ kernel[s, t]. So one 1x1 convolution of x to the 4 taps'
    contributions (4·C_out channels, `conv_same`) and a shifted sum of them (`taps_to_phases`)
    give every phase: 4 multiply-adds per input pixel and (C_in, C_out) pair, against 9 for the
    phases as 4 separate convolutions and 16 for the convolution of the upsampled map, and no
    4x larger input map. The kernel gradient is then one (C_in, 4·C_out) 1x1 kernel gradient
    (TensorFlow's on CPU) and the input gradient one 1x1 convolution; as 4 phase convolutions,
    the 4 small kernel gradients took a fine-tuning step 60 ms on CPU (docs/TRAINING.md).

    Args:
      x: (B, H, W, C_in), in the computation dtype.
      kernel: (2, 2, C_in, C_out) taps of the convolution on the upsampled map; cast to x's dtype.

    Returns:
      (B, H, W, 4, C_out): [b, i, j, 2a + b'] is output pixel (2i + a, 2j + b') of image b.
    """
    batch, height, width, in_channels = x.shape
    out_channels = kernel.shape[-1]
    # (2, 2, C_in, C_out) -> (1, 1, C_in, 4·C_out), output channels ordered (s, t, C_out).
    tap_kernel = kernel.astype(x.dtype).transpose(2, 0, 1, 3).reshape(1, 1, in_channels, -1)
    taps = conv_same(x, tap_kernel).reshape(batch, height, width, 2, 2, out_channels)
    return taps_to_phases(taps)


# Phase (a, b) = 2a + b of `upsample_conv_phases`: which phases read the next row (a = 1) and the
# next column (b = 1) of a tap's contributions; shaped to broadcast over (..., 4, C).
_NEXT_ROW_PHASES = np.array([False, False, True, True])[:, None]
_NEXT_COLUMN_PHASES = np.array([False, True, False, True])[:, None]


def _next(values: jnp.ndarray, axis: int) -> jnp.ndarray:
    """values[..., i + 1, ...] along `axis`, zero past the end (SAME padding)."""
    padding = [(0, 0)] * values.ndim
    padding[axis] = (0, 1)
    return jnp.pad(jax.lax.slice_in_dim(values, 1, None, axis=axis), padding)


def _previous(values: jnp.ndarray, axis: int) -> jnp.ndarray:
    """values[..., i - 1, ...] along `axis`, zero before the start: `_next`'s transpose."""
    padding = [(0, 0)] * values.ndim
    padding[axis] = (1, 0)
    return jnp.pad(jax.lax.slice_in_dim(values, 0, -1, axis=axis), padding)


@jax.custom_vjp
def taps_to_phases(taps: jnp.ndarray) -> jnp.ndarray:
    """The 4 phases of `upsample_conv_phases` from the taps' contributions.

    Args:
      taps: (B, H, W, 2, 2, C): [..., s, t, :] is x @ kernel[s, t] at every low-resolution pixel.

    Returns:
      (B, H, W, 4, C): phase (a, b) at (i, j) is Σ_{s,t} taps[i + a·s, j + b·t, s, t], zero past
      the map's last row and column; computed in float32 (float64 for float64), cast to taps'
      dtype.

    Written as one elementwise expression over the phase axis (a `where` picks each phase's
    shift) so that XLA makes one pass of it; the gradient is its transpose, written out: autodiff
    of the shifts (pads of slices) made several passes and a step 40 ms slower on CPU.
    """
    wide = taps.astype(jnp.promote_types(taps.dtype, jnp.float32))
    terms = []
    for row in (0, 1):
        for column in (0, 1):
            tap = wide[..., row, column, None, :]  # (B, H, W, 1, C), broadcast over the phases
            if row:
                tap = jnp.where(_NEXT_ROW_PHASES, _next(tap, axis=1), tap)
            if column:
                tap = jnp.where(_NEXT_COLUMN_PHASES, _next(tap, axis=2), tap)
            terms.append(tap)
    return functools.reduce(jnp.add, terms).astype(taps.dtype)


def _phases_to_taps(cotangent: jnp.ndarray) -> jnp.ndarray:
    """`taps_to_phases`' transpose: (B, H, W, 4, C) -> (B, H, W, 2, 2, C).

    Tap (s, t)'s cotangent at (i, j) is Σ over the phases (a, b) of the phase's cotangent at
    (i - a·s, j - b·t), zero before the map's first row and column. Phases with the same shift
    are added before it: shifted one by one, XLA made more passes (0.5 GB more per fine-tuning
    step), and in the forward pass's `where` form the step was 39 ms slower (docs/TRAINING.md).
    """
    wide = cotangent.astype(jnp.promote_types(cotangent.dtype, jnp.float32))
    d00, d01, d10, d11 = (wide[..., phase, :] for phase in range(4))
    tap00 = d00 + d01 + d10 + d11
    tap01 = d00 + d10 + _previous(d01 + d11, axis=2)
    tap10 = d00 + d01 + _previous(d10 + d11, axis=1)
    tap11 = (
        d00
        + _previous(d01, axis=2)
        + _previous(d10, axis=1)
        + _previous(_previous(d11, axis=1), axis=2)
    )
    batch, height, width, _, channels = cotangent.shape
    taps = jnp.stack([tap00, tap01, tap10, tap11], axis=3)
    return taps.reshape(batch, height, width, 2, 2, channels).astype(cotangent.dtype)


taps_to_phases.defvjp(
    lambda taps: (taps_to_phases(taps), None), lambda _, cotangent: (_phases_to_taps(cotangent),)
)


def interleave_phases(phases: jnp.ndarray) -> jnp.ndarray:
    """(B, H, W, 4, C) phases of `upsample_conv_phases` -> the (B, 2H, 2W, C) map."""
    batch, height, width, _, channels = phases.shape
    y = phases.reshape(batch, height, width, 2, 2, channels).transpose(0, 1, 3, 2, 4, 5)
    return y.reshape(batch, 2 * height, 2 * width, channels)


@jax.custom_vjp
def max_pool_2x2(x: jnp.ndarray) -> jnp.ndarray:
    """2x2 max-pooling with stride 2, (B, H, W, C) -> (B, H/2, W/2, C); H and W even.

    Equal to `flax.linen.max_pool(x, (2, 2), strides=(2, 2))`, gradient included (for inputs
    without NaN): the whole cotangent of a window goes to its first maximum in row-major order,
    as XLA's select-and-scatter does. Written as the elementwise maximum of the 4 strided
    slices with an explicit elementwise backward pass, because XLA:CPU lowers the reduce-window
    gradient to a variadic reduce-window over four index maps (iotas) and a scatter, several
    times slower than the convolutions around it. (As a reshape + max, the forward pass was a
    reduction of its own over the window axes; the maximum of slices is one elementwise pass:
    0.18 GB less per fine-tuning step.)
    """
    top = jnp.maximum(x[:, 0::2, 0::2], x[:, 0::2, 1::2])
    return jnp.maximum(top, jnp.maximum(x[:, 1::2, 0::2], x[:, 1::2, 1::2]))


def _max_pool_2x2_fwd(x: jnp.ndarray) -> tuple[jnp.ndarray, tuple[jnp.ndarray, jnp.ndarray]]:
    pooled = max_pool_2x2(x)
    return pooled, (x, pooled)


def _max_pool_2x2_bwd(
    residuals: tuple[jnp.ndarray, jnp.ndarray], cotangent: jnp.ndarray
) -> tuple[jnp.ndarray]:
    x, pooled = residuals
    batch, height, width, channels = x.shape
    windows = x.reshape(batch, height // 2, 2, width // 2, 2, channels)
    top = pooled[:, :, None, :, None, :]
    first00 = windows[:, :, :1, :, :1] == top
    first01 = (windows[:, :, :1, :, 1:] == top) & ~first00
    first10 = (windows[:, :, 1:, :, :1] == top) & ~first00 & ~first01
    first11 = ~(first00 | first01 | first10)
    first = jnp.concatenate(
        [
            jnp.concatenate([first00, first01], axis=4),
            jnp.concatenate([first10, first11], axis=4),
        ],
        axis=2,
    )
    grad = jnp.where(first, cotangent[:, :, None, :, None, :], jnp.zeros((), cotangent.dtype))
    return (grad.reshape(x.shape),)


max_pool_2x2.defvjp(_max_pool_2x2_fwd, _max_pool_2x2_bwd)


class UpsampleConv(nn.Module):
    """Nearest 2x upsampling followed by a 2x2 SAME convolution (no bias, He-normal), as phases.

    Its parameter `kernel` (2, 2, C_in, features) is the one `nn.Conv(features, (2, 2))` would
    have on the upsampled map (same path, shape and initial value); `upsample_conv_phases`
    computes the result on the low-resolution map and returns it as its 4 phases
    (`interleave_phases` makes the map).
    """

    features: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        """x: (B, H, W, C_in) -> (B, H, W, 4, features) phases of the (B, 2H, 2W) output."""
        kernel = self.param("kernel", he_normal, (2, 2, x.shape[-1], self.features), jnp.float32)
        return upsample_conv_phases(x.astype(self.dtype), kernel)


class ConvBNReLU(nn.Module):
    """Convolution (SAME, no bias, He-normal) -> BatchNorm -> ReLU.

    Attributes:
      features: output channels.
      kernel_size: (3, 3) for the network's convolutions, (2, 2) after upsampling, (1, 1) in g2.
      upsample: convolve the nearest-2x-upsampled input (`UpsampleConv`, kernel_size (2, 2)):
        the output is twice the input's height and width. BatchNorm + ReLU run on the 4 phases
        (per-channel statistics over all of them are those of the map) and only their output is
        interleaved: the backward pass then hands the phases' cotangents to the up-convolution
        without a transpose of the map (about 1 GB fewer per fine-tuning step, docs/TRAINING.md).
    """

    features: int
    kernel_size: tuple[int, int] = (3, 3)
    dtype: Dtype = jnp.float32
    axis_name: str | None = None
    upsample: bool = False

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        """x: (B, H, W, C_in) -> (B, H, W, features), or (B, 2H, 2W, features) if upsample."""
        if self.upsample:
            if tuple(self.kernel_size) != (2, 2):
                raise ValueError(
                    f"ConvBNReLU(upsample=True) is the decoder's 2x2 up-convolution; got "
                    f"kernel_size {tuple(self.kernel_size)}."
                )
            x = UpsampleConv(self.features, self.dtype, name="conv")(x)
        else:
            x = Conv(
                self.features,
                tuple(self.kernel_size),
                use_bias=False,
                kernel_init=he_normal,
                dtype=self.dtype,
                param_dtype=jnp.float32,
                name="conv",
            )(x)
        # relu(BatchNorm(x)) with `batch_norm`'s settings, in fewer passes (batch_norm_relu.py).
        y = BatchNormReLU(
            use_running_average=not train,
            momentum=BATCH_NORM_MOMENTUM,
            epsilon=BATCH_NORM_EPSILON,
            dtype=self.dtype,
            axis_name=self.axis_name,
            name="bn",
        )(x)
        return interleave_phases(y) if self.upsample else y


class Encoder(nn.Module):
    """Contracting path: levels 1-5 are 2 convs then 2x2 max-pool; level 6 is 2 convs.

    Submodules are `level{k}_conv{j}` (k = 1..6, j = 1..2).
    """

    filters: Sequence[int] = DEFAULT_FILTERS
    dtype: Dtype = jnp.float32
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> tuple[jnp.ndarray, tuple[jnp.ndarray, ...]]:
        """Encodes images.

        Args:
          x: (B, H, W, C) images, H and W divisible by 32.
          train: BatchNorm uses (and updates) batch statistics when True.

        Returns:
          bottleneck: (B, H/32, W/32, f_6).
          skips: 5 maps before each pooling, highest resolution first:
            (B, H/2^(k-1), W/2^(k-1), f_k) for k = 1..5.
        """
        check_filters(self.filters)
        check_input_size(x.shape[1], x.shape[2])
        skips = []
        for level, features in enumerate(self.filters, start=1):
            for conv in (1, 2):
                x = ConvBNReLU(
                    features,
                    dtype=self.dtype,
                    axis_name=self.axis_name,
                    name=f"level{level}_conv{conv}",
                )(x, train)
            if level < NUM_LEVELS:
                skips.append(x)
                x = max_pool_2x2(x)
        return x, tuple(skips)


class DecoderBlock(nn.Module):
    """Nearest 2x upsample -> 2x2 ConvBNReLU -> concat skip -> `num_convs` 3x3 ConvBNReLUs.

    All convolutions have the skip's channel count. Submodules: `upconv`, `conv1`[, `conv2`].
    """

    num_convs: int
    dtype: Dtype = jnp.float32
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x: jnp.ndarray, skip: jnp.ndarray, train: bool) -> jnp.ndarray:
        """x: (B, h, w, C), skip: (B, 2h, 2w, C_skip) -> (B, 2h, 2w, C_skip)."""
        features = skip.shape[-1]
        conv = {"dtype": self.dtype, "axis_name": self.axis_name}
        x = ConvBNReLU(features, (2, 2), upsample=True, name="upconv", **conv)(x, train)
        x = jnp.concatenate([x, skip.astype(x.dtype)], axis=-1)
        for index in range(1, self.num_convs + 1):
            x = ConvBNReLU(features, name=f"conv{index}", **conv)(x, train)
        return x


class Decoder(nn.Module):
    """Expanding path: blocks 1..num_blocks (block 5 has one 3x3 conv, the others two).

    Block k consumes the encoder skip of level 6 - k, so its output has f_{6-k} channels:
    12²x128, 24²x128, 48²x64, 96²x32, 192²x16 for a 192² input and the default filters.

    Attributes:
      num_blocks: how many blocks to run (1..5); the local pre-training model runs the first l.
    """

    num_blocks: int = NUM_POOLS
    dtype: Dtype = jnp.float32
    axis_name: str | None = None

    @nn.compact
    def __call__(
        self, bottleneck: jnp.ndarray, skips: Sequence[jnp.ndarray], train: bool
    ) -> jnp.ndarray:
        """Decodes the encoder output.

        Args:
          bottleneck: (B, H/32, W/32, f_6) from the Encoder.
          skips: the Encoder's 5 skips, highest resolution first.
          train: BatchNorm mode.

        Returns:
          (B, H/2^(5-n), W/2^(5-n), f_{6-n}) feature map after block n = num_blocks.
        """
        if not 1 <= self.num_blocks <= NUM_POOLS:
            raise ValueError(
                f"Decoder num_blocks (model.local_decoder_blocks) must be in 1..{NUM_POOLS}; "
                f"got {self.num_blocks}."
            )
        if len(skips) != NUM_POOLS:
            raise ValueError(f"Decoder expects {NUM_POOLS} encoder skips; got {len(skips)}.")
        x = bottleneck
        for block in range(1, self.num_blocks + 1):
            x = DecoderBlock(
                num_convs=1 if block == NUM_POOLS else 2,
                dtype=self.dtype,
                axis_name=self.axis_name,
                name=f"block{block}",
            )(x, skips[-block], train)
        return x


class SegmentationHead(nn.Module):
    """2 ConvBNReLUs (`conv1`, `conv2`) -> 3x3 conv to logits with bias (`logits`)."""

    num_classes: int
    features: int = DEFAULT_FILTERS[0]
    dtype: Dtype = jnp.float32
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        """x: (B, H, W, C) -> (B, H, W, num_classes) float32 logits."""
        for index in (1, 2):
            x = ConvBNReLU(
                self.features, dtype=self.dtype, axis_name=self.axis_name, name=f"conv{index}"
            )(x, train)
        # Linear output layer: LeCun-normal (flax's default) keeps the logits' scale at init.
        x = Conv(
            self.num_classes,
            (3, 3),
            dtype=self.dtype,
            param_dtype=jnp.float32,
            promote_dtype=float32_bias,
            name="logits",
        )(x)
        return x.astype(jnp.float32)


class UNet(nn.Module):
    """The fine-tuning model: `encoder`, `decoder` (all 5 blocks), `segmentation_head`.

    Attributes:
      num_classes: segmentation classes including background.
      filters: channels per encoder level f_1..f_6; the head uses f_1 (16 by default).
      dtype: computation dtype; logits are returned in float32.
      axis_name: mapped axis for cross-replica BatchNorm, or None for per-device statistics.
    """

    num_classes: int
    filters: Sequence[int] = DEFAULT_FILTERS
    dtype: Dtype = jnp.float32
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        """x: (B, H, W, 1) images -> (B, H, W, num_classes) float32 logits."""
        common = {"dtype": self.dtype, "axis_name": self.axis_name}
        bottleneck, skips = Encoder(self.filters, name="encoder", **common)(x, train)
        features = Decoder(NUM_POOLS, name="decoder", **common)(bottleneck, skips, train)
        return SegmentationHead(
            self.num_classes, self.filters[0], name="segmentation_head", **common
        )(features, train)
