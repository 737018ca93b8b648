"""Flax linen networks: the UNet and the pre-training stage models (docs/METHOD.md §1).

All stage models name their networks `encoder` / `decoder`, so parameters transfer between
stages by path.
"""

from jaxcl.models.heads import (
    GlobalProjectionHead,
    LocalProjectionHead,
    ProjectionMLP,
    RegionEmbedding,
)
from jaxcl.models.stages import ByolNetwork, GlobalContrastiveModel, LocalContrastiveModel
from jaxcl.models.unet import DEFAULT_FILTERS, Decoder, Encoder, UNet

__all__ = [
    "DEFAULT_FILTERS",
    "ByolNetwork",
    "Decoder",
    "Encoder",
    "GlobalContrastiveModel",
    "GlobalProjectionHead",
    "LocalContrastiveModel",
    "LocalProjectionHead",
    "ProjectionMLP",
    "RegionEmbedding",
    "UNet",
]
