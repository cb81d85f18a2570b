"""The paper's Table 3 and Figure 8 in one command.

    rsjax experiments table3 --workdir work/table3 [--variant demo]
    rsjax experiments table3 --workdir work/table3 --fusion_workdir work/tables/RS-SPADE

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
import sys
from pathlib import Path

from rsjax import cli
from rsjax.experiments.fusion_tables import config_spec


PAPER_TABLE3 = {"Mix Data": (0.480, 0.746), "True Data": (0.467, 0.734)}


def _finished(workdir: Path, steps: int) -> bool:
    path = workdir / "eval_test.json"
    return path.exists() and json.loads(path.read_text()).get("step") == steps


def fusion_config(variant: str, fusion_steps: int = 0):
    from rsjax.config_loader import load_config

    config = load_config(config_spec("fusion", variant))
    if fusion_steps:
        config.total_steps = fusion_steps
    return config


def segmentation_config(variant: str, data: str, seg_steps: int = 0):
    from rsjax.config_loader import load_config

    config = load_config(config_spec("segmentation", variant, f"data={data}"))
    if seg_steps:
        config.total_steps = seg_steps
    return config


def run_experiment(root: Path, variant: str, fusion_workdir=None, seg_steps=0,
                   fusion_steps=0) -> dict:
    from rsjax import synthesize, viz
    from rsjax.trainers import fusion, segmentation

    fusion_cfg = fusion_config(variant, fusion_steps)
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
        cfg = segmentation_config(variant, data, seg_steps)
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


def add_arguments(parser) -> None:
    parser.add_argument("--workdir", default="work/table3",
                        help="root of the experiment's runs (one sub-workdir per stage)")
    parser.add_argument("--variant", default="demo",
                        help="config argument of every run ('' = full size)")
    parser.add_argument("--fusion_workdir", default=None,
                        help="a trained RS-SPADE run to reuse (default: train one)")
    parser.add_argument("--seg_steps", type=cli.nonnegative_int, default=0,
                        help="override the segmentation runs' total_steps (0: the config's)")
    parser.add_argument("--fusion_steps", type=cli.nonnegative_int, default=0,
                        help="override the fusion run's total_steps (0: the config's)")


def run(args) -> int:
    fusion_config(args.variant, args.fusion_steps)       # the configs load before anything starts
    for data in ("real", "mix"):
        segmentation_config(args.variant, data, args.seg_steps)
    if args.fusion_workdir is not None:
        from rsjax import evaluate
        evaluate.check_workdir(args.fusion_workdir)
    from rsjax.runtime import prepare_process
    prepare_process()
    root = Path(args.workdir)
    root.mkdir(parents=True, exist_ok=True)
    out = run_experiment(root, args.variant, args.fusion_workdir, args.seg_steps,
                         args.fusion_steps)
    print(out["table"])
    return 0


main = cli.command_main(__name__)

if __name__ == "__main__":
    sys.exit(main())
