"""Test-wide set-up: 8 fake CPU devices so data-parallel code is tested on a laptop or CI box.

Unit tests compile many small programs and run each once or twice, so LLVM's backend
optimisations (most of XLA:CPU's compile time) cost far more than they save: they are off here.
The end-to-end tests in tests/test_main.py start their own processes without these flags.
"""

import os

# Must happen before jax initialises its backends; single-device code still runs on device 0.
os.environ.setdefault(
    "XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402 - after the flags above
import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _drop_compiled_programs():
    """Frees every test module's compiled programs when it ends.

    XLA:CPU keeps the machine code of each executable jax caches mapped into the process, and
    Linux caps a process at 65,530 memory maps: the whole suite in one process crossed it
    (a segmentation fault while writing a compiled program) until each module's were dropped.
    """
    yield
    jax.clear_caches()
