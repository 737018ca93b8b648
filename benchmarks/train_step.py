r"""Speed of jaxcl's real training steps at 192² and the paper's batch sizes, vs the matmul peak.

For every stage (G^R, G^{D-}, G^D, BYOL, BYOL-D, L^R, L^D, fine-tuning) this builds the state,
batch and step with the builders `jaxcl.train.trainer` runs (`jaxcl.methods`) for
`configs/acdc.py` (paper hyper-parameters; batches from `jaxcl.data.pipeline` over random
volumes), maps the step with
`DataParallel` over the local devices, and prints:

- compile time (lower + XLA compile) and the median step time of `--repeats` calls;
- images/s and FLOPs per step from XLA's cost analysis of the lowered step (a convolution counts
  its multiply-adds as 2 FLOPs, without SAME padding), the achieved GFLOP/s and that as a
  fraction of the float32 matmul peak measured in the same run (best of 10 jitted `jnp.dot`s);
- GB accessed per step: XLA's cost analysis of the compiled (fused) step, the bytes its
  operations read and write. It counts the passes over activations that are not convolution
  (BatchNorm, ReLU, layout changes) as well, and is what a memory-bound accelerator pays. On
  CPU the convolutions' kernel gradients of at least 0.1 GFLOP run in TensorFlow
  (`jaxcl.models.convolution`), whose bytes XLA does not see; the FLOPs are counted with XLA's
  kernel gradients (`convolution.xla_convolutions`), so they are the same on every platform;
- the host's time to assemble one batch from the slice pool (`jaxcl.data.pipeline`, inline
  here; training prepares batches in a background thread while the step runs). With the step,
  it bounds one training iteration, to set beside `tf1_original.py --iteration`;
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
from jaxcl import methods  # noqa: E402
from jaxcl.data import pipeline  # noqa: E402
from jaxcl.methods import parts as parts_lib  # noqa: E402
from jaxcl.models import convolution  # noqa: E402
from jaxcl.models.unet import UNet  # noqa: E402
from jaxcl.train import recipes, steps  # noqa: E402
from jaxcl.train.parallel import AXIS_NAME, DataParallel  # noqa: E402

STAGES = (*methods.METHODS, "finetune")
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
    batches: object  # the pipeline's batches (`iterate`), for the host's time per batch
    views: Callable | None = None  # rng, batch -> views (mapped like the step)
    loss_grad: Callable | None = None  # (outputs, batch) -> (loss, d loss / d outputs)
    outputs: jax.ShapeDtypeStruct | None = None  # per-device network outputs


def build_case(name: str, config, parallel: DataParallel, pool: pipeline.SlicePool) -> Case:
    """The trainer's state and step of stage `name` for `config` (the builders of
    `jaxcl.methods`, as `jaxcl.train.trainer` runs them; fine-tuning as the trainer builds it)."""
    example = parts_lib.example_input(config)
    key = jax.random.key(0)
    if name == "finetune":
        cfg = config.finetune
        model = UNet(num_classes=_NUM_CLASSES, **parts_lib.model_options(config))
        state = steps.create_train_state(model, key, example, optax.adam(cfg.learning_rate))
        step = functools.partial(
            steps.finetune_step,
            model=model,
            num_classes=_NUM_CLASSES,
            augment_config=parts_lib.augment_config(config),
        )
        batches = pipeline.labelled_batches(
            pool, batch_size=cfg.batch_size, seed=0, local_device_count=parallel.num_local_devices
        )
        batch = parallel.put_batch(next(iter(batches.iterate(0))))
        return Case(
            parallel.map_step(step), parallel.put_state(state), batch, cfg.batch_size, batches
        )

    stage = methods.METHODS[name].stage
    config = config.copy_and_resolve_references()
    config[stage].strategy = name
    recipe = methods.batch_recipe(config[stage], stage)
    parts = methods.build(config, stage, recipe=recipe, num_devices=parallel.num_devices, key=key)
    batches = recipes.make_batches(
        pool, recipe, seed=0, local_device_count=parallel.num_local_devices
    )
    batch = parallel.put_batch(next(iter(batches.iterate(0))))
    per_device = recipe.images_per_step(config.data.n_partitions) // parallel.num_devices
    # Shapes only, under a named axis for cross-replica BatchNorm.
    one_device = jax.vmap(parts.outputs, in_axes=(None, 0), axis_name=AXIS_NAME)
    outputs = jax.eval_shape(
        lambda state, x: one_device(state, x[None])[0],
        parts.state,
        jax.ShapeDtypeStruct((per_device, *example.shape[1:]), jnp.float32),
    )

    def views(_, batch, rng):
        return None, parts.views(batch, rng)

    def loss_grad(_, inputs, rng):
        del rng
        network_outputs, batch = inputs
        return None, jax.value_and_grad(parts.loss)(network_outputs, batch)

    return Case(
        step=parallel.map_step(parts.step),
        state=parallel.put_state(parts.state),
        batch=batch,
        images=recipe.images_per_step(config.data.n_partitions),
        batches=batches,
        views=parallel.map_step(views, donate_state=False),
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
    with convolution.xla_convolutions():  # FLOPs as XLA would compute every gradient
        counted = build_case(name, config, parallel, pool)
        flops = counted.step.lower(counted.state, counted.batch, rng).cost_analysis()["flops"]
    del counted
    bytes_accessed = compiled.cost_analysis()["bytes accessed"]
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
        f"  {bytes_accessed / 1e9:5.1f} GB accessed"
    )
    host_batches = case.batches.iterate(0, prefetch=0)
    host_s, _ = _median_seconds(lambda: next(host_batches))
    line += f"  host batch {1e3 * host_s:5.1f} ms"
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
        f" LD_PRELOAD={os.environ.get('LD_PRELOAD', '')!r}"
        f" CPU paths of jaxcl.models.convolution: {convolution.cpu_paths_enabled()}"
    )
    load = _load()
    peak = matmul_peak_gflops(_PEAK_SIZE.value)
    print(f"f32 matmul peak ({_PEAK_SIZE.value}³): {peak:.1f} GFLOP/s  load {load:.2f}", flush=True)
    pool = _pool(config.data.image_size, config.data.n_partitions)
    for name in _STAGES.value:
        run(name, config, parallel, pool, peak)


if __name__ == "__main__":
    app.run(main)
