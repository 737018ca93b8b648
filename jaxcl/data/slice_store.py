"""A pre-training pool on disk: one ArrayRecord record per slice, read back by pool row.

A pool larger than host memory (`config.data.pretrain_memory_gb`, docs/DATA.md) is written once
into a *slice store*, streaming the prepared TFDS volumes one at a time, and batches read only
their rows from it. `SliceStore` is a `pipeline.SliceIndex` (a few bytes per slice in memory)
whose ``take(rows)`` reads images from the files, so the pipeline's planners, host sharding and
(seed, step) determinism apply unchanged and the batches equal those of the in-memory pool bit
for bit.

Why ArrayRecord: it reads any record by number (a TFRecord file reads only in order), so a
batch planned from (seed, k) reads exactly its rows; a resumed run restarts at step k with no
iterator state to checkpoint, and each process reads only the rows of its own share of a batch.
Records are written with group size 1 and no compression: one read per slice, never a chunk
decoded for its neighbours (float32 images compress poorly anyway). Reads use the file API, not a
memory map, so resident memory does not grow with the pool (mapped pages would count). Local
files and ``gs://`` are read alike.

A store, ``DATA_DIR/jaxcl_slices/<prepared variant>-<version>/<digest of the subject ids>/``:

  part-00003.array_record   one record per slice: the (S, S) float32 image's bytes; each
                            volume's slices are consecutive records of one part, in slice order
  index.json                S, each part's name and size in bytes, and per volume its subject
                            id, part, first record and slice count

Pool rows number the volumes in subject-id order (the order `tfds.load_volumes` returns), so a
store's rows are those of the in-memory pool of the same subjects. `build` writes the parts in
parallel into ``<store>.incomplete-<random>/``, then renames them into the store folder,
index.json last. A store counts only when index.json is there and every part has the size it
records, so a build that was killed midway (or whose renames on ``gs://``, copies there, were cut
short) is never read: the next `build` removes its remains and starts again. A killed build's
``*.incomplete-*`` folder can be deleted.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import hashlib
import json
import logging
import os
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import tqdm
from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter
from etils import epath

from jaxcl import files
from jaxcl.data import pipeline, preprocess
from jaxcl.data.sources import DataError

FORMAT_VERSION = 1  # bump when the stored bytes or index.json change
INDEX_FILE = "index.json"
_WRITER_OPTIONS = "group_size:1,uncompressed"
_READER_OPTIONS = "readahead_buffer_size:0"  # random access: no read-ahead

VolumeReader = Callable[[], Iterable[preprocess.Volume]]


@dataclasses.dataclass(frozen=True)
class SliceStore(pipeline.SliceIndex):
    """An opened slice store: the pool's index in memory, its images read on demand.

    Attributes (besides the `pipeline.SliceIndex` ones):
      directory: the store folder (local or ``gs://``).
      image_size: S, slices are (S, S).
      row_part: (N,) int32 part file of each pool row.
      row_record: (N,) int64 record number of each pool row within its part.
      readers: one open ArrayRecord reader per part (thread-safe).
      labels: the rows' labels in a `LabelFile` (self-training's pseudo-labels), or None.
    """

    directory: str
    image_size: int
    row_part: np.ndarray
    row_record: np.ndarray
    readers: tuple[ArrayRecordReader, ...] = dataclasses.field(repr=False, compare=False)
    labels: LabelFile | None = dataclasses.field(default=None, repr=False, compare=False)

    def take(self, rows: np.ndarray) -> np.ndarray:
        """(n, S, S) float32 images of pool rows ``rows`` (n,); a row repeated is read once."""
        unique, inverse = np.unique(rows, return_inverse=True)
        size = self.image_size
        images = np.empty((unique.size, size, size), np.float32)
        parts = self.row_part[unique]
        for part in np.unique(parts):
            where = np.flatnonzero(parts == part)
            records = self.readers[part].read(self.row_record[unique[where]].tolist())
            for position, record in zip(where, records, strict=True):
                images[position] = np.frombuffer(record, np.float32).reshape(size, size)
        return images[inverse.reshape(-1)]

    def take_labels(self, rows: np.ndarray) -> np.ndarray:
        """(n, S, S) uint8 labels of pool rows ``rows`` (n,) from ``labels``."""
        return self.labels.take(rows)


class LabelFile:
    """(N, S, S) uint8 labels of a pool's rows, written and read by row in an unnamed temporary
    file (in ``TMPDIR``; the system deletes it when it is closed or the process ends).

    Self-training keeps the pseudo-labels of a pool larger than memory here: a quarter of the
    pool's float32 bytes on disk, and resident memory that does not grow with the pool (reads
    use ``pread``, not a memory map).
    """

    def __init__(self, num_rows: int, image_size: int):
        self.num_rows, self.image_size = num_rows, image_size
        self._row_bytes = image_size * image_size
        # Open for the object's lifetime: closing (or exiting) deletes the file.
        self._file = tempfile.TemporaryFile(prefix="jaxcl-labels-")  # noqa: SIM115
        self._file.truncate(num_rows * self._row_bytes)

    def write(self, first_row: int, labels: np.ndarray) -> None:
        """Stores (n, S, S) ``labels`` (as uint8) as rows ``first_row .. first_row + n - 1``."""
        if labels.shape[1:] != (self.image_size, self.image_size):
            raise ValueError(f"labels {labels.shape} are not (n, S, S) with S={self.image_size}")
        if not 0 <= first_row <= self.num_rows - labels.shape[0]:
            raise ValueError(f"rows {first_row}+{labels.shape[0]} exceed the {self.num_rows} rows")
        data = memoryview(np.ascontiguousarray(labels, dtype=np.uint8)).cast("B")
        offset = first_row * self._row_bytes
        while data:  # a write may store fewer bytes than asked
            written = os.pwrite(self._file.fileno(), data, offset)
            data, offset = data[written:], offset + written

    def take(self, rows: np.ndarray) -> np.ndarray:
        """(n, S, S) uint8 labels of rows ``rows`` (n,)."""
        rows = np.asarray(rows).reshape(-1)
        size, descriptor = self.image_size, self._file.fileno()
        labels = np.empty((rows.size, size, size), np.uint8)
        for position, row in enumerate(rows.tolist()):
            if not 0 <= row < self.num_rows:
                raise IndexError(f"row {row} is outside the {self.num_rows} rows")
            data = os.pread(descriptor, self._row_bytes, row * self._row_bytes)
            labels[position] = np.frombuffer(data, np.uint8).reshape(size, size)
        return labels


def store_dir(data_dir: files.PathLike, variant: str, subject_ids: Sequence[str]) -> epath.Path:
    """Where the store of ``subject_ids`` of the prepared ``variant`` lives under ``data_dir``.

    ``variant`` names the prepared data (TFDS config name and version); the subject ids are
    hashed as a set, so a different pool gets a different store.
    """
    key = "\n".join([f"v{FORMAT_VERSION}", *sorted(subject_ids)])
    digest = hashlib.sha1(key.encode()).hexdigest()[:16]
    return files.path(data_dir) / "jaxcl_slices" / variant / digest


def is_complete(directory: files.PathLike) -> bool:
    """Whether ``directory`` holds a finished store (index.json, every part at its size)."""
    return _complete_index(files.path(directory)) is not None


def _complete_index(directory: epath.Path) -> dict | None:
    index_file = directory / INDEX_FILE
    if not index_file.exists():
        return None
    index = json.loads(index_file.read_text(encoding="utf-8"))
    for part in index["parts"]:
        path = directory / part["name"]
        if not path.exists() or path.stat().length != part["num_bytes"]:
            return None
    return index


def build(
    directory: files.PathLike,
    parts: Sequence[VolumeReader],
    subject_ids: Sequence[str],
    *,
    image_size: int,
    num_workers: int = 4,
) -> None:
    """Writes the store of ``subject_ids`` into ``directory`` unless it is complete already.

    Args:
      directory: the store folder (`store_dir`), local or ``gs://``.
      parts: readers of the volumes, e.g. `tfds.volume_parts`: each is called once and its
        volumes (with ``subject_id`` and ``image`` (Z, S, S)) become one part file; together
        they must yield every subject of ``subject_ids`` exactly once (others are skipped).
      subject_ids: the pool.
      image_size: S.
      num_workers: parts written at the same time (threads: reading and writing release the
        GIL). Memory: about one volume per worker.

    Raises:
      DataError: a subject of the pool is missing or repeated, or a volume is not (Z, S, S).
    """
    directory = files.path(directory)
    if is_complete(directory):
        return
    logging.info("Writing the slice store of %d volumes to %s.", len(subject_ids), directory)
    temporary = directory.parent / f"{directory.name}.incomplete-{uuid.uuid4().hex[:8]}"
    temporary.mkdir(parents=True)
    wanted = frozenset(subject_ids)
    stop = threading.Event()  # set on failure: the other parts end after their current volume
    workers = concurrent.futures.ThreadPoolExecutor(max(1, num_workers))
    try:
        with tqdm.tqdm(total=len(wanted), unit="volume", desc="slice store") as bar:
            futures = [
                workers.submit(
                    _write_part,
                    temporary / f"part-{number:05d}.array_record",
                    read,
                    wanted,
                    image_size,
                    bar.update,
                    stop,
                )
                for number, read in enumerate(parts)
            ]
            done, _ = concurrent.futures.wait(
                futures, return_when=concurrent.futures.FIRST_EXCEPTION
            )
            for future in done:
                future.result()  # raises the first failure, while other parts are still busy
            written = [future.result() for future in futures]
        index = _index(written, subject_ids, image_size, directory)
        (temporary / INDEX_FILE).write_text(json.dumps(index), encoding="utf-8")
        _move_into_place(temporary, directory)
    except BaseException:
        stop.set()
        workers.shutdown(cancel_futures=True)
        temporary.rmtree(missing_ok=True)
        raise
    finally:
        workers.shutdown()


def _write_part(
    path: epath.Path,
    read: VolumeReader,
    wanted: frozenset[str],
    image_size: int,
    advance: Callable[[int], object],
    stop: threading.Event,
) -> dict:
    """Writes the wanted volumes of ``read()`` to the part file ``path``; returns its name, its
    size in bytes and its volumes (subject id, first record, slice count)."""
    arguments = (read(), wanted, image_size, advance, stop)
    if "://" not in os.fspath(path):
        return _write_records(path, *arguments)
    with tempfile.TemporaryDirectory() as staging:  # ArrayRecord writes local files only
        part = _write_records(epath.Path(staging) / path.name, *arguments)
        (epath.Path(staging) / path.name).copy(path)
    return part


def _write_records(
    path: epath.Path,
    volumes: Iterable[preprocess.Volume],
    wanted: frozenset[str],
    image_size: int,
    advance: Callable[[int], object],
    stop: threading.Event,
) -> dict:
    entries, record = [], 0
    writer = ArrayRecordWriter(os.fspath(path), _WRITER_OPTIONS)
    try:
        for volume in volumes:
            if stop.is_set():
                break
            if volume.subject_id not in wanted:
                continue
            image = np.ascontiguousarray(volume.image, dtype=np.float32)
            if image.ndim != 3 or image.shape[1:] != (image_size, image_size):
                raise DataError(
                    f"volume {volume.subject_id} has shape {image.shape}, not (Z, {image_size}, "
                    f"{image_size}); prepare the data again with image_size={image_size}."
                )
            for slice_image in image:
                writer.write(slice_image.tobytes())
            entries.append(
                {"subject_id": volume.subject_id, "first_record": record, "num_slices": len(image)}
            )
            record += len(image)
            advance(1)
    finally:
        writer.close()
    return {"name": path.name, "num_bytes": path.stat().length, "volumes": entries}


def _index(
    written: list[dict], subject_ids: Sequence[str], image_size: int, directory: epath.Path
) -> dict:
    """index.json's content; checks that every subject was written exactly once."""
    volumes = [
        {**volume, "part": number}
        for number, part in enumerate(written)
        for volume in part["volumes"]
    ]
    found = [volume["subject_id"] for volume in volumes]
    missing = sorted(set(subject_ids) - set(found))
    repeated = sorted(sid for sid, count in collections.Counter(found).items() if count > 1)
    problems = [f"subjects {missing} are not in the prepared data"] if missing else []
    problems += [f"subjects {repeated} are in it more than once"] if repeated else []
    if problems:
        raise DataError(
            f"slice store {directory}: {' and '.join(problems)}; check the pre-training split "
            "ids and the prepared dataset."
        )
    return {
        "format_version": FORMAT_VERSION,
        "image_size": image_size,
        "parts": [{"name": part["name"], "num_bytes": part["num_bytes"]} for part in written],
        "volumes": volumes,
    }


def _move_into_place(temporary: epath.Path, directory: epath.Path) -> None:
    """Moves the finished store from ``temporary`` to ``directory`` file by file, index.json
    last, so that ``directory`` is complete exactly when it has its index (a folder rename is
    neither atomic nor ordered on ``gs://``). Keeps a complete store already there."""
    if is_complete(directory):
        temporary.rmtree()
        return
    if directory.exists():
        stray = [p.name for p in directory.iterdir() if not _is_store_file(p.name)]
        if stray:
            raise DataError(
                f"{directory} holds files that are not a slice store's ({sorted(stray)[:3]}); "
                "move them away or build the store into another folder."
            )
        directory.rmtree()  # the remains of an interrupted build
    directory.mkdir(parents=True)
    for path in sorted(temporary.iterdir(), key=lambda p: p.name == INDEX_FILE):
        path.rename(directory / path.name)
    temporary.rmtree()


def _is_store_file(name: str) -> bool:
    return name == INDEX_FILE or (name.startswith("part-") and name.endswith(".array_record"))


def open_store(directory: files.PathLike, num_partitions: int) -> SliceStore:
    """Opens a complete store (`build`), with partition ids for ``num_partitions``.

    Raises:
      DataError: ``directory`` is not a complete store, or a volume has fewer slices than
        ``num_partitions``.
    """
    directory = files.path(directory)
    index = _complete_index(directory)
    if index is None:
        raise DataError(
            f"{directory} is not a complete slice store (missing or unfinished); build it with "
            "jaxcl.data.slice_store.build (DataContext.slice_store does)."
        )
    volumes = sorted(index["volumes"], key=lambda volume: volume["subject_id"])
    counts = np.array([volume["num_slices"] for volume in volumes], dtype=np.int64)
    base = pipeline.slice_index([v["subject_id"] for v in volumes], counts, num_partitions)
    first_row = np.repeat(np.cumsum(counts) - counts, counts)
    first_record = np.repeat([volume["first_record"] for volume in volumes], counts)
    return SliceStore(
        **vars(base),
        directory=os.fspath(directory),
        image_size=int(index["image_size"]),
        row_part=np.repeat([volume["part"] for volume in volumes], counts).astype(np.int32),
        row_record=first_record + np.arange(counts.sum()) - first_row,
        readers=tuple(
            ArrayRecordReader(os.fspath(directory / part["name"]), _READER_OPTIONS)
            for part in index["parts"]
        ),
    )
