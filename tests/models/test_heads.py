"""Tests for jaxcl.models.heads against plain numpy written from docs/METHOD.md §1."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcl.models import heads

EPSILON = 1e-3  # docs/METHOD.md §1 BatchNorm epsilon


def _randomise(variables, seed=1):
    """Replaces every variable by random values so zero biases / unit scales hide nothing."""
    leaves, treedef = jax.tree.flatten(variables)
    rng = np.random.default_rng(seed)
    return jax.tree.unflatten(
        treedef, [rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32) for leaf in leaves]
    )


def _batch_norm_train(y, scale, bias):
    """Normalises (N, C) with its own biased batch statistics."""
    return (y - y.mean(0)) / np.sqrt(y.var(0) + EPSILON) * scale + bias


def test_region_embedding_matches_windows_times_kernel():
    rng = np.random.default_rng(0)
    feature_map = rng.normal(size=(2, 8, 9, 3)).astype(np.float32)
    positions = ((0, 0), (5, 6), (2, 3), (5, 0), (2, 3))
    layer = heads.RegionEmbedding(positions, features=4)
    variables = layer.init(jax.random.key(0), feature_map)
    kernel = np.asarray(variables["params"]["kernel"])
    assert kernel.shape == (3, 3, 3, 4)
    out = np.asarray(layer.apply(variables, feature_map))
    expected = np.zeros((2, len(positions), 4))
    for b in range(2):
        for r, (u, v) in enumerate(positions):
            for i in range(3):
                for j in range(3):
                    expected[b, r] += feature_map[b, u + i, v + j] @ kernel[i, j]
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "positions,match",
    [
        (((0, 0), (6, 0)), r"\[\[6, 0\]\].*outside the 8x8"),
        (((0, -1),), r"\[\[0, -1\]\]"),
        (((0, 0, 0),), "pairs"),
        (((0.0, 1.0),), "integers"),
    ],
)
def test_region_embedding_rejects_bad_positions(positions, match):
    with pytest.raises(ValueError, match=match):
        heads.RegionEmbedding(positions).init(jax.random.key(0), jnp.zeros((1, 8, 8, 2)))


def test_global_projection_head_matches_numpy():
    rng = np.random.default_rng(0)
    bottleneck = rng.normal(size=(3, 2, 2, 5)).astype(np.float32)
    head = heads.GlobalProjectionHead(hidden_features=7, features=4)
    params = head.init(jax.random.key(0), bottleneck)["params"]
    assert jax.tree.map(np.shape, params) == {
        "hidden": {"kernel": (20, 7)},
        "output": {"kernel": (7, 4)},
    }
    flat = bottleneck.reshape(3, 20)
    expected = np.maximum(flat @ params["hidden"]["kernel"], 0.0) @ params["output"]["kernel"]
    np.testing.assert_allclose(head.apply({"params": params}, bottleneck), expected, rtol=1e-5)


def test_local_projection_head_matches_numpy():
    rng = np.random.default_rng(0)
    feature_map = rng.normal(size=(2, 4, 5, 3)).astype(np.float32)
    head = heads.LocalProjectionHead()
    variables = _randomise(head.init(jax.random.key(0), feature_map, train=False))
    params = variables["params"]
    assert jax.tree.map(np.shape, params) == {
        "conv1": {"conv": {"kernel": (1, 1, 3, 3)}, "bn": {"scale": (3,), "bias": (3,)}},
        "conv2": {"kernel": (1, 1, 3, 3)},
    }
    out, _ = head.apply(variables, feature_map, train=True, mutable=["batch_stats"])
    x = feature_map.reshape(-1, 3)
    bn = params["conv1"]["bn"]
    hidden = _batch_norm_train(x @ params["conv1"]["conv"]["kernel"][0, 0], bn["scale"], bn["bias"])
    expected = np.maximum(hidden, 0.0) @ params["conv2"]["kernel"][0, 0]
    np.testing.assert_allclose(out, expected.reshape(2, 4, 5, 3), rtol=1e-4, atol=1e-5)


def test_projection_mlp_matches_numpy_in_both_modes():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 2, 2, 2)).astype(np.float32)
    mlp = heads.ProjectionMLP(hidden_features=5, features=3)
    variables = _randomise(mlp.init(jax.random.key(0), x, train=False))
    params, stats = variables["params"], variables["batch_stats"]["bn"]
    assert jax.tree.map(np.shape, params) == {
        "hidden": {"kernel": (8, 5)},
        "bn": {"scale": (5,), "bias": (5,)},
        "output": {"kernel": (5, 3), "bias": (3,)},
    }
    hidden = x.reshape(6, 8) @ params["hidden"]["kernel"]
    scale, bias = params["bn"]["scale"], params["bn"]["bias"]

    def output(normalised):
        return np.maximum(normalised, 0.0) @ params["output"]["kernel"] + params["output"]["bias"]

    train_out, _ = mlp.apply(variables, x, train=True, mutable=["batch_stats"])
    expected = output(_batch_norm_train(hidden, scale, bias))
    np.testing.assert_allclose(train_out, expected, rtol=1e-4, atol=1e-5)
    eval_out = mlp.apply(variables, x, train=False)
    running = (hidden - stats["mean"]) / np.sqrt(stats["var"] + EPSILON) * scale + bias
    np.testing.assert_allclose(eval_out, output(running), rtol=1e-4, atol=1e-5)
