"""The paper's claims on hand-made sweep results; intervals against hand computation."""

import math

import numpy as np
import pytest
import scipy.stats

from jaxcl.experiments import claims, plan, statistics, table


def _result(init, labelled_set, combination, mean, seed=0):
    return table.CellResult(
        plan.Cell(init, labelled_set, combination, seed), {"LV": mean}, mean, 0.1
    )


def _results(dice):
    """Cells from (init, labelled set) -> mean test Dice on subsets c1, c2, ... with seed 0."""
    return [
        _result(init, labelled_set, f"c{index}", value)
        for (init, labelled_set), values in dice.items()
        for index, value in enumerate(values, 1)
    ]


# Mean test Dice on subsets c1, c2, c3 (seed 0). Paired differences that decide the claims:
#   tr1: GD - random = .10 .11 .09 (holds), GR - random = .05 -.05 .02 (inconclusive),
#        GD+LR - random = .05 .05 .05 (holds), GD+LR - GD = -.05 -.06 -.04 (fails),
#        GD+LR - Rotation = -.15 -.05 .05 (inconclusive), GD+LR+mixup - GD+LR = .05 .05 .05 and
#        GD+LR+mixup - mixup = .08 .08 .08 (hold), GD - GR = .05 .16 .07 (inconclusive)
#   tr2: GD - random = .05 .06 .04, GD+LR - random = .06 .05 .06 (hold),
#        GR - random = .02 .03 .01 (inconclusive), GD - GR = .03 .03 .03 (holds)
#   tr8: GD - GR = -.02 -.01 -.02 (fails)
DICE = {
    ("random", "tr1"): (0.50, 0.40, 0.60),
    ("GR", "tr1"): (0.55, 0.35, 0.62),
    ("GD", "tr1"): (0.60, 0.51, 0.69),
    ("GD+LR", "tr1"): (0.55, 0.45, 0.65),
    ("Rotation", "tr1"): (0.70, 0.50, 0.60),
    ("mixup", "tr1"): (0.52, 0.42, 0.62),
    ("GD+LR+mixup", "tr1"): (0.60, 0.50, 0.70),
    ("task-aug", "tr1"): (0.50, 0.41, 0.59),
    ("random", "tr2"): (0.70, 0.60, 0.65),
    ("GR", "tr2"): (0.72, 0.63, 0.66),
    ("GD", "tr2"): (0.75, 0.66, 0.69),
    ("GD+LR", "tr2"): (0.76, 0.65, 0.71),
    ("random", "tr8"): (0.80, 0.82, 0.78),
    ("GR", "tr8"): (0.82, 0.84, 0.80),
    ("GD", "tr8"): (0.80, 0.83, 0.78),
    ("GD+LR", "tr8"): (0.81, 0.83, 0.79),
}


def test_t_interval_by_hand():
    # Differences 0.1, 0.2, 0.3: mean 0.2, sample std 0.1, t_{0.975, 2} = 4.302653,
    # half-width 4.302653 * 0.1 / sqrt(3) = 0.248414.
    assert statistics.t_quantile(2) == pytest.approx(4.302653, abs=1e-6)
    assert statistics.t_quantile(4) == pytest.approx(2.776445, abs=1e-6)
    assert statistics.t_quantile(1e9) == pytest.approx(1.959964, abs=1e-6)
    low, high = statistics.t_interval((0.1, 0.2, 0.3))
    assert (low, high) == pytest.approx((0.2 - 0.248414, 0.2 + 0.248414), abs=1e-6)
    assert statistics.t_interval((0.5,)) is None


def test_welch_interval_by_hand_and_against_scipy():
    # A constant second sample: se = 0.1 / sqrt(3), Welch df = n1 - 1 = 2, as the t interval.
    low, high = statistics.welch_interval((0.1, 0.2, 0.3), (0.0, 0.0, 0.0))
    assert (low, high) == pytest.approx((0.2 - 0.248414, 0.2 + 0.248414), abs=1e-6)
    first, second = (1.0, 2.0, 3.0, 4.0), (2.0, 4.0, 6.0)
    reference = scipy.stats.ttest_ind(first, second, equal_var=False).confidence_interval(0.95)
    assert statistics.welch_interval(first, second) == pytest.approx(tuple(reference))
    assert statistics.welch_interval((0.1, 0.2), (0.3,)) is None
    assert statistics.welch_interval((0.1, 0.1), (0.0, 0.0)) == pytest.approx((0.1, 0.1))


def test_decide_needs_the_interval_on_one_side_of_zero():
    assert statistics.decide((0.01, 0.2)) == "holds"
    assert statistics.decide((-0.2, -0.01)) == "fails"
    assert statistics.decide((-0.1, 0.1)) == "inconclusive"
    assert statistics.decide((0.0, 0.1)) == "inconclusive"
    assert statistics.decide(None) == "inconclusive"


def test_pairs_needed_at_the_observed_mean_and_std():
    # mean 0.05, std 0.1: decided when t_{0.975, n-1} < 0.5 sqrt(n):
    # n = 17: t_16 = 2.1199 > 2.0616; n = 18: t_17 = 2.1098 < 2.1213.
    assert statistics.pairs_needed(0.05, 0.1) == 18
    assert statistics.pairs_needed(-0.05, 0.1) == 18
    assert statistics.pairs_needed(0.1, 0.0) == 2
    assert statistics.pairs_needed(0.0, 0.1) is None
    assert statistics.pairs_needed(1e-6, 1.0) is None  # beyond MAX_PAIRS


def test_pairs_are_subset_and_seed():
    results = [
        _result("random", "tr1", "c1", 0.5, seed=0),
        _result("random", "tr1", "c1", 0.6, seed=1),
        _result("random", "tr1", "c2", 0.4, seed=0),
        _result("GD", "tr1", "c1", 0.6, seed=0),
        _result("GD", "tr1", "c1", 0.6, seed=1),
        _result("GD", "tr1", "c2", 0.45, seed=0),
        _result("GD", "tr1", "c3", 0.9, seed=0),  # random has no c3: no pair
        _result("GD", "tr1", "c2", 0.9, seed=1),  # nor c2 with seed 1
    ]
    dice = claims.paired_dice(results)
    assert dice[("random", "tr1")] == pytest.approx(
        {("c1", 0): 0.5, ("c1", 1): 0.6, ("c2", 0): 0.4}
    )
    comparison = claims.compare(dice, "GD", "random", "tr1")
    assert comparison.pairs == (("c1", 0), ("c1", 1), ("c2", 0))
    assert comparison.differences == pytest.approx((0.1, 0.0, 0.05))
    # mean 0.05, std 0.05, half-width 4.302653 * 0.05 / sqrt(3) = 0.124207.
    assert (comparison.mean, comparison.std) == pytest.approx((0.05, 0.05))
    assert comparison.interval == pytest.approx((0.05 - 0.124207, 0.05 + 0.124207), abs=1e-6)
    assert (comparison.verdict, comparison.wins, comparison.num_subsets) == ("inconclusive", 2, 2)
    # t_{n-1} < sqrt(n): n = 6: 2.5706 > 2.4495; n = 7: 2.4469 < 2.6458.
    assert comparison.pairs_needed == 7
    assert claims.compare(dice, "BYOL", "random", "tr1") is None


def test_one_pair_has_no_interval():
    dice = claims.paired_dice(
        [_result("GD", "tr1", "c1", 0.9), _result("random", "tr1", "c1", 0.1)]
    )
    comparison = claims.compare(dice, "GD", "random", "tr1")
    assert comparison.interval is None and math.isnan(comparison.std)
    assert (comparison.verdict, comparison.pairs_needed) == ("inconclusive", None)


def test_verdicts_on_hand_made_results():
    verdicts = claims.check_claims(_results(DICE))
    assert len(verdicts) == len(claims.CLAIMS) == 7
    first, second, third, fourth, fifth, sixth, seventh = verdicts

    # 1: GR, GD, GD+LR against random at tr1 and tr2: GR inconclusive at both.
    assert [(c.better, c.labelled_set, c.verdict) for c in first.comparisons] == [
        ("GR", "tr1", "inconclusive"),
        ("GD", "tr1", "holds"),
        ("GD+LR", "tr1", "holds"),
        ("GR", "tr2", "inconclusive"),
        ("GD", "tr2", "holds"),
        ("GD+LR", "tr2", "holds"),
    ]
    assert (first.verdict, first.summary) == ("partly", "4 of 6 hold, 2 inconclusive, 0 fail")
    # 2: GD vs GR inconclusive at tr1, holds at tr2, fails at tr8; GD- never ran.
    assert [c.verdict for c in second.comparisons] == ["inconclusive", "holds", "fails"]
    assert (second.verdict, second.summary) == ("mixed", "1 of 3 hold, 1 inconclusive, 1 fail")
    # 3: GD+LR vs GD at tr1: -0.05 ± 4.302653 * 0.01 / sqrt(3).
    [comparison] = third.comparisons
    assert comparison.interval == pytest.approx((-0.05 - 0.024841, -0.05 + 0.024841), abs=1e-6)
    assert third.verdict == "fails"
    # 5: only Rotation ran of the pretext tasks.
    assert [(c.worse, c.verdict) for c in fifth.comparisons] == [("Rotation", "inconclusive")]
    assert fifth.verdict == "inconclusive"
    # 6: GD+LR+mixup against both its parts; the other combinations did not run.
    assert [(c.better, c.worse, c.verdict) for c in sixth.comparisons] == [
        ("GD+LR+mixup", "GD+LR", "holds"),
        ("GD+LR+mixup", "mixup", "holds"),
    ]
    assert sixth.verdict == "holds"
    # 7: GD+LR+mixup against Data Aug. (task-aug); GD+LR+self-training did not run.
    assert [(c.better, c.worse, c.verdict) for c in seventh.comparisons] == [
        ("GD+LR+mixup", "task-aug", "holds"),
    ]
    assert fourth.verdict == "partly"


def test_gain_trend_with_welch_intervals():
    fourth = claims.check_claims(_results(DICE))[3]
    # Per pair: the mean over GR, GD, GD+LR of (pre-training - random).
    gains = {
        "tr1": ((0.05 + 0.10 + 0.05) / 3, (-0.05 + 0.11 + 0.05) / 3, (0.02 + 0.09 + 0.05) / 3),
        "tr2": ((0.02 + 0.05 + 0.06) / 3, (0.03 + 0.06 + 0.05) / 3, (0.01 + 0.04 + 0.06) / 3),
        "tr8": (0.03 / 3, 0.04 / 3, 0.03 / 3),
    }
    steps = fourth.comparisons
    assert [(s.smaller, s.larger, s.pretrainings) for s in steps] == [
        ("tr1", "tr2", ("GR", "GD", "GD+LR")),
        ("tr2", "tr8", ("GR", "GD", "GD+LR")),
    ]
    for step in steps:
        first, second = gains[step.smaller], gains[step.larger]
        assert step.gains == (pytest.approx(first), pytest.approx(second))
        assert step.mean == pytest.approx(np.mean(first) - np.mean(second))
        reference = scipy.stats.ttest_ind(first, second, equal_var=False).confidence_interval()
        assert step.interval == pytest.approx(tuple(reference), abs=1e-9)
    assert [s.verdict for s in steps] == ["inconclusive", "holds"]
    assert fourth.summary == (
        "mean gain over random init +0.052 (|X_tr| = 1) → +0.042 (|X_tr| = 2) → "
        "+0.011 (|X_tr| = 8); steps: 1 of 2 hold, 1 inconclusive, 0 fail"
    )


def test_gain_growing_with_labels_fails_claim_4():
    dice = dict(DICE)
    dice[("GD", "tr8")] = (0.99, 0.97, 0.98)
    dice[("GR", "tr8")] = dice[("GD+LR", "tr8")] = (0.95, 0.96, 0.94)
    assert [s.verdict for s in claims.check_claims(_results(dice))[3].comparisons] == [
        "inconclusive",
        "fails",
    ]


def test_claims_the_sweep_did_not_run():
    only = {key: DICE[key] for key in [("random", "tr1"), ("GD", "tr1")]}
    verdicts = claims.check_claims(_results(only))
    assert [v.verdict for v in verdicts] == ["holds"] + ["not run"] * 6
    assert claims.check_claims([])[0].summary == "the sweep has none of the cells this claim needs"


def test_markdown_lists_every_comparison_and_the_noisy_ones():
    verdicts = claims.check_claims(_results(DICE))
    lines = claims.claims_markdown(verdicts).splitlines()
    assert lines[2] == (
        "| 1 | every pre-training beats random initialisation at \\|X_tr\\| = 1 and 2 | "
        "**partly** | 4 of 6 hold, 2 inconclusive, 0 fail |"
    )
    assert "| 3 | G^D + L^R vs G^D | 1 | -0.050 | [-0.075, -0.025] | 3 | 0/3 | fails |" in lines
    assert (
        "| 6 | G^D + L^R + mixup vs mixup | 1 | +0.080 | [+0.080, +0.080] | 3 | 3/3 | holds |"
        in lines
    )
    step = verdicts[3].comparisons[1]
    low, high = step.interval
    assert (
        "| 4 | gain over random at \\|X_tr\\| = 2 minus at 8 (3 pre-trainings) | 2 vs 8 | "
        f"+0.031 | [{low:+.3f}, {high:+.3f}] | 3 + 3 | – | holds |"
    ) in lines
    # The inconclusive ones again, with the pairs that would decide them and how to get them.
    note = lines[
        lines.index(
            "| claim | comparison | \\|X_tr\\| | pairs | pairs needed | seeds per subset |"
        ) :
    ]
    gr = verdicts[0].comparisons[0]
    needed = gr.pairs_needed
    assert f"| 1 | G^R vs random | 1 | 3 | {needed} | {math.ceil(needed / 3)} |" in note
    inconclusive = sum(c.verdict == "inconclusive" for v in verdicts for c in v.comparisons)
    assert len(note) == 2 + inconclusive
    assert "`--config.sweep.seeds=0,1,2`" in "\n".join(lines)
    # Every table row has as many cells as its header.
    for line in lines:
        if line.startswith("|"):
            cells = line.replace("\\|", "").count("|")
            assert cells in (5, 7, 9), line


def test_markdown_with_one_pair_asks_for_a_second():
    results = [_result("GD+LR", "tr1", "c1", 0.7), _result("GD", "tr1", "c1", 0.6)]
    markdown = claims.claims_markdown(claims.check_claims(results))
    assert "| 3 | G^D + L^R vs G^D | 1 | +0.100 | – | 1 | 1/1 | inconclusive |" in markdown
    assert "| 3 | G^D + L^R vs G^D | 1 | 1 | ≥ 2 for an interval | ≥ 2 |" in markdown
