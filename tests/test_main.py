"""End-to-end runs of `python -m jaxcl.main` in subprocesses (the command users type).

The quick synthetic config runs all four stages once per session (its 60 subjects are generated
once into a session-wide data dir); the resume tests copy its pre-training stages and re-run the
fine-tuning, so they compare against its fine-tuning as the uninterrupted run. Subprocesses see
one CPU device and share a persistent XLA compilation cache, so only the first run compiles.
"""

import json
import logging
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time

import nibabel as nib
import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags

from jaxcl import main as jaxcl_main
from jaxcl.config_validation import ConfigError
from jaxcl.data import sources
from jaxcl.data import tfds as volumes_tfds
from jaxcl.train import loop, trainer

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
STAGES = ("pretrain_global", "pretrain_local", "finetune", "evaluate")
TRAINED_STAGES = STAGES[:3]
NUM_TEST_SUBJECTS = 16  # docs/METHOD.md §12: test 044-059
# More fine-tuning steps than :quick's 6, so that a run can be stopped between checkpoints
# (every 3 steps; validation every 3, logs every 2).
QUICK_FLAGS = ["--config=configs/synthetic.py:quick", "--config.finetune.steps=12"]
TIMEOUT_S = 600


@pytest.fixture(scope="session")
def session_dirs(tmp_path_factory):
    return {
        "data": tmp_path_factory.mktemp("synthetic_data"),
        "cache": tmp_path_factory.mktemp("xla_cache"),
        "root": tmp_path_factory.mktemp("workdirs"),
    }


def _command(workdir, data_dir, flags=QUICK_FLAGS) -> list[str]:
    return [
        sys.executable,
        "-m",
        "jaxcl.main",
        *flags,
        f"--workdir={workdir}",
        f"--config.data.data_dir={data_dir}",
    ]


def _env(cache_dir) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device
    env["JAX_COMPILATION_CACHE_DIR"] = str(cache_dir)
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    return env


def _run(command, dirs) -> subprocess.CompletedProcess:
    return subprocess.run(
        command,
        cwd=REPO_ROOT,
        env=_env(dirs["cache"]),
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )


def _start(command, dirs, log_path) -> subprocess.Popen:
    """Starts a run in the background, its output into `log_path` (no pipe to fill up)."""
    with open(log_path, "w", encoding="utf-8") as log:
        return subprocess.Popen(
            command, cwd=REPO_ROOT, env=_env(dirs["cache"]), stdout=log, stderr=subprocess.STDOUT
        )


def _checkpoint_steps(stage_dir) -> list[int]:
    directory = pathlib.Path(stage_dir) / "checkpoints"
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def _wait_until(condition, process: subprocess.Popen, log_path, what: str) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while not condition():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            process.wait()
            pytest.fail(f"run ended before {what}:\n{pathlib.Path(log_path).read_text()[-3000:]}")
        time.sleep(0.05)


def _metric_lines(stage_dir) -> list[dict]:
    """metrics.jsonl without the wall-clock dependent images/s."""
    path = pathlib.Path(stage_dir) / "metrics" / "metrics.jsonl"
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    return [{k: v for k, v in line.items() if k != "images_per_s"} for line in lines]


def _dice(workdir) -> dict:
    results = json.loads((pathlib.Path(workdir) / "evaluate" / "results.json").read_text())
    return {"subjects": results["subjects"], "mean": results["mean"], "std": results["std"]}


@pytest.fixture(scope="session")
def quick_run(session_dirs):
    """The quick config, all stages, in a fresh workdir: (workdir, process, seconds)."""
    workdir = session_dirs["root"] / "quick"
    start = time.monotonic()
    process = _run(_command(workdir, session_dirs["data"]), session_dirs)
    return workdir, process, time.monotonic() - start


def test_quick_config_runs_all_stages(quick_run, session_dirs):
    workdir, process, _ = quick_run
    assert process.returncode == 0, process.stderr[-3000:]
    for stage in STAGES:
        assert (workdir / stage / "DONE.json").is_file(), stage

    for stage in TRAINED_STAGES:
        metrics_dir = workdir / stage / "metrics"
        lines = _metric_lines(workdir / stage)
        assert all(np.isfinite(line["loss"]) for line in lines if "loss" in line), stage
        assert max(line["step"] for line in lines if "loss" in line) == _total_steps(stage)
        assert any(p.name.startswith("events.out.tfevents") for p in metrics_dir.iterdir()), stage
        assert (workdir / stage / "export").is_dir(), stage
    val_lines = [line for line in _metric_lines(workdir / "finetune") if "val_dice" in line]
    assert [line["step"] for line in val_lines] == [3, 6, 9, 12]
    assert all(0.0 <= line["val_dice"] <= 1.0 for line in val_lines)
    assert (workdir / "finetune" / "best").is_dir()

    evaluate_dir = workdir / "evaluate"
    results = json.loads((evaluate_dir / "results.json").read_text())
    assert results["num_subjects"] == NUM_TEST_SUBJECTS
    test_ids = [f"{i:03d}" for i in range(44, 60)]
    assert sorted(results["subjects"]) == test_ids
    assert results["classes"] == ["RV", "Myo", "LV"]
    per_subject = [results["subjects"][s]["mean"] for s in test_ids]
    assert results["mean"] == pytest.approx(np.mean(per_subject))
    for subject in results["subjects"].values():
        assert subject["mean"] == pytest.approx(np.mean(list(subject["dice"].values())))
    assert "| mean" in (evaluate_dir / "results.md").read_text()

    # Predictions on the native grid with the original affine (docs/METHOD.md §11).
    root = volumes_tfds.synthetic_root(str(session_dirs["data"]))
    originals = {
        s.subject_id: s.image_path
        for s in sources.get_layout("synthetic", root).find_subjects(root)
    }
    predictions = sorted((evaluate_dir / "predictions").glob("*.nii.gz"))
    assert [p.name.removesuffix(".nii.gz") for p in predictions] == test_ids
    for path in predictions:
        prediction = nib.load(path)
        original = nib.load(originals[path.name.removesuffix(".nii.gz")])
        np.testing.assert_allclose(prediction.affine, original.affine, atol=1e-5)
        assert prediction.shape == original.shape
        assert set(np.unique(np.asarray(prediction.dataobj))) <= {0, 1, 2, 3}

    figures = {p.name for p in (evaluate_dir / "figures").glob("*.png")}
    assert "loss_curves.png" in figures
    assert len(figures) >= 2  # overlays of test subjects besides the loss curves


def _total_steps(stage: str) -> int:
    return {"pretrain_global": 4, "pretrain_local": 4, "finetune": 12}[stage]


def test_rerun_skips_finished_stages(quick_run, session_dirs):
    workdir, first, first_seconds = quick_run
    assert first.returncode == 0, first.stderr[-3000:]
    results_before = (workdir / "evaluate" / "results.json").stat().st_mtime_ns

    start = time.monotonic()
    process = _run(_command(workdir, session_dirs["data"]), session_dirs)
    seconds = time.monotonic() - start

    assert process.returncode == 0, process.stderr[-3000:]
    for stage in STAGES:
        assert f"{stage}: already finished" in process.stderr
    assert "starting." not in process.stderr
    assert (workdir / "evaluate" / "results.json").stat().st_mtime_ns == results_before
    assert seconds < first_seconds / 2, (seconds, first_seconds)


def test_killed_then_preempted_run_ends_like_the_uninterrupted_run(quick_run, session_dirs):
    """The acceptance test: kill a run at any moment, rerun the same command, same results.

    A fresh workdir holds copies of the quick run's finished pre-training stages, so the same
    command re-runs fine-tuning and evaluation. Its first run is SIGKILLed once a checkpoint
    exists, the rerun gets SIGTERM after its next checkpoint (exit 143, message to rerun), and
    the third run finishes. Metrics and test Dice must equal the quick run's (uninterrupted).
    """
    reference, first, _ = quick_run
    assert first.returncode == 0, first.stderr[-3000:]
    workdir = session_dirs["root"] / "interrupted"
    for stage in ("pretrain_global", "pretrain_local"):
        shutil.copytree(reference / stage, workdir / stage)
    finetune_dir = workdir / "finetune"
    command = _command(workdir, session_dirs["data"])
    log_path = session_dirs["root"] / "interrupted.log"

    # 1. SIGKILL as soon as a checkpoint exists (at step 3; the run goes on for a few steps).
    process = _start(command, session_dirs, log_path)
    _wait_until(lambda: _checkpoint_steps(finetune_dir), process, log_path, "a checkpoint")
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    killed_at = _checkpoint_steps(finetune_dir)[-1]
    assert killed_at < 9, "the kill came too late to leave room for the SIGTERM below"
    assert not (finetune_dir / "DONE.json").exists()

    # 2. The same command resumes; SIGTERM once it wrote its own next checkpoint.
    process = _start(command, session_dirs, log_path)
    _wait_until(
        lambda: _checkpoint_steps(finetune_dir)[-1] > killed_at,
        process,
        log_path,
        "a checkpoint after the resumed step",
    )
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=TIMEOUT_S) == 143
    output = log_path.read_text()
    assert f"finetune: resuming from step {killed_at}" in output
    assert "Traceback" not in output
    message = re.search(r"jaxcl: finetune: SIGTERM at step (\d+); .*rerun the same command", output)
    assert message, output[-3000:]
    assert int(message.group(1)) in _checkpoint_steps(finetune_dir)
    assert not (finetune_dir / "DONE.json").exists()

    # 3. The same command finishes.
    process = _run(command, session_dirs)
    assert process.returncode == 0, process.stderr[-3000:]
    assert f"finetune: resuming from step {message.group(1)}" in process.stderr
    assert "pretrain_global: already finished" in process.stderr

    assert _metric_lines(finetune_dir) == _metric_lines(reference / "finetune")
    assert _dice(workdir) == _dice(reference)


def test_real_dataset_without_data_explains_what_to_download(session_dirs):
    workdir = session_dirs["root"] / "acdc"
    process = _run(
        _command(workdir, session_dirs["root"] / "acdc_data", flags=["--config=configs/acdc.py"]),
        session_dirs,
    )
    assert process.returncode == 1
    assert "Traceback" not in process.stderr
    assert "https://www.creatis.insa-lyon.fr/Challenge/acdc/" in process.stderr
    assert "data.root" in process.stderr


@pytest.fixture
def parsed_flags(monkeypatch):
    """jaxcl.main's absl flags parsed in this process; flags and log levels restored after."""
    monkeypatch.chdir(REPO_ROOT)
    monkeypatch.syspath_prepend(str(REPO_ROOT))
    loggers = [logging.getLogger(name) for name in ("", "absl", "jax")]
    levels = [logger.level for logger in loggers]
    flags.FLAGS(["jaxcl.main", "--config=configs/synthetic.py:quick", "--workdir=unused"])
    yield
    flags.FLAGS.unparse_flags()
    for logger, level in zip(loggers, levels, strict=True):
        logger.setLevel(level)


@pytest.mark.parametrize(
    "error, exit_code",
    [
        (sources.DataError("labels of x.nii.gz have unexpected values [7]"), 1),
        (FileNotFoundError("No exported stage variables in /w/pretrain_global/export"), 1),
        (loop.NonFiniteLossError("finetune: non-finite metrics at step 7"), 1),
        (loop.PreemptedError("finetune: SIGTERM at step 7; rerun the same command"), 143),
        (ConfigError(["config.model.dtype='float16': not one of ['float32', 'bfloat16']"]), 1),
    ],
)
@pytest.mark.usefixtures("parsed_flags")
def test_known_errors_exit_with_a_message_and_no_traceback(monkeypatch, capsys, error, exit_code):
    def fail(config, workdir):
        assert config.data.dataset == "synthetic" and workdir == "unused"
        raise error

    monkeypatch.setattr(trainer, "train_and_evaluate", fail)
    with pytest.raises(SystemExit) as exit_info:
        jaxcl_main.main(["jaxcl.main"])
    assert exit_info.value.code == exit_code
    assert capsys.readouterr().err == f"jaxcl: {error}\n"


@pytest.mark.parametrize(
    "value, expected", [(None, None), ("", ""), ("/runs/a/export", "/runs/a/export")]
)
def test_transfer_sources_can_be_set_on_the_command_line(monkeypatch, value, expected):
    # trainer: None = this workdir's stage, "" = random init, else an export folder.
    monkeypatch.chdir(REPO_ROOT)
    monkeypatch.syspath_prepend(str(REPO_ROOT))
    argv = ["jaxcl.main", "--config=configs/acdc.py", "--workdir=unused"]
    if value is not None:
        argv += [
            f"--config.{stage}.{key}={value}"
            for stage, key in [
                ("pretrain_local", "encoder_from"),
                ("finetune", "encoder_from"),
                ("finetune", "decoder_from"),
            ]
        ]
    # Parsed as jaxcl.main parses --config, on flags of this test only.
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, flag_values=flag_values, sys_argv=argv)
    flag_values(argv, known_only=True)
    config = flag_values.config
    assert config.pretrain_local.encoder_from == expected
    assert config.finetune.encoder_from == expected
    assert config.finetune.decoder_from == expected


def test_comma_separated_stages_on_the_command_line_are_split(monkeypatch, tmp_path):
    monkeypatch.chdir(REPO_ROOT)
    monkeypatch.syspath_prepend(str(REPO_ROOT))
    argv = [
        "jaxcl.main",
        "--config=configs/synthetic.py:quick",
        "--config.stages=finetune,evaluate",
    ]
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, flag_values=flag_values, sys_argv=argv)
    flag_values(argv, known_only=True)
    seen = {}

    def stop(config, **_):
        seen["stages"] = tuple(config.stages)
        raise ConfigError(["stopped after reading the stages"])

    monkeypatch.setattr(trainer.config_validation, "validate", stop)
    with pytest.raises(ConfigError):
        trainer.train_and_evaluate(flag_values.config, str(tmp_path))
    assert seen["stages"] == ("finetune", "evaluate")
