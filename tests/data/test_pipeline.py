"""Tests for jaxcl.data.pipeline: batch structure, determinism, resumption, device/host sharding.

References are written independently of the pipeline: partition ids from the formula of
docs/METHOD.md §2 in a plain loop, slice contents looked up in the original per-volume arrays.
"""

import dataclasses
import itertools

import numpy as np
import pytest

from jaxcl.data import pipeline
from jaxcl.data.sources import DataError

H = W = 8
NUM_PARTITIONS = 4


@dataclasses.dataclass(frozen=True)
class _Volume:
    """Stands in for preprocess.Volume: the pipeline only reads these three fields."""

    subject_id: str
    image: np.ndarray
    label: np.ndarray | None


def _volumes(num_volumes=12, labelled=True, seed=0):
    rng = np.random.default_rng(seed)
    volumes = []
    for v in range(num_volumes):
        z = int(rng.integers(NUM_PARTITIONS, 11))
        image = rng.normal(size=(z, H, W)).astype(np.float32)
        label = rng.integers(0, 4, size=(z, H, W)).astype(np.uint8) if labelled else None
        volumes.append(_Volume(f"{v:03d}", image, label))
    return volumes


def _reference_partition(i, n, s=NUM_PARTITIONS):
    return min(i * s // n, s - 1)


def _source(volumes, pool, sample_id):
    """(volume, slice index) of a pool row, found by counting slices volume by volume."""
    row = int(sample_id)
    for subject_id in pool.subject_ids:
        volume = next(v for v in volumes if v.subject_id == subject_id)
        if row < volume.image.shape[0]:
            return volume, row
        row -= volume.image.shape[0]
    raise AssertionError(f"sample_id {sample_id} outside the pool")


def _check_rows_match_sources(volumes, pool, batch):
    for b in range(batch["sample_id"].shape[0]):
        volume, z = _source(volumes, pool, batch["sample_id"][b])
        assert pool.subject_ids[batch["volume_id"][b]] == volume.subject_id
        np.testing.assert_array_equal(batch["image"][b, ..., 0], volume.image[z])
        assert batch["partition_id"][b] == _reference_partition(z, volume.image.shape[0])
        if "label" in batch:
            np.testing.assert_array_equal(batch["label"][b], volume.label[z])


def _flat(batch):
    return {k: v.reshape(-1, *v.shape[2:]) for k, v in batch.items()}


def _assert_batches_equal(a, b):
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_slice_pool_tables():
    volumes = _volumes(5)
    pool = pipeline.build_slice_pool(volumes, subject_ids=["003", "001"])
    assert pool.subject_ids == ("003", "001")
    np.testing.assert_array_equal(pool.images, np.concatenate([volumes[3].image, volumes[1].image]))
    expected_partitions = [
        _reference_partition(i, v.image.shape[0])
        for v in (volumes[3], volumes[1])
        for i in range(v.image.shape[0])
    ]
    np.testing.assert_array_equal(pool.slice_partition, expected_partitions)
    assert pool.images.flags["C_CONTIGUOUS"] and pool.images.dtype == np.float32


def test_random_batches_views_share_slice():
    volumes = _volumes()
    pool = pipeline.build_slice_pool(volumes)
    batch = pipeline.random_slice_batches(pool, num_slices=6, num_views=3, seed=1)[0]
    assert batch["image"].shape == (18, H, W, 1)
    assert set(batch) == {"image", "sample_id", "partition_id", "volume_id", "view_id"}
    for key in ("sample_id", "partition_id", "volume_id", "view_id"):
        assert batch[key].dtype == np.int32 and batch[key].shape == (18,)
    ids = batch["sample_id"].reshape(6, 3)
    assert (ids == ids[:, :1]).all() and len(set(ids[:, 0])) == 6
    np.testing.assert_array_equal(batch["view_id"], np.tile([0, 1, 2], 6))
    images = batch["image"].reshape(6, 3, H, W)
    np.testing.assert_array_equal(images, np.repeat(images[:, :1], 3, axis=1))
    _check_rows_match_sources(volumes, pool, batch)
    whole_pool = pipeline.random_slice_batches(
        pool, num_slices=pool.num_slices, num_views=1, seed=1
    )
    np.testing.assert_array_equal(np.sort(whole_pool[3]["sample_id"]), np.arange(pool.num_slices))


@pytest.mark.parametrize("num_volumes,num_views", [(3, 3), (6, 2)])
def test_structured_batches(num_volumes, num_views):
    volumes = _volumes()
    pool = pipeline.build_slice_pool(volumes, num_partitions=NUM_PARTITIONS)
    batches = pipeline.structured_batches(
        pool, num_volumes=num_volumes, num_views=num_views, seed=2
    )
    for step in range(5):
        batch = batches[step]
        assert batch["image"].shape == (num_volumes * NUM_PARTITIONS * num_views, H, W, 1)
        _check_rows_match_sources(volumes, pool, batch)
        by_volume = batch["volume_id"].reshape(num_volumes, NUM_PARTITIONS * num_views)
        assert (by_volume == by_volume[:, :1]).all()
        assert len(set(by_volume[:, 0])) == num_volumes  # distinct volumes
        partitions = batch["partition_id"].reshape(num_volumes, NUM_PARTITIONS, num_views)
        assert (partitions == np.arange(NUM_PARTITIONS)[None, :, None]).all()
        samples = batch["sample_id"].reshape(num_volumes * NUM_PARTITIONS, num_views)
        assert (samples == samples[:, :1]).all() and len(set(samples[:, 0])) == len(samples)
        np.testing.assert_array_equal(
            np.bincount(batch["partition_id"]), [num_volumes * num_views] * NUM_PARTITIONS
        )


def test_every_slice_is_reachable():
    pool = pipeline.build_slice_pool(_volumes())
    kinds = {
        "structured": pipeline.structured_batches(pool, num_volumes=12, num_views=1, seed=9),
        "paired": pipeline.paired_volume_batches(pool, num_pairs=6, seed=9),
        "labelled": pipeline.labelled_batches(pool, batch_size=32, seed=9),
    }
    for kind, batches in kinds.items():
        seen = set(np.concatenate([batches[step]["sample_id"] for step in range(100)]))
        assert seen == set(range(pool.num_slices)), kind


def test_paired_batches_pair_same_partition_of_two_volumes():
    volumes = _volumes()
    pool = pipeline.build_slice_pool(volumes)
    batch = pipeline.paired_volume_batches(pool, num_pairs=3, seed=3)[7]
    _check_rows_match_sources(volumes, pool, batch)
    units = 3 * NUM_PARTITIONS
    volume_ids = batch["volume_id"].reshape(3, NUM_PARTITIONS, 2)
    assert (volume_ids == volume_ids[:, :1]).all()  # a pair keeps its two volumes
    assert len(set(volume_ids[:, 0].reshape(-1))) == 6  # all six volumes distinct
    partitions = batch["partition_id"].reshape(units, 2)
    assert (partitions[:, 0] == partitions[:, 1]).all()
    np.testing.assert_array_equal(partitions[:, 0], np.tile(np.arange(NUM_PARTITIONS), 3))
    np.testing.assert_array_equal(batch["view_id"], np.tile([0, 1], units))
    assert len(set(batch["sample_id"])) == 2 * units


def test_labelled_batches_only_from_requested_subjects():
    volumes = _volumes()
    pool = pipeline.build_slice_pool(volumes, subject_ids=["002", "007"], require_labels=True)
    batches = pipeline.labelled_batches(pool, batch_size=20, seed=4)
    seen = set()
    for step in range(10):
        batch = batches[step]
        assert batch["label"].shape == (20, H, W) and batch["label"].dtype == np.int32
        _check_rows_match_sources(volumes, pool, batch)
        seen.update(pool.subject_ids[v] for v in batch["volume_id"])
    assert seen == {"002", "007"}


def test_labelled_pool_requires_labels():
    volumes = _volumes(3, labelled=False)
    with pytest.raises(DataError, match="no label"):
        pipeline.build_slice_pool(volumes, require_labels=True)
    with pytest.raises(DataError, match="require_labels"):
        pipeline.labelled_batches(pipeline.build_slice_pool(volumes), batch_size=2, seed=0)
    with pytest.raises(DataError, match=r"\['009'\]"):
        pipeline.build_slice_pool(volumes, subject_ids=["000", "009"])


def _all_kinds(pool, seed, **sharding):
    return {
        "random": pipeline.random_slice_batches(
            pool, num_slices=8, num_views=2, seed=seed, **sharding
        ),
        "structured": pipeline.structured_batches(
            pool, num_volumes=4, num_views=2, seed=seed, **sharding
        ),
        "paired": pipeline.paired_volume_batches(pool, num_pairs=4, seed=seed, **sharding),
        "labelled": pipeline.labelled_batches(pool, batch_size=8, seed=seed, **sharding),
    }


def test_determinism_and_resume():
    pool = pipeline.build_slice_pool(_volumes())
    first, again, other = (_all_kinds(pool, seed) for seed in (5, 5, 6))
    for kind in first:
        uninterrupted = list(itertools.islice(first[kind].iterate(), 6))
        resumed = list(itertools.islice(again[kind].iterate(start_step=3, prefetch=0), 3))
        for a, b in zip(uninterrupted[3:], resumed, strict=True):
            _assert_batches_equal(a, b)
        _assert_batches_equal(uninterrupted[0], again[kind][0])
        assert not np.array_equal(first[kind][0]["sample_id"], other[kind][0]["sample_id"])
        assert not np.array_equal(uninterrupted[0]["sample_id"], uninterrupted[1]["sample_id"])


def test_device_reshape_keeps_complete_sub_batches():
    volumes = _volumes()
    pool = pipeline.build_slice_pool(volumes)
    flat = _all_kinds(pool, 7)
    sharded = _all_kinds(pool, 7, local_device_count=4)
    for kind in flat:
        batch = sharded[kind][2]
        assert batch["image"].shape[:2] == (4, flat[kind][2]["image"].shape[0] // 4)
        _assert_batches_equal(_flat(batch), flat[kind][2])
    structured = sharded["structured"][2]  # one volume per device, all partitions and views
    for device in range(4):
        assert len(set(structured["volume_id"][device])) == 1
        np.testing.assert_array_equal(
            np.sort(structured["partition_id"][device]), np.repeat(np.arange(NUM_PARTITIONS), 2)
        )
    paired = sharded["paired"][2]  # one pair per device: 2 volumes, every partition twice
    for device in range(4):
        assert len(set(paired["volume_id"][device])) == 2
        np.testing.assert_array_equal(np.bincount(paired["partition_id"][device]), [2] * 4)
    random = sharded["random"][2]  # whole slices: both views on the same device
    ids = random["sample_id"].reshape(4, -1, 2)
    assert (ids[..., 0] == ids[..., 1]).all()


def test_hosts_concatenate_to_single_process_batch():
    pool = pipeline.build_slice_pool(_volumes())
    single = _all_kinds(pool, 8, local_device_count=4, process_index=0, process_count=1)
    hosts = [
        _all_kinds(pool, 8, local_device_count=2, process_index=h, process_count=2)
        for h in range(2)
    ]
    for kind in single:
        for step in (0, 11):
            joined = {
                key: np.concatenate([h[kind][step][key] for h in hosts])
                for key in single[kind][step]
            }
            _assert_batches_equal(joined, single[kind][step])


def test_impossible_requests_raise():
    pool = pipeline.build_slice_pool(_volumes(4))
    with pytest.raises(ValueError, match="num_volumes=5"):
        pipeline.structured_batches(pool, num_volumes=5, num_views=2, seed=0)
    with pytest.raises(ValueError, match="num_pairs=3"):
        pipeline.paired_volume_batches(pool, num_pairs=3, seed=0)
    with pytest.raises(ValueError, match="multiple of .* = 4"):
        pipeline.structured_batches(pool, num_volumes=3, num_views=2, seed=0, local_device_count=4)
    with pytest.raises(ValueError, match="multiple of .* = 6"):
        pipeline.random_slice_batches(
            pool,
            num_slices=8,
            num_views=2,
            seed=0,
            local_device_count=3,
            process_index=0,
            process_count=2,
        )
    with pytest.raises(ValueError, match="num_slices"):
        pipeline.random_slice_batches(pool, num_slices=pool.num_slices + 1, num_views=2, seed=0)
    short = _volumes(2) + [_Volume("short", np.zeros((3, H, W), np.float32), None)]
    with pytest.raises(DataError, match=r"\['short'\].*fewer slices than num_partitions=4"):
        pipeline.build_slice_pool(short)


@pytest.mark.parametrize("local_device_count", [None, 2])
def test_volume_batches_pad_and_mask(local_device_count):
    volumes = _volumes(3)
    yielded = list(
        pipeline.volume_batches(volumes, chunk_size=4, local_device_count=local_device_count)
    )
    assert [v.subject_id for v, _ in yielded] == ["000", "001", "002"]
    for volume, batch in yielded:
        z = volume.image.shape[0]
        chunks = -(-z // 4)
        leading = (chunks, 4) if local_device_count is None else (chunks, 2, 2)
        assert batch["image"].shape == (*leading, H, W, 1)
        assert batch["valid"].shape == leading and batch["valid"].sum() == z
        np.testing.assert_array_equal(batch["image"][batch["valid"]][..., 0], volume.image)
        np.testing.assert_array_equal(batch["label"][batch["valid"]], volume.label)
        assert not batch["image"][~batch["valid"]].any()


def test_background_iteration_reraises_errors():
    def items():
        yield {"x": np.zeros(1)}
        raise RuntimeError("broken volume")

    iterator = pipeline._in_background(items(), size=2)
    assert next(iterator)["x"].shape == (1,)
    with pytest.raises(RuntimeError, match="broken volume"):
        next(iterator)
