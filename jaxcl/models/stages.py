"""The pre-training stage models (the fine-tuning model is `jaxcl.models.unet.UNet`).

Each is `model.apply(variables, x, train, mutable=["batch_stats"])` with x (B, H, W, 1) and
returns float32 embeddings. They name their networks `encoder` / `decoder` like the UNet, so
parameters move between stages by path:

  GlobalContrastiveModel  encoder, g1
  LocalContrastiveModel   encoder, decoder (blocks 1..l), g2, region_embedding
  ByolNetwork             encoder, projector[, predictor]
"""

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxcl.models.heads import (
    GlobalProjectionHead,
    LocalProjectionHead,
    ProjectionMLP,
    RegionEmbedding,
)
from jaxcl.models.unet import DEFAULT_FILTERS, Decoder, Dtype, Encoder


class GlobalContrastiveModel(nn.Module):
    """Encoder + g1 for the global strategies G^R, G^{D-}, G^D (docs/METHOD.md §4).

    Attributes:
      filters: channels per encoder level.
      hidden_features, features: g1 sizes (1024, 128).
      dtype: computation dtype; axis_name: cross-replica BatchNorm axis or None.
    """

    filters: Sequence[int] = DEFAULT_FILTERS
    hidden_features: int = 1024
    features: int = 128
    dtype: Dtype = jnp.float32
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        """x: (B, H, W, 1) -> (B, features) float32 embeddings (not normalised)."""
        bottleneck, _ = Encoder(
            self.filters, dtype=self.dtype, axis_name=self.axis_name, name="encoder"
        )(x, train)
        z = GlobalProjectionHead(self.hidden_features, self.features, self.dtype, name="g1")(
            bottleneck
        )
        return z.astype(jnp.float32)


class LocalContrastiveModel(nn.Module):
    """Encoder + decoder blocks 1..l + g2 + region embedding for L^R, L^D (docs/METHOD.md §5).

    Attributes:
      positions: static (u, v) window corners on the l-th decoder block's map (tuple of pairs).
      filters: channels per encoder level.
      num_decoder_blocks: l, the decoder blocks run (default 3: 48x48x64 for a 192² input).
      features: region embedding size D.
      freeze_encoder: run the encoder's BatchNorm on its running statistics (so they are not
        updated, docs/METHOD.md §9 and §13) and stop gradients at the encoder output. The trainer
        still keeps the optimiser off the encoder parameters.
      dtype: computation dtype; axis_name: cross-replica BatchNorm axis or None.
    """

    positions: Sequence[tuple[int, int]]
    filters: Sequence[int] = DEFAULT_FILTERS
    num_decoder_blocks: int = 3
    features: int = 128
    freeze_encoder: bool = True
    dtype: Dtype = jnp.float32
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        """x: (B, H, W, 1) -> (B, R, features) float32 region embeddings, R = len(positions)."""
        common = {"dtype": self.dtype, "axis_name": self.axis_name}
        encoder_train = train and not self.freeze_encoder
        bottleneck, skips = Encoder(self.filters, name="encoder", **common)(x, encoder_train)
        if self.freeze_encoder:
            bottleneck, skips = jax.lax.stop_gradient((bottleneck, skips))
        feature_map = Decoder(self.num_decoder_blocks, name="decoder", **common)(
            bottleneck, skips, train
        )
        feature_map = LocalProjectionHead(name="g2", **common)(feature_map, train)
        regions = RegionEmbedding(
            self.positions, self.features, self.dtype, name="region_embedding"
        )(feature_map)
        return regions.astype(jnp.float32)


class ByolNetwork(nn.Module):
    """BYOL online (predict=True: encoder, projector, predictor) or target (predict=False:
    encoder, projector) network (docs/METHOD.md §6).

    The target's parameters are the online ones without `predictor`, so the EMA update is a
    tree map over the shared paths.

    Attributes:
      predict: apply the predictor after the projector.
      filters: channels per encoder level.
      hidden_features, features: MLP sizes (1024, 128) of projector and predictor.
      dtype: computation dtype; axis_name: cross-replica BatchNorm axis or None.
    """

    predict: bool
    filters: Sequence[int] = DEFAULT_FILTERS
    hidden_features: int = 1024
    features: int = 128
    dtype: Dtype = jnp.float32
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        """x: (B, H, W, 1) -> (B, features) float32: prediction q(z(x)) if predict else z(x)."""
        common = {"dtype": self.dtype, "axis_name": self.axis_name}
        mlp = dict(hidden_features=self.hidden_features, features=self.features, **common)
        bottleneck, _ = Encoder(self.filters, name="encoder", **common)(x, train)
        out = ProjectionMLP(name="projector", **mlp)(bottleneck, train)
        if self.predict:
            out = ProjectionMLP(name="predictor", **mlp)(out, train)
        return out.astype(jnp.float32)
