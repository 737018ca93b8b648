"""On-device data augmentation (docs/METHOD.md §8), pure JAX, one PRNG key per example.

Three recipes, each for one example; the training steps (`jaxcl.train.steps`) vmap them over a
batch with one key per example:

- global pre-training views (`global_view`): a random crop of `crop_fraction` of the image,
  resized back bilinearly, then brightness and contrast, clipped;
- local pre-training views (`local_view`): brightness and contrast only, so a pixel position
  shows the same anatomy in every view of a slice (docs/METHOD.md §5);
- fine-tuning pairs (`finetune_pair`): one of {small rotation, scale, left-right flip, rotation
  by a multiple of 45°, identity}, then an elastic deformation, then brightness and contrast on
  the image only.

`warp` applies a given dense displacement field with the same sampling (the generated
deformations of task-driven augmentation, docs/METHOD.md §19).

Geometry is expressed as a sampling coordinate map: for every output pixel, the (row, col)
position in the input it is read from. The affine part and the elastic field of fine-tuning are
composed into one map and image and label are sampled once from it (image bilinear, label
nearest), so the two always receive exactly the same geometry and nothing is interpolated twice.
Positions outside the input read 0 (background for labels).

Intensity augmentation is drawn per image (docs/METHOD.md §13). Everything is jit/vmap/pmap
friendly; bind the config with `functools.partial` before `jax.jit`. The steps derive each
example's key from its index in the global batch (`jaxcl.train.steps.example_keys`), so the views
do not depend on the number of devices.

Shapes: an image is (H, W, C) (C = 1 in jaxcl), a label an (H, W) integer class map.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.ndimage import map_coordinates

# Order of `AugmentConfig.geometry_weights`.
GEOMETRY_OPS = ("rotation", "scale", "flip", "rotation_step", "identity")


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """Augmentation parameters; defaults are the values of docs/METHOD.md §8.

    Attributes:
      crop_fraction: side of the global-view crop as a fraction of the image side (100/192 as
        the original at 192²); the crop side is `round(crop_fraction * H)` (and `* W`).
      pretrain_brightness: pre-training brightness offset δ ~ U(-b, b).
      pretrain_contrast: pre-training contrast factor range (about the image mean).
      pretrain_clip: pre-training views are clipped to this intensity range.
      rotation_degrees: fine-tuning small rotation angle ~ U(-r, r) degrees.
      scale_range: fine-tuning zoom factor range (> 1 zooms in).
      rotation_step_degrees: step of the coarse rotation (45°).
      rotation_steps: the coarse rotation is k · step with k uniform in this set.
      geometry_weights: relative probabilities of the fine-tuning ops, in `GEOMETRY_OPS` order
        (rotation, scale, flip, rotation_step, identity); uniform by default.
      elastic_sigma: std of the elastic control-point displacements, in pixels, per axis.
      elastic_grid: the control points form an `elastic_grid × elastic_grid` grid.
      finetune_brightness: fine-tuning brightness offset δ ~ U(-b, b).
      finetune_contrast: fine-tuning contrast factor range, about the mean of the input image.
        Fine-tuning images are not clipped, since evaluation images are not either.
    """

    crop_fraction: float = 100 / 192
    pretrain_brightness: float = 0.3
    pretrain_contrast: tuple[float, float] = (0.7, 1.3)
    pretrain_clip: tuple[float, float] = (0.0, 1.5)
    rotation_degrees: float = 15.0
    scale_range: tuple[float, float] = (0.95, 1.05)
    rotation_step_degrees: float = 45.0
    rotation_steps: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 7)
    geometry_weights: tuple[float, ...] = (1.0, 1.0, 1.0, 1.0, 1.0)
    elastic_sigma: float = 5.0
    elastic_grid: int = 3
    finetune_brightness: float = 0.1
    finetune_contrast: tuple[float, float] = (0.8, 1.2)

    def __post_init__(self):
        # Configs from ml_collections hand over lists; tuples keep the dataclass hashable.
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, list):
                object.__setattr__(self, field.name, tuple(value))
        _check(0.0 < self.crop_fraction <= 1.0, "crop_fraction", "a number in (0, 1]", self)
        for name in ("pretrain_brightness", "finetune_brightness", "rotation_degrees"):
            _check(getattr(self, name) >= 0.0, name, "a non-negative number", self)
        for name in ("pretrain_contrast", "finetune_contrast", "scale_range", "pretrain_clip"):
            low, high = getattr(self, name)
            _check(low <= high, name, "a (low, high) pair with low <= high", self)
        _check(self.scale_range[0] > 0.0, "scale_range", "positive zoom factors", self)
        _check(len(self.rotation_steps) > 0, "rotation_steps", "a non-empty list of ints", self)
        weights = self.geometry_weights
        _check(
            len(weights) == len(GEOMETRY_OPS) and min(weights) >= 0.0 and sum(weights) > 0.0,
            "geometry_weights",
            f"{len(GEOMETRY_OPS)} non-negative weights for {GEOMETRY_OPS}, not all zero",
            self,
        )
        _check(self.elastic_sigma >= 0.0, "elastic_sigma", "a non-negative number", self)
        _check(self.elastic_grid >= 1, "elastic_grid", "a positive int", self)


def _check(ok: bool, name: str, expected: str, config: AugmentConfig) -> None:
    if not ok:
        raise ValueError(
            f"config.augment.{name} = {getattr(config, name)!r} is invalid: set it to {expected}."
        )


# ----------------------------------------------------------------------------------------------
# Building blocks.


def _sample(image: jax.Array, coordinates: jax.Array, order: int) -> jax.Array:
    """Reads `image` (H, W, C) at `coordinates` (2, H', W') (row, col); outside reads 0.

    Keep the result to a single elementwise consumer: when it is also reduced (e.g. its mean),
    XLA on CPU materialises the interpolation taps as separate gathers, about 5x slower.
    """
    read = functools.partial(map_coordinates, coordinates=list(coordinates), order=order)
    return jax.vmap(read, in_axes=-1, out_axes=-1)(image)


def _between(uniform: jax.Array, low: float, high: float) -> jax.Array:
    """Maps a U[0, 1) draw to U[low, high)."""
    return low + (high - low) * uniform


def _pick(uniform: jax.Array, weights: Sequence[float]) -> jax.Array:
    """Index i drawn with probability weights[i] / sum(weights) from a U[0, 1) draw.

    Inverse CDF with static boundaries; an option of weight 0 owns an empty interval (and a
    boundary followed only by zero weights is moved to +inf), so it is never drawn.
    """
    cumulative = np.cumsum(np.asarray(weights, np.float64))
    boundaries = cumulative[:-1] / cumulative[-1]
    boundaries[cumulative[:-1] == cumulative[-1]] = np.inf
    return jnp.searchsorted(jnp.asarray(boundaries, jnp.float32), uniform, side="right")


def _intensity(
    uniforms: jax.Array,
    image: jax.Array,
    mean: jax.Array,
    brightness: float,
    contrast: tuple[float, float],
) -> jax.Array:
    """Brightness δ ~ U(-brightness, brightness) and contrast c about `mean`: (x - m)·c + m + δ.

    Args:
      uniforms: (2,) U[0, 1) draws for δ and c.
      image: (H, W, C).
      mean: (C,) contrast centre, the per-channel image mean.
    """
    delta = _between(uniforms[0], -brightness, brightness)
    factor = _between(uniforms[1], *contrast)
    return (image - mean) * factor + mean + delta


def _crop_coordinates(
    top: jax.Array, left: jax.Array, crop_shape: tuple[int, int], out_shape: tuple[int, int]
) -> jax.Array:
    """Sampling map (2, H, W) of a bilinear resize of the crop at (top, left) to `out_shape`.

    Half-pixel-centre convention (as `jax.image.resize`): output pixel i reads crop position
    (i + 0.5) · crop / out - 0.5, clamped to the crop so only crop pixels are read.
    """
    axes = []
    for start, crop, out in zip((top, left), crop_shape, out_shape, strict=True):
        position = (jnp.arange(out, dtype=jnp.float32) + 0.5) * (crop / out) - 0.5
        axes.append(start + jnp.clip(position, 0.0, crop - 1.0))
    return jnp.stack(jnp.meshgrid(*axes, indexing="ij"))


def _resized_mean(image: jax.Array, coordinates: jax.Array) -> jax.Array:
    """(C,) mean of `_sample(image, coordinates, 1)` for a separable, in-image sampling map.

    The bilinear resize is rows @ image @ cols.T with tent weights, so its mean is
    mean(rows, 0) @ image @ mean(cols, 0): exact, and computed without reading the view.
    """
    weights = []
    for axis, positions in enumerate((coordinates[0, :, 0], coordinates[1, 0, :])):
        pixels = jnp.arange(image.shape[axis], dtype=jnp.float32)
        tent = jnp.maximum(0.0, 1.0 - jnp.abs(positions[:, None] - pixels[None, :]))
        weights.append(jnp.mean(tent, axis=0))
    return jnp.einsum("h,hwc,w->c", weights[0], image, weights[1])


def _rotation(angle: jax.Array) -> jax.Array:
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    return jnp.array([[cos, -sin], [sin, cos]])


def _geometry_matrix(uniforms: jax.Array, config: AugmentConfig) -> jax.Array:
    """(2, 2) map from output to input offsets about the image centre, one op of GEOMETRY_OPS.

    `uniforms`: (4,) U[0, 1) draws for the op, the angle, the zoom and the rotation step.
    """
    max_angle = math.radians(config.rotation_degrees)
    angle = _between(uniforms[1], -max_angle, max_angle)
    scale = _between(uniforms[2], *config.scale_range)
    uniform_step = _pick(uniforms[3], [1.0] * len(config.rotation_steps))
    step = jnp.asarray(config.rotation_steps)[uniform_step]
    step_angle = step * math.radians(config.rotation_step_degrees)
    candidates = jnp.stack(
        [
            _rotation(angle),
            jnp.eye(2) / scale,
            jnp.diag(jnp.array([1.0, -1.0])),
            _rotation(step_angle),
            jnp.eye(2),
        ]
    )
    return candidates[_pick(uniforms[0], config.geometry_weights)]


def _cubic_upsampling_matrix(out_size: int, in_size: int) -> np.ndarray:
    """(out, in) weights of a bicubic (Keys, a = -0.5) resize along one axis.

    Half-pixel centres; taps outside the input are dropped and each row renormalised, as
    `jax.image.resize(method="cubic")` does. A constant, so the elastic upsampling is two tiny
    matmuls instead of a traced resize.
    """
    source = (np.arange(out_size) + 0.5) * (in_size / out_size) - 0.5
    distance = np.abs(source[:, None] - np.arange(in_size)[None, :])
    a = -0.5
    near = ((a + 2) * distance - (a + 3)) * distance**2 + 1
    far = ((a * distance - 5 * a) * distance + 8 * a) * distance - 4 * a
    weights = np.where(distance <= 1, near, np.where(distance < 2, far, 0.0))
    return (weights / weights.sum(axis=1, keepdims=True)).astype(np.float32)


def _elastic_displacement(
    key: jax.Array, shape: tuple[int, int], sigma: float, grid: int
) -> jax.Array:
    """Dense displacement (2, H, W) in pixels: N(0, σ²) control grid, bicubic-upsampled."""
    control = sigma * jax.random.normal(key, (2, grid, grid))
    rows, cols = (_cubic_upsampling_matrix(size, grid) for size in shape)
    return jnp.einsum("hi,cij,wj->chw", rows, control, cols)


def _pixel_grid(shape: tuple[int, int]) -> jax.Array:
    """(2, H, W) float32 (row, col) position of every pixel: the identity sampling map."""
    return jnp.stack(
        jnp.meshgrid(*(jnp.arange(n, dtype=jnp.float32) for n in shape), indexing="ij")
    )


def _finetune_coordinates(
    uniforms: jax.Array, elastic_key: jax.Array, shape: tuple[int, int], config: AugmentConfig
) -> jax.Array:
    """Sampling map (2, H, W): elastic deformation applied after the random affine op.

    Output pixel p is first displaced by the elastic field d(p), then mapped through the affine
    op about the image centre c: source = M · (p + d(p) - c) + c. `uniforms`: (4,) U[0, 1)
    draws for `_geometry_matrix`.
    """
    displaced = _pixel_grid(shape) + _elastic_displacement(
        elastic_key, shape, config.elastic_sigma, config.elastic_grid
    )
    centre = jnp.array([(n - 1) / 2 for n in shape], jnp.float32)[:, None, None]
    matrix = _geometry_matrix(uniforms, config)
    return jnp.einsum("ij,jhw->ihw", matrix, displaced - centre) + centre


def warp(image: jax.Array, displacement: jax.Array, order: int = 1) -> jax.Array:
    """A dense deformation: output pixel p reads `image` at p + displacement[p].

    Positions are clamped to the image, so its border extends outward: a warped one-hot label
    stays a distribution over classes at every pixel (the fine-tuning augmentation reads 0
    outside instead). Bilinear reading (order 1) is differentiable in `displacement`, which lets
    a network that generates the field learn through the warp (task-driven augmentation,
    docs/METHOD.md §19).

    Args:
      image: (H, W, C) float image or class probabilities.
      displacement: (H, W, 2) (row, col) offsets in pixels.
      order: 1 bilinear, 0 nearest.

    Returns:
      (H, W, C) float32.
    """
    chex.assert_rank([image, displacement], [3, 3])
    chex.assert_equal_shape_prefix([image, displacement], 2)
    shape = image.shape[:2]
    coordinates = _pixel_grid(shape) + jnp.moveaxis(displacement.astype(jnp.float32), -1, 0)
    last = jnp.array([n - 1 for n in shape], jnp.float32)[:, None, None]
    return _sample(image.astype(jnp.float32), jnp.clip(coordinates, 0.0, last), order)


# ----------------------------------------------------------------------------------------------
# One example.


def global_view(
    key: jax.Array, image: jax.Array, config: AugmentConfig = AugmentConfig()
) -> jax.Array:
    """Global pre-training view: random crop resized back, brightness, contrast, clip.

    Args:
      key: PRNG key for this example.
      image: (H, W, C) float image.
      config: augmentation parameters.

    Returns:
      (H, W, C) float32 view in `config.pretrain_clip`.
    """
    chex.assert_rank(image, 3)
    height, width = image.shape[:2]
    crop_shape = (round(config.crop_fraction * height), round(config.crop_fraction * width))
    # One draw for all parameters: each jax.random call adds a threefry kernel to compile.
    uniforms = jax.random.uniform(key, (4,))
    top, left = (  # uniform over the crop positions 0 .. size - crop
        jnp.minimum(jnp.floor(uniform * (size - crop + 1)), size - crop)
        for uniform, size, crop in zip(uniforms[:2], (height, width), crop_shape, strict=True)
    )
    coordinates = _crop_coordinates(top, left, crop_shape, (height, width))
    image = image.astype(jnp.float32)
    view = _sample(image, coordinates, order=1)
    mean = _resized_mean(image, coordinates)
    view = _intensity(
        uniforms[2:], view, mean, config.pretrain_brightness, config.pretrain_contrast
    )
    return jnp.clip(view, *config.pretrain_clip)


def local_view(
    key: jax.Array, image: jax.Array, config: AugmentConfig = AugmentConfig()
) -> jax.Array:
    """Local pre-training view: brightness and contrast only (no geometry), clipped.

    Args:
      key: PRNG key for this example.
      image: (H, W, C) float image.
      config: augmentation parameters.

    Returns:
      (H, W, C) float32 view in `config.pretrain_clip`.
    """
    chex.assert_rank(image, 3)
    image = image.astype(jnp.float32)
    mean = jnp.mean(image, axis=(0, 1))
    uniforms = jax.random.uniform(key, (2,))
    view = _intensity(uniforms, image, mean, config.pretrain_brightness, config.pretrain_contrast)
    return jnp.clip(view, *config.pretrain_clip)


def finetune_pair(
    key: jax.Array, image: jax.Array, label: jax.Array, config: AugmentConfig = AugmentConfig()
) -> tuple[jax.Array, jax.Array]:
    """Fine-tuning augmentation of an (image, label) pair with one shared sampling map.

    Args:
      key: PRNG key for this example.
      image: (H, W, C) float image.
      label: (H, W) integer class map.
      config: augmentation parameters.

    Returns:
      image (H, W, C) float32 (bilinear, then brightness and contrast about the input's mean)
      and label (H, W) of the input dtype (nearest, so values stay in the input's value set
      plus background 0).
    """
    chex.assert_rank([image, label], [3, 2])
    chex.assert_equal_shape_prefix([image, label], 2)
    uniform_key, elastic_key = jax.random.split(key)
    uniforms = jax.random.uniform(uniform_key, (6,))
    coordinates = _finetune_coordinates(uniforms[:4], elastic_key, label.shape, config)
    image = image.astype(jnp.float32)
    # Contrast about the input's mean: the warped image's own mean differs only by the padded
    # border, and reading the warp twice is slow on CPU (see `_sample`).
    mean = jnp.mean(image, axis=(0, 1))
    warped = _sample(image, coordinates, order=1)
    label = _sample(label[..., None], coordinates, order=0)[..., 0]
    image = _intensity(
        uniforms[4:], warped, mean, config.finetune_brightness, config.finetune_contrast
    )
    return image, label
