"""Tests for jaxcl.data.slice_store: round trip, pool order, keys, and builds that never leave a
store that looks complete when it is not.

References are the volumes' own arrays, looked up by subject id and slice number.
"""

import dataclasses
import json
import os
import threading

import numpy as np
import pytest

from jaxcl.data import preprocess, slice_store
from jaxcl.data.sources import DataError

SIZE = 8
NUM_PARTITIONS = 4


@dataclasses.dataclass(frozen=True)
class _Volume:
    """Stands in for preprocess.Volume: the store reads subject_id and image."""

    subject_id: str
    image: np.ndarray
    label: None = None


def _volumes(num_volumes=7, seed=0):
    rng = np.random.default_rng(seed)
    return [
        _Volume(f"{v:03d}", rng.normal(size=(int(rng.integers(4, 9)), SIZE, SIZE)).astype("f4"))
        for v in range(num_volumes)
    ]


def _parts(volumes, num_parts=3):
    """Readers of volumes in a scrambled order, as a dataset's files may hold them."""
    order = volumes[::-1]
    return [lambda part=part: iter(order[part::num_parts]) for part in range(num_parts)]


def _ids(volumes):
    return [v.subject_id for v in volumes]


def _build(directory, volumes, parts=None, subject_ids=None):
    slice_store.build(
        directory,
        parts or _parts(volumes),
        _ids(volumes) if subject_ids is None else subject_ids,
        image_size=SIZE,
    )
    return slice_store.open_store(directory, NUM_PARTITIONS)


def test_rows_follow_subject_ids_and_read_back_exactly(tmp_path):
    volumes = _volumes()
    store = _build(tmp_path / "store", volumes)
    ordered = sorted(volumes, key=lambda v: v.subject_id)
    assert store.subject_ids == tuple(_ids(ordered))
    expected = np.concatenate([v.image for v in ordered])
    assert store.num_slices == len(expected)
    np.testing.assert_array_equal(store.take(np.arange(store.num_slices)), expected)
    rows = np.array([5, 0, 5, len(expected) - 1, 3, 5])  # repeated and unordered rows
    np.testing.assert_array_equal(store.take(rows), expected[rows])
    expected_partitions = [
        preprocess.partition_ids(len(v.image), NUM_PARTITIONS)[z]
        for v in ordered
        for z in range(len(v.image))
    ]
    np.testing.assert_array_equal(store.slice_partition, expected_partitions)
    np.testing.assert_array_equal(
        store.slice_volume, np.repeat(np.arange(len(ordered)), [len(v.image) for v in ordered])
    )


def test_only_the_pool_is_stored_and_the_key_follows_it(tmp_path):
    volumes = _volumes()
    pool = ["004", "001", "006"]
    store = _build(tmp_path / "store", volumes, subject_ids=pool)
    assert store.subject_ids == ("001", "004", "006")
    by_id = {v.subject_id: v for v in volumes}
    np.testing.assert_array_equal(
        store.take(np.arange(store.num_slices)),
        np.concatenate([by_id[i].image for i in store.subject_ids]),
    )
    key = slice_store.store_dir(tmp_path, "acdc-ED-axial-1.5mm-192px-1.1.0", pool)
    assert key == slice_store.store_dir(tmp_path, "acdc-ED-axial-1.5mm-192px-1.1.0", pool[::-1])
    assert key != slice_store.store_dir(tmp_path, "acdc-ED-axial-1.5mm-192px-1.1.0", pool[:2])
    assert key != slice_store.store_dir(tmp_path, "acdc-ED-axial-1.5mm-128px-1.1.0", pool)


def test_missing_or_repeated_subjects_and_wrong_shapes_are_refused(tmp_path):
    volumes = _volumes(3)
    with pytest.raises(DataError, match=r"\['009'\] are not in the prepared data"):
        _build(tmp_path / "a", volumes, subject_ids=["000", "009"])
    twice = [lambda: iter(volumes), lambda: iter(volumes[:1])]
    with pytest.raises(DataError, match=r"\['000'\] are in it more than once"):
        _build(tmp_path / "b", volumes, parts=twice)
    wrong = [_Volume("000", np.zeros((5, SIZE, SIZE + 1), np.float32))]
    with pytest.raises(DataError, match=r"\(5, 8, 9\).*image_size=8"):
        _build(tmp_path / "c", wrong)
    assert not os.listdir(tmp_path)  # nothing half built is left behind


def test_an_interrupted_build_leaves_nothing_that_opens_and_is_built_again(tmp_path):
    volumes = _volumes()
    directory = tmp_path / "jaxcl_slices" / "variant" / "pool"

    def failing():
        yield volumes[0]
        raise KeyboardInterrupt  # the build is stopped mid-way

    with pytest.raises(KeyboardInterrupt):
        _build(directory, volumes, parts=[failing, *_parts(volumes)])
    assert not slice_store.is_complete(directory)
    assert not directory.parent.exists() or not os.listdir(directory.parent)
    with pytest.raises(DataError, match="not a complete slice store"):
        slice_store.open_store(directory, NUM_PARTITIONS)
    store = _build(directory, volumes)
    assert store.num_slices == sum(len(v.image) for v in volumes)


def test_a_failed_part_stops_the_parts_still_being_written(tmp_path):
    started, yielded = threading.Event(), []

    def long_part():
        for index in range(10**6):
            yielded.append(index)
            started.set()
            yield _Volume(f"other{index}", np.zeros((4, SIZE, SIZE), np.float32))

    def failing_part():
        started.wait()
        raise OSError("No space left on device")

    with pytest.raises(OSError, match="No space left"):
        slice_store.build(tmp_path / "store", [long_part, failing_part], ["000"], image_size=SIZE)
    assert len(yielded) < 10**6  # stopped after its current volume, not at its end
    assert not os.listdir(tmp_path)


@pytest.mark.parametrize("damage", ["no index", "short part"])
def test_a_killed_build_or_rename_is_not_read_but_rebuilt(tmp_path, damage):
    """A process killed before its cleanup can leave files in place: they must not count."""
    volumes = _volumes()
    directory = tmp_path / "store"
    expected = _build(directory, volumes).take(np.arange(5))
    if damage == "no index":
        (directory / slice_store.INDEX_FILE).unlink()
    else:
        index = json.loads((directory / slice_store.INDEX_FILE).read_text())
        part = directory / index["parts"][0]["name"]
        part.write_bytes(part.read_bytes()[:-100])
    assert not slice_store.is_complete(directory)
    with pytest.raises(DataError, match="not a complete slice store"):
        slice_store.open_store(directory, NUM_PARTITIONS)
    np.testing.assert_array_equal(_build(directory, volumes).take(np.arange(5)), expected)
    assert sorted(os.listdir(tmp_path)) == ["store"]


def test_a_complete_store_is_reused_without_reading_the_volumes(tmp_path):
    volumes = _volumes()
    _build(tmp_path / "store", volumes)

    def unread():
        raise AssertionError("a complete store was built again")

    store = _build(tmp_path / "store", volumes, parts=[unread])
    assert store.num_volumes == len(volumes)


def test_a_folder_with_other_files_is_never_replaced(tmp_path):
    (tmp_path / "store").mkdir()
    (tmp_path / "store" / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match=r"not a slice store's \(\['notes.txt'\]\)"):
        _build(tmp_path / "store", _volumes())
    assert (tmp_path / "store" / "notes.txt").read_text() == "mine"


def test_volumes_shorter_than_the_partitions_are_refused(tmp_path):
    short = [_Volume("short", np.zeros((3, SIZE, SIZE), np.float32))]
    slice_store.build(tmp_path / "store", [lambda: iter(short)], ["short"], image_size=SIZE)
    with pytest.raises(DataError, match=r"\['short'\].*fewer slices than num_partitions=4"):
        slice_store.open_store(tmp_path / "store", NUM_PARTITIONS)


def test_a_label_file_reads_back_the_rows_written_and_refuses_rows_outside():
    labels = np.random.default_rng(0).integers(0, 4, (9, SIZE, SIZE)).astype(np.uint8)
    label_file = slice_store.LabelFile(num_rows=9, image_size=SIZE)
    label_file.write(5, labels[5:])  # in any order of chunks
    label_file.write(0, labels[:5].astype(np.int32))  # class indices of any integer type
    rows = np.array([8, 0, 4, 4, 5])
    np.testing.assert_array_equal(label_file.take(rows), labels[rows])
    assert label_file.take(rows).dtype == np.uint8
    with pytest.raises(ValueError, match="exceed the 9 rows"):
        label_file.write(7, labels[:3])
    with pytest.raises(ValueError, match="not \\(n, S, S\\)"):
        label_file.write(0, labels[:, :4])
    with pytest.raises(IndexError, match="row 9 is outside"):
        label_file.take(np.array([9]))
