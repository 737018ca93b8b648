"""End-to-end `python -m jaxcl.experiments` with the real trainer on the quick synthetic config.

The quick sweep (configs/common.py `shrink`: random, G^D and G^D + L^R on tr1-c1) runs once per
session; the other tests rerun it, report on it, or start small sweeps of their own. Subprocesses
see one CPU device and share a persistent XLA compilation cache, so only the first run compiles.
"""

import csv
import io
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import pytest

from jaxcl.experiments import plan, records, report

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
TIMEOUT_S = 900
QUICK_CELLS = ["random", "GD", "GD+LR"]


@pytest.fixture(scope="session")
def sweep_dirs(tmp_path_factory):
    return {
        "data": tmp_path_factory.mktemp("sweep_synthetic_data"),
        "cache": tmp_path_factory.mktemp("sweep_xla_cache"),
        "root": tmp_path_factory.mktemp("sweeps"),
    }


def _command(workdir, dirs, *flags) -> list[str]:
    return [
        sys.executable,
        "-m",
        "jaxcl.experiments",
        "--config=configs/synthetic.py:quick",
        f"--workdir={workdir}",
        f"--config.data.data_dir={dirs['data']}",
        *flags,
    ]


def _env(dirs) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device
    env["JAX_COMPILATION_CACHE_DIR"] = str(dirs["cache"])
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    return env


def _run(command, dirs) -> subprocess.CompletedProcess:
    return subprocess.run(
        command,
        cwd=REPO_ROOT,
        env=_env(dirs),
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )


def _csv_rows(workdir) -> list[dict]:
    lines = (pathlib.Path(workdir) / report.CSV_FILE).read_text().splitlines(keepends=True)
    return list(
        csv.DictReader(io.StringIO("".join(line for line in lines if not line.startswith("#"))))
    )


@pytest.fixture(scope="session")
def quick_sweep(sweep_dirs):
    """The quick sweep in a fresh workdir: (workdir, process, seconds)."""
    workdir = sweep_dirs["root"] / "quick"
    start = time.monotonic()
    process = _run(_command(workdir, sweep_dirs), sweep_dirs)
    return workdir, process, time.monotonic() - start


def test_quick_sweep_shares_pretrainings_and_reports_every_cell(quick_sweep):
    workdir, process, _ = quick_sweep
    assert process.returncode == 0, process.stderr[-3000:]
    log = process.stderr
    # One global and one local pre-training, each shared; three fine-tunings.
    assert log.count("pretrain_global: starting.") == 1
    assert log.count("pretrain_local: starting.") == 1
    assert log.count("finetune: starting.") == 3
    global_export = workdir / "pretrain" / "GD" / "pretrain_global" / "export"
    local_export = workdir / "pretrain" / "GD+LR" / "pretrain_local" / "export"
    assert f"pretrain_local: loaded encoder (60 arrays) from {global_export}." in log
    assert "finetune: no transfer, encoder randomly initialised." in log
    assert f"finetune: loaded encoder (60 arrays) from {global_export}." in log
    assert f"finetune: loaded encoder (60 arrays) from {local_export}." in log
    assert f"from {local_export}." in log.split("decoder/block3 (45 arrays)")[1].splitlines()[0]
    assert "sweep: run 5/5, cell 3/3: cell GD+LR tr1-c1 seed 0 starting" in log

    rows = _csv_rows(workdir)
    assert [(r["init"], r["n_labelled"], r["subset"], r["seed"]) for r in rows] == [
        (init, "1", "c1", "0") for init in QUICK_CELLS
    ]
    for row in rows:
        cell_dir = workdir / "cells" / row["init"] / "tr1" / "c1" / "seed0"
        results = json.loads((cell_dir / "evaluate" / "results.json").read_text())
        assert results["classes"] == ["RV", "Myo", "LV"]
        for name in results["classes"]:
            assert float(row[f"dice_{name}"]) == pytest.approx(
                results["per_class"][name]["mean"], abs=1e-6
            )
        assert float(row["dice_mean"]) == pytest.approx(results["mean"], abs=1e-6)
        time_record = records.read_time(cell_dir)
        assert float(row["seconds"]) == pytest.approx(time_record["seconds"], abs=0.05)

    markdown = (workdir / report.MARKDOWN_FILE).read_text()
    for label in ("random", "G^D", "G^D + L^R"):
        assert f"\n| {label} | " in markdown
    assert (
        "sweep started with: python -m jaxcl.experiments --config=configs/synthetic.py:quick"
        in (markdown)
    )
    assert re.search(r"\n- machine: \d+ CPU cores \(.+\), \d+ jax devices?: cpu \(jax ", markdown)
    assert f"]({report.PLOT_FILE})" in markdown
    # random, G^D and G^D + L^R on tr1-c1 with one seed: one pair per comparison, no interval,
    # so claims 1 and 3 are inconclusive; 2 (needs G^R), 4 (two sizes), 5, 6 and 7 (pretext
    # tasks, semi-supervised fine-tunings) not run.
    claims_text = markdown.split("## The paper's claims")[1]
    verdicts = {  # the summary rows: "| 1 | claim | **verdict** | summary |"
        line.split(" | ")[0].strip("| "): line.split(" | ")[2]
        for line in claims_text.splitlines()
        if "**" in line
    }
    assert verdicts == {
        "1": "**inconclusive**",
        "2": "**not run**",
        "3": "**inconclusive**",
        "4": "**not run**",
        "5": "**not run**",
        "6": "**not run**",
        "7": "**not run**",
    }
    assert "`--config.sweep.seeds=0,1,2`" in claims_text
    assert (workdir / report.PLOT_FILE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_rerun_trains_nothing(quick_sweep, sweep_dirs):
    workdir, first, first_seconds = quick_sweep
    assert first.returncode == 0, first.stderr[-3000:]
    rows_before = _csv_rows(workdir)

    start = time.monotonic()
    process = _run(_command(workdir, sweep_dirs), sweep_dirs)
    seconds = time.monotonic() - start

    assert process.returncode == 0, process.stderr[-3000:]
    assert process.stderr.count("finished before, skipped.") == 5
    assert ": starting." not in process.stderr
    assert _csv_rows(workdir) == rows_before
    assert seconds < first_seconds / 2, (seconds, first_seconds)


def test_only_report_rewrites_the_outputs(quick_sweep, sweep_dirs):
    workdir, first, _ = quick_sweep
    assert first.returncode == 0, first.stderr[-3000:]
    rows_before = _csv_rows(workdir)
    for name in (report.MARKDOWN_FILE, report.PLOT_FILE):
        (workdir / name).unlink()

    exported = workdir.parent / "docs" / "RESULTS.md"
    command = _command(workdir, sweep_dirs, "--only_report", f"--export_markdown={exported}")
    process = _run(command, sweep_dirs)

    assert process.returncode == 0, process.stderr[-3000:]
    assert "starting" not in process.stderr
    assert _csv_rows(workdir) == rows_before
    markdown = (workdir / report.MARKDOWN_FILE).read_text()
    assert "this report: python -m jaxcl.experiments" in markdown
    assert (workdir / report.PLOT_FILE).exists()
    # The exported copies are the same report and table, pointing at their own plot beside
    # them, with the workdir named DIR in their commands.
    anywhere = markdown.replace(str(workdir), "DIR")
    assert anywhere != markdown
    assert exported.read_text() == anywhere.replace(f"]({report.PLOT_FILE})", "](RESULTS.png)")
    assert exported.with_name("RESULTS.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table_text = (workdir / report.CSV_FILE).read_text()
    assert exported.with_name(report.CSV_FILE).read_text() == table_text.replace(
        str(workdir), "DIR"
    )


def test_sigterm_exits_143_and_the_rerun_resumes_the_cell(sweep_dirs):
    workdir = sweep_dirs["root"] / "interrupted"
    cell_dir = workdir / "cells" / "random" / "tr1" / "c1" / "seed0"
    checkpoints = cell_dir / "finetune" / "checkpoints"
    # One cell, no pre-training; more steps than :quick so that SIGTERM lands mid-training.
    command = _command(
        workdir, sweep_dirs, "--config.sweep.inits=random", "--config.finetune.steps=12"
    )
    log_path = sweep_dirs["root"] / "interrupted.log"
    with open(log_path, "w", encoding="utf-8") as log:
        process = subprocess.Popen(
            command, cwd=REPO_ROOT, env=_env(sweep_dirs), stdout=log, stderr=subprocess.STDOUT
        )
    deadline = time.monotonic() + TIMEOUT_S
    while not (checkpoints.is_dir() and any(p.name.isdigit() for p in checkpoints.iterdir())):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            process.wait()
            pytest.fail(f"no checkpoint before the end:\n{log_path.read_text()[-3000:]}")
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=TIMEOUT_S) == 143
    output = log_path.read_text()
    assert "Traceback" not in output
    assert "jaxcl: finetune: SIGTERM at step" in output
    assert [s["finished"] for s in records.read_time(cell_dir)["sessions"]] == [False]

    process = _run(command, sweep_dirs)
    assert process.returncode == 0, process.stderr[-3000:]
    assert "finetune: resuming from step" in process.stderr
    assert [s["finished"] for s in records.read_time(cell_dir)["sessions"]] == [False, True]
    assert [r["init"] for r in _csv_rows(workdir)] == ["random"]


def test_invalid_selection_exits_1_naming_the_valid_values(sweep_dirs):
    workdir = sweep_dirs["root"] / "invalid"
    process = _run(_command(workdir, sweep_dirs, "--config.sweep.inits=random,GX"), sweep_dirs)
    assert process.returncode == 1
    assert "Traceback" not in process.stderr
    # random, every global method, GR/GD + LR/LD, then the semi-supervised fine-tunings.
    valid = ",".join(plan.INITIALISATIONS)
    assert valid.startswith("random,GR,GD-,GD,BYOL,BYOL-D,") and ",GD+LR+mixup," in f"{valid},"
    assert f"jaxcl: config.sweep.inits has unknown names ['GX']; valid: {valid}." in process.stderr
    assert not workdir.exists()
