"""Per-volume preprocessing and its inverse for predictions (docs/DATA.md).

Forward, per volume: reorientation to the closest canonical (RAS) orientation and the chosen slice
axis -> optional N4 bias correction of the raw intensities -> percentile normalisation
(x - P1) / (P99 - P1) -> each slice resampled in-plane to the target resolution (linear for
images, nearest for labels; slice spacing unchanged) -> centre crop / zero pad to the target size.

Array layout. NIfTI data is indexed by voxel axes (X, Y, Z) in whatever order and direction the
file was stored; the network arrays are (Z, H, W) in the closest canonical (RAS) orientation, cut
along the slice axis (`jaxcl.data.orientation`). A volume stored with permuted or flipped axes,
or under an oblique affine, therefore gives the same slices in the same order. An already
canonical volume sliced axially is transpose(data, (2, 0, 1)). `Geometry` keeps the permutation
and flips, so `to_native` maps predictions back onto exactly the original voxel grid and the
prediction NIfTI reuses the original affine and header unchanged.

Resampling uses `scipy.ndimage.zoom(..., grid_mode=True, mode="nearest")` in both directions:
output pixel o of an axis resized from n to m samples reads input coordinate
(o + 0.5) * n / m - 0.5 (pixel centres of the same field of view), clamped to the edge. With the
same convention forwards and back, resizing to the native shape inverts resampling up to
interpolation; at zoom 1 it is the identity.
"""

from __future__ import annotations

import contextlib
import dataclasses
import zlib
from collections.abc import Iterator, Sequence

import nibabel as nib
import numpy as np
import scipy.ndimage

from jaxcl.data import orientation
from jaxcl.data.sources import DataError, DatasetLayout, Subject


@dataclasses.dataclass(frozen=True)
class Geometry:
    """What is needed to map a preprocessed prediction back to the native NIfTI grid.

    Attributes:
      affine: (4, 4) voxel-to-world matrix of the original image.
      native_shape: (3,) NIfTI shape (X, Y, Z).
      spacing: (3,) voxel size in mm along X, Y, Z (header order, not permuted).
      resampled_shape: (2,) in-plane shape (H, W) after resampling, before crop/pad.
      offsets: (2,) index in the resampled frame of crop/pad output pixel 0 along H and W
        (positive: cropped, negative: padded).
      axes: (3,) NIfTI voxel axis of each network axis (Z, H, W).
      flips: (3,) per network axis (Z, H, W), whether it runs opposite to its voxel axis.
    """

    affine: np.ndarray
    native_shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    resampled_shape: tuple[int, int]
    offsets: tuple[int, int]
    axes: tuple[int, int, int] = (2, 0, 1)
    flips: tuple[bool, bool, bool] = (False, False, False)

    @property
    def network_shape(self) -> tuple[int, int, int]:
        """(3,) native shape in network axis order (Z, H, W)."""
        return tuple(self.native_shape[a] for a in self.axes)

    @property
    def inplane_spacing(self) -> tuple[float, float]:
        """(2,) native voxel size in mm along the network axes H and W."""
        return (self.spacing[self.axes[1]], self.spacing[self.axes[2]])

    def to_dict(self) -> dict[str, np.ndarray]:
        """Fixed-shape numeric arrays (storable as TFDS Tensor features)."""
        return {
            "affine": np.asarray(self.affine, np.float64).reshape(4, 4),
            "native_shape": np.asarray(self.native_shape, np.int64),
            "spacing": np.asarray(self.spacing, np.float64),
            "resampled_shape": np.asarray(self.resampled_shape, np.int64),
            "offsets": np.asarray(self.offsets, np.int64),
            "axes": np.asarray(self.axes, np.int64),
            "flips": np.asarray(self.flips, np.int64),
        }

    @classmethod
    def from_dict(cls, d: dict[str, np.ndarray]) -> Geometry:
        """Inverse of `to_dict`; accepts any array-likes."""

        def ints(key: str) -> tuple[int, ...]:
            return tuple(int(v) for v in np.asarray(d[key]).reshape(-1))

        return cls(
            affine=np.asarray(d["affine"], np.float64).reshape(4, 4),
            native_shape=ints("native_shape"),
            spacing=tuple(float(v) for v in np.asarray(d["spacing"]).reshape(-1)),
            resampled_shape=ints("resampled_shape"),
            offsets=ints("offsets"),
            axes=ints("axes"),
            flips=tuple(bool(v) for v in ints("flips")),
        )


@dataclasses.dataclass(frozen=True)
class Volume:
    """One preprocessed subject.

    Attributes:
      subject_id: id as in jaxcl.data.splits.
      image: (Z, H, W) float32 normalised intensities.
      label: (Z, H, W) uint8 class indices, or None for unlabelled subjects.
      geometry: mapping back to the native grid.
    """

    subject_id: str
    image: np.ndarray
    label: np.ndarray | None
    geometry: Geometry


# Pure array functions -----------------------------------------------------------------------


def normalise_intensity(volume: np.ndarray, lower: float = 1.0, upper: float = 99.0) -> np.ndarray:
    """(x - P_lower) / (P_upper - P_lower) with the volume's own percentiles; float32, unclipped.

    A constant volume (P_upper == P_lower) becomes all zeros.
    """
    low, high = np.percentile(volume, [lower, upper])
    scale = high - low if high > low else 1.0
    return ((volume - low) / scale).astype(np.float32)


def _resampled_size(size: int, spacing: float, target_resolution: float) -> int:
    """Number of samples covering the same field of view at `target_resolution` (at least 1)."""
    return max(1, int(round(size * spacing / target_resolution)))


def resize_inplane(volume: np.ndarray, shape_hw: tuple[int, int], order: int) -> np.ndarray:
    """Resizes axes 1 and 2 of (Z, H, W, ...) to `shape_hw`; order 1 linear, 0 nearest.

    Pixel-centre convention of the module docstring; all other axes are untouched.
    """
    factors = [1.0] * volume.ndim
    factors[1] = shape_hw[0] / volume.shape[1]
    factors[2] = shape_hw[1] / volume.shape[2]
    return scipy.ndimage.zoom(volume, factors, order=order, mode="nearest", grid_mode=True)


def resample_inplane(
    volume: np.ndarray, spacing_hw: tuple[float, float], target_resolution: float, order: int
) -> np.ndarray:
    """Resamples every slice of (Z, H, W) from `spacing_hw` mm to `target_resolution` mm.

    Args:
      volume: (Z, H, W).
      spacing_hw: in-plane voxel size (mm) along H and W.
      target_resolution: output in-plane voxel size (mm).
      order: 1 (linear) for images, 0 (nearest) for labels.

    Returns:
      (Z, H', W') with H' = round(H * spacing_h / target_resolution), likewise W'.
    """
    shape_hw = (
        _resampled_size(volume.shape[1], spacing_hw[0], target_resolution),
        _resampled_size(volume.shape[2], spacing_hw[1], target_resolution),
    )
    return resize_inplane(volume, shape_hw, order)


def _centre_offset(length: int, size: int) -> int:
    """Start of a centred window of `size` in `length` samples (negative when padding)."""
    return (length - size) // 2 if length >= size else -((size - length) // 2)


def _copy_window(
    source: np.ndarray, offsets: tuple[int, int], shape_hw: tuple[int, int]
) -> np.ndarray:
    """out[:, i, j] = source[:, i + offsets[0], j + offsets[1]] where inside source, else 0."""
    out = np.zeros((source.shape[0], *shape_hw, *source.shape[3:]), source.dtype)
    ranges = []
    for axis, offset in ((1, offsets[0]), (2, offsets[1])):
        start = max(0, -offset)
        stop = min(out.shape[axis], source.shape[axis] - offset)
        ranges.append((start, stop, offset))
    (h0, h1, dh), (w0, w1, dw) = ranges
    out[:, h0:h1, w0:w1] = source[:, h0 + dh : h1 + dh, w0 + dw : w1 + dw]
    return out


def crop_or_pad(volume: np.ndarray, size: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Centre crop / zero pad axes 1 and 2 of (Z, H, W, ...) to (size, size).

    Returns:
      (Z, size, size, ...) array and the offsets (index in the input of output pixel 0 along H and
      W; negative when padded). An odd excess puts the extra pixel at the end (crop) or the
      far side (pad).
    """
    offsets = (_centre_offset(volume.shape[1], size), _centre_offset(volume.shape[2], size))
    return _copy_window(volume, offsets, (size, size)), offsets


def uncrop_or_unpad(
    array: np.ndarray, offsets: tuple[int, int], shape_hw: tuple[int, int]
) -> np.ndarray:
    """Inverse of `crop_or_pad`: (Z, size, size, ...) into (Z, *shape_hw, ...), zeros outside."""
    return _copy_window(array, (-offsets[0], -offsets[1]), shape_hw)


def partition_ids(num_slices: int, n_partitions: int) -> np.ndarray:
    """(Z,) int32 partition of each slice: min(floor(i * S / N), S - 1) (docs/METHOD.md §2)."""
    if not 1 <= n_partitions <= num_slices:
        raise ValueError(
            f"n_partitions={n_partitions} must be between 1 and the number of slices "
            f"({num_slices}); lower n_partitions or drop volumes with fewer slices."
        )
    slices = np.arange(num_slices)
    return np.minimum(slices * n_partitions // num_slices, n_partitions - 1).astype(np.int32)


def n4_bias_correction(volume: np.ndarray, spacing: tuple[float, float, float]) -> np.ndarray:
    """N4 bias field correction of a 3D volume (convergence 0.001, 4 levels x 50 its).

    `spacing` is the voxel size in mm along the volume's three axes, in its axis order.

    Needs SimpleITK (`pip install jaxcl[n4]`). The foreground mask is an Otsu threshold.
    """
    try:
        import SimpleITK
    except ImportError as e:
        raise ImportError(
            "N4 bias correction needs SimpleITK: `pip install jaxcl[n4]` (or set n4=False)."
        ) from e
    # SimpleITK arrays are indexed (z, y, x).
    image = SimpleITK.GetImageFromArray(np.asarray(volume, np.float32).transpose(2, 1, 0))
    image.SetSpacing([float(s) for s in spacing])
    mask = SimpleITK.OtsuThreshold(image, 0, 1, 200)
    corrector = SimpleITK.N4BiasFieldCorrectionImageFilter()
    corrector.SetConvergenceThreshold(0.001)
    corrector.SetMaximumNumberOfIterations([50] * 4)
    corrected = corrector.Execute(image, mask)
    return SimpleITK.GetArrayFromImage(corrected).transpose(2, 1, 0)


# NIfTI files ----------------------------------------------------------------------------------


@contextlib.contextmanager
def _reading(path: str) -> Iterator[None]:
    """Turns the errors of reading NIfTI file `path` into one-line DataErrors naming it."""
    try:
        yield
    except DataError:
        raise
    except FileNotFoundError as e:
        raise DataError(f"{path} does not exist; check the dataset root.") from e
    except (nib.filebasedimages.ImageFileError, OSError, EOFError, ValueError, zlib.error) as e:
        reason = " ".join(f"{type(e).__name__}: {e}".split())
        raise DataError(
            f"{path} is not a readable NIfTI file ({reason}); it is probably corrupt or "
            "truncated, download or extract it again."
        ) from e


def _load_nifti(path: str) -> nib.Nifti1Pair:
    image = nib.load(path)
    if not isinstance(image, nib.Nifti1Pair):  # Nifti2 images are Nifti1Pair subclasses too
        raise DataError(
            f"{path} is a {type(image).__name__}, not a NIfTI file; convert it to .nii.gz."
        )
    return image


def read_header(path: str) -> tuple[tuple[int, ...], np.ndarray, tuple[float, ...]]:
    """(data shape, affine (4, 4) float64, voxel sizes) of a NIfTI file, without its data.

    Raises DataError naming the file if it is missing, not NIfTI or has an unreadable header.
    """
    with _reading(path):
        image = _load_nifti(path)
        return (
            tuple(int(n) for n in image.shape),
            np.asarray(image.affine, np.float64),
            tuple(float(z) for z in image.header.get_zooms()),
        )


def read_nifti(path: str) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
    """(data of any ndim, affine (4, 4) float64, voxel sizes) of a NIfTI file.

    The data is read here too, so corrupt or truncated compressed data is caught, not only a bad
    header. Raises DataError naming the file if it is missing, not NIfTI or unreadable.
    """
    with _reading(path):
        image = _load_nifti(path)
        data = np.asanyarray(image.dataobj)
    return data, np.asarray(image.affine, np.float64), tuple(image.header.get_zooms())


def select_channel(data: np.ndarray, channel: int | None, path: str) -> np.ndarray:
    """(X, Y, Z) from a 3D array, or from a 4D one: its `channel`, or its only channel.

    Args:
      data: (X, Y, Z) or (X, Y, Z, C) array read from `path`.
      channel: channel of 4D data to take (None: 4D data must have one channel).
      path: the file, named in errors.
    """
    if data.ndim == 4 and channel is not None:
        if not 0 <= channel < data.shape[3]:
            raise DataError(
                f"{path} has {data.shape[3]} channels, channel {channel} was requested; choose "
                "a channel that exists (config key data.channel)."
            )
        return data[..., channel]
    if data.ndim == 4 and data.shape[3] == 1:
        return data[..., 0]
    if data.ndim == 4:
        raise DataError(
            f"{path} has {data.shape[3]} channels (shape {data.shape}); choose one with the "
            "layout's channel option (config key data.channel), or store one channel per file."
        )
    if data.ndim != 3:
        raise DataError(
            f"{path} is {data.ndim}D (shape {data.shape}), a 3D (X, Y, Z) volume is expected; "
            "convert it to a 3D volume."
        )
    return data


def read_classes(
    label_path: str, layout: DatasetLayout, image_path: str, native_shape: Sequence[int]
) -> np.ndarray:
    """(X, Y, Z) uint8 class indices of a label file that covers the image's voxel grid."""
    raw = select_channel(read_nifti(label_path)[0], None, label_path)
    if raw.shape != tuple(native_shape):
        raise DataError(
            f"label {label_path} has shape {raw.shape} but image {image_path} has (X, Y, Z) "
            f"shape {tuple(native_shape)}; they must cover the same voxel grid (check that the "
            "files belong together)."
        )
    return layout.class_indices(raw, label_path)


# Preprocessing --------------------------------------------------------------------------------


def preprocess_image(
    native: np.ndarray,
    affine: np.ndarray,
    spacing: Sequence[float],
    *,
    target_resolution: float,
    image_size: int,
    slice_axis: str,
    n4: bool = False,
) -> tuple[np.ndarray, Geometry]:
    """Preprocesses one image volume (see the module docstring).

    Args:
      native: (X, Y, Z) raw intensities.
      affine: (4, 4) voxel-to-world matrix of the image.
      spacing: header voxel sizes in mm along X, Y, Z (further entries are ignored).
      target_resolution: in-plane voxel size in mm after resampling.
      image_size: in-plane size S after centre crop / zero pad.
      slice_axis: "auto" or one of `orientation.SLICE_AXES` (`orientation.resolve_slice_axis`).
      n4: apply N4 bias correction to the raw intensities (needs SimpleITK).

    Returns:
      (Z, S, S) float32 normalised image and its Geometry.

    Raises:
      DataError for non-positive spacings or a degenerate affine (the caller names the file).
    """
    if native.ndim != 3:
        raise ValueError(f"native must be (X, Y, Z), got shape {native.shape}; see select_channel.")
    spacing = tuple(float(s) for s in spacing[:3])
    if len(spacing) < 3 or min(spacing) <= 0:
        raise DataError(
            f"voxel sizes {spacing} in the image header are not 3 positive numbers; positive "
            "X, Y, Z spacings (pixdim) are needed to resample, fix the header."
        )
    axes, flips = orientation.network_orientation(
        affine, orientation.resolve_slice_axis(slice_axis, affine, spacing)
    )
    image = orientation.to_network(np.asarray(native, np.float32), axes, flips)
    if n4:
        image = n4_bias_correction(image, tuple(spacing[a] for a in axes))
    spacing_hw = (spacing[axes[1]], spacing[axes[2]])
    image = resample_inplane(normalise_intensity(image), spacing_hw, target_resolution, order=1)
    resampled_shape = (image.shape[1], image.shape[2])
    image, offsets = crop_or_pad(image, image_size)
    geometry = Geometry(
        affine=np.asarray(affine, np.float64),
        native_shape=tuple(int(n) for n in native.shape),
        spacing=spacing,
        resampled_shape=resampled_shape,
        offsets=offsets,
        axes=axes,
        flips=flips,
    )
    return image, geometry


def preprocess_label(
    classes: np.ndarray, geometry: Geometry, *, target_resolution: float, image_size: int
) -> np.ndarray:
    """(X, Y, Z) class indices -> (Z, S, S) uint8, on the grid of the image of `geometry`."""
    network = orientation.to_network(np.asarray(classes, np.uint8), geometry.axes, geometry.flips)
    network = resample_inplane(network, geometry.inplane_spacing, target_resolution, order=0)
    return crop_or_pad(network, image_size)[0]


def load_volume(
    subject: Subject,
    layout: DatasetLayout,
    *,
    target_resolution: float,
    image_size: int,
    slice_axis: str,
    n4: bool = False,
) -> Volume:
    """Reads one subject's NIfTI files and preprocesses them (docs/DATA.md).

    Args:
      subject: file paths, from `layout.find_subjects`.
      layout: the dataset's layout (label map, channel of 4D images).
      target_resolution: in-plane voxel size in mm after resampling.
      image_size: in-plane size after centre crop / zero pad.
      slice_axis: "auto" or one of `orientation.SLICE_AXES` (`orientation.resolve_slice_axis`).
      n4: apply N4 bias correction first (needs SimpleITK).

    Returns:
      Volume with image (Z, image_size, image_size) float32, label uint8 or None, geometry.
    """
    if slice_axis != "auto":
        orientation.check_slice_axis(slice_axis)
    data, affine, zooms = read_nifti(subject.image_path)
    native = select_channel(data, layout.channel, subject.image_path).astype(np.float32)
    try:
        image, geometry = preprocess_image(
            native,
            affine,
            zooms,
            target_resolution=target_resolution,
            image_size=image_size,
            slice_axis=slice_axis,
            n4=n4,
        )
    except DataError as e:
        raise DataError(f"{subject.image_path}: {e}") from e
    label = None
    if subject.label_path is not None:
        classes = read_classes(subject.label_path, layout, subject.image_path, native.shape)
        label = preprocess_label(
            classes, geometry, target_resolution=target_resolution, image_size=image_size
        )
    return Volume(subject.subject_id, image, label, geometry)


def to_native(probabilities: np.ndarray, geometry: Geometry) -> np.ndarray:
    """Maps per-class probabilities of a preprocessed volume back to the native NIfTI grid.

    Un-crops / un-pads into the resampled frame (outside the crop window: background with
    probability 1, since nothing was predicted there), resizes linearly to the native in-plane
    grid and undoes the reorientation, so argmax over the last axis is a label volume on exactly
    the original voxel grid, aligned with the original affine.

    Args:
      probabilities: (Z, S, S, C) per-class probabilities (softmax output).
      geometry: the volume's Geometry.

    Returns:
      (X, Y, Z, C) float32, in the original voxel order.
    """
    network_shape = geometry.network_shape
    if probabilities.ndim != 4 or probabilities.shape[0] != network_shape[0]:
        raise ValueError(
            f"probabilities of shape {probabilities.shape} do not match a volume of "
            f"{network_shape[0]} slices; expected (Z, S, S, C)."
        )
    probabilities = np.asarray(probabilities, np.float32)
    frame = uncrop_or_unpad(probabilities, geometry.offsets, geometry.resampled_shape)
    covered = uncrop_or_unpad(
        np.ones(probabilities.shape[:3], np.float32), geometry.offsets, geometry.resampled_shape
    )
    frame[..., 0] += 1.0 - covered
    native = resize_inplane(frame, network_shape[1:], order=1)
    return orientation.from_network(native, geometry.axes, geometry.flips)
