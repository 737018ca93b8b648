"""Runs that span several processes: connecting them, and keeping their side effects in step.

JAX's multi-controller runtime runs the same program in every process of a run (one per host of
a Cloud TPU pod slice, one per GPU node, ...); `jax.distributed.initialize` connects them, after
which collectives span the devices of all processes and each process feeds its local ones.
`initialize(config)` makes that call once, before any JAX computation, from `config.distributed`:

  cluster="auto" (default): with `coordinator_address` set, the processes described by
    `coordinator_address` ("host:port" of process 0, the same everywhere), `num_processes`,
    `process_id` (this process) and optionally `local_device_ids` (the devices this process
    drives); else, on a Cloud TPU VM, the hosts of its TPU slice as JAX detects them from the
    TPU metadata (a single-host VM becomes a run of one process); else one process.
  cluster="none": one process, even on a Cloud TPU VM.
  cluster="slurm" | "ompi" | "mpi4py": the processes of that launcher's job, as JAX detects them
    (keys set above override what it detects).

Once connected, SIGTERM no longer ends a process: JAX's preemption service records it and
`loop.train_loop` stops every process at one common step, after saving it.

The helpers below let every process take the same decisions: they are collectives, so every
process calls them at the same points, and they do nothing in a run of one process.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

CLUSTERS = ("auto", "none", "slurm", "ompi", "mpi4py")
_Result = TypeVar("_Result")


def initialize(config: ml_collections.ConfigDict) -> None:
    """Connects the processes of a multi-process run (see the module docstring); else nothing.

    Call it once per process, before the first JAX computation.

    Raises:
      ValueError: naming the `config.distributed` keys that do not describe a run.
    """
    settings = config.distributed
    if settings.cluster not in CLUSTERS:
        raise ValueError(
            f"config.distributed.cluster={settings.cluster!r} is not one of {CLUSTERS}."
        )
    manual = {
        "coordinator_address": settings.coordinator_address or None,
        "num_processes": settings.num_processes,
        "process_id": settings.process_id,
        "local_device_ids": list(settings.local_device_ids)
        if settings.local_device_ids is not None
        else None,
    }
    given = [f"config.distributed.{key}" for key, value in manual.items() if value is not None]
    if settings.cluster == "none":
        if given:
            raise ValueError(
                f"config.distributed.cluster='none' runs one process but {', '.join(given)} "
                "describe several; drop them or set cluster='auto'."
            )
        return
    if jax.distributed.is_initialized():
        logging.info("jax.distributed is already initialised; config.distributed is not used.")
        return
    if settings.cluster != "auto":
        jax.distributed.initialize(**manual, cluster_detection_method=settings.cluster)
    elif manual["coordinator_address"] is not None:
        _check_manual_settings(settings)
        jax.distributed.initialize(**manual)
    elif given:
        raise ValueError(
            f"{', '.join(given)} set without config.distributed.coordinator_address: set it to "
            "'host:port' of process 0 on every process (or set config.distributed.cluster to "
            "your launcher)."
        )
    elif _on_cloud_tpu_vm():
        jax.distributed.initialize()  # JAX reads the slice's hosts from the TPU metadata.
    else:
        return
    logging.info(
        "Process %d of %d, %d of %d devices local.",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )


def _check_manual_settings(settings: ml_collections.ConfigDict) -> None:
    if ":" not in settings.coordinator_address:
        raise ValueError(
            f"config.distributed.coordinator_address={settings.coordinator_address!r} must be "
            "'host:port' (process 0's address and a free port, the same on every process)."
        )
    if settings.num_processes is None or settings.num_processes < 1:
        raise ValueError(
            "config.distributed.coordinator_address is set, so config.distributed.num_processes "
            f"must be the number of processes (>= 1), not {settings.num_processes}."
        )
    if settings.process_id is None or not 0 <= settings.process_id < settings.num_processes:
        raise ValueError(
            f"config.distributed.process_id={settings.process_id} must be this process's index "
            f"in [0, num_processes={settings.num_processes})."
        )


def _on_cloud_tpu_vm() -> bool:
    # JAX sets this flag on import when it finds TPU chips and libtpu; its own TPU cluster
    # detection in jax.distributed.initialize() requires the same flag. No public API has it.
    from jax._src import cloud_tpu_init  # noqa: PLC0415

    return bool(cloud_tpu_init.running_in_cloud_tpu_vm)


def is_main_process() -> bool:
    """True on process 0, the only one that writes logs, metrics, figures and results."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Waits until every process reached the barrier `name` (e.g. after process 0 wrote a file)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def main_process_first(fn: Callable[[], _Result], name: str) -> _Result:
    """`fn()` on process 0 first, then on the others (e.g. preparing a shared dataset once)."""
    if jax.process_count() == 1:
        return fn()
    result = fn() if is_main_process() else None
    barrier(name)
    return result if is_main_process() else fn()


def agree(flag: bool) -> bool:
    """Process 0's `flag` on every process (for decisions that start collective work)."""
    if jax.process_count() == 1:
        return flag
    return bool(multihost_utils.broadcast_one_to_all(np.asarray(flag, np.int32)))
