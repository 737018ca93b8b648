"""Tests for jaxcl.augment (docs/METHOD.md §8).

Geometry is read back through ramp images: an image whose channels hold (row + 1, col + 1, 1)
shows, after a bilinear warp, the exact source position of every output pixel whose four taps
lie inside the input (the third channel is 1 exactly there). References are plain numpy loops or
hand-derived maps, never the module's own helpers.
"""

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcl import augment

NO_INTENSITY = {
    "pretrain_brightness": 0.0,
    "pretrain_contrast": (1.0, 1.0),
    "finetune_brightness": 0.0,
    "finetune_contrast": (1.0, 1.0),
}
ONLY = {
    name: tuple(float(n == name) for n in augment.GEOMETRY_OPS) for name in augment.GEOMETRY_OPS
}
VIEW_FNS = {"global": augment.global_view, "local": augment.local_view}
DEFAULT_CONFIG = augment.AugmentConfig()  # docs/METHOD.md §8 values


def _key(seed: int = 0) -> jax.Array:
    return jax.random.PRNGKey(seed)


@functools.partial(jax.jit, static_argnums=0, static_argnames="config")
def _batch(augment_fn, key, *arrays, config=DEFAULT_CONFIG):
    """`augment_fn` (a view or `finetune_pair`) vmapped over a batch, key i of split(key, B) each.

    The training steps vmap the same per-example functions with their own keys.
    """
    keys = jax.random.split(key, arrays[0].shape[0])
    return jax.vmap(functools.partial(augment_fn, config=config))(keys, *arrays)


def _random_images(batch: int, size: int = 32, seed: int = 0) -> jax.Array:
    return jax.random.uniform(_key(seed), (batch, size, size, 1), minval=0.1, maxval=1.4)


def _shapes_label(size: int = 64) -> np.ndarray:
    """A (size, size) map with a disk (1), a rectangle (2) and a ring (3) on background 0."""
    rows, cols = np.mgrid[:size, :size] * (64 / size)
    label = np.zeros((size, size), np.int32)
    label[(rows - 20) ** 2 + (cols - 22) ** 2 < 14**2] = 1
    label[(rows >= 38) & (rows < 56) & (cols >= 8) & (cols < 28)] = 2
    ring = (rows - 44) ** 2 + (cols - 46) ** 2
    label[(ring >= 7**2) & (ring < 13**2)] = 3
    return label


def _ramp_images(batch: int, size: int) -> jax.Array:
    """(B, size, size, 3): channels row + 1, col + 1 and 1."""
    rows, cols = np.mgrid[:size, :size].astype(np.float32)
    ramp = np.stack([rows + 1, cols + 1, np.ones_like(rows)], axis=-1)
    return jnp.asarray(np.broadcast_to(ramp, (batch, size, size, 3)))


def _read_sources(warped: np.ndarray):
    """Output pixels whose source is fully inside, their (row, col) and source (row, col)."""
    valid = np.abs(warped[..., 2] - 1.0) < 1e-5
    pixels = np.argwhere(valid).astype(np.float64)
    return pixels, warped[valid][:, :2].astype(np.float64) - 1.0


def _np_bilinear_resize(crop: np.ndarray, out_shape: tuple[int, int]) -> np.ndarray:
    """Half-pixel-centre bilinear resize with edge clamping, one pixel at a time."""
    in_h, in_w = crop.shape
    out = np.zeros(out_shape)
    for i in range(out_shape[0]):
        y = min(max((i + 0.5) * in_h / out_shape[0] - 0.5, 0.0), in_h - 1.0)
        y0 = int(np.floor(y))
        y1, fy = min(y0 + 1, in_h - 1), y - y0
        for j in range(out_shape[1]):
            x = min(max((j + 0.5) * in_w / out_shape[1] - 0.5, 0.0), in_w - 1.0)
            x0 = int(np.floor(x))
            x1, fx = min(x0 + 1, in_w - 1), x - x0
            out[i, j] = (
                (1 - fy) * (1 - fx) * crop[y0, x0]
                + (1 - fy) * fx * crop[y0, x1]
                + fy * (1 - fx) * crop[y1, x0]
                + fy * fx * crop[y1, x1]
            )
    return out


# ----------------------------------------------------------------------------------------------
# Config.


@pytest.mark.parametrize(
    "overrides, key",
    [
        ({"crop_fraction": 1.5}, "crop_fraction"),
        ({"pretrain_contrast": (1.3, 0.7)}, "pretrain_contrast"),
        ({"geometry_weights": (0, 0, 0, 0, 0)}, "geometry_weights"),
        ({"geometry_weights": (1, 1)}, "geometry_weights"),
        ({"elastic_sigma": -1.0}, "elastic_sigma"),
        ({"scale_range": (0.0, 1.0)}, "scale_range"),
    ],
)
def test_config_rejects_bad_values_naming_the_key(overrides, key):
    with pytest.raises(ValueError, match=f"config.augment.{key}"):
        augment.AugmentConfig(**overrides)


def test_config_accepts_lists_and_stays_hashable():
    config = augment.AugmentConfig(pretrain_contrast=[0.5, 1.5], rotation_steps=[2, 6])
    assert config.pretrain_contrast == (0.5, 1.5) and config.rotation_steps == (2, 6)
    hash(config)


# ----------------------------------------------------------------------------------------------
# Randomness: deterministic per key, one key per example.


def _all_kinds(key, images, labels):
    finetune_images, finetune_labels = _batch(augment.finetune_pair, key, images, labels)
    return {
        "global": _batch(augment.global_view, key, images),
        "local": _batch(augment.local_view, key, images),
        "finetune_image": finetune_images,
        "finetune_label": finetune_labels,
    }


def test_deterministic_per_key_and_keys_differ():
    images = _random_images(3)
    labels = jnp.broadcast_to(jnp.asarray(_shapes_label(32)), (3, 32, 32))
    first, again, other = (_all_kinds(_key(seed), images, labels) for seed in (1, 1, 2))
    for name in first:
        np.testing.assert_array_equal(first[name], again[name], err_msg=name)
        assert not np.array_equal(first[name], other[name]), name


def test_identical_examples_get_different_augmentations():
    images = jnp.broadcast_to(_random_images(1), (4, 32, 32, 1))
    labels = jnp.broadcast_to(jnp.asarray(_shapes_label(32)), (4, 32, 32))
    for name, out in _all_kinds(_key(3), images, labels).items():
        out = np.asarray(out)
        for a in range(4):
            for b in range(a + 1, 4):
                assert not np.array_equal(out[a], out[b]), (name, a, b)


# ----------------------------------------------------------------------------------------------
# Identity settings.


def test_zero_ranges_reproduce_the_input():
    config = augment.AugmentConfig(
        crop_fraction=1.0, geometry_weights=ONLY["identity"], elastic_sigma=0.0, **NO_INTENSITY
    )
    images = _random_images(4)
    labels = jnp.broadcast_to(jnp.asarray(_shapes_label(32)), (4, 32, 32))
    for view_fn in VIEW_FNS.values():
        np.testing.assert_allclose(
            _batch(view_fn, _key(), images, config=config), images, atol=1e-6
        )
    out_images, out_labels = _batch(augment.finetune_pair, _key(), images, labels, config=config)
    np.testing.assert_allclose(out_images, images, atol=1e-6)
    np.testing.assert_array_equal(out_labels, labels)


# ----------------------------------------------------------------------------------------------
# Global crop.


@pytest.mark.parametrize("shape", [(64, 64), (48, 64)])
def test_global_crop_is_bilinear_resize_of_a_crop_inside_the_image(shape):
    height, width = shape
    rows, cols = np.mgrid[:height, :width]
    noise = np.random.default_rng(0).uniform(0.0, 1.0, shape)
    image = np.stack([rows / (height - 1), cols / (width - 1), noise], axis=-1).astype(np.float32)
    batch = 48
    config = augment.AugmentConfig(**NO_INTENSITY)
    views = np.asarray(
        _batch(
            augment.global_view,
            _key(4),
            jnp.broadcast_to(image, (batch, *image.shape)),
            config=config,
        )
    )
    crop_shape = (round(100 / 192 * height), round(100 / 192 * width))
    tops, lefts = [], []
    for view in views:
        # Output pixel (0, 0) reads the crop's first pixel: the ramps give its position.
        top, left = view[0, 0, 0] * (height - 1), view[0, 0, 1] * (width - 1)
        assert abs(top - round(top)) < 1e-3 and abs(left - round(left)) < 1e-3
        top, left = round(top), round(left)
        assert 0 <= top <= height - crop_shape[0] and 0 <= left <= width - crop_shape[1]
        crop = image[top : top + crop_shape[0], left : left + crop_shape[1]]
        for channel in range(3):
            expected = _np_bilinear_resize(crop[..., channel], shape)
            np.testing.assert_allclose(view[..., channel], expected, atol=1e-5)
        tops.append(top)
        lefts.append(left)
    # Positions spread over the whole admissible range.
    assert min(tops) <= 3 and max(tops) >= height - crop_shape[0] - 3
    assert min(lefts) <= 3 and max(lefts) >= width - crop_shape[1] - 3


# ----------------------------------------------------------------------------------------------
# Intensity.


@pytest.mark.parametrize(
    "kind, brightness, contrast",
    [("local", 0.3, (0.7, 1.3)), ("global", 0.3, (0.7, 1.3)), ("finetune", 0.1, (0.8, 1.2))],
)
def test_brightness_and_contrast_per_image_within_ranges(kind, brightness, contrast):
    batch = 64
    # Mean far from the middle of the clip range, so contrast about a wrong centre shows.
    images = jax.random.uniform(_key(5), (batch, 32, 32, 1), minval=0.85, maxval=0.95)
    # Geometry off (full-image crop, identity) so out = c · (x - mean) + mean + δ pixel-wise.
    config = augment.AugmentConfig(
        crop_fraction=1.0, geometry_weights=ONLY["identity"], elastic_sigma=0.0
    )
    if kind == "finetune":
        labels = jnp.zeros((batch, 32, 32), jnp.int32)
        out, _ = _batch(augment.finetune_pair, _key(6), images, labels, config=config)
    else:
        out = _batch(VIEW_FNS[kind], _key(6), images, config=config)
    x = np.asarray(images, np.float64).reshape(batch, -1)
    y = np.asarray(out, np.float64).reshape(batch, -1)
    x_centred = x - x.mean(axis=1, keepdims=True)
    factors = (x_centred * (y - y.mean(axis=1, keepdims=True))).sum(1) / (x_centred**2).sum(1)
    deltas = y.mean(axis=1) - x.mean(axis=1)
    residual = y - (factors[:, None] * x_centred + x.mean(axis=1, keepdims=True) + deltas[:, None])
    assert np.abs(residual).max() < 1e-5
    assert np.all((factors >= contrast[0] - 1e-5) & (factors <= contrast[1] + 1e-5))
    assert np.all(np.abs(deltas) <= brightness + 1e-5)
    # Drawn per image and spread over the ranges (not once per batch).
    span = contrast[1] - contrast[0]
    assert factors.min() < contrast[0] + 0.2 * span and factors.max() > contrast[1] - 0.2 * span
    assert deltas.min() < -0.6 * brightness and deltas.max() > 0.6 * brightness


@pytest.mark.parametrize("kind", VIEW_FNS)
def test_contrast_alone_keeps_each_view_mean(kind):
    images = jax.random.uniform(_key(5), (16, 32, 32, 1), minval=0.85, maxval=0.95)
    # A gradient, so that crops at different positions have different means.
    images = images * jnp.linspace(0.5, 1.0, 32)[:, None, None]
    config = augment.AugmentConfig(pretrain_brightness=0.0)
    out = np.asarray(_batch(VIEW_FNS[kind], _key(6), images, config=config), np.float64)
    if kind == "global":  # the contrast centre is the mean of the view, not of the input
        identity = dataclasses.replace(config, pretrain_contrast=(1.0, 1.0))
        expected = np.asarray(_batch(VIEW_FNS[kind], _key(6), images, config=identity), np.float64)
    else:
        expected = np.asarray(images, np.float64)
    np.testing.assert_allclose(out.mean(axis=(1, 2, 3)), expected.mean(axis=(1, 2, 3)), atol=1e-5)
    assert np.abs(out - expected).max() > 1e-2  # contrast was applied


def test_pretraining_views_are_clipped():
    images = jax.random.uniform(_key(7), (16, 32, 32, 1), minval=0.0, maxval=1.5)
    for view_fn in VIEW_FNS.values():
        out = np.asarray(_batch(view_fn, _key(8), images))
        assert out.min() >= 0.0 and out.max() <= 1.5
        assert (out == 0.0).any() and (out == 1.5).any()


# ----------------------------------------------------------------------------------------------
# Fine-tuning geometry.


def _classify_affine(matrix: np.ndarray, config: augment.AugmentConfig) -> tuple[str, float]:
    """Names the recipe op a fitted (2, 2) output->input map belongs to, with its parameter."""
    if np.allclose(matrix, np.eye(2), atol=1e-5):
        return "identity", 0.0
    if np.allclose(matrix, np.diag([1.0, -1.0]), atol=1e-5):
        return "flip", 0.0
    if matrix[0, 0] > 0 and np.allclose(matrix, np.eye(2) * matrix[0, 0], atol=1e-5):
        zoom = 1.0 / matrix[0, 0]
        assert config.scale_range[0] - 1e-4 <= zoom <= config.scale_range[1] + 1e-4
        return "scale", zoom
    assert np.allclose(matrix @ matrix.T, np.eye(2), atol=1e-4) and np.linalg.det(matrix) > 0
    degrees = np.degrees(np.arctan2(matrix[1, 0], matrix[0, 0]))
    if abs(degrees) <= config.rotation_degrees + 1e-3:
        return "rotation", degrees
    step = (degrees / config.rotation_step_degrees) % 8
    assert abs(step - round(step)) < 1e-3, degrees
    return "rotation_step", round(step) % 8


def test_finetune_geometry_is_one_recipe_op_about_the_centre():
    batch, size = 200, 32
    config = augment.AugmentConfig(elastic_sigma=0.0, **NO_INTENSITY)
    labels = jnp.zeros((batch, size, size), jnp.int32)
    warped, _ = _batch(
        augment.finetune_pair, _key(9), _ramp_images(batch, size), labels, config=config
    )
    centre = np.full(2, (size - 1) / 2)
    counts = dict.fromkeys(augment.GEOMETRY_OPS, 0)
    steps = set()
    for example in np.asarray(warped):
        pixels, sources = _read_sources(example)
        assert len(pixels) > size * size // 3
        design = np.concatenate([pixels, np.ones((len(pixels), 1))], axis=1)
        solution, *_ = np.linalg.lstsq(design, sources, rcond=None)
        assert np.abs(design @ solution - sources).max() < 1e-3  # affine
        matrix, offset = solution[:2].T, solution[2]
        np.testing.assert_allclose(offset, centre - matrix @ centre, atol=1e-3)  # about centre
        op, parameter = _classify_affine(matrix, config)
        counts[op] += 1
        if op == "rotation_step":
            steps.add(parameter)
    # Uniform over the five ops: expected 40 each.
    assert all(20 <= count <= 60 for count in counts.values()), counts
    assert steps <= set(config.rotation_steps) and len(steps) >= 5, steps


def test_flip_is_exact():
    config = augment.AugmentConfig(geometry_weights=ONLY["flip"], elastic_sigma=0.0, **NO_INTENSITY)
    images = _random_images(2)
    labels = jnp.broadcast_to(jnp.asarray(_shapes_label(32)), (2, 32, 32))
    out_images, out_labels = _batch(augment.finetune_pair, _key(), images, labels, config=config)
    # Exact geometry; the identity contrast (x - mean) + mean may round in the last bit.
    np.testing.assert_allclose(out_images, np.asarray(images)[:, :, ::-1], rtol=0, atol=1e-6)
    np.testing.assert_array_equal(out_labels, np.asarray(labels)[:, :, ::-1])


def test_rotation_by_two_steps_is_a_quarter_turn():
    config = augment.AugmentConfig(
        geometry_weights=ONLY["rotation_step"],
        rotation_steps=(2,),
        elastic_sigma=0.0,
        **NO_INTENSITY,
    )
    images = _random_images(2)
    labels = jnp.broadcast_to(jnp.asarray(_shapes_label(32)), (2, 32, 32))
    out_images, out_labels = _batch(augment.finetune_pair, _key(), images, labels, config=config)
    # Output (r, c) reads input (W-1-c, r): np.rot90 with k=-1 (clockwise).
    np.testing.assert_allclose(out_images, np.rot90(images, k=-1, axes=(1, 2)), atol=1e-4)
    np.testing.assert_array_equal(out_labels, np.rot90(labels, k=-1, axes=(1, 2)))


@pytest.mark.parametrize("op, steps", [("identity", (1,)), ("rotation_step", (1,))])
def test_elastic_field_is_a_bicubic_upsampled_gaussian_grid_applied_after_the_affine(op, steps):
    batch, size, sigma = 48, 32, 2.0
    config = augment.AugmentConfig(
        geometry_weights=ONLY[op], rotation_steps=steps, elastic_sigma=sigma, **NO_INTENSITY
    )
    warped, _ = _batch(
        augment.finetune_pair,
        _key(10),
        _ramp_images(batch, size),
        jnp.zeros((batch, size, size), jnp.int32),
        config=config,
    )
    # Reference basis: jax.image.resize (Keys cubic) of each of the 9 control-point impulses.
    impulses = jnp.eye(9).reshape(9, 3, 3)
    basis = np.asarray(jax.image.resize(impulses, (9, size, size), method="cubic"))
    angle = np.radians(45.0) if op == "rotation_step" else 0.0
    matrix = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    centre = np.full(2, (size - 1) / 2)
    controls = []
    for example in np.asarray(warped):
        pixels, sources = _read_sources(example)
        # source = M (p + d(p) - c) + c, so d(p) = M⁻¹ (source - c) + c - p.
        displacement = (sources - centre) @ np.linalg.inv(matrix).T + centre - pixels
        design = basis[:, pixels[:, 0].astype(int), pixels[:, 1].astype(int)].T
        solution, *_ = np.linalg.lstsq(design, displacement, rcond=None)
        assert np.abs(design @ solution - displacement).max() < 2e-3
        controls.append(solution.ravel())
    controls = np.concatenate(controls)
    assert abs(controls.mean()) < 0.15 * sigma
    assert 0.9 * sigma < controls.std() < 1.1 * sigma


def test_label_follows_the_image_geometry():
    batch, size = 16, 64
    label = _shapes_label(size)
    config = augment.AugmentConfig(**NO_INTENSITY)
    labels = jnp.broadcast_to(jnp.asarray(label), (batch, size, size))
    for value in (1, 2, 3):
        indicator = jnp.broadcast_to(
            jnp.asarray(label == value, jnp.float32)[..., None], (batch, size, size, 1)
        )
        images, warped_labels = _batch(
            augment.finetune_pair, _key(11), indicator, labels, config=config
        )
        for image, warped_label in zip(np.asarray(images), np.asarray(warped_labels), strict=True):
            predicted, expected = image[..., 0] > 0.5, warped_label == value
            if expected.sum() < 30:
                continue  # structure pushed out of the field of view
            iou = (predicted & expected).sum() / (predicted | expected).sum()
            assert iou >= 0.9, (value, iou)


def test_labels_keep_their_values_and_dtype():
    label = np.zeros((32, 32), np.uint8)
    label[4:20, 6:25] = 2
    label[18:30, 3:14] = 5
    labels = jnp.broadcast_to(jnp.asarray(label), (16, 32, 32))
    _, out = _batch(augment.finetune_pair, _key(12), _random_images(16), labels)
    assert out.dtype == jnp.uint8
    assert set(np.unique(out)) <= {0, 2, 5}
    assert {2, 5} <= set(np.unique(out))


# ----------------------------------------------------------------------------------------------
# Batching (vmap, as in the training steps), jit and pmap. Keeping the un-augmented views of a
# G^{D-} / G^D batch is the steps' job: tests/train/test_steps.py.


def test_vmapped_augmentation_is_the_single_example_augmentation():
    config = augment.AugmentConfig(elastic_sigma=3.0, rotation_degrees=10.0)
    images = _random_images(4)
    labels = jnp.broadcast_to(jnp.asarray(_shapes_label(32)), (4, 32, 32))
    batch_images, batch_labels = _batch(
        augment.finetune_pair, _key(14), images, labels, config=config
    )
    batch_views = _batch(augment.global_view, _key(14), images, config=config)
    finetune_pair = jax.jit(functools.partial(augment.finetune_pair, config=config))
    global_view = jax.jit(functools.partial(augment.global_view, config=config))
    for index, key in enumerate(jax.random.split(_key(14), 4)):
        image, label = finetune_pair(key, images[index], labels[index])
        np.testing.assert_allclose(batch_images[index], image, atol=1e-5)
        assert np.mean(np.asarray(batch_labels[index]) == np.asarray(label)) > 0.999
        np.testing.assert_allclose(batch_views[index], global_view(key, images[index]), atol=1e-5)


def test_bound_config_compiles_once_for_new_keys():
    # Bound as in the training steps: partial(view, config=...), vmapped over per-example keys.
    view_fn = functools.partial(
        augment.global_view, config=augment.AugmentConfig(crop_fraction=0.75)
    )

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(key, images):
        return jax.vmap(view_fn)(jax.random.split(key, images.shape[0]), images)

    images = _random_images(2)
    first, second = step(_key(1), images), step(_key(2), images)
    assert not np.allclose(first, second)


def test_zero_weight_options_are_never_picked():
    # Boundary draws of U[0, 1): 0 and the largest float32 below 1.
    low, high = jnp.float32(0.0), jnp.nextafter(jnp.float32(1.0), jnp.float32(0.0))
    assert int(augment._pick(low, (0.0, 0.0, 1.0, 0.0, 0.0))) == 2
    assert int(augment._pick(high, (0.0, 0.0, 1.0, 0.0, 0.0))) == 2
    assert int(augment._pick(high, (0.3, 0.7, 0.0, 0.0, 0.0))) == 1
    assert int(augment._pick(jnp.float32(0.29), (0.3, 0.7, 0.0))) == 0
    assert int(augment._pick(jnp.float32(0.31), (0.3, 0.7, 0.0))) == 1


def test_runs_inside_pmap_with_one_key_per_device():
    devices = jax.local_device_count()
    images = _random_images(devices * 2).reshape(devices, 2, 32, 32, 1)
    labels = jnp.broadcast_to(jnp.asarray(_shapes_label(32)), (devices, 2, 32, 32))
    keys = jax.random.split(_key(15), devices)

    def step(key, images, labels):
        finetune_images, finetune_labels = _batch(augment.finetune_pair, key, images, labels)
        return _batch(augment.global_view, key, images), finetune_images, finetune_labels

    mapped = jax.pmap(step, axis_name="batch")(keys, images, labels)
    for device in range(devices):
        single = jax.jit(step)(keys[device], images[device], labels[device])
        np.testing.assert_allclose(mapped[0][device], single[0], atol=1e-5)
        np.testing.assert_allclose(mapped[1][device], single[1], atol=1e-5)
        np.testing.assert_array_equal(mapped[2][device], single[2])
    assert not np.allclose(mapped[0][0], mapped[0][1])


def test_warp_moves_image_and_label_by_the_field():
    """A constant field (0, 2) reads two columns to the right (the last column repeated at the
    border); (0.5, 0) averages each row with the next. Labels move with the image and stay
    distributions."""
    rng = np.random.default_rng(0)
    image = rng.uniform(0.0, 1.0, (8, 8, 1)).astype(np.float32)
    label = np.zeros((8, 8), np.int32)
    label[2:5, 3:6] = 2
    one_hot = np.eye(3, dtype=np.float32)[label]
    columns = np.minimum(np.arange(8) + 2, 7)
    shift = np.broadcast_to(np.array([0.0, 2.0], np.float32), (8, 8, 2))
    np.testing.assert_allclose(augment.warp(image, shift), image[:, columns], atol=1e-6)
    warped = augment.warp(one_hot, shift)
    np.testing.assert_allclose(warped, one_hot[:, columns], atol=1e-6)
    np.testing.assert_array_equal(np.argmax(warped, -1), label[:, columns])
    rows = np.minimum(np.arange(8) + 1, 7)
    half = np.broadcast_to(np.array([0.5, 0.0], np.float32), (8, 8, 2))
    np.testing.assert_allclose(
        augment.warp(image, half), 0.5 * (image + image[rows]), rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(np.sum(augment.warp(one_hot, half), -1), 1.0, rtol=1e-6)


def test_warp_of_an_integer_field_is_a_gather_and_differentiable():
    rng = np.random.default_rng(1)
    image = rng.uniform(0.0, 1.0, (8, 8, 2)).astype(np.float32)
    field = rng.integers(-3, 4, (8, 8, 2)).astype(np.float32)
    rows, cols = np.meshgrid(np.arange(8), np.arange(8), indexing="ij")
    source_rows = np.clip(rows + field[..., 0].astype(int), 0, 7)
    source_cols = np.clip(cols + field[..., 1].astype(int), 0, 7)
    np.testing.assert_allclose(
        augment.warp(image, field), image[source_rows, source_cols], atol=1e-6
    )
    np.testing.assert_allclose(augment.warp(image, field, order=0), image[source_rows, source_cols])
    # Pixel (3, 4) reads (3.5, 4.25): the bilinear surface's slopes there, by hand.
    inside = np.broadcast_to(np.array([0.5, 0.25], np.float32), (8, 8, 2))
    grad = jax.grad(lambda f: augment.warp(image, f)[3, 4, 0])(jnp.asarray(inside))
    x = image[..., 0]
    row_slope = 0.75 * (x[4, 4] - x[3, 4]) + 0.25 * (x[4, 5] - x[3, 5])
    col_slope = 0.5 * (x[3, 5] - x[3, 4]) + 0.5 * (x[4, 5] - x[4, 4])
    np.testing.assert_allclose(grad[3, 4], [row_slope, col_slope], rtol=1e-5)
    assert np.count_nonzero(grad) == 2  # only the field at the pixel read
