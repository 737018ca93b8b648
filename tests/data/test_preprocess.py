"""Preprocessing against hand-computed cases and a plain-numpy reference; NIfTI loading errors."""

import dataclasses
import os
import sys

import nibabel as nib
import numpy as np
import pytest
import scipy.ndimage

from jaxcl.data import orientation, preprocess, sources, synthetic
from jaxcl.data.sources import DataError, Subject


def _save(path, data, spacing=(1.0, 1.0, 1.0)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = (-10.0, 5.0, 2.0)
    image = nib.Nifti1Image(np.asarray(data), affine)
    image.header.set_zooms(tuple(spacing) + tuple([1.0] * (np.ndim(data) - 3)))
    nib.save(image, str(path))
    return str(path)


def _reference_resize_axis(x, axis, out_len, order):
    """Plain loop: output o reads input coordinate (o + 0.5) * n / m - 0.5, clamped to the edge."""
    x = np.moveaxis(np.asarray(x, np.float64), axis, 0)
    n = x.shape[0]
    out = np.empty((out_len, *x.shape[1:]))
    for o in range(out_len):
        c = min(max((o + 0.5) * n / out_len - 0.5, 0.0), n - 1.0)
        if order == 0:
            out[o] = x[int(np.floor(c + 0.5))]
        else:
            lo = int(np.floor(c))
            hi = min(lo + 1, n - 1)
            out[o] = (1 - (c - lo)) * x[lo] + (c - lo) * x[hi]
    return np.moveaxis(out, 0, axis)


def _blob_labels(shape_xyz):
    """Nested ellipses with classes 1..3 on a background, shifted per slice."""
    x, y = np.meshgrid(np.arange(shape_xyz[0]), np.arange(shape_xyz[1]), indexing="ij")
    labels = np.zeros(shape_xyz, np.uint8)
    for z in range(shape_xyz[2]):
        cx, cy = shape_xyz[0] * 0.45 + z, shape_xyz[1] * 0.55 - z
        r = ((x - cx) / (shape_xyz[0] * 0.3)) ** 2 + ((y - cy) / (shape_xyz[1] * 0.25)) ** 2
        labels[..., z][r < 1.0] = 1
        labels[..., z][r < 0.5] = 2
        labels[..., z][r < 0.2] = 3
    return labels


# Pure array functions -----------------------------------------------------------------------


def test_normalise_intensity_uses_volume_percentiles():
    volume = np.arange(101, dtype=np.float64).reshape(1, 1, 101)
    out = preprocess.normalise_intensity(volume)
    # Hand: P1 = 1, P99 = 99 of 0..100 -> (x - 1) / 98.
    assert out.dtype == np.float32
    np.testing.assert_allclose(out[0, 0, [0, 1, 50, 99, 100]], [-1 / 98, 0, 49 / 98, 1, 99 / 98])
    rng = np.random.default_rng(0)
    volume = rng.gamma(2.0, 50.0, size=(3, 20, 30))
    p1, p99 = np.percentile(volume, 1), np.percentile(volume, 99)
    np.testing.assert_allclose(
        preprocess.normalise_intensity(volume), (volume - p1) / (p99 - p1), rtol=1e-5
    )
    p5, p95 = np.percentile(volume, 5), np.percentile(volume, 95)
    np.testing.assert_allclose(
        preprocess.normalise_intensity(volume, 5, 95), (volume - p5) / (p95 - p5), rtol=1e-5
    )
    np.testing.assert_array_equal(preprocess.normalise_intensity(np.full((2, 3, 3), 7.0)), 0.0)


def test_resample_inplane_hand_cases():
    row = np.array([0.0, 1.0, 2.0, 3.0]).reshape(1, 1, 4)
    # Spacing 1 mm -> 0.5 mm doubles W; pixel centres: coordinates -0.25, 0.25, 0.75, ...
    np.testing.assert_allclose(
        preprocess.resample_inplane(row, (1.0, 1.0), 0.5, order=1)[0],
        [[0, 0.25, 0.75, 1.25, 1.75, 2.25, 2.75, 3]] * 2,
    )
    np.testing.assert_array_equal(
        preprocess.resample_inplane(row, (1.0, 1.0), 0.5, order=0)[0],
        [[0, 0, 1, 1, 2, 2, 3, 3]] * 2,
    )
    # 0.5 mm -> 1 mm halves: averages of neighbours at coordinates 0.5, 2.5, ...
    row8 = np.arange(8.0).reshape(1, 1, 8)
    np.testing.assert_allclose(
        preprocess.resample_inplane(row8, (0.5, 0.5), 1.0, order=1)[0, 0], [0.5, 2.5, 4.5, 6.5]
    )
    # Nearest 6 -> 4 reads coordinates 0.25, 1.75, 3.25, 4.75.
    row6 = np.arange(6.0).reshape(1, 1, 6)
    np.testing.assert_array_equal(
        preprocess.resample_inplane(row6, (1.0, 1.0), 1.5, order=0)[0, 0], [0, 2, 3, 5]
    )


@pytest.mark.parametrize("order", [0, 1])
def test_resample_inplane_matches_reference_loop_and_keeps_slices(order):
    rng = np.random.default_rng(1)
    volume = rng.normal(size=(3, 23, 17))
    out = preprocess.resample_inplane(volume, (1.3, 0.9), 1.1, order=order)
    assert out.shape == (3, round(23 * 1.3 / 1.1), round(17 * 0.9 / 1.1)) == (3, 27, 14)
    expected = _reference_resize_axis(volume, 1, 27, order)
    expected = _reference_resize_axis(expected, 2, 14, order)
    np.testing.assert_allclose(out, expected, atol=1e-12)
    np.testing.assert_array_equal(
        preprocess.resample_inplane(volume, (1.1, 1.1), 1.1, order), volume
    )


def test_crop_or_pad_hand_cases():
    volume = np.arange(25).reshape(1, 5, 5)
    cropped, offsets = preprocess.crop_or_pad(volume, 3)
    assert offsets == (1, 1)
    np.testing.assert_array_equal(cropped[0], [[6, 7, 8], [11, 12, 13], [16, 17, 18]])
    small = np.arange(1, 7).reshape(1, 2, 3)
    padded, offsets = preprocess.crop_or_pad(small, 5)
    # H: 2 -> 5 pads 1 before, 2 after; W: 3 -> 5 pads 1 before, 1 after.
    assert offsets == (-1, -1)
    expected = np.zeros((5, 5), int)
    expected[1:3, 1:4] = [[1, 2, 3], [4, 5, 6]]
    np.testing.assert_array_equal(padded[0], expected)
    mixed = np.arange(2 * 6 * 2).reshape(2, 6, 2)
    out, offsets = preprocess.crop_or_pad(mixed, 3)
    assert offsets == (1, 0) and out.shape == (2, 3, 3)
    np.testing.assert_array_equal(out[:, :, :2], mixed[:, 1:4, :])
    np.testing.assert_array_equal(out[:, :, 2], 0)


def test_uncrop_or_unpad_inverts_crop_or_pad():
    rng = np.random.default_rng(2)
    volume = rng.normal(size=(2, 9, 4, 3))  # trailing channel axis
    window, offsets = preprocess.crop_or_pad(volume, 6)
    restored = preprocess.uncrop_or_unpad(window, offsets, (9, 4))
    np.testing.assert_array_equal(restored[:, 1:7], volume[:, 1:7])
    np.testing.assert_array_equal(restored[:, [0, 7, 8]], 0)


def test_partition_ids_hand_table():
    table = {
        (10, 4): [0, 0, 0, 1, 1, 2, 2, 2, 3, 3],
        (4, 4): [0, 1, 2, 3],
        (7, 3): [0, 0, 0, 1, 1, 2, 2],
        (5, 1): [0, 0, 0, 0, 0],
        (9, 2): [0, 0, 0, 0, 0, 1, 1, 1, 1],
    }
    for (num_slices, n_partitions), expected in table.items():
        ids = preprocess.partition_ids(num_slices, n_partitions)
        assert ids.dtype == np.int32
        np.testing.assert_array_equal(ids, expected)
    for num_slices, n_partitions in [(3, 4), (5, 0), (0, 1)]:
        with pytest.raises(ValueError, match="n_partitions"):
            preprocess.partition_ids(num_slices, n_partitions)


def test_geometry_dict_round_trip_has_fixed_shapes():
    geometry = preprocess.Geometry(
        affine=np.diag([1.5, 1.5, 8.0, 1.0]),
        native_shape=(40, 30, 6),
        spacing=(1.5, 1.5, 8.0),
        resampled_shape=(44, 33),
        offsets=(6, -15),
        axes=(1, 2, 0),
        flips=(True, False, True),
    )
    d = geometry.to_dict()
    assert {k: (v.shape, v.dtype) for k, v in d.items()} == {
        "affine": ((4, 4), np.float64),
        "native_shape": ((3,), np.int64),
        "spacing": ((3,), np.float64),
        "resampled_shape": ((2,), np.int64),
        "offsets": ((2,), np.int64),
        "axes": ((3,), np.int64),
        "flips": ((3,), np.int64),
    }
    back = preprocess.Geometry.from_dict(d)
    np.testing.assert_array_equal(back.affine, geometry.affine)
    assert dataclasses.astuple(dataclasses.replace(back, affine=None)) == (
        None,
        (40, 30, 6),
        (1.5, 1.5, 8.0),
        (44, 33),
        (6, -15),
        (1, 2, 0),
        (True, False, True),
    )
    assert back.network_shape == (30, 6, 40) and back.inplane_spacing == (8.0, 1.5)


# Loading ------------------------------------------------------------------------------------


def test_load_volume_at_zoom_one_matches_hand_pipeline(tmp_path):
    rng = np.random.default_rng(3)
    image = rng.normal(100.0, 20.0, size=(40, 30, 3)).astype(np.float32)
    labels = _blob_labels((40, 30, 3))
    subject = Subject(
        "001",
        _save(tmp_path / "img.nii.gz", image, (1.5, 1.5, 10.0)),
        _save(tmp_path / "gt.nii.gz", labels, (1.5, 1.5, 10.0)),
    )
    volume = preprocess.load_volume(
        subject,
        sources.get_layout("acdc"),
        target_resolution=1.5,
        image_size=32,
        slice_axis="axial",
    )
    p1, p99 = np.percentile(image, [1, 99])
    normalised = np.transpose((image - p1) / (p99 - p1), (2, 0, 1))
    # X 40 -> 32 crops 4 on each side; Y 30 -> 32 pads 1 on each side.
    expected_image = np.zeros((3, 32, 32), np.float32)
    expected_image[:, :, 1:31] = normalised[:, 4:36, :]
    expected_label = np.zeros((3, 32, 32), np.uint8)
    expected_label[:, :, 1:31] = np.transpose(labels, (2, 0, 1))[:, 4:36, :]
    assert volume.subject_id == "001"
    assert volume.image.dtype == np.float32 and volume.label.dtype == np.uint8
    np.testing.assert_allclose(volume.image, expected_image, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(volume.label, expected_label)
    g = volume.geometry
    assert (g.native_shape, g.spacing, g.resampled_shape, g.offsets) == (
        (40, 30, 3),
        (1.5, 1.5, 10.0),
        (40, 30),
        (4, -1),
    )
    np.testing.assert_array_equal(g.affine, nib.load(subject.image_path).affine)


def _one_hot(label, num_classes):
    return np.eye(num_classes, dtype=np.float32)[label]


@pytest.mark.parametrize(
    ("spacing", "target", "size", "min_agreement"),
    [
        ((1.5, 1.5, 10.0), 1.5, 128, 1.0),  # zoom 1, pad only: exact.
        ((1.0, 1.25, 6.0), 0.7, 192, 0.98),  # upsampling by 1.43 / 1.79 (measured: 1.0)
        ((0.8, 0.8, 6.0), 1.36719, 96, 0.98),  # downsampling by 0.59 (measured: 0.987)
        ((1.3, 1.1, 6.0), 1.0, 160, 0.98),  # mixed (measured: 0.9993)
    ],
)
def test_preprocess_then_to_native_recovers_labels(tmp_path, spacing, target, size, min_agreement):
    labels = _blob_labels((120, 100, 4))
    image = labels.astype(np.float32) * 50 + 10
    subject = Subject(
        "x",
        _save(tmp_path / "i.nii.gz", image, spacing),
        _save(tmp_path / "l.nii.gz", labels, spacing),
    )
    volume = preprocess.load_volume(
        subject,
        sources.get_layout("acdc"),
        target_resolution=target,
        image_size=size,
        slice_axis="axial",
    )
    assert volume.label.shape == (4, size, size)
    native = preprocess.to_native(_one_hot(volume.label, 4), volume.geometry)
    assert native.shape == (120, 100, 4, 4) and native.dtype == np.float32
    np.testing.assert_allclose(native.sum(-1), 1.0, atol=1e-5)
    predicted = np.argmax(native, -1)
    agreement = np.mean(predicted == labels)
    assert agreement >= min_agreement, agreement
    # Boundary effects only: every predicted class occurs in the original within one resampled
    # pixel (radius r native voxels) of the voxel, in the same slice.
    r = int(np.ceil(target / min(spacing[:2])))
    nearby = np.stack(
        [
            scipy.ndimage.maximum_filter(labels == c, size=(2 * r + 1, 2 * r + 1, 1))
            for c in range(4)
        ],
        -1,
    )
    assert np.take_along_axis(nearby, predicted[..., None], -1).all()


def test_to_native_fills_cropped_border_with_background():
    geometry = preprocess.Geometry(
        affine=np.eye(4),
        native_shape=(6, 4, 2),
        spacing=(1.0, 1.0, 1.0),
        resampled_shape=(6, 4),
        offsets=(1, 0),
    )
    probabilities = np.zeros((2, 4, 4, 2), np.float32)
    probabilities[..., 1] = 1.0  # everything predicted foreground inside the 4x4 window
    native = preprocess.to_native(probabilities, geometry)
    expected = np.ones((6, 4, 2), np.int64)
    expected[[0, 5]] = 0  # X rows 0 and 5 were cropped away
    np.testing.assert_array_equal(np.argmax(native, -1), expected)
    with pytest.raises(ValueError, match=r"\(3, 4, 4, 2\).*2 slices"):
        preprocess.to_native(np.zeros((3, 4, 4, 2)), geometry)


def test_prostate_4d_image_uses_t2_channel(tmp_path):
    t2 = np.random.default_rng(4).normal(size=(16, 16, 3)).astype(np.float32)
    adc = np.random.default_rng(5).normal(size=(16, 16, 3)).astype(np.float32)
    path = _save(tmp_path / "imagesTr" / "prostate_00.nii.gz", np.stack([t2, adc], -1))
    volume = preprocess.load_volume(
        Subject("000", path, None),
        sources.get_layout("prostate"),
        target_resolution=1.0,
        image_size=16,
        slice_axis="axial",
    )
    p1, p99 = np.percentile(t2, [1, 99])
    np.testing.assert_allclose(
        volume.image, np.transpose((t2 - p1) / (p99 - p1), (2, 0, 1)), rtol=1e-5, atol=1e-6
    )
    assert volume.label is None
    three_channels = dataclasses.replace(sources.get_layout("prostate"), channel=3)
    with pytest.raises(DataError, match=r"prostate_00\.nii\.gz has 2 channels, channel 3"):
        preprocess.load_volume(
            Subject("000", path, None),
            three_channels,
            target_resolution=1.0,
            image_size=16,
            slice_axis="axial",
        )


def test_4d_image_with_singleton_axis_is_squeezed_other_4d_is_an_error(tmp_path):
    acdc = sources.get_layout("acdc")
    path = _save(tmp_path / "a.nii.gz", np.ones((8, 8, 2, 1), np.float32))
    volume = preprocess.load_volume(
        Subject("a", path, None), acdc, target_resolution=1.0, image_size=8, slice_axis="axial"
    )
    assert volume.image.shape == (2, 8, 8)
    path = _save(tmp_path / "b.nii.gz", np.ones((8, 8, 2, 5), np.float32))
    with pytest.raises(DataError, match=r"b\.nii\.gz has 5 channels.*data\.channel"):
        preprocess.load_volume(
            Subject("b", path, None), acdc, target_resolution=1.0, image_size=8, slice_axis="axial"
        )


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_nifti_is_a_data_error_naming_the_file(tmp_path, damage):
    path = _save(tmp_path / "img.nii.gz", np.random.default_rng(6).normal(size=(30, 30, 4)))
    content = (tmp_path / "img.nii.gz").read_bytes()
    damaged = content[: len(content) // 2] if damage == "truncate" else b"not a nifti" * 20
    (tmp_path / "img.nii.gz").write_bytes(damaged)
    with pytest.raises(DataError, match=r"img\.nii\.gz is not a readable NIfTI.*again"):
        preprocess.load_volume(
            Subject("1", path, None),
            sources.get_layout("acdc"),
            target_resolution=1.0,
            image_size=8,
            slice_axis="axial",
        )


def test_label_errors_name_the_files(tmp_path):
    acdc = sources.get_layout("acdc")
    image = _save(tmp_path / "img.nii.gz", np.ones((8, 8, 2), np.float32))
    wrong_shape = _save(tmp_path / "gt_shape.nii.gz", np.zeros((8, 7, 2), np.uint8))
    with pytest.raises(DataError, match=r"gt_shape\.nii\.gz has shape \(8, 7, 2\).*img\.nii\.gz"):
        preprocess.load_volume(
            Subject("1", image, wrong_shape),
            acdc,
            target_resolution=1.0,
            image_size=8,
            slice_axis="axial",
        )
    bad_values = np.zeros((8, 8, 2), np.uint8)
    bad_values[0, 0, 0], bad_values[1, 1, 1] = 5, 9
    wrong_values = _save(tmp_path / "gt_values.nii.gz", bad_values)
    with pytest.raises(DataError, match=r"gt_values\.nii\.gz: unexpected label values \[5, 9\]"):
        preprocess.load_volume(
            Subject("1", image, wrong_values),
            acdc,
            target_resolution=1.0,
            image_size=8,
            slice_axis="axial",
        )


def test_n4_without_simpleitk_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "SimpleITK", None)
    with pytest.raises(ImportError, match=r"pip install jaxcl\[n4\]"):
        preprocess.n4_bias_correction(np.ones((4, 4, 2), np.float32), (1.0, 1.0, 1.0))


def test_n4_reduces_a_smooth_bias_field():
    pytest.importorskip("SimpleITK")
    x, y, z = np.meshgrid(np.arange(32), np.arange(32), np.arange(4), indexing="ij")
    tissue = np.where((x - 16) ** 2 + (y - 16) ** 2 < 14**2, 100.0, 0.0)
    bias = np.exp(0.6 * (x - 16) / 16)
    corrected = preprocess.n4_bias_correction((tissue * bias).astype(np.float32), (1, 1, 3))
    inside = tissue > 0

    def variation(v):
        return np.std(v[inside]) / np.mean(v[inside])

    assert variation(corrected) < 0.5 * variation(tissue * bias)


# Orientation --------------------------------------------------------------------------------


def _network_to_voxel_loop(shape_xyz, axes, flips):
    """{network index (z, h, w): voxel index (x, y, z)} written out index by index."""
    network_shape = [shape_xyz[a] for a in axes]
    mapping = {}
    for index in np.ndindex(*network_shape):
        voxel = [0, 0, 0]
        for n in range(3):
            voxel[axes[n]] = network_shape[n] - 1 - index[n] if flips[n] else index[n]
        mapping[index] = tuple(voxel)
    return mapping


def test_orientation_hand_cases():
    # LPS storage (the DICOM convention): X runs right -> left, Y anterior -> posterior.
    assert orientation.canonical_orientation(np.diag([-1.0, -2.0, 3.0, 1.0])) == (
        (0, 1, 2),
        (True, True, False),
    )
    # Voxel X points superior, Y left (R reversed), Z anterior.
    affine = np.eye(4)
    affine[:3, :3] = [[0, -1, 0], [0, 0, 1], [1, 0, 0]]
    assert orientation.canonical_orientation(affine) == ((1, 2, 0), (True, False, False))
    expected = {
        "axial": ((0, 1, 2), (False, True, False)),  # (S, R, A)
        "sagittal": ((1, 2, 0), (True, False, False)),  # (R, A, S)
        "coronal": ((2, 1, 0), (False, True, False)),  # (A, R, S)
    }
    for slice_axis, axes_and_flips in expected.items():
        assert orientation.network_orientation(affine, slice_axis) == axes_and_flips
    assert orientation.network_orientation(np.eye(4), "axial") == ((2, 0, 1), (False,) * 3)
    with pytest.raises(DataError, match="degenerate.*qform/sform"):
        orientation.canonical_orientation(np.diag([1.0, 0.0, 1.0, 1.0]))
    # "auto" picks each volume's thick axis before the orientation is worked out.
    assert orientation.resolve_slice_axis("auto", affine, (1.0, 1.0, 3.0)) == "coronal"  # Z is A
    assert orientation.resolve_slice_axis("auto", np.eye(4), (5.0, 1.0, 1.0)) == "sagittal"
    assert orientation.resolve_slice_axis("coronal", np.eye(4), (5.0, 1.0, 1.0)) == "coronal"
    with pytest.raises(DataError, match=r"slice_axis='auto' is not one of"):
        orientation.network_orientation(np.eye(4), "auto")


def test_auto_slice_axis_hand_cases():
    assert orientation.auto_slice_axis((1.4, 1.4, 10.0)) == "axial"
    assert orientation.auto_slice_axis((10.0, 1.4, 1.4)) == "sagittal"
    assert orientation.auto_slice_axis((0.7, 4.0, 0.7)) == "coronal"
    assert orientation.auto_slice_axis((1.09, 1.0, 1.0)) == "axial"  # isotropic within 10%
    assert orientation.auto_slice_axis((1.2, 1.0, 1.0)) == "sagittal"
    assert orientation.auto_slice_axis((5.0, 5.0, 1.0)) == "coronal"  # ties prefer coronal


@pytest.mark.parametrize(
    ("axes", "flips"), [((2, 0, 1), (False, True, True)), ((1, 2, 0), (True, False, True))]
)
def test_to_network_and_back_match_an_index_loop(axes, flips):
    volume = np.random.default_rng(7).normal(size=(4, 3, 5, 2))  # trailing channel axis
    network = orientation.to_network(volume, axes, flips)
    for index, voxel in _network_to_voxel_loop(volume.shape[:3], axes, flips).items():
        np.testing.assert_array_equal(network[index], volume[voxel])
    np.testing.assert_array_equal(orientation.from_network(network, axes, flips), volume)


def test_to_native_undoes_axes_and_flips():
    axes, flips = (1, 2, 0), (True, False, True)
    geometry = preprocess.Geometry(
        affine=np.eye(4),
        native_shape=(4, 3, 5),
        spacing=(1.0, 1.0, 1.0),
        resampled_shape=(5, 4),
        offsets=(0, 0),
        axes=axes,
        flips=flips,
    )
    probabilities = np.random.default_rng(8).random((3, 5, 4, 2)).astype(np.float32)
    native = preprocess.to_native(probabilities, geometry)
    assert native.shape == (4, 3, 5, 2)
    for index, voxel in _network_to_voxel_loop((4, 3, 5), axes, flips).items():
        np.testing.assert_array_equal(native[voxel], probabilities[index])


def _rotation(degrees, axis):
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    i, j = [a for a in range(3) if a != axis]
    rotation = np.eye(3)
    rotation[[i, i, j, j], [i, j, i, j]] = c, -s, s, c
    return rotation


def _oblique_affine(spacing):
    """Voxel axes close to R, A, S but rotated 20 degrees about S and 10 about R."""
    affine = np.eye(4)
    affine[:3, :3] = _rotation(10, 0) @ _rotation(20, 2) @ np.diag(spacing)
    affine[:3, 3] = (-30.0, 12.0, 5.0)
    return affine


def _stored_as(data, affine, spacing, perm, flips):
    """The same scan stored with voxel axes permuted by `perm`, then reversed where `flips`.

    New voxel axis j is old axis perm[j]; its index i maps to old index i, or n - 1 - i if
    flipped, so the new affine is affine @ (new voxel index -> old voxel index).
    """
    stored = np.transpose(data, perm)[
        tuple(slice(None, None, -1) if f else slice(None) for f in flips)
    ]
    new_to_old = np.zeros((4, 4))
    new_to_old[3, 3] = 1.0
    for new_axis, (old_axis, flip) in enumerate(zip(perm, flips, strict=True)):
        new_to_old[old_axis, new_axis] = -1.0 if flip else 1.0
        new_to_old[old_axis, 3] = data.shape[old_axis] - 1 if flip else 0.0
    return stored, affine @ new_to_old, tuple(spacing[a] for a in perm)


def _save_scan(folder, name, image, labels, affine, spacing):
    os.makedirs(folder, exist_ok=True)
    paths = []
    for suffix, data in (("", image), ("_gt", labels)):
        nifti = nib.Nifti1Image(np.ascontiguousarray(data), affine)
        nifti.header.set_zooms(spacing)
        paths.append(os.path.join(folder, f"{name}{suffix}.nii.gz"))
        nib.save(nifti, paths[-1])
    return Subject(name, *paths)


def _prediction(image):
    """A deterministic (Z, S, S, 4) softmax computed from the preprocessed image only."""
    logits = np.stack([-image, image, image**2 - 0.5, np.sin(3.0 * image)], -1)
    logits = np.exp(logits - logits.max(-1, keepdims=True))
    return logits / logits.sum(-1, keepdims=True)


_STORAGES = [
    ((0, 1, 2), (False, False, False)),
    ((2, 0, 1), (False, False, False)),
    ((1, 0, 2), (True, False, False)),
    ((0, 2, 1), (True, False, True)),
    ((2, 1, 0), (True, True, True)),
]


@pytest.mark.parametrize("slice_axis", ["axial", "coronal"])
@pytest.mark.parametrize(("perm", "flips"), _STORAGES)
def test_any_stored_orientation_gives_the_same_slices_and_prediction(
    tmp_path, slice_axis, perm, flips
):
    rng = np.random.default_rng(9)
    spacing = (1.2, 0.9, 5.0)
    labels = _blob_labels((40, 30, 6))
    image = (labels * 30.0 + rng.normal(100.0, 10.0, size=labels.shape)).astype(np.float32)
    affine = _oblique_affine(spacing)
    acdc = sources.get_layout("acdc")
    settings = {"target_resolution": 1.0, "image_size": 40, "slice_axis": slice_axis}
    reference = preprocess.load_volume(
        _save_scan(tmp_path / "reference", "ref", image, labels, affine, spacing), acdc, **settings
    )
    stored_image, stored_affine, stored_spacing = _stored_as(image, affine, spacing, perm, flips)
    stored_labels = _stored_as(labels, affine, spacing, perm, flips)[0]
    volume = preprocess.load_volume(
        _save_scan(
            tmp_path / "stored", "s", stored_image, stored_labels, stored_affine, stored_spacing
        ),
        acdc,
        **settings,
    )

    assert reference.image.shape[0] == (6 if slice_axis == "axial" else 30)
    np.testing.assert_array_equal(volume.image, reference.image)
    np.testing.assert_array_equal(volume.label, reference.label)
    num_slices = volume.image.shape[0]
    np.testing.assert_array_equal(
        preprocess.partition_ids(num_slices, 3),
        preprocess.partition_ids(reference.image.shape[0], 3),
    )
    assert volume.geometry.native_shape == stored_image.shape
    np.testing.assert_allclose(volume.geometry.spacing, stored_spacing, rtol=1e-6)

    # Mapped back, the prediction is the reference prediction stored the same way, voxel by voxel.
    predicted = np.argmax(preprocess.to_native(_prediction(volume.image), volume.geometry), -1)
    expected = np.argmax(preprocess.to_native(_prediction(reference.image), reference.geometry), -1)
    expected = _stored_as(expected, affine, spacing, perm, flips)[0]
    assert predicted.shape == stored_image.shape and len(np.unique(predicted)) > 1
    np.testing.assert_array_equal(predicted, expected)


@pytest.mark.parametrize("slice_axis", ["axial", "sagittal", "coronal"])
@pytest.mark.parametrize(("perm", "flips"), _STORAGES[2:])
def test_round_trip_at_zoom_one_recovers_labels_in_any_orientation(
    tmp_path, slice_axis, perm, flips
):
    labels = _blob_labels((24, 20, 6))
    spacing = (1.5, 1.5, 1.5)
    stored, affine, stored_spacing = _stored_as(
        labels, _oblique_affine(spacing), spacing, perm, flips
    )
    subject = _save_scan(tmp_path, "x", stored.astype(np.float32), stored, affine, stored_spacing)
    volume = preprocess.load_volume(
        subject,
        sources.get_layout("acdc"),
        target_resolution=1.5,
        image_size=32,  # pad only
        slice_axis=slice_axis,
    )
    native = preprocess.to_native(_one_hot(volume.label, 4), volume.geometry)
    np.testing.assert_array_equal(np.argmax(native, -1), stored)


def test_lps_volume_is_flipped_into_ras_hand_case(tmp_path):
    image = np.random.default_rng(10).normal(size=(6, 5, 3)).astype(np.float32)
    affine = np.diag([-1.0, -1.0, 2.0, 1.0])
    subject = _save_scan(tmp_path, "lps", image, np.zeros(image.shape, np.uint8), affine, (1, 1, 2))
    volume = preprocess.load_volume(
        subject, sources.get_layout("acdc"), target_resolution=1.0, image_size=6, slice_axis="axial"
    )
    p1, p99 = np.percentile(image, [1, 99])
    expected = np.zeros((3, 6, 6), np.float32)
    # H = R: voxel X reversed; W = A: voxel Y reversed, padded from 5 to 6 (extra at the end).
    expected[:, :, :5] = np.transpose((image - p1) / (p99 - p1), (2, 0, 1))[:, ::-1, ::-1]
    np.testing.assert_allclose(volume.image, expected, rtol=1e-5, atol=1e-6)
    assert (volume.geometry.axes, volume.geometry.flips) == ((2, 0, 1), (False, True, True))


def test_synthetic_axial_is_bit_identical_to_the_plain_transpose(tmp_path):
    """The built-in data (diagonal positive affines) gives the arrays of the transpose pipeline."""
    synthetic.generate(str(tmp_path), num_subjects=1, seed=0)
    layout = sources.get_layout("synthetic")
    (subject,) = layout.find_subjects(str(tmp_path))
    volume = preprocess.load_volume(
        subject, layout, target_resolution=1.36719, image_size=64, slice_axis="axial"
    )
    # The pipeline before reorientation existed: transpose (2, 0, 1) only.
    native_image = nib.load(subject.image_path)
    spacing = native_image.header.get_zooms()[:2]
    image = np.transpose(
        preprocess.normalise_intensity(np.asarray(native_image.dataobj, np.float32)), (2, 0, 1)
    )
    image, offsets = preprocess.crop_or_pad(
        preprocess.resample_inplane(image, spacing, 1.36719, order=1), 64
    )
    labels = np.transpose(np.asarray(nib.load(subject.label_path).dataobj, np.uint8), (2, 0, 1))
    labels = preprocess.crop_or_pad(
        preprocess.resample_inplane(labels, spacing, 1.36719, order=0), 64
    )[0]
    np.testing.assert_array_equal(volume.image, image)
    np.testing.assert_array_equal(volume.label, labels)
    assert volume.geometry.offsets == offsets
    assert (volume.geometry.axes, volume.geometry.flips) == ((2, 0, 1), (False, False, False))


def test_bad_spacing_is_a_data_error_and_load_volume_names_the_file(tmp_path, monkeypatch):
    with pytest.raises(DataError, match=r"voxel sizes \(1.0, 0.0, 2.0\).*fix the header"):
        preprocess.preprocess_image(
            np.ones((4, 4, 2)),
            np.eye(4),
            (1.0, 0.0, 2.0),
            target_resolution=1.0,
            image_size=4,
            slice_axis="axial",
        )
    # nibabel repairs zero pixdims when loading, so the header is faked here.
    path = _save(tmp_path / "flat.nii.gz", np.ones((4, 4, 2), np.float32))
    monkeypatch.setattr(
        preprocess, "read_nifti", lambda p: (np.ones((4, 4, 2)), np.eye(4), (1.0, -1.0, 1.0))
    )
    with pytest.raises(DataError, match=r"flat\.nii\.gz: voxel sizes \(1.0, -1.0, 1.0\)"):
        preprocess.load_volume(
            Subject("1", path, None),
            sources.get_layout("acdc"),
            target_resolution=1.0,
            image_size=4,
            slice_axis="axial",
        )


# Reading NIfTI files ------------------------------------------------------------------------


def _one_line_error(call):
    with pytest.raises(DataError) as error:
        call()
    message = str(error.value)
    assert "\n" not in message
    return message


def test_read_nifti_errors_name_the_file(tmp_path):
    missing = str(tmp_path / "missing.nii.gz")
    assert _one_line_error(lambda: preprocess.read_nifti(missing)).startswith(missing)
    text = tmp_path / "notes.txt"
    text.write_text("not an image\n")
    message = _one_line_error(lambda: preprocess.read_nifti(str(text)))
    assert message.startswith(f"{text} is not a readable NIfTI file")
    mgh = str(tmp_path / "brain.mgz")
    nib.save(nib.MGHImage(np.zeros((4, 4, 4), np.float32), np.eye(4)), mgh)
    assert _one_line_error(lambda: preprocess.read_nifti(mgh)) == (
        f"{mgh} is a MGHImage, not a NIfTI file; convert it to .nii.gz."
    )
    truncated = tmp_path / "cut.nii.gz"
    _save(truncated, np.random.default_rng(11).normal(size=(30, 30, 4)))
    truncated.write_bytes(truncated.read_bytes()[:-200])
    message = _one_line_error(lambda: preprocess.read_nifti(str(truncated)))
    assert message.startswith(f"{truncated} is not a readable NIfTI file") and "again" in message
    assert _one_line_error(lambda: preprocess.read_header(missing)).startswith(missing)
    assert _one_line_error(lambda: preprocess.read_header(mgh)).startswith(f"{mgh} is a MGHImage")


def test_read_header_and_read_nifti_agree(tmp_path):
    path = _save(tmp_path / "ok.nii.gz", np.arange(60, dtype=np.int16).reshape(3, 4, 5), (2, 3, 4))
    data, affine, zooms = preprocess.read_nifti(path)
    np.testing.assert_array_equal(data, np.arange(60).reshape(3, 4, 5))
    shape, header_affine, header_zooms = preprocess.read_header(path)
    assert shape == (3, 4, 5) and header_zooms == zooms == (2.0, 3.0, 4.0)
    np.testing.assert_array_equal(header_affine, affine)
    np.testing.assert_array_equal(affine[:3, :3], np.diag([2.0, 3.0, 4.0]))


def test_select_channel_cases_and_errors(tmp_path):
    volume = np.arange(24).reshape(2, 3, 4)
    np.testing.assert_array_equal(preprocess.select_channel(volume, None, "a.nii"), volume)
    np.testing.assert_array_equal(preprocess.select_channel(volume, 1, "a.nii"), volume)
    four_d = np.stack([volume, -volume], -1)
    np.testing.assert_array_equal(preprocess.select_channel(four_d, 1, "a.nii"), -volume)
    np.testing.assert_array_equal(preprocess.select_channel(four_d[..., :1], None, "a.nii"), volume)
    flat = nib.Nifti1Image(np.zeros((2, 3), np.int16), np.eye(4))
    nib.save(flat, tmp_path / "flat.nii.gz")
    two = _save(tmp_path / "two.nii.gz", four_d.astype(np.int16))
    cases = {
        f"{tmp_path / 'flat.nii.gz'} is 2D (shape (2, 3)), a 3D (X, Y, Z) volume is expected": (
            str(tmp_path / "flat.nii.gz"),
            None,
        ),
        f"{two} has 2 channels (shape (2, 3, 4, 2)); choose one": (two, None),
        f"{two} has 2 channels, channel 2 was requested": (two, 2),
        f"{two} has 2 channels, channel -1 was requested": (two, -1),
    }
    for start, (path, channel) in cases.items():
        data = preprocess.read_nifti(path)[0]
        message = _one_line_error(
            lambda d=data, c=channel, p=path: preprocess.select_channel(d, c, p)
        )
        assert message.startswith(start), message


def test_isotropic_head_volume_is_sliced_axially_in_any_storage(tmp_path):
    """A 1 mm isotropic 3D scan (head MRI-like), stored LPS with its slices along voxel Y."""
    rng = np.random.default_rng(0)
    ras = rng.normal(size=(36, 44, 30)).astype(np.float32)  # (R, A, S) voxels of 1 mm
    stored = np.transpose(ras[::-1], (0, 2, 1))  # voxel axes: L (R reversed), S, A
    affine = np.zeros((4, 4))
    affine[0, 0], affine[2, 1], affine[1, 2], affine[3, 3] = -1.0, 1.0, 1.0, 1.0
    path = str(tmp_path / "head.nii.gz")
    nib.save(nib.Nifti1Image(stored, affine), path)
    layout = sources.get_layout("acdc")
    volume = preprocess.load_volume(
        Subject("head", path, None), layout, target_resolution=1.0, image_size=64, slice_axis="auto"
    )
    assert volume.image.shape == (30, 64, 64)  # one slice per S position
    assert volume.geometry.axes == (1, 0, 2) and volume.geometry.flips == (False, True, False)
    expected = preprocess.crop_or_pad(
        np.transpose(preprocess.normalise_intensity(ras), (2, 0, 1)), 64
    )[0]
    np.testing.assert_allclose(volume.image, expected, atol=1e-5)
