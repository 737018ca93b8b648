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


def _table(markdown: str, header_start: str) -> list[str]:
    """The lines of the Markdown table whose header starts with `header_start`."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    return lines[start:end]


def test_markdown_in_the_papers_layout_with_best_in_bold():
    text = table.tables_markdown(RESULTS, "synthetic")
    assert _table(text, "| initialisation") == [
        "| initialisation | \\|X_tr\\| = 1 | \\|X_tr\\| = 2 |",
        "|---|---|---|",
        "| random | 0.600 ± 0.100 | 0.700 ± 0.100 |",
        "| G^D | **0.700 ± 0.050** | **0.720 ± 0.000** (n=1) |",
        "| G^D + L^R | **0.700 ± 0.000** | – |",
    ]
    assert "paper" not in text.lower()
    # Every row is one of table 1: no table 2, no other rows.
    assert "Table 1: " in text and "Table 2: " not in text and "Other" not in text


def test_markdown_adds_the_papers_numbers_for_its_datasets():
    text = table.tables_markdown(RESULTS, "acdc")
    assert _table(text, "| initialisation")[2:] == [
        "| random | 0.600 ± 0.100 | 0.700 ± 0.100 | 0.614 | 0.702 |",
        "| G^D | **0.700 ± 0.050** | **0.720 ± 0.000** (n=1) | 0.691 | 0.784 |",
        "| G^D + L^R | **0.700 ± 0.000** | – | 0.725 | 0.789 |",
    ]
    mmwhs = table.tables_markdown([_result("GD-", "tr8", "c1", 0.8)], "mmwhs")
    assert _table(mmwhs, "| initialisation")[2:] == ["| G^{D-} | **0.800 ± 0.000** | – |"]


def test_table2_rows_in_the_papers_order():
    rows = table.table2_rows()
    assert [row.label for row in rows] == [
        "Random init.",
        "Rotation",
        "Inpainting",
        "Context restoration",
        "Self-training",
        "Mixup",
        "Data Aug.",
        "Data Aug. + Mixup",
        "Adversarial training",
        "Proposed init. + self-training",
        "Proposed init. + mixup",
        "Proposed init. + data aug.",
        "Proposed init. + data aug. + mixup",
        "Proposed init. + adversarial training",
        "Proposed init. (G^D + L^R)",
        "Benchmark (random init., all labelled)",
    ]
    assert [row.init for row in rows] == [
        "random",
        "Rotation",
        "Inpainting",
        "ContextRestoration",
        "self-training",
        "mixup",
        "task-aug",
        "task-aug-mixup",
        "adversarial",
        "GD+LR+self-training",
        "GD+LR+mixup",
        "GD+LR+task-aug",
        "GD+LR+task-aug-mixup",
        "GD+LR+adversarial",
        "GD+LR",
        "random",
    ]
    assert [row.labelled_set for row in rows] == [None] * 15 + ["trall"]
    # Every combination is G^D + L^R fine-tuned by a semi-supervised method of plan.
    assert {plan.INITIALISATIONS[name].fine_tuning for name in table.proposed_combinations()} == (
        set(plan.SEMI_SUPERVISED)
    )
    assert table.table1_inits() == (
        "random", "GR", "GD-", "GD", "BYOL", "BYOL-D", "GR+LR", "GR+LD", "GD+LR", "GD+LD"
    )  # fmt: skip


# Cells of every table: table 1 (random, G^D + L^R, with random on trall), table 2 (Rotation,
# mixup, G^D + L^R + mixup, the benchmark) and one other row (G^D + mixup).
#   random      tr1: 0.50, 0.70 -> 0.600 ± 0.100   tr2: 0.70 -> 0.700   trall: 0.90, 0.92 (seeds)
#   Rotation    tr1: 0.62, 0.66 -> 0.640 ± 0.020
#   mixup       tr1: 0.60, 0.70 -> 0.650 ± 0.050   tr2: 0.75 -> 0.750 (best of tr2)
#   GD+LR+mixup tr1: 0.74 (c1 only) -> 0.740 (n=1), best of tr1
#   GD+LR       tr1: 0.70, 0.72 -> 0.710 ± 0.010   tr2: 0.74 -> 0.740
#   GD+mixup    tr1: 0.66 -> 0.660
TABLE2_RESULTS = [
    _result("random", "tr1", "c1", 0.50),
    _result("random", "tr1", "c2", 0.70),
    _result("random", "tr2", "c1", 0.70),
    _result("random", "trall", "c1", 0.90),
    _result("random", "trall", "c1", 0.92, seed=1),
    _result("Rotation", "tr1", "c1", 0.62),
    _result("Rotation", "tr1", "c2", 0.66),
    _result("mixup", "tr1", "c1", 0.60),
    _result("mixup", "tr1", "c2", 0.70),
    _result("mixup", "tr2", "c1", 0.75),
    _result("GD+LR+mixup", "tr1", "c1", 0.74),
    _result("GD+LR", "tr1", "c1", 0.70),
    _result("GD+LR", "tr1", "c2", 0.72),
    _result("GD+LR", "tr2", "c1", 0.74),
    _result("GD+mixup", "tr1", "c1", 0.66),
]


def test_table2_layout_with_the_benchmark_in_every_column():
    text = table.tables_markdown(TABLE2_RESULTS, "acdc")
    assert _table(text, "| initialisation") == [
        "| initialisation | \\|X_tr\\| = 1 | \\|X_tr\\| = 2 | \\|X_tr\\| = all | paper, 1 | "
        "paper, 2 |",
        "|---|---|---|---|---|---|",
        "| random | 0.600 ± 0.100 | 0.700 ± 0.000 | **0.910 ± 0.000** | 0.614 | 0.702 |",
        "| G^D + L^R | **0.710 ± 0.010** | **0.740 ± 0.000** | – | 0.725 | 0.789 |",
    ]
    assert _table(text, "| method") == [
        "| method | \\|X_tr\\| = 1 | \\|X_tr\\| = 2 | paper, 1 | paper, 2 |",
        "|---|---|---|---|---|",
        "| Random init. | 0.600 ± 0.100 | 0.700 ± 0.000 | 0.614 | 0.702 |",
        "| Rotation | 0.640 ± 0.020 | – | – | – |",
        "| Mixup | 0.650 ± 0.050 | **0.750 ± 0.000** | – | – |",
        "| Proposed init. + mixup | **0.740 ± 0.000** (n=1) | – | – | – |",
        "| Proposed init. (G^D + L^R) | 0.710 ± 0.010 | 0.740 ± 0.000 | 0.725 | 0.789 |",
        "| Benchmark (random init., all labelled) | 0.910 ± 0.000 | 0.910 ± 0.000 | – | – |",
    ]
    lines = text.splitlines()
    other = lines.index("Other initialisations.")
    assert lines[other + 2 :] == [
        "| initialisation | \\|X_tr\\| = 1 | paper, 1 |",
        "|---|---|---|",
        "| G^D + mixup | **0.660 ± 0.000** | – |",
    ]
    assert "its other Table 2 numbers (pretext tasks, other semi-supervised fine-tunings" in text


def test_the_papers_data_aug_numbers_are_shown_where_quoted():
    results = [_result("task-aug", "tr1", "c1", 0.70), _result("task-aug", "tr2", "c1", 0.75)]
    text = table.tables_markdown(results, "acdc")
    assert "| Data Aug. | **0.700 ± 0.000** | **0.750 ± 0.000** | 0.731 | – |" in text


def test_table2_only_with_rows_table1_lacks():
    benchmark_only = [r for r in TABLE2_RESULTS if r.cell.init == "random"]
    assert "| Benchmark (random init., all labelled) |" in table.tables_markdown(
        benchmark_only, "synthetic"
    )
    table1_only = [r for r in benchmark_only if r.cell.labelled_set != "trall"]
    assert "Table 2" not in table.tables_markdown(table1_only, "synthetic")


def test_empty_results():
    assert table.tables_markdown([], "acdc") == "No cell has finished yet.\n"
    assert table.csv_text([], ["a comment"]) == (
        "# a comment\ninit,n_labelled,subset,seed,dice_mean,dice_std,seconds\n"
    )


def test_csv_orders_labelled_sets_by_size_with_trall_last():
    results = [
        _result("random", "trall", "c1", 0.9),
        _result("random", "tr16", "c1", 0.8),
        _result("random", "tr2", "c1", 0.7),
        _result("mixup", "tr1", "c1", 0.6),
    ]
    rows = list(csv.DictReader(io.StringIO(table.csv_text(results))))
    assert [(r["init"], r["n_labelled"]) for r in rows] == [
        ("random", "2"),
        ("random", "16"),
        ("random", "all"),
        ("mixup", "1"),
    ]


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
