"""PNG figures: segmentation overlays of test volumes, augmented samples and training curves.

Figures are built as `matplotlib.figure.Figure` objects (no pyplot, so no global figure state and
no interactive backend; `Figure.savefig` renders PNGs with Agg) and written by `save_figure`,
locally or to `gs://`.

Overlays show native-grid slices with the array's first axis as rows, like the synthetic
montage; pixels are drawn with their physical aspect ratio. Class c > 0 is drawn in colour
c - 1 of matplotlib's "tab10" palette in every figure.

Metrics files are JSON lines, one object per line with at least "step"; records carrying "loss"
form the loss curve and records carrying "val_dice" the validation curve (either may be written on
its own line or together with the other).
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping, Sequence

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from jaxcl import files

_OVERLAY_ALPHA = 0.5
# Loss curves longer than this many points also get a running mean, drawn over the raw values.
_SMOOTH_ABOVE = 50


def class_colours(num_classes: int) -> np.ndarray:
    """(num_classes, 4) RGBA overlay colours; class 0 (background) is fully transparent."""
    palette = matplotlib.colormaps["tab10"]
    colours = np.zeros((num_classes, 4))
    for c in range(1, num_classes):
        colours[c] = (*palette((c - 1) % 10)[:3], _OVERLAY_ALPHA)
    return colours


def representative_slices(label: np.ndarray, num_slices: int = 3) -> list[int]:
    """Slice indices (last axis) spread evenly from the first to the last labelled slice.

    For short-axis cardiac stacks stored base (z = 0) to apex this is base -> mid -> apex.

    Args:
      label: (X, Y, Z) integer class indices.
      num_slices: how many indices to return (fewer if the labelled range is shorter).

    Returns:
      Sorted distinct slice indices; the whole stack's range if nothing is labelled.
    """
    labelled = np.flatnonzero(np.any(label > 0, axis=(0, 1)))
    first, last = (labelled[0], labelled[-1]) if labelled.size else (0, label.shape[2] - 1)
    return sorted({int(round(z)) for z in np.linspace(first, last, num_slices)})


def _crop_box(masks: np.ndarray, margin: float = 0.3, min_size: int = 32) -> tuple[slice, slice]:
    """In-plane box around the foreground of (X, Y, K) masks, enlarged by `margin` per side."""
    shape = masks.shape[:2]
    if not masks.any():
        return slice(0, shape[0]), slice(0, shape[1])
    box = []
    for axis in (0, 1):
        present = np.flatnonzero(np.any(masks, axis=tuple(a for a in (0, 1, 2) if a != axis)))
        low, high = present[0], present[-1] + 1
        half = max((high - low) * (0.5 + margin), min_size / 2)
        centre = (low + high) / 2
        box.append(slice(max(0, int(centre - half)), min(shape[axis], int(np.ceil(centre + half)))))
    return box[0], box[1]


def overlay_figure(
    image: np.ndarray,
    label: np.ndarray,
    prediction: np.ndarray,
    *,
    class_names: Sequence[str],
    slice_indices: Sequence[int],
    spacing: tuple[float, float] = (1.0, 1.0),
    title: str = "",
) -> Figure:
    """One row per slice: image, ground truth overlaid, prediction overlaid.

    All rows share one crop around the labelled and predicted foreground.

    Args:
      image: (X, Y, Z) intensities (any scale; displayed between its 1st and 99.5th percentile).
      label: (X, Y, Z) ground-truth class indices.
      prediction: (X, Y, Z) predicted class indices.
      class_names: (C,) names, index 0 background; foreground classes get a legend entry.
      slice_indices: slices to show, top to bottom.
      spacing: in-plane voxel size (mm) along X and Y, for the displayed aspect ratio.
      title: figure title.
    """
    if not image.shape == label.shape == prediction.shape:
        raise ValueError(
            f"overlay_figure needs image, label and prediction of one (X, Y, Z) shape; got "
            f"{image.shape}, {label.shape} and {prediction.shape}."
        )
    slice_indices = list(slice_indices)
    colours = class_colours(len(class_names))
    low, high = np.percentile(image, [1.0, 99.5])
    rows, cols = _crop_box((label > 0)[..., slice_indices] | (prediction > 0)[..., slice_indices])
    aspect = spacing[0] / spacing[1]  # Height over width of one displayed pixel.

    height = rows.stop - rows.start
    width = (cols.stop - cols.start) / aspect
    panel = 2.6
    figure = Figure(
        figsize=(3 * panel, len(slice_indices) * panel * min(height / width, 1.5) + 0.9),
        layout="constrained",
    )
    axes = figure.subplots(len(slice_indices), 3, squeeze=False)
    for row, z in zip(axes, slice_indices, strict=True):
        shown = image[rows, cols, z]
        for ax, overlay in zip(row, (None, label, prediction), strict=True):
            ax.imshow(shown, cmap="gray", vmin=low, vmax=high, aspect=aspect)
            if overlay is not None:
                ax.imshow(colours[overlay[rows, cols, z]], aspect=aspect)
            ax.set_xticks([])
            ax.set_yticks([])
        row[0].set_ylabel(f"slice {z} of {image.shape[2]}")
    for ax, heading in zip(axes[0], ("image", "ground truth", "prediction"), strict=True):
        ax.set_title(heading)
    handles = [
        Patch(facecolor=colours[c, :3], label=name) for c, name in enumerate(class_names) if c > 0
    ]
    figure.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 8))
    if title:
        figure.suptitle(title)
    return figure


def augmentation_figure(
    images: np.ndarray,
    labels: np.ndarray,
    *,
    view_names: Sequence[str],
    num_classes: int,
    title: str = "",
) -> Figure:
    """Augmented versions of a few slices: per slice a row of images and a row with labels.

    Every panel of a slice shares its grey-value range (the 1st to 99.5th percentile of its
    first view), so intensity changes stay visible.

    Args:
      images: (K, V, H, W) intensities of K slices in V versions.
      labels: (K, V, H, W) class indices of the same.
      view_names: (V,) column headings ("original", "deformed", ...).
      num_classes: classes including background (overlay colours, `class_colours`).
      title: figure title.
    """
    if images.shape != labels.shape or images.ndim != 4 or images.shape[1] != len(view_names):
        raise ValueError(
            f"augmentation_figure needs images and labels of one (K, V, H, W) shape with V = "
            f"{len(view_names)} views; got {images.shape} and {labels.shape}."
        )
    num_slices, num_views = images.shape[:2]
    colours = class_colours(num_classes)
    panel = 2.2
    figure = Figure(figsize=(num_views * panel, 2 * num_slices * panel + 0.6), layout="constrained")
    axes = figure.subplots(2 * num_slices, num_views, squeeze=False)
    for index in range(num_slices):
        low, high = np.percentile(images[index, 0], [1.0, 99.5])
        for view in range(num_views):
            for row, overlay in ((2 * index, False), (2 * index + 1, True)):
                ax = axes[row, view]
                ax.imshow(images[index, view], cmap="gray", vmin=low, vmax=high)
                if overlay:
                    ax.imshow(colours[labels[index, view]])
                ax.set_xticks([])
                ax.set_yticks([])
        axes[2 * index, 0].set_ylabel(f"slice {index + 1}")
        axes[2 * index + 1, 0].set_ylabel("with label")
    for ax, heading in zip(axes[0], view_names, strict=True):
        ax.set_title(heading)
    if title:
        figure.suptitle(title)
    return figure


def _moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over `window` values; entry i averages values[i - window + 1 : i + 1]."""
    cumulative = np.cumsum(np.insert(values, 0, 0.0))
    return (cumulative[window:] - cumulative[:-window]) / window


def read_metrics(path: files.PathLike) -> list[dict]:
    """Records of a JSON-lines metrics file (blank lines skipped).

    Raises:
      FileNotFoundError if `path` is missing; ValueError naming the file and line for a line that
      is not a JSON object with a "step".
    """
    if not files.path(path).is_file():
        raise FileNotFoundError(
            f"metrics file {path} does not exist; point plot_loss_curves at the stage's "
            "metrics JSON-lines file written by the trainer."
        )
    records = []
    with files.path(path).open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{number} is not valid JSON ({e}).") from e
            if not isinstance(record, dict) or "step" not in record:
                raise ValueError(f'{path}:{number} must be a JSON object with a "step" key.')
            records.append(record)
    return records


def loss_curve_figure(records_by_stage: Mapping[str, Sequence[Mapping]]) -> Figure:
    """One panel per stage: training loss against step, validation Dice on a right axis.

    Args:
      records_by_stage: stage name -> metric records ("step" plus "loss" and/or "val_dice").
    """
    if not records_by_stage:
        raise ValueError("loss_curve_figure needs at least one stage's metrics.")
    figure = Figure(figsize=(4.8 * len(records_by_stage), 3.6), layout="constrained")
    axes = figure.subplots(1, len(records_by_stage), squeeze=False)[0]
    loss_colour, dice_colour = "tab:blue", "tab:orange"
    for ax, (stage, records) in zip(axes, records_by_stage.items(), strict=True):
        steps, losses = _series(records, "loss")
        handles = [Line2D([], [], color=loss_colour, label="training loss")]
        if len(losses) > _SMOOTH_ABOVE:
            window = len(losses) // _SMOOTH_ABOVE
            ax.plot(steps, losses, color=loss_colour, alpha=0.3, linewidth=0.8)
            ax.plot(steps[window - 1 :], _moving_average(losses, window), color=loss_colour)
            handles[0].set_label(f"training loss (mean of {window})")
        else:
            ax.plot(steps, losses, color=loss_colour, marker="." if len(losses) < 20 else None)
        ax.set_xlabel("step")
        ax.set_ylabel("loss", color=loss_colour)
        ax.set_title(stage)
        ax.grid(alpha=0.3)
        dice_steps, dice = _series(records, "val_dice")
        if len(dice):
            dice_ax = ax.twinx()
            dice_ax.plot(dice_steps, dice, color=dice_colour, marker="o", markersize=3)
            dice_ax.set_ylabel("validation Dice", color=dice_colour)
            dice_ax.set_ylim(0.0, 1.0)
            handles.append(Line2D([], [], color=dice_colour, marker="o", label="validation Dice"))
        ax.legend(handles=handles, loc="center right", fontsize="small")
    return figure


def _series(records: Sequence[Mapping], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of the records that carry `key`, in step order."""
    pairs = sorted((float(r["step"]), float(r[key])) for r in records if r.get(key) is not None)
    if not pairs:
        return np.zeros(0), np.zeros(0)
    steps, values = np.asarray(pairs).T
    return steps, values


def save_figure(figure: Figure, path: files.PathLike, dpi: int = 100) -> None:
    """Writes `figure` as a PNG at `path` (local or `gs://`), creating the parent folder."""
    png = io.BytesIO()
    figure.savefig(png, format="png", dpi=dpi)
    files.write_atomically(path, png.getvalue())


def plot_loss_curves(
    metrics_jsonl_paths_by_stage: Mapping[str, files.PathLike], out_png: files.PathLike
) -> None:
    """Reads each stage's JSON-lines metrics file and writes the loss-curve PNG.

    Args:
      metrics_jsonl_paths_by_stage: stage name -> metrics file, in display order.
      out_png: output path.

    Raises:
      ValueError if a stage's file has no "loss" record.
    """
    records_by_stage = {}
    for stage, path in metrics_jsonl_paths_by_stage.items():
        records = read_metrics(path)
        if not _series(records, "loss")[0].size:
            raise ValueError(
                f'{path} (stage {stage!r}) has no record with a "loss"; is it a training '
                "metrics file?"
            )
        records_by_stage[stage] = records
    save_figure(loss_curve_figure(records_by_stage), out_png)
