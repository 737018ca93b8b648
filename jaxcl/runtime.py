"""Process settings that make XLA:CPU train this UNet faster; applied by the entry points.

Both are outside the model's math and only apply to CPU-only runs (no TPU or GPU plugin
installed, or `JAX_PLATFORMS=cpu`); `JAXCL_CPU_TUNING=0` turns both off, and with them the
convolutions' kernel gradients computed by TensorFlow on CPU (`jaxcl.models.convolution`).
They were measured with `benchmarks/model_step.py` and `benchmarks/train_step.py` (see
docs/TRAINING.md):

- **Eigen convolutions.** jaxlib 0.10's XLA:CPU sends convolutions to YNNPACK by default, which
  makes this network's training steps 1.15-1.3x slower than XLA's Eigen convolutions
  (docs/TRAINING.md). `--xla_cpu_experimental_ynn_fusion_type=-individual_convolution` keeps YNNPACK
  for dots and reductions only. XLA reads XLA_FLAGS when its CPU backend starts, so this must
  run before the first jax computation; an unknown flag aborts XLA, so it is only added for the
  jaxlib versions it was checked on.
- **Memory that stays mapped.** XLA:CPU frees and re-allocates its step buffers (1.6 GiB for a
  fine-tuning step at 192²) on every step. glibc hands allocations this large back to the kernel
  when they are freed, so every step faults ~400,000 fresh pages in again. When jemalloc is
  installed (Debian/Ubuntu: `apt install libjemalloc2`), the entry point re-executes itself once
  with it preloaded and told never to return freed pages (`JEMALLOC_CONF`): no page faults after
  the first steps, and fine-tuning steps 1.16x, G^D steps 1.19x faster than with plain glibc
  (docs/TRAINING.md has the numbers). Without jemalloc it falls back to glibc's transparent huge
  pages: glibc only asks the kernel for them when the process *starts* with
  `GLIBC_TUNABLES=glibc.malloc.hugetlb=1` (glibc >= 2.35, THP "always" or "madvise"), so the
  entry point re-executes itself with that instead. They cut the cost of the faults, but their
  gain depends on the machine (docs/TRAINING.md).
"""

from __future__ import annotations

import ctypes.util
import importlib.util
import logging
import os
import sys
from collections.abc import MutableMapping, Sequence

NO_YNN_CONVOLUTIONS = "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"
# jaxlib versions on which NO_YNN_CONVOLUTIONS exists and was measured to help.
CHECKED_JAXLIB_MINOR_VERSIONS = ((0, 10),)
HUGEPAGE_TUNABLE = "glibc.malloc.hugetlb=1"
JEMALLOC = "jemalloc"
# Never return freed pages to the kernel (jemalloc's decay times; -1 disables purging).
JEMALLOC_CONF = "dirty_decay_ms:-1,muzzy_decay_ms:-1"
_ACCELERATOR_MODULES = ("libtpu", "jax_plugins", "jax_cuda12_plugin", "jax_cuda13_plugin")
_THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"


def cpu_only(environ: MutableMapping[str, str]) -> bool:
    """True when jax will run on the CPU: JAX_PLATFORMS=cpu, or no accelerator plugin installed."""
    platforms = environ.get("JAX_PLATFORMS", "")
    if platforms:
        return platforms.split(",")[0].strip() == "cpu"
    return not any(importlib.util.find_spec(name) for name in _ACCELERATOR_MODULES)


def tuning_enabled(environ: MutableMapping[str, str]) -> bool:
    return environ.get("JAXCL_CPU_TUNING", "1") != "0" and cpu_only(environ)


def _jaxlib_minor_version() -> tuple[int, int] | None:
    try:
        from importlib.metadata import version

        major, minor = version("jaxlib").split(".")[:2]
        return int(major), int(minor)
    except Exception:  # noqa: BLE001 - no or oddly versioned jaxlib: leave XLA_FLAGS alone.
        return None


def set_xla_cpu_flags(environ: MutableMapping[str, str] = os.environ) -> bool:
    """Appends NO_YNN_CONVOLUTIONS to XLA_FLAGS when tuning applies; returns whether it did.

    A user's own `--xla_cpu_experimental_ynn_fusion_type` in XLA_FLAGS is kept as it is.
    """
    flags = environ.get("XLA_FLAGS", "")
    if not tuning_enabled(environ) or "--xla_cpu_experimental_ynn_fusion_type" in flags:
        return False
    if _jaxlib_minor_version() not in CHECKED_JAXLIB_MINOR_VERSIONS:
        logging.info("XLA:CPU convolution setting not applied: jaxlib version not checked.")
        return False
    environ["XLA_FLAGS"] = f"{flags} {NO_YNN_CONVOLUTIONS}".strip()
    return True


def _glibc_version() -> tuple[int, int] | None:
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
        major, minor = version.split(".")[:2]
        return int(major), int(minor)
    except (AttributeError, OSError, ValueError):
        return None


def _transparent_hugepages_available() -> bool:
    try:
        with open(_THP_SETTING, encoding="ascii") as file:
            setting = file.read()
    except OSError:
        return False
    return "[always]" in setting or "[madvise]" in setting


def hugepage_environment(environ: MutableMapping[str, str]) -> dict[str, str] | None:
    """The environment to re-execute with for huge pages, or None if no re-execution is needed."""
    tunables = environ.get("GLIBC_TUNABLES", "")
    if (
        not tuning_enabled(environ)
        or "glibc.malloc.hugetlb" in tunables
        or sys.platform != "linux"
        or (_glibc_version() or (0, 0)) < (2, 35)
        or not _transparent_hugepages_available()
    ):
        return None
    return {**environ, "GLIBC_TUNABLES": ":".join(filter(None, [tunables, HUGEPAGE_TUNABLE]))}


def find_jemalloc() -> str | None:
    """The installed jemalloc library's file name (e.g. "libjemalloc.so.2"), or None."""
    return ctypes.util.find_library(JEMALLOC)


def jemalloc_environment(
    environ: MutableMapping[str, str], library: str | None
) -> dict[str, str] | None:
    """The environment to re-execute with `library` (jemalloc) preloaded, or None if none is
    found or needed.

    A user's own MALLOC_CONF is kept as it is; the library goes first in LD_PRELOAD.
    """
    preload = environ.get("LD_PRELOAD", "")
    if (
        library is None
        or not tuning_enabled(environ)
        or sys.platform != "linux"
        or JEMALLOC in preload
    ):
        return None
    return {
        **environ,
        "LD_PRELOAD": " ".join(filter(None, [library, preload])),
        "MALLOC_CONF": environ.get("MALLOC_CONF", JEMALLOC_CONF),
    }


def allocator_environment(environ: MutableMapping[str, str]) -> dict[str, str] | None:
    """The environment to re-execute with: jemalloc if installed, else glibc's huge pages; None
    when the process already runs with either (or tuning is off)."""
    if JEMALLOC in environ.get("LD_PRELOAD", ""):
        return None
    return jemalloc_environment(environ, find_jemalloc()) or hugepage_environment(environ)


def tune_cpu_process(argv: Sequence[str] | None = None) -> None:
    """Applies both settings; call first thing in an entry point's `__main__` block.

    Re-executes the interpreter with the same command line (`sys.orig_argv`) when the allocator
    needs LD_PRELOAD or GLIBC_TUNABLES, so nothing may have been started before this call;
    returns otherwise.
    """
    environment = allocator_environment(os.environ)
    if environment is not None:
        argv = list(argv if argv is not None else sys.orig_argv)
        os.execve(sys.executable, argv, environment)
    set_xla_cpu_flags(os.environ)
