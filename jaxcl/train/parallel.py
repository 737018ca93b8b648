"""The one place that knows how per-device step functions are mapped onto devices.

Step functions are written for one device and name the data-parallel axis `"batch"`: they
`pmean` gradients, metrics and BatchNorm statistics and all-gather contrastive embeddings over
it. `DataParallel` runs such a function on every local device, either with `jax.pmap` (state
replicated along a leading device axis) or with `jax.shard_map` over a 1-D `("batch",)` mesh
(state replicated by sharding, batch split along its first axis). Both give the same numbers.

Host batches arrive shaped `(local_devices, per_device_batch, ...)`, which both modes accept.
With several processes, each host passes only its own local devices' part of the global batch.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

PyTree = Any
StepFn = Callable[[PyTree, PyTree, jax.Array], tuple[PyTree, PyTree]]

AXIS_NAME = "batch"
MODES = ("pmap", "shard_map")


class DataParallel:
    """Maps per-device steps over all devices with `pmap` or `shard_map`.

    Args:
      mode: "pmap" or "shard_map".
      devices: devices to use (default: all devices of all processes; each process feeds its
        local ones).
    """

    def __init__(self, mode: str = "pmap", devices: list[jax.Device] | None = None):
        if mode not in MODES:
            raise ValueError(f"config.parallel.mode={mode!r} is not one of {MODES}.")
        self.mode = mode
        self.devices = list(devices) if devices is not None else jax.devices()
        # pmap over an explicit device list only when asked: its default spans all processes.
        self._pmap_devices = self.devices if devices is not None else None
        self.local_devices = [d for d in self.devices if d.process_index == jax.process_index()]
        self.mesh = jax.sharding.Mesh(np.asarray(self.devices), (AXIS_NAME,))
        # pmap inputs: a leading axis of local devices, one entry per device.
        self._local_sharding = NamedSharding(
            jax.sharding.Mesh(np.asarray(self.local_devices), (AXIS_NAME,)), P(AXIS_NAME)
        )

    @property
    def num_devices(self) -> int:
        return len(self.devices)

    @property
    def num_local_devices(self) -> int:
        return len(self.local_devices)

    def map_step(self, step_fn: StepFn, *, donate_state: bool = True) -> StepFn:
        """Returns `mapped(state, batch, rng) -> (state, metrics)` over all devices.

        `state` comes from `put_state`, `batch` from `put_batch`.

        `step_fn(state, batch, rng)` sees one device's batch `(per_device_batch, ...)`, the whole
        state and the same `rng` on every device (fold in `lax.axis_index("batch")` for
        per-device randomness). It must return a state and metrics that are identical on every
        device (`pmean` what differs); the mapped function returns them once.
        """
        donate = (0,) if donate_state else ()
        if self.mode == "pmap":
            return jax.pmap(
                step_fn,
                axis_name=AXIS_NAME,
                in_axes=(0, 0, None),
                devices=self._pmap_devices,
                donate_argnums=donate,
            )
        # check_vma=False keeps pmap's semantics inside the body: a gradient taken there w.r.t.
        # the replicated state is per device (no implicit psum), so the step's explicit pmean
        # is the one and only reduction in both modes.
        mapped = jax.shard_map(
            step_fn,
            mesh=self.mesh,
            in_specs=(P(), P(AXIS_NAME), P()),
            out_specs=(P(), P()),
            check_vma=False,
        )
        return jax.jit(mapped, donate_argnums=donate)

    def map_eval(self, eval_fn: Callable[[PyTree, PyTree], PyTree]) -> Callable:
        """Maps `eval_fn(state, batch) -> outputs` whose outputs keep the per-device batch axis.

        The returned function takes the device state and a host batch
        `(local_devices, per_device_batch, ...)` and returns host (numpy) outputs of this
        process shaped `(local_devices, per_device_batch, ...)`.
        """
        if self.mode == "pmap":
            mapped = jax.pmap(eval_fn, axis_name=AXIS_NAME, devices=self._pmap_devices)
            return lambda state, batch: jax.device_get(mapped(state, batch))
        mapped = jax.jit(
            jax.shard_map(
                eval_fn,
                mesh=self.mesh,
                in_specs=(P(), P(AXIS_NAME)),
                out_specs=P(AXIS_NAME),
                check_vma=False,
            )
        )
        return lambda state, batch: self._local_part(mapped(state, self.put_batch(batch)))

    def put_state(self, state: PyTree) -> PyTree:
        """Copies a host-side state to every device."""
        if self.mode == "pmap":
            stacked = jax.tree.map(
                lambda x: np.stack([np.asarray(x)] * self.num_local_devices), state
            )
            return jax.device_put(stacked, self._local_sharding)
        return jax.device_put(state, NamedSharding(self.mesh, P()))

    def get_state(self, state: PyTree) -> PyTree:
        """The device state as one host-side copy (numpy leaves), e.g. for checkpoints."""
        if self.mode == "pmap":
            return _first_local_copy(state)
        return jax.device_get(state)

    def get_metrics(self, metrics: PyTree) -> PyTree:
        """Metrics returned by a mapped step as host floats."""
        if self.mode == "pmap":
            metrics = _first_local_copy(metrics)
        return jax.tree.map(float, jax.device_get(metrics))

    def put_batch(self, batch: PyTree) -> PyTree:
        """Places a host batch `(local_devices, per_device_batch, ...)` on the devices."""
        if self.mode == "pmap":
            return jax.device_put(batch, self._local_sharding)
        sharding = NamedSharding(self.mesh, P(AXIS_NAME))
        return jax.tree.map(
            functools.partial(_to_global_array, sharding=sharding, local=self.num_local_devices),
            batch,
        )

    def _local_part(self, outputs: PyTree) -> PyTree:
        """This process's shards of globally sharded outputs, `(local_devices, b, ...)`."""

        def local_part(x):
            shards = sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0)
            return np.stack([np.asarray(s.data) for s in shards])

        return jax.tree.map(local_part, outputs)


def _first_local_copy(replicated: PyTree) -> PyTree:
    """Host copy of pmap outputs `(devices, ...)` that are equal on every device: device 0's.

    Copied straight from this process's first device, with no device program: indexing (`x[0]`)
    runs a program on all local devices per leaf, and with several processes XLA:CPU was seen to
    hang in such a program while another process waited in a global collective (orbax's barrier).
    """
    on_first_device = jax.device_get(jax.tree.map(lambda x: x.addressable_data(0), replicated))
    return jax.tree.map(lambda x: x[0], on_first_device)


def _to_global_array(x: np.ndarray, *, sharding: NamedSharding, local: int) -> jax.Array:
    if x.shape[0] != local:
        raise ValueError(
            f"Batch leaf of shape {x.shape} does not lead with the {local} local devices; "
            "ask the input pipeline for num_devices=jax.local_device_count()."
        )
    flat = x.reshape((x.shape[0] * x.shape[1],) + x.shape[2:])
    return jax.make_array_from_process_local_data(sharding, flat)
