"""Local (region-level) contrastive loss L^R / L^D (docs/METHOD.md §5), region positions.

A region is one position of one view's decoder feature map, embedded to D dimensions. Regions are
grouped by the view's source slice (L^R) or partition (L^D); within a group, the regions at the
same position in different views are positives and the regions at other positions are negatives.
Groups are independent, so the views are sorted into a dense (groups, views, positions, D) tensor
and the NT-Xent kernel runs vectorised over groups, never on a matrix of all regions of the batch.
With negatives="all" (any number of positions, e.g. a dense grid) the group's similarities are
computed in blocks of anchor positions, each block against all regions of the group, so memory
stays linear in the number of regions; with negatives="paper" (17 positions) the whole
(groups, views, anchor positions, views, positions) tensor is small and built at once.
"""

import functools
import types
from collections.abc import Hashable

import jax
import jax.numpy as jnp
import numpy as np

from jaxcl.losses import region_kernel
from jaxcl.losses.contrastive import data_parallel_mean, l2_normalize, masked_logsumexp

# The paper's 17 positions (docs/METHOD.md §5) as (row, column) letters: a = 0, q = w//4,
# m = w//2, t = (3w)//4, e = w with w = H_l - 4. The first 13 are anchors; the last 4 are
# negatives only.
PAPER_POSITION_NAMES = (
    "aa",
    "am",
    "ae",
    "ma",
    "mm",
    "me",
    "ea",
    "em",
    "ee",
    "qq",
    "qt",
    "tq",
    "tt",
) + ("qm", "mq", "mt", "tm")
PAPER_NUM_ANCHORS = 13

_PAPER_NEGATIVE_NAMES = (
    "am qq qm ma mq",
    "aa ae qq qt mm",
    "am qm qt mt me",
    "aa qq mm ea tq",
    "qq qt tq tt ma",
    "ae mm ee qt tt",
    "ma mq em tq tm",
    "mm ea ee tq tt",
    "mt me em tt tm",
    "aa am ma mm qt",
    "am ae qq mm me",
    "ma mm ea em tt",
    "mm me em ee tq",
)
# (13, 5): for anchor position j, the 5 indices into PAPER_POSITION_NAMES used as its negatives
# with negatives="paper" (the original code's fixed list, docs/METHOD.md §5).
PAPER_NEGATIVE_POSITIONS = tuple(
    tuple(PAPER_POSITION_NAMES.index(name) for name in row.split()) for row in _PAPER_NEGATIVE_NAMES
)

# Group of a view per local strategy, and whether one group may span data-parallel devices
# (a partition does: every device holds slices of every partition; a slice does not).
_LOCAL_STRATEGIES = types.MappingProxyType({"LR": ("sample", False), "LD": ("partition", True)})
# The region layouts (`region_positions` kind) and negatives of `local_loss`.
POSITION_KINDS = ("paper", "grid")
NEGATIVES = ("all", "paper")


def region_positions(
    feature_size: int, kind: str = "paper", grid_size: int | None = None
) -> np.ndarray:
    """Origins (top-left corners) of the 3x3 regions read from an (H_l, H_l) feature map.

    Args:
      feature_size: H_l, the side of the square feature map (48 for l = 3 and 192² inputs).
      kind: "paper": the 13 anchor positions of docs/METHOD.md §5 followed by the 4 negative-only
        positions (q,m) (m,q) (m,t) (t,m), in `PAPER_POSITION_NAMES` order; "grid": a grid_size x
        grid_size grid of origins equally spaced over 0..H_l-3 (row-major, origin k of an axis
        at k·(H_l-3) // (grid_size-1)).
      grid_size: K for kind="grid", 2 <= K <= H_l - 2 (distinct origins).

    Returns:
      (R, 2) int32 (row, column) origins; R = 17 ("paper") or K² ("grid").
    """
    if kind == "paper":
        if grid_size is not None:
            raise ValueError("region_positions: grid_size is only used with kind='grid'.")
        if feature_size < 8:
            raise ValueError(
                f"region_positions: feature_size={feature_size} is too small for the paper's "
                "positions (they coincide below 8); use more decoder blocks or kind='grid'."
            )
        w = feature_size - 4
        coordinate = {"a": 0, "q": w // 4, "m": w // 2, "t": (3 * w) // 4, "e": w}
        return np.array(
            [[coordinate[row], coordinate[col]] for row, col in PAPER_POSITION_NAMES], np.int32
        )
    if kind == "grid":
        if grid_size is None or not 2 <= grid_size <= feature_size - 2:
            raise ValueError(
                f"region_positions: kind='grid' needs 2 <= grid_size <= feature_size - 2 = "
                f"{feature_size - 2}, got grid_size={grid_size}."
            )
        origins = np.arange(grid_size) * (feature_size - 3) // (grid_size - 1)
        rows, cols = np.meshgrid(origins, origins, indexing="ij")
        return np.stack([rows.ravel(), cols.ravel()], axis=-1).astype(np.int32)
    raise ValueError(f"region_positions: unknown kind {kind!r}; valid kinds are {POSITION_KINDS}.")


def _negative_position_mask(negatives: str, num_anchors: int, num_positions: int) -> np.ndarray:
    """(A, R) bool: position r may hold negatives of anchor position j."""
    if negatives == "all":
        return np.arange(num_anchors)[:, None] != np.arange(num_positions)[None, :]
    mask = np.zeros((num_anchors, num_positions), bool)
    for anchor, negative_positions in enumerate(PAPER_NEGATIVE_POSITIONS):
        mask[anchor, list(negative_positions)] = True
    return mask


def _resolve_num_anchors(negatives: str, num_anchors: int | None, num_positions: int) -> int:
    if negatives not in NEGATIVES:
        raise ValueError(f"local_loss: unknown negatives={negatives!r}; valid: {NEGATIVES}.")
    if negatives == "paper":
        if num_positions != len(PAPER_POSITION_NAMES) or num_anchors not in (None, 13):
            raise ValueError(
                "local_loss: negatives='paper' needs the 17 paper positions "
                "(region_positions(kind='paper')) with the first 13 as anchors; got "
                f"{num_positions} positions and num_anchors={num_anchors}."
            )
        return PAPER_NUM_ANCHORS
    if num_positions < 2:
        raise ValueError("local_loss: at least 2 positions are needed (negatives are positions).")
    num_anchors = num_positions if num_anchors is None else num_anchors
    if not 1 <= num_anchors <= num_positions:
        raise ValueError(
            f"local_loss: num_anchors={num_anchors} must be in [1, {num_positions}] (positions)."
        )
    return num_anchors


def _resolve_views_per_group(group_ids: jax.Array, views_per_group: int | None, key: str) -> int:
    """The static group size: checked against concrete ids, required when ids are traced."""
    try:
        concrete_ids = np.asarray(group_ids)
    except jax.errors.TracerArrayConversionError:
        if views_per_group is None:
            raise ValueError(
                "local_loss: under jit/pmap the group size cannot be read from traced ids; pass "
                f"views_per_group (static, e.g. with functools.partial): the number of views "
                f"per {key} id in this device's batch."
            ) from None
        return views_per_group
    _, counts = np.unique(concrete_ids, return_counts=True)
    if np.any(counts != counts[0]) or views_per_group not in (None, counts[0]):
        raise ValueError(
            f"local_loss: every {key} id must have the same number of views "
            f"(views_per_group={views_per_group}); got counts {sorted(set(counts.tolist()))}. "
            "Build local batches with equal views per slice / partition."
        )
    return int(counts[0])


def _sort_into_groups(
    regions: jax.Array, group_ids: jax.Array, view_index: jax.Array, views_per_group: int
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Sorts views by group id into (G, views_per_group, ...) blocks.

    Returns:
      grouped regions (G, Vg, R, D), group id per block (G,), view index (G, Vg), and a bool
      scalar telling whether every block holds exactly one whole group (the layout is valid).
    """
    order = jnp.argsort(group_ids, stable=True)
    num_groups = group_ids.shape[0] // views_per_group

    def grouped(x: jax.Array) -> jax.Array:
        return x[order].reshape(num_groups, views_per_group, *x.shape[1:])

    ids = grouped(group_ids)
    # Each block must be one whole group: a single id inside, a new id in the next block.
    valid = jnp.all(ids == ids[:, :1]) & jnp.all(ids[1:, 0] > ids[:-1, 0])
    return grouped(regions), ids[:, 0], grouped(view_index), valid


def _local_term_sums(
    anchors: jax.Array,
    anchor_index: jax.Array,
    candidates: jax.Array,
    candidate_index: jax.Array,
    position_mask: np.ndarray,
    negatives: str,
    temperature: float,
) -> tuple[jax.Array, jax.Array]:
    """Sum and count of the NT-Xent terms of all anchor regions, group by group.

    Args:
      anchors: (G, Va, R, D) normalised regions whose first A positions are anchors.
      anchor_index: (G, Va) global view index of each anchor view.
      candidates: (G, Vc, R, D) normalised regions of the same groups (positives, negatives).
      candidate_index: (G, Vc) global view index of each candidate view.
      position_mask: (A, R) bool, negative positions of each anchor position.
      negatives: "all" (negatives in every view of the group) or "paper" (only in the anchor's
        view and the positive's view).
      temperature: τ.
    """
    num_anchors = position_mask.shape[0]
    anchor_regions = anchors[:, :, :num_anchors]
    is_pair = anchor_index[:, :, None] != candidate_index[:, None, :]  # (G, Va, Vc)
    num_pairs = num_anchors * jnp.sum(is_pair, dtype=jnp.float32)
    if negatives == "all":
        num_groups, anchor_views, _, _ = anchors.shape
        _, candidate_views, num_positions, _ = candidates.shape
        chunk = region_kernel.position_chunk_size(
            num_anchors,
            num_groups * anchor_views * candidate_views * num_positions,
            region_kernel.CHUNK_ELEMENTS,
        )
        term_sum = region_kernel.all_negatives_term_sum(
            anchor_regions, candidates, is_pair, temperature, chunk
        )
        return term_sum, num_pairs
    einsum = functools.partial(jnp.einsum, precision=jax.lax.Precision.HIGHEST)
    # s[g, v, j, w]: anchor (v, j) against the same position j in view w.
    positive_logits = (
        einsum("gvjd,gwjd->gvjw", anchor_regions, candidates[:, :, :num_anchors]) / temperature
    )
    # s[g, v, j, w, r]: anchor (v, j) against position r of view w; s[g, v, j, r] in view v.
    logits = einsum("gvjd,gwrd->gvjwr", anchor_regions, candidates) / temperature
    per_view_negative_lse = masked_logsumexp(logits, position_mask[:, None, :], axis=-1)
    own_logits = einsum("gvjd,gvrd->gvjr", anchor_regions, anchors) / temperature
    own_negative_lse = masked_logsumexp(own_logits, position_mask, axis=-1)
    negative_lse = jnp.logaddexp(own_negative_lse[..., None], per_view_negative_lse)
    terms = jax.nn.softplus(negative_lse - positive_logits)  # (G, Va, A, Vc)
    is_pair = jnp.broadcast_to(is_pair[:, :, None, :], terms.shape)
    return jnp.sum(jnp.where(is_pair, terms, 0.0)), num_pairs


def local_loss(
    regions: jax.Array,
    sample_ids: jax.Array,
    partition_ids: jax.Array,
    *,
    strategy: str,
    temperature: float,
    negatives: str = "all",
    num_anchors: int | None = None,
    views_per_group: int | None = None,
    axis_name: Hashable | None = None,
) -> jax.Array:
    """Local contrastive loss L^R / L^D (docs/METHOD.md §5): mean of ℓ over positive region pairs.

    For an anchor region (view v, position j < num_anchors) of group g:
    positives: position j in every other view of g; negatives: "all": every other position in
    every view of g (the anchor's own view included); "paper": the 5 positions of
    `PAPER_NEGATIVE_POSITIONS[j]`, in the anchor's view and the positive's view (10 negatives).

    Args:
      regions: (V, R, D) region embeddings of this device's V views at R positions.
      sample_ids: (V,) int, source slice of each view; unique across the global batch.
      partition_ids: (V,) int, partition of each view's slice.
      strategy: "LR" (group = sample id) or "LD" (group = partition id).
      temperature: τ > 0.
      negatives: "all" or "paper" (needs the 17 `region_positions(kind="paper")` positions).
      num_anchors: the first num_anchors positions are anchors; default all (13 for "paper").
      views_per_group: number of views per group id in this device's batch (LR: views per
        slice; LD: slices per partition x views per slice). Static; required under jit/pmap,
        inferred from (and checked against) concrete ids otherwise. Every group must have it.
      axis_name: the data-parallel axis, or None. LR groups stay on their device (no gather);
        LD groups span devices: regions and ids are all-gathered, and every device must hold
        views_per_group views of every partition.

    Returns:
      float32 scalar, the loss of the global batch, equal on every device; gradients follow the
      `global_loss` convention (pmean of per-device gradients = single-device gradient on the
      concatenated batch). Differentiable in reverse mode (grad, vjp); with negatives="all" the
      gradients come from a custom VJP, so forward mode (jvp, jacfwd) is not supported. Under
      jit, a batch whose groups do not all have views_per_group views (or, for LD, whose
      devices do not hold the same partitions) gives NaN: it cannot raise.
    """
    if strategy not in _LOCAL_STRATEGIES:
        raise ValueError(
            f"Unknown local contrastive strategy {strategy!r}; valid strategies are "
            f"{sorted(_LOCAL_STRATEGIES)} (set e.g. config.pretrain_local.strategy)."
        )
    group_key, groups_span_devices = _LOCAL_STRATEGIES[strategy]
    num_views, num_positions, _ = regions.shape
    num_anchors = _resolve_num_anchors(negatives, num_anchors, num_positions)
    group_ids = sample_ids if group_key == "sample" else partition_ids
    views_per_group = _resolve_views_per_group(group_ids, views_per_group, group_key)
    group_ids = jnp.asarray(group_ids)
    if num_views % views_per_group:
        raise ValueError(
            f"local_loss: {num_views} views cannot form groups of views_per_group="
            f"{views_per_group}; check the local batch layout."
        )

    normalized = l2_normalize(regions)
    view_index = jnp.arange(num_views)
    gather = axis_name is not None and groups_span_devices
    if gather:
        view_index = view_index + jax.lax.axis_index(axis_name) * num_views
    anchors, anchor_groups, anchor_index, valid = _sort_into_groups(
        normalized, group_ids, view_index, views_per_group
    )
    candidates, candidate_index = anchors, anchor_index
    if gather:
        all_regions, all_group_ids = (
            jax.lax.all_gather(x, axis_name, tiled=True) for x in (normalized, group_ids)
        )
        candidates, candidate_groups, candidate_index, candidates_valid = _sort_into_groups(
            all_regions,
            all_group_ids,
            jnp.arange(all_group_ids.shape[0]),
            views_per_group * jax.lax.axis_size(axis_name),
        )
        valid &= candidates_valid & jnp.all(candidate_groups == anchor_groups)

    position_mask = _negative_position_mask(negatives, num_anchors, num_positions)
    term_sum, num_pairs = _local_term_sums(
        anchors, anchor_index, candidates, candidate_index, position_mask, negatives, temperature
    )
    if axis_name is None:
        loss = term_sum / jnp.maximum(num_pairs, 1.0)
    else:
        loss = data_parallel_mean(term_sum, num_pairs, axis_name)
    return jnp.where(valid, loss, jnp.nan)
