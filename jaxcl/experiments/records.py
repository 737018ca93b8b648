"""What a sweep records next to its runs: the config it was started with, run times, git commit.

Workdirs are local folders or `gs://` URIs (`jaxcl.files`).

WORKDIR/sweep_config.json        the config of the first invocation (without `config.sweep`) and
                                 its command line; later invocations must train with the same
                                 config, or a rerun would silently mix results of two configs
                                 (keys that a newer jaxcl added are accepted and logged)
<run workdir>/sweep_time.json    {"seconds": total, "sessions": [{"seconds", "commit",
                                 "finished", "machine"}, ...]}: wall time the sweep spent on the
                                 run, summed over the invocations that worked on it (a SIGKILLed
                                 session's time is lost; a SIGTERMed one is recorded)
"""

from __future__ import annotations

import json
import logging
import os
import platform
import subprocess
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections

from jaxcl import files
from jaxcl.experiments.plan import SweepConfigError

CONFIG_FILE = "sweep_config.json"
TIME_FILE = "sweep_time.json"
# Config keys that may change between invocations on one workdir: what to run, where the data
# lives, how the processes find each other.
_MAY_CHANGE = ("sweep", "data.root", "data.data_dir", "distributed")
_ABSENT = object()


def git_commit() -> str:
    """HEAD of the git checkout holding jaxcl ("<sha>-dirty" with uncommitted changes to tracked
    files), or "unknown" outside a checkout or without git."""
    package_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(
            ["git", "-C", package_dir, "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        changes = subprocess.run(
            ["git", "-C", package_dir, "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{head}-dirty" if changes else head


def machine() -> str:
    """What this process computes on, e.g. "2 CPU cores (AMD EPYC 7B13), 1 jax device: cpu
    (jax 0.10.2)": the CPU model and the cores this process may use, and the jax devices."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            names = [
                line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")
            ]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    devices = jax.devices()
    kinds = ", ".join(sorted({device.device_kind for device in devices}))
    return (
        f"{cores} CPU cores ({cpu}), {len(devices)} jax device{'s' * (len(devices) > 1)}: "
        f"{kinds} (jax {jax.__version__})"
    )


def write_json(location: files.PathLike, value: Any) -> None:
    files.write_atomically(location, json.dumps(value, indent=2, default=str))


def read_json(location: files.PathLike) -> Any:
    return json.loads(files.path(location).read_text(encoding="utf-8"))


# ----------------------------------------------------------------------------------------------
# The config a workdir was started with.


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _config_json(config: ml_collections.ConfigDict) -> dict[str, Any]:
    return json.loads(config.to_json_best_effort())


def _training_config(config_json: Mapping[str, Any]) -> dict[str, Any]:
    """The flattened config, without the keys that may change between invocations."""
    flat = _flatten(config_json)
    return {
        key: value
        for key, value in flat.items()
        if not any(key == k or key.startswith(k + ".") for k in _MAY_CHANGE)
    }


def check_stored_config(config: ml_collections.ConfigDict, workdir: str, command: str) -> None:
    """Stores the training config on a workdir's first sweep; checks it on every later one.

    Raises:
      SweepConfigError listing the keys whose value differs from the stored one.
    """
    path = files.path(workdir) / CONFIG_FILE
    current = _training_config(_config_json(config))
    if not path.exists():
        write_json(path, {"command": command, "config": _config_json(config)})
        return
    stored_file = read_json(path)
    stored = _training_config(stored_file["config"])
    # Keys jaxcl gained after the sweep started: a new key's default keeps what older versions
    # did (a new method's settings, say), so the sweep goes on; the log names them.
    if added := sorted(set(current) - set(stored)):
        logging.info(
            "sweep: config keys new since %s started: %s (used by the runs still to come).",
            workdir,
            ", ".join(f"{key}={current[key]!r}" for key in added),
        )
    differences = [
        f"{key}: {stored[key]!r} -> {current.get(key, '<absent>')!r}"
        for key in sorted(stored)
        if stored[key] != current.get(key, _ABSENT)
    ]
    if differences:
        raise SweepConfigError(
            f"{workdir} holds a sweep started with a different config ({path}: "
            f"{stored_file['command']}); differences: {'; '.join(differences)}. Use another "
            f"--workdir, or pass the same config (only {', '.join(_MAY_CHANGE)} may change), "
            f"or delete {workdir} if none of its runs is worth keeping."
        )


def stored_command(workdir: str) -> str | None:
    """The command line that started the sweep in `workdir`, if it was started."""
    path = files.path(workdir) / CONFIG_FILE
    return read_json(path)["command"] if path.exists() else None


# ----------------------------------------------------------------------------------------------
# Run times.


def read_time(run_dir: files.PathLike) -> dict[str, Any] | None:
    """The run's time record, or None if the sweep never recorded one."""
    path = files.path(run_dir) / TIME_FILE
    return read_json(path) if path.exists() else None


def add_session(
    run_dir: files.PathLike, seconds: float, *, commit: str, finished: bool, machine: str
) -> dict[str, Any]:
    """Adds one invocation's wall time on a run to its record; returns the new record."""
    record = read_time(run_dir) or {"seconds": 0.0, "sessions": []}
    record["sessions"].append(
        {"seconds": seconds, "commit": commit, "finished": finished, "machine": machine}
    )
    record["seconds"] = sum(session["seconds"] for session in record["sessions"])
    write_json(files.path(run_dir) / TIME_FILE, record)
    return record
