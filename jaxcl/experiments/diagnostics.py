"""Were the sweep's budgets long enough? Loss curves of the pre-trainings, validation of the cells.

A comparison of initialisations means little if a pre-training stopped while its loss was still
falling fast, or if fine-tuning was cut off while validation Dice still rose (a budget that
favours whichever initialisation converges faster). This module reads the metrics every stage
logged (`<stage>/metrics/metrics.jsonl`, `jaxcl.train.loop`) and summarises:

- per finished pre-training: its training loss at the first log, half-way and at the end, and
  the change over the last 20 % of steps (near 0: converged; clearly negative: still learning);
- per initialisation and |X_tr| (finished cells only, as in the table): the best validation
  Dice (the checkpoint evaluated on the test set), the step it came at, how often it came in the
  last 10 % of steps, the last validation Dice (below the best: over-fitting or noise) and the
  final training loss.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence

import numpy as np

from jaxcl import files, methods
from jaxcl.experiments import plan
from jaxcl.train.trainer import DONE_FILE

METRICS = "metrics/metrics.jsonl"


def read_metrics(path: files.PathLike) -> list[dict]:
    """The JSON records of one metrics.jsonl file, in order."""
    text = files.path(path).read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _series(metrics: Sequence[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of every record holding `key`."""
    records = [m for m in metrics if key in m]
    return np.array([m["step"] for m in records]), np.array([m[key] for m in records], float)


def _at(steps: np.ndarray, values: np.ndarray, step: float) -> float:
    """The first logged value at or after `step` (the last one if none is)."""
    index = min(int(np.searchsorted(steps, step)), len(steps) - 1)
    return float(values[index])


@dataclasses.dataclass(frozen=True)
class LossCurve:
    """A pre-training's logged training loss."""

    name: str  # its folder under pretrain/: "GD", "GD+LR", ...
    stage: str  # "pretrain_global" or "pretrain_local"
    steps: int
    first: float
    halfway: float
    last: float
    late_change: float  # relative change from 80 % of the steps to the end


def loss_curve(name: str, stage: str, metrics: Sequence[dict]) -> LossCurve | None:
    """The curve of one stage's metrics, None if it logged no loss."""
    steps, losses = _series(metrics, "loss")
    if not len(steps):
        return None
    total = int(steps[-1])
    late = _at(steps, losses, 0.8 * total)
    return LossCurve(
        name=name,
        stage=stage,
        steps=total,
        first=float(losses[0]),
        halfway=_at(steps, losses, 0.5 * total),
        last=float(losses[-1]),
        late_change=(float(losses[-1]) - late) / abs(late) if late else 0.0,
    )


@dataclasses.dataclass(frozen=True)
class Validation:
    """Fine-tuning validation of the cells of one initialisation at one |X_tr| (cell means)."""

    init: str
    labelled_set: str
    num_cells: int
    steps: int
    best_dice: float
    best_step: float
    best_late: int  # cells whose best validation came in the last 10 % of steps
    last_dice: float
    last_loss: float


def validation(init: str, labelled_set: str, cells: Sequence[Sequence[dict]]) -> Validation:
    """Summarises the fine-tuning metrics of several cells of one (init, labelled_set)."""
    best_dice, best_step, last_dice, last_loss, steps = [], [], [], [], []
    for metrics in cells:
        val_steps, dice = _series(metrics, "val_dice")
        loss_steps, loss = _series(metrics, "loss")
        best = int(np.argmax(dice))
        best_dice.append(dice[best])
        best_step.append(val_steps[best])
        last_dice.append(dice[-1])
        last_loss.append(loss[-1])
        steps.append(int(max(val_steps[-1], loss_steps[-1])))
    total = max(steps)
    return Validation(
        init=init,
        labelled_set=labelled_set,
        num_cells=len(cells),
        steps=total,
        best_dice=float(np.mean(best_dice)),
        best_step=float(np.mean(best_step)),
        best_late=sum(step > 0.9 * total for step in best_step),
        last_dice=float(np.mean(last_dice)),
        last_loss=float(np.mean(last_loss)),
    )


def _exported_round_metrics(finetune_dir):
    """The metrics file of the round whose best state a fine-tuning exported (and the cell
    evaluated): the last `round<r>/` of a method trained in rounds (self-training, task-driven
    augmentation; docs/METHOD.md), else the fine-tuning's only one."""
    rounds = list(finetune_dir.glob(f"round*/{METRICS}"))
    if not rounds:
        return finetune_dir / METRICS
    return max(rounds, key=lambda path: int(path.parts[-3].removeprefix("round")))


def collect(workdir: files.PathLike) -> tuple[list[LossCurve], list[Validation]]:
    """The pre-training curves and per-(init, |X_tr|) validations of a sweep workdir."""
    root = files.path(workdir)
    curves = []
    for path in sorted(root.glob(f"pretrain/*/*/{METRICS}")):
        stage_dir = path.parent.parent
        if (
            stage_dir.parent.name not in plan.INITIALISATIONS
            or not (stage_dir / DONE_FILE).exists()
        ):
            continue
        curve = loss_curve(stage_dir.parent.name, stage_dir.name, read_metrics(path))
        if curve is not None:
            curves.append(curve)
    curves.sort(
        key=lambda c: (c.stage != "pretrain_global", list(plan.INITIALISATIONS).index(c.name))
    )
    groups: dict[tuple[str, str], list[list[dict]]] = {}
    for path in sorted(root.glob(f"cells/*/*/*/seed*/finetune/{METRICS}")):
        init, labelled_set = path.parts[-7], path.parts[-6]
        finished = (path.parents[2] / "evaluate" / DONE_FILE).exists()  # as report.collect
        if finished and init in plan.INITIALISATIONS and plan.is_labelled_set(labelled_set):
            metrics = read_metrics(_exported_round_metrics(path.parents[1]))
            if any("val_dice" in m for m in metrics) and any("loss" in m for m in metrics):
                groups.setdefault((init, labelled_set), []).append(metrics)
    sets = plan.sorted_labelled_sets(labelled_set for _, labelled_set in groups)
    order = sorted(groups, key=lambda k: (list(plan.INITIALISATIONS).index(k[0]), sets.index(k[1])))
    return curves, [validation(*key, groups[key]) for key in order]


def diagnostics_markdown(curves: Sequence[LossCurve], validations: Sequence[Validation]) -> str:
    """Two Markdown tables: pre-training losses, then fine-tuning validation."""
    lines = [
        "Pre-training loss (training loss as logged, averaged over each logging interval):",
        "",
        "| pre-training | stage | steps | first log | half-way | last | last 20 % of steps |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in curves:
        lines.append(
            f"| {methods.label(c.name)} | {c.stage.removeprefix('pretrain_')} | {c.steps} | "
            f"{c.first:.4f} | {c.halfway:.4f} | {c.last:.4f} | {100 * c.late_change:+.1f} % |"
        )
    lines += [
        "",
        "Fine-tuning validation (means over the cells; the best validation checkpoint is the "
        "one evaluated on the test set; a fine-tuning trained in rounds, such as self-training "
        "or task-driven augmentation, by its last round, whose checkpoint that is):",
        "",
        "| initialisation | \\|X_tr\\| | cells | best val Dice | at step | best in last 10 % "
        "| last val Dice | last training loss |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for v in validations:
        lines.append(
            f"| {methods.label(v.init)} | {plan.labelled_set_size(v.labelled_set)} | "
            f"{v.num_cells} | {v.best_dice:.3f} | {v.best_step:.0f} of {v.steps} | "
            f"{v.best_late}/{v.num_cells} | {v.last_dice:.3f} | {v.last_loss:.4f} |"
        )
    return "\n".join(lines) + "\n"
