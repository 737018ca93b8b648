"""Your own data, end to end: train, sweep, predict and cross-dataset evaluation on an MSD folder.

The commands users type (README "Your own data"), run in subprocesses on a small synthetic MSD
folder (`jaxcl.data.synthetic_msd`): 5 labelled cases and 2 unlabelled ones in imagesTs/, every
second one stored with permuted or flipped axes. `configs/folder.py:quick` keeps every stage to a
few steps at 64x64; the resolution is derived from the data. Subprocesses see one CPU device and
share a persistent XLA compilation cache.
"""

import json
import os
import pathlib
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from jaxcl.data import synthetic_msd

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
TIMEOUT_S = 600


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    base = tmp_path_factory.mktemp("folder_e2e")
    root, other_site = base / "MyTask", base / "OtherSite"
    synthetic_msd.write_msd_folder(str(root), num_labelled=5, num_unlabelled=2, reoriented_every=2)
    synthetic_msd.write_msd_folder(
        str(other_site), num_labelled=3, seed=7, reoriented_every=2, dataset_json_form="v1"
    )
    return {
        "base": base,
        "root": root,
        "other_site": other_site,
        "data": base / "tfds",
        "cache": base / "xla_cache",
    }


def _run(module, flags, dirs) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device
    env["JAX_COMPILATION_CACHE_DIR"] = str(dirs["cache"])
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    return subprocess.run(
        [sys.executable, "-m", module, *flags],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )


def _train_flags(dirs, workdir, root=None):
    return [
        "--config=configs/folder.py:quick",
        f"--config.data.root={root or dirs['root']}",
        f"--config.data.data_dir={dirs['data']}",
        f"--workdir={workdir}",
    ]


@pytest.fixture(scope="module")
def trained(dirs):
    workdir = dirs["base"] / "run"
    result = _run("jaxcl.main", _train_flags(dirs, workdir), dirs)
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir, result


def test_train_on_a_folder_writes_splits_model_and_results(trained):
    workdir, result = trained
    splits = json.loads((workdir / "splits.json").read_text())
    assert len(splits["test"]) == 1 and len(splits["val"]) == 2
    assert splits["labelled"]["tr1"]["c1"] and "tr2" in splits["labelled"]
    # Pre-training pool: every image but the test case, imagesTs/ included.
    assert len(splits["pretrain"]) == 6 and not set(splits["pretrain"]) & set(splits["test"])
    # Derived settings and automatic splits are logged with their reason.
    assert "data.target_resolution = " in result.stderr
    assert "data.slice_axis = 'auto'" in result.stderr
    assert "data.splits: test: 1 of 5 labelled cases" in result.stderr
    card = json.loads((workdir / "finetune" / "export" / "jaxcl_model.json").read_text())
    assert card["class_names"] == ["background", "RV", "Myo", "LV"]
    assert card["image_size"] == 64 and card["dataset"] == "folder"
    results = json.loads((workdir / "evaluate" / "results.json").read_text())
    assert results["num_subjects"] == 1
    assert list(results["subjects"]) == splits["test"]


def test_rerun_with_the_written_splits_resumes(trained, dirs):
    workdir, _ = trained
    flags = [*_train_flags(dirs, workdir), f"--config.data.splits.file={workdir / 'splits.json'}"]
    result = _run("jaxcl.main", flags, dirs)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "evaluate: already finished" in result.stderr


def test_predict_segments_new_scans_on_their_own_grid(trained, dirs):
    workdir, _ = trained
    output = dirs["base"] / "predictions"
    inputs = dirs["root"] / "imagesTs"
    result = _run(
        "jaxcl.predict",
        [f"--model={workdir}", f"--input={inputs}", f"--output={output}", "--save_probabilities"],
        dirs,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 segmented, 0 failed" in result.stdout + result.stderr
    for image_path in sorted(inputs.glob("*_0000.nii.gz")):
        case = image_path.name.removesuffix("_0000.nii.gz")
        image, prediction = nib.load(image_path), nib.load(output / f"{case}.nii.gz")
        assert prediction.shape == image.shape
        np.testing.assert_allclose(prediction.affine, image.affine)
        assert set(np.unique(np.asarray(prediction.dataobj))) <= {0, 1, 2, 3}
        probabilities = np.load(output / f"{case}.npz")["probabilities"]
        assert probabilities.shape == (4, *image.shape[::-1])
    # Bad items are reported and skipped; the run still ends non-zero.
    (dirs["base"] / "notes.nii.gz").write_text("not a scan")
    again = _run(
        "jaxcl.predict",
        [
            f"--model={workdir}",
            f"--input={inputs}",
            f"--input={dirs['base'] / 'notes.nii.gz'}",
            f"--output={output}",
        ],
        dirs,
    )
    assert again.returncode == 1
    text = again.stdout + again.stderr
    assert "0 segmented, 3 failed" in text and "pass --overwrite" in text and "notes.nii.gz" in text


def test_evaluate_an_export_on_another_dataset(trained, dirs):
    workdir, _ = trained
    other = dirs["base"] / "other_site_eval"
    flags = [
        *_train_flags(dirs, other, root=dirs["other_site"]),
        "--config.stages=evaluate",
        f"--config.evaluate.model_from={workdir}",
        "--config.evaluate.split=labelled",
    ]
    result = _run("jaxcl.main", flags, dirs)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((other / "evaluate" / "results.json").read_text())
    assert results["num_subjects"] == 3
    assert results["metadata"]["trained_on"] == "folder tr1-c1"


def test_sweep_runs_the_grid_on_a_folder(dirs):
    workdir = dirs["base"] / "sweep"
    flags = [*_train_flags(dirs, workdir), "--config.sweep.inits=random,GD"]
    result = _run("jaxcl.experiments", flags, dirs)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (workdir / "splits.json").exists()
    report = (workdir / "results.md").read_text()
    assert "random" in report and "G^D" in report
    cells = sorted((workdir / "cells").glob("*/tr1/c1/seed0/evaluate/DONE.json"))
    assert len(cells) == 2
