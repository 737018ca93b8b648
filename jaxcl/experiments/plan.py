"""The paper's experiment grid as data: initialisations, the runs they need and their configs.

An initialisation names where the fine-tuned UNet starts from and how it is fine-tuned (the rows
of the paper's tables 1 and 2):

  random                    encoder and decoder random
  GR, GD-, GD, BYOL, BYOL-D encoder from that global pre-training, decoder random
  Rotation                  encoder from rotation prediction, decoder random
  Inpainting,               the whole UNet but its output head from that restoration task
    ContextRestoration
  GR+LR, GR+LD, GD+LR, GD+LD encoder and decoder blocks 1..l from the local pre-training (L^R or
                            L^D) run on top of that global one (its frozen encoder included)
  mixup, self-training,     random initialisation, fine-tuned by that semi-supervised method
    adversarial             (`jaxcl.methods.FINE_TUNINGS`) instead of the supervised loss
  <init>+<semi-supervised>  any initialisation above, fine-tuned by that method: GD+LR+mixup is
                            the paper's "proposed init. + mixup"

Labelled sets are tr1, tr2, tr8 (a folder's own sizes) and trall, every labelled training volume:
random initialisation on trall is the paper's full-label benchmark.

`config.sweep` selects the grid as comma-separated lists: `inits`, `labelled_sets` (tr1, tr2, tr8
for the paper's datasets, a folder's own sizes, or "all"), `combinations.<set>` (the labelled
subsets c1, c2, ..., or "all" for every one the dataset defines) and `seeds` (fine-tuning seeds;
the pre-trainings use `config.seed`). The labelled sets come from the run's splits
(`jaxcl.data.context.DataContext`), so a folder dataset's automatic splits work as the paper's.

Every pre-training runs once, in its own workdir, and is shared by all the cells that start from
it; a cell (initialisation x labelled set x subset x seed) fine-tunes and evaluates in its own:

  WORKDIR/pretrain/<global>/                  stage pretrain_global
  WORKDIR/pretrain/<global>+<local>/          stage pretrain_local (encoder from the one above)
  WORKDIR/cells/<init>/<set>/<subset>/seed<S>/ stages finetune and evaluate
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
from collections.abc import Iterable, Mapping

import ml_collections

from jaxcl import files, methods
from jaxcl.data.splits import ALL_LABELLED, Splits

GLOBAL_METHODS = methods.names(methods.GLOBAL_STAGE)
LOCAL_METHODS = methods.names(methods.LOCAL_STAGE)
# The global pre-trainings the paper puts a local pre-training on top of.
GLOBALS_WITH_LOCAL = ("GR", "GD")
SUPERVISED = "supervised"
# The fine-tunings besides the supervised one, in the registry's order.
SEMI_SUPERVISED = tuple(name for name in methods.FINE_TUNINGS if name != SUPERVISED)
ALL = "all"


def is_labelled_set(name: str) -> bool:
    """Whether `name` names a labelled set: "tr" and its number of volumes ("tr8"), or "trall"."""
    return name == ALL_LABELLED or re.fullmatch(r"tr[1-9]\d*", name) is not None


def labelled_set_size(name: str) -> str:
    """|X_tr| as shown in tables: "tr8" -> "8", "trall" -> "all"."""
    return name.removeprefix("tr")


def sorted_labelled_sets(names: Iterable[str]) -> list[str]:
    """Labelled sets in increasing size ("tr1", "tr2", "tr8", "tr16", "trall"), each once."""
    return sorted(
        set(names),
        key=lambda name: math.inf if name == ALL_LABELLED else int(name.removeprefix("tr")),
    )


class SweepConfigError(ValueError):
    """A `config.sweep` value (or the sweep's workdir) that cannot be used; the message says why."""


@dataclasses.dataclass(frozen=True)
class Initialisation:
    """Where a fine-tuning starts (a global and optionally a local pre-training, or neither) and
    how it fine-tunes (`config.finetune.method`)."""

    name: str
    global_name: str | None = None
    local_name: str | None = None
    fine_tuning: str = SUPERVISED


def _initialisations() -> dict[str, Initialisation]:
    inits = {"random": Initialisation("random")}
    inits.update({name: Initialisation(name, name) for name in GLOBAL_METHODS})
    for global_name in GLOBALS_WITH_LOCAL:
        for local_name in LOCAL_METHODS:
            name = f"{global_name}+{local_name}"
            inits[name] = Initialisation(name, global_name, local_name)
    starts = list(inits.values())
    for fine_tuning in SEMI_SUPERVISED:
        for start in starts:
            name = fine_tuning if start.name == "random" else f"{start.name}+{fine_tuning}"
            inits[name] = dataclasses.replace(start, name=name, fine_tuning=fine_tuning)
    return inits


# random, the global pre-trainings, the local ones on top of G^R and G^D (table 1's row order),
# then each semi-supervised fine-tuning from each of those starts.
INITIALISATIONS: Mapping[str, Initialisation] = types.MappingProxyType(_initialisations())


@dataclasses.dataclass(frozen=True)
class Pretraining:
    """A global pre-training (`local_name` None) or a local one on top of a global one."""

    global_name: str
    local_name: str | None = None

    @property
    def name(self) -> str:
        return f"{self.global_name}+{self.local_name}" if self.local_name else self.global_name

    @property
    def stage(self) -> str:
        return "pretrain_local" if self.local_name else "pretrain_global"


@dataclasses.dataclass(frozen=True)
class Cell:
    """One fine-tuning + test evaluation: an initialisation on one labelled subset and seed."""

    init: str
    labelled_set: str
    combination: str
    seed: int

    @property
    def n_labelled(self) -> str:
        """|X_tr| as tables show it: "8" for tr8, "all" for trall."""
        return labelled_set_size(self.labelled_set)


@dataclasses.dataclass(frozen=True)
class Selection:
    """The validated `config.sweep`: what to run, in the order given by the user."""

    inits: tuple[str, ...]
    labelled_sets: tuple[str, ...]
    combinations: Mapping[str, tuple[str, ...]]
    seeds: tuple[int, ...]


@dataclasses.dataclass(frozen=True, eq=False)
class Run:
    """One call of `trainer.train_and_evaluate`: a pre-training or a cell, with its config."""

    description: str
    workdir: str
    config: ml_collections.ConfigDict
    cell: Cell | None = None

    @property
    def final_stage(self) -> str:
        return self.config.stages[-1]


# ----------------------------------------------------------------------------------------------
# config.sweep


def _split_list(value: str, key: str, example: str) -> tuple[str, ...]:
    """The items of a comma-separated string config value (spaces around items ignored)."""
    items = tuple(item.strip() for item in value.split(","))
    if not all(items):
        raise SweepConfigError(
            f"config.sweep.{key}={value!r} has an empty item; write it like {example!r}."
        )
    duplicates = sorted({item for item in items if items.count(item) > 1})
    if duplicates:
        raise SweepConfigError(f"config.sweep.{key}={value!r} lists {duplicates} more than once.")
    return items


def _choose(value: str, key: str, valid: tuple[str, ...]) -> tuple[str, ...]:
    names = _split_list(value, key, ",".join(valid[:2]))
    unknown = [name for name in names if name not in valid]
    if unknown:
        raise SweepConfigError(
            f"config.sweep.{key} has unknown names {unknown}; valid: {','.join(valid)}."
        )
    return names


def selection(config: ml_collections.ConfigDict, splits: Splits) -> Selection:
    """Parses and checks `config.sweep` against the names above and the dataset's splits.

    Raises:
      SweepConfigError naming the key, the bad values and the valid ones.
    """
    sweep = config.sweep
    inits = _choose(sweep.inits, "inits", tuple(INITIALISATIONS))
    sizes = tuple(splits.labelled)
    labelled_sets = (
        sizes
        if sweep.labelled_sets == ALL
        else _choose(sweep.labelled_sets, "labelled_sets", sizes)
    )
    combinations = {}
    for labelled_set in labelled_sets:
        valid = splits.combinations(labelled_set)
        value = sweep.combinations.get(labelled_set, ALL)
        if value == ALL:
            combinations[labelled_set] = valid
        else:
            combinations[labelled_set] = _choose(value, f"combinations.{labelled_set}", valid)
    seeds = []
    for item in _split_list(sweep.seeds, "seeds", "0,1"):
        try:
            seeds.append(int(item))
        except ValueError:
            raise SweepConfigError(
                f"config.sweep.seeds={sweep.seeds!r}: {item!r} is not an integer."
            ) from None
    return Selection(inits, labelled_sets, types.MappingProxyType(combinations), tuple(seeds))


def pretrainings(inits: tuple[str, ...]) -> tuple[Pretraining, ...]:
    """The pre-trainings the initialisations need, each once: globals first, then locals.

    A local pre-training needs its global one, so "GD+LR" alone runs GD and GD+LR.
    """
    needed = [INITIALISATIONS[name] for name in inits]
    global_names = {init.global_name for init in needed if init.global_name}
    local_pairs = {(init.global_name, init.local_name) for init in needed if init.local_name}
    global_runs = [Pretraining(name) for name in GLOBAL_METHODS if name in global_names]
    local_runs = [
        Pretraining(global_name, local_name)
        for global_name in GLOBALS_WITH_LOCAL
        for local_name in LOCAL_METHODS
        if (global_name, local_name) in local_pairs
    ]
    return tuple(global_runs + local_runs)


def cells(chosen: Selection) -> tuple[Cell, ...]:
    """Every cell of the selection, subset by subset, so that early results compare all inits."""
    return tuple(
        Cell(init, labelled_set, combination, seed)
        for labelled_set in chosen.labelled_sets
        for combination in chosen.combinations[labelled_set]
        for seed in chosen.seeds
        for init in chosen.inits
    )


# ----------------------------------------------------------------------------------------------
# Workdirs and derived configs.


def pretraining_dir(workdir: files.PathLike, pretraining: Pretraining) -> str:
    """WORKDIR/pretrain/<name>, absolute (or a gs:// URI)."""
    return str(files.path(workdir) / "pretrain" / pretraining.name)


def export_dir(workdir: files.PathLike, pretraining: Pretraining) -> str:
    """The folder with the pre-training's final variables (`trainer` writes it)."""
    return str(files.path(pretraining_dir(workdir, pretraining)) / pretraining.stage / "export")


def cell_dir(workdir: files.PathLike, cell: Cell) -> str:
    """WORKDIR/cells/<init>/<set>/<subset>/seed<S>, absolute (or a gs:// URI)."""
    location = files.path(workdir) / "cells" / cell.init / cell.labelled_set / cell.combination
    return str(location / f"seed{cell.seed}")


def pretraining_config(
    config: ml_collections.ConfigDict, workdir: files.PathLike, pretraining: Pretraining
) -> ml_collections.ConfigDict:
    """`config` running only the pre-training's stage, with its strategy (and encoder source)."""
    derived = config.copy_and_resolve_references()
    derived.stages = (pretraining.stage,)
    if pretraining.local_name is None:
        derived.pretrain_global.strategy = pretraining.global_name
    else:
        derived.pretrain_local.strategy = pretraining.local_name
        derived.pretrain_local.encoder_from = export_dir(
            workdir, Pretraining(pretraining.global_name)
        )
    return derived


def cell_config(
    config: ml_collections.ConfigDict, workdir: files.PathLike, cell: Cell
) -> ml_collections.ConfigDict:
    """`config` fine-tuning and evaluating one cell: its subset, seed and pre-trained parts."""
    init = INITIALISATIONS[cell.init]
    derived = config.copy_and_resolve_references()
    derived.stages = ("finetune", "evaluate")
    derived.seed = cell.seed
    derived.data.labelled_set = cell.labelled_set
    derived.data.combination = cell.combination
    encoder_from = decoder_from = ""  # "" is random initialisation for the trainer.
    if init.local_name:
        # The local pre-training's export holds its (frozen) encoder next to the decoder blocks.
        encoder_from = decoder_from = export_dir(
            workdir, Pretraining(init.global_name, init.local_name)
        )
    elif init.global_name:
        encoder_from = export_dir(workdir, Pretraining(init.global_name))
        if methods.METHODS[init.global_name].decoder_paths is not None:
            decoder_from = encoder_from  # a restoration task pre-trains the whole UNet
    derived.finetune.encoder_from = encoder_from
    derived.finetune.decoder_from = decoder_from
    derived.finetune.method = init.fine_tuning
    return derived


def describe(cell: Cell) -> str:
    return f"cell {cell.init} {cell.labelled_set}-{cell.combination} seed {cell.seed}"


def plan(
    config: ml_collections.ConfigDict, workdir: files.PathLike, splits: Splits
) -> tuple[Run, ...]:
    """Every run of the sweep `config.sweep` selects, in order: pre-trainings, then cells.

    Args:
      config: the sweep's config, its data settings resolved (`DataContext.config`).
      workdir: the sweep's folder.
      splits: the dataset's splits (`DataContext.splits`): the labelled sets and subsets.
    """
    chosen = selection(config, splits)
    runs = [
        Run(
            f"pre-training {p.name}",
            pretraining_dir(workdir, p),
            pretraining_config(config, workdir, p),
        )
        for p in pretrainings(chosen.inits)
    ]
    runs += [
        Run(describe(c), cell_dir(workdir, c), cell_config(config, workdir, c), cell=c)
        for c in cells(chosen)
    ]
    return tuple(runs)
