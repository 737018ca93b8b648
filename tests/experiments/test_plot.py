"""The sweep plot: one line per initialisation through (|X_tr|, mean), error bars ± std."""

import numpy as np
import pytest

from jaxcl.experiments import plot, table

ENTRIES = {
    ("random", "tr1"): table.Entry(0.50, 0.10, 5),
    ("random", "tr8"): table.Entry(0.80, 0.02, 3),
    ("GD+LR", "tr1"): table.Entry(0.60, 0.05, 5),
    ("GD+LR", "tr2"): table.Entry(0.70, 0.04, 5),
    ("GD+LR", "tr8"): table.Entry(0.85, 0.01, 3),
}


def test_lines_means_and_error_bars():
    figure = plot.dice_figure(ENTRIES, title="t", footer=["config: x", "git commit: y"])
    [ax] = figure.axes
    containers = ax.containers
    assert [c.get_label() for c in containers] == ["random", "$G^{D}$ + $L^{R}$"]
    expected = [  # (|X_tr|, means, stds) of random, then of GD+LR
        ([1, 8], [0.5, 0.8], [0.1, 0.02]),
        ([1, 2, 8], [0.6, 0.7, 0.85], [0.05, 0.04, 0.01]),
    ]
    for container, (sizes, means, stds) in zip(containers, expected, strict=True):
        line, _, (bars,) = container
        x, y = line.get_data()
        # Lines are spread sideways by a constant factor, so x / |X_tr| is the same everywhere.
        ratios = np.asarray(x) / np.asarray(sizes)
        assert ratios == pytest.approx(np.full(len(sizes), ratios[0]))
        assert 0.8 < ratios[0] < 1.25
        assert y == pytest.approx(means)
        segments = bars.get_segments()
        assert [s[1][1] - s[0][1] for s in segments] == pytest.approx(2 * np.asarray(stds))
        assert [(s[0][1] + s[1][1]) / 2 for s in segments] == pytest.approx(means)
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1", "2", "8"]
    top_to_bottom = sorted(figure.texts, key=lambda text: -text.get_position()[1])
    assert [t.get_text() for t in top_to_bottom] == ["config: x", "git commit: y"]
    assert ax.get_title() == "t"


def test_long_footer_lines_are_wrapped_not_cut():
    command = "python -m jaxcl.experiments " + " ".join(
        f"--config.key{i}=value{i}" for i in range(12)
    )
    figure = plot.dice_figure(ENTRIES, footer=[command])
    top_to_bottom = sorted(figure.texts, key=lambda text: -text.get_position()[1])
    assert len(top_to_bottom) > 1
    assert " ".join(t.get_text() for t in top_to_bottom) == command


def test_no_entries():
    with pytest.raises(ValueError, match="at least one finished cell"):
        plot.dice_figure({})


def test_benchmark_is_a_horizontal_line_not_a_point():
    entries = {
        **ENTRIES,
        ("random", "trall"): table.Entry(0.90, 0.0, 1),
        ("GD+LR", "trall"): table.Entry(0.95, 0.0, 1),  # no point: trall is no |X_tr| on the axis
        ("GD+LR+mixup", "tr1"): table.Entry(0.65, 0.05, 5),
    }
    [ax] = plot.dice_figure(entries).axes
    labels = [c.get_label() for c in ax.containers]
    assert labels == ["random", "$G^{D}$ + $L^{R}$", "$G^{D}$ + $L^{R}$ + mixup"]
    random_line, proposed_line, mixup_line = (c[0] for c in ax.containers)
    assert random_line.get_ydata() == pytest.approx([0.5, 0.8])
    assert proposed_line.get_ydata() == pytest.approx([0.6, 0.7, 0.85])
    assert mixup_line.get_linestyle() == ":"  # a semi-supervised fine-tuning
    [benchmark] = [line for line in ax.lines if line.get_label() == "benchmark (all labelled)"]
    assert benchmark.get_ydata() == pytest.approx([0.9, 0.9])
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1", "2", "8"]


def test_only_the_benchmark():
    [ax] = plot.dice_figure({("random", "trall"): table.Entry(0.9, 0.0, 1)}).axes
    assert [line.get_label() for line in ax.lines] == ["benchmark (all labelled)"]
