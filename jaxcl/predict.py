r"""Segments new scans with a fine-tuned model, nnU-Net style.

  python -m jaxcl.predict --model=WORKDIR --input=imagesTs --output=predictions
  python -m jaxcl.predict --model=WORKDIR/finetune/export --input=a.nii.gz --input=b.nii \
      --output=predictions --save_probabilities

--model is a fine-tuning export or a workdir (its `finetune/export`); the model card in it gives
everything else: preprocessing, slice axis, image channel, classes and their raw label values.
--input (repeatable) names NIfTI files (.nii / .nii.gz) or folders of them. A folder whose files
all end in a 4-digit channel suffix, with a `_0000` file for every case (nnU-Net's
`<case>_0000.nii.gz`, `<case>_0001.nii.gz`, ...), is read per case, using the file of the model's
channel; any other folder is read file by file. Hidden files (macOS `._` forks) and non-NIfTI
files in folders are ignored. A case is named after its file without the NIfTI ending (and
without the channel suffix in nnU-Net form).

For every case the output folder gets
  <case>.nii.gz    the predicted raw label values (the card's label_values) on the input's voxel
                   grid, with its affine and header;
  <case>.npz       with --save_probabilities: "probabilities", (C, Z, Y, X) float32 softmax
                   probabilities on the same grid, the array nnU-Net v2 writes for
                   --save_probabilities (axes reversed from NIfTI's (X, Y, Z)).
Files are written atomically. An existing output is left alone unless --overwrite is given.

A bad input (missing, not NIfTI, corrupt, 2D, an ambiguous or wrong channel count, an output
that exists) is reported in one line and skipped; the other cases are still segmented. The run
ends with a summary and exits with 1 if anything failed, 0 otherwise; a --model that is not a
model exits with 1 before anything else.

Slices run through the network in chunks of --batch_size (the last one zero-padded, so the
network compiles once per model) on jax's default device, and compiled programs are kept in the
persistent compilation cache (`jaxcl.entry`), so a rerun does not compile again.
"""

from jaxcl import runtime

if __name__ == "__main__":
    runtime.tune_cpu_process()

import dataclasses  # noqa: E402 - after the process settings above
import gzip  # noqa: E402
import io  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Sequence  # noqa: E402

import jax.numpy as jnp  # noqa: E402
import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
import tqdm  # noqa: E402
from absl import app, flags  # noqa: E402
from etils import epath  # noqa: E402

from jaxcl import entry, evaluate, files, model_card  # noqa: E402
from jaxcl.data import preprocess  # noqa: E402
from jaxcl.data.sources import DataError, nifti_stem  # noqa: E402
from jaxcl.models.unet import UNet  # noqa: E402
from jaxcl.train import checkpoint  # noqa: E402

_CHANNEL_SUFFIX = re.compile(r"^(.+)_(\d{4})$")
# gzip level of the written NIfTI files, as evaluate writes them (nibabel's default).
_NIFTI_COMPRESSION = 1


@dataclasses.dataclass(frozen=True)
class Case:
    """One volume to segment: `name` (the output file stem) and its image file `path`."""

    name: str
    path: str


@dataclasses.dataclass(frozen=True)
class Summary:
    """What a run did: the names of the segmented cases, one line per failed item."""

    segmented: tuple[str, ...]
    failures: tuple[str, ...]

    def text(self) -> str:
        lines = [f"{len(self.segmented)} segmented, {len(self.failures)} failed."]
        return "\n".join(lines + [f"  {failure}" for failure in self.failures])


# Model --------------------------------------------------------------------------------------


def load_model(model: files.PathLike) -> tuple[model_card.ModelCard, evaluate.ApplyFn]:
    """The card and jitted inference function of an export folder or a workdir.

    Returns:
      (card, apply) with `apply(images (N, S, S, 1) float32) -> (N, S, S, C)` numpy logits on
      jax's default device (compiled once per N).

    Raises:
      model_card.ModelCardError: `model` is not a fine-tuned jaxcl model.
    """
    export_dir = model_card.find_export(model)
    card = model_card.read(export_dir)
    variables = checkpoint.load_variables(export_dir)
    network = UNet(num_classes=card.num_classes, filters=card.filters, dtype=jnp.dtype(card.dtype))
    logging.info(
        "predict: model %s (%s, %d px at %g mm, classes %s)",
        export_dir,
        card.slice_axis,
        card.image_size,
        card.target_resolution,
        dict(zip(card.label_values, card.class_names, strict=True)),
    )
    return card, evaluate.inference_apply_fn(network, variables)


# Inputs -------------------------------------------------------------------------------------


def _nnunet_groups(stems: Sequence[str]) -> dict[str, dict[int, str]] | None:
    """{case: {channel: stem}} if every stem is `<case>_dddd` and every case has `_0000`."""
    groups: dict[str, dict[int, str]] = {}
    for stem in stems:
        match = _CHANNEL_SUFFIX.match(stem)
        if match is None:
            return None
        groups.setdefault(match[1], {})[int(match[2])] = stem
    return groups if all(0 in channels for channels in groups.values()) else None


def _folder_cases(folder: str, channel: int) -> tuple[list[Case], list[str]]:
    """The cases of one input folder (see the module docstring) and its problems."""
    paths = {}
    for entry_name in sorted(os.listdir(folder)):
        stem = nifti_stem(entry_name)
        if stem is not None and os.path.isfile(os.path.join(folder, entry_name)):
            paths[stem] = os.path.join(folder, entry_name)
    if not paths:
        return [], [
            f"{folder} holds no NIfTI files (.nii / .nii.gz); pass a folder of scans or the "
            "scan files themselves."
        ]
    groups = _nnunet_groups(list(paths))
    if groups is None:
        return [Case(stem, path) for stem, path in paths.items()], []
    cases, problems = [], []
    for name, channels in groups.items():
        if channel in channels:
            cases.append(Case(name, paths[channels[channel]]))
        else:
            problems.append(
                f"{os.path.join(folder, name)}_{channel:04d}.nii.gz is missing (case {name}, "
                f"channel {channel}); add it, or pass --channel=N to segment another channel."
            )
    return cases, problems


def find_cases(inputs: Sequence[str], channel: int = 0) -> tuple[list[Case], list[str]]:
    """The cases named by --input paths, in order, and one-line problems naming each bad path.

    Args:
      inputs: NIfTI files or folders of them (see the module docstring).
      channel: which `_dddd` file of an nnU-Net form folder to use.

    Returns:
      (cases, problems): two inputs giving one case name keep the first case (the second is a
      problem, since both would be written to the same output file).
    """
    cases, problems = [], []
    for location in inputs:
        if os.path.isdir(location):
            found, missing = _folder_cases(location, channel)
            cases += found
            problems += missing
        elif not os.path.exists(location):
            problems.append(f"{location} does not exist; check the --input path.")
        elif (stem := nifti_stem(os.path.basename(location))) is None:
            problems.append(
                f"{location} is not a NIfTI file (.nii / .nii.gz); convert it to NIfTI first."
            )
        else:
            cases.append(Case(stem, location))
    unique: dict[str, Case] = {}
    for case in cases:
        if case.name in unique:
            problems.append(
                f"{case.path} and {unique[case.name].path} are both case {case.name}; segment "
                "them into different --output folders."
            )
        else:
            unique[case.name] = case
    return list(unique.values()), problems


# Segmentation -------------------------------------------------------------------------------


def _single_channel(
    data: np.ndarray, card: model_card.ModelCard, channel: int | None, path: str
) -> np.ndarray:
    """(X, Y, Z) image of 3D or 4D `data`: `channel` (--channel) if given, else the channel the
    model was trained on, where the channel count tells which; 3D data is used as it is."""
    if data.ndim == 4 and channel is not None and channel >= data.shape[3]:
        raise DataError(
            f"{path} has {data.shape[3]} channels, --channel={channel} does not exist; pass "
            f"--channel=0 to {data.shape[3] - 1}."
        )
    if data.ndim == 4 and data.shape[3] > 1 and channel is None:
        if card.num_channels == 1:
            raise DataError(
                f"{path} has {data.shape[3]} channels but the model was trained on "
                "single-channel images; pass --channel=N to choose the channel to segment."
            )
        if data.shape[3] != card.num_channels:
            raise DataError(
                f"{path} has {data.shape[3]} channels but the model was trained on "
                f"{card.num_channels}-channel images (channel {card.channel}); pass images with "
                f"{card.num_channels} channels, or --channel=N to choose the channel to segment."
            )
        channel = card.channel
    return preprocess.select_channel(data, channel if data.ndim == 4 else None, path)


def native_probabilities(
    card: model_card.ModelCard,
    apply_fn: evaluate.ApplyFn,
    data: np.ndarray,
    affine: np.ndarray,
    zooms: Sequence[float],
    path: str,
    *,
    channel: int | None = None,
    batch_size: int = evaluate.DEFAULT_CHUNK_SIZE,
) -> np.ndarray:
    """Softmax probabilities of every voxel of one scan, on its own voxel grid.

    Args:
      card: the model's card (preprocessing settings).
      apply_fn: from `load_model`.
      data: (X, Y, Z) or (X, Y, Z, K) image as stored in the NIfTI file.
      affine: (4, 4) voxel-to-world matrix of the file.
      zooms: voxel sizes from its header, X, Y, Z first.
      path: the file, for error messages.
      channel: channel of 4D data to use; None: the model's (see `_single_channel`).
      batch_size: slices per network call.

    Returns:
      (X, Y, Z, C) float32.

    Raises:
      DataError: naming `path` and the fix.
    """
    native = _single_channel(data, card, channel, path).astype(np.float32)
    try:
        image, geometry = preprocess.preprocess_image(native, affine, zooms, **card.preprocessing())
    except DataError as error:  # a bad header; preprocess_image does not know the file
        raise DataError(f"{path}: {error}") from error
    volume = preprocess.Volume(subject_id=path, image=image, label=None, geometry=geometry)
    probabilities = evaluate.predict_volume(apply_fn, volume, chunk_size=batch_size)
    return preprocess.to_native(probabilities, geometry)


def segment_file(
    card: model_card.ModelCard,
    apply_fn: evaluate.ApplyFn,
    path: str,
    *,
    channel: int | None = None,
    batch_size: int = evaluate.DEFAULT_CHUNK_SIZE,
) -> tuple[nib.Nifti1Image, np.ndarray]:
    """Reads and segments one NIfTI file.

    Returns:
      (label image, probabilities): the raw label values (X, Y, Z) with the file's affine and
      header, and (X, Y, Z, C) float32 softmax probabilities.

    Raises:
      DataError: naming `path` and the fix (unreadable, 2D, wrong channels, bad header).
    """
    data, affine, zooms = preprocess.read_nifti(path)
    probabilities = native_probabilities(
        card, apply_fn, data, affine, zooms, path, channel=channel, batch_size=batch_size
    )
    classes = np.argmax(probabilities, axis=-1).astype(np.uint8)
    return evaluate.prediction_nifti(classes, nib.load(path), card.label_values), probabilities


def output_paths(
    output_dir: files.PathLike, name: str, save_probabilities: bool
) -> list[epath.Path]:
    """[<case>.nii.gz] and, with probabilities, <case>.npz in `output_dir`."""
    folder = files.path(output_dir)
    return [folder / f"{name}.nii.gz"] + ([folder / f"{name}.npz"] if save_probabilities else [])


def write_outputs(
    output_dir: files.PathLike,
    name: str,
    label_image: nib.Nifti1Image,
    probabilities: np.ndarray | None = None,
) -> None:
    """Writes `output_paths` atomically, the label image last (its presence means complete).

    Args:
      probabilities: (X, Y, Z, C), stored as nnU-Net does: (C, Z, Y, X) float32 "probabilities".
    """
    label_path, *probability_path = output_paths(output_dir, name, probabilities is not None)
    if probabilities is not None:
        buffer = io.BytesIO()
        np.savez_compressed(
            buffer, probabilities=np.transpose(probabilities, (3, 2, 1, 0)).astype(np.float32)
        )
        files.write_atomically(probability_path[0], buffer.getvalue())
    compressed = gzip.compress(label_image.to_bytes(), compresslevel=_NIFTI_COMPRESSION)
    files.write_atomically(label_path, compressed)


def predict(
    card: model_card.ModelCard,
    apply_fn: evaluate.ApplyFn,
    inputs: Sequence[str],
    output_dir: files.PathLike,
    *,
    channel: int | None = None,
    batch_size: int = evaluate.DEFAULT_CHUNK_SIZE,
    save_probabilities: bool = False,
    overwrite: bool = False,
) -> Summary:
    """Segments every case of `inputs` into `output_dir`, skipping and reporting bad items.

    Args:
      card, apply_fn: from `load_model`.
      inputs: NIfTI files or folders (see the module docstring).
      output_dir: folder for the outputs (created), local or `gs://`.
      channel: image channel (4D files, nnU-Net folders); None: the model's.
      batch_size: slices per network call.
      save_probabilities: also write <case>.npz.
      overwrite: replace existing outputs instead of reporting them.

    Returns:
      The Summary; a tqdm bar (stderr) shows volumes/s and every case is logged at INFO.
    """
    file_channel = channel if channel is not None else card.channel or 0
    cases, problems = find_cases(inputs, file_channel)
    failures, segmented = list(problems), []
    for case in tqdm.tqdm(cases, desc="predict", unit="volume", file=sys.stderr):
        targets = output_paths(output_dir, case.name, save_probabilities)
        existing = [target for target in targets if target.exists()]
        if existing and not overwrite:
            failures.append(f"{existing[0]} exists; pass --overwrite to replace it.")
            continue
        start = time.perf_counter()
        try:
            label_image, probabilities = segment_file(
                card, apply_fn, case.path, channel=channel, batch_size=batch_size
            )
        except DataError as error:
            logging.warning("predict: %s", error)
            failures.append(str(error))
            continue
        write_outputs(
            output_dir, case.name, label_image, probabilities if save_probabilities else None
        )
        segmented.append(case.name)
        logging.info(
            "predict: %s -> %s (%.2f s)", case.path, targets[0], time.perf_counter() - start
        )
    return Summary(tuple(segmented), tuple(failures))


def _define_flags() -> None:
    """The command's flags; defined only when it runs, so importing the module defines none."""
    flags.DEFINE_string("model", None, "Fine-tuning export folder, or a workdir.")
    flags.DEFINE_multi_string("input", None, "NIfTI file or folder; repeat for more.")
    flags.DEFINE_string("output", None, "Folder for <case>.nii.gz (and <case>.npz).")
    flags.DEFINE_boolean(
        "save_probabilities", False, "Also write <case>.npz with (C, Z, Y, X) probabilities."
    )
    flags.DEFINE_boolean("overwrite", False, "Replace existing outputs.")
    flags.DEFINE_integer(
        "channel",
        None,
        "Image channel to segment (4th axis of 4D inputs, _NNNN file of nnU-Net folders); "
        "default: the model's.",
        lower_bound=0,
    )
    flags.DEFINE_integer(
        "batch_size", evaluate.DEFAULT_CHUNK_SIZE, "Slices per network call.", lower_bound=1
    )
    flags.mark_flags_as_required(["model", "input", "output"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    options = flags.FLAGS

    def work():
        card, apply_fn = load_model(options.model)
        summary = predict(
            card,
            apply_fn,
            options.input,
            options.output,
            channel=options.channel,
            batch_size=options.batch_size,
            save_probabilities=options.save_probabilities,
            overwrite=options.overwrite,
        )
        print(summary.text())
        if summary.failures:
            sys.exit(entry.EXIT_BAD_INPUT)

    entry.run(work, bad_input=(model_card.ModelCardError,))


if __name__ == "__main__":
    _define_flags()
    app.run(main)
