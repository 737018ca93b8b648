r"""Train-step speed of the stage models on XLA:CPU, as a fraction of the measured matmul peak.

Each case jits one optimiser step of a stage model at the paper's batch size on 192² images:
`value_and_grad` of a stand-in loss of the right kind, then Adam (lr 1e-3) on the trained
parameters, new BatchNorm statistics carried out. The cases:

- `finetune`: UNet (4 classes), batch 20, soft Dice loss (docs/METHOD.md §9);
- `global`: GlobalContrastiveModel (encoder + g1), batch 48, loss = sum of squared embeddings
  (the G^D batch of docs/METHOD.md §7; the contrastive kernel itself is benchmarked in losses.py);
- `local`: LocalContrastiveModel (encoder frozen + 3 decoder blocks + g2 + region embedding),
  batch 20, loss = sum of squared region embeddings, only the non-encoder parameters trained.

Printed per case: compile time (lower + XLA compile), the median step time of `--repeats` calls
after `--warmup` calls (and the fastest), images/s, FLOPs per step from XLA's cost analysis of
the lowered (pre-optimisation) module, which counts a convolution's multiply-adds without SAME
padding, the achieved GFLOP/s, and that as a fraction of the f32 matmul peak measured in the same
run (the best of 10 jitted `jnp.dot`s of two `--peak_size`² matrices). The 1-minute load average
is printed with every number: timings on a shared machine are only meaningful at low load.

Runtime settings that matter on XLA:CPU (jaxlib 0.10), both outside the model's math:

- YNNPACK convolutions are about half as fast as XLA's Eigen ones for this network (dots and
  reductions still gain from YNNPACK), so this benchmark appends
  `--xla_cpu_experimental_ynn_fusion_type=-individual_convolution` to XLA_FLAGS unless
  `--ynn_convolutions`; XLA reads XLA_FLAGS when the CPU backend starts, so a trainer must set it
  before its first jax computation.
- XLA allocates its temporary buffer (1.6 GiB for the fine-tuning step) afresh on every step, and
  glibc returns it to the kernel each time: faulting its pages in again costs 10-15% of the step.
  jemalloc told to keep freed pages avoids all of it (what `jaxcl.runtime` sets up for the entry
  points when jemalloc is installed); glibc's transparent huge pages avoid part of it, only
  when the process starts with `GLIBC_TUNABLES=glibc.malloc.hugetlb=1` (glibc >= 2.35, THP
  "madvise" or "always").

  python benchmarks/model_step.py
  python benchmarks/model_step.py --cases=finetune --repeats=5
  LD_PRELOAD=libjemalloc.so.2 MALLOC_CONF=dirty_decay_ms:-1,muzzy_decay_ms:-1 \
    python benchmarks/model_step.py
  GLIBC_TUNABLES=glibc.malloc.hugetlb=1 python benchmarks/model_step.py
  python benchmarks/model_step.py --ynn_convolutions  # XLA's default convolutions
"""

import functools
import os
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags

from jaxcl.losses import segmentation
from jaxcl.models import GlobalContrastiveModel, LocalContrastiveModel, UNet

_CASES = flags.DEFINE_list("cases", ["finetune", "global", "local"], "finetune, global, local.")
_REPEATS = flags.DEFINE_integer("repeats", 10, "Timed steps per case (the median is reported).")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps after compilation.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 192, "Square image side (multiple of 32).")
_PEAK_SIZE = flags.DEFINE_integer("peak_size", 2048, "Side of the matrices of the peak matmul.")
_FINETUNE_BATCH = flags.DEFINE_integer(
    "finetune_batch", 20, "Fine-tuning batch (docs/METHOD.md §9)."
)
_GLOBAL_BATCH = flags.DEFINE_integer("global_batch", 48, "Global pre-training batch (G^D).")
_LOCAL_BATCH = flags.DEFINE_integer("local_batch", 20, "Local pre-training batch (L^R).")

_YNN_CONVOLUTIONS = flags.DEFINE_bool(
    "ynn_convolutions",
    False,
    "Let XLA:CPU run convolutions through YNNPACK (its default). Off by default here: Eigen's "
    "convolutions are about twice as fast for this UNet (see the module docstring).",
)

# Appended to XLA_FLAGS unless --ynn_convolutions: YNNPACK keeps dots and reductions.
NO_YNN_CONVOLUTIONS = "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"
_NUM_CLASSES = 4
_LOCAL_BLOCKS = 3
_LEARNING_RATE = 1e-3


def _load() -> float:
    return os.getloadavg()[0]


def matmul_peak_gflops(size: int, repeats: int = 10) -> tuple[float, float]:
    """(best, median) GFLOP/s of a jitted float32 (size, size) @ (size, size) matmul.

    The best of `repeats` calls is the machine's attainable peak; the median shows how much other
    work on the machine slowed this run down.
    """
    a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (size, size), jnp.float32)
    dot = jax.jit(jnp.dot)
    jax.block_until_ready(dot(a, b))
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(dot(a, b))
        rates.append(2 * size**3 / (time.perf_counter() - start) / 1e9)
    return max(rates), statistics.median(rates)


def _paper_positions(size: int) -> tuple[tuple[int, int], ...]:
    """The 13 region positions of docs/METHOD.md §5 on a size x size map."""
    w = size - 4
    a, m, e, q, t = 0, w // 2, w, w // 4, (3 * w) // 4
    return tuple([(u, v) for u in (a, m, e) for v in (a, m, e)] + [(q, q), (q, t), (t, q), (t, t)])


def _sum_of_squares(outputs: jax.Array, batch: dict) -> jax.Array:
    del batch
    return jnp.sum(jnp.square(outputs))


def _soft_dice(outputs: jax.Array, batch: dict) -> jax.Array:
    return segmentation.soft_dice_loss(outputs, batch["label"], num_classes=_NUM_CLASSES)


def build_case(name: str, image_size: int) -> tuple[Callable, tuple, int]:
    """(jitted step, its arguments, batch size) of one case; the step donates its state."""
    if name == "finetune":
        model, batch_size, loss = UNet(num_classes=_NUM_CLASSES), _FINETUNE_BATCH.value, _soft_dice
        frozen = ()
    elif name == "global":
        model, batch_size, loss = GlobalContrastiveModel(), _GLOBAL_BATCH.value, _sum_of_squares
        frozen = ()
    elif name == "local":
        positions = _paper_positions(image_size >> (5 - _LOCAL_BLOCKS))
        model = LocalContrastiveModel(positions, num_decoder_blocks=_LOCAL_BLOCKS)
        batch_size, loss, frozen = _LOCAL_BATCH.value, _sum_of_squares, ("encoder",)
    else:
        raise ValueError(f"--cases: unknown case {name!r}; use finetune, global or local.")

    rng = np.random.default_rng(0)
    images = rng.normal(size=(batch_size, image_size, image_size, 1)).astype(np.float32)
    batch = {"image": jnp.asarray(images)}
    if name == "finetune":
        labels = rng.integers(0, _NUM_CLASSES, size=(batch_size, image_size, image_size))
        batch["label"] = jnp.asarray(labels, jnp.int32)
    key = jax.random.key(0, impl="rbg")
    variables = jax.jit(functools.partial(model.init, train=False))(key, batch["image"])
    params = dict(variables["params"])
    frozen_params = {k: params.pop(k) for k in frozen}
    tx = optax.adam(_LEARNING_RATE)
    state = (params, variables["batch_stats"], tx.init(params))

    def step(state, frozen_params, batch):
        params, batch_stats, opt_state = state

        def loss_fn(params):
            outputs, updates = model.apply(
                {"params": {**params, **frozen_params}, "batch_stats": batch_stats},
                batch["image"],
                train=True,
                mutable=["batch_stats"],
            )
            return loss(outputs, batch), updates["batch_stats"]

        (value, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), batch_stats, opt_state), value

    return jax.jit(step, donate_argnums=0), (state, frozen_params, batch), batch_size


def run_case(name: str, peak: float) -> None:
    """Compiles, warms up and times one case; prints one line (see the module docstring)."""
    step, (state, frozen_params, batch), batch_size = build_case(name, _IMAGE_SIZE.value)
    start = time.perf_counter()
    lowered = step.lower(state, frozen_params, batch)
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start
    flops = lowered.cost_analysis()["flops"]

    for _ in range(_WARMUP.value):
        state, loss = compiled(state, frozen_params, batch)
        jax.block_until_ready(loss)
    load = _load()
    times = []
    for _ in range(_REPEATS.value):
        begin = time.perf_counter()
        state, loss = compiled(state, frozen_params, batch)
        jax.block_until_ready(loss)
        times.append(time.perf_counter() - begin)
    seconds = statistics.median(times)
    gflops = flops / seconds / 1e9
    print(
        f"{name:9s} batch {batch_size:3d}  compile {compile_s:6.1f} s  step {1e3 * seconds:8.1f} ms"
        f" (min {1e3 * min(times):.1f})  {batch_size / seconds:6.2f} img/s  "
        f"{flops / 1e9:7.1f} GFLOP/step  {gflops:6.1f} GFLOP/s  {100 * gflops / peak:5.1f}% of peak"
        f"  load {load:.2f}->{_load():.2f}",
        flush=True,
    )


def main(argv: list[str]) -> None:
    del argv
    # XLA reads XLA_FLAGS when the CPU backend starts (the first computation), not at import.
    if not _YNN_CONVOLUTIONS.value:
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {NO_YNN_CONVOLUTIONS}".strip()
    print(
        f"jax {jax.__version__}, {jax.devices()}, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}, "
        f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')!r}"
    )
    load = _load()
    peak, median = matmul_peak_gflops(_PEAK_SIZE.value)
    print(
        f"f32 matmul ({_PEAK_SIZE.value}³): peak {peak:.1f} GFLOP/s (median {median:.1f})"
        f"  load {load:.2f}",
        flush=True,
    )
    for name in _CASES.value:
        run_case(name, peak)


if __name__ == "__main__":
    app.run(main)
