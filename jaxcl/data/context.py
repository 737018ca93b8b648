"""The dataset of a run: layout, splits, preprocessing settings and preprocessed volumes.

`DataContext(config)` resolves everything a run's config leaves to the data, once, before any
training (docs/DATA.md):

  splits     the paper's for acdc / prostate / mmwhs / synthetic; for a "folder" dataset from
             `config.data.splits`, explicit or automatic (`jaxcl.data.folder_splits`);
  settings   `data.target_resolution` and `data.image_size` left unset (None) are derived from the
             training cases (`jaxcl.data.fingerprint`); `data.slice_axis` "auto" slices each
             volume along its axis of largest spacing (axial when isotropic).

`config` is then the run's config with every derived value filled in, and every choice made
automatically is logged with its reason. `write_splits` records the splits in WORKDIR/splits.json,
which `--config.data.splits.file=WORKDIR/splits.json` reuses, and refuses a workdir whose recorded
splits differ (the folder changed since the run began), so a resumed run never mixes splits.
`volumes` loads preprocessed volumes; `slice_store` writes a pre-training pool too large for
memory to disk once and opens it (`jaxcl.data.slice_store`).
"""

from __future__ import annotations

import functools
import json
import logging
import os

import ml_collections

from jaxcl import files
from jaxcl.data import fingerprint, folder_splits, preprocess, slice_store, sources, splits
from jaxcl.data import tfds as volumes_tfds
from jaxcl.train import distributed

SPLITS_FILE = "splits.json"
# Part files of a slice store: contiguous ranges of the prepared data, written in parallel.
_STORE_PARTS = 16


def unlabelled_roots(data: ml_collections.ConfigDict) -> tuple[str, ...]:
    """`data.unlabelled_roots` (comma-separated folders) as absolute paths."""
    return tuple(
        os.path.abspath(os.path.expanduser(p.strip()))
        for p in (data.unlabelled_roots or "").split(",")
        if p.strip()
    )


class DataContext:
    """The dataset of a run (see the module docstring).

    Attributes:
      config: the run's config with the derived data settings filled in.
      dataset, root, data_dir, layout: where the data is and how it is laid out (`data_dir` may
        be `gs://`; the NIfTI root is a local folder).
      splits: the run's `splits.Splits`.
      notes: one line per value chosen automatically, with its reason.
    """

    def __init__(self, config: ml_collections.ConfigDict):
        config = config.copy_and_resolve_references()
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
        if self.dataset == "folder" and not self.root:
            raise sources.DataError(
                "config.data.root is empty; set it to your dataset folder (imagesTr/, labelsTr/, "
                "dataset.json), e.g. --config.data.root=/data/MyTask."
            )
        # The layout options: the cardiac phase, or a folder's channel and unlabelled folders.
        self._frame = data.frame if self.dataset in volumes_tfds.FRAME_DATASETS else None
        self._unlabelled_roots = unlabelled_roots(data)
        options = volumes_tfds.layout_options(
            self.dataset, self._frame, data.channel, self._unlabelled_roots
        )
        self.layout = sources.get_layout(self.dataset, self.root, **options)
        self.notes: list[str] = []
        if splits.has_paper_splits(self.dataset):
            self.splits = splits.paper_splits(self.dataset)
        else:
            subjects = self.subjects()
            settings = folder_splits.settings_from_config(data.splits)
            self.splits, notes, warnings = folder_splits.make_splits(
                subjects, settings, seed=config.seed
            )
            self.notes += [f"data.splits: {note}" for note in notes]
            for warning in warnings:
                logging.warning("data.splits: %s", warning)
            self._derive_settings(config, subjects)
        for note in self.notes:
            logging.info("%s", note)
        self.config = config

    def _derive_settings(self, config, subjects: list[sources.Subject]) -> None:
        """Fills data.target_resolution / data.image_size left None from the training cases."""
        data = config.data
        if data.target_resolution is not None and data.image_size is not None:
            return
        excluded = set(self.splits.test)
        training = [s for s in subjects if s.label_path and s.subject_id not in excluded]
        derived = fingerprint.derive(
            training,
            self.layout,
            target_resolution=data.target_resolution,
            image_size=data.image_size,
            slice_axis=data.slice_axis,
        )
        data.target_resolution = derived.target_resolution
        data.image_size = derived.image_size
        self.notes += list(derived.notes)

    def settings(self) -> dict:
        """The preprocessing settings of the run's volumes (`volumes_tfds.load_volumes` keys)."""
        data = self.config.data
        return {
            "target_resolution": data.target_resolution,
            "image_size": data.image_size,
            "slice_axis": data.slice_axis,
            "n4": data.n4,
        }

    def volumes(
        self,
        subject_ids: list[str],
        *,
        require_labels: bool = False,
        settings: dict | None = None,
    ) -> list[preprocess.Volume]:
        """Preprocessed volumes of `subject_ids` (the run's settings, or `settings`)."""
        load = functools.partial(
            volumes_tfds.load_volumes,
            subject_ids=subject_ids,
            require_labels=require_labels,
            **self._variant(settings),
        )
        # Process 0 prepares a dataset missing from a shared data_dir once; the others then read
        # it (or prepare their own copy in a data_dir on their local disk).
        return distributed.main_process_first(load, "jaxcl: volumes ready")

    def _variant(self, settings: dict | None = None) -> dict:
        """The `volumes_tfds.prepared_builder` arguments of the run's prepared data."""
        return {
            "dataset": self.dataset,
            "root": self.root,
            "data_dir": self.data_dir,
            "frame": self._frame,
            "channel": self.config.data.channel,
            "unlabelled_roots": self._unlabelled_roots,
            **(settings or self.settings()),
        }

    def _prepared(self) -> volumes_tfds.VolumesBuilder:
        builder = functools.partial(volumes_tfds.prepared_builder, **self._variant())
        return distributed.main_process_first(builder, "jaxcl: prepared data ready")

    def pool_gigabytes(self, subject_ids: list[str]) -> float:
        """About how much memory the preprocessed volumes of `subject_ids` take, in GB."""
        return volumes_tfds.prepared_gigabytes(self._prepared(), len(subject_ids))

    def slice_store(self, subject_ids: list[str], *, num_partitions: int) -> slice_store.SliceStore:
        """The slices of `subject_ids` in a slice store under the data dir, built on first use.

        The store is built from the prepared volumes one at a time (`slice_store.build`), by
        process 0 first when the data dir is shared; every process then opens it.
        """

        def build() -> str:
            builder = volumes_tfds.prepared_builder(**self._variant())
            variant = f"{builder.builder_config.name}-{builder.version}"
            directory = slice_store.store_dir(self.data_dir, variant, subject_ids)
            slice_store.build(
                directory,
                volumes_tfds.volume_parts(builder, subject_ids, _STORE_PARTS),
                subject_ids,
                image_size=builder.builder_config.image_size,
            )
            return str(directory)

        directory = distributed.main_process_first(build, "jaxcl: slice store ready")
        return slice_store.open_store(directory, num_partitions)

    def subjects(self) -> list[sources.Subject]:
        return self.layout.find_subjects(self.root)

    def split_record(self) -> dict:
        """What WORKDIR/splits.json holds: the dataset, its root and the splits of this run."""
        data = self.config.data
        return {
            "dataset": self.dataset,
            "root": os.path.abspath(self.root) if self.root else None,
            "labelled_set": f"{data.labelled_set}-{data.combination}",
            **self.splits.to_dict(f"{data.labelled_set}-{data.combination}"),
        }

    def write_splits(self, workdir: files.PathLike) -> None:
        """Writes WORKDIR/splits.json; refuses a workdir that recorded different splits.

        Raises:
          sources.DataError: the workdir's splits.json differs from this run's splits.
        """
        path = files.path(workdir) / SPLITS_FILE
        record = self.split_record()
        if path.exists():
            stored = json.loads(path.read_text(encoding="utf-8"))
            keys = ("dataset", "test", "labelled", "pretrain")
            if any(stored.get(key) != record[key] for key in keys):
                raise sources.DataError(
                    f"{path} records other splits than this run's (the dataset folder or "
                    f"config.data.splits changed since the run began); resume with "
                    f"--config.data.splits.file={path}, or use a new workdir."
                )
            if stored == record:
                return
        if distributed.is_main_process():
            files.write_atomically(path, json.dumps(record, indent=2))
        labelled = "; ".join(
            f"{size}-{c}={','.join(ids)}"
            for size, combos in record["labelled"].items()
            for c, ids in combos.items()
        )
        logging.info(
            "data: splits written to %s: test %s; val %s; labelled %s; pre-training %d volumes.",
            path,
            ",".join(record["test"]),
            ",".join(record["val"]),
            labelled,
            len(record["pretrain"]),
        )
