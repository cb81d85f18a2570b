"""The paper's Table 3 and Figure 8 in one command.

    python -m rsjax.experiments.segmentation_table --workdir work/table3 [--variant demo]

1. trains RS-SPADE (or reuses `--fusion_workdir`), 2. synthesizes one optical
image per training tile, 3. trains RS-UNet on real tiles only (the paper's
True Dataset) and on real + generated 1:1 (Mix), both scored on the real test
tiles, 4. writes `table3.md`/`table3.json` with the paper's numbers beside
ours and `figure8.png`, validation mIoU against training progress for both.
Every stage is skipped when its output is already there, so a killed
experiment resumes where it stopped.
"""
from __future__ import annotations

import json
from pathlib import Path

from absl import app, flags

from rsjax.experiments.fusion_tables import load_config

FLAGS = flags.FLAGS


PAPER_TABLE3 = {"Mix Data": (0.480, 0.746), "True Data": (0.467, 0.734)}


def _finished(workdir: Path, steps: int) -> bool:
    path = workdir / "eval_test.json"
    return path.exists() and json.loads(path.read_text()).get("step") == steps


def run(root: Path, variant: str, fusion_workdir=None, seg_steps=0, fusion_steps=0) -> dict:
    from rsjax import synthesize, viz
    from rsjax.trainers import fusion, segmentation

    fusion_cfg = load_config("configs/fusion.py", variant)
    if fusion_steps:
        fusion_cfg.total_steps = fusion_steps
    if fusion_workdir is None:
        fusion_workdir = root / "rs_spade"
        if not _finished(Path(fusion_workdir), fusion_cfg.total_steps):
            print("[1/4] training RS-SPADE", flush=True)
            fusion.train_and_evaluate(fusion_cfg, str(fusion_workdir))
    generated = root / "generated_train"
    if not (generated / "provenance.json").exists():
        print("[2/4] synthesizing the training split", flush=True)
        synthesize.synthesize(fusion_cfg, str(fusion_workdir), "train", out=str(generated))

    results, curves = {}, {}
    for i, (name, data) in enumerate((("True Data", "real"), ("Mix Data", "mix")), 3):
        cfg = load_config("configs/segmentation.py", ",".join(filter(None, [variant, f"data={data}"])))
        if seg_steps:
            cfg.total_steps = seg_steps
        cfg.data.generated_dir = str(generated)
        workdir = root / f"seg_{data}"
        if not _finished(workdir, cfg.total_steps):
            print(f"[{i}/4] training RS-UNet on {name}", flush=True)
            segmentation.train_and_evaluate(cfg, str(workdir))
        results[name] = json.loads((workdir / "eval_test.json").read_text())
        history = [json.loads(line) for line in
                   (workdir / "val_history.jsonl").read_text().splitlines()] \
            if (workdir / "val_history.jsonl").exists() else []
        curves[name] = ([h["step"] for h in history], [h["miou"] for h in history])

    lines = ["| training data | mIoU | accuracy | paper mIoU | paper accuracy |",
             "|---|---:|---:|---:|---:|"]
    for name in ("True Data", "Mix Data"):
        r, p = results[name], PAPER_TABLE3[name]
        lines.append(f"| {name} | {r['miou']:.3f} | {r['accuracy']:.3f} | {p[0]:.3f} | {p[1]:.3f} |")
    table = "\n".join(lines) + "\n"
    (root / "table3.md").write_text(table)
    (root / "table3.json").write_text(json.dumps(
        {"ours": {k: {"miou": v["miou"], "accuracy": v["accuracy"],
                      "per_class_iou": v.get("per_class_iou")} for k, v in results.items()},
         "paper": PAPER_TABLE3}, indent=2))
    viz.plot_curves(curves, root / "figure8.png", xlabel="training step", ylabel="validation mIoU",
                    title="RS-UNet: real only vs real + generated (1:1)")
    return {"table": table, "results": results}


def main(argv):
    del argv
    from rsjax.runtime import prepare_process
    prepare_process()
    root = Path(FLAGS.workdir)
    root.mkdir(parents=True, exist_ok=True)
    out = run(root, FLAGS.variant, FLAGS.fusion_workdir, FLAGS.seg_steps, FLAGS.fusion_steps)
    print(out["table"])


def define_flags():
    """Command-line flags, defined only when run as a command, so that importing
    this module beside other commands (tests, experiments) defines nothing."""
    flags.DEFINE_string("workdir", "work/table3", "Root of the experiment's runs.")
    flags.DEFINE_string("variant", "demo", "Config argument of every run ('' = full size).")
    flags.DEFINE_string("fusion_workdir", None,
                                          "A trained RS-SPADE run to reuse (default: train one).")
    flags.DEFINE_integer("seg_steps", 0, "Override the segmentation runs' total_steps.")
    flags.DEFINE_integer("fusion_steps", 0, "Override the fusion run's total_steps.")


if __name__ == "__main__":
    define_flags()
    app.run(main)
