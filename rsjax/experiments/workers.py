"""Several runs at once on one CPU machine: `--workers N` of the experiment
commands (`rsjax experiments report`, `rsjax experiments cloud_removal`).

The command starts N copies of itself, each pinned to its share of the cores
(the hidden `--worker_cpus`) with XLA's CPU thread pool sized to that share:
small runs use one core better than two cores use one run, which is why this
pays on small machines. Each copy claims runs through the lock file in the
run's folder (rsjax.experiments.runner.claim_folder), so the copies, or the
same command on other machines sharing the workdir, never run one run twice.
"""
from __future__ import annotations

import os
import signal
import subprocess
from typing import Iterable, Mapping, MutableMapping, Sequence

from rsjax.errors import UserError

# Set in a worker's environment: the cores its thread settings were made for.
_PINNED = "RSJAX_WORKER_CPUS"


def cpu_shares(cpus: list[int], workers: int) -> list[list[int]]:
    """The machine's cores dealt out to `workers` processes (as even as it goes)."""
    if workers > len(cpus):
        raise UserError(f"--workers {workers}: this process may use {len(cpus)} CPU cores; "
                        f"give at most {len(cpus)} workers (one core each at least).")
    return [cpus[i::workers] for i in range(workers)]


def worker_env(cores: list[int], environ: Mapping[str, str] = os.environ) -> dict:
    """A worker's environment: one core turns XLA's multi-threaded Eigen off (its
    threads would only contend for that core). XLA sizes its CPU thread pool from
    the cores the process may run on, so the affinity set by become_worker is what
    bounds it; there is no XLA flag for the pool's size (a bare
    `intra_op_parallelism_threads=N` in XLA_FLAGS is ignored after a flag and,
    alone, read as a flag-file name that kills the process)."""
    env = dict(environ)
    if len(cores) == 1 and "--xla_cpu_multi_thread_eigen" not in env.get("XLA_FLAGS", ""):
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false").strip()
    env["TF_NUM_INTRAOP_THREADS"] = env["TF_NUM_INTEROP_THREADS"] = str(len(cores))
    env[_PINNED] = ",".join(map(str, cores))
    return env


def pin_worker_env(cores: list[int], environ: MutableMapping[str, str] = os.environ) -> None:
    """Gives a worker started by hand (`--worker_cpus` without `--workers`
    having set its environment) the thread settings `--workers` would have:
    XLA reads them when its CPU backend starts, after this."""
    if environ.get(_PINNED) != ",".join(map(str, cores)):
        environ.update(worker_env(cores, environ))


def build_datasets(data_configs: Iterable) -> None:
    """Builds each dataset the runs read, once, before any worker starts, so
    that no two workers build one."""
    from rsjax import input_pipeline

    built = set()
    for data in data_configs:
        if data.name not in built:
            input_pipeline.ensure_dataset(data)
            built.add(data.name)


def become_worker(worker_cpus: str) -> list[int]:
    """In a worker process: pinned to its cores, with their thread settings."""
    cores = [int(c) for c in worker_cpus.split(",")]
    os.sched_setaffinity(0, cores)
    pin_worker_env(cores)
    return cores


def run_workers(command: Sequence[str], workers: int, what: str) -> None:
    """Runs `workers` copies of `command` (each with `--worker_cpus` added), one
    per share of this process's cores, and waits for them all. A stop
    (SIGTERM, Ctrl-C) is passed on: each worker checkpoints and exits.
    `what` names the experiment in the errors."""
    shares = cpu_shares(sorted(os.sched_getaffinity(0)), workers)
    print(f"{workers} workers on cores {shares}", flush=True)
    procs = [subprocess.Popen(list(command) + ["--worker_cpus", ",".join(map(str, cores))],
                              env=worker_env(cores)) for cores in shares]
    stopped = []

    def stop(signum, frame):
        stopped.append(signum)
        for p in procs:
            p.send_signal(signal.SIGTERM)

    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        codes = [p.wait() for p in procs]
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if stopped:
        raise KeyboardInterrupt(f"{what}: stopped on request; rerun the same command to resume")
    if any(codes):
        raise UserError(f"{what}: a worker failed (exit codes {codes}); its error is above. "
                        "Fix it and rerun: finished runs are kept, unfinished ones resume.")
