"""Synthetic cardiac subjects written as a Medical Segmentation Decathlon / nnU-Net folder.

Lets the `folder` dataset layout be tried without real data. Each case is the end-diastolic frame
of one jaxcl.data.synthetic subject:

  ROOT/dataset.json                   labels {"background": 0, "RV": 1, "Myo": 2, "LV": 3}
  ROOT/imagesTr/heart_XXX_0000.nii.gz labelled images (nnU-Net channel suffix _0000)
  ROOT/labelsTr/heart_XXX.nii.gz      their labels (0 bg, 1 RV, 2 Myo, 3 LV)
  ROOT/imagesTs/heart_XXX_0000.nii.gz unlabelled images (no labels anywhere)

Labelled cases are subjects 0 .. L-1 (heart_000 ..), unlabelled ones the next U subjects, so a
case is the same whatever the number of unlabelled cases. Like real scans, some cases are stored
with permuted and/or flipped voxel axes and an affine that places the same anatomy at the same
world coordinates: `nib.as_closest_canonical` of a reoriented file equals the canonical
(row, column, slice) volume that jaxcl.data.synthetic writes. A label file always has its image's
voxel grid and affine.

Command line:
  python -m jaxcl.data.synthetic_msd --out ROOT [--num-labelled 12] [--num-unlabelled 8] [--seed 0]
      [--reoriented-every 3] [--dataset-json v2|v1]
"""

import argparse
import dataclasses
import json
import logging
import os
import tempfile
import time
from collections.abc import Sequence

import nibabel as nib
import numpy as np

from jaxcl.data import synthetic

_CLASS_NAMES = ("background", "RV", "Myo", "LV")  # list position = label value
_CHANNEL = "_0000"
_DATASET_NAME = "SyntheticHeart"
_DESCRIPTION = "jaxcl synthetic short-axis cardiac cine-MRI, end-diastolic frames"
_DATASET_JSON_FORMS = ("v2", "v1")


@dataclasses.dataclass(frozen=True)
class _Orientation:
    """How stored voxel axes relate to the canonical (X, Y, Z) = (row, column, slice) axes.

    Attributes:
      axes: stored axis k is canonical axis axes[k] (a permutation of (0, 1, 2)).
      flips: stored axes that run in the opposite direction to their canonical axis.
    """

    axes: tuple[int, int, int] = (0, 1, 2)
    flips: tuple[int, ...] = ()


_CANONICAL = _Orientation()
# Used in turn by the reoriented cases: an in-plane transpose with a flipped row axis, the slice
# axis moved first, and slices stored apex -> base.
_REORIENTATIONS = (
    _Orientation(axes=(1, 0, 2), flips=(0,)),
    _Orientation(axes=(2, 0, 1)),
    _Orientation(flips=(2,)),
)


@dataclasses.dataclass(frozen=True)
class _Case:
    """One case of the folder.

    Attributes:
      case_id: "heart_XXX".
      subject_index: jaxcl.data.synthetic subject it shows.
      labelled: True: imagesTr + labelsTr; False: imagesTs only.
      orientation: how its voxel axes are stored.
    """

    case_id: str
    subject_index: int
    labelled: bool
    orientation: _Orientation

    @property
    def image_path(self) -> str:
        """Path relative to the dataset root."""
        folder = "imagesTr" if self.labelled else "imagesTs"
        return f"{folder}/{self.case_id}{_CHANNEL}.nii.gz"

    @property
    def label_path(self) -> str | None:
        """Path relative to the dataset root; None for unlabelled cases."""
        return f"labelsTr/{self.case_id}.nii.gz" if self.labelled else None


def _plan_cases(num_labelled: int, num_unlabelled: int, reoriented_every: int) -> list[_Case]:
    """The cases of a folder, labelled first.

    Within the labelled and within the unlabelled cases, the 1st, (1 + reoriented_every)-th, ...
    are reoriented (so each non-empty group has one), cycling through _REORIENTATIONS across the
    whole folder; reoriented_every=0 stores every case canonically.
    """
    cases = []
    num_reoriented = 0
    for labelled, count, first in (
        (True, num_labelled, 0),
        (False, num_unlabelled, num_labelled),
    ):
        for k in range(count):
            orientation = _CANONICAL
            if reoriented_every > 0 and k % reoriented_every == 0:
                orientation = _REORIENTATIONS[num_reoriented % len(_REORIENTATIONS)]
                num_reoriented += 1
            index = first + k
            cases.append(_Case(f"heart_{index:03d}", index, labelled, orientation))
    return cases


def _reorient(
    volume: np.ndarray, affine: np.ndarray, orientation: _Orientation
) -> tuple[np.ndarray, np.ndarray]:
    """The same voxels stored with other axes, and the affine that keeps them in place.

    Args:
      volume: (X, Y, Z) canonically stored volume.
      affine: (4, 4) voxel-to-world affine of `volume`.
      orientation: the storage order wanted.

    Returns:
      stored: volume with stored[j] = volume[i], i[axes[k]] = j[k] or n_k - 1 - j[k] when stored
        axis k (of length n_k) is flipped.
      stored_affine: (4, 4) affine @ M, where M maps stored voxel indices to canonical ones.
    """
    stored = np.flip(np.transpose(volume, orientation.axes), orientation.flips)
    to_canonical = np.zeros((4, 4))
    to_canonical[3, 3] = 1.0
    for k, axis in enumerate(orientation.axes):
        flipped = k in orientation.flips
        to_canonical[axis, k] = -1.0 if flipped else 1.0
        to_canonical[axis, 3] = stored.shape[k] - 1 if flipped else 0.0
    return np.ascontiguousarray(stored), affine @ to_canonical


def _dataset_description(cases: Sequence[_Case], form: str = "v2") -> dict:
    """dataset.json content for `cases`.

    Args:
      cases: from _plan_cases.
      form: "v2" (nnU-Net v2: channel_names, labels name -> value, file_ending) or "v1" (MSD /
        nnU-Net v1: modality, labels value string -> name, training / test lists naming each
        case without its channel suffix).
    """
    labelled = [c for c in cases if c.labelled]
    if form == "v2":
        return {
            "name": _DATASET_NAME,
            "description": _DESCRIPTION,
            "channel_names": {"0": "cine-MRI"},
            "labels": {name: value for value, name in enumerate(_CLASS_NAMES)},
            "numTraining": len(labelled),
            "file_ending": ".nii.gz",
        }
    if form == "v1":
        return {
            "name": _DATASET_NAME,
            "description": _DESCRIPTION,
            "tensorImageSize": "3D",
            "modality": {"0": "MRI"},
            "labels": {str(value): name for value, name in enumerate(_CLASS_NAMES)},
            "numTraining": len(labelled),
            "numTest": len(cases) - len(labelled),
            "training": [
                {"image": f"./imagesTr/{c.case_id}.nii.gz", "label": f"./{c.label_path}"}
                for c in labelled
            ],
            "test": [f"./imagesTs/{c.case_id}.nii.gz" for c in cases if not c.labelled],
        }
    raise ValueError(f"dataset_json_form={form!r} is invalid; use one of {_DATASET_JSON_FORMS}.")


def _replace_atomically(path: str, write) -> None:
    """Calls write(temp_path) on a hidden temporary file next to `path`, then renames it."""
    folder, name = os.path.split(path)
    # The suffix keeps the ending nibabel picks the format and compression from.
    suffix = ".nii.gz" if name.endswith(".nii.gz") else os.path.splitext(name)[1]
    handle, temp_path = tempfile.mkstemp(prefix=f".{name}.", suffix=suffix, dir=folder)
    os.close(handle)
    try:
        write(temp_path)
        os.chmod(temp_path, 0o644)  # mkstemp makes it private; the dataset is meant to be shared.
        os.replace(temp_path, path)
    except BaseException:
        os.remove(temp_path)
        raise


def _save_nifti(volume: np.ndarray, affine: np.ndarray, path: str) -> None:
    nifti = nib.Nifti1Image(volume, affine)
    nifti.header.set_xyzt_units("mm")
    _replace_atomically(path, lambda temp_path: nib.save(nifti, temp_path))


def _write_case(case: _Case, subject: synthetic.SyntheticSubject, root: str) -> None:
    """Writes the ED frame of `subject` (and its labels if the case is labelled) under root."""
    # (Z, H, W) -> NIfTI (X, Y, Z) = (row, column, slice), as jaxcl.data.synthetic stores it.
    image = np.transpose(subject.images[synthetic.ED_FRAME], (1, 2, 0))
    affine = synthetic._affine(subject.spacing, image.shape)
    volumes = [(image, case.image_path)]
    if case.labelled:
        volumes.append(
            (np.transpose(subject.labels[synthetic.ED_FRAME], (1, 2, 0)), case.label_path)
        )
    for volume, relative_path in volumes:
        path = os.path.join(root, relative_path)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        _save_nifti(*_reorient(volume, affine, case.orientation), path)


def _check_no_other_cases(root: str, cases: Sequence[_Case]) -> None:
    """ValueError if root's case folders hold files that are not among `cases`."""
    expected = {c.image_path for c in cases} | {c.label_path for c in cases if c.labelled}
    for folder in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        if not os.path.isdir(os.path.join(root, folder)):
            continue
        for entry in sorted(os.listdir(os.path.join(root, folder))):
            if not entry.startswith(".") and f"{folder}/{entry}" not in expected:
                raise ValueError(
                    f"{os.path.join(root, folder, entry)} is not one of the cases to write (left "
                    "from an earlier run with other counts, or other data); delete it or choose "
                    "an empty --out folder."
                )


def write_msd_folder(
    root: str,
    *,
    num_labelled: int,
    num_unlabelled: int = 0,
    seed: int = 0,
    reoriented_every: int = 3,
    dataset_json_form: str = "v2",
) -> list[str]:
    """Writes synthetic cases in the MSD / nnU-Net layout (see the module docstring).

    Every file is written under a hidden temporary name and renamed into place once complete;
    dataset.json is written last. Files of the same cases are replaced; any other file in the
    case folders is an error (the folder would mix datasets). The output depends only on the
    arguments.

    Args:
      root: dataset root, created if missing.
      num_labelled: labelled cases (imagesTr + labelsTr), subjects 0 .. num_labelled - 1.
      num_unlabelled: unlabelled cases (imagesTs), the next num_unlabelled subjects.
      seed: non-negative jaxcl.data.synthetic dataset seed.
      reoriented_every: n: the 1st, (1 + n)-th, (1 + 2n)-th, ... labelled and unlabelled cases
        are stored with permuted and/or flipped voxel axes (three kinds in turn); 0: none.
      dataset_json_form: "v2" (nnU-Net v2: channel_names, labels name -> value, file_ending) or
        "v1" (MSD: modality, labels value -> name, training and test case lists).

    Returns:
      The case ids, labelled first ("heart_000", ...).
    """
    if num_labelled < 1 or num_unlabelled < 0 or num_labelled + num_unlabelled > 1000:
        raise ValueError(
            f"num_labelled={num_labelled} must be >= 1 and num_unlabelled={num_unlabelled} >= 0, "
            "with at most 1000 cases in all (case ids have 3 digits)."
        )
    if seed < 0 or reoriented_every < 0:
        raise ValueError(
            f"seed={seed} and reoriented_every={reoriented_every} must be non-negative integers."
        )
    if os.path.exists(root) and not os.path.isdir(root):
        raise ValueError(f"--out {root} is a file; pass a folder for the dataset.")
    cases = _plan_cases(num_labelled, num_unlabelled, reoriented_every)
    description = _dataset_description(cases, dataset_json_form)
    os.makedirs(root, exist_ok=True)
    _check_no_other_cases(root, cases)
    start = time.perf_counter()
    for number, case in enumerate(cases, start=1):
        _write_case(case, synthetic.synthesize_subject(seed, case.subject_index), root)
        logging.info(
            "synthetic_msd: wrote %s (%d/%d, %s, axes %s flips %s, %.1f s)",
            case.image_path,
            number,
            len(cases),
            "labelled" if case.labelled else "unlabelled",
            case.orientation.axes,
            case.orientation.flips,
            time.perf_counter() - start,
        )

    def write_json(path: str) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(description, f, indent=2)
            f.write("\n")

    _replace_atomically(os.path.join(root, "dataset.json"), write_json)
    return [c.case_id for c in cases]


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--out", required=True, help="dataset root to write")
    parser.add_argument("--num-labelled", type=int, default=12)
    parser.add_argument("--num-unlabelled", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--reoriented-every", type=int, default=3, help="store every n-th case reoriented (0: none)"
    )
    parser.add_argument("--dataset-json", choices=_DATASET_JSON_FORMS, default="v2")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    start = time.perf_counter()
    case_ids = write_msd_folder(
        args.out,
        num_labelled=args.num_labelled,
        num_unlabelled=args.num_unlabelled,
        seed=args.seed,
        reoriented_every=args.reoriented_every,
        dataset_json_form=args.dataset_json,
    )
    logging.info(
        "synthetic_msd: %d cases in %s (%.1f s)",
        len(case_ids),
        args.out,
        time.perf_counter() - start,
    )


if __name__ == "__main__":
    main()
