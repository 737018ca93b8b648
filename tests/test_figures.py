"""Figures: slice choice, overlay PNGs, metrics reading and loss-curve PNGs."""

import json

import matplotlib.image
import numpy as np
import pytest

from jaxcl import figures


def _rings(shape_xyz):
    x, y = np.meshgrid(np.arange(shape_xyz[0]), np.arange(shape_xyz[1]), indexing="ij")
    r = np.hypot(x - shape_xyz[0] / 2, y - shape_xyz[1] / 2)
    label = np.zeros(shape_xyz, np.uint8)
    for z in range(1, shape_xyz[2] - 1):  # First and last slice unlabelled.
        label[..., z][r < 12 - z] = 2
        label[..., z][r < 6 - z / 2] = 3
        label[..., z][(r > 12 - z) & (r < 15 - z)] = 1
    return label


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_representative_slices():
    label = np.zeros((4, 4, 10), np.uint8)
    label[1, 1, 2:9] = 1  # Labelled slices 2..8.
    assert figures.representative_slices(label, 3) == [2, 5, 8]
    assert figures.representative_slices(label, 2) == [2, 8]
    label[:] = 0
    label[0, 0, 4] = 2
    assert figures.representative_slices(label, 3) == [4]
    assert figures.representative_slices(np.zeros((2, 2, 5), np.uint8), 3) == [0, 2, 4]


def test_class_colours():
    colours = figures.class_colours(4)
    assert colours.shape == (4, 4)
    np.testing.assert_array_equal(colours[0], 0.0)  # Background transparent.
    assert np.all(colours[1:, 3] > 0) and len({tuple(c) for c in colours[1:, :3]}) == 3


def test_overlay_figure_png(tmp_path):
    rng = np.random.default_rng(0)
    label = _rings((48, 40, 6))
    prediction = np.roll(label, 2, axis=0)
    image = 50.0 * label + rng.normal(0.0, 10.0, label.shape)
    figure = figures.overlay_figure(
        image,
        label,
        prediction,
        class_names=("background", "RV", "Myo", "LV"),
        slice_indices=figures.representative_slices(label),
        spacing=(1.2, 1.5),
        title="subject 001",
    )
    path = tmp_path / "figures" / "overlay.png"
    figures.save_figure(figure, str(path))
    assert path.stat().st_size > 10_000
    pixels = matplotlib.image.imread(str(path))
    assert pixels.ndim == 3 and pixels.shape[0] > 300 and pixels.shape[1] > 500
    # Class colours appear: some pixels are far from grey.
    saturation = pixels[..., :3].max(-1) - pixels[..., :3].min(-1)
    assert np.mean(saturation > 0.2) > 0.01
    with pytest.raises(ValueError, match="one .X, Y, Z. shape"):
        figures.overlay_figure(
            image, label[:-1], prediction, class_names=("bg", "a"), slice_indices=[1]
        )


def test_augmentation_figure_png(tmp_path):
    """Two slices in four versions: a grid of 4 rows (images, labels per slice) x 4 columns."""
    rng = np.random.default_rng(0)
    label = _rings((48, 48, 4))[..., 1:3].transpose(2, 0, 1)  # (2, 48, 48)
    labels = np.stack([label, np.roll(label, 3, axis=1), label, np.roll(label, 3, axis=1)], 1)
    images = 0.3 * labels + rng.normal(0.0, 0.05, labels.shape)
    images[:, 2:] += 0.5  # the intensity-changed versions, brighter
    figure = figures.augmentation_figure(
        images, labels, view_names=("original", "deformed", "intensity", "both"), num_classes=4
    )
    path = tmp_path / "augmentation.png"
    figures.save_figure(figure, str(path))
    pixels = matplotlib.image.imread(str(path))
    assert pixels.shape[0] > pixels.shape[1] > 300
    saturation = pixels[..., :3].max(-1) - pixels[..., :3].min(-1)
    assert np.mean(saturation > 0.2) > 0.01  # the label rows are coloured
    with pytest.raises(ValueError, match=r"one \(K, V, H, W\) shape with V = 3 views"):
        figures.augmentation_figure(images, labels, view_names=("a", "b", "c"), num_classes=4)


def test_read_metrics(tmp_path):
    path = _write_jsonl(tmp_path / "m.jsonl", [{"step": 1, "loss": 2.0}, {"step": 2}])
    assert figures.read_metrics(path) == [{"step": 1, "loss": 2.0}, {"step": 2}]
    (tmp_path / "bad.jsonl").write_text('{"step": 1, "loss": 2}\n\n{"loss": 1}\n')
    with pytest.raises(ValueError, match=r'bad.jsonl:3 must be a JSON object with a "step"'):
        figures.read_metrics(str(tmp_path / "bad.jsonl"))
    (tmp_path / "broken.jsonl").write_text('{"step": 1,\n')
    with pytest.raises(ValueError, match=r"broken.jsonl:1 is not valid JSON"):
        figures.read_metrics(str(tmp_path / "broken.jsonl"))
    with pytest.raises(FileNotFoundError, match="missing.jsonl does not exist"):
        figures.read_metrics(str(tmp_path / "missing.jsonl"))


def test_plot_loss_curves_png(tmp_path):
    steps = np.arange(0, 400, 2)
    pretrain = [{"step": int(s), "loss": float(5 * np.exp(-s / 100) + 1)} for s in steps]
    finetune = [{"step": int(s), "loss": float(np.exp(-s / 50))} for s in range(0, 100, 5)]
    finetune += [{"step": s, "val_dice": s / 120} for s in range(0, 100, 25)]
    paths = {
        "pretrain_global": _write_jsonl(tmp_path / "global.jsonl", pretrain),
        "finetune": _write_jsonl(tmp_path / "finetune.jsonl", finetune),
    }
    out = tmp_path / "curves.png"
    figures.plot_loss_curves(paths, str(out))
    pixels = matplotlib.image.imread(str(out))
    assert out.stat().st_size > 10_000
    # Two 4.8 x 3.6 inch panels at 100 dpi.
    assert pixels.shape[:2] == (360, 960)

    no_loss = {"finetune": _write_jsonl(tmp_path / "val.jsonl", [{"step": 0, "val_dice": 0.5}])}
    with pytest.raises(ValueError, match="stage 'finetune'.* has no record with a \"loss\""):
        figures.plot_loss_curves(no_loss, str(tmp_path / "x.png"))
    with pytest.raises(ValueError, match="at least one stage"):
        figures.loss_curve_figure({})


def test_moving_average_matches_loop():
    values = np.array([1.0, 3.0, 2.0, 6.0, 4.0])
    # Window 2: (1+3)/2, (3+2)/2, (2+6)/2, (6+4)/2.
    np.testing.assert_allclose(figures._moving_average(values, 2), [2.0, 2.5, 4.0, 5.0])
    np.testing.assert_allclose(figures._moving_average(values, 1), values)
