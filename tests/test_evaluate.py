"""Evaluation: Dice against hand-computed cases and a numpy loop, the native-grid path on a tiny
NIfTI dataset, written predictions / results / figures, chunked inference of a real UNet."""

import functools
import json
import os

import jax
import matplotlib.image
import nibabel as nib
import numpy as np
import pytest

from jaxcl import evaluate
from jaxcl.data import preprocess, sources
from jaxcl.data.sources import DataError
from jaxcl.models.unet import UNet
from jaxcl.train.parallel import DataParallel

# Raw on-disk label values of the tiny dataset, MM-WHS style (420 > 255 forces uint16 output).
RAW_VALUES = {"0": "background", "205": "Myo", "420": "LA", "500": "LV"}


def _reference_dice(prediction, label, c):
    """Plain loop over voxels, straight from the definition 2|P∩Y| / (|P| + |Y|)."""
    both = predicted = reference = 0
    for p, y in zip(prediction.ravel().tolist(), label.ravel().tolist(), strict=True):
        predicted += p == c
        reference += y == c
        both += p == c and y == c
    return 1.0 if predicted + reference == 0 else 2.0 * both / (predicted + reference)


def _blob_classes(shape_xyz, seed):
    """Nested ellipses: class 1 ring, 2 inner ring, 3 core; shifted per slice, last slice empty."""
    rng = np.random.default_rng(seed)
    x, y = np.meshgrid(np.arange(shape_xyz[0]), np.arange(shape_xyz[1]), indexing="ij")
    classes = np.zeros(shape_xyz, np.uint8)
    for z in range(shape_xyz[2] - 1):
        cx = shape_xyz[0] * 0.5 + rng.uniform(-2, 2)
        cy = shape_xyz[1] * 0.5 + rng.uniform(-2, 2)
        r = ((x - cx) / (shape_xyz[0] * 0.32)) ** 2 + ((y - cy) / (shape_xyz[1] * 0.28)) ** 2
        classes[..., z][r < 1.0] = 1
        classes[..., z][r < 0.55] = 2
        classes[..., z][r < 0.2] = 3
    return classes


def _write_dataset(root, shape_xyz, spacing, num_subjects=2):
    """A 'folder'-layout dataset with raw label values 205/420/500 and a non-trivial affine."""
    raw_values = np.array([0, 205, 420, 500], np.int16)
    os.makedirs(root / "imagesTr")
    os.makedirs(root / "labelsTr")
    (root / "dataset.json").write_text(json.dumps({"labels": RAW_VALUES}))
    rng = np.random.default_rng(0)
    for index in range(num_subjects):
        classes = _blob_classes(shape_xyz, seed=index)
        image = 100.0 + 200.0 * classes + rng.normal(0.0, 20.0, shape_xyz)
        # An in-plane rotation by 90 degrees, so the affine is not diagonal.
        affine = np.eye(4)
        affine[:3, :3] = np.array([[0, -1, 0], [1, 0, 0], [0, 0, 1.0]]) @ np.diag(spacing)
        affine[:3, 3] = (12.5, -40.0, 7.0)
        for folder, data in (
            ("imagesTr", image.astype(np.float32)),
            ("labelsTr", raw_values[classes]),
        ):
            nifti = nib.Nifti1Image(data, affine)
            nifti.header.set_zooms(spacing)
            nifti.header.set_qform(affine, code=1)
            nifti.header["descrip"] = b"tiny test volume"
            nib.save(nifti, str(root / folder / f"case{index}.nii.gz"))
    layout = sources.get_layout("folder", str(root))
    return layout, layout.find_subjects(str(root))


def _load(subjects, layout, target_resolution, image_size):
    return [
        preprocess.load_volume(
            s,
            layout,
            target_resolution=target_resolution,
            image_size=image_size,
            slice_axis="auto",
        )
        for s in subjects
    ]


class _OracleApply:
    """Fake network: logits 10 * one_hot(preprocessed label) of the slice it is shown.

    Slices are recognised by their bytes (noisy images make them unique); zero padding slices get
    zero logits. Records the batch shapes it was called with.
    """

    def __init__(self, volumes, num_classes):
        self.num_classes = num_classes
        self.labels = {
            v.image[z].astype(np.float32).tobytes(): v.label[z]
            for v in volumes
            for z in range(v.image.shape[0])
        }
        self.shapes = []

    def __call__(self, images):
        self.shapes.append(images.shape)
        logits = np.zeros((*images.shape[:3], self.num_classes), np.float32)
        for i, image in enumerate(images[..., 0]):
            label = self.labels.get(image.tobytes())
            if label is not None:
                logits[i] = 10.0 * np.eye(self.num_classes, dtype=np.float32)[label]
            else:
                assert not image.any(), "only padding slices may be unknown"
        return logits


# Dice ---------------------------------------------------------------------------------------


def test_dice_hand_computed():
    prediction = np.array([[[0, 1, 1], [2, 2, 0]], [[1, 1, 0], [0, 2, 2]]])
    label = np.array([[[0, 1, 0], [2, 2, 2]], [[1, 0, 0], [0, 0, 2]]])
    # Class 1: |P| = 4, |Y| = 2, overlap 2 (positions [0,0,1], [1,0,0]) -> 2*2/6 = 2/3.
    # Class 2: |P| = 4, |Y| = 4, overlap 3 ([0,1,0], [0,1,1], [1,1,2]) -> 2*3/8 = 0.75.
    assert evaluate.dice_score(prediction, label, 1) == pytest.approx(2 / 3)
    assert evaluate.dice_score(prediction, label, 2) == pytest.approx(0.75)
    np.testing.assert_allclose(evaluate.dice_per_class(prediction, label, 3), [2 / 3, 0.75])
    # Class 3 is absent from both: 1. Class 4 only in the label: 0.
    np.testing.assert_allclose(evaluate.dice_per_class(prediction, label, 4), [2 / 3, 0.75, 1.0])
    label_with_4 = label.copy()
    label_with_4[0, 0, 0] = 4
    assert evaluate.dice_score(prediction, label_with_4, 4) == 0.0
    assert evaluate.dice_per_class(prediction, label_with_4, 5)[3] == 0.0


def test_dice_empty_cases():
    empty = np.zeros((4, 5, 3), np.uint8)
    full = empty.copy()
    full[1:3, 2:4, 1] = 1
    assert evaluate.dice_score(empty, empty, 1) == 1.0
    assert evaluate.dice_score(empty, full, 1) == 0.0
    assert evaluate.dice_score(full, empty, 1) == 0.0
    np.testing.assert_array_equal(evaluate.dice_per_class(empty, empty, 3), [1.0, 1.0])
    np.testing.assert_array_equal(evaluate.dice_per_class(full, empty, 3), [0.0, 1.0])


def test_dice_matches_numpy_loop_on_random_volumes():
    rng = np.random.default_rng(3)
    for num_classes in (2, 4, 8):
        label = rng.integers(0, num_classes, (9, 7, 5))
        # Mostly right, some voxels wrong, so scores are spread out.
        prediction = np.where(rng.random(label.shape) < 0.7, label, rng.integers(0, num_classes))
        expected = [_reference_dice(prediction, label, c) for c in range(1, num_classes)]
        np.testing.assert_allclose(
            evaluate.dice_per_class(prediction, label, num_classes), expected, rtol=1e-12
        )
        for c in range(1, num_classes):
            assert evaluate.dice_score(prediction, label, c) == pytest.approx(expected[c - 1])


def test_dice_rejects_mismatched_shapes_and_classes():
    with pytest.raises(ValueError, match="same .native. grid"):
        evaluate.dice_per_class(np.zeros((2, 2, 2)), np.zeros((2, 2, 3)), 2)
    with pytest.raises(ValueError, match="num_classes=2"):
        evaluate.dice_per_class(np.full((2, 2, 2), 2), np.zeros((2, 2, 2), int), 2)


# Aggregation and Markdown ------------------------------------------------------------------


def test_summarize_and_markdown_hand_computed():
    dice = {"007": np.array([0.9, 0.6]), "010": np.array([0.7, 0.8])}
    results = evaluate.summarize(dice, ("background", "A", "B"), {"config": "acdc", "step": 3})
    # Subject means 0.75 and 0.75; class A mean 0.8 std 0.1, class B mean 0.7 std 0.1.
    assert results["subjects"]["007"] == {"dice": {"A": 0.9, "B": 0.6}, "mean": pytest.approx(0.75)}
    assert results["per_class"]["A"] == {"mean": pytest.approx(0.8), "std": pytest.approx(0.1)}
    assert results["per_class"]["B"] == {"mean": pytest.approx(0.7), "std": pytest.approx(0.1)}
    assert results["mean"] == pytest.approx(0.75) and results["std"] == pytest.approx(0.0)
    assert results["metadata"] == {"config": "acdc", "step": 3}
    assert results["classes"] == ["A", "B"] and results["num_subjects"] == 2

    markdown = evaluate.results_markdown(results)
    assert "config: acdc, step: 3" in markdown.splitlines()[0]
    rows = [
        [cell.strip() for cell in line.strip("|").split("|")]
        for line in markdown.splitlines()
        if line.startswith("|")
    ]
    assert rows[0] == ["subject", "A", "B", "mean"]
    assert rows[2] == ["007", "0.900", "0.600", "0.750"]
    assert rows[3] == ["010", "0.700", "0.800", "0.750"]
    assert rows[4] == ["mean ± std", "0.800 ± 0.100", "0.700 ± 0.100", "0.750 ± 0.000"]


def test_to_raw_labels_dtype():
    classes = np.array([[0, 1], [2, 3]])
    raw = evaluate.to_raw_labels(classes, (0, 205, 420, 500))
    assert raw.dtype == np.uint16
    np.testing.assert_array_equal(raw, [[0, 205], [420, 500]])
    assert evaluate.to_raw_labels(classes, (0, 1, 2, 3)).dtype == np.uint8


# Inference ----------------------------------------------------------------------------------


def test_predict_volume_pads_last_chunk_and_keeps_slice_order(tmp_path):
    layout, subjects = _write_dataset(tmp_path, (30, 28, 7), (1.3, 1.1, 6.0), num_subjects=1)
    (volume,) = _load(subjects, layout, 1.0, 32)
    oracle = _OracleApply([volume], layout.num_classes)
    probabilities = evaluate.predict_volume(oracle, volume, chunk_size=3)
    # 7 slices in chunks of 3: three calls, all with the same shape.
    assert oracle.shapes == [(3, 32, 32, 1)] * 3
    assert probabilities.shape == (7, 32, 32, 4) and probabilities.dtype == np.float32
    np.testing.assert_allclose(probabilities.sum(-1), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(probabilities.argmax(-1), volume.label)
    # softmax(10 * one_hot) over 4 classes: e^10 / (e^10 + 3).
    np.testing.assert_allclose(probabilities.max(-1), np.exp(10) / (np.exp(10) + 3), rtol=1e-6)


def test_native_prediction_of_perfect_logits_is_exact_at_zoom_one(tmp_path):
    # Spacing equal to the target resolution and a padded crop: the round trip is the identity.
    layout, subjects = _write_dataset(tmp_path, (30, 28, 5), (1.0, 1.0, 8.0), num_subjects=1)
    (volume,) = _load(subjects, layout, 1.0, 32)
    native = evaluate.predict_native(_OracleApply([volume], 4), volume, chunk_size=4)
    label = layout.class_indices(np.asanyarray(nib.load(subjects[0].label_path).dataobj), "")
    np.testing.assert_array_equal(native, label)
    np.testing.assert_array_equal(evaluate.dice_per_class(native, label, 4), [1.0, 1.0, 1.0])


@pytest.mark.parametrize("image_size", [64, 48])  # 64 pads, 48 crops the 52-pixel H axis.
def test_native_dice_of_perfect_logits_at_non_trivial_zoom(tmp_path, image_size):
    # 40 x 36 pixels of 1.3 x 1.1 mm resampled to 1 mm: 52 x 40, then crop/pad.
    layout, subjects = _write_dataset(tmp_path, (40, 36, 5), (1.3, 1.1, 6.0), num_subjects=1)
    (volume,) = _load(subjects, layout, 1.0, image_size)
    native = evaluate.predict_native(_OracleApply([volume], 4), volume, chunk_size=2)
    assert native.shape == (40, 36, 5)
    label = layout.class_indices(np.asanyarray(nib.load(subjects[0].label_path).dataobj), "")
    dice = evaluate.dice_per_class(native, label, 4)
    assert np.all(dice >= 0.97), dice
    assert np.all(dice < 1.0), "the zoom should lose a few boundary voxels"


def test_unet_inference_is_independent_of_chunking_and_devices(tmp_path):
    layout, subjects = _write_dataset(tmp_path, (30, 28, 7), (1.3, 1.1, 6.0), num_subjects=1)
    (volume,) = _load(subjects, layout, 1.0, 32)
    model = UNet(num_classes=4, filters=(4, 4, 8, 8, 8, 8))
    # The "rbg" PRNG compiles init several times faster on CPU than threefry.
    init = jax.jit(functools.partial(model.init, train=False))
    variables = init(jax.random.key(0, impl="rbg"), np.zeros((1, 32, 32, 1), np.float32))
    # Non-trivial running statistics, so inference-mode BatchNorm differs from batch statistics
    # and any mixing of slices within a chunk (e.g. batch statistics) would show.
    rng = np.random.default_rng(0)
    variables = {
        "params": variables["params"],
        "batch_stats": jax.tree.map(
            lambda x: x + rng.uniform(0.0, 0.3, x.shape), variables["batch_stats"]
        ),
    }
    apply_fn = evaluate.inference_apply_fn(model, variables)
    whole = evaluate.predict_volume(apply_fn, volume, chunk_size=7)
    padded = evaluate.predict_volume(apply_fn, volume, chunk_size=3)  # 3 + 3 + 1 (2 padding).
    assert whole.shape == (7, 32, 32, 4)
    np.testing.assert_allclose(padded, whole, atol=1e-5)

    parallel = DataParallel("pmap", devices=jax.devices()[:4])
    mapped_fn = evaluate.inference_apply_fn(model, variables, parallel)
    np.testing.assert_allclose(
        evaluate.predict_volume(mapped_fn, volume, chunk_size=4), whole, atol=1e-5
    )
    with pytest.raises(ValueError, match="multiple of the 4 local devices"):
        evaluate.predict_volume(mapped_fn, volume, chunk_size=6)


def test_predict_volume_rejects_bad_apply_output(tmp_path):
    layout, subjects = _write_dataset(tmp_path, (30, 28, 3), (1.0, 1.0, 6.0), num_subjects=1)
    (volume,) = _load(subjects, layout, 1.0, 32)
    with pytest.raises(ValueError, match="logits .chunk, H, W, C."):
        evaluate.predict_volume(lambda x: x[..., 0], volume, chunk_size=2)


# End to end ---------------------------------------------------------------------------------


def test_evaluate_writes_results_predictions_and_figures(tmp_path):
    layout, subjects = _write_dataset(tmp_path / "data", (30, 28, 5), (1.0, 1.0, 8.0))
    volumes = _load(subjects, layout, 1.0, 32)
    oracle = _OracleApply(volumes, layout.num_classes)
    # A wrong prediction for subject case1: class 3 (raw 500) predicted as class 2 everywhere.
    second = {v.image[z].astype(np.float32).tobytes() for v in volumes[1:] for z in range(5)}

    def apply_fn(images):
        logits = oracle(images)
        for i, image in enumerate(images[..., 0]):
            if image.tobytes() in second:
                logits[i, ..., 2] += logits[i, ..., 3]
                logits[i, ..., 3] = 0.0
        return logits

    out_dir = tmp_path / "evaluate"
    results = evaluate.evaluate(
        apply_fn,
        volumes,
        subjects,
        layout,
        str(out_dir),
        chunk_size=4,
        metadata={"config": "tiny", "step": np.int64(120)},
        num_figure_subjects=1,
    )

    # Reference Dice of case1 from the label files: class 3 missing, class 2 gains its voxels.
    raw = np.asanyarray(nib.load(subjects[1].label_path).dataobj)
    n2, n3 = int(np.sum(raw == 420)), int(np.sum(raw == 500))
    expected_case1 = [1.0, 2 * n2 / (2 * n2 + n3), 0.0]
    on_disk = json.loads((out_dir / "results.json").read_text())
    assert on_disk["metadata"] == {"config": "tiny", "step": 120}
    assert on_disk["classes"] == ["Myo", "LA", "LV"]
    assert on_disk["subjects"]["case0"]["dice"] == {"Myo": 1.0, "LA": 1.0, "LV": 1.0}
    np.testing.assert_allclose(
        list(on_disk["subjects"]["case1"]["dice"].values()), expected_case1, rtol=1e-12
    )
    subject_means = [1.0, np.mean(expected_case1)]
    assert on_disk["mean"] == pytest.approx(np.mean(subject_means))
    assert on_disk["std"] == pytest.approx(np.std(subject_means))
    assert on_disk["per_class"]["LV"] == {"mean": 0.5, "std": 0.5}
    assert on_disk["mean"] == pytest.approx(results["mean"])

    markdown = (out_dir / "results.md").read_text().splitlines()
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in markdown if "|" in line]
    assert rows[0] == ["subject", "Myo", "LA", "LV", "mean"]
    assert [row[0] for row in rows[2:]] == ["case0", "case1", "mean ± std"]
    assert rows[3][3] == "0.000" and rows[4][3] == "0.500 ± 0.500"

    for subject in subjects:
        written = nib.load(str(out_dir / "predictions" / f"{subject.subject_id}.nii.gz"))
        original = nib.load(subject.image_path)
        np.testing.assert_array_equal(written.affine, original.affine)
        assert written.header.get_zooms() == original.header.get_zooms()
        assert written.header["qform_code"] == original.header["qform_code"] == 1
        assert written.header["descrip"] == original.header["descrip"]
        assert written.header.get_intent()[0] == "label"
        data = np.asanyarray(written.dataobj)
        assert data.dtype == np.uint16
        raw = np.asanyarray(nib.load(subject.label_path).dataobj)
        if subject.subject_id == "case0":
            np.testing.assert_array_equal(data, raw)
        else:
            np.testing.assert_array_equal(data, np.where(raw == 500, 420, raw))

    figure_path = out_dir / "figures" / "case0.png"
    assert figure_path.stat().st_size > 10_000
    pixels = matplotlib.image.imread(str(figure_path))
    assert pixels.shape[0] > 200 and pixels.shape[1] > 500
    assert pixels[..., :3].std() > 0.05
    assert not (out_dir / "figures" / "case1.png").exists()


def test_evaluate_rejects_mismatched_inputs(tmp_path):
    layout, subjects = _write_dataset(tmp_path / "data", (30, 28, 3), (1.0, 1.0, 8.0))
    volumes = _load(subjects, layout, 1.0, 32)
    oracle = _OracleApply(volumes, layout.num_classes)
    with pytest.raises(DataError, match=r"\['case1'\] have no matching source subject"):
        evaluate.evaluate(oracle, volumes, subjects[:1], layout, str(tmp_path / "a"))
    unlabelled = [subjects[0], sources.Subject("case1", subjects[1].image_path, None)]
    with pytest.raises(DataError, match=r"\['case1'\] have no label file"):
        evaluate.evaluate(oracle, volumes, unlabelled, layout, str(tmp_path / "b"))
    moved = preprocess.Volume(
        "case0",
        volumes[0].image,
        volumes[0].label,
        preprocess.Geometry.from_dict({**volumes[0].geometry.to_dict(), "affine": np.eye(4) * 2.0}),
    )
    with pytest.raises(DataError, match="stale"):
        evaluate.evaluate(oracle, [moved], subjects, layout, str(tmp_path / "c"))


def test_evaluate_4d_prostate_image(tmp_path):
    # MSD prostate: 4D (T2, ADC) images; the prediction is 3D on the T2 grid, values 0/1/2.
    spacing = (0.7, 0.6, 3.0)
    classes = np.minimum(_blob_classes((30, 28, 4), seed=1), 2)
    rng = np.random.default_rng(1)
    image = np.stack([100.0 * classes + rng.normal(0, 5, classes.shape)] * 2, axis=-1)
    affine = np.diag([*spacing, 1.0])
    for folder, data in (("imagesTr", image.astype(np.float32)), ("labelsTr", classes)):
        os.makedirs(tmp_path / folder, exist_ok=True)
        nifti = nib.Nifti1Image(data, affine)
        nifti.header.set_zooms(spacing + (1.0,) * (data.ndim - 3))
        nib.save(nifti, str(tmp_path / folder / "prostate_07.nii.gz"))
    layout = sources.get_layout("prostate")
    subjects = layout.find_subjects(str(tmp_path))
    volumes = _load(subjects, layout, 0.6, 32)
    results = evaluate.evaluate(
        _OracleApply(volumes, 3), volumes, subjects, layout, str(tmp_path / "out"), chunk_size=4
    )
    assert list(results["subjects"]) == ["007"] and results["classes"] == ["PZ", "TZ"]
    assert results["mean"] > 0.97
    written = nib.load(str(tmp_path / "out" / "predictions" / "007.nii.gz"))
    assert written.shape == (30, 28, 4) and written.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(written.affine, nib.load(subjects[0].image_path).affine)
    assert (tmp_path / "out" / "figures" / "007.png").stat().st_size > 10_000
