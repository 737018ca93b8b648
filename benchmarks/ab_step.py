r"""Two or more variants of one training step, compiled in one process and run alternately.

Separate processes of `benchmarks/train_step.py` on a shared 2-core machine move their medians by
±30 ms from run to run, more than many changes worth keeping. This builds the step of `--stage`
(as `train_step.py` does) once per variant, each traced with its own environment variables set
(for code that reads them while tracing, e.g. `JAXCL_CPU_TUNING=0` turns off
`jaxcl.models.convolution`'s CPU paths), then runs the variants' steps in turn, `--rounds` times,
the order reversed every other round. It prints, per variant, the bytes XLA's cost analysis counts
for the compiled step, the median step time, and the mean difference per step from the first
variant with its standard error over the rounds: differences of 10-15 ms are resolved in 16-24
rounds (docs/TRAINING.md).

Process-wide settings (XLA_FLAGS, the allocator) cannot differ between variants: compare those
with separate `train_step.py` runs.

  PYTHONPATH=. python benchmarks/ab_step.py --stage=finetune --variants="base;JAXCL_CPU_TUNING=0"
"""

from jaxcl import runtime

if __name__ == "__main__":
    runtime.tune_cpu_process()

import contextlib  # noqa: E402 - after the process settings above
import os  # noqa: E402
import time  # noqa: E402
from collections.abc import Iterator  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from benchmarks import train_step  # noqa: E402
from configs import acdc  # noqa: E402
from jaxcl.train.parallel import DataParallel  # noqa: E402

_STAGE = flags.DEFINE_string("stage", "finetune", f"One of {', '.join(train_step.STAGES)}.")
_VARIANTS = flags.DEFINE_string(
    "variants",
    "base;JAXCL_CPU_TUNING=0",
    "Variants separated by ';', each 'base' (no change) or NAME=VALUE[,NAME=VALUE...].",
)
_ROUNDS = flags.DEFINE_integer("rounds", 16, "Steps of each variant, alternating.")


def parse_variant(text: str) -> dict[str, str]:
    """'base' -> {}; 'A=1,B=x' -> {'A': '1', 'B': 'x'}. Raises ValueError on a malformed item."""
    if text.strip() == "base":
        return {}
    settings = {}
    for item in text.split(","):
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise ValueError(
                f"--variants item {item!r} is not NAME=VALUE; write e.g. 'base;JAXCL_CPU_TUNING=0'."
            )
        settings[name.strip()] = value.strip()
    return settings


@contextlib.contextmanager
def environment(settings: dict[str, str]) -> Iterator[None]:
    """Sets `settings` in os.environ for the block, then restores the previous values."""
    previous = {name: os.environ.get(name) for name in settings}
    os.environ.update(settings)
    try:
        yield
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name)
            else:
                os.environ[name] = value


def difference_summary(times: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    """Mean of times - reference over the rounds and its standard error (0 for one round)."""
    differences = np.asarray(times) - np.asarray(reference)
    if differences.size < 2:
        return float(differences.mean()), 0.0
    return float(differences.mean()), float(differences.std(ddof=1) / np.sqrt(differences.size))


def main(argv: list[str]) -> None:
    del argv
    if _STAGE.value not in train_step.STAGES:
        raise app.UsageError(f"--stage={_STAGE.value!r} is not one of {train_step.STAGES}.")
    variants = [text.strip() for text in _VARIANTS.value.split(";") if text.strip()]
    if len(variants) < 2:
        raise app.UsageError("--variants needs at least two variants separated by ';'.")
    config = acdc.get_config()
    parallel = DataParallel(config.parallel.mode)
    pool = train_step._pool(config.data.image_size, config.data.n_partitions)
    rng = jax.random.key(1)
    runs = []
    for text in variants:
        with environment(parse_variant(text)):
            case = train_step.build_case(_STAGE.value, config, parallel, pool)
            compiled = case.step.lower(case.state, case.batch, rng).compile()
        analysis = compiled.cost_analysis()
        analysis = analysis[0] if isinstance(analysis, list) else analysis
        print(f"{text}: {analysis.get('bytes accessed', 0.0) / 1e9:.2f} GB accessed", flush=True)
        state = case.state
        for _ in range(2):  # warm-up
            state, _ = compiled(state, case.batch, rng)
        jax.block_until_ready(state)
        runs.append({"name": text, "step": compiled, "batch": case.batch, "state": state})
    times = {run["name"]: [] for run in runs}
    for round_index in range(_ROUNDS.value):
        for run in runs if round_index % 2 == 0 else runs[::-1]:
            start = time.perf_counter()
            run["state"], _ = run["step"](run["state"], run["batch"], rng)
            jax.block_until_ready(run["state"])
            times[run["name"]].append(time.perf_counter() - start)
        print(f"round {round_index + 1}/{_ROUNDS.value}", end="\r", flush=True)
    print()
    reference = np.array(times[runs[0]["name"]])
    for run in runs:
        mean, error = difference_summary(np.array(times[run["name"]]), reference)
        print(
            f"{run['name']:40s} median {1e3 * np.median(times[run['name']]):7.1f} ms   "
            f"vs {runs[0]['name']}: {1e3 * mean:+6.1f} ± {1e3 * error:.1f} ms"
        )


if __name__ == "__main__":
    app.run(main)
