"""An HTML page of a training run or a folder of runs: curves, image grids, scores.

    rsjax report --workdir work/demo            # one run -> work/demo/report/report.html
    rsjax report --workdir work/experiments     # every run below it, with a summary table
    rsjax report --workdir work/demo --out_dir /tmp/demo_report

The page shows each run's loss, learning-rate, speed and evaluation curves,
its latest image grids and its evaluation JSON, and a summary table across
runs. A run is a folder holding a metrics.jsonl (what `rsjax train --workdir`
writes); `--workdir` is one run, or a folder with runs in its subfolders (found at
any depth; a run's own subfolders are not searched). The page, its curves
(PNG, drawn from metrics.jsonl) and copies of the runs' image grids,
evaluation JSON and config go into one folder, and the page refers to them by
relative paths only: copy the folder anywhere and open report.html. The
folder is written beside its final place and swapped in when complete, so a
failed report leaves the previous one as it was. The report reads a run
while it trains (a half-written last line is skipped).
"""
from __future__ import annotations

import argparse
import dataclasses
import html
import json
import math
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional
from urllib.parse import quote

from etils import epath

from rsjax import cli
from rsjax.errors import UserError
from rsjax.file_modes import new_dir_mode

REPORT_FILE = "report.html"
DEFAULT_OUTPUT = "report"                   # under WORKDIR
# Prefixes of evaluation metrics in metrics.jsonl: periodic validation
# (val_<metric>) and the final evaluation (<split>_<metric>).
EVAL_PREFIXES = {"val_": "validation", "validation_": "validation", "test_": "test"}
# Logged, but not worth a curve: the non-finite guard's counter, and the
# evaluation's counts (num_images, num_pixels, ...).
NOT_CURVES = ("nonfinite",)
COUNT_PREFIX = "num_"
SPEED = "steps_per_second"
LEARNING_RATE = "learning_rate/"
# Scores shown in the summary table across runs, when a run has them.
HEADLINE = ("psnr", "ssim", "sam", "sam_deg", "miou", "accuracy", "mean_accuracy")
FINAL_LOSSES = ("g_loss", "d_loss", "loss")
SKIP_DIRS = {"checkpoints", "best_checkpoint", "images"}   # never hold runs; can be large


@dataclasses.dataclass
class Run:
    name: str                  # path relative to WORKDIR ("." for WORKDIR itself)
    path: epath.Path
    slug: str                  # its folder in the report, and its section id
    records: list[dict]
    config: Optional[dict]
    evaluations: list[tuple[str, dict]]    # (file name, scores), by step then name
    grids: list[epath.Path]                # the latest training grid, then evaluation grids


# --------------------------------------------------------------------------- finding runs

def _is_run(path: epath.Path) -> bool:
    return (path / "metrics.jsonl").is_file()


def find_runs(root: epath.Path, exclude: Optional[epath.Path] = None) -> list[epath.Path]:
    """`root` if it is a run, else every run below it (sorted by path)."""
    if _is_run(root):
        return [root]
    runs, pending = [], [root]
    while pending:
        folder = pending.pop()
        for child in sorted(folder.iterdir(), reverse=True):
            if not child.is_dir() or child.name in SKIP_DIRS or child.name.startswith("."):
                continue
            if exclude is not None and os.fspath(child) == os.fspath(exclude):
                continue
            if _is_run(child):
                runs.append(child)
            else:
                pending.append(child)
    return sorted(runs, key=os.fspath)


def _slug(name: str, taken: set) -> str:
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "run"
    slug, n = base, 1
    while slug in taken:
        n += 1
        slug = f"{base}_{n}"
    taken.add(slug)
    return slug


def _step_of(name: str) -> int:
    digits = re.findall(r"\d+", name)
    return int(digits[-1]) if digits else -1


def _read_json(path: epath.Path) -> Any:
    try:
        return json.loads(path.read_text())
    except ValueError as err:
        raise UserError(f"{path}: not valid JSON ({err}).") from None


def load_run(path: epath.Path, name: str, slug: str) -> Run:
    from rsjax import logging_utils

    try:
        records = logging_utils.read_metrics(path)
    except ValueError as err:
        raise UserError(f"{err} Fix or remove that line to report on the run.") from None
    config_path = path / logging_utils.CONFIG_FILE
    config = _read_json(config_path) if config_path.is_file() else None
    evaluations = []
    for file in path.glob("eval_*.json"):
        scores = _read_json(file)
        if isinstance(scores, dict):
            evaluations.append((file.name, scores))
    evaluations.sort(key=lambda e: (e[1].get("step", -1) if isinstance(e[1].get("step"), int)
                                    else -1, e[0]))
    grids = []
    training_grids = sorted((path / "images").glob("step_*.png"), key=lambda p: _step_of(p.name))
    if training_grids:
        grids.append(training_grids[-1])
    grids += sorted(path.glob("eval_*.png"), key=lambda p: p.name)
    return Run(name, path, slug, records, config, evaluations, grids)


# --------------------------------------------------------------------------- curves

def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) where `key` was logged with a finite value."""
    points = [(r["step"], r[key]) for r in records
              if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    return [p[0] for p in points], [float(p[1]) for p in points]


def curve_groups(records: list[dict]) -> list[tuple[str, str, str, dict]]:
    """[(file stem, title, y label, {series name: (steps, values)})]: one plot
    per training metric (their scales differ by orders of magnitude: an L1 term
    x100 beside an adversarial loss near 1), the learning rates together,
    steps/s, and one plot per evaluation metric with a series per split."""
    keys = []
    for record in records:
        keys += [k for k in record if k not in keys and k not in ("step", "time")]
    training, rates, speed, evaluation = {}, {}, {}, {}
    for key in keys:
        x, y = _series(records, key)
        if not x or key in NOT_CURVES:
            continue
        prefix = next((p for p in EVAL_PREFIXES if key.startswith(p)), None)
        if prefix and key[len(prefix):].startswith(COUNT_PREFIX):
            continue
        if prefix:
            evaluation.setdefault(key[len(prefix):], {})[EVAL_PREFIXES[prefix]] = (x, y)
        elif key.startswith(LEARNING_RATE):
            rates[key[len(LEARNING_RATE):]] = (x, y)
        elif key == SPEED:
            speed["steps/s"] = (x, y)
        else:
            training[key] = (x, y)
    groups = [(f"train_{_file_part(key)}", f"Training: {key}", key, {key: series})
              for key, series in training.items()]
    if rates:
        groups.append(("learning_rate", "Learning rate", "learning rate", rates))
    if speed:
        groups.append(("speed", "Speed (wall clock, between log lines)", "steps/s", speed))
    shown: dict = {}                 # an evaluation curve logged under two names, drawn once
    for metric, series in evaluation.items():
        same = next((m for m, s in shown.items() if s == series), None)
        if same is not None:
            shown[f"{same} = {metric}"] = shown.pop(same)
        else:
            shown[metric] = series
    for names, series in shown.items():
        short = min(names.split(" = "), key=len)          # "sam" for "sam_rad = sam"
        stem = f"eval_{_file_part(short)}"
        groups.append((stem, f"Evaluation: {names}", names, series))
    return groups


def _file_part(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", name)


# --------------------------------------------------------------------------- HTML

def _text(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _href(*parts: str) -> str:
    """A relative URL (each path part percent-encoded), escaped for an attribute."""
    return _text("/".join(quote(p) for p in parts))


def _number(value: Any) -> str:
    if value is None:
        return "n/a"                     # JSON null: a NaN or inf that was logged
    if isinstance(value, bool) or isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _table(header: list[str], rows: list[list[str]], caption: str = "") -> str:
    """Cells are HTML already (escape text before)."""
    out = ["<table>"]
    if caption:
        out.append(f"<caption>{caption}</caption>")
    out.append("<thead><tr>" + "".join(f"<th>{h}</th>" for h in header) + "</tr></thead>")
    out.append("<tbody>")
    out += ["<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows]
    out.append("</tbody></table>")
    return "\n".join(out)


def _flatten(scores: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in scores.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}/"))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def evaluation_tables(scores: dict) -> str:
    """The scalar scores as a two-column table; per-class lists (and
    {class name: score} mappings) as one table with a row per class, each
    column once; square matrices (the confusion matrix) as a grid."""
    from rsjax.data.contract import LULC_CLASSES

    as_lists = {k: [v[c] for c in LULC_CLASSES]
                if isinstance(v, dict) and list(v) == list(LULC_CLASSES) else v
                for k, v in scores.items()}
    seen, unique = set(), {}
    for key, value in as_lists.items():      # iou_by_class repeats per_class_iou: show it once
        text = json.dumps(value) if isinstance(value, list) else None
        if text is None or text not in seen:
            unique[key] = value
            seen.add(text)
    flat = _flatten(unique)
    scalars = [[_text(k), _text(_number(v))] for k, v in flat.items() if not isinstance(v, list)]
    vectors = {k: v for k, v in flat.items()
               if isinstance(v, list) and v and not isinstance(v[0], list)}
    matrices = {k: v for k, v in flat.items()
                if isinstance(v, list) and v and isinstance(v[0], list)}
    parts = [_table(["score", "value"], scalars)] if scalars else []
    for length in sorted({len(v) for v in vectors.values()}):
        group = {k: v for k, v in vectors.items() if len(v) == length}
        names = LULC_CLASSES if length == len(LULC_CLASSES) else [str(i) for i in range(length)]
        rows = [[_text(name)] + [_text(_number(v[i])) for v in group.values()]
                for i, name in enumerate(names)]
        parts.append(_table(["class"] + [_text(k) for k in group], rows))
    for key, matrix in matrices.items():
        names = (LULC_CLASSES if len(matrix) == len(LULC_CLASSES)
                 else [str(i) for i in range(len(matrix))])
        rows = [[_text(names[i])] + [_text(_number(v)) for v in row]
                for i, row in enumerate(matrix)]
        parts.append(_table([""] + [_text(n) for n in names][:len(matrix[0])], rows,
                            caption=_text(f"{key} (rows: truth, columns: prediction)")))
    return "\n".join(parts)


def _config_summary(config: Optional[dict]) -> dict:
    if not config:
        return {}
    get = lambda *keys: _dig(config, keys)   # noqa: E731
    model = get("generator", "name") or get("model", "name")
    sources = get("data", "sources")
    return {k: v for k, v in {
        "trainer": get("trainer"), "model": model,
        "sources": "+".join(sources) if isinstance(sources, list) else sources,
        "dataset": get("data", "name"), "total_steps": get("total_steps"),
        "global_batch_size": get("global_batch_size"),
    }.items() if v not in (None, "")}


def _dig(tree: Any, keys) -> Any:
    for key in keys:
        if not isinstance(tree, dict) or key not in tree:
            return None
        tree = tree[key]
    return tree


def summary_table(runs: list[Run]) -> str:
    """A row per run: what it trained, how far, its last losses and the
    headline scores of its latest evaluation."""
    def latest(run):
        return run.evaluations[-1] if run.evaluations else (None, {})

    losses = [k for k in FINAL_LOSSES if any(k in r.records[-1] for r in runs if r.records)]
    scores = [k for k in HEADLINE if any(k in latest(r)[1] for r in runs)]
    header = ["run", "trainer", "model", "step"] + losses + ["evaluation"] + scores
    rows = []
    for run in runs:
        info = _config_summary(run.config)
        last = run.records[-1] if run.records else {}
        file, result = latest(run)
        rows.append([f'<a href="#{_text(run.slug)}">{_text(run.name)}</a>',
                     _text(info.get("trainer", "")), _text(info.get("model", "")),
                     _text(last.get("step", ""))]
                    + [_text(_number(last[k])) if k in last else "" for k in losses]
                    + [_text(file or "")]
                    + [_text(_number(result[k])) if k in result else "" for k in scores])
    return _table([_text(h) for h in header], rows)


STYLE = """
body { font-family: sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.2em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
caption { text-align: left; font-weight: bold; padding: 0.3em 0; }
section { border-top: 2px solid #888; margin-top: 2em; }
.curves img { width: 26em; max-width: 100%; margin: 0 0.5em 0.5em 0; }
.grid img { max-width: 100%; }
figure { margin: 0 0 1em; display: inline-block; vertical-align: top; }
"""


def run_section(run: Run, curves: list[tuple[str, str]], copied_grids: list[str],
                evaluation_files: list[str], config_file: Optional[str]) -> str:
    out = [f'<section id="{_text(run.slug)}">', f"<h2>{_text(run.name)}</h2>"]
    info = _config_summary(run.config)
    info["workdir"] = os.fspath(run.path)
    if run.records:
        info["last logged step"] = run.records[-1]["step"]
    rows = [[_text(k), _text(v)] for k, v in info.items()]
    if config_file:
        rows.append(["config", f'<a href="{_href(run.slug, config_file)}">{_text(config_file)}</a>'])
    out.append(_table(["", ""], rows))
    out.append("<h3>Curves</h3>")
    if curves:
        out.append('<div class="curves">')
        out += [f'<img src="{_href(run.slug, file)}" alt="{_text(title)}">' for file, title in curves]
        out.append("</div>")
    else:
        out.append("<p>No metrics logged yet.</p>")
    out.append("<h3>Image grids</h3>")
    if copied_grids:
        for file in copied_grids:
            out.append(f'<figure class="grid"><img src="{_href(run.slug, file)}" alt="{_text(file)}">'
                       f"<figcaption>{_text(file)}</figcaption></figure>")
    else:
        out.append("<p>No image grids.</p>")
    out.append("<h3>Evaluation</h3>")
    if run.evaluations:
        for (name, scores), file in zip(run.evaluations, evaluation_files):
            out.append(f'<h4><a href="{_href(run.slug, file)}">{_text(name)}</a></h4>')
            out.append(evaluation_tables(scores))
    else:
        out.append("<p>No evaluation yet (eval_*.json).</p>")
    out.append("</section>")
    return "\n".join(out)


def page(title: str, runs: list[Run], sections: list[str]) -> str:
    return "\n".join([
        "<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
        f"<title>{_text(title)}</title>", f"<style>{STYLE}</style>", "</head>", "<body>",
        f"<h1>{_text(title)}</h1>",
        f"<p>{len(runs)} run{'s' if len(runs) != 1 else ''}, from metrics.jsonl, eval_*.json "
        "and the image grids of each workdir.</p>",
        summary_table(runs), *sections, "</body>", "</html>", ""])


# --------------------------------------------------------------------------- writing

def _write_run(run: Run, folder: Path) -> str:
    """Curves, copies of the grids, evaluation JSON and config into `folder`; the run's section."""
    from rsjax import viz

    folder.mkdir(parents=True)
    curves = []
    for stem, title, ylabel, series in curve_groups(run.records):
        viz.plot_curves(series, folder / f"{stem}.png", xlabel="step", ylabel=ylabel, title=title,
                        figsize=(5.2, 3.4))
        curves.append((f"{stem}.png", title))
    grids = []
    for grid in run.grids:
        name = grid.name if grid.parent.name != "images" else f"latest_{grid.name}"
        (folder / name).write_bytes(grid.read_bytes())
        grids.append(name)
    evaluation_files = []
    for name, scores in run.evaluations:
        (folder / name).write_text(json.dumps(scores, indent=2))
        evaluation_files.append(name)
    config_file = None
    if run.config is not None:
        config_file = "config.json"
        (folder / config_file).write_text(json.dumps(run.config, indent=2))
    return run_section(run, curves, grids, evaluation_files, config_file)


def _replace_folder(new: Path, target: Path) -> None:
    """Puts the finished `new` folder at `target`, replacing an earlier report there."""
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.replace(target, old / target.name)
    os.replace(new, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def check_output(output: Path) -> None:
    if output.exists() and (not output.is_dir() or
                            (any(output.iterdir()) and not (output / REPORT_FILE).exists())):
        raise UserError(f"--out_dir {output}: exists and is not a report folder (no {REPORT_FILE}); "
                        "it would be replaced. Choose a new or empty folder, or an earlier "
                        "report's.")


def write_report(workdir: str, output: Optional[str] = None) -> dict:
    """Writes `<output>/report.html` and its files; returns {"report": path, "runs": [names]}."""
    text = os.fspath(workdir)
    root = epath.Path(text if "://" in text else os.path.abspath(text))
    if not root.is_dir():
        raise UserError(f"{workdir}: no such folder. Pass the workdir of a training run "
                        "(rsjax train --workdir ...) or a folder of them.")
    if output is None and "://" in text:
        raise UserError(f"{workdir} is remote: pass --out_dir with a local folder for the report.")
    target = Path(os.path.abspath(output)) if output else Path(os.fspath(root)) / DEFAULT_OUTPUT
    check_output(target)
    paths = find_runs(root, exclude=epath.Path(os.fspath(target)))
    if not paths:
        raise UserError(f"{workdir}: no run here, no metrics.jsonl in it or in its subfolders. "
                        "Pass the workdir of a training run (rsjax train --workdir ...) or a "
                        "folder of them.")
    taken: set = set()
    runs = []
    for path in paths:
        name = os.fspath(path)[len(os.fspath(root)):].strip("/") or root.name
        runs.append(load_run(path, name, _slug(name, taken)))

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.new-", dir=target.parent))
    os.chmod(staging, new_dir_mode())         # mkdtemp's 0o700 would become the report's mode
    try:
        sections = [_write_run(run, staging / run.slug) for run in runs]
        title = f"rsjax report: {root.name}"
        (staging / REPORT_FILE).write_text(page(title, runs, sections), encoding="utf-8")
        _replace_folder(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return {"report": os.fspath(target / REPORT_FILE), "runs": [run.name for run in runs]}


# --------------------------------------------------------------------------- command line

# Old option names, still taken for one release (see rsjax.cli.rename_options).
RENAMED_OPTIONS = {"--output": "--out_dir"}


def add_arguments(parser) -> None:
    parser.add_argument("--workdir", default=None,
                        help="a training run's workdir, or a folder with runs in its subfolders")
    parser.add_argument("--out_dir", default=None,
                        help="folder for report.html and its files (default: <workdir>/report); "
                             "an earlier report there is replaced")
    # `rsjax report WORKDIR`, the old form, for one more release.
    parser.add_argument("old_workdir", nargs="?", default=None, help=argparse.SUPPRESS)


def run(args) -> int:
    from rsjax.errors import UserError

    if args.old_workdir is not None:
        if args.workdir is not None:
            raise UserError(f"give the run's folder once: --workdir {args.workdir}.")
        cli.note_renamed(f"`rsjax report {args.old_workdir}`",
                         f"`rsjax report --workdir {args.old_workdir}`")
        args.workdir = args.old_workdir
    if args.workdir is None:
        raise UserError("give --workdir: a training run's workdir, or a folder with runs in its "
                        "subfolders.")
    cli.print_json(write_report(args.workdir, args.out_dir))
    return 0


main = cli.command_main(__name__)

if __name__ == "__main__":
    sys.exit(main())
