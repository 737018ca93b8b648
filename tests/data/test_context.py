"""DataContext on a folder dataset: splits, derived settings, splits.json and their errors."""

import json

import pytest

from configs import folder
from jaxcl.data import synthetic_msd
from jaxcl.data.context import SPLITS_FILE, DataContext
from jaxcl.data.sources import DataError


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    path = tmp_path_factory.mktemp("msd") / "Task"
    synthetic_msd.write_msd_folder(str(path), num_labelled=3, num_unlabelled=1)
    return path


def _config(root, splits=None, **data):
    config = folder.get_config()
    config.data.root = str(root)
    for key, value in data.items():
        config.data[key] = value
    for key, value in (splits or {}).items():
        config.data.splits[key] = value
    return config


def test_folder_splits_and_settings_are_resolved_with_notes(root):
    data = DataContext(_config(root))
    assert len(data.splits.test) == 1 and len(data.splits.default_val) == 1
    assert list(data.splits.labelled) == ["tr1", "trall"]  # 1 training case left
    assert len(data.splits.pretrain) == 3  # 2 labelled + imagesTs/, not the test case
    assert data.config.data.target_resolution > 0
    assert data.config.data.image_size % 32 == 0
    notes = "\n".join(data.notes)
    for expected in (
        "data.target_resolution = ",
        "data.image_size = ",
        "data.splits: test: 1 of 3",
    ):
        assert expected in notes
    # The resolved config resolves to itself, without reading the labels again.
    again = DataContext(data.config)
    assert again.splits == data.splits and again.config.data == data.config.data


def test_unlabelled_roots_join_the_pretraining_pool(root, tmp_path):
    extra = tmp_path / "more"
    synthetic_msd.write_msd_folder(str(extra), num_labelled=1, num_unlabelled=2, seed=5)
    data = DataContext(_config(root, unlabelled_roots=f"{extra / 'imagesTs'}"))
    assert len(data.splits.pretrain) == 5
    with pytest.raises(DataError, match=r"unlabelled folder .*missing.* does not exist"):
        DataContext(_config(root, unlabelled_roots=str(tmp_path / "missing")))


def test_splits_json_is_written_and_a_changed_dataset_is_refused(root, tmp_path):
    data = DataContext(_config(root))
    data.write_splits(tmp_path)
    written = json.loads((tmp_path / SPLITS_FILE).read_text())
    assert written["test"] == list(data.splits.test)
    data.write_splits(tmp_path)  # the same splits: fine
    (other_test,) = set(data.splits.labelled["tr1"]["c1"])  # a training case becomes the test case
    other = DataContext(_config(root, splits={"test": other_test}))
    with pytest.raises(DataError, match=r"records other splits.*splits\.file="):
        other.write_splits(tmp_path)
    reuse = DataContext(_config(root, splits={"file": str(tmp_path / SPLITS_FILE)}))
    assert reuse.splits.test == data.splits.test


def test_a_folder_dataset_needs_its_root():
    with pytest.raises(DataError, match=r"config\.data\.root is empty"):
        DataContext(_config(""))
