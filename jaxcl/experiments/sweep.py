"""Runs the sweep `config.sweep` selects: every pre-training once, then every cell, then reports.

Each run (see `plan`) is one `trainer.train_and_evaluate` call in its own workdir, so a rerun of
the same command skips the runs whose final stage finished and resumes an interrupted one from its
checkpoint. The tables (`report`) are rewritten after every finished cell, tables and plot at
the end.
Progress lines give the run's place in the sweep, the time elapsed and an ETA from the recorded
times of finished runs of the same kind.

With several processes (`jaxcl.train.distributed`) every process runs the sweep in step and takes
process 0's decision on which runs finished; process 0 alone writes records and reports.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import jax
import ml_collections

from jaxcl import files
from jaxcl.data.context import SPLITS_FILE, DataContext
from jaxcl.experiments import plan, records, report, table
from jaxcl.train import distributed, trainer


def _finished(run: plan.Run) -> bool:
    return (files.path(run.workdir) / run.final_stage / trainer.DONE_FILE).exists()


class _Progress:
    """Elapsed time and ETA; a run's expected time is the mean recorded time of its kind.

    A run's kind is its final stage (pretrain_global, pretrain_local or evaluate for cells).
    """

    def __init__(self, runs: Sequence[plan.Run]):
        self._start = time.monotonic()
        self._seconds: dict[str, list[float]] = {}
        for run in runs:
            record = records.read_time(run.workdir)
            if _finished(run) and record:
                self.add(run, record["seconds"])

    def add(self, run: plan.Run, seconds: float) -> None:
        self._seconds.setdefault(run.final_stage, []).append(seconds)

    def status(self, remaining: Sequence[plan.Run]) -> str:
        elapsed = report.format_seconds(time.monotonic() - self._start)
        if any(run.final_stage not in self._seconds for run in remaining):
            return f"elapsed {elapsed}, ETA ? (no finished run of each remaining kind yet)"
        eta = sum(
            sum(self._seconds[run.final_stage]) / len(self._seconds[run.final_stage])
            for run in remaining
        )
        return f"elapsed {elapsed}, ETA {report.format_seconds(eta)}"


def _positions(runs: Sequence[plan.Run]) -> list[str]:
    """Every run's place in the sweep: "run 7/13, cell 2/10", "run 2/13, pre-training 2/3"."""
    kinds = ["cell" if run.cell else "pre-training" for run in runs]
    positions = []
    for index, kind in enumerate(kinds):
        number, total = kinds[: index + 1].count(kind), kinds.count(kind)
        positions.append(f"run {index + 1}/{len(runs)}, {kind} {number}/{total}")
    return positions


def _check_stored_config(config, workdir: files.PathLike, command: str) -> None:
    """`records.check_stored_config` on process 0; every process raises if it refused."""
    refusal = ""
    if distributed.is_main_process():
        try:
            records.check_stored_config(config, workdir, command)
        except plan.SweepConfigError as error:
            refusal = str(error)
    if not distributed.agree(not refusal):
        raise plan.SweepConfigError(refusal or f"process 0 refused {workdir}; see its log.")


def run_sweep(
    config: ml_collections.ConfigDict, workdir: files.PathLike, *, command: str
) -> list[table.CellResult]:
    """Runs every unfinished run of the sweep in order, then writes the reports.

    Args:
      config: a dataset config with its `sweep` section (configs/base.py).
      workdir: the sweep's folder (or gs:// URI); runs go to its pretrain/ and cells/.
      command: the command line, named in the outputs.

    Returns:
      The results of every finished cell in `workdir` (process 0; [] on other processes).

    The data settings the config leaves to the data are resolved once (`DataContext`); a folder
    dataset's splits are written to WORKDIR/splits.json and every run reads them from there.

    Raises:
      plan.SweepConfigError for an invalid `config.sweep` or a workdir started with another
      config, before anything runs; DataError for bad data; whatever
      `trainer.train_and_evaluate` raises (e.g. loop.PreemptedError on SIGTERM), after
      recording the run's time.
    """
    data = DataContext(config)
    config = data.config
    if data.dataset == "folder":  # every run reads the sweep's splits instead of drawing them
        config.data.splits.file = str(files.path(workdir) / SPLITS_FILE)
    runs = plan.plan(config, workdir, data.splits)
    writes_files = distributed.is_main_process()
    commit, machine = records.git_commit(), records.machine()
    _check_stored_config(config, workdir, command)
    data.write_splits(workdir)
    finished_before = [distributed.agree(_finished(run)) for run in runs]
    logging.info(
        "sweep: %d pre-trainings and %d cells in %s; %d already finished.",
        sum(run.cell is None for run in runs),
        sum(run.cell is not None for run in runs),
        workdir,
        sum(finished_before),
    )
    progress = _Progress(runs)
    positions = _positions(runs)
    for index, run in enumerate(runs):
        if finished_before[index]:
            logging.info(
                "sweep: %s: %s finished before, skipped.", positions[index], run.description
            )
            continue
        remaining = [
            r for r, done in zip(runs[index:], finished_before[index:], strict=True) if not done
        ]
        logging.info(
            "sweep: %s: %s starting in %s (%s).",
            positions[index],
            run.description,
            run.workdir,
            progress.status(remaining),
        )
        start, finished = time.monotonic(), False
        try:
            summaries = trainer.train_and_evaluate(run.config, run.workdir)
            finished = True
        finally:
            # Every run jits its own step functions, and XLA:CPU keeps the machine code of each
            # executable jax caches mapped: about 1,100 memory maps per cell, so a long sweep hit
            # Linux's 65,530-map limit after ~60 runs (LLVM: "Cannot allocate memory"). Dropping
            # jax's in-memory caches frees them; the next run reloads from the persistent cache.
            jax.clear_caches()
            seconds = time.monotonic() - start
            if writes_files:
                # All sessions of the run: the ETA is about whole runs.
                seconds = records.add_session(
                    run.workdir, seconds, commit=commit, finished=finished, machine=machine
                )["seconds"]
        progress.add(run, seconds)
        outcome = ""
        if run.cell:
            scores = summaries["evaluate"]
            outcome = f"; mean test Dice {scores['mean_dice']:.4f} ± {scores['std_dice']:.4f}"
            if writes_files:  # The tables so far; the plot (slower) at the end.
                report.write_report(
                    workdir,
                    dataset=config.data.dataset,
                    command=command,
                    commit=commit,
                    plot_png=False,
                )
        logging.info(
            "sweep: %s: %s finished in %s%s.",
            positions[index],
            run.description,
            report.format_seconds(time.monotonic() - start),
            outcome,
        )
    if not writes_files:
        return []
    results = report.write_report(
        workdir, dataset=config.data.dataset, command=command, commit=commit
    )
    logging.info(
        "sweep: done; tables in %s and %s.",
        files.path(workdir) / report.MARKDOWN_FILE,
        files.path(workdir) / report.CSV_FILE,
    )
    return results
