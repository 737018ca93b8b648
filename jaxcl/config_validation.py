"""Up-front checks of a run's config: every impossible value at once, before any data is loaded.

`validate(config, num_devices=...)` looks at the config the way the trainer will use it and
raises one `ConfigError` listing every problem as `config.<key>=<value>: <what is wrong>; <how to
fix>`, instead of a traceback from deep inside a stage, possibly after minutes of data preparation
or pre-training. The sections of the stages in `config.stages` are checked (their batches against
`num_devices`), and the data, model and augment sections that every stage uses.

The rules stay where they live: the checks call the functions that would raise later
(`methods.batch_recipe`, `Splits.get`, `augment.AugmentConfig`, ...), compare with the tables of
the code that reads a key (`parts.DTYPES`, `local.NEGATIVES`, `tfds.FRAME_DATASETS`, ...) and
turn a ValueError into an entry. Whether a pre-training stage can be built at the configured image
size, filters and decoder blocks (the local regions on the decoder's feature map, ...) is asked
of the method's builder itself: under `jax.eval_shape` the stage is built and its loss taken on
a batch of shapes, so nothing is computed or compiled. Written here are only the checks that
otherwise fail inside a stage (batches that do not split over the devices, a missing export
folder).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import ml_collections

from jaxcl import augment, files, methods
from jaxcl.data import sources
from jaxcl.data import splits as dataset_splits
from jaxcl.data import tfds as volumes_tfds
from jaxcl.data.orientation import SLICE_AXES
from jaxcl.data.splits import Splits
from jaxcl.losses import local
from jaxcl.methods import abstract, parts, self_training, task_augmentation
from jaxcl.models import unet
from jaxcl.train import parallel, schedules

# Keys that must be > 0 (with an example value): general ones, the model's, and those of the
# pre-training / fine-tuning stages (a stage's keys are checked when it is in config.stages).
_POSITIVE = {
    "log_every": "e.g. 50 steps",
    "checkpoint_every": "e.g. 500 steps",
    "data.target_resolution": "in mm, e.g. 1.5",
    "data.n_partitions": "the paper uses 4",
    "data.eval_chunk_size": "e.g. 16 slices",
    "data.stream_parallelism": "e.g. 8 steps read at a time",
}
_MODEL_POSITIVE = {
    "model.global_hidden_features": "the paper uses 1024",
    "model.embedding_features": "the paper uses 128",
}
_STAGE_POSITIVE = {"steps": "e.g. 10000", "learning_rate": "the paper uses 1e-3"}
_FINETUNE_POSITIVE = {**_STAGE_POSITIVE, "val_every": "e.g. 50 steps", "batch_size": "e.g. 20"}
_CONTRASTIVE_POSITIVE = {"temperature": "the paper uses 0.1"}
# The values `jaxcl.losses.local` knows for these settings of a method (`Method.settings`).
_CHOICES = {"positions": local.POSITION_KINDS, "negatives": local.NEGATIVES}
_SOURCES = {"encoder_from": methods.GLOBAL_STAGE, "decoder_from": methods.LOCAL_STAGE}


class ConfigError(ValueError):
    """Impossible config values; `problems` holds one `config.<key>=<value>: ...` line each."""

    def __init__(self, problems: Sequence[str]):
        self.problems = tuple(problems)
        listing = "\n".join(f"  - {problem}" for problem in self.problems)
        super().__init__(
            f"the config has {len(self.problems)} invalid value(s); fix them and run again:\n"
            f"{listing}"
        )


def _problem(key: str, value: Any, wrong: str, fix: str) -> str:
    return f"config.{key}={value!r}: {wrong}; {fix}"


def _raised(check: Callable[[], object]) -> str | None:
    """The message of the ValueError `check()` raises, or None when it passes."""
    try:
        check()
    except (ValueError, TypeError) as error:  # TypeError: e.g. None for a number
        return str(error)
    return None


def _entry(key: str, value: Any, message: str, context: str = "") -> str:
    """A reused function's message as an entry (kept as is when it already names its key)."""
    if message.startswith("config."):
        return message
    return f"config.{key}={value!r}: {context}{message}"


def _positive(
    config: ml_collections.ConfigDict, examples: dict[str, str], prefix: str = ""
) -> Iterator[str]:
    for key, example in examples.items():
        value = config[prefix + key]
        if not isinstance(value, int | float) or value <= 0:
            yield _problem(prefix + key, value, "must be positive", example)


def _multiples(count: int, multiple: int, limit: int | None) -> list[int]:
    """The multiples of `multiple` nearest to `count` (below and above), at most `limit`."""
    below, above = count // multiple * multiple, math.ceil(count / multiple) * multiple
    nearest = sorted({n for n in (below, above) if n >= multiple})
    if limit is None:
        return nearest or [multiple]
    largest = limit // multiple * multiple
    return [n for n in nearest if n <= limit] or ([largest] if largest >= multiple else [])


def _split_problems(
    key: str, value: Any, count: int, unit: str, multiple: int, devices: str, limit=None
) -> Iterator[str]:
    """An entry unless `count` > 0 units are a multiple of `multiple`, at most `limit`."""
    if count % multiple == 0 and (limit is None or count <= limit):
        return
    paper = f" (the strategy's paper value {count})" if value is None else ""
    if limit is not None and count > limit:
        wrong = f"{count} {unit}{paper} exceed the {limit} the pretrain split holds"
    else:
        wrong = f"{count} {unit}{paper} do not split into whole {unit} over {devices}"
    if options := _multiples(count, multiple, limit):
        fix = f"use a multiple of {multiple} (e.g. {' or '.join(map(str, options))})"
    else:
        fix = f"no value fits {limit} {unit}: run on fewer devices"
    yield _problem(key, value, wrong, fix)


def _fits_unet(image_size: Any) -> bool:
    """Whether the encoder's poolings halve `image_size` exactly."""
    return isinstance(image_size, int) and image_size > 0 and image_size % unet.INPUT_MULTIPLE == 0


def _general_problems(
    config: ml_collections.ConfigDict, stage_order: tuple[str, ...] | None
) -> Iterator[str]:
    stages = tuple(config.stages)
    if stage_order is not None:
        yield from _stage_order_problems(stages, stage_order)
    if not isinstance(config.seed, int) or config.seed < 0:
        yield _problem("seed", config.seed, "batch generators need a non-negative seed", "use 0")
    if config.parallel.mode not in parallel.MODES:
        yield _problem("parallel.mode", config.parallel.mode, "unknown", f"use {parallel.MODES}")
    yield from _positive(config, _POSITIVE)


def _stage_order_problems(stages: tuple[str, ...], stage_order: tuple[str, ...]) -> Iterator[str]:
    """`stages` must be known and listed once each in `stage_order`, the order they run in."""
    if unknown := [name for name in stages if name not in stage_order]:
        yield _problem("stages", stages, f"unknown stages {unknown}", f"choose from {stage_order}")
    known = [name for name in stages if name in stage_order]
    if known != sorted(set(known), key=stage_order.index):
        yield _problem(
            "stages",
            stages,
            "stages run in the given order and a later stage loads what an earlier one exports",
            f"list each once in the order {stage_order}",
        )


def _data_problems(config: ml_collections.ConfigDict, splits: Splits | None) -> Iterator[str]:
    data = config.data
    if not isinstance(data.pretrain_memory_gb, int | float) or data.pretrain_memory_gb < 0:
        yield _problem(
            "data.pretrain_memory_gb",
            data.pretrain_memory_gb,
            "must be 0 or more (GB of pre-training pool held in memory)",
            "e.g. 4; 0 streams every pool from disk",
        )
    if not _fits_unet(data.image_size):
        size = data.image_size if isinstance(data.image_size, int) else 0
        nearest = _multiples(size, unet.INPUT_MULTIPLE, None)
        yield _problem(
            "data.image_size",
            data.image_size,
            f"not a positive multiple of {unet.INPUT_MULTIPLE} (the encoder halves it "
            f"{unet.NUM_POOLS} times)",
            f"use e.g. {' or '.join(map(str, nearest))}",
        )
    if data.slice_axis not in ("auto", *SLICE_AXES):
        yield _problem(
            "data.slice_axis", data.slice_axis, "unknown", f"use auto or one of {SLICE_AXES}"
        )
    if splits is None:
        if message := _raised(lambda: dataset_splits.paper_splits(data.dataset)):
            yield _entry("data.dataset", data.dataset, message)
            return
        splits = dataset_splits.paper_splits(data.dataset)
    if data.dataset != "folder" and _custom_splits(data):
        yield _problem(
            "data.splits",
            "...",
            f"{data.dataset} has the paper's fixed splits",
            "leave config.data.splits at its defaults (they are for the 'folder' dataset)",
        )
    names = list(splits.labelled)
    if data.labelled_set not in names:
        yield _problem("data.labelled_set", data.labelled_set, "unknown", f"use one of {names}")
    elif message := _raised(lambda: splits.get(data.labelled_set, data.combination)):
        yield _entry("data.combination", data.combination, message)
    if data.dataset == "folder":
        return  # DataContext has found the folder's subjects and read its dataset.json
    frame = data.frame if data.dataset in volumes_tfds.FRAME_DATASETS else None
    options = volumes_tfds.layout_options(data.dataset, frame, data.channel, ())
    if message := _raised(lambda: sources.get_layout(data.dataset, None, **options)):
        yield _entry("data.frame", data.frame, message)
    elif data.dataset != "synthetic" and data.root:
        layout = sources.get_layout(data.dataset, None, **options)
        if message := _raised(lambda: layout.find_subjects(data.root)):
            yield _entry("data.root", data.root, message)
    elif data.dataset != "synthetic" and "evaluate" in config.stages:
        yield _problem(
            "data.root",
            data.root,
            "evaluation writes its predictions on the grid of the downloaded images",
            f"set it to the dataset folder. {sources.download_instructions(data.dataset)}",
        )


def _custom_splits(data: ml_collections.ConfigDict) -> bool:
    """Whether `data.splits` names cases (meaningful for 'folder' datasets only)."""
    return any(data.splits[key] for key in ("file", "test", "val", "labelled", "pretrain"))


def _model_problems(config: ml_collections.ConfigDict) -> Iterator[str]:
    model = config.model
    if message := _raised(lambda: unet.check_filters(model.filters)):
        yield _entry("model.filters", tuple(model.filters), message)
    if model.num_decoder_blocks not in range(1, unet.NUM_POOLS + 1):
        yield _problem(
            "model.num_decoder_blocks",
            model.num_decoder_blocks,
            f"the decoder has {unet.NUM_POOLS} blocks",
            f"use 1..{unet.NUM_POOLS} (the paper uses 3)",
        )
    yield from _positive(config, _MODEL_POSITIVE)
    if model.dtype not in parts.DTYPES:
        yield _problem(
            "model.dtype", model.dtype, "unsupported", f"use one of {list(parts.DTYPES)}"
        )
    defaults = {field.name: field.default for field in dataclasses.fields(augment.AugmentConfig)}
    overrides = config.augment.to_dict()
    for key, value in sorted(overrides.items()):
        if key not in defaults:
            yield _problem(f"augment.{key}", value, "unknown", f"use one of {sorted(defaults)}")
        elif value is None:
            yield _problem(f"augment.{key}", value, "unset", f"the default is {defaults[key]!r}")
    complete = set(overrides) <= set(defaults) and None not in overrides.values()
    if complete and (message := _raised(lambda: augment.AugmentConfig(**overrides))):
        yield _entry("augment", overrides, message)


def _pretraining_problems(
    config: ml_collections.ConfigDict,
    stage: str,
    num_devices: int,
    devices: str,
    pool_volumes: int | None,
) -> Iterator[str]:
    """Strategy, batch over the devices (at most `pool_volumes`), loss settings."""
    cfg = config[stage]
    yield from _positive(config, _STAGE_POSITIVE, f"{stage}.")
    yield from _source_problems(config, stage)
    for key in ("num_slices", "num_volumes", "num_views"):
        if cfg[key] is not None and cfg[key] <= 0:
            yield _problem(f"{stage}.{key}", cfg[key], "must be positive", "None: paper value")
            return
    try:
        method = methods.get(cfg.strategy, stage)
        recipe = methods.batch_recipe(cfg, stage, pool_volumes)
    except ValueError as error:
        yield _entry(f"{stage}.strategy", cfg.strategy, str(error))
        return
    if method.same_slice_positives and recipe.num_views < 2:
        yield _problem(
            f"{stage}.num_views",
            cfg.num_views,
            f"{cfg.strategy}'s positives are the other views of the same slice",
            "use 2 or more",
        )
    volumes = 2 if recipe.kind == "paired" else 1  # volumes per unit (BYOL-D pairs two)
    key, unit, limit = (
        ("num_slices", "slices", None)
        if recipe.kind == "random"
        else ("num_volumes", "volumes", pool_volumes)
    )
    count, multiple = recipe.num_units * volumes, num_devices * volumes
    yield from _split_problems(f"{stage}.{key}", cfg[key], count, unit, multiple, devices, limit)
    if "temperature" in method.settings:
        yield from _positive(config, _CONTRASTIVE_POSITIVE, f"{stage}.")
    if "tau_base" in method.settings and (
        message := _raised(lambda: schedules.byol_tau(0, 1, cfg.tau_base))
    ):
        yield _entry(f"{stage}.tau_base", cfg.tau_base, message)
    for setting, choices in _CHOICES.items():
        if setting in method.settings and cfg[setting] not in choices:
            yield _problem(f"{stage}.{setting}", cfg[setting], "unknown", f"use {choices}")


def _build_problems(
    config: ml_collections.ConfigDict, stage: str, num_devices: int, pool_volumes: int | None
) -> Iterator[str]:
    """What the builder of `stage` raises, as an entry of the setting its message names first
    (the strategy when it names none). Its other checks passed: the batch splits."""
    cfg = config[stage]
    recipe = methods.batch_recipe(cfg, stage, pool_volumes)
    message = _raised(lambda: abstract.trace_stage(config, stage, recipe, num_devices))
    if message is None:
        return
    setting = _named_setting(message, methods.get(cfg.strategy, stage).settings) or "strategy"
    where = (
        f"{cfg.strategy} with data.image_size={config.data.image_size}, "
        f"model.num_decoder_blocks={config.model.num_decoder_blocks}: "
    )
    yield _entry(f"{stage}.{setting}", cfg[setting], message, where)


def _named_setting(message: str, settings: Iterable[str]) -> str | None:
    """The setting `message` names first, as a word (`grid_size` in "... got grid_size=1"), or
    None."""
    named = {
        match.start(): setting
        for setting in settings
        if (match := re.search(rf"\b{re.escape(setting)}\b", message))
    }
    return named[min(named)] if named else None


def _buildable(config: ml_collections.ConfigDict, model_problems: Sequence[str]) -> bool:
    """Whether the settings every builder reads (model, augment, image size, partitions) are
    valid; otherwise they are reported and building would only repeat them."""
    partitions = config.data.n_partitions
    return (
        not model_problems
        and _fits_unet(config.data.image_size)
        and isinstance(partitions, int)
        and partitions > 0
    )


def _source_problems(config: ml_collections.ConfigDict, stage: str) -> Iterator[str]:
    for option, source in _SOURCES.items():
        folder = config[stage].get(option)
        if folder and "://" not in folder and not files.path(folder).is_dir():
            yield _problem(
                f"{stage}.{option}",
                folder,
                "no such folder",
                f"give an export folder (WORKDIR/{source}/export), '' for random "
                f"initialisation or None for this workdir's {source}",
            )


def _fine_tuning_problems(
    config: ml_collections.ConfigDict, num_devices: int, splits: Splits | None
) -> Iterator[str]:
    """The method's settings, its batch over the devices, and the unlabelled volumes it reads."""
    cfg = config.finetune
    try:
        fine_tuning = methods.fine_tuning(cfg.method)
    except ValueError as error:
        yield _entry("finetune.method", cfg.method, str(error))
        return
    settings = fine_tuning.settings
    if "mixup_alpha" in settings:
        yield from _positive(config, {"mixup_alpha": "the paper uses 0.1"}, "finetune.")
    if "self_training_rounds" in settings and (
        not isinstance(cfg.self_training_rounds, int) or cfg.self_training_rounds < 1
    ):
        yield _problem(
            "finetune.self_training_rounds",
            cfg.self_training_rounds,
            "self-training needs at least one round of pseudo-labels",
            "the paper's comparison uses 3",
        )
    split = functools.partial(
        self_training.batch_split, cfg.batch_size, cfg.pseudo_label_fraction, num_devices
    )
    if "pseudo_label_fraction" in settings and (message := _raised(split)):
        yield _entry("finetune.pseudo_label_fraction", cfg.pseudo_label_fraction, message)
    if "adversarial_weight" in settings and not (
        isinstance(cfg.adversarial_weight, int | float) and cfg.adversarial_weight >= 0
    ):
        yield _problem(
            "finetune.adversarial_weight",
            cfg.adversarial_weight,
            "the adversarial term's weight must be 0 or more",
            "e.g. 0.1",
        )
    if "adversarial_rampup" in settings and not (
        isinstance(cfg.adversarial_rampup, int | float) and 0 <= cfg.adversarial_rampup <= 1
    ):
        yield _problem(
            "finetune.adversarial_rampup",
            cfg.adversarial_rampup,
            "the ramp-up is a fraction of the fine-tuning steps",
            "use a value in [0, 1], e.g. 0.4",
        )
    if "task_aug_warmup" in settings and (
        message := _raised(lambda: task_augmentation.round_steps(cfg))
    ):
        yield _entry("finetune.task_aug_warmup", cfg.task_aug_warmup, message)
    if fine_tuning.uses_unlabelled and splits is not None:
        labelled_set = f"{config.data.labelled_set}-{config.data.combination}"
        if _raised(lambda: splits.get(config.data.labelled_set, config.data.combination)):
            return  # reported with the data section
        used = set(splits.get(config.data.labelled_set, config.data.combination))
        used |= set(splits.val(labelled_set))
        if not set(splits.pretrain) - used:
            yield _problem(
                "finetune.method",
                cfg.method,
                f"it reads unlabelled volumes, but every pre-training volume is in {labelled_set} "
                "or its validation set",
                "add unlabelled images (a folder's imagesTs/ or config.data.unlabelled_roots) or "
                "use a supervised fine-tuning",
            )


def validate(
    config: ml_collections.ConfigDict,
    *,
    num_devices: int,
    num_processes: int = 1,
    splits: Splits | None = None,
    stage_order: Iterable[str] | None = None,
) -> None:
    """Raises ConfigError listing every impossible value of `config`; loads no data.

    Args:
      config: a run's config (`configs/<dataset>.py` with its overrides), its data settings
        resolved (`jaxcl.data.context.DataContext.config`).
      num_devices: all devices of the run (`jax.device_count()`): every global batch is split
        into this many equal parts of whole slices / volumes / volume pairs.
      num_processes: processes of the run (`jax.process_count()`), named in the messages.
      splits: the run's splits (`DataContext.splits`); None: the paper's splits of the dataset.
      stage_order: the stages the trainer runs, in their order (`jaxcl.train.trainer.STAGES`):
        `config.stages` must name them, each once, in this order. None: not checked.
    """
    devices = f"{num_devices} devices"
    if num_processes > 1:
        devices += f" ({num_processes} processes x {num_devices // num_processes} local)"
    order = None if stage_order is None else tuple(stage_order)
    model_problems = list(_model_problems(config))
    problems = [
        *_general_problems(config, order),
        *_data_problems(config, splits),
        *model_problems,
    ]
    if splits is None and dataset_splits.has_paper_splits(config.data.dataset):
        splits = dataset_splits.paper_splits(config.data.dataset)
    pool_volumes = len(splits.pretrain) if splits is not None else None
    for stage in (methods.GLOBAL_STAGE, methods.LOCAL_STAGE):
        if stage not in config.stages:
            continue
        stage_problems = list(
            _pretraining_problems(config, stage, num_devices, devices, pool_volumes)
        )
        if not stage_problems and _buildable(config, model_problems):
            stage_problems += _build_problems(config, stage, num_devices, pool_volumes)
        problems += stage_problems
    if "finetune" in config.stages:
        batch = config.finetune.batch_size
        problems += _positive(config, _FINETUNE_POSITIVE, "finetune.")
        if isinstance(batch, int) and batch > 0:
            problems += _split_problems(
                "finetune.batch_size", batch, batch, "slices", num_devices, devices
            )
        problems += _source_problems(config, "finetune")
        problems += _fine_tuning_problems(config, num_devices, splits)
    if problems:
        raise ConfigError(problems)
