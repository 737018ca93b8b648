"""The stages of the protocol (SPEC §8), each `run(config, workdir, data) -> summary`.

A stage builds its model, state, batches and step from the config, runs `loop.train_loop` in
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
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from jaxcl import augment, config_validation, evaluate, figures, files
from jaxcl.data import pipeline, sources, splits
from jaxcl.data import tfds as volumes_tfds
from jaxcl.losses import local
from jaxcl.models import stages as stage_models
from jaxcl.models.unet import UNet
from jaxcl.train import checkpoint, distributed, loop, recipes, steps, transfer
from jaxcl.train.parallel import AXIS_NAME, DataParallel
from jaxcl.train.state import TrainState

PyTree = Any
DONE_FILE = "DONE.json"


class DataContext:
    """The dataset of a run: layout, NIfTI root and preprocessed volumes by subject id.

    `data_dir` (prepared TFDS data) may be `gs://`; the NIfTI root is a local folder.
    """

    def __init__(self, config: ml_collections.ConfigDict):
        data = config.data
        self.dataset = data.dataset
        self.data_dir = data.data_dir or os.path.expanduser("~/tensorflow_datasets")
        self.root = data.root or None
        if self.dataset == "synthetic" and not self.root:
            if "://" in self.data_dir:
                raise sources.DataError(
                    f"config.data.data_dir={self.data_dir!r} is remote, but the synthetic "
                    "dataset generates its NIfTI files under data_dir/jaxcl_synthetic, which "
                    "must be local: set config.data.root to a local folder for them."
                )
            self.root = volumes_tfds.synthetic_root(self.data_dir)
        frame = data.frame if self.dataset in ("acdc", "synthetic") else None
        self._options = {
            "target_resolution": data.target_resolution,
            "image_size": data.image_size,
            "frame": frame,
            "n4": data.n4,
        }
        self.layout = sources.get_layout(
            self.dataset, self.root, **({"frame": frame} if frame else {})
        )

    def volumes(self, subject_ids: list[str], *, require_labels: bool = False) -> list:
        load = functools.partial(
            volumes_tfds.load_volumes,
            self.dataset,
            root=self.root,
            data_dir=self.data_dir,
            subject_ids=subject_ids,
            require_labels=require_labels,
            **self._options,
        )
        # Process 0 prepares a dataset missing from a shared data_dir once; the others then read
        # it (or prepare their own copy in a data_dir on their local disk).
        return distributed.main_process_first(load, "jaxcl: volumes ready")

    def subjects(self) -> list[sources.Subject]:
        return self.layout.find_subjects(self.root)


def _model_options(config: ml_collections.ConfigDict) -> dict[str, Any]:
    dtypes = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
    if config.model.dtype not in dtypes:
        raise ValueError(f"config.model.dtype={config.model.dtype!r} is not one of {list(dtypes)}.")
    return {
        "filters": tuple(config.model.filters),
        "dtype": dtypes[config.model.dtype],
        "axis_name": AXIS_NAME if config.model.cross_replica_bn else None,
    }


def _augment_config(config: ml_collections.ConfigDict) -> augment.AugmentConfig:
    return augment.AugmentConfig(**config.augment.to_dict())


def _example_input(config: ml_collections.ConfigDict) -> jax.Array:
    size = config.data.image_size
    return jnp.zeros((1, size, size, 1), jnp.float32)


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
    """(recipe, step-indexed batches) of a pre-training stage over the unlabelled pool."""
    recipe = recipes.batch_recipe(config[stage], stage)
    volumes = data.volumes(splits.get_split(data.dataset, "pretrain"))
    pool = pipeline.build_slice_pool(volumes, num_partitions=config.data.n_partitions)
    batches = recipes.make_batches(
        pool, recipe, seed=config.seed, local_device_count=parallel.num_local_devices
    )
    return recipe, batches


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
    validate=None,
    **settings,
) -> loop.LoopResult:
    """Runs `loop.train_loop` for a stage with the config's step count and cadence."""
    _, step_key = _keys(config, stage)
    return loop.train_loop(
        loop.LoopSettings(
            stage=stage,
            stage_dir=str(files.path(workdir) / stage),
            total_steps=config[stage].steps,
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


def _export(workdir: str, stage: str, state: TrainState) -> None:
    checkpoint.export_variables(
        files.path(workdir) / stage / "export",
        {"params": state.params, "batch_stats": state.batch_stats},
    )
    distributed.barrier(f"{stage}: exported")  # later stages read it on every process


# ----------------------------------------------------------------------------------------------
# Stages.


def pretrain_global(config, workdir: str, data: DataContext) -> dict[str, Any]:
    """Stage 1: encoder + g1 (G^R / G^{D-} / G^D) or BYOL on the unlabelled pool."""
    stage, cfg = "pretrain_global", config.pretrain_global
    parallel = DataParallel(config.parallel.mode)
    recipe, batches = _pretraining_batches(config, data, stage, parallel)
    init_key, _ = _keys(config, stage)
    options = _model_options(config)
    sizes = {
        "hidden_features": config.model.global_hidden_features,
        "features": config.model.embedding_features,
    }
    tx = optax.adam(cfg.learning_rate)
    byol = cfg.strategy in recipes.BYOL_STRATEGIES
    if byol:
        online = stage_models.ByolNetwork(predict=True, **sizes, **options)
        target = stage_models.ByolNetwork(predict=False, **sizes, **options)
        state = steps.create_byol_state(online, target, init_key, _example_input(config), tx)
        step = functools.partial(
            steps.byol_step,
            online_model=online,
            target_model=target,
            total_steps=cfg.steps,
            tau_base=cfg.tau_base,
            augment_config=_augment_config(config),
        )
    else:
        model = stage_models.GlobalContrastiveModel(**sizes, **options)
        state = steps.create_train_state(model, init_key, _example_input(config), tx)
        step = functools.partial(
            steps.pretrain_global_step,
            model=model,
            strategy=cfg.strategy,
            temperature=cfg.temperature,
            augment_config=_augment_config(config),
        )
    result = _train(
        config,
        workdir,
        stage,
        parallel=parallel,
        state=state,
        step=step,
        batches=batches,
        images_per_step=recipe.images_per_step(config.data.n_partitions),
    )
    _export(workdir, stage, result.state.online if byol else result.state)
    return {"strategy": cfg.strategy, **result.metrics}


def pretrain_local(config, workdir: str, data: DataContext) -> dict[str, Any]:
    """Stage 2: decoder blocks 1..l + g2 with L^R / L^D, encoder loaded and frozen."""
    stage, cfg = "pretrain_local", config.pretrain_local
    parallel = DataParallel(config.parallel.mode)
    recipe, batches = _pretraining_batches(config, data, stage, parallel)
    blocks = config.model.num_decoder_blocks
    feature_size = config.data.image_size // 2 ** (5 - blocks)
    positions = local.region_positions(feature_size, kind=cfg.positions, grid_size=cfg.grid_size)
    model = stage_models.LocalContrastiveModel(
        positions=tuple(tuple(int(v) for v in p) for p in positions),
        num_decoder_blocks=blocks,
        features=config.model.embedding_features,
        freeze_encoder=True,
        **_model_options(config),
    )
    init_key, _ = _keys(config, stage)
    tx = steps.frozen_encoder_tx(optax.adam(cfg.learning_rate))
    state = steps.create_train_state(model, init_key, _example_input(config), tx)
    export = _source_export(config, workdir, cfg.get("encoder_from"), "pretrain_global")
    state = _load_into(state, export, [("encoder",)], stage)
    step = functools.partial(
        steps.pretrain_local_step,
        model=model,
        strategy=cfg.strategy,
        temperature=cfg.temperature,
        negatives=cfg.negatives,
        num_anchors=local.PAPER_NUM_ANCHORS if cfg.positions == "paper" else None,
        views_per_group=recipe.views_per_group(cfg.strategy, parallel.num_devices),
        augment_config=_augment_config(config),
    )
    result = _train(
        config,
        workdir,
        stage,
        parallel=parallel,
        state=state,
        step=step,
        batches=batches,
        images_per_step=recipe.images_per_step(config.data.n_partitions),
    )
    _export(workdir, stage, result.state)
    return {"strategy": cfg.strategy, "encoder_from": export or "random", **result.metrics}


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
    return UNet(num_classes=data.layout.num_classes, **_model_options(config))


def finetune(config, workdir: str, data: DataContext) -> dict[str, Any]:
    """Stage 3: the whole UNet on the labelled subset, best validation Dice kept (SPEC §8)."""
    stage, cfg = "finetune", config.finetune
    parallel = DataParallel(config.parallel.mode)
    labelled_set, combination = config.data.labelled_set, config.data.combination
    labelled = splits.get_split(data.dataset, labelled_set, combination)
    validation = splits.get_split(data.dataset, "val", f"{labelled_set}-{combination}")
    pool = pipeline.build_slice_pool(
        data.volumes(labelled, require_labels=True),
        num_partitions=config.data.n_partitions,
        require_labels=True,
    )
    batches = pipeline.labelled_batches(
        pool,
        batch_size=cfg.batch_size,
        seed=config.seed,
        local_device_count=parallel.num_local_devices,
    )
    model = _unet(config, data)
    init_key, _ = _keys(config, stage)
    state = steps.create_train_state(
        model, init_key, _example_input(config), optax.adam(cfg.learning_rate)
    )
    encoder_from = _source_export(config, workdir, cfg.get("encoder_from"), "pretrain_global")
    decoder_from = _source_export(config, workdir, cfg.get("decoder_from"), "pretrain_local")
    state = _load_into(state, encoder_from, [("encoder",)], stage)
    blocks = [("decoder", f"block{k}") for k in range(1, config.model.num_decoder_blocks + 1)]
    state = _load_into(state, decoder_from, blocks, stage)
    step = functools.partial(
        steps.finetune_step,
        model=model,
        num_classes=data.layout.num_classes,
        augment_config=_augment_config(config),
    )
    predict = jax.jit(lambda variables, x: model.apply(variables, x, train=False))
    validator = _Validator(
        predict,
        data.volumes(validation, require_labels=True),
        data.layout.num_classes,
        config.data.eval_chunk_size,
    )
    result = _train(
        config,
        workdir,
        stage,
        parallel=parallel,
        state=state,
        step=step,
        batches=batches,
        images_per_step=cfg.batch_size,
        validate=validator,
        validate_every=cfg.val_every,
        select_best="val_dice",
    )
    _export(workdir, stage, result.best_state or result.state)
    return {
        "labelled": labelled,
        "validation": validation,
        "encoder_from": encoder_from or "random",
        "decoder_from": decoder_from or "random",
        **result.metrics,
    }


def run_evaluation(config, workdir: str, data: DataContext) -> dict[str, Any]:
    """Stage 4: test Dice on the native grid, predictions, figures, results tables (SPEC §9)."""
    stage = "evaluate"
    model = _unet(config, data)
    variables = checkpoint.load_variables(files.path(workdir) / "finetune" / "export")
    test = data.volumes(splits.get_split(data.dataset, "test"), require_labels=True)
    out_dir = files.path(workdir) / stage
    # Every process predicts the test volumes on its first local device (no collectives, the
    # same numbers everywhere, so all return the same summary); process 0 writes the files.
    results = evaluate.evaluate(
        evaluate.inference_apply_fn(model, variables),
        test,
        data.subjects(),
        data.layout,
        out_dir,
        chunk_size=config.data.eval_chunk_size,
        metadata={
            "dataset": data.dataset,
            "labelled_set": config.data.labelled_set,
            "combination": config.data.combination,
            "workdir": str(files.path(workdir)),
        },
    )
    curves = {
        name: str(path)
        for name in config.stages
        if (path := files.path(workdir) / name / "metrics" / "metrics.jsonl").exists()
    }
    if curves and distributed.is_main_process():
        figures.plot_loss_curves(curves, out_dir / "figures" / "loss_curves.png")
    logging.info("Test Dice:\n%s", evaluate.results_markdown(results))
    return {"mean_dice": results["mean"], "std_dice": results["std"]}


STAGES: dict[str, Callable[[ml_collections.ConfigDict, str, DataContext], dict]] = {
    "pretrain_global": pretrain_global,
    "pretrain_local": pretrain_local,
    "finetune": finetune,
    "evaluate": run_evaluation,
}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, dict]:
    """Runs `config.stages` in order, skipping stages whose DONE file exists; returns summaries.

    Raises:
      config_validation.ConfigError: listing every impossible config value, before any work.
    """
    config_validation.validate(
        config, num_devices=jax.device_count(), num_processes=jax.process_count()
    )
    data = DataContext(config)
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
