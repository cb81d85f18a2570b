"""Benchmark the dataset build: in one process, and on Apache Beam's DirectRunner (JSON).

    rsjax scenes --out_dir work/bench_scenes --scenes 16 --size 1024
    rsjax bench build --scenes_dir work/bench_scenes --workers 0,1,2

Each build (the `manual` dataset over `--scenes_dir`, into a temporary
data_dir) runs in a fresh process whose memory, with its children's (Beam's
workers), is sampled every 0.1 s: `peak_mib` (all processes), `peak_main_mib`
(the building process) and `peak_worker_mib` (the largest worker). Every mode
builds one scene and then all of them: the difference gives `marginal
tiles/s`, the rate once the build runs, without the start-up that does not
grow with the data; `tiles_per_s` includes it. docs/scaling.md keeps the
figures seen.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

from rsjax import cli
from rsjax.errors import UserError

_CHILD = r"""
import dataclasses, json, sys, time
import tensorflow_datasets as tfds
from rsjax.tfds_builder.rs_multisource import rs_multisource_dataset_builder as rsm
scenes_dir, data_dir, tile_size, workers = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
config = dataclasses.replace(rsm.Builder.builder_configs["manual"], name="bench",
                             tile_size=tile_size, split_mode="random")
options = None
if workers:
    from apache_beam.options.pipeline_options import PipelineOptions
    options = PipelineOptions([f"--direct_num_workers={workers}",
                               "--direct_running_mode=multi_processing"])
builder = rsm.Builder(config=config, data_dir=data_dir)
started = time.perf_counter()
builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
    manual_dir=scenes_dir, beam_options=options))
seconds = time.perf_counter() - started
tiles = sum(s.num_examples for s in builder.info.splits.values())
print("RESULT " + json.dumps({"seconds": seconds, "tiles": tiles}))
"""


def _rss_by_pid(proc: psutil.Process) -> dict[int, int]:
    out = {}
    for p in [proc, *proc.children(recursive=True)]:
        try:
            out[p.pid] = p.memory_info().rss
        except psutil.Error:
            pass
    return out


def run_build(scenes_dir: str, tile_size: int, workers: int) -> dict:
    """One build in a fresh process: seconds, tiles, peak memory of the process tree."""
    with tempfile.TemporaryDirectory(prefix="rsjax_bench_build_") as data_dir:
        proc = subprocess.Popen([sys.executable, "-c", _CHILD, scenes_dir, data_dir,
                                 str(tile_size), str(workers)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        peak = 0
        peak_by_pid: dict[int, int] = {}
        done = threading.Event()

        def sample():
            nonlocal peak
            ps = psutil.Process(proc.pid)
            while not done.is_set():
                try:
                    rss = _rss_by_pid(ps)
                except psutil.Error:
                    break
                peak = max(peak, sum(rss.values()))
                for pid, value in rss.items():
                    peak_by_pid[pid] = max(peak_by_pid.get(pid, 0), value)
                time.sleep(0.1)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        out, err = proc.communicate()
        done.set()
        sampler.join()
    if proc.returncode != 0:
        raise RuntimeError(f"build with {workers} worker(s) failed:\n{err[-3000:]}")
    result = json.loads(next(line[7:] for line in out.splitlines() if line.startswith("RESULT ")))
    result["peak_mib"] = round(peak / 2**20, 1)
    result["peak_main_mib"] = round(peak_by_pid.pop(proc.pid, 0) / 2**20, 1)
    # The largest other process: a Beam SDK worker (what one Dataflow worker would hold).
    result["peak_worker_mib"] = round(max(peak_by_pid.values(), default=0) / 2**20, 1)
    return result


def _one_scene_dir(scenes_dir: Path, tmp: Path) -> str:
    """A folder with links to the first scene's files only."""
    from rsjax.data.contract import find_scenes

    first = find_scenes(scenes_dir)[0]
    for path in first.as_dict().values():
        if path is not None:
            (tmp / Path(path).name).symlink_to(Path(path).resolve())
    return str(tmp)


def add_arguments(parser) -> None:
    parser.add_argument("--scenes_dir", required=True,
                        help="folder of <scene>_{s2,s1,lulc,dem}.tif (e.g. written by "
                             "rsjax scenes)")
    parser.add_argument("--tile_size", type=int, default=256, help="tile side in pixels")
    # nargs="+": the old space-separated form (`--workers 0,1,2`) still parses, for one release.
    parser.add_argument("--workers", nargs="+", default=["0,1,2"],
                        help="DirectRunner worker counts to measure, comma-separated; 0 is the "
                             "build without Beam")


def worker_counts(values: list[str]) -> list[int]:
    """`--workers 0,1,2` as [0, 1, 2]; the old `--workers 0 1 2` too, with a note."""
    if len(values) > 1:
        cli.note_renamed(f"--workers {' '.join(values)}", f"--workers {','.join(values)}")
    try:
        return cli.nonnegative_int_list(",".join(values))
    except argparse.ArgumentTypeError as err:
        raise UserError(f"--workers {err}") from None


def run(args) -> int:
    scenes_dir = Path(args.scenes_dir)
    if not scenes_dir.is_dir():
        raise UserError(f"--scenes_dir {scenes_dir}: not a folder. Write scenes first: "
                        "rsjax scenes --out_dir DIR --scenes 16 --size 1024")
    results = {"scenes_dir": str(scenes_dir), "tile_size": args.tile_size,
               "cpu_count": psutil.cpu_count(), "runs": []}
    with tempfile.TemporaryDirectory(prefix="rsjax_one_scene_") as tmp:
        one = _one_scene_dir(scenes_dir, Path(tmp))
        for workers in worker_counts(args.workers):
            small = run_build(one, args.tile_size, workers)
            full = run_build(str(scenes_dir), args.tile_size, workers)
            marginal = ((full["tiles"] - small["tiles"]) / (full["seconds"] - small["seconds"])
                        if full["seconds"] > small["seconds"] else None)
            run_result = {
                "mode": "single process" if workers == 0 else f"DirectRunner, {workers} worker(s)",
                "tiles": full["tiles"], "seconds": round(full["seconds"], 1),
                "tiles_per_s": round(full["tiles"] / full["seconds"], 2),
                "marginal_tiles_per_s": round(marginal, 2) if marginal else None,
                "one_scene_seconds": round(small["seconds"], 1),
                "peak_mib": full["peak_mib"],
                "peak_main_mib": full["peak_main_mib"],
                "peak_worker_mib": full["peak_worker_mib"],
            }
            results["runs"].append(run_result)
            print(json.dumps(run_result), file=sys.stderr, flush=True)
    cli.print_json(results)
    return 0


main = cli.command_main(__name__)

if __name__ == "__main__":
    sys.exit(main())
