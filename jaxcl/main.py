"""Runs the stages of a config: `python -m jaxcl.main --config=configs/<dataset>.py --workdir=DIR`.

Stages already finished in WORKDIR are skipped; an interrupted stage resumes from its last
checkpoint. Config values can be overridden on the command line, e.g.
`--config.finetune.steps=100` or `--config=configs/synthetic.py:quick`.
"""

import logging
import sys

from absl import app, flags
from ml_collections import config_flags

from jaxcl.data.sources import DataError
from jaxcl.train import loop, trainer

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/<dataset>.py).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Folder for checkpoints, metrics and results.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logging.getLogger().setLevel(logging.INFO)
    # jaxcl logs progress at INFO; orbax, TFDS and clu (absl logger) and jax only errors.
    for noisy in ("absl", "jax"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        trainer.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    except (DataError, FileNotFoundError, loop.NonFiniteLossError) as error:
        print(f"jaxcl: {error}", file=sys.stderr)
        sys.exit(1)
    except loop.PreemptedError as error:
        print(f"jaxcl: {error}", file=sys.stderr)
        sys.exit(143)


if __name__ == "__main__":
    app.run(main)
