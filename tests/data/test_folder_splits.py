"""Splits of a folder dataset: automatic from the seed, explicit from config.data.splits."""

import json

import pytest

from configs import base
from jaxcl.data import folder_splits
from jaxcl.data.sources import DataError, Subject


def _subjects(num_labelled, num_unlabelled=0):
    labelled = [Subject(f"case_{i:02d}", f"/i/{i}", f"/l/{i}") for i in range(num_labelled)]
    unlabelled = [Subject(f"extra_{i:02d}", f"/u/{i}", None) for i in range(num_unlabelled)]
    return labelled + unlabelled


def _settings(**keys):
    splits = base.get_config().data.splits
    for key, value in keys.items():
        splits[key] = value
    return folder_splits.settings_from_config(splits)


def _make(num_labelled, num_unlabelled=0, seed=0, **keys):
    return folder_splits.make_splits(
        _subjects(num_labelled, num_unlabelled), _settings(**keys), seed=seed
    )


def test_automatic_splits_are_disjoint_and_sized_as_configured():
    splits, notes, warnings = _make(12, num_unlabelled=3)
    assert not warnings
    assert len(splits.test) == 2  # 20% of 12
    assert len(splits.default_val) == 2
    assert not set(splits.test) & set(splits.default_val)
    assert list(splits.labelled) == ["tr1", "tr2", "tr8", "trall"]
    assert [len(c) for c in splits.labelled.values()] == [3, 3, 1, 1]  # C(8, 8) = 1
    # trall: every labelled case that is neither a test nor a validation case.
    held_out = set(splits.test) | set(splits.default_val)
    labelled = {f"case_{i:02d}" for i in range(12)} - held_out
    assert set(splits.get("trall", "c1")) == labelled
    for combos in splits.labelled.values():
        assert len(set(combos.values())) == len(combos)  # distinct subsets
        for ids in combos.values():
            assert not set(ids) & (set(splits.test) | set(splits.default_val))
    # The pre-training pool: every image but the test cases, labelled or not.
    assert set(splits.pretrain) == {s.subject_id for s in _subjects(12, 3)} - set(splits.test)
    assert any(
        "labelled sets: tr1 x3, tr2 x3, tr8 x1 (trN: N cases; xK: K subsets) from 8 training" in n
        for n in notes
    )


def test_automatic_splits_depend_only_on_seed_and_ids():
    assert _make(12)[0] == _make(12)[0]
    assert _make(12)[0] != _make(12, seed=1)[0]
    shuffled = list(reversed(_subjects(12)))
    again = folder_splits.make_splits(shuffled, _settings(), seed=0)[0]
    assert again == _make(12)[0]


def test_two_labelled_cases_train_on_one_and_test_on_the_other():
    splits, _, warnings = _make(2, num_unlabelled=1)
    assert len(splits.test) == 1
    assert splits.default_val == ()
    assert list(splits.labelled) == ["tr1", "trall"]
    (train,) = splits.labelled["tr1"].values()
    assert splits.labelled["trall"]["c1"] == train
    assert splits.val("tr1-c1") == train  # validation reuses the training case
    assert any("validated on its training cases" in warning for warning in warnings)
    assert any("sizes [2, 8] capped" in warning for warning in warnings)


def test_fewer_than_two_labelled_cases_is_an_error():
    with pytest.raises(DataError, match="1 labelled case.*at least 2 are needed"):
        _make(1, num_unlabelled=5)


def test_explicit_splits_are_used_as_given():
    splits = _make(
        6,
        test="case_05",
        val="case_04",
        labelled="tr1-c1=case_00; tr2-c1=case_01,case_02",
    )[0]
    assert splits.test == ("case_05",)
    assert splits.default_val == ("case_04",)
    assert splits.labelled == {
        "tr1": {"c1": ("case_00",)},
        "tr2": {"c1": ("case_01", "case_02")},
        "trall": {"c1": ("case_00", "case_01", "case_02", "case_03")},
    }
    assert "case_04" in splits.pretrain and "case_05" not in splits.pretrain


def test_explicit_test_leaves_the_rest_automatic():
    splits = _make(10, test="case_00,case_01")[0]
    assert splits.test == ("case_00", "case_01")
    assert all("case_00" not in ids for c in splits.labelled.values() for ids in c.values())


def test_a_splits_file_reproduces_a_run(tmp_path):
    splits = _make(12, num_unlabelled=2, seed=3)[0]
    path = tmp_path / "splits.json"
    path.write_text(json.dumps({"dataset": "folder", **splits.to_dict()}))
    again = _make(12, num_unlabelled=2, seed=99, file=str(path))[0]
    assert again == splits


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ({"labelled": "tr2-c1=case_00"}, r"tr2-c1 lists 1 cases .*rename it tr1"),
        ({"labelled": "tr1=case_00"}, r"is not 'trN-cK=id,id'"),
        ({"labelled": "one-c1=case_00"}, r"must be named trN-cK"),
        ({"test": "case_99"}, r"test cases \['case_99'\] are not labelled cases"),
        ({"test": "case_00", "labelled": "tr1-c1=case_00"}, r"\['case_00'\] are also test"),
        ({"test": "case_00", "val": "case_00"}, r"both validation and test"),
        ({"test": "case_00,case_00"}, r"lists \['case_00'\] more than once"),
        ({"labelled_sizes": "1,x"}, r"labelled_sizes='1,x' must list integers"),
        ({"test_fraction": 1.5}, r"test_fraction=1.5 must be in \(0, 1\)"),
        ({"file": "/no/such/splits.json"}, r"does not exist"),
    ],
)
def test_bad_split_settings_say_what_to_fix(keys, message):
    with pytest.raises(DataError, match=message):
        _make(6, **keys)
