"""What `python -m jaxcl.main` and `python -m jaxcl.experiments` share around their work.

Logging levels, the persistent compilation cache, and turning jaxcl's user-facing errors into
a one-line message and an exit code instead of a traceback: 1 for bad input (data, config,
missing files) or a non-finite loss, 143 for a run stopped by SIGTERM after saving (rerun the
same command to resume).

Entry points call `jaxcl.runtime.tune_cpu_process()` first and import this module inside their
absl `main`, because importing the trainer takes seconds.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable

import jax

from jaxcl.config_validation import ConfigError
from jaxcl.data.sources import DataError
from jaxcl.train.errors import NonFiniteLossError, PreemptedError

EXIT_BAD_INPUT = 1
EXIT_PREEMPTED = 143
DEFAULT_COMPILATION_CACHE = "~/.cache/jaxcl/xla"


def configure_logging() -> None:
    """jaxcl logs progress at INFO; orbax, TFDS and clu (the absl logger) and jax only errors."""
    logging.getLogger().setLevel(logging.INFO)
    for noisy in ("absl", "jax"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def enable_compilation_cache() -> None:
    """Keeps compiled programs on disk so reruns, resumed runs and sweep cells skip XLA compiles.

    `JAX_COMPILATION_CACHE_DIR` (jax's own setting) wins; otherwise DEFAULT_COMPILATION_CACHE.
    """
    if jax.config.jax_compilation_cache_dir is None:
        path = os.path.expanduser(DEFAULT_COMPILATION_CACHE)
        jax.config.update("jax_compilation_cache_dir", path)


def run(work: Callable[[], object], bad_input: tuple[type[Exception], ...] = ()) -> None:
    """Runs `work()`, exiting with a short message on jaxcl's user-facing errors.

    `bad_input` adds an entry point's own error types to those that exit with EXIT_BAD_INPUT.
    """
    configure_logging()
    enable_compilation_cache()
    user_errors = (DataError, ConfigError, FileNotFoundError, NonFiniteLossError)
    try:
        work()
    except (*user_errors, *bad_input) as error:
        print(f"jaxcl: {error}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    except PreemptedError as error:
        print(f"jaxcl: {error}", file=sys.stderr)
        sys.exit(EXIT_PREEMPTED)
