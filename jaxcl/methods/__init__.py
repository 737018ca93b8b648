"""The pre-training methods and the fine-tunings, one entry each (docs/METHOD.md §4-§7, §14-§19).

An entry is all the rest of jaxcl needs to know of a method: its name (the one name used in
configs, in `config.sweep.inits`, in results.csv and in logs), its notation in reports, the stage
it trains, the paper's batch for it, whether its positives are other views of the same slice, and
its builder (`jaxcl.methods.parts`). A new pre-training method is a module of its own with a
builder (and its loss and step) plus one entry in `METHODS`; a new fine-tuning (a semi-supervised
method) is a module with a builder plus one entry in `FINE_TUNINGS`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import types
from collections.abc import Callable, Mapping

import jax
import ml_collections

from jaxcl import files
from jaxcl.methods import (
    adversarial,
    byol,
    global_contrastive,
    local_contrastive,
    mixup,
    restoration,
    rotation,
    self_training,
    supervised,
    task_augmentation,
)
from jaxcl.methods.parts import BuildInputs, FineTuneInputs, FineTuneParts, StageParts
from jaxcl.train import recipes

GLOBAL_STAGE = "pretrain_global"
EXPORT_RECORD = "jaxcl_method.json"
LOCAL_STAGE = "pretrain_local"


@dataclasses.dataclass(frozen=True)
class Method:
    """One pre-training method.

    Attributes:
      name: "GD", "BYOL-D", ...: config.<stage>.strategy, sweep init names, results.csv.
      notation: (letter, superscript) of the paper's notation, ("G", "D-") for G^{D-}; None: the
        name itself.
      stage: "pretrain_global" (encoder) or "pretrain_local" (decoder blocks, encoder frozen).
      batch: the paper's batch, (kind, units, views): kind "random" (units: slices),
        "structured" (units: volumes, one slice per partition) or "paired" (units: volume pairs).
      same_slice_positives: positives are other views of the same slice (needs 2 or more views).
      build: `build(BuildInputs) -> StageParts`.
      num_views: views per slice the method needs whatever the config says (BYOL: pairs), or None.
      settings: the keys of its stage's config section it reads besides the batch and steps
        (checked by `jaxcl.config_validation`).
      decoder_paths: `decoder_paths(config)`: the parameter paths besides the encoder that a
        fine-tuning started from this method loads (`config.finetune.decoder_from`), or None
        when it trains no decoder.
    """

    name: str
    notation: tuple[str, str] | None
    stage: str
    batch: tuple[str, int, int]
    same_slice_positives: bool
    build: Callable[[BuildInputs], StageParts] = dataclasses.field(repr=False)
    num_views: int | None = None
    settings: tuple[str, ...] = ("learning_rate", "temperature")
    decoder_paths: Callable[[ml_collections.ConfigDict], tuple[tuple[str, ...], ...]] | None = (
        dataclasses.field(default=None, repr=False)
    )


def _global(name, notation, batch, *, keep_original_view, same_slice_positives) -> Method:
    build = functools.partial(
        global_contrastive.build, strategy=name, keep_original_view=keep_original_view
    )
    return Method(name, notation, GLOBAL_STAGE, batch, same_slice_positives, build)


def _local(name, notation, batch, *, same_slice_positives) -> Method:
    build = functools.partial(local_contrastive.build, strategy=name)
    return Method(
        name,
        notation,
        LOCAL_STAGE,
        batch,
        same_slice_positives,
        build,
        settings=_LOCAL,
        decoder_paths=local_contrastive.decoder_paths,
    )


def _restoration(name, corrupt) -> Method:
    build = functools.partial(restoration.build, corrupt=corrupt)
    return Method(
        name,
        None,
        GLOBAL_STAGE,
        ("random", 20, 1),
        False,
        build,
        settings=_LR,
        decoder_paths=restoration.decoder_paths,
    )


_LR = ("learning_rate",)
_BYOL = ("learning_rate", "tau_base")
_LOCAL = ("learning_rate", "temperature", "positions", "grid_size", "negatives")

# Batches, docs/METHOD.md §7: G^R 24 slices x 2 views, G^{D-} 3 volumes x 3, G^D 6 volumes x 2,
# BYOL as G^R, BYOL-D 3 pairs of volumes, L^R 10 slices x 2, L^D 3 volumes x 2.
METHODS: Mapping[str, Method] = types.MappingProxyType(
    {
        m.name: m
        for m in (
            _global(
                "GR",
                ("G", "R"),
                ("random", 24, 2),
                keep_original_view=False,
                same_slice_positives=True,
            ),
            _global(
                "GD-",
                ("G", "D-"),
                ("structured", 3, 3),
                keep_original_view=True,
                same_slice_positives=True,
            ),
            _global(
                "GD",
                ("G", "D"),
                ("structured", 6, 2),
                keep_original_view=True,
                same_slice_positives=False,
            ),
            Method("BYOL", None, GLOBAL_STAGE, ("random", 24, 2), False, byol.build, 2, _BYOL),
            Method("BYOL-D", None, GLOBAL_STAGE, ("paired", 3, 2), False, byol.build, 2, _BYOL),
            # Pretext tasks: 12 slices x their 4 rotations; 20 corrupted slices.
            Method(
                "Rotation", None, GLOBAL_STAGE, ("random", 12, 4), False, rotation.build, 4, _LR
            ),
            _restoration("Inpainting", restoration.inpainting_pair),
            _restoration("ContextRestoration", restoration.context_pair),
            _local("LR", ("L", "R"), ("random", 10, 2), same_slice_positives=True),
            _local("LD", ("L", "D"), ("structured", 3, 2), same_slice_positives=False),
        )
    }
)


def names(stage: str) -> tuple[str, ...]:
    """The methods of a stage, in the paper's order."""
    return tuple(name for name, method in METHODS.items() if method.stage == stage)


def get(name: str, stage: str) -> Method:
    """The method `name` of `stage`; ValueError naming the valid ones."""
    if name not in names(stage):
        raise ValueError(f"config.{stage}.strategy={name!r} is not one of {names(stage)}.")
    return METHODS[name]


def batch_recipe(
    section: ml_collections.ConfigDict, stage: str, pool_volumes: int | None = None
) -> recipes.BatchRecipe:
    """The batch of `section.strategy` (`recipes.batch_recipe` with the method's paper batch)."""
    method = get(section.strategy, stage)
    return recipes.batch_recipe(
        section, stage, method.batch, views=method.num_views, pool_volumes=pool_volumes
    )


def build(
    config: ml_collections.ConfigDict,
    stage: str,
    *,
    recipe: recipes.BatchRecipe,
    num_devices: int,
    key: jax.Array,
) -> StageParts:
    """The parts of `stage` for `config[stage].strategy` (see `jaxcl.methods.parts`)."""
    method = get(config[stage].strategy, stage)
    return method.build(BuildInputs(config, stage, recipe, num_devices, key))


@dataclasses.dataclass(frozen=True)
class FineTuning:
    """One way of fine-tuning the UNet on the labelled set (`config.finetune.method`).

    Attributes:
      name: "supervised" (the paper's), or a semi-supervised method of its Table 2: one name in
        configs, in sweep rows ("GD+LR+mixup") and in results.csv.
      build: `build(FineTuneInputs) -> FineTuneParts`, one round of training.
      settings: the keys of config.finetune it reads besides the batch, steps and learning rate.
      rounds: `rounds(config)` -> how many rounds the method trains, each of
        `config.finetune.steps` steps unless its parts say otherwise (`FineTuneParts.steps`),
        each given the best state of the one before (`FineTuneInputs.state`).
      uses_unlabelled: it reads the unlabelled pool (`FineTuneInputs.unlabelled`).
    """

    name: str
    build: Callable[[FineTuneInputs], FineTuneParts] = dataclasses.field(repr=False)
    settings: tuple[str, ...] = ()
    rounds: Callable[[ml_collections.ConfigDict], int] = dataclasses.field(
        default=lambda config: 1, repr=False
    )
    uses_unlabelled: bool = False


_TASK_AUG = ("task_aug_warmup", "task_aug_l1_weight")

FINE_TUNINGS: Mapping[str, FineTuning] = types.MappingProxyType(
    {
        f.name: f
        for f in (
            FineTuning("supervised", supervised.build),
            FineTuning("mixup", mixup.build, ("mixup_alpha",)),
            FineTuning(
                "self-training",
                self_training.build,
                ("self_training_rounds", "pseudo_label_fraction"),
                rounds=self_training.rounds,
                uses_unlabelled=True,
            ),
            FineTuning(
                "adversarial",
                adversarial.build,
                ("adversarial_weight", "adversarial_rampup"),
                uses_unlabelled=True,
            ),
            # Task-driven augmentation, alone and with mixup in its final round.
            *(
                FineTuning(
                    name,
                    functools.partial(task_augmentation.build, with_mixup=with_mixup),
                    _TASK_AUG + (("mixup_alpha",) if with_mixup else ()),
                    rounds=task_augmentation.rounds,
                    uses_unlabelled=True,
                )
                for name, with_mixup in (("task-aug", False), ("task-aug-mixup", True))
            ),
        )
    }
)


def fine_tuning(name: str) -> FineTuning:
    """The fine-tuning `name`; ValueError naming the valid ones."""
    if name not in FINE_TUNINGS:
        raise ValueError(f"config.finetune.method={name!r} is not one of {tuple(FINE_TUNINGS)}.")
    return FINE_TUNINGS[name]


def write_export_record(export_dir: files.PathLike, name: str) -> None:
    """Records in a pre-training export which method trained it (`exported_method`)."""
    files.write_atomically(files.path(export_dir) / EXPORT_RECORD, json.dumps({"method": name}))


def exported_method(export_dir: files.PathLike) -> Method | None:
    """The method a pre-training export records, or None for exports written before jaxcl
    recorded it (all of them local pre-trainings or global ones)."""
    path = files.path(export_dir) / EXPORT_RECORD
    if not path.exists():
        return None
    name = json.loads(path.read_text(encoding="utf-8"))["method"]
    if name not in METHODS:
        raise ValueError(
            f"{path} names the method {name!r}, which this jaxcl does not have; use the jaxcl "
            "that trained it or pre-train again."
        )
    return METHODS[name]


def label(name: str, *, math: bool = False) -> str:
    """The paper's notation of a method or of "global+local": "GD+LR" -> "G^D + L^R".

    math: Matplotlib mathtext ("$G^{D}$ + $L^{R}$"). Unknown parts are kept as they are.
    """
    parts = []
    for part in name.split("+"):
        method = METHODS.get(part)
        if method is None or method.notation is None:
            parts.append(part)
            continue
        letter, superscript = method.notation
        if math:
            parts.append(f"${letter}^{{{superscript}}}$")
        elif len(superscript) == 1:
            parts.append(f"{letter}^{superscript}")
        else:
            parts.append(f"{letter}^{{{superscript}}}")
    return " + ".join(parts)
