r"""Speed of `python -m jaxcl.predict`: seconds per volume end to end, and of the network alone.

Exports a randomly initialised UNet (the paper's filters, or --filters) with a model card (192 px
at 1.36719 mm, axial slices) into a temporary folder, writes --volumes synthetic volumes of
192 x 192 x --slices voxels of 1.36719 x 1.36719 x 10 mm, and prints:

- compile: the first volume (the network's one XLA compile, or a persistent-cache hit);
- end to end: `jaxcl.predict.predict` over the volumes after that warm-up (read, preprocess,
  network, map back to the native grid, write the label NIfTI): seconds per volume and volumes/s;
- the same per step, each step timed alone on the same volumes (median over volumes);
- network only: one jitted call on --batch_size slices (median of --repeats), times the calls a
  volume needs.

Run from the repository root (the first line applies `jaxcl.runtime`'s CPU settings, as
`python -m jaxcl.predict` does; `JAXCL_CPU_TUNING=0` measures XLA's defaults):

  PYTHONPATH=. python benchmarks/predict.py
  PYTHONPATH=. python benchmarks/predict.py --volumes=20 --slices=16 --batch_size=8

The 1-minute load average is printed with every line: on a shared machine only low-load numbers
mean anything.
"""

from jaxcl import runtime

if __name__ == "__main__":
    runtime.tune_cpu_process()

import functools  # noqa: E402 - after the process settings above
import os  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402

import jax  # noqa: E402
import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from jaxcl import evaluate, model_card, predict  # noqa: E402
from jaxcl.data import preprocess  # noqa: E402
from jaxcl.models.unet import DEFAULT_FILTERS, UNet  # noqa: E402
from jaxcl.train import checkpoint  # noqa: E402

_VOLUMES = flags.DEFINE_integer("volumes", 10, "Timed volumes (after one warm-up volume).")
_SLICES = flags.DEFINE_integer("slices", 10, "Slices per volume.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", evaluate.DEFAULT_CHUNK_SIZE, "Slices per call.")
_FILTERS = flags.DEFINE_list("filters", list(map(str, DEFAULT_FILTERS)), "UNet filters.")
_REPEATS = flags.DEFINE_integer("repeats", 10, "Timed network calls (the median is reported).")

IMAGE_SIZE = 192
RESOLUTION = 1.36719  # mm in-plane, so that a 192-voxel scan needs no resampling
SLICE_SPACING = 10.0
LABEL_VALUES = (0, 1, 2, 3)


def _load() -> float:
    return os.getloadavg()[0]


def _seconds(call: Callable[[], object]) -> float:
    start = time.perf_counter()
    jax.block_until_ready(call())
    return time.perf_counter() - start


def _export_model(folder: str, filters: tuple[int, ...]) -> None:
    network = UNet(num_classes=len(LABEL_VALUES), filters=filters)
    init = jax.jit(functools.partial(network.init, train=False))
    variables = init(jax.random.key(0), np.zeros((1, IMAGE_SIZE, IMAGE_SIZE, 1), np.float32))
    checkpoint.export_variables(folder, variables)
    card = model_card.ModelCard(
        target_resolution=RESOLUTION,
        image_size=IMAGE_SIZE,
        slice_axis="axial",
        n4=False,
        channel=None,
        num_channels=1,
        class_names=("background", "RV", "Myo", "LV"),
        label_values=LABEL_VALUES,
        filters=filters,
        dtype="float32",
        dataset="synthetic",
        labelled_set="",
        git_commit="benchmark",
    )
    model_card.write(folder, card)


def _write_volumes(folder: str, count: int, slices: int) -> list[str]:
    """`count` int16 scans of noise around a bright disc, (192, 192, slices) each."""
    rng = np.random.default_rng(0)
    affine = np.diag([RESOLUTION, RESOLUTION, SLICE_SPACING, 1.0])
    x, y = np.meshgrid(np.arange(IMAGE_SIZE), np.arange(IMAGE_SIZE), indexing="ij")
    disc = ((x - 96) ** 2 + (y - 96) ** 2 < 40**2)[..., None]
    paths = []
    for index in range(count):
        data = 200 + 400 * disc + rng.normal(0, 50, (IMAGE_SIZE, IMAGE_SIZE, slices))
        paths.append(os.path.join(folder, f"case_{index:03d}.nii.gz"))
        nib.save(nib.Nifti1Image(data.astype(np.int16), affine), paths[-1])
    return paths


_STEPS = ("read", "preprocess", "network + softmax", "map back", "labels", "write")


def _step_seconds(card, apply_fn, paths: list[str], output: str) -> dict[str, float]:
    """Median seconds of each of `_STEPS` of `predict.segment_file` + `write_outputs`."""
    rows = []
    for path in paths:
        marks = [time.perf_counter()]
        data, affine, zooms = preprocess.read_nifti(path)
        marks.append(time.perf_counter())
        image, geometry = preprocess.preprocess_image(
            data.astype(np.float32),
            affine,
            zooms,
            target_resolution=card.target_resolution,
            image_size=card.image_size,
            slice_axis=card.slice_axis,
        )
        marks.append(time.perf_counter())
        volume = preprocess.Volume(subject_id=path, image=image, label=None, geometry=geometry)
        probabilities = evaluate.predict_volume(apply_fn, volume, chunk_size=_BATCH_SIZE.value)
        marks.append(time.perf_counter())
        classes = np.argmax(preprocess.to_native(probabilities, geometry), axis=-1)
        marks.append(time.perf_counter())
        label_image = evaluate.prediction_nifti(
            classes.astype(np.uint8), nib.load(path), card.label_values
        )
        marks.append(time.perf_counter())
        predict.write_outputs(output, "steps", label_image)
        marks.append(time.perf_counter())
        rows.append(np.diff(marks))
    return dict(zip(_STEPS, np.median(rows, axis=0), strict=True))


def main(argv: list[str]) -> None:
    del argv
    filters = tuple(int(f) for f in _FILTERS.value)
    print(
        f"jax {jax.__version__} on {jax.devices()[0].platform} ({jax.devices()[0].device_kind});"
        f" {os.cpu_count()} CPUs; XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}"
    )
    with tempfile.TemporaryDirectory() as folder:
        model, inputs, output = (os.path.join(folder, name) for name in ("model", "in", "out"))
        os.makedirs(inputs)
        _export_model(model, filters)
        warmup, *paths = _write_volumes(inputs, _VOLUMES.value + 1, _SLICES.value)
        card, apply_fn = predict.load_model(model)
        shape = f"{IMAGE_SIZE}x{IMAGE_SIZE}x{_SLICES.value}"
        print(f"UNet filters {filters}, {shape} volumes, batch_size {_BATCH_SIZE.value}")

        load = _load()
        run = functools.partial(predict.predict, card, apply_fn, output_dir=output, overwrite=True)
        run = functools.partial(run, batch_size=_BATCH_SIZE.value)
        seconds = _seconds(lambda: run([warmup]))
        print(f"compile + first volume: {seconds:.2f} s  load {load:.2f}->{_load():.2f}")

        load = _load()
        seconds = _seconds(lambda: run(paths)) / len(paths)
        print(
            f"end to end: {seconds:.3f} s/volume, {1 / seconds:.2f} volumes/s over {len(paths)}"
            f" volumes  load {load:.2f}->{_load():.2f}",
            flush=True,
        )

        load = _load()
        steps = _step_seconds(card, apply_fn, paths, output)
        cells = ", ".join(f"{step} {s * 1000:.0f}" for step, s in steps.items())
        print(f"steps (ms, median): {cells}  load {load:.2f}->{_load():.2f}", flush=True)

        load = _load()
        images = np.zeros((_BATCH_SIZE.value, IMAGE_SIZE, IMAGE_SIZE, 1), np.float32)
        call = statistics.median(_seconds(lambda: apply_fn(images)) for _ in range(_REPEATS.value))
        calls = -(-_SLICES.value // _BATCH_SIZE.value)
        print(
            f"network only: {call:.3f} s per call of {_BATCH_SIZE.value} slices,"
            f" {calls * call:.3f} s/volume ({calls} call(s))  load {load:.2f}->{_load():.2f}"
        )


if __name__ == "__main__":
    app.run(main)
