"""The sweep's results as tables: one CSV row per cell, and the paper's Markdown layouts.

Everything here computes text from values; `report` reads the cells' results and writes files.

The paper's tables have one row per initialisation and one column per |X_tr| (labelled training
volumes). A table entry is the mean over labelled subsets (c1, c2, ...) of the cell's mean test
Dice, ± the standard deviation over those subsets (population, ddof = 0, as `jaxcl.evaluate` does
over subjects); several seeds of one subset are averaged first, so that every subset counts once.

results.md has up to three tables (`tables_markdown`):

- Table 1: random initialisation and the contrastive pre-trainings (`plan.INITIALISATIONS` but
  the pretext tasks), fine-tuned supervised; |X_tr| = all (trall) in a column of its own.
- Table 2, the paper's comparison with other methods: random init., the pretext tasks, each
  semi-supervised fine-tuning from random init., the proposed init. (G^D + L^R) with each of
  them, the proposed init. alone, and the benchmark: random init. on every labelled volume
  (trall), whose one entry is repeated in every column as the bar the column is compared with.
  Its columns are the few-label sets (not trall). Shown when one of its rows that table 1 lacks
  has finished; rows without a finished cell are left out.
- Other rows: finished initialisations in neither table (e.g. G^D + mixup).
"""

from __future__ import annotations

import csv
import dataclasses
import io
from collections.abc import Mapping, Sequence

import numpy as np

from jaxcl import methods
from jaxcl.data.splits import ALL_LABELLED
from jaxcl.experiments import plan

# The paper's mean test Dice (Chaitanya et al. 2020) for |X_tr| = 1, 2, 8 (None: not quoted), as
# quoted in the issues that asked for these tables: Table 1's rows, whose random and G^D + L^R
# rows are also Table 2's "Random init." and "Proposed init."; of Table 2's other rows only
# "Data Aug." and "Data Aug. + Mixup" at |X_tr| = 1. Unquoted entries show "–".
PAPER_DICE: Mapping[str, Mapping[str, tuple[float | None, float | None, float | None]]] = {
    "acdc": {
        "random": (0.614, 0.702, 0.844),
        "GR": (0.631, 0.729, 0.847),
        "GD-": (0.683, 0.774, 0.864),
        "GD": (0.691, 0.784, 0.870),
        "GR+LR": (0.668, 0.760, 0.850),
        "GR+LD": (0.638, 0.740, 0.855),
        "GD+LR": (0.725, 0.789, 0.872),
        "task-aug": (0.731, None, None),
        "task-aug-mixup": (0.747, None, None),
    },
    "prostate": {
        "random": (0.489, 0.550, 0.636),
        "GD+LR": (0.579, 0.619, 0.684),
        "task-aug": (0.585, None, None),
    },
    "mmwhs": {"random": (0.451, 0.637, 0.787), "GD+LR": (0.569, 0.694, 0.794)},
}
PAPER_LABELLED_SETS = ("tr1", "tr2", "tr8")

RANDOM = "random"
PROPOSED = "GD+LR"  # the paper's proposed initialisation
# Table 2's pretext-task pre-trainings -> its names for them, in its row order.
PRETEXT_TASKS = {
    "Rotation": "Rotation",
    "Inpainting": "Inpainting",
    "ContextRestoration": "Context restoration",
}
# Table 2's names of the semi-supervised fine-tunings, in its row order; a fine-tuning not named
# here follows them under its own name.
SEMI_SUPERVISED_LABELS = {
    "self-training": "Self-training",
    "mixup": "Mixup",
    "task-aug": "Data Aug.",
    "task-aug-mixup": "Data Aug. + Mixup",
    "adversarial": "Adversarial training",
}
DATA_AUG = "task-aug"  # the paper's "Data Aug." (task-driven augmentation, random init.)


@dataclasses.dataclass(frozen=True)
class CellResult:
    """A finished cell's test Dice (from its evaluate/results.json).

    Attributes:
      cell: initialisation, labelled set, subset and seed.
      class_dice: foreground class -> Dice averaged over test subjects, in the dataset's order.
      mean_dice: mean over test subjects of the per-subject mean foreground Dice.
      std_dice: its standard deviation over test subjects.
      seconds: wall time the sweep recorded for the cell, None if it has no record.
    """

    cell: plan.Cell
    class_dice: Mapping[str, float]
    mean_dice: float
    std_dice: float
    seconds: float | None = None


@dataclasses.dataclass(frozen=True)
class Entry:
    """One entry of the paper's table: an initialisation at one |X_tr|."""

    mean: float
    std: float
    num_subsets: int


@dataclasses.dataclass(frozen=True)
class Row:
    """A table row: `init` at every |X_tr| of the table, or, with `labelled_set`, its entry at
    that set repeated in every column (the benchmark)."""

    label: str
    init: str
    labelled_set: str | None = None


# ----------------------------------------------------------------------------------------------
# Which initialisations are rows of which table.


def table1_inits() -> tuple[str, ...]:
    """Table 1's rows: random init. and the contrastive pre-trainings, fine-tuned supervised."""
    return tuple(
        name
        for name, init in plan.INITIALISATIONS.items()
        if init.fine_tuning == plan.SUPERVISED and init.global_name not in PRETEXT_TASKS
    )


def _semi_supervised_order() -> tuple[str, ...]:
    """`plan.SEMI_SUPERVISED` in Table 2's row order (`SEMI_SUPERVISED_LABELS`, then the rest)."""
    known = [name for name in SEMI_SUPERVISED_LABELS if name in plan.SEMI_SUPERVISED]
    return tuple(known + [name for name in plan.SEMI_SUPERVISED if name not in known])


def proposed_combinations() -> tuple[str, ...]:
    """The proposed init. (G^D + L^R) fine-tuned by each semi-supervised method: "GD+LR+mixup"."""
    proposed = plan.INITIALISATIONS[PROPOSED]
    by_fine_tuning = {
        init.fine_tuning: name
        for name, init in plan.INITIALISATIONS.items()
        if (init.global_name, init.local_name) == (proposed.global_name, proposed.local_name)
        and init.fine_tuning != plan.SUPERVISED
    }
    return tuple(
        by_fine_tuning[name] for name in _semi_supervised_order() if name in by_fine_tuning
    )


def table2_rows() -> tuple[Row, ...]:
    """Table 2's rows in its order (module docstring), every one the registries define."""
    return (
        Row("Random init.", RANDOM),
        *(Row(label, name) for name, label in PRETEXT_TASKS.items()),
        *(Row(_semi_supervised_label(name), name) for name in _semi_supervised_order()),
        *(_combination_row(name) for name in proposed_combinations()),
        Row(f"Proposed init. ({methods.label(PROPOSED)})", PROPOSED),
        Row("Benchmark (random init., all labelled)", RANDOM, ALL_LABELLED),
    )


def _semi_supervised_label(name: str) -> str:
    return SEMI_SUPERVISED_LABELS.get(name, name)


def _combination_row(name: str) -> Row:
    label = _semi_supervised_label(plan.INITIALISATIONS[name].fine_tuning).lower()
    return Row(f"Proposed init. + {label}", name)


# ----------------------------------------------------------------------------------------------
# Entries.


def subset_dice(results: Sequence[CellResult]) -> dict[tuple[str, str], dict[str, float]]:
    """(init, labelled_set) -> subset -> mean test Dice of that cell (seeds averaged)."""
    dice: dict[tuple[str, str], dict[str, list[float]]] = {}
    for result in results:
        cell = result.cell
        subsets = dice.setdefault((cell.init, cell.labelled_set), {})
        subsets.setdefault(cell.combination, []).append(result.mean_dice)
    return {
        key: {subset: float(np.mean(values)) for subset, values in subsets.items()}
        for key, subsets in dice.items()
    }


def summarize(results: Sequence[CellResult]) -> dict[tuple[str, str], Entry]:
    """(init, labelled_set) -> mean ± std over subsets of the cells' mean Dice (seeds averaged)."""
    entries = {}
    for key, subsets in subset_dice(results).items():
        subset_means = np.array(list(subsets.values()))
        entries[key] = Entry(float(subset_means.mean()), float(subset_means.std()), len(subsets))
    return entries


# ----------------------------------------------------------------------------------------------
# results.csv


def csv_text(results: Sequence[CellResult], comments: Sequence[str] = ()) -> str:
    """results.csv: `# comment` lines, a header, then one row per cell in the table's order.

    Columns: init, n_labelled ("1", "2", "8", "all"), subset, seed, dice_<class> for every
    foreground class, dice_mean, dice_std (over test subjects), seconds (empty if not recorded).
    Rows are ordered by initialisation (`plan.INITIALISATIONS`), labelled set (increasing size,
    trall last), subset and seed.
    """
    classes = list(results[0].class_dice) if results else []
    inits = list(plan.INITIALISATIONS)
    sets = plan.sorted_labelled_sets(r.cell.labelled_set for r in results)
    output = io.StringIO()
    for comment in comments:
        output.write(f"# {comment}\n")
    writer = csv.writer(output, lineterminator="\n")
    writer.writerow(
        ["init", "n_labelled", "subset", "seed"]
        + [f"dice_{name}" for name in classes]
        + ["dice_mean", "dice_std", "seconds"]
    )
    ordered = sorted(
        results,
        key=lambda r: (
            inits.index(r.cell.init),
            sets.index(r.cell.labelled_set),
            r.cell.combination,
            r.cell.seed,
        ),
    )
    for result in ordered:
        cell = result.cell
        if list(result.class_dice) != classes:
            raise ValueError(
                f"{plan.describe(cell)} has classes {list(result.class_dice)}, others "
                f"{classes}: results of two datasets mixed."
            )
        writer.writerow(
            [cell.init, cell.n_labelled, cell.combination, cell.seed]
            + [f"{result.class_dice[name]:.6f}" for name in classes]
            + [f"{result.mean_dice:.6f}", f"{result.std_dice:.6f}"]
            + ["" if result.seconds is None else f"{result.seconds:.1f}"]
        )
    return output.getvalue()


# ----------------------------------------------------------------------------------------------
# Markdown tables


def _entry_text(entry: Entry | None, *, best: bool, max_subsets: int) -> str:
    if entry is None:
        return "–"
    text = f"{entry.mean:.3f} ± {entry.std:.3f}"
    if best:
        text = f"**{text}**"
    if entry.num_subsets < max_subsets:
        text += f" (n={entry.num_subsets})"
    return text


def dice_table(
    results: Sequence[CellResult],
    dataset: str,
    rows: Sequence[Row],
    *,
    first_column: str = "initialisation",
    with_all: bool = True,
) -> str:
    """One table in the paper's layout, Markdown: the `rows` with a finished cell, one column per
    |X_tr| at which one of them finished ("" if none did).

    Entries are "mean ± std" over subsets; the best mean of each column (at the 3 decimals shown;
    benchmark rows aside) is bold; "(n=k)" marks an entry with fewer subsets than the most
    complete one of its column. For acdc, prostate and mmwhs the paper's numbers (`PAPER_DICE`)
    follow in columns of their own for |X_tr| = 1, 2, 8, "–" where not quoted.

    Args:
      rows: the table's rows in order; a row with `labelled_set` repeats that entry everywhere.
      first_column: the header of the row labels.
      with_all: whether trall (|X_tr| = all) may be a column.
    """
    entries = summarize(results)

    def entry(row: Row, labelled_set: str) -> Entry | None:
        return entries.get((row.init, row.labelled_set or labelled_set))

    varying = [row for row in rows if row.labelled_set is None]
    sets = [
        s
        for s in plan.sorted_labelled_sets(r.cell.labelled_set for r in results)
        if (with_all or s != ALL_LABELLED) and any(entry(row, s) for row in varying)
    ]
    shown = [row for row in rows if any(entry(row, s) for s in sets)]
    if not shown:
        return ""
    paper = PAPER_DICE.get(dataset, {})
    paper_sets = [s for s in sets if s in PAPER_LABELLED_SETS] if paper else []
    header = [first_column] + [f"\\|X_tr\\| = {plan.labelled_set_size(s)}" for s in sets]
    header += [f"paper, {plan.labelled_set_size(s)}" for s in paper_sets]
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    competing = {s: [entry(row, s) for row in shown if row in varying] for s in sets}
    best = {s: max(round(e.mean, 3) for e in competing[s] if e) for s in sets}
    max_subsets = {s: max(e.num_subsets for e in competing[s] if e) for s in sets}
    for row in shown:
        cells = [row.label]
        for s in sets:
            value = entry(row, s)
            if row.labelled_set is None:
                is_best = value is not None and round(value.mean, 3) == best[s]
                cells.append(_entry_text(value, best=is_best, max_subsets=max_subsets[s]))
            else:
                cells.append(_entry_text(value, best=False, max_subsets=0))
        quoted = paper.get(row.init, ()) if row.labelled_set is None else ()
        values = [quoted[PAPER_LABELLED_SETS.index(s)] if quoted else None for s in paper_sets]
        cells += ["–" if value is None else f"{value:.3f}" for value in values]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def tables_markdown(results: Sequence[CellResult], dataset: str) -> str:
    """results.md's tables (module docstring): table 1, table 2 and the other rows, each where
    one of its rows finished, under one caption."""
    if not results:
        return "No cell has finished yet.\n"
    table1 = table1_inits()
    table2 = table2_rows()
    in_table2 = {row.init for row in table2 if row.labelled_set is None}
    others = [name for name in plan.INITIALISATIONS if name not in {*table1, *in_table2}]
    table2_adds = any(
        r.cell.init in in_table2 - set(table1)
        or (r.cell.init, r.cell.labelled_set) == (RANDOM, ALL_LABELLED)
        for r in results
    )
    caption = (
        "Mean test Dice (per test subject: mean over foreground classes) ± standard deviation "
        "over labelled subsets (ddof = 0; seeds of a subset averaged first). Best per column in "
        "bold; (n=k): k subsets finished."
    )
    if dataset in PAPER_DICE:
        caption += (
            f" Paper columns: Chaitanya et al. 2020, {dataset}, Table 1, whose random and "
            "G^D + L^R rows are Table 2's random and proposed init. too, and Table 2's Data Aug. "
            "rows at |X_tr| = 1; its other Table 2 numbers (pretext tasks, other "
            "semi-supervised fine-tunings, combinations, benchmark) are not quoted here (no "
            "source at hand): –."
        )
    sections = [
        (
            "Table 1: initialisations, supervised fine-tuning.",
            dice_table(results, dataset, [Row(methods.label(name), name) for name in table1]),
        ),
        (
            "Table 2: other pre-trainings and semi-supervised fine-tunings with few labels; the "
            "benchmark (random init. on every labelled volume) repeats its one entry in each "
            "column.",
            dice_table(results, dataset, table2, first_column="method", with_all=False)
            if table2_adds
            else "",
        ),
        (
            "Other initialisations.",
            dice_table(results, dataset, [Row(methods.label(name), name) for name in others]),
        ),
    ]
    parts = [caption, ""]
    for title, markdown in sections:
        if markdown:
            parts += [title, "", markdown]
    return "\n".join(parts)
