"""Stage transfer by parameter path: merge, listing, errors, and the real stage models' paths."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcl.models import GlobalContrastiveModel, LocalContrastiveModel, UNet
from jaxcl.train.transfer import transfer_params

FILTERS = (4, 4, 8, 8, 8, 8)


def _variables(offset: float) -> dict:
    """A small two-collection tree; every array holds `offset` plus its own index."""
    return {
        "params": {
            "encoder": {"conv": {"kernel": np.full((3, 3, 1, 2), offset + 1, np.float32)}},
            "decoder": {
                "block1": {"conv": {"kernel": np.full((2, 2), offset + 2, np.float32)}},
                "block2": {"conv": {"kernel": np.full((2, 2), offset + 3, np.float32)}},
            },
            "head": {"bias": np.full((3,), offset + 4, np.float32)},
        },
        "batch_stats": {
            "encoder": {"bn": {"mean": np.full((2,), offset + 5, np.float32)}},
            "decoder": {"block1": {"bn": {"mean": np.full((2,), offset + 6, np.float32)}}},
        },
    }


def test_merges_the_named_paths_and_lists_every_transferred_array():
    target, source = _variables(0.0), _variables(100.0)
    merged, transferred = transfer_params(target, source, [("encoder",), "decoder/block1"])

    assert transferred == [
        "params/encoder/conv/kernel",
        "batch_stats/encoder/bn/mean",
        "params/decoder/block1/conv/kernel",
        "batch_stats/decoder/block1/bn/mean",
    ]
    np.testing.assert_array_equal(merged["params"]["encoder"]["conv"]["kernel"], 101.0)
    np.testing.assert_array_equal(merged["batch_stats"]["encoder"]["bn"]["mean"], 105.0)
    np.testing.assert_array_equal(merged["params"]["decoder"]["block1"]["conv"]["kernel"], 102.0)
    np.testing.assert_array_equal(merged["batch_stats"]["decoder"]["block1"]["bn"]["mean"], 106.0)
    # Untouched paths keep the target's values, and the inputs are not modified.
    np.testing.assert_array_equal(merged["params"]["decoder"]["block2"]["conv"]["kernel"], 3.0)
    np.testing.assert_array_equal(merged["params"]["head"]["bias"], 4.0)
    np.testing.assert_array_equal(target["params"]["encoder"]["conv"]["kernel"], 1.0)
    np.testing.assert_array_equal(target["params"]["decoder"]["block1"]["conv"]["kernel"], 2.0)


def test_path_without_batch_stats_transfers_params_only():
    merged, transferred = transfer_params(_variables(0.0), _variables(10.0), [("head",)])
    assert transferred == ["params/head/bias"]
    np.testing.assert_array_equal(merged["params"]["head"]["bias"], 14.0)
    jax.tree.map(
        np.testing.assert_array_equal, merged["batch_stats"], _variables(0.0)["batch_stats"]
    )


def test_keeps_the_target_dtype():
    source = jax.tree.map(lambda x: x.astype(np.float64), _variables(10.0))
    merged, _ = transfer_params(_variables(0.0), source, [("encoder",)])
    assert merged["params"]["encoder"]["conv"]["kernel"].dtype == jnp.float32


def test_shape_mismatch_names_the_path_and_both_shapes():
    source = _variables(10.0)
    source["params"]["decoder"]["block1"]["conv"]["kernel"] = np.zeros((4, 2), np.float32)
    with pytest.raises(ValueError) as error:
        transfer_params(_variables(0.0), source, [("decoder", "block1")])
    message = str(error.value)
    assert "decoder/block1/conv/kernel" in message
    assert "(4, 2)" in message and "(2, 2)" in message


def test_missing_path_is_an_error():
    with pytest.raises(ValueError, match="params/decoder/block3.*source"):
        transfer_params(_variables(0.0), _variables(1.0), [("decoder", "block3")])
    source = _variables(1.0)
    del source["batch_stats"]["encoder"]
    with pytest.raises(ValueError, match="batch_stats/encoder.*source"):
        transfer_params(_variables(0.0), source, [("encoder",)])


def test_differently_structured_subtrees_are_an_error():
    source = _variables(1.0)
    source["params"]["encoder"]["extra"] = {"kernel": np.zeros((1,), np.float32)}
    with pytest.raises(ValueError, match="only in the source: \\['params/encoder/extra/kernel'\\]"):
        transfer_params(_variables(0.0), source, [("encoder",)])


def test_empty_path_is_rejected():
    with pytest.raises(ValueError, match="non-empty"):
        transfer_params(_variables(0.0), _variables(1.0), [()])


def _random_variables(model, seed: int) -> dict:
    """Variables with the model's real paths and shapes, filled with random numbers (no init)."""
    x = jax.ShapeDtypeStruct((1, 32, 32, 1), jnp.float32)
    shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), x)
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: rng.normal(size=s.shape).astype(s.dtype), dict(shapes))


def test_stage_models_share_encoder_and_decoder_paths():
    """docs/METHOD.md §9, stage 3: encoder from global, decoder blocks 1..3 from local."""
    unet = _random_variables(UNet(4, FILTERS), 0)
    global_stage = _random_variables(GlobalContrastiveModel(FILTERS, 16, 8), 1)
    local_stage = _random_variables(LocalContrastiveModel(((0, 0), (2, 2)), FILTERS), 2)
    # Local pre-training loads the encoder of global pre-training.
    local_stage, _ = transfer_params(local_stage, global_stage, [("encoder",)])

    blocks = [("decoder", f"block{k}") for k in (1, 2, 3)]
    merged, _ = transfer_params(unet, global_stage, [("encoder",)])
    merged, from_local = transfer_params(merged, local_stage, blocks)

    assert from_local and all(
        name.split("/")[1:3] in [list(b) for b in blocks] for name in from_local
    )
    for collection in ("params", "batch_stats"):
        for got, want in zip(
            jax.tree.leaves(merged[collection]["encoder"]),
            jax.tree.leaves(global_stage[collection]["encoder"]),
            strict=True,
        ):
            np.testing.assert_array_equal(got, want)
        for block in ("block1", "block2", "block3"):
            for got, want in zip(
                jax.tree.leaves(merged[collection]["decoder"][block]),
                jax.tree.leaves(local_stage[collection]["decoder"][block]),
                strict=True,
            ):
                np.testing.assert_array_equal(got, want)
        for untouched in (("decoder", "block4"), ("decoder", "block5"), ("segmentation_head",)):
            before = functools.reduce(dict.__getitem__, untouched, unet[collection])
            after = functools.reduce(dict.__getitem__, untouched, merged[collection])
            for got, want in zip(jax.tree.leaves(after), jax.tree.leaves(before), strict=True):
                np.testing.assert_array_equal(got, want)
