"""The Cloud TPU launcher: the exact gcloud commands, their order, quoting that
survives paths with spaces through two shells, and clear errors."""
from __future__ import annotations

import shlex
import subprocess
import sys

import pytest

from rsjax.errors import RunFailed, UserError
from rsjax.launch import tpu
from trainer_utils import ROOT

BASE = ["--name", "rsjax-1", "--zone", "us-central1-a"]


def _dry_run(*args: str) -> list[list[str]]:
    """Runs the real CLI (`python -m rsjax.launch.tpu`, from another directory
    than the checkout) with --dry_run; returns the printed commands as argv lists."""
    out = subprocess.run([sys.executable, "-m", "rsjax.launch.tpu", "--dry_run", *args],
                         cwd=ROOT / "tests", capture_output=True, text=True, check=True).stdout
    return [shlex.split(line) for line in out.splitlines()]


def _dry_run_here(capsys, *args: str) -> tuple[int, str, str]:
    """`rsjax tpu --dry_run ...` in this process: (exit status, stdout, stderr)."""
    from rsjax import cli

    status = cli.main(["tpu", "--dry_run", *args])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def _ssh_remote(command: list[str]) -> str:
    [remote] = [a[len("--command="):] for a in command if a.startswith("--command=")]
    return remote


def test_all_prints_create_install_run_logs_delete_in_order():
    commands = _dry_run("all", *BASE, "--accelerator_type", "v5litepod-16",
                        "--runtime_version", "v2-alpha-tpuv5-lite", "--spot",
                        "--bucket", "gs://my-bucket", "--config", "fusion:demo",
                        "--", "--config.total_steps=10")
    tpu_vm = ["gcloud", "compute", "tpus", "tpu-vm"]
    assert commands[0] == tpu_vm + ["create", "rsjax-1", "--zone=us-central1-a",
                                    "--accelerator-type=v5litepod-16",
                                    "--version=v2-alpha-tpuv5-lite", "--spot"]
    assert commands[1] == ["git", "archive", "--format=tar.gz",
                           "--output=/tmp/rsjax-src.tar.gz", "HEAD"]
    assert commands[2] == tpu_vm + ["scp", "/tmp/rsjax-src.tar.gz", "rsjax-1:~/rsjax-src.tar.gz",
                                    "--zone=us-central1-a", "--worker=all"]
    assert commands[3][:8] == tpu_vm + ["ssh", "rsjax-1", "--zone=us-central1-a", "--worker=all"]
    install = _ssh_remote(commands[3])
    assert "tar -xzf ~/rsjax-src.tar.gz -C ~/rsjax" in install
    assert 'pip install -e ".[tpu]"' in install
    assert commands[4][:8] == tpu_vm + ["ssh", "rsjax-1", "--zone=us-central1-a", "--worker=all"]
    run = _ssh_remote(commands[4])
    assert run.startswith("nohup bash -c ") and "> ~/rsjax_run.log 2>&1 < /dev/null &" in run
    assert commands[5] == tpu_vm + ["ssh", "rsjax-1", "--zone=us-central1-a", "--worker=0",
                                    "--command=tail -n +1 --pid=$(cat ~/rsjax_run.pid) "
                                    "-F ~/rsjax_run.log"]
    assert commands[6] == tpu_vm + ["delete", "rsjax-1", "--zone=us-central1-a", "--quiet"]
    assert len(commands) == 7


def _train_argv_on_worker(run_command: list[str]) -> tuple[list[str], list[str]]:
    """What the worker's shells make of the run command: the login shell splits
    the ssh command, `bash -c` gets the job; returns (steps before, train argv)."""
    login_shell = shlex.split(_ssh_remote(run_command))
    assert login_shell[:3] == ["nohup", "bash", "-c"]
    job = login_shell[3]
    steps = [shlex.split(step) for step in job.split(" && ")]
    train = steps[-1]
    assert train[:2] == ["RSJAX_DISTRIBUTED=1", "exec"]
    return steps[:-1], train[2:]


def test_paths_with_spaces_and_quotes_reach_rsjax_train_unchanged():
    workdir = "gs://my bucket/run 'one' $HOME"
    data_dir = "/mnt/data sets/tfds"
    [command] = _dry_run("run", *BASE, "--workdir", workdir, "--data_dir", data_dir,
                         "--config", "fusion:demo,sources=lulc+s1",
                         "--config.generator.ngf=32")
    steps, train = _train_argv_on_worker(command)
    assert steps == [["cd", "~/rsjax"]]            # a dataset on the VM is read where it is
    assert train == ["python3", "-m", "rsjax.train", "--config=fusion:demo,sources=lulc+s1",
                     f"--workdir={workdir}", f"--config.data.data_dir={data_dir}",
                     "--config.generator.ngf=32"]
    assert train == tpu.train_argv("fusion:demo,sources=lulc+s1", workdir, data_dir,
                                   ["generator.ngf=32"])


def test_config_is_a_name_by_default_or_a_file_on_the_workers(capsys, tmp_path):
    run = ["run", *BASE, "--bucket", "gs://b"]
    status, out, _ = _dry_run_here(capsys, *run)
    assert status == 0
    _, train = _train_argv_on_worker(shlex.split(out))
    assert train[3] == "--config=fusion"
    # A file that exists only in the workers' checkout is passed on unchecked ...
    status, out, _ = _dry_run_here(capsys, *run, "--config", "my/experiment.py:demo",
                                   "--config.anything=1")
    _, train = _train_argv_on_worker(shlex.split(out))
    assert status == 0 and train[3] == "--config=my/experiment.py:demo"
    assert train[-1] == "--config.anything=1"
    # ... a local one is checked here, like a name.
    local = tmp_path / "mine.py"
    local.write_text("import ml_collections\n"
                     "def get_config(arg=None):\n"
                     "    return ml_collections.ConfigDict({'steps': 1})\n")
    assert _dry_run_here(capsys, *run, "--config", str(local), "--config.steps=5")[0] == 0
    status, out, err = _dry_run_here(capsys, *run, "--config", str(local), "--config.step=5")
    assert status == 2 and out == "" and "--config.step: no such config key" in err


def test_gs_data_dir_is_copied_to_the_worker_first():
    [command] = _dry_run("run", *BASE, "--workdir", "gs://b/runs/1",
                         "--data_dir", "gs://b/tensorflow datasets")
    steps, train = _train_argv_on_worker(command)
    assert steps == [["mkdir", "-p", tpu.REMOTE_DATA],
                     ["gcloud", "storage", "rsync", "--recursive", "gs://b/tensorflow datasets",
                      tpu.REMOTE_DATA],
                     ["cd", "~/rsjax"]]
    assert f"--config.data.data_dir={tpu.REMOTE_DATA}" in train


def test_single_actions_and_options():
    [create] = _dry_run("create", *BASE, "--project", "my-proj", "--accelerator_type", "v4-8",
                        "--runtime_version", "tpu-ubuntu2204-base", "--preemptible")
    assert create == ["gcloud", "compute", "tpus", "tpu-vm", "create", "rsjax-1",
                      "--zone=us-central1-a", "--project=my-proj", "--accelerator-type=v4-8",
                      "--version=tpu-ubuntu2204-base", "--preemptible"]
    [install] = _dry_run("install", *BASE, "--git_url", "https://example.org/rsjax.git",
                         "--git_ref", "v0.1")
    assert _ssh_remote(install).startswith(
        "rm -rf ~/rsjax && git clone -- https://example.org/rsjax.git ~/rsjax && "
        "git -C ~/rsjax checkout v0.1 && cd ~/rsjax && ")
    [logs] = _dry_run("logs", *BASE, "--worker", "all")
    assert "--worker=all" in logs
    assert _dry_run("delete", *BASE) == [tpu.delete_command(tpu.Tpu("rsjax-1", "us-central1-a"))]


@pytest.mark.parametrize("args, message", [
    (["frob", *BASE], "invalid choice: 'frob'"),
    (["create", "--zone", "z"], "the following arguments are required: --name"),
    (["create", *BASE, "--acclerator_type", "v4-8"], "unrecognized arguments: --acclerator_type"),
    (["run", *BASE], "run needs --workdir and --data_dir"),
    (["run", *BASE, "--workdir", "/home/me/run", "--data_dir", "gs://b/d"], "use a gs:// path"),
    (["create", *BASE, "--spot", "--preemptible"], "choose one of --spot and --preemptible"),
    (["run", *BASE, "--bucket", "my-bucket"], "give a gs:// URI"),
    (["run", *BASE, "--bucket", "gs://b", "--", "--steps=3"], "unrecognized arguments: -- --steps=3"),
    (["run", *BASE, "--bucket", "gs://b", "--config.total_step=3"],
     "--config.total_step: no such config key. Did you mean --config.total_steps?"),
    (["run", *BASE, "--bucket", "gs://b", "--config", "fusoin:demo"], "Did you mean 'fusion'?"),
    (["create", "--name", "--zone=z", "--zone", "z"], "argument --name: expected one argument"),
    (["create", "--name=-oops", "--zone", "z"], "'-oops': lowercase letters"),
    (["create", "--name", "My_TPU", "--zone", "z"], "'My_TPU': lowercase letters"),
    (["install", *BASE, "--git_ref=--upload-pack=x"], "--git_ref '--upload-pack=x': not a git ref"),
    (["logs", *BASE, "--worker", "1;rm"], "--worker 1;rm: a worker number"),
])
def test_bad_options_fail_clearly(capsys, args, message):
    status, out, err = _dry_run_here(capsys, *args)
    assert status == 2 and out == ""
    assert message in err and "Traceback" not in err
    assert len([line for line in err.splitlines() if "error:" in line]) == 1


def test_git_url_starting_with_a_dash_is_a_repository_not_an_option(tmp_path):
    """The clone step run for real by bash and git: a URL like '--upload-pack=CMD'
    would make git run CMD if it were parsed as an option."""
    origin = tmp_path / "origin"
    subprocess.run(["git", "init", "-q", str(origin)], check=True)
    subprocess.run(["git", "-C", str(origin), "-c", "user.email=t@t", "-c", "user.name=t",
                    "commit", "-q", "--allow-empty", "-m", "x"], check=True)
    marker = tmp_path / "ran"
    evil = f"--upload-pack=touch {marker}; git-upload-pack"
    proc = subprocess.run(["bash", "-c", tpu.clone_shell(evil, None, directory="clone")],
                          cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode != 0 and not marker.exists()     # a repository named so: not found
    # A repository whose path starts with '-' clones, as any other.
    (tmp_path / "-repo").symlink_to(origin)
    subprocess.run(["bash", "-c", tpu.clone_shell("-repo", None, directory="clone")],
                   cwd=tmp_path, check=True, capture_output=True)
    assert (tmp_path / "clone" / ".git").is_dir()


def test_real_run_stops_at_the_first_failure_and_says_so(tmp_path, monkeypatch, capsys):
    """Running for real: each command in order (real processes), stopping at the
    first failure; without gcloud on PATH, a clear message before anything runs."""
    first, never = tmp_path / "first", tmp_path / "never"
    with pytest.raises(RunFailed, match="failed \\(exit status 1\\): false 'a b'"):
        tpu.execute([["touch", str(first)], ["false", "a b"], ["touch", str(never)]])
    assert first.exists() and not never.exists()
    assert "+ false 'a b'" in capsys.readouterr().out      # each command echoed before it runs

    monkeypatch.setenv("PATH", str(tmp_path))             # touch and gcloud are not found there
    with pytest.raises(UserError, match="gcloud is not installed"):
        tpu.execute([["touch", str(never)], tpu.delete_command(tpu.Tpu("t", "z"))])
    assert not never.exists()


def test_workdir_paths_keep_gs_uris_and_make_local_paths_absolute(tmp_path, monkeypatch):
    """pathlib would turn gs://b/run into gs:/b/run; rsjax keeps URIs as they are."""
    from rsjax.runtime import workdir_path

    assert workdir_path("gs://bucket/runs/run 1") == "gs://bucket/runs/run 1"
    monkeypatch.chdir(tmp_path)
    assert workdir_path("runs/a") == str(tmp_path / "runs" / "a")
