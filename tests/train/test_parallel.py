"""pmap and shard_map run the same per-device step to the same numbers as one device.

The step below uses both kinds of collective the trainer relies on: a gradient `pmean` and an
`all_gather` of per-example values whose loss couples examples across devices.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxcl.train.parallel import AXIS_NAME, DataParallel
from jaxcl.train.state import TrainState

NUM_DEVICES = 8
PER_DEVICE = 3


def _coupled_loss(params, inputs):
    """Squared error plus a term coupling all examples: mean over pairs of (p_i - p_j)²."""
    predictions = inputs @ params["w"]
    pairs = predictions[:, None] - predictions[None, :]
    return jnp.mean(predictions**2) + jnp.mean(pairs**2)


def _step(state, batch, rng, *, axis_name):
    del rng

    def loss_fn(params):
        local = batch["x"] @ params["w"]
        everyone = jax.lax.all_gather(local, axis_name, tiled=True)
        pairs = local[:, None] - everyone[None, :]
        # Per-device share of the global mean; pmean of gradients then gives the global gradient.
        return jnp.mean(local**2) + jnp.mean(pairs**2)

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    grads = jax.lax.pmean(grads, axis_name)
    loss = jax.lax.pmean(loss, axis_name)
    return state.apply_gradients(grads, state.batch_stats), {"loss": loss}


def _initial_state():
    return TrainState.create(
        params={"w": jnp.array([0.5, -1.0, 2.0])}, batch_stats={}, tx=optax.sgd(0.05)
    )


@pytest.mark.parametrize("mode", ["pmap", "shard_map"])
def test_mapped_steps_match_one_device_on_the_global_batch(mode):
    assert jax.device_count() >= NUM_DEVICES
    inputs = np.random.default_rng(0).normal(size=(3, NUM_DEVICES, PER_DEVICE, 3))

    reference = _initial_state()
    expected_losses = []
    for step_inputs in inputs:
        flat = jnp.asarray(step_inputs.reshape(-1, 3))
        loss, grads = jax.value_and_grad(_coupled_loss)(reference.params, flat)
        reference = reference.apply_gradients(grads, {})
        expected_losses.append(float(loss))

    parallel = DataParallel(mode, devices=jax.devices()[:NUM_DEVICES])
    step = parallel.map_step(lambda s, b, r: _step(s, b, r, axis_name=AXIS_NAME))
    state = parallel.put_state(_initial_state())
    losses = []
    for step_inputs in inputs:
        state, metrics = step(state, parallel.put_batch({"x": step_inputs}), jax.random.key(0))
        losses.append(parallel.get_metrics(metrics)["loss"])

    np.testing.assert_allclose(losses, expected_losses, rtol=1e-5)
    host_state = parallel.get_state(state)
    np.testing.assert_allclose(host_state.params["w"], reference.params["w"], rtol=1e-5)
    assert int(host_state.step) == 3


@pytest.mark.parametrize("mode", ["pmap", "shard_map"])
def test_map_eval_returns_per_device_outputs_in_order(mode):
    parallel = DataParallel(mode, devices=jax.devices()[:NUM_DEVICES])
    evaluate = parallel.map_eval(lambda state, batch: batch["x"] * state["scale"])
    batch = {"x": np.arange(NUM_DEVICES * 2, dtype=np.float32).reshape(NUM_DEVICES, 2)}
    outputs = evaluate(parallel.put_state({"scale": jnp.float32(3.0)}), batch)
    np.testing.assert_array_equal(np.asarray(outputs), batch["x"] * 3.0)


def test_unknown_mode_is_rejected():
    with pytest.raises(ValueError, match="parallel.mode"):
        DataParallel("vmap")
