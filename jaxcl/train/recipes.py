"""Batch recipes: which host batches each pre-training strategy needs (docs/METHOD.md §7).

A recipe names the pipeline's batch kind and its global size. Config keys left at None take the
paper's value for the strategy (`PAPER_BATCHES`), so choosing a strategy also chooses its batch.
"""

from __future__ import annotations

import dataclasses

import ml_collections

from jaxcl.data import pipeline

GLOBAL_STRATEGIES = ("GR", "GD-", "GD", "byol", "byol-GD")
LOCAL_STRATEGIES = ("LR", "LD")
BYOL_STRATEGIES = ("byol", "byol-GD")


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

    def views_per_group(self, strategy: str, num_devices: int) -> int:
        """Views sharing a local-loss group id on one device (L^R: a slice; L^D: a partition)."""
        if strategy == "LR":
            return self.num_views
        return self.num_units // num_devices * self.num_views


# strategy -> (kind, units, views), docs/METHOD.md §7: G^R 24 x 2, G^{D-} 3 volumes x 3,
# G^D 6 x 2, L^R 10 x 2, L^D 3 volumes x 2, BYOL as G^R, BYOL-D 3 pairs of volumes.
PAPER_BATCHES = {
    "GR": ("random", 24, 2),
    "GD-": ("structured", 3, 3),
    "GD": ("structured", 6, 2),
    "byol": ("random", 24, 2),
    "byol-GD": ("paired", 3, 2),
    "LR": ("random", 10, 2),
    "LD": ("structured", 3, 2),
}


def batch_recipe(
    stage: ml_collections.ConfigDict, stage_name: str, pool_volumes: int | None = None
) -> BatchRecipe:
    """The recipe of `stage.strategy` with the config's `num_slices`/`num_volumes`/`num_views`.

    `num_slices` sizes random batches, `num_volumes` structured ones and (halved) BYOL-D pairs.
    `num_volumes` None is the paper's value, capped at `pool_volumes` (the pre-training pool, when
    given) for a small dataset of one's own: a batch cannot hold more volumes than there are.
    """
    valid = GLOBAL_STRATEGIES if stage_name == "pretrain_global" else LOCAL_STRATEGIES
    if stage.strategy not in valid:
        raise ValueError(f"config.{stage_name}.strategy={stage.strategy!r} is not one of {valid}.")
    kind, units, views = PAPER_BATCHES[stage.strategy]
    if kind != "random" and stage.num_volumes is None and pool_volumes:
        units = max(1, min(units, pool_volumes // (2 if kind == "paired" else 1)))
    if kind == "random":
        units = stage.num_slices or units
    elif kind == "structured":
        units = stage.num_volumes or units
    elif stage.num_volumes:
        if stage.num_volumes % 2:
            raise ValueError(
                f"config.{stage_name}.num_volumes={stage.num_volumes}: BYOL-D pairs volumes, "
                "so it must be even."
            )
        units = stage.num_volumes // 2
    if kind != "paired":
        views = stage.num_views or views
    elif stage.num_views not in (None, 2):
        raise ValueError(f"config.{stage_name}.num_views must be 2 for BYOL-D pairs.")
    if stage.strategy in BYOL_STRATEGIES and views != 2:
        raise ValueError(f"config.{stage_name}.num_views must be 2 for BYOL (view pairs).")
    return BatchRecipe(kind=kind, num_units=units, num_views=views)


def make_batches(
    pool: pipeline.SlicePool,
    recipe: BatchRecipe,
    *,
    seed: int,
    local_device_count: int,
) -> pipeline.StepBatches:
    """The pipeline's step-indexed batch source for `recipe`."""
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
