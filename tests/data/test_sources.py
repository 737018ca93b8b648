"""Dataset layouts: subject discovery on tiny on-disk trees, label maps and bad-input errors."""

import json
import os

import nibabel as nib
import numpy as np
import pytest

from jaxcl.data import sources
from jaxcl.data.sources import DataError


def _save(path, data):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(data), np.eye(4)), str(path))


def _acdc_patient(parent, number, ed=1, es=3, with_gt=True, with_es=True):
    folder = os.path.join(parent, f"patient{number:03d}")
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "Info.cfg"), "w") as f:
        f.write(f"ED: {ed}\nES: {es}\nGroup: NOR\nHeight: 180.0\nNbFrame: 30\nWeight: 80.0\n")
    frames = [ed, es] if with_es else [ed]
    for frame in frames:
        stem = os.path.join(folder, f"patient{number:03d}_frame{frame:02d}")
        _save(stem + ".nii.gz", np.zeros((4, 4, 2), np.int16))
        if with_gt:
            _save(stem + "_gt.nii.gz", np.zeros((4, 4, 2), np.uint8))
    return folder


def test_acdc_finds_ed_frame_by_default_and_es_on_request(tmp_path):
    root = str(tmp_path)
    p1 = _acdc_patient(root, 1, ed=1, es=12)
    p2 = _acdc_patient(root, 101, ed=2, es=9, with_gt=False)
    (tmp_path / "notes.txt").write_text("not a patient")
    ed = sources.get_layout("acdc").find_subjects(root)
    assert ed == [
        sources.Subject(
            "001",
            os.path.join(p1, "patient001_frame01.nii.gz"),
            os.path.join(p1, "patient001_frame01_gt.nii.gz"),
        ),
        sources.Subject("101", os.path.join(p2, "patient101_frame02.nii.gz"), None),
    ]
    es = sources.get_layout("acdc", frame="ES").find_subjects(root)
    assert [s.image_path for s in es] == [
        os.path.join(p1, "patient001_frame12.nii.gz"),
        os.path.join(p2, "patient101_frame09.nii.gz"),
    ]


def test_acdc_accepts_unpacked_archive_and_rejects_duplicates(tmp_path):
    _acdc_patient(tmp_path / "database" / "training", 7)
    _acdc_patient(tmp_path / "database" / "testing", 120)
    ids = [s.subject_id for s in sources.get_layout("acdc").find_subjects(str(tmp_path))]
    assert ids == ["007", "120"]
    _acdc_patient(tmp_path, 7)
    with pytest.raises(DataError, match=r"\['007'\].*more than once"):
        sources.get_layout("acdc").find_subjects(str(tmp_path))


def test_acdc_layout_classes_and_defaults():
    layout = sources.get_layout("acdc")
    assert layout.class_names == ("background", "RV", "Myo", "LV")
    assert layout.label_values == (0, 1, 2, 3)
    assert layout.num_classes == 4
    assert (layout.target_resolution, layout.image_size) == (1.36719, 192)
    assert layout.channel is None


def test_acdc_missing_info_cfg_or_frame_file_is_named(tmp_path):
    folder = _acdc_patient(tmp_path, 3)
    os.remove(os.path.join(folder, "patient003_frame03.nii.gz"))
    with pytest.raises(DataError, match="patient003_frame03.nii.gz"):
        sources.get_layout("acdc", frame="ES").find_subjects(str(tmp_path))
    os.remove(os.path.join(folder, "Info.cfg"))
    with pytest.raises(DataError, match="Info.cfg"):
        sources.get_layout("acdc").find_subjects(str(tmp_path))


def test_synthetic_layout_reads_acdc_files_from_patient000(tmp_path):
    _acdc_patient(tmp_path, 0)
    _acdc_patient(tmp_path, 59)
    layout = sources.get_layout("synthetic")
    assert layout.name == "synthetic"
    assert layout.label_values == (0, 1, 2, 3)
    assert [s.subject_id for s in layout.find_subjects(str(tmp_path))] == ["000", "059"]


def test_prostate_pads_ids_skips_resource_forks_and_marks_test_images_unlabelled(tmp_path):
    image = np.zeros((4, 4, 2, 2), np.float32)
    _save(tmp_path / "imagesTr" / "prostate_16.nii.gz", image)
    _save(tmp_path / "labelsTr" / "prostate_16.nii.gz", np.zeros((4, 4, 2), np.uint8))
    (tmp_path / "imagesTr" / "._prostate_16.nii.gz").write_bytes(b"\x00\x05\x16\x07")
    _save(tmp_path / "imagesTs" / "prostate_03.nii.gz", image)
    layout = sources.get_layout("prostate")
    subjects = layout.find_subjects(str(tmp_path))
    assert [(s.subject_id, s.label_path is None) for s in subjects] == [
        ("003", True),
        ("016", False),
    ]
    assert subjects[1].label_path == str(tmp_path / "labelsTr" / "prostate_16.nii.gz")
    assert layout.channel == 0  # T2
    assert layout.class_names == ("background", "PZ", "TZ")
    assert (layout.target_resolution, layout.image_size) == (0.625, 192)


def test_mmwhs_finds_train_and_unlabelled_test_images_and_maps_raw_values(tmp_path):
    _save(tmp_path / "mr_train" / "mr_train_1001_image.nii.gz", np.zeros((4, 4, 2)))
    _save(tmp_path / "mr_train" / "mr_train_1001_label.nii.gz", np.zeros((4, 4, 2)))
    _save(tmp_path / "mr_test_2003_image.nii.gz", np.zeros((4, 4, 2)))
    layout = sources.get_layout("mmwhs")
    subjects = layout.find_subjects(str(tmp_path))
    assert [(s.subject_id, s.label_path) for s in subjects] == [
        ("1001", str(tmp_path / "mr_train" / "mr_train_1001_label.nii.gz")),
        ("2003", None),
    ]
    # docs/METHOD.md §10: raw 205 Myo, 420 LA, 500 LV, 550 RA, 600 RV, 820 AA, 850 PA -> 1..7.
    raw = np.array([[0, 205, 420, 500], [550, 600, 820, 850]], np.float64)
    expected = np.array([[0, 1, 2, 3], [4, 5, 6, 7]], np.uint8)
    np.testing.assert_array_equal(layout.class_indices(raw, "x"), expected)
    assert layout.class_names[1:] == ("Myo", "LA", "LV", "RA", "RV", "AA", "PA")
    assert (layout.target_resolution, layout.image_size) == (1.5, 160)


def test_unexpected_label_values_are_listed_with_the_file():
    layout = sources.get_layout("mmwhs")
    raw = np.array([0, 205, 421, 421, 7], np.int16)
    with pytest.raises(DataError, match=r"lab\.nii\.gz: unexpected label values \[7, 421\]"):
        layout.class_indices(raw, "lab.nii.gz")
    with pytest.raises(DataError, match=r"\[1\.5\]"):
        sources.get_layout("acdc").class_indices(np.array([0.0, 1.5, 2.0]), "f")


def _write_dataset_json(root, description):
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, "dataset.json"), "w") as f:
        json.dump(description, f)


def test_folder_msd_style_labels_and_multichannel_images(tmp_path):
    _write_dataset_json(
        tmp_path,
        {
            "labels": {"0": "background", "4": "enhancing", "2": "edema"},
            "modality": {"0": "T2", "1": "ADC"},
        },
    )
    _save(tmp_path / "imagesTr" / "case_7.nii.gz", np.zeros((4, 4, 2, 2)))
    _save(tmp_path / "labelsTr" / "case_7.nii.gz", np.zeros((4, 4, 2)))
    layout = sources.get_layout("folder", str(tmp_path))
    assert layout.class_names == ("background", "edema", "enhancing")
    assert layout.label_values == (0, 2, 4)
    assert layout.channel == 0
    assert layout.target_resolution is None and layout.image_size is None
    np.testing.assert_array_equal(layout.class_indices(np.array([4, 0, 2]), "f"), [2, 0, 1])
    [subject] = layout.find_subjects(str(tmp_path))
    assert subject.subject_id == "case_7"
    assert subject.label_path == str(tmp_path / "labelsTr" / "case_7.nii.gz")


def test_folder_nnunet_v2_style_with_channel_suffixes(tmp_path):
    _write_dataset_json(
        tmp_path,
        {
            "labels": {"background": 0, "liver": 1, "tumour": 2},
            "channel_names": {"0": "T1", "1": "T2"},
            "file_ending": ".nii.gz",
        },
    )
    for case in ("liver_0001", "liver_0002"):
        for channel in (0, 1):
            _save(tmp_path / "imagesTr" / f"{case}_{channel:04d}.nii.gz", np.zeros((4, 4, 2)))
    _save(tmp_path / "labelsTr" / "liver_0001.nii.gz", np.zeros((4, 4, 2)))
    layout = sources.get_layout("folder", str(tmp_path), channel=1)
    assert layout.class_names == ("background", "liver", "tumour")
    assert layout.label_values == (0, 1, 2)
    subjects = layout.find_subjects(str(tmp_path))
    assert [
        (s.subject_id, os.path.basename(s.image_path), s.label_path is None) for s in subjects
    ] == [
        ("liver_0001", "liver_0001_0001.nii.gz", False),
        ("liver_0002", "liver_0002_0001.nii.gz", True),
    ]
    with pytest.raises(DataError, match=r"\['liver_0001', 'liver_0002'\].*_0002"):
        sources.get_layout("folder", str(tmp_path), channel=2).find_subjects(str(tmp_path))


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (None, "dataset.json is missing"),
        ("{not json", "not valid JSON"),
        ({"name": "x"}, 'no "labels" entry'),
        ({"labels": {"background": 0, "tumour": [1, 2]}}, "region lists are not supported"),
        ({"labels": {"1": "organ"}}, "background value 0"),
        ({"labels": {"0": "bg"}, "file_ending": ".mha"}, r"'\.mha' is not supported"),
    ],
)
def test_folder_dataset_json_errors_name_the_file(tmp_path, content, match):
    if isinstance(content, dict):
        _write_dataset_json(tmp_path, content)
    elif isinstance(content, str):
        (tmp_path / "dataset.json").write_text(content)
    with pytest.raises(DataError, match=match) as error:
        sources.get_layout("folder", str(tmp_path))
    assert "dataset.json" in str(error.value)


def test_folder_needs_a_root():
    with pytest.raises(DataError, match="needs the dataset root"):
        sources.get_layout("folder")


@pytest.mark.parametrize(
    ("name", "url"),
    [
        ("acdc", "https://www.creatis.insa-lyon.fr/Challenge/acdc/"),
        ("prostate", "http://medicaldecathlon.com/"),
        ("mmwhs", "https://zmiclab.github.io/zxh/0/mmwhs/"),
    ],
)
def test_missing_empty_or_unrecognised_root_explains_the_download(tmp_path, name, url):
    layout = sources.get_layout(name)
    assert url in sources.download_instructions(name)
    missing = str(tmp_path / "nowhere")
    with pytest.raises(DataError, match="does not exist") as error:
        layout.find_subjects(missing)
    assert missing in str(error.value) and url in str(error.value)
    with pytest.raises(DataError, match="is empty") as error:
        layout.find_subjects(str(tmp_path))
    assert url in str(error.value)
    (tmp_path / "readme.txt").write_text("wrong folder")
    with pytest.raises(DataError, match=f"no {name} images found") as error:
        layout.find_subjects(str(tmp_path))
    assert url in str(error.value)


def test_download_instructions_say_where_files_go():
    assert "database/training/patientXXX" in sources.download_instructions("acdc")
    assert "imagesTr/" in sources.download_instructions("prostate")
    assert "mr_train" in sources.download_instructions("mmwhs")
    assert "jaxcl.data.synthetic" in sources.download_instructions("synthetic")
    with pytest.raises(DataError, match="choose one of"):
        sources.download_instructions("brats")


def test_get_layout_rejects_unknown_names_and_options():
    with pytest.raises(DataError, match=r"'brats'.*\['acdc', 'folder', 'mmwhs', 'prostate'"):
        sources.get_layout("brats")
    with pytest.raises(DataError, match=r"\['resolution'\].*'prostate'.*no options"):
        sources.get_layout("prostate", resolution=1.0)
    with pytest.raises(DataError, match=r"frame='mid'.*'ED' or 'ES'"):
        sources.get_layout("acdc", frame="mid")
    assert issubclass(DataError, ValueError)
