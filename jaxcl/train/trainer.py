"""The stages of the protocol (docs/METHOD.md §9), each `run(config, workdir, data) -> summary`.

A stage builds its model, state, batches and step from the config (pre-training stages through
the builder of their method's registry entry, `jaxcl.methods`), runs `loop.train_loop` in
`WORKDIR/<stage>/` and exports its final variables to `WORKDIR/<stage>/export/`, which later
stages load by parameter path (`transfer.transfer_params`). Which stage a later one loads from is
`config.<stage>.encoder_from` / `decoder_from`: None means "this workdir's stage, if it is part
of config.stages", "" means random initialisation, anything else is an export folder (so a sweep
can share one pre-training between many fine-tunings).

The workdir may be local or `gs://bucket/run`. With several processes (`distributed`) every
process runs every stage in step, process 0 alone writes metrics, DONE files, figures and
results, and the workdir must be one folder that all of them see (GCS, or a shared file system).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np
import optax

from jaxcl import config_validation, evaluate, figures, files, methods, model_card
from jaxcl.data import pipeline, streaming
from jaxcl.data.context import DataContext
from jaxcl.data.sources import DataError
from jaxcl.experiments import records
from jaxcl.methods import parts
from jaxcl.models.unet import UNet
from jaxcl.train import checkpoint, distributed, loop, recipes, steps, transfer
from jaxcl.train.parallel import DataParallel
from jaxcl.train.state import TrainState

PyTree = Any
DONE_FILE = "DONE.json"


def _keys(config: ml_collections.ConfigDict, stage: str) -> tuple[jax.Array, jax.Array]:
    """(init key, step key) of a stage, distinct per stage and derived from config.seed."""
    stage_key = jax.random.fold_in(jax.random.key(config.seed), sum(map(ord, stage)))
    init_key, step_key = jax.random.split(stage_key)
    return init_key, step_key


def _source_export(config, workdir: str, option: str | None, stage: str) -> str | None:
    """Export folder a later stage loads from, or None for random initialisation."""
    if option is None:
        return str(files.path(workdir) / stage / "export") if stage in config.stages else None
    return option or None


def _load_into(state: TrainState, export: str | None, paths, stage: str) -> TrainState:
    """`state` with the sub-networks under `paths` loaded from an export (None: kept random)."""
    names = ", ".join("/".join(path) for path in paths)
    if export is None:
        logging.info("%s: no transfer, %s randomly initialised.", stage, names)
        return state
    source = checkpoint.load_variables(export)
    variables, transferred = transfer.transfer_params(
        {"params": state.params, "batch_stats": state.batch_stats}, source, paths
    )
    logging.info(
        "%s: loaded %s (%d arrays) from %s.",
        stage,
        names,
        len(transferred),
        export,
    )
    return TrainState.create(
        params=variables["params"], batch_stats=variables["batch_stats"], tx=state.tx
    )


def _pretraining_batches(config, data: DataContext, stage: str, parallel: DataParallel):
    """(recipe, step-indexed batches) of a pre-training stage over the unlabelled pool: held in
    memory, or read from a slice store on disk when it is larger than
    config.data.pretrain_memory_gb (the same batches either way, docs/DATA.md)."""
    pool_ids = data.splits.get("pretrain")
    recipe = methods.batch_recipe(config[stage], stage, len(pool_ids))
    paper = methods.batch_recipe(config[stage], stage)
    if recipe != paper:
        logging.info(
            "%s: %d volumes per batch instead of the paper's %d: the pre-training pool holds %d.",
            stage,
            recipe.num_units,
            paper.num_units,
            len(pool_ids),
        )
    make_batches = functools.partial(
        recipes.make_batches,
        recipe=recipe,
        seed=config.seed,
        local_device_count=parallel.num_local_devices,
    )
    pool = _slices(config, data, pool_ids, stage)
    if isinstance(pool, pipeline.SlicePool):
        return recipe, make_batches(pool)
    return recipe, streaming.StreamedBatches(
        make_batches(pool), parallelism=config.data.stream_parallelism
    )


def _slices(config, data: DataContext, ids: list[str], stage: str) -> pipeline.SliceIndex:
    """The slices of volumes `ids` for `stage`: a `pipeline.SlicePool` in memory, or a slice
    store read from disk when they are larger than config.data.pretrain_memory_gb (the same
    batches either way, docs/DATA.md)."""
    gigabytes = data.pool_gigabytes(ids)
    if gigabytes <= config.data.pretrain_memory_gb:
        return pipeline.build_slice_pool(data.volumes(ids), num_partitions=config.data.n_partitions)
    logging.info(
        "%s: the pool of %d volumes (about %.3g GB) is larger than "
        "config.data.pretrain_memory_gb=%g: its slices are read from a slice store.",
        stage,
        len(ids),
        gigabytes,
        config.data.pretrain_memory_gb,
    )
    return data.slice_store(ids, num_partitions=config.data.n_partitions)


def _train(
    config,
    workdir: str,
    stage: str,
    *,
    parallel: DataParallel,
    state,
    step,
    batches,
    images_per_step: int,
    step_key: jax.Array | None = None,
    total_steps: int | None = None,
    validate=None,
    **settings,
) -> loop.LoopResult:
    """Runs `loop.train_loop` for a stage with the config's step count and cadence.

    stage: the stage, or "<stage>/<part>" for a part of it trained in WORKDIR/<stage>/<part>/
    (a round of self-training); step_key: default the stage's; total_steps: default
    `config.<stage>.steps`.
    """
    section = stage.split("/")[0]
    if step_key is None:
        _, step_key = _keys(config, section)
    return loop.train_loop(
        loop.LoopSettings(
            stage=stage,
            stage_dir=str(files.path(workdir) / stage),
            total_steps=config[section].steps if total_steps is None else total_steps,
            images_per_step=images_per_step,
            log_every=config.log_every,
            checkpoint_every=config.checkpoint_every,
            **settings,
        ),
        parallel=parallel,
        initial_state=state,
        step_fn=parallel.map_step(step),
        batches=lambda start: batches.iterate(start_step=start),
        rng=step_key,
        validate=validate,
    )


def _export(workdir: str, stage: str, state: TrainState, method: str | None = None) -> None:
    """Writes a stage's final variables (and the pre-training method that trained them)."""
    export_dir = files.path(workdir) / stage / "export"
    checkpoint.export_variables(
        export_dir, {"params": state.params, "batch_stats": state.batch_stats}
    )
    if method is not None and distributed.is_main_process():
        methods.write_export_record(export_dir, method)
    distributed.barrier(f"{stage}: exported")  # later stages read it on every process


def _decoder_paths(config, export: str | None) -> list[tuple[str, ...]]:
    """The decoder paths fine-tuning loads from `export`, as its method's entry says.

    Without an export (random decoder), and for exports written before jaxcl recorded their
    method (all local pre-trainings), the paths of a local pre-training: decoder blocks 1..l.
    """
    method = (methods.exported_method(export) if export else None) or methods.METHODS["LR"]
    if method.decoder_paths is None:
        raise DataError(
            f"config.finetune.decoder_from={export!r} was pre-trained with {method.name}, which "
            "trains no decoder; use a local pre-training's or a restoration task's export."
        )
    return list(method.decoder_paths(config))


# ----------------------------------------------------------------------------------------------
# Stages.


def _pretrain(config, workdir: str, data: DataContext, stage: str) -> dict[str, Any]:
    """A pre-training stage: the method of `config[stage].strategy`, built, then run.

    Stage 1 (pretrain_global) trains the encoder (+ g1 or the BYOL networks); stage 2
    (pretrain_local) the first decoder blocks (+ g2) on top of stage 1's frozen encoder.
    """
    section = config[stage]
    parallel = DataParallel(config.parallel.mode)
    recipe, batches = _pretraining_batches(config, data, stage, parallel)
    init_key, _ = _keys(config, stage)
    parts = methods.build(
        config, stage, recipe=recipe, num_devices=parallel.num_devices, key=init_key
    )
    summary = {"strategy": section.strategy}
    state = parts.state
    if parts.loads:
        export = _source_export(config, workdir, section.get("encoder_from"), "pretrain_global")
        state = _load_into(state, export, list(parts.loads), stage)
        summary["encoder_from"] = export or "random"
    result = _train(
        config,
        workdir,
        stage,
        parallel=parallel,
        state=state,
        step=parts.step,
        batches=batches,
        images_per_step=recipe.images_per_step(config.data.n_partitions),
    )
    _export(workdir, stage, parts.export(result.state), method=section.strategy)
    return {**summary, **result.metrics}


@dataclasses.dataclass
class _Validator:
    """Mean foreground Dice on the validation volumes (preprocessed grid, BN inference)."""

    predict: Callable
    volumes: list
    num_classes: int
    chunk_size: int

    def __call__(self, host_state: TrainState) -> dict[str, float]:
        variables = {"params": host_state.params, "batch_stats": host_state.batch_stats}
        apply_fn = functools.partial(self.predict, jax.device_put(variables))
        scores = []
        for volume in self.volumes:
            probabilities = evaluate.predict_volume(
                lambda x: np.asarray(apply_fn(x)), volume, chunk_size=self.chunk_size
            )
            prediction = np.argmax(probabilities, axis=-1)
            scores.append(evaluate.dice_per_class(prediction, volume.label, self.num_classes))
        return {"val_dice": float(np.mean(scores))}


def _unet(config, data: DataContext) -> UNet:
    return UNet(num_classes=data.layout.num_classes, **parts.model_options(config))


def _unlabelled_pool(config, data: DataContext, exclude: list[str]) -> pipeline.SliceIndex:
    """The slices of the pre-training pool without `exclude` (labelled and validation volumes):
    the unlabelled images of a semi-supervised fine-tuning. In memory (a `pipeline.SlicePool`),
    or a slice store on disk when they are larger than config.data.pretrain_memory_gb, as the
    pre-training pool (docs/DATA.md)."""
    ids = [i for i in data.splits.get("pretrain") if i not in set(exclude)]
    if not ids:
        raise DataError(
            f"config.finetune.method={config.finetune.method!r} needs unlabelled volumes, but "
            "every pre-training volume is a labelled or validation one; add unlabelled images "
            "(a folder's imagesTs/ or config.data.unlabelled_roots)."
        )
    return _slices(config, data, ids, "finetune")


def finetune(config, workdir: str, data: DataContext) -> dict[str, Any]:
    """Stage 3: the UNet on the labelled subset, best validation Dice kept (docs/METHOD.md §9).

    `config.finetune.method` picks the fine-tuning (`methods.FINE_TUNINGS`): its builder gives
    each round's state, step, batches and number of steps. Round 0 trains in WORKDIR/finetune/,
    round r > 0 (self-training, task-driven augmentation) in WORKDIR/finetune/round<r>/ from the
    best state of round r - 1; the best state of the last round is exported. A round's figures
    (`FineTuneParts.figures`) go to WORKDIR/finetune/figures/.
    """
    stage, cfg = "finetune", config.finetune
    fine_tuning = methods.fine_tuning(cfg.method)
    parallel = DataParallel(config.parallel.mode)
    labelled_set, combination = config.data.labelled_set, config.data.combination
    labelled = data.splits.get(labelled_set, combination)
    validation = data.splits.get("val", f"{labelled_set}-{combination}")
    pool = pipeline.build_slice_pool(
        data.volumes(labelled, require_labels=True),
        num_partitions=config.data.n_partitions,
        require_labels=True,
    )
    model = _unet(config, data)
    init_key, step_key = _keys(config, stage)
    state = steps.create_train_state(
        model, init_key, parts.example_input(config), optax.adam(cfg.learning_rate)
    )
    encoder_from = _source_export(config, workdir, cfg.get("encoder_from"), "pretrain_global")
    decoder_from = _source_export(config, workdir, cfg.get("decoder_from"), "pretrain_local")
    state = _load_into(state, encoder_from, [("encoder",)], stage)
    state = _load_into(state, decoder_from, _decoder_paths(config, decoder_from), stage)
    predict = jax.jit(lambda variables, x: model.apply(variables, x, train=False))
    validator = _Validator(
        predict,
        data.volumes(validation, require_labels=True),
        data.layout.num_classes,
        config.data.eval_chunk_size,
    )
    unlabelled = functools.cache(
        functools.partial(_unlabelled_pool, config, data, labelled + validation)
    )
    num_rounds = fine_tuning.rounds(config)
    initial, kept = state, []
    for round_index in range(num_rounds):
        built = fine_tuning.build(
            parts.FineTuneInputs(
                config=config,
                model=model,
                num_classes=data.layout.num_classes,
                state=state,
                key=jax.random.fold_in(init_key, 1),
                labelled=pool,
                unlabelled=unlabelled,
                local_device_count=parallel.num_local_devices,
                round_index=round_index,
                initial=initial,
                earlier=tuple(kept),
            )
        )
        name = stage if round_index == 0 else f"{stage}/round{round_index}"
        if num_rounds > 1:
            logging.info("%s: %s round %d of %d.", stage, cfg.method, round_index + 1, num_rounds)
        result = _train(
            config,
            workdir,
            name,
            parallel=parallel,
            state=built.state,
            step=built.step,
            batches=built.batches,
            images_per_step=built.images_per_step,
            step_key=jax.random.fold_in(step_key, round_index) if round_index else step_key,
            total_steps=built.steps,
            validate=lambda host_state, built=built: validator(built.segmenter(host_state)),
            validate_every=cfg.val_every,
            select_best="val_dice",
        )
        kept.append(result.best_state or result.state)
        state = built.segmenter(kept[-1])
        if built.figures is not None and distributed.is_main_process():
            for file_name, figure in built.figures(kept[-1]).items():
                figures.save_figure(figure, files.path(workdir) / stage / "figures" / file_name)
    _export(workdir, stage, state)
    if distributed.is_main_process():
        model_card.write(files.path(workdir) / stage / "export", _card(config, data))
    return {
        "labelled": labelled,
        "validation": validation,
        "method": cfg.method,
        "encoder_from": encoder_from or "random",
        "decoder_from": decoder_from or "random",
        **result.metrics,
    }


def _card(config, data: DataContext) -> model_card.ModelCard:
    """What `python -m jaxcl.predict` needs to use the fine-tuned model (`jaxcl.model_card`)."""
    return model_card.ModelCard(
        target_resolution=float(config.data.target_resolution),
        image_size=int(config.data.image_size),
        slice_axis=config.data.slice_axis,
        n4=bool(config.data.n4),
        channel=data.layout.channel,
        num_channels=data.layout.num_channels,
        class_names=tuple(data.layout.class_names),
        label_values=tuple(int(v) for v in data.layout.label_values),
        filters=tuple(int(f) for f in config.model.filters),
        dtype=config.model.dtype,
        dataset=data.dataset,
        labelled_set=f"{config.data.labelled_set}-{config.data.combination}",
        git_commit=records.git_commit(),
    )


def _evaluation_subjects(config, data: DataContext) -> list[str]:
    """The subject ids `config.evaluate.split` names."""
    split = config.evaluate.split
    if split == "labelled":
        return [s.subject_id for s in data.subjects() if s.label_path is not None]
    if split == "val":
        return data.splits.get("val", f"{config.data.labelled_set}-{config.data.combination}")
    if split == "test":
        return data.splits.get("test")
    size, _, combination = split.partition("-")
    try:
        return data.splits.get(size, combination)
    except ValueError as error:
        raise DataError(
            f"config.evaluate.split={split!r}: {error} Use test, val, labelled or a labelled set "
            f"({', '.join(data.splits.labelled_sets())})."
        ) from None


def run_evaluation(config, workdir: str, data: DataContext) -> dict[str, Any]:
    """Stage 4: Dice on the native grid, predictions, figures, results tables (docs/TRAINING.md).

    Scores `config.evaluate.model_from` (default: this workdir's fine-tuned model) on the
    subjects of `config.evaluate.split` of `config.data`'s dataset, preprocessed as the model's
    card says, so a model trained on one dataset can be tested on another with the same classes.
    """
    stage = "evaluate"
    source = config.evaluate.get("model_from") or files.path(workdir)
    export = model_card.find_export(source)
    card = model_card.read(export)
    if card.num_classes != data.layout.num_classes:
        raise DataError(
            f"the model {export} segments {card.num_classes} classes {list(card.class_names)} but "
            f"{data.dataset} labels {data.layout.num_classes} {list(data.layout.class_names)}; "
            "evaluate it on a dataset with the same classes."
        )
    if tuple(card.class_names) != tuple(data.layout.class_names):
        logging.warning(
            "evaluate: the model's classes %s are scored against %s by index.",
            list(card.class_names),
            list(data.layout.class_names),
        )
    model = UNet(
        num_classes=card.num_classes,
        filters=card.filters,
        dtype=parts.DTYPES[card.dtype],
        axis_name=None,
    )
    variables = checkpoint.load_variables(export)
    subject_ids = _evaluation_subjects(config, data)
    volumes = data.volumes(subject_ids, require_labels=True, settings=card.preprocessing())
    out_dir = files.path(workdir) / stage
    # Every process predicts the volumes on its first local device (no collectives, the same
    # numbers everywhere, so all return the same summary); process 0 writes the files.
    results = evaluate.evaluate(
        evaluate.inference_apply_fn(model, variables),
        volumes,
        data.subjects(),
        data.layout,
        out_dir,
        chunk_size=config.data.eval_chunk_size,
        metadata={
            "dataset": data.dataset,
            "split": config.evaluate.split,
            "model": str(export),
            "trained_on": f"{card.dataset} {card.labelled_set}",
        },
    )
    curves = {
        name: str(path)
        for name in config.stages
        if (path := files.path(workdir) / name / "metrics" / "metrics.jsonl").exists()
    }
    if curves and distributed.is_main_process():
        figures.plot_loss_curves(curves, out_dir / "figures" / "loss_curves.png")
    logging.info("Dice:\n%s", evaluate.results_markdown(results))
    return {"mean_dice": results["mean"], "std_dice": results["std"]}


STAGES: dict[str, Callable[[ml_collections.ConfigDict, str, DataContext], dict]] = {
    "pretrain_global": functools.partial(_pretrain, stage="pretrain_global"),
    "pretrain_local": functools.partial(_pretrain, stage="pretrain_local"),
    "finetune": finetune,
    "evaluate": run_evaluation,
}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, dict]:
    """Runs `config.stages` in order, skipping stages whose DONE file exists; returns summaries.

    The data settings the config leaves to the data (a folder's splits, resolution and crop size)
    are resolved first (`DataContext`), logged, and the splits written to WORKDIR/splits.json.

    Raises:
      config_validation.ConfigError: listing every impossible config value, before any work.
      DataError: bad data or data settings, naming the file or key and the fix.
    """
    data = DataContext(config)
    config = data.config
    # --config.stages=finetune,evaluate arrives as the one item "finetune,evaluate".
    config.stages = tuple(name.strip() for item in config.stages for name in item.split(","))
    config_validation.validate(
        config,
        splits=data.splits,
        num_devices=jax.device_count(),
        num_processes=jax.process_count(),
        stage_order=tuple(STAGES),
    )
    data.write_splits(workdir)
    summaries = {}
    for name in config.stages:
        done_file = files.path(workdir) / name / DONE_FILE
        # Process 0's answer counts everywhere: every process must run the same stages.
        if distributed.agree(done_file.exists()):
            logging.info("%s: already finished (%s), skipped.", name, done_file)
            summaries[name] = json.loads(done_file.read_text(encoding="utf-8"))
            continue
        logging.info("%s: starting.", name)
        summaries[name] = STAGES[name](config, workdir, data)
        if distributed.is_main_process():
            files.write_atomically(done_file, json.dumps(summaries[name], indent=2, default=str))
        distributed.barrier(f"{name}: done")
    return summaries
