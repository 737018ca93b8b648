"""launch/tpu_vm.sh and launch/run_host.sh, without Google Cloud.

`--dry-run` prints each command shell-quoted on one line; the tests read the lines back with
`shlex.split` and check the argv that gcloud would get. A stub `gcloud` on PATH checks that a
real run calls gcloud with exactly the printed argv. The shell commands sent to the workers are
run here in a fake home folder with a stub runner, which checks that the trainer's arguments
survive both levels of quoting and that the runner is started detached with its log.
"""

from __future__ import annotations

import os
import pathlib
import shlex
import shutil
import stat
import subprocess
import sys
import tarfile
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
TPU_VM = REPO / "launch" / "tpu_vm.sh"
RUN_HOST = REPO / "launch" / "run_host.sh"
BASH = shutil.which("bash")
TPU = ["gcloud", "compute", "tpus", "tpu-vm"]
VM = ("--name=my-tpu", "--zone=us-central2-b")
ZONE = "--zone=us-central2-b"
TIMEOUT = 60


def _environ(extra: dict[str, str] | None = None) -> dict[str, str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("JAXCL_TPU_")}
    environ.update(extra or {})
    return environ


def tpu_vm(*args: str, env: dict[str, str] | None = None, dry_run: bool = True):
    command = [BASH, str(TPU_VM), *(["--dry-run"] if dry_run else []), *args]
    return subprocess.run(
        command, capture_output=True, text=True, env=_environ(env), timeout=TIMEOUT, check=False
    )


def commands(*args: str, env: dict[str, str] | None = None) -> list[list[str]]:
    """The argv of each command that `tpu_vm.sh --dry-run ARGS` prints."""
    result = tpu_vm(*args, env=env)
    assert result.returncode == 0, result.stderr
    return [shlex.split(line) for line in result.stdout.splitlines()]


def remote_command(argv: list[str]) -> str:
    """The shell line of a `gcloud ... ssh ... --command=LINE` argv."""
    (line,) = [arg.removeprefix("--command=") for arg in argv if arg.startswith("--command=")]
    return line


def assert_valid_shell(line: str) -> None:
    result = subprocess.run([BASH, "-n", "-c", line], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr


def write_script(path: pathlib.Path, text: str) -> pathlib.Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/usr/bin/env bash\n" + text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def wait_for(path: pathlib.Path, seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} was not written"
        time.sleep(0.05)


# ---------------------------------------------------------------------------------------------
# create


def test_create_spot_pod_prints_the_gcloud_command():
    (argv,) = commands("create", *VM, "--accelerator-type=v4-32", "--spot")
    assert argv == [
        *TPU,
        "create",
        "my-tpu",
        ZONE,
        "--accelerator-type=v4-32",
        "--version=tpu-ubuntu2204-base",
        "--spot",
    ]


@pytest.mark.parametrize(
    ("accelerator", "runtime"),
    [
        ("v4-8", "tpu-ubuntu2204-base"),
        ("v5litepod-8", "v2-alpha-tpuv5-lite"),
        ("v5p-8", "v2-alpha-tpuv5"),
        ("v6e-8", "v2-alpha-tpuv6e"),
    ],
)
def test_create_takes_the_runtime_of_the_accelerator(accelerator, runtime):
    (argv,) = commands("create", *VM, f"--accelerator-type={accelerator}")
    assert f"--version={runtime}" in argv
    assert "--spot" not in argv and "--preemptible" not in argv


def test_create_with_project_version_and_preemptible():
    (argv,) = commands(
        "create",
        *VM,
        "--project=my-project",
        "--accelerator-type=v4-8",
        "--version=tpu-vm-base",
        "--preemptible",
    )
    assert argv[:6] == [*TPU, "create", "my-tpu"]
    assert sorted(argv[6:]) == sorted(
        [
            ZONE,
            "--project=my-project",
            "--accelerator-type=v4-8",
            "--version=tpu-vm-base",
            "--preemptible",
        ]
    )


def test_name_zone_and_project_default_to_the_environment():
    env = {"JAXCL_TPU_NAME": "env-tpu", "JAXCL_TPU_ZONE": "europe-west4-a"}
    (argv,) = commands("delete", env={**env, "JAXCL_TPU_PROJECT": "env-project"})
    assert argv == [
        *TPU,
        "delete",
        "env-tpu",
        "--zone=europe-west4-a",
        "--project=env-project",
    ]
    (argv,) = commands("delete", "--name=flag-tpu", env=env)
    assert argv[5:7] == ["flag-tpu", "--zone=europe-west4-a"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("create", "--zone=z", "--accelerator-type=v4-8"), "--name=NAME"),
        (("create", "--name=n", "--accelerator-type=v4-8"), "--zone=ZONE"),
        (("create", *VM), "--accelerator-type=TYPE"),
        (("create", *VM, "--accelerator-type=v4-8", "--spot", "--preemptible"), "not both"),
        (("create", *VM, "--accelerator-type=tpu7-8"), "give --version"),
        (("create", *VM, "--accelerator-type="), "--accelerator-type needs a value"),
        (("create", *VM, "--accelerator-type", "v4-8"), "--accelerator-type needs a value"),
        (("create", "--name", "my-tpu", "--zone=z"), "--name needs a value"),
        (("create", *VM, "--workers=4"), "create does not take --workers"),
        (("launch", *VM), "unknown subcommand 'launch'"),
        (VM, "missing subcommand"),
        (("run", *VM, "--workdir=gs://b/r"), "--config=configs/X.py"),
        (("run", *VM, "--config=configs/acdc.py"), "--workdir=gs://BUCKET"),
        (("run", *VM, "--config=c.py", "--workdir=w", "--steps=3"), "run does not take --steps"),
        (("run", *VM, "--config=c.py", "--workdir=w", "extra"), "run does not take 'extra'"),
        (("setup", *VM, "--ref=v1"), "--ref=v1 needs --git=URL"),
        (("setup", *VM, "--python=/usr/bin/python3"), "python3.11"),
        (("logs", *VM, "--worker=first"), "worker index or all"),
        (("logs", *VM, "--lines=many"), "number of lines"),
        (("status", *VM, "--follow"), "status does not take '--follow'"),
    ],
)
def test_bad_usage_exits_2_with_a_message(args, message):
    result = tpu_vm(*args)
    assert result.returncode == 2
    assert message in result.stderr
    assert "--help" in result.stderr
    assert result.stdout == ""


def test_help_lists_every_subcommand():
    for args in (("--help",), ("run", "-h")):
        result = tpu_vm(*args, dry_run=False)
        assert result.returncode == 0
        for subcommand in ("create", "setup", "run", "logs", "status", "stop", "delete"):
            assert f"\n  {subcommand} " in result.stdout


# ---------------------------------------------------------------------------------------------
# setup


def test_setup_copies_the_checkout_and_installs_on_every_worker(tmp_path):
    pack, copy, install = commands("setup", *VM, env={"TMPDIR": str(tmp_path)})
    archive = tmp_path / "jaxcl-src-my-tpu.tar.gz"
    assert pack[:2] == ["bash", "-c"] and pack[-2:] == [str(REPO), str(archive)]
    assert copy == [*TPU, "scp", str(archive), "my-tpu:jaxcl-src.tar.gz", ZONE, "--worker=all"]
    assert install[:6] == [*TPU, "ssh", "my-tpu"]
    assert ZONE in install and "--worker=all" in install
    line = remote_command(install)
    assert_valid_shell(line)
    steps = line.split("; ")
    assert steps[:5] == [
        "set -e",
        "rm -rf jaxcl",
        "mkdir jaxcl",
        "tar -xzf jaxcl-src.tar.gz -C jaxcl",
        "rm jaxcl-src.tar.gz",
    ]
    assert "python3.11 -m venv jaxcl-venv" in steps
    assert steps.index("jaxcl-venv/bin/pip install -q -e ./jaxcl") < steps.index(
        'jaxcl-venv/bin/pip install -q -U "jax[tpu]"'
    )

    # The printed packing command runs as printed: the files git lists, nothing it ignores.
    subprocess.run(pack, check=True, timeout=TIMEOUT, env=_environ())
    with tarfile.open(archive) as packed:
        names = set(packed.getnames())
    assert {"setup.py", "launch/tpu_vm.sh", "launch/run_host.sh", "jaxcl/main.py"} <= names
    assert not any("__pycache__" in name or name.startswith(".git/") for name in names)


def test_setup_can_clone_a_git_ref_with_another_python():
    (install,) = commands(
        "setup", *VM, "--git=https://example.com/me/jaxcl.git", "--ref=v0.1", "--python=python3.12"
    )
    line = remote_command(install)
    assert_valid_shell(line)
    assert "--worker=all" in install
    steps = line.split("; ")
    assert steps[1:4] == [
        "rm -rf jaxcl",
        "git clone --quiet https://example.com/me/jaxcl.git jaxcl",
        "git -C jaxcl checkout --quiet v0.1",
    ]
    assert "python3.12 -m venv jaxcl-venv" in steps
    assert "install -y python3.12 python3.12-venv" in line


# ---------------------------------------------------------------------------------------------
# run


RUN_ARGS = [
    "--config=configs/acdc.py",
    "--workdir=gs://my-bucket/runs/acdc",
    "--config.model.dtype=bfloat16",
    "--config.data.root=/data/it's $HOME; `x`",
]


def _fake_home(tmp_path: pathlib.Path, *, running: bool) -> dict[str, str]:
    """A home folder with a stub runner that records its argv, and a stub pgrep."""
    home = tmp_path / "home"
    write_script(
        home / "jaxcl" / "launch" / "run_host.sh",
        'printf "%s\\0" "$@" > "$HOME/args.tmp"; mv "$HOME/args.tmp" "$HOME/args"\n'
        'echo "runner output"\n',
    )
    bin_dir = write_script(tmp_path / "bin" / "pgrep", f"exit {0 if running else 1}\n").parent
    return _environ({"HOME": str(home), "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"})


def test_run_starts_the_runner_detached_on_every_worker(tmp_path):
    (argv,) = commands("run", *VM, *RUN_ARGS)
    assert argv[:6] == [*TPU, "ssh", "my-tpu"] and "--worker=all" in argv and ZONE in argv
    line = remote_command(argv)
    assert "setsid nohup bash jaxcl/launch/run_host.sh " in line
    assert ">>jaxcl-logs/run.log 2>&1 </dev/null &" in line

    # What one worker does with the line: the runner gets exactly the arguments given here.
    env = _fake_home(tmp_path, running=False)
    home = pathlib.Path(env["HOME"])
    result = subprocess.run(
        [BASH, "-c", line], cwd=home, env=env, capture_output=True, text=True, timeout=TIMEOUT
    )
    assert result.returncode == 0, result.stderr
    assert "started; log in ~/jaxcl-logs/run.log" in result.stdout
    wait_for(home / "args")
    assert (home / "args").read_text().split("\0")[:-1] == RUN_ARGS
    deadline = time.monotonic() + 20
    while "runner output" not in (home / "jaxcl-logs" / "run.log").read_text():
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_run_refuses_while_a_run_is_going_or_before_setup(tmp_path):
    (argv,) = commands("run", *VM, *RUN_ARGS)
    env = _fake_home(tmp_path, running=True)
    home = pathlib.Path(env["HOME"])
    result = subprocess.run(
        [BASH, "-c", remote_command(argv)], cwd=home, env=env, capture_output=True, text=True
    )
    assert result.returncode == 1
    assert "jaxcl is already running" in result.stderr
    (home / "jaxcl" / "launch" / "run_host.sh").unlink()
    result = subprocess.run(
        [BASH, "-c", remote_command(argv)], cwd=home, env=env, capture_output=True, text=True
    )
    assert result.returncode == 1
    assert "run launch/tpu_vm.sh setup first" in result.stderr
    time.sleep(0.2)
    assert not (home / "args").exists()


def test_run_warns_about_a_workdir_outside_gcs():
    result = tpu_vm("run", *VM, "--config=configs/acdc.py", "--workdir=/tmp/run")
    assert result.returncode == 0
    assert "warning: --workdir=/tmp/run" in result.stderr
    assert "gs://" not in tpu_vm("run", *VM, *RUN_ARGS).stderr


# ---------------------------------------------------------------------------------------------
# logs, status, stop, delete


def test_logs_tails_one_worker():
    (argv,) = commands("logs", *VM)
    assert argv == [
        *TPU,
        "ssh",
        "my-tpu",
        ZONE,
        "--worker=0",
        "--command=tail -n 100 jaxcl-logs/run.log",
    ]
    (argv,) = commands("logs", *VM, "--worker=3", "--lines=20", "--follow")
    assert argv[-2:] == ["--worker=3", "--command=tail -n 20 -F jaxcl-logs/run.log"]
    (argv,) = commands("logs", *VM, "--worker=all")
    assert "--worker=all" in argv


def test_status_describes_the_vm_and_its_workers():
    describe, processes = commands("status", *VM)
    assert describe == [*TPU, "describe", "my-tpu", ZONE]
    assert processes[:8] == [*TPU, "ssh", "my-tpu", ZONE, "--worker=all"]
    assert remote_command(processes).startswith('pgrep -af "jaxcl[.]main"')
    assert commands("describe", *VM) == [describe, processes]


@pytest.mark.parametrize(("flags", "signal"), [((), "TERM"), (("--force",), "KILL")])
def test_stop_signals_the_trainer_on_every_worker(flags, signal):
    (argv,) = commands("stop", *VM, *flags)
    assert "--worker=all" in argv
    line = remote_command(argv)
    assert_valid_shell(line)
    assert f'pkill -{signal} -f "jaxcl[.]main"' in line


def test_delete_asks_unless_yes():
    assert commands("delete", *VM) == [[*TPU, "delete", "my-tpu", ZONE]]
    assert commands("delete", *VM, "--yes") == [[*TPU, "delete", "my-tpu", ZONE, "--quiet"]]


# ---------------------------------------------------------------------------------------------
# Without --dry-run.


def test_without_dry_run_gcloud_gets_the_printed_argv(tmp_path):
    record = tmp_path / "gcloud_calls"
    bin_dir = write_script(
        tmp_path / "bin" / "gcloud",
        f'{{ printf "%s\\0" "$@"; printf "\\1"; }} >> {shlex.quote(str(record))}\n',
    ).parent
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "TMPDIR": str(tmp_path)}
    for args in (
        ("create", *VM, "--accelerator-type=v4-32", "--spot"),
        ("setup", *VM),
        ("run", *VM, *RUN_ARGS),
        ("logs", *VM, "--follow"),
        ("stop", *VM),
        ("status", *VM),
        ("delete", *VM, "--yes"),
    ):
        record.unlink(missing_ok=True)
        result = tpu_vm(*args, env=env, dry_run=False)
        assert result.returncode == 0, result.stderr
        calls = [call.split("\0")[:-1] for call in record.read_text().split("\1")[:-1]]
        printed = [argv[1:] for argv in commands(*args, env=env) if argv[0] == "gcloud"]
        assert calls == printed


def test_without_gcloud_it_fails_clearly(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "dirname").symlink_to(shutil.which("dirname"))
    result = tpu_vm("status", *VM, env={"PATH": str(bin_dir)}, dry_run=False)
    assert result.returncode == 127
    assert "gcloud not found" in result.stderr and "--dry-run" in result.stderr


# ---------------------------------------------------------------------------------------------
# run_host.sh


def _fake_venv(tmp_path: pathlib.Path, *, tensorflow: bool = False) -> pathlib.Path:
    """A venv whose `python` records its working folder and argv and exits $FAKE_STATUS."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "activate").write_text(f'export PATH="{venv / "bin"}:$PATH"\n')
    write_script(
        venv / "bin" / "python",
        f"if [[ $1 == -c ]]; then exit {0 if tensorflow else 1}; fi\n"
        f'pwd > "{venv}/cwd"; printf "%s\\0" "$@" > "{venv}/argv"\n'
        'exit "$FAKE_STATUS"\n',
    )
    return venv


@pytest.mark.parametrize(
    ("status", "outcome"),
    [
        (0, "jaxcl finished"),
        (143, "stopped by SIGTERM after saving a checkpoint; rerun the same command"),
        (1, "jaxcl failed with exit code 1"),
    ],
)
def test_run_host_runs_the_trainer_from_the_repository(tmp_path, status, outcome):
    venv = _fake_venv(tmp_path)
    args = ["--config=configs/synthetic.py", "--workdir=gs://b/r", "--config.data.root=/a b"]
    env = _environ({"JAXCL_VENV": str(venv), "FAKE_STATUS": str(status)})
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)
    result = subprocess.run(
        [BASH, str(RUN_HOST), *args], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert result.returncode == status
    assert (venv / "cwd").read_text().strip() == str(REPO)
    assert (venv / "argv").read_text().split("\0")[:-1] == ["-m", "jaxcl.main", *args]
    assert outcome in result.stdout
    assert "warning" not in result.stderr


def test_run_host_warns_about_full_tensorflow_and_a_missing_venv(tmp_path):
    venv = _fake_venv(tmp_path, tensorflow=True)
    env = _environ({"JAXCL_VENV": str(venv), "FAKE_STATUS": "0"})
    result = subprocess.run([BASH, str(RUN_HOST)], env=env, capture_output=True, text=True)
    assert result.returncode == 0
    assert "'tensorflow' is installed" in result.stderr
    env["JAXCL_VENV"] = str(tmp_path / "missing")
    result = subprocess.run([BASH, str(RUN_HOST)], env=env, capture_output=True, text=True)
    assert result.returncode == 1
    assert "no virtual environment" in result.stderr and "tpu_vm.sh setup" in result.stderr


def test_run_host_in_this_venv_exits_like_the_trainer(tmp_path):
    venv = pathlib.Path(sys.prefix)
    if not (venv / "bin" / "activate").exists():
        pytest.skip("the tests do not run in a virtual environment")
    args = ["--config=configs/synthetic.py", f"--workdir={tmp_path}", "--unknown_flag=1"]
    direct = subprocess.run(
        [sys.executable, "-m", "jaxcl.main", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    result = subprocess.run(
        [BASH, str(RUN_HOST), *args],
        env=_environ({"JAXCL_VENV": str(venv)}),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert direct.returncode != 0
    assert result.returncode == direct.returncode
    assert "unknown_flag" in result.stderr
    assert f"failed with exit code {direct.returncode}" in result.stdout


# ---------------------------------------------------------------------------------------------
# The scripts themselves.


@pytest.mark.parametrize("script", [TPU_VM, RUN_HOST], ids=lambda path: path.name)
def test_scripts_parse_and_pass_shellcheck(script):
    assert subprocess.run([BASH, "-n", str(script)], check=False).returncode == 0
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed")
    result = subprocess.run(["shellcheck", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout
