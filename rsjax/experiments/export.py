"""Copy an experiment's records (not its checkpoints) to carry it to another machine.

    rsjax experiments export --workdir work/exp_bench --out_dir records/exp-bench
    rsjax experiments report --scale bench --workdir records/exp-bench

Every finished run's small files (run.json, attempts.jsonl and the per-tile
and per-image results the reports resample), and the reports and figures,
are copied into --out_dir under the same names: a few MB for the bench
experiment, small enough to commit. The reports redraw from them. Copied into
a workdir on a fresh machine, `--run` counts those runs as finished and
trains the rest; a synthesis or Mix run whose generator came as records only
stops with a message saying what to copy or rerun.
"""
from __future__ import annotations

import os
import shutil
from typing import Iterator

from etils import epath

from rsjax import cli
from rsjax.errors import UserError
from rsjax.experiments import cloud_removal, runner

# A finished run's files that the reports read; the rest (checkpoints,
# generated images, image grids of training, event files) stays behind.
RUN_RECORD_FILES = (runner.RUN_FILE, "attempts.jsonl", runner.TILES_FILE, runner.SHOWN_FILE,
                    runner.SCENES_FILE, cloud_removal.RESULTS_FILE, cloud_removal.UNCERTAINTY_FILE)
# What the report commands write at the experiment's top level.
REPORT_FILES = ("report.md", "report.json", "figure8.png", "cloud_removal.md",
                "cloud_removal.json")
REPORT_FOLDERS = ("grids",)
# Folders that never hold a run's record, and can be large.
SKIP_FOLDERS = {"checkpoints", "best_checkpoint", "corrupt_checkpoints", "images"}


def finished_runs(root: epath.Path) -> Iterator[epath.Path]:
    """The folders under `root` that hold a finished run's run.json."""
    for folder, dirs, files in os.walk(os.fspath(root)):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_FOLDERS)
        if runner.RUN_FILE in files:
            yield epath.Path(folder)


def export_records(root: epath.Path, out: epath.Path) -> dict:
    """Copies the records of every finished run under `root`, and its reports,
    into `out` under the same relative paths; returns what was copied."""
    root, out = epath.Path(os.path.abspath(root)), epath.Path(os.path.abspath(out))
    if not root.is_dir():
        raise UserError(f"{root}: no such experiment folder. Give the --workdir of "
                        "`rsjax experiments report` or `rsjax experiments cloud_removal`.")
    if out == root or root in out.parents:
        raise UserError(f"--out_dir {out} is inside the experiment {root}: choose a folder "
                        "outside it (e.g. records/NAME).")
    copied, size, runs = [], 0, 0
    for folder in finished_runs(root):
        runs += 1
        for name in RUN_RECORD_FILES:
            if (folder / name).exists():
                copied.append(folder / name)
    copied += [root / name for name in REPORT_FILES if (root / name).exists()]
    for name in REPORT_FOLDERS:
        if (root / name).is_dir():
            copied += sorted(p for p in (root / name).iterdir() if p.is_file())
    if not runs:
        raise UserError(f"{root}: no finished run (no run.json below it); nothing to export.")
    for path in copied:
        target = out / os.path.relpath(path, root)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
        size += os.path.getsize(os.fspath(path))
    return {"out_dir": str(out), "runs": runs, "files": len(copied),
            "megabytes": round(size / 2**20, 2)}


def add_arguments(parser) -> None:
    parser.add_argument("--workdir", required=True, help="the experiment's folder")
    parser.add_argument("--out_dir", required=True,
                        help="where the records go (created; files of the same name replaced)")


def run(args) -> int:
    result = export_records(epath.Path(args.workdir), epath.Path(args.out_dir))
    print(f"Exported {result['runs']} finished runs ({result['files']} files, "
          f"{result['megabytes']} MB) to {result['out_dir']}.")
    cli.print_json(result)
    return 0
