"""Checkpoints (Orbax, with the input iterator's position) and preemption.

A checkpoint holds two items: `state`, the train state pytree (Orbax's
standard handler: any device count can restore it), and `data_iter`, the grain
iterator's position, saved by grain's own Orbax handler (one small JSON file
per process, since every process reads its own share of the data), so a
resumed run sees exactly the batches it would have seen. Every finished step
carries checksums of its files, and a corrupt step falls back to the newest
intact one (`integrity.py`); a step without them (a run killed between a
save's commit and its checksums) is unverified: restored with a warning and
a finiteness check, never named the last good one.
"""
from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import signal
import threading
from typing import Any, Callable, Optional

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from rsjax import mesh as mesh_lib
from rsjax.errors import RunFailed, UserError
from rsjax.runtime import workdir_path
from rsjax.trainers import integrity
from rsjax.trainers.nonfinite import unsaved_final_state

log = logging.getLogger("rsjax")


def save_policy(every_steps: int):
    """Every `every_steps` steps and on preemption, as the config says.

    Orbax's default also saves the first step of a run that has no checkpoint
    (its InitialSavePolicy): a second save the config did not ask for, whose
    one-off costs (the first serialization, its compilations) land between the
    first and second step of every run."""
    from orbax.checkpoint import checkpoint_managers as policies

    return policies.AnySavePolicy([policies.FixedIntervalPolicy(max(1, int(every_steps))),
                                   policies.PreemptionCheckpointingPolicy()])


@functools.cache
def _serial_replica_writes_on_cpu() -> None:
    """On CPU devices, each replicated array is written from one replica.

    Orbax splits a replicated array's writing across its replicas (replica
    parallel), which slices it on every device: one small program compiled per
    device and array shape, 232 compilations and about 10 s for the tiny demo
    model on 8 CPU devices, to copy memory that is already the host's. Devices
    that are not CPUs keep Orbax's default. Registered once per process (the
    registry is global)."""
    if jax.default_backend() != "cpu":
        return
    from orbax.checkpoint import type_handlers

    type_handlers.register_type_handler(
        jax.Array, type_handlers.ArrayHandler(use_replica_parallel=False), override=True)


class DiskFullError(RunFailed):
    """A checkpoint could not be written: the disk (or the quota) is full."""


class Checkpointer:
    """Orbax CheckpointManager over (train state, input iterator).

    Orbax writes each step to a temporary directory and renames it when
    complete, so a run killed mid-save leaves the previous checkpoint current.
    Saves are asynchronous; `wait()` blocks until the last one is on disk (the
    iterator's position is written before `save` returns).

    What rsjax adds (`integrity.py`): no state that must not be resumed is
    saved (skipped non-finite steps, non-finite or diverged weights); each
    finished step gets a checksum of its files; `restore` checks them and
    falls back to the newest intact step, naming the corrupt ones.
    """

    def __init__(self, workdir: str | os.PathLike, every_steps: int, keep: int, async_save: bool = True,
                 folder: str = "checkpoints"):
        # epath: a gs:// workdir stays a URI (Orbax and tensorstore write GCS natively).
        self.workdir = epath.Path(workdir_path(workdir))
        self.directory = self.workdir / folder
        options = ocp.CheckpointManagerOptions(
            save_decision_policy=save_policy(every_steps), max_to_keep=keep,
            enable_async_checkpointing=async_save, create=True, cleanup_tmp_directories=True)
        _serial_replica_writes_on_cpu()
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=("state", "data_iter"))
        self._saved_step = self.manager.latest_step()
        self._unhashed: list[int] = []
        self.refused: Optional[str] = None     # why the last save asked for was refused
        self._writing: Optional[int] = None    # the step of the last save started

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_iter=None, force: bool = False) -> bool:
        """Saves `state` and the position of `data_iter` (a grain iterator, or
        anything with get_state/set_state/start_prefetch) when the interval says
        so (or `force`); a step is saved once, and never a state that must not
        be resumed (`integrity.unsafe_to_save`)."""
        self._checksum_finished()
        if step == self._saved_step:
            return False
        if not force and not self.manager.should_save(step):
            return False
        self.refused = integrity.unsafe_to_save(state)
        if self.refused:
            last = self.last_good_step()
            log.error("Not saving step %d: %s. %s", step, self.refused,
                      f"The last good checkpoint stays step {last}." if last is not None
                      else "No good checkpoint has been saved yet.")
            return False
        if self._unhashed:
            # The previous save has to be finished before its checksums; Orbax's save would
            # wait for it anyway, and nothing deletes steps meanwhile.
            with self._disk_full_fails_the_run():
                self.manager.wait_until_finished()
            self._record_checksums()
        items = {"state": ocp.args.StandardSave(state)}
        if data_iter is not None:
            items["data_iter"] = grain.checkpoint.CheckpointSave(data_iter)
        self._writing = step
        with self._disk_full_fails_the_run():
            saved = self.manager.save(step, args=ocp.args.Composite(**items), force=force)
        if saved:
            self._saved_step = step
            self._unhashed.append(step)
        return saved

    def save_final(self, step: int, state: Any, data_iter=None) -> None:
        """Saves the run's final state; raises RunFailed when it must not be saved
        (diverged, non-finite): a run whose end was not kept has failed, and its
        exit status must say so to a scheduler."""
        if step == self._saved_step or self.save(step, state, data_iter, force=True):
            return
        unsaved_final_state(step, self.refused, os.fspath(self.workdir), self.last_good_step())

    def last_good_step(self) -> Optional[int]:
        """The newest step whose checksums were recorded (any step, on object storage).

        This run's pending saves are finished and checksummed first (they are
        good: `save` refuses bad states); a step without checksums, left by a run
        killed between its commit and its checksums, is never named: its bytes
        cannot be vouched for."""
        self.wait()
        for step in sorted(self.manager.all_steps(), reverse=True):
            if integrity.is_verified(self.directory / str(step)):
                return step
        return None

    def _checksum_finished(self) -> None:
        """Checksums of the saves Orbax has finished, without waiting for one in progress.

        Called on every loop step (through `save`), so a step gets its checksums
        within a step of its commit, not at the next save; a kill in between
        leaves it unverified, which `restore` says and checks."""
        if self._unhashed and not self.manager.is_saving_in_progress():
            self._record_checksums()

    def _record_checksums(self) -> None:
        """Checksums of the finished steps not yet recorded (process 0; see integrity.py)."""
        steps, self._unhashed = self._unhashed, []
        if jax.process_index() == 0:
            for step in steps:
                integrity.write_manifest(self.directory / str(step))

    # -- restoring ------------------------------------------------------------------------------
    def restore(self, abstract_state: Any, data_iter=None, step: Optional[int] = None,
                move_corrupt: bool = False):
        """(state, step) of checkpoint `step`, by default of the newest intact one, or None
        when there is none; `data_iter` (if given and saved) is moved to the saved position.

        A step whose checksums do not match, or whose files Orbax cannot read, is
        corrupt: it is named in a warning and the next older step is tried. A
        named `step` that is corrupt is a UserError. With `move_corrupt`
        (training) corrupt steps are moved to <workdir>/corrupt_checkpoints/, so
        that new saves and max_to_keep see good steps only. No intact step at
        all is a UserError. So is an intact step that does not fit `abstract_state`
        (a checkpoint of another config: `integrity.mismatch`, `integrity.is_damage`),
        naming how its arrays differ; nothing is moved then.
        """
        available = sorted(self.manager.all_steps(), reverse=True)
        if step is not None and step not in available:
            raise UserError(f"{self.directory}: no checkpoint of step {step}; there are steps "
                            f"{', '.join(map(str, sorted(available))) or 'none'}.")
        candidates = [step] if step is not None else available
        if not candidates:
            return None
        corrupt: list[tuple[int, str]] = []
        for candidate in candidates:
            state, why = self._restore_intact(abstract_state, data_iter, candidate)
            if why is None:
                if corrupt:
                    log.warning("Using checkpoint step %d, the newest intact one in %s (newer: %s).",
                                candidate, self.directory,
                                "; ".join(f"step {s} corrupt" for s, _ in corrupt))
                    self._set_aside(corrupt, move_corrupt)
                return state, candidate
            log.warning("Checkpoint step %d in %s is corrupt: %s.", candidate, self.directory, why)
            corrupt.append((candidate, why))
            if step is not None:
                older = [s for s in available if s < step
                         and integrity.verify(self.directory / str(s)) is None]
                raise UserError(
                    f"{self.directory / str(step)}: checkpoint step {step} is corrupt: {why}. "
                    + (f"Use an intact one, e.g. --step {older[0]}." if older else
                       "No older step is intact."))
        moved = self._set_aside(corrupt, move_corrupt)
        raise UserError(
            f"{self.directory}: no intact checkpoint; every step is corrupt ("
            + "; ".join(f"step {s}: {why}" for s, why in corrupt) + "). "
            + (f"They were moved to {self.workdir / integrity.QUARANTINE}: rerun to train from "
               "step 0, or use a new --workdir." if moved else
               "Train again in a new --workdir, or restore the checkpoint folder from a copy."))

    def _restore_intact(self, abstract_state: Any, data_iter, step: int) -> tuple[Any, Optional[str]]:
        """(state, why step `step` is corrupt or None); state None when unread.

        An intact step that does not fit `abstract_state` is a UserError: it is a checkpoint
        of another config, and moving it aside, or falling back to an older step (of the same
        other config), would hide the real mistake."""
        folder = self.directory / str(step)
        why = integrity.verify(folder)
        if why is not None:
            return None, why
        # Compared before Orbax reads an array: a failed read leaves the other reads pending.
        differs = integrity.mismatch(folder / "state", abstract_state)
        if differs:
            raise self._another_config(step, differs)
        try:
            state = self._restore_step(abstract_state, data_iter, step)
        except Exception as err:  # pylint: disable=broad-except
            # Checksums verified above vouch for the files (is_damage would hash them again).
            if integrity.has_manifest(folder) or not integrity.is_damage(err, folder):
                raise         # intact files of the same shapes: not a corrupt step, a real error
            return None, f"Orbax cannot read it ({integrity.short_error(err)})"
        if not integrity.is_verified(folder):
            return state, self._check_unverified(step, state)
        return state, None

    def _another_config(self, step: int, differs: str) -> UserError:
        """The error for an intact step that does not fit the state: written with another config."""
        intact = ("its files match their checksums"
                  if integrity.has_manifest(self.directory / str(step)) else "its files look intact")
        return UserError(
            f"{self.directory / str(step)}: checkpoint step {step} does not fit this config's state: "
            f"{differs}. {intact.capitalize()}: it was written with another config (model, widths, "
            "sources). Nothing was moved. Use the config it was trained with (evaluate and "
            "predict read the workdir's config.json unless --config is given), or another "
            "--workdir for a new run.")

    def _check_unverified(self, step: int, state: Any) -> Optional[str]:
        """Why a restored step without checksums is unusable, or None; warns either way.

        Its bytes cannot be checked, so at least its values are: a state that must
        not have been saved (non-finite, diverged) is damage and falls back."""
        log.warning("Checkpoint step %d in %s has no checksums (the run that saved it stopped "
                    "before recording them): it is unverified; its restored values are checked "
                    "finite, but changed bytes that still read as numbers go unnoticed.",
                    step, self.directory)
        problem = integrity.unsafe_to_save(state)
        return f"it has no checksums and {problem}" if problem else None

    def _restore_step(self, abstract_state: Any, data_iter, step: int):
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iter is not None and self._has_iterator(step):
            items["data_iter"] = grain.checkpoint.CheckpointRestore(data_iter)
        return self.manager.restore(step, args=ocp.args.Composite(**items))["state"]

    def _set_aside(self, corrupt: list, move: bool) -> bool:
        """Moves the corrupt steps out of Orbax's folder (training only); True if all moved."""
        if not move or not corrupt:
            return False
        moved = True
        if jax.process_index() == 0:
            for step, _ in corrupt:
                target = integrity.quarantine(self.directory / str(step), self.workdir)
                moved &= target is not None
                if target is not None:
                    log.warning("Moved the corrupt checkpoint step %d to %s (nothing is deleted).",
                                step, target)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices("rsjax.checkpoints.set_aside")
        self.manager.reload()
        self._saved_step = self.manager.latest_step()
        return moved

    def _has_iterator(self, step: int) -> bool:
        """Whether checkpoint `step` holds this process's iterator position."""
        folder = self.directory / str(step) / "data_iter"
        if not folder.exists():
            return False
        mine = folder / f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        if not mine.exists():
            raise UserError(
                f"{folder}: the input position was saved by another number of processes "
                f"than this run's {jax.process_count()}; resume with the process count that "
                "wrote the checkpoint (the device count may change).")
        return True

    def restore_state_only(self, abstract_state: Any, step: Optional[int] = None):
        restored = self.restore(abstract_state, step=step)
        if restored is None:
            raise UserError(f"No checkpoint in {self.directory}. Train first, or pass "
                            "the workdir of a finished run.")
        return restored

    def wait(self):
        with self._disk_full_fails_the_run():
            self.manager.wait_until_finished()
        self._record_checksums()

    def close(self):
        with self._disk_full_fails_the_run():
            self.manager.wait_until_finished()
            self._record_checksums()
            self.manager.close()

    @contextlib.contextmanager
    def _disk_full_fails_the_run(self):
        """A full disk under a save (raised by the save, or by the wait for an asynchronous
        one) as one RunFailed naming the step folder, the free space and what was kept."""
        from rsjax.errors import disk_full, space_note

        try:
            yield
        except Exception as err:  # pylint: disable=broad-except
            if isinstance(err, RunFailed) or disk_full(err) is None:
                raise
            where = str(self.directory / str(self._writing)) if self._writing is not None \
                else str(self.directory)
            kept = [s for s in self.manager.all_steps() if s != self._writing]
            raise DiskFullError(
                f"the disk is full (or over its quota) writing {where}{space_note(where)}. "
                + (f"The checkpoints saved before are intact (newest: step {max(kept)}). "
                   if kept else "No checkpoint was saved before. ")
                + "Free space there and rerun the same command to resume, or train in "
                "another --workdir.") from err


def restore_state(config, workdir: str, init_fn, mesh, step: Optional[int] = None,
                  folder: str = "checkpoints"):
    """(state, step) of a checkpoint in `workdir` (default: the latest), restored
    onto `mesh` whatever the device count it was written on."""
    ckpt = Checkpointer(workdir, config.checkpoint_every_steps, config.keep_checkpoints,
                        folder=folder)
    try:
        return ckpt.restore_state_only(mesh_lib.abstract_replicated(init_fn, mesh), step)
    finally:
        ckpt.close()


# ---------------------------------------------------------------------------
# The best validation checkpoint (the paper's "best model")
# ---------------------------------------------------------------------------
# A run with config.evaluate_checkpoint = "best_validation" also keeps the
# state of its best validation score so far in <workdir>/BEST_FOLDER (one
# step) and describes it in BEST_RECORD; evaluation, inference and the
# experiments then use that state unless a step is named.
BEST_FOLDER = "best_checkpoint"
BEST_RECORD = "best_validation.json"
EVALUATE_CHECKPOINTS = ("last", "best_validation")


def evaluates_best(config) -> bool:
    """Whether a run's model is its best validation checkpoint, not its last one."""
    choice = config.get("evaluate_checkpoint", "last")
    if choice not in EVALUATE_CHECKPOINTS:
        raise UserError(f"config.evaluate_checkpoint={choice!r}: choose one of "
                        f"{', '.join(EVALUATE_CHECKPOINTS)}.")
    return choice == "best_validation"


def best_record(workdir: str) -> Optional[dict]:
    """The run's best validation so far ({"step", "metric", "value", ...}), or None."""
    path = epath.Path(workdir_path(workdir)) / BEST_RECORD
    return json.loads(path.read_text()) if path.exists() else None


class BestCheckpoint:
    """Keeps the state of the best validation score in <workdir>/BEST_FOLDER.

    `offer(step, state, value)` saves the state (synchronously, replacing the
    one kept) when `value` beats the best so far, then rewrites BEST_RECORD;
    a resumed run reads the best so far from that record. `higher`: whether a
    larger value is better."""

    def __init__(self, workdir: str, metric: str, higher: bool = True):
        self.workdir, self.metric, self.higher = workdir, metric, higher
        # Synchronous: the state is kept before the next step donates its buffers.
        self._ckpt = Checkpointer(workdir, 1, 1, async_save=False, folder=BEST_FOLDER)
        self.best = best_record(workdir)

    def offer(self, step: int, state: Any, value: float, **extra) -> bool:
        if not np.isfinite(value):
            return False
        if self.best is not None:
            if step <= int(self.best["step"]):
                return False     # a resumed run revalidating steps it had seen
            better = value > self.best["value"] if self.higher else value < self.best["value"]
            if not better:
                return False
        if not self._ckpt.save(step, state, force=True):
            return False
        self._ckpt.wait()
        self.best = {"step": int(step), "metric": self.metric, "value": float(value), **extra}
        if jax.process_index() == 0:
            (epath.Path(workdir_path(self.workdir)) / BEST_RECORD).write_text(
                json.dumps(self.best, indent=2))
        log.info("Best validation %s so far: %.4g at step %d (kept in %s).", self.metric,
                 value, step, BEST_FOLDER)
        return True

    def close(self) -> None:
        self._ckpt.close()


def restore_for_eval(config, workdir: str, step: Optional[int] = None, devices=None, *,
                     make_setup: Callable[[Any], Any]):
    """(setup, state, step, mesh) for evaluation and inference: the checkpoint at
    `step` (default: the run's model: its best validation checkpoint where
    `config.evaluate_checkpoint` says so and one was kept, else the latest),
    written on any device count, restored onto a mesh over `devices`
    (default: all); `make_setup(config)` is the trainer's Setup. Each trainer
    binds its own: `functools.partial(..., make_setup=Setup)`."""
    mesh = mesh_lib.create_mesh(devices)
    setup = make_setup(config)
    folder = "checkpoints"
    if evaluates_best(config):
        record = best_record(workdir)
        if record is not None and (step is None or int(step) == int(record["step"])):
            folder, step = BEST_FOLDER, int(record["step"])
        elif step is None:
            log.warning("%s: no best validation checkpoint was kept (no validation ran); "
                        "using the latest checkpoint.", workdir)
    state, step = restore_state(config, workdir, setup.init_state, mesh, step, folder=folder)
    return setup, state, step, mesh


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs with the shardings of `tree`, the target Orbax restores into."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


class PreemptionWatcher:
    """Turns SIGTERM (what schedulers and TPU maintenance send) into a flag the
    loop polls, so the run saves a checkpoint and exits instead of dying."""

    def __init__(self):
        self._flag = threading.Event()
        self._previous = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):  # noqa: ARG002
        log.warning("SIGTERM received: saving a checkpoint and stopping.")
        self._flag.set()

    def should_stop(self, manager: Optional[ocp.CheckpointManager] = None, step: int = 0) -> bool:
        if self._flag.is_set():
            return True
        # Orbax knows about coordinated preemption on multi-host TPU slices.
        return bool(manager is not None and jax.process_count() > 1
                    and manager.reached_preemption(step))

    def close(self):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
