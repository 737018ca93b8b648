"""Pre-training batches from a slice store equal the in-memory pool's bit for bit, for every
batch kind, device layout and host, and resume exactly (jaxcl.data.streaming).

The reference is `pipeline`'s in-memory path (itself tested against the volumes' arrays in
tests/data/test_pipeline.py): the store must change where the images come from, nothing else.
"""

import dataclasses
import itertools

import numpy as np
import pytest

from jaxcl.data import pipeline, slice_store, streaming

SIZE = 8
NUM_PARTITIONS = 4


@dataclasses.dataclass(frozen=True)
class _Volume:
    subject_id: str
    image: np.ndarray
    label: None = None


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """(in-memory pool, store) of the same 20 volumes, the store written in 3 parts."""
    rng = np.random.default_rng(0)
    volumes = [
        _Volume(f"{v:03d}", rng.normal(size=(int(rng.integers(4, 11)), SIZE, SIZE)).astype("f4"))
        for v in range(20)
    ]
    directory = tmp_path_factory.mktemp("streaming") / "store"
    slice_store.build(
        directory,
        [lambda part=part: iter(volumes[part::3]) for part in range(3)],
        [v.subject_id for v in volumes],
        image_size=SIZE,
    )
    pool = pipeline.build_slice_pool(volumes, num_partitions=NUM_PARTITIONS)
    return pool, slice_store.open_store(directory, NUM_PARTITIONS)


def _kinds(pool, **layout):
    """Every pre-training batch kind, with shapes divisible by 8 devices x 2 hosts."""
    random, structured = pipeline.random_slice_batches, pipeline.structured_batches
    return {
        "random G^R": random(pool, num_slices=16, num_views=2, seed=3, **layout),
        "random restoration": random(pool, num_slices=16, num_views=1, seed=3, **layout),
        "structured G^D-": structured(pool, num_volumes=8, num_views=3, seed=3, **layout),
        "structured G^D": structured(pool, num_volumes=8, num_views=2, seed=3, **layout),
        "paired BYOL-D": pipeline.paired_volume_batches(pool, num_pairs=8, seed=3, **layout),
    }


def _assert_equal(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


LAYOUTS = [
    {"local_device_count": None, "process_index": 0, "process_count": 1},
    {"local_device_count": 8, "process_index": 0, "process_count": 1},
    {"local_device_count": 4, "process_index": 0, "process_count": 2},
    {"local_device_count": 4, "process_index": 1, "process_count": 2},
]


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda layout: str(tuple(layout.values())))
def test_store_batches_equal_memory_batches(sources, layout):
    pool, store = sources
    in_memory, from_store = _kinds(pool, **layout), _kinds(store, **layout)
    for kind in in_memory:
        for step in (0, 1, 17):
            _assert_equal(from_store[kind][step], in_memory[kind][step])


def test_each_host_reads_only_its_own_rows(sources, monkeypatch):
    _, store = sources
    read = []
    original = slice_store.SliceStore.take
    monkeypatch.setattr(
        slice_store.SliceStore, "take", lambda self, rows: read.append(rows) or original(self, rows)
    )
    hosts = [
        _kinds(store, local_device_count=4, process_index=h, process_count=2) for h in range(2)
    ]
    for kind in hosts[0]:
        for host in range(2):
            read.clear()
            batch = hosts[host][kind][5]
            np.testing.assert_array_equal(np.concatenate(read), batch["sample_id"].reshape(-1))
        single = _kinds(store, local_device_count=8)[kind][5]
        both = np.concatenate([hosts[h][kind][5]["sample_id"] for h in range(2)], axis=0)
        np.testing.assert_array_equal(both.reshape(-1), single["sample_id"].reshape(-1))


@pytest.mark.parametrize("parallelism", [1, 3])
@pytest.mark.parametrize("process_index", [0, 1])
def test_a_restarted_stream_continues_like_the_uninterrupted_one(
    sources, parallelism, process_index
):
    pool, store = sources
    layout = {"local_device_count": 4, "process_index": process_index, "process_count": 2}
    reference, from_store = _kinds(pool, **layout), _kinds(store, **layout)
    for kind in reference:
        streamed = streaming.StreamedBatches(from_store[kind], parallelism=parallelism)
        uninterrupted = list(itertools.islice(streamed.iterate(), 7))
        restarted = list(itertools.islice(streamed.iterate(start_step=4, prefetch=0), 3))
        for step, batch in enumerate(uninterrupted):
            _assert_equal(batch, reference[kind][step])
        for a, b in zip(uninterrupted[4:], restarted, strict=True):
            _assert_equal(a, b)


def test_a_failed_read_raises_in_the_consumer(sources, monkeypatch):
    _, store = sources
    batches = _kinds(store)["random G^R"]

    def unreadable(self, rows):
        raise OSError("part-00001.array_record: input/output error")

    monkeypatch.setattr(slice_store.SliceStore, "take", unreadable)
    with pytest.raises(OSError, match="input/output error"):
        next(streaming.StreamedBatches(batches, parallelism=2).iterate(start_step=1))
    with pytest.raises(ValueError, match="parallelism=0"):
        streaming.StreamedBatches(batches, parallelism=0)
