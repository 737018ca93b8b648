"""benchmarks/scaling.py: the layer table against XLA and flax, counts against jaxcl's masks.

The FLOP counts of the layer table are checked against XLA's cost analysis of the same
convolutions, its parameter count against the UNet's kernels, and the closed-form positive and
negative counts against the masks of `jaxcl.losses.contrastive` (global strategies) or a
brute-force enumeration of the definitions of docs/METHOD.md §5 (local strategies).
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import scaling
from jaxcl.losses import contrastive
from jaxcl.models import UNet
from jaxcl.models.unet import taps_to_phases, upsample_conv_2x


def _lowered_flops(function, *shapes) -> float:
    args = [jax.ShapeDtypeStruct(shape, jnp.float32) for shape in shapes]
    return jax.jit(function).lower(*args).cost_analysis()["flops"]


def _same_conv(x, kernel):
    return jax.lax.conv_general_dilated(
        x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


@pytest.mark.parametrize(
    ("side", "cin", "cout", "kernel"), [(6, 8, 4, 3), (12, 3, 5, 3), (7, 4, 6, 1)]
)
def test_conv_macs_are_what_xla_counts(side, cin, cout, kernel):
    layer = scaling.conv("c", side, cin, cout, kernel)
    xla = _lowered_flops(_same_conv, (1, side, side, cin), (kernel, kernel, cin, cout))
    assert 2 * layer.macs == xla
    assert layer.nominal_macs == side * side * kernel * kernel * cin * cout


@pytest.mark.parametrize(("low_side", "cin", "cout"), [(6, 8, 4), (3, 2, 5)])
def test_upconv_macs_are_what_xla_counts(low_side, cin, cout):
    layer = scaling.upconv("u", low_side, cin, cout)
    xla = _lowered_flops(upsample_conv_2x, (1, low_side, low_side, cin), (2, 2, cin, cout))
    # Besides the 1x1 convolution to the taps, XLA counts their shifted sum (elementwise).
    shifted_sum = _lowered_flops(taps_to_phases, (1, low_side, low_side, 2, 2, cout))
    assert 2 * layer.macs + shifted_sum == xla
    assert layer.nominal_macs == (2 * low_side) ** 2 * 4 * cin * cout


def test_unet_layers_have_the_unets_kernels():
    filters, size, classes = (4, 4, 8, 8, 16, 16), 64, 3
    layers = scaling.unet_layers(size, filters, classes)
    variables = jax.eval_shape(
        lambda: UNet(classes, filters).init(jax.random.key(0), jnp.zeros((1, size, size, 1)), False)
    )
    kernels = [
        leaf
        for path, leaf in jax.tree_util.tree_leaves_with_path(variables["params"])
        if path[-1].key == "kernel"
    ]
    assert len(layers) == len(kernels) == 12 + 14 + 3
    assert sum(layer.params for layer in layers) == sum(k.size for k in kernels)


def test_stage_time_hand_computed():
    # 2,000 FLOPs at 1,000 FLOP/s (2 s) beat 10 bytes at 10 B/s (1 s) for each of 3 products;
    # BatchNorm adds 8 passes over 5 output bytes (4 s) when trained, 2 (1 s) forward only.
    layer = scaling.Layer("x", 5, 5, 1000, 1000, 0, batch_norm=True)
    timing = {"batch": 1, "peak": 1000.0, "bandwidth": 10.0, "itemsize": 1}
    assert scaling.stage_time([(layer, "train")], **timing) == pytest.approx(10.0)
    assert scaling.stage_time([(layer, "forward_running_stats")], **timing) == pytest.approx(3.0)
    # Memory-bound: 100 B (10 s) per product, plus Adam's 28 bytes per parameter.
    slow = scaling.Layer("y", 50, 50, 1, 1, 10, batch_norm=False)
    expected = 3 * (100 + 10) / 10 + 28 * 10 / 10
    assert scaling.stage_time([(slow, "train")], **timing) == pytest.approx(expected)


def _global_ids(strategy: str, num_devices: int) -> tuple[np.ndarray, np.ndarray]:
    """Ids of the paper's batch on `num_devices` devices: units x views, slice-major."""
    kind, units, views = {
        "GR": ("random", 24, 2),
        "GD-": ("volumes", 3, 3),
        "GD": ("volumes", 6, 2),
    }[strategy]
    slices = units * num_devices * (1 if kind == "random" else 4)
    sample_ids = np.repeat(np.arange(slices), views)
    return sample_ids, sample_ids % 4


@pytest.mark.parametrize(
    ("strategy", "num_devices"), itertools.product(["GR", "GD-", "GD"], [1, 2])
)
def test_global_counts_match_the_masks(strategy, num_devices):
    sample_ids, partition_ids = _global_ids(strategy, num_devices)
    positive, negative = contrastive.global_masks(strategy, sample_ids, partition_ids)
    n, positives, negatives = scaling.contrast_counts(strategy, num_devices)
    assert n == len(sample_ids)
    np.testing.assert_array_equal(np.asarray(positive).sum(axis=1), positives)
    np.testing.assert_array_equal(np.asarray(negative).sum(axis=1), negatives)


@pytest.mark.parametrize(("strategy", "num_devices"), itertools.product(["LR", "LD"], [1, 2]))
def test_local_counts_match_spec_enumeration(strategy, num_devices):
    # docs/METHOD.md §5: a region is (view, position); views of one slice (L^R) or of one partition
    # across the global batch (L^D: 3 volumes per device x 2 views) form a group; 17 positions,
    # of which the first 13 are anchors.
    views_per_group = 2 if strategy == "LR" else 3 * num_devices * 2
    regions = [(view, position) for view in range(views_per_group) for position in range(17)]
    for view, position in [(0, 0), (1, 12)]:
        positives = sum(p == position and v != view for v, p in regions)
        negatives = sum(p != position for _, p in regions)
        assert scaling.contrast_counts(strategy, num_devices)[1:] == (positives, negatives)


def test_contrast_counts_rejects_byol():
    with pytest.raises(ValueError, match="no negatives"):
        scaling.contrast_counts("BYOL", 1)


def test_fit_buffers_recovers_the_coefficients():
    anchors, candidates = [48, 96, 192, 100], [384, 768, 1536, 100]
    temp = [1000 + 3 * c + 4.25 * 4 * a * c for a, c in zip(anchors, candidates, strict=True)]
    np.testing.assert_allclose(scaling.fit_buffers(anchors, candidates, temp), (1000, 3, 4.25))
