"""The Cloud TPU launcher: the exact gcloud commands, their order, quoting that
survives paths with spaces through two shells, and clear errors."""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

import pytest

from rsjax.errors import RunFailed, UserError
from rsjax.launch import tpu
from trainer_utils import ROOT

BASE = ["--name", "rsjax-1", "--zone", "us-central1-a"]
VERSION = metadata.version("rsjax")
WHEEL = f"rsjax-{VERSION}-py3-none-any.whl"
TPU_VM = ["gcloud", "compute", "tpus", "tpu-vm"]


@pytest.fixture(scope="module")
def elsewhere(tmp_path_factory) -> Path:
    """The user's own git repository, with its own pyproject.toml and even a
    package named rsjax: what `install` ships must not depend on it."""
    repo = tmp_path_factory.mktemp("users_repo")
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    (repo / "pyproject.toml").write_text('[project]\nname = "users-project"\nversion = "9.9"\n')
    (repo / "rsjax").mkdir()
    (repo / "rsjax" / "__init__.py").write_text("raise SystemExit('the wrong rsjax')\n")
    (repo / "secret.txt").write_text("the user's own file\n")
    subprocess.run(["git", "-C", str(repo), "add", "."], check=True)
    subprocess.run(["git", "-C", str(repo), "-c", "user.email=t@t", "-c", "user.name=t",
                    "commit", "-q", "-m", "x"], check=True)
    return repo


def _dry_run(*args: str, cwd=None) -> list[list[str]]:
    """Runs the real CLI (`python -P -m rsjax.launch.tpu`, from another
    directory than the checkout) with --dry_run; returns the printed commands
    as argv lists."""
    out = subprocess.run([sys.executable, "-P", "-m", "rsjax.launch.tpu", "--dry_run", *args],
                         cwd=cwd or ROOT / "tests", capture_output=True, text=True, check=True).stdout
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


def test_all_prints_wheel_create_install_run_logs_delete_in_order(elsewhere):
    """Run from the user's own repository: the wheel of the installed rsjax
    first (before any VM exists), never `git archive` of the current directory."""
    commands = _dry_run("all", *BASE, "--accelerator_type", "v5litepod-16",
                        "--runtime_version", "v2-alpha-tpuv5-lite", "--spot",
                        "--bucket", "gs://my-bucket", "--config", "fusion:demo",
                        "--", "--config.total_steps=10", cwd=elsewhere)
    assert commands[0] == [sys.executable, "-P", "-m", "rsjax.launch.tpu", "wheel",
                           "--wheel_dir=/tmp/rsjax-wheel"]
    assert commands[1] == TPU_VM + ["create", "rsjax-1", "--zone=us-central1-a",
                                    "--accelerator-type=v5litepod-16",
                                    "--version=v2-alpha-tpuv5-lite", "--spot"]
    assert commands[2] == TPU_VM + ["scp", f"/tmp/rsjax-wheel/{WHEEL}", f"rsjax-1:~/{WHEEL}",
                                    "--zone=us-central1-a", "--worker=all"]
    assert commands[3][:8] == TPU_VM + ["ssh", "rsjax-1", "--zone=us-central1-a", "--worker=all"]
    install = _ssh_remote(commands[3])
    assert install.startswith("rm -rf ~/rsjax && mkdir -p ~/rsjax && ")
    assert f'pip install "rsjax[tpu] @ file://$HOME/{WHEEL}" "etils[epath-gcs]"' in install
    assert commands[4][:8] == TPU_VM + ["ssh", "rsjax-1", "--zone=us-central1-a", "--worker=all"]
    run = _ssh_remote(commands[4])
    assert run.startswith("nohup bash -c ") and "> ~/rsjax_run.log 2>&1 < /dev/null &" in run
    assert commands[5] == TPU_VM + ["ssh", "rsjax-1", "--zone=us-central1-a", "--worker=0",
                                    "--command=tail -n +1 --pid=$(cat ~/rsjax_run.pid) "
                                    "-F ~/rsjax_run.log"]
    assert commands[6] == TPU_VM + ["delete", "rsjax-1", "--zone=us-central1-a", "--quiet"]
    assert len(commands) == 7
    assert not any(c[0] == "git" for c in commands)


def _readme_tpu_line() -> str:
    readme = (ROOT / "README.md").read_text()
    [line] = re.findall(r"`(rsjax tpu all [^`]*)`", readme)
    return line


def test_the_readme_example_runs_with_dry_run(elsewhere):
    """Issue 27: the README's `--name N` was rejected. Its line, as written
    (`[--dry_run]` given), prints the whole plan."""
    line = _readme_tpu_line()
    assert "[--dry_run]" in line
    argv = shlex.split(line.replace("[--dry_run]", "--dry_run"))
    assert argv[:3] == ["rsjax", "tpu", "all"]
    # The console script when it is on PATH (as the README runs it), else the same command.
    script = shutil.which("rsjax")
    command = [script] if script else [sys.executable, "-P", "-m", "rsjax.cli"]
    done = subprocess.run([*command, *argv[1:]], cwd=elsewhere, capture_output=True, text=True)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    commands = [shlex.split(c) for c in done.stdout.splitlines()]
    values = dict(a[2:].split("=", 1) for a in argv if a.startswith("--") and "=" in a)
    values.update(zip(argv[3::2], argv[4::2]))
    name, zone, bucket = values["--name"], values["--zone"], values["--bucket"].rstrip("/")
    assert tpu.TPU_NAME.fullmatch(name)
    assert [c[:6] for c in commands[1:]] == [
        TPU_VM + ["create", name], TPU_VM + ["scp", f"/tmp/rsjax-wheel/{WHEEL}"],
        TPU_VM + ["ssh", name], TPU_VM + ["ssh", name], TPU_VM + ["ssh", name],
        TPU_VM + ["delete", name]]
    assert all(f"--zone={zone}" in c for c in commands[1:])
    _, train = _train_argv_on_worker(commands[4])
    assert f"--workdir={bucket}/runs/{name}" in train
    assert f"gcloud storage rsync --recursive {bucket}/tensorflow_datasets" in _ssh_remote(commands[4])


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
    # A file that exists only on the workers (in a --git_url clone) is passed on unchecked ...
    status, out, _ = _dry_run_here(capsys, *run, "--config", "my/experiment.py:demo",
                                   "--config.anything=1")
    _, train = _train_argv_on_worker(shlex.split(out))
    assert status == 0 and train[3] == "--config=my/experiment.py:demo"
    assert train[-1] == "--config.anything=1"
    # ... but `all` without --git_url installs a wheel: no checkout on the workers to find it in.
    status, out, err = _dry_run_here(capsys, "all", *BASE, "--bucket", "gs://b", "--config",
                                     "my/experiment.py:demo")
    assert status == 2 and out == "" and "no such file here" in err and "--git_url" in err
    # A local one is checked here, like a name, and copied to ~/rsjax on the workers.
    local = tmp_path / "mine.py"
    local.write_text("import ml_collections\n"
                     "def get_config(arg=None):\n"
                     "    return ml_collections.ConfigDict({'steps': 1})\n")
    status, out, _ = _dry_run_here(capsys, *run, "--config", f"{local}:demo", "--config.steps=5")
    copy, run_command = [shlex.split(line) for line in out.splitlines()]
    assert status == 0 and copy == TPU_VM + ["scp", str(local), "rsjax-1:~/rsjax/mine.py",
                                             "--zone=us-central1-a", "--worker=all"]
    _, train = _train_argv_on_worker(run_command)
    assert train[3] == "--config=mine.py:demo" and train[-1] == "--config.steps=5"
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
    [logs] = _dry_run("logs", *BASE, "--worker", "all")
    assert "--worker=all" in logs
    assert _dry_run("delete", *BASE) == [tpu.delete_command(tpu.Tpu("rsjax-1", "us-central1-a"))]
    assert _dry_run("wheel", "--wheel_dir", "/tmp/w") == [tpu.wheel_build_command("/tmp/w")]


@pytest.mark.parametrize("url", ["https://example.org/rsjax.git@v0.1",
                                 ["https://example.org/rsjax.git", "--git_ref", "v0.1"]])
def test_install_from_git_url_at_ref(url):
    [install] = _dry_run("install", *BASE, "--git_url", *([url] if isinstance(url, str) else url))
    remote = _ssh_remote(install)
    assert remote.startswith(
        "rm -rf ~/rsjax && git clone -- https://example.org/rsjax.git ~/rsjax && "
        "git -C ~/rsjax checkout v0.1 && cd ~/rsjax && if ! grep ")
    assert remote.endswith('python3 -m pip install ".[tpu]" "etils[epath-gcs]"')


@pytest.mark.parametrize("text, url, ref", [
    ("https://github.com/o/rsjax.git", "https://github.com/o/rsjax.git", None),
    ("https://github.com/o/rsjax.git@v0.3.0", "https://github.com/o/rsjax.git", "v0.3.0"),
    ("https://github.com/o/rsjax@feature/x", "https://github.com/o/rsjax", "feature/x"),
    ("https://user@host/o/rsjax.git", "https://user@host/o/rsjax.git", None),
    ("https://user@host/o/rsjax.git@main", "https://user@host/o/rsjax.git", "main"),
    ("git@github.com:o/rsjax.git", "git@github.com:o/rsjax.git", None),
    ("git@github.com:o/rsjax.git@0123abc", "git@github.com:o/rsjax.git", "0123abc"),
    ("/srv/git/rsjax.git@v1", "/srv/git/rsjax.git", "v1"),
    ("../rsjax", "../rsjax", None),
])
def test_git_url_at_ref_is_split_as_pip_does(text, url, ref):
    assert tpu.split_git_url(text) == (url, ref)


def test_install_from_a_package_index():
    [install] = _dry_run("install", *BASE, "--pip_index", "https://example.org/simple")
    assert _ssh_remote(install) == (
        "rm -rf ~/rsjax && mkdir -p ~/rsjax && python3 -m pip install --upgrade pip && "
        "python3 -m pip uninstall -y rsjax && python3 -m pip install --index-url "
        f'https://example.org/simple "rsjax[tpu]=={VERSION}" "etils[epath-gcs]"')


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
    (["create", "--name", "rsjax-1"], "the following arguments are required: --zone"),
    (["create", "--name=-oops", "--zone", "z"], "'-oops': a TPU VM name is 1 to 63 characters: "
                                                "lowercase letters, digits and hyphens, starting "
                                                "with a letter and not ending with a hyphen"),
    (["all", "--name", "N", "--zone", "Z", "--bucket", "gs://B"],
     "argument --name: 'N': a TPU VM name is 1 to 63 characters"),
    (["create", "--name", "My_TPU", "--zone", "z"], "did you mean 'my-tpu'?"),
    (["create", "--name", "tpu-", "--zone", "z"], "'tpu-': a TPU VM name"),
    (["create", "--name", "1tpu", "--zone", "z"], "'1tpu': a TPU VM name"),
    (["create", "--name", "a" * 64, "--zone", "z"], "a TPU VM name is 1 to 63 characters"),
    (["install", *BASE, "--git_url", "https://h/r.git", "--git_ref=--upload-pack=x"],
     "--git_ref '--upload-pack=x': not a git ref"),
    (["install", *BASE, "--git_url", "https://h/r.git@--upload-pack=x"],
     "--git_ref '--upload-pack=x': not a git ref"),
    (["install", *BASE, "--git_ref", "v1"], "--git_ref v1 needs --git_url URL"),
    (["install", *BASE, "--git_url", "https://h/r.git@v1", "--git_ref", "v2"],
     "names a ref (@v1) and --git_ref gives another (v2)"),
    (["install", *BASE, "--git_url", "https://h/r.git", "--pip_index", "https://h/simple"],
     "choose one of --git_url and --pip_index"),
    (["install", *BASE, "--pip_index", "pypi"], "--pip_index 'pypi': give the index URL"),
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
    """Running for real: each command in order (real processes; the wheel step
    in this process), stopping at the first failure; without gcloud on PATH, a
    clear message before anything runs."""
    built, after = [], tmp_path / "after"
    tpu.execute([tpu.wheel_build_command(str(tmp_path)), ["touch", str(after)]],
                build=lambda: built.append(after.exists()))
    assert built == [False] and after.exists()
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


# --------------------------------------------------------------------------- what install ships

def _wheel_members(path: Path) -> dict:
    with zipfile.ZipFile(path) as wheel:
        return {n: wheel.read(n) for n in wheel.namelist() if not n.endswith(".dist-info/RECORD")}


def _metadata_of(members: dict) -> dict:
    [name] = [n for n in members if n.endswith(".dist-info/METADATA")]
    lines = members[name].decode().splitlines()
    return dict(line.split(": ", 1) for line in lines if ": " in line and not line[0].isspace())


@pytest.fixture(scope="module")
def checkout_wheel(elsewhere, tmp_path_factory) -> Path:
    """`rsjax tpu wheel` for real, run from the user's repository."""
    out = tmp_path_factory.mktemp("wheel")
    done = subprocess.run([sys.executable, "-P", "-m", "rsjax.cli", "tpu", "wheel",
                           "--wheel_dir", str(out)], cwd=elsewhere, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(out / WHEEL)
    return out / WHEEL


def test_wheel_of_the_checkout_is_rsjax_not_the_current_directory(checkout_wheel, elsewhere):
    """Issue 27: `git archive HEAD` shipped whatever repository the command ran in."""
    members = _wheel_members(checkout_wheel)
    assert _metadata_of(members)["Name"] == "rsjax" and _metadata_of(members)["Version"] == VERSION
    for name in ("rsjax/__init__.py", "rsjax/launch/tpu.py", "rsjax/configs/fusion.py",
                 "rsjax/tfds_builder/rs_multisource/rs_multisource_dataset_builder.py"):
        assert name in members
    assert members["rsjax/launch/tpu.py"] == (ROOT / "launch" / "tpu.py").read_bytes()
    assert members["rsjax/__init__.py"] == (ROOT / "rsjax" / "__init__.py").read_bytes()
    assert not any("secret" in n or "users" in n for n in members)
    assert b"the wrong rsjax" not in b"".join(members.values())
    # What the workers run takes this wheel, with the tpu extra.
    install = tpu.install_commands(tpu.Tpu("t", "z"), str(checkout_wheel))[1]
    requirement = re.search(r'"(rsjax\[tpu\] @ file://\$HOME/[^"]+)"', _ssh_remote(install)).group(1)
    done = subprocess.run(["bash", "-c", f'{sys.executable} -m pip install --dry-run --no-deps '
                           f'--no-index "{requirement}"'], env={**os.environ, "HOME": str(
                               checkout_wheel.parent)}, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and f"Would install rsjax-{VERSION}" in done.stdout, done.stderr


def test_wheel_of_an_installed_rsjax_repacks_the_installed_files(checkout_wheel, elsewhere,
                                                                   tmp_path):
    """rsjax installed from a wheel (no checkout): the same files, repacked,
    whatever repository the command runs in."""
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index",
                    "--target", str(site), str(checkout_wheel)], check=True, capture_output=True)
    env = {**os.environ, "PYTHONPATH": str(site)}
    where = subprocess.run([sys.executable, "-P", "-c", "import rsjax; print(rsjax.__file__)"],
                           cwd=elsewhere, env=env, capture_output=True, text=True, check=True)
    assert where.stdout.strip() == str(site / "rsjax" / "__init__.py")
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-P", "-m", "rsjax.cli", "tpu", "wheel", "--wheel_dir",
                           str(out)], cwd=elsewhere, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert f"from the installed files in {site}" in done.stderr
    repacked = _wheel_members(out / WHEEL)
    assert repacked == _wheel_members(checkout_wheel)
    with zipfile.ZipFile(out / WHEEL) as wheel:       # pip checks RECORD's hashes on install
        assert wheel.testzip() is None
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index",
                    "--target", str(tmp_path / "again"), str(out / WHEEL)], check=True,
                   capture_output=True)
    assert (tmp_path / "again" / "rsjax" / "launch" / "tpu.py").is_file()


def test_an_unrelated_project_is_never_shipped(tmp_path):
    """rsjax's package inside another project's tree, with no installed rsjax
    accounting for it: refused, naming the other ways to install."""
    def no_rsjax(name):
        raise metadata.PackageNotFoundError(name)

    (tmp_path / "pyproject.toml").write_text('[project]\nname = "users-project"\nversion = "1"\n')
    (tmp_path / "rsjax").mkdir()
    with pytest.raises(UserError, match="names 'users-project', not rsjax.*refusing") as err:
        tpu.find_source(tmp_path / "rsjax", distribution=no_rsjax)
    assert "--git_url URL[@REF]" in str(err.value) and "--pip_index URL" in str(err.value)
    (tmp_path / "pyproject.toml").unlink()
    with pytest.raises(UserError, match="neither a checkout of rsjax .* nor an installed rsjax"):
        tpu.find_source(tmp_path / "rsjax", distribution=no_rsjax)
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "RSJAX"\nversion = "1.0"\n')
    source = tpu.find_source(tmp_path / "rsjax", distribution=no_rsjax)
    assert (source.kind, source.root, source.wheel_name) == ("checkout", tmp_path,
                                                             "rsjax-1.0-py3-none-any.whl")


def _fake_python(tmp_path: Path) -> Path:
    """A `python3` that records its arguments, one per line, and succeeds."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3").write_text('#!/bin/bash\nprintf "%s\\n" "$@" >> "$HOME/calls"\n'
                                     'echo --- >> "$HOME/calls"\n')
    (bin_dir / "python3").chmod(0o755)
    return bin_dir


def _worker_shell(command: list[str], home: Path, bin_dir: Path):
    """An install command's remote shell run by bash as a worker would, in `home`."""
    env = {**os.environ, "HOME": str(home), "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    return subprocess.run(["bash", "-c", _ssh_remote(command)], cwd=home, env=env,
                          capture_output=True, text=True, timeout=120)


def test_git_url_install_refuses_a_repository_that_is_not_rsjax(tmp_path):
    """The worker's shell for real (bash, git; pip faked): a clone whose
    pyproject.toml names another project stops before pip, with one error line."""
    home = tmp_path / "home"
    home.mkdir()
    bin_dir = _fake_python(tmp_path)
    for name, project in (("other", "users-project"), ("ours", "rsjax")):
        origin = tmp_path / name
        subprocess.run(["git", "init", "-q", str(origin)], check=True)
        (origin / "pyproject.toml").write_text(f'[project]\nname = "{project}"\nversion = "1"\n')
        subprocess.run(["git", "-C", str(origin), "add", "."], check=True)
        subprocess.run(["git", "-C", str(origin), "-c", "user.email=t@t", "-c", "user.name=t",
                        "commit", "-q", "-m", "x"], check=True)
        subprocess.run(["git", "-C", str(origin), "tag", "v1"], check=True)
    [install] = tpu.install_commands(tpu.Tpu("t", "z"), git_url=str(tmp_path / "other"),
                                     git_ref="v1")
    done = _worker_shell(install, home, bin_dir)
    assert done.returncode == 2 and not (home / "calls").exists()
    assert done.stderr.strip().splitlines()[-1] == (
        f"error: {tmp_path / 'other'}@v1 is not rsjax: its pyproject.toml does not name rsjax "
        "(--git_url must be a repository of rsjax).")
    [install] = tpu.install_commands(tpu.Tpu("t", "z"), git_url=str(tmp_path / "ours"),
                                     git_ref="v1")
    done = _worker_shell(install, home, bin_dir)
    assert done.returncode == 0, done.stderr
    calls = (home / "calls").read_text().split("---\n")
    assert calls[2].splitlines() == ["-m", "pip", "install", ".[tpu]", "etils[epath-gcs]"]
    assert (home / "rsjax" / "pyproject.toml").is_file()


def test_wheel_install_shell_names_the_copied_wheel(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / "rsjax").mkdir()
    (home / "rsjax" / "stale").write_text("")
    _, install = tpu.install_commands(tpu.Tpu("t", "z"), f"/tmp/rsjax-wheel/{WHEEL}")
    done = _worker_shell(install, home, _fake_python(tmp_path))
    assert done.returncode == 0, done.stderr
    calls = (home / "calls").read_text().split("---\n")
    assert calls[1].splitlines() == ["-m", "pip", "uninstall", "-y", "rsjax"]
    assert calls[2].splitlines() == ["-m", "pip", "install", f"rsjax[tpu] @ file://{home}/{WHEEL}",
                                     "etils[epath-gcs]"]
    assert list((home / "rsjax").iterdir()) == []          # a fresh folder to run in
