"""One writer per folder: a lock file naming its owner, with stale locks detected.

`FolderLock` (for training runs `workdir_lock` and the `one_writer` decorator)
holds `<folder>/<name>`, a JSON record of host, pid, start and command, created
exclusively and removed when the writer ends; a second writer gets `FolderBusy`
naming the owner. A lock left by a process of this host that no longer runs is
stale (`is_stale`, by `process_identity`, not by wall-clock time) and is taken
over with a warning; every check-and-take on a local disk runs under an
advisory `flock` on the folder (`_guarded`).
docs/training.md ("One writer per workdir") explains why, the races this
closes and what object storage cannot guarantee.
"""
from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import logging
import math
import os
import socket
import sys
import time
from typing import Callable, Iterator, Optional

import psutil
from etils import epath

from rsjax.errors import UserError

log = logging.getLogger("rsjax")


class FolderBusy(UserError):
    """Another live process holds the folder's lock."""


def _process_start(pid: int) -> Optional[float]:
    """The start time of process `pid` (seconds since the epoch), None when it does not run."""
    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return None
    except psutil.AccessDenied:       # runs, under another user
        return float("nan")


def _boot_id() -> Optional[str]:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return None


def process_identity(pid: int) -> Optional[str]:
    """What tells process `pid` apart from any other that has or will have its pid
    on this host, unchanged by clock adjustments; None when it does not run.
    Linux: the boot's id and the start in clock ticks since boot (/proc/PID/stat,
    field 22, which psutil only offers converted to wall-clock time); elsewhere
    psutil's start time (wall clock, to the hundredth of a second)."""
    boot = _boot_id()
    if boot is not None:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
        except OSError:
            return None
        return f"{boot}/{fields[19]}"      # fields[0] is field 3 (state); field 22 is starttime
    started = _process_start(pid)
    return None if started is None or math.isnan(started) else f"{started:.2f}"


def owner_record(command: Optional[str] = None) -> dict:
    """Who this process is, as written into a lock file."""
    pid = os.getpid()
    return {"host": socket.gethostname(), "pid": pid, "identity": process_identity(pid),
            "started": _process_start(pid),
            "command": command or " ".join(os.path.basename(a) if i == 0 else a
                                           for i, a in enumerate(sys.argv))[:300],
            "since": time.strftime("%Y-%m-%d %H:%M:%S")}


def is_stale(owner: dict) -> bool:
    """Whether a lock's owner is gone: same host, and its pid runs no more (or runs another process)."""
    if owner.get("host") != socket.gethostname():
        return False
    try:
        pid = int(owner["pid"])
    except (KeyError, TypeError, ValueError):
        return False
    if pid <= 0:
        return True
    if owner.get("identity") is not None:
        return process_identity(pid) != owner["identity"]
    # A lock written before `identity` existed: compare wall-clock start times.
    started = _process_start(pid)
    if started is None:
        return True
    recorded = owner.get("started")
    if recorded is None or math.isnan(started):     # unknown, or another user's process: assume alive
        return False
    return abs(float(recorded) - started) > 1.0


def describe(owner: dict) -> str:
    return (f"pid {owner.get('pid')} on host {owner.get('host')}, since {owner.get('since')}, "
            f"running `{owner.get('command')}`")


class FolderLock:
    """An exclusive lock on a folder, as a context manager.

        with FolderLock(workdir, "rsjax.lock", "training run"):
            ...

    Raises FolderBusy (a UserError: one line, exit 2) when another live
    process holds it; takes over a stale lock with a warning.
    """

    def __init__(self, folder, name: str = "rsjax.lock", what: str = "rsjax run",
                 advice: str = "Wait for it to finish, or use another folder"):
        self.folder = epath.Path(os.fspath(folder))
        self.path = self.folder / name
        self.what = what
        self.advice = advice
        self.owner = owner_record()
        self.held = False

    # -- acquire / release ------------------------------------------------------
    def acquire(self, wait_seconds: float = 0.0, poll_seconds: float = 2.0) -> "FolderLock":
        """Takes the lock; with `wait_seconds`, waits that long for a live owner to finish
        (saying so once) before refusing."""
        deadline = time.monotonic() + wait_seconds
        announced = False
        while True:
            try:
                return self._acquire_once()
            except FolderBusy as busy:
                if time.monotonic() >= deadline:
                    raise
                if not announced:
                    log.warning("%s", str(busy).split(". ")[0] + ": waiting for it to finish.")
                    announced = True
                time.sleep(poll_seconds)

    def _acquire_once(self) -> "FolderLock":
        self.folder.mkdir(parents=True, exist_ok=True)
        with _guarded(self.folder):
            return self._take()

    def _take(self) -> "FolderLock":
        """Creates the lock file, or takes over a stale one (under `_guarded`)."""
        for _ in range(3):
            if self._create():
                self.held = True
                return self
            holder = self._read_holder()
            if holder is None:
                continue              # removed meanwhile, or half-written: try again
            if not is_stale(holder):
                raise FolderBusy(
                    f"{self.folder}: in use by another {self.what} ({describe(holder)}). {self.advice}. "
                    f"If that process is gone (e.g. it ran on another machine), delete {self.path}.")
            log.warning("%s: taking over a stale lock of a %s that no longer runs (%s).",
                        self.folder, self.what, describe(holder))
            self.path.unlink(missing_ok=True)
        raise FolderBusy(f"{self.folder}: could not take the lock {self.path}; another process keeps "
                         "writing it. Check what runs on this folder.")

    def release(self) -> None:
        """Removes the lock file if it is still this process's."""
        if not self.held:
            return
        self.held = False
        with _guarded(self.folder):
            holder = self._read_holder(retries=1)
            if holder is not None and (holder.get("host"), holder.get("pid")) == (
                    self.owner["host"], self.owner["pid"]):
                self.path.unlink(missing_ok=True)

    def __enter__(self) -> "FolderLock":
        return self if self.held else self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    # -- the file -----------------------------------------------------------------
    def _create(self) -> bool:
        """Writes the lock file if there is none; False when one exists."""
        text = json.dumps(self.owner)
        if "://" in os.fspath(self.path):      # object storage: no exclusive create
            if self.path.exists():
                return False
            self.path.write_text(text)
            return True
        try:
            fd = os.open(os.fspath(self.path), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(text)
        return True

    def _read_holder(self, retries: int = 5) -> Optional[dict]:
        """The lock's owner record; None when the file is gone. A file still being written
        (empty or half-written JSON) is read again; one that stays unreadable is stale junk."""
        for attempt in range(retries):
            try:
                text = self.path.read_text()
            except FileNotFoundError:
                return None
            try:
                holder = json.loads(text)
                if isinstance(holder, dict):
                    return holder
            except json.JSONDecodeError:
                pass
            if attempt + 1 < retries:
                time.sleep(0.2)
        # Not a lock rsjax wrote (or one cut short by a crash mid-write): treat as stale on this host.
        return {"host": socket.gethostname(), "pid": -1, "command": "unreadable lock file",
                "since": "unknown"}


@contextlib.contextmanager
def _guarded(folder) -> Iterator[None]:
    """Holds an exclusive `flock` on `folder` (a local one) for a check-and-take of its lock file.

    Held for milliseconds, released when the block ends or the process dies.
    Where there is no flock (object storage, a file system refusing it) the
    block runs unguarded, as before."""
    text = os.fspath(folder)
    fd = None
    if "://" not in text:
        try:
            fd = os.open(text, os.O_RDONLY | os.O_DIRECTORY)
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as err:
            log.debug("%s: no flock (%s); taking its lock unguarded.", text, err)
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)                 # closing drops the flock


@contextlib.contextmanager
def workdir_lock(workdir, what: str = "training run") -> Iterator[None]:
    """Holds `<workdir>/rsjax.lock` for a training run, on every process of a multi-host job.

    Process 0 takes the lock (all processes write the same workdir); the others
    learn from it whether it got it, so a refused run stops everywhere with
    the same FolderBusy instead of hanging in a collective."""
    import jax
    import numpy as np

    text = os.fspath(workdir)
    lock = FolderLock(text if "://" in text else os.path.abspath(text), what=what,
                      advice="Wait for it to finish, or train in another --workdir")
    error = None
    if jax.process_index() == 0:
        try:
            lock.acquire()
        except FolderBusy as err:
            error = err
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        ok = bool(multihost_utils.broadcast_one_to_all(np.int32(error is None)))
        if not ok and error is None:
            error = FolderBusy(f"{workdir}: in use by another {what} (see process 0's message).")
    if error is not None:
        raise error
    try:
        yield
    finally:
        lock.release()


def one_writer(train_fn: Callable) -> Callable:
    """Decorator for `train_and_evaluate(config, workdir, ...)`: runs it holding the workdir's lock."""
    @functools.wraps(train_fn)
    def locked(config, workdir, *args, **kwargs):
        with workdir_lock(workdir):
            return train_fn(config, workdir, *args, **kwargs)
    return locked
