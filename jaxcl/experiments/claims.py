"""The paper's claims about its tables 1 and 2, checked on a sweep's results with 95 % intervals.

Chaitanya et al. 2020 conclude from Table 1 that (1) every pre-training beats random
initialisation with 1 and 2 labelled volumes, (2) G^D and G^{D-} beat G^R, (3) adding L^R on top
of G^D helps with 1 labelled volume and (4) the gain over random initialisation shrinks as |X_tr|
grows; and from Table 2 that with 1 labelled volume (5) the proposed initialisation G^D + L^R
beats every pretext-task pre-training, (6) each combination of it with a semi-supervised
fine-tuning beats both of its parts and (7) its combinations with mixup and with self-training
beat the task-driven augmentation of Chaitanya et al. 2019 ("Data Aug."). The pre-trainings of
(1) and (4) are Table 1's rows (`table.table1_inits`); (6) has one combination per
semi-supervised fine-tuning of
`plan.INITIALISATIONS` (`table.proposed_combinations`), so a new fine-tuning is checked too.

Comparisons. Two initialisations fine-tuned on the same labelled subset with the same seed differ
only in their initialisation: such a pair (subset, seed) gives one paired difference, `better -
worse` in mean test Dice. Over the n pairs both finished at one |X_tr|, a `Comparison` has the
mean difference and its 95 % Student t confidence interval, mean ± t_{0.975, n-1} · s / √n (s: the
sample standard deviation of the differences, ddof = 1). A comparison

- holds when the interval lies entirely above 0,
- fails when it lies entirely below 0,
- is inconclusive otherwise, and when n < 2 (no interval).

The interval treats the pairs as independent. Seeds of one subset share its labelled volumes, so
with several seeds per subset it is somewhat too narrow: more subsets are worth more than more
seeds.

Claim 4 compares two sizes, whose pairs are different labelled subsets. For consecutive |X_tr|
s < s' (`GainStep`), P is the Table 1 pre-trainings that finished pairs with random init. at both;
a pair's gain is the mean over P of (pre-training - random) on it, pairs that one of P did not
finish left out. The step's difference is the mean gain at s minus that at s', with a 95 % Welch
t interval (two independent samples, unequal variances, Welch-Satterthwaite degrees of freedom),
decided like a comparison: the claim says it is above 0.

Claims. With h of a claim's n comparisons (or steps) holding, i inconclusive and f failing, it

- "holds" when h = n, "fails" when f = n, is "inconclusive" when i = n,
- holds "partly" when some hold and none fails (the others inconclusive),
- is "mixed" otherwise: some fail, the others hold or are inconclusive;
- is "not run" when the sweep has the cells of none of its comparisons.

For an inconclusive comparison, `pairs_needed` is a rough size at which it would be decided: the
smallest n with t_{0.975, n-1} · s / √n < |mean| if the mean and s stayed as observed. At that size
an effect of the observed size is decided only about half of the time: a lower bound.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import numpy as np

from jaxcl import methods
from jaxcl.experiments import plan, table
from jaxcl.experiments.statistics import (
    FAILS,
    HOLDS,
    INCONCLUSIVE,
    MAX_PAIRS,
    decide,
    pairs_needed,
    t_interval,
    welch_interval,
)

CLAIMS = (
    "every pre-training beats random initialisation at |X_tr| = 1 and 2",
    "G^D and G^{D-} beat G^R",
    "adding L^R on top of G^D helps at |X_tr| = 1",
    "the gain over random initialisation shrinks as |X_tr| grows",
    "the proposed initialisation (G^D + L^R) beats every pretext-task pre-training at |X_tr| = 1",
    "each combination of the proposed initialisation with a semi-supervised fine-tuning beats "
    "both of its parts at |X_tr| = 1",
    "the proposed initialisation + mixup and + self-training beat Data Aug. (task-driven "
    "augmentation) at |X_tr| = 1",
)
RANDOM, PROPOSED = table.RANDOM, table.PROPOSED

# (subset, seed): the cells of two initialisations that form a pair.
Pair = tuple[str, int]
PairedDice = Mapping[tuple[str, str], Mapping[Pair, float]]


# ----------------------------------------------------------------------------------------------
# Comparisons.


@dataclasses.dataclass(frozen=True)
class Comparison:
    """Paired Dice differences `better - worse` over the pairs (subset, seed) both finished at
    one labelled set (module docstring)."""

    better: str
    worse: str
    labelled_set: str
    pairs: tuple[Pair, ...]
    differences: tuple[float, ...]

    @property
    def mean(self) -> float:
        return float(np.mean(self.differences))

    @property
    def std(self) -> float:
        """Sample standard deviation (ddof = 1); nan for one pair."""
        return float(np.std(self.differences, ddof=1)) if len(self.differences) > 1 else math.nan

    @property
    def interval(self) -> tuple[float, float] | None:
        """95 % Student t interval of the mean difference; None for one pair."""
        return t_interval(self.differences)

    @property
    def verdict(self) -> str:
        return decide(self.interval)

    @property
    def wins(self) -> int:
        return sum(difference > 0 for difference in self.differences)

    @property
    def num_subsets(self) -> int:
        return len({subset for subset, _ in self.pairs})

    @property
    def pairs_needed(self) -> int | None:
        """`pairs_needed` at the observed mean and std; None for one pair."""
        return None if len(self.differences) < 2 else pairs_needed(self.mean, self.std)


@dataclasses.dataclass(frozen=True)
class GainStep:
    """Claim 4 between two consecutive labelled sets: per-pair gains over random init. at each.

    Attributes:
      smaller, larger: the labelled sets, smaller |X_tr| first.
      pretrainings: P, the pre-trainings whose gains are averaged on each pair.
      gains: (at smaller, at larger): each pair's mean gain over P.
      num_subsets: (at smaller, at larger): the labelled subsets among those pairs.
    """

    smaller: str
    larger: str
    pretrainings: tuple[str, ...]
    gains: tuple[tuple[float, ...], tuple[float, ...]]
    num_subsets: tuple[int, int]

    @property
    def mean(self) -> float:
        """Mean gain at `smaller` minus mean gain at `larger`."""
        return float(np.mean(self.gains[0]) - np.mean(self.gains[1]))

    @property
    def interval(self) -> tuple[float, float] | None:
        """95 % Welch t interval of `mean`; None with one pair at either size."""
        return welch_interval(*self.gains)

    @property
    def verdict(self) -> str:
        return decide(self.interval)

    @property
    def pairs_needed(self) -> int | None:
        """Pairs at each size: `pairs_needed` with spread √(s_1² + s_2²) (the standard error of
        the difference with n pairs at each size, times √n); None with one pair at either."""
        if min(len(g) for g in self.gains) < 2:
            return None
        return pairs_needed(self.mean, math.sqrt(sum(np.var(g, ddof=1) for g in self.gains)))


@dataclasses.dataclass(frozen=True)
class Verdict:
    """One claim: "holds", "partly", "inconclusive", "mixed", "fails" or "not run" (module
    docstring)."""

    claim: str
    verdict: str
    summary: str
    comparisons: tuple[Comparison | GainStep, ...] = ()


def paired_dice(results: Sequence[table.CellResult]) -> dict[tuple[str, str], dict[Pair, float]]:
    """(init, labelled_set) -> (subset, seed) -> the cell's mean test Dice."""
    dice: dict[tuple[str, str], dict[Pair, float]] = {}
    for result in results:
        cell = result.cell
        dice.setdefault((cell.init, cell.labelled_set), {})[cell.combination, cell.seed] = (
            result.mean_dice
        )
    return dice


def compare(dice: PairedDice, better: str, worse: str, labelled_set: str) -> Comparison | None:
    """`better - worse` on the pairs both finished at `labelled_set`, None if they share none."""
    first, second = dice.get((better, labelled_set), {}), dice.get((worse, labelled_set), {})
    pairs = tuple(sorted(set(first) & set(second)))
    if not pairs:
        return None
    differences = tuple(first[pair] - second[pair] for pair in pairs)
    return Comparison(better, worse, labelled_set, pairs, differences)


def _pair_gains(
    dice: PairedDice, pretrainings: Sequence[str], labelled_set: str
) -> dict[Pair, float]:
    """Pair -> mean over `pretrainings` of (pre-training - random), pairs all of them finished."""
    random = dice.get((RANDOM, labelled_set), {})
    runs = [dice.get((name, labelled_set), {}) for name in pretrainings]
    return {
        pair: float(np.mean([run[pair] - random[pair] for run in runs]))
        for pair in sorted(random)
        if all(pair in run for run in runs)
    }


def gain_step(
    dice: PairedDice, pretrainings: Sequence[str], smaller: str, larger: str
) -> GainStep | None:
    """Claim 4's evidence between two labelled sets, None without a gain at both."""
    shared = [
        name
        for name in pretrainings
        if compare(dice, name, RANDOM, smaller) and compare(dice, name, RANDOM, larger)
    ]
    if not shared:
        return None
    gains = [_pair_gains(dice, shared, s) for s in (smaller, larger)]
    if not all(gains):
        return None
    return GainStep(
        smaller,
        larger,
        tuple(shared),
        (tuple(gains[0].values()), tuple(gains[1].values())),
        (len({s for s, _ in gains[0]}), len({s for s, _ in gains[1]})),
    )


# ----------------------------------------------------------------------------------------------
# Claims.


def _counts(found: Sequence[Comparison | GainStep]) -> tuple[str, str]:
    """The claim's verdict (module docstring) and a summary of its comparisons' verdicts."""
    verdicts = [c.verdict for c in found]
    held, failed = verdicts.count(HOLDS), verdicts.count(FAILS)
    undecided = len(verdicts) - held - failed
    if held == len(verdicts):
        verdict = HOLDS
    elif failed == len(verdicts):
        verdict = FAILS
    elif undecided == len(verdicts):
        verdict = INCONCLUSIVE
    else:
        verdict = "partly" if not failed else "mixed"
    return verdict, f"{held} of {len(verdicts)} hold, {undecided} inconclusive, {failed} fail"


def _verdict(claim: str, comparisons: Sequence[Comparison | GainStep | None]) -> Verdict:
    found = tuple(c for c in comparisons if c is not None)
    if not found:
        return Verdict(claim, "not run", "the sweep has none of the cells this claim needs")
    return Verdict(claim, *_counts(found), found)


def _gain_trend(dice: PairedDice, pretrainings: Sequence[str]) -> Verdict:
    """Claim 4: the gain over random init. between each pair of consecutive |X_tr|."""
    mean_gains = {}
    for labelled_set in plan.sorted_labelled_sets(key[1] for key in dice):
        found = [compare(dice, name, RANDOM, labelled_set) for name in pretrainings]
        differences = [d for c in found if c is not None for d in c.differences]
        if differences:
            mean_gains[labelled_set] = float(np.mean(differences))
    sets = list(mean_gains)
    steps = [
        gain_step(dice, pretrainings, smaller, larger)
        for smaller, larger in zip(sets, sets[1:], strict=False)
    ]
    verdict = _verdict(CLAIMS[3], steps)
    if not verdict.comparisons:
        return Verdict(CLAIMS[3], "not run", "needs pre-trained and random cells at two |X_tr|")
    trend = " → ".join(
        f"{gain:+.3f} (|X_tr| = {plan.labelled_set_size(s)})" for s, gain in mean_gains.items()
    )
    return dataclasses.replace(
        verdict, summary=f"mean gain over random init {trend}; steps: {verdict.summary}"
    )


def check_claims(results: Sequence[table.CellResult]) -> list[Verdict]:
    """The seven claims (module docstring) on a sweep's finished cells."""
    dice = paired_dice(results)
    sets = plan.sorted_labelled_sets(key[1] for key in dice)
    pretrainings = [name for name in table.table1_inits() if name != RANDOM]
    few_labels = [s for s in ("tr1", "tr2") if s in sets]
    combinations = table.proposed_combinations()
    return [
        _verdict(
            CLAIMS[0],
            [compare(dice, name, RANDOM, s) for s in few_labels for name in pretrainings],
        ),
        _verdict(CLAIMS[1], [compare(dice, name, "GR", s) for name in ("GD", "GD-") for s in sets]),
        _verdict(CLAIMS[2], [compare(dice, PROPOSED, "GD", "tr1")]),
        _gain_trend(dice, pretrainings),
        _verdict(CLAIMS[4], [compare(dice, PROPOSED, name, "tr1") for name in table.PRETEXT_TASKS]),
        _verdict(
            CLAIMS[5],
            [
                # "mixup" is random init. fine-tuned by mixup (plan's names).
                compare(dice, name, part, "tr1")
                for name in combinations
                for part in (PROPOSED, plan.INITIALISATIONS[name].fine_tuning)
            ],
        ),
        _verdict(
            CLAIMS[6],
            [
                compare(dice, f"{PROPOSED}+{fine_tuning}", table.DATA_AUG, "tr1")
                for fine_tuning in ("mixup", "self-training")
            ],
        ),
    ]


# ----------------------------------------------------------------------------------------------
# Markdown.


def _interval_text(interval: tuple[float, float] | None) -> str:
    return "–" if interval is None else f"[{interval[0]:+.3f}, {interval[1]:+.3f}]"


def _describe(c: Comparison | GainStep) -> tuple[str, str, str, str]:
    """(comparison, |X_tr|, pairs, wins) as the comparison table shows them."""
    if isinstance(c, GainStep):
        sizes = [plan.labelled_set_size(s) for s in (c.smaller, c.larger)]
        return (
            f"gain over random at \\|X_tr\\| = {sizes[0]} minus at {sizes[1]} "
            f"({len(c.pretrainings)} pre-trainings)",
            f"{sizes[0]} vs {sizes[1]}",
            f"{len(c.gains[0])} + {len(c.gains[1])}",
            "–",
        )
    return (
        f"{methods.label(c.better)} vs {methods.label(c.worse)}",
        plan.labelled_set_size(c.labelled_set),
        str(len(c.differences)),
        f"{c.wins}/{len(c.differences)}",
    )


def _needed_text(c: Comparison | GainStep) -> tuple[str, str]:
    """(pairs needed, seeds per subset) for the note on comparisons too noisy to decide."""
    if c.interval is None:
        return "≥ 2 for an interval", "≥ 2"
    needed = c.pairs_needed
    if needed is None:
        return f"> {MAX_PAIRS}", "–"
    subsets = c.num_subsets if isinstance(c, Comparison) else min(c.num_subsets)
    return str(needed), str(math.ceil(needed / subsets))


def claims_markdown(verdicts: Sequence[Verdict]) -> str:
    """A summary table of the verdicts, every comparison behind them, then the ones too noisy to
    decide with a rough number of pairs that would decide them."""
    lines = ["| # | the paper's claim | on this sweep | |", "|---|---|---|---|"]
    for number, verdict in enumerate(verdicts, 1):
        claim, summary = (text.replace("|", "\\|") for text in (verdict.claim, verdict.summary))
        lines.append(f"| {number} | {claim} | **{verdict.verdict}** | {summary} |")
    lines += [
        "",
        "Paired comparisons: first minus second initialisation in mean test Dice, over the pairs "
        "(labelled subset, seed) both finished; the 95 % Student t confidence interval of the "
        "mean difference, mean ± t_{0.975, n-1} · s / √n (s: standard deviation of the n paired "
        "differences, ddof = 1); on how many pairs the first is better. Claim 4 compares the mean "
        "gain over random init. (averaged over the pre-trainings on each pair) between two sizes "
        "with a 95 % Welch t interval. A comparison holds when its interval lies above 0, fails "
        "when it lies below 0, and is inconclusive otherwise (or with one pair).",
        "",
        "| claim | comparison | \\|X_tr\\| | mean difference | 95 % CI | pairs | wins | verdict |",
        "|---|---|---|---|---|---|---|---|",
    ]
    noisy = []
    for number, verdict in enumerate(verdicts, 1):
        for c in verdict.comparisons:
            name, sizes, pairs, wins = _describe(c)
            lines.append(
                f"| {number} | {name} | {sizes} | {c.mean:+.3f} | {_interval_text(c.interval)} | "
                f"{pairs} | {wins} | {c.verdict} |"
            )
            if c.verdict == INCONCLUSIVE:
                noisy.append((number, name, sizes, pairs, *_needed_text(c)))
    if noisy:
        lines += [
            "",
            f"Too noisy to decide: {len(noisy)} comparisons. Pairs needed: a rough number at which "
            "the observed mean difference would lie outside its interval if it and the standard "
            "deviation stayed as observed (decided then only about half of the time: a lower "
            "bound; claim 4: pairs at each size). Pairs are subsets × seeds: add seeds to the "
            "sweep, e.g. `--config.sweep.seeds=0,1,2`, or subsets.",
            "",
            "| claim | comparison | \\|X_tr\\| | pairs | pairs needed | seeds per subset |",
            "|---|---|---|---|---|---|",
        ]
        lines += ["| " + " | ".join(map(str, row)) + " |" for row in noisy]
    return "\n".join(lines) + "\n"
