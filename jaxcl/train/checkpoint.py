"""Atomic, resumable checkpoints of one stage with orbax.

Each stage owns `WORKDIR/<stage>/checkpoints/`. orbax writes a step into a temporary folder and
renames it when complete, so a run killed mid-save leaves the previous checkpoint intact and the
half-written one is ignored on restart. A checkpoint holds the train state and a small JSON
dictionary (`meta`) for host-side values that must survive a restart (best validation score,
wall time, ...).

Folders may be local or `gs://` (orbax writes through `etils.epath`). With several processes,
every process calls `save`, `restore`, `export_variables` and `load_variables` at the same point
(orbax synchronises them): the state is replicated, so process 0 writes it and every process
reads it, and the folder must be shared by all of them (GCS, or one file system).
"""

from __future__ import annotations

from typing import Any

import jax
import orbax.checkpoint as ocp

from jaxcl import files

PyTree = Any


class StageCheckpointer:
    """Saves and restores `(state, meta)` pairs of one stage.

    Args:
      directory: folder of this stage's checkpoints (created if missing), local or `gs://`.
      max_to_keep: number of most recent checkpoints kept on disk.
    """

    def __init__(self, directory: files.PathLike, *, max_to_keep: int = 2):
        self.directory = files.path(directory)
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep,
                enable_async_checkpointing=False,
                cleanup_tmp_directories=True,
            ),
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state: PyTree, meta: dict[str, Any] | None = None) -> None:
        """Writes `state` (host-local, un-replicated arrays) and `meta` (JSON-serialisable)."""
        self._manager.save(
            int(step),
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta or {})
            ),
            force=True,
        )
        self._manager.wait_until_finished()

    def restore(self, template: PyTree, step: int | None = None) -> tuple[PyTree, dict[str, Any]]:
        """Restores the checkpoint at `step` (default: latest) into the structure of `template`.

        Raises:
          FileNotFoundError: when the folder holds no complete checkpoint.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"No checkpoint in {self.directory}.")
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()
            ),
        )
        return restored.state, dict(restored.meta or {})

    def close(self) -> None:
        self._manager.close()


def export_variables(directory: files.PathLike, variables: PyTree) -> None:
    """Writes a stage's final `{"params": ..., "batch_stats": ...}` for later stages (atomic)."""
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(files.path(directory), jax.device_get(variables), force=True)
    checkpointer.wait_until_finished()


def load_variables(directory: files.PathLike) -> PyTree:
    """Reads variables written by `export_variables` (numpy leaves, no template needed).

    Raises:
      FileNotFoundError: naming the folder, when it does not hold an export.
    """
    directory = files.path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(
            f"No exported stage variables in {directory}: run the stage that writes them first "
            "(list it in config.stages) or point the config at another workdir's export."
        )
    return ocp.StandardCheckpointer().restore(directory)
