"""G^R, G^{D-}, G^D: the encoder and g1 pre-trained with the global contrastive loss.

The loss and its strategy masks are `jaxcl.losses.contrastive` (docs/METHOD.md §4); the step is
`steps.pretrain_global_step`. G^{D-} and G^D keep view 0 of every slice un-augmented.
"""

from __future__ import annotations

import functools

import optax

from jaxcl import augment
from jaxcl.losses import contrastive
from jaxcl.methods.parts import BuildInputs, StageParts, train_outputs
from jaxcl.models import stages as stage_models
from jaxcl.train import steps
from jaxcl.train.parallel import AXIS_NAME


def build(inputs: BuildInputs, *, strategy: str, keep_original_view: bool) -> StageParts:
    """The stage of one global strategy ("GR", "GD-" or "GD")."""
    config, section = inputs.config, inputs.section
    model = stage_models.GlobalContrastiveModel(
        hidden_features=config.model.global_hidden_features,
        features=config.model.embedding_features,
        **inputs.model_options(),
    )
    tx = optax.adam(section.learning_rate)
    state = steps.create_train_state(model, inputs.key, inputs.example_input, tx)
    aug = inputs.augment_config()
    step = functools.partial(
        steps.pretrain_global_step,
        model=model,
        strategy=strategy,
        temperature=section.temperature,
        keep_original_view=keep_original_view,
        augment_config=aug,
    )
    view_fn = functools.partial(augment.global_view, config=aug)

    def views(batch, rng):
        mask = steps.global_augment_mask(batch["view_id"], keep_original_view)
        return steps.augmented_views(view_fn, rng, batch["image"], mask)

    def loss(embeddings, batch):
        return contrastive.global_loss(
            embeddings,
            batch["sample_id"],
            batch["partition_id"],
            strategy=strategy,
            temperature=section.temperature,
            axis_name=AXIS_NAME,
        )

    return StageParts(
        state=state,
        step=step,
        export=lambda final: final,
        views=views,
        outputs=lambda s, x: train_outputs(model, s.params, s.batch_stats, x),
        loss=loss,
    )
