"""Batch recipes: which host batches each pre-training strategy needs (docs/METHOD.md §7).

A recipe names the pipeline's batch kind and its global size. Config keys left at None take the
paper's value for the method (`jaxcl.methods.Method.batch`), so choosing a strategy also chooses
its batch.
"""

from __future__ import annotations

import dataclasses

import ml_collections

from jaxcl.data import pipeline


@dataclasses.dataclass(frozen=True)
class BatchRecipe:
    """A global pre-training batch.

    Attributes:
      kind: "random" (units are slices), "structured" (units are volumes, one slice per
        partition each) or "paired" (units are pairs of volumes, BYOL-D).
      num_units: slices, volumes or volume pairs per global batch.
      num_views: views per slice (paired: the 2 slices of a pair).
    """

    kind: str
    num_units: int
    num_views: int

    def images_per_step(self, n_partitions: int) -> int:
        per_unit = 1 if self.kind == "random" else n_partitions
        return self.num_units * per_unit * self.num_views

    def views_per_group(self, num_devices: int) -> int:
        """Views sharing a local-loss group id on one device: a slice's views in a random batch
        (L^R), a partition's views across the device's volumes in a structured one (L^D)."""
        if self.kind == "random":
            return self.num_views
        return self.num_units // num_devices * self.num_views


def batch_recipe(
    stage: ml_collections.ConfigDict,
    stage_name: str,
    paper_batch: tuple[str, int, int],
    *,
    views: int | None = None,
    pool_volumes: int | None = None,
) -> BatchRecipe:
    """A stage's batch: the method's paper batch with the config's sizes where they are set.

    Args:
      stage: the stage's config section: `num_slices` sizes random batches, `num_volumes`
        structured ones and (halved) paired ones, `num_views` the views per slice.
      stage_name: "pretrain_global" or "pretrain_local", named in errors.
      paper_batch: (kind, units, views) of the method (`jaxcl.methods.Method.batch`).
      views: views the method needs whatever the config says (BYOL: 2), or None.
      pool_volumes: the pre-training pool; `num_volumes` None is the paper's value capped at it
        (a batch cannot hold more volumes than there are, e.g. in a small dataset of one's own).

    Raises:
      ValueError naming the config key.
    """
    kind, units, paper_views = paper_batch
    if kind != "random" and stage.num_volumes is None and pool_volumes:
        units = max(1, min(units, pool_volumes // (2 if kind == "paired" else 1)))
    if kind == "random":
        units = stage.num_slices or units
    elif kind == "structured":
        units = stage.num_volumes or units
    elif stage.num_volumes:
        if stage.num_volumes % 2:
            raise ValueError(
                f"config.{stage_name}.num_volumes={stage.num_volumes}: {stage.strategy} pairs "
                "volumes, so it must be even."
            )
        units = stage.num_volumes // 2
    num_views = stage.num_views or paper_views
    if views is not None and num_views != views:
        raise ValueError(
            f"config.{stage_name}.num_views must be {views} for {stage.strategy} (view pairs)."
        )
    return BatchRecipe(kind=kind, num_units=units, num_views=num_views)


def make_batches(
    pool: pipeline.SliceIndex,
    recipe: BatchRecipe,
    *,
    seed: int,
    local_device_count: int,
) -> pipeline.StepBatches:
    """The pipeline's step-indexed batch source for `recipe` over ``pool`` (in memory, or a
    `slice_store.SliceStore`)."""
    common = {"seed": seed, "local_device_count": local_device_count}
    if recipe.kind == "random":
        return pipeline.random_slice_batches(
            pool, num_slices=recipe.num_units, num_views=recipe.num_views, **common
        )
    if recipe.kind == "structured":
        return pipeline.structured_batches(
            pool, num_volumes=recipe.num_units, num_views=recipe.num_views, **common
        )
    return pipeline.paired_volume_batches(pool, num_pairs=recipe.num_units, **common)
