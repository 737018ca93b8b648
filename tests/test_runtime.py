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


def test_jemalloc_environment(monkeypatch):
    monkeypatch.setattr(runtime.sys, "platform", "linux")
    environ = {"JAX_PLATFORMS": "cpu", "LD_PRELOAD": "libother.so", "HOME": "/h"}
    environment = runtime.jemalloc_environment(environ, "libjemalloc.so.2")
    assert environment == {
        "JAX_PLATFORMS": "cpu",
        "LD_PRELOAD": "libjemalloc.so.2 libother.so",
        "MALLOC_CONF": "dirty_decay_ms:-1,muzzy_decay_ms:-1",
        "HOME": "/h",
    }
    # After the re-execution, without jemalloc, or with tuning off: nothing to do.
    assert runtime.jemalloc_environment(environment, "libjemalloc.so.2") is None
    assert runtime.jemalloc_environment(environ, None) is None
    assert runtime.jemalloc_environment({**environ, "JAXCL_CPU_TUNING": "0"}, "x") is None
    # A user's own jemalloc settings are kept.
    mine = runtime.jemalloc_environment({**environ, "MALLOC_CONF": "narenas:1"}, "libjemalloc.so.2")
    assert mine["MALLOC_CONF"] == "narenas:1"


def test_allocator_prefers_jemalloc_then_huge_pages(monkeypatch):
    monkeypatch.setattr(runtime.sys, "platform", "linux")
    monkeypatch.setattr(runtime, "_glibc_version", lambda: (2, 36))
    monkeypatch.setattr(runtime, "_transparent_hugepages_available", lambda: True)
    monkeypatch.setattr(runtime, "find_jemalloc", lambda: "libjemalloc.so.2")
    environment = runtime.allocator_environment({"JAX_PLATFORMS": "cpu"})
    assert environment["LD_PRELOAD"] == "libjemalloc.so.2"
    assert "GLIBC_TUNABLES" not in environment
    assert runtime.allocator_environment(environment) is None
    monkeypatch.setattr(runtime, "find_jemalloc", lambda: None)
    environment = runtime.allocator_environment({"JAX_PLATFORMS": "cpu"})
    assert environment == {"JAX_PLATFORMS": "cpu", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
    assert runtime.allocator_environment(environment) is None


def test_entry_point_reexecutes_once_with_the_same_command_line(tmp_path):
    script = tmp_path / "entry.py"
    script.write_text(
        textwrap.dedent(
            """
            import os, sys
            from jaxcl import runtime
            print("started", flush=True)
            runtime.tune_cpu_process()
            names = ("LD_PRELOAD", "MALLOC_CONF", "GLIBC_TUNABLES", "XLA_FLAGS")
            print(sys.argv[1:], *(os.environ.get(name) for name in names))
            """
        )
    )
    environ = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO, "XLA_FLAGS": ""}
    for name in ("GLIBC_TUNABLES", "LD_PRELOAD", "MALLOC_CONF"):
        environ.pop(name, None)
    result = subprocess.run(
        [sys.executable, str(script), "--flag=1"],
        env=environ,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    lines = result.stdout.splitlines()
    reexecuted = runtime.allocator_environment(environ)  # jemalloc, huge pages, or neither here
    assert lines.count("started") == (1 if reexecuted is None else 2)
    after = reexecuted or environ
    expected_flag = (
        runtime.NO_YNN_CONVOLUTIONS
        if runtime._jaxlib_minor_version() in runtime.CHECKED_JAXLIB_MINOR_VERSIONS
        else ""
    )
    names = ("LD_PRELOAD", "MALLOC_CONF", "GLIBC_TUNABLES")
    expected = " ".join(str(after.get(name)) for name in names)
    assert lines[-1] == f"['--flag=1'] {expected} {expected_flag}".rstrip()
