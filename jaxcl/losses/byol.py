"""BYOL regression loss (docs/METHOD.md §6): the online prediction regresses the target projection.

For one example the loss is the squared distance of the two L2-normalised vectors,
`|q̂ - ẑ|² = 2 - 2·cos(q, z)`. The batch loss is symmetrised over the two views: view 1's
prediction regresses view 2's target projection and vice versa, and the sum is averaged over the
batch. The target side never receives gradients (`jax.lax.stop_gradient` is applied here, so a
caller cannot forget it).
"""

import jax
import jax.numpy as jnp

from jaxcl.losses.contrastive import l2_normalize


def regression_loss(prediction: jax.Array, target: jax.Array) -> jax.Array:
    """Per-example BYOL loss `2 - 2·cos(prediction, stop_gradient(target))`.

    Args:
      prediction: (B, D) online predictions q_θ(z_θ(v)), any float dtype.
      target: (B, D) target projections z_ξ(v') of the other view; no gradient flows into it.

    Returns:
      (B,) float32 losses in [0, 4].
    """
    if prediction.shape != target.shape or prediction.ndim != 2:
        raise ValueError(
            "byol.regression_loss expects prediction and target of the same shape (B, D), "
            f"got {prediction.shape} and {target.shape}; check that the online predictor and "
            "the target projector have the same output size."
        )
    target = jax.lax.stop_gradient(target)
    cosine = jnp.sum(l2_normalize(prediction) * l2_normalize(target), axis=-1)
    return 2.0 - 2.0 * cosine


def symmetric_loss(
    online_predictions_view1: jax.Array,
    online_predictions_view2: jax.Array,
    target_projections_view1: jax.Array,
    target_projections_view2: jax.Array,
    *,
    axis_name: str | None = None,
) -> jax.Array:
    """Symmetrised BYOL loss: batch mean of `loss(q1, sg(z'2)) + loss(q2, sg(z'1))`.

    Args:
      online_predictions_view1: (B, D) online predictions q1 for view 1.
      online_predictions_view2: (B, D) online predictions q2 for view 2.
      target_projections_view1: (B, D) target projections z'1 for view 1.
      target_projections_view2: (B, D) target projections z'2 for view 2.
      axis_name: when given (inside pmap/shard_map), the per-device means are averaged over this
        axis, which equals the global batch mean when every device holds the same batch size.

    Returns:
      Scalar float32 loss in [0, 8].
    """
    per_example = regression_loss(
        online_predictions_view1, target_projections_view2
    ) + regression_loss(online_predictions_view2, target_projections_view1)
    loss = jnp.mean(per_example)
    if axis_name is not None:
        loss = jax.lax.pmean(loss, axis_name)
    return loss
