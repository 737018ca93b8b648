"""`distributed.initialize`: which config.distributed settings connect processes, and how.

`jax.distributed.initialize` is replaced by a recorder here (connecting would wait for peers);
tests/train/test_multihost.py connects real processes.
"""

import importlib.util
import pathlib

import jax
import pytest

from jaxcl.train import distributed

BASE_CONFIG = pathlib.Path(__file__).resolve().parents[2] / "configs" / "base.py"


@pytest.fixture
def calls(monkeypatch):
    """The keyword arguments of every jax.distributed.initialize call, which does nothing."""
    recorded = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kwargs: recorded.append(kwargs))
    monkeypatch.setattr(distributed, "_on_cloud_tpu_vm", lambda: False)
    return recorded


def _config(**settings):
    """configs/base.py's config with `settings` in its distributed section."""
    spec = importlib.util.spec_from_file_location("base_config", BASE_CONFIG)
    base = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(base)
    config = base.get_config()
    config.distributed.update(settings)
    return config


def test_defaults_run_one_process(calls):
    distributed.initialize(_config())
    assert calls == []


def test_cloud_tpu_vm_is_initialised_from_its_metadata(calls, monkeypatch):
    monkeypatch.setattr(distributed, "_on_cloud_tpu_vm", lambda: True)
    distributed.initialize(_config())
    assert calls == [{}]
    distributed.initialize(_config(cluster="none"))  # opting out
    assert calls == [{}]


def test_manual_settings_are_passed_on(calls):
    distributed.initialize(
        _config(
            coordinator_address="10.0.0.1:1234",
            num_processes=4,
            process_id=3,
            local_device_ids=(0, 1),
        )
    )
    assert calls == [
        {
            "coordinator_address": "10.0.0.1:1234",
            "num_processes": 4,
            "process_id": 3,
            "local_device_ids": [0, 1],
        }
    ]


def test_launcher_detection_is_passed_on(calls):
    distributed.initialize(_config(cluster="slurm"))
    assert calls == [
        {
            "coordinator_address": None,
            "num_processes": None,
            "process_id": None,
            "local_device_ids": None,
            "cluster_detection_method": "slurm",
        }
    ]


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"cluster": "tpu-pod"}, "config.distributed.cluster='tpu-pod' is not one of"),
        ({"num_processes": 2, "process_id": 0}, "set without config.distributed.coordinator"),
        ({"coordinator_address": "localhost:1234", "process_id": 0}, "num_processes must be"),
        ({"coordinator_address": "localhost:1234", "num_processes": 2}, "process_id=None must"),
        (
            {"coordinator_address": "localhost:1234", "num_processes": 2, "process_id": 2},
            r"process_id=2 must be this process's index in \[0, num_processes=2\)",
        ),
        ({"coordinator_address": "localhost", "num_processes": 1, "process_id": 0}, "host:port"),
        ({"cluster": "none", "num_processes": 2}, "drop them or set cluster='auto'"),
    ],
)
def test_inconsistent_settings_name_the_keys(calls, settings, message):
    with pytest.raises(ValueError, match=message):
        distributed.initialize(_config(**settings))
    assert calls == []


def test_helpers_are_no_ops_in_one_process():
    assert distributed.is_main_process()
    distributed.barrier("nothing to wait for")
    assert distributed.main_process_first(lambda: 7, "first") == 7
    assert distributed.agree(True) is True
    assert distributed.agree(False) is False
