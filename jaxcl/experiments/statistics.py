"""The intervals and verdicts behind the claims (`claims`): pure functions of Dice differences.

95 % Student t intervals of a mean (paired differences) and Welch t intervals of a difference of
two means (independent samples); a verdict says on which side of 0 an interval lies.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import scipy.stats

LEVEL = 0.95
# pairs_needed looks no further.
MAX_PAIRS = 10_000
HOLDS, INCONCLUSIVE, FAILS = "holds", "inconclusive", "fails"


def t_quantile(degrees_of_freedom: float | np.ndarray) -> float | np.ndarray:
    """The Student t quantile of a two-sided `LEVEL` interval: t_{0.975, df} for 95 %."""
    return scipy.stats.t.ppf(0.5 + LEVEL / 2, degrees_of_freedom)


def t_interval(values: Sequence[float]) -> tuple[float, float] | None:
    """The 95 % Student t interval of the mean of `values`, None for fewer than 2 values."""
    if len(values) < 2:
        return None
    mean = float(np.mean(values))
    std = float(np.std(values, ddof=1))
    half_width = float(t_quantile(len(values) - 1)) * std / math.sqrt(len(values))
    return mean - half_width, mean + half_width


def welch_interval(first: Sequence[float], second: Sequence[float]) -> tuple[float, float] | None:
    """The 95 % Welch t interval of mean(first) - mean(second), None if either has < 2 values."""
    if len(first) < 2 or len(second) < 2:
        return None
    difference = float(np.mean(first) - np.mean(second))
    variances = [float(np.var(s, ddof=1)) / len(s) for s in (first, second)]
    variance = sum(variances)
    if variance == 0:
        return difference, difference
    degrees_of_freedom = variance**2 / sum(
        v**2 / (len(s) - 1) for v, s in zip(variances, (first, second), strict=True)
    )
    half_width = float(t_quantile(degrees_of_freedom)) * math.sqrt(variance)
    return difference - half_width, difference + half_width


def decide(interval: tuple[float, float] | None) -> str:
    """The verdict of an interval: "holds" (above 0), "fails" (below 0) or "inconclusive"
    (contains 0, or no interval)."""
    if interval is None:
        return INCONCLUSIVE
    low, high = interval
    return HOLDS if low > 0 else (FAILS if high < 0 else INCONCLUSIVE)


def pairs_needed(mean: float, spread: float) -> int | None:
    """The smallest n >= 2 with t_{0.975, n-1} · spread / √n < |mean| (None: none up to
    `MAX_PAIRS`, or mean 0): a rough size at which a difference of this mean and standard
    deviation (`spread`) would be decided."""
    sizes = np.arange(2, MAX_PAIRS + 1)
    half_widths = t_quantile(sizes - 1) * spread / np.sqrt(sizes)
    decided = np.flatnonzero(half_widths < abs(mean))
    return int(sizes[decided[0]]) if len(decided) and mean else None
