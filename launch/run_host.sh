#!/usr/bin/env bash
# The jaxcl trainer on one host: `launch/run_host.sh --config=configs/X.py --workdir=DIR [...]`.
#
# `launch/tpu_vm.sh run` starts this on every worker of a Cloud TPU VM at once; every host runs
# the same command, and on a pod slice the trainer connects the hosts itself
# (jax.distributed.initialize finds them from the TPU metadata). It runs
# `python -m jaxcl.main "$@"` from the repository root (configs import configs/base.py) in the
# virtual environment made by `tpu_vm.sh setup` ($JAXCL_VENV, default ~/jaxcl-venv), and exits
# with the trainer's exit code: 0 finished, 1 bad data or config, 143 stopped by SIGTERM after
# saving a checkpoint (preemption or `tpu_vm.sh stop`); the same command then resumes the run.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${JAXCL_VENV:-$HOME/jaxcl-venv}"
if [[ ! -f $venv/bin/activate ]]; then
  echo "run_host.sh: no virtual environment at $venv: run 'launch/tpu_vm.sh setup' (or set" \
    "JAXCL_VENV to the venv where jaxcl is installed)." >&2
  exit 1
fi
# shellcheck source=/dev/null
source "$venv/bin/activate"

# TensorFlow only reads the prepared data (TFDS); jaxcl installs tensorflow-cpu, which never
# touches the TPU. A full tensorflow build next to libtpu could try to open the TPU as well.
if python -c 'import importlib.metadata as m; m.version("tensorflow")' 2>/dev/null; then
  echo "run_host.sh: warning: 'tensorflow' is installed in $venv; jaxcl needs only" \
    "tensorflow-cpu (pip uninstall tensorflow && pip install tensorflow-cpu)." >&2
fi
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}" # TensorFlow's C++ info/warnings
export PYTHONUNBUFFERED=1                                 # log lines reach the log file at once

cd "$repo_root"
echo "=== $(date -u +%Y-%m-%dT%H:%M:%SZ) $(hostname): python -m jaxcl.main $*"
status=0
python -m jaxcl.main "$@" || status=$?
case $status in
  0) outcome="finished" ;;
  143) outcome="stopped by SIGTERM after saving a checkpoint; rerun the same command to resume" ;;
  *) outcome="failed with exit code $status" ;;
esac
echo "=== $(date -u +%Y-%m-%dT%H:%M:%SZ) $(hostname): jaxcl $outcome"
exit "$status"
