"""Dataset layouts: where the NIfTI files of a dataset live and what their label values mean.

A `DatasetLayout` turns a dataset root folder into a sorted list of `Subject`s (id, image path,
label path or None for unlabelled images) and maps raw on-disk label values to class indices
(index 0 is background). Layouts are looked up by name in a small registry (`get_layout`):

  acdc       ROOT/patientXXX/patientXXX_frameYY.nii.gz + _gt; the ED frame from Info.cfg by default
             (`frame="ES"` for end-systole); ROOT may also be the unpacked archive (database/...).
  prostate   MSD Task05: ROOT/imagesTr/prostate_XX.nii.gz (4D: T2, ADC; T2 is used) + labelsTr/;
             imagesTs/ images are unlabelled. Subject ids are the MSD numbers as 3 digits ("016").
  mmwhs      MM-WHS 2017 MR: mr_train_10XX_image.nii.gz + mr_train_10XX_label.nii.gz (in ROOT or
             ROOT/mr_train); mr_test_20XX_image.nii.gz images are unlabelled.
  folder     MSD / nnU-Net style: ROOT/imagesTr + ROOT/labelsTr + ROOT/dataset.json (labels from
             dataset.json; nnU-Net `_0000` channel suffixes handled); imagesTs/ and the folders
             of the `unlabelled_roots` option (cases named "<folder name>/<case>") are
             unlabelled images.
  synthetic  the built-in synthetic cardiac set, written in the ACDC layout (patient000-059).

Every user-facing error in the data layer is a `DataError` whose message names the file or key
and says how to fix it.
"""

from __future__ import annotations

import collections
import dataclasses
import inspect
import json
import os
import re
import types
from collections.abc import Callable, Mapping

import numpy as np

_NIFTI_ENDINGS = (".nii.gz", ".nii")

_DOWNLOAD_INSTRUCTIONS = types.MappingProxyType(
    {
        "acdc": (
            "Download ACDC from the ACDC challenge site "
            "(https://www.creatis.insa-lyon.fr/Challenge/acdc/) and put the "
            "database/training/patientXXX folders (each with patientXXX_frameYY.nii.gz, "
            "patientXXX_frameYY_gt.nii.gz and Info.cfg) directly under the dataset root."
        ),
        "prostate": (
            "Download Task05_Prostate from the Medical Segmentation Decathlon "
            "(http://medicaldecathlon.com/) and use the unpacked Task05_Prostate folder, which "
            "holds imagesTr/ and labelsTr/ (prostate_XX.nii.gz), as the dataset root."
        ),
        "mmwhs": (
            "Download the MR training data of the MM-WHS 2017 challenge "
            "(https://zmiclab.github.io/zxh/0/mmwhs/) and put the mr_train_10XX_image.nii.gz / "
            "mr_train_10XX_label.nii.gz files (or the mr_train/ folder holding them) under the "
            "dataset root."
        ),
        "folder": (
            "Arrange the data MSD / nnU-Net style: ROOT/imagesTr/<case>.nii.gz (or "
            "<case>_0000.nii.gz), ROOT/labelsTr/<case>.nii.gz and ROOT/dataset.json with a "
            '"labels" entry such as {"0": "background", "1": "organ"}.'
        ),
        "synthetic": (
            "Generate the synthetic dataset with "
            "`python -m jaxcl.data.synthetic --out ROOT` and use ROOT as the dataset root."
        ),
    }
)


class DataError(ValueError):
    """Bad user data or data configuration; the message names the file/key and the fix."""


@dataclasses.dataclass(frozen=True)
class Subject:
    """One volume on disk; `label_path` is None for unlabelled images."""

    subject_id: str
    image_path: str
    label_path: str | None


@dataclasses.dataclass(frozen=True)
class DatasetLayout:
    """How one dataset is stored and labelled.

    Attributes:
      name: registry name of the layout ("acdc", "prostate", ...).
      class_names: (C,) class names, index 0 background.
      label_values: (C,) raw on-disk label value of each class index; label_values[0] == 0.
      target_resolution: default in-plane resolution in mm (None: must come from the config).
      image_size: default in-plane size after crop/pad (None: must come from the config).
      finder: root -> subjects found there (unsorted; may be empty).
      channel: channel taken from 4D images (None: images are expected to be 3D).
      num_channels: channels of the dataset's images (1 for 3D images).
    """

    name: str
    class_names: tuple[str, ...]
    label_values: tuple[int, ...]
    target_resolution: float | None
    image_size: int | None
    finder: Callable[[str], list[Subject]] = dataclasses.field(repr=False, compare=False)
    channel: int | None = None
    num_channels: int = 1

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def find_subjects(self, root: str) -> list[Subject]:
        """Subjects under `root` sorted by id; DataError if root is missing, empty or unknown."""
        if not os.path.isdir(root):
            raise DataError(
                f"{self.name} dataset root {root!r} does not exist or is not a folder. "
                f"{download_instructions(self.name)}"
            )
        if not _visible_entries(root):
            raise DataError(
                f"{self.name} dataset root {root!r} is empty. {download_instructions(self.name)}"
            )
        subjects = sorted(self.finder(root), key=lambda s: s.subject_id)
        if not subjects:
            raise DataError(
                f"no {self.name} images found under {root!r}. {download_instructions(self.name)}"
            )
        counts = collections.Counter(s.subject_id for s in subjects)
        duplicates = sorted(i for i, n in counts.items() if n > 1)
        if duplicates:
            raise DataError(
                f"{self.name} subject ids {duplicates} occur more than once under {root!r}; keep "
                "one copy of each subject's files."
            )
        return subjects

    def class_indices(self, raw_labels: np.ndarray, source: str) -> np.ndarray:
        """Maps raw label values to class indices.

        Args:
          raw_labels: label volume of raw on-disk values (any shape, integer or float dtype).
          source: the file the labels came from, named in the error message.

        Returns:
          uint8 class indices, same shape.

        Raises:
          DataError listing every value that is not in `label_values`.
        """
        values = np.unique(raw_labels)
        unexpected = [v for v in values.tolist() if v not in self.label_values]
        if unexpected:
            label_map = dict(zip(self.label_values, self.class_names, strict=True))
            raise DataError(
                f"{source}: unexpected label values {unexpected}; the {self.name} label map is "
                f"{label_map}. Fix the label file, or use the 'folder' layout with these values "
                'listed under "labels" in dataset.json.'
            )
        order = np.argsort(self.label_values)
        sorted_values = np.asarray(self.label_values, np.float64)[order]
        return order[np.searchsorted(sorted_values, np.asarray(raw_labels, np.float64))].astype(
            np.uint8
        )


def download_instructions(name: str) -> str:
    """Where to get dataset `name` and how to lay it out under the dataset root."""
    if name not in _DOWNLOAD_INSTRUCTIONS:
        raise DataError(
            f"unknown dataset {name!r}; choose one of {sorted(_DOWNLOAD_INSTRUCTIONS)}."
        )
    return _DOWNLOAD_INSTRUCTIONS[name]


def get_layout(name: str, root: str | None = None, **options) -> DatasetLayout:
    """The layout registered under `name`.

    Args:
      name: "acdc", "prostate", "mmwhs", "folder" or "synthetic".
      root: dataset root; required by "folder" (its labels come from ROOT/dataset.json).
      **options: layout options: acdc/synthetic `frame` ("ED" or "ES"); folder `channel` (int,
        which image channel to use for multi-channel data, default 0) and `unlabelled_roots`
        (folders of extra unlabelled NIfTI images for pre-training).
    """
    if name not in _LAYOUT_FACTORIES:
        raise DataError(
            f"unknown dataset layout {name!r}; choose one of {sorted(_LAYOUT_FACTORIES)}."
        )
    factory = _LAYOUT_FACTORIES[name]
    try:
        inspect.signature(factory).bind(root, **options)
    except TypeError as e:
        accepted = [p for p in inspect.signature(factory).parameters if p != "root"]
        raise DataError(
            f"invalid options {sorted(options)} for dataset layout {name!r}; it accepts "
            f"{accepted or 'no options'}."
        ) from e
    return factory(root, **options)


def _visible_entries(folder: str) -> list[str]:
    # macOS archives (the MSD tarballs) carry "._name" resource forks next to the real files.
    return sorted(e for e in os.listdir(folder) if not e.startswith("."))


def nifti_stem(filename: str) -> str | None:
    """'case.nii.gz' -> 'case'; None for hidden or non-NIfTI files."""
    if filename.startswith("."):
        return None
    for ending in _NIFTI_ENDINGS:
        if filename.endswith(ending) and len(filename) > len(ending):
            return filename[: -len(ending)]
    return None


def _existing_nifti(stem_path: str) -> str | None:
    for ending in _NIFTI_ENDINGS:
        if os.path.isfile(stem_path + ending):
            return stem_path + ending
    return None


# ACDC and synthetic -------------------------------------------------------------------------

_ACDC_CLASSES = ("background", "RV", "Myo", "LV")
_ACDC_PARENTS = ("", "training", "testing", "database/training", "database/testing")


def _read_info_cfg(path: str) -> dict[str, str]:
    """ACDC Info.cfg ('ED: 1' lines) as a dict."""
    if not os.path.isfile(path):
        raise DataError(
            f"{path} is missing; every ACDC-layout patient folder needs an Info.cfg with "
            "'ED: <frame>' and 'ES: <frame>' lines (re-extract the dataset)."
        )
    with open(path, encoding="utf-8") as f:
        pairs = (line.split(":", 1) for line in f if ":" in line)
        return {key.strip(): value.strip() for key, value in pairs}


def _find_acdc(root: str, frame: str) -> list[Subject]:
    subjects = []
    for parent in _ACDC_PARENTS:
        folder = os.path.join(root, parent)
        if not os.path.isdir(folder):
            continue
        for entry in _visible_entries(folder):
            match = re.fullmatch(r"patient(\d{3})", entry)
            patient_dir = os.path.join(folder, entry)
            if not match or not os.path.isdir(patient_dir):
                continue
            info_path = os.path.join(patient_dir, "Info.cfg")
            info = _read_info_cfg(info_path)
            if frame not in info or not info[frame].isdigit():
                raise DataError(
                    f"{info_path} has no integer '{frame}:' entry; add e.g. '{frame}: 1' naming "
                    f"the {frame} frame number."
                )
            stem = os.path.join(patient_dir, f"{entry}_frame{int(info[frame]):02d}")
            image_path = _existing_nifti(stem)
            if image_path is None:
                raise DataError(
                    f"{stem}.nii.gz ({frame} frame named in {info_path}) is missing; re-extract "
                    "the dataset or fix Info.cfg."
                )
            subjects.append(Subject(match.group(1), image_path, _existing_nifti(stem + "_gt")))
    return subjects


def _acdc_factory(name: str) -> Callable[..., DatasetLayout]:
    def make(root: str | None = None, *, frame: str = "ED") -> DatasetLayout:
        del root  # The ACDC layout is fixed; the root is only needed to find subjects.
        if frame not in ("ED", "ES"):
            raise DataError(f"{name} option frame={frame!r} is invalid; use 'ED' or 'ES'.")
        return DatasetLayout(
            name=name,
            class_names=_ACDC_CLASSES,
            label_values=(0, 1, 2, 3),
            target_resolution=1.36719,
            image_size=192,
            finder=lambda r: _find_acdc(r, frame),
        )

    return make


# MSD prostate -------------------------------------------------------------------------------


def _find_prostate(root: str) -> list[Subject]:
    subjects = []
    for images, labels in (("imagesTr", "labelsTr"), ("imagesTs", "labelsTs")):
        folder = os.path.join(root, images)
        if not os.path.isdir(folder):
            continue
        for entry in _visible_entries(folder):
            match = re.fullmatch(r"prostate_(\d+)", nifti_stem(entry) or "")
            if match:
                label = _existing_nifti(os.path.join(root, labels, nifti_stem(entry)))
                subjects.append(
                    Subject(f"{int(match.group(1)):03d}", os.path.join(folder, entry), label)
                )
    return subjects


def _prostate_layout(root: str | None = None) -> DatasetLayout:
    del root  # Fixed layout.
    return DatasetLayout(
        name="prostate",
        class_names=("background", "PZ", "TZ"),
        label_values=(0, 1, 2),
        target_resolution=0.625,
        image_size=192,
        finder=_find_prostate,
        channel=0,  # T2; channel 1 is ADC.
        num_channels=2,
    )


# MM-WHS MR ----------------------------------------------------------------------------------


def _find_mmwhs(root: str) -> list[Subject]:
    subjects = []
    for parent in ("", "mr_train", "mr_test"):
        folder = os.path.join(root, parent)
        if not os.path.isdir(folder):
            continue
        for entry in _visible_entries(folder):
            match = re.fullmatch(r"(mr_(?:train|test)_(\d{4}))_image", nifti_stem(entry) or "")
            if match:
                label = _existing_nifti(os.path.join(folder, match.group(1) + "_label"))
                subjects.append(Subject(match.group(2), os.path.join(folder, entry), label))
    return subjects


def _mmwhs_layout(root: str | None = None) -> DatasetLayout:
    del root  # Fixed layout.
    return DatasetLayout(
        name="mmwhs",
        class_names=("background", "Myo", "LA", "LV", "RA", "RV", "AA", "PA"),
        label_values=(0, 205, 420, 500, 550, 600, 820, 850),
        target_resolution=1.5,
        image_size=160,
        finder=_find_mmwhs,
    )


# MSD / nnU-Net folder -----------------------------------------------------------------------


def _parse_labels(labels: object, source: str) -> list[tuple[int, str]]:
    """dataset.json "labels", MSD ({"0": "bg"}) or nnU-Net v2 ({"bg": 0}) form -> (value, name)."""
    if not isinstance(labels, Mapping) or not labels:
        raise DataError(f'{source}: "labels" must be a non-empty mapping.')
    if all(isinstance(k, str) and k.isdigit() and isinstance(v, str) for k, v in labels.items()):
        pairs = [(int(k), v) for k, v in labels.items()]
    elif all(isinstance(v, int) and not isinstance(v, bool) for v in labels.values()):
        pairs = [(v, k) for k, v in labels.items()]
    else:
        raise DataError(
            f'{source}: "labels" must map value strings to names ({{"0": "background", '
            f'"1": "organ"}}) or names to integers ({{"background": 0, "organ": 1}}); region '
            f"lists are not supported. Got {dict(labels)}."
        )
    pairs.sort()
    if pairs[0][0] != 0:
        raise DataError(f'{source}: "labels" must include the background value 0.')
    return pairs


def _case_files(images_dir: str, labels_dir: str | None, channel: int) -> list[tuple[str, str]]:
    """(case id, image file) pairs; nnU-Net `<case>_0000.nii.gz` names select `channel`.

    A name ending in _dddd is a channel suffix unless a label file of that full name exists.
    """
    stems = {nifti_stem(e): e for e in _visible_entries(images_dir) if nifti_stem(e)}
    suffixed = all(re.search(r"_\d{4}$", s) for s in stems) and not any(
        labels_dir and _existing_nifti(os.path.join(labels_dir, s)) for s in stems
    )
    if not suffixed:
        return sorted(stems.items())
    cases = sorted({s[:-5] for s in stems})
    missing = [c for c in cases if f"{c}_{channel:04d}" not in stems]
    if missing:
        raise DataError(
            f"{images_dir}: cases {missing} have no channel-{channel} file "
            f"(<case>_{channel:04d}.nii.gz); add them or choose another `channel` option."
        )
    return [(c, stems[f"{c}_{channel:04d}"]) for c in cases]


def _find_folder(root: str, channel: int, unlabelled_roots: tuple[str, ...]) -> list[Subject]:
    subjects = []
    folders = [(os.path.join(root, "imagesTr"), os.path.join(root, "labelsTr"))]
    folders.append((os.path.join(root, "imagesTs"), os.path.join(root, "labelsTs")))
    folders += [(extra, None) for extra in unlabelled_roots]
    for images_dir, labels_dir in folders:
        if not os.path.isdir(images_dir):
            if labels_dir is None:
                raise DataError(
                    f"unlabelled folder {images_dir!r} (config.data.unlabelled_roots) does not "
                    "exist; fix the path or remove it."
                )
            continue
        # Cases of an extra folder are named "<folder name>/<case>", apart from the dataset's own.
        prefix = "" if labels_dir else os.path.basename(os.path.normpath(images_dir)) + "/"
        for case, filename in _case_files(images_dir, labels_dir, channel):
            label = _existing_nifti(os.path.join(labels_dir, case)) if labels_dir else None
            subjects.append(Subject(prefix + case, os.path.join(images_dir, filename), label))
    return subjects


def _folder_layout(
    root: str | None = None, *, channel: int = 0, unlabelled_roots: tuple[str, ...] = ()
) -> DatasetLayout:
    if root is None:
        raise DataError(
            "the 'folder' layout needs the dataset root (its labels come from ROOT/dataset.json); "
            "pass root=... to get_layout."
        )
    path = os.path.join(root, "dataset.json")
    if not os.path.isfile(path):
        raise DataError(f"{path} is missing. {download_instructions('folder')}")
    try:
        with open(path, encoding="utf-8") as f:
            description = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path} is not valid JSON ({e}); fix the file.") from e
    if not isinstance(description, Mapping) or "labels" not in description:
        raise DataError(f'{path} has no "labels" entry. {download_instructions("folder")}')
    ending = description.get("file_ending", ".nii.gz")
    if ending not in _NIFTI_ENDINGS:
        raise DataError(
            f'{path}: "file_ending" {ending!r} is not supported; convert the images to NIfTI.'
        )
    pairs = _parse_labels(description["labels"], path)
    channels = description.get("channel_names", description.get("modality", {"0": "image"}))
    return DatasetLayout(
        name="folder",
        class_names=tuple(name for _, name in pairs),
        label_values=tuple(value for value, _ in pairs),
        target_resolution=None,
        image_size=None,
        finder=lambda r: _find_folder(r, channel, tuple(unlabelled_roots)),
        channel=channel if len(channels) > 1 else None,
        num_channels=max(1, len(channels)),
    )


_LAYOUT_FACTORIES: Mapping[str, Callable[..., DatasetLayout]] = types.MappingProxyType(
    {
        "acdc": _acdc_factory("acdc"),
        "prostate": _prostate_layout,
        "mmwhs": _mmwhs_layout,
        "folder": _folder_layout,
        "synthetic": _acdc_factory("synthetic"),
    }
)
