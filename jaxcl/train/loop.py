"""The host-side training loop shared by every stage: resume, step, log, checkpoint, stop.

`train_loop` drives a mapped step function (from `DataParallel.map_step`) over a resumable batch
source and owns everything with side effects: restoring and saving checkpoints, metrics (JSON
lines and TensorBoard under `STAGE_DIR/metrics/`), progress lines with images/s and ETA,
periodic validation, the non-finite-loss guard and SIGTERM (preemption) handling.

Resumption is exact: batch `k` and the step's random key are functions of `(seed, k)` only, and
the checkpoint holds the whole train state, so a run restarted from step `k` continues the same
trajectory as an uninterrupted one. Metrics lines are written on the log/validation schedule
only; a checkpoint carries the step metrics not yet written, and metrics lines (and `best/`
entries) after the restored step, left by the run that was killed, are dropped on resume, so the
JSON-lines file of a resumed run equals that of an uninterrupted one.

With several processes every process runs the loop in step: all take part in each checkpoint
(`StageCheckpointer`), process 0 alone writes metrics, and the decisions that start collective
work (keeping a new best state, stopping for SIGTERM) are taken at the same step everywhere.
The stage folder may be local or `gs://`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np
from clu import metric_writers
from etils import epath
from jax.experimental import multihost_utils

from jaxcl import files
from jaxcl.train import distributed
from jaxcl.train.checkpoint import StageCheckpointer
from jaxcl.train.errors import NonFiniteLossError, PreemptedError
from jaxcl.train.parallel import DataParallel

PyTree = Any
Batch = dict[str, np.ndarray]
MappedStep = Callable[[PyTree, PyTree, jax.Array], tuple[PyTree, PyTree]]
# validate(host_state) -> metrics, e.g. {"val_dice": 0.8}
Validate = Callable[[PyTree], dict[str, float]]


@dataclasses.dataclass(frozen=True)
class LoopSettings:
    """What the loop needs besides the state and the step.

    Attributes:
      stage: stage name, used in messages and as the metrics prefix.
      stage_dir: WORKDIR/<stage> (local or `gs://`); checkpoints in `checkpoints/`, metrics in
        `metrics/`.
      total_steps: number of updates of the stage.
      images_per_step: global images per step (for images/s).
      log_every: steps between progress lines / metric writes (validation steps write one too).
      checkpoint_every: steps between checkpoints (one is also written at the end and on
        SIGTERM).
      validate_every: steps between `validate` calls (0: never).
      select_best: name of the validation metric whose maximum is kept in `best/` ("" for none).
    """

    stage: str
    stage_dir: str
    total_steps: int
    images_per_step: int
    log_every: int = 50
    checkpoint_every: int = 500
    validate_every: int = 0
    select_best: str = ""


@dataclasses.dataclass
class LoopResult:
    """Final host state and metrics of a finished stage."""

    state: PyTree
    best_state: PyTree | None
    metrics: dict[str, float]


def train_loop(
    settings: LoopSettings,
    *,
    parallel: DataParallel,
    initial_state: PyTree,
    step_fn: MappedStep,
    batches: Callable[[int], Iterator[Batch]],
    rng: jax.Array,
    validate: Validate | None = None,
) -> LoopResult:
    """Runs (or resumes) one stage to `settings.total_steps`.

    Args:
      settings: see `LoopSettings`.
      parallel: how the step is mapped (places state and batches).
      initial_state: host-side state used when no checkpoint exists, and as the restore template.
      step_fn: mapped step `(state, batch, rng) -> (state, metrics)`; metrics hold "loss".
      batches: `start_step -> iterator` of host batches `(local_devices, per_device, ...)`.
      rng: base key; step k uses `fold_in(rng, k)`.
      validate: optional `host_state -> metrics` called every `validate_every` steps.

    Raises:
      NonFiniteLossError: a step's loss was NaN/inf (names stage and step).
      PreemptedError: SIGTERM; the current step was checkpointed first.
    """
    stage_dir = files.path(settings.stage_dir)
    checkpointer = StageCheckpointer(stage_dir / "checkpoints")
    host_state, meta, start_step = initial_state, {}, 0
    if checkpointer.latest_step() is not None:
        host_state, meta = checkpointer.restore(initial_state)
        start_step = int(checkpointer.latest_step())
        logging.info(
            "%s: resuming from step %d (%s).", settings.stage, start_step, checkpointer.directory
        )
    best_checkpointer = None
    if settings.select_best:
        best_dir = stage_dir / "best"
        # A best state saved after the restored step belongs to the abandoned part of the
        # trajectory; the resumed run saves it again when it gets there.
        if distributed.is_main_process():
            _drop_steps_after(best_dir, start_step)
        distributed.barrier(f"{settings.stage}: old best states dropped")
        best_checkpointer = StageCheckpointer(best_dir, max_to_keep=1)
    best_score = meta.get("best_score", -math.inf)
    metrics_path = stage_dir / "metrics" / "metrics.jsonl"
    if distributed.is_main_process():
        _truncate_metrics(metrics_path, after_step=start_step)
    writer = metric_writers.create_default_writer(
        str(stage_dir / "metrics"),
        just_logging=not distributed.is_main_process(),
        asynchronous=False,
    )

    state = parallel.put_state(host_state)
    unwritten = _UnwrittenMetrics(settings, parallel, meta.get("unwritten_metrics", []))
    last: dict[str, float] = dict(meta.get("last_metrics", {}))
    timer = _Throughput(settings.images_per_step)

    def save(step: int) -> None:
        # Fetching the unwritten metrics first raises on a non-finite loss: no checkpoint of a
        # diverged state is ever written.
        host_values = {
            "best_score": best_score,
            "last_metrics": last,
            "unwritten_metrics": unwritten.fetch(),
        }
        checkpointer.save(step, parallel.get_state(state), meta=host_values)

    with _preemption_notice() as preempted, contextlib.closing(writer):
        for step, batch in zip(
            range(start_step + 1, settings.total_steps + 1), batches(start_step), strict=False
        ):
            state, metrics = step_fn(
                state, parallel.put_batch(batch), jax.random.fold_in(rng, step)
            )
            unwritten.add(step, metrics)
            is_last = step == settings.total_steps
            validating = bool(
                validate
                and settings.validate_every
                and (step % settings.validate_every == 0 or is_last)
            )
            # Validation steps flush too, so a diverged state is never validated or kept as best.
            if step % settings.log_every == 0 or is_last or validating:
                last = _flush(unwritten.take(), settings, writer, metrics_path, timer, step)
            if validating:
                scores = validate(parallel.get_state(state))
                _write(writer, metrics_path, step, scores)
                last.update(scores)
                # Every process validates; process 0's verdict decides, as saving is collective.
                if settings.select_best and distributed.agree(
                    scores[settings.select_best] > best_score
                ):
                    best_score = scores[settings.select_best]
                    best_checkpointer.save(step, parallel.get_state(state), meta=scores)
                    logging.info(
                        "%s: step %d: best %s %.4f.",
                        settings.stage,
                        step,
                        settings.select_best,
                        best_score,
                    )
            stopping = preempted(step)  # read once: the checkpoint and the error agree
            if step % settings.checkpoint_every == 0 or is_last or stopping:
                save(step)
            if stopping:
                raise _preempted(settings.stage, step)
        if preempted(None):  # arrived during the final checkpoint: the stage is saved, stop
            raise _preempted(settings.stage, settings.total_steps)

    final = parallel.get_state(state)
    best = None
    if best_checkpointer is not None and best_checkpointer.latest_step() is not None:
        best, _ = best_checkpointer.restore(initial_state)
    return LoopResult(state=final, best_state=best, metrics=last)


def _preempted(stage: str, step: int) -> PreemptedError:
    return PreemptedError(
        f"{stage}: SIGTERM at step {step}; checkpoint saved, rerun the same command to resume."
    )


class _UnwrittenMetrics:
    """Step metrics not yet written as a metrics line: device values until fetched, then floats.

    Fetching checks every value: a NaN/inf raises `NonFiniteLossError` naming stage and step.
    """

    def __init__(self, settings: LoopSettings, parallel: DataParallel, restored: list):
        self._settings = settings
        self._parallel = parallel
        self._host = [(int(step), dict(values)) for step, values in restored]
        self._device: list[tuple[int, PyTree]] = []

    def add(self, step: int, metrics: PyTree) -> None:
        self._device.append((step, metrics))

    def fetch(self) -> list[tuple[int, dict[str, float]]]:
        """Moves the device metrics to the host; returns all unwritten `(step, values)`."""
        for step, metrics in self._device:
            values = self._parallel.get_metrics(metrics)
            if not all(math.isfinite(v) for v in values.values()):
                raise NonFiniteLossError(
                    f"{self._settings.stage}: non-finite metrics {values} at step {step}; the "
                    f"last good checkpoint in {self._settings.stage_dir}/checkpoints is kept. "
                    "Lower the learning rate or check the input data."
                )
            self._host.append((step, values))
        self._device = []
        return list(self._host)

    def take(self) -> list[tuple[int, dict[str, float]]]:
        """`fetch()`, then forgets them (they are about to be written)."""
        host = self.fetch()
        self._host = []
        return host


def _flush(host, settings, writer, metrics_path, timer, step) -> dict[str, float]:
    """Writes the mean of the step metrics `host` as one line and logs a progress line."""
    averaged = {k: float(np.mean([v[k] for _, v in host])) for k in host[-1][1]}
    rate, eta = timer.update(step, settings.total_steps)
    if math.isfinite(rate):  # unknown at the first report, which also paid for compilation
        averaged["images_per_s"] = rate
    _write(writer, metrics_path, step, averaged)
    logging.info(
        "%s: step %d/%d  loss %.4f  %.1f img/s  ETA %s",
        settings.stage,
        step,
        settings.total_steps,
        averaged.get("loss", float("nan")),
        rate,
        _format_seconds(eta),
    )
    return averaged


def _write(writer, metrics_path: epath.Path, step: int, values: dict[str, float]) -> None:
    if not distributed.is_main_process():
        return
    writer.write_scalars(step, values)
    metrics_path.parent.mkdir(parents=True, exist_ok=True)
    with metrics_path.open("a", encoding="utf-8") as file:
        file.write(json.dumps({"step": step, **values}) + "\n")


def _truncate_metrics(path: epath.Path, *, after_step: int) -> None:
    """Drops metric lines of steps > after_step (written by a run that was killed)."""
    if not path.exists():
        return
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    files.write_atomically(path, "".join(line for line in lines if _line_step(line) <= after_step))


def _line_step(line: str) -> float:
    """Step of a metrics line; +inf for a line cut short by a kill (so it is dropped)."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf


def _drop_steps_after(directory: epath.Path, step: int) -> None:
    """Deletes the checkpoints of steps > `step` in an orbax checkpoint folder."""
    if not directory.is_dir():
        return
    for child in directory.iterdir():
        if child.name.isdigit() and int(child.name) > step:
            child.rmtree()


class _Throughput:
    """images/s since the previous report and ETA from it (first report includes compile)."""

    def __init__(self, images_per_step: int):
        self.images_per_step = images_per_step
        self.time = time.perf_counter()
        self.step: int | None = None

    def update(self, step: int, total_steps: int) -> tuple[float, float]:
        now = time.perf_counter()
        steps = step - self.step if self.step is not None else 0
        rate = steps * self.images_per_step / max(now - self.time, 1e-9) if steps else math.nan
        seconds_per_step = (now - self.time) / steps if steps else float("nan")
        self.time, self.step = now, step
        return rate, seconds_per_step * (total_steps - step)


def _format_seconds(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


@contextlib.contextmanager
def _preemption_notice():
    """Yields `preempted(step) -> bool`: whether to stop at `step` (None: after the last step).

    One process: True once SIGTERM arrived (our handler, the previous one restored on exit).
    Processes connected by `jax.distributed`: JAX's preemption service catches SIGTERM on any of
    them and picks the step at which all of them stop, so that all save that step together. It
    needs a call at every step, so it cannot answer after the last one: a notice that arrives
    during the final checkpoint leaves the run going, and the rerun finds the stage finished.
    """
    if jax.distributed.is_initialized():
        yield lambda step: step is not None and multihost_utils.reached_preemption_sync_point(step)
        return
    received = []
    previous = signal.signal(signal.SIGTERM, lambda *_: received.append(True))
    try:
        yield lambda step: bool(received)
    finally:
        signal.signal(signal.SIGTERM, previous)
