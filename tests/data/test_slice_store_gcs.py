"""Tests for jaxcl.data.slice_store on ``gs://``, with no network: a store built in a gs:// folder
is complete, opens and reads back exactly the images of the volumes and of a local store, and a
build killed there is not read but built again.

Two fakes share one local folder that stands for the buckets (``gs://<bucket>/<object>`` is
``<folder>/<bucket>/<object>``): `etils.epath.testing.mock_epath` maps the gs:// paths of
everything slice_store does through epath onto it, and a small HTTP server answers the
ArrayRecord reader, whose google-cloud-cpp client talks to ``CLOUD_STORAGE_EMULATOR_ENDPOINT``
(with anonymous credentials) when that is set. The server records each request, so a read that
did not go through it would be seen.

References are the volumes' own arrays and a local store built from the same volumes.
"""

import dataclasses
import http.server
import json
import os
import pathlib
import re
import subprocess
import sys
import threading
import urllib.parse

import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordWriter
from etils.epath import gpath
from etils.epath.testing import mock_epath

from jaxcl.data import preprocess, slice_store
from jaxcl.data.sources import DataError

SIZE = 8
NUM_PARTITIONS = 4
NUM_PARTS = 3
STORE = "gs://bucket/pools/store"
EMULATOR = "CLOUD_STORAGE_EMULATOR_ENDPOINT"
PROBE_SECONDS = 60  # the reader's first read, in a child process, is given this long


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


def _parts(volumes, num_parts=NUM_PARTS):
    """Readers of volumes in a scrambled order, as a dataset's files may hold them."""
    order = volumes[::-1]
    return [lambda part=part: iter(order[part::num_parts]) for part in range(num_parts)]


def _ids(volumes):
    return [v.subject_id for v in volumes]


def _pool_images(volumes):
    """(N, S, S) images of the pool's rows: volumes in subject-id order, slices in order."""
    return np.concatenate([v.image for v in sorted(volumes, key=lambda v: v.subject_id)])


def _build(directory, volumes, parts=None):
    slice_store.build(directory, parts or _parts(volumes), _ids(volumes), image_size=SIZE)
    return slice_store.open_store(directory, NUM_PARTITIONS)


class _FakeGcs(http.server.ThreadingHTTPServer):
    """The part of GCS's JSON API that the ArrayRecord reader uses, serving the objects of
    ``root / <bucket>``; ``requests`` lists each request's ("<bucket>/<object>", Range header)."""

    # The reader asks for a batch's records at once, one connection each: with the default
    # backlog of 5, the connections over it wait a second for TCP to retry.
    request_queue_size = 128

    def __init__(self, root: pathlib.Path):
        super().__init__(("127.0.0.1", 0), _GcsHandler)
        self.root = root
        self.requests: list[tuple[str, str | None]] = []
        self.errors: list[str] = []

    def environment(self) -> dict[str, str]:
        """The variables that send the reader here (past any proxy)."""
        bypass = {
            name: ",".join(filter(None, [os.environ.get(name), "127.0.0.1"]))
            for name in ("no_proxy", "NO_PROXY")
        }
        return {EMULATOR: f"http://127.0.0.1:{self.server_port}", **bypass}

    def local(self, uri: str) -> pathlib.Path:
        """The local file or folder of the gs:// path ``uri``."""
        return self.root / uri.removeprefix("gs://")


class _GcsHandler(http.server.BaseHTTPRequestHandler):
    """GET /storage/v1/b/<bucket>/o/<url-quoted object>: its bytes with ``?alt=media`` (Range
    ``bytes=a-b``, ``bytes=a-`` or ``bytes=-n`` answered 206), else its metadata; 404 if absent.

    Every request is answered: google-cloud-cpp retries a dropped connection for minutes."""

    server: _FakeGcs

    def log_message(self, format, *args):  # keeps the test output clean
        pass

    def do_GET(self):  # noqa: N802 - the name http.server calls
        try:
            status, headers, body = self._answer()
        except Exception as error:  # a bug of this fake: answer, record, and fail the test
            self.server.errors.append(f"GET {self.path}: {error!r}")
            status, headers, body = 400, {}, _error_body(400, repr(error))
        self.send_response(status)
        for name, value in {"Content-Length": str(len(body)), **headers}.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def _answer(self) -> tuple[int, dict[str, str], bytes]:
        url = urllib.parse.urlsplit(self.path)
        match = re.fullmatch(r"(?:/download)?/storage/v1/b/([^/]+)/o/(.+)", url.path)
        if match is None:
            raise ValueError("not an object's URL")
        bucket, name = match[1], urllib.parse.unquote(match[2])
        self.server.requests.append((f"{bucket}/{name}", self.headers.get("Range")))
        file = self.server.root / bucket / name
        if not file.is_file():
            return 404, {"Content-Type": "application/json"}, _error_body(404, "No such object")
        data = file.read_bytes()
        if urllib.parse.parse_qs(url.query).get("alt") != ["media"]:
            metadata = {"kind": "storage#object", "bucket": bucket, "name": name}
            metadata |= {"size": str(len(data)), "generation": "1", "metageneration": "1"}
            return 200, {"Content-Type": "application/json"}, json.dumps(metadata).encode()
        headers = {"Content-Type": "application/octet-stream", "x-goog-generation": "1"}
        header = self.headers.get("Range")
        if header is None:
            return 200, headers, data
        first, last = re.fullmatch(r"bytes=(\d*)-(\d*)", header.strip()).groups()
        if not first:  # the last `last` bytes
            start, stop = max(0, len(data) - int(last)), len(data)
        else:
            start, stop = int(first), min(int(last) + 1, len(data)) if last else len(data)
            if start >= len(data):
                return 416, {"Content-Range": f"bytes */{len(data)}"}, b""
        headers["Content-Range"] = f"bytes {start}-{stop - 1}/{len(data)}"
        return 206, headers, data[start:stop]


def _error_body(code: int, message: str) -> bytes:
    return json.dumps({"error": {"code": code, "message": message}}).encode()


_PROBE = """
import sys
from array_record.python.array_record_module import ArrayRecordReader
print(ArrayRecordReader(sys.argv[1], "readahead_buffer_size:0").num_records())
"""


def _skip_unless_the_reader_uses(server: _FakeGcs) -> None:
    """Skips the module unless ArrayRecordReader reads gs:// from ``EMULATOR``.

    In a child process with a time limit: a reader that ignored the variable would try the real
    GCS and, with no network, retry for minutes."""
    (server.root / "probe").mkdir()
    writer = ArrayRecordWriter(
        os.fspath(server.root / "probe" / "records.array_record"), "group_size:1,uncompressed"
    )
    for record in (b"a", b"b", b"c"):
        writer.write(record)
    writer.close()
    try:
        result = subprocess.run(
            [sys.executable, "-c", _PROBE, "gs://probe/records.array_record"],
            env={**os.environ, **server.environment()},
            capture_output=True,
            text=True,
            timeout=PROBE_SECONDS,
            check=False,
        )
        output, report = result.stdout, f"exit status {result.returncode}: {result.stderr}"
    except subprocess.TimeoutExpired:
        output, report = "", f"no answer in {PROBE_SECONDS} s"
    if not server.requests and not server.errors:
        pytest.skip(
            f"array_record's ArrayRecordReader does not read gs:// through {EMULATOR} (the fake "
            f"GCS server got no request; {report[-300:]}), so gs:// cannot be tested offline"
        )
    assert not server.errors, server.errors
    assert output.split() == ["3"], f"the reader's probe failed ({report[-2000:]})"


@pytest.fixture(scope="module")
def _server(tmp_path_factory):
    server = _FakeGcs(tmp_path_factory.mktemp("probe-gcs"))
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    try:
        _skip_unless_the_reader_uses(server)
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def _epath_mocks(server: _FakeGcs) -> dict:
    """mock_epath's functions: gs:// paths (either path of a copy or rename) become the fake
    bucket's local ones, paths returned by glob and walk gs:// again; local paths pass."""

    def local(path):
        path = os.fspath(path)
        return os.fspath(server.local(path)) if path.startswith("gs://") else path

    def uri(path, like):
        if not os.fspath(like).startswith("gs://"):
            return path
        return "gs://" + pathlib.Path(path).relative_to(server.root).as_posix()

    def one_path(original, path, *args, **kwargs):
        return original(local(path), *args, **kwargs)

    def two_paths(original, path, destination, **kwargs):
        return original(local(path), local(destination), **kwargs)

    def glob(original, pattern):
        return [uri(path, pattern) for path in original(local(pattern))]

    def walk(original, top, **kwargs):
        for folder, folders, names in original(local(top), **kwargs):
            yield uri(folder, top), folders, names

    one_path_functions = ["exists", "isdir", "listdir", "makedirs", "mkdir", "open", "remove"]
    one_path_functions += ["rmtree", "stat"]
    return {
        **dict.fromkeys(one_path_functions, one_path),
        **dict.fromkeys(["copy", "rename", "replace"], two_paths),
        "glob": glob,
        "walk": walk,
    }


@pytest.fixture
def gcs(_server, tmp_path, monkeypatch):
    """gs:// paths on fake buckets in ``tmp_path / "gcs"``, for epath and the ArrayRecord
    reader; yields the fake server (``local``, ``requests``)."""
    _server.root = tmp_path / "gcs"
    _server.root.mkdir()
    _server.requests.clear()
    _server.errors.clear()
    for name, value in _server.environment().items():  # read when a reader is created
        monkeypatch.setenv(name, value)
    # With TensorFlow installed, epath sends gs:// to tf.io.gfile whatever mock_epath patches.
    monkeypatch.setattr(gpath, "_is_tf_installed", lambda: False)
    monkeypatch.chdir(tmp_path)  # a gs:// path that escaped the mocks would be written here
    with mock_epath(**_epath_mocks(_server)):
        yield _server
    assert not _server.errors, _server.errors
    assert not (tmp_path / "gs:").exists(), "a gs:// path was written as a local one"


def test_a_store_on_gcs_is_complete_and_reads_the_same_images_through_the_bucket(gcs, tmp_path):
    volumes = _volumes()
    store = _build(STORE, volumes)
    assert slice_store.is_complete(STORE)
    part_names = [f"part-{number:05d}.array_record" for number in range(NUM_PARTS)]
    assert sorted(os.listdir(gcs.local(STORE))) == sorted([slice_store.INDEX_FILE, *part_names])
    assert os.listdir(gcs.local(STORE).parent) == ["store"]  # no *.incomplete-* folder left
    assert store.directory == STORE

    ordered = sorted(volumes, key=lambda v: v.subject_id)
    expected = np.concatenate([v.image for v in ordered])
    rows = np.array([5, 0, 17, 5, len(expected) - 1, 12, 3, 31, 5, 20])  # repeated and unordered
    assert set(store.row_part[rows].tolist()) == set(range(NUM_PARTS))  # rows of every part
    gcs.requests.clear()
    np.testing.assert_array_equal(store.take(rows), expected[rows])
    np.testing.assert_array_equal(store.take(np.arange(store.num_slices)), expected)
    assert gcs.requests, "the images were not read through the fake GCS server"
    assert {name for name, _ in gcs.requests} == {f"bucket/pools/store/{n}" for n in part_names}

    local = _build(tmp_path / "local", volumes)
    assert store.subject_ids == local.subject_ids == tuple(_ids(ordered))
    assert store.num_slices == local.num_slices == len(expected)
    np.testing.assert_array_equal(store.slice_volume, local.slice_volume)
    np.testing.assert_array_equal(store.slice_partition, local.slice_partition)
    np.testing.assert_array_equal(
        store.slice_partition,
        np.concatenate([preprocess.partition_ids(len(v.image), NUM_PARTITIONS) for v in ordered]),
    )
    np.testing.assert_array_equal(store.take(rows), local.take(rows))


@pytest.mark.parametrize("damage", ["no index", "short part"])
def test_a_killed_build_or_copy_on_gcs_is_not_read_but_rebuilt(gcs, damage):
    """The parts of a build killed before index.json was copied, or a part object shorter
    than index.json records, must not count."""
    volumes = _volumes()
    _build(STORE, volumes)
    folder = gcs.local(STORE)
    if damage == "no index":
        (folder / slice_store.INDEX_FILE).unlink()
    else:
        part = folder / "part-00001.array_record"
        part.write_bytes(part.read_bytes()[:-100])
    assert not slice_store.is_complete(STORE)
    with pytest.raises(DataError, match="not a complete slice store"):
        slice_store.open_store(STORE, NUM_PARTITIONS)

    gcs.requests.clear()
    store = _build(STORE, volumes)
    np.testing.assert_array_equal(store.take(np.arange(store.num_slices)), _pool_images(volumes))
    assert gcs.requests
    assert os.listdir(folder.parent) == ["store"]


def test_an_interrupted_build_on_gcs_leaves_nothing_and_is_built_again(gcs):
    volumes = _volumes()

    def failing():
        yield volumes[0]
        raise KeyboardInterrupt  # the build is stopped mid-way

    with pytest.raises(KeyboardInterrupt):
        _build(STORE, volumes, parts=[failing, *_parts(volumes)])
    assert not slice_store.is_complete(STORE)
    assert os.listdir(gcs.local(STORE).parent) == []  # its *.incomplete-* folder was removed
    with pytest.raises(DataError, match="not a complete slice store"):
        slice_store.open_store(STORE, NUM_PARTITIONS)
    store = _build(STORE, volumes)
    np.testing.assert_array_equal(store.take(np.arange(store.num_slices)), _pool_images(volumes))
