"""The pre-training stage reads its pool from memory or, above config.data.pretrain_memory_gb,
from a slice store, and trains to the same loss either way."""

import itertools
import os

import numpy as np
import pytest

from configs import folder
from jaxcl.data import pipeline, streaming, synthetic_msd
from jaxcl.data.context import DataContext
from jaxcl.train import trainer
from jaxcl.train.parallel import DataParallel

STAGE = "pretrain_global"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    base = tmp_path_factory.mktemp("pretraining_input")
    synthetic_msd.write_msd_folder(str(base / "Task"), num_labelled=8, num_unlabelled=2)
    config = folder.get_config("quick")
    config.data.root = str(base / "Task")
    config.data.data_dir = str(base / "tfds")
    config.stages = (STAGE,)
    config.pretrain_global.num_volumes = 8  # G^D: one volume per test device
    config.pretrain_global.steps = 3
    return DataContext(config)


def _config(data, memory_gb):
    config = data.config.copy_and_resolve_references()
    config.data.pretrain_memory_gb = memory_gb
    return config


def test_the_memory_budget_picks_the_path_and_the_batches_stay_the_same(data):
    parallel = DataParallel(data.config.parallel.mode)
    _, in_memory = trainer._pretraining_batches(_config(data, 4.0), data, STAGE, parallel)
    _, streamed = trainer._pretraining_batches(_config(data, 0.0), data, STAGE, parallel)
    assert isinstance(in_memory.pool, pipeline.SlicePool)
    assert isinstance(streamed, streaming.StreamedBatches)
    stores = os.path.join(data.data_dir, "jaxcl_slices")
    assert len(os.listdir(stores)) == 1  # one prepared variant, one pool
    for a, b in zip(
        itertools.islice(in_memory.iterate(start_step=2), 3),
        itertools.islice(streamed.iterate(start_step=2), 3),
        strict=True,
    ):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_a_pre_training_from_the_store_ends_with_the_in_memory_loss(data, tmp_path):
    summaries = [
        trainer._pretrain(_config(data, memory_gb), str(tmp_path / name), data, STAGE)
        for name, memory_gb in (("memory", 4.0), ("store", 0.0))
    ]
    untimed = [{k: v for k, v in s.items() if k != "images_per_s"} for s in summaries]
    assert "loss" in untimed[0]
    assert untimed[0] == untimed[1]


def _labelled_and_validation(config, data):
    labelled_set, combination = config.data.labelled_set, config.data.combination
    labelled = data.splits.get(labelled_set, combination)
    return labelled + data.splits.get("val", f"{labelled_set}-{combination}")


def test_unlabelled_pool_of_semi_supervised_fine_tuning_follows_the_same_budget(data):
    exclude = _labelled_and_validation(data.config, data)
    in_memory = trainer._unlabelled_pool(_config(data, 4.0), data, exclude)
    stored = trainer._unlabelled_pool(_config(data, 0.0), data, exclude)
    assert isinstance(in_memory, pipeline.SlicePool)
    assert not isinstance(stored, pipeline.SlicePool)
    assert stored.subject_ids == in_memory.subject_ids
    assert not set(stored.subject_ids) & set(exclude)

    def unlabelled_batches(pool):  # as supervised.with_unlabelled_images draws them
        batches = pipeline.random_slice_batches(pool, num_slices=4, num_views=1, seed=3, stream=1)
        return list(itertools.islice(batches.iterate(start_step=5), 2))

    for a, b in zip(unlabelled_batches(in_memory), unlabelled_batches(stored), strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])


def test_self_training_on_an_unlabelled_pool_over_the_budget_ends_as_in_memory(data, tmp_path):
    summaries = []
    for name, memory_gb in (("memory", 4.0), ("store", 0.0)):
        config = _config(data, memory_gb)
        config.stages = ("finetune",)
        config.finetune.method = "self-training"
        config.finetune.self_training_rounds = 1
        config.finetune.steps = 2
        config.finetune.eval_every = 2
        config.finetune.batch_size = 16  # labelled and pseudo-labelled slices on 8 devices
        summaries.append(trainer.finetune(config, str(tmp_path / name), data))
    untimed = [{k: v for k, v in s.items() if "per_s" not in k} for s in summaries]
    assert "val_dice" in str(untimed[0])
    assert untimed[0] == untimed[1]
