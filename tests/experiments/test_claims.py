"""The paper's four claims checked against hand-made sweep results."""

import pytest

from jaxcl.experiments import claims, plan, table


def _result(init, labelled_set, combination, mean, seed=0):
    return table.CellResult(
        plan.Cell(init, labelled_set, combination, seed), {"LV": mean}, mean, 0.1
    )


# Mean test Dice per (init, |X_tr|) on subsets c1, c2 (random tr1-c1 has two seeds: 0.40, 0.60).
DICE = {
    ("random", "tr1"): (0.50, 0.40),
    ("GR", "tr1"): (0.55, 0.45),
    ("GD", "tr1"): (0.60, 0.50),
    ("GD+LR", "tr1"): (0.65, 0.45),
    ("random", "tr2"): (0.60, 0.60),
    ("GR", "tr2"): (0.62, 0.58),
    ("GD", "tr2"): (0.64, 0.66),
    ("GD+LR", "tr2"): (0.70, 0.60),
    ("random", "tr8"): (0.80, 0.80),
    ("GR", "tr8"): (0.81, 0.81),
    ("GD", "tr8"): (0.79, 0.79),
    ("GD+LR", "tr8"): (0.82, 0.80),
}


def _results(dice=DICE):
    results = []
    for (init, labelled_set), values in dice.items():
        for combination, value in zip(("c1", "c2"), values, strict=True):
            if (init, labelled_set, combination) == ("random", "tr1", "c1"):
                results += [
                    _result(init, labelled_set, "c1", v, seed) for seed, v in ((0, 0.4), (1, 0.6))
                ]
            else:
                results.append(_result(init, labelled_set, combination, value))
    return results


def test_paired_differences_over_shared_subsets():
    dice = table.subset_dice(_results())
    assert dice[("random", "tr1")] == pytest.approx({"c1": 0.5, "c2": 0.4})  # seeds averaged
    comparison = claims.compare(dice, "GD+LR", "GD", "tr1")
    assert comparison.differences == pytest.approx((0.05, -0.05))
    assert (comparison.mean, comparison.std, comparison.wins) == pytest.approx((0.0, 0.05, 1))
    assert not comparison.holds  # +0.000 at the 3 decimals shown is no gain
    del dice[("GD", "tr2")]["c1"]
    assert claims.compare(dice, "GD", "random", "tr2").differences == pytest.approx((0.06,))
    assert claims.compare(dice, "BYOL", "random", "tr1") is None


def test_verdicts_on_hand_made_results():
    first, second, third, fourth = claims.check_claims(_results())

    # 1: GR, GD, GD+LR against random at tr1 and tr2: all hold but GR at tr2 (+0.02 - 0.02 = 0).
    assert first.verdict == "partly"
    assert first.summary == "5 of 6 comparisons hold"
    gains = {(c.better, c.labelled_set): c.mean for c in first.comparisons}
    assert gains == pytest.approx(
        {
            ("GR", "tr1"): 0.05,
            ("GD", "tr1"): 0.10,
            ("GD+LR", "tr1"): 0.10,
            ("GR", "tr2"): 0.0,
            ("GD", "tr2"): 0.05,
            ("GD+LR", "tr2"): 0.05,
        }
    )
    # 2: GD beats GR at tr1 and tr2, not tr8; GD- never ran.
    assert second.verdict == "partly"
    assert [(c.better, c.labelled_set, c.holds) for c in second.comparisons] == [
        ("GD", "tr1", True),
        ("GD", "tr2", True),
        ("GD", "tr8", False),
    ]
    # 3: GD+LR vs GD at tr1: +0.05 and -0.05.
    assert third.verdict == "fails"
    # 4: mean gain over random 0.5/6 -> 0.2/6 -> 0.02/6 (tr8: GR +0.01, GD -0.01, GD+LR +0.01).
    assert fourth.verdict == "holds"
    assert fourth.summary == (
        "mean gain over random init +0.083 (|X_tr| = 1) → +0.033 (|X_tr| = 2) → +0.003 (|X_tr| = 8)"
    )
    assert [c.labelled_set for c in fourth.comparisons] == ["tr8"] * 3


def test_claims_the_sweep_did_not_run():
    only_tr1 = [r for r in _results() if r.cell.labelled_set == "tr1" and r.cell.init != "GD"]
    verdicts = claims.check_claims(only_tr1)
    assert [v.verdict for v in verdicts] == ["holds", "not run", "not run", "not run"]
    assert claims.check_claims([])[0].summary == "the sweep has none of the cells this claim needs"


def test_gain_growing_with_labels_fails_claim_4():
    dice = dict(DICE)
    dice[("GD", "tr8")] = (0.99, 0.99)
    dice[("GR", "tr8")] = dice[("GD+LR", "tr8")] = (0.95, 0.95)
    assert claims.check_claims(_results(dice))[3].verdict == "partly"  # tr1 > tr2 < tr8


def test_markdown_escapes_pipes_and_lists_every_comparison():
    markdown = claims.claims_markdown(claims.check_claims(_results()))
    lines = markdown.splitlines()
    assert lines[2] == (
        "| 1 | every pre-training beats random initialisation at \\|X_tr\\| = 1 and 2 | "
        "**partly** | 5 of 6 comparisons hold |"
    )
    assert "| 3 | G^D + L^R vs G^D | 1 | +0.000 ± 0.050 | 1/2 |" in lines
    assert "| 1 | G^R vs random | 2 | +0.000 ± 0.020 | 1/2 |" in lines
    # Every table row has as many cells as its header.
    for line in lines:
        if line.startswith("|"):
            cells = line.replace("\\|", "").count("|")
            assert cells in (5, 6), line
