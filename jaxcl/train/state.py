"""Train states: the pytrees that a step function consumes and returns.

`TrainState` serves every stage trained with one network (global/local contrastive pre-training,
fine-tuning). `ByolState` adds the target network, whose parameters follow the online ones by an
exponential moving average (docs/METHOD.md §6). Both are `flax.struct` dataclasses with the
optimiser `tx` as a static field, so they pass through `jit`/`pmap` and orbax as plain pytrees.
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

PyTree = Any


@flax.struct.dataclass
class TrainState:
    """Parameters, BatchNorm statistics and optimiser state of one network.

    Attributes:
      step: scalar int32, number of updates applied.
      params: trainable parameters (`{"encoder": ..., "decoder": ..., ...}`).
      batch_stats: BatchNorm moving statistics, same top-level paths as `params`.
      opt_state: state of `tx`.
      tx: the optax transformation (static: not a pytree leaf).
    """

    step: jax.Array
    params: PyTree
    batch_stats: PyTree
    opt_state: optax.OptState
    tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)

    @classmethod
    def create(
        cls, *, params: PyTree, batch_stats: PyTree, tx: optax.GradientTransformation
    ) -> TrainState:
        return cls(
            step=jnp.zeros((), jnp.int32),
            params=params,
            batch_stats=batch_stats,
            opt_state=tx.init(params),
            tx=tx,
        )

    def apply_gradients(self, grads: PyTree, batch_stats: PyTree) -> TrainState:
        """One optimiser update; `batch_stats` are the statistics the forward pass produced."""
        updates, opt_state = self.tx.update(grads, self.opt_state, self.params)
        return self.replace(
            step=self.step + 1,
            params=optax.apply_updates(self.params, updates),
            batch_stats=batch_stats,
            opt_state=opt_state,
        )


@flax.struct.dataclass
class ByolState:
    """BYOL online network (trained) and target network (EMA of the online one, docs/METHOD.md §6).

    Attributes:
      online: `TrainState` of encoder + projector + predictor.
      target_params: parameters of the target encoder + projector (same paths as the online
        network minus the predictor).
      target_batch_stats: the target's own BatchNorm statistics.
    """

    online: TrainState
    target_params: PyTree
    target_batch_stats: PyTree

    @property
    def step(self) -> jax.Array:
        return self.online.step

    def update_target(self, tau: jax.Array) -> ByolState:
        """ξ ← τ·ξ + (1-τ)·θ on the paths the target shares with the online network."""
        online_shared = {name: self.online.params[name] for name in self.target_params}
        new_target = optax.incremental_update(
            new_tensors=online_shared, old_tensors=self.target_params, step_size=1.0 - tau
        )
        return self.replace(target_params=new_target)
