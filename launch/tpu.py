"""Train rsjax on a Cloud TPU VM (one host or a multi-host slice) with gcloud.

    rsjax tpu all --name rsjax-1 --zone us-central1-a \\
        --accelerator_type v5litepod-16 --runtime_version v2-alpha-tpuv5-lite \\
        --config fusion --workdir gs://BUCKET/runs/fusion1 \\
        --data_dir gs://BUCKET/tensorflow_datasets --spot --dry_run
    rsjax tpu logs --name rsjax-1 --zone us-central1-a --worker all

Actions, each a list of commands run in order: `wheel` (builds the wheel of
the rsjax running this command, never of the current directory), `create`,
`install` (that wheel on every worker, or `--pip_index` / `--git_url`), `run`
(`rsjax train` on every worker under nohup, a gs:// data_dir copied to local
disk first), `logs`, `delete`, and `all` (all of them, the wheel first).
`--dry_run` prints the commands instead of running them. `--config` is a
config name or a .py file, and `--config.KEY=VALUE` overrides are checked
here before any VM exists, then passed on. docs/scaling.md describes each
action.
"""
# Every command is built by a pure function returning an argv list, so tests
# check the exact commands; `run` only checks, plans and runs.
from __future__ import annotations

import argparse
import base64
import dataclasses
import hashlib
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import zipfile
from importlib import metadata
from pathlib import Path
from typing import Callable, Optional, Sequence

from rsjax import cli
from rsjax.errors import RunFailed, UserError

ACTIONS = ("create", "install", "run", "logs", "delete", "all", "wheel")
REMOTE_DIR = "~/rsjax"                      # the working directory (or the clone) on every worker
REMOTE_LOG = "~/rsjax_run.log"              # the training log on every worker
REMOTE_PID = "~/rsjax_run.pid"
REMOTE_DATA = "/tmp/rsjax/tensorflow_datasets"   # where a gs:// dataset is copied to
WHEEL_DIR = "/tmp/rsjax-wheel"              # where `wheel` puts what `install` copies
PACKAGE = "rsjax"
TPU_VM = ("gcloud", "compute", "tpus", "tpu-vm")
INSTALL_CHOICES = ("--git_url URL[@REF] (a clone of rsjax on every worker) or --pip_index URL "
                   "(rsjax==VERSION from a package index)")


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


def pip_install_shell(*requirements: str, index_url: Optional[str] = None) -> str:
    """pip on the worker: rsjax (any earlier install removed first, so a wheel
    of the same version replaces it) with `requirements`, and etils[epath-gcs]
    (gcsfs): epath, hence Orbax's metadata and rsjax's metrics, reach gs://
    through it; jax[tpu] comes with the `tpu` extra."""
    index = f"--index-url {shlex.quote(index_url)} " if index_url else ""
    return (f"python3 -m pip install --upgrade pip && python3 -m pip uninstall -y {PACKAGE} && "
            f"python3 -m pip install {index}{' '.join(requirements)} \"etils[epath-gcs]\"")


def clone_shell(git_url: str, git_ref: Optional[str] = None, directory: str = REMOTE_DIR) -> str:
    """Shell that replaces `directory` with a clone of `git_url` at `git_ref`.

    `--` ends git's options, so a URL that starts with '-' is a repository,
    never an option (`--upload-pack=...` would run a command); refs are
    checked by `check_git_ref` (git's own rules forbid a leading '-').
    """
    checkout = f" && git -C {directory} checkout {shlex.quote(git_ref)}" if git_ref else ""
    return f"rm -rf {directory} && git clone -- {shlex.quote(git_url)} {directory}{checkout}"


def is_rsjax_shell(what: str) -> str:
    """Shell, run in a source tree, that fails (exit 2, one error line) unless
    its pyproject.toml names rsjax: an unrelated repository is never installed."""
    message = shlex.quote(f"error: {what} is not rsjax: its pyproject.toml does not name "
                          f"{PACKAGE} (--git_url must be a repository of rsjax).")
    return (f"if ! grep -Eqs '^name *= *\"{PACKAGE}\"' pyproject.toml; then "
            f"echo {message} >&2; exit 2; fi")


def wheel_build_command(wheel_dir: str) -> list[str]:
    """The local step that builds the wheel (`rsjax tpu wheel`). `-P`: the
    current directory is not put on sys.path, so what is built is the rsjax
    this interpreter has installed, whatever directory this runs in."""
    return [sys.executable, "-P", "-m", "rsjax.launch.tpu", "wheel", f"--wheel_dir={wheel_dir}"]


def install_commands(tpu: Tpu, wheel: Optional[str] = None, git_url: Optional[str] = None,
                     git_ref: Optional[str] = None, pip_index: Optional[str] = None,
                     version: Optional[str] = None) -> list[list[str]]:
    """Puts rsjax on every worker (the local wheel, rsjax==version from
    `pip_index`, or a clone of `git_url`) and an empty REMOTE_DIR to run in."""
    fresh = f"rm -rf {REMOTE_DIR} && mkdir -p {REMOTE_DIR}"
    if git_url:
        what = f"{git_url}@{git_ref}" if git_ref else git_url
        here = '".[tpu]"'
        remote = (f"{clone_shell(git_url, git_ref)} && cd {REMOTE_DIR} && {is_rsjax_shell(what)} && "
                  f"{pip_install_shell(here)}")
        return [ssh_command(tpu, remote)]
    if pip_index:
        requirement = f'"{PACKAGE}[tpu]=={version}"'
        return [ssh_command(tpu, f"{fresh} && {pip_install_shell(requirement, index_url=pip_index)}")]
    name = os.path.basename(wheel)
    # A direct reference: the `tpu` extra of exactly this file ($HOME: ~ is
    # not expanded inside quotes).
    requirement = f'"{PACKAGE}[tpu] @ file://$HOME/{name}"'
    return [scp_command(tpu, wheel, f"~/{name}"),
            ssh_command(tpu, f"{fresh} && {pip_install_shell(requirement)}")]


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
# What `install` ships: the rsjax running this, as a wheel
# ---------------------------------------------------------------------------
def _normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _normalized_version(version: str) -> str:
    try:
        from packaging.version import Version
        return str(Version(version))
    except Exception:  # pylint: disable=broad-except   # no packaging, or not PEP 440: as written
        return version


@dataclasses.dataclass(frozen=True)
class Source:
    """The rsjax to ship: a checkout of rsjax (`root` holds its pyproject.toml),
    or an installed distribution (`dist`, its files listed in RECORD)."""

    kind: str                       # "checkout" or "installed"
    root: Path
    version: str
    wheel_tag: str = "py3-none-any"
    dist: Optional[metadata.Distribution] = None

    @property
    def wheel_name(self) -> str:
        return f"{PACKAGE}-{self.version}-{self.wheel_tag}.whl"

    def describe(self) -> str:
        where = "the checkout" if self.kind == "checkout" else "the installed files in"
        return f"rsjax {self.version} from {where} {self.root}"


def _pyproject_name_version(path: Path) -> tuple[Optional[str], Optional[str]]:
    import tomllib

    try:
        project = tomllib.loads(path.read_text()).get("project", {})
    except (OSError, ValueError, UnicodeDecodeError):
        return None, None
    return project.get("name"), project.get("version")


def find_source(package_dir: Optional[Path] = None,
                distribution: Callable[[str], metadata.Distribution] = metadata.distribution) -> Source:
    """Where the running rsjax comes from (`package_dir`: its package folder,
    by default the imported one's). Never the current directory.

    A checkout: the folder above the package has a pyproject.toml naming
    rsjax. Installed: the installed distribution's RECORD lists this very
    package. Anything else (a pyproject.toml of another project above it,
    or files no distribution accounts for) is refused with a UserError.
    """
    if package_dir is None:
        import rsjax
        package_dir = Path(rsjax.__file__).parent
    package_dir = Path(package_dir).resolve()
    root = package_dir.parent
    pyproject = root / "pyproject.toml"
    other = None
    if pyproject.is_file():
        name, version = _pyproject_name_version(pyproject)
        if name is not None and _normalized(name) == PACKAGE:
            if not version:
                raise UserError(f"{pyproject} names rsjax but no [project] version: cannot name "
                                f"the wheel. Give it one, or use {INSTALL_CHOICES}.")
            return Source("checkout", root, _normalized_version(version))
        other = name or "no project"
    try:
        dist = distribution(PACKAGE)
        files = dist.files
        init = dist.locate_file(f"{PACKAGE}/__init__.py")
    except metadata.PackageNotFoundError:
        dist, files, init = None, None, None
    if dist is not None and files and Path(init).resolve() == package_dir / "__init__.py":
        info = next((f.parts[0] for f in files if f.parts[0].endswith(".dist-info")), None)
        wheel = Path(dist.locate_file(f"{info}/WHEEL")) if info else None
        tags = [line.split(":", 1)[1].strip() for line in
                (wheel.read_text().splitlines() if wheel is not None and wheel.is_file() else [])
                if line.startswith("Tag:")]
        return Source("installed", root, _normalized_version(dist.version),
                      tags[0] if len(tags) == 1 else "py3-none-any", dist)
    if other is not None:
        raise UserError(f"rsjax runs from {package_dir}, inside {root}, whose pyproject.toml "
                        f"names {other!r}, not rsjax, and no installed rsjax lists these files: "
                        f"refusing to ship that project. Install rsjax (pip install), or use "
                        f"{INSTALL_CHOICES}.")
    raise UserError(f"rsjax runs from {package_dir}, which is neither a checkout of rsjax "
                    f"(no pyproject.toml naming rsjax in {root}) nor an installed rsjax "
                    f"(no package metadata lists it): nothing to build a wheel from. Use "
                    f"{INSTALL_CHOICES}.")


def installed_version() -> str:
    """This rsjax's version, from its package metadata (what --pip_index installs)."""
    try:
        return metadata.version(PACKAGE)
    except metadata.PackageNotFoundError:
        raise UserError(f"--pip_index: rsjax is not installed here (no package metadata), so "
                        "there is no version to ask the index for: pip install rsjax, or use "
                        "--git_url URL[@REF].") from None


def _checkout_files(root: Path) -> list[str]:
    """The checkout's files less what git ignores (build/, *.egg-info, work
    folders), so a build sees no stale output; without git, every file but
    those folders."""
    top = subprocess.run(["git", "-C", str(root), "rev-parse", "--show-toplevel"],
                         capture_output=True, text=True)
    if top.returncode == 0 and Path(top.stdout.strip()).resolve() == root.resolve():
        listed = subprocess.run(["git", "-C", str(root), "ls-files", "-z", "--cached", "--others",
                                 "--exclude-standard"], capture_output=True, text=True, check=True)
        return [n for n in listed.stdout.split("\0") if n and (root / n).is_file()]
    skip = {".git", "build", "dist", "work", "__pycache__", ".pytest_cache"}
    names = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in skip and not d.endswith(".egg-info")]
        names += [os.path.relpath(os.path.join(folder, f), root) for f in files]
    return names


def _setuptools_ok() -> bool:
    """setuptools >= 64 here (pyproject.toml's build requirement): then the
    build needs no package index (--no-build-isolation)."""
    try:
        return int(metadata.version("setuptools").split(".")[0]) >= 64
    except (metadata.PackageNotFoundError, ValueError):
        return False


def _wheel_from_checkout(source: Source, out: Path) -> Path:
    with tempfile.TemporaryDirectory(prefix="rsjax-wheel-") as tmp:
        tree, built = Path(tmp) / "src", Path(tmp) / "dist"
        for name in _checkout_files(source.root):
            (tree / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source.root / name, tree / name)
        command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-cache-dir",
                   *(["--no-build-isolation"] if _setuptools_ok() else []),
                   "--wheel-dir", str(built), str(tree)]
        done = subprocess.run(command, capture_output=True, text=True, cwd=tmp)
        wheels = sorted(built.glob("*.whl")) if built.is_dir() else []
        if done.returncode != 0 or [w.name for w in wheels] != [source.wheel_name]:
            raise RunFailed(f"building the wheel of {source.describe()} failed "
                            f"({shlex.join(command)}; built {[w.name for w in wheels]}, expected "
                            f"{source.wheel_name}); nothing after it ran. Fix the "
                            f"build, or use {INSTALL_CHOICES}:\n"
                            f"{done.stdout[-2000:]}{done.stderr[-2000:]}")
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(wheels[0]), out)
    return out


# Written by the installer, not part of the wheel (RECORD is written anew).
_INSTALLER_FILES = {"RECORD", "INSTALLER", "REQUESTED", "direct_url.json"}


def _wheel_from_installed(source: Source, out: Path) -> Path:
    """Repacks the installed distribution's files as a wheel: the package and
    its .dist-info as RECORD lists them, less compiled files, installer
    records and anything outside site-packages (console scripts: pip makes
    them again from entry_points.txt)."""
    dist = source.dist
    members = []
    for f in dist.files:
        parts = f.parts
        if parts[0] == ".." or "__pycache__" in parts or f.suffix == ".pyc":
            continue
        if parts[0].endswith(".dist-info") and (len(parts) == 2 and parts[1] in _INSTALLER_FILES):
            continue
        if parts[0] != PACKAGE and not parts[0].endswith(".dist-info"):
            continue
        members.append(f)
    info = next(f.parts[0] for f in dist.files if f.parts[0].endswith(".dist-info"))
    missing = [str(f) for f in members if not Path(dist.locate_file(f)).is_file()]
    if missing:
        raise RunFailed(f"the installed {source.describe()} lacks files its RECORD lists "
                        f"({', '.join(missing[:5])}): reinstall rsjax, or use {INSTALL_CHOICES}.")
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    record = []
    with zipfile.ZipFile(partial, "w", zipfile.ZIP_DEFLATED) as wheel:
        for f in sorted(members, key=lambda f: (f.parts[0].endswith(".dist-info"), str(f))):
            data = Path(dist.locate_file(f)).read_bytes()
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            name = "/".join(f.parts)
            wheel.writestr(name, data)
            record.append(f"{name},sha256={digest},{len(data)}")
        record.append(f"{info}/RECORD,,")
        wheel.writestr(f"{info}/RECORD", "\n".join(record) + "\n")
    os.replace(partial, out)
    return out


def build_wheel(source: Source, wheel_dir: str) -> Path:
    """The wheel of `source` at `wheel_dir`/`source.wheel_name` (replaced if there)."""
    out = Path(wheel_dir) / source.wheel_name
    if source.kind == "checkout":
        return _wheel_from_checkout(source, out)
    return _wheel_from_installed(source, out)


# ---------------------------------------------------------------------------
# Planning and running
# ---------------------------------------------------------------------------
def plan(args: argparse.Namespace, overrides: Sequence[str] = ()) -> list[list[str]]:
    """Every command of `args.action`, in order (`args` as `check_args` left it)."""
    if args.action == "wheel":
        return [wheel_build_command(args.wheel_dir)]
    tpu = Tpu(args.name, args.zone, args.project)
    steps = ("create", "install", "run", "logs", "delete") if args.action == "all" else (args.action,)
    ships_wheel = "install" in steps and args.source is not None
    commands = [wheel_build_command(args.wheel_dir)] if ships_wheel else []
    for step in steps:
        if step == "create":
            commands.append(create_command(tpu, args.accelerator_type, args.runtime_version,
                                           spot=args.spot, preemptible=args.preemptible))
        elif step == "install":
            wheel = os.path.join(args.wheel_dir, args.source.wheel_name) if ships_wheel else None
            commands += install_commands(tpu, wheel, args.git_url, args.git_ref, args.pip_index,
                                         args.pip_version)
        elif step == "run":
            if args.config_file:
                commands.append(scp_command(tpu, args.config_file,
                                            f"{REMOTE_DIR}/{os.path.basename(args.config_file)}"))
            commands.append(run_command(tpu, args.remote_config, args.workdir, args.data_dir,
                                        overrides))
        elif step == "logs":
            commands.append(logs_command(tpu, args.worker, follow=True))
        elif step == "delete":
            commands.append(delete_command(tpu))
    return commands


def format_commands(commands: Sequence[Sequence[str]]) -> str:
    """One shell-quoted command per line (what --dry_run prints)."""
    return "".join(shlex.join(c) + "\n" for c in commands)


def execute(commands: Sequence[Sequence[str]], runner=subprocess.run,
            build: Optional[Callable[[], Path]] = None) -> None:
    """Runs the commands in order; stops at the first that fails, saying which.

    The wheel step (`wheel_build_command`) runs in this process through
    `build` when given: the same rsjax, for certain, as the one planning."""
    if any(c[0] == "gcloud" for c in commands) and shutil.which("gcloud") is None:
        raise UserError("gcloud is not installed or not on PATH: install the Google Cloud CLI "
                        "(https://cloud.google.com/sdk/docs/install), run `gcloud auth login`, "
                        "or use --dry_run to see the commands.")
    for command in commands:
        print("+", shlex.join(command), flush=True)
        if build is not None and list(command[1:5]) == ["-P", "-m", "rsjax.launch.tpu", "wheel"]:
            build()
            continue
        try:
            runner(list(command), check=True)
        except subprocess.CalledProcessError as e:
            raise RunFailed(f"failed (exit status {e.returncode}): {shlex.join(command)}\n"
                            "Nothing after it ran. If a TPU VM was created, it is still running "
                            "(and billed): rerun the remaining actions, or `delete` it.") from None


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------
# Google Cloud's resource names (RFC 1035 labels), which TPU VM names follow.
TPU_NAME = re.compile(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?")
TPU_NAME_RULE = ("a TPU VM name is 1 to 63 characters: lowercase letters, digits and hyphens, "
                 "starting with a letter and not ending with a hyphen (e.g. rsjax-1)")


def tpu_name(text: str) -> str:
    """A TPU VM name as Google Cloud accepts it (and never a gcloud option)."""
    if not TPU_NAME.fullmatch(text):
        lower = text.lower().replace("_", "-")
        hint = f"; did you mean {lower!r}?" if TPU_NAME.fullmatch(lower) else ""
        raise argparse.ArgumentTypeError(f"{text!r}: {TPU_NAME_RULE}{hint}")
    return text


def check_git_ref(ref: Optional[str]) -> None:
    if ref is not None and (not ref or ref.startswith("-") or any(c.isspace() for c in ref)):
        raise UserError(f"--git_ref {ref!r}: not a git ref (a branch, tag or commit; refs never "
                        "start with '-' or hold spaces).")


def split_git_url(text: str) -> tuple[str, Optional[str]]:
    """'URL@REF' -> (URL, REF), as pip writes git URLs; an '@' in the address
    (https://user@host/..., git@host:path) is not a ref. 'URL' -> (URL, None)."""
    scheme = text.find("://")
    if scheme >= 0:
        slash = text.find("/", scheme + 3)
        path_start = len(text) if slash < 0 else slash
    elif re.match(r"^[^/]*:", text):          # scp-like user@host:path
        path_start = text.index(":") + 1
    else:                                     # a local path
        path_start = 0
    at = text.rfind("@", path_start)
    if at < 0:
        return text, None
    return text[:at], text[at + 1:]


def check_config(spec: str, overrides: Sequence[str]) -> None:
    """Loads the config here when it can (a name, or a .py file that exists
    locally), so an unknown name or override key fails before any VM exists.
    A path that only exists on the workers is passed on unchecked."""
    from rsjax import config_loader

    head, _ = config_loader.split_spec(spec)
    if not _is_config_file(head) or os.path.isfile(head):
        config_loader.load_config(spec, overrides)


def _is_config_file(head: str) -> bool:
    return head.endswith(".py") or "/" in head or os.sep in head


def config_for_workers(args) -> tuple[str, Optional[str]]:
    """(the --config the workers get, the local file to copy to ~/rsjax or None).

    A local .py file is copied to ~/rsjax on every worker, where rsjax.train
    runs; a file that is not here must be on the workers already, in the
    --git_url clone."""
    from rsjax import config_loader

    head, arg = config_loader.split_spec(args.config)
    if not _is_config_file(head):
        return args.config, None
    if os.path.isfile(head):
        name = os.path.basename(head)
        if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*\.py", name):
            raise UserError(f"--config {head}: copied to the workers under its own name, which "
                            "must be letters, digits, '_', '-' and '.' ending in .py: rename it.")
        return name + (f":{arg}" if arg else ""), os.path.abspath(head)
    if args.action == "all" and not args.git_url:
        raise UserError(f"--config {head}: no such file here, and the workers have no checkout "
                        "to find it in (all installs a wheel): give a local file (it is copied "
                        "to the workers), a config name (fusion:demo), or --git_url URL[@REF] "
                        "of a repository that has it (the path is then relative to its root).")
    return args.config, None


def add_arguments(parser) -> None:
    parser.epilog = ("--config.KEY=VALUE options go to rsjax train on the workers, e.g. "
                     "--config.total_steps=1000 (after `--` too, as before). "
                     f"TPU VM names: {TPU_NAME_RULE}.")
    parser.add_argument("action", choices=ACTIONS, metavar="ACTION",
                        help="create, install, run, logs, delete, or all: those in that order; "
                             "wheel: only build the wheel that install ships")
    parser.add_argument("--name", type=tpu_name, default=None,
                        help=f"TPU VM name (every action but wheel): {TPU_NAME_RULE}")
    parser.add_argument("--zone", default=None, help="e.g. us-central1-a (every action but wheel)")
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
                                 "(a local one is copied to the workers), with --config.KEY=VALUE "
                                 "overrides (default: fusion)")
    parser.add_argument("--workdir", default=None, help="gs://... where checkpoints and metrics go")
    parser.add_argument("--data_dir", default=None,
                        help="TFDS data_dir holding the built dataset (gs://..., copied to each worker)")
    parser.add_argument("--git_url", default=None, metavar="URL[@REF]",
                        help="install: clone this repository of rsjax on every worker (at REF: "
                             "a branch, tag or commit) instead of shipping the wheel")
    parser.add_argument("--git_ref", default=None,
                        help="with --git_url: the commit/branch/tag to install (same as URL@REF)")
    parser.add_argument("--pip_index", default=None, metavar="URL",
                        help="install: rsjax==THIS_VERSION from this package index (pip "
                             "--index-url, so it must serve the dependencies too) instead of "
                             "shipping the wheel")
    parser.add_argument("--wheel_dir", default=WHEEL_DIR,
                        help="local folder for the wheel that install ships")
    parser.add_argument("--worker", default="0", help="logs: a worker number or 'all'")
    parser.add_argument("--dry_run", action="store_true",
                        help="print the commands instead of running them")


def check_args(args) -> None:
    """Completes defaults from --bucket and checks every option; raises UserError."""
    args.config = args.config or "fusion"
    args.wheel_dir = os.path.abspath(args.wheel_dir)  # an absolute path is never a gcloud option
    args.source = args.pip_version = None
    args.remote_config, args.config_file = args.config, None
    if args.action != "wheel":
        missing = [f"--{k}" for k in ("name", "zone") if getattr(args, k) is None]
        if missing:
            raise UserError(f"the following arguments are required: {', '.join(missing)} "
                            f"({TPU_NAME_RULE}; a zone such as us-central1-a)")
    if args.bucket:
        if not args.bucket.startswith("gs://"):
            raise UserError(f"--bucket={args.bucket}: give a gs:// URI, e.g. gs://my-bucket")
        bucket = args.bucket.rstrip("/")
        args.workdir = args.workdir or f"{bucket}/runs/{args.name}"
        args.data_dir = args.data_dir or f"{bucket}/tensorflow_datasets"
    if args.spot and args.preemptible:
        raise UserError("choose one of --spot and --preemptible")
    if args.worker != "all" and not args.worker.isdigit():
        raise UserError(f"--worker {args.worker}: a worker number (0, 1, ...) or 'all'.")
    check_install_args(args)
    if args.action in ("run", "all"):
        missing = [f"--{k}" for k in ("workdir", "data_dir") if not getattr(args, k)]
        if missing:
            raise UserError(f"{args.action} needs {' and '.join(missing)} (or --bucket gs://BUCKET)")
        if not args.workdir.startswith("gs://"):
            raise UserError(f"--workdir={args.workdir}: use a gs:// path. Every host of a slice "
                            "writes its part of each checkpoint into the same directory, so it "
                            "must be shared storage, and it outlives the VM.")
        check_config(args.config, args.config_overrides)
        args.remote_config, args.config_file = config_for_workers(args)


def check_install_args(args) -> None:
    """What install puts on the workers: --git_url, --pip_index, or (default)
    the wheel of the running rsjax (`find_source`, checked here, before any VM)."""
    if args.git_url is not None:
        if not args.git_url.strip() or any(c.isspace() for c in args.git_url):
            raise UserError(f"--git_url {args.git_url!r}: give a repository URL, e.g. "
                            "https://github.com/ORG/rsjax.git@v0.3.0")
        url, ref = split_git_url(args.git_url)
        if ref is not None and args.git_ref is not None:
            raise UserError(f"--git_url {args.git_url} names a ref (@{ref}) and --git_ref gives "
                            f"another ({args.git_ref}): give one.")
        args.git_url, args.git_ref = url, ref if ref is not None else args.git_ref
        if not args.git_url:
            raise UserError(f"--git_url @{ref}: give the repository before the '@', e.g. "
                            f"https://github.com/ORG/rsjax.git@{ref}")
    elif args.git_ref is not None:
        raise UserError(f"--git_ref {args.git_ref} needs --git_url URL (or give --git_url "
                        "URL@REF): without it, install ships the wheel of the rsjax running here, "
                        "which has no git ref.")
    check_git_ref(args.git_ref)
    if args.pip_index is not None:
        if args.git_url:
            raise UserError("choose one of --git_url and --pip_index (where the workers get rsjax)")
        if not re.fullmatch(r"(https?|file)://\S+", args.pip_index):
            raise UserError(f"--pip_index {args.pip_index!r}: give the index URL, e.g. "
                            "https://pypi.org/simple or https://REGION-python.pkg.dev/PROJECT/REPO/simple/")
    if args.action in ("install", "all"):
        if args.pip_index:
            args.pip_version = installed_version()
        elif not args.git_url:
            args.source = find_source()
    elif args.action == "wheel":
        args.source = find_source()


def run(args) -> int:
    check_args(args)
    commands = plan(args, args.config_overrides)
    if args.dry_run:
        sys.stdout.write(format_commands(commands))
        return 0
    if args.action == "wheel":
        print(f"building the wheel of {args.source.describe()}", file=sys.stderr, flush=True)
        print(build_wheel(args.source, args.wheel_dir), flush=True)
        return 0
    build = None
    if args.source is not None:
        def build():
            print(f"  the wheel of {args.source.describe()}", flush=True)
            return build_wheel(args.source, args.wheel_dir)
    execute(commands, build=build)
    return 0


main = cli.command_main(__name__)

if __name__ == "__main__":
    sys.exit(main())
