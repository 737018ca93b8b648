r"""Speed, compile time and memory of the contrastive losses, against the original's loop form.

Every case times `jax.jit(jax.value_and_grad(loss))` on random embeddings: compile time (trace,
lower and XLA compile together; the trace + lower part is also shown) and the median wall time of
a forward+backward call after a warm-up (`block_until_ready`), plus XLA's scratch memory of the
compiled call and the process's peak RSS so far.

The "loop" cases rebuild G^D (48 images) and L^R (10 slices x 2 views, paper negatives) the way the
original TensorFlow 1 code builds them, a Python loop over anchors and positive pairs where every
pair computes its own numerator `exp(cos/τ)` and sums its explicitly listed negatives with
separate small ops (G^D: one gather + matmul per pair; L^R: one dot/exp/add per negative), traced
into one jitted JAX graph. Unlike the original, vectors are normalised and split out once up front
(see `_split_normalized`), which only makes the loop form faster. Each loop form must give the
same value as the vectorised kernel (asserted) so the comparison is like for like.

Run from the repository root (jaxcl installed with `pip install -e .`); all cases take about
10 minutes on a busy 2-core CPU: ~5 compiling the two loop forms, ~2 for the 48-slice L^D grid.

  python benchmarks/losses.py
  python benchmarks/losses.py --cases=global --global_batches=48,3072
  python benchmarks/losses.py --cases=local --local_slices=12 --grid_size=16
"""

import resource
import statistics
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from jaxcl.losses import contrastive, local

_CASES = flags.DEFINE_list(
    "cases", ["global", "local", "loop"], "Which groups of cases to run: global, local, loop."
)
_GLOBAL_BATCHES = flags.DEFINE_list(
    "global_batches", ["48", "192", "768", "3072"], "G^D global batch sizes (multiples of 8)."
)
_LOCAL_SLICES = flags.DEFINE_list(
    "local_slices", ["12", "48"], "L^D slices per batch (multiples of 4), 2 views each."
)
_GRID_SIZE = flags.DEFINE_integer("grid_size", 22, "K of the K x K grid of L^D regions.")
_DIM = flags.DEFINE_integer("dim", 128, "Embedding size D.")
_REPEATS = flags.DEFINE_integer("repeats", 7, "Timed calls per case (the median is reported).")
_TEMPERATURE = 0.1
_SLOW_CASE_BUDGET_S = 10.0
_PARTITIONS = 4
_VIEWS = 2

# The original's 17 local region positions by name (docs/METHOD.md §5): the 13 anchors, then the 4
# positions used only as negatives, and for each anchor its 5 negative positions in the original
# code, spelt out again here (not taken from jaxcl.losses.local) so the loop form checks the
# vectorised kernel independently.
_PAPER_POSITION_NAMES = (
    "aa am ae ma mm me ea em ee qq qt tq tt " + "qm mq mt tm"  # anchors, then negatives only
).split()
_PAPER_NEGATIVE_NAMES = (
    "am qq qm ma mq",
    "aa ae qq qt mm",
    "am qm qt mt me",
    "aa qq mm ea tq",
    "qq qt tq tt ma",
    "ae mm ee qt tt",
    "ma mq em tq tm",
    "mm ea ee tq tt",
    "mt me em tt tm",
    "aa am ma mm qt",
    "am ae qq mm me",
    "ma mm ea em tt",
    "mm me em ee tq",
)
_PAPER_ANCHORS = 13


def _gd_ids(global_batch: int) -> tuple[np.ndarray, np.ndarray]:
    """sample_ids and partition_ids of a G^D batch: volumes x partitions slices x 2 views."""
    volumes = global_batch // (_PARTITIONS * _VIEWS)
    slices = np.arange(volumes * _PARTITIONS)
    sample_ids = np.tile(slices, _VIEWS)
    partition_ids = sample_ids % _PARTITIONS
    return sample_ids.astype(np.int32), partition_ids.astype(np.int32)


def _timed(
    loss: Callable[..., jax.Array], args: Sequence[jax.Array], repeats: int
) -> dict[str, float]:
    """Compile time (trace + lower + XLA compile; trace + lower alone), median forward+backward
    time and XLA scratch memory of `loss(*args)`."""
    step = jax.jit(jax.value_and_grad(loss))
    start = time.perf_counter()
    lowered = step.lower(*args)
    trace_s = time.perf_counter() - start
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args))  # warm-up
    warm_up_s = time.perf_counter() - start
    # Slow cases get fewer (but at least 3) timed calls, so the whole run stays within minutes.
    repeats = max(3, min(repeats, int(_SLOW_CASE_BUDGET_S / max(warm_up_s, 1e-9))))
    durations = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        durations.append(time.perf_counter() - start)
    memory = compiled.memory_analysis()
    temp_mib = memory.temp_size_in_bytes / 2**20 if memory is not None else float("nan")
    return {
        "trace_s": trace_s,
        "compile_s": compile_s,
        "call_ms": 1e3 * statistics.median(durations),
        "temp_mib": temp_mib,
        "value": float(compiled(*args)[0]),
    }


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _global_vectorised(global_batch: int, key: jax.Array) -> tuple[Callable, list]:
    sample_ids, partition_ids = _gd_ids(global_batch)
    z = jax.random.normal(key, (global_batch, _DIM.value))

    def loss(embeddings):
        return contrastive.global_loss(
            embeddings, sample_ids, partition_ids, strategy="GD", temperature=_TEMPERATURE
        )

    return loss, [z]


def _split_normalized(embeddings: jax.Array) -> list[jax.Array]:
    """(..., D) -> list of the L2-normalised (D,) vectors, in row-major order.

    The original normalises both vectors inside every `cos_sim` call and gathers from the full
    tensor for every pair; doing both once up front shrinks the loop form's graph about 4x (and
    its compile time with it), so the comparison favours the loop form.
    """
    normalized = embeddings / jnp.linalg.norm(embeddings, axis=-1, keepdims=True)
    return jnp.unstack(normalized.reshape(-1, embeddings.shape[-1]))


def _global_loop(global_batch: int, key: jax.Array) -> tuple[Callable, list]:
    """G^D as the original builds it: per positive pair, its own gather of the listed negatives,
    matmul, exp, sum and log."""
    _, partition_ids = _gd_ids(global_batch)
    indices = np.arange(global_batch)
    z = jax.random.normal(key, (global_batch, _DIM.value))

    def loss(embeddings):
        vectors = _split_normalized(embeddings)
        matrix = jnp.stack(vectors)
        total, terms = 0.0, 0
        for anchor in indices:
            same = partition_ids == partition_ids[anchor]
            negatives = indices[~same]
            for positive in indices[same & (indices != anchor)]:
                numerator = jnp.exp(jnp.dot(vectors[anchor], vectors[positive]) / _TEMPERATURE)
                negative_vectors = jnp.take(matrix, negatives, axis=0)
                negative_logits = negative_vectors @ vectors[anchor] / _TEMPERATURE
                denominator = numerator + jnp.sum(jnp.exp(negative_logits))
                total = total - jnp.log(numerator / denominator)
                terms += 1
        return total / terms

    return loss, [z]


def _local_args(
    slices: int, regions_per_view: int, key: jax.Array
) -> tuple[jax.Array, np.ndarray, np.ndarray]:
    """Random regions (V, R, D) for `slices` slices x 2 views, with their ids (slice = sample)."""
    sample_ids = np.tile(np.arange(slices), _VIEWS).astype(np.int32)
    partition_ids = (sample_ids % _PARTITIONS).astype(np.int32)
    regions = jax.random.normal(key, (slices * _VIEWS, regions_per_view, _DIM.value))
    return regions, sample_ids, partition_ids


def _local_vectorised(
    strategy: str, slices: int, layout: str, key: jax.Array
) -> tuple[Callable, list]:
    if layout == "grid":
        regions_per_view, num_anchors, negatives = _GRID_SIZE.value**2, None, "all"
    else:
        regions_per_view, num_anchors = len(_PAPER_POSITION_NAMES), _PAPER_ANCHORS
        negatives = "paper" if layout == "paper-negatives" else "all"
    regions, sample_ids, partition_ids = _local_args(slices, regions_per_view, key)

    def loss(region_embeddings):
        return local.local_loss(
            region_embeddings,
            sample_ids,
            partition_ids,
            strategy=strategy,
            temperature=_TEMPERATURE,
            negatives=negatives,
            num_anchors=num_anchors,
        )

    return loss, [regions]


def _local_loop(slices: int, key: jax.Array) -> tuple[Callable, list]:
    """L^R with the paper negatives as the original builds it: per slice, anchor position and
    view, one dot/exp/add per listed negative region, accumulated one by one."""
    regions, _, _ = _local_args(slices, len(_PAPER_POSITION_NAMES), key)
    num_positions = len(_PAPER_POSITION_NAMES)
    position_index = {name: i for i, name in enumerate(_PAPER_POSITION_NAMES)}
    negative_positions = [
        [position_index[name] for name in names.split()] for names in _PAPER_NEGATIVE_NAMES
    ]

    def loss(region_embeddings):
        vectors = _split_normalized(region_embeddings)

        def logit(view_a, position_a, view_b, position_b):
            a = vectors[view_a * num_positions + position_a]
            b = vectors[view_b * num_positions + position_b]
            return jnp.dot(a, b) / _TEMPERATURE

        total, terms = 0.0, 0
        for slice_index in range(slices):
            views = (slice_index, slices + slice_index)
            for position in range(_PAPER_ANCHORS):
                for anchor_view, positive_view in (views, views[::-1]):
                    numerator = jnp.exp(logit(anchor_view, position, positive_view, position))
                    denominator = numerator
                    for negative in negative_positions[position]:
                        for view in views:
                            denominator = denominator + jnp.exp(
                                logit(anchor_view, position, view, negative)
                            )
                    total = total - jnp.log(numerator / denominator)
                    terms += 1
        return total / terms

    return loss, [regions]


_COLUMNS = (
    ("case", 40),
    ("size", 16),
    ("compile s", 9),
    ("of it trace s", 13),
    ("call ms", 9),
    ("XLA temp MiB", 12),
    ("peak RSS MiB", 12),
)


def _print_header() -> None:
    names = [
        f"{name:<{width}}" if i < 2 else f"{name:>{width}}"
        for i, (name, width) in enumerate(_COLUMNS)
    ]
    print("| " + " | ".join(names) + " | note")
    print("|" + "|".join("-" * (width + 2) for _, width in _COLUMNS) + "|------")


def _row(name: str, size: str, result: dict[str, float], note: str = "") -> None:
    cells = (
        f"{name:<40}",
        f"{size:>16}",
        f"{result['compile_s']:9.2f}",
        f"{result['trace_s']:13.2f}",
        f"{result['call_ms']:9.2f}",
        f"{result['temp_mib']:12.1f}",
        f"{_peak_rss_mib():12.0f}",
    )
    print("| " + " | ".join(cells) + f" | {note}", flush=True)


def main(argv: Sequence[str]) -> None:
    del argv
    cases, repeats, key = set(_CASES.value), _REPEATS.value, jax.random.key(0)
    print(f"backend: {jax.default_backend()}, devices: {jax.devices()}, D = {_DIM.value}")
    _print_header()
    summary = []

    if "global" in cases:
        for batch in map(int, _GLOBAL_BATCHES.value):
            result = _timed(*_global_vectorised(batch, key), repeats)
            similarity_mib = batch * batch * 4 / 2**20
            _row("G^D vectorised", f"B={batch}", result, f"similarity {similarity_mib:.1f} MiB")
            if batch == 3072:
                summary.append(
                    f"G^D B=3072: {result['call_ms']:.0f} ms per call (target < 1000 ms), "
                    f"peak RSS so far {_peak_rss_mib():.0f} MiB"
                )

    if "local" in cases:
        for slices in map(int, _LOCAL_SLICES.value):
            size = f"{slices} sl x 2 views"
            result = _timed(*_local_vectorised("LD", slices, "paper", key), repeats)
            _row("L^D vectorised, 17 regions", size, result, "13 anchors, negatives=all")
            result = _timed(*_local_vectorised("LD", slices, "grid", key), repeats)
            grid = _GRID_SIZE.value
            _row(f"L^D vectorised, {grid}x{grid} grid", size, result, "negatives=all")

    if "loop" in cases:
        comparisons = [
            ("G^D", "B=48", _global_vectorised(48, key), _global_loop(48, key)),
            (
                "L^R paper negatives",
                "10 sl x 2 views",
                _local_vectorised("LR", 10, "paper-negatives", key),
                _local_loop(10, key),
            ),
        ]
        for name, size, vectorised, loop in comparisons:
            fast = _timed(*vectorised, repeats)
            slow = _timed(*loop, repeats)
            np.testing.assert_allclose(fast["value"], slow["value"], rtol=1e-4, err_msg=name)
            _row(f"{name} vectorised", size, fast, f"loss {fast['value']:.5f}")
            _row(f"{name} loop (original form)", size, slow, f"loss {slow['value']:.5f}")
            summary.append(
                f"{name} {size}: vectorised {slow['call_ms'] / fast['call_ms']:.0f}x faster per "
                f"call, {slow['compile_s'] / fast['compile_s']:.0f}x faster to compile "
                "(targets >= 10x); values agree"
            )

    print("\n" + "\n".join(summary))
    print(f"peak RSS of the whole run: {_peak_rss_mib():.0f} MiB")


if __name__ == "__main__":
    app.run(main)
