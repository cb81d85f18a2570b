"""The paper's experiments at one scale, with seeds, intervals and verdicts, in one command.

    rsjax experiments report --scale demo  --workdir work/exp_demo --run   # minutes, 1 seed
    rsjax experiments report --scale bench --workdir work/exp_bench --run  # hours on 2 cores, 3 seeds
    rsjax experiments report --scale paper --workdir work/exp_paper --run  # the paper's setting (GPU)
    rsjax experiments report --scale bench --workdir work/exp_bench        # report what has finished

With `--run`, trains every run of the scale's plan that has not finished
(resuming an interrupted one from its checkpoint); then writes into the
workdir report.md and report.json (Tables 1-3, each cell the mean over seeds
with a 95 % interval beside the paper's number; each claim's verdict, holds,
reversed or not resolved, from the interval of its paired difference; every
run's wall time), figure8.png (validation mIoU over training) and grids of
each method's best and worst test tiles. Without `--run` it reports what has
finished and says what has not. docs/experiments.md describes the protocol.
"""
from __future__ import annotations

import json
import math
import os
import sys
from typing import Optional

import numpy as np
from etils import epath

from rsjax import cli
from rsjax.runtime import host
from rsjax.experiments import plan as plan_lib
from rsjax.experiments import arguments, runner, stats, workers

PAPER_TABLE1 = {"pix2pix": (18.84, 0.62, 0.23), "rs_spade": (23.14, 0.84, 0.19)}
PAPER_TABLE2 = {"s1": (18.83, 0.76, 0.25), "lulc": (20.77, 0.80, 0.21),
                "lulc_s1": (21.10, 0.80, 0.22), "lulc_dem": (21.36, 0.81, 0.21),
                "s1_dem": (21.89, 0.82, 0.20), "all": (23.14, 0.84, 0.19)}
PAPER_TABLE3 = {"real": (0.467, 0.734), "mix_1": (0.480, 0.746)}

LABELS = {"pix2pix": "pix2pix", "rs_spade": "RS-SPADE", "rs_spade_l1": "RS-SPADE + L1",
          "s1": "S1", "lulc": "LULC", "lulc_s1": "LULC+S1", "lulc_dem": "LULC+DEM",
          "s1_dem": "S1+DEM", "all": "S1+LULC+DEM", "real": "True Data (real only)",
          "mix_0.5": "Mix 0.5:1", "mix_1": "Mix 1:1 (the paper's)", "mix_2": "Mix 2:1",
          "real_optical_half": "real, optical half only",
          "new_layouts": "optical half + generated for the other half"}
# Table 3's rows (its segmentation runs' methods), in the tables' order.
TABLE3_METHODS = ("real", "mix_0.5", "mix_1", "mix_2", "real_optical_half", "new_layouts")
IMAGE_METRICS = (("psnr", "PSNR (dB)", True, "{:.2f}"), ("ssim", "SSIM", True, "{:.3f}"),
                 ("sam", "SAM (rad)", False, "{:.3f}"))
SEG_METRICS = (("miou", "mIoU", True, "{:.3f}"), ("accuracy", "accuracy", True, "{:.3f}"))
# Figure 8's speed claim: steps until validation mIoU first reaches this share
# of the real-only runs' final validation mIoU (mean over seeds), fixed in advance.
SPEED_THRESHOLD = 0.9


# ---------------------------------------------------------------------------
# Loading finished runs
# ---------------------------------------------------------------------------
def load_results(root: epath.Path, runs) -> dict:
    """{(table, method): {seed: {"record": run.json, "tiles": per-tile parts}}}."""
    out: dict = {}
    for run in runs:
        if run.kind == "synthesize" or not run.table:
            continue
        record = runner.load_finished(run, root)
        if record is None:
            continue
        tiles_path = root / run.name / runner.TILES_FILE
        with tiles_path.open("rb") as f, np.load(f) as z:
            tiles = {k: np.asarray(z[k]) for k in z.files}
        out.setdefault((run.table, run.method), {})[run.seed] = {"record": record, "tiles": tiles}
    return out


def metric_fn(name: str):
    return stats.segmentation_metric(name) if name in ("miou", "accuracy") else stats.image_metric(name)


def cell(entries: dict, metric: str) -> stats.Interval:
    """Mean over seeds of the split-level metric (from the per-tile parts)."""
    fn = metric_fn(metric)
    return stats.seed_interval([fn(e["tiles"]) for _, e in sorted(entries.items())])


def tile_scenes(entries) -> Optional[np.ndarray]:
    """The scene of each test tile, where every run's per-tile record has it and
    they agree (stats.shared_scenes)."""
    if not entries:
        return None
    return stats.shared_scenes([e["tiles"].get("scene_id") for e in entries],
                               len(next(iter(entries[0]["tiles"].values()))))


SCENE_BOOTSTRAP, TILE_BOOTSTRAP = stats.SCENE_BOOTSTRAP, stats.TILE_BOOTSTRAP


def paired(ea: dict, eb: dict, seeds, metric: str) -> tuple[dict, stats.Interval]:
    """(the claim's interval fields, the interval): the paired difference over
    `seeds`, its scenes resampled where the records name them; for one release
    also the tile bootstrap's interval beside it, for comparison."""
    a_runs, b_runs = [ea[s]["tiles"] for s in seeds], [eb[s]["tiles"] for s in seeds]
    scenes = tile_scenes([ea[s] for s in seeds] + [eb[s] for s in seeds])
    iv = stats.paired_difference(a_runs, b_runs, metric_fn(metric), clusters=scenes)
    out = {"difference": iv.as_dict(), "interval": TILE_BOOTSTRAP if scenes is None
           else SCENE_BOOTSTRAP}
    if scenes is not None:
        out["difference_tile_bootstrap"] = stats.paired_difference(
            a_runs, b_runs, metric_fn(metric)).as_dict()
    return out, iv


def claim(results: dict, a: tuple, b: tuple, metric: str, higher: bool, text: str) -> dict:
    """One claim row: A beats B on `metric`, from the paired difference over common seeds."""
    ea, eb = results.get(a, {}), results.get(b, {})
    seeds = sorted(set(ea) & set(eb))
    row = {"claim": text, "a": list(a), "b": list(b), "metric": metric, "seeds": seeds}
    if not seeds:
        row.update(difference=None, verdict="not run")
        return row
    fields, iv = paired(ea, eb, seeds, metric)
    row.update(fields, **stats.judge(iv, higher))
    return row


def claims(results: dict) -> list[dict]:
    rows = []
    t1 = lambda m: ("table1", m)  # noqa: E731
    for a, b, what in (("rs_spade", "pix2pix", "RS-SPADE beats pix2pix"),
                       ("rs_spade_l1", "pix2pix", "RS-SPADE + L1 beats pix2pix (same objective terms: the method)"),
                       ("rs_spade_l1", "rs_spade", "the L1 term improves RS-SPADE (the objective)")):
        for metric, label, higher, _ in IMAGE_METRICS:
            rows.append(claim(results, t1(a), t1(b), metric, higher, f"{what} on {label}"))
    for subset in plan_lib.TABLE2:
        key = subset.replace("+", "_")
        for metric, label, higher, _ in IMAGE_METRICS:
            rows.append(claim(results, t1("rs_spade"), ("table2", key), metric, higher,
                              f"all three sources beat {LABELS[key]} on {label}"))
    t3 = lambda m: ("table3", m)  # noqa: E731
    for a, b, what in (("mix_1", "real", "Mix 1:1 beats True Data"),
                       ("mix_0.5", "real", "Mix 0.5:1 beats True Data"),
                       ("mix_2", "real", "Mix 2:1 beats True Data"),
                       ("new_layouts", "real_optical_half",
                        "generated images for optical-less scenes beat leaving them out")):
        for metric, label, higher, _ in SEG_METRICS:
            rows.append(claim(results, t3(a), t3(b), metric, higher, f"{what} on {label}"))
    return rows


# ---------------------------------------------------------------------------
# Figure 8: validation mIoU during training, and the speed claim
# ---------------------------------------------------------------------------
def epochs_per_step(record: dict) -> Optional[float]:
    """The epochs of its own training set one step of a run is, or None for
    a run whose length was given in steps (its record's planned config has no
    total_epochs; its final `step` is the steps its epochs made)."""
    epochs = float((record.get("config") or {}).get("total_epochs") or 0)
    steps = record.get("step")
    return epochs / steps if epochs > 0 and steps else None


def curve_unit(results: dict) -> str:
    """"epoch" when every Table 3 run trained in epochs (the paper's Figure 8
    axis: runs of different training sets compare per pass over their own
    data), else "step"."""
    records = [e["record"] for (table, _), seeds in results.items() if table == "table3"
               for e in seeds.values()]
    return "epoch" if records and all(epochs_per_step(r) for r in records) else "step"


def curves(results: dict, method: str, unit: str = "step") -> dict:
    """{seed: (steps or epochs, val mIoU)} of one Table 3 method."""
    out = {}
    for seed, e in results.get(("table3", method), {}).items():
        history = e["record"].get("val_history") or []
        scale = epochs_per_step(e["record"]) if unit == "epoch" else 1.0
        out[seed] = ([h["step"] * scale for h in history], [h["miou"] for h in history])
    return out


def steps_to_reach(steps, values, threshold: float) -> float:
    """First step at which values >= threshold; NaN when never reached."""
    for step, value in zip(steps, values):
        if value >= threshold:
            return float(step)
    return math.nan


def speed_claim(results: dict, a: str = "mix_1", b: str = "real") -> dict:
    unit = curve_unit(results)
    ca, cb = curves(results, a, unit), curves(results, b, unit)
    seeds = sorted(set(ca) & set(cb))
    row = {"claim": f"{LABELS[a]} reaches a validation mIoU of {SPEED_THRESHOLD:g} x True Data's "
                    f"final one in fewer {unit}s", "metric": f"{unit}s", "seeds": seeds}
    if not seeds or not all(cb[s][1] for s in seeds):
        row.update(difference=None, verdict="not run")
        return row
    threshold = SPEED_THRESHOLD * float(np.mean([cb[s][1][-1] for s in seeds]))
    last = max(max(cb[s][0][-1], ca[s][0][-1]) for s in seeds)
    # Never reached: counted as one evaluation interval past the end (censored).
    interval = cb[seeds[0]][0][0] if cb[seeds[0]][0] else 1

    def reach(c):
        v = steps_to_reach(*c, threshold)
        return last + interval if math.isnan(v) else v
    saved = [reach(cb[s]) - reach(ca[s]) for s in seeds]
    iv = stats.seed_interval(saved)
    row.update(threshold=threshold, **{f"{unit}s_saved_per_seed": saved}, difference=iv.as_dict(),
               verdict=stats.verdict(iv, True) if len(seeds) > 1
               else f"{stats.NOT_RESOLVED} (1 seed)")
    return row


# Has validation flattened? The best validation mIoU of a run's last third of
# validations gains less than this on the best before it (fixed in advance:
# half a point of mIoU, under the seeds' spread at bench scale).
PLATEAU_TOLERANCE = 0.005


def plateau(history: list, tolerance: float = PLATEAU_TOLERANCE) -> dict:
    """Whether one run's validation curve ([{"step", "miou"}, ...]) has
    flattened: `gain` is the best mIoU of its last third of validations minus
    the best before them; `flat` whether that gain is below `tolerance`
    (None with fewer than 3 validations). A resumed run's repeated steps
    count once (the later value)."""
    by_step = {int(h["step"]): float(h["miou"]) for h in history}
    steps = sorted(by_step)
    out = {"validations": len(steps), "best_step": None, "last_step": steps[-1] if steps else None,
           "gain": None, "flat": None}
    if not steps:
        return out
    values = [by_step[s] for s in steps]
    out["best_step"] = steps[int(np.argmax(values))]
    if len(steps) < 3:
        return out
    cut = len(steps) - max(1, len(steps) // 3)
    out["gain"] = max(values[cut:]) - max(values[:cut])
    out["flat"] = bool(out["gain"] < tolerance)
    return out


def validation_summary(results: dict) -> tuple[list[str], dict]:
    """Markdown lines and JSON of whether each Table 3 method's validation
    mIoU has flattened, over its seeds, and which step its scored model is."""
    lines, out = [], {}
    rows = []
    for method in TABLE3_METHODS:
        seeds = results.get(("table3", method), {})
        if not seeds:
            continue
        per_seed = {}
        for seed, e in sorted(seeds.items()):
            record = e["record"]
            info = plateau(record.get("val_history") or [])
            info["scored_step"] = (record.get("scores") or {}).get("scored_step",
                                                                  record.get("step"))
            per_seed[seed] = info
        flat = [i["flat"] for i in per_seed.values() if i["flat"] is not None]
        gains = [i["gain"] for i in per_seed.values() if i["gain"] is not None]
        out[method] = {"seeds": per_seed, "flat": sum(flat), "judged": len(flat)}
        rows.append(f"| {LABELS[method]} | {sum(flat)} of {len(flat)} | "
                    + (f"{np.median(gains):+.3f}" if gains else "-") + " | "
                    + ", ".join(f"{i['best_step']}/{i['last_step']}" for i in per_seed.values())
                    + " |")
    if not rows:
        return lines, out
    lines = ["Has validation flattened? A run's validation mIoU counts as flat when the best "
             f"of its last third of validations gains less than {PLATEAU_TOLERANCE:g} on the best "
             "before it. Each run is scored with its best validation checkpoint (the paper's "
             "best model).", "",
             "| method | flat (seeds) | median gain, last third | best / last step per seed |",
             "|---|---|---|---|", *rows, ""]
    still = [LABELS[m] for m, v in out.items() if v["judged"] and v["flat"] < v["judged"]]
    lines += [f"Still rising in some seeds: {', '.join(still)}; longer training may change "
              "Table 3." if still else "Validation has flattened in every run.", ""]
    return lines, out


def figure8(results: dict, path: epath.Path) -> Optional[str]:
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    del matplotlib
    fig = Figure(figsize=(7, 4.2), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    drawn = 0
    unit = curve_unit(results)
    for method in TABLE3_METHODS:
        c = curves(results, method, unit)
        if not c:
            continue
        length = min(len(v[1]) for v in c.values())
        if length == 0:
            continue
        steps = next(iter(c.values()))[0][:length]
        mean, low, high = stats.band([v[1][:length] for v in c.values()])
        line, = ax.plot(steps, mean, label=f"{LABELS[method]} ({len(c)} seeds)")
        if len(c) > 1:
            ax.fill_between(steps, low, high, color=line.get_color(), alpha=0.2)
        drawn += 1
    if not drawn:
        return None
    ax.set_xlabel(f"training {unit}" + (" (of the run's own training set)" if unit == "epoch" else ""))
    ax.set_ylabel("validation mIoU")
    ax.set_title("RS-UNet: validation mIoU, mean and 95% band over seeds")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with path.open("wb") as f:
        fig.savefig(f, format="png")
    return path.name


def grids(root: epath.Path, runs, out: epath.Path) -> dict:
    """Each trained method's best and worst test tiles (lowest seed) as PNG grids."""
    from rsjax import viz

    out.mkdir(parents=True, exist_ok=True)
    written = {}
    seen = set()
    for run in sorted((r for r in runs if r.kind != "synthesize" and r.table),
                      key=lambda r: r.seed):
        key = (run.table, run.method)
        path = root / run.name / runner.SHOWN_FILE
        if key in seen or not path.exists():
            continue
        seen.add(key)
        with path.open("rb") as f, np.load(f) as z:
            shown = {k: np.asarray(z[k]) for k in z.files}
        rows = {k: shown[k] for k in shown if k not in ("tile_index", "score", "score_name")}
        name = f"{run.table}_{run.method}.png"
        viz.image_grid(rows, out / name, column_titles=[
            f"{'best' if i < len(shown['score']) // 2 else 'worst'} {float(s):.3g}"
            for i, s in enumerate(shown["score"])])
        written[f"{run.table}/{run.method}"] = f"{out.name}/{name}"
    return written


# ---------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------
def fmt(iv: stats.Interval, spec: str) -> str:
    if iv.n_seeds == 0:
        return "not run"
    if not np.isfinite(iv.low):
        return spec.format(iv.mean)
    return f"{spec.format(iv.mean)} [{spec.format(iv.low)}, {spec.format(iv.high)}]"


def table_rows(results: dict, table: str, methods, metrics, paper: dict) -> tuple[list[str], dict]:
    head = "| model / data | seeds | " + " | ".join(m[1] for m in metrics) + " | " + \
        " | ".join(f"paper {m[1]}" for m in metrics) + " |"
    lines = [head, "|---|---:|" + "---:|" * (2 * len(metrics))]
    data = {}
    for method, source in methods:
        entries = results.get(source, {})
        cells = {m: cell(entries, m) for m, *_ in metrics}
        data[method] = {m: iv.as_dict() for m, iv in cells.items()}
        p = paper.get(method)
        paper_cells = [spec.format(v) for v, (_, _, _, spec) in zip(p, metrics)] if p else [""] * len(metrics)
        lines.append(f"| {LABELS[method]} | {len(entries)} | "
                     + " | ".join(fmt(cells[m], spec) for m, _, _, spec in metrics) + " | "
                     + " | ".join(paper_cells) + " |")
    return lines, data


def claim_lines(rows: list[dict]) -> list[str]:
    lines = ["| claim | seeds | difference (A - B) [95% interval] | verdict | seeds to resolve |",
             "|---|---:|---|---|---:|"]
    for r in rows:
        d = r.get("difference")
        diff = "" if not d else (f"{d['mean']:+.4g}" + (
            f" [{d['low']:+.4g}, {d['high']:+.4g}]" if d["low"] == d["low"] else ""))
        lines.append(f"| {r['claim']} | {len(r['seeds'])} | {diff} | **{r['verdict']}** | "
                     f"{stats.resolve_note(r)} |")
    return lines


def build_report(root: epath.Path, scale: str, runs) -> dict:
    results = load_results(root, runs)
    report = {"scale": scale, "workdir": str(root)}
    md = [f"# rsjax experiments, scale `{scale}`", ""]

    t1_methods = [(m, ("table1", m)) for m in plan_lib.TABLE1]
    lines, report["table1"] = table_rows(results, "table1", t1_methods, IMAGE_METRICS, PAPER_TABLE1)
    md += ["## Table 1: RS-SPADE against pix2pix (all sources)", "",
           "Mean over seeds [95% interval over seeds]; test split.", "", *lines, ""]
    t2_methods = [(s.replace("+", "_"), ("table2", s.replace("+", "_"))) for s in plan_lib.TABLE2]
    t2_methods.append(("all", ("table1", "rs_spade")))
    lines, report["table2"] = table_rows(results, "table2", t2_methods, IMAGE_METRICS, PAPER_TABLE2)
    md += ["## Table 2: RS-SPADE on source subsets", "", *lines, ""]
    t3_methods = [(m, ("table3", m)) for m in TABLE3_METHODS]
    lines, report["table3"] = table_rows(results, "table3", t3_methods, SEG_METRICS, PAPER_TABLE3)
    md += ["## Table 3: RS-UNet with generated images", "", *lines, ""]
    lines, report["validation"] = validation_summary(results)
    md += lines

    rows = claims(results) + [speed_claim(results)]
    report["claims"] = rows
    md += ["## The paper's claims", "",
           "From the paired difference over seeds and test tiles (the same seeds and tiles "
           "for both sides); **holds** / **reversed** when the whole 95% interval is on one side "
           "of zero, else **not resolved**. Test tiles resampled by "
           + ("scene (each scene with all its tiles: tiles of a scene are not independent)"
              if all(r.get("interval") != TILE_BOOTSTRAP for r in rows if r.get("difference"))
              else "tile, as if independent (runs recorded before scene ids were kept)")
           + "; report.json names each interval's method.", "", *claim_lines(rows), ""]

    fig = figure8(results, root / "figure8.png")
    report["figure8"] = fig
    if fig:
        md += ["## Figure 8", "", f"![validation mIoU]({fig})", ""]
    report["grids"] = grids(root, runs, root / "grids")
    if report["grids"]:
        md += ["## Best and worst test tiles (seed 0)", ""]
        md += [f"- {k}: ![{k}]({v})" for k, v in report["grids"].items()] + [""]

    times, cpu, notes, finished = [], [], [], {}
    for run in runs:
        record = runner.load_finished(run, root)
        if record is not None:
            finished[run.name] = record
            times.append((run.name, record["seconds"]))
            cpu.append((run.name, record.get("cpu_seconds")))
            notes.append((runner.wall_note(record), runner.cpu_note(record)))
    report["wall_seconds"] = {"runs": dict(times), "total": round(sum(t for _, t in times), 1)}
    report["cpu_seconds"] = {"runs": dict(cpu),
                             "total": round(sum(t or 0.0 for _, t in cpu), 1)}
    from rsjax import logging_utils
    fmt_time = logging_utils.format_duration
    md += ["## Wall time", "", f"{len(times)} of {len(runs)} runs finished: "
           f"{fmt_time(report['wall_seconds']['total'])} of wall time, "
           f"{fmt_time(report['cpu_seconds']['total'])} of CPU time (all threads"
           + ("; a run resumed after a kill counts the CPU time of its last attempt only"
              if any(c for _, c in notes) else "") + ").", "",
           "| run | wall (all attempts) | CPU |", "|---|---:|---:|"]
    md += [f"| {name} | {fmt_time(t)}{wall_note} | {fmt_time(c)}{cpu_note} |"
           for (name, t), (_, c), (wall_note, cpu_note) in zip(times, cpu, notes)]
    md += [""]
    report["elapsed"] = elapsed(root, runs, finished)
    report["machine"] = host()
    if report["elapsed"]:
        span = report["elapsed"]
        md.insert(md.index("| run | wall (all attempts) | CPU |") - 1,
                  f"From the first run's start to the last run's end: "
                  f"{fmt_time(span['seconds'])} ({span['first_start']} to {span['last_end']} UTC; "
                  f"runs done side by side by several workers overlap, pauses between "
                  f"sessions are included). At least one run was running for "
                  f"{fmt_time(span['busy_seconds'])} of it (pauses left out).\n")
    m = report["machine"]
    md += [f"Report written on: {m['cpu']}, {m['cpu_count']} CPU cores, "
           f"{m['memory_gib']} GiB, jax {m['jax']}, {m['date_utc']}.", ""]
    from rsjax import provenance
    report["provenance_differences"] = provenance.differences(list(finished.values()))
    md += provenance.difference_lines(report["provenance_differences"])
    (root / "report.md").write_text("\n".join(md) + "\n")
    (root / "report.json").write_text(json.dumps(report, indent=2, default=float))
    return report


def run_intervals(starts: list[float], end: float, seconds: float) -> list[tuple[float, float]]:
    """When a finished run was running: its last attempt from its start to `end`;
    the earlier attempts' wall time (`seconds` minus the last attempt's) laid
    from each earlier start on, up to the next start (a killed attempt's own
    end is not recorded, only the attempts' total)."""
    if not starts:
        return []
    starts = sorted(starts)
    out = [(starts[-1], end)]
    earlier = max(0.0, seconds - (end - starts[-1]))
    for start, next_start in zip(starts, starts[1:]):
        length = min(earlier, next_start - start)
        if length > 0:
            out.append((start, start + length))
        earlier -= length
    return out


def union_seconds(intervals: list[tuple[float, float]]) -> float:
    """The length of the union of intervals: time during which at least one ran."""
    total, reach = 0.0, -math.inf
    for start, end in sorted(intervals):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def elapsed(root: epath.Path, runs, finished: dict) -> Optional[dict]:
    """The experiment's span: from the first attempt's start (attempts.jsonl) to the
    last run's end (its record's `finished`; for records from before that field,
    the run.json's modification time); `finished` maps run names to records.
    `busy_seconds`: the time during which at least one finished run was running
    (the union of run_intervals), which leaves out pauses between sessions.
    None when nothing finished."""
    import datetime

    starts_of = {run.name: runner.attempt_starts(root / run.name) for run in runs}
    starts = [t for ts in starts_of.values() for t in ts]
    end_of = {name: record.get("finished") or os.stat(os.fspath(root / name / runner.RUN_FILE)).st_mtime
              for name, record in finished.items()}
    if not starts or not end_of:
        return None
    intervals = [iv for name, record in finished.items()
                 for iv in run_intervals(starts_of.get(name, []), end_of[name],
                                         float(record.get("seconds", 0.0)))]

    def iso(t):
        return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M")
    return {"seconds": round(max(end_of.values()) - min(starts), 1), "first_start": iso(min(starts)),
            "last_end": iso(max(end_of.values())), "busy_seconds": round(union_seconds(intervals), 1)}


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------
# Old option names, still taken for one release (see rsjax.cli.rename_options):
# reading is now the default, and --run trains.
RENAMED_OPTIONS = {"--no_run": None}


def add_arguments(parser) -> None:
    arguments.add_experiment_arguments(parser, plan_lib.SCALES, plan_lib.SEEDS)
    parser.add_argument("--tables", default="table1,table2,table3",
                        help="comma-separated subset of table1, table2, table3")
    parser.add_argument("--list", action="store_true", help="print the plan's runs and exit")
    arguments.add_run_arguments(parser)

def run(args) -> int:
    from rsjax.errors import UserError

    tables = tuple(t.strip() for t in args.tables.split(",") if t.strip())
    bad = [t for t in tables if t not in ("table1", "table2", "table3")]
    if bad or not tables:
        raise UserError(f"--tables {args.tables}: choose from table1, table2, table3.")
    runs = plan_lib.plan(args.scale, args.seeds, tables)
    if args.list:
        for r in runs:
            print(f"{r.name:45s} {r.kind:12s} {r.config} {' '.join(r.overrides)}")
        return 0
    root = epath.Path(args.workdir).resolve() if "://" not in args.workdir else epath.Path(args.workdir)
    if args.worker_cpus is not None:        # one of --workers' processes: run, no report
        return _work(args, runs, root)
    if args.run and args.workers > 1:
        _run_workers(args, runs, root)
    elif args.run:
        from rsjax.runtime import prepare_process
        prepare_process()
        runner.run_plan(runs, root, args.data_dir)
    elif not root.exists():
        raise UserError(f"{args.workdir}: no such experiment folder; add --run to train its runs "
                        f"({len(runs)} at this scale and these tables).")
    else:
        unfinished = [r.name for r in runs if not (root / r.name / runner.RUN_FILE).exists()]
        if unfinished:
            print(f"note: {len(unfinished)} of {len(runs)} runs have not finished (the first: "
                  f"{unfinished[0]}); add --run to train them.", file=sys.stderr)
    report = build_report(root, args.scale, runs)
    print((root / "report.md").read_text())
    cli.print_json({"report": str(root / "report.md"), "json": str(root / "report.json"),
                    "verdicts": {r["claim"]: r["verdict"] for r in report["claims"]}})
    return 0


def _run_workers(args, runs, root: epath.Path) -> None:
    """Starts `--workers` processes of this command on shares of the cores and
    waits for them (rsjax.experiments.workers); each claims runs as they become
    ready (runner.run_plan)."""
    workers.build_datasets(runner.run_config(run, root, args.data_dir).data for run in runs)
    base = [sys.executable, "-m", "rsjax.experiments.paper_tables", "--scale", args.scale,
            "--workdir", str(root), "--tables", args.tables, "--workers", str(args.workers)]
    base += ["--seeds", str(args.seeds)] if args.seeds is not None else []
    base += ["--data_dir", args.data_dir] if args.data_dir else []
    workers.run_workers(base, args.workers, str(root))


def _work(args, runs, root: epath.Path) -> int:
    workers.become_worker(args.worker_cpus)
    from rsjax.runtime import prepare_process
    prepare_process()
    tag = f"[cores {args.worker_cpus}]"
    runner.run_plan(runs, root, args.data_dir, workers=max(args.workers, 1),
                    print_fn=lambda line: print(f"{tag} {line}", flush=True))
    return 0


main = cli.command_main(__name__)

if __name__ == "__main__":
    sys.exit(main())
