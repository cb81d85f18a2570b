"""What every trainer shares around its own step: the start of a run (workdir,
mesh, dataset), the learning-rate schedule, and the loop (resume, step, log,
periodic actions, checkpoint, stop on preemption).

Kept apart from the trainers so the fusion and the segmentation trainer run,
save, resume and scale in exactly the same way.
"""
from __future__ import annotations

import json
import logging
import math
import time
from typing import Optional

import jax
import numpy as np
import optax
from etils import epath

from rsjax import input_pipeline, logging_utils
from rsjax import mesh as mesh_lib
from rsjax.runtime import workdir_path
from rsjax.trainers.checkpoints import Checkpointer, PreemptionWatcher, abstract_like
from rsjax.trainers.nonfinite import check_nonfinite
from rsjax.trainers import resume_check

log = logging.getLogger("rsjax")


def learning_rate_schedule(base_lr: float, total_steps: int,
                           decay_start_step: Optional[int]) -> optax.Schedule:
    """Constant, then linear to zero at `total_steps` (SPADE/pix2pix's `niter_decay`);
    constant throughout when `decay_start_step` is None or not before the end."""
    if decay_start_step is None or decay_start_step >= total_steps:
        return optax.constant_schedule(base_lr)
    return optax.linear_schedule(base_lr, 0.0, transition_steps=total_steps - decay_start_step,
                                 transition_begin=decay_start_step)


def ema_update(ema, params, decay):
    """The exponential moving average of the parameters after one update."""
    return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema, params)


def steps_for_epochs(epochs: float, records: int, batch_size: int) -> int:
    """Steps of `batch_size` that pass over `records` records `epochs` times
    (rounded up: the loader's batches run on across epoch boundaries)."""
    return max(1, math.ceil(epochs * records / batch_size))


def total_epochs(config) -> float:
    """The run's length in epochs of its training set, 0 when given in steps."""
    return float(config.get("total_epochs", 0) or 0)


def resolve_length(config, records: int) -> None:
    """A run measured in epochs (`config.total_epochs` > 0) gets its
    `total_steps` from its training set's size, `records`; the learning-rate
    decay's start (`optim.decay_start_step`) moves in proportion, so "decay
    over the second half" stays the second half. Done when the run starts, so
    config.json records the steps the run took; a run without epochs is left
    as it is."""
    epochs = total_epochs(config)
    if epochs <= 0:
        return
    steps = steps_for_epochs(epochs, records, int(config.global_batch_size))
    decay = config.optim.get("decay_start_step")
    if decay is not None:
        config.optim.decay_start_step = int(round(decay * steps / max(1, int(config.total_steps))))
    config.total_steps = steps
    log.info("%g epochs of %d training records at batch %d: %d steps.", epochs, records,
             int(config.global_batch_size), steps)


def start_run(config, workdir: str, devices=None):
    """(workdir as a string every library takes, mesh) of a training run: the
    workdir created, the mesh over `devices` (default: all) checked against the
    batch size, the dataset built when missing."""
    workdir = workdir_path(workdir)      # local (made absolute) or gs://
    mesh = mesh_lib.create_mesh(devices)
    mesh_lib.check_batch_size(config.global_batch_size, mesh)
    # The dataset first: a missing or mismatched one is an error that leaves no workdir.
    input_pipeline.ensure_dataset(config.data)
    epath.Path(workdir).mkdir(parents=True, exist_ok=True)
    return workdir, mesh


def training_iterator(config, mesh, sources, generated_dir: Optional[str] = None):
    """A run's training batches (shuffled by its seed, augmented, endless),
    with `sources` and `generated_dir` (a Mix run's generated images) as
    `input_pipeline.create_iterator` takes them; a run in epochs gets its
    steps from the records they pass over (`resolve_length`). Call it before
    anything reads `config.total_steps` (the learning-rate schedules)."""
    it = input_pipeline.create_iterator(
        config.data, "train", global_batch_size=config.global_batch_size, mesh=mesh,
        train=True, seed=int(config.seed), sources=sources, generated_dir=generated_dir)
    resolve_length(config, it.num_records)
    return it


def write_final_evaluation(workdir: str, split: str, step: int, scores: dict) -> None:
    """`eval_<split>.json` of the run's final evaluation (process 0 only)."""
    if jax.process_index() == 0:
        (epath.Path(workdir) / f"eval_{split}.json").write_text(json.dumps(
            {"step": step, **scores}, indent=2, default=lambda x: np.asarray(x).tolist()))


def run_loop(config, workdir: str, *, state, step_fn, train_iter, periodic=(),
             learning_rates=None):
    """Resume, step, log, run periodic actions, checkpoint, stop on preemption.

    `step_fn(state, batch) -> (state, metrics)` is the trainer's jitted step;
    its metrics must include `nonfinite` (consecutive skipped steps).
    `periodic` holds `(every_steps, action)` pairs, `action(step, state, batch,
    writer)`, run on every process (actions that write files check
    `jax.process_index()` themselves). `learning_rates` ({name: optax
    schedule}) are logged with the metrics as learning_rate/<name>, and so is
    steps_per_second. Returns (state, step, preempted, writer); trainers call
    it through `run_and_evaluate`, which writes the final evaluation with the
    writer and closes it.
    """
    # Before any restore or write: another state structure is an error, other changes are recorded.
    resume_check.check_resume(config, workdir)
    ckpt = Checkpointer(workdir, config.checkpoint_every_steps, config.keep_checkpoints)
    restored = ckpt.restore(abstract_like(state), train_iter, move_corrupt=True)
    start_step = 0
    if restored is not None:
        state, start_step = restored
        log.info("Resumed from step %d in %s", start_step, ckpt.directory)
    writer = logging_utils.MetricWriter(workdir, resume_step=start_step)
    if start_step == 0:
        logging_utils.write_config(config, workdir)
    # Through the log: one timestamped stream (stderr), stdout keeps the result JSON.
    progress = logging_utils.ProgressReporter(config.total_steps, first_step=start_step,
                                              print_fn=log.info)
    step_rate = logging_utils.StepRate(first_step=start_step)
    preemption = PreemptionWatcher()

    step, pending, preempted = start_step, [], False
    try:
        while step < config.total_steps:
            batch = next(train_iter)
            if step == start_step:
                log.info("Compiling the train step (the first step waits for it) ...")
                compile_started = time.monotonic()
            state, metrics = step_fn(state, batch)
            step += 1
            pending.append(metrics)
            if step == start_step + 1:
                # The first step carries the compilation: say how long it took,
                # and measure speed and ETA over the steps after it.
                jax.block_until_ready(metrics)
                log.info("Compiled and ran the first step in %s; training continues.",
                         logging_utils.format_duration(time.monotonic() - compile_started))
                progress.restart(step)
                step_rate = logging_utils.StepRate(first_step=step)
            # Pull metrics to the host only at log time; this also bounds how far
            # the host runs ahead of the devices: on several fake CPU devices an XLA
            # all-reduce rendezvous can time out when the host never waits.
            if step % config.log_every_steps == 0 or step == config.total_steps:
                host = jax.device_get(pending)
                pending = []
                summary = {k: float(np.mean([h[k] for h in host])) for k in host[-1]}
                check_nonfinite(int(host[-1]["nonfinite"]), config.max_nonfinite_steps, step,
                                workdir, last_good=ckpt.last_good_step)
                writer.write_scalars(step, {
                    **summary, "steps_per_second": step_rate(step),
                    **logging_utils.learning_rate_scalars(learning_rates or {}, step)})
                progress(step, summary)
            for every, action in periodic:
                if every and step % every == 0:
                    action(step, state, batch, writer)
            ckpt.save(step, state, train_iter)
            if preemption.should_stop(ckpt.manager, step):
                preempted = True
                log.warning("Stopped at step %d on request; rerun the same command to resume.",
                            step)
                break
        jax.block_until_ready(state)
        ckpt.save_final(step, state, train_iter)     # RunFailed when it must not be kept
        ckpt.wait()
    finally:
        preemption.close()
        ckpt.close()
    return state, step, preempted, writer


def run_and_evaluate(config, workdir: str, *, final_evaluation, **loop_args) -> dict:
    """`run_loop`, then, unless the run was preempted, `final_evaluation(state,
    split, step, writer)` -> scores on `config.final_eval_split` (when set);
    the writer closed either way. Returns {"step", **scores}, or {"step",
    "preempted": True}. What every trainer does after its loop."""
    state, step, preempted, writer = run_loop(config, workdir, **loop_args)
    if preempted:
        writer.close()
        return {"step": step, "preempted": True}
    result = {"step": step}
    if config.final_eval_split:
        log.info("Evaluating step %d on the %s split (the first batch compiles) ...", step,
                 config.final_eval_split)
        started = time.monotonic()
        result.update(final_evaluation(state, config.final_eval_split, step, writer))
        log.info("Evaluated in %s: %s", logging_utils.format_duration(time.monotonic() - started),
                 ", ".join(f"{k} {v:.4g}" for k, v in result.items()
                           if k in ("psnr", "ssim", "sam", "miou", "accuracy")
                           and isinstance(v, (int, float))))
    writer.close()
    return result
