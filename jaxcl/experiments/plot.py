"""The sweep's plot: mean test Dice against |X_tr| per initialisation, with error bars.

trall (every labelled volume) is no point on the |X_tr| axis: random initialisation on it, the
paper's benchmark, is a horizontal line; other initialisations' trall entries are not drawn.

Built as a `matplotlib.figure.Figure` without pyplot, like `jaxcl.figures`, and saved with
`jaxcl.figures.save_figure`.
"""

from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence

import matplotlib
import numpy as np
from matplotlib.figure import Figure

from jaxcl import methods
from jaxcl.data.splits import ALL_LABELLED
from jaxcl.experiments import plan, table

# Horizontal spread (in log2 units of |X_tr|) between the lines, so error bars stay apart.
_SPREAD = 0.04
# Footer: characters per line (7 pt monospace on a 7.5 inch figure) and inches per line.
_FOOTER_WIDTH = 125
_FOOTER_LINE = 0.16


def dice_figure(
    entries: Mapping[tuple[str, str], table.Entry],
    *,
    title: str = "",
    footer: Sequence[str] = (),
) -> Figure:
    """Mean Dice ± std over subsets against |X_tr| (log scale), one line per initialisation
    (dotted: a semi-supervised fine-tuning), and the benchmark as a horizontal line.

    Args:
      entries: (init, labelled set) -> entry, from `table.summarize`.
      title: figure title.
      footer: small lines printed under the axes (config, git commit, wall time).
    """
    if not entries:
        raise ValueError("dice_figure needs at least one finished cell.")
    all_inits = list(plan.INITIALISATIONS)
    points = {key: entry for key, entry in entries.items() if key[1] != ALL_LABELLED}
    inits = [name for name in all_inits if any(i == name for i, _ in points)]
    sizes = sorted({int(plan.labelled_set_size(s)) for _, s in points})
    palette = matplotlib.colormaps["tab10"]
    footer = [part for line in footer for part in textwrap.wrap(line, _FOOTER_WIDTH)]
    figure = Figure(figsize=(7.5, 4.8 + _FOOTER_LINE * len(footer)), layout="constrained")
    if footer:
        height = figure.get_figheight()
        footer_fraction = (len(footer) + 0.5) * _FOOTER_LINE / height
        figure.get_layout_engine().set(rect=(0, footer_fraction, 1, 1 - footer_fraction))
        for line_index, line in enumerate(reversed(footer)):
            y = (0.25 + line_index) * _FOOTER_LINE / height
            figure.text(0.01, y, line, fontsize=7, family="monospace")
    ax = figure.subplots()
    for index, init in enumerate(inits):
        curve = sorted(
            (int(plan.labelled_set_size(s)), e) for (i, s), e in points.items() if i == init
        )
        offset = 2.0 ** (_SPREAD * (index - (len(inits) - 1) / 2))
        x = np.array([size for size, _ in curve]) * offset
        semi_supervised = plan.INITIALISATIONS[init].fine_tuning != plan.SUPERVISED
        ax.errorbar(
            x,
            [e.mean for _, e in curve],
            yerr=[e.std for _, e in curve],
            label=methods.label(init, math=True),
            # One colour per initialisation in every sweep's plot.
            color="black" if init == table.RANDOM else palette(all_inits.index(init) % 10),
            linestyle="--" if init == table.RANDOM else (":" if semi_supervised else "-"),
            marker="o",
            markersize=4,
            capsize=3,
        )
    benchmark = entries.get((table.RANDOM, ALL_LABELLED))
    if benchmark is not None:
        ax.axhline(benchmark.mean, color="grey", linestyle="-.", label="benchmark (all labelled)")
    ax.set_xscale("log", base=2)
    if sizes:
        ax.set_xlim(sizes[0] / 1.5, sizes[-1] * 1.5)
        ax.set_xticks(sizes, [str(size) for size in sizes])
    ax.minorticks_off()
    ax.set_xlabel("$|X_{tr}|$ (labelled training volumes)")
    ax.set_ylabel("mean test Dice (± std over subsets)")
    ax.grid(alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize="small")
    if title:
        ax.set_title(title)
    return figure
