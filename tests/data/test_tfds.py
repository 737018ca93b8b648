"""Tests for jaxcl.data.tfds: stored volumes match direct preprocessing, prepare once and reuse,
a failed build is never reused, split ids are checked, and the synthetic set is generated."""

import os

import nibabel as nib
import numpy as np
import pytest

from jaxcl.data import preprocess, sources
from jaxcl.data import tfds as volumes_tfds

IMAGE_SIZE = 32


def _write_acdc_subject(root, number, rng, labelled=True):
    """An ACDC-layout patient folder with a small random (X, Y, Z) image and label."""
    folder = os.path.join(root, f"patient{number:03d}")
    os.makedirs(folder)
    shape = (int(rng.integers(30, 44)), int(rng.integers(30, 44)), int(rng.integers(4, 8)))
    affine = np.diag([1.5, 1.4, 8.0, 1.0])
    image = rng.normal(100.0, 20.0, size=shape).astype(np.float32)
    nib.save(
        nib.Nifti1Image(image, affine), os.path.join(folder, f"patient{number:03d}_frame01.nii.gz")
    )
    if labelled:
        label = rng.integers(0, 4, size=shape).astype(np.uint8)
        nib.save(
            nib.Nifti1Image(label, affine),
            os.path.join(folder, f"patient{number:03d}_frame01_gt.nii.gz"),
        )
    with open(os.path.join(folder, "Info.cfg"), "w") as f:
        f.write("ED: 1\nES: 1\nGroup: NOR\n")


@pytest.fixture()
def acdc_root(tmp_path):
    root = str(tmp_path / "acdc")
    rng = np.random.default_rng(0)
    for number in (1, 2):
        _write_acdc_subject(root, number, rng)
    _write_acdc_subject(root, 3, rng, labelled=False)
    return root


def _load(root, data_dir, **kwargs):
    return volumes_tfds.load_volumes(
        "acdc",
        root=root,
        data_dir=data_dir,
        target_resolution=1.36719,
        image_size=IMAGE_SIZE,
        slice_axis="axial",
        **kwargs,
    )


def test_stored_volumes_match_preprocessing_and_are_reused(acdc_root, tmp_path, monkeypatch):
    data_dir = str(tmp_path / "prepared")
    volumes = _load(acdc_root, data_dir)
    assert [v.subject_id for v in volumes] == ["001", "002", "003"]

    layout = sources.get_layout("acdc", acdc_root)
    for volume, subject in zip(volumes, layout.find_subjects(acdc_root), strict=True):
        expected = preprocess.load_volume(
            subject, layout, target_resolution=1.36719, image_size=IMAGE_SIZE, slice_axis="axial"
        )
        assert volume.image.dtype == np.float32 and volume.image.shape[1:] == (
            IMAGE_SIZE,
            IMAGE_SIZE,
        )
        np.testing.assert_array_equal(volume.image, expected.image)
        if expected.label is None:
            assert volume.label is None
        else:
            np.testing.assert_array_equal(volume.label, expected.label)
        for key, value in expected.geometry.to_dict().items():
            np.testing.assert_array_equal(volume.geometry.to_dict()[key], value, err_msg=key)

    # Reuse: the second call must not read or preprocess anything.
    def no_rebuild(*args, **kwargs):
        raise AssertionError("the prepared dataset was rebuilt")

    monkeypatch.setattr(preprocess, "load_volume", no_rebuild)
    again = _load(None, data_dir, subject_ids=["002"])
    assert [v.subject_id for v in again] == ["002"]
    np.testing.assert_array_equal(again[0].image, volumes[1].image)


def test_failed_build_is_not_reused(acdc_root, tmp_path, monkeypatch):
    data_dir = str(tmp_path / "prepared")
    loaded = []
    real_load_volume = preprocess.load_volume

    def counting_load_volume(subject, *args, **kwargs):
        loaded.append(subject.subject_id)
        return real_load_volume(subject, *args, **kwargs)

    monkeypatch.setattr(preprocess, "load_volume", counting_load_volume)
    image_path = os.path.join(acdc_root, "patient002", "patient002_frame01.nii.gz")
    with open(image_path, "rb") as f:
        good = f.read()
    with open(image_path, "wb") as f:
        f.write(good[: len(good) // 2])  # truncated download
    with pytest.raises(sources.DataError, match="patient002_frame01"):
        _load(acdc_root, data_dir)
    assert loaded == ["001", "002"]  # failed midway: 001 was already written
    written = [name for _, _, names in os.walk(data_dir) for name in names]
    assert "dataset_info.json" not in written and not any(n.endswith(".tfrecord") for n in written)

    with open(image_path, "wb") as f:
        f.write(good)
    assert [v.subject_id for v in _load(acdc_root, data_dir)] == ["001", "002", "003"]


def test_parallel_preparation_stores_the_same_volumes_and_reports_bad_files(tmp_path):
    root = str(tmp_path / "acdc")
    rng = np.random.default_rng(1)
    count = 2 * volumes_tfds.VOLUMES_PER_WORKER  # enough volumes for 2 worker processes
    for number in range(1, count + 1):
        _write_acdc_subject(root, number, rng, labelled=number % 5 != 0)
    one = _load(root, str(tmp_path / "one"), prepare_workers=1)
    two = _load(root, str(tmp_path / "two"), prepare_workers=2)
    assert (
        [v.subject_id for v in two]
        == [v.subject_id for v in one]
        == [f"{n:03d}" for n in range(1, count + 1)]
    )
    for a, b in zip(one, two, strict=True):
        np.testing.assert_array_equal(a.image, b.image)
        assert (a.label is None) == (b.label is None)
        if a.label is not None:
            np.testing.assert_array_equal(a.label, b.label)

    image_path = os.path.join(root, "patient007", "patient007_frame01.nii.gz")
    with open(image_path, "r+b") as f:
        f.truncate(os.path.getsize(image_path) // 2)
    with pytest.raises(sources.DataError, match="patient007_frame01"):
        _load(root, str(tmp_path / "bad"), prepare_workers=2)


def test_split_ids_and_labels_are_checked(acdc_root, tmp_path):
    data_dir = str(tmp_path / "prepared")
    with pytest.raises(sources.DataError, match=r"\['005'\]"):
        _load(acdc_root, data_dir, subject_ids=["001", "005"])
    with pytest.raises(sources.DataError, match=r"\['003'\] have no label"):
        _load(acdc_root, data_dir, subject_ids=["001", "003"], require_labels=True)


def test_volume_parts_stream_each_wanted_volume_once(acdc_root, tmp_path):
    data_dir = str(tmp_path / "prepared")
    by_id = {v.subject_id: v for v in _load(acdc_root, data_dir)}
    builder = volumes_tfds.prepared_builder(
        "acdc",
        root=None,
        data_dir=data_dir,
        target_resolution=1.36719,
        image_size=IMAGE_SIZE,
        slice_axis="axial",
    )
    for num_parts, expected_parts in ((2, 2), (5, 3)):  # at most one part per stored volume
        parts = volumes_tfds.volume_parts(builder, ["003", "001"], num_parts)
        assert len(parts) == expected_parts
        streamed = [volume for read in parts for volume in read()]
        assert sorted(v.subject_id for v in streamed) == ["001", "003"]
        for volume in streamed:
            np.testing.assert_array_equal(volume.image, by_id[volume.subject_id].image)
    stored = volumes_tfds.prepared_gigabytes(builder, 3)
    assert stored * 1e9 > sum(v.image.nbytes for v in by_id.values())  # images, labels, geometry
    assert volumes_tfds.prepared_gigabytes(builder, 1) == pytest.approx(stored / 3)


def test_missing_root_names_the_download(tmp_path):
    with pytest.raises(sources.DataError, match="not prepared.*creatis"):
        _load(None, str(tmp_path / "prepared"))
    with pytest.raises(sources.DataError, match="does not exist"):
        _load(str(tmp_path / "nowhere"), str(tmp_path / "prepared"))


def test_config_names_separate_variants():
    def name(dataset="acdc", **kwargs):
        settings = {"target_resolution": 1.36719, "image_size": 192, "slice_axis": "axial"}
        return volumes_tfds.volumes_config(dataset, **{**settings, **kwargs}).name

    names = {
        name(),
        name(image_size=160),
        name(target_resolution=1.5),
        name(slice_axis="sagittal"),
        name(frame="ES"),
        name(n4=True),
        name("synthetic", seed=1),
    }
    assert len(names) == 7
    assert name(target_resolution=3, image_size=64) == "acdc-ED-axial-3mm-64px"
    with pytest.raises(sources.DataError, match="frame"):
        name("prostate", target_resolution=0.625, frame="ES")
    assert name(slice_axis="auto") == "acdc-ED-auto-1.36719mm-192px"
    with pytest.raises(sources.DataError, match="slice_axis='oblique'"):
        name(slice_axis="oblique")


def test_synthetic_is_generated(tmp_path):
    volumes = volumes_tfds.load_volumes(
        "synthetic",
        root=None,
        data_dir=str(tmp_path),
        image_size=64,
        slice_axis="axial",
        num_subjects=1,
    )
    assert [v.subject_id for v in volumes] == ["000"]
    (volume,) = volumes
    assert 8 <= volume.image.shape[0] <= 14 and volume.image.shape[1:] == (64, 64)
    assert set(np.unique(volume.label)) <= {0, 1, 2, 3} and volume.label.max() > 0
    # The NIfTI files stay on disk for evaluation on the native grid, and are not regenerated.
    root = volumes_tfds.synthetic_root(str(tmp_path), num_subjects=1, seed=0)
    image_file = os.path.join(root, "patient000", "patient000_frame01.nii.gz")
    assert os.path.exists(image_file)
    written = os.path.getmtime(image_file)
    volumes_tfds.ensure_synthetic(root, num_subjects=1, seed=0)
    assert os.path.getmtime(image_file) == written
