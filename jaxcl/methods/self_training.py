"""Self-training (Bai et al., MICCAI 2017), a Table 2 semi-supervised baseline (docs/METHOD.md §17).

Round 0 is the supervised fine-tuning. Each of the `config.finetune.self_training_rounds` later
rounds (the paper's 3):

1. the best-validation UNet of the round before labels every slice of the unlabelled pool with
   its argmax (pseudo-labels, re-estimated every round; no CRF refinement), kept in memory, or
   in a temporary file when the pool is read from a slice store;
2. the UNet, starting from that best state, trains `config.finetune.steps` more steps on batches
   of which `config.finetune.pseudo_label_fraction` are pseudo-labelled slices and the rest
   labelled ones, with the supervised loss and augmentation, keeping its best validation state.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from jaxcl.data import pipeline, slice_store
from jaxcl.methods import supervised
from jaxcl.methods.parts import FineTuneInputs, FineTuneParts

PAPER_ROUNDS = 3


def rounds(config) -> int:
    """Training rounds: the supervised one, then `config.finetune.self_training_rounds`."""
    return 1 + config.finetune.self_training_rounds


def pseudo_labels(
    predict: Callable[[np.ndarray], np.ndarray], pool: pipeline.SliceIndex, chunk_size: int
) -> Iterator[tuple[int, np.ndarray]]:
    """(first row, (n, H, W) uint8 labels) of each `chunk_size` consecutive rows of `pool`, as
    `predict` labels their images; a progress bar counts the slices.

    predict: (n, H, W, 1) float32 -> (n, H, W) class indices.
    """
    with tqdm.tqdm(total=pool.num_slices, unit="slice", desc="pseudo-labels") as bar:
        for start in range(0, pool.num_slices, chunk_size):
            rows = np.arange(start, min(start + chunk_size, pool.num_slices))
            yield start, np.asarray(predict(pool.take(rows)[..., None])).astype(np.uint8)
            bar.update(rows.size)


def with_pseudo_labels(
    pool: pipeline.SliceIndex, predict: Callable[[np.ndarray], np.ndarray], chunk_size: int
) -> pipeline.SliceIndex:
    """`pool` with `pseudo_labels` as its labels: in memory for a `pipeline.SlicePool`, in a
    temporary `slice_store.LabelFile` for a pool read from a slice store (docs/DATA.md)."""
    chunks = pseudo_labels(predict, pool, chunk_size)
    if isinstance(pool, pipeline.SlicePool):
        return dataclasses.replace(pool, labels=np.concatenate([c for _, c in chunks]))
    labels = slice_store.LabelFile(pool.num_slices, pool.image_size)
    for first_row, chunk in chunks:
        labels.write(first_row, chunk)
    return dataclasses.replace(pool, labels=labels)


def batch_split(batch_size: int, fraction: float, groups: int) -> tuple[int, int]:
    """(labelled, pseudo-labelled) slices of a batch: the pseudo-labelled share `fraction` of
    `batch_size`, rounded to whole slices on each of `groups` devices; ValueError if either part
    is empty."""
    per_group = batch_size // groups
    pseudo = round(per_group * fraction) * groups
    if not 0 < pseudo < batch_size:
        raise ValueError(
            f"config.finetune.pseudo_label_fraction={fraction} leaves {pseudo} of "
            f"config.finetune.batch_size={batch_size} slices pseudo-labelled over {groups} "
            "devices; each device needs labelled and pseudo-labelled slices: use a fraction "
            "strictly between 0 and 1 (e.g. 0.5) and a batch of at least 2 slices per device."
        )
    return batch_size - pseudo, pseudo


def build(inputs: FineTuneInputs) -> FineTuneParts:
    """Round 0: the supervised fine-tuning; later rounds: on labelled + pseudo-labelled slices
    (the round's start `inputs.state` is the best state of the round before, which labels)."""
    base = supervised.build(inputs)
    if inputs.round_index == 0:
        return base
    config, model = inputs.config, inputs.model
    variables = {"params": inputs.state.params, "batch_stats": inputs.state.batch_stats}
    classes = jax.jit(lambda v, x: jnp.argmax(model.apply(v, x, train=False), axis=-1))
    pseudo_pool = with_pseudo_labels(
        inputs.unlabelled(), lambda x: classes(variables, x), config.data.eval_chunk_size
    )
    labelled, pseudo = batch_split(
        config.finetune.batch_size,
        config.finetune.pseudo_label_fraction,
        jax.process_count() * inputs.local_device_count,
    )
    batches = pipeline.MergedBatches(
        [
            supervised.labelled_batches(inputs, labelled),
            pipeline.labelled_batches(
                pseudo_pool,
                batch_size=pseudo,
                seed=config.seed,
                local_device_count=inputs.local_device_count,
                stream=inputs.round_index,
            ),
        ],
        pipeline.concatenate_examples,
    )
    return dataclasses.replace(base, batches=batches)
