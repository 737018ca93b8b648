"""The paper's fine-tuning (docs/METHOD.md §9): the UNet on labelled slices, soft Dice loss.

`build` is also the first round of self-training, `labelled_batches` the labelled part of every
semi-supervised batch and `with_unlabelled_images` the batches of the adversarial methods.
"""

from __future__ import annotations

import functools

from jaxcl.data import pipeline
from jaxcl.methods import parts
from jaxcl.methods.parts import FineTuneInputs, FineTuneParts
from jaxcl.train import steps

# The batch field of the unlabelled slices of a semi-supervised batch (`with_unlabelled_images`).
UNLABELLED_IMAGE = "unlabelled_image"


def labelled_batches(inputs: FineTuneInputs, batch_size: int | None = None) -> pipeline.StepBatches:
    """`batch_size` (default `config.finetune.batch_size`) labelled slices per step."""
    config = inputs.config
    return pipeline.labelled_batches(
        inputs.labelled,
        batch_size=batch_size or config.finetune.batch_size,
        seed=config.seed,
        local_device_count=inputs.local_device_count,
    )


def with_unlabelled_images(inputs: FineTuneInputs, *, stream: int) -> pipeline.MergedBatches:
    """`labelled_batches` plus as many random unlabelled slices, as `UNLABELLED_IMAGE` (B, H, W,
    1), drawn from the unlabelled pool as the independent sequence `stream` of the seed."""
    config = inputs.config
    unlabelled = pipeline.random_slice_batches(
        inputs.unlabelled(),
        num_slices=config.finetune.batch_size,
        num_views=1,
        seed=config.seed,
        local_device_count=inputs.local_device_count,
        stream=stream,
    )
    return pipeline.MergedBatches(
        [labelled_batches(inputs), unlabelled],
        lambda sources: {**sources[0], UNLABELLED_IMAGE: sources[1]["image"]},
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
