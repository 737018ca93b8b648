"""Batch recipes: each method's paper batch (docs/METHOD.md §7), config overrides, bad input."""

import importlib
import pathlib

import ml_collections
import pytest

from jaxcl import methods
from jaxcl.train import recipes

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
PARTITIONS = 4  # S, docs/METHOD.md §2


def _stage(strategy: str, **overrides) -> ml_collections.ConfigDict:
    """A stage section as in configs/base.py: batch keys None unless overridden."""
    stage = ml_collections.ConfigDict()
    stage.strategy = strategy
    for key in ("num_slices", "num_volumes", "num_views"):
        stage[key] = ml_collections.config_dict.placeholder(int)
    stage.update(overrides)
    return stage


# strategy, stage, expected (kind, units, views), images per batch; numbers from docs/METHOD.md §7:
# G^R 24 slices x 2 views = 48; G^{D-} 3 volumes x 4 partitions x 3 views = 36;
# G^D 6 volumes x 4 partitions x 2 views = 48; L^R 10 slices x 2 views = 20;
# L^D 3 volumes x 4 partitions x 2 views = 24; BYOL: view pairs of random slices as G^R (48);
# BYOL-D: pairs of volumes, the 2 slices of a pair from one partition (3 pairs x 4 x 2 = 24).
PAPER = [
    ("GR", "pretrain_global", ("random", 24, 2), 48),
    ("GD-", "pretrain_global", ("structured", 3, 3), 36),
    ("GD", "pretrain_global", ("structured", 6, 2), 48),
    ("BYOL", "pretrain_global", ("random", 24, 2), 48),
    ("BYOL-D", "pretrain_global", ("paired", 3, 2), 24),
    ("LR", "pretrain_local", ("random", 10, 2), 20),
    ("LD", "pretrain_local", ("structured", 3, 2), 24),
]


@pytest.mark.parametrize("strategy, stage_name, expected, images", PAPER)
def test_defaults_are_the_paper_batches(strategy, stage_name, expected, images):
    recipe = methods.batch_recipe(_stage(strategy), stage_name)
    assert (recipe.kind, recipe.num_units, recipe.num_views) == expected
    assert recipe.images_per_step(PARTITIONS) == images


def test_base_config_resolves_to_the_paper_batches(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO_ROOT))
    config = importlib.import_module("configs.base").get_config()
    assert config.data.n_partitions == PARTITIONS
    global_recipe = methods.batch_recipe(config.pretrain_global, "pretrain_global")
    local_recipe = methods.batch_recipe(config.pretrain_local, "pretrain_local")
    # The paper's default pairing: G^D (6 x 4 x 2) then L^R (10 x 2).
    assert global_recipe.images_per_step(PARTITIONS) == 48
    assert local_recipe.images_per_step(PARTITIONS) == 20
    config.pretrain_global.strategy = "GD-"
    assert methods.batch_recipe(config.pretrain_global, "pretrain_global").images_per_step(4) == 36


@pytest.mark.parametrize(
    "strategy, stage_name, overrides, expected, images",
    [
        ("GR", "pretrain_global", {"num_slices": 8}, ("random", 8, 2), 16),
        ("GR", "pretrain_global", {"num_views": 3}, ("random", 24, 3), 72),
        ("GD", "pretrain_global", {"num_volumes": 2}, ("structured", 2, 2), 16),
        ("GD-", "pretrain_global", {"num_volumes": 4, "num_views": 2}, ("structured", 4, 2), 32),
        ("BYOL", "pretrain_global", {"num_slices": 16}, ("random", 16, 2), 32),
        ("BYOL-D", "pretrain_global", {"num_volumes": 4}, ("paired", 2, 2), 16),
        ("BYOL-D", "pretrain_global", {"num_views": 2}, ("paired", 3, 2), 24),
        ("LR", "pretrain_local", {"num_slices": 4}, ("random", 4, 2), 8),
        ("LD", "pretrain_local", {"num_volumes": 2}, ("structured", 2, 2), 16),
    ],
)
def test_overrides(strategy, stage_name, overrides, expected, images):
    recipe = methods.batch_recipe(_stage(strategy, **overrides), stage_name)
    assert (recipe.kind, recipe.num_units, recipe.num_views) == expected
    assert recipe.images_per_step(PARTITIONS) == images


def test_the_batch_key_of_the_other_kind_is_ignored():
    # num_volumes sizes structured batches only; num_slices random ones only.
    assert methods.batch_recipe(_stage("GR", num_volumes=2), "pretrain_global").num_units == 24
    assert methods.batch_recipe(_stage("GD", num_slices=5), "pretrain_global").num_units == 6


@pytest.mark.parametrize(
    "strategy, num_units, num_views, devices, expected",
    [
        ("LR", 10, 2, 1, 2),  # a group is one slice: its views
        ("LR", 10, 2, 2, 2),
        ("LD", 3, 2, 1, 6),  # a group is one partition: 3 volumes x 2 views
        ("LD", 4, 2, 2, 4),  # 2 volumes per device x 2 views
    ],
)
def test_views_per_group(strategy, num_units, num_views, devices, expected):
    kind = "random" if strategy == "LR" else "structured"
    recipe = recipes.BatchRecipe(kind=kind, num_units=num_units, num_views=num_views)
    assert recipe.views_per_group(devices) == expected


@pytest.mark.parametrize(
    "strategy, stage_name, overrides, message",
    [
        ("SimCLR", "pretrain_global", {}, r"config\.pretrain_global\.strategy='SimCLR'"),
        ("byol", "pretrain_global", {}, r"strategy='byol' is not one of .*'BYOL'"),
        ("LR", "pretrain_global", {}, r"config\.pretrain_global\.strategy='LR' is not one of"),
        ("GD", "pretrain_local", {}, r"config\.pretrain_local\.strategy='GD' is not one of"),
        ("BYOL-D", "pretrain_global", {"num_volumes": 5}, r"num_volumes=5.*must be even"),
        ("BYOL-D", "pretrain_global", {"num_views": 3}, r"num_views must be 2 for BYOL-D"),
        ("BYOL", "pretrain_global", {"num_views": 3}, r"num_views must be 2 for BYOL"),
    ],
)
def test_invalid_input_names_the_config_key(strategy, stage_name, overrides, message):
    with pytest.raises(ValueError, match=message):
        methods.batch_recipe(_stage(strategy, **overrides), stage_name)
