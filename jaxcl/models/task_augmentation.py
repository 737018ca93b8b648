"""The networks of task-driven data augmentation (Chaitanya et al., IPMI 2019; docs/METHOD.md §19).

Two conditional generators map a noise vector z and a labelled image to a transformation of that
image: `DeformationGenerator` a dense displacement field, `IntensityGenerator` an additive
intensity mask. `ImageDiscriminator` tells generated images from real unlabelled ones.

Sizes follow the reference code (krishnabits001/task_driven_data_augmentation, models.py), whose
generator and discriminator widths are the first four UNet filters 16, 32, 64, 128: here they are
`features = config.model.filters[:4]`, so the quick configs shrink them with the UNet.

- Generator: z -> Dense to (H/32, W/32, f4) + ReLU; five times bilinear 2x upsampling and a 2x2
  convolution with f4, f3, f2, f1, f1 channels (BatchNorm + ReLU, except the last, which is
  linear with a bias); the image through two 3x3 ConvBNReLUs with f1 channels; both maps
  concatenated, two more 3x3 ConvBNReLUs with f1 channels, then the head: a linear 3x3
  convolution to 2 channels (the field, in pixels) or a bias-free 1x1 convolution to 1 channel
  and tanh (the mask).
- Discriminator: five 5x5 convolutions of stride 2 with f1, f2, f3, f4, f4 channels, each with
  BatchNorm and leaky ReLU 0.2, flattened, then Dense 128, leaky ReLU, Dense 128, leaky ReLU and
  one logit.

Dense layers start from N(0, 0.01²) truncated (the reference's initialiser), convolutions from
He-normal; convolutions followed by BatchNorm have no bias (it would be cancelled). Layouts are
NHWC; H and W must be multiples of 32, as for the UNet.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxcl.models.unet import (
    ConvBNReLU,
    Dtype,
    batch_norm,
    check_input_size,
    float32_bias,
    he_normal,
)

NOISE_FEATURES = 100  # z
DEFAULT_FEATURES = (16, 32, 64, 128)
HIDDEN_FEATURES = 128  # the discriminator's dense layers
LEAKY_SLOPE = 0.2
_DENSE_INIT = nn.initializers.truncated_normal(0.01)
_NUM_UPSAMPLINGS = 5


def _upsample(x: jax.Array) -> jax.Array:
    """(B, H, W, C) -> (B, 2H, 2W, C), bilinear."""
    batch, height, width, channels = x.shape
    return jax.image.resize(x, (batch, 2 * height, 2 * width, channels), "bilinear")


class _GeneratorTrunk(nn.Module):
    """The features both generators share: z upsampled to the image grid, joined with the image.

    Attributes:
      features: (f1, f2, f3, f4) channels.
      dtype: computation dtype.
      axis_name: mapped axis for cross-replica BatchNorm, or None.
    """

    features: Sequence[int] = DEFAULT_FEATURES
    dtype: Dtype = jnp.float32
    axis_name: str | None = None

    @nn.compact
    def __call__(self, z: jax.Array, images: jax.Array, train: bool) -> jax.Array:
        """z: (B, NOISE_FEATURES), images: (B, H, W, 1) -> (B, H, W, f1) features."""
        batch, height, width, _ = images.shape
        check_input_size(height, width)
        f1, f2, f3, f4 = self.features
        conv = {"dtype": self.dtype, "axis_name": self.axis_name}
        size = 2**_NUM_UPSAMPLINGS
        x = nn.Dense(
            (height // size) * (width // size) * f4,
            kernel_init=_DENSE_INIT,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            name="noise_dense",
        )(z)
        x = nn.relu(x).reshape(batch, height // size, width // size, f4)
        for level, level_features in enumerate((f4, f3, f2, f1), start=1):
            x = ConvBNReLU(level_features, (2, 2), name=f"noise_up{level}", **conv)(
                _upsample(x), train
            )
        x = nn.Conv(
            f1,
            (2, 2),
            padding="SAME",
            kernel_init=he_normal,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            promote_dtype=float32_bias,
            name=f"noise_up{_NUM_UPSAMPLINGS}",
        )(_upsample(x))
        y = images.astype(self.dtype)
        for index in (1, 2):
            y = ConvBNReLU(f1, name=f"image_conv{index}", **conv)(y, train)
        x = jnp.concatenate([x, y], axis=-1)
        for index in (1, 2):
            x = ConvBNReLU(f1, name=f"joint_conv{index}", **conv)(x, train)
        return x


class DeformationGenerator(nn.Module):
    """z and an image -> a dense displacement field (`augment.warp` applies it).

    Attributes: as `_GeneratorTrunk`'s.
    """

    features: Sequence[int] = DEFAULT_FEATURES
    dtype: Dtype = jnp.float32
    axis_name: str | None = None

    @nn.compact
    def __call__(self, z: jax.Array, images: jax.Array, train: bool) -> jax.Array:
        """z: (B, NOISE_FEATURES), images: (B, H, W, 1) -> (B, H, W, 2) float32 (row, col)
        displacements in pixels."""
        x = _GeneratorTrunk(self.features, self.dtype, self.axis_name, name="trunk")(
            z, images, train
        )
        field = nn.Conv(
            2,
            (3, 3),
            padding="SAME",
            kernel_init=he_normal,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            promote_dtype=float32_bias,
            name="field",
        )(x)
        return field.astype(jnp.float32)


class IntensityGenerator(nn.Module):
    """z and an image -> an additive intensity mask in (-1, 1).

    Attributes: as `_GeneratorTrunk`'s.
    """

    features: Sequence[int] = DEFAULT_FEATURES
    dtype: Dtype = jnp.float32
    axis_name: str | None = None

    @nn.compact
    def __call__(self, z: jax.Array, images: jax.Array, train: bool) -> jax.Array:
        """z: (B, NOISE_FEATURES), images: (B, H, W, 1) -> (B, H, W, 1) float32 mask."""
        x = _GeneratorTrunk(self.features, self.dtype, self.axis_name, name="trunk")(
            z, images, train
        )
        mask = nn.Conv(
            1,
            (1, 1),
            use_bias=False,
            kernel_init=he_normal,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            name="mask",
        )(x)
        return jnp.tanh(mask.astype(jnp.float32))


class ImageDiscriminator(nn.Module):
    """Tells generated images (target 0) from real unlabelled ones (target 1).

    Attributes:
      features: (f1, f2, f3, f4) channels; the strided convolutions have f1, f2, f3, f4, f4.
      hidden_features: width of the two hidden dense layers.
      dtype: computation dtype.
      axis_name: mapped axis for cross-replica BatchNorm, or None.
    """

    features: Sequence[int] = DEFAULT_FEATURES
    hidden_features: int = HIDDEN_FEATURES
    dtype: Dtype = jnp.float32
    axis_name: str | None = None

    @nn.compact
    def __call__(self, images: jax.Array, train: bool) -> jax.Array:
        """images: (B, H, W, 1) -> (B,) float32 logits of "real"."""
        check_input_size(images.shape[1], images.shape[2])
        f1, f2, f3, f4 = self.features
        x = images.astype(self.dtype)
        for index, features in enumerate((f1, f2, f3, f4, f4), start=1):
            x = nn.Conv(
                features,
                (5, 5),
                strides=(2, 2),
                padding="SAME",
                use_bias=False,
                kernel_init=he_normal,
                dtype=self.dtype,
                param_dtype=jnp.float32,
                name=f"conv{index}",
            )(x)
            x = batch_norm(train, self.dtype, self.axis_name, name=f"bn{index}")(x)
            x = nn.leaky_relu(x, LEAKY_SLOPE)
        x = x.reshape(x.shape[0], -1)
        for index in (1, 2):
            x = nn.Dense(
                self.hidden_features,
                kernel_init=_DENSE_INIT,
                dtype=self.dtype,
                param_dtype=jnp.float32,
                name=f"dense{index}",
            )(x)
            x = nn.leaky_relu(x, LEAKY_SLOPE)
        logits = nn.Dense(
            1, kernel_init=_DENSE_INIT, dtype=self.dtype, param_dtype=jnp.float32, name="logit"
        )(x)
        return logits[:, 0].astype(jnp.float32)
