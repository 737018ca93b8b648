"""Host-side input pipeline: deterministic numpy batches for pre-training, fine-tuning, evaluation.

The slices of the chosen volumes are numbered rows ``0..N-1`` described by a :class:`SliceIndex`
(per-slice volume and partition). A batch is *planned* as rows by a random generator derived
from ``(seed, step)`` only, then *gathered* with the source's ``take``: a :class:`SlicePool` holds
all slices in one contiguous ``(N, H, W)`` float32 array and gathers with ``np.take``; a
``slice_store.SliceStore`` reads the rows from disk, for pre-training pools larger than memory
(``streaming`` reads its steps in parallel). Nothing here augments: the views of a slice are
identical copies and the device step augments each one with its own key (docs/METHOD.md §8).

Why a numpy gather instead of tf.data: a batch is one gather from an in-memory array, which numpy
does at memory bandwidth; the same plans gathered through tf.data (``from_generator`` +
``tf.gather`` + ``prefetch``) were 1.5-3x slower on a 2-core host (benchmarks/input_pipeline.py
measures both; numpy 58k-158k images/s at 192^2 for every kind). ``iterate`` gathers in a
background thread so the gather overlaps the device step (the consumer releases the GIL while it
waits for the device). Determinism and resumption come for free: batch ``k`` is a pure function
of ``(seed, k)``, so a run resumed at step ``k`` sees exactly the batches of an uninterrupted run.

Batch layout (the step functions and the losses rely on it):

* A global batch is a list of *units*, each repeated as ``V`` views; the views of a unit are
  adjacent: example ``u * V + v`` is view ``v`` of unit ``u``, so ``image.reshape(U, V, H, W, 1)``
  recovers the views.
  - ``random`` (G^R, L^R, BYOL): a unit is one slice drawn without replacement from the pool; its
    views share ``sample_id`` and image.
  - ``structured`` (G^{D-}, G^D, L^D): ``m`` distinct volumes x ``S`` partitions, one random slice
    per partition; units ordered (volume, partition). View 0 is the one G^{D-}/G^D keep
    un-augmented (docs/METHOD.md §4).
  - ``paired`` (BYOL-D): ``P`` pairs of volumes (all ``2P`` distinct) x ``S`` partitions; a unit
    is (pair, partition) and its two views are *different* slices of partition ``p``: view 0 from
    the pair's first volume, view 1 from its second. So ``image.reshape(U, 2, ...)`` gives the
    BYOL view pairs directly; ``sample_id`` and ``volume_id`` differ between the two views.
  - ``labelled`` (fine-tuning): one unit per slice, drawn uniformly with replacement, ``V = 1``.
* Every pre-training batch has ``image (B, H, W, 1) float32``, ``sample_id`` (the pool index of the
  source slice, unique per slice across the global batch), ``partition_id``, ``volume_id`` (index
  into ``SlicePool.subject_ids``) and ``view_id`` (0..V-1), all ``(B,) int32``; labelled batches
  have the same fields plus ``label (B, H, W) int32``.
* Data parallelism: the global units are split into ``process_count * local_device_count`` equal,
  contiguous groups made of whole units (structured: whole volumes with all their partitions and
  views; paired: whole pairs); host ``h`` takes groups ``[h * D, (h + 1) * D)`` and gets arrays
  shaped ``(D, per_device, ...)`` (or flat ``(B_host, ...)`` when ``local_device_count`` is None).
  Every host plans the same global batch, so concatenating the hosts' parts along axis 0 gives the
  batch of a single process holding all devices.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import queue
import threading
from collections.abc import Callable, Iterator, Sequence

import jax
import numpy as np

from jaxcl.data import preprocess
from jaxcl.data.sources import DataError

Batch = dict[str, np.ndarray]
# The int32 (B,) fields of every batch besides "image" (and "label" for fine-tuning).
ID_FIELDS = ("sample_id", "partition_id", "volume_id", "view_id")
# A planner maps a step's random generator to (U, V) pool indices: U units of V views each.
Planner = Callable[[np.random.Generator], np.ndarray]


@dataclasses.dataclass(frozen=True)
class SliceIndex:
    """Which volume and partition each slice of a pool belongs to: what batches are planned on.

    A pool's slices are numbered 0..N-1 (its *rows*): each volume's slices are consecutive rows
    in slice order, volumes in ``subject_ids`` order. A source of images adds ``take``:
    :class:`SlicePool` holds every slice in memory, ``slice_store.SliceStore`` reads them from
    disk (docs/DATA.md); both give the same batches.

    Attributes:
      subject_ids: (num_volumes,) subject id of each volume (``volume_id`` indexes it).
      slice_volume: (N,) int32 volume index of each slice.
      slice_partition: (N,) int32 partition of each slice within its volume (docs/METHOD.md §2).
      num_partitions: S, the number of partitions per volume.
    """

    subject_ids: tuple[str, ...]
    slice_volume: np.ndarray
    slice_partition: np.ndarray
    num_partitions: int

    @property
    def num_slices(self) -> int:
        return self.slice_volume.shape[0]

    @property
    def num_volumes(self) -> int:
        return len(self.subject_ids)

    def partition_table(self) -> tuple[np.ndarray, np.ndarray]:
        """First row and slice count of every (volume, partition): two (num_volumes, S) arrays."""
        keys = self.slice_volume.astype(np.int64) * self.num_partitions + self.slice_partition
        size = self.num_volumes * self.num_partitions
        counts = np.bincount(keys, minlength=size).reshape(self.num_volumes, self.num_partitions)
        # Partitions are contiguous and increasing along the slice axis, so the first row of a
        # partition is the number of rows with a smaller key.
        starts = np.searchsorted(keys, np.arange(size)).reshape(counts.shape)
        return starts, counts

    def take(self, rows: np.ndarray) -> np.ndarray:
        """The images of pool rows ``rows`` (n,): (n, H, W) float32 (SlicePool, SliceStore)."""
        raise NotImplementedError(f"{type(self).__name__} holds no images; use a SlicePool.")

    def take_labels(self, rows: np.ndarray) -> np.ndarray:
        """The labels of pool rows ``rows`` (n,): (n, H, W) uint8, for a source with labels."""
        raise NotImplementedError(f"{type(self).__name__} holds no labels; use a SlicePool.")


def slice_index(
    subject_ids: Sequence[str], slice_counts: Sequence[int], num_partitions: int
) -> SliceIndex:
    """The index of volumes ``subject_ids`` with ``slice_counts`` slices each, in that order.

    Raises:
      DataError: a volume with fewer slices than ``num_partitions`` (every batch carries
        partition ids).
    """
    counts = np.asarray(slice_counts, dtype=np.int64)
    short = [sid for sid, count in zip(subject_ids, counts, strict=True) if count < num_partitions]
    if short:
        raise DataError(
            f"Volumes {short} have fewer slices than num_partitions={num_partitions}; remove them "
            "from the subject list or lower num_partitions."
        )
    return SliceIndex(
        subject_ids=tuple(subject_ids),
        slice_volume=np.repeat(np.arange(len(counts), dtype=np.int32), counts),
        slice_partition=np.concatenate(
            [preprocess.partition_ids(int(n), num_partitions) for n in counts]
        ).astype(np.int32),
        num_partitions=num_partitions,
    )


@dataclasses.dataclass(frozen=True)
class SlicePool(SliceIndex):
    """The slices of several preprocessed volumes in memory, concatenated for fast gathering.

    Attributes (besides the `SliceIndex` ones):
      images: (N, H, W) float32, C-contiguous, row ``r`` the image of pool row ``r``.
      labels: (N, H, W) uint8 class indices, or None when any volume is unlabelled.
    """

    images: np.ndarray
    labels: np.ndarray | None

    def take(self, rows: np.ndarray) -> np.ndarray:
        return np.take(self.images, rows, axis=0)

    def take_labels(self, rows: np.ndarray) -> np.ndarray:
        return np.take(self.labels, rows, axis=0)


def build_slice_pool(
    volumes: Sequence[preprocess.Volume],
    *,
    subject_ids: Sequence[str] | None = None,
    num_partitions: int = 4,
    require_labels: bool = False,
) -> SlicePool:
    """Concatenates the slices of ``volumes`` (or of those named in ``subject_ids``, in that order).

    Args:
      volumes: preprocessed volumes, all with the same in-plane shape (H, W).
      subject_ids: which volumes to use; None uses all of them in the given order.
      num_partitions: S, for the per-slice partition ids (docs/METHOD.md §2).
      require_labels: raise if a selected volume has no label (fine-tuning pools).

    Raises:
      DataError: unknown or duplicate subject ids, nothing selected, differing in-plane shapes,
        a volume with fewer slices than ``num_partitions`` (every batch carries partition ids),
        or a missing label when ``require_labels``.
    """
    by_id = {volume.subject_id: volume for volume in volumes}
    wanted = list(by_id) if subject_ids is None else list(subject_ids)
    missing = [sid for sid in wanted if sid not in by_id]
    if missing:
        raise DataError(
            f"Subjects {missing} are not among the loaded volumes ({sorted(by_id)}); check the "
            "split ids or the dataset root."
        )
    if not wanted or len(set(wanted)) != len(wanted):
        raise DataError(f"Need a non-empty list of distinct subject ids, got {wanted}.")
    chosen = [by_id[sid] for sid in wanted]
    shapes = {volume.image.shape[1:] for volume in chosen}
    if len(shapes) != 1:
        raise DataError(
            f"Volumes have different in-plane shapes {sorted(shapes)}; preprocess "
            "them with one image_size."
        )
    index = slice_index(wanted, [volume.image.shape[0] for volume in chosen], num_partitions)
    unlabelled = [volume.subject_id for volume in chosen if volume.label is None]
    if require_labels and unlabelled:
        raise DataError(f"Subjects {unlabelled} have no label but a labelled pool was requested.")

    labels = None if unlabelled else np.concatenate([v.label for v in chosen]).astype(np.uint8)
    return SlicePool(
        **vars(index),
        images=np.ascontiguousarray(np.concatenate([v.image for v in chosen]), dtype=np.float32),
        labels=labels,
    )


class StepBatches:
    """An infinite, deterministic sequence of batches indexed by training step.

    ``batches[k]`` depends only on the seed and ``k``; ``iterate(start_step=k)`` yields
    ``batches[k], batches[k + 1], ...`` from a background thread. Build with
    :func:`random_slice_batches`, :func:`structured_batches`, :func:`paired_volume_batches` or
    :func:`labelled_batches`.
    """

    def __init__(
        self,
        pool: SliceIndex,
        planner: Planner,
        *,
        seed: int,
        with_labels: bool,
        local_device_count: int | None,
        process_index: int,
        process_count: int,
        stream: int = 0,
    ):
        self.pool = pool
        self._planner = planner
        self._seed = seed
        self._stream = stream
        self._with_labels = with_labels
        self._local_device_count = local_device_count
        self.process_index = process_index
        self.process_count = process_count

    def plan(self, step: int) -> np.ndarray:
        """This host's pool indices for ``step``: (units_on_host, V) int64."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        entropy = (self._seed, step) if self._stream == 0 else (self._seed, step, self._stream)
        global_plan = self._planner(np.random.default_rng(entropy))
        per_host = global_plan.shape[0] // self.process_count
        return global_plan[self.process_index * per_host : (self.process_index + 1) * per_host]

    def gather(self, plan: np.ndarray) -> Batch:
        """Turns pool indices (U, V) into a batch dict (see the module docstring for fields)."""
        num_units, num_views = plan.shape
        rows = plan.reshape(-1)
        batch = {
            "image": self.pool.take(rows)[..., None],
            "sample_id": rows.astype(np.int32),
            "partition_id": self.pool.slice_partition[rows],
            "volume_id": self.pool.slice_volume[rows],
            "view_id": np.tile(np.arange(num_views, dtype=np.int32), num_units),
        }
        if self._with_labels:
            batch["label"] = self.pool.take_labels(rows).astype(np.int32)
        if self._local_device_count is None:
            return batch
        return {k: v.reshape(self._local_device_count, -1, *v.shape[1:]) for k, v in batch.items()}

    def __getitem__(self, step: int) -> Batch:
        return self.gather(self.plan(step))

    def iterate(self, start_step: int = 0, prefetch: int = 2) -> Iterator[Batch]:
        """Yields the batches of steps ``start_step, start_step + 1, ...`` forever.

        Args:
          start_step: first step (a resumed run passes its restored step).
          prefetch: batches prepared ahead in a background thread; 0 prepares them inline.
        """
        batches = (self[step] for step in itertools.count(start_step))
        return batches if prefetch == 0 else _in_background(batches, prefetch)


def _shard_layout(
    count: int,
    count_name: str,
    whole: str,
    local_device_count: int | None,
    process_index: int | None,
    process_count: int | None,
) -> dict[str, int | None]:
    """Resolves the host layout and checks that ``count`` whole units split over all devices."""
    process_count = jax.process_count() if process_count is None else process_count
    process_index = jax.process_index() if process_index is None else process_index
    if not 0 <= process_index < process_count:
        raise ValueError(
            f"process_index={process_index} not in [0, process_count={process_count})."
        )
    if local_device_count is not None and local_device_count <= 0:
        raise ValueError(f"local_device_count must be positive or None, got {local_device_count}.")
    groups = process_count * (local_device_count or 1)
    if count <= 0 or count % groups:
        raise ValueError(
            f"{count_name}={count} must be a positive multiple of process_count * "
            f"local_device_count = {groups} so that every device gets whole {whole}; change "
            f"{count_name} or the number of devices."
        )
    return {
        "local_device_count": local_device_count,
        "process_index": process_index,
        "process_count": process_count,
    }


def _plan_random(rng: np.random.Generator, *, pool_size: int, num_slices: int, num_views: int):
    rows = rng.choice(pool_size, size=num_slices, replace=False)
    return np.repeat(rows[:, None], num_views, axis=1)


def _plan_structured(rng: np.random.Generator, *, starts, counts, num_volumes: int, num_views: int):
    volumes = rng.choice(starts.shape[0], size=num_volumes, replace=False)
    rows = starts[volumes] + rng.integers(0, counts[volumes])  # (m, S): one slice per partition
    return np.repeat(rows.reshape(-1, 1), num_views, axis=1)


def _plan_paired(rng: np.random.Generator, *, starts, counts, num_pairs: int):
    volumes = rng.choice(starts.shape[0], size=2 * num_pairs, replace=False)
    rows = starts[volumes] + rng.integers(0, counts[volumes])  # (2P, S)
    # (pair, member, partition) -> (pair, partition, member): the two members become the views.
    return rows.reshape(num_pairs, 2, -1).transpose(0, 2, 1).reshape(-1, 2)


def _plan_labelled(rng: np.random.Generator, *, pool_size: int, batch_size: int):
    return rng.integers(0, pool_size, size=(batch_size, 1))


def random_slice_batches(
    pool: SliceIndex,
    *,
    num_slices: int,
    num_views: int,
    seed: int,
    local_device_count: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    stream: int = 0,
) -> StepBatches:
    """G^R / L^R / BYOL batches: ``num_slices`` distinct random slices x ``num_views`` views.

    ``stream`` > 0 draws an independent sequence from the same seed (a second source of a run).
    """
    if not 0 < num_slices <= pool.num_slices:
        raise ValueError(f"num_slices={num_slices} must be in [1, {pool.num_slices}] (pool size).")
    layout = _shard_layout(
        num_slices, "num_slices", "slices", local_device_count, process_index, process_count
    )
    planner = functools.partial(
        _plan_random, pool_size=pool.num_slices, num_slices=num_slices, num_views=num_views
    )
    return StepBatches(pool, planner, seed=seed, with_labels=False, stream=stream, **layout)


def structured_batches(
    pool: SliceIndex,
    *,
    num_volumes: int,
    num_views: int,
    seed: int,
    local_device_count: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
) -> StepBatches:
    """G^{D-} / G^D / L^D batches: ``num_volumes`` distinct volumes x S partitions x views."""
    starts, counts = pool.partition_table()
    if not 0 < num_volumes <= pool.num_volumes:
        raise ValueError(
            f"num_volumes={num_volumes} must be in [1, {pool.num_volumes}] (volumes in the pool)."
        )
    layout = _shard_layout(
        num_volumes, "num_volumes", "volumes", local_device_count, process_index, process_count
    )
    planner = functools.partial(
        _plan_structured, starts=starts, counts=counts, num_volumes=num_volumes, num_views=num_views
    )
    return StepBatches(pool, planner, seed=seed, with_labels=False, **layout)


def paired_volume_batches(
    pool: SliceIndex,
    *,
    num_pairs: int,
    seed: int,
    local_device_count: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
) -> StepBatches:
    """BYOL-D batches: ``num_pairs`` pairs of distinct volumes x S partitions, 2 views per unit."""
    starts, counts = pool.partition_table()
    if not 0 < 2 * num_pairs <= pool.num_volumes:
        raise ValueError(
            f"num_pairs={num_pairs} needs 2 * num_pairs distinct volumes but the pool has "
            f"{pool.num_volumes}."
        )
    layout = _shard_layout(
        num_pairs, "num_pairs", "volume pairs", local_device_count, process_index, process_count
    )
    planner = functools.partial(_plan_paired, starts=starts, counts=counts, num_pairs=num_pairs)
    return StepBatches(pool, planner, seed=seed, with_labels=False, **layout)


def labelled_batches(
    pool: SliceIndex,
    *,
    batch_size: int,
    seed: int,
    local_device_count: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    stream: int = 0,
) -> StepBatches:
    """Fine-tuning batches: ``batch_size`` slices drawn uniformly with replacement, with labels
    (``pool`` a `SlicePool` with labels, or a slice store with pseudo-labels).

    ``stream`` > 0 draws an independent sequence from the same seed (a second source of a run).
    """
    if pool.labels is None:
        raise DataError(
            "labelled_batches needs a pool with labels: build_slice_pool(..., require_labels=True)."
        )
    layout = _shard_layout(
        batch_size, "batch_size", "slices", local_device_count, process_index, process_count
    )
    planner = functools.partial(_plan_labelled, pool_size=pool.num_slices, batch_size=batch_size)
    return StepBatches(pool, planner, seed=seed, with_labels=True, stream=stream, **layout)


class MergedBatches:
    """Step ``k`` of several sources merged into one batch: ``merge([s[k] for s in sources])``.

    A semi-supervised fine-tuning reads its labelled and unlabelled slices this way; every
    source is deterministic in (seed, k), so the merged batches resume exactly as well.
    """

    def __init__(self, sources: Sequence[StepBatches], merge: Callable[[list[Batch]], Batch]):
        self.sources = tuple(sources)
        self._merge = merge

    def __getitem__(self, step: int) -> Batch:
        return self._merge([source[step] for source in self.sources])

    def iterate(self, start_step: int = 0, prefetch: int = 2) -> Iterator[Batch]:
        """Yields the merged batches of steps ``start_step, start_step + 1, ...`` forever."""
        batches = (self[step] for step in itertools.count(start_step))
        return batches if prefetch == 0 else _in_background(batches, prefetch)


def concatenate_examples(batches: Sequence[Batch]) -> Batch:
    """The examples of several batches with the same fields, one after the other per device
    (along the per-device axis when laid out per device, else axis 0)."""
    axis = 1 if batches[0]["image"].ndim == 5 else 0
    return {key: np.concatenate([b[key] for b in batches], axis=axis) for key in batches[0]}


def volume_batches(
    volumes: Sequence[preprocess.Volume],
    *,
    chunk_size: int,
    local_device_count: int | None = None,
) -> Iterator[tuple[preprocess.Volume, Batch]]:
    """Whole volumes for evaluation, in fixed-size zero-padded slice chunks (one jit shape).

    Yields, per volume with Z slices, ``(volume, batch)`` where ``batch`` holds
    ``image (C, chunk_size, H, W, 1) float32``, ``valid (C, chunk_size) bool`` (False on padding)
    and, for labelled volumes, ``label (C, chunk_size, H, W) int32``, with
    ``C = ceil(Z / chunk_size)``. With ``local_device_count = D`` the chunk axis is split as
    ``(C, D, chunk_size // D, ...)``. Slices stay in order, so ``predictions[batch["valid"]]``
    is the (Z, ...) stack of per-slice predictions.
    """
    devices = local_device_count or 1
    if chunk_size <= 0 or chunk_size % devices:
        raise ValueError(
            f"chunk_size={chunk_size} must be a positive multiple of local_device_count={devices}."
        )
    for volume in volumes:
        num_slices = volume.image.shape[0]
        num_chunks = -(-num_slices // chunk_size)
        pad = num_chunks * chunk_size - num_slices
        fields = {
            "image": np.pad(volume.image.astype(np.float32), ((0, pad), (0, 0), (0, 0)))[..., None],
            "valid": np.arange(num_chunks * chunk_size) < num_slices,
        }
        if volume.label is not None:
            fields["label"] = np.pad(volume.label.astype(np.int32), ((0, pad), (0, 0), (0, 0)))
        leading = (
            (num_chunks, chunk_size)
            if local_device_count is None
            else (num_chunks, devices, chunk_size // devices)
        )
        yield volume, {k: v.reshape(*leading, *v.shape[1:]) for k, v in fields.items()}


def _in_background(items: Iterator[Batch], size: int) -> Iterator[Batch]:
    """Runs ``items`` in a daemon thread, ``size`` items ahead; errors re-raise in the consumer."""
    ready: queue.Queue = queue.Queue(maxsize=size)
    stop = threading.Event()

    def put(entry) -> bool:
        while not stop.is_set():
            try:
                ready.put(entry, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put((item, None)):
                    return
        except Exception as error:  # noqa: BLE001 - re-raised in the consuming thread
            put((None, error))
            return
        put((None, StopIteration()))

    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    try:
        while True:
            item, error = ready.get()
            if isinstance(error, StopIteration):
                return
            if error is not None:
                raise error
            yield item
    finally:
        # No join: the daemon thread sees the event within one put timeout and exits; joining
        # here would fail when an unfinished iterator is finalised at interpreter shutdown.
        stop.set()
