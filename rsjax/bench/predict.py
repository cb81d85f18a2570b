"""Benchmark of whole-scene prediction: a synthetic granule from GeoTIFFs to a COG.

    rsjax bench predict                                   # one Sentinel-2 granule, 10980 x 10980 px
    rsjax bench predict --sizes 2048,4096,10980 --out bench_predict.json
    rsjax bench predict --size 300 --tile_size 64             # seconds
    rsjax bench predict --size 2048 --config fusion:demo      # the demo's RS-SPADE widths

Per size, in a fresh child process (so its peak memory is its own): the wall
time of `rsjax.predict.predict_fusion` with the model loaded and compiled,
tiles/s, seconds per megapixel (wall and CPU), the peak resident memory
(goal: under 4 GiB at any size) and the shares of the time spent reading,
in the model, blending, writing, making the COG and elsewhere. The inputs are
simple smooth fields written window by window into `--out_dir` and reused;
the model is `--config`'s generator (default: the tests' tiny RS-SPADE) with
its initial weights, or a trained run with `--workdir`. docs/benchmarks.md
says what each share holds and keeps the figures seen.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Optional

from rsjax import cli, runtime
from rsjax.errors import RunFailed, UserError

GRANULE = 10980                    # a Sentinel-2 granule's side at 10 m
GOAL_PEAK_GIB = 4.0
PHASES = ("read", "model", "blend", "write", "cog")
DEFAULT_CONFIG = "fusion:demo"
# Without --config: the demo's RS-SPADE shrunk to the tests' tiny widths, so
# the figures are about the prediction path (reading, blending, writing) more
# than the model; `model_alone` says what the model costs, and --config
# fusion:demo (or a trained run, --workdir) times a bigger one.
TINY_OVERRIDES = ("generator.ngf=4", "generator.spade_hidden=8", "generator.embed_dim=4")


# ---------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------
def _status_mib(field: str) -> Optional[float]:
    """A memory line of /proc/self/status (VmHWM: the peak resident set), in MiB."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _ru_maxrss_mib() -> float:
    """getrusage's peak resident set (KiB on Linux, bytes on macOS), in MiB. It
    survives execve, so in a child it is at least what the parent held when it
    forked (`rsjax bench predict` keeps its parent small)."""
    scale = 1.0 if sys.platform != "darwin" else 1.0 / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 1024


class RssSampler:
    """The process's resident set (psutil) every `interval` seconds in a thread;
    `peak` is the largest sample, `mark()` starts a second peak from now."""

    def __init__(self, interval: float = 0.05):
        import psutil

        self._process = psutil.Process()
        self.interval = interval
        self.peak = self.since_mark = self.rss()
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="rss-sampler", daemon=True)

    def rss(self) -> int:
        return self._process.memory_info().rss

    def _loop(self) -> None:
        while not self._stop.is_set():
            rss = self.rss()
            self.peak = max(self.peak, rss)
            self.since_mark = max(self.since_mark, rss)
            self.samples += 1
            self._stop.wait(self.interval)

    def mark(self) -> None:
        self.since_mark = self.rss()

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        rss = self.rss()
        self.peak, self.since_mark = max(self.peak, rss), max(self.since_mark, rss)


# ---------------------------------------------------------------------------
# The child: one size, in its own process
# ---------------------------------------------------------------------------
def fixed_normalizer():
    """Normalization constants for the simple scene's units (no dataset is built:
    they move the values, not the work)."""
    import numpy as np

    from rsjax.input_pipeline import Normalizer

    return Normalizer(s2_low=np.full(4, 100.0, np.float32),
                      s2_high=np.array([2500.0, 2500.0, 3000.0, 5000.0], np.float32),
                      s1_low=np.array([-25.0, -32.0], np.float32),
                      s1_high=np.array([0.0, -8.0], np.float32),
                      elevation_mean=300.0, elevation_std=100.0)


def _model_config(spec: dict):
    from rsjax.config_loader import load_config

    overrides = list(spec["overrides"]) + [f"data.tile_size={spec['tile_size']}"]
    if spec.get("batch_size"):
        overrides.append(f"eval_batch_size={spec['batch_size']}")
    return load_config(spec["config"], overrides)


def build_model(spec: dict, work_dir: Path):
    """(LoadedModel, facts): the tiny model of `spec` with its initial weights, saved
    once as a step-0 checkpoint under work_dir (reused), restored as
    `rsjax predict` restores a run; or the trained run `spec['workdir']`."""
    import jax

    from rsjax import predict
    from rsjax.trainers import fusion

    if spec.get("workdir"):
        model = predict.load_model(spec["workdir"], data_dir=spec.get("data_dir"))
        return model, {"workdir": str(spec["workdir"]), "weights": "the run's latest checkpoint"}
    from rsjax import logging_utils
    from rsjax.config_loader import config_from_workdir
    from rsjax.trainers.checkpoints import Checkpointer

    config = _model_config(spec)
    key = hashlib.sha1(config.to_json(sort_keys=True).encode()).hexdigest()[:10]
    workdir = (work_dir / f"model_{key}").absolute()
    if not (workdir / "config.json").exists():
        setup = fusion.Setup(config, fusion.selected_sources(config))
        ckpt = Checkpointer(workdir, every_steps=1, keep=1, async_save=False)
        ckpt.save(0, setup.init_state(), None, force=True)
        ckpt.close()
        logging_utils.write_config(config, workdir)
    config = config_from_workdir(workdir)
    devices = jax.local_devices()
    inference = fusion.load_inference(config, str(workdir), None, devices=devices)
    model = predict.LoadedModel(str(workdir), config, fixed_normalizer(), inference, len(devices))
    return model, {"workdir": str(workdir), "weights": "initial (step-0 checkpoint, untrained)"}


def _example_batch(model, size: int):
    """A batch of model inputs of the right shapes, from a contract tile of no-data."""
    import numpy as np

    from rsjax import input_pipeline
    from rsjax.trainers import fusion

    tile = int(model.config.data.tile_size)
    sources = fusion.selected_sources(model.config)
    contract_tile = {"s2": np.zeros((tile, tile, 4), np.uint16),
                     "s1": np.full((tile, tile, 2), -15.0, np.float32),
                     "lulc": np.ones((tile, tile), np.uint8),
                     "dem": np.full((tile, tile, 4), 10.0, np.float32)}
    inputs = input_pipeline.normalize_tile(contract_tile, model.normalizer, sources)
    return {s: np.stack([inputs[s]] * size) for s in sources}


def count_parameters(tree) -> int:
    import jax
    import numpy as np

    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree) if hasattr(x, "shape")))


def check_cog(path: Path) -> dict:
    """What the output is, read back: a COG of the expected layout?"""
    import rasterio

    with rasterio.open(path) as ds:
        return {"bytes": path.stat().st_size, "width": ds.width, "height": ds.height,
                "count": ds.count, "dtype": ds.dtypes[0], "crs": ds.crs.to_string(),
                "layout": ds.tags(ns="IMAGE_STRUCTURE").get("LAYOUT"),
                "compression": ds.tags(ns="IMAGE_STRUCTURE").get("COMPRESSION"),
                "block": list(ds.block_shapes[0]), "overviews": ds.overviews(1)}


def child(spec: dict) -> dict:
    """Predicts one scene with the model of `spec`, timing and sampling memory."""
    started = time.perf_counter()
    rss_after_imports = _status_mib("VmRSS")
    from rsjax import predict

    runtime.prepare_process()
    work_dir = Path(spec["work_dir"])
    inputs = spec["inputs"]
    out = Path(spec["out"])
    with RssSampler(spec.get("sample_interval", 0.05)) as sampler:
        t = time.perf_counter()
        model, model_facts = build_model(spec, work_dir)
        load_s = time.perf_counter() - t
        generate, ckpt_step = model.inference
        batch_size = predict._batch_size(spec.get("batch_size"), model.config, model.num_devices)
        batch = _example_batch(model, batch_size)
        t = time.perf_counter()
        generate(batch).block_until_ready()            # compiles
        compile_s = time.perf_counter() - t
        rss_before_predict = sampler.rss()
        sampler.mark()

        timings: dict = {}
        load_at_start = os.getloadavg()[0]
        cpu = os.times()
        t = time.perf_counter()
        result = predict.predict_fusion(model.workdir, inputs["s1"], inputs["lulc"], inputs["dem"],
                                        out, overlap=spec.get("overlap"), batch_size=batch_size,
                                        progress=False, model=model, timings=timings)
        wall_s = time.perf_counter() - t
        cpu_end = os.times()
        cpu_s = (cpu_end.user - cpu.user) + (cpu_end.system - cpu.system)
        load_at_end = os.getloadavg()[0]
        peak_predict = sampler.since_mark

        # The generator alone on one batch, blocking: its compute, without the host's work beside it.
        alone = []
        for _ in range(int(spec.get("model_alone_batches", 3))):
            t = time.perf_counter()
            generate(batch).block_until_ready()
            alone.append(time.perf_counter() - t)
    import numpy as np

    from rsjax.trainers.fusion import selected_sources

    tiles = int(result["tiles"])
    batches = -(-tiles // batch_size)
    phases = {name: timings.get(name, 0.0) for name in PHASES}
    phases["other"] = max(wall_s - sum(phases.values()), 0.0)
    megapixels = result["width"] * result["height"] / 1e6
    per_batch = float(np.median(alone)) if alone else None
    config = model.config
    return {
        "size": int(spec["size"]), "width": result["width"], "height": result["height"],
        "megapixels": round(megapixels, 3), "tiles": tiles, "batches": batches,
        "tile_size": result["tile_size"], "overlap": result["overlap"], "batch_size": batch_size,
        "devices": model.num_devices,
        "wall_s": round(wall_s, 2), "tiles_per_s": round(tiles / wall_s, 2),
        "s_per_megapixel": round(wall_s / megapixels, 4),
        "ms_per_tile": round(1000 * wall_s / tiles, 2),
        # CPU seconds of this process (all its threads): what the work cost, less
        # sensitive than the wall time to other work on a shared machine; cores_busy
        # is how many cores the prediction had on average.
        "cpu_s": round(cpu_s, 2), "cpu_s_per_megapixel": round(cpu_s / megapixels, 4),
        "cores_busy": round(cpu_s / wall_s, 2),
        "loadavg_1min_at_start_end": [round(load_at_start, 2), round(load_at_end, 2)],
        "phases_s": {k: round(v, 2) for k, v in phases.items()},
        "phase_shares": {k: round(v / wall_s, 4) for k, v in phases.items()},
        "model_alone": {"s_per_batch": round(per_batch, 4) if per_batch else None,
                        "batches_timed": len(alone),
                        "s_for_all_batches": round(per_batch * batches, 2) if per_batch else None},
        "memory": {
            "peak_rss_mib": round(sampler.peak / 2**20, 1),
            "peak_rss_during_predict_mib": round(peak_predict / 2**20, 1),
            "rss_before_predict_mib": round(rss_before_predict / 2**20, 1),
            "rss_after_imports_mib": round(rss_after_imports, 1) if rss_after_imports else None,
            "vm_hwm_mib": _status_mib("VmHWM"),
            "ru_maxrss_mib": round(_ru_maxrss_mib(), 1),
            "samples": sampler.samples, "sample_interval_s": sampler.interval,
        },
        "model_load_s": round(load_s, 2), "compile_s": round(compile_s, 2),
        "process_s": round(time.perf_counter() - started, 2),
        "model": {**model_facts, "trainer": config.trainer, "generator": config.generator.to_dict(),
                  "sources": list(selected_sources(config)), "checkpoint_step": int(ckpt_step),
                  "generator_parameters": _generator_parameters(model)},
        "output": check_cog(out),
    }


def _generator_parameters(model) -> Optional[int]:
    """The generator's parameter count (shapes only, nothing computed)."""
    import jax

    from rsjax.trainers import fusion

    setup = fusion.Setup(model.config, fusion.selected_sources(model.config))
    return count_parameters(jax.eval_shape(setup.init_state)["ema"])


# ---------------------------------------------------------------------------
# The parent: inputs, one child per size, the report
# ---------------------------------------------------------------------------
def scene_inputs(work_dir: Path, size: int) -> tuple[dict, Optional[float]]:
    """The simple scene of side `size` ({s1, lulc, dem} paths), written window by
    window unless an earlier run left it complete; the seconds writing took (None: reused)."""
    from rsjax.bench.ingest import write_simple_scene

    folder = work_dir / f"inputs_{size}"
    marker = folder / "complete"
    scene_id = f"granule{size}"
    written = None
    if not marker.exists():
        t = time.perf_counter()
        write_simple_scene(folder, scene_id, size, seed=7)
        written = round(time.perf_counter() - t, 2)
        marker.write_text("written by rsjax bench predict\n")
    return {s: str(folder / f"{scene_id}_{s}.tif") for s in ("s1", "lulc", "dem")}, written


def run_child(spec: dict) -> dict:
    proc = subprocess.run([sys.executable, "-m", "rsjax.bench.predict", "--child", json.dumps(spec)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        raise RunFailed(f"prediction at {spec['size']} px failed (exit {proc.returncode}):\n{tail}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def linearity(results: list[dict]) -> dict:
    """Wall and CPU seconds per megapixel by size: the same at every size when
    time is linear in area (on a shared machine the CPU seconds say it better)."""
    out = {key: {str(r["size"]): r[key] for r in results}
           for key in ("s_per_megapixel", "cpu_s_per_megapixel", "ms_per_tile")}
    if len(results) > 1:
        small, large = min(results, key=lambda r: r["size"]), max(results, key=lambda r: r["size"])
        for key in ("s_per_megapixel", "cpu_s_per_megapixel"):
            out[f"largest_over_smallest_{key}"] = round(large[key] / small[key], 3)
    return out


def extrapolation(results: list[dict], size: int = GRANULE) -> Optional[dict]:
    """When no size reached a granule: its wall time at the largest size's seconds
    per megapixel (a linear extrapolation, not a measurement)."""
    largest = max(results, key=lambda r: r["size"])
    if largest["size"] >= size:
        return None
    return {"size": size, "from_size": largest["size"], "kind": "linear extrapolation in area, not measured",
            "wall_s": round(largest["s_per_megapixel"] * size * size / 1e6, 1)}


# Old option names, still taken for one release (see rsjax.cli.rename_options).
RENAMED_OPTIONS = {"--output": "--out", "--work_dir": "--out_dir"}


def add_arguments(parser) -> None:
    parser.add_argument("--size", type=cli.positive_int, default=GRANULE,
                        help="scene side in 10 m pixels (a Sentinel-2 granule is 10980)")
    parser.add_argument("--sizes", type=cli.int_list, default=None,
                        help="several scene sides, comma-separated, e.g. 2048,4096,10980 (instead of --size)")
    cli.add_config_argument(parser, required=False,
                            help=f"fusion config of the model (default: {DEFAULT_CONFIG} with "
                                 f"{', '.join(TINY_OVERRIDES)}); override fields with "
                                 "--config.KEY=VALUE, e.g. --config.generator.ngf=8")
    parser.add_argument("--tile_size", type=cli.positive_int, default=256,
                        help="the model's tile size (sets data.tile_size)")
    parser.add_argument("--overlap", type=cli.nonnegative_int, default=None,
                        help="tile overlap in pixels (default: a quarter tile, as rsjax predict)")
    parser.add_argument("--batch_size", type=cli.positive_int, default=None,
                        help="tiles per batch (default: the config's eval_batch_size)")
    parser.add_argument("--workdir", default=None,
                        help="a trained fusion run to time instead of the tiny model (its config "
                             "and tile size; --config and --tile_size do not apply)")
    parser.add_argument("--data_dir", default=None,
                        help="with --workdir: the TFDS data_dir of its dataset (default: the config's)")
    parser.add_argument("--out_dir", default="work/bench_predict",
                        help="where the inputs (reused), the model checkpoint and the outputs go")
    parser.add_argument("--model_alone_batches", type=cli.nonnegative_int, default=3,
                        help="batches to time the generator alone on, after the prediction")
    parser.add_argument("--out", default=None, help="also write the JSON to this file")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)


def run(args) -> int:
    if args.child is not None:
        print(json.dumps(child(json.loads(args.child))), flush=True)
        return 0
    if args.workdir and (args.config or args.config_overrides):
        raise UserError("--workdir times a trained run with its own config: leave out --config.")
    if args.data_dir and not args.workdir:
        raise UserError("--data_dir goes with --workdir (the tiny model needs no dataset).")
    if args.workdir and not Path(args.workdir).is_dir():
        raise UserError(f"{args.workdir}: workdir does not exist.")
    spec_name = args.config or DEFAULT_CONFIG
    overrides = ([] if args.config else list(TINY_OVERRIDES)) + list(args.config_overrides)
    if not args.workdir:
        from rsjax.config_loader import load_config

        config = load_config(spec_name, overrides)                  # a bad key is a UserError here
        if config.get("trainer") != "fusion" or "s2_cloudy" in tuple(config.data.get("sources", ())):
            raise UserError(f"--config {spec_name}: bench_predict times a fusion model "
                            "(S1, land cover, DEM -> S2); choose a fusion config.")
    sizes = args.sizes or [args.size]
    if min(sizes) < 16:
        raise UserError(f"--sizes {min(sizes)}: scenes need at least 16 pixels a side.")
    work_dir = Path(args.out_dir).absolute()
    work_dir.mkdir(parents=True, exist_ok=True)
    report = {
        "arguments": {"sizes": sizes, "config": None if args.workdir else spec_name,
                      "config_overrides": [] if args.workdir else overrides,
                      "tile_size": None if args.workdir else args.tile_size,
                      "overlap": args.overlap, "batch_size": args.batch_size,
                      "workdir": args.workdir},
        "machine": {**runtime.host(),
                    "loadavg_1_5_15_min_at_start": [round(x, 2) for x in os.getloadavg()]},
        "inputs": "rsjax.data.bench_ingest.write_simple_scene, written window by window: S1 "
                  "(linear VV, VH) in UTM 31N on a grid shifted by a fraction of a pixel, labels "
                  "on the S2 grid, a DEM in EPSG:4326 at 1 arc-second with voids; smooth simple "
                  "fields, not the physical synthetic generator",
        "goal": {"peak_rss_gib_below": GOAL_PEAK_GIB, "time": "linear in area"},
        "results": [],
    }
    for size in sizes:
        inputs, written_s = scene_inputs(work_dir, size)
        spec = {"size": size, "work_dir": str(work_dir), "inputs": inputs,
                "out": str(work_dir / f"out_{size}" / f"granule{size}_synthetic_s2.tif"),
                "config": spec_name, "overrides": overrides,
                "tile_size": args.tile_size, "overlap": args.overlap, "batch_size": args.batch_size,
                "workdir": args.workdir, "data_dir": args.data_dir,
                "model_alone_batches": args.model_alone_batches}
        print(f"bench_predict: {size} x {size} px ...", file=sys.stderr, flush=True)
        result = run_child(spec)
        result["inputs_write_s"] = written_s
        report["model"] = result.pop("model")
        report["results"].append(result)
        print(f"bench_predict: {size} x {size} px: {result['wall_s']} s, {result['tiles_per_s']} "
              f"tiles/s, peak {result['memory']['peak_rss_mib']} MiB", file=sys.stderr, flush=True)
        summarize(report, complete=len(report["results"]) == len(sizes))
        if args.out:           # after every size: a long run stopped early keeps what it measured
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    cli.print_json(report)
    return 0


def summarize(report: dict, complete: bool) -> None:
    """The figures over the sizes measured so far."""
    results = report["results"]
    report["complete"] = complete
    report["linearity"] = linearity(results)
    report.pop("granule_extrapolated", None)
    extra = extrapolation(results)
    if extra is not None:
        report["granule_extrapolated"] = extra
    peak = max(max(r["memory"]["peak_rss_mib"], r["memory"]["vm_hwm_mib"] or 0) for r in results)
    report["peak_rss_gib_max"] = round(peak / 1024, 3)
    report["under_memory_goal"] = peak / 1024 < GOAL_PEAK_GIB
    report["machine"]["loadavg_1_5_15_min_at_end"] = [round(x, 2) for x in os.getloadavg()]
    report["machine"]["date_utc_end"] = time.strftime("%Y-%m-%d %H:%M", time.gmtime())


main = cli.command_main(__name__)

if __name__ == "__main__":
    sys.exit(main())
