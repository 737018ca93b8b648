"""Self-training: pseudo-labels are the best model's argmax, batches mix them with labels."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import synthetic
from jaxcl import config_validation
from jaxcl.data import pipeline, slice_store
from jaxcl.methods import parts, self_training
from jaxcl.models.unet import UNet
from jaxcl.train import steps


class _Volume:
    def __init__(self, index, rng, labelled, image=None):
        self.subject_id = f"{index:03d}"
        self.image = rng.uniform(0, 1, (4, 32, 32)).astype(np.float32) if image is None else image
        self.label = rng.integers(0, 3, self.image.shape).astype(np.uint8) if labelled else None


def _brighter_than_half(calls):
    def predict(x):  # class 1 where brighter than 0.5: an independent, known "network"
        calls.append(x.shape)
        return (x[..., 0] > 0.5).astype(np.int32)

    return predict


def test_pseudo_labels_are_the_prediction_of_every_slice_across_chunks(tmp_path):
    images = np.random.default_rng(0).uniform(0, 1, (7, 4, 4)).astype(np.float32)
    volume = _Volume(0, None, False, image=images)
    pool = pipeline.build_slice_pool([volume], num_partitions=1)
    calls = []
    labelled = self_training.with_pseudo_labels(pool, _brighter_than_half(calls), chunk_size=3)
    np.testing.assert_array_equal(labelled.labels, (images > 0.5).astype(np.uint8))
    assert labelled.labels.dtype == np.uint8
    assert calls == [(3, 4, 4, 1), (3, 4, 4, 1), (1, 4, 4, 1)]
    slice_store.build(tmp_path, [lambda: iter([volume])], [volume.subject_id], image_size=4)
    store = slice_store.open_store(tmp_path, num_partitions=1)
    stored = self_training.with_pseudo_labels(store, _brighter_than_half([]), chunk_size=3)
    assert isinstance(stored.labels, slice_store.LabelFile)  # a pool on disk: labels on disk
    rows = np.array([6, 0, 3, 3])
    np.testing.assert_array_equal(stored.take_labels(rows), labelled.labels[rows])


@pytest.mark.parametrize(
    "batch, fraction, groups, expected",
    [(20, 0.5, 1, (10, 10)), (20, 0.3, 2, (14, 6)), (8, 0.5, 4, (4, 4))],
)
def test_batch_split_gives_whole_slices_per_device(batch, fraction, groups, expected):
    assert self_training.batch_split(batch, fraction, groups) == expected


@pytest.mark.parametrize("fraction", [0.0, 1.0, 0.2])
def test_batch_split_refuses_an_empty_part(fraction):
    with pytest.raises(ValueError, match="pseudo_label_fraction"):
        self_training.batch_split(8, fraction, 4)


def test_a_later_round_trains_on_labelled_and_pseudo_labelled_slices():
    config = synthetic.get_config("quick")
    config.data.image_size = 32
    config.finetune.batch_size = 8
    config.finetune.pseudo_label_fraction = 0.25
    rng = np.random.default_rng(0)
    labelled = pipeline.build_slice_pool([_Volume(0, rng, True)], require_labels=True)
    unlabelled = pipeline.build_slice_pool([_Volume(i, rng, False) for i in (1, 2)])
    model = UNet(num_classes=3, **parts.model_options(config))
    state = steps.create_train_state(
        model, jax.random.key(0), jnp.zeros((1, 32, 32, 1)), optax.adam(1e-3)
    )
    inputs = parts.FineTuneInputs(
        config=config,
        model=model,
        num_classes=3,
        state=state,
        key=jax.random.key(1),
        labelled=labelled,
        unlabelled=lambda: unlabelled,
        local_device_count=2,
        round_index=1,
    )
    built = self_training.build(inputs)
    batch = built.batches[0]
    assert batch["image"].shape == (2, 4, 32, 32, 1)  # per device: 3 labelled, 1 pseudo-labelled
    labelled_rows, pseudo_rows = batch["image"][:, :3], batch["image"][:, 3:]
    assert all(
        any(np.array_equal(r, s[..., None]) for s in labelled.images)
        for r in labelled_rows.reshape(-1, 32, 32, 1)
    )
    np.testing.assert_array_equal(
        batch["label"][:, :3].reshape(-1, 32, 32),
        [
            labelled.labels[
                np.flatnonzero([np.array_equal(r[..., 0], s) for s in labelled.images])[0]
            ]
            for r in labelled_rows.reshape(-1, 32, 32, 1)
        ],
    )
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    expected = np.argmax(
        model.apply(variables, pseudo_rows.reshape(-1, 32, 32, 1), train=False), -1
    )
    np.testing.assert_array_equal(batch["label"][:, 3:].reshape(-1, 32, 32), expected)
    round_zero = self_training.build(parts.FineTuneInputs(**{**vars(inputs), "round_index": 0}))
    assert round_zero.batches[0]["image"].shape == (2, 4, 32, 32, 1)
    assert not hasattr(round_zero.batches, "sources")  # labelled slices only
    assert self_training.rounds(config) == 1 + config.finetune.self_training_rounds


def _problems(config, num_devices=1):
    try:
        config_validation.validate(config, num_devices=num_devices)
    except config_validation.ConfigError as error:
        return "\n".join(error.problems)
    return ""


def test_bad_settings_are_reported_before_any_work():
    config = synthetic.get_config("quick")
    config.stages = ("finetune", "evaluate")
    config.finetune.method = "self-training"
    assert _problems(config) == ""
    config.finetune.self_training_rounds = 0
    config.finetune.pseudo_label_fraction = 0.5
    config.finetune.batch_size = 8
    problems = _problems(config, num_devices=8)  # one slice per device: no room for both kinds
    assert "config.finetune.self_training_rounds=0: self-training needs at least one" in problems
    assert "config.finetune.pseudo_label_fraction=0.5 leaves 0 of config.finetune.batch_size=8" in (
        problems
    )
