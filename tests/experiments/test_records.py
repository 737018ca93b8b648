"""Run-time records, the stored-config check and the git commit."""

import os
import re
import subprocess

import pytest

from configs import synthetic
from jaxcl.experiments import plan, records


def test_sessions_add_up(tmp_path):
    run_dir = str(tmp_path / "cells" / "GD" / "tr1" / "c1" / "seed0")
    assert records.read_time(run_dir) is None
    records.add_session(run_dir, 12.5, commit="a", finished=False, machine="m1")
    record = records.add_session(run_dir, 30.0, commit="b", finished=True, machine="m2")
    assert record == records.read_time(run_dir)
    assert record == {
        "seconds": 42.5,
        "sessions": [
            {"seconds": 12.5, "commit": "a", "finished": False, "machine": "m1"},
            {"seconds": 30.0, "commit": "b", "finished": True, "machine": "m2"},
        ],
    }


def test_machine_names_cores_and_jax_devices():
    import jax

    description = records.machine()
    cores = len(os.sched_getaffinity(0))
    assert description.startswith(f"{cores} CPU cores (")
    assert f"{jax.device_count()} jax device" in description
    assert jax.devices()[0].device_kind in description
    assert description.endswith(f"(jax {jax.__version__})")


def test_stored_config_allows_other_selections_and_data_locations(tmp_path):
    workdir = str(tmp_path)
    config = synthetic.get_config()
    records.check_stored_config(config, workdir, "python -m jaxcl.experiments --a")
    assert records.stored_command(workdir) == "python -m jaxcl.experiments --a"

    same_training = synthetic.get_config()
    same_training.sweep.inits = "random"
    same_training.sweep.combinations.tr8 = "c2"
    same_training.data.data_dir = "/elsewhere"
    same_training.data.root = "/raw"
    same_training.distributed.coordinator_address = "host:1234"
    records.check_stored_config(same_training, workdir, "python -m jaxcl.experiments --b")
    # The first command stays the one that started the sweep.
    assert records.stored_command(workdir) == "python -m jaxcl.experiments --a"


def test_stored_config_refuses_other_training_settings(tmp_path):
    workdir = str(tmp_path)
    records.check_stored_config(synthetic.get_config(), workdir, "cmd --a")
    other = synthetic.get_config()
    before = list(other.model.filters)
    other.model.filters = (8, 8, 8, 8, 8, 8)
    other.pretrain_local.strategy = "LD"
    with pytest.raises(plan.SweepConfigError) as error:
        records.check_stored_config(other, workdir, "cmd --b")
    message = str(error.value)
    assert "cmd --a" in message
    assert f"model.filters: {before} -> [8, 8, 8, 8, 8, 8]" in message
    assert "pretrain_local.strategy: 'LR' -> 'LD'" in message
    assert "Use another --workdir" in message


def test_keys_added_by_a_newer_jaxcl_are_accepted_removed_ones_refused(tmp_path):
    workdir = str(tmp_path)
    older = synthetic.get_config()
    del older.finetune["adversarial_weight"]  # as if the sweep began before the key existed
    records.check_stored_config(older, workdir, "cmd --a")
    records.check_stored_config(synthetic.get_config(), workdir, "cmd --b")
    del older.finetune["mixup_alpha"]
    with pytest.raises(plan.SweepConfigError, match="finetune.mixup_alpha: 0.1 -> '<absent>'"):
        records.check_stored_config(older, workdir, "cmd --c")


def test_git_commit_of_this_checkout_or_unknown(monkeypatch):
    commit = records.git_commit()
    assert re.fullmatch(r"[0-9a-f]{40}(-dirty)?|unknown", commit), commit

    def no_git(*args, **kwargs):
        raise FileNotFoundError("git")

    monkeypatch.setattr(subprocess, "run", no_git)
    assert records.git_commit() == "unknown"
