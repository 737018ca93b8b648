"""Workdir files on a local disk or on Google Cloud Storage (`gs://bucket/run`).

Everything jaxcl writes into a workdir goes through `etils.epath`, which orbax uses too: local
paths take the `os` functions, `gs://` paths `tf.io.gfile`. Writes that a reader must never see
half done go to a temporary file that is then renamed over the target; on GCS a rename is a copy
and a delete, so a reader sees either the old object or the new one.
"""

from __future__ import annotations

import os

from etils import epath

PathLike = str | os.PathLike


def path(location: PathLike) -> epath.Path:
    """`location` as an absolute `epath.Path`; URIs such as `gs://bucket/run` are kept as given."""
    location = epath.Path(location)
    return location if location.is_absolute() else location.absolute()


def write_atomically(location: PathLike, data: str | bytes) -> None:
    """Writes `data` (text as UTF-8) to `location` via a temporary file, creating the folder."""
    target = path(location)
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.parent / (target.name + ".tmp")
    if isinstance(data, str):
        temporary.write_text(data, encoding="utf-8")
    else:
        temporary.write_bytes(data)
    temporary.replace(target)
