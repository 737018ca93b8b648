"""Reading the finished cells of a sweep workdir and naming config, commit and wall time."""

import json
import os

import numpy as np
import pytest

from configs import synthetic
from jaxcl import evaluate
from jaxcl.experiments import plan, records, report

CLASS_NAMES = ["background", "RV", "Myo", "LV"]


def _write_cell(
    workdir, cell, dice_by_subject, *, seconds=None, commit="c0ffee", done=True, machine="box"
):
    cell_dir = plan.cell_dir(workdir, cell)
    os.makedirs(os.path.join(cell_dir, "evaluate"))
    results = evaluate.summarize(
        {s: np.asarray(d) for s, d in dice_by_subject.items()}, CLASS_NAMES
    )
    with open(os.path.join(cell_dir, "evaluate", "results.json"), "w") as file:
        json.dump(results, file)
    if done:
        with open(os.path.join(cell_dir, "evaluate", "DONE.json"), "w") as file:
            json.dump({"mean_dice": results["mean"]}, file)
    if seconds is not None:
        records.add_session(cell_dir, seconds, commit=commit, finished=done, machine=machine)


def test_collect_reads_finished_cells_only(tmp_path):
    workdir = str(tmp_path)
    _write_cell(
        workdir,
        plan.Cell("GD+LR", "tr2", "c3", 4),
        {"044": [0.6, 0.7, 0.8], "045": [0.2, 0.3, 0.4]},
        seconds=61.0,
    )
    _write_cell(workdir, plan.Cell("GD", "tr1", "c1", 0), {"044": [0.1, 0.2, 0.3]}, done=False)
    os.makedirs(os.path.join(workdir, "cells", "notaninit", "tr1", "c1", "seed0", "evaluate"))

    [result] = report.collect(workdir)
    assert result.cell == plan.Cell("GD+LR", "tr2", "c3", 4)
    # Per class: mean over the two subjects; overall: mean of subject means (0.7, 0.3), std 0.2.
    assert result.class_dice == pytest.approx({"RV": 0.4, "Myo": 0.5, "LV": 0.6})
    assert (result.mean_dice, result.std_dice) == pytest.approx((0.5, 0.2))
    assert result.seconds == 61.0


def test_format_seconds():
    assert report.format_seconds(0.4) == "0:00:00"
    assert report.format_seconds(3725.2) == "1:02:05"
    assert report.format_seconds(36000) == "10:00:00"


def test_provenance_names_command_commits_and_wall_time(tmp_path):
    workdir = str(tmp_path)
    records.check_stored_config(synthetic.get_config(), workdir, "python -m jaxcl.experiments --x")
    pretrain_dir = os.path.join(workdir, "pretrain", "GD")
    records.add_session(pretrain_dir, 100.0, commit="aaa", finished=True, machine="box")
    _write_cell(workdir, plan.Cell("GD", "tr1", "c1", 0), {"044": [1, 1, 1]}, seconds=20.0)
    _write_cell(
        workdir,
        plan.Cell("GD", "tr1", "c2", 0),
        {"044": [1, 1, 1]},
        seconds=3.0,
        commit="aaa",
        machine="other box",
    )

    lines = report.provenance(workdir, dataset="synthetic", command="report cmd", commit="aaa")
    assert lines == [
        "dataset: synthetic; sweep started with: python -m jaxcl.experiments --x",
        "this report: report cmd",
        "git commit: aaa (report); runs trained at aaa, c0ffee",
        "machines: box; other box",
        "wall time: 0:02:03 (pre-training 0:01:40 in 1 runs, fine-tuning + evaluation 0:00:23 "
        "in 2 cells; summed over the sweep's recorded sessions)",
    ]


def test_write_report_without_finished_cells(tmp_path):
    workdir = str(tmp_path)
    records.check_stored_config(synthetic.get_config(), workdir, "cmd")
    assert report.write_report(workdir, dataset="synthetic", command="cmd", commit="abc") == []
    markdown = (tmp_path / report.MARKDOWN_FILE).read_text()
    assert "No cell has finished yet." in markdown
    assert "- git commit: abc" in markdown
    # The stored config is embedded, e.g. the fine-tuning steps of configs/synthetic.py.
    config_json = markdown.split("```json\n")[1].split("\n```")[0]
    assert json.loads(config_json)["finetune"]["steps"] == synthetic.get_config().finetune.steps
    assert not (tmp_path / report.PLOT_FILE).exists()
    assert (tmp_path / report.CSV_FILE).read_text().splitlines()[-1] == (
        "init,n_labelled,subset,seed,dice_mean,dice_std,seconds"
    )


def test_write_report_with_table2_rows_and_the_benchmark(tmp_path):
    workdir = str(tmp_path)
    records.check_stored_config(synthetic.get_config(), workdir, "cmd")
    cells = {
        plan.Cell("random", "tr1", "c1", 0): [0.5, 0.5, 0.5],
        plan.Cell("GD+LR", "tr1", "c1", 0): [0.7, 0.7, 0.7],
        plan.Cell("mixup", "tr1", "c1", 0): [0.6, 0.6, 0.6],
        plan.Cell("GD+LR+mixup", "tr1", "c1", 0): [0.8, 0.8, 0.8],
        plan.Cell("random", "trall", "c1", 0): [0.9, 0.9, 0.9],
    }
    for cell, dice in cells.items():
        _write_cell(workdir, cell, {"044": dice})

    results = report.write_report(workdir, dataset="synthetic", command="cmd", commit="abc")

    assert len(results) == 5
    markdown = (tmp_path / report.MARKDOWN_FILE).read_text()
    assert "| Proposed init. + mixup | **0.800 ± 0.000** |" in markdown
    assert "| Benchmark (random init., all labelled) | 0.900 ± 0.000 |" in markdown
    # One pair per comparison: no interval, and the report says how to get more pairs.
    assert "| 6 | G^D + L^R + mixup vs mixup | 1 | +0.200 | – | 1 | 1/1 | inconclusive |" in (
        markdown
    )
    assert "`--config.sweep.seeds=0,1,2`" in markdown
    assert (tmp_path / report.PLOT_FILE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = (tmp_path / report.CSV_FILE).read_text().splitlines()
    assert [row.split(",")[:2] for row in rows if not row.startswith("#")][1:] == [
        ["random", "1"],
        ["random", "all"],
        ["GD+LR", "1"],
        ["mixup", "1"],
        ["GD+LR+mixup", "1"],
    ]
