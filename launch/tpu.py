"""Train rsjax on a Cloud TPU VM (one host or a multi-host slice) with gcloud.

    rsjax tpu all --name rsjax-1 --zone us-central1-a \\
        --accelerator_type v5litepod-16 --runtime_version v2-alpha-tpuv5-lite \\
        --config fusion --workdir gs://BUCKET/runs/fusion1 \\
        --data_dir gs://BUCKET/tensorflow_datasets [--spot] [--dry_run] \\
        [--config.total_steps=200000 ...]

Actions (each a list of gcloud commands, run in order):
  create   gcloud compute tpus tpu-vm create (type, zone, runtime, spot/preemptible)
  install  the committed HEAD of the checkout this runs in (git archive) copied
           to every worker and installed with `pip install -e .[tpu]` (or
           --git_url: a clone on every worker)
  run      `python -m rsjax.train` (`rsjax train`) on every worker at once,
           under nohup with a log file per worker (~/rsjax_run.log), so it
           survives ssh drops; a gs:// data_dir is first copied to the
           worker's disk (ArrayRecord files cannot be read from Cloud Storage)
  logs     follows worker 0's log (--worker all: every worker's) until training ends
  delete   gcloud compute tpus tpu-vm delete
  all      create, install, run, logs, delete
--dry_run prints the commands (one per line, shell-quoted) instead of running them.
`--config` is a config name (fusion, fusion:demo,sources=lulc+s1) or a .py file
relative to the checkout on the workers; `--config.KEY=VALUE` overrides are
passed on to rsjax.train (and checked here first when the config is a name or
a local file, so a typo fails before any VM exists).
"""
# Every command is built by a pure function returning an argv list, so tests
# check the exact commands; `run` only checks, plans and runs.
from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shlex
import shutil
import subprocess
import sys
from typing import Optional, Sequence

from rsjax import cli
from rsjax.errors import RunFailed, UserError

ACTIONS = ("create", "install", "run", "logs", "delete", "all")
REMOTE_DIR = "~/rsjax"                      # the code on every worker
REMOTE_LOG = "~/rsjax_run.log"              # the training log on every worker
REMOTE_PID = "~/rsjax_run.pid"
REMOTE_DATA = "/tmp/rsjax/tensorflow_datasets"   # where a gs:// dataset is copied to
SOURCE_ARCHIVE = "rsjax-src.tar.gz"         # what `install` copies from this machine
TPU_VM = ("gcloud", "compute", "tpus", "tpu-vm")


@dataclasses.dataclass(frozen=True)
class Tpu:
    """Which TPU VM, where."""

    name: str
    zone: str
    project: Optional[str] = None

    def flags(self) -> list[str]:
        return [f"--zone={self.zone}"] + ([f"--project={self.project}"] if self.project else [])


# ---------------------------------------------------------------------------
# The commands (pure: argv lists)
# ---------------------------------------------------------------------------
def create_command(tpu: Tpu, accelerator_type: str, runtime_version: str,
                   spot: bool = False, preemptible: bool = False) -> list[str]:
    if spot and preemptible:
        raise UserError("choose one of --spot and --preemptible (spot replaces preemptible)")
    return [*TPU_VM, "create", tpu.name, *tpu.flags(),
            f"--accelerator-type={accelerator_type}", f"--version={runtime_version}",
            *(["--spot"] if spot else []), *(["--preemptible"] if preemptible else [])]


def ssh_command(tpu: Tpu, remote_command: str, worker: str = "all") -> list[str]:
    """`remote_command` runs in the login shell of `worker` ('all' = every host at once)."""
    return [*TPU_VM, "ssh", tpu.name, *tpu.flags(), f"--worker={worker}",
            f"--command={remote_command}"]


def scp_command(tpu: Tpu, local_path: str, remote_path: str, worker: str = "all") -> list[str]:
    return [*TPU_VM, "scp", local_path, f"{tpu.name}:{remote_path}", *tpu.flags(),
            f"--worker={worker}"]


def delete_command(tpu: Tpu) -> list[str]:
    return [*TPU_VM, "delete", tpu.name, *tpu.flags(), "--quiet"]


def archive_command(archive: str, ref: str = "HEAD") -> list[str]:
    """The committed source of this checkout as a tarball (uncommitted edits are not in it)."""
    return ["git", "archive", "--format=tar.gz", f"--output={archive}", ref]


def pip_install_shell() -> str:
    # etils[epath-gcs] (gcsfs): epath, hence Orbax's metadata and rsjax's
    # metrics, reach gs:// through it; jax[tpu] comes with the `tpu` extra.
    return "python3 -m pip install --upgrade pip && python3 -m pip install -e \".[tpu]\" \"etils[epath-gcs]\""


def clone_shell(git_url: str, git_ref: Optional[str] = None, directory: str = REMOTE_DIR) -> str:
    """Shell that replaces `directory` with a clone of `git_url` at `git_ref`.

    `--` ends git's options, so a URL that starts with '-' is a repository,
    never an option (`--upload-pack=...` would run a command); refs are
    checked by `check_git_ref` (git's own rules forbid a leading '-').
    """
    checkout = f" && git -C {directory} checkout {shlex.quote(git_ref)}" if git_ref else ""
    return f"rm -rf {directory} && git clone -- {shlex.quote(git_url)} {directory}{checkout}"


def install_commands(tpu: Tpu, archive: str, git_url: Optional[str] = None,
                     git_ref: Optional[str] = None) -> list[list[str]]:
    """Puts the code on every worker and pip-installs it there."""
    if git_url:
        remote = f"{clone_shell(git_url, git_ref)} && cd {REMOTE_DIR} && {pip_install_shell()}"
        return [ssh_command(tpu, remote)]
    remote = (f"rm -rf {REMOTE_DIR} && mkdir -p {REMOTE_DIR} && "
              f"tar -xzf ~/{SOURCE_ARCHIVE} -C {REMOTE_DIR} && cd {REMOTE_DIR} && {pip_install_shell()}")
    return [archive_command(archive, git_ref or "HEAD"),
            scp_command(tpu, archive, f"~/{SOURCE_ARCHIVE}"),
            ssh_command(tpu, remote)]


def train_argv(config: str, workdir: str, data_dir: str, overrides: Sequence[str] = ()) -> list[str]:
    """`python -m rsjax.train` (what `rsjax train` runs); every value in the
    `--flag=value` form, so none can be taken for an option."""
    overrides = [o if o.startswith("--config.") else f"--config.{o}" for o in overrides]
    return ["python3", "-m", "rsjax.train", f"--config={config}", f"--workdir={workdir}",
            f"--config.data.data_dir={data_dir}", *overrides]


def run_shell(config: str, workdir: str, data_dir: str, overrides: Sequence[str] = ()) -> str:
    """What every worker runs: (copy a gs:// dataset to local disk, then) train,
    detached from the ssh session, output to REMOTE_LOG, pid to REMOTE_PID.

    Every argument is shell-quoted, so paths with spaces or shell characters
    reach rsjax.train unchanged. RSJAX_DISTRIBUTED=1 makes rsjax call
    jax.distributed.initialize(), which finds the slice's hosts itself.
    """
    steps = []
    if data_dir.startswith("gs://"):
        # ArrayRecord (riegeli) reads local files only: copy the dataset first.
        steps.append(f"mkdir -p {REMOTE_DATA} && gcloud storage rsync --recursive "
                     f"{shlex.quote(data_dir)} {REMOTE_DATA}")
        data_dir = REMOTE_DATA
    train = shlex.join(train_argv(config, workdir, data_dir, overrides))
    steps.append(f"cd {REMOTE_DIR} && RSJAX_DISTRIBUTED=1 exec {train}")
    job = " && ".join(steps)
    return (f"nohup bash -c {shlex.quote(job)} > {REMOTE_LOG} 2>&1 < /dev/null & "
            f"echo $! > {REMOTE_PID}; echo started rsjax.train on $(hostname), log {REMOTE_LOG}")


def run_command(tpu: Tpu, config: str, workdir: str, data_dir: str,
                overrides: Sequence[str] = ()) -> list[str]:
    return ssh_command(tpu, run_shell(config, workdir, data_dir, overrides))


def logs_command(tpu: Tpu, worker: str = "0", follow: bool = True) -> list[str]:
    """The training log from the start; with `follow`, until the training process ends."""
    tail = (f"tail -n +1 --pid=$(cat {REMOTE_PID}) -F {REMOTE_LOG}" if follow
            else f"tail -n 200 {REMOTE_LOG}")
    return ssh_command(tpu, tail, worker=worker)


# ---------------------------------------------------------------------------
# Planning and running
# ---------------------------------------------------------------------------
def plan(args: argparse.Namespace, overrides: Sequence[str] = ()) -> list[list[str]]:
    """Every command of `args.action`, in order."""
    tpu = Tpu(args.name, args.zone, args.project)
    steps = ("create", "install", "run", "logs", "delete") if args.action == "all" else (args.action,)
    commands = []
    for step in steps:
        if step == "create":
            commands.append(create_command(tpu, args.accelerator_type, args.runtime_version,
                                           spot=args.spot, preemptible=args.preemptible))
        elif step == "install":
            commands += install_commands(tpu, args.archive, args.git_url, args.git_ref)
        elif step == "run":
            commands.append(run_command(tpu, args.config, args.workdir, args.data_dir, overrides))
        elif step == "logs":
            commands.append(logs_command(tpu, args.worker, follow=True))
        elif step == "delete":
            commands.append(delete_command(tpu))
    return commands


def format_commands(commands: Sequence[Sequence[str]]) -> str:
    """One shell-quoted command per line (what --dry_run prints)."""
    return "".join(shlex.join(c) + "\n" for c in commands)


def execute(commands: Sequence[Sequence[str]], runner=subprocess.run) -> None:
    """Runs the commands in order; stops at the first that fails, saying which."""
    if any(c[0] == "gcloud" for c in commands) and shutil.which("gcloud") is None:
        raise UserError("gcloud is not installed or not on PATH: install the Google Cloud CLI "
                        "(https://cloud.google.com/sdk/docs/install), run `gcloud auth login`, "
                        "or use --dry_run to see the commands.")
    for command in commands:
        print("+", shlex.join(command), flush=True)
        try:
            runner(list(command), check=True)
        except subprocess.CalledProcessError as e:
            raise RunFailed(f"failed (exit status {e.returncode}): {shlex.join(command)}\n"
                            "Nothing after it ran. If a TPU VM was created, it is still running "
                            "(and billed): rerun the remaining actions, or `delete` it.") from None


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------
TPU_NAME = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")


def tpu_name(text: str) -> str:
    """A TPU VM name as Google Cloud accepts it (and never a gcloud option)."""
    if not TPU_NAME.fullmatch(text) or len(text) > 63:
        raise argparse.ArgumentTypeError(
            f"{text!r}: lowercase letters, digits and '-', starting with a letter "
            "(at most 63 characters)")
    return text


def check_git_ref(ref: Optional[str]) -> None:
    if ref is not None and (not ref or ref.startswith("-") or any(c.isspace() for c in ref)):
        raise UserError(f"--git_ref {ref!r}: not a git ref (a branch, tag or commit; refs never "
                        "start with '-' or hold spaces).")


def check_config(spec: str, overrides: Sequence[str]) -> None:
    """Loads the config here when it can (a name, or a .py file that exists
    locally), so an unknown name or override key fails before any VM exists.
    A path that only exists in the workers' checkout is passed on unchecked."""
    from rsjax import config_loader

    head, _ = config_loader.split_spec(spec)
    is_file = head.endswith(".py") or "/" in head or os.sep in head
    if not is_file or os.path.isfile(head):
        config_loader.load_config(spec, overrides)


def add_arguments(parser) -> None:
    parser.epilog = ("--config.KEY=VALUE options go to rsjax train on the workers, e.g. "
                     "--config.total_steps=1000 (after `--` too, as before).")
    parser.add_argument("action", choices=ACTIONS, metavar="ACTION",
                        help="create, install, run, logs, delete, or all: those in that order")
    parser.add_argument("--name", required=True, type=tpu_name, help="TPU VM name")
    parser.add_argument("--zone", required=True, help="e.g. us-central1-a")
    parser.add_argument("--project", default=None, help="Google Cloud project (default: gcloud's)")
    parser.add_argument("--accelerator_type", default="v5litepod-16",
                        help="TPU type, e.g. v5litepod-8 (one host), v5litepod-16 (4 hosts), v4-32")
    parser.add_argument("--runtime_version", default="v2-alpha-tpuv5-lite",
                        help="TPU VM software version (`gcloud compute tpus tpu-vm versions list`)")
    parser.add_argument("--spot", action="store_true", help="a Spot VM (cheaper, can be preempted)")
    parser.add_argument("--preemptible", action="store_true", help="a preemptible VM (older Spot)")
    parser.add_argument("--bucket", default=None,
                        help="gs://BUCKET: default for --workdir (BUCKET/runs/NAME) and "
                             "--data_dir (BUCKET/tensorflow_datasets)")
    cli.add_config_argument(parser, required=False,
                            help="config name (fusion, fusion:demo,sources=lulc+s1) or .py file "
                                 "relative to the workers' checkout, with --config.KEY=VALUE "
                                 "overrides (default: fusion)")
    parser.add_argument("--workdir", default=None, help="gs://... where checkpoints and metrics go")
    parser.add_argument("--data_dir", default=None,
                        help="TFDS data_dir holding the built dataset (gs://..., copied to each worker)")
    parser.add_argument("--git_url", default=None, help="install by cloning this repository instead")
    parser.add_argument("--git_ref", default=None, help="commit/branch to install (default HEAD)")
    parser.add_argument("--archive", default=f"/tmp/{SOURCE_ARCHIVE}", help="local path of the tarball")
    parser.add_argument("--worker", default="0", help="logs: a worker number or 'all'")
    parser.add_argument("--dry_run", action="store_true",
                        help="print the commands instead of running them")


def check_args(args) -> None:
    """Completes defaults from --bucket and checks every option; raises UserError."""
    args.config = args.config or "fusion"
    args.archive = os.path.abspath(args.archive)     # an absolute path is never a gcloud option
    if args.bucket:
        if not args.bucket.startswith("gs://"):
            raise UserError(f"--bucket={args.bucket}: give a gs:// URI, e.g. gs://my-bucket")
        bucket = args.bucket.rstrip("/")
        args.workdir = args.workdir or f"{bucket}/runs/{args.name}"
        args.data_dir = args.data_dir or f"{bucket}/tensorflow_datasets"
    if args.action in ("run", "all"):
        missing = [f"--{k}" for k in ("workdir", "data_dir") if not getattr(args, k)]
        if missing:
            raise UserError(f"{args.action} needs {' and '.join(missing)} (or --bucket gs://BUCKET)")
        if not args.workdir.startswith("gs://"):
            raise UserError(f"--workdir={args.workdir}: use a gs:// path. Every host of a slice "
                            "writes its part of each checkpoint into the same directory, so it "
                            "must be shared storage, and it outlives the VM.")
        check_config(args.config, args.config_overrides)
    if args.spot and args.preemptible:
        raise UserError("choose one of --spot and --preemptible")
    check_git_ref(args.git_ref)
    if args.worker != "all" and not args.worker.isdigit():
        raise UserError(f"--worker {args.worker}: a worker number (0, 1, ...) or 'all'.")


def run(args) -> int:
    check_args(args)
    commands = plan(args, args.config_overrides)
    if args.dry_run:
        sys.stdout.write(format_commands(commands))
        return 0
    execute(commands)
    return 0


main = cli.command_main(__name__)

if __name__ == "__main__":
    sys.exit(main())
