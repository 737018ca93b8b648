"""BYOL target decay schedule (docs/METHOD.md §6) and its use with optax.incremental_update."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxcl.train import schedules


def test_byol_tau_end_points_and_hand_values():
    base, total = 0.996, 1000
    # k = 0: cos 0 = 1 -> τ = base; k = K/2: cos(π/2) = 0 -> τ = 1 - 0.004/2; k = K: cos π = -1.
    assert schedules.byol_tau(0, total, base) == pytest.approx(0.996, abs=1e-7)
    assert schedules.byol_tau(500, total, base) == pytest.approx(0.998, abs=1e-7)
    assert schedules.byol_tau(total, total, base) == pytest.approx(1.0, abs=1e-7)
    # k = K/4: (cos(π/4) + 1)/2 = (√2/2 + 1)/2.
    quarter = 1.0 - 0.004 * (math.sqrt(0.5) + 1.0) / 2.0
    assert schedules.byol_tau(250, total, base) == pytest.approx(quarter, abs=1e-7)
    # A coarse base makes the shape visible: base 0.5, k = K/3: cos(π/3) = 1/2 -> 1 - 0.5·0.75.
    assert schedules.byol_tau(1, 3, 0.5) == pytest.approx(0.625, abs=1e-7)


def test_byol_tau_is_monotone_and_jits_with_a_traced_step():
    total = 100
    taus = jax.jit(jax.vmap(lambda k: schedules.byol_tau(k, total, 0.99)))(jnp.arange(total + 1))
    taus = np.asarray(taus)
    assert taus.dtype == np.float32
    assert np.all(np.diff(taus) >= 0.0)
    assert taus[0] == pytest.approx(0.99, abs=1e-7)
    assert taus[-1] == pytest.approx(1.0, abs=1e-7)


def test_byol_tau_is_clipped_outside_the_schedule():
    assert schedules.byol_tau(1500, 1000, 0.996) == pytest.approx(1.0, abs=1e-7)
    assert schedules.byol_tau(-5, 1000, 0.996) == pytest.approx(0.996, abs=1e-7)


@pytest.mark.parametrize(("total_steps", "base"), [(0, 0.996), (100, 1.5), (100, -0.1)])
def test_byol_tau_rejects_bad_arguments(total_steps, base):
    with pytest.raises(ValueError, match="byol_tau"):
        schedules.byol_tau(0, total_steps, base)


def test_target_update_with_optax_incremental_update():
    online = {"dense": {"kernel": jnp.array([1.0, 2.0]), "bias": jnp.array(4.0)}}
    target = {"dense": {"kernel": jnp.array([3.0, 0.0]), "bias": jnp.array(-4.0)}}
    # base 0.5, K = 3, k = 1 -> τ = 0.625 (see above): ξ' = 0.625 ξ + 0.375 θ.
    tau = schedules.byol_tau(1, 3, 0.5)
    updated = optax.incremental_update(new_tensors=online, old_tensors=target, step_size=1.0 - tau)
    np.testing.assert_allclose(updated["dense"]["kernel"], [2.25, 0.75], rtol=1e-6)
    np.testing.assert_allclose(updated["dense"]["bias"], -1.0, rtol=1e-6)
