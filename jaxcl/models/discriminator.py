"""The discriminator of adversarial fine-tuning (docs/METHOD.md §18)."""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

DEFAULT_FEATURES = (32, 64, 128, 128, 128)


class SegmentationDiscriminator(nn.Module):
    """Tells which slices a segmentation map belongs to, from the map and its image.

    Strided 3x3 convolutions with leaky ReLU (0.2), each halving the resolution, then global
    average pooling and a linear logit. No BatchNorm: its statistics would differ between the
    labelled and the unlabelled half of a batch, which is what the network must not key on.

    Attributes:
      features: output channels of the strided convolutions.
      dtype: computation dtype (parameters stay float32).
    """

    features: Sequence[int] = DEFAULT_FEATURES
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, probabilities: jax.Array, images: jax.Array) -> jax.Array:
        """(B,) float32 logits of "labelled" for (B, H, W, C) softmax maps, (B, H, W, 1) images."""
        x = jnp.concatenate([probabilities, images.astype(probabilities.dtype)], axis=-1)
        for features in self.features:
            x = nn.Conv(features, (3, 3), strides=(2, 2), dtype=self.dtype)(x)
            x = nn.leaky_relu(x, negative_slope=0.2)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(1, dtype=self.dtype)(x)[:, 0].astype(jnp.float32)
