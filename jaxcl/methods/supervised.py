"""The paper's fine-tuning (docs/METHOD.md §9): the UNet on labelled slices, soft Dice loss.

`build` is also the first round of self-training, and `labelled_batches` the labelled half of
every semi-supervised batch.
"""

from __future__ import annotations

import functools

from jaxcl.data import pipeline
from jaxcl.methods import parts
from jaxcl.methods.parts import FineTuneInputs, FineTuneParts
from jaxcl.train import steps


def labelled_batches(inputs: FineTuneInputs, batch_size: int | None = None) -> pipeline.StepBatches:
    """`batch_size` (default `config.finetune.batch_size`) labelled slices per step."""
    config = inputs.config
    return pipeline.labelled_batches(
        inputs.labelled,
        batch_size=batch_size or config.finetune.batch_size,
        seed=config.seed,
        local_device_count=inputs.local_device_count,
    )


def build(inputs: FineTuneInputs) -> FineTuneParts:
    """`steps.finetune_step` on `config.finetune.batch_size` labelled slices per step."""
    step = functools.partial(
        steps.finetune_step,
        model=inputs.model,
        num_classes=inputs.num_classes,
        augment_config=parts.augment_config(inputs.config),
    )
    batch_size = inputs.config.finetune.batch_size
    return FineTuneParts(inputs.state, step, labelled_batches(inputs), batch_size)
