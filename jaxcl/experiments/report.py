"""Writes the sweep's outputs from what its runs left in the workdir.

  WORKDIR/results.csv   one row per finished cell (`table.csv_text`), `# ` lines on top
  WORKDIR/results.md    the paper's tables 1 and 2 and the other rows (`table.tables_markdown`),
                        the plot, the paper's claims checked on the results with 95 %
                        intervals (`claims`), the pre-training losses and fine-tuning
                        validation (`diagnostics`), then the config as JSON
  WORKDIR/results.png   mean Dice against |X_tr| per initialisation, the benchmark (trall) as
                        a horizontal line (`plot.dice_figure`)

Every finished cell in the workdir is reported (a cell is finished when its evaluate stage wrote
DONE.json), also cells an earlier invocation with another `config.sweep` selection ran. Each output
names the command that started the sweep, the git commit(s) and the wall time summed over the
sweep's recorded sessions. The workdir may be a local folder or a `gs://` URI (`jaxcl.files`).
"""

from __future__ import annotations

import json
import logging
import os

from jaxcl import figures, files
from jaxcl.experiments import claims, diagnostics, plan, plot, records, table
from jaxcl.train.trainer import DONE_FILE

CSV_FILE = "results.csv"
MARKDOWN_FILE = "results.md"
PLOT_FILE = "results.png"


def _cell_of(cell_path) -> plan.Cell | None:
    """The cell of a .../cells/<init>/<set>/<subset>/seed<S> folder, None if not a cell's."""
    init, labelled_set, combination, seed = cell_path.parts[-4:]
    if (
        init not in plan.INITIALISATIONS
        or not plan.is_labelled_set(labelled_set)
        or not seed.removeprefix("seed").isdigit()
    ):
        logging.warning("report: %s is not a sweep cell's folder, ignored.", cell_path)
        return None
    return plan.Cell(init, labelled_set, combination, int(seed.removeprefix("seed")))


def collect(workdir: files.PathLike) -> list[table.CellResult]:
    """The results of every finished cell under WORKDIR/cells/."""
    results = []
    for cell_path in sorted(files.path(workdir).glob("cells/*/*/*/seed*")):
        evaluate_dir = cell_path / "evaluate"
        cell = _cell_of(cell_path)
        if cell is None or not (evaluate_dir / DONE_FILE).exists():
            continue
        scores = records.read_json(evaluate_dir / "results.json")
        time_record = records.read_time(cell_path)
        results.append(
            table.CellResult(
                cell=cell,
                class_dice={name: scores["per_class"][name]["mean"] for name in scores["classes"]},
                mean_dice=scores["mean"],
                std_dice=scores["std"],
                seconds=time_record["seconds"] if time_record else None,
            )
        )
    return results


def format_seconds(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


def _time_records(workdir: files.PathLike, pattern: str) -> list[dict]:
    paths = files.path(workdir).glob(f"{pattern}/{records.TIME_FILE}")
    return [records.read_json(path) for path in sorted(paths)]


def provenance(workdir: files.PathLike, *, dataset: str, command: str, commit: str) -> list[str]:
    """The lines naming config, git commit and wall time, for every output."""
    pretraining_times = _time_records(workdir, "pretrain/*")
    cell_times = _time_records(workdir, "cells/*/*/*/seed*")
    pretraining_seconds = sum(record["seconds"] for record in pretraining_times)
    cell_seconds = sum(record["seconds"] for record in cell_times)
    sessions = [s for record in pretraining_times + cell_times for s in record["sessions"]]
    run_commits = sorted({s["commit"] for s in sessions})
    machines = sorted({s["machine"] for s in sessions if "machine" in s})
    started_with = records.stored_command(workdir) or command
    lines = [f"dataset: {dataset}; sweep started with: {started_with}"]
    if started_with != command:
        lines.append(f"this report: {command}")
    if run_commits in ([], [commit]):
        lines.append(f"git commit: {commit}")
    else:
        lines.append(f"git commit: {commit} (report); runs trained at {', '.join(run_commits)}")
    if machines:
        unrecorded = sum("machine" not in s for s in sessions)
        note = f" (not recorded for {unrecorded} of {len(sessions)} sessions)" if unrecorded else ""
        lines.append(f"machine{'s' * (len(machines) > 1)}: {'; '.join(machines)}{note}")
    lines.append(
        f"wall time: {format_seconds(pretraining_seconds + cell_seconds)} "
        f"(pre-training {format_seconds(pretraining_seconds)} in {len(pretraining_times)} runs, "
        f"fine-tuning + evaluation {format_seconds(cell_seconds)} in {len(cell_times)} cells; "
        "summed over the sweep's recorded sessions)"
    )
    return lines


def _markdown(
    results: list[table.CellResult],
    dataset: str,
    lines: list[str],
    workdir: files.PathLike,
    plot_name: str,
) -> str:
    parts = [f"# Sweep results: {dataset}", "", *[f"- {line}" for line in lines], ""]
    parts += [table.tables_markdown(results, dataset)]
    parts += [
        f"Per cell (per-class Dice, seeds, times): {CSV_FILE}. Init names in results.csv and "
        "config.sweep.inits: random, GR, GD-, GD, BYOL, BYOL-D, GR+LR, ..., mixup, GD+LR+mixup, "
        "...",
        "",
    ]
    if results:
        parts += [
            f"![Mean test Dice against |X_tr| per initialisation]({plot_name})",
            "",
            "## The paper's claims",
            "",
            claims.claims_markdown(claims.check_claims(results)),
            "## Were the budgets long enough?",
            "",
            diagnostics.diagnostics_markdown(*diagnostics.collect(workdir)),
        ]
    config_path = files.path(workdir) / records.CONFIG_FILE
    if config_path.exists():
        config_json = json.dumps(records.read_json(config_path)["config"], indent=2)
        parts += [
            f"<details><summary>Config ({records.CONFIG_FILE})</summary>",
            "",
            "```json",
            config_json,
            "```",
            "",
            "</details>",
            "",
        ]
    return "\n".join(parts)


def write_report(
    workdir: files.PathLike,
    *,
    dataset: str,
    command: str,
    commit: str,
    plot_png: bool = True,
    export_markdown: files.PathLike | None = None,
) -> list[table.CellResult]:
    """Writes results.csv, results.md and (if `plot_png` and a cell finished) results.png.

    Args:
      export_markdown: also write the Markdown report to this path (e.g. docs/RESULTS.md), with
        the plot beside it under the same stem (docs/RESULTS.png) and results.csv in the same
        folder; these copies name the workdir "DIR", so that their commands run anywhere.

    Returns:
      The finished cells' results.
    """
    results = collect(workdir)
    lines = provenance(workdir, dataset=dataset, command=command, commit=commit)
    root = files.path(workdir)
    outputs = [(root / CSV_FILE, root / MARKDOWN_FILE, root / PLOT_FILE, lines)]
    if export_markdown is not None:
        exported = files.path(export_markdown)
        anywhere = [line.replace(os.fspath(workdir), "DIR") for line in lines]
        outputs.append(
            (exported.parent / CSV_FILE, exported, exported.with_suffix(".png"), anywhere)
        )
    for csv_path, markdown_path, plot_path, lines in outputs:
        files.write_atomically(csv_path, table.csv_text(results, lines))
        markdown = _markdown(results, dataset, lines, workdir, plot_name=plot_path.name)
        files.write_atomically(markdown_path, markdown)
        if plot_png and results:
            figure = plot.dice_figure(
                table.summarize(results),
                title=f"{dataset}: test Dice by initialisation",
                footer=lines,
            )
            figures.save_figure(figure, plot_path)
    logging.info("report: %d finished cells in %s.", len(results), workdir)
    return results
