r"""Pre-training input from a slice store: host RSS and images/s at 1x, 10x, 100x a base pool.

Writes synthetic pools straight into slice stores (`jaxcl.data.slice_store`; random float32
volumes, no NIfTI or TFDS): --base_volumes volumes of --slices slices of --image_size^2 pixels,
times each of --scales. Then, for each scale, a fresh process opens the store and times every
pre-training batch kind with its paper shape (docs/METHOD.md §7):

  threads=P    `streaming.StreamedBatches(parallelism=P)`: P threads read upcoming steps, the
               batches come out in step order (what pre-training uses above
               config.data.pretrain_memory_gb). Images/s with all views counted.
  tf.data=P    the same per-step reads as `tf.numpy_function` in a tf.data map with
               num_parallel_calls=P, deterministic, prefetched (--tf_data; 1x only).
  memory       the in-memory `SlicePool` of the same volumes, `StepBatches.iterate()` (one
               background thread) (--memory_scales).

and prints the process's resident memory (RSS) after opening the store and after all the runs,
and its peak. Stores are read through the page cache as any file is; --cold drops each store's
cached pages before every timing (posix_fadvise), so its first reads come from the disk. The
numbers are lower bounds on a machine shared with other work: the 1-minute load average is
printed.

Run from the repository root (about 3 GB of temporary files at 100x, removed at the end):

  PYTHONPATH=. python benchmarks/input_streaming.py
  PYTHONPATH=. python benchmarks/input_streaming.py --scales=1,10 --seconds=1 --notf_data
"""

import dataclasses
import functools
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator

import numpy as np
import psutil
from absl import app, flags

from jaxcl.data import pipeline, slice_store, streaming

_BASE_VOLUMES = flags.DEFINE_integer("base_volumes", 10, "Volumes of the 1x pool.")
_SLICES = flags.DEFINE_integer("slices", 20, "Slices per volume.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 192, "In-plane size S of the slices.")
_SCALES = flags.DEFINE_list("scales", ["1", "10", "100"], "Pool sizes, multiples of the base.")
_PARALLELISM = flags.DEFINE_list("parallelism", ["1", "2", "4", "8"], "Threads to time.")
_SECONDS = flags.DEFINE_float("seconds", 1.5, "Timed seconds per batch kind and setting.")
_TF_DATA = flags.DEFINE_bool("tf_data", True, "Also time tf.data at each parallelism (1x).")
_MEMORY_SCALES = flags.DEFINE_list("memory_scales", ["1", "10"], "Scales also timed in memory.")
_COLD = flags.DEFINE_bool("cold", False, "Drop the store's cached pages before each timing.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Where the stores go (default: a temp dir).")
_MEASURE = flags.DEFINE_string("measure", None, "Internal: time the store in this folder.")
_MEASURE_SCALE = flags.DEFINE_integer("measure_scale", 1, "Internal: the scale measured.")

NUM_PARTITIONS = 4
SEED = 0


@dataclasses.dataclass(frozen=True)
class _Volume:
    subject_id: str
    image: np.ndarray
    label: None = None


def _volume(index: int, slices: int, size: int) -> _Volume:
    """Synthetic volume ``index``: uniform noise from its own random stream."""
    rng = np.random.default_rng((SEED, index))
    return _Volume(f"{index:06d}", rng.random((slices, size, size), dtype=np.float32))


def _volumes(first: int, stop: int, step: int, slices: int, size: int) -> Iterator[_Volume]:
    return (_volume(index, slices, size) for index in range(first, stop, step))


def _batch_kinds(pool: pipeline.SliceIndex) -> dict[str, pipeline.StepBatches]:
    """Name -> StepBatches with the paper's batch shapes (docs/METHOD.md §7)."""
    random, structured = pipeline.random_slice_batches, pipeline.structured_batches
    return {
        "random G^R/BYOL 24x2": random(pool, num_slices=24, num_views=2, seed=SEED),
        "random L^R 10x2": random(pool, num_slices=10, num_views=2, seed=SEED),
        "random rotation 12x4": random(pool, num_slices=12, num_views=4, seed=SEED),
        "random restoration 20x1": random(pool, num_slices=20, num_views=1, seed=SEED),
        "structured G^D- 3x4x3": structured(pool, num_volumes=3, num_views=3, seed=SEED),
        "structured G^D 6x4x2": structured(pool, num_volumes=6, num_views=2, seed=SEED),
        "structured L^D 3x4x2": structured(pool, num_volumes=3, num_views=2, seed=SEED),
        "paired BYOL-D 3x4x2": pipeline.paired_volume_batches(pool, num_pairs=3, seed=SEED),
    }


def _tf_data(batches: pipeline.StepBatches, parallelism: int) -> Iterator[dict]:
    """The per-step reads of `batches` through a tf.data map (image field only)."""
    import tensorflow as tf

    def read(step):
        return batches[int(step)]["image"]

    steps = tf.data.Dataset.range(tf.int64.max).map(
        lambda step: tf.numpy_function(read, [step], tf.float32, stateful=False),
        num_parallel_calls=parallelism,
        deterministic=True,
    )
    for image in steps.prefetch(2).as_numpy_iterator():
        yield {"image": image}


def _drop_cached_pages(directory: str) -> None:
    for name in os.listdir(directory):
        descriptor = os.open(os.path.join(directory, name), os.O_RDONLY)
        try:
            os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(descriptor)


def _images_per_second(make_iterator: Callable[[], Iterator[dict]], seconds: float) -> float:
    iterator = make_iterator()
    try:
        for _ in range(3):  # warm-up: thread start, first reads
            next(iterator)
        images, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            images += next(iterator)["image"].shape[0]
        return images / (time.perf_counter() - start)
    finally:
        iterator.close()


def _rss_mb() -> float:
    return psutil.Process().memory_info().rss / 2**20


def _measure(directory: str, scale: int) -> dict:
    """Times every batch kind on the store in ``directory`` (run in a fresh process)."""
    seconds = _SECONDS.value
    store = slice_store.open_store(directory, NUM_PARTITIONS)
    result = {"slices": store.num_slices, "rss_open_mb": _rss_mb(), "rates": {}}

    def timed(label: str, name: str, make_iterator) -> None:
        if _COLD.value:
            _drop_cached_pages(directory)
        result["rates"].setdefault(name, {})[label] = _images_per_second(make_iterator, seconds)

    for name, batches in _batch_kinds(store).items():
        for parallelism in map(int, _PARALLELISM.value):
            streamed = streaming.StreamedBatches(batches, parallelism=parallelism)
            timed(f"threads={parallelism}", name, streamed.iterate)
    # Before tf.data and the in-memory pool, which add their own memory.
    result["rss_end_mb"] = _rss_mb()
    result["rss_peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if _TF_DATA.value and scale == 1:
        for name, batches in _batch_kinds(store).items():
            for parallelism in map(int, _PARALLELISM.value):
                tf_data = functools.partial(_tf_data, batches, parallelism)
                timed(f"tf.data={parallelism}", name, tf_data)
    if str(scale) in _MEMORY_SCALES.value:
        num_volumes = _BASE_VOLUMES.value * scale
        pool = pipeline.build_slice_pool(
            list(_volumes(0, num_volumes, 1, _SLICES.value, _IMAGE_SIZE.value)),
            num_partitions=NUM_PARTITIONS,
        )
        for name, batches in _batch_kinds(pool).items():
            timed("memory", name, batches.iterate)
        result["rss_memory_mb"] = _rss_mb()
    return result


def _build(directory: str, num_volumes: int) -> float:
    """Writes a store of ``num_volumes`` synthetic volumes; returns the seconds it took."""
    start, num_parts, size = time.perf_counter(), 4, _IMAGE_SIZE.value
    slice_store.build(
        directory,
        [
            functools.partial(_volumes, part, num_volumes, num_parts, _SLICES.value, size)
            for part in range(num_parts)
        ],
        [f"{index:06d}" for index in range(num_volumes)],
        image_size=size,
        num_workers=2,
    )
    return time.perf_counter() - start


def _format_table(result: dict) -> list[str]:
    """One pool's lines: sizes, RSS, then images/s per batch kind and setting."""
    memory = result.get("rss_memory_mb")
    header = (
        f"{result['slices']} slices, {result['gigabytes']:.2f} GB on disk, built in "
        f"{result['build_s']:.0f} s; RSS {result['rss_open_mb']:.0f} MB after opening, "
        f"{result['rss_end_mb']:.0f} MB after the runs, peak {result['rss_peak_mb']:.0f} MB"
        + (f"; {memory:.0f} MB with the pool in memory" if memory else "")
    )
    settings = list(next(iter(result["rates"].values())))
    lines = [header, f"{'images/s':26s}" + "".join(f"{label:>11s}" for label in settings)]
    for name, rates in result["rates"].items():
        lines.append(f"{name:26s}" + "".join(f"{rates[label]:11.0f}" for label in settings))
    return lines


def main(argv) -> None:
    del argv
    if _MEASURE.value:
        print(json.dumps(_measure(_MEASURE.value, _MEASURE_SCALE.value)))
        return
    workdir = _WORKDIR.value or tempfile.mkdtemp(prefix="jaxcl_streaming_")
    flags_to_pass = [arg for arg in sys.argv[1:] if not arg.startswith("--workdir")]
    results = {}
    try:
        for scale in map(int, _SCALES.value):
            directory = os.path.join(workdir, f"{scale}x")
            num_volumes = _BASE_VOLUMES.value * scale
            build_s = _build(directory, num_volumes)
            child = subprocess.run(
                [sys.executable, __file__, f"--measure={directory}", f"--measure_scale={scale}"]
                + flags_to_pass,
                stdout=subprocess.PIPE,  # the child's JSON; its log goes to the console
                text=True,
                check=True,
            )
            result = json.loads(child.stdout.strip().splitlines()[-1])
            size = sum(os.path.getsize(os.path.join(directory, n)) for n in os.listdir(directory))
            results[scale] = {**result, "build_s": build_s, "gigabytes": size / 1e9}
            print(
                f"{scale}x done (load average {os.getloadavg()[0]:.1f}): RSS "
                f"{result['rss_end_mb']:.0f} MB",
                flush=True,
            )
            shutil.rmtree(directory)
    finally:
        if not _WORKDIR.value:
            shutil.rmtree(workdir, ignore_errors=True)
    print(
        f"\nimages/s at {_IMAGE_SIZE.value}^2, {_BASE_VOLUMES.value} x {_SLICES.value} slices per "
        f"1x, {'cold' if _COLD.value else 'page-cached'} reads, load average "
        f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
    )
    for scale, result in results.items():
        print(f"\n{scale}x pool: " + "\n".join(_format_table(result)))
    base = results[min(results)]["rss_end_mb"]
    for scale, result in results.items():
        print(f"RSS at {scale}x / RSS at {min(results)}x: {result['rss_end_mb'] / base:.2f}")


if __name__ == "__main__":
    app.run(main)
