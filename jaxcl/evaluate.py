"""Test evaluation (docs/METHOD.md §11): slice-wise inference, native-grid 3D Dice, NIfTI, reports.

Per test volume:
  1. `predict_volume`: the network runs on the preprocessed slices in fixed-size chunks (the last
     chunk zero-padded, so the jitted apply compiles once), BatchNorm in inference mode; softmax.
  2. `predict_native`: the probabilities are un-cropped / un-padded into the resampled frame,
     resized linearly to the native in-plane grid (`preprocess.to_native`), then argmax.
  3. `dice_per_class`: Dice of every foreground class against the ORIGINAL label file on the
     native 3D grid (an empty prediction of an empty structure scores 1); the subject's score is
     the mean over foreground classes.
The reported numbers (`summarize`) are the mean and standard deviation over test subjects, overall
and per class. `evaluate` adds the I/O: it writes into its output folder

  results.json               `summarize`'s dict (per subject per class Dice, per-class mean/std,
                             overall mean/std, the caller's metadata)
  results.md                 `results_markdown`: one row per subject and a mean ± std row
  predictions/<id>.nii.gz    predicted raw label values (e.g. MM-WHS 205, 420, ...) with the
                             original image's affine and header
  figures/<id>.png           image / ground truth / prediction for a few slices of a few subjects

Standard deviations are population ones (ddof = 0) over subjects. The output folder may be local
or `gs://`. In a run of several processes every process evaluates (each gets the results) and
process 0 alone writes the files.
"""

from __future__ import annotations

import gzip
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import nibabel as nib
import numpy as np
import scipy.special

from jaxcl import figures, files
from jaxcl.data import pipeline, preprocess
from jaxcl.data.sources import DataError, DatasetLayout, Subject
from jaxcl.train.parallel import DataParallel

# (chunk, H, W, 1) float32 images -> (chunk, H, W, C) logits, any array type.
ApplyFn = Callable[[np.ndarray], Any]

DEFAULT_CHUNK_SIZE = 16
# gzip level of the written predictions: nibabel's default for .nii.gz.
_NIFTI_COMPRESSION = 1


# Inference ----------------------------------------------------------------------------------


def inference_apply_fn(
    model: nn.Module, variables: Mapping[str, Any], parallel: DataParallel | None = None
) -> ApplyFn:
    """An `ApplyFn` running `model(x, train=False)` (BatchNorm on its running averages).

    Args:
      model: a module called as `model(images, train)`, e.g. `UNet`.
      variables: {"params": ..., "batch_stats": ...} host or device arrays.
      parallel: if given, chunks are split over its local devices with `map_eval` (the chunk
        size must then be a multiple of `parallel.num_local_devices`); otherwise one jitted
        apply on the default device. For multi-host runs build it with
        `devices=jax.local_devices()` so that each process can evaluate on its own.

    Returns:
      `apply(images (chunk, H, W, 1)) -> (chunk, H, W, C)` numpy logits.
    """

    def logits_fn(variables, images):
        return model.apply(variables, images, train=False)

    if parallel is None:
        jitted = jax.jit(logits_fn)
        device_variables = jax.device_put(variables)
        return lambda images: np.asarray(jitted(device_variables, images))

    mapped = parallel.map_eval(logits_fn)
    device_variables = parallel.put_state(variables)
    devices = parallel.num_local_devices

    def apply(images: np.ndarray) -> np.ndarray:
        if images.shape[0] % devices:
            raise ValueError(
                f"evaluation chunk_size={images.shape[0]} must be a multiple of the "
                f"{devices} local devices; change the chunk size."
            )
        per_device = images.reshape(devices, -1, *images.shape[1:])
        logits = mapped(device_variables, per_device)
        return np.asarray(logits).reshape(images.shape[0], *logits.shape[2:])

    return apply


def predict_volume(
    apply_fn: ApplyFn, volume: preprocess.Volume, *, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> np.ndarray:
    """Softmax probabilities of every slice of a preprocessed volume.

    Args:
      apply_fn: (chunk_size, H, W, 1) float32 images -> (chunk_size, H, W, C) logits; always
        called with exactly `chunk_size` slices (the last chunk is zero-padded).
      volume: preprocessed volume, image (Z, H, W).
      chunk_size: slices per call.

    Returns:
      (Z, H, W, C) float32 probabilities.
    """
    if chunk_size < 1:
        raise ValueError(f"evaluation chunk_size must be positive, got {chunk_size}.")
    _, batch = next(pipeline.volume_batches([volume], chunk_size=chunk_size))
    logits = []
    for images in batch["image"]:
        chunk_logits = np.asarray(apply_fn(images), np.float32)
        if chunk_logits.ndim != 4 or chunk_logits.shape[:3] != images.shape[:3]:
            raise ValueError(
                f"apply_fn maps images {images.shape} to {chunk_logits.shape}; logits "
                f"(chunk, H, W, C) = ({', '.join(map(str, images.shape[:3]))}, C) were expected."
            )
        logits.append(chunk_logits)
    slice_logits = np.concatenate(logits)[batch["valid"].reshape(-1)]
    return scipy.special.softmax(slice_logits, axis=-1).astype(np.float32)


def predict_native(
    apply_fn: ApplyFn, volume: preprocess.Volume, *, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> np.ndarray:
    """(X, Y, Z) uint8 predicted classes on the volume's native NIfTI grid (docs/METHOD.md §11)."""
    probabilities = predict_volume(apply_fn, volume, chunk_size=chunk_size)
    return np.argmax(preprocess.to_native(probabilities, volume.geometry), axis=-1).astype(np.uint8)


# Metrics ------------------------------------------------------------------------------------


def dice_score(prediction: np.ndarray, label: np.ndarray, class_index: int) -> float:
    """Dice 2|P ∩ Y| / (|P| + |Y|) of one class over all voxels; 1 when both are empty.

    Args:
      prediction: integer class indices, any shape (e.g. a native (X, Y, Z) volume).
      label: reference class indices, same shape.
      class_index: the class scored.
    """
    if prediction.shape != label.shape:
        raise ValueError(
            f"dice_score needs prediction and label of one shape, got {prediction.shape} and "
            f"{label.shape}; compare volumes on the same (native) grid."
        )
    predicted, reference = prediction == class_index, label == class_index
    total = int(predicted.sum()) + int(reference.sum())
    return 1.0 if total == 0 else 2.0 * int(np.sum(predicted & reference)) / total


def dice_per_class(prediction: np.ndarray, label: np.ndarray, num_classes: int) -> np.ndarray:
    """Dice of every foreground class 1..num_classes-1 over all voxels (empty vs empty: 1).

    Args:
      prediction: (X, Y, Z) (or any shape) integer class indices in [0, num_classes).
      label: reference class indices, same shape.
      num_classes: C, background included.

    Returns:
      (C - 1,) float64 Dice of classes 1..C-1.
    """
    if prediction.shape != label.shape:
        raise ValueError(
            f"dice_per_class needs prediction and label of one shape, got {prediction.shape} and "
            f"{label.shape}; compare volumes on the same (native) grid."
        )
    prediction = np.asarray(prediction).reshape(-1).astype(np.int64)
    label = np.asarray(label).reshape(-1).astype(np.int64)
    if prediction.size and max(prediction.max(), label.max()) >= num_classes:
        raise ValueError(f"class indices must be below num_classes={num_classes}.")
    intersection = np.bincount(label[prediction == label], minlength=num_classes)
    total = np.bincount(prediction, minlength=num_classes) + np.bincount(
        label, minlength=num_classes
    )
    dice = np.where(total > 0, 2.0 * intersection / np.maximum(total, 1), 1.0)
    return dice[1:]


def summarize(
    dice_by_subject: Mapping[str, np.ndarray],
    class_names: Sequence[str],
    metadata: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Aggregates per-subject Dice into the results dict (the content of results.json).

    Args:
      dice_by_subject: subject id -> (C - 1,) foreground Dice, in report order.
      class_names: (C,) class names, index 0 background.
      metadata: caller's information (config name, checkpoint step, ...), stored as given.

    Returns:
      {"metadata", "classes": foreground names, "num_subjects",
       "subjects": {id: {"dice": {class: d}, "mean": mean over classes}},
       "per_class": {class: {"mean", "std"}}, "mean", "std"} with means and population standard
      deviations over subjects ("mean"/"std" of the per-subject means).
    """
    foreground = list(class_names[1:])
    if not dice_by_subject:
        raise ValueError("no test subjects to summarise; check the test split.")
    table = np.stack([np.asarray(d, np.float64) for d in dice_by_subject.values()])
    if table.shape[1] != len(foreground):
        raise ValueError(
            f"{table.shape[1]} Dice values per subject for {len(foreground)} foreground classes "
            f"{foreground}."
        )
    subject_means = table.mean(axis=1)
    return {
        "metadata": dict(metadata or {}),
        "classes": foreground,
        "num_subjects": len(dice_by_subject),
        "subjects": {
            subject_id: {
                "dice": dict(zip(foreground, map(float, row), strict=True)),
                "mean": float(row.mean()),
            }
            for subject_id, row in zip(dice_by_subject, table, strict=True)
        },
        "per_class": {
            name: {"mean": float(table[:, c].mean()), "std": float(table[:, c].std())}
            for c, name in enumerate(foreground)
        },
        "mean": float(subject_means.mean()),
        "std": float(subject_means.std()),
    }


def results_markdown(results: Mapping[str, Any]) -> str:
    """Markdown table of a `summarize` dict: one row per subject, then mean ± std per column."""
    classes = results["classes"]
    details = ", ".join(f"{k}: {v}" for k, v in results["metadata"].items())
    lines = [
        f"Test Dice on the native grid, {results['num_subjects']} subjects"
        + (f" ({details})" if details else "")
        + ".",
        "",
        "| subject | " + " | ".join(classes) + " | mean |",
        "|---" * (len(classes) + 2) + "|",
    ]
    for subject_id, scores in results["subjects"].items():
        cells = [f"{scores['dice'][name]:.3f}" for name in classes] + [f"{scores['mean']:.3f}"]
        lines.append(f"| {subject_id} | " + " | ".join(cells) + " |")
    summary = [results["per_class"][name] for name in classes] + [results]
    lines.append(
        "| mean ± std | " + " | ".join(f"{s['mean']:.3f} ± {s['std']:.3f}" for s in summary) + " |"
    )
    return "\n".join(lines) + "\n"


# NIfTI and files ----------------------------------------------------------------------------


def to_raw_labels(classes: np.ndarray, label_values: Sequence[int]) -> np.ndarray:
    """Class indices -> the dataset's raw label values, in the smallest integer dtype for them."""
    values = np.asarray(label_values)
    dtype = np.result_type(np.min_scalar_type(values.min()), np.min_scalar_type(values.max()))
    return values.astype(dtype)[classes]


def prediction_nifti(
    classes: np.ndarray, original: nib.Nifti1Image, label_values: Sequence[int]
) -> nib.Nifti1Image:
    """A label image of `classes` (X, Y, Z) with the affine and header of `original`.

    The header keeps everything of the original (qform/sform and codes, voxel sizes, units) except
    what describes the voxel values: data type, scaling, display range and intent (label).
    """
    raw = to_raw_labels(classes, label_values)
    header = original.header.copy()
    header.set_data_dtype(raw.dtype)
    header.set_slope_inter(1.0, 0.0)
    header["cal_min"], header["cal_max"] = 0, int(raw.max(initial=0))
    header.set_intent("label")
    return type(original)(raw, original.affine, header)


def _native_label(subject: Subject, layout: DatasetLayout, shape: tuple[int, ...]) -> np.ndarray:
    """The subject's original label file as (X, Y, Z) class indices."""
    raw = np.asanyarray(nib.load(subject.label_path).dataobj)
    if raw.ndim == 4 and raw.shape[3] == 1:
        raw = raw[..., 0]
    if raw.shape != shape:
        raise DataError(
            f"label {subject.label_path} has shape {raw.shape} but the prediction on the grid of "
            f"{subject.image_path} has {shape}; the image and label files must belong together."
        )
    return layout.class_indices(raw, subject.label_path)


def _native_image(original: nib.Nifti1Image, layout: DatasetLayout) -> np.ndarray:
    """(X, Y, Z) float32 intensities of the original image (the layout's channel of 4D data)."""
    data = np.asanyarray(original.dataobj)
    if data.ndim == 4:
        data = data[..., layout.channel or 0]
    return data.astype(np.float32)


def _subjects_for(
    volumes: Sequence[preprocess.Volume], subjects: Sequence[Subject]
) -> list[Subject]:
    """The labelled subject of every volume, matched by subject id."""
    by_id = {s.subject_id: s for s in subjects}
    missing = [v.subject_id for v in volumes if v.subject_id not in by_id]
    if missing:
        raise DataError(
            f"test volumes {missing} have no matching source subject; pass the subjects found by "
            "layout.find_subjects(root) for the same dataset root."
        )
    unlabelled = [v.subject_id for v in volumes if by_id[v.subject_id].label_path is None]
    if unlabelled:
        raise DataError(
            f"test subjects {unlabelled} have no label file; evaluation needs labelled test "
            "subjects (check the test split and the dataset's labelsTr / _gt files)."
        )
    return [by_id[v.subject_id] for v in volumes]


def _json_value(value: Any) -> Any:
    if isinstance(value, np.generic | np.ndarray):
        return value.tolist()
    raise TypeError(f"results metadata value {value!r} is not JSON serialisable.")


def evaluate(
    apply_fn: ApplyFn,
    volumes: Sequence[preprocess.Volume],
    subjects: Sequence[Subject],
    layout: DatasetLayout,
    out_dir: files.PathLike,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    metadata: Mapping[str, Any] | None = None,
    write_predictions: bool = True,
    num_figure_subjects: int = 3,
    num_figure_slices: int = 3,
) -> dict[str, Any]:
    """Evaluates a model on test volumes and writes the outputs listed in the module docstring.

    Args:
      apply_fn: (chunk_size, H, W, 1) images -> logits, e.g. from `inference_apply_fn`.
      volumes: preprocessed test volumes (report order).
      subjects: source subjects (at least those of `volumes`): their original image files give
        the affine/header of the written predictions, their label files the reference for Dice.
      layout: the dataset layout (class names, raw label values, image channel).
      out_dir: output folder (created), local or `gs://`.
      chunk_size: slices per apply call.
      metadata: stored in results.json and the Markdown caption (config name, checkpoint step).
      write_predictions: write predictions/<subject_id>.nii.gz.
      num_figure_subjects: how many subjects (the first ones) get an overlay figure.
      num_figure_slices: slices per figure, spread from the first to the last labelled slice.

    Returns:
      The results dict written to results.json (see `summarize`).
    """
    sources = _subjects_for(volumes, subjects)
    out_dir = files.path(out_dir)
    writes = jax.process_index() == 0
    dice_by_subject = {}
    for index, (volume, subject) in enumerate(zip(volumes, sources, strict=True)):
        original = nib.load(subject.image_path)
        if not np.allclose(original.affine, volume.geometry.affine, atol=1e-4):
            raise DataError(
                f"the affine of {subject.image_path} differs from the one stored with the "
                f"preprocessed volume {volume.subject_id}; the prepared dataset is stale, delete "
                "it from data_dir so that it is rebuilt."
            )
        prediction = predict_native(apply_fn, volume, chunk_size=chunk_size)
        label = _native_label(subject, layout, prediction.shape)
        dice = dice_per_class(prediction, label, layout.num_classes)
        dice_by_subject[volume.subject_id] = dice
        logging.info(
            "evaluate: %s Dice %s (mean %.4f)",
            volume.subject_id,
            dict(zip(layout.class_names[1:], np.round(dice, 4).tolist(), strict=True)),
            dice.mean(),
        )
        if writes and write_predictions:
            nifti = prediction_nifti(prediction, original, layout.label_values)
            files.write_atomically(
                out_dir / "predictions" / f"{volume.subject_id}.nii.gz",
                gzip.compress(nifti.to_bytes(), compresslevel=_NIFTI_COMPRESSION),
            )
        if writes and index < num_figure_subjects:
            scores = ", ".join(
                f"{name} {d:.3f}" for name, d in zip(layout.class_names[1:], dice, strict=True)
            )
            figure = figures.overlay_figure(
                _native_image(original, layout),
                label,
                prediction,
                class_names=layout.class_names,
                slice_indices=figures.representative_slices(label, num_figure_slices),
                spacing=tuple(volume.geometry.spacing[:2]),
                title=f"subject {volume.subject_id}: Dice {scores}",
            )
            figures.save_figure(figure, out_dir / "figures" / f"{volume.subject_id}.png")

    results = summarize(dice_by_subject, layout.class_names, metadata)
    if writes:
        files.write_atomically(
            out_dir / "results.json", json.dumps(results, indent=2, default=_json_value)
        )
        files.write_atomically(out_dir / "results.md", results_markdown(results))
    logging.info("evaluate: mean Dice %.4f ± %.4f", results["mean"], results["std"])
    return results
