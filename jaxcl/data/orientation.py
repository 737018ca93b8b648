"""Which way a volume is cut into slices: canonical (RAS) reorientation and the slice axis.

NIfTI data is indexed by voxel axes (X, Y, Z) in whatever order and direction the file was
stored. `nibabel.orientations.io_orientation(affine)` names, per voxel axis, the closest world axis
(R, A, S) and whether the axis runs the opposite way; permuting the voxel axes into R, A, S order
and reversing the opposite ones gives the canonical array (as `nib.as_closest_canonical`, but as
pure index operations). The network arrays are (Z, H, W): Z runs along the slice axis, one of
`SLICE_AXES` = canonical axes R, A, S (or "auto": `resolve_slice_axis`), and H, W are the two
other canonical axes in R, A, S order (axial: H = R, W = A). `to_network` and `from_network` move
between the two orders (docs/DATA.md, "Orientation and slice axis").
"""

from __future__ import annotations

from collections.abc import Sequence

import nibabel as nib
import numpy as np

from jaxcl.data.sources import DataError

# Canonical (RAS) axis 0, 1, 2 is the normal of sagittal, coronal, axial slices.
SLICE_AXES = ("sagittal", "coronal", "axial")
# A volume whose largest spacing is within this factor of its smallest counts as isotropic.
_ISOTROPY_TOLERANCE = 1.1


def canonical_orientation(affine: np.ndarray) -> tuple[tuple[int, ...], tuple[bool, ...]]:
    """Closest canonical (RAS) orientation of a voxel grid.

    Args:
      affine: (4, 4) voxel-to-world matrix.

    Returns:
      voxel_axes: (3,) for each canonical axis R, A, S, the voxel axis closest to it.
      reversed: (3,) for each canonical axis, whether that voxel axis points the opposite way.
    """
    ornt = nib.orientations.io_orientation(np.asarray(affine, np.float64))
    if np.isnan(ornt).any():
        raise DataError(
            f"the affine {np.asarray(affine).tolist()} is degenerate (a voxel axis has no "
            "direction in space); fix the header's qform/sform."
        )
    voxel_axes, reversed_ = [0, 0, 0], [False, False, False]
    for voxel_axis, (ras_axis, direction) in enumerate(ornt):
        voxel_axes[int(ras_axis)] = voxel_axis
        reversed_[int(ras_axis)] = bool(direction < 0)
    return tuple(voxel_axes), tuple(reversed_)


def check_slice_axis(slice_axis: str) -> None:
    """DataError unless `slice_axis` is one of `SLICE_AXES`."""
    if slice_axis not in SLICE_AXES:
        raise DataError(
            f"slice_axis={slice_axis!r} is not one of {SLICE_AXES}; set data.slice_axis to one of "
            "them or 'auto' (resolved per volume by resolve_slice_axis)."
        )


def resolve_slice_axis(slice_axis: str, affine: np.ndarray, spacing: Sequence[float]) -> str:
    """`slice_axis`, or for "auto" the volume's canonical axis of largest spacing.

    Per volume, so that stacks whose slice normal is closest to different RAS axes (oblique
    cardiac short-axis stacks) are all cut along their thick axis; isotropic volumes: axial.

    Args:
      slice_axis: "auto" or one of `SLICE_AXES`.
      affine: (4, 4) voxel-to-world matrix.
      spacing: (3,) voxel sizes in mm along X, Y, Z.
    """
    if slice_axis != "auto":
        check_slice_axis(slice_axis)
        return slice_axis
    voxel_axes = canonical_orientation(affine)[0]
    return auto_slice_axis([float(spacing[a]) for a in voxel_axes])


def network_orientation(
    affine: np.ndarray, slice_axis: str
) -> tuple[tuple[int, ...], tuple[bool, ...]]:
    """Voxel axis and direction of each network axis (Z, H, W) (see the module docstring).

    Args:
      affine: (4, 4) voxel-to-world matrix.
      slice_axis: one of `SLICE_AXES`.

    Returns:
      axes: (3,) NIfTI voxel axis of Z, H and W.
      flips: (3,) whether Z, H and W run opposite to their voxel axes.
    """
    check_slice_axis(slice_axis)
    slice_ras = SLICE_AXES.index(slice_axis)
    ras_order = (slice_ras, *(a for a in range(3) if a != slice_ras))
    voxel_axes, reversed_ = canonical_orientation(affine)
    return tuple(voxel_axes[a] for a in ras_order), tuple(reversed_[a] for a in ras_order)


def auto_slice_axis(spacing_ras: Sequence[float]) -> str:
    """The canonical axis of largest spacing; "axial" for isotropic volumes (within 10%).

    Args:
      spacing_ras: (3,) voxel size in mm along the canonical axes R, A, S.

    Ties prefer axial, then coronal.
    """
    spacing = np.asarray(spacing_ras, np.float64)
    if spacing.max() <= _ISOTROPY_TOLERANCE * spacing.min():
        return "axial"
    return SLICE_AXES[2 - int(np.argmax(spacing[::-1]))]


def _flip_index(flips: Sequence[bool]) -> tuple[slice, ...]:
    return tuple(slice(None, None, -1) if flip else slice(None) for flip in flips)


def to_network(volume: np.ndarray, axes: Sequence[int], flips: Sequence[bool]) -> np.ndarray:
    """(X, Y, Z, ...) voxel array -> (Z, H, W, ...) network array (a view; trailing axes kept)."""
    order = (*axes, *range(3, volume.ndim))
    return np.transpose(volume, order)[_flip_index(flips)]


def from_network(array: np.ndarray, axes: Sequence[int], flips: Sequence[bool]) -> np.ndarray:
    """Inverse of `to_network`: (Z, H, W, ...) -> (X, Y, Z, ...) (a view)."""
    back = tuple(int(i) for i in np.argsort(axes))
    return np.transpose(array[_flip_index(flips)], (*back, *range(3, array.ndim)))
