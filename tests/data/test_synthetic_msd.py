"""Tests of the synthetic MSD / nnU-Net folder: layout, dataset.json, reoriented storage.

The reference for a reoriented file is nibabel's own `as_closest_canonical` (and a brute-force
voxel -> world -> voxel walk), compared with the same subject written canonically and with the
arrays of jaxcl.data.synthetic.synthesize_subject.
"""

import itertools
import json
import os

import nibabel as nib
import numpy as np
import pytest

from jaxcl.data import sources, synthetic, synthetic_msd

CASE_IDS = ["heart_000", "heart_001", "heart_002", "heart_003"]  # 3 labelled, 1 unlabelled
CLASS_NAMES = ("background", "RV", "Myo", "LV")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """(reoriented root, canonical root): every case reoriented, and the same cases unrotated."""
    root = str(tmp_path_factory.mktemp("msd"))
    case_ids = synthetic_msd.write_msd_folder(
        root, num_labelled=3, num_unlabelled=1, seed=0, reoriented_every=1
    )
    assert case_ids == CASE_IDS
    canonical_root = str(tmp_path_factory.mktemp("msd_canonical"))
    for case in synthetic_msd._plan_cases(3, 1, reoriented_every=0):
        subject = synthetic.synthesize_subject(0, case.subject_index)
        synthetic_msd._write_case(case, subject, canonical_root)
    return root, canonical_root


def _image_path(root, case_id, labelled=True):
    return os.path.join(root, "imagesTr" if labelled else "imagesTs", f"{case_id}_0000.nii.gz")


def _label_path(root, case_id):
    return os.path.join(root, "labelsTr", f"{case_id}.nii.gz")


def _files(root):
    return sorted(
        os.path.relpath(os.path.join(folder, name), root)
        for folder, _, names in os.walk(root)
        for name in names
    )


def test_plan_reorients_every_nth_case_of_each_group_with_varied_orientations():
    cases = synthetic_msd._plan_cases(7, 4, reoriented_every=3)
    assert [c.case_id for c in cases] == [f"heart_{k:03d}" for k in range(11)]
    assert [c.subject_index for c in cases] == list(range(11))
    assert [c.labelled for c in cases] == [True] * 7 + [False] * 4
    reoriented = [c for c in cases if c.orientation != synthetic_msd._CANONICAL]
    assert [c.case_id for c in reoriented] == [
        "heart_000",
        "heart_003",
        "heart_006",
        "heart_007",
        "heart_010",
    ]
    assert [(c.orientation.axes, c.orientation.flips) for c in reoriented] == [
        ((1, 0, 2), (0,)),
        ((2, 0, 1), ()),
        ((0, 1, 2), (2,)),
        ((1, 0, 2), (0,)),
        ((2, 0, 1), ()),
    ]
    assert all(
        c.orientation == synthetic_msd._CANONICAL
        for c in synthetic_msd._plan_cases(3, 2, reoriented_every=0)
    )


@pytest.mark.parametrize("orientation", synthetic_msd._REORIENTATIONS)
def test_reorient_keeps_every_voxel_at_its_world_position(orientation):
    volume = np.arange(3 * 4 * 5).reshape(3, 4, 5)
    affine = np.array(
        [[1.5, 0, 0, -7.0], [0, 1.5, 0, 2.0], [0, 0, 9.0, 30.0], [0, 0, 0, 1]], np.float64
    )
    stored, stored_affine = synthetic_msd._reorient(volume, affine, orientation)
    assert stored.shape == tuple(volume.shape[a] for a in orientation.axes)
    for j in itertools.product(*(range(n) for n in stored.shape)):
        world = stored_affine @ np.array([*j, 1.0])
        i = np.linalg.solve(affine, world)[:3]
        np.testing.assert_allclose(i, np.round(i), atol=1e-9)
        assert stored[j] == volume[tuple(np.round(i).astype(int))]


def test_layout_and_dataset_json_v2(folders):
    root, _ = folders
    assert _files(root) == [
        "dataset.json",
        *(f"imagesTr/{c}_0000.nii.gz" for c in CASE_IDS[:3]),
        "imagesTs/heart_003_0000.nii.gz",
        *(f"labelsTr/{c}.nii.gz" for c in CASE_IDS[:3]),
    ]
    with open(os.path.join(root, "dataset.json"), encoding="utf-8") as f:
        description = json.load(f)
    assert description["channel_names"] == {"0": "cine-MRI"}
    assert description["labels"] == {"background": 0, "RV": 1, "Myo": 2, "LV": 3}
    assert description["numTraining"] == 3
    assert description["file_ending"] == ".nii.gz"
    assert isinstance(description["name"], str) and description["name"]


def test_canonical_case_holds_the_subjects_ed_frame(folders):
    _, canonical_root = folders
    subject = synthetic.synthesize_subject(0, 1)
    image = nib.load(_image_path(canonical_root, "heart_001"))
    labels = nib.load(_label_path(canonical_root, "heart_001"))
    np.testing.assert_array_equal(
        np.asarray(image.dataobj), np.transpose(subject.images[1], (1, 2, 0))
    )
    np.testing.assert_array_equal(
        np.asarray(labels.dataobj), np.transpose(subject.labels[1], (1, 2, 0))
    )
    np.testing.assert_allclose(np.diag(image.affine)[:3], subject.spacing)
    assert nib.aff2axcodes(image.affine) == ("R", "A", "S")


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_reoriented_case_is_stored_differently_but_has_the_same_anatomy(folders, case_id):
    root, canonical_root = folders
    labelled = case_id != "heart_003"
    stored = nib.load(_image_path(root, case_id, labelled))
    reference = nib.load(_image_path(canonical_root, case_id, labelled))
    assert stored.shape != reference.shape or not np.allclose(stored.affine, reference.affine)
    canonical = nib.as_closest_canonical(stored)
    np.testing.assert_array_equal(canonical.get_fdata(), reference.get_fdata())
    np.testing.assert_allclose(canonical.affine, reference.affine, atol=1e-9)
    np.testing.assert_allclose(
        sorted(stored.header.get_zooms()), sorted(reference.header.get_zooms())
    )


@pytest.mark.parametrize("case_id", CASE_IDS[:3])
def test_labels_are_reoriented_with_their_image(folders, case_id):
    root, canonical_root = folders
    image = nib.load(_image_path(root, case_id))
    labels = nib.load(_label_path(root, case_id))
    assert labels.shape == image.shape
    np.testing.assert_array_equal(labels.affine, image.affine)
    assert set(np.unique(np.asarray(labels.dataobj)).tolist()) == {0, 1, 2, 3}
    np.testing.assert_array_equal(
        nib.as_closest_canonical(labels).get_fdata(),
        nib.load(_label_path(canonical_root, case_id)).get_fdata(),
    )


def test_unlabelled_case_has_no_label_and_its_own_subject(folders):
    root, _ = folders
    assert not os.path.exists(_label_path(root, "heart_003"))
    assert not os.path.exists(os.path.join(root, "labelsTs"))
    unlabelled = nib.as_closest_canonical(nib.load(_image_path(root, "heart_003", False)))
    for case_id in CASE_IDS[:3]:
        labelled = nib.as_closest_canonical(nib.load(_image_path(root, case_id)))
        assert unlabelled.shape != labelled.shape or not np.array_equal(
            unlabelled.get_fdata(), labelled.get_fdata()
        )


def test_folder_layout_finds_every_case(folders):
    root, _ = folders
    layout = sources.get_layout("folder", root)
    assert layout.class_names == CLASS_NAMES
    assert layout.label_values == (0, 1, 2, 3)
    assert layout.channel is None
    subjects = layout.find_subjects(root)
    assert [s.subject_id for s in subjects] == CASE_IDS
    for subject in subjects[:3]:
        assert subject.image_path == _image_path(root, subject.subject_id)
        assert subject.label_path == _label_path(root, subject.subject_id)
    assert subjects[3].image_path == _image_path(root, "heart_003", labelled=False)
    assert subjects[3].label_path is None


def test_v1_dataset_json_and_determinism(folders, tmp_path):
    root, _ = folders
    other = str(tmp_path / "v1")
    for _ in range(2):  # the second run replaces the files of the first
        synthetic_msd.write_msd_folder(
            other,
            num_labelled=1,
            num_unlabelled=1,
            seed=0,
            reoriented_every=1,
            dataset_json_form="v1",
        )
    assert _files(other) == [
        "dataset.json",
        "imagesTr/heart_000_0000.nii.gz",
        "imagesTs/heart_001_0000.nii.gz",
        "labelsTr/heart_000.nii.gz",
    ]
    with open(os.path.join(other, "dataset.json"), encoding="utf-8") as f:
        description = json.load(f)
    assert description["modality"] == {"0": "MRI"}
    assert description["labels"] == {"0": "background", "1": "RV", "2": "Myo", "3": "LV"}
    assert description["numTraining"] == 1 and description["numTest"] == 1
    assert description["training"] == [
        {"image": "./imagesTr/heart_000.nii.gz", "label": "./labelsTr/heart_000.nii.gz"}
    ]
    assert description["test"] == ["./imagesTs/heart_001.nii.gz"]
    layout = sources.get_layout("folder", other)
    assert layout.class_names == CLASS_NAMES
    assert [(s.subject_id, s.label_path is not None) for s in layout.find_subjects(other)] == [
        ("heart_000", True),
        ("heart_001", False),
    ]
    # Same seed: heart_000 is byte-identical to the fixture's, whatever the other counts.
    for first, second in ((_image_path, _image_path), (_label_path, _label_path)):
        with open(first(root, "heart_000"), "rb") as a, open(second(other, "heart_000"), "rb") as b:
            assert a.read() == b.read()


def test_other_seed_gives_other_images(folders, tmp_path):
    root, _ = folders
    synthetic_msd.write_msd_folder(str(tmp_path), num_labelled=1, seed=1, reoriented_every=1)
    assert not np.array_equal(
        nib.load(_image_path(root, "heart_000")).get_fdata(),
        nib.load(_image_path(str(tmp_path), "heart_000")).get_fdata(),
    )


def test_bad_arguments_and_foreign_files_are_refused(tmp_path):
    with pytest.raises(ValueError, match="num_labelled=0"):
        synthetic_msd.write_msd_folder(str(tmp_path), num_labelled=0)
    with pytest.raises(ValueError, match="dataset_json_form='v3'"):
        synthetic_msd.write_msd_folder(str(tmp_path), num_labelled=1, dataset_json_form="v3")
    os.makedirs(tmp_path / "imagesTr")
    (tmp_path / "imagesTr" / "heart_009_0000.nii.gz").write_bytes(b"")
    with pytest.raises(ValueError, match="heart_009_0000.nii.gz is not one of the cases"):
        synthetic_msd.write_msd_folder(str(tmp_path), num_labelled=1)
    assert _files(str(tmp_path)) == ["imagesTr/heart_009_0000.nii.gz"]


def test_command_line(tmp_path):
    synthetic_msd.main(
        ["--out", str(tmp_path), "--num-labelled", "1", "--num-unlabelled", "0", "--seed", "2"]
    )
    assert _files(str(tmp_path)) == [
        "dataset.json",
        "imagesTr/heart_000_0000.nii.gz",
        "labelsTr/heart_000.nii.gz",
    ]
