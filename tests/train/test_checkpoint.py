"""Checkpoints round-trip exactly, keep the newest few, and ignore half-written saves."""

import os

import chex
import jax.numpy as jnp
import numpy as np
import optax

from jaxcl.train.checkpoint import StageCheckpointer
from jaxcl.train.state import TrainState


def _state(value: float) -> TrainState:
    params = {"encoder": {"kernel": jnp.full((3, 2), value)}, "head": {"bias": jnp.arange(2.0)}}
    stats = {"encoder": {"mean": jnp.full((2,), value / 2)}}
    return TrainState.create(params=params, batch_stats=stats, tx=optax.adam(1e-3))


def test_round_trip_restores_state_and_meta(tmp_path):
    checkpointer = StageCheckpointer(str(tmp_path / "ckpt"))
    state = _state(1.5).replace(step=jnp.asarray(7, jnp.int32))
    checkpointer.save(7, state, meta={"best_dice": 0.25})
    restored, meta = StageCheckpointer(str(tmp_path / "ckpt")).restore(_state(0.0))
    chex.assert_trees_all_equal(restored.params, state.params)
    chex.assert_trees_all_equal(restored.batch_stats, state.batch_stats)
    chex.assert_trees_all_equal(restored.opt_state, state.opt_state)
    assert int(restored.step) == 7
    assert meta == {"best_dice": 0.25}


def test_keeps_only_the_newest_checkpoints(tmp_path):
    checkpointer = StageCheckpointer(str(tmp_path), max_to_keep=2)
    for step in (1, 2, 3):
        checkpointer.save(step, _state(float(step)))
    assert checkpointer.latest_step() == 3
    assert sorted(name for name in os.listdir(tmp_path) if name.isdigit()) == ["2", "3"]
    restored, _ = checkpointer.restore(_state(0.0), step=2)
    np.testing.assert_array_equal(restored.params["encoder"]["kernel"], np.full((3, 2), 2.0))


def test_half_written_save_is_ignored(tmp_path):
    StageCheckpointer(str(tmp_path)).save(4, _state(4.0))
    # What a run killed in the middle of saving step 9 leaves behind: orbax's temporary folder.
    partial = tmp_path / "9.orbax-checkpoint-tmp-1234567"
    partial.mkdir()
    (partial / "garbage").write_text("truncated")
    checkpointer = StageCheckpointer(str(tmp_path))
    assert checkpointer.latest_step() == 4
    restored, _ = checkpointer.restore(_state(0.0))
    np.testing.assert_array_equal(restored.params["encoder"]["kernel"], np.full((3, 2), 4.0))


def test_restore_without_checkpoint_raises(tmp_path):
    checkpointer = StageCheckpointer(str(tmp_path))
    try:
        checkpointer.restore(_state(0.0))
    except FileNotFoundError as error:
        assert str(tmp_path) in str(error)
    else:
        raise AssertionError("restore of an empty folder must fail")


def test_exported_variables_load_without_template(tmp_path):
    from jaxcl.train.checkpoint import export_variables, load_variables

    variables = {"params": {"encoder": {"kernel": np.arange(6.0).reshape(3, 2)}}, "batch_stats": {}}
    export_variables(str(tmp_path / "export"), variables)
    loaded = load_variables(str(tmp_path / "export"))
    np.testing.assert_array_equal(
        loaded["params"]["encoder"]["kernel"], np.arange(6.0).reshape(3, 2)
    )
    try:
        load_variables(str(tmp_path / "missing"))
    except FileNotFoundError as error:
        assert "missing" in str(error)
    else:
        raise AssertionError("loading a missing export must fail")
