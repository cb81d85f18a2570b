"""Checkpoints (Orbax, with the input iterator's position) and preemption.

A checkpoint holds two items: `state`, the train state pytree (Orbax's
standard handler: any device count can restore it), and `data_iter`, the grain
iterator's position, saved by grain's own Orbax handler (one small JSON file
per process, since every process reads its own share of the data), so a
resumed run sees exactly the batches it would have seen.
"""
from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Any, Optional

import grain
import jax
import orbax.checkpoint as ocp
from etils import epath

from rsjax import mesh as mesh_lib
from rsjax.errors import UserError
from rsjax.runtime import workdir_path
from rsjax.trainers.nonfinite import tree_all_finite

log = logging.getLogger("rsjax")


class Checkpointer:
    """Orbax CheckpointManager over (train state, input iterator).

    Orbax writes each step to a temporary directory and renames it when
    complete, so a run killed mid-save leaves the previous checkpoint current.
    Saves are asynchronous; `wait()` blocks until the last one is on disk (the
    iterator's position is written before `save` returns).
    """

    def __init__(self, workdir: str | os.PathLike, every_steps: int, keep: int, async_save: bool = True):
        # epath: a gs:// workdir stays a URI (Orbax and tensorstore write GCS natively).
        self.directory = epath.Path(workdir_path(workdir)) / "checkpoints"
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=max(1, int(every_steps)), max_to_keep=keep,
            enable_async_checkpointing=async_save, create=True, cleanup_tmp_directories=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=("state", "data_iter"))
        self._saved_step = self.manager.latest_step()

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_iter=None, force: bool = False) -> bool:
        """Saves `state` and the position of `data_iter` (a grain iterator, or
        anything with get_state/set_state/start_prefetch) when the interval says
        so (or `force`); a step is saved once."""
        if step == self._saved_step:
            return False
        if not force and not self.manager.should_save(step):
            return False
        if not tree_all_finite(state):
            # Never make a poisoned state current: the last good checkpoint stays.
            log.error("Not saving step %d: the state holds non-finite values.", step)
            return False
        items = {"state": ocp.args.StandardSave(state)}
        if data_iter is not None:
            items["data_iter"] = grain.checkpoint.CheckpointSave(data_iter)
        saved = self.manager.save(step, args=ocp.args.Composite(**items), force=force)
        if saved:
            self._saved_step = step
        return saved

    def restore(self, abstract_state: Any, data_iter=None, step: Optional[int] = None):
        """(state, step) of checkpoint `step` (default: the latest), or None when
        there is none; `data_iter` (if given and saved) is moved to the saved
        position."""
        step = self.latest_step() if step is None else step
        if step is None:
            return None
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iter is not None and self._has_iterator(step):
            items["data_iter"] = grain.checkpoint.CheckpointRestore(data_iter)
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        return restored["state"], step

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
        self.manager.wait_until_finished()

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()


def restore_state(config, workdir: str, init_fn, mesh, step: Optional[int] = None):
    """(state, step) of a checkpoint in `workdir` (default: the latest), restored
    onto `mesh` whatever the device count it was written on."""
    ckpt = Checkpointer(workdir, config.checkpoint_every_steps, config.keep_checkpoints)
    try:
        return ckpt.restore_state_only(mesh_lib.abstract_replicated(init_fn, mesh), step)
    finally:
        ckpt.close()


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
