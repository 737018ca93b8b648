"""TFDS builder of preprocessed volumes: one example per volume, prepared once into ``data_dir``.

Preprocessing (nibabel reads, resampling, optional N4) is the slow part of the input pipeline and
is the same for every run of an experiment grid, so it runs once per dataset variant and is stored
with TFDS under ``DATA_DIR/jaxcl_volumes/<config name>/<version>/``. The config name encodes
everything the stored arrays depend on (dataset, frame, slice axis, target resolution, image size,
N4, and for the synthetic set its size, seed and generator version), so a different setting
prepares a new copy and never reads a stale one. TFDS writes into a temporary ``*.incomplete*``
folder and renames it only after the last example is written, so a build that fails or is killed
midway is never mistaken for a complete one; the next call starts again from scratch. Prepared
volumes are read back one at a time: `load_volumes` keeps only the requested ones, and
`volume_parts` streams them in parallel parts (a pre-training pool's slice store is written
from them, `jaxcl.data.slice_store`).

Sources: acdc / prostate / mmwhs / folder read a manually downloaded root (TFDS ``manual_dir``;
``MANUAL_DOWNLOAD_INSTRUCTIONS`` says where to get each); "synthetic" generates its NIfTI files
once into ``DATA_DIR/jaxcl_synthetic/<size>-<seed>-v<version>/`` (docs/METHOD.md §12) and is read
from there like a download, so evaluation can compare against the native NIfTI files.

Example features: ``subject_id``; ``image`` (Z, S, S) float32; ``label`` (Z, S, S) uint8 class
indices, empty (0, S, S) when the subject has no label; ``image_path`` / ``label_path`` relative
to the dataset root ("" when unlabelled) so evaluation can reopen the original header; and
``geometry``, the arrays of ``preprocess.Geometry.to_dict()`` for the inverse mapping
(docs/METHOD.md §11).
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import hashlib
import itertools
import multiprocessing
import os
import re
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import tensorflow_datasets as tfds

from jaxcl.data import orientation, preprocess, sources, splits, synthetic

_SPLIT = "volumes"  # every subject; the paper splits are applied by subject id afterwards
_MANUAL_DATASETS = ("acdc", "prostate", "mmwhs", "folder")
FRAME_DATASETS = ("acdc", "synthetic")


@dataclasses.dataclass(eq=False, kw_only=True)
class VolumesConfig(tfds.core.BuilderConfig):
    """One prepared variant of a dataset; build it with :func:`volumes_config`.

    Attributes:
      dataset: layout name ("acdc", "prostate", "mmwhs", "folder", "synthetic").
      target_resolution: in-plane voxel size in mm after resampling.
      image_size: in-plane size S after crop/pad.
      slice_axis: one of `orientation.SLICE_AXES`, the canonical axis slices are taken along, or
        "auto" (each volume's axis of largest spacing).
      frame: "ED" or "ES" for acdc/synthetic, None otherwise.
      n4: whether N4 bias correction was applied.
      num_subjects: synthetic only: number of generated subjects.
      seed: synthetic only: generator seed.
      channel: folder only: the image channel of multi-channel data.
      unlabelled_roots: folder only: extra folders of unlabelled images.
    """

    dataset: str
    target_resolution: float
    image_size: int
    slice_axis: str
    frame: str | None = None
    n4: bool = False
    num_subjects: int = 60
    seed: int = 0
    channel: int = 0
    unlabelled_roots: tuple[str, ...] = ()


def volumes_config(
    dataset: str,
    *,
    target_resolution: float,
    image_size: int,
    slice_axis: str,
    frame: str | None = None,
    n4: bool = False,
    root: str | None = None,
    num_subjects: int = 60,
    seed: int = 0,
    channel: int = 0,
    unlabelled_roots: Sequence[str] = (),
) -> VolumesConfig:
    """The config of one dataset variant, named after every setting the stored data depends on.

    ``root`` is part of the name only for "folder" datasets, whose identity is their files: the
    name holds a digest of the folder, the unlabelled folders, the channel and every image and
    label file's name, size and modification time, so adding, removing or replacing a file
    prepares a new copy. The fixed layouts can be moved without re-preparing. ``frame`` defaults
    to "ED" for acdc and synthetic and must be None for the other layouts.
    """
    if slice_axis not in ("auto", *orientation.SLICE_AXES):
        raise sources.DataError(
            f"slice_axis={slice_axis!r} is not 'auto' or one of {orientation.SLICE_AXES}; set "
            "data.slice_axis to one of them."
        )
    if dataset in FRAME_DATASETS:
        frame = frame or "ED"
    elif frame is not None:
        raise sources.DataError(
            f"frame={frame!r} applies only to {FRAME_DATASETS}, not {dataset!r}."
        )
    parts = [dataset]
    if dataset == "folder":
        if root is None:
            raise sources.DataError("the 'folder' dataset needs root= (its dataset folder).")
        folder = os.path.abspath(root)
        digest = _folder_digest(folder, channel, tuple(unlabelled_roots))
        parts.append(re.sub(r"[^\w.]", "_", os.path.basename(folder)) + "_" + digest)
    if frame is not None:
        parts.append(frame)
    if dataset == "synthetic":
        parts += [f"{num_subjects}subjects", f"seed{seed}", f"v{synthetic.GENERATOR_VERSION}"]
    parts += [slice_axis, f"{target_resolution:g}mm", f"{image_size}px"] + (["n4"] if n4 else [])
    return VolumesConfig(
        name="-".join(parts),
        dataset=dataset,
        target_resolution=float(target_resolution),
        image_size=int(image_size),
        slice_axis=slice_axis,
        frame=frame,
        n4=n4,
        num_subjects=num_subjects,
        seed=seed,
        channel=channel,
        unlabelled_roots=tuple(unlabelled_roots),
    )


def _folder_digest(root: str, channel: int, unlabelled_roots: tuple[str, ...]) -> str:
    """8 hex digits identifying a folder dataset's files (see `volumes_config`)."""
    layout = sources.get_layout("folder", root, channel=channel, unlabelled_roots=unlabelled_roots)
    entries = [root, str(channel), *unlabelled_roots]
    for subject in layout.find_subjects(root):
        for path in (subject.image_path, subject.label_path):
            if path:
                stat = os.stat(path)
                entries.append(f"{subject.subject_id}:{path}:{stat.st_size}:{stat.st_mtime_ns}")
    return hashlib.sha1("\n".join(entries).encode()).hexdigest()[:8]


VOLUMES_PER_WORKER = 8


def default_prepare_workers() -> int:
    """Processes for preparing volumes: this process's CPUs, at most 16."""
    return max(1, min(16, len(os.sched_getaffinity(0))))


@functools.lru_cache(maxsize=4)
def _layout(dataset: str, root: str, options: tuple) -> sources.DatasetLayout:
    return sources.get_layout(dataset, root, **dict(options))


def _load_subject(
    dataset: str, root: str, options: tuple, settings: dict, subject: sources.Subject
) -> preprocess.Volume:
    """`preprocess.load_volume` of one subject; picklable arguments only (a worker process
    builds the layout, whose finder is a closure, from its name and options)."""
    return preprocess.load_volume(subject, _layout(dataset, root, options), **settings)


def _in_order(
    load: Callable[[sources.Subject], preprocess.Volume],
    subjects: Sequence[sources.Subject],
    workers: int,
) -> Iterator[tuple[sources.Subject, preprocess.Volume]]:
    """(subject, load(subject)) in the order of ``subjects``, loaded by ``workers`` processes.

    At most 2 x workers volumes are loaded ahead of the one being written, so memory stays
    bounded whatever the number of subjects. One worker (or one subject) loads in this process.
    A worker's error (e.g. a `sources.DataError` naming the bad file) is raised here.
    """
    if workers <= 1 or len(subjects) <= 1:
        for subject in subjects:
            yield subject, load(subject)
        return
    # spawn, not fork: this process runs TensorFlow's (and maybe jax's) threads.
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
        remaining = iter(subjects)
        pending = collections.deque(
            (subject, pool.submit(load, subject))
            for subject in itertools.islice(remaining, 2 * workers)
        )
        while pending:
            subject, future = pending.popleft()
            for following in itertools.islice(remaining, 1):
                pending.append((following, pool.submit(load, following)))
            yield subject, future.result()


class VolumesBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Preprocessed volumes of one dataset variant (see the module docstring).

    Bump VERSION whenever preprocessing changes the stored arrays: prepared copies are found by
    config name and version only.
    """

    name = "jaxcl_volumes"
    VERSION = tfds.core.Version("1.1.0")
    # Processes that read and preprocess volumes while preparing (`_in_order`); the stored data
    # does not depend on it.
    prepare_workers: int = 1
    RELEASE_NOTES = {  # noqa: RUF012
        "1.0.0": "One example per preprocessed volume.",
        "1.1.0": "Slices taken along a chosen axis of the canonical (RAS) orientation; geometry "
        "gains `flips`.",
    }
    MANUAL_DOWNLOAD_INSTRUCTIONS = "\n\n".join(
        f"{name}: {sources.download_instructions(name)}" for name in _MANUAL_DATASETS
    )

    def _info(self) -> tfds.core.DatasetInfo:
        size = self.builder_config.image_size
        template = preprocess.Geometry(
            affine=np.eye(4),
            native_shape=(1, 1, 1),
            spacing=(1.0, 1.0, 1.0),
            resampled_shape=(1, 1),
            offsets=(0, 0),
        ).to_dict()
        return tfds.core.DatasetInfo(
            builder=self,
            description=f"jaxcl preprocessed volumes, {self.builder_config.name}.",
            features=tfds.features.FeaturesDict(
                {
                    "subject_id": tfds.features.Text(),
                    "image_path": tfds.features.Text(),
                    "label_path": tfds.features.Text(),
                    "image": tfds.features.Tensor(
                        shape=(None, size, size),
                        dtype=np.float32,
                        encoding=tfds.features.Encoding.BYTES,
                    ),
                    "label": tfds.features.Tensor(
                        shape=(None, size, size),
                        dtype=np.uint8,
                        encoding=tfds.features.Encoding.ZLIB,
                    ),
                    "geometry": {
                        key: tfds.features.Tensor(shape=value.shape, dtype=value.dtype)
                        for key, value in template.items()
                    },
                }
            ),
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        return {_SPLIT: self._generate_examples(os.fspath(dl_manager.manual_dir))}

    def _generate_examples(self, root: str) -> Iterator[tuple[str, dict]]:
        config = self.builder_config
        options = layout_options(
            config.dataset, config.frame, config.channel, config.unlabelled_roots
        )
        layout = sources.get_layout(config.dataset, root, **options)
        load = functools.partial(
            _load_subject,
            config.dataset,
            root,
            tuple(sorted(options.items())),
            {
                "target_resolution": config.target_resolution,
                "image_size": config.image_size,
                "slice_axis": config.slice_axis,
                "n4": config.n4,
            },
        )
        subjects = layout.find_subjects(root)
        # A worker's start-up (a new interpreter importing nibabel and scipy) pays off over a few
        # volumes: small datasets are prepared in this process.
        workers = min(self.prepare_workers, len(subjects) // VOLUMES_PER_WORKER)
        for subject, volume in _in_order(load, subjects, workers):
            empty = np.zeros((0, config.image_size, config.image_size), np.uint8)
            yield (
                subject.subject_id,
                {
                    "subject_id": subject.subject_id,
                    "image_path": os.path.relpath(subject.image_path, root),
                    "label_path": os.path.relpath(subject.label_path, root)
                    if subject.label_path
                    else "",
                    "image": volume.image.astype(np.float32),
                    "label": empty if volume.label is None else volume.label,
                    "geometry": volume.geometry.to_dict(),
                },
            )


def synthetic_root(data_dir: str, num_subjects: int = 60, seed: int = 0) -> str:
    """Where `load_volumes` keeps the generated synthetic NIfTI files under ``data_dir``."""
    name = f"{num_subjects}subjects-seed{seed}-v{synthetic.GENERATOR_VERSION}"
    return os.path.join(data_dir, "jaxcl_synthetic", name)


def ensure_synthetic(root: str, *, num_subjects: int, seed: int) -> str:
    """Generates the synthetic dataset into ``root`` unless all its subjects are already there.

    Generation is deterministic and writes each subject atomically, so a partial folder (an
    interrupted run) is simply completed. Returns ``root``.
    """
    expected = [f"patient{index:03d}" for index in range(num_subjects)]
    present = set(os.listdir(root)) if os.path.isdir(root) else set()
    if not present.issuperset(expected):
        synthetic.generate(root, num_subjects=num_subjects, seed=seed)
    return root


def layout_options(
    dataset: str, frame: str | None, channel: int, unlabelled_roots: tuple[str, ...]
) -> dict:
    """`sources.get_layout` options of a dataset variant (frame: acdc / synthetic only)."""
    if dataset == "folder":
        return {"channel": channel, "unlabelled_roots": unlabelled_roots}
    return {} if frame is None else {"frame": frame}


def _to_volume(example: dict) -> tuple[preprocess.Volume, sources.Subject]:
    subject_id = example["subject_id"].decode()
    label_path = example["label_path"].decode() or None
    volume = preprocess.Volume(
        subject_id=subject_id,
        image=example["image"],
        label=example["label"] if label_path else None,
        geometry=preprocess.Geometry.from_dict(example["geometry"]),
    )
    return volume, sources.Subject(subject_id, example["image_path"].decode(), label_path)


def prepared_builder(
    dataset: str,
    *,
    root: str | None,
    data_dir: str,
    target_resolution: float | None = None,
    image_size: int | None = None,
    slice_axis: str,
    frame: str | None = None,
    n4: bool = False,
    num_subjects: int = 60,
    seed: int = 0,
    channel: int = 0,
    unlabelled_roots: Sequence[str] = (),
    prepare_workers: int | None = None,
) -> VolumesBuilder:
    """The builder of a dataset variant, prepared into ``data_dir`` first if it is not there.

    Arguments as for `load_volumes`; ``prepare_workers`` processes read and preprocess the files
    (default `default_prepare_workers()`, at most one per `VOLUMES_PER_WORKER` volumes). TFDS
    writes volume by volume (its writer spills to disk beyond 1 GB), with a progress bar.
    """
    if dataset == "synthetic":
        root = ensure_synthetic(
            root or synthetic_root(data_dir, num_subjects, seed),
            num_subjects=num_subjects,
            seed=seed,
        )
    options = layout_options(dataset, frame, channel, tuple(unlabelled_roots))
    layout = sources.get_layout(dataset, root, **options)
    target_resolution = target_resolution or layout.target_resolution
    image_size = image_size or layout.image_size
    if target_resolution is None or image_size is None:
        raise sources.DataError(
            f"dataset {dataset!r} has no default target_resolution/image_size; set both "
            "(config keys data.target_resolution and data.image_size)."
        )
    config = volumes_config(
        dataset,
        target_resolution=target_resolution,
        image_size=image_size,
        slice_axis=slice_axis,
        frame=frame,
        n4=n4,
        root=root,
        num_subjects=num_subjects,
        seed=seed,
        channel=channel,
        unlabelled_roots=unlabelled_roots,
    )
    builder = VolumesBuilder(config=config, data_dir=data_dir)
    builder.prepare_workers = prepare_workers or default_prepare_workers()
    if not builder.is_prepared() and dataset in _MANUAL_DATASETS:
        if root is None:
            raise sources.DataError(
                f"{dataset} is not prepared in {data_dir} ({config.name}) and no dataset root "
                "was given; set root (config key data.root). "
                + sources.download_instructions(dataset)
            )
        layout.find_subjects(root)  # DataError with instructions for a missing or empty root
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=root, try_download_gcs=False)
    )
    return builder


def _examples(builder: VolumesBuilder, split=_SPLIT) -> Iterator[dict]:
    """The stored examples of ``split``, one volume at a time."""
    return tfds.as_numpy(builder.as_dataset(split=split))


def _stream(builder: VolumesBuilder, wanted: frozenset[str], split) -> Iterator[preprocess.Volume]:
    for example in _examples(builder, split):
        if example["subject_id"].decode() in wanted:
            yield _to_volume(example)[0]


def volume_parts(
    builder: VolumesBuilder, subject_ids: Sequence[str], num_parts: int
) -> list[Callable[[], Iterator[preprocess.Volume]]]:
    """Readers of the prepared volumes of ``subject_ids``, split into up to ``num_parts``
    contiguous parts of the stored files (`tfds.even_splits`).

    Each reader yields its part's volumes one at a time, in stored order, and reads only its
    part's files: any number of volumes fits in memory, and parts can be read in parallel.
    """
    num_parts = max(1, min(num_parts, builder.info.splits[_SPLIT].num_examples))
    wanted = frozenset(subject_ids)
    return [
        functools.partial(_stream, builder, wanted, split)
        for split in tfds.even_splits(_SPLIT, n=num_parts)
    ]


def prepared_gigabytes(builder: VolumesBuilder, num_volumes: int) -> float:
    """Approximate memory of ``num_volumes`` of the prepared volumes, in GB (1e9 bytes): their
    share of the stored bytes (float32 images, compressed labels)."""
    split = builder.info.splits[_SPLIT]
    return int(split.num_bytes) * num_volumes / max(split.num_examples, 1) / 1e9


def load_volumes(
    dataset: str,
    *,
    root: str | None,
    data_dir: str,
    subject_ids: Sequence[str] | None = None,
    require_labels: bool = False,
    **settings,
) -> list[preprocess.Volume]:
    """Preprocessed volumes of a dataset, prepared into ``data_dir`` on first use.

    Args:
      dataset: "acdc", "prostate", "mmwhs", "folder" or "synthetic".
      root: the manually downloaded dataset folder; needed only to prepare (and always for
        "folder"). For "synthetic": where the generated files are kept (default
        ``synthetic_root(data_dir, ...)``), generated there on first use.
      data_dir: where prepared datasets are stored and reused.
      subject_ids: return only these subjects; DataError naming any that are not in the dataset.
      require_labels: DataError if a returned subject has no label.
      **settings: the variant (`prepared_builder`): ``slice_axis`` ("auto" or one of
        `orientation.SLICE_AXES`); ``target_resolution`` (in-plane mm) and ``image_size``
        (in-plane size after crop/pad), None for the layout's default (docs/METHOD.md §10);
        ``frame`` ("ED" (default) or "ES" for acdc/synthetic); ``n4`` (N4 bias correction, needs
        SimpleITK); ``num_subjects``, ``seed`` (the synthetic dataset); ``channel``,
        ``unlabelled_roots`` (the folder layout's options, `sources.get_layout`).

    Returns:
      Volumes sorted by subject id (image (Z, S, S) float32, label uint8 or None, geometry).
    """
    builder = prepared_builder(dataset, root=root, data_dir=data_dir, **settings)
    wanted = None if subject_ids is None else set(subject_ids)
    volumes, subjects = [], []
    for example in _examples(builder):  # one at a time: only the wanted volumes are kept
        volume, subject = _to_volume(example)
        subjects.append(subject)
        if wanted is None or volume.subject_id in wanted:
            volumes.append(volume)
    if subject_ids is None:
        subject_ids = [subject.subject_id for subject in subjects]
    splits.check_split_on_disk(subject_ids, subjects, require_labels=require_labels)
    return sorted(volumes, key=lambda volume: volume.subject_id)
