"""Test-wide set-up: 8 fake CPU devices so data-parallel code is tested on a laptop or CI box."""

import os

# Must happen before jax initialises its backends; single-device code still runs on device 0.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
