"""The paper's four claims about its table, checked on a sweep's results.

Chaitanya et al. 2020 conclude from their Table 1 that (1) every pre-training beats random
initialisation with 1 and 2 labelled volumes, (2) G^D and G^{D-} beat G^R, (3) adding L^R on top
of G^D helps with 1 labelled volume and (4) the gain over random initialisation shrinks as
|X_tr| grows. Here each claim is reduced to paired comparisons: two initialisations fine-tuned on
the same labelled subset differ only in their initialisation, so their Dice difference on that
subset is the evidence, and its mean ± standard deviation over subsets (ddof = 0, seeds of a
subset averaged first, as in `table.summarize`) says how consistent it is.

A comparison holds when the mean paired difference is positive at the 3 decimals shown; the
number of subsets on which the first initialisation wins is shown next to it, since with 3-5
subsets a small mean difference can be one subset's luck. Claim 4 holds when the mean gain over
random initialisation (averaged over every pre-training and subset) falls from each |X_tr| to the
next.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from jaxcl import methods
from jaxcl.experiments import plan, table

RANDOM = "random"
CLAIMS = (
    "every pre-training beats random initialisation at |X_tr| = 1 and 2",
    "G^D and G^{D-} beat G^R",
    "adding L^R on top of G^D helps at |X_tr| = 1",
    "the gain over random initialisation shrinks as |X_tr| grows",
)


@dataclasses.dataclass(frozen=True)
class Comparison:
    """Paired Dice differences `better - worse` over the subsets both finished at one |X_tr|."""

    better: str
    worse: str
    labelled_set: str
    differences: tuple[float, ...]

    @property
    def mean(self) -> float:
        return float(np.mean(self.differences))

    @property
    def std(self) -> float:
        return float(np.std(self.differences))

    @property
    def wins(self) -> int:
        return sum(difference > 0 for difference in self.differences)

    @property
    def holds(self) -> bool:
        """A gain at the 3 decimals the report shows (a float-rounding tie is no gain)."""
        return round(self.mean, 3) > 0


@dataclasses.dataclass(frozen=True)
class Verdict:
    """One claim: "holds", "partly" (some comparisons hold), "fails" or "not run"."""

    claim: str
    verdict: str
    summary: str
    comparisons: tuple[Comparison, ...] = ()


def compare(
    dice: dict[tuple[str, str], dict[str, float]], better: str, worse: str, labelled_set: str
) -> Comparison | None:
    """`better - worse` on the subsets both finished at `labelled_set`, None if they share none."""
    first, second = dice.get((better, labelled_set), {}), dice.get((worse, labelled_set), {})
    shared = sorted(set(first) & set(second))
    if not shared:
        return None
    return Comparison(better, worse, labelled_set, tuple(first[s] - second[s] for s in shared))


def _verdict(claim: str, comparisons: list[Comparison | None]) -> Verdict:
    found = tuple(c for c in comparisons if c is not None)
    if not found:
        return Verdict(claim, "not run", "the sweep has none of the cells this claim needs")
    held = sum(c.holds for c in found)
    verdict = "holds" if held == len(found) else ("fails" if held == 0 else "partly")
    return Verdict(claim, verdict, f"{held} of {len(found)} comparisons hold", found)


def _sets(dice: dict[tuple[str, str], dict[str, float]]) -> list[str]:
    return plan.sorted_labelled_sets(key[1] for key in dice)


def _pretrainings(dice: dict[tuple[str, str], dict[str, float]]) -> list[str]:
    return [
        name
        for name in plan.INITIALISATIONS
        if name != RANDOM and any(key[0] == name for key in dice)
    ]


def _gain_trend(dice: dict[tuple[str, str], dict[str, float]]) -> Verdict:
    """Claim 4: the mean gain of every pre-training over random init, per |X_tr|."""
    gains, shown = {}, []
    for labelled_set in _sets(dice):
        comparisons = [compare(dice, init, RANDOM, labelled_set) for init in _pretrainings(dice)]
        found = [c for c in comparisons if c is not None]
        if found:
            gains[labelled_set] = float(np.mean([d for c in found for d in c.differences]))
        if labelled_set not in ("tr1", "tr2"):  # those are claim 1's comparisons
            shown += found
    if len(gains) < 2:
        return Verdict(CLAIMS[3], "not run", "needs pre-trained and random cells at two |X_tr|")
    values = list(gains.values())
    steps = [later < earlier for earlier, later in zip(values, values[1:], strict=False)]
    verdict = "holds" if all(steps) else ("fails" if not any(steps) else "partly")
    trend = " → ".join(
        f"{gain:+.3f} (|X_tr| = {s.removeprefix('tr')})" for s, gain in gains.items()
    )
    return Verdict(CLAIMS[3], verdict, f"mean gain over random init {trend}", tuple(shown))


def check_claims(results: Sequence[table.CellResult]) -> list[Verdict]:
    """The four claims (module docstring) on a sweep's finished cells."""
    dice = table.subset_dice(results)
    few_labels = [s for s in ("tr1", "tr2") if s in _sets(dice)]
    return [
        _verdict(
            CLAIMS[0],
            [compare(dice, init, RANDOM, s) for s in few_labels for init in _pretrainings(dice)],
        ),
        _verdict(
            CLAIMS[1],
            [compare(dice, init, "GR", s) for init in ("GD", "GD-") for s in _sets(dice)],
        ),
        _verdict(CLAIMS[2], [compare(dice, "GD+LR", "GD", "tr1")]),
        _gain_trend(dice),
    ]


def claims_markdown(verdicts: Sequence[Verdict]) -> str:
    """A summary table of the verdicts, then every paired comparison behind them."""
    lines = [
        "| # | the paper's claim | on this sweep | |",
        "|---|---|---|---|",
    ]
    for number, verdict in enumerate(verdicts, 1):
        claim, summary = (text.replace("|", "\\|") for text in (verdict.claim, verdict.summary))
        lines.append(f"| {number} | {claim} | **{verdict.verdict}** | {summary} |")
    lines += [
        "",
        "Paired differences in mean test Dice (first minus second initialisation, same labelled "
        "subsets): mean ± std over subsets, and on how many subsets the first is better.",
        "",
        "| claim | comparison | \\|X_tr\\| | Dice difference | subsets better |",
        "|---|---|---|---|---|",
    ]
    for number, verdict in enumerate(verdicts, 1):
        for c in verdict.comparisons:
            lines.append(
                f"| {number} | {methods.label(c.better)} vs {methods.label(c.worse)} | "
                f"{c.labelled_set.removeprefix('tr')} | {c.mean:+.3f} ± {c.std:.3f} | "
                f"{c.wins}/{len(c.differences)} |"
            )
    return "\n".join(lines) + "\n"
