"""Masked NT-Xent kernel and the global strategies G^R, G^{D-}, G^D (docs/METHOD.md §3-§4).

Every contrastive loss in jaxcl is the same kernel: L2-normalised embeddings, cosine similarities
divided by a temperature, and for each positive pair (a, b)

    ℓ(a, b) = -log( exp(s_ab) / (exp(s_ab) + Σ_k N_ak exp(s_ak)) ),

averaged over all positive pairs. The other positives of an anchor are *not* in its denominator.
The arithmetic runs in float32 with a masked, max-shifted log-sum-exp, so it neither overflows at
small temperatures nor produces non-finite gradients for degenerate inputs (identical or zero
embeddings, anchors without negatives).

Data parallelism (``axis_name`` set): embeddings and ids are all-gathered over the axis so that
positives and negatives span the global batch; each device scores its own anchors against the
gathered batch. See ``global_loss`` for the value/gradient convention a trainer relies on.
"""

import types
from collections.abc import Hashable

import jax
import jax.numpy as jnp

# The strategy table of docs/METHOD.md §4: positives share the first id (and are not the anchor
# itself), negatives differ in the second id.
_GLOBAL_STRATEGIES = types.MappingProxyType(
    {
        "GR": ("sample", "sample"),
        "GD-": ("sample", "partition"),
        "GD": ("partition", "partition"),
    }
)

# Squared-norm floor of the normalisation, as tf.nn.l2_normalize in the original code
# (docs/METHOD.md §3).
_NORM_EPSILON = 1e-12


def l2_normalize(x: jax.Array) -> jax.Array:
    """Returns `x / sqrt(max(|x|², 1e-12))` along the last axis, computed in float32.

    Zero vectors stay zero (with finite gradients) instead of becoming NaN.
    """
    x = x.astype(jnp.float32)
    squared_norm = jnp.sum(x * x, axis=-1, keepdims=True)
    return x * jax.lax.rsqrt(jnp.maximum(squared_norm, _NORM_EPSILON))


def masked_logsumexp(x: jax.Array, mask: jax.Array, axis: int = -1) -> jax.Array:
    """`log Σ exp(x)` over the entries where `mask` is True, along `axis`.

    Shifted by the (stop-gradient) masked maximum so large logits never overflow. A slice with no
    True entry gives -inf, with zero (finite) gradients: masked-out entries are replaced by -inf
    *before* the exponential, so no inf ever meets a zero cotangent.

    Args:
      x: logits of any shape.
      mask: boolean, broadcastable to `x.shape`.
      axis: the axis reduced.

    Returns:
      `x.shape` without `axis`.
    """
    mask = jnp.broadcast_to(mask, x.shape)
    has_entries = jnp.any(mask, axis=axis, keepdims=True)
    masked = jnp.where(mask, x, -jnp.inf)
    shift = jax.lax.stop_gradient(jnp.max(masked, axis=axis, keepdims=True))
    shift = jnp.where(has_entries, shift, 0.0)
    total = jnp.sum(jnp.exp(masked - shift), axis=axis, keepdims=True)
    safe_log = jnp.log(jnp.where(has_entries, total, 1.0))
    lse = jnp.where(has_entries, shift + safe_log, -jnp.inf)
    return jnp.squeeze(lse, axis=axis)


def _term_sums(
    anchors: jax.Array,
    candidates: jax.Array,
    positive_mask: jax.Array,
    negative_mask: jax.Array,
    temperature: float,
) -> tuple[jax.Array, jax.Array]:
    """Sum of the NT-Xent terms of `anchors` contrasted against `candidates`, and their count.

    Args:
      anchors: (A, D) L2-normalised float32 embeddings whose terms are computed.
      candidates: (C, D) L2-normalised float32 embeddings (positives and negatives are taken here).
      positive_mask: (A, C) bool, `P[a, b]`: (a, b) is a positive pair anchored at a.
      negative_mask: (A, C) bool, `N[a, k]`: k is a negative of anchor a.
      temperature: τ > 0.

    Returns:
      (sum of ℓ(a, b) over all positive pairs, number of positive pairs), float32 scalars.
    """
    # HIGHEST precision: logits are scaled by 1/τ (up to 100x), which would amplify the error of
    # reduced-precision matmul passes (TF32, bf16) by the same factor.
    logits = jnp.matmul(anchors, candidates.T, precision=jax.lax.Precision.HIGHEST) / temperature
    negative_lse = masked_logsumexp(logits, negative_mask, axis=1)  # (A,)
    has_negatives = jnp.any(negative_mask, axis=1, keepdims=True)
    # ℓ = log(1 + Σ_k exp(s_ak - s_ab)) = softplus(lse_k s_ak - s_ab); exactly 0 without negatives.
    safe_negative_lse = jnp.where(has_negatives, negative_lse[:, None], 0.0)
    terms = jnp.where(has_negatives, jax.nn.softplus(safe_negative_lse - logits), 0.0)
    term_sum = jnp.sum(jnp.where(positive_mask, terms, 0.0))
    return term_sum, jnp.sum(positive_mask, dtype=jnp.float32)


def nt_xent(
    z: jax.Array, positive_mask: jax.Array, negative_mask: jax.Array, temperature: float
) -> jax.Array:
    """Masked NT-Xent (docs/METHOD.md §3): mean of ℓ(a, b) over the positive pairs of one batch.

    Args:
      z: (M, D) embeddings (any float dtype; normalised and scored in float32).
      positive_mask: (M, M) bool, `P[a, b]`: b is a positive of anchor a (diagonal False).
      negative_mask: (M, M) bool, `N[a, k]`: k is a negative of anchor a (diagonal False).
      temperature: τ > 0 (the paper uses 0.1).

    Returns:
      float32 scalar. A batch without positive pairs gives 0 (with zero gradients); an anchor
      without negatives contributes ℓ = -log(exp(s)/exp(s)) = 0.
    """
    normalized = l2_normalize(z)
    term_sum, num_pairs = _term_sums(
        normalized, normalized, positive_mask, negative_mask, temperature
    )
    return term_sum / jnp.maximum(num_pairs, 1.0)


def _check_strategy(strategy: str) -> tuple[str, str]:
    if strategy not in _GLOBAL_STRATEGIES:
        raise ValueError(
            f"Unknown global contrastive strategy {strategy!r}; valid strategies are "
            f"{sorted(_GLOBAL_STRATEGIES)} (set e.g. config.pretrain_global.strategy)."
        )
    return _GLOBAL_STRATEGIES[strategy]


def _pair_masks(
    strategy: str,
    anchor_ids: dict[str, jax.Array],
    candidate_ids: dict[str, jax.Array],
) -> tuple[jax.Array, jax.Array]:
    """(A, C) positive and negative masks; ids dicts hold "sample", "partition" and "index"."""
    positive_key, negative_key = _check_strategy(strategy)

    def same(key: str) -> jax.Array:
        return anchor_ids[key][:, None] == candidate_ids[key][None, :]

    positive_mask = same(positive_key) & ~same("index")
    negative_mask = ~same(negative_key)
    return positive_mask, negative_mask


def global_masks(
    strategy: str, sample_ids: jax.Array, partition_ids: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Positive and negative masks of a global strategy (docs/METHOD.md §4).

    | strategy | positive P[a, b]           | negative N[a, k]     |
    |----------|----------------------------|----------------------|
    | "GR"     | same sample, a ≠ b         | different sample     |
    | "GD-"    | same sample, a ≠ b         | different partition  |
    | "GD"     | same partition, a ≠ b      | different partition  |

    Args:
      strategy: "GR", "GD-" or "GD".
      sample_ids: (M,) int, the source slice of each view.
      partition_ids: (M,) int, the volume partition of each view's slice.

    Returns:
      (positive_mask, negative_mask), both (M, M) bool.
    """
    ids = {
        "sample": jnp.asarray(sample_ids),
        "partition": jnp.asarray(partition_ids),
        "index": jnp.arange(len(sample_ids)),
    }
    return _pair_masks(strategy, ids, ids)


def global_loss(
    z: jax.Array,
    sample_ids: jax.Array,
    partition_ids: jax.Array,
    *,
    strategy: str,
    temperature: float,
    axis_name: Hashable | None = None,
) -> jax.Array:
    """Global contrastive loss (G^R, G^{D-} or G^D) of a batch of embeddings.

    Args:
      z: (M, D) g1 embeddings of this device's views.
      sample_ids: (M,) int, source slice of each view. Must be unique across the *global* batch
        (different slices never share an id, also on different devices).
      partition_ids: (M,) int, partition of each view's slice (shared meaning across devices).
      strategy: "GR", "GD-" or "GD" (see `global_masks`).
      temperature: τ > 0.
      axis_name: the data-parallel axis (pmap / shard_map), or None for a single device.

    Returns:
      float32 scalar: the loss of the global batch (the concatenation of all devices' batches in
      axis order), i.e. the sum of ℓ over all positive pairs of all devices divided by the global
      number of positive pairs — the same value on every device.

    Gradient convention under `axis_name` (what a data-parallel trainer relies on): each device
    differentiates its own anchors' terms, scaled by the axis size n, so that
    `pmean(grad(per-device loss))` over the axis equals the gradient of the single-device loss on
    the concatenated batch — exactly the usual `grads = jax.lax.pmean(grads, "batch")` step. The
    gradient w.r.t. this device's `z` is therefore n times that slice of the global gradient
    (the all_gather transpose sums every device's contribution back to the owner). The returned
    value is made equal on all devices with a stop-gradient correction, which does not change
    the gradient. Note: under `shard_map` with `check_vma=True`, gradients w.r.t. replicated
    parameters are already psum-ed by JAX, so divide them by n instead of pmean-ing.
    """
    if axis_name is None:
        positive_mask, negative_mask = global_masks(strategy, sample_ids, partition_ids)
        return nt_xent(z, positive_mask, negative_mask, temperature)

    num_local = z.shape[0]
    first_index = jax.lax.axis_index(axis_name) * num_local
    anchors = l2_normalize(z)
    anchor_ids = {
        "sample": sample_ids,
        "partition": partition_ids,
        "index": first_index + jnp.arange(num_local),
    }
    candidates = jax.lax.all_gather(anchors, axis_name, tiled=True)
    candidate_ids = {
        "sample": jax.lax.all_gather(sample_ids, axis_name, tiled=True),
        "partition": jax.lax.all_gather(partition_ids, axis_name, tiled=True),
        "index": jnp.arange(candidates.shape[0]),
    }
    positive_mask, negative_mask = _pair_masks(strategy, anchor_ids, candidate_ids)
    term_sum, num_pairs = _term_sums(anchors, candidates, positive_mask, negative_mask, temperature)
    return data_parallel_mean(term_sum, num_pairs, axis_name)


def data_parallel_mean(term_sum: jax.Array, num_terms: jax.Array, axis_name: Hashable) -> jax.Array:
    """Global mean of per-device term sums with the trainer's pmean-of-gradients convention.

    Args:
      term_sum: this device's sum of loss terms (differentiable).
      num_terms: this device's number of terms (no gradient needed).
      axis_name: the data-parallel axis.

    Returns:
      The global mean Σ_devices term_sum / Σ_devices num_terms on every device, whose gradient is
      that of `n · term_sum / Σ num_terms` (n = axis size), so that the pmean of the devices'
      gradients is the gradient of the global mean. Without terms anywhere it is 0.
    """
    total_terms = jnp.maximum(jax.lax.psum(num_terms, axis_name), 1.0)
    share = jax.lax.axis_size(axis_name) * term_sum / total_terms
    global_mean = jax.lax.psum(term_sum, axis_name) / total_terms
    return share + jax.lax.stop_gradient(global_mean - share)
