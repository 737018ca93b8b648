"""Runs over two processes on this machine: the same numbers as one process, outputs written once.

The processes join the run through `jaxcl.train.distributed.initialize` on a localhost
coordinator (cross-process collectives on CPU use Gloo, JAX's default). The step test gives each
4 fake CPU devices and compares with this pytest process holding 8 (tests/conftest.py) fed the
same global batches; the trainer test runs `python -m jaxcl.main` in both. Every test waits for
its processes with a timeout and kills them if anything goes wrong.
"""

import contextlib
import importlib.util
import json
import os
import pathlib
import re
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from jaxcl.train.parallel import DataParallel

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
WORKER_PATH = pathlib.Path(__file__).with_name("multihost_worker.py")
TIMEOUT_S = 240
# Losses: the same per-device programs run on the same per-device batches; only the order in
# which collectives sum the 8 devices' float32 values differs (Gloo's ring vs XLA:CPU's
# in-process all-reduce), ~1e-7 relative per sum. Observed: at most 7.4e-7 over 3 steps.
LOSS_RTOL = 1e-5
# Updates: cancellation in BatchNorm's backward pass and in the Dice gradient turns those
# rounding differences into ~1e-2 of the fine-tuning parameter updates (observed 2.7e-2 after
# 3 steps; 1 vs 8 devices in one process differ by 1.3e-2 in the same way), G^D's stay ~1e-4.
# Gradients averaged over one process's devices only, or a process feeding the wrong part of
# the batch, change the update by a large fraction of its norm.
UPDATE_RTOL = 1e-1


def _load_worker():
    spec = importlib.util.spec_from_file_location("multihost_worker", WORKER_PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


worker = _load_worker()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        return sock.getsockname()[1]


def _env(num_devices: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        XLA_FLAGS=f"--xla_force_host_platform_device_count={num_devices} "
        "--xla_backend_optimization_level=0",
        JAX_PLATFORMS="cpu",
        PYTHONPATH=os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]),
        TF_CPP_MIN_LOG_LEVEL="2",
    )
    return env


@contextlib.contextmanager
def _two_processes(commands, log_dir: pathlib.Path, num_devices: int):
    """Starts one process per command (output in log_dir/process<i>.log); kills leftovers on exit.

    Yields `wait()`, which waits for both with the timeout and fails the test, with their logs,
    unless both exit with 0; it returns the two logs.
    """
    processes, logs = [], [log_dir / f"process{i}.log" for i in range(len(commands))]
    try:
        for command, log in zip(commands, logs, strict=True):
            with log.open("w") as output:
                processes.append(
                    subprocess.Popen(
                        command,
                        cwd=REPO_ROOT,
                        env=_env(num_devices),
                        stdout=output,
                        stderr=subprocess.STDOUT,
                    )
                )

        def wait() -> list[str]:
            deadline = time.monotonic() + TIMEOUT_S
            for process in processes:
                try:
                    process.wait(timeout=max(deadline - time.monotonic(), 0))
                except subprocess.TimeoutExpired:
                    break
            texts = [log.read_text() for log in logs]
            codes = [process.poll() for process in processes]
            if codes != [0, 0]:
                tails = "\n".join(
                    f"--- process {i} (exit {codes[i]}):\n{t[-3000:]}" for i, t in enumerate(texts)
                )
                pytest.fail(f"two-process run failed or timed out after {TIMEOUT_S} s:\n{tails}")
            return texts

        yield wait
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
            process.wait()


def _network_updates(initial: dict, final: dict) -> dict[str, np.ndarray]:
    """final - initial of every (collection, top-level network), flattened to one vector."""
    updates: dict[str, list] = {}
    for key, value in final.items():
        collection, network = re.findall(r"\['([^']+)'\]", key)[:2]
        updates.setdefault(f"{collection}/{network}", []).append(
            (np.asarray(value, np.float64) - initial[key]).ravel()
        )
    return {name: np.concatenate(parts) for name, parts in updates.items()}


def test_two_processes_of_4_devices_match_one_process_of_8(tmp_path):
    assert jax.device_count() >= 8
    port = _free_port()
    commands = [
        [sys.executable, str(WORKER_PATH), str(i), f"localhost:{port}", str(tmp_path)]
        for i in range(2)
    ]
    with _two_processes(commands, tmp_path, num_devices=4) as wait:
        # The reference runs here while the two processes run theirs.
        reference = {
            stage: worker.run_stage(
                stage,
                DataParallel("pmap", devices=jax.devices()[:8]),
                process_index=0,
                process_count=1,
            )
            for stage in worker.STAGES
        }
        wait()

    outputs = [dict(np.load(tmp_path / f"process{i}.npz")) for i in range(2)]
    assert outputs[0].keys() == outputs[1].keys()
    for key in outputs[0]:  # every process holds the same replicated state
        np.testing.assert_array_equal(outputs[0][key], outputs[1][key], err_msg=key)

    got = outputs[0]
    for stage, (losses, state) in reference.items():
        np.testing.assert_allclose(got[f"{stage}/losses"], losses, rtol=LOSS_RTOL)
        prefix = f"{stage}/"
        final = {k.removeprefix(prefix): v for k, v in got.items() if k.startswith(prefix)}
        del final["losses"]
        initial = worker.flat_params(worker.initial_state(stage))
        expected = _network_updates(initial, worker.flat_params(state))
        actual = _network_updates(initial, final)
        assert actual.keys() == expected.keys()
        for name, update in expected.items():
            error = np.linalg.norm(actual[name] - update)
            assert error <= UPDATE_RTOL * np.linalg.norm(update), (stage, name, error)

    # The fine-tuned state saved by both processes restores on both.
    saved = {k.removeprefix("finetune/"): v for k, v in got.items()}
    for key, value in got.items():
        if key.startswith("restored/"):
            np.testing.assert_array_equal(value, saved[key.removeprefix("restored/")], err_msg=key)
    assert int(got["restored_meta_process_count"]) == 2

    # SIGTERM reached process 1 only, yet both stopped at the same step and saved it together
    # (the common step was already checked above: the processes' outputs are equal).
    stopped_at = int(got["preempted/stopped_at"])
    assert 2 <= stopped_at < worker.MAX_PREEMPTED_STEPS
    assert got["preempted/checkpoints"].tolist() == [stopped_at]


def _main_commands(workdir, data_dir, port: int) -> list[list[str]]:
    return [
        [
            sys.executable,
            "-m",
            "jaxcl.main",
            "--config=configs/synthetic.py:quick",
            f"--workdir={workdir}",
            f"--config.data.data_dir={data_dir}",
            "--config.stages=('finetune', 'evaluate')",
            "--config.parallel.mode=shard_map",  # the worker test covers pmap
            f"--config.distributed.coordinator_address=localhost:{port}",
            "--config.distributed.num_processes=2",
            f"--config.distributed.process_id={process_id}",
        ]
        for process_id in range(2)
    ]


def _test_dice_table(log: str) -> list[str]:
    return [line for line in log.splitlines() if line.startswith("|")]


def test_trainer_over_two_processes_writes_each_output_once(tmp_path):
    """`python -m jaxcl.main` in 2 processes (2 devices each, shard_map): fine-tune, evaluate."""
    workdir, data_dir = tmp_path / "run", tmp_path / "data"
    with _two_processes(
        _main_commands(workdir, data_dir, _free_port()), tmp_path, num_devices=2
    ) as wait:
        logs = wait()
    for process_id, log in enumerate(logs):
        assert f"Process {process_id} of 2, 2 of 4 devices local." in log

    # Metrics written once: process 1's lines would repeat every step.
    metrics_dir = workdir / "finetune" / "metrics"
    lines = [json.loads(line) for line in (metrics_dir / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines if "loss" in line] == [2, 3, 4, 6]
    assert [line["step"] for line in lines if "val_dice" in line] == [3, 6]
    assert len([p for p in metrics_dir.iterdir() if p.name.startswith("events.out")]) == 1
    assert sorted(int(p.name) for p in (workdir / "finetune" / "checkpoints").iterdir()) == [3, 6]

    evaluate_dir = workdir / "evaluate"
    results = json.loads((evaluate_dir / "results.json").read_text())
    assert results["num_subjects"] == 16
    assert len(list((evaluate_dir / "predictions").glob("*.nii.gz"))) == 16
    assert (evaluate_dir / "figures" / "loss_curves.png").is_file()
    assert not list(workdir.rglob("*.tmp"))
    # Both processes evaluated and found the same Dice.
    table = _test_dice_table(logs[0])
    assert len(table) == 2 + 16 + 1  # header, rule, subjects, mean
    assert _test_dice_table(logs[1]) == table

    # A rerun agrees on every process that both stages are finished.
    results_written = (evaluate_dir / "results.json").stat().st_mtime_ns
    with _two_processes(
        _main_commands(workdir, data_dir, _free_port()), tmp_path, num_devices=2
    ) as wait:
        logs = wait()
    for log in logs:
        assert "finetune: already finished" in log
        assert "evaluate: already finished" in log
    assert (evaluate_dir / "results.json").stat().st_mtime_ns == results_written
