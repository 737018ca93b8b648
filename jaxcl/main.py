"""Runs the stages of a config: `python -m jaxcl.main --config=configs/<dataset>.py --workdir=DIR`.

Stages already finished in WORKDIR are skipped; an interrupted stage resumes from its last
checkpoint. Config values can be overridden on the command line, e.g.
`--config.finetune.steps=100` or `--config=configs/synthetic.py:quick`.

On a CPU-only machine the process first applies `jaxcl.runtime`'s XLA:CPU settings (it may
re-execute itself once for its memory allocator), which is why the trainer is imported inside
`main`.
"""

from absl import app, flags
from ml_collections import config_flags

from jaxcl import runtime

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/<dataset>.py).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Folder for checkpoints, metrics and results.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    # Imported here, after runtime.tune_cpu_process: importing them takes seconds.
    from jaxcl import entry
    from jaxcl.train import distributed, trainer

    def work():
        distributed.initialize(_CONFIG.value)
        trainer.train_and_evaluate(_CONFIG.value, _WORKDIR.value)

    entry.run(work)


if __name__ == "__main__":
    runtime.tune_cpu_process()
    app.run(main)
