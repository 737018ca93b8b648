"""Pre-training loss curves and fine-tuning validation read back from a sweep's metrics files."""

import json
import os

import pytest

from jaxcl.experiments import diagnostics, plan
from jaxcl.train.trainer import DONE_FILE


def _write_metrics(directory, records, *, done=False):
    os.makedirs(os.path.join(directory, "metrics"))
    with open(os.path.join(directory, diagnostics.METRICS), "w") as file:
        file.writelines(json.dumps(record) + "\n" for record in records)
    if done:
        with open(os.path.join(directory, DONE_FILE), "w") as file:
            file.write("{}")


def _finetune(workdir, init, labelled_set, combination, val_dice, losses, finished=True):
    cell_dir = plan.cell_dir(workdir, plan.Cell(init, labelled_set, combination, 0))
    records = [{"step": 10 * (i + 1), "loss": loss} for i, loss in enumerate(losses)]
    records += [{"step": 10 * (i + 1), "val_dice": dice} for i, dice in enumerate(val_dice)]
    _write_metrics(os.path.join(cell_dir, "finetune"), sorted(records, key=lambda r: r["step"]))
    if finished:
        os.makedirs(os.path.join(cell_dir, "evaluate"))
        with open(os.path.join(cell_dir, "evaluate", DONE_FILE), "w") as file:
            file.write("{}")


def test_loss_curve_first_halfway_last_and_late_change():
    # Logged every 10 steps up to 100: loss 10 - step / 10, so 9.0 at 10, 5.0 at 50, 0.0 at 100.
    metrics = [{"step": s, "loss": 10 - s / 10, "images_per_s": 5.0} for s in range(10, 101, 10)]
    curve = diagnostics.loss_curve("GD", "pretrain_global", metrics)
    assert (curve.steps, curve.first, curve.halfway, curve.last) == (100, 9.0, 5.0, 0.0)
    assert curve.late_change == pytest.approx(-1.0)  # from 2.0 at step 80 down to 0.0
    assert diagnostics.loss_curve("GD", "pretrain_global", [{"step": 5, "val_dice": 1}]) is None


def test_validation_means_over_cells():
    cells = [
        [{"step": 10, "val_dice": 0.5}, {"step": 20, "val_dice": 0.7}, {"step": 20, "loss": 0.3}],
        [{"step": 10, "val_dice": 0.6}, {"step": 20, "val_dice": 0.4}, {"step": 20, "loss": 0.1}],
    ]
    v = diagnostics.validation("GD", "tr1", cells)
    assert (v.num_cells, v.steps, v.best_late) == (2, 20, 1)  # only the first peaks at the end
    assert (v.best_dice, v.best_step, v.last_dice, v.last_loss) == pytest.approx(
        (0.65, 15.0, 0.55, 0.2)
    )


def test_collect_reads_the_workdir_and_writes_two_tables(tmp_path):
    workdir = str(tmp_path)
    _write_metrics(
        os.path.join(workdir, "pretrain", "GD+LR", "pretrain_local"),
        [{"step": 10, "loss": 0.5}, {"step": 20, "loss": 0.25}],
        done=True,
    )
    _write_metrics(
        os.path.join(workdir, "pretrain", "GD", "pretrain_global"),
        [{"step": 10, "loss": 4.0}, {"step": 20, "loss": 3.0}],
        done=True,
    )
    _write_metrics(
        os.path.join(workdir, "pretrain", "GR", "pretrain_global"), [{"step": 1, "loss": 1}]
    )
    _write_metrics(
        os.path.join(workdir, "pretrain", "notarun", "x"), [{"step": 1, "loss": 1.0}], done=True
    )
    _finetune(workdir, "GD", "tr2", "c1", [0.2, 0.4], [0.5, 0.3])
    _finetune(workdir, "random", "tr1", "c1", [0.3, 0.2], [0.6, 0.4])
    _finetune(workdir, "random", "tr1", "c2", [0.1, 0.5], [0.7, 0.5])
    _finetune(workdir, "random", "tr1", "c3", [0.9], [0.1], finished=False)  # still running
    _finetune(workdir, "random", "trall", "c1", [0.7, 0.8], [0.2, 0.1])
    _finetune(workdir, "random", "tr16", "c1", [0.5, 0.6], [0.3, 0.2])

    curves, validations = diagnostics.collect(workdir)

    assert [(c.name, c.stage, c.first, c.last) for c in curves] == [
        ("GD", "pretrain_global", 4.0, 3.0),
        ("GD+LR", "pretrain_local", 0.5, 0.25),
    ]
    # By initialisation, then labelled set by size with trall last.
    assert [(v.init, v.labelled_set, v.num_cells) for v in validations] == [
        ("random", "tr1", 2),
        ("random", "tr16", 1),
        ("random", "trall", 1),
        ("GD", "tr2", 1),
    ]
    assert validations[0].best_dice == pytest.approx(0.4)  # (0.3 + 0.5) / 2
    markdown = diagnostics.diagnostics_markdown(curves, validations)
    assert "| G^D | global | 20 | 4.0000 | 4.0000 | 3.0000 | +0.0 % |" in markdown
    assert "| random | 1 | 2 | 0.400 | 15 of 20 | 1/2 | 0.350 | 0.4500 |" in markdown
    assert "| random | all | 1 | 0.800 | 20 of 20 | 1/1 | 0.800 | 0.1000 |" in markdown


def test_a_fine_tuning_in_rounds_is_read_from_its_last_round(tmp_path):
    workdir = str(tmp_path)
    _finetune(workdir, "self-training", "tr1", "c1", [0.2, 0.3], [0.9, 0.8])  # round 0
    finetune_dir = os.path.join(
        plan.cell_dir(workdir, plan.Cell("self-training", "tr1", "c1", 0)), "finetune"
    )
    for index, dice in ((2, 0.7), (10, 0.9), (1, 0.5)):  # round 10 sorts before 2 as text
        records = [{"step": 10, "loss": 0.1 * index}, {"step": 10, "val_dice": dice}]
        _write_metrics(os.path.join(finetune_dir, f"round{index}"), records)

    _, [validation] = diagnostics.collect(workdir)

    assert (validation.best_dice, validation.last_loss) == pytest.approx((0.9, 1.0))
