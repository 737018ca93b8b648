"""Blocked kernel of the local loss with negatives="all", for many positions (docs/METHOD.md §5).

With negatives="all" the negatives of anchor region (v, j) are every region of its group at a
position other than j, the same set for all its positives, so each anchor needs one masked
log-sum-exp over its group's regions. For dense grids that is a (V·R) x (V·R) similarity matrix
per group; this kernel walks it in blocks of anchor positions (`lax.scan`) so that peak memory is
one block, and returns the gradients from the same pass through a custom VJP (reverse mode
only).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

# Upper bound on the elements of one chunk's (G, Va, chunk, Vc·R) similarity block with
# negatives="all": peak memory grows with it, matmul efficiency too (see all_negatives_term_sum).
CHUNK_ELEMENTS = 2**23


def position_chunk_size(num_anchors: int, elements_per_position: int, chunk_elements: int) -> int:
    """Anchor positions per chunk: at least 1, at most what fits in chunk_elements, and the
    chunks as even as possible (the last one is padded)."""
    num_chunks = -(-num_anchors // max(1, chunk_elements // elements_per_position))
    return -(-num_anchors // num_chunks)


def _split_positions(x: jax.Array, chunk: int) -> jax.Array:
    """(G, V, A, D) -> (A_pad // chunk, G, V, chunk, D), positions zero-padded to A_pad."""
    num_groups, num_views, num_positions, dim = x.shape
    num_chunks = -(-num_positions // chunk)
    padding = ((0, 0), (0, 0), (0, num_chunks * chunk - num_positions), (0, 0))
    chunks = jnp.pad(x, padding).reshape(num_groups, num_views, num_chunks, chunk, dim)
    return jnp.moveaxis(chunks, 2, 0)


def _join_positions(chunks: jax.Array, num_positions: int) -> jax.Array:
    """Inverse of `_split_positions`: (n, G, V, chunk, D) -> (G, V, num_positions, D)."""
    num_chunks, num_groups, num_views, chunk, dim = chunks.shape
    joined = jnp.moveaxis(chunks, 0, 2).reshape(num_groups, num_views, num_chunks * chunk, dim)
    return joined[:, :, :num_positions]


def _all_negatives_pass(
    anchor_regions: jax.Array,
    candidates: jax.Array,
    is_pair: jax.Array,
    temperature: float,
    chunk: int,
    with_gradients: bool,
) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
    """Sum of the NT-Xent terms with negatives="all", and optionally its gradients, chunk by chunk.

    The negatives of anchor (v, j) are every region of its group at a position r != j, the same
    set for all its positives: one masked log-sum-exp per anchor row of the (Va·A) x (Vc·R)
    similarity matrix. Rows are processed `chunk` anchor positions at a time (lax.scan), so only
    a (G, Va, chunk, Vc·R) block is ever alive. Once a block's log-sum-exp is known, the block
    also yields the gradient of its terms (softmax weights times dℓ/d lse), so with
    `with_gradients` the gradients come out of the same pass (3 matmuls per block instead of the
    4 of a rematerialised backward pass).

    Args:
      anchor_regions: (G, Va, A, D) normalised anchor regions.
      candidates: (G, Vc, R, D) normalised regions of the same groups, A <= R.
      is_pair: (G, Va, Vc) bool, anchor view v and candidate view w form positive pairs.
      temperature: τ.
      chunk: anchor positions per block.
      with_gradients: also return d(term sum) / d(anchor_regions, candidates).

    Returns:
      term sum (float32 scalar) and, with_gradients, the gradients ((G, Va, A, D), (G, Vc, R, D)).
    """
    einsum = functools.partial(jnp.einsum, precision=jax.lax.Precision.HIGHEST)
    num_groups, candidate_views, num_positions, dim = candidates.shape
    num_anchors = anchor_regions.shape[2]
    flat_candidates = candidates.reshape(num_groups, candidate_views * num_positions, dim)
    candidate_position = np.tile(np.arange(num_positions), candidate_views)
    # Scaling the anchors by 1/τ (not the logits) keeps the division off the big block.
    anchor_chunks = _split_positions(anchor_regions / temperature, chunk)
    positive_chunks = _split_positions(candidates[:, :, :num_anchors], chunk)
    positions = np.arange(anchor_chunks.shape[0] * chunk).reshape(-1, chunk)

    def block(candidate_grad, inputs):
        anchor, positive, position = inputs  # (G, Va, c, D), (G, Vc, c, D), (c,)
        logits = einsum("gvjd,gkd->gvjk", anchor, flat_candidates)  # (G, Va, c, Vc·R)
        is_negative = position[:, None] != candidate_position
        masked = jnp.where(is_negative, logits, -jnp.inf)
        # Every row has negatives (R >= 2): the max is finite and no exp overflows.
        shift = jnp.max(masked, axis=-1, keepdims=True)
        weights = jnp.exp(masked - shift)
        total = jnp.sum(weights, axis=-1)
        negative_lse = shift[..., 0] + jnp.log(total)  # (G, Va, c)
        positive_logits = einsum("gvjd,gwjd->gvjw", anchor, positive)  # (G, Va, c, Vc)
        pairs = is_pair[:, :, None, :] & (position < num_anchors)[:, None]
        margin = negative_lse[..., None] - positive_logits
        term_sum = jnp.sum(jnp.where(pairs, jax.nn.softplus(margin), 0.0))
        if not with_gradients:
            return candidate_grad, (term_sum, None, None)
        # dℓ/d lse = -dℓ/d s_pos = sigmoid(lse - s_pos), and d lse / d s_k = weights_k / total:
        # the block's logits gradient is weights scaled per row, so the row scale is applied to
        # the small operands instead of the big block.
        lse_grad = jnp.where(pairs, jax.nn.sigmoid(margin), 0.0)  # (G, Va, c, Vc)
        row_scale = (jnp.sum(lse_grad, axis=-1) / total)[..., None]  # (G, Va, c, 1)
        anchor_grad = (
            row_scale * einsum("gvjk,gkd->gvjd", weights, flat_candidates)
            - einsum("gvjw,gwjd->gvjd", lse_grad, positive)
        ) / temperature
        # Accumulated transposed, (G, D, Vc·R): this contraction reads the block in its stored
        # layout (no transpose of the big block; about 2x faster on CPU).
        candidate_grad = candidate_grad + einsum("gvjd,gvjk->gdk", row_scale * anchor, weights)
        positive_grad = -einsum("gvjw,gvjd->gwjd", lse_grad, anchor)
        return candidate_grad, (term_sum, anchor_grad, positive_grad)

    candidate_grad, (term_sums, anchor_grads, positive_grads) = jax.lax.scan(
        block,
        jnp.zeros_like(jnp.swapaxes(flat_candidates, 1, 2)),
        (anchor_chunks, positive_chunks, positions),
        unroll=len(positions) == 1,
    )
    if not with_gradients:
        return jnp.sum(term_sums), None
    candidate_grad = jnp.swapaxes(candidate_grad, 1, 2).reshape(candidates.shape)
    candidate_grad = candidate_grad.at[:, :, :num_anchors].add(
        _join_positions(positive_grads, num_anchors)
    )
    return jnp.sum(term_sums), (_join_positions(anchor_grads, num_anchors), candidate_grad)


def all_negatives_term_sum(
    anchor_regions: jax.Array,
    candidates: jax.Array,
    is_pair: jax.Array,
    temperature: float,
    chunk: int,
) -> jax.Array:
    """Term sum of `_all_negatives_pass`, differentiable (gradients from its forward pass).

    Computed in float32 whatever the regions' dtype (bfloat16 regions are cast on entry, so the
    similarities, log-sum-exp and gradients are float32); the gradients reach the regions in
    their own dtype through the cast.

    Args:
      anchor_regions: (G, Va, A, D) normalised anchor regions.
      candidates: (G, Vc, R, D) normalised regions of the same groups, A <= R.
      is_pair: (G, Va, Vc) bool, anchor view v and candidate view w form positive pairs.
      temperature: τ.
      chunk: anchor positions per block.

    Returns:
      float32 scalar.
    """
    return _float32_term_sum(
        anchor_regions.astype(jnp.float32),
        candidates.astype(jnp.float32),
        is_pair,
        temperature,
        chunk,
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _float32_term_sum(
    anchor_regions: jax.Array,
    candidates: jax.Array,
    is_pair: jax.Array,
    temperature: float,
    chunk: int,
) -> jax.Array:
    return _all_negatives_pass(anchor_regions, candidates, is_pair, temperature, chunk, False)[0]


def _float32_term_sum_fwd(anchor_regions, candidates, is_pair, temperature, chunk):
    # The residuals are the gradients themselves: the backward pass only scales them.
    return _all_negatives_pass(anchor_regions, candidates, is_pair, temperature, chunk, True)


def _float32_term_sum_bwd(temperature, chunk, gradients, term_sum_cotangent):
    del temperature, chunk
    anchor_grad, candidate_grad = gradients
    return term_sum_cotangent * anchor_grad, term_sum_cotangent * candidate_grad, None


_float32_term_sum.defvjp(_float32_term_sum_fwd, _float32_term_sum_bwd)
