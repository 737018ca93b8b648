"""Task-driven augmentation as a stage: its four rounds, its figure, and exact resumption."""

import shutil

import jax
import matplotlib.image
import numpy as np
import pytest

from configs import folder
from jaxcl.data import synthetic_msd
from jaxcl.data.context import DataContext
from jaxcl.methods import task_augmentation
from jaxcl.train import checkpoint, trainer


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    base = tmp_path_factory.mktemp("task_augmentation")
    synthetic_msd.write_msd_folder(str(base / "Task"), num_labelled=6, num_unlabelled=3)
    config = folder.get_config("quick")  # 6 steps: rounds of 1, 5, 5 and 6 steps
    config.data.root = str(base / "Task")
    config.data.data_dir = str(base / "tfds")
    config.stages = ("finetune",)
    config.finetune.method = "task-aug"
    return DataContext(config)


def _leaves(export) -> list[np.ndarray]:
    variables = checkpoint.load_variables(export)
    return [np.asarray(x) for x in jax.tree.leaves(variables)]


def test_a_run_killed_in_a_gan_round_resumes_to_the_same_model(data, tmp_path):
    config = data.config.copy_and_resolve_references()
    full = tmp_path / "full"
    summary = trainer.finetune(config, str(full), data)
    assert summary["method"] == "task-aug"
    stage = full / "finetune"
    for name, steps in zip(("", "round1", "round2", "round3"), (1, 5, 5, 6), strict=True):
        assert (stage / name / "checkpoints" / str(steps)).is_dir(), name
        assert (stage / name / "best").is_dir(), name
    png = matplotlib.image.imread(stage / "figures" / task_augmentation.FIGURE)
    assert png.ndim == 3 and png.shape[0] > png.shape[1]  # 4 slices x 2 rows, 4 views
    # Killed after the step-3 checkpoint of the intensity GAN: its later files never written.
    killed = tmp_path / "killed"
    shutil.copytree(full, killed)
    for path in ("round2/checkpoints/5", "round3", "export", "figures"):
        shutil.rmtree(killed / "finetune" / path)
    trainer.finetune(config, str(killed), data)
    for resumed, uninterrupted in zip(
        _leaves(killed / "finetune" / "export"), _leaves(stage / "export"), strict=True
    ):
        np.testing.assert_array_equal(resumed, uninterrupted)
    assert (killed / "finetune" / "figures" / task_augmentation.FIGURE).is_file()
