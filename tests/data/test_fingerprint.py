"""Settings derived from the training cases, checked against hand-computed cases."""

import os
import time

import nibabel as nib
import numpy as np
import pytest

from jaxcl.data import fingerprint, orientation, preprocess, sources
from jaxcl.data.sources import DataError, Subject
from jaxcl.models import unet

ACDC = sources.get_layout("acdc")


def _write_case(folder, name, shape, spacing, *, box=None, perm=(0, 1, 2), labelled=True):
    """A zero image (+ label with class 1 in `box`, slices of (X, Y, Z) before `perm`).

    The volume is stored with its voxel axes permuted by `perm` under the matching affine, so
    every `perm` describes the same scan.
    """
    os.makedirs(folder, exist_ok=True)
    labels = np.zeros(shape, np.uint8)
    if box is not None:
        labels[box] = 1
    affine = np.zeros((4, 4))
    affine[3, 3] = 1.0
    for new_axis, old_axis in enumerate(perm):
        affine[old_axis, new_axis] = spacing[old_axis]
    paths = []
    for suffix, data in (("", np.zeros(shape, np.uint8)), ("_gt", labels)):
        image = nib.Nifti1Image(np.ascontiguousarray(np.transpose(data, perm)), affine)
        paths.append(os.path.join(folder, f"{name}{suffix}.nii.gz"))
        nib.save(image, paths[-1])
    return Subject(name, paths[0], paths[1] if labelled else None)


def _derive(subjects, target_resolution=None, image_size=None, slice_axis="auto"):
    return fingerprint.derive(
        subjects,
        ACDC,
        target_resolution=target_resolution,
        image_size=image_size,
        slice_axis=slice_axis,
    )


def _cardiac_cases(folder, perm=(0, 1, 2)):
    """Short-axis stacks (1.4, 1.4, 10) mm with a centred 40 x 30 voxel foreground box."""
    return [
        _write_case(
            folder,
            f"case{i}",
            (100, 90 + 2 * i, 6),
            (1.4, 1.4, 10.0),
            box=(slice(30, 70), slice(30, 60), slice(1, 5)),
            perm=perm,
        )
        for i in range(3)
    ]


def test_thick_slices_are_axial_and_settings_come_with_notes(tmp_path):
    derived = _derive(_cardiac_cases(tmp_path))
    assert derived.slice_axis == "auto"  # resolved per volume
    assert derived.target_resolution == 1.4
    # Foreground box 40 x 30 voxels at zoom 1: larger side 40 px, x 1.5 = 60 (its centred reach,
    # 2 * max(50 - 30, 70 - 50) = 40, is smaller) -> 64, within the 100 px images (cap 128).
    assert derived.image_size == 64
    assert derived.image_size % unet.INPUT_MULTIPLE == 0
    assert len(derived.notes) == 3
    slice_note, resolution_note, size_note = derived.notes
    assert slice_note.startswith("data.slice_axis = 'auto': each volume is sliced across")
    assert "axial for 3 of 3 cases" in slice_note and "(1.4, 1.4, 10)" in slice_note
    assert resolution_note.startswith("data.target_resolution = 1.4 mm (median in-plane")
    assert size_note.startswith("data.image_size = 64 (") and "pools 5 times" in size_note
    assert "median 60 px" in size_note and "3 labelled cases" in size_note


def test_permuted_storage_gives_the_same_settings(tmp_path):
    reference = _derive(_cardiac_cases(tmp_path / "ras"))
    permuted = _derive(_cardiac_cases(tmp_path / "permuted", perm=(2, 0, 1)))
    assert permuted == reference


def test_isotropic_volume_is_axial_from_its_header_only(tmp_path, monkeypatch):
    subject = _write_case(tmp_path, "brain", (180, 220, 180), (1.0, 1.0, 1.0))
    monkeypatch.setattr(preprocess, "read_nifti", None)  # no image or label data is read
    start = time.perf_counter()
    derived = _derive([subject], image_size=192)
    assert time.perf_counter() - start < 0.5
    assert derived == fingerprint.Fingerprint(1.0, 192, "auto", derived.notes)
    assert len(derived.notes) == 2 and "axial for 1 of 1 cases" in derived.notes[0]
    assert orientation.auto_slice_axis((1.0, 1.05, 1.0)) == "axial"  # isotropic within 10%


def test_thick_first_axis_is_sagittal(tmp_path):
    subjects = [_write_case(tmp_path, "s", (6, 40, 36), (10.0, 1.4, 1.4), box=np.s_[:, 5:35, 5:30])]
    derived = _derive(subjects)
    assert (derived.slice_axis, derived.target_resolution) == ("auto", 1.4)
    assert "sagittal for 1 of 1 cases" in derived.notes[0]
    # Sagittal slices: H = A (Y), W = S (Z); box 30 x 25 px -> 45 -> 64 (the minimum).
    assert derived.image_size == 64


def test_auto_slices_each_volume_across_its_own_thick_axis(tmp_path):
    """Stacks whose thick axis lies along different RAS axes (oblique short-axis cine)."""
    subjects = [
        _write_case(tmp_path, "s", (6, 40, 36), (10.0, 1.4, 1.4)),
        _write_case(tmp_path, "a", (40, 36, 6), (1.4, 1.4, 10.0)),
    ]
    derived = _derive(subjects, image_size=64)
    assert "sagittal for 1, axial for 1 of 2 cases" in derived.notes[0]
    assert derived.target_resolution == 1.4  # in-plane of each volume's own slices
    shapes = [
        preprocess.load_volume(
            s, ACDC, target_resolution=1.4, image_size=64, slice_axis="auto"
        ).image.shape
        for s in subjects
    ]
    assert shapes == [(6, 64, 64), (6, 64, 64)]


def test_image_size_covers_the_foreground_of_the_median_case(tmp_path):
    shape, spacing = (200, 150, 4), (1.0, 1.0, 5.0)
    subjects = [
        # Centred 60 x 40 voxel boxes: 60 * 1.5 = 90 px.
        _write_case(tmp_path, "a", shape, spacing, box=np.s_[70:130, 55:95, 1:3]),
        _write_case(tmp_path, "b", shape, spacing, box=np.s_[72:132, 55:95, 1:3]),
        # Off centre: the centred window must reach row 180: 2 * (180 - 100) = 160 px.
        _write_case(tmp_path, "c", shape, spacing, box=np.s_[140:180, 60:90, 1:3]),
        _write_case(tmp_path, "d", shape, spacing, box=np.s_[140:180, 60:90, 1:3]),
        _write_case(tmp_path, "e", shape, spacing, box=np.s_[140:180, 60:90, 1:3]),
        _write_case(tmp_path, "unlabelled", shape, spacing, labelled=False),
    ]
    derived = _derive(subjects, target_resolution=1.0)
    assert derived.image_size == 160  # median 160 px; the images (cap 224) allow it
    assert len(derived.notes) == 2 and "5 labelled cases" in derived.notes[1]
    for subject in subjects[:5]:
        volume = preprocess.load_volume(
            subject,
            ACDC,
            target_resolution=derived.target_resolution,
            image_size=derived.image_size,
            slice_axis=derived.slice_axis,
        )
        labels = np.asarray(nib.load(subject.label_path).dataobj)
        assert volume.image.shape[1] < shape[0]  # rows were cropped ...
        assert volume.label.sum() == labels.sum()  # ... but no foreground voxel


def test_image_size_is_capped_by_the_images_and_falls_back_to_them(tmp_path):
    full = np.s_[:, :, :]
    small = [_write_case(tmp_path, f"s{i}", (70, 60, 3), (1.0, 1.0, 4.0), box=full) for i in "ab"]
    # Foreground fills the 70 px image: 105 px needed, capped at ceil32(70) = 96.
    assert _derive(small, target_resolution=1.0).image_size == 96
    unlabelled = [
        _write_case(tmp_path, "u", (130, 60, 3), (1.0, 1.0, 4.0), labelled=False),
        _write_case(tmp_path, "e", (130, 60, 3), (1.0, 1.0, 4.0)),  # labelled, no foreground
    ]
    derived = _derive(unlabelled, target_resolution=0.5, slice_axis="axial")
    assert derived.image_size == 288  # 130 mm at 0.5 mm = 260 px -> 288
    assert "no labelled case with foreground" in derived.notes[0]


def test_given_values_are_kept_without_notes_or_reading_files(tmp_path):
    missing = [Subject("x", str(tmp_path / "missing.nii.gz"), None)]
    assert _derive(missing, 1.25, 96, "coronal") == fingerprint.Fingerprint(1.25, 96, "coronal", ())
    assert _derive(missing, 1.25, 96, "auto") == fingerprint.Fingerprint(1.25, 96, "auto", ())
    with pytest.raises(DataError, match=r"missing\.nii\.gz does not exist"):
        _derive(missing, None, 96, "auto")
    subjects = _cardiac_cases(tmp_path)
    assert _derive(subjects, 2.0, None, "axial").target_resolution == 2.0
    assert _derive(subjects, None, 128, "axial").image_size == 128


def test_errors(tmp_path):
    with pytest.raises(DataError, match=r"data\.slice_axis='transverse' is invalid"):
        _derive([], slice_axis="transverse")
    with pytest.raises(DataError, match="no training cases"):
        _derive([])
    flat = str(tmp_path / "flat.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((4, 4), np.uint8), np.eye(4)), flat)
    with pytest.raises(DataError, match=r"flat\.nii\.gz is 2D"):
        _derive([Subject("f", flat, None)])
    degenerate = str(tmp_path / "degenerate.nii.gz")
    header = nib.Nifti1Header()  # an sform alone can be singular; nibabel refuses such a qform
    header.set_data_shape((4, 4, 4))
    header.set_sform(np.diag([1.0, 0.0, 1.0, 1.0]), code=1)
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.uint8), None, header), degenerate)
    with pytest.raises(DataError, match=r"degenerate\.nii\.gz: the affine .* is degenerate"):
        _derive([Subject("d", degenerate, None)])
