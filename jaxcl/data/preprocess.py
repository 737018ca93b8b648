"""Per-volume preprocessing (SPEC §7) and its inverse for predictions (SPEC §9).

Forward, per volume: percentile normalisation (x - P1) / (P99 - P1) -> each slice resampled
in-plane to the target resolution (linear for images, nearest for labels; slice spacing unchanged)
-> centre crop / zero pad to the target size. Optional N4 bias correction runs first, on the raw
intensities.

Array layout. NIfTI data is indexed (X, Y, Z) with Z the slice axis; the network arrays are
(Z, H, W) = transpose(data, (2, 0, 1)), so H is the NIfTI X axis and W the Y axis. Volumes are not
reoriented to a canonical orientation: every step is a pure in-plane index operation, so
`to_native` maps predictions back onto exactly the original voxel grid and the prediction NIfTI
reuses the original affine and header unchanged (SPEC §9). The cost is that slices of differently
oriented scans may appear flipped or transposed relative to each other, which the fine-tuning
augmentations (flips, rotations) already cover.

Resampling uses `scipy.ndimage.zoom(..., grid_mode=True, mode="nearest")` in both directions:
output pixel o of an axis resized from n to m samples reads input coordinate
(o + 0.5) * n / m - 0.5 (pixel centres of the same field of view), clamped to the edge. With the
same convention forwards and back, resizing to the native shape inverts resampling up to
interpolation; at zoom 1 it is the identity.
"""

from __future__ import annotations

import dataclasses
import zlib

import nibabel as nib
import numpy as np
import scipy.ndimage

from jaxcl.data.sources import DataError, DatasetLayout, Subject

# (X, Y, Z) NIfTI axes -> (Z, H, W) network axes.
_NIFTI_TO_NETWORK = (2, 0, 1)


@dataclasses.dataclass(frozen=True)
class Geometry:
    """What is needed to map a preprocessed prediction back to the native NIfTI grid.

    Attributes:
      affine: (4, 4) voxel-to-world matrix of the original image.
      native_shape: (3,) NIfTI shape (X, Y, Z).
      spacing: (3,) voxel size in mm along X, Y, Z.
      resampled_shape: (2,) in-plane shape (H, W) after resampling, before crop/pad.
      offsets: (2,) index in the resampled frame of crop/pad output pixel 0 along H and W
        (positive: cropped, negative: padded).
      axes: (3,) permutation taking the NIfTI axes to the network axes (Z, H, W).
    """

    affine: np.ndarray
    native_shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    resampled_shape: tuple[int, int]
    offsets: tuple[int, int]
    axes: tuple[int, int, int] = _NIFTI_TO_NETWORK

    def to_dict(self) -> dict[str, np.ndarray]:
        """Fixed-shape numeric arrays (storable as TFDS Tensor features)."""
        return {
            "affine": np.asarray(self.affine, np.float64).reshape(4, 4),
            "native_shape": np.asarray(self.native_shape, np.int64),
            "spacing": np.asarray(self.spacing, np.float64),
            "resampled_shape": np.asarray(self.resampled_shape, np.int64),
            "offsets": np.asarray(self.offsets, np.int64),
            "axes": np.asarray(self.axes, np.int64),
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
    """(Z,) int32 partition of each slice: min(floor(i * S / N), S - 1) (SPEC §2)."""
    if not 1 <= n_partitions <= num_slices:
        raise ValueError(
            f"n_partitions={n_partitions} must be between 1 and the number of slices "
            f"({num_slices}); lower n_partitions or drop volumes with fewer slices."
        )
    slices = np.arange(num_slices)
    return np.minimum(slices * n_partitions // num_slices, n_partitions - 1).astype(np.int32)


def n4_bias_correction(volume: np.ndarray, spacing: tuple[float, float, float]) -> np.ndarray:
    """N4 bias field correction of an (X, Y, Z) volume (convergence 0.001, 4 levels x 50 its).

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


def _read_nifti(path: str) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
    """(data, affine (4, 4), voxel sizes) of a NIfTI file; DataError naming it if unreadable.

    The data is read here too, so corrupt or truncated compressed data is caught, not only a bad
    header.
    """
    try:
        image = nib.load(path)
        data = np.asanyarray(image.dataobj)
    except FileNotFoundError as e:
        raise DataError(f"{path} does not exist; check the dataset root.") from e
    except (nib.filebasedimages.ImageFileError, OSError, EOFError, ValueError, zlib.error) as e:
        raise DataError(
            f"{path} is not a readable NIfTI file ({type(e).__name__}: {e}); it is probably "
            "corrupt or truncated, download or extract it again."
        ) from e
    return data, np.asarray(image.affine, np.float64), tuple(image.header.get_zooms())


def _as_3d(data: np.ndarray, channel: int | None, path: str) -> np.ndarray:
    """(X, Y, Z) from a 3D array or a 4D one (take `channel`, or squeeze a singleton 4th axis)."""
    if data.ndim == 4 and channel is not None:
        if channel >= data.shape[3]:
            raise DataError(
                f"{path} has {data.shape[3]} channels, channel {channel} was requested; choose "
                "a channel that exists."
            )
        return data[..., channel]
    if data.ndim == 4 and data.shape[3] == 1:
        return data[..., 0]
    if data.ndim != 3:
        raise DataError(
            f"{path} has shape {data.shape}, a 3D (X, Y, Z) volume was expected; convert it to "
            "3D (one channel, one time frame)."
        )
    return data


def load_volume(
    subject: Subject,
    layout: DatasetLayout,
    *,
    target_resolution: float,
    image_size: int,
    n4: bool = False,
) -> Volume:
    """Reads one subject's NIfTI files and preprocesses them (SPEC §7).

    Args:
      subject: file paths, from `layout.find_subjects`.
      layout: the dataset's layout (label map, channel of 4D images).
      target_resolution: in-plane voxel size in mm after resampling.
      image_size: in-plane size after centre crop / zero pad.
      n4: apply N4 bias correction first (needs SimpleITK).

    Returns:
      Volume with image (Z, image_size, image_size) float32, label uint8 or None, geometry.
    """
    data, affine, zooms = _read_nifti(subject.image_path)
    native = _as_3d(data, layout.channel, subject.image_path).astype(np.float32)
    spacing = tuple(float(s) for s in zooms[:3])
    if len(spacing) < 3 or min(spacing) <= 0:
        raise DataError(
            f"{subject.image_path} has voxel sizes {spacing} in its header; positive X, Y, Z "
            "spacings (pixdim) are needed to resample, fix the header."
        )
    if n4:
        native = n4_bias_correction(native, spacing)
    image = np.transpose(normalise_intensity(native), _NIFTI_TO_NETWORK)
    image = resample_inplane(image, spacing[:2], target_resolution, order=1)
    resampled_shape = (image.shape[1], image.shape[2])
    image, offsets = crop_or_pad(image, image_size)

    label = None
    if subject.label_path is not None:
        raw = _as_3d(_read_nifti(subject.label_path)[0], None, subject.label_path)
        if raw.shape != native.shape:
            raise DataError(
                f"label {subject.label_path} has shape {raw.shape} but image "
                f"{subject.image_path} has (X, Y, Z) shape {native.shape}; they must cover the "
                "same voxel grid (check that the files belong together)."
            )
        classes = np.transpose(layout.class_indices(raw, subject.label_path), _NIFTI_TO_NETWORK)
        classes = resample_inplane(classes, spacing[:2], target_resolution, order=0)
        label, _ = crop_or_pad(classes, image_size)

    geometry = Geometry(
        affine=affine,
        native_shape=tuple(int(n) for n in native.shape),
        spacing=spacing,
        resampled_shape=resampled_shape,
        offsets=offsets,
    )
    return Volume(subject.subject_id, image, label, geometry)


def to_native(probabilities: np.ndarray, geometry: Geometry) -> np.ndarray:
    """Maps per-class probabilities of a preprocessed volume back to the native NIfTI grid.

    Un-crops / un-pads into the resampled frame (outside the crop window: background with
    probability 1, since nothing was predicted there), resizes linearly to the native in-plane
    grid and transposes to NIfTI axis order, so argmax over the last axis is a label volume
    aligned with the original affine.

    Args:
      probabilities: (Z, S, S, C) per-class probabilities (softmax output).
      geometry: the volume's Geometry.

    Returns:
      (X, Y, Z, C) float32.
    """
    native_network = tuple(geometry.native_shape[a] for a in geometry.axes)
    if probabilities.ndim != 4 or probabilities.shape[0] != native_network[0]:
        raise ValueError(
            f"probabilities of shape {probabilities.shape} do not match a volume of "
            f"{native_network[0]} slices; expected (Z, S, S, C)."
        )
    probabilities = np.asarray(probabilities, np.float32)
    frame = uncrop_or_unpad(probabilities, geometry.offsets, geometry.resampled_shape)
    covered = uncrop_or_unpad(
        np.ones(probabilities.shape[:3], np.float32), geometry.offsets, geometry.resampled_shape
    )
    frame[..., 0] += 1.0 - covered
    native = resize_inplane(frame, native_network[1:], order=1)
    back = tuple(int(i) for i in np.argsort(geometry.axes))
    return np.transpose(native, (*back, 3))
