"""jaxcl.runtime: the XLA:CPU settings applied by the entry points."""

import os
import subprocess
import sys
import textwrap

import pytest

from jaxcl import runtime

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_xla_flag_appended_to_existing_flags_on_cpu(monkeypatch):
    monkeypatch.setattr(runtime, "_jaxlib_minor_version", lambda: (0, 10))
    environ = {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    assert runtime.set_xla_cpu_flags(environ)
    assert environ["XLA_FLAGS"] == (
        "--xla_force_host_platform_device_count=8 "
        "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"
    )


@pytest.mark.parametrize(
    "environ",
    [
        {"JAX_PLATFORMS": "tpu"},
        {"JAX_PLATFORMS": "cuda,cpu"},
        {"JAX_PLATFORMS": "cpu", "JAXCL_CPU_TUNING": "0"},
        {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=x"},
    ],
)
def test_xla_flags_left_alone(monkeypatch, environ):
    monkeypatch.setattr(runtime, "_jaxlib_minor_version", lambda: (0, 10))
    before = dict(environ)
    assert not runtime.set_xla_cpu_flags(environ)
    assert environ == before


def test_xla_flag_only_for_checked_jaxlib_versions(monkeypatch):
    monkeypatch.setattr(runtime, "_jaxlib_minor_version", lambda: (0, 11))
    environ = {"JAX_PLATFORMS": "cpu"}
    assert not runtime.set_xla_cpu_flags(environ)
    assert "XLA_FLAGS" not in environ


def test_hugepage_environment(monkeypatch):
    monkeypatch.setattr(runtime, "_glibc_version", lambda: (2, 36))
    monkeypatch.setattr(runtime, "_transparent_hugepages_available", lambda: True)
    monkeypatch.setattr(runtime.sys, "platform", "linux")
    environment = runtime.hugepage_environment(
        {"JAX_PLATFORMS": "cpu", "GLIBC_TUNABLES": "glibc.malloc.arena_max=2", "HOME": "/h"}
    )
    assert environment == {
        "JAX_PLATFORMS": "cpu",
        "GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1",
        "HOME": "/h",
    }
    # Already set (e.g. after the re-execution), an old glibc, or no THP: nothing to do.
    assert runtime.hugepage_environment({"JAX_PLATFORMS": "cpu", **environment}) is None
    monkeypatch.setattr(runtime, "_glibc_version", lambda: (2, 31))
    assert runtime.hugepage_environment({"JAX_PLATFORMS": "cpu"}) is None
    monkeypatch.setattr(runtime, "_glibc_version", lambda: (2, 36))
    monkeypatch.setattr(runtime, "_transparent_hugepages_available", lambda: False)
    assert runtime.hugepage_environment({"JAX_PLATFORMS": "cpu"}) is None


def test_entry_point_reexecutes_once_with_the_same_command_line(tmp_path):
    script = tmp_path / "entry.py"
    script.write_text(
        textwrap.dedent(
            """
            import os, sys
            from jaxcl import runtime
            print("started", flush=True)
            runtime.tune_cpu_process()
            print(sys.argv[1:], os.environ.get("GLIBC_TUNABLES"), os.environ["XLA_FLAGS"])
            """
        )
    )
    environ = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO, "XLA_FLAGS": ""}
    environ.pop("GLIBC_TUNABLES", None)
    result = subprocess.run(
        [sys.executable, str(script), "--flag=1"],
        env=environ,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    lines = result.stdout.splitlines()
    expected_tunables = "glibc.malloc.hugetlb=1"
    if runtime.hugepage_environment(environ) is None:  # no huge pages here: no re-execution
        expected_tunables = "None"
    assert lines.count("started") == (2 if expected_tunables != "None" else 1)
    expected_flag = (
        runtime.NO_YNN_CONVOLUTIONS
        if runtime._jaxlib_minor_version() in runtime.CHECKED_JAXLIB_MINOR_VERSIONS
        else ""
    )
    assert lines[-1] == f"['--flag=1'] {expected_tunables} {expected_flag}".rstrip()
