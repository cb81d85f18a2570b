"""Score a training run's checkpoint on a whole split: PSNR, SSIM and SAM for
fusion runs, accuracy, per-class IoU and mIoU for segmentation runs.

    rsjax evaluate --workdir work/demo                     # latest checkpoint, test split
    rsjax evaluate --workdir work/seg_real --split validation --step 200
    rsjax evaluate --workdir work/demo --out scores.json

The run's saved config (`<workdir>/config.json`) says what to build and which
dataset to read; `--config` replaces it. The checkpoint may have been written
on any number of devices. The scores are printed (JSON) before anything is
written; then `eval_<split>_<step>.json`, a Markdown table and a PNG grid go
into the workdir (or the JSON to `--out`). A read-only workdir still gives
the printed result.
"""
from __future__ import annotations

import json
import logging
import sys
from typing import Optional

from rsjax import cli
from rsjax.errors import UserError

log = logging.getLogger("rsjax")

SPLITS = ("train", "validation", "test")


def check_workdir(workdir: str) -> None:
    """A training workdir with at least one checkpoint; checked before anything
    is created (Orbax would make the folders)."""
    from etils import epath

    from rsjax.runtime import workdir_path

    path = epath.Path(workdir_path(workdir))
    if not path.is_dir():
        raise UserError(f"{workdir}: workdir does not exist. Pass the workdir of a training run "
                        "(rsjax train --workdir ...).")
    checkpoints = path / "checkpoints"
    if not checkpoints.is_dir() or not any(p.name.isdigit() for p in checkpoints.iterdir()):
        raise UserError(f"{checkpoints}: no checkpoint. Train first (rsjax train --workdir "
                        f"{workdir} ...), or pass the workdir of a run that saved one.")


def evaluate_checkpoint(config, workdir: str, split: str = "test", step: Optional[int] = None,
                        devices=None, output: Optional[str] = None) -> dict:
    """Scores a checkpoint and writes the JSON, table and figure (process 0).

    Returns the scores; a failure to write (read-only workdir) is logged, not raised."""
    import jax

    from rsjax.trainers import trainer_module

    result, rows = trainer_module(config.trainer).evaluate_checkpoint(
        config, workdir, split, step, devices=devices)
    if jax.process_index() == 0:
        try:
            write_outputs(result, rows, workdir, output)
        except OSError as err:
            log.warning("Could not write the evaluation files (%s); the scores are printed above.",
                        err)
    return result


def write_outputs(result: dict, rows: Optional[dict], workdir: str, output: Optional[str]) -> None:
    from etils import epath

    from rsjax import viz
    from rsjax.runtime import workdir_path

    out = epath.Path(workdir_path(workdir))
    stem = f"eval_{result['split']}_{result['step']}"
    json_path = epath.Path(output) if output else out / f"{stem}.json"
    json_path.write_text(json.dumps(result, indent=2, default=str))
    (json_path.parent / f"{json_path.stem}.md" if output else out / f"{stem}.md").write_text(
        markdown_table([(result["model"], result)]))
    if rows is not None:
        from rsjax.trainers.cloud_eval import grid_options
        viz.image_grid(rows, (json_path.parent / f"{json_path.stem}.png") if output
                       else out / f"{stem}.png", **grid_options(rows))


def markdown_table(rows) -> str:
    """rows: [(name, scores)] of one trainer's scores, as a Markdown table."""
    if rows and "miou" in rows[0][1]:
        lines = ["| model | mIoU | accuracy |", "|---|---:|---:|"]
        lines += [f"| {name} | {s['miou']:.3f} | {s['accuracy']:.3f} |" for name, s in rows]
    else:
        lines = ["| model | PSNR | SSIM | SAM (rad) |", "|---|---:|---:|---:|"]
        lines += [f"| {name} | {s['psnr']:.2f} | {s['ssim']:.3f} | {s['sam']:.3f} |"
                  for name, s in rows]
    return "\n".join(lines) + "\n"


# Old option names, still taken for one release (see rsjax.cli.rename_options).
RENAMED_OPTIONS = {"--output": "--out"}


def add_arguments(parser) -> None:
    parser.add_argument("--workdir", required=True, help="the training run's workdir")
    cli.add_config_argument(parser, required=False,
                            help="the training config (default: the workdir's config.json)")
    parser.add_argument("--step", type=int, default=None,
                        help="checkpoint step (default: the latest)")
    parser.add_argument("--split", default="test", choices=SPLITS, help="split to score")
    parser.add_argument("--out", default=None,
                        help="JSON file for the scores (default: <workdir>/eval_<split>_<step>.json)")


def run(args) -> int:
    check_workdir(args.workdir)
    config = cli.load_config_arg(args, workdir=args.workdir)
    from rsjax.runtime import prepare_process

    prepare_process()
    from rsjax.trainers import trainer_module

    import jax
    result, rows = trainer_module(config.trainer).evaluate_checkpoint(
        config, args.workdir, args.split, args.step)
    cli.print_json(result)             # the scores first: a failed write loses nothing
    if jax.process_index() == 0:
        try:
            write_outputs(result, rows, args.workdir, args.out)
        except OSError as err:
            log.warning("Could not write the evaluation files (%s); the scores are printed above.",
                        err)
    return 0


main = cli.command_main(__name__)

if __name__ == "__main__":
    sys.exit(main())
