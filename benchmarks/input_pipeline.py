r"""Host input pipeline throughput (images/s) for every batch kind: numpy gather vs tf.data.

Prepares the synthetic dataset once with TFDS (reused from --data_dir on later runs), builds the
pre-training pool (pretrain split) and a fine-tuning pool (tr8-c1), and times each batch kind with
its paper batch shape at --image_size (default 192). Columns:

  numpy       capacity of `StepBatches.iterate(prefetch=0)`: planner + `np.take` gather on the
              consuming thread, nothing else to do (images/s, all views counted).
  tf.data     capacity of the same per-step plans fed through `tf.data.Dataset.from_generator`,
              gathered with `tf.gather` from the pool held as a tf constant, `prefetch(AUTOTUNE)`,
              `as_numpy_iterator()` (image field only, so a lower bound on its cost).
  thread@sim / inline@sim
              achieved images/s when the consumer behaves like a training loop on an accelerator:
              each batch is followed by a GIL-free wait of B / --simulated_device_rate seconds
              (the device step). `prefetch=2` gathers in a background thread during that wait;
              `prefetch=0` adds the gather to every step. Reaching the simulated rate means the
              host is not the bottleneck.

The target is >= 2,000 images/s per kind at 192^2 on a 2-core host; the numbers are lower bounds
on a machine shared with other work. A background thread cannot beat the inline gather when the
consumer does nothing else (both need the GIL, and the hand-over costs up to the interpreter's
5 ms switch interval), which is why capacity is measured inline.

Run (the first run prepares 60 synthetic subjects, a few minutes on 2 cores):

  python benchmarks/input_pipeline.py --data_dir=/tmp/jaxcl_tfds
  python benchmarks/input_pipeline.py --data_dir=/tmp/jaxcl_tfds --seconds=1 --notf_data
"""

import itertools
import tempfile
import time
from collections.abc import Callable, Iterator

import numpy as np
from absl import app, flags

from jaxcl.data import pipeline, splits
from jaxcl.data import tfds as volumes_tfds

_DATA_DIR = flags.DEFINE_string(
    "data_dir", None, "Where the synthetic dataset is prepared and reused (default: a temp dir)."
)
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 192, "In-plane size of the prepared slices.")
_NUM_SUBJECTS = flags.DEFINE_integer("num_subjects", 60, "Synthetic subjects (60 = paper splits).")
_SECONDS = flags.DEFINE_float("seconds", 2.0, "Timed seconds per batch kind and method.")
_TF_DATA = flags.DEFINE_bool("tf_data", True, "Also time the tf.data variant.")
_SIMULATED_DEVICE_RATE = flags.DEFINE_float(
    "simulated_device_rate", 10_000.0, "Images/s of the simulated device step (thread@sim)."
)
_NUM_PARTITIONS = 4


def _batch_kinds(pretrain: pipeline.SlicePool, labelled: pipeline.SlicePool):
    """Name -> StepBatches with the paper's batch shapes (docs/METHOD.md §7)."""
    seed = 0
    return {
        "random G^R 24x2": pipeline.random_slice_batches(
            pretrain, num_slices=24, num_views=2, seed=seed
        ),
        "random L^R 10x2": pipeline.random_slice_batches(
            pretrain, num_slices=10, num_views=2, seed=seed
        ),
        "structured G^D- 3x4x3": pipeline.structured_batches(
            pretrain, num_volumes=3, num_views=3, seed=seed
        ),
        "structured G^D 6x4x2": pipeline.structured_batches(
            pretrain, num_volumes=6, num_views=2, seed=seed
        ),
        "structured L^D 3x4x2": pipeline.structured_batches(
            pretrain, num_volumes=3, num_views=2, seed=seed
        ),
        "paired BYOL-D 3x4x2": pipeline.paired_volume_batches(pretrain, num_pairs=3, seed=seed),
        "labelled 20": pipeline.labelled_batches(labelled, batch_size=20, seed=seed),
    }


def _tf_data_images(batches: pipeline.StepBatches) -> Iterator[dict[str, np.ndarray]]:
    import tensorflow as tf

    images = tf.constant(batches.pool.images)
    plans = tf.data.Dataset.from_generator(
        lambda: (batches.plan(step).reshape(-1) for step in itertools.count()),
        output_signature=tf.TensorSpec([None], tf.int64),
    )
    gathered = plans.map(
        lambda rows: {"image": tf.expand_dims(tf.gather(images, rows), -1)},
        num_parallel_calls=tf.data.AUTOTUNE,
    )
    return gathered.prefetch(tf.data.AUTOTUNE).as_numpy_iterator()


def _images_per_second(
    make_iterator: Callable[[], Iterator[dict]], seconds: float, device_rate: float | None = None
) -> float:
    """Images/s drawn from the iterator; with ``device_rate``, each batch is followed by a
    GIL-free wait of (batch images / device_rate) s, like a blocking accelerator step."""
    iterator = make_iterator()
    for _ in range(3):  # warm-up: thread start, tf.data graph construction
        next(iterator)
    images, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        batch_images = next(iterator)["image"].shape[0]
        images += batch_images
        if device_rate:
            time.sleep(batch_images / device_rate)
    return images / (time.perf_counter() - start)


def _evaluation_images_per_second(volumes, seconds: float) -> float:
    images, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _, batch in pipeline.volume_batches(volumes, chunk_size=32):
            images += batch["image"].shape[0] * batch["image"].shape[1]
    return images / (time.perf_counter() - start)


def main(argv) -> None:
    del argv
    data_dir = _DATA_DIR.value or tempfile.mkdtemp(prefix="jaxcl_tfds_")
    start = time.perf_counter()
    volumes = volumes_tfds.load_volumes(
        "synthetic",
        root=None,
        data_dir=data_dir,
        image_size=_IMAGE_SIZE.value,
        slice_axis="axial",
        num_subjects=_NUM_SUBJECTS.value,
    )
    print(f"loaded {len(volumes)} volumes from {data_dir} in {time.perf_counter() - start:.1f} s")
    by_id = {v.subject_id: v for v in volumes}
    pretrain = pipeline.build_slice_pool(
        volumes,
        subject_ids=[i for i in splits.get_split("synthetic", "pretrain") if i in by_id],
        num_partitions=_NUM_PARTITIONS,
    )
    labelled = pipeline.build_slice_pool(
        volumes,
        subject_ids=[i for i in splits.get_split("synthetic", "tr8", "c1") if i in by_id],
        num_partitions=_NUM_PARTITIONS,
        require_labels=True,
    )
    print(f"pools: pretrain {pretrain.images.shape}, labelled {labelled.images.shape}")

    rate, seconds = _SIMULATED_DEVICE_RATE.value, _SECONDS.value
    methods = {
        "numpy": lambda b: _images_per_second(lambda: b.iterate(prefetch=0), seconds),
        "thread@sim": lambda b: _images_per_second(lambda: b.iterate(prefetch=2), seconds, rate),
        "inline@sim": lambda b: _images_per_second(lambda: b.iterate(prefetch=0), seconds, rate),
    }
    if _TF_DATA.value:  # last: tf.data's own threads may linger and slow what runs after them
        methods["tf.data"] = lambda b: _images_per_second(lambda: _tf_data_images(b), seconds)
    kinds = _batch_kinds(pretrain, labelled)
    results = {
        (method, name): run(b) for method, run in methods.items() for name, b in kinds.items()
    }
    test = [by_id[i] for i in splits.get_split("synthetic", "test") if i in by_id]
    evaluation = _evaluation_images_per_second(test, seconds)

    print(f"\nimages/s at {_IMAGE_SIZE.value}^2, simulated device {rate:.0f} images/s")
    print(f"{'batch kind':24s}" + "".join(f"{method:>12s}" for method in methods))
    for name in kinds:
        print(f"{name:24s}" + "".join(f"{results[m, name]:12.0f}" for m in methods))
    print(f"{'evaluation chunks of 32':24s}{evaluation:12.0f}")


if __name__ == "__main__":
    app.run(main)
