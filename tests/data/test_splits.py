"""Paper splits against the literal lists of docs/METHOD.md §10 / §12, their invariants, errors."""

import itertools

import pytest

from jaxcl.data import splits
from jaxcl.data.sources import DataError, Subject

# Literal tables typed from docs/METHOD.md §10 (ranges written out).
ACDC_PRETRAIN = [
    "001", "002", "003", "004", "005", "006", "012", "017", "018", "019", "020", "021", "022",
    "023", "024", "025", "026", "037", "038", "039", "040", "041", "042", "043", "044", "045",
    "046", "057", "058", "059", "060", "061", "062", "063", "064", "065", "066", "072", "077",
    "078", "079", "080", "081", "082", "083", "084", "085", "086", "097", "098", "099", "100",
]  # fmt: skip
ACDC_TEST = [
    "007", "008", "009", "010", "027", "028", "029", "030", "047", "048",
    "049", "050", "067", "068", "069", "070", "087", "088", "089", "090",
]  # fmt: skip
ACDC_LABELLED = {
    "tr1": {"c1": "002", "c2": "042", "c3": "095", "c4": "022", "c5": "062"},
    "tr2": {"c1": "042 062", "c2": "002 042", "c3": "042 095", "c4": "002 022", "c5": "002 095"},
    "tr8": {
        "c1": "002 022 042 062 095 003 023 043",
        "c2": "002 022 042 062 095 063 094 043",
        "c3": "002 022 042 062 095 003 094 023",
    },
}
PROSTATE_PRETRAIN = [
    "000", "001", "002", "004", "006", "007", "010", "013", "014",
    "016", "017", "018", "020", "021", "024", "025", "028",
]  # fmt: skip
PROSTATE_TEST = [
    "029", "031", "032", "034", "035", "037", "038", "039", "040", "041", "042", "043", "044",
    "046", "047",
]  # fmt: skip
PROSTATE_LABELLED = {
    "tr1": {"c1": "001", "c2": "002", "c3": "006", "c4": "000", "c5": "004"},
    "tr2": {"c1": "000 001", "c2": "021 024", "c3": "001 002", "c4": "004 010", "c5": "000 007"},
    "tr8": {
        "c1": "000 001 002 004 006 007 010 016",
        "c2": "002 004 006 007 010 016 021 018",
        "c3": "000 001 006 007 010 017 018 024",
    },
}
MMWHS_LABELLED = {
    "tr1": {"c1": "1003", "c2": "1006", "c3": "1008", "c4": "1001", "c5": "1009"},
    "tr2": {"c1": "1001 1003", "c2": "1009 1008", "c3": "1006 1002", "c4": "1010 1007"},
    "tr8": {
        "c1": "1001 1003 1004 1006 1007 1008 1009 1010",
        "c2": "1002 1003 1004 1005 1006 1007 1009 1010",
        "c3": "1001 1003 1004 1005 1006 1008 1009 1010",
    },
}
DATASETS = ("acdc", "prostate", "mmwhs", "synthetic")


def _all_labelled_sets(dataset):
    for size in ("tr1", "tr2", "tr8"):
        for combination in splits.combinations(dataset, size):
            yield size, combination


def test_pretrain_and_test_match_spec_literally():
    assert splits.get_split("acdc", "pretrain") == ACDC_PRETRAIN
    assert len(ACDC_PRETRAIN) == 52
    assert splits.get_split("acdc", "test") == ACDC_TEST
    assert splits.get_split("prostate", "pretrain") == PROSTATE_PRETRAIN
    assert splits.get_split("prostate", "test") == PROSTATE_TEST
    assert splits.get_split("mmwhs", "pretrain") == [str(i) for i in range(1001, 1011)]
    assert splits.get_split("mmwhs", "test") == [str(i) for i in range(1011, 1021)]
    assert splits.get_split("synthetic", "pretrain") == [f"{i:03d}" for i in range(40)]
    assert splits.get_split("synthetic", "test") == [f"{i:03d}" for i in range(44, 60)]
    assert splits.get_split("synthetic", "val") == ["040", "041", "042", "043"]


@pytest.mark.parametrize(
    ("dataset", "table"),
    [("acdc", ACDC_LABELLED), ("prostate", PROSTATE_LABELLED), ("mmwhs", MMWHS_LABELLED)],
)
def test_labelled_subsets_match_spec_literally(dataset, table):
    for size, combos in table.items():
        assert splits.combinations(dataset, size) == tuple(combos)
        for combination, ids in combos.items():
            assert splits.get_split(dataset, size, combination) == ids.split()


def test_acdc_validation_variants():
    assert splits.get_split("acdc", "val") == ["011", "071"]
    other = {"tr1-c2", "tr2-c1", "tr2-c3", "tr8-c2"}
    for size, combination in _all_labelled_sets("acdc"):
        key = f"{size}-{combination}"
        expected = ["031", "072"] if key in other else ["011", "071"]
        assert splits.get_split("acdc", "val", key) == expected, key


def test_prostate_validation_variants():
    assert splits.get_split("prostate", "val") == ["013", "014"]
    assert splits.get_split("prostate", "val", "tr1-c1") == ["013", "014"]
    assert splits.get_split("prostate", "val", "tr1-c2") == ["017", "020"]
    assert splits.get_split("prostate", "val", "tr2-c5") == ["025", "028"]
    assert splits.get_split("prostate", "val", "tr8-c3") == ["025", "028"]
    for size, combination in _all_labelled_sets("prostate"):
        val = splits.get_split("prostate", "val", f"{size}-{combination}")
        assert val in (["013", "014"], ["017", "020"], ["025", "028"])


def test_mmwhs_validation_is_two_unlabelled_pool_subjects():
    pool = {str(i) for i in range(1001, 1011)}
    for size, combination in _all_labelled_sets("mmwhs"):
        labelled = set(splits.get_split("mmwhs", size, combination))
        val = set(splits.get_split("mmwhs", "val", f"{size}-{combination}"))
        assert len(val) == 2 and val <= pool - labelled, (size, combination)
        if size == "tr8":  # Exactly the two pool subjects left out.
            assert val == pool - labelled
    assert splits.get_split("mmwhs", "val") == ["1002", "1005"]
    assert splits.combinations("mmwhs", "tr2") == ("c1", "c2", "c3", "c4")


@pytest.mark.parametrize("dataset", DATASETS)
def test_test_set_is_disjoint_from_training_and_validation(dataset):
    test = set(splits.get_split(dataset, "test"))
    assert not test & set(splits.get_split(dataset, "pretrain"))
    assert not test & set(splits.get_split(dataset, "val"))
    for size, combination in _all_labelled_sets(dataset):
        labelled = set(splits.get_split(dataset, size, combination))
        val = set(splits.get_split(dataset, "val", f"{size}-{combination}"))
        assert not test & labelled and not test & val
        assert not labelled & val, (size, combination)


@pytest.mark.parametrize("dataset", ["prostate", "mmwhs", "synthetic"])
def test_labelled_sets_lie_in_the_pretraining_pool(dataset):
    pool = set(splits.get_split(dataset, "pretrain"))
    for size, combination in _all_labelled_sets(dataset):
        assert set(splits.get_split(dataset, size, combination)) <= pool, (size, combination)


def test_acdc_labelled_sets_outside_pool_are_exactly_094_and_095():
    pool = set(ACDC_PRETRAIN)
    outside = set()
    for size, combination in _all_labelled_sets("acdc"):
        outside |= set(splits.get_split("acdc", size, combination)) - pool
    assert outside == {"094", "095"}


def test_synthetic_labelled_sets_spread_over_the_five_groups():
    def groups(ids):
        return [int(i) % 5 for i in ids]

    tr1 = [splits.get_split("synthetic", "tr1", f"c{k}") for k in range(1, 6)]
    assert sorted(g for ids in tr1 for g in groups(ids)) == [0, 1, 2, 3, 4]
    for combination in splits.combinations("synthetic", "tr2"):
        assert len(set(groups(splits.get_split("synthetic", "tr2", combination)))) == 2
    tr8 = [splits.get_split("synthetic", "tr8", c) for c in splits.combinations("synthetic", "tr8")]
    for ids in tr8:
        assert len(set(ids)) == 8 and set(groups(ids)) == {0, 1, 2, 3, 4}
    for a, b in itertools.combinations(tr8, 2):
        assert set(a) != set(b)


def test_returned_lists_are_fresh():
    ids = splits.get_split("acdc", "test")
    ids.clear()
    assert len(splits.get_split("acdc", "test")) == 20


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (("brats", "test"), r"'brats'.*\['acdc', 'mmwhs', 'prostate', 'synthetic'\]"),
        (
            ("acdc", "train"),
            r"'train'.*\['pretrain', 'tr1', 'tr2', 'tr8', 'trall', 'val', 'test'\]",
        ),
        (("acdc", "tr1"), r"\['c1', 'c2', 'c3', 'c4', 'c5'\].*None"),
        (("acdc", "tr8", "c4"), r"\['c1', 'c2', 'c3'\].*'c4'"),
        (("mmwhs", "tr2", "c5"), r"\['c1', 'c2', 'c3', 'c4'\]"),
        (("acdc", "pretrain", "c1"), "takes no combination"),
        (("acdc", "val", "c1"), r"'tr1-c1'.*'tr8-c3'.*'c1'"),
    ],
)
def test_bad_requests_list_the_valid_choices(args, match):
    with pytest.raises(ValueError, match=match):
        splits.get_split(*args)


def test_check_split_on_disk_names_missing_and_unlabelled_subjects():
    subjects = [
        Subject("001", "/d/patient001/img.nii.gz", "/d/patient001/gt.nii.gz"),
        Subject("002", "/d/patient002/img.nii.gz", None),
    ]
    splits.check_split_on_disk(["001", "002"], subjects)
    with pytest.raises(DataError, match=r"\['003', '095'\] are not in the dataset"):
        splits.check_split_on_disk(["001", "003", "095"], subjects)
    with pytest.raises(DataError, match=r"\['002'\] have no label.*patient002"):
        splits.check_split_on_disk(["001", "002"], subjects, require_labels=True)
