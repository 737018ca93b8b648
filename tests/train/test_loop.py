"""The host loop keeps its promises: exact resumption, NaN guard, SIGTERM, best model, progress.

A linear least-squares model trained with SGD on 2 devices stands in for a stage. Batches and
step keys are functions of the step index, so every run is compared against a plain numpy
replay of SGD (`_reference`) and interrupted runs against uninterrupted ones.
"""

import json
import logging
import math
import os
import re
import signal

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxcl.train import loop
from jaxcl.train.parallel import AXIS_NAME, DataParallel
from jaxcl.train.state import TrainState

NUM_DEVICES = 2
PER_DEVICE = 2
FEATURES = 3
LEARNING_RATE = 0.1
NOISE = 0.1
TRUE_WEIGHTS = np.array([1.0, -2.0, 0.5], np.float32)
STAGE = "toy_stage"


def _batch(index: int, nan: bool = False) -> dict[str, np.ndarray]:
    """Batch number `index` (used by step index + 1), shaped (devices, per_device, ...)."""
    x = np.random.default_rng(index).normal(size=(NUM_DEVICES, PER_DEVICE, FEATURES))
    x = x.astype(np.float32)
    if nan:
        x[0, 0, 0] = np.nan
    return {"x": x, "y": x @ TRUE_WEIGHTS}


class _Killed(BaseException):
    """A crash no `except Exception` in the loop could swallow, as a kill would be."""


def _batches(crash_at: int | None = None, nan_at: int | None = None):
    """`start -> iterator` of batches; raises before batch `crash_at` (a crash after that step)."""

    def iterate(start: int):
        index = start
        while True:
            if index == crash_at:
                raise _Killed(f"simulated crash after step {index}")
            yield _batch(index, nan=index == nan_at)
            index += 1

    return iterate


def _per_device_step(state, batch, rng):
    # The same rng on every device: every device adds the same noise to its own targets.
    targets = batch["y"] + NOISE * jax.random.normal(rng, batch["y"].shape)

    def loss_fn(params):
        return jnp.mean((batch["x"] @ params["w"] - targets) ** 2)

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    grads = jax.lax.pmean(grads, AXIS_NAME)
    mean_y = jax.lax.pmean(jnp.mean(batch["y"]), AXIS_NAME)
    stats = {"mean_y": 0.9 * state.batch_stats["mean_y"] + 0.1 * mean_y}
    return state.apply_gradients(grads, stats), {"loss": jax.lax.pmean(loss, AXIS_NAME)}


def _initial_state() -> TrainState:
    return TrainState.create(
        params={"w": jnp.zeros((FEATURES,), jnp.float32)},
        batch_stats={"mean_y": jnp.zeros((), jnp.float32)},
        tx=optax.sgd(LEARNING_RATE),
    )


RNG = jax.random.key(42)


def _reference(num_steps: int) -> tuple[list[np.ndarray], list[float]]:
    """numpy SGD replay: weights after each step (index 0 = initial) and each step's loss."""
    weights, losses = [np.zeros(FEATURES)], []
    for step in range(1, num_steps + 1):
        batch = _batch(step - 1)
        x = batch["x"].reshape(-1, FEATURES).astype(np.float64)
        noise = np.asarray(jax.random.normal(jax.random.fold_in(RNG, step), (PER_DEVICE,)))
        targets = batch["y"].reshape(-1) + NOISE * np.tile(noise, NUM_DEVICES)
        residual = x @ weights[-1] - targets
        losses.append(float(np.mean(residual**2)))
        weights.append(weights[-1] - LEARNING_RATE * 2.0 * x.T @ residual / len(targets))
    return weights, losses


def _settings(stage_dir, total_steps, **kwargs) -> loop.LoopSettings:
    return loop.LoopSettings(
        stage=STAGE,
        stage_dir=str(stage_dir),
        total_steps=total_steps,
        images_per_step=NUM_DEVICES * PER_DEVICE,
        **kwargs,
    )


def _run(settings, *, batches=None, step_wrapper=None, validate=None) -> loop.LoopResult:
    parallel = DataParallel("pmap", devices=jax.devices()[:NUM_DEVICES])
    step_fn = parallel.map_step(_per_device_step)
    if step_wrapper is not None:
        step_fn = step_wrapper(step_fn)
    return loop.train_loop(
        settings,
        parallel=parallel,
        initial_state=_initial_state(),
        step_fn=step_fn,
        batches=batches or _batches(),
        rng=RNG,
        validate=validate,
    )


def _metric_lines(stage_dir) -> list[dict]:
    """metrics.jsonl without the wall-clock dependent images/s."""
    with open(os.path.join(stage_dir, "metrics", "metrics.jsonl"), encoding="utf-8") as file:
        lines = [json.loads(line) for line in file]
    return [{k: v for k, v in line.items() if k != "images_per_s"} for line in lines]


def _checkpoint_steps(directory) -> list[int]:
    if not os.path.isdir(directory):
        return []
    return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


def _assert_states_equal(actual: TrainState, expected: TrainState) -> None:
    chex.assert_trees_all_equal(actual.params, expected.params)
    chex.assert_trees_all_equal(actual.batch_stats, expected.batch_stats)
    chex.assert_trees_all_equal(actual.opt_state, expected.opt_state)
    assert int(actual.step) == int(expected.step)


def test_uninterrupted_run_follows_the_numpy_reference(tmp_path):
    result = _run(_settings(tmp_path, 6, log_every=2, checkpoint_every=4))
    weights, losses = _reference(6)
    np.testing.assert_allclose(result.state.params["w"], weights[-1], rtol=1e-5, atol=1e-6)
    assert int(result.state.step) == 6
    expected_lines = [
        {"step": step, "loss": pytest.approx(np.mean(losses[step - 2 : step]), rel=1e-5)}
        for step in (2, 4, 6)
    ]
    assert _metric_lines(tmp_path) == expected_lines
    assert result.metrics["loss"] == pytest.approx(np.mean(losses[4:6]), rel=1e-5)
    assert result.best_state is None
    # Checkpoints on schedule plus the final one (the newest two are kept).
    assert _checkpoint_steps(tmp_path / "checkpoints") == [4, 6]
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(tmp_path / "metrics"))


def test_crash_and_resume_equals_uninterrupted_run(tmp_path, caplog):
    total, checkpoint_every, log_every, crash_after = 10, 3, 2, 5
    kwargs = {"log_every": log_every, "checkpoint_every": checkpoint_every}
    uninterrupted = _run(_settings(tmp_path / "straight", total, **kwargs))

    resumed_dir = tmp_path / "resumed"
    with pytest.raises(_Killed):
        _run(_settings(resumed_dir, total, **kwargs), batches=_batches(crash_at=crash_after))
    assert _checkpoint_steps(resumed_dir / "checkpoints") == [3]
    # The crashed run logged step 4 (past its last checkpoint) and was killed mid-write.
    assert [line["step"] for line in _metric_lines(resumed_dir)] == [2, 4]
    with open(resumed_dir / "metrics" / "metrics.jsonl", "a", encoding="utf-8") as file:
        file.write('{"step": 6, "lo')

    with caplog.at_level(logging.INFO):
        resumed = _run(_settings(resumed_dir, total, **kwargs))
    assert f"{STAGE}: resuming from step 3" in caplog.text

    _assert_states_equal(resumed.state, uninterrupted.state)
    # Each step's metrics appear once, averaged as in the uninterrupted run (the line of step 4
    # averages step 3, computed before the crash, and step 4, computed after the restart).
    assert _metric_lines(resumed_dir) == _metric_lines(tmp_path / "straight")
    assert [line["step"] for line in _metric_lines(resumed_dir)] == [2, 4, 6, 8, 10]
    assert resumed.metrics["loss"] == uninterrupted.metrics["loss"]
    weights, _ = _reference(total)
    np.testing.assert_allclose(resumed.state.params["w"], weights[-1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("validate_every", [0, 5])
def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, validate_every):
    nan_step = 5
    validated_steps = []

    def validate(state):
        validated_steps.append(int(state.step))
        return {"score": float(state.step)}

    settings = _settings(
        tmp_path,
        8,
        log_every=4,
        checkpoint_every=2,
        validate_every=validate_every,
        select_best="score" if validate_every else "",
    )
    with pytest.raises(loop.NonFiniteLossError, match=rf"{STAGE}: .* at step {nan_step};") as error:
        _run(settings, batches=_batches(nan_at=nan_step - 1), validate=validate)
    assert "checkpoints is kept" in str(error.value)
    # Step 4's checkpoint is the last good one; none of a diverged state was written.
    assert _checkpoint_steps(tmp_path / "checkpoints") == [2, 4]
    assert _checkpoint_steps(tmp_path / "best") == []
    assert validated_steps == []
    lines = _metric_lines(tmp_path)
    assert [line["step"] for line in lines] == [4]
    assert all(math.isfinite(value) for line in lines for value in line.values())


def test_sigterm_checkpoints_the_current_step_and_resume_is_exact(tmp_path, caplog):
    total, term_at = 10, 5
    kwargs = {"log_every": 3, "checkpoint_every": 4}
    uninterrupted = _run(_settings(tmp_path / "straight", total, **kwargs))

    def send_sigterm_at(step_fn):
        calls = []

        def wrapped(state, batch, rng):
            calls.append(None)
            if len(calls) == term_at:
                os.kill(os.getpid(), signal.SIGTERM)
            return step_fn(state, batch, rng)

        return wrapped

    handler_before = signal.getsignal(signal.SIGTERM)
    preempted_dir = tmp_path / "preempted"
    with pytest.raises(loop.PreemptedError, match=rf"SIGTERM at step {term_at}.*rerun"):
        _run(_settings(preempted_dir, total, **kwargs), step_wrapper=send_sigterm_at)
    assert signal.getsignal(signal.SIGTERM) is handler_before
    assert _checkpoint_steps(preempted_dir / "checkpoints") == [4, term_at]

    with caplog.at_level(logging.INFO):
        resumed = _run(_settings(preempted_dir, total, **kwargs))
    assert f"resuming from step {term_at}" in caplog.text
    _assert_states_equal(resumed.state, uninterrupted.state)
    # The line of step 6 averages steps 4-6 although 4 and 5 ran before the SIGTERM.
    assert _metric_lines(preempted_dir) == _metric_lines(tmp_path / "straight")
    assert [line["step"] for line in _metric_lines(preempted_dir)] == [3, 6, 9, 10]


def _recording_validator(scores_by_step: dict[int, float]):
    """validate() returning a fixed score per step and remembering the states it saw."""
    seen = {}

    def validate(state):
        step = int(state.step)
        seen[step] = state
        return {"val_score": scores_by_step[step]}

    return validate, seen


SCORES = {2: 0.2, 4: 0.9, 6: 0.5, 8: 0.7}


def test_validation_keeps_the_best_state(tmp_path):
    validate, seen = _recording_validator(SCORES)
    settings = _settings(
        tmp_path, 8, log_every=2, checkpoint_every=4, validate_every=2, select_best="val_score"
    )
    result = _run(settings, validate=validate)
    assert sorted(seen) == [2, 4, 6, 8]
    assert _checkpoint_steps(tmp_path / "best") == [4]
    _assert_states_equal(result.best_state, seen[4])
    _assert_states_equal(result.state, seen[8])
    weights, _ = _reference(8)
    np.testing.assert_allclose(result.best_state.params["w"], weights[4], rtol=1e-5, atol=1e-6)
    val_lines = [line for line in _metric_lines(tmp_path) if "val_score" in line]
    assert val_lines == [{"step": step, "val_score": score} for step, score in SCORES.items()]
    assert result.metrics["val_score"] == 0.7


def test_best_saved_after_the_last_checkpoint_survives_a_crash(tmp_path):
    # Step 4 becomes the best, then the run dies at step 5 before its next checkpoint (6).
    settings = _settings(
        tmp_path, 8, log_every=2, checkpoint_every=3, validate_every=2, select_best="val_score"
    )
    with pytest.raises(_Killed):
        _run(settings, batches=_batches(crash_at=5), validate=_recording_validator(SCORES)[0])
    assert _checkpoint_steps(tmp_path / "checkpoints") == [3]
    assert _checkpoint_steps(tmp_path / "best") == [4]

    validate, seen = _recording_validator(SCORES)
    result = _run(settings, validate=validate)
    assert sorted(seen) == [4, 6, 8]
    assert _checkpoint_steps(tmp_path / "best") == [4]
    _assert_states_equal(result.best_state, seen[4])


PROGRESS = re.compile(
    rf"^{STAGE}: step (\d+)/6  loss (\d+\.\d{{4}})  (nan|\d+\.\d) img/s  ETA (\?|\d+:\d\d:\d\d)$"
)


def test_progress_lines_show_step_loss_throughput_and_eta(tmp_path, caplog):
    with caplog.at_level(logging.INFO):
        _run(_settings(tmp_path, 6, log_every=2, checkpoint_every=100))
    matches = [PROGRESS.match(record.getMessage()) for record in caplog.records]
    progress = [match.groups() for match in matches if match]
    assert [int(step) for step, *_ in progress] == [2, 4, 6]
    _, losses = _reference(6)
    for step, loss, _, _ in progress:
        assert float(loss) == pytest.approx(np.mean(losses[int(step) - 2 : int(step)]), abs=1e-4)
    # The first report also paid for compilation: no rate yet. Later ones have rate and ETA.
    assert progress[0][2:] == ("nan", "?")
    assert all(float(rate) > 0 for _, _, rate, _ in progress[1:])
    assert progress[-1][3] == "0:00:00"
    rates = [line.get("images_per_s") for line in _read_raw_lines(tmp_path)]
    assert rates[0] is None and all(rate > 0 for rate in rates[1:])


def _read_raw_lines(stage_dir) -> list[dict]:
    with open(os.path.join(stage_dir, "metrics", "metrics.jsonl"), encoding="utf-8") as file:
        return [json.loads(line) for line in file]
