"""The paper's sweep: `python -m jaxcl.experiments --config=configs/<dataset>.py --workdir=DIR`.

Pre-trains every initialisation `config.sweep` selects once, fine-tunes and evaluates every cell,
and writes DIR/results.csv, DIR/results.md and DIR/results.png (docs/EXPERIMENTS.md). Rerunning
the same command skips what finished and resumes what was interrupted; `--only_report` rewrites
the outputs from the finished cells without training; `--export_markdown=docs/RESULTS.md` also
writes the report (and its plot, RESULTS.png) there. Choose a subset on the command line, e.g.
`--config.sweep.inits=random,GD+LR --config.sweep.labelled_sets=tr1`.

Compiled programs are cached on disk (`jaxcl.entry.enable_compilation_cache`), so the cells
after the first skip most of XLA's compile time. As `jaxcl.main`, the process first applies
`jaxcl.runtime`'s XLA:CPU settings on CPU-only machines, so jaxcl is imported inside `main`.
"""

import shlex
import sys

from absl import app, flags
from ml_collections import config_flags

from jaxcl import runtime

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/<dataset>.py).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Folder of the sweep's runs and results.")
_ONLY_REPORT = flags.DEFINE_bool(
    "only_report", False, "Only rewrite results.csv/.md/.png from the finished cells in workdir."
)
_EXPORT_MARKDOWN = flags.DEFINE_string(
    "export_markdown",
    None,
    "Also write the report to this Markdown file, its plot beside it (e.g. docs/RESULTS.md and "
    "docs/RESULTS.png).",
)
flags.mark_flags_as_required(["config", "workdir"])


def _command() -> str:
    return shlex.join(["python", "-m", "jaxcl.experiments", *sys.argv[1:]])


def _run(config, workdir: str) -> None:
    from jaxcl import files  # after runtime.tune_cpu_process, as the imports in main
    from jaxcl.experiments import records, report, sweep
    from jaxcl.train import distributed

    if not _ONLY_REPORT.value:
        distributed.initialize(config)
        sweep.run_sweep(config, workdir, command=_command())
        if _EXPORT_MARKDOWN.value is None or not distributed.is_main_process():
            return
    elif not files.path(workdir).is_dir():
        raise FileNotFoundError(f"--workdir={workdir} does not exist: no sweep to report on.")
    report.write_report(
        workdir,
        dataset=config.data.dataset,
        command=_command(),
        commit=records.git_commit(),
        export_markdown=_EXPORT_MARKDOWN.value,
    )


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    # Imported here, after runtime.tune_cpu_process: importing them takes seconds.
    from jaxcl import entry
    from jaxcl.experiments.plan import SweepConfigError

    entry.run(lambda: _run(_CONFIG.value, _WORKDIR.value), bad_input=(SweepConfigError,))


if __name__ == "__main__":
    runtime.tune_cpu_process()
    app.run(main)
