"""`config_validation.validate`: every impossible value is listed, with its key and its fix.

The expected values (nearest batch sizes, valid names, pool sizes, feature map sides) are worked
out by hand from the paper's batches (docs/METHOD.md §7), the splits (§10, §12) and the UNet's 5
poolings (§1).
"""

import dataclasses
import functools
import importlib
import pathlib
import re
import types

import jax
import pytest

from jaxcl import config_validation, methods
from jaxcl.config_validation import ConfigError
from jaxcl.data import splits
from jaxcl.train import trainer

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
DATASETS = ("synthetic", "acdc", "prostate", "mmwhs")
# An entry written by config_validation itself: config.<key>=<value>: <what is wrong>; <fix>.
ENTRY = re.compile(r"^config\.[\w.]+=.+: .+; .+$")


@pytest.fixture
def load_config(monkeypatch, tmp_path):
    """get(name, arg) -> configs/<name>.py's config, real datasets rooted in a fake download."""
    monkeypatch.syspath_prepend(str(REPO_ROOT))

    def get(name: str, arg: str | None = None):
        config = importlib.import_module(f"configs.{name}").get_config(arg)
        if name != "synthetic":
            config.data.root = str(_fake_root(tmp_path / name, name))
        return config

    return get


def _fake_root(root: pathlib.Path, dataset: str) -> pathlib.Path:
    """A dataset folder with one subject in the dataset's layout (empty image files)."""
    files = {
        "acdc": {"patient001/Info.cfg": "ED: 1\n", "patient001/patient001_frame01.nii.gz": ""},
        "prostate": {"imagesTr/prostate_00.nii.gz": ""},
        "mmwhs": {"mr_train_1001_image.nii.gz": ""},
    }[dataset]
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def _set(config, key: str, value) -> None:
    *parents, name = key.split(".")
    setattr(functools.reduce(getattr, parents, config), name, value)


def _validate(config, **options) -> None:
    """`validate` as the trainer calls it: with the trainer's stages, in their order."""
    config_validation.validate(config, stage_order=trainer.STAGES, **options)


def _problems(config, num_devices: int = 1, num_processes: int = 1) -> tuple[str, ...]:
    with pytest.raises(ConfigError) as raised:
        _validate(config, num_devices=num_devices, num_processes=num_processes)
    return raised.value.problems


def _only_problem(config, num_devices: int = 1) -> str:
    problems = _problems(config, num_devices)
    assert len(problems) == 1, problems
    return problems[0]


@pytest.mark.parametrize("arg", [None, "quick"])
@pytest.mark.parametrize("name", DATASETS)
def test_shipped_configs_are_valid_on_one_device(load_config, name, arg):
    _validate(load_config(name, arg), num_devices=1)


@pytest.mark.parametrize("arg", [None, "quick"])
@pytest.mark.parametrize("name", DATASETS)
def test_shipped_configs_on_eight_devices(load_config, name, arg):
    """The paper's G^D 6 volumes and L^R 10 slices (and batch 20) do not split over 8 devices."""
    config = load_config(name, arg)
    problems = _problems(config, num_devices=8)
    expected = [
        "config.pretrain_global.num_volumes=None: 6 volumes (the strategy's paper value 6) do "
        "not split into whole volumes over 8 devices; use a multiple of 8 (e.g. 8)",
        "config.pretrain_local.num_slices=None: 10 slices (the strategy's paper value 10) do not "
        "split into whole slices over 8 devices; use a multiple of 8 (e.g. 8 or 16)",
    ]
    batch = config.finetune.batch_size  # quick: 8; synthetic: 10 (CPU-sized); the paper's: 20
    if batch != 8:
        nearest = {10: "8 or 16", 20: "16 or 24"}[batch]
        expected.append(
            f"config.finetune.batch_size={batch}: {batch} slices do not split into whole slices "
            f"over 8 devices; use a multiple of 8 (e.g. {nearest})"
        )
    assert list(problems) == expected
    # The fixes it names make the config valid (MM-WHS, the smallest pool, has 10 volumes).
    config.pretrain_global.num_volumes = 8
    config.pretrain_local.num_slices = 16
    config.finetune.batch_size = 16
    _validate(config, num_devices=8, num_processes=2)


def test_real_dataset_without_root_is_reported_for_evaluation(load_config):
    config = load_config("prostate")
    config.data.root = ""
    problem = _only_problem(config)
    assert problem.startswith("config.data.root='': ")
    assert "Task05_Prostate" in problem and "medicaldecathlon.com" in problem
    config.stages = ("pretrain_global", "pretrain_local", "finetune")  # no evaluation: not needed
    _validate(config, num_devices=1)


def test_missing_dataset_root_is_reported(load_config, tmp_path):
    config = load_config("mmwhs")
    config.data.root = str(tmp_path / "nowhere")
    problem = _only_problem(config)
    assert problem.startswith(f"config.data.root='{tmp_path / 'nowhere'}': ")
    assert "does not exist" in problem


# (key, bad value, substrings of its entry: the key with the value, then the fix).
BAD_VALUES = [
    ("model.dtype", "float16", ["config.model.dtype='float16'", "'float32', 'bfloat16'"]),
    (
        "pretrain_global.strategy",
        "XX",
        ["config.pretrain_global.strategy='XX'", "('GR', 'GD-', 'GD', 'BYOL', 'BYOL-D'"],
    ),
    ("pretrain_local.strategy", "LX", ["config.pretrain_local.strategy='LX'", "('LR', 'LD')"]),
    ("data.image_size", 100, ["config.data.image_size=100", "multiple of 32", "96 or 128"]),
    ("data.image_size", 0, ["config.data.image_size=0", "e.g. 32"]),
    ("stages", ("finetune", "bogus"), ["config.stages=('finetune', 'bogus')", "'bogus'"]),
    (
        "stages",
        ("finetune", "pretrain_global"),
        ["config.stages=('finetune', 'pretrain_global')", "in the order ('pretrain_global',"],
    ),
    ("data.labelled_set", "tr3", ["config.data.labelled_set='tr3'", "['tr1', 'tr2', 'tr8'"]),
    ("data.dataset", "brats", ["config.data.dataset='brats'", "'mmwhs'", "'synthetic'"]),
    ("data.frame", "XX", ["config.data.frame='XX'", "'ED' or 'ES'"]),
    ("pretrain_global.steps", 0, ["config.pretrain_global.steps=0", "must be positive"]),
    ("pretrain_local.steps", -5, ["config.pretrain_local.steps=-5", "must be positive"]),
    ("finetune.steps", 0, ["config.finetune.steps=0", "must be positive"]),
    ("finetune.val_every", 0, ["config.finetune.val_every=0", "e.g. 50"]),
    ("finetune.learning_rate", 0.0, ["config.finetune.learning_rate=0.0", "1e-3"]),
    ("pretrain_global.temperature", 0.0, ["config.pretrain_global.temperature=0.0", "0.1"]),
    ("pretrain_local.temperature", -0.1, ["config.pretrain_local.temperature=-0.1", "0.1"]),
    ("model.num_decoder_blocks", 0, ["config.model.num_decoder_blocks=0", "1..5"]),
    ("model.num_decoder_blocks", 6, ["config.model.num_decoder_blocks=6", "1..5"]),
    ("model.filters", (8, 8), ["config.model.filters=(8, 8)", "6 positive channel counts"]),
    ("model.embedding_features", 0, ["config.model.embedding_features=0", "128"]),
    # quick: 64² images, l = 3 decoder blocks -> a 16x16 map, grid_size in 2..14 (the builder's
    # region_positions says so).
    (
        "pretrain_local.positions",
        "grid",
        [
            "config.pretrain_local.grid_size=None",
            "LR with data.image_size=64, model.num_decoder_blocks=3",
            "grid_size <= feature_size - 2 = 14",
        ],
    ),
    ("pretrain_local.positions", "dense", ["config.pretrain_local.positions='dense'", "'grid'"]),
    ("pretrain_local.negatives", "some", ["config.pretrain_local.negatives='some'", "'paper'"]),
    ("data.n_partitions", 0, ["config.data.n_partitions=0", "4"]),
    ("data.slice_axis", "oblique", ["config.data.slice_axis='oblique'", "auto", "'axial'"]),
    ("data.splits.test", "044", ["config.data.splits='...'", "paper's fixed splits"]),
    ("data.target_resolution", 0.0, ["config.data.target_resolution=0.0", "in mm"]),
    ("data.eval_chunk_size", 0, ["config.data.eval_chunk_size=0", "16"]),
    ("log_every", 0, ["config.log_every=0", "must be positive"]),
    ("checkpoint_every", 0, ["config.checkpoint_every=0", "must be positive"]),
    ("seed", -1, ["config.seed=-1", "non-negative", "use 0"]),
    ("parallel.mode", "vmap", ["config.parallel.mode='vmap'", "('pmap', 'shard_map')"]),
    ("augment.crop_fraction", 2.0, ["config.augment.crop_fraction = 2.0", "(0, 1]"]),
    # Synthetic's pretrain split holds 40 volumes (000-039).
    (
        "pretrain_global.num_volumes",
        50,
        ["config.pretrain_global.num_volumes=50", "exceed the 40", "(e.g. 40)"],
    ),
    ("pretrain_global.num_volumes", 0, ["config.pretrain_global.num_volumes=0", "None"]),
    ("pretrain_local.num_views", 1, ["config.pretrain_local.num_views=1", "2 or more"]),
    ("finetune.batch_size", 0, ["config.finetune.batch_size=0", "must be positive", "20"]),
    # ml_collections lets any number be overridden with None.
    ("finetune.steps", None, ["config.finetune.steps=None", "must be positive"]),
    ("data.image_size", None, ["config.data.image_size=None", "e.g. 32"]),
    ("model.num_decoder_blocks", None, ["config.model.num_decoder_blocks=None", "1..5"]),
    ("augment.elastic_sigma", None, ["config.augment.elastic_sigma=None", "default is 5.0"]),
]


@pytest.mark.parametrize("key, value, expected", BAD_VALUES)
def test_each_bad_value_names_its_key_and_fix(load_config, key, value, expected):
    config = load_config("synthetic", "quick")
    _set(config, key, value)
    problem = _only_problem(config)
    assert problem.startswith(expected[0]), problem
    for text in expected[1:]:
        assert text in problem, problem


def test_combination_must_exist_for_the_labelled_set(load_config):
    config = load_config("synthetic", "quick")
    config.data.labelled_set = "tr8"
    config.data.combination = "c9"
    problem = _only_problem(config)
    assert problem.startswith("config.data.combination='c9': ")
    assert "['c1', 'c2', 'c3']" in problem
    config.data.combination = "c5"  # tr1 and tr2 have c1..c5, tr8 only c1..c3
    assert "['c1', 'c2', 'c3']" in _only_problem(config)


def test_mmwhs_tr2_has_four_combinations(load_config):
    config = load_config("mmwhs", "quick")
    config.data.labelled_set = "tr2"
    config.data.combination = "c5"
    assert "['c1', 'c2', 'c3', 'c4']" in _only_problem(config)


def test_missing_export_folder(load_config, tmp_path):
    config = load_config("synthetic", "quick")
    missing = str(tmp_path / "run" / "pretrain_global" / "export")
    config.finetune.encoder_from = missing
    config.pretrain_local.encoder_from = missing
    config.finetune.decoder_from = ""  # random initialisation: fine
    problems = _problems(config)
    assert [p.split(": ")[0] for p in problems] == [
        f"config.pretrain_local.encoder_from='{missing}'",
        f"config.finetune.encoder_from='{missing}'",
    ]
    assert all("no such folder" in p and "''" in p for p in problems)
    (tmp_path / "run" / "pretrain_global" / "export").mkdir(parents=True)
    _validate(config, num_devices=1)


def test_byol_checks(load_config):
    config = load_config("synthetic", "quick")
    config.stages = ("pretrain_global",)
    config.pretrain_global.strategy = "BYOL-D"
    config.pretrain_global.num_volumes = 3  # BYOL-D pairs volumes
    assert "must be even" in _only_problem(config)
    config.pretrain_global.num_volumes = None  # paper: 3 pairs = 6 volumes
    config.pretrain_global.tau_base = 1.5
    config.pretrain_global.temperature = 0.0  # BYOL has no temperature
    problem = _only_problem(config)
    assert problem.startswith("config.pretrain_global.tau_base=1.5: ") and "[0, 1]" in problem
    config.pretrain_global.tau_base = 0.99
    _validate(config, num_devices=3)  # 3 pairs over 3 devices
    # On 2 devices the pairs need a multiple of 2 x 2 volumes: 4 or 8 around 6.
    problem = _only_problem(config, num_devices=2)
    assert "config.pretrain_global.num_volumes=None: 6 volumes" in problem
    assert "use a multiple of 4 (e.g. 4 or 8)" in problem


def test_more_devices_than_the_pool_allows(load_config):
    config = load_config("mmwhs")  # 10 pre-training volumes
    config.stages = ("pretrain_global",)
    problem = _only_problem(config, num_devices=16)
    assert problem.startswith("config.pretrain_global.num_volumes=None: 6 volumes")
    assert "no value fits 10 volumes: run on fewer devices" in problem


def test_a_folder_is_checked_against_its_own_splits(load_config):
    """Validation of a folder dataset uses the splits DataContext made (its labelled sets)."""
    config = load_config("synthetic", "quick")
    config.data.dataset = "folder"
    folder = splits.Splits(
        pretrain=("a", "b"), test=("c",), labelled={"tr1": {"c1": ("a",)}}, default_val=("b",)
    )
    _validate(config, num_devices=1, splits=folder)
    config.data.labelled_set = "tr2"
    with pytest.raises(ConfigError, match=r"config.data.labelled_set='tr2': unknown; use one of"):
        _validate(config, num_devices=1, splits=folder)


def test_processes_are_named(load_config):
    config = load_config("synthetic", "quick")
    config.finetune.batch_size = 20
    problems = _problems(config, num_devices=16, num_processes=2)
    assert "over 16 devices (2 processes x 8 local)" in problems[-1]
    assert "(e.g. 16 or 32)" in problems[-1]


def test_unknown_augment_key(load_config):
    config = load_config("synthetic", "quick")
    config.augment.crop = 0.5
    problem = _only_problem(config)
    assert problem.startswith("config.augment.crop=0.5: unknown; ")
    assert "'crop_fraction'" in problem


def test_sections_of_stages_not_run_are_not_checked(load_config):
    config = load_config("synthetic", "quick")
    config.stages = ("finetune", "evaluate")
    config.pretrain_global.strategy = "XX"
    config.pretrain_local.temperature = 0.0
    _validate(config, num_devices=1)


def test_all_problems_are_listed_at_once(load_config):
    config = load_config("synthetic", "quick")
    config.model.dtype = "float16"
    config.pretrain_global.strategy = "XX"
    config.data.image_size = 100
    config.finetune.val_every = 0
    config.data.labelled_set = "tr3"
    config.finetune.batch_size = 12  # not a multiple of 8
    problems = _problems(config, num_devices=8)
    keys = {problem.split("=")[0] for problem in problems}
    assert keys == {
        "config.model.dtype",
        "config.pretrain_global.strategy",
        "config.data.image_size",
        "config.finetune.val_every",
        "config.data.labelled_set",
        "config.finetune.batch_size",
        # quick's L^R batch of 10 slices does not split over 8 devices either.
        "config.pretrain_local.num_slices",
    }
    assert all(ENTRY.match(p) for p in problems if "strategy" not in p)  # its own: recipes'
    message = str(ConfigError(problems))
    assert message.startswith("the config has 7 invalid value(s)")
    assert all(f"\n  - {problem}" in message for problem in problems)
    assert isinstance(ConfigError(problems), ValueError)


def test_the_stages_are_checked_against_the_given_order(load_config):
    """The validator has no list of stages: it checks config.stages against the one it is given."""
    config = load_config("synthetic", "quick")
    config.stages = ("finetune", "evaluate")
    config_validation.validate(config, num_devices=1, stage_order=("finetune", "evaluate"))
    config.stages = ("pretrain_global", "finetune")
    with pytest.raises(ConfigError, match=r"unknown stages \['pretrain_global'\]"):
        config_validation.validate(config, num_devices=1, stage_order=("finetune", "evaluate"))


@pytest.mark.parametrize("name", list(methods.METHODS))
def test_every_method_builds_abstractly(load_config, name):
    """Each builder builds its stage and runs its loss on a batch of shapes (quick config)."""
    config = load_config("synthetic", "quick")
    stage = methods.METHODS[name].stage
    config.stages = (stage,)
    config[stage].strategy = name
    _validate(config, num_devices=1)


# quick: 64² images; after l decoder blocks the map has 64 / 2^(5 - l) pixels a side: 4 for l = 1.
@pytest.mark.parametrize(
    "positions, grid_size, expected",
    [
        ("paper", None, ["config.pretrain_local.positions='paper'", "feature_size=4"]),
        ("grid", 3, ["config.pretrain_local.grid_size=3", "feature_size - 2 = 2"]),
    ],
)
def test_regions_that_do_not_fit_the_feature_map(load_config, positions, grid_size, expected):
    config = load_config("synthetic", "quick")
    config.model.num_decoder_blocks = 1
    config.pretrain_local.positions = positions
    config.pretrain_local.grid_size = grid_size
    problem = _only_problem(config)
    assert problem.startswith(expected[0]), problem
    assert "LR with data.image_size=64, model.num_decoder_blocks=1: region_positions: " in problem
    assert expected[1] in problem
    config.pretrain_local.positions, config.pretrain_local.grid_size = "grid", 2  # 2 <= 4 - 2
    _validate(config, num_devices=1)


def test_the_papers_negatives_need_the_papers_positions(load_config):
    """The loss's own rule, found by running it on the built stage's outputs."""
    config = load_config("synthetic", "quick")
    config.pretrain_local.negatives = "paper"
    config.pretrain_local.positions = "grid"
    config.pretrain_local.grid_size = 4
    problem = _only_problem(config)
    assert problem.startswith("config.pretrain_local.negatives='paper': "), problem
    assert "needs the 17 paper positions" in problem and "got 16 positions" in problem


def _with_builder(monkeypatch, name: str, build) -> None:
    """Replaces the builder of method `name` in the registry `jaxcl.methods` reads."""
    method = dataclasses.replace(methods.METHODS[name], build=build)
    monkeypatch.setattr(
        methods, "METHODS", types.MappingProxyType({**methods.METHODS, name: method})
    )


@pytest.mark.parametrize(
    "error, expected",
    [
        (
            ValueError("the encoder needs more filters"),
            "config.pretrain_global.strategy='GD': GD with data.image_size=64, "
            "model.num_decoder_blocks=3: the encoder needs more filters",
        ),
        (
            TypeError("temperature=0.1 needs learning_rate >= 1"),
            "config.pretrain_global.temperature=0.1: GD with data.image_size=64, "
            "model.num_decoder_blocks=3: temperature=0.1 needs learning_rate >= 1",
        ),
        (  # a message that names its key is kept as it is
            ValueError("config.model.filters=(8, 16): too few for GD."),
            "config.model.filters=(8, 16): too few for GD.",
        ),
    ],
)
def test_what_the_builder_raises_is_an_entry(load_config, monkeypatch, error, expected):
    """The validator asks the builder: what it raises is listed under the setting of its stage
    that the message names first, or under the strategy when it names none."""

    def build(inputs):
        raise error

    _with_builder(monkeypatch, "GD", build)
    assert _only_problem(load_config("synthetic", "quick")) == expected


def test_the_build_is_abstract(load_config, monkeypatch):
    """The builder runs under jax.eval_shape: its key is a tracer, nothing is computed."""
    real_build = methods.METHODS["LR"].build
    keys = []

    def build(inputs):
        keys.append(inputs.key)
        return real_build(inputs)

    _with_builder(monkeypatch, "LR", build)
    _validate(load_config("synthetic", "quick"), num_devices=1)
    assert len(keys) == 1 and isinstance(keys[0], jax.core.Tracer)


def test_streaming_and_task_augmentation_settings_are_checked(load_config):
    config = load_config("synthetic", "quick")
    config.finetune.method = "task-aug"
    config.finetune.task_aug_warmup = 1.5
    config.data.pretrain_memory_gb = -1.0
    config.data.stream_parallelism = 0
    with pytest.raises(config_validation.ConfigError) as error:
        config_validation.validate(config, num_devices=1)
    problems = "\n".join(error.value.problems)
    assert "config.data.stream_parallelism=0: must be positive" in problems
    assert "config.data.pretrain_memory_gb=-1.0: must be 0 or more" in problems
    assert "config.finetune.task_aug_warmup=1.5 must be a fraction" in problems
