r"""Speed of jaxcl's real training steps at 192² and the paper's batch sizes, vs the matmul peak.

For every stage (G^R, G^{D-}, G^D, BYOL, BYOL-D, L^R, L^D, fine-tuning) this builds the state,
batch and step exactly as `jaxcl.train.trainer` does for `configs/acdc.py` (paper
hyper-parameters; batches from `jaxcl.data.pipeline` over random volumes), maps the step with
`DataParallel` over the local devices, and prints:

- compile time (lower + XLA compile) and the median step time of `--repeats` calls;
- images/s and FLOPs per step from XLA's cost analysis of the lowered step (a convolution counts
  its multiply-adds as 2 FLOPs, without SAME padding), the achieved GFLOP/s and that as a
  fraction of the float32 matmul peak measured in the same run (best of 10 jitted `jnp.dot`s);
- for pre-training, the share of the step spent in augmentation and the loss: the views alone
  and the loss's value and gradient with respect to the network outputs alone, each jitted and
  timed the same way, divided by the step time.

Run from the repository root (the first line applies `jaxcl.runtime`'s CPU settings, as the
trainer does; `JAXCL_CPU_TUNING=0` measures XLA's defaults):

  PYTHONPATH=. python benchmarks/train_step.py
  PYTHONPATH=. python benchmarks/train_step.py --stages=finetune,GD --repeats=5

The 1-minute load average is printed with every line: on a shared machine only low-load numbers
mean anything.
"""

from jaxcl import runtime

if __name__ == "__main__":
    runtime.tune_cpu_process()

import dataclasses  # noqa: E402 - after the process settings above
import functools  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from absl import app, flags  # noqa: E402

from configs import acdc  # noqa: E402
from jaxcl import augment  # noqa: E402
from jaxcl.data import pipeline  # noqa: E402
from jaxcl.losses import byol as byol_loss  # noqa: E402
from jaxcl.losses import contrastive, local  # noqa: E402
from jaxcl.models import stages as stage_models  # noqa: E402
from jaxcl.models.unet import UNet  # noqa: E402
from jaxcl.train import recipes, steps  # noqa: E402
from jaxcl.train.parallel import AXIS_NAME, DataParallel  # noqa: E402

STAGES = ("GR", "GD-", "GD", "byol", "byol-GD", "LR", "LD", "finetune")
_STAGES = flags.DEFINE_list("stages", list(STAGES), f"Any of {', '.join(STAGES)}.")
_REPEATS = flags.DEFINE_integer("repeats", 8, "Timed steps per stage (the median is reported).")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps after compilation.")
_PEAK_SIZE = flags.DEFINE_integer("peak_size", 2048, "Side of the peak matmul's matrices.")
_NUM_CLASSES = 4  # ACDC: background, RV, myocardium, LV


def _load() -> float:
    return os.getloadavg()[0]


def matmul_peak_gflops(size: int, repeats: int = 10) -> float:
    """Best GFLOP/s of a jitted float32 (size, size) @ (size, size) matmul over `repeats` calls."""
    a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (size, size), jnp.float32)
    dot = jax.jit(jnp.dot)
    jax.block_until_ready(dot(a, b))
    return max(2 * size**3 / _seconds(lambda: dot(a, b)) / 1e9 for _ in range(repeats))


def _seconds(call: Callable[[], object]) -> float:
    start = time.perf_counter()
    jax.block_until_ready(call())
    return time.perf_counter() - start


@dataclasses.dataclass(frozen=True)
class _Volume:
    """The fields of `preprocess.Volume` that the pipeline reads."""

    subject_id: str
    image: np.ndarray
    label: np.ndarray


def _pool(image_size: int, num_partitions: int) -> pipeline.SlicePool:
    """12 random 10-slice volumes (the step's speed does not depend on the pixel values)."""
    rng = np.random.default_rng(0)
    shape = (10, image_size, image_size)
    volumes = [
        _Volume(
            f"{index:03d}",
            rng.uniform(0, 1, shape).astype(np.float32),
            rng.integers(0, _NUM_CLASSES, shape).astype(np.uint8),
        )
        for index in range(12)
    ]
    return pipeline.build_slice_pool(volumes, num_partitions=num_partitions)


@dataclasses.dataclass
class Case:
    """A stage's mapped step with its state, one host batch, and its pieces for the overhead."""

    step: Callable
    state: object
    batch: dict
    images: int
    views: Callable | None = None  # rng, batch -> views (mapped like the step)
    loss_grad: Callable | None = None  # (outputs, batch) -> (loss, d loss / d outputs)
    outputs: jax.ShapeDtypeStruct | None = None  # per-device network outputs


def _model_options(config) -> dict:
    return {"filters": tuple(config.model.filters), "dtype": jnp.float32, "axis_name": AXIS_NAME}


def _mapped_views(parallel, view_fn, mask_fn=None):
    def views(batch, rng):
        mask = None if mask_fn is None else mask_fn(batch)
        return steps._views(view_fn, rng, batch["image"], mask)

    return parallel.map_step(lambda _, batch, rng: (None, views(batch, rng)), donate_state=False)


def build_case(name: str, config, parallel: DataParallel, pool: pipeline.SlicePool) -> Case:
    """The trainer's state and step of stage `name` for `config` (see jaxcl.train.trainer)."""
    example = jnp.zeros((1, config.data.image_size, config.data.image_size, 1), jnp.float32)
    key = jax.random.key(0)
    options = _model_options(config)
    aug = augment.AugmentConfig(**config.augment.to_dict())
    if name == "finetune":
        cfg = config.finetune
        model = UNet(num_classes=_NUM_CLASSES, **options)
        state = steps.create_train_state(model, key, example, optax.adam(cfg.learning_rate))
        step = functools.partial(
            steps.finetune_step, model=model, num_classes=_NUM_CLASSES, augment_config=aug
        )
        batches = pipeline.labelled_batches(
            pool, batch_size=cfg.batch_size, seed=0, local_device_count=parallel.num_local_devices
        )
        batch = parallel.put_batch(next(iter(batches.iterate(0))))
        return Case(parallel.map_step(step), parallel.put_state(state), batch, cfg.batch_size)

    stage = "pretrain_local" if name in recipes.LOCAL_STRATEGIES else "pretrain_global"
    cfg = config[stage].copy_and_resolve_references()
    cfg.strategy = name
    recipe = recipes.batch_recipe(cfg, stage)
    batches = recipes.make_batches(
        pool, recipe, seed=0, local_device_count=parallel.num_local_devices
    )
    batch = parallel.put_batch(next(iter(batches.iterate(0))))
    images = recipe.images_per_step(config.data.n_partitions)
    per_device = images // parallel.num_devices
    sizes = {
        "hidden_features": config.model.global_hidden_features,
        "features": config.model.embedding_features,
    }
    tx = optax.adam(cfg.learning_rate)
    if name in recipes.BYOL_STRATEGIES:
        online = stage_models.ByolNetwork(predict=True, **sizes, **options)
        target = stage_models.ByolNetwork(predict=False, **sizes, **options)
        state = steps.create_byol_state(online, target, key, example, tx)
        step = functools.partial(
            steps.byol_step,
            online_model=online,
            target_model=target,
            total_steps=cfg.steps,
            tau_base=cfg.tau_base,
            augment_config=aug,
        )
        view_fn = functools.partial(augment.global_view, config=aug)
        outputs = jax.ShapeDtypeStruct((per_device, config.model.embedding_features), jnp.float32)

        def loss(predictions, batch):
            # Symmetrised regression of each view's prediction onto the other's (stopped) output.
            pairs = predictions.reshape(-1, 2, predictions.shape[-1])
            first, second = pairs[:, 0], pairs[:, 1]
            targets = jax.lax.stop_gradient((second, first))
            return byol_loss.symmetric_loss(first, second, *targets, axis_name=AXIS_NAME)

        mask_fn = None
    elif stage == "pretrain_global":
        model = stage_models.GlobalContrastiveModel(**sizes, **options)
        state = steps.create_train_state(model, key, example, tx)
        step = functools.partial(
            steps.pretrain_global_step,
            model=model,
            strategy=name,
            temperature=cfg.temperature,
            augment_config=aug,
        )
        view_fn = functools.partial(augment.global_view, config=aug)
        outputs = jax.ShapeDtypeStruct((per_device, config.model.embedding_features), jnp.float32)

        def loss(embeddings, batch):
            return contrastive.global_loss(
                embeddings,
                batch["sample_id"],
                batch["partition_id"],
                strategy=name,
                temperature=cfg.temperature,
                axis_name=AXIS_NAME,
            )

        def mask_fn(batch):
            return steps._global_augment_mask(name, batch["view_id"], None)
    else:
        blocks = config.model.num_decoder_blocks
        feature_size = config.data.image_size // 2 ** (5 - blocks)
        positions = local.region_positions(
            feature_size, kind=cfg.positions, grid_size=cfg.grid_size
        )
        model = stage_models.LocalContrastiveModel(
            positions=tuple(tuple(int(v) for v in p) for p in positions),
            num_decoder_blocks=blocks,
            features=config.model.embedding_features,
            freeze_encoder=True,
            **options,
        )
        state = steps.create_train_state(model, key, example, steps.frozen_encoder_tx(tx))
        num_anchors = local.PAPER_NUM_ANCHORS if cfg.positions == "paper" else None
        views_per_group = recipe.views_per_group(name, parallel.num_devices)
        step = functools.partial(
            steps.pretrain_local_step,
            model=model,
            strategy=name,
            temperature=cfg.temperature,
            negatives=cfg.negatives,
            num_anchors=num_anchors,
            views_per_group=views_per_group,
            augment_config=aug,
        )
        view_fn = functools.partial(augment.local_view, config=aug)
        outputs = jax.eval_shape(
            lambda variables, x: model.apply(variables, x, train=False),
            jax.eval_shape(functools.partial(model.init, train=False), key, example),
            jax.ShapeDtypeStruct((per_device, *example.shape[1:]), jnp.float32),
        )

        def loss(regions, batch):
            return local.local_loss(
                regions,
                batch["sample_id"],
                batch["partition_id"],
                strategy=name,
                temperature=cfg.temperature,
                negatives=cfg.negatives,
                num_anchors=num_anchors,
                views_per_group=views_per_group,
                axis_name=AXIS_NAME,
            )

        mask_fn = None

    def loss_grad(_, inputs, rng):
        del rng
        outputs, batch = inputs
        return None, jax.value_and_grad(loss)(outputs, batch)

    return Case(
        step=parallel.map_step(step),
        state=parallel.put_state(state),
        batch=batch,
        images=images,
        views=_mapped_views(parallel, view_fn, mask_fn),
        loss_grad=parallel.map_step(loss_grad, donate_state=False),
        outputs=outputs,
    )


def _median_seconds(call: Callable[[], object]) -> tuple[float, list[float]]:
    for _ in range(_WARMUP.value):
        jax.block_until_ready(call())
    times = [_seconds(call) for _ in range(_REPEATS.value)]
    return statistics.median(times), times


def run(name: str, config, parallel: DataParallel, pool, peak: float) -> None:
    """Compiles and times one stage; prints one line (see the module docstring)."""
    case = build_case(name, config, parallel, pool)
    rng = jax.random.key(1)
    start = time.perf_counter()
    lowered = case.step.lower(case.state, case.batch, rng)
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start
    flops = lowered.cost_analysis()["flops"]
    load = _load()
    state = case.state

    def one_step():
        nonlocal state
        state, metrics = compiled(state, case.batch, rng)
        return metrics

    seconds, times = _median_seconds(one_step)
    gflops = flops / seconds / 1e9
    line = (
        f"{name:8s} {case.images:3d} img  compile {compile_s:5.1f} s  step {1e3 * seconds:7.1f} ms"
        f" (min {1e3 * min(times):.1f})  {case.images / seconds:6.2f} img/s  "
        f"{flops / 1e9:6.1f} GFLOP  {gflops:6.1f} GFLOP/s  {100 * gflops / peak:5.1f}% of peak"
    )
    if case.views is not None:
        views_s, _ = _median_seconds(lambda: case.views(None, case.batch, rng)[1])
        outputs = jax.tree.map(
            lambda s: jnp.zeros((parallel.num_local_devices, *s.shape), s.dtype), case.outputs
        )
        loss_s, _ = _median_seconds(lambda: case.loss_grad(None, (outputs, case.batch), rng)[1])
        line += (
            f"  augment {1e3 * views_s:5.1f} ms + loss {1e3 * loss_s:5.1f} ms"
            f" = {100 * (views_s + loss_s) / seconds:4.1f}% of the step"
        )
    print(f"{line}  load {load:.2f}->{_load():.2f}", flush=True)


def main(argv: list[str]) -> None:
    del argv
    unknown = sorted(set(_STAGES.value) - set(STAGES))
    if unknown:
        raise app.UsageError(f"--stages: unknown {unknown}; choose from {', '.join(STAGES)}.")
    config = acdc.get_config()
    parallel = DataParallel(config.parallel.mode)
    print(
        f"jax {jax.__version__} on {parallel.num_devices} {jax.devices()[0].platform} device(s);"
        f" XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}"
        f" GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')!r}"
    )
    load = _load()
    peak = matmul_peak_gflops(_PEAK_SIZE.value)
    print(f"f32 matmul peak ({_PEAK_SIZE.value}³): {peak:.1f} GFLOP/s  load {load:.2f}", flush=True)
    pool = _pool(config.data.image_size, config.data.n_partitions)
    for name in _STAGES.value:
        run(name, config, parallel, pool, peak)


if __name__ == "__main__":
    app.run(main)
