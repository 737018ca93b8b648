"""Stage transfer: copy sub-networks from one stage's variables into another's, by path.

Every stage model names its networks `encoder` / `decoder/block{k}` (docs/METHOD.md §1), so the
encoder of global pre-training, or the first l decoder blocks of local pre-training, sit at the
same paths in the next stage's model. A transfer is a merge of pytrees under path prefixes, never
by position: the target's structure must contain exactly the source's arrays under each prefix,
with the same shapes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax.numpy as jnp

PyTree = Any
Path = tuple[str, ...]

COLLECTIONS = ("params", "batch_stats")


def _as_path(path: str | Sequence[str]) -> Path:
    parts = tuple(path.split("/")) if isinstance(path, str) else tuple(path)
    if not parts or not all(isinstance(part, str) and part for part in parts):
        raise ValueError(
            f"transfer path {path!r} must be a non-empty tuple of names such as ('encoder',) or "
            "('decoder', 'block1'), or a string such as 'decoder/block1'."
        )
    return parts


def _subtree(tree: PyTree, path: Path) -> PyTree | None:
    """The subtree of nested mappings at `path`, or None when the path does not exist."""
    for name in path:
        if not isinstance(tree, Mapping) or name not in tree:
            return None
        tree = tree[name]
    return tree


def _leaves(tree: PyTree, prefix: Path) -> dict[Path, Any]:
    """Flat `{path: array}` of nested mappings, paths starting with `prefix`."""
    if not isinstance(tree, Mapping):
        return {prefix: tree}
    flat = {}
    for name, child in tree.items():
        flat.update(_leaves(child, (*prefix, name)))
    return flat


def _replace(tree: Mapping, path: Path, value: PyTree) -> dict:
    """A copy of `tree` with the subtree at `path` replaced (copies only along the path)."""
    head, *rest = path
    new = dict(tree)
    new[head] = _replace(tree[head], tuple(rest), value) if rest else value
    return new


def _join(path: Path) -> str:
    return "/".join(path)


def _matching_subtree(target: PyTree, source: PyTree, path: Path) -> PyTree:
    """`source` cast to the target's dtypes, once it is known to hold the target's arrays.

    `path` ("collection", *prefix) locates both subtrees; error messages name it.
    """
    target_leaves, source_leaves = _leaves(target, path), _leaves(source, path)
    if target_leaves.keys() != source_leaves.keys():
        only_target = sorted(_join(p) for p in target_leaves.keys() - source_leaves.keys())
        only_source = sorted(_join(p) for p in source_leaves.keys() - target_leaves.keys())
        raise ValueError(
            f"Cannot transfer {_join(path)}: the two networks differ there (only in the "
            f"target: {only_target}; only in the source: {only_source}). Check that both stages "
            "use the same model.filters and decoder blocks."
        )
    for leaf_path, target_leaf in target_leaves.items():
        source_shape = jnp.shape(source_leaves[leaf_path])
        if source_shape != jnp.shape(target_leaf):
            raise ValueError(
                f"Cannot transfer {_join(leaf_path)}: source shape {source_shape} != target "
                f"shape {jnp.shape(target_leaf)}. The stages were built with different model "
                "sizes (model.filters, data.image_size for g1); use the same configuration."
            )
    return _with_dtypes(target, source)


def _with_dtypes(target: PyTree, source: PyTree) -> PyTree:
    """`source` as arrays with the dtypes of the same-structured `target`."""
    if isinstance(target, Mapping):
        return {name: _with_dtypes(target[name], source[name]) for name in target}
    return jnp.asarray(source, dtype=jnp.result_type(target))


def transfer_params(
    target_variables: Mapping[str, PyTree],
    source_variables: Mapping[str, PyTree],
    paths: Sequence[str | Sequence[str]],
) -> tuple[dict, list[str]]:
    """Copies the sub-networks under `paths` from `source_variables` into `target_variables`.

    Both `params` and `batch_stats` are transferred: under each path prefix the source's arrays
    replace the target's. A path must exist in the source's and target's `params`; a path that
    has BatchNorm statistics in one network must have them in the other. Everything outside the
    paths is left as it was in the target.

    Args:
      target_variables: `{"params": ..., "batch_stats": ...}` of the model being initialised
        (e.g. a freshly initialised UNet).
      source_variables: the same collections of the stage transferred from (e.g. a restored
        global pre-training state; numpy or jax leaves).
      paths: path prefixes, tuples such as `("encoder",)`, `("decoder", "block1")`, or strings
        such as `"decoder/block1"`.

    Returns:
      (new target variables, the transferred array paths as "collection/a/b/..." strings).

    Raises:
      ValueError: a path missing from either network, or arrays that differ in name or shape
        (the message names the path and both shapes).
    """
    new_variables = {name: target_variables[name] for name in target_variables}
    transferred = []
    for path in map(_as_path, paths):
        for collection in COLLECTIONS:
            target = _subtree(target_variables.get(collection, {}), path)
            source = _subtree(source_variables.get(collection, {}), path)
            if target is None and source is None and collection != "params":
                continue
            if target is None or source is None:
                where = "target" if target is None else "source"
                raise ValueError(
                    f"Cannot transfer {collection}/{_join(path)}: the {where} network has no "
                    f"such path. Transferable paths start with 'encoder' or 'decoder/block<k>' "
                    f"(k up to the decoder blocks the source stage trained)."
                )
            merged = _matching_subtree(target, source, (collection, *path))
            new_variables[collection] = _replace(new_variables[collection], path, merged)
            transferred += sorted(_join(p) for p in _leaves(source, (collection, *path)))
    return new_variables, transferred
