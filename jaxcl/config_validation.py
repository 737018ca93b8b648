"""Up-front checks of a run's config: every impossible value at once, before any data is loaded.

`validate(config, num_devices=...)` looks at the config the way the trainer will use it and
raises one `ConfigError` listing every problem as `config.<key>=<value>: <what is wrong>; <how to
fix>`, instead of a traceback from deep inside a stage, possibly after minutes of data preparation
or pre-training. The sections of the stages in `config.stages` are checked (their batches against
`num_devices`), and the data, model and augment sections that every stage uses.

The rules stay where they live: the checks call the functions that would raise later
(`methods.batch_recipe`, `Splits.get`, `local.region_positions`, `augment.AugmentConfig`,
...) and turn their ValueError into an entry; written here are only the checks that otherwise
fail inside a stage (batches that do not split over the devices, a missing export folder).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import ml_collections

from jaxcl import augment, files, methods
from jaxcl.data import sources
from jaxcl.data import splits as dataset_splits
from jaxcl.data.orientation import SLICE_AXES
from jaxcl.data.splits import Splits
from jaxcl.losses import local
from jaxcl.methods import local_contrastive
from jaxcl.models import unet
from jaxcl.train import parallel, schedules

# The stages in the order they run; each later one loads what an earlier one exports.
STAGES = ("pretrain_global", "pretrain_local", "finetune", "evaluate")
MODEL_DTYPES = ("float32", "bfloat16")
NEGATIVES = ("all", "paper")
# Keys that must be > 0 (with an example value), and those of the pre-training / fine-tuning
# stages (a stage's keys are checked when it is in config.stages).
_POSITIVE = {
    "log_every": "e.g. 50 steps",
    "checkpoint_every": "e.g. 500 steps",
    "data.target_resolution": "in mm, e.g. 1.5",
    "data.n_partitions": "the paper uses 4",
    "data.eval_chunk_size": "e.g. 16 slices",
    "model.global_hidden_features": "the paper uses 1024",
    "model.embedding_features": "the paper uses 128",
}
_STAGE_POSITIVE = {"steps": "e.g. 10000", "learning_rate": "the paper uses 1e-3"}
_FINETUNE_POSITIVE = {**_STAGE_POSITIVE, "val_every": "e.g. 50 steps", "batch_size": "e.g. 20"}
_CONTRASTIVE_POSITIVE = {"temperature": "the paper uses 0.1"}
_FRAME_DATASETS = ("acdc", "synthetic")  # datasets with a cardiac phase (config.data.frame)
_SOURCES = {"encoder_from": "pretrain_global", "decoder_from": "pretrain_local"}


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


def _entry(key: str, value: Any, message: str) -> str:
    """A reused function's message as an entry (kept as is when it already names its key)."""
    return message if message.startswith("config.") else f"config.{key}={value!r}: {message}"


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


def _general_problems(config: ml_collections.ConfigDict) -> Iterator[str]:
    stages = tuple(config.stages)
    if unknown := [name for name in stages if name not in STAGES]:
        yield _problem("stages", stages, f"unknown stages {unknown}", f"choose from {STAGES}")
    known = [name for name in stages if name in STAGES]
    if known != sorted(set(known), key=STAGES.index):
        yield _problem(
            "stages",
            stages,
            "stages run in the given order and a later stage loads what an earlier one exports",
            f"list each once in the order {STAGES}",
        )
    if not isinstance(config.seed, int) or config.seed < 0:
        yield _problem("seed", config.seed, "batch generators need a non-negative seed", "use 0")
    if config.parallel.mode not in parallel.MODES:
        yield _problem("parallel.mode", config.parallel.mode, "unknown", f"use {parallel.MODES}")
    yield from _positive(config, _POSITIVE)


def _data_problems(config: ml_collections.ConfigDict, splits: Splits | None) -> Iterator[str]:
    data = config.data
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
    options = {"frame": data.frame} if data.dataset in _FRAME_DATASETS else {}
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
    if model.dtype not in MODEL_DTYPES:
        yield _problem("model.dtype", model.dtype, "unsupported", f"use one of {MODEL_DTYPES}")
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
    """Strategy, batch over the devices (at most `pool_volumes`), loss, region positions."""
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
    if "positions" in method.settings:
        yield from _region_problems(config)


def _region_problems(config: ml_collections.ConfigDict) -> Iterator[str]:
    cfg = config.pretrain_local
    blocks, size = config.model.num_decoder_blocks, config.data.image_size
    if cfg.negatives not in NEGATIVES:
        yield _problem("pretrain_local.negatives", cfg.negatives, "unknown", f"use {NEGATIVES}")
    elif cfg.negatives == "paper" and cfg.positions != "paper":
        yield _problem(
            "pretrain_local.negatives",
            cfg.negatives,
            "the paper's negatives are defined on the 17 paper positions",
            "use negatives='all' or positions='paper'",
        )
    if blocks not in range(1, unet.NUM_POOLS + 1) or not _fits_unet(size):
        return  # reported with the model and data sections
    feature_size = local_contrastive.feature_size(size, blocks)
    if message := _raised(
        lambda: local.region_positions(feature_size, cfg.positions, cfg.grid_size)
    ):
        key = "grid_size" if cfg.positions == "grid" else "positions"
        context = f"(a {feature_size}x{feature_size} map after {blocks} decoder blocks) "
        yield _entry(f"pretrain_local.{key}", cfg[key], context + message)


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


def _fine_tuning_problems(config: ml_collections.ConfigDict) -> Iterator[str]:
    method = config.finetune.method
    try:
        fine_tuning = methods.fine_tuning(method)
    except ValueError as error:
        yield _entry("finetune.method", method, str(error))
        return
    if "mixup_alpha" in fine_tuning.settings:
        yield from _positive(config, {"mixup_alpha": "the paper uses 0.1"}, "finetune.")


def validate(
    config: ml_collections.ConfigDict,
    *,
    num_devices: int,
    num_processes: int = 1,
    splits: Splits | None = None,
) -> None:
    """Raises ConfigError listing every impossible value of `config`; loads no data.

    Args:
      config: a run's config (`configs/<dataset>.py` with its overrides), its data settings
        resolved (`jaxcl.data.context.DataContext.config`).
      splits: the run's splits (`DataContext.splits`); None: the paper's splits of the dataset.
      num_devices: all devices of the run (`jax.device_count()`): every global batch is split
        into this many equal parts of whole slices / volumes / volume pairs.
      num_processes: processes of the run (`jax.process_count()`), named in the messages.
    """
    devices = f"{num_devices} devices"
    if num_processes > 1:
        devices += f" ({num_processes} processes x {num_devices // num_processes} local)"
    problems = [
        *_general_problems(config),
        *_data_problems(config, splits),
        *_model_problems(config),
    ]
    if splits is None and dataset_splits.has_paper_splits(config.data.dataset):
        splits = dataset_splits.paper_splits(config.data.dataset)
    pool_volumes = len(splits.pretrain) if splits is not None else None
    for stage in ("pretrain_global", "pretrain_local"):
        if stage in config.stages:
            problems += _pretraining_problems(config, stage, num_devices, devices, pool_volumes)
    if "finetune" in config.stages:
        batch = config.finetune.batch_size
        problems += _positive(config, _FINETUNE_POSITIVE, "finetune.")
        if isinstance(batch, int) and batch > 0:
            problems += _split_problems(
                "finetune.batch_size", batch, batch, "slices", num_devices, devices
            )
        problems += _source_problems(config, "finetune")
        problems += _fine_tuning_problems(config)
    if problems:
        raise ConfigError(problems)
