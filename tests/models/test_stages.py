"""Tests for jaxcl.models.stages: shapes, parameter counts, shared paths, frozen encoder."""

import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np

from jaxcl.models import ByolNetwork, GlobalContrastiveModel, LocalContrastiveModel, UNet

FILTERS = (16, 32, 64, 128, 128, 128)
SMALL_FILTERS = (4, 4, 8, 8, 8, 8)
SMALL_POSITIONS = ((0, 0), (2, 3), (5, 5))  # on the 8x8 map after 3 blocks of a 32² input


def _paper_positions(size: int) -> tuple[tuple[int, int], ...]:
    """The 13 default positions of docs/METHOD.md §5 for an H_l x H_l map."""
    w = size - 4
    a, m, e, q, t = 0, w // 2, w, w // 4, (3 * w) // 4
    grid = [(u, v) for u in (a, m, e) for v in (a, m, e)]
    return tuple(grid + [(q, q), (q, t), (t, q), (t, t)])


def _shapes(module, size, batch=2):
    x = jax.ShapeDtypeStruct((batch, size, size, 1), jnp.float32)
    return jax.eval_shape(lambda x: module.init_with_output(jax.random.key(0), x, train=False), x)


def _count(tree) -> int:
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


def _conv_bn(kernel, channels_in, channels_out):
    return kernel * kernel * channels_in * channels_out + 2 * channels_out


def _encoder_count(filters):
    """Encoder parameters from docs/METHOD.md §1: two 3x3 conv+BN per level, 1 input channel.

    Like every count here it is invariant to the batch and, except for the flattening dense
    layers (g1, BYOL projector), to the image size: kernels are shared over positions.
    """
    channels_in = (1, *filters[:-1])
    return sum(
        _conv_bn(3, c, f) + _conv_bn(3, f, f) for c, f in zip(channels_in, filters, strict=True)
    )


def _decoder_count(filters, num_blocks):
    """First num_blocks decoder blocks: 2x2 up-conv, 3x3 conv on the concat, [3x3 conv]."""
    total, channels = 0, filters[-1]
    for block in range(1, num_blocks + 1):
        skip = filters[5 - block]
        total += _conv_bn(2, channels, skip) + _conv_bn(3, 2 * skip, skip)
        total += _conv_bn(3, skip, skip) if block < 5 else 0
        channels = skip
    return total


def _mlp_count(inputs, hidden, outputs):
    """BYOL MLP: Dense without bias, BN scale+bias, Dense with bias."""
    return inputs * hidden + 2 * hidden + hidden * outputs + outputs


def test_global_model_shape_and_count():
    z, variables = _shapes(GlobalContrastiveModel(), 192)
    assert z.shape == (2, 128) and z.dtype == jnp.float32
    params = variables["params"]
    assert set(params) == {"encoder", "g1"}
    assert _count(params["encoder"]) == _encoder_count(FILTERS)
    assert _count(params["g1"]) == 6 * 6 * 128 * 1024 + 1024 * 128


def test_local_model_shape_and_count():
    positions = _paper_positions(48)
    model = LocalContrastiveModel(positions)
    regions, variables = _shapes(model, 192)
    assert regions.shape == (2, 13, 128) and regions.dtype == jnp.float32
    params = variables["params"]
    assert set(params) == {"encoder", "decoder", "g2", "region_embedding"}
    assert _count(params["decoder"]) == _decoder_count(FILTERS, 3)
    assert _count(params["g2"]) == _conv_bn(1, 64, 64) + 64 * 64
    assert _count(params["region_embedding"]) == 9 * 64 * 128


def test_byol_networks_shape_count_and_shared_paths():
    online, online_variables = _shapes(ByolNetwork(predict=True), 192)
    target, target_variables = _shapes(ByolNetwork(predict=False), 192)
    assert online.shape == target.shape == (2, 128)
    online_params, target_params = online_variables["params"], target_variables["params"]
    assert _count(online_params["projector"]) == _mlp_count(6 * 6 * 128, 1024, 128)
    assert _count(online_params["predictor"]) == _mlp_count(128, 1024, 128)
    # The EMA target is the online network without its predictor, path for path.
    without_predictor = {k: v for k, v in online_params.items() if k != "predictor"}
    assert jax.tree.map(np.shape, target_params) == jax.tree.map(np.shape, without_predictor)


def test_encoder_and_decoder_paths_transfer_between_stages():
    shapes = functools.partial(jax.tree.map, np.shape)
    unet = _shapes(UNet(num_classes=3, filters=SMALL_FILTERS), 64)[1]["params"]
    assert _count(unet["encoder"]) == _encoder_count(SMALL_FILTERS)
    assert _count(unet["decoder"]) == _decoder_count(SMALL_FILTERS, 5)
    stage_models = [
        GlobalContrastiveModel(SMALL_FILTERS),
        LocalContrastiveModel(SMALL_POSITIONS, SMALL_FILTERS),
        ByolNetwork(predict=True, filters=SMALL_FILTERS),
    ]
    for model in stage_models:
        params = _shapes(model, 32)[1]["params"]
        assert shapes(params["encoder"]) == shapes(unet["encoder"]), type(model).__name__
    for num_blocks, positions in ((1, ((0, 0),)), (3, SMALL_POSITIONS), (5, ((0, 0),))):
        model = LocalContrastiveModel(positions, SMALL_FILTERS, num_decoder_blocks=num_blocks)
        decoder = _shapes(model, 64)[1]["params"]["decoder"]
        expected = {f"block{k}": unet["decoder"][f"block{k}"] for k in range(1, num_blocks + 1)}
        assert shapes(decoder) == shapes(expected), num_blocks


def _local_train_step(freeze_encoder):
    """Initial variables, updated batch_stats and parameter gradients after one train apply."""
    model = LocalContrastiveModel(SMALL_POSITIONS, SMALL_FILTERS, freeze_encoder=freeze_encoder)
    x = jax.random.normal(jax.random.key(1), (4, 32, 32, 1))
    # Random parameters filled in on the host: this test needs values, not the initialisers,
    # and skipping model.init saves a compile.
    rng = np.random.default_rng(0)
    shapes = _shapes(model, 32, batch=4)[1]
    variables = {
        "params": jax.tree.map(lambda s: 0.5 * rng.normal(size=s.shape), shapes["params"]),
        "batch_stats": jax.tree.map(
            lambda s: rng.uniform(0.5, 1.5, s.shape), shapes["batch_stats"]
        ),
    }
    variables = jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), variables)

    @jax.jit
    def step(params):
        def loss(params):
            regions, updates = model.apply(
                {**variables, "params": params}, x, train=True, mutable=["batch_stats"]
            )
            return jnp.sum(regions**2), updates

        return jax.grad(loss, has_aux=True)(params)

    grads, updates = step(variables["params"])
    return variables, updates["batch_stats"], grads


def _changed(before, after):
    flat_before = flax.traverse_util.flatten_dict(before, sep="/")
    flat_after = flax.traverse_util.flatten_dict(after, sep="/")
    return {k for k in flat_before if not np.allclose(flat_before[k], flat_after[k])}


def test_frozen_encoder_keeps_bn_statistics_and_gets_no_gradient():
    """docs/METHOD.md §9 and §13: a frozen encoder's BN statistics do not move in train mode."""
    variables, stats, grads = _local_train_step(freeze_encoder=True)
    assert set(stats) == {"encoder", "decoder", "g2"}
    assert not _changed(variables["batch_stats"]["encoder"], stats["encoder"])
    assert all(not np.any(g) for g in jax.tree.leaves(grads["encoder"]))
    decoder_stats = flax.traverse_util.flatten_dict(stats["decoder"], sep="/")
    assert _changed(variables["batch_stats"]["decoder"], stats["decoder"]) == set(decoder_stats)
    assert all(np.any(g) for g in jax.tree.leaves(grads["decoder"]))


def test_unfrozen_encoder_updates_bn_statistics_and_gets_gradient():
    variables, stats, grads = _local_train_step(freeze_encoder=False)
    encoder_stats = flax.traverse_util.flatten_dict(stats["encoder"], sep="/")
    assert _changed(variables["batch_stats"]["encoder"], stats["encoder"]) == set(encoder_stats)
    assert any(np.any(g) for g in jax.tree.leaves(grads["encoder"]))
