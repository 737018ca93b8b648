"""BYOL and BYOL-D: the encoder pre-trained by regressing an EMA target's projection.

The loss is `jaxcl.losses.byol`, the step `steps.byol_step` (docs/METHOD.md §6). BYOL pairs two
views of one slice, BYOL-D two slices of the same partition of two volumes (the batch recipe
decides); the online network is exported.
"""

from __future__ import annotations

import functools

import jax
import optax

from jaxcl import augment
from jaxcl.losses import byol
from jaxcl.methods.parts import BuildInputs, StageParts, train_outputs
from jaxcl.models import stages as stage_models
from jaxcl.train import steps
from jaxcl.train.parallel import AXIS_NAME


def build(inputs: BuildInputs) -> StageParts:
    """The BYOL stage (BYOL or BYOL-D: the same networks and step, other batches)."""
    config, section = inputs.config, inputs.section
    sizes = {
        "hidden_features": config.model.global_hidden_features,
        "features": config.model.embedding_features,
    }
    online = stage_models.ByolNetwork(predict=True, **sizes, **inputs.model_options())
    target = stage_models.ByolNetwork(predict=False, **sizes, **inputs.model_options())
    tx = optax.adam(section.learning_rate)
    state = steps.create_byol_state(online, target, inputs.key, inputs.example_input, tx)
    aug = inputs.augment_config()
    step = functools.partial(
        steps.byol_step,
        online_model=online,
        target_model=target,
        total_steps=section.steps,
        tau_base=section.tau_base,
        augment_config=aug,
    )
    view_fn = functools.partial(augment.global_view, config=aug)

    def loss(predictions, batch):
        # Each view's prediction regressed onto the other view's (stopped) output: the step's
        # loss with the online predictions standing in for the target projections.
        del batch
        pairs = predictions.reshape(-1, 2, predictions.shape[-1])
        first, second = pairs[:, 0], pairs[:, 1]
        targets = jax.lax.stop_gradient((second, first))
        return byol.symmetric_loss(first, second, *targets, axis_name=AXIS_NAME)

    return StageParts(
        state=state,
        step=step,
        export=lambda final: final.online,
        views=lambda batch, rng: steps.augmented_views(view_fn, rng, batch["image"]),
        outputs=lambda s, x: train_outputs(online, s.online.params, s.online.batch_stats, x),
        loss=loss,
    )
