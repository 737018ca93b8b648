r"""Performance on paper: prints every number of docs/SCALING.md as Markdown.

For the paper's ACDC configuration (192² images, the batches of `jaxcl.train.recipes`):

1. FLOPs per step of every strategy from XLA's cost analysis of the real step functions
   (`jaxcl.train.steps`, mapped by `DataParallel` over one device), lowered with abstract inputs
   (nothing runs), checked against the multiply-adds of the layer table `unet_layers`. Every
   step is traced with XLA's convolutions and gradients (`convolution.xla_convolutions`), as a
   TPU or GPU runs it.
2. Expected step time and images/s on one TPU v4 chip and one H100 SXM: a roofline model of the
   step (`stage_time`: every convolution pass at max(FLOPs / peak, bytes / HBM bandwidth), plus
   the memory passes of BatchNorm and Adam) from the published figures in `CHIPS`, divided by an
   assumed efficiency (--roofline_efficiency).
3. Global batch, positives and negatives per anchor against the number of devices.
4. Memory of the gathered similarity matrix: the number of float32 similarity-sized buffers of
   the G^D loss is fitted to XLA's memory analysis of its compiled value and gradient (one device,
   and 8 CPU devices under shard_map); the G^D step's own temporary memory from one compilation.
5. Hours of the paper protocol on one accelerator: one cell, and the sweep of
   `python -m jaxcl.experiments --config=configs/acdc.py` (`jaxcl.experiments.plan`).

About 40 s of CPU time (lowering is cheap; 7 small compilations and one of the G^D step).
It starts jax with 8 host CPU devices for the data-parallel memory fit.

  PYTHONPATH=. python benchmarks/scaling.py
  PYTHONPATH=. python benchmarks/scaling.py --roofline_efficiency=0.7 --memory_fraction=0.05
"""

import dataclasses
import datetime
import functools
import math
import os
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags

from configs import acdc
from jaxcl import methods
from jaxcl.data import splits
from jaxcl.experiments import plan
from jaxcl.losses import contrastive, local
from jaxcl.models import (
    ByolNetwork,
    GlobalContrastiveModel,
    LocalContrastiveModel,
    UNet,
    convolution,
)
from jaxcl.models.unet import DEFAULT_FILTERS
from jaxcl.train import recipes, steps
from jaxcl.train.parallel import AXIS_NAME, DataParallel
from jaxcl.train.state import ByolState, TrainState

_EFFICIENCY = flags.DEFINE_float(
    "roofline_efficiency", 0.5, "Assumed share of the roofline model's speed a real step reaches."
)
_MEMORY_FRACTION = flags.DEFINE_float(
    "memory_fraction", 0.1, "Share of HBM the similarity buffers may take before blocking."
)
_DEVICE_COUNTS = flags.DEFINE_list("device_counts", ["1", "8", "64", "256"], "Devices tabulated.")

HOST_DEVICES = 8
SIZE = 192
NUM_CLASSES = 4  # ACDC: background, RV, Myo, LV
EMBEDDING, HIDDEN = 128, 1024
GIB, MIB = 2**30, 2**20
GLOBAL = ("GR", "GD-", "GD")
BYOL = ("BYOL", "BYOL-D")
LOCAL = methods.names(methods.LOCAL_STAGE)
STRATEGIES = (*GLOBAL, *BYOL, *LOCAL, "finetune")
# docs/METHOD.md §9 on ACDC: G^D, then L^R, then fine-tuning.
PAPER_STAGES = ("GD", "LR", "finetune")
# Adam per trained parameter: read parameter, gradient, m, v and write parameter, m, v (float32).
ADAM_BYTES = 7 * 4
# Activation-sized HBM passes of the BatchNorm + ReLU after a layer. Trained: statistics (read),
# normalise (read + write); backward: statistics of the cotangent (read cotangent and output),
# input gradient (read both again, write) = 8. Forward only: 3 with batch statistics (BYOL's
# target), 2 with running statistics (the frozen encoder of local pre-training).
BN_PASSES = {"train": 8, "forward_batch_stats": 3, "forward_running_stats": 2}
ITEMSIZE = {"bfloat16": 2, "float32": 4, "float32 highest": 4}


@dataclasses.dataclass(frozen=True)
class Chip:
    """Published figures of one chip (dense peaks in FLOP/s by compute mode, HBM in bytes)."""

    name: str
    hbm: str
    hbm_bytes: float
    bandwidth: float
    peaks: dict[str, float]
    matmul_units: dict[str, str]


# "float32" is jax's default matmul precision (TPU: one bfloat16 pass; H100: TF32 tensor cores),
# "float32 highest" is Precision.HIGHEST (TPU: six bfloat16 passes; H100: FP32 CUDA cores).
CHIPS = (
    Chip(
        "TPU v4",
        "32 GiB",
        32 * GIB,
        1200e9,
        {"bfloat16": 275e12, "float32": 275e12, "float32 highest": 275e12 / 6},
        {"bfloat16": "MXU", "float32": "MXU, 1 bf16 pass", "float32 highest": "MXU, 6 passes"},
    ),
    Chip(
        "H100 SXM",
        "80 GB",
        80e9,
        3350e9,
        {"bfloat16": 989.4e12, "float32": 494.7e12, "float32 highest": 66.9e12},
        {"bfloat16": "tensor cores", "float32": "tensor cores, TF32", "float32 highest": "FP32"},
    ),
)


def markdown(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    """A Markdown table followed by a blank line."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------
# The real steps, lowered with abstract inputs.


def _recipe(strategy: str) -> recipes.BatchRecipe:
    kind, units, views = methods.METHODS[strategy].batch
    return recipes.BatchRecipe(kind=kind, num_units=units, num_views=views)


def images_per_step(strategy: str) -> int:
    """Images of one paper batch of `strategy` ("finetune": 20, docs/METHOD.md §7)."""
    config = acdc.get_config()
    if strategy == "finetune":
        return config.finetune.batch_size
    return _recipe(strategy).images_per_step(config.data.n_partitions)


def _abstract_state(model, tx: optax.GradientTransformation) -> TrainState:
    def create():
        variables = model.init(jax.random.key(0), jnp.zeros((1, SIZE, SIZE, 1)), train=False)
        batch_stats = variables.get("batch_stats", {})
        return TrainState.create(params=variables["params"], batch_stats=batch_stats, tx=tx)

    return jax.eval_shape(create)


def _abstract_byol_state(online, target, tx: optax.GradientTransformation) -> ByolState:
    """Shapes of `steps.create_byol_state`: the target holds the online paths it has too."""
    state = _abstract_state(online, tx)
    image = jnp.zeros((1, SIZE, SIZE, 1))
    shapes = jax.eval_shape(lambda: target.init(jax.random.key(0), image, train=False))
    return ByolState(
        online=state,
        target_params={name: state.params[name] for name in shapes["params"]},
        target_batch_stats={name: state.batch_stats[name] for name in shapes["batch_stats"]},
    )


def build_step(strategy: str, dtype) -> tuple[Callable, tuple]:
    """(one-device step of `strategy` mapped as the trainer maps it, abstract arguments)."""
    config = acdc.get_config()
    common = {"dtype": dtype, "axis_name": AXIS_NAME}
    tx = optax.adam(config.pretrain_global.learning_rate)
    temperature = config.pretrain_global.temperature
    if strategy in GLOBAL:
        model = GlobalContrastiveModel(**common)
        state = _abstract_state(model, tx)
        step = functools.partial(
            steps.pretrain_global_step, model=model, strategy=strategy, temperature=temperature
        )
    elif strategy in BYOL:
        online, target = ByolNetwork(predict=True, **common), ByolNetwork(predict=False, **common)
        state = _abstract_byol_state(online, target, tx)
        step = functools.partial(
            steps.byol_step,
            online_model=online,
            target_model=target,
            total_steps=config.pretrain_global.steps,
            tau_base=config.pretrain_global.tau_base,
        )
    elif strategy in LOCAL:
        positions = local.region_positions(local_side(), kind="paper")
        model = LocalContrastiveModel(tuple(map(tuple, positions.tolist())), **common)
        state = _abstract_state(model, steps.frozen_encoder_tx(tx))
        step = functools.partial(
            steps.pretrain_local_step,
            model=model,
            strategy=strategy,
            temperature=temperature,
            num_anchors=local.PAPER_NUM_ANCHORS,
            views_per_group=_recipe(strategy).views_per_group(1),
        )
    else:
        model = UNet(NUM_CLASSES, **common)
        state = _abstract_state(model, tx)
        step = functools.partial(steps.finetune_step, model=model, num_classes=NUM_CLASSES)

    batch_size = images_per_step(strategy)
    batch = {"image": jax.ShapeDtypeStruct((batch_size, SIZE, SIZE, 1), jnp.float32)}
    if strategy == "finetune":
        batch["label"] = jax.ShapeDtypeStruct((batch_size, SIZE, SIZE), jnp.int32)
    else:
        ids = jax.ShapeDtypeStruct((batch_size,), jnp.int32)
        batch.update(sample_id=ids, partition_id=ids, view_id=ids)
    rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype)
    mapped = DataParallel("shard_map", devices=jax.devices()[:1]).map_step(step)
    return mapped, (state, batch, rng)


def xla_flops(function: Callable, args: Sequence) -> float:
    """FLOPs of `function(*args)` from XLA's cost analysis of the lowered (unoptimised) module.

    XLA counts a multiply-add as 2 FLOPs and only the convolution taps inside the image.
    """
    return float(function.lower(*args).cost_analysis()["flops"])


def unet_forward_flops() -> float:
    """XLA FLOPs of the UNet's train-mode forward pass on one image."""
    model = UNet(NUM_CLASSES)
    image = jnp.zeros((1, SIZE, SIZE, 1))
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), image, train=False))
    forward = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))
    return xla_flops(forward, (variables, jax.ShapeDtypeStruct(image.shape, image.dtype)))


# ----------------------------------------------------------------------------------------------
# Layer table and roofline model.


@dataclasses.dataclass(frozen=True)
class Layer:
    """One convolution or dense layer, counted per image.

    Attributes:
      name: parameter path, e.g. "encoder/level1_conv2".
      in_values, out_values: input and output activation elements.
      macs: multiply-adds over the convolution taps inside the image, the up-convolution in
        jaxcl's form (a 1x1 convolution to its 4 taps, `upsample_conv_2x`): what XLA's cost
        analysis counts for the convolutions.
      nominal_macs: textbook H·W·k·k·Cin·Cout, SAME padding taps included and the up-convolution
        as a 2x2 convolution of the upsampled map.
      params: weights.
      batch_norm: followed by BatchNorm + ReLU.
    """

    name: str
    in_values: int
    out_values: int
    macs: int
    nominal_macs: int
    params: int
    batch_norm: bool = True


def conv(name: str, side: int, cin: int, cout: int, kernel: int = 3, batch_norm=True) -> Layer:
    """A k x k SAME convolution (k odd) on a side² map.

    Per axis, k·side - (k² - 1) / 4 of the k·side (position, tap) pairs fall inside the image.
    """
    inside = (kernel * side - (kernel**2 - 1) // 4) ** 2
    pixels = side**2
    return Layer(
        name,
        pixels * cin,
        pixels * cout,
        inside * cin * cout,
        kernel**2 * pixels * cin * cout,
        kernel**2 * cin * cout,
        batch_norm,
    )


def upconv(name: str, low_side: int, cin: int, cout: int) -> Layer:
    """Nearest 2x upsampling + 2x2 SAME convolution, computed on the low_side² map.

    jaxcl computes it as one 1x1 convolution to the 4 taps' contributions (4·low² multiply-adds
    per (cin, cout)) and their shifted sum (`unet.upsample_conv_phases`), elementwise.
    """
    high = 2 * low_side
    macs = 4 * low_side**2 * cin * cout
    return Layer(
        name, low_side**2 * cin, high**2 * cout, macs, 4 * high**2 * cin * cout, 4 * cin * cout
    )


def dense(name: str, fan_in: int, fan_out: int, batch_norm: bool = False) -> Layer:
    """A dense layer without bias."""
    weights = fan_in * fan_out
    return Layer(name, fan_in, fan_out, weights, weights, weights, batch_norm)


def unet_layers(
    size: int, filters: Sequence[int] = DEFAULT_FILTERS, num_classes: int = NUM_CLASSES
) -> list[Layer]:
    """The UNet's convolutions for size² inputs (docs/METHOD.md §1): encoder, decoder, head."""
    layers, channels = [], 1
    for level, features in enumerate(filters, start=1):
        for index in (1, 2):
            name = f"encoder/level{level}_conv{index}"
            layers.append(conv(name, size >> (level - 1), channels, features))
            channels = features
    num_blocks = len(filters) - 1
    for block in range(1, num_blocks + 1):
        side, features = size >> (num_blocks - block), filters[num_blocks - block]
        prefix = f"decoder/block{block}"
        layers.append(upconv(f"{prefix}/upconv", side // 2, channels, features))
        layers.append(conv(f"{prefix}/conv1", side, 2 * features, features))
        if block < num_blocks:
            layers.append(conv(f"{prefix}/conv2", side, features, features))
        channels = features
    for index in (1, 2):
        layers.append(conv(f"segmentation_head/conv{index}", size, filters[0], filters[0]))
    layers.append(conv("segmentation_head/logits", size, filters[0], num_classes, batch_norm=False))
    return layers


def local_side() -> int:
    """Side of the feature map after the paper's l decoder blocks (48 for 192²)."""
    return SIZE >> (5 - acdc.get_config().model.num_decoder_blocks)


def stage_layers(strategy: str) -> list[tuple[Layer, str]]:
    """(layer, mode) of one step of `strategy`; mode "train" or a forward-only key of BN_PASSES."""
    unet = unet_layers(SIZE)
    encoder = [layer for layer in unet if layer.name.startswith("encoder/")]
    bottleneck = (SIZE >> 5) ** 2 * DEFAULT_FILTERS[-1]
    if strategy in GLOBAL:
        g1 = [dense("g1/hidden", bottleneck, HIDDEN), dense("g1/output", HIDDEN, EMBEDDING)]
        return [(layer, "train") for layer in encoder + g1]
    if strategy in BYOL:
        projector = [dense("projector/hidden", bottleneck, HIDDEN, batch_norm=True)]
        projector.append(dense("projector/output", HIDDEN, EMBEDDING))
        predictor = [dense("predictor/hidden", EMBEDDING, HIDDEN, batch_norm=True)]
        predictor.append(dense("predictor/output", HIDDEN, EMBEDDING))
        online = [(layer, "train") for layer in encoder + projector + predictor]
        return online + [(layer, "forward_batch_stats") for layer in encoder + projector]
    if strategy in LOCAL:
        blocks = acdc.get_config().model.num_decoder_blocks
        decoder = [
            layer
            for layer in unet
            if any(layer.name.startswith(f"decoder/block{k}/") for k in range(1, blocks + 1))
        ]
        side, channels = local_side(), DEFAULT_FILTERS[5 - blocks]
        g2 = [
            conv("g2/conv1", side, channels, channels, kernel=1),
            conv("g2/conv2", side, channels, channels, kernel=1, batch_norm=False),
        ]
        # One shared linear map of the 3x3 windows at the region positions.
        windows = len(local.region_positions(side, kind="paper"))
        embedding = dense("region_embedding", 9 * channels, EMBEDDING)
        embedding = dataclasses.replace(
            embedding,
            in_values=windows * embedding.in_values,
            out_values=windows * embedding.out_values,
            macs=windows * embedding.macs,
            nominal_macs=windows * embedding.macs,
        )
        trained = [(layer, "train") for layer in [*decoder, *g2, embedding]]
        return [(layer, "forward_running_stats") for layer in encoder] + trained
    return [(layer, "train") for layer in unet]


def analytic_flops(layers: Sequence[tuple[Layer, str]], batch: int) -> float:
    """2 FLOPs per multiply-add; a trained layer runs 3 products (forward, input gradient,
    weight gradient), a forward-only layer 1."""
    return sum(2 * batch * layer.macs * (3 if mode == "train" else 1) for layer, mode in layers)


def stage_time(
    layers: Sequence[tuple[Layer, str]], batch: int, peak: float, bandwidth: float, itemsize: int
) -> float:
    """Roofline time of one step, in seconds.

    Each of a layer's products (3 if trained, else 1) takes max(FLOPs / peak, bytes / bandwidth),
    its bytes being the input and output activations (`itemsize` bytes each) and the weights.
    BatchNorm + ReLU (`BN_PASSES` activation-sized passes) and Adam (`ADAM_BYTES` per trained
    parameter) only move memory. Pooling, concatenation, augmentation and the loss are left out.
    """
    seconds = 0.0
    for layer, mode in layers:
        products = 3 if mode == "train" else 1
        flops = 2 * batch * layer.macs
        traffic = itemsize * (batch * (layer.in_values + layer.out_values) + layer.params)
        seconds += products * max(flops / peak, traffic / bandwidth)
        if layer.batch_norm:
            seconds += BN_PASSES[mode] * itemsize * batch * layer.out_values / bandwidth
        if mode == "train":
            seconds += ADAM_BYTES * layer.params / bandwidth
    return seconds


# ----------------------------------------------------------------------------------------------
# Batch and negatives against devices; similarity memory.


def contrast_counts(strategy: str, num_devices: int) -> tuple[int, int, int]:
    """(global batch N in images, positives per anchor, negatives per anchor).

    Every device holds the paper's batch of `strategy`; S partitions. For G^R, G^{D-}, G^D an
    anchor is an image; for L^R, L^D it is a region of the 17 "paper" positions with
    negatives="all" (docs/METHOD.md §5), its group a slice (L^R) or a partition of the global
    batch (L^D).
    """
    if strategy not in (*GLOBAL, *LOCAL):
        raise ValueError(
            f"contrast_counts: {strategy!r} has no negatives; use GR, GD-, GD, LR, LD."
        )
    _, units, views = methods.METHODS[strategy].batch
    partitions = acdc.get_config().data.n_partitions
    n = images_per_step(strategy) * num_devices
    other_partitions = n * (partitions - 1) // partitions
    if strategy == "GR":
        return n, views - 1, n - views
    if strategy == "GD-":
        return n, views - 1, other_partitions
    if strategy == "GD":
        return n, n // partitions - 1, other_partitions
    positions = len(local.region_positions(local_side(), kind="paper"))
    group = views if strategy == "LR" else units * num_devices * views
    return n, group - 1, group * (positions - 1)


def gd_ids(global_batch: int) -> tuple[np.ndarray, np.ndarray]:
    """(sample_ids, partition_ids) of a G^D batch: slices of S partitions, 2 views each."""
    slices = np.repeat(np.arange(global_batch // 2, dtype=np.int32), 2)
    return slices, slices % acdc.get_config().data.n_partitions


def fit_buffers(
    anchors: Sequence[int], candidates: Sequence[int], temp_bytes: Sequence[int]
) -> tuple[float, float, float]:
    """Least squares of temp = a + b·C + k·4·A·C; returns (a, b, k), k the (A, C) f32 buffers."""
    a, c = np.asarray(anchors, float), np.asarray(candidates, float)
    design = np.stack([np.ones_like(c), c, 4 * a * c], axis=1)
    solution, *_ = np.linalg.lstsq(design, np.asarray(temp_bytes, float), rcond=None)
    return tuple(float(value) for value in solution)


def loss_temp_bytes(per_device: int, num_devices: int) -> int:
    """XLA temp bytes (per device) of the compiled value and gradient of the G^D loss."""
    if len(jax.devices()) < num_devices:
        raise ValueError(
            f"{num_devices} devices needed, jax has {len(jax.devices())}: run without "
            "--xla_force_host_platform_device_count in XLA_FLAGS (the script sets it)."
        )
    n = per_device * num_devices
    sample_ids, partition_ids = gd_ids(n)
    loss = functools.partial(contrastive.global_loss, strategy="GD", temperature=0.1)
    z = jax.ShapeDtypeStruct((n, EMBEDDING), jnp.float32)
    if num_devices == 1:
        function = jax.jit(jax.value_and_grad(lambda z: loss(z, sample_ids, partition_ids)))
        return function.lower(z).compile().memory_analysis().temp_size_in_bytes

    def per_device_grad(z, sample_ids, partition_ids):
        device_loss = functools.partial(loss, axis_name=AXIS_NAME)
        return jax.value_and_grad(device_loss)(z, sample_ids, partition_ids)

    split, replicated = jax.sharding.PartitionSpec(AXIS_NAME), jax.sharding.PartitionSpec()
    mapped = jax.shard_map(
        per_device_grad,
        mesh=jax.sharding.Mesh(np.asarray(jax.devices()[:num_devices]), (AXIS_NAME,)),
        in_specs=(split, split, split),
        out_specs=(replicated, split),
        check_vma=False,
    )
    ids = jax.ShapeDtypeStruct((n,), jnp.int32)
    return jax.jit(mapped).lower(z, ids, ids).compile().memory_analysis().temp_size_in_bytes


# ----------------------------------------------------------------------------------------------
# Sections; each prints Markdown.


def flops_section() -> dict[str, float]:
    """FLOPs per step of every strategy and the analytic cross-check; returns f32 XLA FLOPs."""
    flops, rows = {}, []
    for strategy in STRATEGIES:
        flops[strategy] = xla_flops(*build_step(strategy, jnp.float32))
        bf16 = xla_flops(*build_step(strategy, jnp.bfloat16)) if strategy in PAPER_STAGES else 0
        batch = images_per_step(strategy)
        analytic = analytic_flops(stage_layers(strategy), batch)
        cells = [flops[strategy], bf16, flops[strategy] / batch, analytic]
        rows.append([strategy, batch, *(f"{x / 1e9:.2f}" if x else "" for x in cells)])
        rows[-1].append(f"{flops[strategy] / analytic:.3f}")
    print("### FLOPs per step\n")
    header = ["strategy", "images/step", "XLA GFLOP/step, f32", "bf16", "XLA GFLOP/image"]
    print(markdown([*header, "analytic conv + dense GFLOP/step", "XLA / analytic"], rows))

    layers = unet_layers(SIZE)
    counts = {
        "nominal: Σ 2·H·W·k²·Cin·Cout": 2 * sum(layer.nominal_macs for layer in layers),
        "jaxcl's multiply-adds x 2: taps inside the image, low-resolution up-convolution": 2
        * sum(layer.macs for layer in layers),
        "XLA cost analysis of the train-mode forward pass": unet_forward_flops(),
    }
    print("### Cross-check: UNet forward pass, one 192² image\n")
    print(markdown(["count", "GFLOP"], [[name, f"{v / 1e9:.3f}"] for name, v in counts.items()]))
    return flops


def _group(layer: Layer) -> str:
    """Table row of a layer: encoder level, decoder block or segmentation head."""
    network, *rest = layer.name.split("/")
    if network == "encoder":
        return f"encoder {rest[0].split('_')[0]}"
    return f"decoder {rest[0]}" if network == "decoder" else network


def intensity_section() -> None:
    """Arithmetic intensity of the UNet's convolutions and the share of peak HBM allows them."""
    groups: dict[str, list[Layer]] = {}
    for layer in unet_layers(SIZE):
        groups.setdefault(_group(layer), []).append(layer)
    ridges = {chip.name: chip.peaks["bfloat16"] / chip.bandwidth for chip in CHIPS}
    rows = []
    for name, layers in groups.items():
        flops = 2 * sum(layer.macs for layer in layers)
        intensity = flops / (2 * sum(layer.in_values + layer.out_values for layer in layers))
        caps = [f"{min(1.0, intensity / ridge):.0%}" for ridge in ridges.values()]
        rows.append([name, len(layers), f"{flops / 1e9:.3f}", f"{intensity:.0f}", *caps])
    print("### Arithmetic intensity of the UNet's convolutions (forward, bf16 activations)\n")
    ridge_text = ", ".join(f"{name} {ridge:.0f}" for name, ridge in ridges.items())
    print(f"Ridge points, bf16 peak / HBM bandwidth, in FLOP/byte: {ridge_text}.\n")
    header = ["layers", "convs", "GFLOP/image", "FLOP/byte", *(f"cap {name}" for name in ridges)]
    print(markdown(header, rows))


def step_seconds(strategy: str, chip: Chip, mode: str) -> float:
    """Expected step time: the roofline time divided by --roofline_efficiency."""
    batch, itemsize = images_per_step(strategy), ITEMSIZE[mode]
    roofline = stage_time(stage_layers(strategy), batch, chip.peaks[mode], chip.bandwidth, itemsize)
    return roofline / _EFFICIENCY.value


def time_section(flops: dict[str, float]) -> None:
    """The chips, then step times, utilisation and images/s of the paper's three stages."""
    rows = [
        [chip.name, mode, chip.matmul_units[mode], f"{peak / 1e12:.1f}"]
        + [f"{chip.bandwidth / 1e9:,.0f}", chip.hbm]
        for chip in CHIPS
        for mode, peak in chip.peaks.items()
    ]
    print("### Chips\n")
    header = ["chip", "compute", "matmuls on", "peak TFLOP/s", "HBM GB/s", "HBM"]
    print(markdown(header, rows))

    efficiency, rows = _EFFICIENCY.value, []
    for chip in CHIPS:
        for mode, peak in chip.peaks.items():
            for strategy in PAPER_STAGES:
                seconds, batch = step_seconds(strategy, chip, mode), images_per_step(strategy)
                utilisation = flops[strategy] / (peak * seconds)
                rows.append([chip.name, mode, strategy, batch, f"{1e3 * efficiency * seconds:.2f}"])
                rows[-1] += [f"{utilisation / efficiency:.0%}", f"{1e3 * seconds:.2f}"]
                rows[-1] += [f"{utilisation:.0%}", f"{batch / seconds:,.0f}"]
    print(f"### Expected step time (roofline time / {efficiency:g})\n")
    header = ["chip", "compute", "stage", "images", "roofline ms", "utilisation", "expected ms"]
    print(markdown([*header, "utilisation", "images/s"], rows))


def negatives_section() -> None:
    """Global batch, positives and negatives per anchor against devices, and the ACDC pool."""
    pool = len(splits.get_split("acdc", "pretrain"))
    rows = []
    for strategy in (*GLOBAL, *LOCAL):
        kind, units, _ = methods.METHODS[strategy].batch
        anchors = images_per_step(strategy)
        if strategy in LOCAL:
            anchors *= local.PAPER_NUM_ANCHORS  # regions
        for devices in map(int, _DEVICE_COUNTS.value):
            drawn = units * devices
            if kind == "random":
                drawn_text, fits = f"{drawn} slices", ""
            else:
                drawn_text, fits = f"{drawn} volumes", "yes" if drawn <= pool else "no"
            rows.append([strategy, devices, *contrast_counts(strategy, devices)])
            rows[-1] += [anchors, drawn_text, fits]
    print("### Batch and negatives against devices (the paper's batch on every device)\n")
    header = ["strategy", "devices", "global batch", "positives/anchor", "negatives/anchor"]
    print(markdown([*header, "anchors/device", "drawn per step", f"≤ {pool} volumes"], rows))


def memory_section() -> None:
    """Fitted similarity buffers, the gathered matrix at 8/64/256 devices, when to block."""
    single_sizes, per_device_sizes = (256, 512, 1024), (48, 96, 192)
    single = [loss_temp_bytes(n, 1) for n in single_sizes]
    sharded = [loss_temp_bytes(a, HOST_DEVICES) for a in per_device_sizes]
    a1, b1, k1 = fit_buffers(single_sizes, single_sizes, single)
    k8 = fit_buffers(per_device_sizes, [HOST_DEVICES * a for a in per_device_sizes], sharded)[2]
    step, args = build_step("GD", jnp.float32)
    step_temp = step.lower(*args).compile().memory_analysis().temp_size_in_bytes
    anchors = images_per_step("GD")

    def mib(values):
        return ", ".join(f"{value / MIB:.2f}" for value in values)

    rows = [
        ["one device, all anchors", ", ".join(map(str, single_sizes)), mib(single), f"{k1:.2f}"],
        [
            f"{HOST_DEVICES} CPU devices, shard_map",
            ", ".join(f"{a} x {HOST_DEVICES * a}" for a in per_device_sizes),
            mib(sharded),
            f"{k8:.2f}",
        ],
    ]
    print("### Similarity buffers of the G^D loss (value and gradient, float32)\n")
    print(markdown(["program", "N, or A x N per device", "XLA temp MiB", "fitted buffers"], rows))
    predicted = a1 + b1 * 3072 + k1 * 4 * 3072**2
    print(
        f"The one-device fit predicts {predicted / MIB:.1f} MiB of temp memory at N = 3072 (one "
        f"3072² float32 matrix is {4 * 3072**2 / MIB:.1f} MiB). The G^D step itself (batch "
        f"{anchors}, float32, XLA:CPU) has {step_temp / GIB:.2f} GiB of temp memory.\n"
    )

    rows = []
    for devices in (8, 64, 256):
        n = anchors * devices
        sizes = [4 * EMBEDDING * n, 4 * anchors * n, k8 * 4 * anchors * n, 4 * n * n]
        sizes.append(k1 * 4 * n * n)
        rows.append([devices, f"{n:,}", *(f"{size / MIB:,.1f}" for size in sizes)])
        rows[-1] += [f"{k1 * 4 * n * n / chip.hbm_bytes:.1%}" for chip in CHIPS]
    print("### Gathered similarity matrix of G^D (float32, MiB)\n")
    header = ["devices", "N", "gathered z", f"{anchors} x N", f"x {k8:.2f}", "N x N"]
    print(markdown([*header, f"x {k1:.2f}", *(f"of {chip.name} HBM" for chip in CHIPS)], rows))

    fraction, rows = _MEMORY_FRACTION.value, []
    for chip in CHIPS:
        budget = fraction * chip.hbm_bytes
        per_device = budget / (4 * k8 * anchors)
        rows.append([chip.name, f"{budget / GIB:.1f}", f"{math.sqrt(budget / (4 * k1)):,.0f}"])
        rows[-1].append(f"{per_device:,.0f} ({per_device / anchors:,.0f} devices)")
    print(f"### When to block: similarity buffers above {fraction:.0%} of HBM\n")
    header = ["chip", "budget GiB", "N, all anchors on one device", f"N, {anchors} per device"]
    print(markdown(header, rows))
    against_step = fraction * step_temp / (4 * k8 * anchors)
    print(
        f"Against the G^D step's own temp memory: the {anchors} x N buffers reach {fraction:.0%} "
        f"of it at N = {against_step:,.0f} ({against_step / anchors:,.0f} devices).\n"
    )


def protocol_section() -> None:
    """Hours of one protocol cell and of the ACDC sweep (`jaxcl.experiments.plan`) on one chip."""
    config = acdc.get_config()
    g, l, f = config.pretrain_global.steps, config.pretrain_local.steps, config.finetune.steps
    chosen = plan.selection(config, splits.paper_splits("acdc"))
    pretrainings = [
        (l, run.local_name) if run.local_name else (g, run.global_name)
        for run in plan.pretrainings(chosen.inits)
    ]
    cells = len(plan.cells(chosen))
    print("### Hours per cell and per sweep\n")
    print(
        f"One cell = {g:,}·t(GD) + {l:,}·t(LR) + {f:,}·t(finetune). Sweep = Σ steps·t(strategy) "
        f"over its {len(pretrainings)} pre-trainings ({', '.join(s for _, s in pretrainings)}) + "
        f"{cells}·{f:,}·t(finetune) for its {cells} fine-tuning cells.\n"
    )
    rows = []
    for chip in CHIPS:
        for mode in chip.peaks:
            t = {strategy: step_seconds(strategy, chip, mode) for strategy in STRATEGIES}
            cell = g * t["GD"] + l * t["LR"] + f * t["finetune"]
            pretraining = sum(steps * t[strategy] for steps, strategy in pretrainings)
            sweep = pretraining + cells * f * t["finetune"]
            rows.append([chip.name, mode, f"{cell / 60:.1f}", f"{pretraining / 3600:.2f}"])
            rows[-1].append(f"{sweep / 3600:.1f}")
    header = ["chip", "compute", "one cell, min", "sweep pre-training, h", "sweep, h"]
    print(markdown(header, rows))


def main(argv: list[str]) -> None:
    del argv
    # XLA reads XLA_FLAGS when the CPU backend starts (the first computation), not at import.
    xla_flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in xla_flags:
        count = f"--xla_force_host_platform_device_count={HOST_DEVICES}"
        os.environ["XLA_FLAGS"] = f"{xla_flags} {count}".strip()
    print(
        f"Generated by `PYTHONPATH=. python benchmarks/scaling.py --roofline_efficiency="
        f"{_EFFICIENCY.value:g} --memory_fraction={_MEMORY_FRACTION.value:g}` with jax "
        f"{jax.__version__} on {datetime.date.today().isoformat()}.\n"
    )
    # XLA's convolutions and gradients throughout, as on a TPU or GPU: on CPU, float32 kernel
    # gradients would otherwise come from TensorFlow, which XLA's analyses do not see.
    with convolution.xla_convolutions():
        flops = flops_section()
        intensity_section()
        time_section(flops)
        negatives_section()
        memory_section()
        protocol_section()


if __name__ == "__main__":
    app.run(main)
