"""The sweep loop with a stand-in trainer: order, shared pre-trainings, resume, records, reports.

The stand-in writes what `trainer.train_and_evaluate` writes (DONE.json per stage, exports,
evaluate/results.json via `evaluate.summarize`) and gives every cell a test Dice that encodes its
initialisation, subset and seed, so the tables can be checked against hand-computed values.
tests/experiments/test_experiments_main.py runs the real trainer.
"""

import csv
import io
import json
import logging
import os

import numpy as np
import pytest

from configs import synthetic
from jaxcl import evaluate
from jaxcl.experiments import plan, records, report, sweep
from jaxcl.train import loop

CLASS_NAMES = ["background", "RV", "Myo", "LV"]


def _expected_dice(init: str, combination: str, seed: int) -> float:
    """The stand-in's cell Dice: +0.1 for a pre-trained encoder, +0.05 for a decoder."""
    encoder = init != "random"
    decoder = "+" in init
    return 0.5 + 0.1 * encoder + 0.05 * decoder + 0.01 * int(combination[1:]) + 0.001 * seed


class FakeTrainer:
    """Stands in for `trainer.train_and_evaluate`; `preempt_workdir` raises PreemptedError."""

    def __init__(self, preempt_workdir=None):
        self.calls = []
        self.preempt_workdir = preempt_workdir

    def __call__(self, config, workdir):
        self.calls.append(workdir)
        if workdir == self.preempt_workdir:
            os.makedirs(os.path.join(workdir, "finetune", "checkpoints"), exist_ok=True)
            raise loop.PreemptedError("finetune: SIGTERM at step 3; rerun the same command.")
        summaries = {}
        for stage in config.stages:
            done_file = os.path.join(workdir, stage, "DONE.json")
            if os.path.exists(done_file):
                continue
            summaries[stage] = self._run_stage(config, workdir, stage)
            with open(done_file, "w", encoding="utf-8") as file:
                json.dump(summaries[stage], file)
        return summaries

    def _run_stage(self, config, workdir, stage):
        sources = {
            "pretrain_local": [config.pretrain_local.encoder_from],
            "finetune": [config.finetune.encoder_from, config.finetune.decoder_from],
        }.get(stage, [])
        for source in sources:
            if source and not os.path.isdir(source):
                raise FileNotFoundError(f"no export in {source}")
        os.makedirs(os.path.join(workdir, stage, "export"), exist_ok=True)
        if stage != "evaluate":
            return {"stage": stage}
        init = os.path.normpath(workdir).split(os.sep)[-4]
        mean = _expected_dice(init, config.data.combination, config.seed)
        # Two test subjects whose per-class Dice average to `mean`.
        dice = {"044": np.array([mean - 0.1, mean, mean + 0.1]), "045": np.full(3, mean)}
        results = evaluate.summarize(dice, CLASS_NAMES)
        with open(os.path.join(workdir, stage, "results.json"), "w", encoding="utf-8") as file:
            json.dump(results, file)
        return {"mean_dice": results["mean"], "std_dice": results["std"]}


@pytest.fixture
def fake_trainer(monkeypatch):
    fake = FakeTrainer()
    monkeypatch.setattr(sweep.trainer, "train_and_evaluate", fake)
    return fake


def _config(inits="random,GD,GD+LR", combinations="c1,c2", seeds="0"):
    config = synthetic.get_config("quick")
    config.sweep.inits = inits
    config.sweep.labelled_sets = "tr1"
    config.sweep.combinations.tr1 = combinations
    config.sweep.seeds = seeds
    return config


def _csv_rows(workdir):
    with open(os.path.join(workdir, report.CSV_FILE), encoding="utf-8") as file:
        lines = [line for line in file if not line.startswith("#")]
    return list(csv.DictReader(io.StringIO("".join(lines))))


def test_pretrainings_once_then_cells_and_reports(fake_trainer, tmp_path, caplog):
    workdir = str(tmp_path)
    with caplog.at_level(logging.INFO):
        results = sweep.run_sweep(_config(seeds="0,2"), workdir, command="python -m x")

    cells = [
        f"cells/{init}/tr1/{c}/seed{s}"
        for c in ("c1", "c2")
        for s in (0, 2)
        for init in ("random", "GD", "GD+LR")
    ]
    assert [os.path.relpath(c, workdir) for c in fake_trainer.calls] == [
        "pretrain/GD",
        "pretrain/GD+LR",
        *cells,
    ]
    rows = _csv_rows(workdir)
    assert len(rows) == len(results) == 12
    for row in rows:
        expected = _expected_dice(row["init"], row["subset"], int(row["seed"]))
        assert float(row["dice_mean"]) == pytest.approx(expected, abs=1e-6)
        assert float(row["dice_RV"]) == pytest.approx(expected - 0.05, abs=1e-6)
        assert float(row["seconds"]) >= 0.0
    markdown = (tmp_path / report.MARKDOWN_FILE).read_text()
    # Subsets c1 and c2, seeds 0 and 2 averaged: random 0.511 and 0.521, GD+LR 0.661 and 0.671.
    assert "| random | 0.516 ± 0.005 |" in markdown
    assert "| G^D + L^R | **0.666 ± 0.005** |" in markdown
    assert "sweep started with: python -m x" in markdown
    assert (tmp_path / report.PLOT_FILE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    log = caplog.text
    assert "run 1/14, pre-training 1/2: pre-training GD starting" in log
    assert "ETA ? (no finished run of each remaining kind yet)" in log
    assert "run 14/14, cell 12/12: cell GD+LR tr1-c2 seed 2 starting" in log
    assert "run 14/14, cell 12/12: cell GD+LR tr1-c2 seed 2 finished in" in log
    assert "mean test Dice 0.6720" in log


def test_jax_caches_are_dropped_after_every_run(fake_trainer, monkeypatch, tmp_path):
    calls_at_clear = []
    monkeypatch.setattr(
        sweep.jax, "clear_caches", lambda: calls_at_clear.append(len(fake_trainer.calls))
    )
    sweep.run_sweep(_config(combinations="c1"), str(tmp_path), command="c")
    assert calls_at_clear == [1, 2, 3, 4, 5]  # 2 pre-trainings and 3 cells, each then cleared


def test_rerun_trains_nothing_and_writes_the_same_results(fake_trainer, tmp_path):
    config, workdir = _config(), str(tmp_path)
    sweep.run_sweep(config, workdir, command="first")
    csv_before = (tmp_path / report.CSV_FILE).read_text()
    time_record = records.read_time(os.path.join(workdir, "cells", "GD", "tr1", "c1", "seed0"))
    fake_trainer.calls.clear()

    sweep.run_sweep(config, workdir, command="first")

    assert fake_trainer.calls == []
    assert (tmp_path / report.CSV_FILE).read_text() == csv_before
    cell_dir = os.path.join(workdir, "cells", "GD", "tr1", "c1", "seed0")
    assert records.read_time(cell_dir) == time_record
    assert len(time_record["sessions"]) == 1 and time_record["sessions"][0]["finished"]


def test_interrupted_cell_is_recorded_and_resumed(monkeypatch, tmp_path):
    config, workdir = _config(), str(tmp_path)
    interrupted = os.path.join(workdir, "cells", "random", "tr1", "c2", "seed0")
    monkeypatch.setattr(sweep.trainer, "train_and_evaluate", FakeTrainer(interrupted))
    with pytest.raises(loop.PreemptedError):
        sweep.run_sweep(config, workdir, command="c")
    first_sessions = records.read_time(interrupted)["sessions"]
    assert [s["finished"] for s in first_sessions] == [False]
    # The cells finished before the interruption are already reported.
    assert [(r["init"], r["subset"]) for r in _csv_rows(workdir)] == [
        ("random", "c1"),
        ("GD", "c1"),
        ("GD+LR", "c1"),
    ]

    resumed = FakeTrainer()
    monkeypatch.setattr(sweep.trainer, "train_and_evaluate", resumed)
    sweep.run_sweep(config, workdir, command="c")
    assert [os.path.relpath(c, workdir) for c in resumed.calls] == [
        "cells/random/tr1/c2/seed0",
        "cells/GD/tr1/c2/seed0",
        "cells/GD+LR/tr1/c2/seed0",
    ]
    record = records.read_time(interrupted)
    assert [s["finished"] for s in record["sessions"]] == [False, True]
    assert record["seconds"] == pytest.approx(sum(s["seconds"] for s in record["sessions"]))
    assert len(_csv_rows(workdir)) == 6


def test_selection_may_grow_but_the_training_config_may_not_change(fake_trainer, tmp_path):
    workdir = str(tmp_path)
    sweep.run_sweep(_config(inits="random", combinations="c1"), workdir, command="first")
    grown = _config(inits="random,GD", combinations="c1")
    grown.data.data_dir = str(tmp_path / "moved_data")
    sweep.run_sweep(grown, workdir, command="second")
    assert [os.path.relpath(c, workdir) for c in fake_trainer.calls] == [
        "cells/random/tr1/c1/seed0",
        "pretrain/GD",
        "cells/GD/tr1/c1/seed0",
    ]
    assert [r["init"] for r in _csv_rows(workdir)] == ["random", "GD"]

    changed = _config(inits="random", combinations="c1")
    changed.finetune.steps = 7
    changed.seed = 3
    with pytest.raises(plan.SweepConfigError) as error:
        sweep.run_sweep(changed, workdir, command="third")
    message = str(error.value)
    assert f"{workdir} holds a sweep started with a different config" in message
    assert "finetune.steps: 6 -> 7; seed: 0 -> 3." in message
    assert "(first)" not in message and ": first)" in message


def test_invalid_selection_fails_before_anything_runs(fake_trainer, tmp_path):
    with pytest.raises(plan.SweepConfigError, match="unknown names"):
        sweep.run_sweep(_config(inits="random,GX"), str(tmp_path / "w"), command="c")
    assert fake_trainer.calls == []
    assert not (tmp_path / "w").exists()
