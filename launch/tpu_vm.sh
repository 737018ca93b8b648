#!/usr/bin/env bash
# Runs jaxcl on a Cloud TPU VM (one host such as v4-8, or a pod slice such as v4-32) with gcloud:
# create the VM, install jaxcl on every worker, start the same training command on all workers,
# follow the logs, delete the VM. `launch/tpu_vm.sh --help` lists the subcommands; docs/TPU.md
# walks through a whole run. Every command goes through `execute`, so --dry-run prints each one
# exactly as it would run (shell-quoted, one per line) instead of running it.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
readonly REPO_ROOT
# On every worker, relative to the login user's home folder (where gcloud ssh commands start).
readonly REMOTE_CODE="jaxcl"
readonly REMOTE_VENV="jaxcl-venv"
readonly REMOTE_LOG="jaxcl-logs/run.log"
readonly REMOTE_ARCHIVE="jaxcl-src.tar.gz"
# The trainer's command line, as a pattern that does not match itself (for pgrep/pkill -f).
readonly TRAINER_PATTERN="jaxcl[.]main"

usage() {
  cat <<'EOF'
Usage: launch/tpu_vm.sh SUBCOMMAND --name=NAME --zone=ZONE [--project=PROJECT] [--dry-run] [FLAGS]

Subcommands:
  create   Create the TPU VM.
             --accelerator-type=TYPE   e.g. v4-8, v4-32, v5litepod-8 (required)
             --version=RUNTIME         TPU software version; default from TYPE: v2/v3/v4 ->
                                       tpu-ubuntu2204-base, v5litepod/v5e -> v2-alpha-tpuv5-lite,
                                       v5p -> v2-alpha-tpuv5, v6e -> v2-alpha-tpuv6e
             --spot | --preemptible    cheaper VMs that can be preempted (docs/TPU.md)
  setup    Put the code on every worker and install it into ~/jaxcl-venv:
           pip install -e ~/jaxcl, then pip install -U "jax[tpu]".
             (default)                 copy this checkout (the files git lists: tracked and
                                       untracked-but-not-ignored) to ~/jaxcl on every worker
             --git=URL [--ref=REF]     instead clone URL (at branch/tag/commit REF) on every worker
             --python=python3.X        Python for the venv (default python3.11; installed with
                                       apt when missing). Ubuntu 22.04's python3 is 3.10, for
                                       which pip only finds older jax/flax releases.
  run      Start `python -m jaxcl.main` on all workers at once, detached (nohup), each worker
           appending to its own ~/jaxcl-logs/run.log. Exit code 143 in the log means the run
           was preempted or stopped after saving a checkpoint: the same `run` resumes it.
             --config=configs/X.py[:quick]   config file, relative to the repository (required)
             --workdir=gs://BUCKET/runs/X    run folder; use gs:// so that every worker shares it
                                             and it outlives the VM (required)
             --config.KEY=VALUE              any number of config overrides, passed on as given
  logs     Print the end of a worker's log.
             --worker=N|all (default 0)  --lines=N (default 100)  --follow (keep printing)
  status   Describe the VM (state, health, accelerator) and list jaxcl processes on each worker.
           `describe` is the same.
  stop     Send SIGTERM to the trainer on every worker: it saves a checkpoint and exits with 143.
             --force                   SIGKILL instead (for a hung run; resumes from the last
                                       periodic checkpoint)
  delete   Delete the TPU VM (gcloud asks to confirm).
             --yes                     do not ask

Common flags (values are given as --flag=value):
  --name=NAME        TPU VM name (default: $JAXCL_TPU_NAME)
  --zone=ZONE        e.g. us-central2-b (default: $JAXCL_TPU_ZONE)
  --project=PROJECT  Google Cloud project (default: $JAXCL_TPU_PROJECT, else gcloud's config)
  --dry-run          print every command, one per line and shell-quoted, instead of running it
  -h, --help         this text

Exit codes: 0 done, 2 bad usage, 127 gcloud not installed, else the failing command's code.
Running on all workers of a pod needs your gcloud SSH key in ssh-agent first:
  ssh-add ~/.ssh/google_compute_engine
EOF
}

# ---------------------------------------------------------------------------------------------
# Helpers.

usage_error() {
  echo "tpu_vm.sh: $*" >&2
  echo "Run 'launch/tpu_vm.sh --help' for usage." >&2
  exit 2
}

# One word as a shell reads it back: as is when it holds only safe characters, else in single
# quotes with each ' written as '\''; a --flag=value word gets only its value quoted.
quote() {
  local escaped="'\\''"
  if [[ $1 =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "$1"
  elif [[ $1 =~ ^--[A-Za-z0-9_.-]+= ]]; then
    printf '%s' "${BASH_REMATCH[0]}"
    quote "${1#*=}"
  else
    printf "'%s'" "${1//\'/$escaped}"
  fi
}

# The arguments quoted and joined by spaces: one command line.
quote_all() {
  local word line=""
  for word in "$@"; do
    line+="${line:+ }$(quote "$word")"
  done
  printf '%s\n' "$line"
}

# Shell statements joined into one line: `a; b; c`.
statements() {
  local statement line=""
  for statement in "$@"; do
    line+="${line:+; }$statement"
  done
  printf '%s' "$line"
}

# Runs a command or, with --dry-run, prints it.
execute() {
  if ((DRY_RUN)); then
    quote_all "$@"
  else
    "$@"
  fi
}

# `gcloud compute tpus tpu-vm VERB TARGET --zone=... [--project=...] ARGS...`.
tpu_vm() {
  local verb=$1 target=$2
  shift 2
  execute gcloud compute tpus tpu-vm "$verb" "$target" "${LOCATION[@]}" "$@"
}

# Runs one line of shell on workers (`all` or an index), from the login user's home folder.
on_workers() {
  tpu_vm ssh "$NAME" --worker="$1" --command="$2"
}

# take VAR --flag=value: sets VAR to value; exits 2 when value is empty.
take() {
  [[ -n ${2#*=} ]] || usage_error "${2%%=*} needs a value: ${2%%=*}=VALUE."
  printf -v "$1" '%s' "${2#*=}"
}

# Exits 2 on an argument the subcommand does not take.
unknown_flag() {
  case $1 in
    --*=*) usage_error "$SUBCOMMAND does not take ${1%%=*}." ;;
    --accelerator-type | --version | --git | --ref | --python | --config | --workdir | \
      --worker | --lines)
      usage_error "$1 needs a value: $1=VALUE." ;;
    *) usage_error "$SUBCOMMAND does not take '$1'." ;;
  esac
}

# ---------------------------------------------------------------------------------------------
# Subcommands: each parses its own flags (main has taken the common ones).

cmd_create() {
  local accelerator="" version="" capacity=()
  while (($#)); do
    case $1 in
      --accelerator-type=*) take accelerator "$1" ;;
      --version=*) take version "$1" ;;
      --spot | --preemptible) capacity+=("$1") ;;
      *) unknown_flag "$1" ;;
    esac
    shift
  done
  [[ -n $accelerator ]] || usage_error "create needs --accelerator-type=TYPE (e.g. v4-8, v4-32)."
  if ((${#capacity[@]} > 1)); then
    usage_error "give one of --spot and --preemptible, not both."
  fi
  if [[ -z $version ]]; then
    case $accelerator in
      v2-* | v3-* | v4-*) version="tpu-ubuntu2204-base" ;;
      v5litepod-* | v5e-*) version="v2-alpha-tpuv5-lite" ;;
      v5p-*) version="v2-alpha-tpuv5" ;;
      v6e-*) version="v2-alpha-tpuv6e" ;;
      *) usage_error "no default runtime for --accelerator-type=$accelerator; give --version." ;;
    esac
  fi
  tpu_vm create "$NAME" --accelerator-type="$accelerator" --version="$version" \
    ${capacity[@]+"${capacity[@]}"}
}

cmd_setup() {
  local git_url="" ref="" python="python3.11"
  while (($#)); do
    case $1 in
      --git=*) take git_url "$1" ;;
      --ref=*) take ref "$1" ;;
      --python=*) take python "$1" ;;
      *) unknown_flag "$1" ;;
    esac
    shift
  done
  [[ -z $ref || -n $git_url ]] || usage_error "--ref=$ref needs --git=URL."
  [[ $python =~ ^python3(\.[0-9]+)?$ ]] ||
    usage_error "--python=$python: give a name such as python3.11 (also its apt package name)."

  local fetch=("rm -rf $REMOTE_CODE")
  if [[ -n $git_url ]]; then
    fetch+=("git clone --quiet $(quote "$git_url") $REMOTE_CODE")
    [[ -z $ref ]] || fetch+=("git -C $REMOTE_CODE checkout --quiet $(quote "$ref")")
  else
    git -C "$REPO_ROOT" rev-parse --is-inside-work-tree >/dev/null 2>&1 ||
      usage_error "$REPO_ROOT is not a git checkout; copying uses git's file list (or give --git=URL)."
    local archive="${TMPDIR:-/tmp}/jaxcl-src-$NAME.tar.gz"
    # The files git lists (no venvs, workdirs or caches), packed so each worker gets one file.
    # shellcheck disable=SC2016 # the inner bash expands $1 and $2.
    execute bash -c \
      'cd "$1" && git ls-files -z --cached --others --exclude-standard | tar --null -T - -czf "$2"' \
      tpu_vm.sh "$REPO_ROOT" "$archive"
    execute gcloud compute tpus tpu-vm scp "$archive" "$NAME:$REMOTE_ARCHIVE" "${LOCATION[@]}" \
      --worker=all
    fetch+=(
      "mkdir $REMOTE_CODE"
      "tar -xzf $REMOTE_ARCHIVE -C $REMOTE_CODE"
      "rm $REMOTE_ARCHIVE"
    )
  fi
  local apt="sudo apt-get -qq -o DPkg::Lock::Timeout=600" pip="$REMOTE_VENV/bin/pip"
  on_workers all "$(statements "set -e" "${fetch[@]}" \
    "if ! $python -c \"import ensurepip\" 2>/dev/null; then $apt update; $apt install -y $python $python-venv; fi" \
    "$python -m venv $REMOTE_VENV" \
    "$pip install -q -U pip" \
    "$pip install -q -e ./$REMOTE_CODE" \
    "$pip install -q -U \"jax[tpu]\"" \
    "echo \"\$(hostname): jaxcl installed in ~/$REMOTE_VENV\"")"
}

cmd_run() {
  local config="" workdir="" overrides=()
  while (($#)); do
    case $1 in
      --config=*) take config "$1" ;;
      --workdir=*) take workdir "$1" ;;
      --config.*=*) overrides+=("$1") ;;
      *) unknown_flag "$1" ;;
    esac
    shift
  done
  [[ -n $config ]] || usage_error "run needs --config=configs/X.py (relative to the repository)."
  [[ -n $workdir ]] || usage_error "run needs --workdir=gs://BUCKET/runs/NAME."
  if [[ $workdir != gs://* ]]; then
    echo "tpu_vm.sh: warning: --workdir=$workdir is on each worker's own disk: the workers of a" \
      "pod do not share it and it is lost with the VM; gs://BUCKET/... is both shared and kept." >&2
  fi
  local runner="$REMOTE_CODE/launch/run_host.sh" args
  args=$(quote_all "--config=$config" "--workdir=$workdir" ${overrides[@]+"${overrides[@]}"})
  on_workers all "$(statements "set -e" \
    "test -f $runner || { echo \"\$(hostname): no ~/$runner; run launch/tpu_vm.sh setup first.\" >&2; exit 1; }" \
    "if pgrep -f \"$TRAINER_PATTERN\" >/dev/null; then echo \"\$(hostname): jaxcl is already running; wait for it or run launch/tpu_vm.sh stop.\" >&2; exit 1; fi" \
    "mkdir -p ${REMOTE_LOG%/*}" \
    "setsid nohup bash $runner $args >>$REMOTE_LOG 2>&1 </dev/null & echo \"\$(hostname): started; log in ~/$REMOTE_LOG\"")"
}

cmd_logs() {
  local worker=0 lines=100 follow=""
  while (($#)); do
    case $1 in
      --worker=*) take worker "$1" ;;
      --lines=*) take lines "$1" ;;
      --follow) follow=" -F" ;;
      *) unknown_flag "$1" ;;
    esac
    shift
  done
  [[ $worker =~ ^([0-9]+|all)$ ]] || usage_error "--worker=$worker: give a worker index or all."
  [[ $lines =~ ^[0-9]+$ ]] || usage_error "--lines=$lines: give a number of lines."
  on_workers "$worker" "tail -n $lines$follow $REMOTE_LOG"
}

cmd_status() {
  (($# == 0)) || unknown_flag "$1"
  tpu_vm describe "$NAME"
  on_workers all "pgrep -af \"$TRAINER_PATTERN\" || echo \"\$(hostname): no jaxcl process\""
}

cmd_stop() {
  local signal=TERM
  while (($#)); do
    case $1 in
      --force) signal=KILL ;;
      *) unknown_flag "$1" ;;
    esac
    shift
  done
  on_workers all "if pkill -$signal -f \"$TRAINER_PATTERN\"; then echo \"\$(hostname): sent SIG$signal\"; else echo \"\$(hostname): no jaxcl process\"; fi"
}

cmd_delete() {
  local confirm=()
  while (($#)); do
    case $1 in
      --yes) confirm=(--quiet) ;;
      *) unknown_flag "$1" ;;
    esac
    shift
  done
  tpu_vm delete "$NAME" ${confirm[@]+"${confirm[@]}"}
}

# ---------------------------------------------------------------------------------------------

main() {
  NAME=${JAXCL_TPU_NAME:-}
  ZONE=${JAXCL_TPU_ZONE:-}
  DRY_RUN=0
  SUBCOMMAND=""
  local project=${JAXCL_TPU_PROJECT:-} rest=()
  while (($#)); do
    case $1 in
      -h | --help)
        usage
        exit 0
        ;;
      --dry-run) DRY_RUN=1 ;;
      --name=*) take NAME "$1" ;;
      --zone=*) take ZONE "$1" ;;
      --project=*) take project "$1" ;;
      --name | --zone | --project) usage_error "$1 needs a value: $1=VALUE." ;;
      *)
        if [[ -z $SUBCOMMAND && $1 != -* ]]; then
          SUBCOMMAND=$1
        else
          rest+=("$1")
        fi
        ;;
    esac
    shift
  done
  local subcommands="create, setup, run, logs, status, stop or delete"
  case $SUBCOMMAND in
    create | setup | run | logs | status | stop | delete) ;;
    describe) SUBCOMMAND=status ;;
    "") usage_error "missing subcommand ($subcommands)." ;;
    *) usage_error "unknown subcommand '$SUBCOMMAND' ($subcommands)." ;;
  esac
  [[ -n $NAME ]] || usage_error "$SUBCOMMAND needs --name=NAME (or JAXCL_TPU_NAME)."
  [[ -n $ZONE ]] || usage_error "$SUBCOMMAND needs --zone=ZONE (or JAXCL_TPU_ZONE)."
  LOCATION=(--zone="$ZONE")
  [[ -z $project ]] || LOCATION+=(--project="$project")
  if ((!DRY_RUN)) && ! command -v gcloud >/dev/null 2>&1; then
    echo "tpu_vm.sh: gcloud not found: install the Google Cloud CLI" \
      "(https://cloud.google.com/sdk/docs/install), or add --dry-run to print the commands." >&2
    exit 127
  fi
  "cmd_$SUBCOMMAND" ${rest[@]+"${rest[@]}"}
}

main "$@"
