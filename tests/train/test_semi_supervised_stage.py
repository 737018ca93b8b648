"""Semi-supervised fine-tunings as stages: rounds in their own folders, and exact resumption."""

import shutil

import jax
import numpy as np
import pytest

from configs import folder
from jaxcl.data import synthetic_msd
from jaxcl.data.context import DataContext
from jaxcl.train import checkpoint, trainer


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    base = tmp_path_factory.mktemp("semi_supervised")
    synthetic_msd.write_msd_folder(str(base / "Task"), num_labelled=6, num_unlabelled=3)
    config = folder.get_config("quick")
    config.data.root = str(base / "Task")
    config.data.data_dir = str(base / "tfds")
    config.stages = ("finetune",)
    config.finetune.self_training_rounds = 1
    config.finetune.batch_size = 16  # 8 test devices: a labelled and a pseudo-labelled slice each
    return DataContext(config)


def _config(data, method):
    config = data.config.copy_and_resolve_references()
    config.finetune.method = method
    return config


def _leaves(export) -> list[np.ndarray]:
    variables = checkpoint.load_variables(export)
    return [np.asarray(x) for x in jax.tree.leaves(variables)]


@pytest.mark.parametrize(
    "method, interrupted",
    [("self-training", "finetune/round1/checkpoints/6"), ("adversarial", "finetune/checkpoints/6")],
)
def test_a_killed_run_resumes_to_the_same_model(data, tmp_path, method, interrupted):
    config = _config(data, method)
    summary = trainer.finetune(config, str(tmp_path / "full"), data)
    assert summary["method"] == method
    if method == "self-training":
        assert (tmp_path / "full" / "finetune" / "round1" / "best").is_dir()
    # A run killed after its step-3 checkpoint of the last round: its later files never written.
    shutil.copytree(tmp_path / "full", tmp_path / "killed")
    shutil.rmtree(tmp_path / "killed" / interrupted)
    shutil.rmtree(tmp_path / "killed" / "finetune" / "export")
    trainer.finetune(config, str(tmp_path / "killed"), data)
    for resumed, uninterrupted in zip(
        _leaves(tmp_path / "killed" / "finetune" / "export"),
        _leaves(tmp_path / "full" / "finetune" / "export"),
        strict=True,
    ):
        np.testing.assert_array_equal(resumed, uninterrupted)


def test_without_unlabelled_volumes_the_error_says_what_to_add(data, tmp_path):
    config = _config(data, "adversarial")
    config.data.splits.pretrain = ",".join(
        data.splits.get("val") + data.splits.get(config.data.labelled_set, "c1")
    )
    with pytest.raises(Exception, match="needs unlabelled volumes"):
        trainer.finetune(config, str(tmp_path), DataContext(config))
