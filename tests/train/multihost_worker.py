"""One process of the two-process runs in test_multihost.py; also imported there for the reference.

  python tests/train/multihost_worker.py PROCESS_ID COORDINATOR_ADDRESS OUT_DIR

joins a run of two processes through `jaxcl.train.distributed.initialize` (each process started
with 4 fake CPU devices) and writes OUT_DIR/process<PROCESS_ID>.npz with what it saw:

1. a few G^D pre-training and fine-tuning steps on its own part of the global batches (`pmap`):
   the losses and final parameters; `run_stage` is also the test's single-process reference;
2. the fine-tuned state saved with `StageCheckpointer` into OUT_DIR and restored;
3. `loop.train_loop` running G^D steps while process 1 gets SIGTERM: the step at which this
   process stopped (`PreemptedError`) and the checkpoint steps it then found.
"""

from __future__ import annotations

import functools
import os
import pathlib
import re
import signal
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

from configs import base
from jaxcl.augment import AugmentConfig
from jaxcl.data import pipeline
from jaxcl.models import GlobalContrastiveModel, UNet
from jaxcl.train import distributed, loop, steps
from jaxcl.train.checkpoint import StageCheckpointer
from jaxcl.train.parallel import AXIS_NAME, DataParallel

SIZE = 32
FILTERS = (4, 4, 8, 8, 8, 8)
NUM_PARTITIONS = 2
NUM_CLASSES = 3
NUM_STEPS = 3
STAGES = ("GD", "finetune")
# Steps `train_loop` may run before the preemption sync point; SIGTERM comes before step 2.
MAX_PREEMPTED_STEPS = 200
# Plain SGD with a small rate keeps three steps in the linear regime, where the updates compare
# well; with 0.01-0.05, G^D's float32 rounding differences grew to 10-20% of its update.
LEARNING_RATE = 1e-4
# Fine-tuning geometry limited to flips, which move pixels exactly (no interpolation ties).
FINETUNE_AUGMENT = AugmentConfig(geometry_weights=(0.0, 0.0, 1.0, 0.0, 1.0), elastic_sigma=0.0)


class _Volume:
    """The fields of `preprocess.Volume` that the pipeline reads."""

    def __init__(self, subject_id: str, image: np.ndarray, label: np.ndarray):
        self.subject_id, self.image, self.label = subject_id, image, label


@functools.cache
def slice_pool() -> pipeline.SlicePool:
    """12 volumes of 2-5 smooth slices (blobs on noise, in [0.4, 1]); labels: intensity bands.

    Smooth, never flat images: in flat regions max-pool windows tie, and which pixel gets the
    gradient would hang on rounding differences between programs.
    """
    rng = np.random.default_rng(0)
    rows, cols = np.mgrid[:SIZE, :SIZE]
    volumes = []
    for subject in range(12):
        image = 0.1 * rng.normal(size=(int(rng.integers(NUM_PARTITIONS, 6)), SIZE, SIZE))
        for z in range(image.shape[0]):
            for _ in range(int(rng.integers(1, 4))):
                centre, radius = rng.uniform(6, SIZE - 6, size=2), rng.uniform(3, 8)
                image[z] += np.exp(-((rows - centre[0]) ** 2 + (cols - centre[1]) ** 2) / radius**2)
        low = image.min(axis=(1, 2), keepdims=True)
        high = image.max(axis=(1, 2), keepdims=True)
        image = (0.4 + 0.6 * (image - low) / (high - low)).astype(np.float32)
        label = np.digitize(image, [0.6, 0.8]).astype(np.uint8)
        volumes.append(_Volume(f"{subject:03d}", image, label))
    return pipeline.build_slice_pool(volumes, num_partitions=NUM_PARTITIONS)


@functools.cache
def _stage(stage: str):
    """(batch source factory, host initial state, per-device step) of "GD" or "finetune".

    Cached: the same step function object lets later `pmap`s reuse its compiled program."""
    rng, tx = jax.random.key(42), optax.sgd(LEARNING_RATE)
    example = jnp.zeros((1, SIZE, SIZE, 1), jnp.float32)
    if stage == "GD":
        model = GlobalContrastiveModel(FILTERS, 16, 8, axis_name=AXIS_NAME)
        step = functools.partial(
            steps.pretrain_global_step,
            model=model,
            strategy="GD",
            temperature=0.1,
            keep_original_view=True,
            augment_config=AugmentConfig(),
        )
        batches = functools.partial(pipeline.structured_batches, num_volumes=8, num_views=2)
    else:
        model = UNet(NUM_CLASSES, FILTERS, axis_name=AXIS_NAME)
        step = functools.partial(
            steps.finetune_step,
            model=model,
            num_classes=NUM_CLASSES,
            augment_config=FINETUNE_AUGMENT,
        )
        batches = functools.partial(pipeline.labelled_batches, batch_size=16)
    state = jax.device_get(steps.create_train_state(model, rng, example, tx))
    return batches, state, step


def initial_state(stage: str):
    """The host state a stage starts from."""
    return _stage(stage)[1]


def _batches(stage: str, parallel: DataParallel, process_index: int, process_count: int):
    return _stage(stage)[0](
        slice_pool(),
        seed=3,
        local_device_count=parallel.num_local_devices,
        process_index=process_index,
        process_count=process_count,
    )


def run_stage(stage: str, parallel: DataParallel, *, process_index: int, process_count: int):
    """`NUM_STEPS` mapped steps on this process's part of the global batches.

    Returns:
      (losses (NUM_STEPS,), final host state).
    """
    _, state, step = _stage(stage)
    batches = _batches(stage, parallel, process_index, process_count)
    mapped = parallel.map_step(step)
    device_state = parallel.put_state(state)
    losses = []
    for k in range(NUM_STEPS):
        rng = jax.random.fold_in(jax.random.key(7), k)
        device_state, metrics = mapped(device_state, parallel.put_batch(batches[k]), rng)
        losses.append(parallel.get_metrics(metrics)["loss"])
    return np.array(losses), parallel.get_state(device_state)


def flat_params(state) -> dict[str, np.ndarray]:
    """Parameters and BatchNorm statistics by path ("params/encoder/...": array)."""
    collections = {"params": state.params, "batch_stats": state.batch_stats}
    return {
        jax.tree_util.keystr(path): np.asarray(leaf)
        for path, leaf in jax.tree_util.tree_leaves_with_path(collections)
    }


def _preempted_loop(stage_dir: pathlib.Path) -> dict[str, np.ndarray]:
    """G^D through `train_loop`; process 1 sends itself SIGTERM while fetching batch 2."""
    _, state, step = _stage("GD")
    parallel = DataParallel("pmap")
    source = _batches("GD", parallel, jax.process_index(), jax.process_count())

    def batches(start_step: int):
        for index, batch in enumerate(source.iterate(start_step=start_step), start=start_step + 1):
            if index == 2 and jax.process_index() == 1:
                os.kill(os.getpid(), signal.SIGTERM)
            yield batch

    settings = loop.LoopSettings(
        stage="GD",
        stage_dir=str(stage_dir),
        total_steps=MAX_PREEMPTED_STEPS,
        images_per_step=32,
        log_every=MAX_PREEMPTED_STEPS,
        checkpoint_every=MAX_PREEMPTED_STEPS,
    )
    try:
        loop.train_loop(
            settings,
            parallel=parallel,
            initial_state=state,
            step_fn=parallel.map_step(step),
            batches=batches,
            rng=jax.random.key(0),
        )
        stopped_at = -1  # ran to the end: the preemption was missed
    except loop.PreemptedError as error:
        stopped_at = int(re.search(r"SIGTERM at step (\d+)", str(error)).group(1))
    distributed.barrier("preempted loop checked")  # both stopped before anyone reads the folder
    checkpoints = sorted(
        int(p.name) for p in (stage_dir / "checkpoints").iterdir() if p.name.isdigit()
    )
    return {
        "preempted/stopped_at": np.asarray(stopped_at),
        "preempted/checkpoints": np.asarray(checkpoints),
    }


def main(process_id: int, coordinator_address: str, out_dir: pathlib.Path) -> None:
    config = base.get_config()
    config.distributed.coordinator_address = coordinator_address
    config.distributed.num_processes = 2
    config.distributed.process_id = process_id
    distributed.initialize(config)
    assert (jax.process_count(), jax.device_count(), jax.local_device_count()) == (2, 8, 4)

    outputs = {}
    for stage in STAGES:
        losses, state = run_stage(
            stage,
            DataParallel("pmap"),
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )
        outputs[f"{stage}/losses"] = losses
        outputs.update({f"{stage}/{k}": v for k, v in flat_params(state).items()})

    # Both processes save the fine-tuned state and restore it from the shared folder.
    checkpointer = StageCheckpointer(out_dir / "checkpoints")
    checkpointer.save(NUM_STEPS, state, meta={"process_count": jax.process_count()})
    restored, meta = checkpointer.restore(initial_state("finetune"))
    checkpointer.close()
    outputs["restored_meta_process_count"] = np.asarray(meta["process_count"])
    outputs.update({f"restored/{k}": v for k, v in flat_params(restored).items()})

    outputs.update(_preempted_loop(out_dir / "preempted"))
    np.savez(out_dir / f"process{process_id}.npz", **outputs)


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2], pathlib.Path(sys.argv[3]))
