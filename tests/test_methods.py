"""The method registry: one name per method, its notation, and every builder's stage runs."""

import jax
import numpy as np
import optax
import pytest

from configs import base, synthetic
from jaxcl import methods
from jaxcl.data import pipeline
from jaxcl.methods import parts
from jaxcl.models.unet import UNet
from jaxcl.train import recipes, steps
from jaxcl.train.parallel import DataParallel


def test_names_per_stage_in_the_papers_order():
    paper = ("GR", "GD-", "GD", "BYOL", "BYOL-D")
    assert methods.names(methods.GLOBAL_STAGE)[: len(paper)] == paper
    assert methods.names(methods.LOCAL_STAGE) == ("LR", "LD")
    with pytest.raises(ValueError, match=r"strategy='LR' is not one of \('GR'"):
        methods.get("LR", methods.GLOBAL_STAGE)


@pytest.mark.parametrize(
    "name, text, math",
    [
        ("random", "random", "random"),
        ("GD-", "G^{D-}", "$G^{D-}$"),
        ("BYOL-D", "BYOL-D", "BYOL-D"),
        ("GR+LD", "G^R + L^D", "$G^{R}$ + $L^{D}$"),
    ],
)
def test_labels_use_the_papers_notation(name, text, math):
    assert methods.label(name) == text
    assert methods.label(name, math=True) == math


def test_a_small_pool_caps_the_papers_volumes():
    config = base.get_config()
    section = config.pretrain_global  # G^D: 6 volumes
    assert methods.batch_recipe(section, methods.GLOBAL_STAGE, pool_volumes=4).num_units == 4
    assert methods.batch_recipe(section, methods.GLOBAL_STAGE, pool_volumes=40).num_units == 6
    section.num_volumes = 6  # a set value is kept (config validation reports it against the pool)
    assert methods.batch_recipe(section, methods.GLOBAL_STAGE, pool_volumes=4).num_units == 6
    config.pretrain_global.strategy = "BYOL-D"  # pairs: at most 4 // 2
    config.pretrain_global.num_volumes = None
    assert methods.batch_recipe(section, methods.GLOBAL_STAGE, pool_volumes=4).num_units == 2


class _Volume:
    def __init__(self, index, rng):
        self.subject_id = f"{index:03d}"
        self.image = rng.uniform(0, 1, (8, 64, 64)).astype(np.float32)
        self.label = None


@pytest.fixture(scope="module")
def quick_config():
    return synthetic.get_config("quick")


@pytest.mark.parametrize("name", list(methods.METHODS))
def test_every_method_builds_a_stage_whose_step_runs(name, quick_config):
    """Build, then run: the parts of each method take one finite step on a random pool."""
    method = methods.METHODS[name]
    config = quick_config.copy_and_resolve_references()
    config[method.stage].strategy = name
    rng = np.random.default_rng(0)
    pool = pipeline.build_slice_pool(
        [_Volume(i, rng) for i in range(8)], num_partitions=config.data.n_partitions
    )
    parallel = DataParallel("pmap", devices=jax.devices()[:1])
    recipe = methods.batch_recipe(config[method.stage], method.stage, pool_volumes=8)
    parts = methods.build(config, method.stage, recipe=recipe, num_devices=1, key=jax.random.key(0))
    assert parts.loads == ((("encoder",),) if method.stage == methods.LOCAL_STAGE else ())
    batches = recipes.make_batches(pool, recipe, seed=0, local_device_count=1)
    batch = parallel.put_batch(next(iter(batches.iterate(0))))
    state, metrics = parallel.map_step(parts.step)(
        parallel.put_state(parts.state), batch, jax.random.key(1)
    )
    assert np.isfinite(float(np.asarray(metrics["loss"]).reshape(-1)[0]))
    exported = parts.export(parallel.get_state(state))
    assert set(exported.params) >= {"encoder"}


class _LabelledVolume(_Volume):
    def __init__(self, index, rng):
        super().__init__(index, rng)
        self.label = rng.integers(0, 4, self.image.shape).astype(np.uint8)


@pytest.mark.parametrize("name", list(methods.FINE_TUNINGS))
def test_every_fine_tuning_builds_rounds_whose_step_runs(name, quick_config):
    """Build, then run: every round of each fine-tuning takes one finite step."""
    config = quick_config.copy_and_resolve_references()
    config.finetune.method = name
    config.finetune.self_training_rounds = 1
    rng = np.random.default_rng(0)
    labelled = pipeline.build_slice_pool(
        [_LabelledVolume(i, rng) for i in range(2)], num_partitions=4, require_labels=True
    )
    unlabelled = pipeline.build_slice_pool([_Volume(i, rng) for i in range(2, 6)])
    parallel = DataParallel("pmap", devices=jax.devices()[:1])
    model = UNet(num_classes=4, **parts.model_options(config))
    state = steps.create_train_state(
        model, jax.random.key(0), parts.example_input(config), optax.adam(1e-3)
    )
    fine_tuning = methods.fine_tuning(name)
    initial, kept = state, []
    for round_index in range(fine_tuning.rounds(config)):
        built = fine_tuning.build(
            parts.FineTuneInputs(
                config=config,
                model=model,
                num_classes=4,
                state=state,
                key=jax.random.key(1),
                labelled=labelled,
                unlabelled=lambda: unlabelled,
                local_device_count=1,
                round_index=round_index,
                initial=initial,
                earlier=tuple(kept),
            )
        )
        batch = parallel.put_batch(next(iter(built.batches.iterate(0))))
        new_state, metrics = parallel.map_step(built.step)(
            parallel.put_state(built.state), batch, jax.random.key(1)
        )
        assert np.isfinite(float(np.asarray(metrics["loss"]).reshape(-1)[0]))
        kept.append(parallel.get_state(new_state))
        state = built.segmenter(kept[-1])
        assert set(state.params) == {"encoder", "decoder", "segmentation_head"}
