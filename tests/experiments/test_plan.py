"""Which pre-trainings and cells `config.sweep` selects, their workdirs and derived configs."""

import pathlib

import pytest
from absl import flags
from ml_collections import config_flags

from configs import base, mmwhs, synthetic
from jaxcl.data import splits
from jaxcl.experiments import plan

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
PAPER_INITS = ["random", "GR", "GD-", "GD", "BYOL", "BYOL-D", "GR+LR", "GR+LD", "GD+LR", "GD+LD"]


def _config(**sweep):
    """configs/synthetic.py with base.py's sweep (the paper's grid), then `sweep` overrides."""
    config = synthetic.get_config()
    config.sweep = base.get_config().sweep
    for key, value in sweep.items():
        config.sweep[key] = value
    return config


def _plan(config):
    return plan.plan(config, "/w", splits.paper_splits(config.data.dataset))


def _selection(config):
    return plan.selection(config, splits.paper_splits(config.data.dataset))


def test_default_sweep_is_the_papers_grid():
    runs = _plan(_config())
    pretrainings = [run.description for run in runs if run.cell is None]
    assert pretrainings == [
        f"pre-training {name}"
        for name in ["GR", "GD-", "GD", "BYOL", "BYOL-D", "GR+LR", "GR+LD", "GD+LR", "GD+LD"]
    ]
    cells = [run.cell for run in runs if run.cell]
    # 10 initialisations x (5 + 5 + 3 subsets) x 1 seed, pre-trainings before every cell.
    assert len(cells) == 10 * 13
    assert all(run.cell is None for run in runs[:9])
    assert {c.init for c in cells} == set(PAPER_INITS)
    per_size = {
        s: sorted({c.combination for c in cells if c.labelled_set == s})
        for s in ["tr1", "tr2", "tr8"]
    }
    assert per_size == {
        "tr1": ["c1", "c2", "c3", "c4", "c5"],
        "tr2": ["c1", "c2", "c3", "c4", "c5"],
        "tr8": ["c1", "c2", "c3"],
    }
    assert {c.seed for c in cells} == {0}
    # Subset by subset: the first cells are every initialisation on tr1-c1.
    assert [(c.init, c.labelled_set, c.combination) for c in cells[:10]] == [
        (init, "tr1", "c1") for init in PAPER_INITS
    ]


def test_synthetic_config_runs_three_subsets_per_size():
    cells = [run.cell for run in _plan(synthetic.get_config()) if run.cell]
    assert len(cells) == 10 * 3 * 3
    assert {c.combination for c in cells} == {"c1", "c2", "c3"}


def test_mmwhs_all_combinations_are_its_own():
    chosen = _selection(mmwhs.get_config())
    assert chosen.combinations["tr2"] == ("c1", "c2", "c3", "c4")


def test_local_initialisation_alone_runs_its_global_pretraining_once():
    config = _config(inits="GD+LR,GD+LD,random", labelled_sets="tr1,tr8", seeds="0,3")
    config.sweep.combinations.tr1 = "c2,c1"
    config.sweep.combinations.tr8 = "c3"
    runs = _plan(config)
    assert [r.description for r in runs if r.cell is None] == [
        "pre-training GD",
        "pre-training GD+LR",
        "pre-training GD+LD",
    ]
    cells = [(c.init, c.labelled_set, c.combination, c.seed) for c in (r.cell for r in runs) if c]
    expected = [
        (init, labelled_set, combination, seed)
        for labelled_set, combination in [("tr1", "c2"), ("tr1", "c1"), ("tr8", "c3")]
        for seed in (0, 3)
        for init in ("GD+LR", "GD+LD", "random")
    ]
    assert cells == expected


def test_derived_configs_share_the_pretrainings():
    config = _config(inits="random,GR,BYOL-D,GR+LD", labelled_sets="tr2", seeds="5")
    config.sweep.combinations.tr2 = "c4"
    config.seed = 11
    runs = {run.description: run for run in _plan(config)}

    byol = runs["pre-training BYOL-D"]
    assert byol.workdir == "/w/pretrain/BYOL-D"
    assert byol.config.stages == ("pretrain_global",)
    assert byol.config.pretrain_global.strategy == "BYOL-D"
    assert byol.config.seed == 11  # pre-trainings use the base seed

    local = runs["pre-training GR+LD"]
    assert local.workdir == "/w/pretrain/GR+LD"
    assert local.config.stages == ("pretrain_local",)
    assert local.config.pretrain_local.strategy == "LD"
    assert local.config.pretrain_local.encoder_from == "/w/pretrain/GR/pretrain_global/export"
    assert local.config.seed == 11

    expected_sources = {
        "random": ("", ""),
        "GR": ("/w/pretrain/GR/pretrain_global/export", ""),
        "BYOL-D": ("/w/pretrain/BYOL-D/pretrain_global/export", ""),
        "GR+LD": ("/w/pretrain/GR+LD/pretrain_local/export",) * 2,
    }
    for init, (encoder_from, decoder_from) in expected_sources.items():
        cell = runs[f"cell {init} tr2-c4 seed 5"]
        assert cell.workdir == f"/w/cells/{init}/tr2/c4/seed5"
        assert cell.config.stages == ("finetune", "evaluate")
        assert cell.final_stage == "evaluate"
        assert cell.config.seed == 5  # the cell's seed is the fine-tuning seed
        assert (cell.config.data.labelled_set, cell.config.data.combination) == ("tr2", "c4")
        assert cell.config.finetune.encoder_from == encoder_from
        assert cell.config.finetune.decoder_from == decoder_from
    # Deriving a run's config leaves the user's config as it was.
    assert config.stages == ("pretrain_global", "pretrain_local", "finetune", "evaluate")
    assert config.finetune.encoder_from is None


def test_n_labelled():
    cells = [plan.Cell("GD", s, "c1", 0) for s in ("tr1", "tr2", "tr8", "trall")]
    assert [cell.n_labelled for cell in cells] == ["1", "2", "8", "all"]


@pytest.mark.parametrize(
    "key, value, message",
    [
        (
            "inits",
            "random,GD+XX",
            "config.sweep.inits has unknown names ['GD+XX']; valid: "
            + ",".join(plan.INITIALISATIONS),
        ),
        ("inits", "random,,GD", "config.sweep.inits='random,,GD' has an empty item"),
        ("inits", "GD,random,GD", "config.sweep.inits='GD,random,GD' lists ['GD'] more than once."),
        (
            "labelled_sets",
            "tr1,tr4",
            "config.sweep.labelled_sets has unknown names ['tr4']; valid: tr1,tr2,tr8,trall.",
        ),
        ("seeds", "0,one", "config.sweep.seeds='0,one': 'one' is not an integer."),
    ],
)
def test_invalid_selection_names_the_key_and_valid_values(key, value, message):
    with pytest.raises(plan.SweepConfigError) as error:
        _plan(_config(**{key: value}))
    assert message in str(error.value)


def test_invalid_combination_lists_the_datasets_subsets():
    config = _config(labelled_sets="tr8")
    config.sweep.combinations.tr8 = "c1,c5"
    with pytest.raises(
        plan.SweepConfigError,
        match=r"combinations.tr8 has unknown names \['c5'\]; valid: c1,c2,c3\.",
    ):
        _selection(config)
    # Unselected labelled sets are not checked.
    config.sweep.labelled_sets = "tr1"
    assert _selection(config).combinations == {"tr1": ("c1", "c2", "c3", "c4", "c5")}


def test_selection_from_the_command_line(monkeypatch):
    monkeypatch.chdir(REPO_ROOT)
    monkeypatch.syspath_prepend(str(REPO_ROOT))
    argv = [
        "jaxcl.experiments",
        "--config=configs/synthetic.py:quick",
        "--config.sweep.inits=GD-, GD+LR",
        "--config.sweep.seeds=1,2",
        "--config.sweep.combinations.tr1=c3",
    ]
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, flag_values=flag_values, sys_argv=argv)
    flag_values(argv, known_only=True)
    chosen = _selection(flag_values.config)
    assert chosen.inits == ("GD-", "GD+LR")
    assert chosen.seeds == (1, 2)
    assert chosen.labelled_sets == ("tr1",)  # from :quick
    assert chosen.combinations == {"tr1": ("c3",)}


def test_folder_sizes_and_all():
    """A folder's own labelled-set sizes; "all" selects every size and every subset."""
    config = _config(labelled_sets="all")
    folder = splits.Splits(
        pretrain=("a", "b", "c", "d"),
        test=("e",),
        labelled={"tr1": {"c1": ("a",), "c2": ("b",)}, "tr3": {"c1": ("a", "b", "c")}},
        default_val=("d",),
    )
    chosen = plan.selection(config, folder)
    assert chosen.labelled_sets == ("tr1", "tr3")
    assert chosen.combinations == {"tr1": ("c1", "c2"), "tr3": ("c1",)}
    config.sweep.labelled_sets = "tr8"
    with pytest.raises(plan.SweepConfigError, match=r"unknown names \['tr8'\]; valid: tr1,tr3"):
        plan.selection(config, folder)


def test_labelled_set_names_sort_by_size():
    assert plan.sorted_labelled_sets(["tr8", "tr16", "tr2", "tr1", "tr2"]) == [
        "tr1",
        "tr2",
        "tr8",
        "tr16",
    ]
    assert plan.is_labelled_set("tr12") and not plan.is_labelled_set("tr0")
    assert not plan.is_labelled_set("val")


def test_pretext_tasks_are_initialisations():
    """Rotation passes on its encoder; a restoration task its whole UNet but the output layer."""
    config = _config(inits="Rotation,Inpainting,ContextRestoration", labelled_sets="tr1")
    config.sweep.combinations.tr1 = "c1"
    runs = {run.description: run for run in _plan(config)}
    export = "/w/pretrain/{}/pretrain_global/export"
    rotation = runs["cell Rotation tr1-c1 seed 0"].config.finetune
    assert (rotation.encoder_from, rotation.decoder_from) == (export.format("Rotation"), "")
    for name in ("Inpainting", "ContextRestoration"):
        assert runs[f"pre-training {name}"].config.pretrain_global.strategy == name
        cell = runs[f"cell {name} tr1-c1 seed 0"].config.finetune
        assert cell.encoder_from == cell.decoder_from == export.format(name)
