"""One writer per folder: lock files with their owner, live owners refused, dead ones taken over."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from rsjax.locks import FolderBusy, FolderLock, is_stale, owner_record

HOLD = """
import sys, time
from rsjax.locks import FolderLock
lock = FolderLock(sys.argv[1], what="training run").acquire()
print("held", flush=True)
time.sleep(120)
"""


def hold_in_subprocess(folder) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_live_owner_is_refused_with_its_pid_and_host(tmp_path):
    proc = hold_in_subprocess(tmp_path)
    try:
        with pytest.raises(FolderBusy) as info:
            FolderLock(tmp_path, what="training run").acquire()
        message = str(info.value)
        assert f"pid {proc.pid}" in message and socket.gethostname() in message
        assert str(tmp_path / "rsjax.lock") in message and "training run" in message
    finally:
        proc.kill()
        proc.wait()


def test_lock_of_a_killed_process_is_taken_over(tmp_path, caplog):
    proc = hold_in_subprocess(tmp_path)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (tmp_path / "rsjax.lock").exists()          # SIGKILL left it behind
    with caplog.at_level("WARNING", logger="rsjax"), FolderLock(tmp_path) as lock:
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()
    assert not (tmp_path / "rsjax.lock").exists()
    assert any("stale" in r.getMessage() and str(proc.pid) in r.getMessage() for r in caplog.records)


def test_pid_reused_by_another_process_is_stale():
    alive = owner_record()
    assert not is_stale(alive)
    boot, _, ticks = alive["identity"].rpartition("/")
    assert is_stale(dict(alive, identity=f"{boot}/{int(ticks) + 1}"))   # same pid, another start
    old_style = {k: v for k, v in alive.items() if k != "identity"}      # written before `identity`
    assert not is_stale(old_style)
    assert is_stale(dict(old_style, started=alive["started"] - 3600))   # same pid, started an hour apart
    assert not is_stale(dict(alive, host="another-host"))            # cannot be checked from here


def test_a_live_owner_stays_live_when_the_clock_moves():
    # A paused and resumed VM shifts the wall-clock start time psutil computes
    # (boot time + ticks) for every process; the identity does not move.
    alive = owner_record()
    assert not is_stale(dict(alive, started=alive["started"] - 25.0))


def test_identity_counts_ticks_since_boot_as_proc_stat_gives_them():
    # Independent reading: psutil's start time is boot time + ticks / CLK_TCK.
    import psutil
    ticks = int(owner_record()["identity"].rpartition("/")[2])
    expected = (psutil.Process().create_time() - psutil.boot_time()) * os.sysconf("SC_CLK_TCK")
    assert abs(ticks - expected) <= 2


def test_lock_written_on_another_host_is_refused(tmp_path):
    (tmp_path / "rsjax.lock").write_text(json.dumps(dict(owner_record(), host="tpu-vm-7", pid=4242)))
    with pytest.raises(FolderBusy, match=r"pid 4242 on host tpu-vm-7.*delete .*rsjax\.lock"):
        FolderLock(tmp_path).acquire()


def test_unreadable_lock_file_is_stale(tmp_path):
    (tmp_path / "rsjax.lock").write_text("{\"host\": ")         # cut short by a crash mid-write
    with FolderLock(tmp_path):
        # Taken over: the file now names this process, and a second taker is refused.
        assert json.loads((tmp_path / "rsjax.lock").read_text())["pid"] == os.getpid()
        with pytest.raises(FolderBusy):
            FolderLock(tmp_path).acquire()
    assert not (tmp_path / "rsjax.lock").exists()


def test_two_processes_starting_at_once_one_wins(tmp_path):
    racer = ("import sys, time\nfrom rsjax.locks import FolderLock, FolderBusy\n"
             "time.sleep(max(0.0, float(sys.argv[2]) - time.time()))\n"
             "try:\n    FolderLock(sys.argv[1]).acquire(); print('won', flush=True); time.sleep(5)\n"
             "except FolderBusy:\n    print('busy', flush=True)\n")
    start = str(time.time() + 3.0)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    procs = [subprocess.Popen([sys.executable, "-c", racer, str(tmp_path), start], stdout=subprocess.PIPE,
                              text=True, cwd=root) for _ in range(3)]
    outcomes = sorted(p.stdout.readline().strip() for p in procs)
    for p in procs:
        p.kill()
        p.wait()
    assert outcomes == ["busy", "busy", "won"]


RACE = """
import json, multiprocessing as mp, os, sys

from rsjax.locks import FolderBusy, FolderLock


def racer(root, trials, barrier, results):
    for trial in range(trials):
        lock = FolderLock(os.path.join(root, str(trial)))
        barrier.wait()                          # both start together, against the stale lock
        try:
            lock.acquire()
            outcome = "won"
        except FolderBusy:
            outcome = "busy"
        results.put((trial, outcome))
        barrier.wait()                          # the winner holds it until the other has tried
        lock.release()


if __name__ == "__main__":
    root, trials = sys.argv[1], int(sys.argv[2])
    ctx = mp.get_context("fork")              # this script imports no JAX: fork is safe and fast
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=racer, args=(root, trials, barrier, results)) for _ in range(2)]
    for p in procs:
        p.start()
    outcomes = {}
    for _ in range(2 * trials):
        trial, outcome = results.get(timeout=60)
        outcomes.setdefault(trial, []).append(outcome)
    for p in procs:
        p.join(60)
    print(json.dumps(outcomes))
"""


def test_two_processes_taking_over_a_stale_lock_at_once_one_wins(tmp_path):
    # A restart after a crash: a stale lock is there, and two runs start together. Each used
    # to delete whatever lock file it found stale, so one deleted the other's fresh lock
    # and both ran (40 of 100 trials).
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = json.dumps(dict(owner_record(), pid=dead.pid, identity="gone/0", command="crashed run"))
    trials = 100
    for trial in range(trials):
        (tmp_path / str(trial)).mkdir()
        (tmp_path / str(trial) / "rsjax.lock").write_text(stale)
    script = tmp_path / "race.py"
    script.write_text(RACE)
    done = subprocess.run([sys.executable, str(script), str(tmp_path), str(trials)], capture_output=True,
                          text=True, timeout=120,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert done.returncode == 0, done.stderr[-3000:]
    outcomes = json.loads(done.stdout)
    doubles = [t for t, o in outcomes.items() if sorted(o) != ["busy", "won"]]
    assert len(outcomes) == trials and not doubles, f"{len(doubles)} of {trials} trials: {[(t, outcomes[t]) for t in doubles[:5]]}"


# One process of a 2-process JAX job (jax.distributed, one CPU device each)
# starting a training run: it takes the workdir's lock as train_and_evaluate does.
LOCK_IN_A_JOB = """
import sys
from rsjax import locks, runtime
runtime.maybe_initialize_distributed()          # joins the job from RSJAX_* (gloo on CPU)
import jax
try:
    with locks.workdir_lock(sys.argv[1]):
        print("acquired", flush=True)
except locks.FolderBusy as err:
    print(f"process {jax.process_index()} of {jax.process_count()}: {err}", flush=True)
    sys.exit(2)
"""


def test_a_held_workdir_refuses_every_process_of_a_multi_host_run(tmp_path):
    """While this process trains in a workdir, a 2-process run started there is
    refused on both processes, promptly (neither waits in a collective for the
    other): process 0, which checks, names the owner; process 1 points to it."""
    import socket as sockets

    with sockets.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RSJAX_", "JAX_COORDINATOR"))}
    env.update(XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu",
               RSJAX_COORDINATOR=f"localhost:{port}", RSJAX_NUM_PROCESSES="2")
    with FolderLock(tmp_path, what="training run"):
        procs = [subprocess.Popen([sys.executable, "-c", LOCK_IN_A_JOB, str(tmp_path)],
                                  env=dict(env, RSJAX_PROCESS_ID=str(i)), stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True) for i in range(2)]
        try:
            outputs = [p.communicate(timeout=120)[0] for p in procs]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        assert [p.returncode for p in procs] == [2, 2], outputs
        first, second = (next(line for line in out.splitlines() if line.startswith("process "))
                         for out in outputs)
        assert first.startswith(f"process 0 of 2: {tmp_path}: in use by another training run "
                                f"(pid {os.getpid()} on host {socket.gethostname()}")
        assert "train in another --workdir" in first
        assert second == f"process 1 of 2: {tmp_path}: in use by another training run (see process 0's message)."
        assert json.loads((tmp_path / "rsjax.lock").read_text())["pid"] == os.getpid()   # still ours
