"""Preprocessing against hand-computed cases and a plain-numpy reference; NIfTI loading errors."""

import dataclasses
import os
import sys

import nibabel as nib
import numpy as np
import pytest
import scipy.ndimage

from jaxcl.data import preprocess, sources
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
    )
    d = geometry.to_dict()
    assert {k: (v.shape, v.dtype) for k, v in d.items()} == {
        "affine": ((4, 4), np.float64),
        "native_shape": ((3,), np.int64),
        "spacing": ((3,), np.float64),
        "resampled_shape": ((2,), np.int64),
        "offsets": ((2,), np.int64),
        "axes": ((3,), np.int64),
    }
    back = preprocess.Geometry.from_dict(d)
    np.testing.assert_array_equal(back.affine, geometry.affine)
    assert (back.native_shape, back.spacing, back.resampled_shape, back.offsets, back.axes) == (
        (40, 30, 6),
        (1.5, 1.5, 8.0),
        (44, 33),
        (6, -15),
        (2, 0, 1),
    )


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
        subject, sources.get_layout("acdc"), target_resolution=1.5, image_size=32
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
        subject, sources.get_layout("acdc"), target_resolution=target, image_size=size
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
    )
    p1, p99 = np.percentile(t2, [1, 99])
    np.testing.assert_allclose(
        volume.image, np.transpose((t2 - p1) / (p99 - p1), (2, 0, 1)), rtol=1e-5, atol=1e-6
    )
    assert volume.label is None
    three_channels = dataclasses.replace(sources.get_layout("prostate"), channel=3)
    with pytest.raises(DataError, match=r"prostate_00\.nii\.gz has 2 channels, channel 3"):
        preprocess.load_volume(
            Subject("000", path, None), three_channels, target_resolution=1.0, image_size=16
        )


def test_4d_image_with_singleton_axis_is_squeezed_other_4d_is_an_error(tmp_path):
    acdc = sources.get_layout("acdc")
    path = _save(tmp_path / "a.nii.gz", np.ones((8, 8, 2, 1), np.float32))
    volume = preprocess.load_volume(
        Subject("a", path, None), acdc, target_resolution=1.0, image_size=8
    )
    assert volume.image.shape == (2, 8, 8)
    path = _save(tmp_path / "b.nii.gz", np.ones((8, 8, 2, 5), np.float32))
    with pytest.raises(DataError, match=r"b\.nii\.gz has shape \(8, 8, 2, 5\).*3D"):
        preprocess.load_volume(Subject("b", path, None), acdc, target_resolution=1.0, image_size=8)


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
        )


def test_label_errors_name_the_files(tmp_path):
    acdc = sources.get_layout("acdc")
    image = _save(tmp_path / "img.nii.gz", np.ones((8, 8, 2), np.float32))
    wrong_shape = _save(tmp_path / "gt_shape.nii.gz", np.zeros((8, 7, 2), np.uint8))
    with pytest.raises(DataError, match=r"gt_shape\.nii\.gz has shape \(8, 7, 2\).*img\.nii\.gz"):
        preprocess.load_volume(
            Subject("1", image, wrong_shape), acdc, target_resolution=1.0, image_size=8
        )
    bad_values = np.zeros((8, 8, 2), np.uint8)
    bad_values[0, 0, 0], bad_values[1, 1, 1] = 5, 9
    wrong_values = _save(tmp_path / "gt_values.nii.gz", bad_values)
    with pytest.raises(DataError, match=r"gt_values\.nii\.gz: unexpected label values \[5, 9\]"):
        preprocess.load_volume(
            Subject("1", image, wrong_values), acdc, target_resolution=1.0, image_size=8
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
