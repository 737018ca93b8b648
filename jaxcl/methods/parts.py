"""What a method's builder is given and what it returns: a stage, built, ready to run.

A builder (`Method.build`) turns the run's config into everything a pre-training stage needs, with
no data and no I/O: the initial state, the per-device step, what the stage exports and which
parameter paths it loads from the previous stage. `jaxcl.train.trainer` runs the parts with one
generic loop; `benchmarks/train_step.py` times the same parts.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from jaxcl import augment
from jaxcl.train.parallel import AXIS_NAME
from jaxcl.train.recipes import BatchRecipe

PyTree = Any
Batch = dict[str, jax.Array]

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def model_options(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """UNet settings every network of a run shares (filters, dtype, BatchNorm axis)."""
    model = config.model
    if model.dtype not in DTYPES:
        raise ValueError(f"config.model.dtype={model.dtype!r} is not one of {list(DTYPES)}.")
    return {
        "filters": tuple(model.filters),
        "dtype": DTYPES[model.dtype],
        "axis_name": AXIS_NAME if model.cross_replica_bn else None,
    }


def augment_config(config: ml_collections.ConfigDict) -> augment.AugmentConfig:
    """`config.augment`'s overrides of the default augmentation."""
    return augment.AugmentConfig(**config.augment.to_dict())


def example_input(config: ml_collections.ConfigDict) -> jax.Array:
    """(1, S, S, 1) float32 zeros: only its shape and dtype matter for initialisation."""
    size = config.data.image_size
    return jnp.zeros((1, size, size, 1), jnp.float32)


@dataclasses.dataclass(frozen=True)
class BuildInputs:
    """What a builder may read.

    Attributes:
      config: the run's config (configs/base.py layout), data settings resolved.
      stage: "pretrain_global" or "pretrain_local": `config[stage]` is the stage's section.
      recipe: the stage's batch (`recipes.batch_recipe`).
      num_devices: devices the global batch is split over.
      key: the stage's parameter initialisation key.
    """

    config: ml_collections.ConfigDict
    stage: str
    recipe: BatchRecipe
    num_devices: int
    key: jax.Array

    @property
    def section(self) -> ml_collections.ConfigDict:
        return self.config[self.stage]

    @property
    def example_input(self) -> jax.Array:
        return example_input(self.config)

    def model_options(self) -> dict[str, Any]:
        return model_options(self.config)

    def augment_config(self) -> augment.AugmentConfig:
        return augment_config(self.config)


@dataclasses.dataclass(frozen=True)
class StageParts:
    """A built stage.

    Attributes:
      state: the initial host state (`TrainState`, or `ByolState` for BYOL).
      step: `step(state, batch, rng) -> (state, metrics)` for one device of the "batch" axis.
      export: final state -> the `TrainState` whose variables the stage exports.
      loads: parameter paths loaded from the previous stage's export (e.g. `(("encoder",),)`).
      views: `views(batch, rng) -> (B, S, S, 1)` augmented inputs, one device (per device, as in
        the step; for measuring the step's parts).
      outputs: `outputs(state, views) -> network outputs` in train mode, one device.
      loss: `loss(outputs, batch) -> scalar` of the stage's objective, one device.
    """

    state: PyTree
    step: Callable
    export: Callable[[PyTree], PyTree]
    views: Callable[[Batch, jax.Array], jax.Array]
    outputs: Callable[[PyTree, jax.Array], jax.Array]
    loss: Callable[[jax.Array, Batch], jax.Array]
    loads: tuple[tuple[str, ...], ...] = ()


def train_outputs(model: nn.Module, params: PyTree, batch_stats: PyTree, x: jax.Array):
    """`model(x, train=True)` outputs (batch statistics updated but discarded)."""
    outputs, _ = model.apply(
        {"params": params, "batch_stats": batch_stats}, x, train=True, mutable=["batch_stats"]
    )
    return outputs


# ----------------------------------------------------------------------------------------------
# Fine-tunings (`jaxcl.methods.FineTuning`).


@dataclasses.dataclass(frozen=True)
class FineTuneInputs:
    """What a fine-tuning's builder may read, for one round of its training.

    Attributes:
      config: the run's config, data settings resolved.
      model: the `UNet` being fine-tuned.
      num_classes: classes including background.
      state: the UNet's `TrainState` this round starts from: the transferred initialisation in
        round 0, the best-validation state of the round before in later rounds.
      key: initialisation key for any other network the method trains (a discriminator).
      labelled: the labelled training slices (`pipeline.SlicePool` with labels).
      unlabelled: `unlabelled()` -> the slices of the unlabelled pool (the pre-training pool
        without the labelled and validation volumes), loaded on first call: a
        `pipeline.SlicePool` in memory, or a `slice_store.SliceStore` read from disk when it is
        larger than config.data.pretrain_memory_gb (both `pipeline.SliceIndex`es with `take`).
      local_device_count: devices of this process (batches are laid out per device).
      round_index: 0, 1, ... (`FineTuning.rounds`).
      initial: the UNet's `TrainState` before round 0 (the transferred initialisation), for a
        round that trains a UNet afresh.
      earlier: the kept host state of each round before this one, in order: its best-validation
        state (else its final one), whole (every network the round trained).
    """

    config: ml_collections.ConfigDict
    model: nn.Module
    num_classes: int
    state: PyTree
    key: jax.Array
    labelled: Any
    unlabelled: Callable[[], Any]
    local_device_count: int
    round_index: int = 0
    initial: PyTree = None
    earlier: tuple[PyTree, ...] = ()


@dataclasses.dataclass(frozen=True)
class FineTuneParts:
    """One built round of fine-tuning.

    Attributes:
      state: the initial host state (the UNet's `TrainState`, or a state holding it).
      step: `step(state, batch, rng) -> (state, metrics)` for one device of the "batch" axis.
      batches: step-indexed batches with `iterate(start_step)` (`jaxcl.data.pipeline`).
      images_per_step: global images per step (for images/s).
      segmenter: state -> the UNet's `TrainState` (validated, exported, next round's start).
      steps: the round's number of steps; None: `config.finetune.steps`.
      figures: `figures(kept state) -> {file name: matplotlib Figure}`, written to
        WORKDIR/finetune/figures/ after the round; None: no figures.
    """

    state: PyTree
    step: Callable
    batches: Any
    images_per_step: int
    segmenter: Callable[[PyTree], PyTree] = lambda state: state
    steps: int | None = None
    figures: Callable[[PyTree], dict[str, Any]] | None = None
