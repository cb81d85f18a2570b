"""Seconds to the first step: `rsjax bench steps --parts startup`.

`startup` runs the quick start's training command for one step (`rsjax train
--config fusion:demo --config.total_steps=1`, dataset already built) in a fresh
process, twice: with an empty compilation cache (cold, a user's first run) and
with the cache the first run filled (warm). Each run reports as JSON where its
seconds went (imports, first step, the whole command, XLA compile/trace/lower,
cache hits, Orbax's blocking time, whether TensorFlow was imported). The
measured process is `python -m rsjax.bench.startup` (`main`); the parent only
starts it and reads its JSON line.
docs/benchmarks.md (the `startup` part of `rsjax bench steps`) names each field.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

# One step of the quick start's run, logged at once, nothing periodic but the end.
TRAIN_OVERRIDES = ("--config.total_steps=1", "--config.log_every_steps=1",
                   "--config.checkpoint_every_steps=1")
_EVENTS = {"/jax/core/compile/backend_compile_duration": "compile_s",
           "/jax/core/compile/jaxpr_trace_duration": "trace_s",
           "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower_s",
           "/jax/compilation_cache/cache_retrieval_time_sec": "cache_read_s",
           "/jax/checkpoint/write/async/blocking_duration_secs": "checkpoint_blocking_s",
           "/jax/orbax/write/blocking_duration_secs": "checkpoint_blocking_s"}


def _since_process_start() -> float:
    """Seconds since this process started (the interpreter's own start included)."""
    import psutil

    return time.time() - psutil.Process().create_time()


def _first_step_logged(path: Path) -> bool:
    """Whether metrics.jsonl holds a training step's losses (the file is opened,
    and may get other records, before the first step has run)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return False
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue                       # a line being written
        if isinstance(record, dict) and any(k.endswith("loss") for k in record):
            return True
    return False


def _watch_for(path: Path, found: dict, stop: threading.Event) -> None:
    """Notes when the first step's losses are in `path` (metrics.jsonl)."""
    while not stop.is_set():
        if _first_step_logged(path):
            found["first_step_s"] = round(_since_process_start(), 2)
            return
        stop.wait(0.05)


def measure(config: str, workdir: str, data_dir: str, overrides: tuple = ()) -> dict:
    """In this process: the train command's phases (the fields docs/benchmarks.md lists);
    `overrides`: more `--config.key=value` arguments."""
    # What the train command imports, imported first so their seconds are counted here.
    import flax.nnx  # noqa: F401
    import jax  # noqa: F401
    import optax  # noqa: F401
    import orbax.checkpoint  # noqa: F401

    from rsjax import cli
    from rsjax.trainers import fusion  # noqa: F401
    imports_done = _since_process_start()
    from jax._src import monitoring

    sums: dict = collections.defaultdict(float)
    counts: dict = collections.Counter()
    by_program: dict = collections.defaultdict(float)

    def on_event(event: str, seconds: float, **kwargs) -> None:
        if event in _EVENTS:
            sums[_EVENTS[event]] += seconds
            counts[event] += 1
        if event == "/jax/core/compile/backend_compile_duration":
            by_program[kwargs.get("fun_name", "?")] += seconds

    monitoring.register_event_duration_secs_listener(on_event)
    found: dict = {}
    stop = threading.Event()
    watcher = threading.Thread(target=_watch_for, daemon=True,
                               args=(Path(workdir) / "metrics.jsonl", found, stop))
    watcher.start()
    code = cli.main(["train", "--config", config, "--workdir", workdir,
                     f"--config.data.data_dir={data_dir}", *TRAIN_OVERRIDES, *overrides])
    total = _since_process_start()
    stop.set()
    watcher.join()
    return {"exit_code": code, "interpreter_and_imports_s": round(imports_done, 2),
            "first_step_s": found.get("first_step_s"), "total_s": round(total, 2),
            **{k: round(sums[k], 2) for k in _EVENTS.values()},
            "programs": counts["/jax/core/compile/backend_compile_duration"],
            "compile_s_by_program": {k: round(v, 2) for k, v in sorted(
                by_program.items(), key=lambda kv: -kv[1]) if v >= 0.05},
            "cache_hits": counts["/jax/compilation_cache/cache_retrieval_time_sec"],
            "tensorflow_imported": "tensorflow" in sys.modules}


def run_once(config: str, data_dir: str, cache_dir: str, workdir: str,
             overrides: tuple = ()) -> dict:
    """One measured train command in a fresh process, compilation cache `cache_dir`."""
    env = dict(os.environ, RSJAX_CACHE_DIR=cache_dir)
    env.pop("JAX_COMPILATION_CACHE_DIR", None)       # the command's own default: RSJAX_CACHE_DIR
    proc = subprocess.run([sys.executable, "-m", "rsjax.bench.startup", "--config", config,
                           "--workdir", workdir, "--data_dir", data_dir,
                           *[f"--override={o.removeprefix('--config.')}" for o in overrides]],
                          env=env, capture_output=True, text=True)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"the measured train command failed ({proc.returncode}):\n"
                           f"{proc.stderr[-3000:]}")
    return json.loads(lines[-1])


def startup(data_dir: str | None, config: str = "fusion:demo", overrides: tuple = ()) -> dict:
    """Cold and warm runs of the one-step train command; the dataset is built
    first, untimed (`data_dir`: where it is, default the config's)."""
    from rsjax import input_pipeline
    from rsjax.config_loader import load_config

    data = load_config(config, lock=False).data
    if data_dir:
        data.data_dir = data_dir
    input_pipeline.ensure_dataset(data)
    data_dir = input_pipeline.data_dir_of(data)
    with tempfile.TemporaryDirectory(prefix="rsjax_startup_") as tmp:
        cache = os.path.join(tmp, "cache")
        out = {"command": " ".join(["rsjax train --config", config, *TRAIN_OVERRIDES, *overrides])}
        for name in ("cold", "warm"):
            out[name] = run_once(config, str(data_dir), cache, os.path.join(tmp, name), overrides)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="fusion:demo")
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--data_dir", required=True)
    parser.add_argument("--override", action="append", default=[],
                        help="a further config override, key=value (repeatable)")
    args = parser.parse_args(argv)
    result = measure(args.config, args.workdir, args.data_dir,
                     tuple(f"--config.{o}" for o in args.override))
    print(json.dumps(result), flush=True)
    return 0 if result["exit_code"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
