"""Projection heads of the pre-training stages (docs/METHOD.md §1): g1, g2 and the region
embedding of the contrastive losses, the BYOL projector / predictor.

Every head takes its input in whatever dtype the network produced and computes in `dtype`
(parameters float32); stage models cast the final embeddings to float32.
"""

from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from jaxcl.models.unet import ConvBNReLU, Dtype, batch_norm, float32_bias, he_normal

REGION_SIZE = 3  # A region is a 3x3 window of the g2 feature map.


class GlobalProjectionHead(nn.Module):
    """g1: flatten -> Dense(hidden) ReLU -> Dense(features); no biases.

    Submodules `hidden`, `output`. The first kernel is (H_b * W_b * C_b, hidden), so it depends on
    the bottleneck size (6*6*128 = 4608 rows for a 192² input).
    """

    hidden_features: int = 1024
    features: int = 128
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, bottleneck: jnp.ndarray) -> jnp.ndarray:
        """bottleneck: (B, H_b, W_b, C_b) -> (B, features)."""
        dense = {"use_bias": False, "dtype": self.dtype, "param_dtype": jnp.float32}
        x = bottleneck.reshape(bottleneck.shape[0], -1)
        x = nn.relu(
            nn.Dense(self.hidden_features, kernel_init=he_normal, name="hidden", **dense)(x)
        )
        return nn.Dense(self.features, name="output", **dense)(x)


class LocalProjectionHead(nn.Module):
    """g2: 1x1 ConvBNReLU C->C (`conv1`), then a linear 1x1 conv C->C without bias (`conv2`)."""

    dtype: Dtype = jnp.float32
    axis_name: str | None = None

    @nn.compact
    def __call__(self, feature_map: jnp.ndarray, train: bool) -> jnp.ndarray:
        """feature_map: (B, H_l, W_l, C_l) -> (B, H_l, W_l, C_l)."""
        channels = feature_map.shape[-1]
        x = ConvBNReLU(channels, (1, 1), dtype=self.dtype, axis_name=self.axis_name, name="conv1")(
            feature_map, train
        )
        return nn.Conv(
            channels,
            (1, 1),
            use_bias=False,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            name="conv2",
        )(x)


def check_positions(positions: Sequence[Sequence[int]], height: int, width: int) -> np.ndarray:
    """Validates region positions against a (height, width) map; returns them as (R, 2) int.

    Raises ValueError naming the offending positions when a 3x3 window would leave the map.
    """
    array = np.asarray(positions)
    if array.ndim != 2 or array.shape[0] == 0 or array.shape[1] != 2:
        raise ValueError(
            f"Region positions must be a non-empty sequence of (u, v) pairs; got shape "
            f"{array.shape}."
        )
    if not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"Region positions must be integers; got dtype {array.dtype}.")
    limits = np.array([height, width]) - REGION_SIZE
    outside = np.any((array < 0) | (array > limits), axis=1)
    if outside.any():
        raise ValueError(
            f"Region positions {array[outside].tolist()} put a {REGION_SIZE}x{REGION_SIZE} "
            f"window outside the {height}x{width} local feature map (u must be in "
            f"0..{limits[0]}, v in 0..{limits[1]}); compute the positions for this map size "
            f"(model.local_decoder_blocks and data.image_size must match)."
        )
    return array.astype(np.int32)


class RegionEmbedding(nn.Module):
    """Embeds 3x3 windows at fixed positions with one shared linear map (no bias).

    Equal to a 3x3 VALID convolution with `features` outputs read at `positions`, but only the
    R windows are computed: a static gather of (R, 3, 3, C) windows and one matmul. Parameter
    `kernel` has the conv layout (3, 3, C, features), so He/LeCun fan-in is 9C either way.

    Attributes:
      positions: static top-left corners (u, v) of the windows, a tuple of int pairs (hashable so
        the module can be a static argument of jit).
      features: embedding size D.
    """

    positions: Sequence[tuple[int, int]]
    features: int = 128
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, feature_map: jnp.ndarray) -> jnp.ndarray:
        """feature_map: (B, H, W, C) -> (B, R, features) region embeddings."""
        _, height, width, channels = feature_map.shape
        positions = check_positions(self.positions, height, width)
        offsets = np.arange(REGION_SIZE)
        rows = positions[:, 0, None] + offsets  # (R, 3)
        cols = positions[:, 1, None] + offsets  # (R, 3)
        windows = feature_map[:, rows[:, :, None], cols[:, None, :], :]  # (B, R, 3, 3, C)
        kernel = self.param(
            "kernel",
            nn.initializers.lecun_normal(),
            (REGION_SIZE, REGION_SIZE, channels, self.features),
            jnp.float32,
        )
        return jnp.einsum("brijc,ijcd->brd", windows.astype(self.dtype), kernel.astype(self.dtype))


class ProjectionMLP(nn.Module):
    """BYOL projector / predictor: flatten -> Dense(hidden) -> BN -> ReLU -> Dense(features).

    The hidden Dense has no bias (BatchNorm follows and would cancel it); the output Dense has
    one, added in float32 (`float32_bias`). Submodules `hidden`, `bn`, `output`.
    """

    hidden_features: int = 1024
    features: int = 128
    dtype: Dtype = jnp.float32
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        """x: (B, ...) -> (B, features) float32."""
        dense = {"dtype": self.dtype, "param_dtype": jnp.float32}
        x = x.reshape(x.shape[0], -1)
        x = nn.Dense(
            self.hidden_features, use_bias=False, kernel_init=he_normal, name="hidden", **dense
        )(x)
        x = nn.relu(batch_norm(train, self.dtype, self.axis_name, name="bn")(x))
        return nn.Dense(self.features, promote_dtype=float32_bias, name="output", **dense)(x)
