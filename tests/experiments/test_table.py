"""results.csv and the paper-layout Markdown table against hand-computed numbers."""

import csv
import io

import pytest

from jaxcl.experiments import plan, table


def _result(init, labelled_set, combination, mean, seed=0, seconds=None):
    # Per-class values chosen so that their mean is `mean` (as in results.json).
    classes = {"RV": mean - 0.1, "Myo": mean, "LV": mean + 0.1}
    return table.CellResult(
        plan.Cell(init, labelled_set, combination, seed), classes, mean, 0.02, seconds
    )


# Hand-made cells. Table entries (mean ± population std over subsets, seeds averaged first):
#   random tr1: c1 0.50, c2 0.70                        -> 0.600 ± 0.100
#   random tr2: c1 seeds 0.70 and 0.90 (0.80), c2 0.60  -> 0.700 ± 0.100
#   GD     tr1: c1 0.65, c2 0.75                        -> 0.700 ± 0.050 (best of tr1)
#   GD     tr2: c1 0.72 only                            -> 0.720 ± 0.000, 1 of 2 subsets (best)
#   GD+LR  tr1: c1 0.6996, c2 0.7004                    -> 0.700 ± 0.000 (ties GD at 3 decimals)
RESULTS = [
    _result("GD", "tr2", "c1", 0.72, seconds=12.5),
    _result("random", "tr1", "c1", 0.50, seconds=10.0),
    _result("random", "tr1", "c2", 0.70),
    _result("random", "tr2", "c1", 0.70),
    _result("random", "tr2", "c1", 0.90, seed=1),
    _result("random", "tr2", "c2", 0.60),
    _result("GD", "tr1", "c1", 0.65),
    _result("GD", "tr1", "c2", 0.75),
    _result("GD+LR", "tr1", "c1", 0.6996),
    _result("GD+LR", "tr1", "c2", 0.7004),
]


def test_summarize_averages_seeds_then_subsets():
    entries = table.summarize(RESULTS)
    expected = {
        ("random", "tr1"): (0.6, 0.1, 2),
        ("random", "tr2"): (0.7, 0.1, 2),
        ("GD", "tr1"): (0.7, 0.05, 2),
        ("GD", "tr2"): (0.72, 0.0, 1),
        ("GD+LR", "tr1"): (0.7, 0.0004, 2),
    }
    assert set(entries) == set(expected)
    for key, (mean, std, count) in expected.items():
        assert entries[key].mean == pytest.approx(mean, abs=1e-12), key
        assert entries[key].std == pytest.approx(std, abs=1e-12), key
        assert entries[key].num_subsets == count, key


def test_markdown_in_the_papers_layout_with_best_in_bold():
    text = table.dice_table(RESULTS, "synthetic")
    lines = text.splitlines()
    start = lines.index("| initialisation | \\|X_tr\\| = 1 | \\|X_tr\\| = 2 |")
    assert lines[start + 1 :] == [
        "|---|---|---|",
        "| random | 0.600 ± 0.100 | 0.700 ± 0.100 |",
        "| G^D | **0.700 ± 0.050** | **0.720 ± 0.000** (n=1) |",
        "| G^D + L^R | **0.700 ± 0.000** | – |",
    ]
    assert "paper" not in text


def test_markdown_adds_the_papers_numbers_for_its_datasets():
    lines = table.dice_table(RESULTS, "acdc").splitlines()
    header = "| initialisation | \\|X_tr\\| = 1 | \\|X_tr\\| = 2 | paper, 1 | paper, 2 |"
    start = lines.index(header)
    assert lines[start + 2 :] == [
        "| random | 0.600 ± 0.100 | 0.700 ± 0.100 | 0.614 | 0.702 |",
        "| G^D | **0.700 ± 0.050** | **0.720 ± 0.000** (n=1) | 0.691 | 0.784 |",
        "| G^D + L^R | **0.700 ± 0.000** | – | 0.725 | 0.789 |",
    ]
    mmwhs = table.dice_table([_result("GD-", "tr8", "c1", 0.8)], "mmwhs").splitlines()
    assert mmwhs[-1] == "| G^{D-} | **0.800 ± 0.000** | – |"


def test_empty_results():
    assert table.dice_table([], "acdc") == "No cell has finished yet.\n"
    assert table.csv_text([], ["a comment"]) == (
        "# a comment\ninit,n_labelled,subset,seed,dice_mean,dice_std,seconds\n"
    )


def test_csv_has_one_row_per_cell_in_table_order():
    text = table.csv_text(RESULTS, comments=["config: x", "git commit: abc"])
    lines = text.splitlines()
    assert lines[:2] == ["# config: x", "# git commit: abc"]
    rows = list(csv.DictReader(io.StringIO("\n".join(lines[2:]))))
    assert list(rows[0]) == [
        "init",
        "n_labelled",
        "subset",
        "seed",
        "dice_RV",
        "dice_Myo",
        "dice_LV",
        "dice_mean",
        "dice_std",
        "seconds",
    ]
    keys = [(r["init"], r["n_labelled"], r["subset"], r["seed"]) for r in rows]
    assert keys == [
        ("random", "1", "c1", "0"),
        ("random", "1", "c2", "0"),
        ("random", "2", "c1", "0"),
        ("random", "2", "c1", "1"),
        ("random", "2", "c2", "0"),
        ("GD", "1", "c1", "0"),
        ("GD", "1", "c2", "0"),
        ("GD", "2", "c1", "0"),
        ("GD+LR", "1", "c1", "0"),
        ("GD+LR", "1", "c2", "0"),
    ]
    first = rows[0]
    assert [float(first[k]) for k in ("dice_RV", "dice_Myo", "dice_LV")] == pytest.approx(
        [0.4, 0.5, 0.6]
    )
    assert (float(first["dice_mean"]), float(first["dice_std"])) == (0.5, 0.02)
    assert first["seconds"] == "10.0"
    assert rows[1]["seconds"] == ""
    assert rows[7]["seconds"] == "12.5"


def test_csv_refuses_mixed_class_names():
    other = table.CellResult(plan.Cell("GD", "tr1", "c3", 0), {"prostate": 0.5}, 0.5, 0.0)
    with pytest.raises(ValueError, match="results of two datasets mixed"):
        table.csv_text([RESULTS[1], other])
