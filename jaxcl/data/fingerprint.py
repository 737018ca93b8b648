"""Preprocessing settings derived from the training cases, like nnU-Net's dataset fingerprint.

`derive` fills the settings a config leaves open (docs/DATA.md, "Settings derived from the data"):

  slice_axis         "auto" stays "auto": every volume is sliced across its own axis of largest
                     voxel size (axial when isotropic within 10%); the note counts the axes;
  target_resolution  None: the median in-plane voxel size, to 4 significant digits;
  image_size         None: the median over labelled cases of the centred window that holds the
                     foreground with a 25% margin on each side, rounded up to a multiple of
                     `unet.INPUT_MULTIPLE`, at least 64 and at most the median image extent.

Spacing and orientation come from the NIfTI headers only; label data is read only to derive
image_size. Every derived value comes with a note giving its reason.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from collections.abc import Sequence

import numpy as np

from jaxcl.data import orientation, preprocess, sources
from jaxcl.models import unet

_MIN_IMAGE_SIZE = 64
_MARGIN = 0.25  # of the foreground's larger side, on each side
_SIGNIFICANT_DIGITS = 4


@dataclasses.dataclass(frozen=True)
class Fingerprint:
    """Preprocessing settings of a dataset.

    Attributes:
      target_resolution: in-plane voxel size in mm after resampling.
      image_size: in-plane size S after centre crop / zero pad (when derived, a multiple of 32).
      slice_axis: "auto" or one of `orientation.SLICE_AXES`.
      notes: one human-readable line per derived value, with its reason.
    """

    target_resolution: float
    image_size: int
    slice_axis: str
    notes: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class _Header:
    """What the fingerprint reads of one image.

    Attributes:
      path: the image file.
      shape: (3,) voxel grid (X, Y, Z).
      affine: (4, 4) voxel-to-world matrix.
      spacing: (3,) voxel size in mm along X, Y, Z.
      spacing_ras: (3,) voxel size in mm along the canonical axes R, A, S.
    """

    path: str
    shape: tuple[int, int, int]
    affine: np.ndarray
    spacing: tuple[float, float, float]
    spacing_ras: tuple[float, float, float]


def _read_header(path: str) -> _Header:
    shape, affine, zooms = preprocess.read_header(path)
    if len(shape) < 3:
        raise sources.DataError(
            f"{path} is {len(shape)}D (shape {shape}), a 3D (X, Y, Z) volume is expected; "
            "convert it to a 3D volume."
        )
    spacing = tuple(float(z) for z in zooms[:3])
    if min(spacing) <= 0:
        raise sources.DataError(
            f"{path} has voxel sizes {spacing} in its header; positive X, Y, Z spacings (pixdim) "
            "are needed to resample, fix the header."
        )
    try:
        ras_axes = orientation.canonical_orientation(affine)[0]
    except sources.DataError as e:
        raise sources.DataError(f"{path}: {e}") from e
    return _Header(path, shape[:3], affine, spacing, tuple(spacing[a] for a in ras_axes))


def _round_up(value: float, multiple: int) -> int:
    return max(multiple, multiple * math.ceil(value / multiple - 1e-9))


def _slice_axis(header: _Header, slice_axis: str) -> str:
    return orientation.auto_slice_axis(header.spacing_ras) if slice_axis == "auto" else slice_axis


def _auto_slice_axis_note(headers: Sequence[_Header]) -> str:
    """What "auto" gives on the cases: how many are sliced along each axis."""
    counts = collections.Counter(_slice_axis(h, "auto") for h in headers)
    spacing_ras = np.median([h.spacing_ras for h in headers], axis=0)
    spacing_text = ", ".join(f"{s:.3g}" for s in spacing_ras)
    axes = ", ".join(
        f"{axis} for {counts[axis]}" for axis in orientation.SLICE_AXES if counts[axis]
    )
    return (
        f"data.slice_axis = 'auto': each volume is sliced across its largest voxel size (axial "
        f"when isotropic within 10%): {axes} of {len(headers)} cases (median voxel "
        f"({spacing_text}) mm along R, A, S)"
    )


def _derive_target_resolution(headers: Sequence[_Header], slice_axis: str) -> tuple[float, str]:
    """The median in-plane voxel size to 4 significant digits, and its note."""
    inplane = [
        h.spacing[a]
        for h in headers
        for a in orientation.network_orientation(h.affine, _slice_axis(h, slice_axis))[0][1:]
    ]
    target_resolution = float(f"{float(np.median(inplane)):.{_SIGNIFICANT_DIGITS}g}")
    return target_resolution, (
        f"data.target_resolution = {target_resolution:g} mm (median in-plane voxel size of "
        f"{len(headers)} cases, {slice_axis} slices, to {_SIGNIFICANT_DIGITS} significant digits)"
    )


def _foreground_window(
    classes: np.ndarray, header: _Header, axes: Sequence[int], target_resolution: float
) -> float | None:
    """In-plane size in pixels that holds the foreground of `classes` (X, Y, Z) after centre crop.

    The larger side of the foreground's bounding box plus `_MARGIN` of it on each side, or the
    centred window reaching the foreground's far edge if that is larger; None without foreground.
    """
    foreground = classes != 0
    if not foreground.any():
        return None
    sides, reaches = [], []
    for axis in axes[1:]:
        covered = np.flatnonzero(foreground.any(axis=tuple(a for a in range(3) if a != axis)))
        scale = header.spacing[axis] / target_resolution  # pixels per voxel
        low, high = covered[0] * scale, (covered[-1] + 1) * scale
        centre = header.shape[axis] * scale / 2
        sides.append(high - low)
        reaches.append(2 * max(centre - low, high - centre))
    return max(max(sides) * (1 + 2 * _MARGIN), max(reaches))


def _derive_image_size(
    subjects: Sequence[sources.Subject],
    headers: Sequence[_Header],
    layout: sources.DatasetLayout,
    slice_axis: str,
    target_resolution: float,
) -> tuple[int, str]:
    """The in-plane size that holds the median case's foreground, and its note."""
    extents, windows = [], []
    for subject, header in zip(subjects, headers, strict=True):
        axes = orientation.network_orientation(header.affine, _slice_axis(header, slice_axis))[0]
        extents.append(max(header.shape[a] * header.spacing[a] for a in axes[1:]))
        if subject.label_path is not None:
            classes = preprocess.read_classes(
                subject.label_path, layout, subject.image_path, header.shape
            )
            windows.append(_foreground_window(classes, header, axes, target_resolution))
    extent = float(np.median(extents)) / target_resolution
    largest = _round_up(extent, unet.INPUT_MULTIPLE)
    windows = [w for w in windows if w is not None]
    if windows:
        needed = float(np.median(windows))
        image_size = max(_MIN_IMAGE_SIZE, min(_round_up(needed, unet.INPUT_MULTIPLE), largest))
        reason = (
            f"the foreground of {len(windows)} labelled cases with a {_MARGIN:.0%} margin on "
            f"each side, centred, needs a median {needed:.0f} px at {target_resolution:g} mm"
        )
    else:
        image_size = max(_MIN_IMAGE_SIZE, largest)
        reason = "no labelled case with foreground, so the whole image"
    return image_size, (
        f"data.image_size = {image_size} ({reason}; rounded up to a multiple of "
        f"{unet.INPUT_MULTIPLE} as the UNet pools {unet.NUM_POOLS} times, at least "
        f"{_MIN_IMAGE_SIZE} and at most {largest}, the median image extent of {extent:.0f} px "
        "rounded up)"
    )


def derive(
    subjects: Sequence[sources.Subject],
    layout: sources.DatasetLayout,
    *,
    target_resolution: float | None,
    image_size: int | None,
    slice_axis: str,
) -> Fingerprint:
    """Derives the preprocessing settings left open from the training cases.

    Args:
      subjects: the training cases; unlabelled ones count for spacing and extent only.
      layout: their dataset layout (label values of the foreground).
      target_resolution: in-plane mm, or None to derive it.
      image_size: in-plane size, or None to derive it.
      slice_axis: one of `orientation.SLICE_AXES`, or "auto" (per volume).

    Returns:
      The settings; given values are kept and get no note.
    """
    if slice_axis != "auto" and slice_axis not in orientation.SLICE_AXES:
        raise sources.DataError(
            f"data.slice_axis={slice_axis!r} is invalid; use 'auto' or one of "
            f"{orientation.SLICE_AXES}."
        )
    if target_resolution is not None and image_size is not None:
        return Fingerprint(float(target_resolution), int(image_size), slice_axis, ())
    if not subjects:
        raise sources.DataError(
            "no training cases to derive data.slice_axis / target_resolution / image_size from; "
            "set them in the config or add labelled cases."
        )
    headers = [_read_header(subject.image_path) for subject in subjects]
    notes = []
    if slice_axis == "auto":
        notes.append(_auto_slice_axis_note(headers))
    if target_resolution is None:
        target_resolution, note = _derive_target_resolution(headers, slice_axis)
        notes.append(note)
    if image_size is None:
        image_size, note = _derive_image_size(
            subjects, headers, layout, slice_axis, target_resolution
        )
        notes.append(note)
    return Fingerprint(float(target_resolution), int(image_size), slice_axis, tuple(notes))
