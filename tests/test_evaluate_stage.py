"""The evaluate stage on any export and any labelled set: what it refuses, in one line."""

import dataclasses

import jax
import jax.numpy as jnp
import pytest

from configs import folder
from jaxcl import model_card
from jaxcl.data import synthetic_msd
from jaxcl.data.context import DataContext
from jaxcl.data.sources import DataError
from jaxcl.models.unet import UNet
from jaxcl.train import checkpoint, trainer

FILTERS = (8, 8, 16, 16, 16, 16)
CARD = model_card.ModelCard(
    target_resolution=3.0,
    image_size=64,
    slice_axis="auto",
    n4=False,
    channel=None,
    num_channels=1,
    class_names=("background", "RV", "Myo", "LV"),
    label_values=(0, 1, 2, 3),
    filters=FILTERS,
    dtype="float32",
    dataset="folder",
    labelled_set="tr1-c1",
    git_commit="test",
)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    base = tmp_path_factory.mktemp("evaluate_stage")
    synthetic_msd.write_msd_folder(str(base / "Task"), num_labelled=3)
    config = folder.get_config("quick")
    config.data.root = str(base / "Task")
    config.data.data_dir = str(base / "tfds")
    config.stages = ("evaluate",)
    return DataContext(config)


def _export(path, card):
    network = UNet(num_classes=card.num_classes, filters=FILTERS)
    variables = network.init(jax.random.key(0), jnp.zeros((1, 64, 64, 1)), train=False)
    checkpoint.export_variables(path / "finetune" / "export", variables)
    model_card.write(path / "finetune" / "export", card)
    return path


def _evaluate(data, tmp_path, model, split="test"):
    config = data.config.copy_and_resolve_references()
    config.evaluate.model_from = str(model)
    config.evaluate.split = split
    return trainer.run_evaluation(config, str(tmp_path / "workdir"), data)


def test_a_model_of_other_classes_is_refused(data, tmp_path):
    card = dataclasses.replace(CARD, class_names=("background", "organ"), label_values=(0, 1))
    model = _export(tmp_path / "two_classes", card)
    with pytest.raises(DataError, match=r"segments 2 classes .* labels 4"):
        _evaluate(data, tmp_path, model)


def test_an_unknown_split_lists_the_valid_ones(data, tmp_path):
    model = _export(tmp_path / "model", CARD)
    with pytest.raises(DataError, match=r"split='tr9-c1'.*test, val, labelled or a labelled set"):
        _evaluate(data, tmp_path, model, split="tr9-c1")


def test_a_folder_without_a_model_is_refused(data, tmp_path):
    with pytest.raises(model_card.ModelCardError, match="is not a jaxcl model"):
        _evaluate(data, tmp_path, tmp_path)


def test_any_labelled_set_can_be_scored(data, tmp_path):
    model = _export(tmp_path / "model", CARD)
    summary = _evaluate(data, tmp_path, model, split="labelled")
    assert 0.0 <= summary["mean_dice"] <= 1.0
