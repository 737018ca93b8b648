"""The paper's experiment protocol: initialisations x labelled sets x subsets x seeds, one sweep.

  plan      which pre-trainings and cells `config.sweep` selects, their workdirs and configs
  sweep     runs them in order through `trainer.train_and_evaluate` (resumable), with progress
  records   run times, git commit and the config a sweep's workdir was started with
  table     results.csv rows and the paper's Markdown tables 1 and 2 (pure)
  plot      mean Dice against |X_tr| per initialisation
  statistics  95 % t intervals and the verdicts they give (pure)
  claims    the paper's claims checked with paired differences and their intervals (pure)
  diagnostics  pre-training loss curves and fine-tuning validation: were the budgets enough?
  report    reads the finished cells and writes results.csv / results.md / results.png

Command line: `python -m jaxcl.experiments --config=configs/<dataset>.py --workdir=DIR`
(docs/EXPERIMENTS.md).
"""
