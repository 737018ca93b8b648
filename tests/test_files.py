"""Workdir files: atomic writes, and `gs://` paths going through etils.epath end to end.

`fake_gcs` serves `gs://bucket/...` from a local folder by swapping the functions of epath's
file-system backend, so the code under test handles real `gs://` strings: any `os` call left on
a workdir path would write to `./gs:/bucket/...` instead and fail the checks.
"""

import json
import os

import pytest
from etils import epath
from etils.epath import testing as epath_testing

from jaxcl import figures, files


@pytest.fixture
def fake_gcs(tmp_path, monkeypatch):
    """Local folder standing for the bucket `gs://bucket`."""
    root = tmp_path / "gcs"
    # gs:// paths then take epath's backend table, which mock_epath swaps, not tf.io.gfile.
    monkeypatch.setattr(epath.gpath, "_is_tf_installed", lambda: False)

    def local(path):
        path = os.fspath(path)
        return str(root) + path.removeprefix("gs:/") if path.startswith("gs://") else path

    def one_path(function, path, *args, **kwargs):
        return function(local(path), *args, **kwargs)

    def two_paths(function, source, target, *args, **kwargs):
        return function(local(source), local(target), *args, **kwargs)

    single = ("open", "exists", "isdir", "listdir", "makedirs", "mkdir", "remove", "rmtree", "stat")
    with epath_testing.mock_epath(
        **dict.fromkeys(single, one_path), rename=two_paths, replace=two_paths, copy=two_paths
    ):
        yield root


def test_path_makes_local_paths_absolute_and_keeps_uris(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert str(files.path("run/a")) == str(tmp_path / "run" / "a")
    assert str(files.path("gs://bucket/run")) == "gs://bucket/run"
    assert str(files.path("gs://bucket/run") / "finetune") == "gs://bucket/run/finetune"


def test_write_atomically_creates_the_folder_and_replaces(tmp_path):
    target = tmp_path / "a" / "b" / "value.json"
    files.write_atomically(target, '{"x": 1}')
    files.write_atomically(str(target), '{"x": 2}')
    assert json.loads(target.read_text()) == {"x": 2}
    files.write_atomically(tmp_path / "blob.bin", b"\x00\x01")
    assert (tmp_path / "blob.bin").read_bytes() == b"\x00\x01"
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a", "b", "blob.bin", "value.json"]


def test_write_atomically_to_gcs(fake_gcs, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    files.write_atomically("gs://bucket/run/finetune/DONE.json", "{}")
    assert (fake_gcs / "bucket" / "run" / "finetune" / "DONE.json").read_text() == "{}"
    assert epath.Path("gs://bucket/run/finetune/DONE.json").exists()
    assert not (tmp_path / "gs:").exists()


def test_loss_curves_read_and_written_on_gcs(fake_gcs, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    metrics = fake_gcs / "bucket" / "run" / "finetune" / "metrics" / "metrics.jsonl"
    metrics.parent.mkdir(parents=True)
    metrics.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5, "val_dice": 0.4}\n')
    figures.plot_loss_curves(
        {"finetune": "gs://bucket/run/finetune/metrics/metrics.jsonl"},
        "gs://bucket/run/evaluate/figures/loss_curves.png",
    )
    png = fake_gcs / "bucket" / "run" / "evaluate" / "figures" / "loss_curves.png"
    assert png.read_bytes().startswith(b"\x89PNG")
    assert not (tmp_path / "gs:").exists()
