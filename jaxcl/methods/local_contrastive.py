"""L^R, L^D: decoder blocks 1..l and g2 pre-trained with the local contrastive loss.

The loss is `jaxcl.losses.local` (docs/METHOD.md §5), the step `steps.pretrain_local_step`. The
encoder is loaded from the global pre-training and frozen; views are intensity-only.
"""

from __future__ import annotations

import functools

import ml_collections
import optax

from jaxcl import augment
from jaxcl.losses import local
from jaxcl.methods.parts import BuildInputs, StageParts, train_outputs
from jaxcl.models import stages as stage_models
from jaxcl.models import unet
from jaxcl.train import steps
from jaxcl.train.parallel import AXIS_NAME


def feature_size(image_size: int, num_decoder_blocks: int) -> int:
    """Side of the map after `num_decoder_blocks` decoder blocks (where regions are taken)."""
    return image_size // 2 ** (unet.NUM_POOLS - num_decoder_blocks)


def decoder_paths(config: ml_collections.ConfigDict) -> tuple[tuple[str, ...], ...]:
    """What fine-tuning loads besides the encoder: the pre-trained decoder blocks 1..l."""
    blocks = config.model.num_decoder_blocks
    return tuple(("decoder", f"block{k}") for k in range(1, blocks + 1))


def build(inputs: BuildInputs, *, strategy: str) -> StageParts:
    """The stage of one local strategy ("LR": groups are slices; "LD": partitions)."""
    config, section, recipe = inputs.config, inputs.section, inputs.recipe
    blocks = config.model.num_decoder_blocks
    positions = local.region_positions(
        feature_size(config.data.image_size, blocks),
        kind=section.positions,
        grid_size=section.grid_size,
    )
    model = stage_models.LocalContrastiveModel(
        positions=tuple(tuple(int(v) for v in p) for p in positions),
        num_decoder_blocks=blocks,
        features=config.model.embedding_features,
        freeze_encoder=True,
        **inputs.model_options(),
    )
    tx = steps.frozen_encoder_tx(optax.adam(section.learning_rate))
    state = steps.create_train_state(model, inputs.key, inputs.example_input, tx)
    # Views sharing a group id on one device: a slice's views (L^R), or a partition's views
    # across the device's volumes (L^D).
    if strategy == "LR":
        views_per_group = recipe.num_views
    else:
        views_per_group = recipe.num_units // inputs.num_devices * recipe.num_views
    num_anchors = local.PAPER_NUM_ANCHORS if section.positions == "paper" else None
    aug = inputs.augment_config()
    step = functools.partial(
        steps.pretrain_local_step,
        model=model,
        strategy=strategy,
        temperature=section.temperature,
        negatives=section.negatives,
        num_anchors=num_anchors,
        views_per_group=views_per_group,
        augment_config=aug,
    )
    view_fn = functools.partial(augment.local_view, config=aug)

    def loss(regions, batch):
        return local.local_loss(
            regions,
            batch["sample_id"],
            batch["partition_id"],
            strategy=strategy,
            temperature=section.temperature,
            negatives=section.negatives,
            num_anchors=num_anchors,
            views_per_group=views_per_group,
            axis_name=AXIS_NAME,
        )

    return StageParts(
        state=state,
        step=step,
        export=lambda final: final,
        views=lambda batch, rng: steps.augmented_views(view_fn, rng, batch["image"]),
        outputs=lambda s, x: train_outputs(model, s.params, s.batch_stats, x),
        loss=loss,
        loads=(("encoder",),),
    )
