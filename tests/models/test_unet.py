"""Tests for jaxcl.models.unet against docs/METHOD.md §1 and §13."""

import functools
import itertools

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcl.models import unet

SMALL_FILTERS = (4, 4, 8, 8, 8, 8)


def _shapes(module, *args):
    """(output shapes, variable shapes) of module.init without computing anything."""
    return jax.eval_shape(
        lambda *a: module.init_with_output(jax.random.key(0), *a, train=False), *args
    )


def _init(module, x, seed=0):
    """Variables of module.init, jitted, with the "rbg" PRNG.

    Flax gives each layer its own key by folding the layer's path into the init key, whatever the
    PRNG implementation; "rbg" only makes the compile ~5x faster on CPU than threefry's.
    """
    key = jax.random.key(seed, impl="rbg")
    return jax.jit(functools.partial(module.init, train=False))(key, x)


def _image(size, batch=2, channels=1):
    return jax.ShapeDtypeStruct((batch, size, size, channels), jnp.float32)


def _count(tree) -> int:
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


def _conv_bn_params(kernel: int, channels_in: int, channels_out: int) -> int:
    """Bias-free k x k conv kernel plus BatchNorm scale and bias."""
    return kernel * kernel * channels_in * channels_out + 2 * channels_out


def _unet_param_count(filters, num_classes, in_channels=1):
    """Trainable parameters of the UNet of docs/METHOD.md §1, written from the layer list.

    The count is invariant to the image size and batch: convolution kernels are shared over
    positions, so only kernel sizes, channel counts and classes enter. A change here means the
    architecture changed (a layer, a bias before BN, a channel count), which the test should catch.
    Returns (encoder, decoder, head) counts.
    """
    encoder, channels = 0, in_channels
    for features in filters:
        encoder += _conv_bn_params(3, channels, features) + _conv_bn_params(3, features, features)
        channels = features
    decoder = 0
    for block in range(1, 6):
        skip_channels = filters[5 - block]
        decoder += _conv_bn_params(2, channels, skip_channels)  # up-conv after upsampling
        decoder += _conv_bn_params(3, 2 * skip_channels, skip_channels)  # after the concat
        if block < 5:
            decoder += _conv_bn_params(3, skip_channels, skip_channels)
        channels = skip_channels
    head = 2 * _conv_bn_params(3, filters[0], filters[0]) + 9 * filters[0] * num_classes
    head += num_classes  # the logits conv has a bias
    return encoder, decoder, head


@pytest.mark.parametrize("size", [192, 160])
def test_encoder_decoder_shapes(size):
    """docs/METHOD.md §1 lists 192²; 160² checks the sizes follow the input, not constants."""
    (bottleneck, skips), _ = _shapes(unet.Encoder(), _image(size))
    expected_skips = [(2, size >> k, size >> k, f) for k, f in enumerate((16, 32, 64, 128, 128))]
    assert [s.shape for s in skips] == expected_skips
    assert bottleneck.shape == (2, size // 32, size // 32, 128)
    expected_outputs = [expected_skips[-k] for k in range(1, 6)]
    for num_blocks in range(1, 6):
        out, _ = _shapes(unet.Decoder(num_blocks), bottleneck, skips)
        assert out.shape == expected_outputs[num_blocks - 1], num_blocks
    logits, _ = _shapes(unet.UNet(num_classes=4), _image(size))
    assert logits.shape == (2, size, size, 4)
    assert logits.dtype == jnp.float32


def test_unet_parameter_count_matches_layer_arithmetic():
    _, variables = _shapes(unet.UNet(num_classes=4), _image(192))
    params = variables["params"]
    encoder, decoder, head = _unet_param_count(unet.DEFAULT_FILTERS, 4)
    assert _count(params["encoder"]) == encoder
    assert _count(params["decoder"]) == decoder
    assert _count(params["segmentation_head"]) == head
    # A running mean and variance per channel of every conv except the logits conv.
    f = unet.DEFAULT_FILTERS
    bn_channels = 2 * sum(f) + sum(3 * c for c in f[1:5]) + 2 * f[0] + 2 * f[0]
    assert _count(variables["batch_stats"]) == 2 * bn_channels
    # Image size does not enter the count.
    _, small_variables = _shapes(unet.UNet(num_classes=4), _image(32))
    assert _count(small_variables["params"]) == encoder + decoder + head


def test_decoder_block_names_do_not_depend_on_num_blocks():
    (bottleneck, skips), _ = _shapes(unet.Encoder(SMALL_FILTERS), _image(32))
    full = _shapes(unet.Decoder(5), bottleneck, skips)[1]["params"]
    assert sorted(full) == [f"block{k}" for k in range(1, 6)]
    assert sorted(full["block5"]) == ["conv1", "upconv"]  # docs/METHOD.md §1: block 5 has one conv
    assert all(sorted(full[f"block{k}"]) == ["conv1", "conv2", "upconv"] for k in range(1, 5))
    assert full["block1"]["upconv"]["conv"]["kernel"].shape == (2, 2, 8, 8)
    for num_blocks in range(1, 5):
        partial = _shapes(unet.Decoder(num_blocks), bottleneck, skips)[1]["params"]
        expected = {k: v for k, v in full.items() if int(k[len("block") :]) <= num_blocks}
        assert jax.tree.map(np.shape, partial) == jax.tree.map(np.shape, expected)


def test_initialisation_distinct_kernels_and_bn_stats():
    """docs/METHOD.md §13: same-shaped layers get different kernels; BN stats start at (0, 1)."""
    model = unet.UNet(num_classes=3, filters=SMALL_FILTERS)
    variables = _init(model, jnp.zeros((1, 32, 32, 1)))
    flat = flax.traverse_util.flatten_dict(variables["params"], sep="/")
    kernels = {path: np.asarray(v) for path, v in flat.items() if path.endswith("kernel")}
    by_shape = {}
    for path, kernel in kernels.items():
        by_shape.setdefault(kernel.shape, []).append(path)
    repeated = [paths for paths in by_shape.values() if len(paths) > 1]
    assert repeated, "the small UNet must have same-shaped layers for this test to mean anything"
    for paths in repeated:
        for a, b in itertools.combinations(paths, 2):
            assert not np.allclose(kernels[a], kernels[b]), (a, b)
    stats = flax.traverse_util.flatten_dict(variables["batch_stats"], sep="/")
    for path, value in stats.items():
        expected = 0.0 if path.endswith("mean") else 1.0
        np.testing.assert_array_equal(value, expected, err_msg=path)


def test_he_normal_scale():
    """He-normal: std sqrt(2 / fan_in), fan_in = 3*3*128 for a 128 -> 128 conv."""
    x = jnp.zeros((1, 2, 2, 128))
    variables = unet.ConvBNReLU(128).init(jax.random.key(1), x, train=False)
    kernel = np.asarray(variables["params"]["conv"]["kernel"])
    np.testing.assert_allclose(kernel.std(), np.sqrt(2.0 / (9 * 128)), rtol=0.02)
    assert abs(kernel.mean()) < 1e-3


def test_conv_bn_relu_train_step_matches_numpy():
    """BatchNorm momentum 0.99, epsilon 1e-3, biased batch variance (a 1x1 conv is a matmul)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 5, 5, 2)).astype(np.float32)
    layer = unet.ConvBNReLU(3, (1, 1))
    variables = layer.init(jax.random.key(0), x, train=False)
    out, updates = layer.apply(variables, x, train=True, mutable=["batch_stats"])
    kernel = np.asarray(variables["params"]["conv"]["kernel"])[0, 0]  # (2, 3)
    y = x.reshape(-1, 2) @ kernel
    mean, var = y.mean(0), y.var(0)
    expected = np.maximum((y - mean) / np.sqrt(var + 1e-3), 0.0).reshape(4, 5, 5, 3)
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)
    stats = updates["batch_stats"]["bn"]
    np.testing.assert_allclose(stats["mean"], 0.01 * mean, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(stats["var"], 0.99 + 0.01 * var, rtol=1e-5)


@pytest.mark.parametrize("height,width", [(100, 96), (96, 40), (16, 16)])
def test_input_size_not_divisible_by_32_raises(height, width):
    model = unet.UNet(num_classes=2, filters=SMALL_FILTERS)
    with pytest.raises(ValueError, match=rf"divisible by 32.*{height}x{width}.*data.image_size"):
        model.init(jax.random.key(0), jnp.zeros((1, height, width, 1)), train=False)


def test_bad_filters_and_num_blocks_raise():
    with pytest.raises(ValueError, match="model.filters must be 6"):
        _shapes(unet.Encoder((16, 32, 64)), _image(32))
    (bottleneck, skips), _ = _shapes(unet.Encoder(SMALL_FILTERS), _image(32))
    for num_blocks in (0, 6):
        with pytest.raises(ValueError, match="num_blocks"):
            _shapes(unet.Decoder(num_blocks), bottleneck, skips)


def _equations(jaxpr):
    """The equations of `jaxpr` and of the jaxprs inside them (custom-gradient calls)."""
    for eqn in jaxpr.eqns:
        yield eqn
        for param in eqn.params.values():
            inner = getattr(param, "jaxpr", param)
            if hasattr(inner, "eqns"):
                yield from _equations(inner)


def test_bfloat16_computes_in_bf16_with_float32_params():
    model = unet.UNet(num_classes=2, filters=SMALL_FILTERS, dtype=jnp.bfloat16)
    logits, variables = _shapes(model, _image(32))
    assert logits.dtype == jnp.float32
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(variables))
    jaxpr = jax.make_jaxpr(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(
        variables, _image(32)
    )
    conv_inputs = [
        (eqn.invars[0].aval.dtype, eqn.invars[1].aval.dtype)
        for eqn in _equations(jaxpr.jaxpr)
        if eqn.primitive.name == "conv_general_dilated"
    ]
    # encoder (12), decoder (3 per block but the last's 2; an up-convolution is one 1x1
    # convolution to its taps), head (3)
    assert len(conv_inputs) == 2 * 6 + 3 * 4 + 2 + 3
    assert all(dtypes == (jnp.bfloat16, jnp.bfloat16) for dtypes in conv_inputs)
