"""`python -m jaxcl.predict`: outputs on the input's grid, bad inputs skipped, folders, the CLI.

One tiny random UNet is exported with a model card into a workdir per module and loaded once
(one compile); the inputs are small NIfTI volumes with a rotated, shifted affine.
"""

import functools
import gzip
import os
import pathlib
import subprocess
import sys

import jax
import nibabel as nib
import numpy as np
import pytest

from jaxcl import model_card, predict
from jaxcl.models.unet import UNet
from jaxcl.train import checkpoint

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
LABEL_VALUES = (0, 205, 420)  # 420 > 255: the label files must be written as uint16
SHAPE = (30, 26, 5)
SPACING = (1.5, 1.25, 4.0)
BATCH_SIZE = 4
CARD = model_card.ModelCard(
    target_resolution=1.0,
    image_size=64,
    slice_axis="axial",
    n4=False,
    channel=None,
    num_channels=1,
    class_names=("background", "myo", "la"),
    label_values=LABEL_VALUES,
    filters=(8, 8, 16, 16, 16, 16),
    dtype="float32",
    dataset="folder",
    labelled_set="tr1-c1",
    git_commit="test",
)
# The same weights described as trained on channel 1 of two-channel (e.g. T2, ADC) images.
TWO_CHANNEL_CARD = model_card.ModelCard(**{**vars(CARD), "channel": 1, "num_channels": 2})


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("workdir")
    export = workdir / "finetune" / "export"
    network = UNet(num_classes=len(LABEL_VALUES), filters=CARD.filters)
    init = jax.jit(functools.partial(network.init, train=False))
    variables = init(jax.random.key(0, impl="rbg"), np.zeros((1, 64, 64, 1), np.float32))
    checkpoint.export_variables(export, variables)
    model_card.write(export, CARD)
    return workdir


@pytest.fixture(scope="module")
def apply_fn(workdir):
    card, apply_fn = predict.load_model(workdir)  # a workdir: its finetune/export
    assert card == CARD
    return apply_fn


def _affine(spacing=SPACING):
    """An in-plane rotation by 90 degrees and a shift, so that the affine is not diagonal."""
    affine = np.eye(4)
    affine[:3, :3] = np.array([[0, -1, 0], [1, 0, 0], [0, 0, 1.0]]) @ np.diag(spacing)
    affine[:3, 3] = (12.5, -40.0, 7.0)
    return affine


def _image(seed=0, shape=SHAPE):
    """A bright ellipse on a noisy background."""
    rng = np.random.default_rng(seed)
    x, y = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    disc = ((x - shape[0] / 2) / 8) ** 2 + ((y - shape[1] / 2) / 6) ** 2 < 1
    return (100 + 300 * disc[..., None] + rng.normal(0, 30, shape)).astype(np.float32)


def _write(path, data, affine=None):
    nifti = nib.Nifti1Image(data, _affine() if affine is None else affine)
    nifti.header["descrip"] = b"test scan"
    nib.save(nifti, str(path))
    return str(path)


def _run(apply_fn, inputs, output, card=CARD, **options):
    return predict.predict(card, apply_fn, inputs, output, batch_size=BATCH_SIZE, **options)


def _labels(path):
    return np.asanyarray(nib.load(str(path)).dataobj)


def test_output_is_on_the_input_grid_with_raw_label_values(apply_fn, tmp_path):
    scan = _write(tmp_path / "scan.nii.gz", _image())
    summary = _run(apply_fn, [scan], tmp_path / "out")
    assert summary == predict.Summary(("scan",), ())
    output = nib.load(str(tmp_path / "out" / "scan.nii.gz"))
    assert output.shape == SHAPE
    np.testing.assert_allclose(output.affine, _affine())
    assert output.header["descrip"] == b"test scan"
    assert output.get_data_dtype() == np.uint16
    labels = np.asanyarray(output.dataobj)
    assert set(np.unique(labels)) <= set(LABEL_VALUES)
    assert len(np.unique(labels)) > 1, "a constant prediction would not test the mapping"


def test_save_probabilities_writes_nnunet_layout_matching_the_labels(apply_fn, tmp_path):
    scan = _write(tmp_path / "scan.nii", _image())
    _run(apply_fn, [scan], tmp_path / "out", save_probabilities=True)
    probabilities = np.load(tmp_path / "out" / "scan.npz")["probabilities"]
    assert probabilities.shape == (len(LABEL_VALUES), *SHAPE[::-1])
    assert probabilities.dtype == np.float32
    np.testing.assert_allclose(probabilities.sum(axis=0), 1.0, atol=1e-5)
    classes = np.argmax(probabilities.transpose(3, 2, 1, 0), axis=-1)
    np.testing.assert_array_equal(
        _labels(tmp_path / "out" / "scan.nii.gz"), np.array(LABEL_VALUES)[classes]
    )


def test_permuted_and_flipped_scan_gives_the_permuted_and_flipped_prediction(apply_fn, tmp_path):
    data = _image()
    # Voxel (a, b, c) of the copy is voxel (c, n - 1 - a, b) of the original, n = SHAPE[1]; its
    # affine maps it to the same world point, so canonical reorientation sees the same image.
    copy = np.flip(np.transpose(data, (1, 2, 0)), axis=0)
    index_to_original = np.array(
        [[0, 0, 1, 0], [-1, 0, 0, SHAPE[1] - 1], [0, 1, 0, 0], [0, 0, 0, 1.0]]
    )
    scans = [
        _write(tmp_path / "scan.nii.gz", data),
        _write(tmp_path / "copy.nii.gz", copy, _affine() @ index_to_original),
    ]
    assert _run(apply_fn, scans, tmp_path / "out").failures == ()
    expected = np.flip(np.transpose(_labels(tmp_path / "out" / "scan.nii.gz"), (1, 2, 0)), 0)
    np.testing.assert_array_equal(_labels(tmp_path / "out" / "copy.nii.gz"), expected)


def _assert_skipped(summary, bad_path, *words):
    """The good scan was segmented; the one failure names `bad_path` and contains `words`."""
    assert summary.segmented == ("good",)
    assert len(summary.failures) == 1
    assert str(bad_path) in summary.failures[0]
    assert "\n" not in summary.failures[0]
    for word in words:
        assert word in summary.failures[0]


def _with_good(tmp_path, *bad):
    return [_write(tmp_path / "good.nii.gz", _image()), *map(str, bad)]


def test_not_nifti_is_skipped(apply_fn, tmp_path):
    bad = tmp_path / "scan.dcm"
    bad.write_bytes(b"DICM")
    _assert_skipped(_run(apply_fn, _with_good(tmp_path, bad), tmp_path / "out"), bad, "NIfTI")


def test_truncated_nifti_is_skipped(apply_fn, tmp_path):
    bad = tmp_path / "truncated.nii.gz"
    full = gzip.compress(nib.Nifti1Image(_image(), _affine()).to_bytes())
    bad.write_bytes(full[: len(full) // 2])
    summary = _run(apply_fn, _with_good(tmp_path, bad), tmp_path / "out")
    _assert_skipped(summary, bad)
    assert not (tmp_path / "out" / "truncated.nii.gz").exists()


def test_2d_image_is_skipped(apply_fn, tmp_path):
    bad = _write(tmp_path / "flat.nii.gz", _image()[..., 0])
    _assert_skipped(_run(apply_fn, _with_good(tmp_path, bad), tmp_path / "out"), bad)


def test_multichannel_scan_needs_a_channel_for_a_single_channel_model(apply_fn, tmp_path):
    two = np.stack([_image(1), _image(2)], axis=-1)
    bad = _write(tmp_path / "two.nii.gz", two)
    summary = _run(apply_fn, _with_good(tmp_path, bad), tmp_path / "out")
    _assert_skipped(summary, bad, "--channel")
    # With --channel=1 it is the segmentation of that channel alone.
    single = _write(tmp_path / "single.nii.gz", two[..., 1])
    summary = _run(apply_fn, [bad, single], tmp_path / "chosen", channel=1)
    assert summary.segmented == ("two", "single")
    np.testing.assert_array_equal(
        _labels(tmp_path / "chosen" / "two.nii.gz"), _labels(tmp_path / "chosen" / "single.nii.gz")
    )


def test_other_channel_count_than_the_model_is_skipped(apply_fn, tmp_path):
    bad = _write(tmp_path / "three.nii.gz", np.stack([_image(i) for i in range(3)], axis=-1))
    summary = _run(apply_fn, _with_good(tmp_path, bad), tmp_path / "out", card=TWO_CHANNEL_CARD)
    _assert_skipped(summary, bad, "2-channel", "--channel")


def test_two_channel_model_uses_its_channel(apply_fn, tmp_path):
    two = np.stack([_image(1), _image(2)], axis=-1)
    scans = [_write(tmp_path / "two.nii.gz", two), _write(tmp_path / "one.nii.gz", two[..., 1])]
    assert _run(apply_fn, scans, tmp_path / "out", card=TWO_CHANNEL_CARD).failures == ()
    np.testing.assert_array_equal(
        _labels(tmp_path / "out" / "two.nii.gz"), _labels(tmp_path / "out" / "one.nii.gz")
    )


def test_channel_out_of_range_is_skipped(apply_fn, tmp_path):
    bad = _write(tmp_path / "two.nii.gz", np.stack([_image(1), _image(2)], axis=-1))
    summary = _run(apply_fn, _with_good(tmp_path, bad), tmp_path / "out", channel=5)
    _assert_skipped(summary, bad, "--channel=0 to 1")


def test_missing_input_is_skipped(apply_fn, tmp_path):
    bad = tmp_path / "nowhere.nii.gz"
    summary = _run(apply_fn, _with_good(tmp_path, bad), tmp_path / "out")
    _assert_skipped(summary, bad, "does not exist")


def test_folder_without_nifti_files_is_skipped(apply_fn, tmp_path):
    bad = tmp_path / "empty"
    bad.mkdir()
    (bad / "notes.txt").write_text("no scans here")
    (bad / "._scan.nii.gz").write_bytes(b"macOS resource fork")
    summary = _run(apply_fn, _with_good(tmp_path, bad), tmp_path / "out")
    _assert_skipped(summary, bad, "no NIfTI")


def test_existing_output_is_kept_unless_overwrite(apply_fn, tmp_path):
    scans = [_write(tmp_path / "scan.nii.gz", _image(1))]
    output = tmp_path / "out" / "scan.nii.gz"
    output.parent.mkdir()
    output.write_bytes(b"older result")
    summary = _run(apply_fn, scans, tmp_path / "out")
    assert summary.segmented == ()
    assert summary.failures == (f"{output} exists; pass --overwrite to replace it.",)
    assert output.read_bytes() == b"older result"
    assert _run(apply_fn, scans, tmp_path / "out", overwrite=True).segmented == ("scan",)
    assert _labels(output).shape == SHAPE
    assert sorted(os.listdir(tmp_path / "out")) == ["scan.nii.gz"]  # no temporary file left


def test_nnunet_folder_is_grouped_by_case_and_plain_folders_are_not(apply_fn, tmp_path):
    nnunet = tmp_path / "imagesTs"
    nnunet.mkdir()
    for case in ("la_003", "la_007"):
        for channel in (0, 1):
            _write(nnunet / f"{case}_{channel:04d}.nii.gz", _image(channel))
    (nnunet / "._la_003_0000.nii.gz").write_bytes(b"macOS resource fork")
    plain = tmp_path / "plain"
    plain.mkdir()
    _write(plain / "scan_0001.nii", _image(1))  # no _0000 file: not nnU-Net form
    _write(plain / "other.nii.gz", _image(0))
    summary = _run(apply_fn, [str(nnunet), str(plain)], tmp_path / "out", card=TWO_CHANNEL_CARD)
    assert summary == predict.Summary(("la_003", "la_007", "other", "scan_0001"), ())
    # The model's channel 1 was used: la_003 is segmented like scan_0001 (the same image).
    np.testing.assert_array_equal(
        _labels(tmp_path / "out" / "la_003.nii.gz"), _labels(tmp_path / "out" / "scan_0001.nii.gz")
    )


def test_nnunet_folder_without_the_channel_file_is_reported(apply_fn, tmp_path):
    _write(tmp_path / "la_003_0000.nii.gz", _image())
    summary = _run(apply_fn, [str(tmp_path)], tmp_path / "out", card=TWO_CHANNEL_CARD)
    assert summary.segmented == ()
    (failure,) = summary.failures
    assert f"{tmp_path / 'la_003'}_0001.nii.gz is missing" in failure


def test_load_model_rejects_a_folder_without_a_model(tmp_path):
    with pytest.raises(model_card.ModelCardError, match=str(tmp_path)):
        predict.load_model(tmp_path)


def test_command_line(workdir, tmp_path):
    scan = _write(tmp_path / "scan.nii.gz", _image())
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device
    env["JAX_COMPILATION_CACHE_DIR"] = str(tmp_path / "xla_cache")

    def run(*flags):
        command = [sys.executable, "-m", "jaxcl.predict", f"--output={tmp_path / 'out'}", *flags]
        return subprocess.run(
            command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300
        )

    export = workdir / "finetune" / "export"
    done = run(f"--model={export}", f"--input={scan}", f"--input={tmp_path / 'nowhere'}")
    assert done.returncode == 1, done.stderr
    assert done.stdout.splitlines()[0] == "1 segmented, 1 failed."
    assert f"{tmp_path / 'nowhere'} does not exist" in done.stdout
    assert _labels(tmp_path / "out" / "scan.nii.gz").shape == SHAPE

    bad_model = run(f"--model={tmp_path}", f"--input={scan}")
    assert bad_model.returncode == 1
    assert bad_model.stdout == ""
    last_line = bad_model.stderr.strip().splitlines()[-1]
    assert last_line.startswith(f"jaxcl: {tmp_path} is not a jaxcl model")
