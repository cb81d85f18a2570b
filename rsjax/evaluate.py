"""`python -m rsjax.evaluate --config CFG --workdir DIR [--step N] [--split test]`

Scores a fusion checkpoint (written on any device count) on a whole split and
writes `eval_<split>_<step>.json`, a Markdown table and a figure of generated
against real images (RGB and NIR-R-G false colour) into the workdir.
"""
from __future__ import annotations

import json
import logging
from typing import Optional

from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS


METRIC_ROWS = (("psnr", "PSNR (dB)", "{:.2f}"), ("ssim", "SSIM", "{:.3f}"),
               ("sam", "SAM (rad)", "{:.3f}"), ("sam_deg", "SAM (deg)", "{:.2f}"))


def evaluate_checkpoint(config, workdir: str, split: str = "test",
                        step: Optional[int] = None, devices=None) -> dict:
    """Scores a checkpoint on `split`; the mesh (default: every device) need not
    match the one the checkpoint was written on."""
    import jax
    from etils import epath

    from rsjax import viz
    from rsjax.trainers import common, fusion

    setup, state, step, mesh = fusion.restore_for_eval(config, workdir, step, devices=devices)
    scores, shown = fusion.evaluate_split(setup, state, config, split, mesh, collect_images=4)
    out = epath.Path(common.workdir_path(workdir))
    result = {"step": int(step), "split": split, "sources": list(setup.sources),
              "generator": config.generator.name, "devices": int(mesh.devices.size), **scores}
    if jax.process_index() != 0:       # every host scored; one writes
        return result
    (out / f"eval_{split}_{step}.json").write_text(json.dumps(result, indent=2))
    (out / f"eval_{split}_{step}.md").write_text(markdown_table([(config.generator.name, scores)]))
    if shown is not None:
        viz.image_grid({"real": shown["real"], "generated": shown["fake"],
                        "land cover": shown["label"]}, out / f"eval_{split}_{step}.png")
    return result


def markdown_table(rows, paper: Optional[dict] = None) -> str:
    """rows: [(name, scores)], paper: {name: (psnr, ssim, sam)} printed beside ours."""
    head = "| model | PSNR | SSIM | SAM (rad) |" + (" paper PSNR | paper SSIM | paper SAM |" if paper else "")
    sep = "|---|---:|---:|---:|" + ("---:|---:|---:|" if paper else "")
    lines = [head, sep]
    for name, s in rows:
        line = f"| {name} | {s['psnr']:.2f} | {s['ssim']:.3f} | {s['sam']:.3f} |"
        if paper:
            p = paper.get(name)
            line += (" {:.2f} | {:.2f} | {:.2f} |".format(*p) if p else " | | |")
        lines.append(line)
    return "\n".join(lines) + "\n"


def main(argv):
    del argv
    logging.getLogger().setLevel(logging.INFO)
    result = evaluate_checkpoint(FLAGS.config, FLAGS.workdir, FLAGS.split, FLAGS.step)
    print(json.dumps(result, indent=2))


def define_flags():
    """Command-line flags, defined only when run as a command, so that importing
    this module beside other commands (tests, experiments) defines nothing."""
    config_flags.DEFINE_config_file("config", None, "The training config.", lock_config=True)
    flags.DEFINE_string("workdir", None, "The training run's workdir.")
    flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
    flags.DEFINE_string("split", "test", "Split to score: train, validation or test.")
    flags.mark_flags_as_required(["config", "workdir"])


if __name__ == "__main__":
    define_flags()
    app.run(main)
