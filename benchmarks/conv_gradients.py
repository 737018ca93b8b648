r"""Per-layer speed of the UNet's convolutions at 192², batch 20: forward pass, input gradient and
kernel gradient, each by XLA alone and as `jaxcl.models.convolution` computes it on CPU (the
kernel gradient by TensorFlow's `Conv2DBackpropFilter`, called in place from the jitted step;
the taps' sum for one input channel; the 16 -> 4 logits as a 2x2 convolution of 2x2 pixel
blocks, forward and input gradient).

Each line is one (H, C_in -> C_out) 3x3 convolution of the network (encoder, decoder with its
concatenated skips, the 16 -> 4 logits), timed as its own jitted function (median of
`--repeats` calls after 2 warm-up calls), with GFLOP/s counting a multiply-add as 2 FLOPs.
Inside a fine-tuning step the 3x3 layers' host kernel gradients take what they take here
(docs/TRAINING.md); `benchmarks/train_step.py` measures whole steps.

  PYTHONPATH=. python benchmarks/conv_gradients.py
"""

from jaxcl import runtime

if __name__ == "__main__":
    runtime.tune_cpu_process()

import functools  # noqa: E402 - after the process settings above
import statistics  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402

import jax  # noqa: E402
from absl import app, flags  # noqa: E402

from jaxcl.models import convolution  # noqa: E402

_BATCH = flags.DEFINE_integer("batch", 20, "Images per call (the fine-tuning batch).")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed calls per measurement (median reported).")
# (H, C_in, C_out) of the UNet's 3x3 convolutions at 192² with the default filters.
LAYERS = (
    (192, 1, 16),
    (192, 16, 16),
    (96, 16, 32),
    (96, 32, 32),
    (48, 32, 64),
    (48, 64, 64),
    (24, 64, 128),
    (24, 128, 128),
    (12, 128, 128),
    (6, 128, 128),
    (192, 32, 16),
    (96, 64, 32),
    (48, 128, 64),
    (24, 256, 128),
    (192, 16, 4),
)


def _median_ms(function: Callable, *args) -> float:
    for _ in range(2):
        jax.block_until_ready(function(*args))
    times = []
    for _ in range(_REPEATS.value):
        start = time.perf_counter()
        jax.block_until_ready(function(*args))
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def _input_gradient(x, kernel, cotangent):
    return jax.vjp(lambda x: convolution.conv_same(x, kernel), x)[1](cotangent)


def layer_times(size: int, c_in: int, c_out: int) -> list[float]:
    """Milliseconds of the forward pass, the input gradient and the kernel gradient of one
    (size², c_in -> c_out) 3x3 convolution, each by XLA and then as jaxcl computes it."""
    keys = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(keys[0], (_BATCH.value, size, size, c_in))
    kernel = jax.random.normal(keys[1], (3, 3, c_in, c_out))
    cotangent = jax.random.normal(keys[2], (_BATCH.value, size, size, c_out))
    kernel_gradient = functools.partial(convolution.kernel_gradient, kernel_shape=kernel.shape)
    calls = (
        (convolution.conv_same, (x, kernel)),
        (_input_gradient, (x, kernel, cotangent)),
        (kernel_gradient, (x, cotangent)),
    )
    times = []
    for function, args in calls:
        with convolution.xla_convolutions():
            times.append(_median_ms(_compiled(function, *args), *args))
        times.append(_median_ms(_compiled(function, *args), *args))
    return times


def _compiled(function: Callable, *args) -> Callable:
    """`function` compiled for `args` under the current settings (a new function each time:
    jit's trace cache would reuse the first trace under either setting)."""
    return jax.jit(lambda *a: function(*a)).lower(*args).compile()


def main(argv: list[str]) -> None:
    del argv
    print(
        f"jax {jax.__version__} on {jax.devices()[0].platform}; CPU paths: "
        f"{convolution.cpu_paths_enabled()}"
    )
    columns = tuple(
        f"{part} {how}"
        for part in ("forward", "input grad", "kernel grad")
        for how in ("XLA", "jaxcl")
    )
    print(f"{'layer':>16s} " + "".join(f"{c:>24s}" for c in columns))
    totals = [0.0] * len(columns)
    for size, c_in, c_out in LAYERS:
        times = layer_times(size, c_in, c_out)
        gflop = 2 * _BATCH.value * size * size * 9 * c_in * c_out / 1e9
        cells = "".join(f"{t:9.1f} ms ({gflop / t * 1e3:5.0f} GF/s)" for t in times)
        print(f"{size:4d}² {c_in:4d}->{c_out:4d} {cells}", flush=True)
        totals = [a + b for a, b in zip(totals, times, strict=True)]
    print(f"{'total':>16s} " + "".join(f"{t:21.1f} ms" for t in totals))


if __name__ == "__main__":
    app.run(main)
