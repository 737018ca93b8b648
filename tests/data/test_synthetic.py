"""Tests of the synthetic cardiac dataset: files, headers and rendered anatomy read from disk.

The five subjects generated once per module are one per group (NOR, DCM, HCM, MINF, RV). Every
check measures the written NIfTI volumes with plain numpy (areas, volumes, intensities, ray-cast
wall thickness) and compares them with the anatomy docs/METHOD.md §12 describes.
"""

import os

import matplotlib.image
import nibabel as nib
import numpy as np
import pytest

from jaxcl.data import synthetic

NUM_SUBJECTS = 5  # one per group


def _read_info(subject_dir):
    with open(os.path.join(subject_dir, "Info.cfg"), encoding="utf-8") as f:
        return dict(line.split(":", 1) for line in f.read().splitlines() if line.strip())


def _load(subject_dir, frame):
    """(image (Z, H, W) float64, labels (Z, H, W), image nifti, label nifti) of one frame."""
    name = os.path.basename(subject_dir)
    stem = os.path.join(subject_dir, f"{name}_frame{frame:02d}")
    image_nifti, label_nifti = nib.load(f"{stem}.nii.gz"), nib.load(f"{stem}_gt.nii.gz")
    image = np.moveaxis(np.asarray(image_nifti.dataobj, np.float64), 2, 0)
    labels = np.moveaxis(np.asarray(label_nifti.dataobj), 2, 0)
    return image, labels, image_nifti, label_nifti


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("synthetic"))
    subject_dirs = synthetic.generate(root, num_subjects=NUM_SUBJECTS, seed=0)
    subjects = []
    for subject_dir in subject_dirs:
        info = _read_info(subject_dir)
        es_frame = int(info["ES"])
        frames = {frame: _load(subject_dir, frame) for frame in (1, es_frame)}
        subjects.append({"dir": subject_dir, "info": info, "es": es_frame, "frames": frames})
    return root, subjects


def _areas(labels, value):
    return (labels == value).sum(axis=(1, 2))


def test_acdc_layout_and_info(dataset):
    root, subjects = dataset
    assert sorted(os.listdir(root)) == [f"patient{k:03d}" for k in range(NUM_SUBJECTS)]
    for k, subject in enumerate(subjects):
        name = f"patient{k:03d}"
        info = {key: value.strip() for key, value in subject["info"].items()}
        assert info["ED"] == "1"
        assert info["Group"] == ("NOR", "DCM", "HCM", "MINF", "RV")[k]
        assert 2 <= int(info["ES"]) <= int(info["NbFrame"])
        assert 100 < float(info["Height"]) < 220 and 30 < float(info["Weight"]) < 200
        es = f"{int(info['ES']):02d}"
        assert sorted(os.listdir(subject["dir"])) == sorted(
            [
                "Info.cfg",
                f"{name}_frame01.nii.gz",
                f"{name}_frame01_gt.nii.gz",
                f"{name}_frame{es}.nii.gz",
                f"{name}_frame{es}_gt.nii.gz",
            ]
        )


def test_header_geometry(dataset):
    _, subjects = dataset
    for subject in subjects:
        shapes = set()
        for image, labels, image_nifti, label_nifti in subject["frames"].values():
            zooms = np.array(image_nifti.header.get_zooms())
            assert zooms[0] == pytest.approx(zooms[1])
            assert 1.2 <= zooms[0] <= 1.8 and 5.0 <= zooms[2] <= 10.0
            np.testing.assert_allclose(np.diag(image_nifti.affine)[:3], zooms, rtol=1e-6)
            np.testing.assert_allclose(image_nifti.affine[:3, :3], np.diag(zooms), rtol=1e-6)
            np.testing.assert_allclose(label_nifti.affine, image_nifti.affine)
            assert image_nifti.header.get_xyzt_units()[0] == "mm"
            assert image.shape == labels.shape
            assert 8 <= image.shape[0] <= 14
            assert 200 <= image.shape[1] <= 260 and 200 <= image.shape[2] <= 260
            assert image_nifti.get_data_dtype() == np.int16
            assert label_nifti.get_data_dtype() == np.uint8
            shapes.add(image.shape)
        assert len(shapes) == 1  # ED and ES share the grid


def test_label_values(dataset):
    _, subjects = dataset
    for subject in subjects:
        for _, labels, _, _ in subject["frames"].values():
            assert set(np.unique(labels)) == {0, 1, 2, 3}


def test_rv_in_basal_slices_absent_at_apex(dataset):
    _, subjects = dataset
    for subject in subjects:
        for _, labels, _, _ in subject["frames"].values():
            rv = _areas(labels, 1)
            depth = np.arange(len(rv)) / (len(rv) - 1)
            assert np.all(rv[depth <= 0.5] > 0), rv
            assert rv[-1] == 0, rv
            last_rv_depth = depth[np.nonzero(rv)[0].max()]
            assert 0.5 <= last_rv_depth <= 0.85, rv


def test_lv_cavity_shrinks_towards_apex(dataset):
    _, subjects = dataset
    profiles = []
    for subject in subjects:
        for _, labels, _, _ in subject["frames"].values():
            lv, myo = _areas(labels, 3), _areas(labels, 2)
            assert np.all(np.diff(lv) <= 0.02 * lv.max() + 5), lv
            assert lv[-1] < 0.1 * lv[0], lv
            assert myo[-1] > lv[-1]  # the apex is (almost) all myocardium
        lv = _areas(subject["frames"][1][1], 3)
        depth = np.arange(len(lv)) / (len(lv) - 1)
        profiles.append(np.interp([0.25, 0.5, 0.75], depth, lv / lv.max()))
    # Slices at the same relative depth look alike across subjects (what G^D relies on).
    profiles = np.array(profiles)
    assert np.all(profiles.max(axis=0) - profiles.min(axis=0) < 0.3), profiles


def test_intensities_realistic_not_trivial(dataset):
    _, subjects = dataset
    for subject in subjects:
        image, labels, _, _ = subject["frames"][1]
        myocardium_mean = image[labels == 2].mean()
        assert image[labels == 3].mean() > 1.3 * myocardium_mean
        assert image[labels == 1].mean() > 1.3 * myocardium_mean
        # Many blood-bright pixels are not ventricular blood (fat, aorta, outflow) ...
        bright = image >= np.percentile(image[labels == 3], 25)
        assert (bright & (labels == 0)).sum() > 0.1 * bright.sum()
        # ... and most pixels in the myocardial intensity range are other tissue.
        low, high = np.percentile(image[labels == 2], [25, 75])
        in_band = (image >= low) & (image <= high)
        assert (in_band & (labels == 2)).sum() < 0.5 * in_band.sum()
        # Rician noise floor in the air, and partial-volume blur at the blood/muscle border.
        assert image[:, :5, :5].mean() > 0 and image[:, :5, :5].std() > 0
        lv = labels == 3
        border = lv & ~np.pad(lv, ((0, 0), (1, 1), (1, 1)))[:, :-2, 1:-1]
        assert myocardium_mean < image[border].mean() < image[lv & ~border].mean()


def test_end_systole_is_contracted(dataset):
    _, subjects = dataset
    for subject in subjects:
        ed, es = subject["frames"][1][1], subject["frames"][subject["es"]][1]
        assert (es == 3).sum() < 0.95 * (ed == 3).sum()
        assert 0.8 < (es == 2).sum() / (ed == 2).sum() < 1.1  # muscle is incompressible


def _wall_thickness_ratio(labels):
    """min / median myocardial thickness over 72 rays from the LV centroid, worst non-basal
    slice with a sizeable cavity."""
    ratios = []
    for slice_labels in labels[1:]:
        lv = slice_labels == 3
        if lv.sum() < 0.3 * _areas(labels, 3).max():
            continue
        centre_row, centre_col = np.argwhere(lv).mean(axis=0)
        angles = np.deg2rad(np.arange(0, 360, 5))[:, None]
        steps = np.arange(0, 80, 0.25)[None]
        rows = np.clip(np.rint(centre_row + steps * np.sin(angles)), 0, lv.shape[0] - 1)
        cols = np.clip(np.rint(centre_col + steps * np.cos(angles)), 0, lv.shape[1] - 1)
        thickness = (slice_labels[rows.astype(int), cols.astype(int)] == 2).sum(axis=1)
        ratios.append(thickness.min() / np.median(thickness))
    return min(ratios)


def test_groups_differ_as_in_acdc(dataset):
    _, subjects = dataset
    volume = {}
    for subject in subjects:
        _, labels, image_nifti, _ = subject["frames"][1]
        voxel_ml = np.prod(image_nifti.header.get_zooms()) / 1000
        group = subject["info"]["Group"].strip()
        volume[group] = {value: (labels == value).sum() * voxel_ml for value in (1, 2, 3)}
        thickness_ratio = _wall_thickness_ratio(labels)
        if group == "MINF":
            assert thickness_ratio < 0.6  # regional thinning
        else:
            assert thickness_ratio > 0.65
    assert volume["DCM"][3] > 1.5 * volume["HCM"][3]
    assert volume["HCM"][2] / volume["HCM"][3] > 2 * volume["DCM"][2] / volume["DCM"][3]
    assert volume["RV"][1] / volume["RV"][3] > 1.3 * volume["NOR"][1] / volume["NOR"][3]


def test_subjects_differ_in_pose_and_appearance(dataset):
    _, subjects = dataset
    rv_angles, shapes = [], set()
    for subject in subjects:
        _, labels, _, _ = subject["frames"][1]
        shapes.add(labels.shape)
        lv_centre = np.argwhere(labels[0] == 3).mean(axis=0)
        rv_centre = np.argwhere(labels[0] == 1).mean(axis=0)
        row, col = rv_centre - lv_centre
        rv_angles.append(np.degrees(np.arctan2(row, col)) % 360)
    # The RV lies on the image left (180 deg, a little up), turned by up to +-30 deg per subject.
    assert all(140 < angle < 250 for angle in rv_angles), rv_angles
    assert np.ptp(rv_angles) > 5
    assert len(shapes) > 1


def test_deterministic_and_independent_of_num_subjects(dataset, tmp_path):
    _, subjects = dataset
    (again,) = synthetic.generate(str(tmp_path), num_subjects=2, seed=0)[1:]
    image, labels, _, _ = _load(again, 1)
    np.testing.assert_array_equal(image, subjects[1]["frames"][1][0])
    np.testing.assert_array_equal(labels, subjects[1]["frames"][1][1])
    in_memory = synthetic.synthesize_subject(0, 1)
    np.testing.assert_array_equal(in_memory.images[1], image)
    other_seed = synthetic.synthesize_subject(1, 1)
    assert other_seed.images[1].shape != image.shape or np.any(other_seed.images[1] != image)


def test_interrupted_write_leaves_no_subject(tmp_path, monkeypatch):
    save = nib.save
    calls = []

    def save_then_fail(image, path):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt
        save(image, path)

    monkeypatch.setattr(nib, "save", save_then_fail)
    with pytest.raises(KeyboardInterrupt):
        synthetic.generate(str(tmp_path), num_subjects=1)
    assert os.listdir(tmp_path) == []


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="num_subjects"):
        synthetic.generate(str(tmp_path), num_subjects=0)
    with pytest.raises(ValueError, match="seed"):
        synthetic.generate(str(tmp_path), seed=-1)
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    with pytest.raises(ValueError, match="is a file"):
        synthetic.generate(str(not_a_folder))


def test_cli_writes_dataset_and_montage(tmp_path):
    montage = tmp_path / "montage.png"
    synthetic.main(
        ["--out", str(tmp_path / "data"), "--num-subjects", "1", "--montage", str(montage)]
    )
    assert os.listdir(tmp_path / "data") == ["patient000"]
    pixels = matplotlib.image.imread(str(montage))
    assert pixels.shape[1] > pixels.shape[0] > 100
    assert pixels[..., :3].std() > 0.05
