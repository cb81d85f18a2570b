"""--workers of the experiment commands (rsjax.experiments.workers): real
worker processes, started by run_workers as the commands start them, each
pinned to its share of the cores, sharing an experiment's runs through
the runner's claims (runner.run_plan). The runs are tiny scripts: the launcher, the pinning and the
claims are what is tested, not training."""
import json
import os
import signal
import sys
import threading
import time

import pytest

from rsjax.errors import UserError
from rsjax.experiments import workers

CORES = sorted(os.sched_getaffinity(0))
needs_2_cores = pytest.mark.skipif(len(CORES) < 2, reason="needs 2 CPU cores to give 2 workers one each")

# One worker, as `--workers` starts a copy of the experiment command: it pins
# itself (become_worker) and runs what is left of 4 runs through the
# experiments' runner, a stand-in writing each run's record instead of training.
WORKER = r"""
import json, os, sys, time
from etils import epath
from rsjax.experiments import cloud_removal as experiment, runner, workers

cores = workers.become_worker(sys.argv[sys.argv.index("--worker_cpus") + 1])
root = epath.Path(sys.argv[1])
(root / f"ready_{os.getpid()}").write_text("")

def run_one(run, root, data_dir, extra, devices):
    out = root / run.name
    # Hold this run until both workers are up: the other one then finds it
    # claimed and takes the next, so each worker runs at least one.
    while len(list(root.glob("ready_*"))) < 2:
        time.sleep(0.05)
    with (out / "ran_by").open("a") as f:        # a run done twice shows two lines
        f.write(f"{os.getpid()}\n")
    time.sleep(0.2)
    record = {"method": run.method, "seed": run.seed, "seconds": 0.2, "pid": os.getpid(),
              "affinity": sorted(os.sched_getaffinity(0)), "cores": cores,
              "intra_op_threads": os.environ["TF_NUM_INTRAOP_THREADS"],
              "xla_flags": os.environ.get("XLA_FLAGS", ""),
              "config": runner.config_record(runner.run_config(run, root), root)}
    (out / experiment.RUN_FILE).write_text(json.dumps(record))
    return record

runner.run_plan([experiment.method_run(m, "demo", 0) for m in experiment.METHODS[:4]], root,
                workers=2, poll_seconds=0.05, print_fn=lambda line: None, execute_run=run_one)
"""


@needs_2_cores
def test_two_workers_run_disjoint_runs_in_processes_pinned_to_their_cores(tmp_path, capsys):
    from rsjax.experiments import cloud_removal as experiment
    from rsjax.experiments import runner

    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    root = tmp_path / "experiment"
    root.mkdir()
    workers.run_workers([sys.executable, str(script), str(root)], 2, "test experiment")
    shares = workers.cpu_shares(CORES, 2)
    assert f"2 workers on cores {shares}" in capsys.readouterr().out

    keys = [m.key for m in experiment.METHODS[:4]]
    records = [json.loads((root / k / "seed0" / experiment.RUN_FILE).read_text()) for k in keys]
    # Each run ran once, in one of two processes other than this one, and both ran some.
    for k in keys:
        assert len((root / k / "seed0" / "ran_by").read_text().split()) == 1, k
        assert not (root / k / "seed0" / runner.CLAIM_FILE).exists()      # claims released
    pids = {r["pid"] for r in records}
    assert len(pids) == 2 and os.getpid() not in pids
    # Each process is pinned to its own share: disjoint, together all the cores.
    pinned = {r["pid"]: r["affinity"] for r in records}
    a, b = pinned.values()
    assert set(a).isdisjoint(b) and sorted(a + b) == CORES
    assert sorted(pinned.values()) == sorted(shares)
    for r in records:
        assert r["affinity"] == r["cores"]
        # Thread pools sized to the share: one core turns XLA's Eigen threads off.
        assert r["intra_op_threads"] == str(len(r["cores"]))
        assert ("--xla_cpu_multi_thread_eigen=false" in r["xla_flags"]) == (len(r["cores"]) == 1)


@needs_2_cores
def test_a_failed_worker_fails_the_command_with_every_exit_code():
    # The first share's worker exits 3, the other 0: the launcher waits for both.
    first = ",".join(map(str, workers.cpu_shares(CORES, 2)[0]))
    command = [sys.executable, "-c", f"import sys; sys.exit(3 if sys.argv[-1] == {first!r} else 0)"]
    with pytest.raises(UserError, match=r"test experiment: a worker failed \(exit codes \[3, 0\]\)"):
        workers.run_workers(command, 2, "test experiment")
    with pytest.raises(UserError, match="give at most"):          # more workers than cores
        workers.run_workers(command, len(CORES) + 1, "test experiment")


@needs_2_cores
def test_a_stop_is_passed_on_to_every_worker(tmp_path):
    """SIGTERM to the launcher (a scheduler's stop, Ctrl-C alike) reaches each
    worker, so each can checkpoint; the launcher then says how to resume and
    gives its signal handlers back."""
    sleeper = ("import os, sys, time\n"
               "open(os.path.join(sys.argv[1], 'ready_' + sys.argv[-1]), 'w').close()\n"
               "time.sleep(60)\n")
    original = signal.getsignal(signal.SIGTERM)

    def stop_when_both_run():
        # Only once both workers run and the launcher's handler is in place:
        # a SIGTERM before that would stop pytest itself.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if len(list(tmp_path.glob("ready_*"))) == 2 and signal.getsignal(signal.SIGTERM) is not original:
                os.kill(os.getpid(), signal.SIGTERM)
                return
            time.sleep(0.05)

    threading.Thread(target=stop_when_both_run, daemon=True).start()
    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt, match="test experiment: stopped on request; rerun"):
        workers.run_workers([sys.executable, "-c", sleeper, str(tmp_path)], 2, "test experiment")
    assert time.monotonic() - started < 30                  # the workers did not sleep their 60 s
    assert signal.getsignal(signal.SIGTERM) is original
