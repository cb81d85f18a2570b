"""What every trainer shares: the device mesh, sharding of state and batches,
checkpoints (Orbax, with the input iterator's state), preemption, and the
non-finite guard's host side.

Kept apart from the trainers so the fusion and the segmentation trainer run,
save, resume and scale in exactly the same way.
"""
from __future__ import annotations

import json
import logging
import math
import os
import signal
import threading
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from absl import flags as absl_flags
from absl import logging as absl_logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from rsjax.errors import RunFailed, UserError
from rsjax.trainers import integrity

DATA_AXIS = "data"
log = logging.getLogger("rsjax")


# ---------------------------------------------------------------------------
# Process setup
# ---------------------------------------------------------------------------
def setup_logging() -> None:
    """rsjax's own messages at INFO; the libraries' (Orbax logs every save at
    INFO) only from WARNING up, unless --verbosity asks for more."""
    if absl_logging.get_verbosity() <= absl_logging.INFO and not absl_flags.FLAGS["verbosity"].present:
        absl_logging.set_verbosity(absl_logging.WARNING)
    log = logging.getLogger("rsjax")
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        log.addHandler(handler)
        log.propagate = False
    log.setLevel(logging.INFO)


def enable_compilation_cache(directory: str = "work/jax_cache") -> None:
    """Reuse compiled steps across runs (resume, evaluation, the experiment
    tables): compiling a GAN step costs a minute on a small CPU."""
    import jax
    if directory and not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", directory)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 2.0)


# ---------------------------------------------------------------------------
# Mesh and sharding
# ---------------------------------------------------------------------------
def prepare_process() -> None:
    """What every rsjax command does first: quiet library logs, the compile
    cache, and joining a multi-host job when there is one."""
    setup_logging()
    enable_compilation_cache()
    if maybe_initialize_distributed() and jax.process_index() > 0:
        # Every host would print the same INFO lines; warnings and errors stay.
        logging.getLogger("rsjax").setLevel(logging.WARNING)


def maybe_initialize_distributed() -> bool:
    """Joins a multi-host job (Cloud TPU slice, or several local processes).

    On a TPU VM slice `jax.distributed.initialize()` finds its peers by itself
    (from the VM's metadata server, which no environment variable announces:
    the launcher, `launch.tpu run`, sets RSJAX_DISTRIBUTED=1 to ask for it; on
    GKE TPU_WORKER_HOSTNAMES is set); elsewhere the coordinator comes from
    RSJAX_COORDINATOR, RSJAX_NUM_PROCESSES and RSJAX_PROCESS_ID (e.g. several
    local CPU processes). Single-process runs do nothing. Returns whether it
    joined a job.
    """
    coordinator = os.environ.get("RSJAX_COORDINATOR")
    if coordinator:
        missing = [k for k in ("RSJAX_NUM_PROCESSES", "RSJAX_PROCESS_ID") if k not in os.environ]
        if missing:
            raise ValueError(f"RSJAX_COORDINATOR={coordinator} is set but {', '.join(missing)} "
                             "is not: set all three (coordinator host:port, the number of "
                             "processes, and this process's id from 0).")
        _enable_cpu_collectives()
        jax.distributed.initialize(
            coordinator_address=coordinator,
            num_processes=int(os.environ["RSJAX_NUM_PROCESSES"]),
            process_id=int(os.environ["RSJAX_PROCESS_ID"]))
        return True
    if (os.environ.get("RSJAX_DISTRIBUTED", "0") not in ("", "0")
            or os.environ.get("TPU_WORKER_HOSTNAMES") or os.environ.get("CLOUD_TPU_TASK_ID")):
        jax.distributed.initialize()
        return True
    return False


def _enable_cpu_collectives() -> None:
    """Several CPU processes need a cross-process collectives library for their
    all-reduces (gradients, BatchNorm statistics); without one XLA fails at
    the first cross-process step. jax 0.10 defaults to gloo; an environment
    that turned it off ('none') gets it back. TPUs and GPUs ignore the option."""
    if jax.config.jax_cpu_collectives_implementation in (None, "", "none"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")


def workdir_path(workdir) -> str:
    """The run directory as a string every library takes: a local path made
    absolute (Orbax wants absolute paths), a URI (gs://bucket/run) unchanged.
    pathlib would turn 'gs://b/x' into 'gs:/b/x'; use etils.epath.Path(...) on
    the result to join and write."""
    text = os.fspath(workdir)
    return text if "://" in text else os.path.abspath(text)


def gather_to_host(tree):
    """Global jax.Arrays -> numpy arrays holding the whole global value, on every
    process. A batch sharded over several hosts is not addressable by any one of
    them (np.asarray raises), so its shards are all-gathered first. Collective
    on multi-host runs: every process must call it, with the same tree.
    Dicts keep their key order (jax.tree.map would sort it), so an image
    grid's rows stay in the order they were given."""
    from jax.experimental import multihost_utils

    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(jax.device_get(x))
    return _in_key_order_of(tree, jax.tree.map(one, tree))


def _in_key_order_of(like, tree):
    """`tree` (a jax.tree.map result: dict keys sorted) with the dict key order of `like`."""
    if isinstance(like, dict):
        return {k: _in_key_order_of(like[k], tree[k]) for k in like}
    if isinstance(like, (list, tuple)) and not hasattr(like, "_fields"):
        return type(like)(_in_key_order_of(a, b) for a, b in zip(like, tree))
    return tree


def create_mesh(devices=None) -> Mesh:
    """One `data` axis over every device of every process (or the `devices`
    given, e.g. a subset in tests): pure data parallelism."""
    return Mesh(np.asarray(jax.devices() if devices is None else devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over the `data` axis, everything else whole."""
    return NamedSharding(mesh, P(DATA_AXIS))


def check_batch_size(global_batch_size: int, mesh: Mesh) -> None:
    n = mesh.devices.size
    if global_batch_size % n:
        raise ValueError(
            f"config.global_batch_size={global_batch_size} is not divisible by the {n} devices "
            f"of this run. Set --config.global_batch_size to a multiple of {n}.")


def to_global_batch(batch: dict, mesh: Mesh) -> dict:
    """Per-process numpy slices -> global jax.Arrays sharded on the `data` axis."""
    sharding = batch_sharding(mesh)
    return {k: (v if isinstance(v, jax.Array) else
                jax.make_array_from_process_local_data(sharding, np.asarray(v)))
            for k, v in batch.items()}


# ---------------------------------------------------------------------------
# Learning-rate schedules
# ---------------------------------------------------------------------------
def linear_decay_schedule(base_lr: float, total_steps: int, decay_start_step: Optional[int]):
    """Constant, then linear to zero at `total_steps` (SPADE/pix2pix's `niter_decay`)."""
    if decay_start_step is None or decay_start_step >= total_steps:
        return lambda step: jnp.asarray(base_lr, jnp.float32)
    span = max(1, total_steps - decay_start_step)

    def schedule(step):
        frac = jnp.clip((step - decay_start_step) / span, 0.0, 1.0)
        return base_lr * (1.0 - frac)

    return schedule


# ---------------------------------------------------------------------------
# Non-finite guard: the device side (used by each train step) and the host side
# ---------------------------------------------------------------------------
def all_finite(tree) -> jax.Array:
    """One boolean on the device: every leaf of `tree` is finite."""
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def guarded_update(finite: jax.Array, updates: Callable[[], dict], state: dict) -> dict:
    """The train state after one step: `state` with the entries `updates()`
    returns (new parameters, optimizer states, ...) if `finite`, else `state`
    unchanged; either way "step" advances, and "nonfinite" (consecutive
    non-finite steps) is reset or counted.

    A conditional, not a select over every leaf: the optimizer and EMA updates
    write the new state once, where a select computes it and then reads it
    again beside the old state (3 memory-bound passes over every parameter,
    optimizer moment and EMA: 0.3 s of a 2.1 s fusion step at 1x128 on CPU).
    """
    def updated():
        return dict(state, **updates(), nonfinite=jnp.zeros_like(state["nonfinite"]))

    def skipped():
        return dict(state, nonfinite=state["nonfinite"] + 1)

    return dict(jax.lax.cond(finite, updated, skipped), step=state["step"] + 1)

class NonFiniteLossError(RunFailed):
    """Too many consecutive non-finite steps: the run cannot go on as configured."""


def check_nonfinite(consecutive: int, limit: int, step: int, workdir: str,
                    last_good: Optional[int] = None) -> None:
    """Stops the run after `limit` consecutive non-finite steps, saying what was kept and how to go on.

    `last_good`: the newest checkpoint step (none was saved while steps were
    skipped or weights diverged, see `integrity.unsafe_to_save`), None when
    the run saved none."""
    if consecutive < limit:
        return
    if last_good is None:
        kept = ("No checkpoint was saved (the model was never in a state worth keeping), so "
                "there is nothing to resume: start again with the change below, in this "
                "--workdir or a new one")
    else:
        kept = (f"Nothing was saved while it diverged: the last good checkpoint is step {last_good} "
                f"in {workdir}/checkpoints, and rerunning the same command with the change below "
                f"resumes from it (or start afresh in a new --workdir)")
    raise NonFiniteLossError(
        f"{limit} consecutive training steps (up to step {step}) had a non-finite loss or "
        f"gradient; they were skipped and did not change the model. {kept}. Lower the learning "
        f"rates (--config.optim.*), try float32 (--config.dtype=float32), or look for NaN "
        f"in the inputs (the data pipeline maps no-data to 0 and masks it).")


def tree_all_finite(tree) -> bool:
    """Host-side `all_finite` over the floating-point leaves (skips integers, keys)."""
    leaves = [x for x in jax.tree.leaves(tree) if hasattr(x, "dtype") and
              jnp.issubdtype(x.dtype, jnp.inexact)]
    return bool(all_finite(leaves))


# ---------------------------------------------------------------------------
# Preemption
# ---------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------
class Checkpointer:
    """Orbax CheckpointManager over (train state, input iterator state).

    Orbax writes each step to a temporary directory and renames it when
    complete, so a run killed mid-save leaves the previous checkpoint current.
    Saves are asynchronous; `wait()` blocks until the last one is on disk.

    What rsjax adds (`integrity.py`): no state that must not be resumed is
    saved (skipped non-finite steps, non-finite or diverged weights); each
    finished step gets a checksum of its files; `restore` checks them and
    falls back to the newest intact step, naming the corrupt ones.
    """

    def __init__(self, workdir: str | os.PathLike, every_steps: int, keep: int, async_save: bool = True):
        # epath: a gs:// workdir stays a URI (Orbax and tensorstore write GCS natively).
        self.workdir = epath.Path(workdir_path(workdir))
        self.directory = self.workdir / "checkpoints"
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=max(1, int(every_steps)), max_to_keep=keep,
            enable_async_checkpointing=async_save, create=True, cleanup_tmp_directories=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=("state", "data_iter"))
        self._saved_step = self.manager.latest_step()
        self._unhashed: list[int] = []

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_iter_state: Any = None, force: bool = False) -> bool:
        """Saves when the interval says so (or `force`); a step is saved once, and never a
        state that must not be resumed (`integrity.unsafe_to_save`)."""
        if step == self._saved_step:
            return False
        if not force and not self.manager.should_save(step):
            return False
        problem = integrity.unsafe_to_save(state)
        if problem:
            last = self.latest_step()
            log.error("Not saving step %d: %s. %s", step, problem,
                      f"The last good checkpoint stays step {last}." if last is not None
                      else "No checkpoint has been saved yet.")
            return False
        if self._unhashed:
            # The previous save has to be finished before its checksums; Orbax's save would
            # wait for it anyway, and nothing deletes steps meanwhile.
            self.manager.wait_until_finished()
            self._record_checksums()
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data_iter=ocp.args.JsonSave(_iter_state_to_json(data_iter_state)))
        saved = self.manager.save(step, args=args, force=force)
        if saved:
            self._saved_step = step
            self._unhashed.append(step)
        return saved

    def _record_checksums(self) -> None:
        """Checksums of the finished steps not yet recorded (process 0; see integrity.py)."""
        steps, self._unhashed = self._unhashed, []
        if jax.process_index() == 0:
            for step in steps:
                integrity.write_manifest(self.directory / str(step))

    # -- restoring ------------------------------------------------------------------------------
    def restore(self, abstract_state: Any, step: Optional[int] = None, move_corrupt: bool = False):
        """(state, data_iter_state, step) of checkpoint `step`, by default of the newest intact
        one; None when there is no checkpoint.

        A step whose checksums do not match, or whose files Orbax cannot read, is
        corrupt: it is named in a warning and the next older step is tried. A
        named `step` that is corrupt is a UserError. With `move_corrupt`
        (training) corrupt steps are moved to <workdir>/corrupt_checkpoints/, so
        that new saves and max_to_keep see good steps only. No intact step at
        all is a UserError.
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
            why = integrity.verify(self.directory / str(candidate))
            if why is None:
                try:
                    restored = self._restore_step(abstract_state, candidate)
                except Exception as err:  # pylint: disable=broad-except
                    # Files that match their checksums are intact: an error is something else
                    # (a checkpoint of another config). Without checksums, judge by the error.
                    if integrity.has_manifest(self.directory / str(candidate)) or not integrity.is_damage(err):
                        raise
                    why = f"Orbax cannot read it ({integrity.short_error(err)})"
            if why is None:
                if corrupt:
                    log.warning("Using checkpoint step %d, the newest intact one in %s (newer: %s).",
                                candidate, self.directory,
                                "; ".join(f"step {s} corrupt" for s, _ in corrupt))
                    self._set_aside(corrupt, move_corrupt)
                return (*restored, candidate)
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

    def _restore_step(self, abstract_state: Any, step: int):
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data_iter=ocp.args.JsonRestore()))
        return restored["state"], _iter_state_from_json(restored["data_iter"])

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

    def restore_state_only(self, abstract_state: Any, step: Optional[int] = None):
        restored = self.restore(abstract_state, step)
        if restored is None:
            raise UserError(f"No checkpoint in {self.directory}. Train first, or pass "
                            "the workdir of a finished run.")
        state, _, step = restored
        return state, step

    def wait(self):
        self.manager.wait_until_finished()
        self._record_checksums()

    def close(self):
        self.manager.wait_until_finished()
        self._record_checksums()
        self.manager.close()


def _iter_state_to_json(state: Any) -> dict:
    if state is None:
        return {"kind": "none"}
    if isinstance(state, bytes):
        return {"kind": "bytes", "value": state.decode("utf-8")}
    if isinstance(state, str):
        return {"kind": "str", "value": state}
    return {"kind": "json", "value": json.loads(json.dumps(state))}


def _iter_state_from_json(blob: dict) -> Any:
    kind = blob.get("kind")
    if kind == "bytes":
        return blob["value"].encode("utf-8")
    if kind in ("str", "json"):
        return blob["value"]
    return None


def init_replicated(init_fn, mesh: Mesh):
    """`init_fn()`'s state created directly replicated on the mesh (no host copy
    and broadcast: every device builds its own copy inside one jit)."""
    out_sh = jax.tree.map(lambda _: replicated(mesh), jax.eval_shape(init_fn))
    return jax.jit(init_fn, out_shardings=out_sh)()


def abstract_replicated(init_fn, mesh: Mesh):
    """Shapes, dtypes and replicated shardings of `init_fn()`'s state, allocating
    nothing: the target a checkpoint from any device count is restored into."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated(mesh)),
                        jax.eval_shape(init_fn))


def restore_state(config, workdir: str, init_fn, mesh: Mesh, step: Optional[int] = None):
    """(state, step) of a checkpoint in `workdir` (default: the latest), restored
    onto `mesh` whatever the device count it was written on."""
    ckpt = Checkpointer(workdir, config.checkpoint_every_steps, config.keep_checkpoints)
    try:
        return ckpt.restore_state_only(abstract_replicated(init_fn, mesh), step)
    finally:
        ckpt.close()


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs with the shardings of `tree`, the target Orbax restores into."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


# ---------------------------------------------------------------------------
# The loop every trainer shares
# ---------------------------------------------------------------------------
def run_loop(config, workdir: str, *, state, step_fn, train_iter, periodic=(),
             learning_rates=None):
    """Resume, step, log, run periodic actions, checkpoint, stop on preemption.

    `step_fn(state, batch) -> (state, metrics)` is the trainer's jitted step;
    its metrics must include `nonfinite` (consecutive skipped steps).
    `periodic` holds `(every_steps, action)` pairs, `action(step, state, batch,
    writer)`, run on every process (actions that write files check
    `jax.process_index()` themselves). `learning_rates` ({name: optax
    schedule}) are logged with the metrics as learning_rate/<name>, and so is
    steps_per_second. Returns (state, step, preempted, writer); the caller
    writes its final evaluation with the writer, then closes it.
    """
    from rsjax import logging_utils

    ckpt = Checkpointer(workdir, config.checkpoint_every_steps, config.keep_checkpoints)
    restored = ckpt.restore(abstract_like(state), move_corrupt=True)
    start_step = 0
    if restored is not None:
        state, iter_state, start_step = restored
        if iter_state is not None:
            train_iter.set_state(iter_state)
        log.info("Resumed from step %d in %s", start_step, ckpt.directory)
    writer = logging_utils.MetricWriter(workdir, resume_step=start_step)
    if start_step == 0:
        logging_utils.write_config(config, workdir)
    progress = logging_utils.ProgressReporter(config.total_steps, first_step=start_step)
    step_rate = logging_utils.StepRate(first_step=start_step)
    preemption = PreemptionWatcher()

    step, pending, preempted = start_step, [], False
    try:
        while step < config.total_steps:
            batch = next(train_iter)
            state, metrics = step_fn(state, batch)
            step += 1
            pending.append(metrics)
            # Pull metrics to the host only at log time; this also bounds how far
            # the host runs ahead of the devices (DESIGN.md's rendezvous trap).
            if step % config.log_every_steps == 0 or step == config.total_steps:
                host = jax.device_get(pending)
                pending = []
                summary = {k: float(np.mean([h[k] for h in host])) for k in host[-1]}
                check_nonfinite(int(host[-1]["nonfinite"]), config.max_nonfinite_steps, step,
                                workdir, last_good=ckpt.latest_step())
                writer.write_scalars(step, {
                    **summary, "steps_per_second": step_rate(step),
                    **logging_utils.learning_rate_scalars(learning_rates or {}, step)})
                progress(step, summary)
            for every, action in periodic:
                if every and step % every == 0:
                    action(step, state, batch, writer)
            ckpt.save(step, state, train_iter.get_state())
            if preemption.should_stop(ckpt.manager, step):
                preempted = True
                log.warning("Stopped at step %d on request; rerun the same command to resume.",
                            step)
                break
        jax.block_until_ready(state)
        ckpt.save(step, state, train_iter.get_state(), force=True)
        ckpt.wait()
    finally:
        preemption.close()
        ckpt.close()
    return state, step, preempted, writer


def steps_per_epoch(num_examples: int, global_batch_size: int) -> int:
    return max(1, math.floor(num_examples / global_batch_size))
