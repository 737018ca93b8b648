"""Schedules of training hyper-parameters that change with the step."""

import jax
import jax.numpy as jnp


def byol_tau(step: jax.typing.ArrayLike, total_steps: int, base: float) -> jax.Array:
    """BYOL target decay rate `τ_k = 1 - (1 - τ_base)·(cos(πk/K) + 1)/2` (docs/METHOD.md §6).

    τ rises from `base` at k = 0 to 1 at k = K along a half cosine. The target parameters are then
    updated as `optax.incremental_update(new_tensors=online, old_tensors=target,
    step_size=1 - τ)`, i.e. `ξ ← τ·ξ + (1 - τ)·θ`.

    Args:
      step: the current step k, a Python or traced integer; values outside [0, K] are clipped, so
        τ stays 1 after the last step.
      total_steps: K > 0, the number of training steps.
      base: τ_base in [0, 1], e.g. 0.996.

    Returns:
      Scalar float32 τ_k.
    """
    if total_steps <= 0:
        raise ValueError(
            f"byol_tau: total_steps must be positive, got {total_steps}; pass the number of "
            "training steps of the BYOL stage."
        )
    if not 0.0 <= base <= 1.0:
        raise ValueError(
            f"byol_tau: base must be in [0, 1], got {base}; pass the BYOL base decay rate "
            "τ_base (BYOL uses 0.996)."
        )
    progress = jnp.clip(jnp.asarray(step, jnp.float32), 0.0, total_steps) / total_steps
    return 1.0 - (1.0 - base) * (jnp.cos(jnp.pi * progress) + 1.0) / 2.0
