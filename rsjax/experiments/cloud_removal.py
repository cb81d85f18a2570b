"""Cloud removal on the cloudy synthetic scenes, as SEN12MS-CR papers report it.

    rsjax experiments cloud_removal --scale demo --workdir work/clouds_demo --run
    rsjax experiments cloud_removal --scale bench --workdir work/clouds_bench --seeds 2 --run
    rsjax experiments cloud_removal --scale bench --workdir work/clouds_bench   # report only

Beyond the paper: the clear image under the clouds, from SAR (the peers'
input) and, unlike the peers, terrain and land cover. Every method (the
cloudy input itself, RS-SPADE with and without the cloudy image and as a
composite, DSen2-CR, UnCRtainTS with its uncertainty, the flow model) trains
on the scale's cloudy dataset and is scored on the same test tiles by
region and cloud-cover bin (rsjax.cloud_metrics). Each run has its folder
`<workdir>/<method>/seed<k>` and resumes; the workdir gets `cloud_removal.md`
and `.json` (mean and 95 % interval over seeds, the peers' published numbers
beside them) and `grids/cloud_removal_seed0.png`. docs/cloud_removal.md
describes every method and metric.
"""
from __future__ import annotations

import dataclasses
import json
import math
import sys
from typing import Mapping, Optional, Sequence

import numpy as np
from etils import epath

from rsjax import cli
from rsjax import cloud_metrics as cm
from rsjax.errors import UserError
from rsjax.experiments import arguments, runner, stats, workers
from rsjax.experiments.plan import Run, seed_overrides

SCALES = ("demo", "bench")
SEEDS = {"demo": 1, "bench": 2}
RESULTS_FILE = "eval_test_clouds.npz"

# Published on SEN12MS-CR's test split (real Sentinel-1/2 pairs, 13 bands,
# 256 px): measured on other data, for orientation only. (PSNR dB, SSIM, SAM deg.)
PEERS = (
    ("DSen2-CR (Meraner et al. 2020)", "S2 cloudy + S1", ("27.8-29.3", "0.874-0.878", "8.1-9.5")),
    ("GLF-CR (Xu et al. 2022)", "S2 cloudy + S1", ("28.64", "0.885", "8.98")),
    ("UnCRtainTS (Ebel et al. 2023)", "S2 cloudy + S1", ("28.90", "0.880", "8.32")),
    ("diffusion models (DiffCR, EMRDM, ECRformer)", "S2 cloudy + S1", ("31.8-33.4", "", "")),
)
COLUMNS = (("mae", "MAE", "{:.4f}"), ("rmse", "RMSE", "{:.4f}"), ("psnr", "PSNR (dB)", "{:.2f}"),
           ("ssim", "SSIM", "{:.3f}"), ("sam_deg", "SAM (deg)", "{:.2f}"))
SHORT = (("psnr", "{:.2f}"), ("ssim", "{:.3f}"), ("sam_deg", "{:.2f}"))
REGION_TITLES = {"all": "whole tile", "cloud": "under cloud", "shadow": "under shadow",
                 "clear": "clear part"}


def cell(runs: Sequence[Mapping[str, np.ndarray]], metric: str, region: str = "all",
         cover_bin: Optional[int] = None) -> stats.Interval:
    """Mean over seeds of the split-level metric, from each seed's per-image parts."""
    fn = cm.split_metric(metric, region, cover_bin)
    return stats.seed_interval([fn(parts) for parts in runs])


def _format(interval: stats.Interval, fmt: str) -> str:
    if not math.isfinite(interval.mean):
        return "—"
    text = fmt.format(interval.mean)
    if interval.n_seeds > 1 and math.isfinite(interval.half_width):
        text += " ± " + fmt.format(interval.half_width)
    return text


def _count(runs, region: str = "all", cover_bin: Optional[int] = None) -> int:
    parts = runs[0]
    r = cm.REGIONS.index(region)
    images = np.asarray(parts["n_pixels"])[:, r] > 0
    if cover_bin is not None:
        images &= cm.cover_bin_index(parts["cover"]) == cover_bin
    return int(images.sum())


def whole_tile_table(results: Mapping[str, dict]) -> str:
    """Every method on the whole tile, then the peers' published numbers.

    results: {method key: {"label", "inputs", "runs": [per-image parts, one per seed]}}.
    """
    head = "| method | inputs | " + " | ".join(t for _, t, _ in COLUMNS) + " |"
    lines = [head, "|---|---|" + "---:|" * len(COLUMNS)]
    for entry in results.values():
        cells = [_format(cell(entry["runs"], m), f) for m, _, f in COLUMNS]
        lines.append(f"| {entry['label']} | {entry['inputs']} | " + " | ".join(cells) + " |")
    for label, inputs, (psnr, ssim, sam) in PEERS:
        lines.append(f"| *{label}: published, other data* | {inputs} | — | — | "
                     f"{psnr or '—'} | {ssim or '—'} | {sam or '—'} |")
    return "\n".join(lines)


def region_table(results: Mapping[str, dict]) -> str:
    """PSNR / SSIM / SAM of every method in each region (images counted per region)."""
    head = "| method | " + " | ".join(REGION_TITLES[r] for r in cm.REGIONS) + " |"
    lines = [head, "|---|" + "---:|" * len(cm.REGIONS)]
    for entry in results.values():
        cells = [" / ".join(_format(cell(entry["runs"], m, r), f) for m, f in SHORT)
                 for r in cm.REGIONS]
        lines.append(f"| {entry['label']} | " + " | ".join(cells) + " |")
    first = next(iter(results.values()))["runs"]
    lines.append("| tiles | " + " | ".join(str(_count(first, r)) for r in cm.REGIONS) + " |")
    return "\n".join(lines)


def cover_table(results: Mapping[str, dict], region: str = "all") -> str:
    """PSNR / SSIM / SAM of every method by cloud-cover bin (in one region)."""
    labels = [cm.bin_label(*b) for b in cm.COVER_BINS]
    lines = ["| method | " + " | ".join(labels) + " |", "|---|" + "---:|" * len(labels)]
    for entry in results.values():
        cells = [" / ".join(_format(cell(entry["runs"], m, region, i), f) for m, f in SHORT)
                 for i in range(len(labels))]
        lines.append(f"| {entry['label']} | " + " | ".join(cells) + " |")
    first = next(iter(results.values()))["runs"]
    lines.append("| tiles | " + " | ".join(str(_count(first, region, i))
                                           for i in range(len(labels))) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# The runs
# ---------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Method:
    key: str                 # folder name
    label: str               # table row
    inputs: str              # what it takes, in words
    config: str              # config name and arguments, with {scale}
    composite: bool = False  # also report the cloudy input with its image under the mask


METHODS = (
    Method("rs_spade_no_cloudy", "RS-SPADE, paper's sources", "S1 + DEM + LULC",
           "fusion:{scale},model=rs_spade,sources=all,clouds", composite=True),
    Method("rs_spade_s1", "RS-SPADE", "S2 cloudy + S1",
           "fusion:{scale},model=rs_spade,sources=s2_cloudy+s1", composite=True),
    Method("rs_spade_all", "RS-SPADE", "S2 cloudy + S1 + DEM + LULC",
           "fusion:{scale},model=rs_spade,sources=s2_cloudy+s1+dem+lulc", composite=True),
    Method("dsen2cr", "DSen2-CR", "S2 cloudy + S1", "cloud_removal:{scale},sources=s2_cloudy+s1"),
    Method("dsen2cr_all", "DSen2-CR", "S2 cloudy + S1 + DEM + LULC",
           "cloud_removal:{scale},sources=s2_cloudy+s1+dem+lulc"),
    Method("uncrtaints", "UnCRtainTS", "S2 cloudy + S1",
           "cloud_removal:{scale},model=uncrtaints,sources=s2_cloudy+s1"),
    Method("flow_all", "flow model", "S2 cloudy + S1 + DEM + LULC",
           "fusion:{scale},model=flow,sources=s2_cloudy+s1+dem+lulc"),
)
UNCERTAINTY_FILE = "eval_test_uncertainty.npz"
UNCERTAINTY_COLUMNS = (("nll", "NLL", "{:.3f}"), ("uce", "UCE", "{:.4f}"), ("auce", "AUCE", "{:.4f}"),
                       ("rmse", "RMSE", "{:.4f}"), ("rmv", "RMV", "{:.4f}"),
                       ("spearman_variance_error", "Spearman (variance, error)", "{:.2f}"))
RUN_FILE = runner.RUN_FILE


def method_run(method: Method, scale: str, seed: int, steps: int = 0) -> Run:
    """One method's run at one seed, as the experiments' runner runs it (in
    `<workdir>/<method>/seed<k>`; `steps`: another length, the learning rates
    decaying over its second half as at the scale's own length)."""
    spec = method.config.format(scale=scale) + (f",steps={steps}" if steps else "")
    return Run(name=f"{method.key}/seed{seed}", kind="cloud_removal", config=spec,
               overrides=seed_overrides(seed), table="cloud_removal", method=method.key, seed=seed)


def method_config(method: Method, scale: str, seed: int, data_dir: Optional[str] = None,
                  steps: int = 0):
    """The locked config of one run."""
    return runner.run_config(method_run(method, scale, seed, steps), epath.Path("."), data_dir)


def load_parts(root: epath.Path, method: Method, seed: int) -> dict:
    from rsjax.trainers import cloud_eval

    return cloud_eval.load_parts(root / method.key / f"seed{seed}" / RESULTS_FILE)


def collect(root: epath.Path, methods: Sequence[Method], seeds: int) -> dict:
    """The table rows: {row key: {"label", "inputs", "runs": [parts per seed]}}."""
    rows: dict = {}
    finished = {m.key: [s for s in range(seeds)
                        if (root / m.key / f"seed{s}" / RESULTS_FILE).exists()] for m in methods}
    first = next(((m, s[0]) for m in methods for s in [finished[m.key]] if s), None)
    if first is None:
        return rows
    rows["cloudy_input"] = {"label": "cloudy input (no removal)", "inputs": "—",
                            "runs": [load_parts(root, *first)["cloudy_input"]], "seeds": None,
                            "scenes": load_scenes(root, *first)}
    for m in methods:
        if not finished[m.key]:
            continue
        runs = [load_parts(root, m, s) for s in finished[m.key]]
        common = {"seeds": finished[m.key], "scenes": load_scenes(root, m, finished[m.key][0])}
        rows[m.key] = {"label": m.label, "inputs": m.inputs, "runs": [r["output"] for r in runs],
                       **common}
        if m.composite:
            rows[f"{m.key}_composite"] = {
                "label": f"{m.label}, under the mask only", "inputs": m.inputs + " (+ mask)",
                "runs": [r["composite"] for r in runs], **common}
    return rows


def load_scenes(root: epath.Path, method: Method, seed: int) -> Optional[np.ndarray]:
    """The scene of each test image of a run (None for runs recorded before it was kept)."""
    path = root / method.key / f"seed{seed}" / runner.SCENES_FILE
    if not path.exists():
        return None
    with path.open("rb") as f, np.load(f) as z:
        return np.asarray(z["scene_id"])


# ---------------------------------------------------------------------------
# Claims: paired differences over seeds and test scenes, as for Tables 1-3
# ---------------------------------------------------------------------------
CLAIM_METRICS = (("psnr", "PSNR (dB)", True), ("ssim", "SSIM", True), ("sam_deg", "SAM (deg)", False))
CLAIM_REGIONS = ("cloud", "shadow", "clear")
# (A, B, what "A beats B" says); and every row against the cloudy input (claims()).
CLAIM_PAIRS = (
    ("rs_spade_s1", "dsen2cr", "RS-SPADE beats DSen2-CR on the peers' inputs (S2 cloudy + S1)"),
    ("rs_spade_all", "dsen2cr_all", "RS-SPADE beats DSen2-CR on all four sources"),
    ("rs_spade_all", "rs_spade_s1", "terrain and land cover help RS-SPADE"),
    ("dsen2cr_all", "dsen2cr", "terrain and land cover help DSen2-CR"),
)


def claim(rows: Mapping[str, dict], a: str, b: str, metric: str, region: str, higher: bool,
          text: str) -> dict:
    """One claim row: A beats B on `metric` in `region`, from the paired
    difference over the seeds both ran (the cloudy input pairs with every seed)
    and the test images, their scenes resampled where the runs name them."""
    row = {"claim": text, "a": a, "b": b, "region": region, "metric": metric}
    if a not in rows or b not in rows:
        return {**row, "seeds": [], "difference": None, "verdict": "not run"}
    ea, eb = rows[a], rows[b]
    seeds = ea["seeds"] if eb["seeds"] is None else sorted(set(ea["seeds"]) & set(eb["seeds"]))
    if not seeds:
        return {**row, "seeds": [], "difference": None, "verdict": "not run"}
    a_runs = [ea["runs"][ea["seeds"].index(s)] for s in seeds]
    b_runs = (eb["runs"] * len(seeds) if eb["seeds"] is None
              else [eb["runs"][eb["seeds"].index(s)] for s in seeds])
    # The cloudy input's row may name none; A's scenes then stand for both.
    scenes = stats.shared_scenes([ea["scenes"]] + [eb["scenes"]] * (eb["scenes"] is not None),
                                 len(np.asarray(a_runs[0]["cover"])))
    # Each run's per-image values, computed once; the bootstrap averages them.
    def values(runs):
        return [{"value": cm.per_image_metric(p, metric, region)} for p in runs]

    iv = stats.paired_difference(values(a_runs), values(b_runs), _mean_of_counted, clusters=scenes)
    row.update(seeds=list(seeds), difference=iv.as_dict(), **stats.judge(iv, higher),
               interval=stats.TILE_BOOTSTRAP if scenes is None else stats.SCENE_BOOTSTRAP)
    return row


def _mean_of_counted(parts: Mapping[str, np.ndarray]) -> float:
    """The split metric of per-image values (NaN: the image lacks the region)."""
    v = parts["value"]
    counted = v[np.isfinite(v)]
    return float(counted.mean()) if counted.size else math.nan


def claims(rows: Mapping[str, dict]) -> list[dict]:
    """Every claim of the experiment: the method pairs of CLAIM_PAIRS, and each
    row against the cloudy input, under cloud, under shadow and where clear,
    on PSNR, SSIM and SAM."""
    pairs = list(CLAIM_PAIRS) + [(key, "cloudy_input", f"{e['label']} ({e['inputs']}) improves "
                                  "on the cloudy input") for key, e in rows.items()
                                 if key != "cloudy_input"]
    return [claim(rows, a, b, metric, region, higher, text)
            for a, b, text in pairs for region in CLAIM_REGIONS
            for metric, _, higher in CLAIM_METRICS]


def claims_table(rows: Sequence[dict]) -> str:
    labels = {m: label for m, label, _ in CLAIM_METRICS}
    lines = ["| claim | region | metric | A - B [95 % interval] | seeds | verdict | seeds to resolve |",
             "|---|---|---|---:|---:|---|---:|"]
    for r in rows:
        d = r["difference"]
        cell = ("—" if d is None else f"{d['mean']:+.4g}" if not np.isfinite(d["low"])
                else f"{d['mean']:+.4g} [{d['low']:+.4g}, {d['high']:+.4g}]")
        lines.append(f"| {r['claim']} | {r['region']} | {labels[r['metric']]} | {cell} | "
                     f"{len(r['seeds'])} | {r['verdict']} | {stats.resolve_note(r)} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# The grid: the same test tiles through every method
# ---------------------------------------------------------------------------
def pick_tiles(covers: np.ndarray, per_bin: int = 2) -> list[int]:
    """Test tiles to show: up to `per_bin` of each cover bin, in bin order."""
    index = cm.cover_bin_index(covers)
    chosen = []
    for b in range(len(cm.COVER_BINS)):
        chosen += list(np.flatnonzero(index == b)[:per_bin])
    return [int(i) for i in chosen]


def write_grid(root: epath.Path, methods: Sequence[Method], scale: str, seed: int,
               data_dir: Optional[str] = None, steps: int = 0) -> Optional[str]:
    """grids/cloud_removal_seed<k>.png: cloudy input, each finished method's
    image, the clear truth and the mask, on test tiles of every cover bin."""
    from rsjax import input_pipeline, viz
    from rsjax.trainers import cloud_eval, trainer_module

    done = [m for m in methods if (root / m.key / f"seed{seed}" / RESULTS_FILE).exists()]
    if not done:
        return None
    data_cfg = method_config(done[0], scale, seed, data_dir, steps).data
    builder = input_pipeline.get_builder(data_cfg)
    source = builder.as_data_source(split="test")
    normalizer = input_pipeline.Normalizer.from_statistics(input_pipeline.load_statistics(builder))
    covers = np.array([float(source[i]["cloud_cover"]) for i in range(len(source))])
    chosen = pick_tiles(covers)
    if not chosen:
        return None
    tiles = [input_pipeline.normalize_tile(
        {k: source[i][k] for k in ("s2", "s1", "lulc", "dem", "s2_cloudy", "cloud_mask")},
        normalizer, ("lulc", "s1", "dem", "s2_cloudy")) for i in chosen]
    batch = {k: np.stack([t[k] for t in tiles]) for k in tiles[0]}
    rows = {"cloudy": batch["s2_cloudy"]}
    for m in done:
        config = method_config(m, scale, seed, data_dir, steps)
        fn, _ = trainer_module(config.trainer).load_inference(
            config, str(root / m.key / f"seed{seed}"), devices=_one_device())
        # [..., :4]: the image, without the variance bands a model may add (UnCRtainTS).
        rows[f"{m.label} ({m.inputs})"] = np.asarray(fn(batch))[..., :batch["image"].shape[-1]]
    rows["clear truth"] = batch["image"]
    rows["cloud mask"] = batch["cloud_mask"]
    path = root / "grids" / f"cloud_removal_seed{seed}.png"
    viz.image_grid(rows, path, label_width=190, column_titles=[
        f"cover {100 * covers[i]:.0f}%" for i in chosen], **cloud_eval.grid_options(rows))
    return str(path)


def _one_device():
    import jax

    return jax.local_devices()[:1]


# ---------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------
def uncertainty_rows(root: epath.Path, methods: Sequence[Method], seeds: int) -> dict:
    """{method key: {"label", "inputs", "cells": {metric: Interval over seeds}}} of
    the finished runs that scored a predicted variance (UnCRtainTS)."""
    from rsjax import uncertainty_metrics

    out = {}
    for m in methods:
        paths = [root / m.key / f"seed{s}" / UNCERTAINTY_FILE for s in range(seeds)]
        tables = []
        for path in filter(lambda p: p.exists(), paths):
            with path.open("rb") as f, np.load(f) as z:
                tables.append(uncertainty_metrics.uncertainty_scores(dict(z)))
        if tables:
            out[m.key] = {"label": m.label, "inputs": m.inputs, "cells": {
                k: stats.seed_interval([float("nan") if t[k] is None else t[k] for t in tables])
                for k, _, _ in UNCERTAINTY_COLUMNS}}
    return out


def uncertainty_table(rows: Mapping[str, dict]) -> str:
    lines = ["| method | inputs | " + " | ".join(t for _, t, _ in UNCERTAINTY_COLUMNS) + " |",
             "|---|---|" + "---:|" * len(UNCERTAINTY_COLUMNS)]
    for entry in rows.values():
        lines.append(f"| {entry['label']} | {entry['inputs']} | " + " | ".join(
            _format(entry["cells"][k], f) for k, _, f in UNCERTAINTY_COLUMNS) + " |")
    return "\n".join(lines)


def report_markdown(rows: Mapping[str, dict], scale: str, records: Sequence[dict],
                    grid: Optional[str], uncertainty: Optional[Mapping[str, dict]] = None,
                    claim_rows: Optional[Sequence[dict]] = None) -> str:
    first = next(iter(rows.values()))["runs"][0]
    n = len(np.asarray(first["cover"]))
    seeds = max(len(r["runs"]) for r in rows.values())
    lines = [f"## Cloud removal, {scale} scale ({n} test tiles, {seeds} seed(s))", "",
             "Reflectance mapped to [0, 1] by the train split's 1st..99th percentiles; per-image "
             "metrics averaged over the test tiles (rsjax.cloud_metrics). "
             + ("Cells: mean ± 95 % interval over seeds. " if seeds > 1 else "")
             + "The published rows were measured on SEN12MS-CR (real Sentinel-1/2, 13 bands, "
               "256 px tiles): other data, for orientation only.", "",
             "### Whole tile", "", whole_tile_table(rows), "",
             "### By region (PSNR / SSIM / SAM deg)", "", region_table(rows), "",
             "### By cloud cover, whole tile (PSNR / SSIM / SAM deg)", "", cover_table(rows), "",
             "### By cloud cover, under cloud (PSNR / SSIM / SAM deg)", "",
             cover_table(rows, region="cloud"), ""]
    if uncertainty:
        lines += ["### Predicted uncertainty, whole tile", "",
                  "Per test image: its MSE against its mean predicted variance, both in the "
                  "metrics' [0, 1] space; UCE and AUCE over 20 variance bins, RMSE against "
                  "RMV (root mean variance); NLL per pixel and band (rsjax.uncertainty_metrics).",
                  "", uncertainty_table(uncertainty), ""]
    if claim_rows:
        methods = sorted({r["interval"] for r in claim_rows if r.get("interval")})
        lines += ["### Claims", "",
                  "A beats B: the paired difference A - B of the per-image metric in the region, "
                  "over the seeds both ran and the test images (" + "; ".join(methods) + "); "
                  "'holds' when the whole 95 % interval is on A's side, 'reversed' when it is "
                  "all on B's (lower SAM is better). A region a test image lacks does not count "
                  "for it.", "", claims_table(claim_rows), ""]
    lines += ["### Runs", "",
             "| run | steps | wall time (all attempts) | CPU time |", "|---|---:|---:|---:|"]
    for r in records:
        lines.append(f"| {r['method']}/seed{r['seed']} | {r['step']} | {r['seconds']:.0f} s{runner.wall_note(r)} | "
                     f"{r.get('cpu_seconds', float('nan')):.0f} s{runner.cpu_note(r)} |")
    from rsjax import provenance
    lines += provenance.difference_lines(provenance.differences(list(records)))
    if grid:
        lines += ["", f"Grid: `{grid}`."]
    return "\n".join(lines) + "\n"


def report_json(rows: Mapping[str, dict]) -> dict:
    out = {}
    for key, entry in rows.items():
        cells = {}
        for region in cm.REGIONS:
            for metric in cm.METRICS:
                cells[f"{region}/{metric}"] = cell(entry["runs"], metric, region).as_dict()
                for b, (low, high) in enumerate(cm.COVER_BINS):
                    cells[f"{region}/{cm.bin_label(low, high)}/{metric}"] = cell(
                        entry["runs"], metric, region, b).as_dict()
        out[key] = {"label": entry["label"], "inputs": entry["inputs"], "cells": cells}
    return {"ours": out, "published_other_data": [
        {"method": label, "inputs": inputs, "psnr": p, "ssim": s_, "sam_deg": a}
        for label, inputs, (p, s_, a) in PEERS]}


def _run(args, runs: Sequence[Run], root: epath.Path, tag: str = "") -> list[dict]:
    """Every run of `runs` finished, by rsjax.experiments.runner as Tables 1-3
    are (resumed run by run, claimed when several workers share the workdir)."""
    from rsjax.runtime import prepare_process

    prepare_process()
    return runner.run_plan(runs, root, args.data_dir, workers=args.workers,
                           print_fn=lambda line: print(tag + line, flush=True))


def _worker_command(args, root: epath.Path) -> list[str]:
    command = [sys.executable, "-m", "rsjax.experiments.cloud_removal", "--scale", args.scale,
               "--workdir", str(root), "--only", ",".join(args.only),
               "--steps", str(args.steps), "--workers", str(args.workers)]
    command += ["--seeds", str(args.seeds)] if args.seeds is not None else []
    return command + (["--data_dir", args.data_dir] if args.data_dir else [])


# Old option names, still taken for one release (see rsjax.cli.rename_options):
# reading is now the default, and --run trains.
RENAMED_OPTIONS = {"--no_run": None}


def add_arguments(parser) -> None:
    arguments.add_experiment_arguments(parser, SCALES, SEEDS)
    parser.add_argument("--only", type=cli.name_list(tuple(m.key for m in METHODS)),
                        default=",".join(m.key for m in METHODS),
                        help="comma-separated methods to run, of " + ",".join(m.key for m in METHODS))
    parser.add_argument("--steps", type=cli.nonnegative_int, default=0,
                        help="every run's length (0: the scale's)")
    arguments.add_run_arguments(parser)

def run(args) -> int:
    seeds = args.seeds or SEEDS[args.scale]
    methods = [m for m in METHODS if m.key in args.only]
    for m in methods:                      # every config loads before anything starts
        method_config(m, args.scale, 0, args.data_dir, args.steps)
    root = epath.Path(args.workdir).resolve() if "://" not in args.workdir else epath.Path(args.workdir)
    records = []
    runs = [method_run(m, args.scale, s, args.steps) for s in range(seeds) for m in methods]
    if args.worker_cpus is not None:          # one of --workers' processes: run, no report
        workers.become_worker(args.worker_cpus)
        _run(args, runs, root, f"[cores {args.worker_cpus}] ")
        return 0
    if args.run and args.workers > 1:
        workers.build_datasets(method_config(m, args.scale, 0, args.data_dir, args.steps).data
                               for m in methods)
        workers.run_workers(_worker_command(args, root), args.workers, str(root))
    if args.run:
        records = _run(args, runs, root)       # with --workers: every run finished, read in
    elif not root.exists():
        raise UserError(f"{args.workdir}: no such experiment folder; add --run to train its "
                        f"{len(runs)} runs.")
    else:
        records = [r for r in (runner.load_finished(run, root) for run in runs) if r is not None]
        if len(records) < len(runs):
            print(f"note: {len(runs) - len(records)} of {len(runs)} runs have not finished; add "
                  "--run to train them.", file=sys.stderr)
    rows = collect(root, methods, seeds)
    if not rows:
        raise UserError(f"{args.workdir}: no finished run to report on.")
    grid = write_grid(root, methods, args.scale, 0, args.data_dir, args.steps)
    uncertainty = uncertainty_rows(root, methods, seeds)
    claim_rows = claims(rows)
    text = report_markdown(rows, args.scale, records, grid, uncertainty, claim_rows)
    (root / "cloud_removal.md").write_text(text)
    (root / "cloud_removal.json").write_text(json.dumps(
        {"scale": args.scale, "seeds": seeds, "runs": records, **report_json(rows),
         "claims": claim_rows,
         "uncertainty": {k: {"label": e["label"], "inputs": e["inputs"],
                             "cells": {m: c.as_dict() for m, c in e["cells"].items()}}
                         for k, e in uncertainty.items()}}, indent=1, default=float))
    print(text)
    cli.print_json({"report": str(root / "cloud_removal.md"), "json": str(root / "cloud_removal.json"),
                    "grid": grid})
    return 0


main = cli.command_main(__name__)

if __name__ == "__main__":
    sys.exit(main())
