"""Runs an experiment plan run by run, resumably.

Every run lives in `<workdir>/<run name>/`. A finished run holds `run.json`
(its resolved config, wall time and scores) and, for trained models,
`tiles_test.npz` (per-test-tile metric parts, for the paired intervals) and
`shown_test.npz` (the best and worst test tiles, for the report's grids).
An unfinished run is resumed: the trainer continues from its last
checkpoint, so an experiment can be run in pieces, and a killed one
continues where it stopped; `attempts.jsonl` keeps each attempt's start so
that the run's wall time counts every piece. A finished run whose config no longer matches
the plan is an error (never a silent mix of two settings): remove that run's
folder, or use another workdir.

Several workers can share one experiment (`rsjax experiments report
--workers N` on one machine, or the same command on machines that share the
workdir): each claims a run with a lock file in its folder before running it,
skips runs another live worker holds, and waits for the runs a run needs (a
synthesis waits for its generator, a segmentation for its generated images).
"""
from __future__ import annotations

import json
import logging
import time
from typing import Callable, Optional, Sequence

import numpy as np
from etils import epath

from rsjax.errors import UserError
from rsjax.experiments.plan import Run

log = logging.getLogger("rsjax")

RUN_FILE = "run.json"
TILES_FILE = "tiles_test.npz"
SCENES_FILE = "scenes_test.npz"     # a cloud-removal run's test tiles' scenes, in split order
SHOWN_FILE = "shown_test.npz"
ATTEMPTS_FILE = "attempts.jsonl"
CLAIM_FILE = "worker.lock"


def start_attempt(out: epath.Path, now: Optional[float] = None) -> dict:
    """Notes in `out`/attempts.jsonl that an invocation starts (or resumes) this
    run, and adds up what the earlier, interrupted ones spent: a killed attempt
    never writes its end, so it counts from its start to the newest file it
    left in the run's folder (its last checkpoint, metrics or log line); its
    CPU time is lost. `finish_attempt` turns this into the run's times, so a
    run trained across sessions reports all of its wall time, not the last
    piece."""
    now = time.time() if now is None else now
    out.mkdir(parents=True, exist_ok=True)
    log_file = out / ATTEMPTS_FILE
    starts = attempt_starts(out)
    mtimes = _file_mtimes(out)
    # Files but no attempts noted: attempts of an rsjax from before this count
    # (their time is unknown, and the record says so).
    unrecorded = not starts and bool(mtimes)
    earlier = 0.0
    for i, start in enumerate(starts):
        until = starts[i + 1] if i + 1 < len(starts) else now
        written = [m for m in mtimes if start <= m < until]
        earlier += (max(written) - start) if written else 0.0
    with log_file.open("a") as f:
        f.write(json.dumps({"start": now}) + "\n")
    return {"started": now, "cpu_started": time.process_time(),
            "earlier_seconds": earlier, "earlier_attempts": len(starts),
            "earlier_unrecorded": unrecorded}


def attempt_starts(out: epath.Path) -> list[float]:
    """When each attempt of the run in `out` started (attempts.jsonl), oldest first."""
    log_file = out / ATTEMPTS_FILE
    if not log_file.exists():
        return []
    return [json.loads(l)["start"] for l in log_file.read_text().splitlines() if l]


def finish_attempt(attempt: dict, now: Optional[float] = None) -> dict:
    """The run record's time fields: `seconds`, wall time of every attempt;
    `cpu_seconds`, CPU time of every thread of this process in the last one (on a
    shared machine the wall time grows with the load, the CPU time much less);
    `attempts`; `cpu_seconds_of_all_attempts`, whether that CPU time is the whole."""
    now = time.time() if now is None else now
    out = {"seconds": round(attempt["earlier_seconds"] + now - attempt["started"], 1),
           "cpu_seconds": round(time.process_time() - attempt["cpu_started"], 1),
           "attempts": attempt["earlier_attempts"] + 1,
           "cpu_seconds_of_all_attempts": (attempt["earlier_attempts"] == 0
                                           and not attempt.get("earlier_unrecorded"))}
    if attempt.get("earlier_unrecorded"):
        out["earlier_attempts_unrecorded"] = True
    return out


def _attempts_known(record: dict) -> bool:
    """Whether every attempt of the run was counted: not for a record written
    before attempts were (rsjax before 2026-11-30), nor for a run whose
    earlier attempts ran under such an rsjax."""
    return "attempts" in record and not record.get("earlier_attempts_unrecorded")


def cpu_note(record: dict) -> str:
    """" (last of N attempts)" where a run's CPU time covers only its last attempt."""
    if not _attempts_known(record):
        return " (last attempt)"
    if record["cpu_seconds_of_all_attempts"]:
        return ""
    return f" (last of {record['attempts']} attempts)"


def wall_note(record: dict) -> str:
    """" (last attempt)" where a run's wall time may miss earlier attempts."""
    return "" if _attempts_known(record) else " (last attempt)"


def _file_mtimes(root: epath.Path) -> list[float]:
    """Modification times of the files under a local run folder (none for object
    stores, whose listing would cost a request per folder: there only the last
    attempt's time counts)."""
    import os

    times = []
    for folder, _, files in os.walk(os.fspath(root)):
        for name in files:
            # Not the claim: a new attempt rewrites it just before it starts,
            # which would stretch the killed attempt before it to that moment.
            if name not in (ATTEMPTS_FILE, CLAIM_FILE):
                try:
                    times.append(os.stat(os.path.join(folder, name)).st_mtime)
                except OSError:          # removed while listing (a checkpoint rotated out)
                    pass
    return times


def run_config(run: Run, root: epath.Path, data_dir: Optional[str] = None,
               extra: Optional[Callable[[Run], Sequence[str]]] = None):
    """The locked ConfigDict of a training or synthesis run. `extra(run)` gives
    more overrides for a run (e.g. smaller models in tests)."""
    from rsjax import config_loader

    overrides = list(run.overrides)
    if data_dir:
        overrides.append(f"data.data_dir={data_dir}")
    overrides += list(extra(run) if extra else ())
    if run.kind == "segmentation" and run.generator:
        dirs = "+".join(str(root / name) for name in needs(run))
        overrides.append(f"data.generated_dir={dirs}")
    return config_loader.load_config(run.config, overrides)


def _resolved(config) -> dict:
    return json.loads(json.dumps(config.to_dict(), default=str, sort_keys=True))


def config_record(config, root: epath.Path) -> dict:
    """The config as a run.json records it: resolved to JSON, the experiment's
    folder written as '<workdir>' (what `check_matches` compares against)."""
    return _portable(_resolved(config), root)


def _portable(config_dict: dict, root: epath.Path) -> dict:
    """The config with the experiment's own folder written as '<workdir>', so a
    moved or copied experiment still matches its plan."""
    text = json.dumps(config_dict, sort_keys=True).replace(str(root), "<workdir>")
    return json.loads(text)


def load_finished(run: Run, root: epath.Path) -> Optional[dict]:
    path = root / run.name / RUN_FILE
    if not path.exists():
        return None
    return json.loads(path.read_text())


# Config keys added after runs were recorded, each with the value that does
# what the configs did before the key existed: a finished run whose record
# lacks the key still matches a plan that asks for exactly that value. Any
# other value, or any other difference, is a mismatch.
ADDED_KEYS = {
    ("data", "mix_all"): False,
    ("total_epochs",): 0.0,                 # a length in steps, as before epochs
}


def _without_added_keys(want: dict, recorded: dict) -> dict:
    want = json.loads(json.dumps(want))
    for path, neutral in ADDED_KEYS.items():
        node, seen = want, recorded
        for key in path[:-1]:
            node, seen = node.get(key), (seen or {}).get(key)
            if not isinstance(node, dict):
                break
        else:
            last = path[-1]
            if last in node and node[last] == neutral and last not in (seen or {}):
                del node[last]
    return want


def without_locations(config_dict: Optional[dict]) -> Optional[dict]:
    """The config less where its dataset lives (data.data_dir): moving the
    datasets, or its default changing, changes no result."""
    if not isinstance(config_dict, dict) or not isinstance(config_dict.get("data"), dict):
        return config_dict
    return {**config_dict, "data": {k: v for k, v in config_dict["data"].items() if k != "data_dir"}}


def check_matches(run: Run, record: dict, config, root: epath.Path) -> None:
    recorded = without_locations(record.get("config"))
    want = without_locations(_without_added_keys(config_record(config, root), recorded or {}))
    if recorded != want:
        raise UserError(
            f"{root / run.name}: this run finished with another config than the plan now asks "
            f"for (e.g. other steps or sizes). Remove that folder to redo it, or use another "
            f"--workdir for the new settings.")


def execute(run: Run, root: epath.Path, data_dir: Optional[str] = None,
            extra: Optional[Callable[[Run], Sequence[str]]] = None, devices=None) -> dict:
    """Runs one run (resuming it if it was interrupted) and writes its run.json;
    `devices` (default: all) is the trainers' mesh."""
    from rsjax.trainers import trainer_module

    out = root / run.name
    config = run_config(run, root, data_dir, extra)
    # The config as planned: what a later session's plan is checked against. A
    # run in epochs resolves its steps when it starts (its config.json has them).
    planned = config_record(config, root)
    attempt = start_attempt(out)
    if run.kind == "synthesize":
        from rsjax import synthesize

        # The generator's own config; `scenes` picks the training tiles to generate for.
        summary = synthesize.synthesize(config, str(root / run.generator), "train",
                                        out=str(out), scenes=run.scenes)
        record = {"kind": run.kind, "summary": summary}
    else:
        trainer = trainer_module(config.trainer)
        result = trainer.train_and_evaluate(config, str(out), devices=devices)
        if result.get("preempted"):
            raise KeyboardInterrupt(f"{run.name} stopped on request; rerun to resume")
        record = {"kind": run.kind, "step": result.get("step"), "scores": _jsonable(result)}
        if run.kind == "cloud_removal":
            # Its final evaluation wrote per-image parts by region and cover bin
            # (eval_test_clouds.npz), in the split's order: their scenes, for the
            # claims' scene bootstrap.
            np.savez_compressed((out / SCENES_FILE).open("wb"),
                                scene_id=test_scene_ids(config.data))
        else:
            # Per-tile metric parts (paired intervals) and the best and worst tiles (grids).
            tiles, shown = trainer.score_tiles(config, str(out), "test", devices=devices)
            tiles["scene_id"] = test_scene_ids(config.data, len(next(iter(tiles.values()))))
            np.savez_compressed((out / TILES_FILE).open("wb"), **tiles)
            np.savez_compressed((out / SHOWN_FILE).open("wb"), **shown)
        history = out / "val_history.jsonl"
        if history.exists():
            record["val_history"] = [json.loads(l) for l in history.read_text().splitlines() if l]
    from rsjax import provenance

    record.update(name=run.name, table=run.table, method=run.method, seed=run.seed,
                  config=planned, **finish_attempt(attempt),
                  finished=round(time.time(), 1), provenance=provenance.record(config.data))
    (out / RUN_FILE).write_text(json.dumps(record, indent=2))
    return record


def test_scene_ids(data_cfg, num_tiles: Optional[int] = None) -> np.ndarray:
    """The scene of each test tile, in the order the trainers score them (the
    split's): what the reports resample together (rsjax.experiments.stats.resampler)."""
    from rsjax import input_pipeline

    source = input_pipeline.get_builder(data_cfg).as_data_source(split="test")
    ids = np.asarray(input_pipeline.record_scene_ids(source))
    if num_tiles is not None and len(ids) != num_tiles:
        raise RuntimeError(f"{len(ids)} test records but {num_tiles} scored tiles")
    return ids


def _jsonable(tree):
    return json.loads(json.dumps(tree, default=lambda x: np.asarray(x).tolist()))


def needs(run: Run) -> tuple[str, ...]:
    """The runs whose outputs `run` reads: a synthesis its generator, a
    segmentation with generated images their syntheses."""
    if run.kind == "synthesize" and run.generator:
        return (run.generator,)
    if run.kind == "segmentation" and run.generator:
        return tuple(run.generator.split(","))
    return ()


def missing_inputs(run: Run, root: epath.Path) -> list[str]:
    """What `run` reads from the runs it needs that is not in this workdir:
    a synthesis needs its generator's checkpoints, a segmentation the
    generated images of its syntheses. Both stay behind when finished runs
    are carried over as records only (`rsjax experiments export`)."""
    from rsjax.trainers.resume_check import latest_checkpoint_step

    missing = []
    for name in needs(run):
        folder = root / name
        if run.kind == "synthesize":
            if latest_checkpoint_step(folder) is None:
                missing.append(f"{folder / 'checkpoints'} (the generator's checkpoints)")
        elif not any(folder.glob("part-*.npz")):
            missing.append(f"{folder}/part-*.npz (the generated images)")
    return missing


def check_inputs(run: Run, root: epath.Path) -> None:
    """A UserError naming what `run` needs from finished runs that is not here,
    and the two ways on: copy it in, or rerun those runs here."""
    missing = missing_inputs(run, root)
    if missing:
        reruns = ", ".join(str(root / name / RUN_FILE) for name in needs(run))
        raise UserError(
            f"{run.name} needs what its finished runs made, which is not in {root}: "
            f"{'; '.join(missing)}. Their records came without it (an exported "
            "experiment). Copy those folders from the machine that ran them, or move "
            f"{reruns} aside to run them again here.")


def claim(run: Run, root: epath.Path):
    """This worker's lock on a run's folder (see claim_folder)."""
    return claim_folder(root / run.name)


def claim_folder(folder: epath.Path):
    """This worker's lock on a run's folder, or None when another live worker holds it
    (a lock left by a worker that died is taken over)."""
    from rsjax import locks

    lock = locks.FolderLock(folder, CLAIM_FILE, "experiment worker",
                            advice="Another worker runs it")
    try:
        return lock.acquire()
    except locks.FolderBusy:
        return None


def run_plan(runs: Sequence[Run], root: epath.Path, data_dir: Optional[str] = None,
             print_fn: Callable[[str], None] = print,
             extra: Optional[Callable[[Run], Sequence[str]]] = None,
             limit: Optional[int] = None, devices=None, workers: int = 1,
             poll_seconds: float = 15.0,
             max_wait: Optional[float] = None, execute_run: Optional[Callable] = None
             ) -> list[Optional[dict]]:
    """Runs the unfinished runs of `runs` (at most `limit` of them) on `devices`
    (default: all), each once its needs are finished, skipping runs another
    worker holds and waiting while others run what is left; returns every
    run's record (None for runs not finished). `workers` (how many share the
    experiment) only scales the ETA. `max_wait` (seconds, default none) bounds
    one wait for other workers: past it, a TimeoutError names the runs waited for.
    `execute_run` (default: `execute`) runs one run and returns its record; the
    tests give a stand-in that writes a record without training."""
    execute_run = execute_run or execute
    from rsjax import logging_utils

    root.mkdir(parents=True, exist_ok=True)
    records = [_finished(run, root, data_dir, extra) for run in runs]
    todo = sum(r is None for r in records)
    print_fn(f"{len(runs) - todo} of {len(runs)} runs already finished; {todo} to run.")
    spent, done, waiting_since = 0.0, 0, None
    while limit is None or done < limit:
        i, lock, busy = _next_run(runs, records, root, data_dir, extra)
        if lock is None:
            if not busy:
                break
            if waiting_since is None:
                print_fn(f"    waiting for other workers ({', '.join(busy)})")
                waiting_since = time.monotonic()
            elif max_wait is not None and time.monotonic() - waiting_since > max_wait:
                raise TimeoutError(f"waited {max_wait:.0f} s for other workers to finish "
                                   f"{', '.join(busy)} in {root}")
            time.sleep(poll_seconds)
            continue
        waiting_since = None
        left = sum(r is None for r in records)
        eta = logging_utils.format_duration(spent / done * left / max(workers, 1) if done else None)
        print_fn(f"[{len(runs) - left + 1}/{len(runs)}] {runs[i].name} ({runs[i].kind}) | "
                 f"ETA of the rest {eta}")
        try:
            records[i] = execute_run(runs[i], root, data_dir, extra, devices)
        finally:
            lock.release()
        spent += records[i]["seconds"]
        done += 1
        print_fn(f"    done in {logging_utils.format_duration(records[i]['seconds'])}")
    return records


def _finished(run: Run, root: epath.Path, data_dir, extra) -> Optional[dict]:
    """A run's record if it has finished (checked against the plan), else None."""
    record = load_finished(run, root)
    if record is not None:
        check_matches(run, record, run_config(run, root, data_dir, extra), root)
    return record


def _next_run(runs, records, root, data_dir, extra):
    """(index, claim, busy): the first unfinished run in plan order whose needs
    are finished and that no other worker holds, claimed; or (None, None, names of the runs
    other workers hold) when there is none. Records finished meanwhile by
    other workers are read in on the way."""
    finished = {run.name for run, r in zip(runs, records) if r is not None}
    busy = []
    # In plan order, so that tables fill one after another: an experiment run
    # in pieces has whole tables early (taking the long generator trainings
    # first would finish the workers together, but with no table until the end).
    for i, run in enumerate(runs):
        if records[i] is not None:
            continue
        records[i] = _finished(run, root, data_dir, extra)
        if records[i] is not None:
            finished.add(run.name)
            continue
        if not all(name in finished or (root / name / RUN_FILE).exists() for name in needs(run)):
            continue
        check_inputs(run, root)
        lock = claim(run, root)
        if lock is None:
            busy.append(run.name)
            continue
        records[i] = _finished(run, root, data_dir, extra)    # finished just before the claim
        if records[i] is not None:
            lock.release()
            finished.add(run.name)
            continue
        return i, lock, busy
    return None, None, busy
