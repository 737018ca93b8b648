"""Train-state updates against hand-computed optimiser and EMA steps."""

import jax.numpy as jnp
import numpy as np
import optax

from jaxcl.train.state import ByolState, TrainState


def test_apply_gradients_is_one_sgd_step_and_replaces_batch_stats():
    state = TrainState.create(
        params={"w": jnp.array([1.0, -2.0])}, batch_stats={"m": jnp.zeros(2)}, tx=optax.sgd(0.5)
    )
    new = state.apply_gradients({"w": jnp.array([2.0, 4.0])}, {"m": jnp.ones(2)})
    np.testing.assert_allclose(new.params["w"], [1.0 - 0.5 * 2.0, -2.0 - 0.5 * 4.0])
    np.testing.assert_array_equal(new.batch_stats["m"], [1.0, 1.0])
    assert int(new.step) == 1


def test_byol_target_is_ema_of_shared_online_paths():
    online = TrainState.create(
        params={"encoder": {"w": jnp.array([1.0])}, "predictor": {"w": jnp.array([5.0])}},
        batch_stats={},
        tx=optax.sgd(0.1),
    )
    state = ByolState(
        online=online, target_params={"encoder": {"w": jnp.array([3.0])}}, target_batch_stats={}
    )
    new = state.update_target(jnp.asarray(0.75))
    # ξ' = τ ξ + (1 - τ) θ = 0.75 * 3 + 0.25 * 1 = 2.5; the predictor has no target copy.
    np.testing.assert_allclose(new.target_params["encoder"]["w"], [2.5])
    assert set(new.target_params) == {"encoder"}
