"""The paper's Tables 1 and 2 on one dataset, in one command.

    rsjax experiments tables --workdir work/tables [--variant demo]
    rsjax experiments tables --workdir work/tables --only RS-SPADE,S1 --steps 200

Table 1: RS-SPADE against pix2pix, all sources. Table 2: RS-SPADE on each
source subset of the paper (S1, LULC, LULC+S1, LULC+DEM, S1+DEM, all three).
Each run trains in its own sub-workdir (so a killed experiment resumes run by
run, and finished runs are not trained again), is scored on the test split,
and the results are written as `tables.md` and `tables.json` with the paper's
numbers beside ours.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from rsjax import cli


# The paper's numbers (PSNR, SSIM, SAM).
PAPER_TABLE1 = {"pix2pix": (18.84, 0.62, 0.23), "RS-SPADE": (23.14, 0.84, 0.19)}
PAPER_TABLE2 = {"S1": (18.83, 0.76, 0.25), "LULC": (20.77, 0.80, 0.21),
                "LULC+S1": (21.10, 0.80, 0.22), "LULC+DEM": (21.36, 0.81, 0.21),
                "S1+DEM": (21.89, 0.82, 0.20), "S1+LULC+DEM": (23.14, 0.84, 0.19)}

# run name -> (config name, sources)
RUNS = {
    "pix2pix": ("pix2pix", "all"),
    "RS-SPADE": ("fusion", "all"),
    "S1": ("fusion", "s1"),
    "LULC": ("fusion", "lulc"),
    "LULC+S1": ("fusion", "lulc+s1"),
    "LULC+DEM": ("fusion", "lulc+dem"),
    "S1+DEM": ("fusion", "s1+dem"),
}


def config_spec(name: str, *args: str) -> str:
    """'fusion' with args ('demo', 'sources=s1') -> 'fusion:demo,sources=s1'."""
    arg = ",".join(a for a in args if a)
    return f"{name}:{arg}" if arg else name


def run_config(name: str, variant: str, steps: int = 0):
    """The locked config of run `name` (see RUNS)."""
    from rsjax.config_loader import load_config

    config_name, sources = RUNS[name]
    config = load_config(config_spec(config_name, variant, f"sources={sources}"))
    if steps:
        config.total_steps = steps
        if config.optim.decay_start_step is not None:
            config.optim.decay_start_step = steps // 2
    return config


def run_one(name: str, root: Path, variant: str, steps: int) -> dict:
    from rsjax.trainers import fusion

    config = run_config(name, variant, steps)
    workdir = root / name.replace("+", "_")
    done = workdir / "eval_test.json"
    if done.exists():
        scores = json.loads(done.read_text())
        if scores.get("step") == config.total_steps:
            return scores
    t0 = time.time()
    result = fusion.train_and_evaluate(config, str(workdir))
    result["train_seconds"] = round(time.time() - t0, 1)
    return result


def write_tables(results: dict, root: Path) -> str:
    def row(name, paper):
        s = results.get(name)
        ours = (f"{s['psnr']:.2f} | {s['ssim']:.3f} | {s['sam']:.3f}" if s else "not run | | ")
        p = paper.get(name)
        return f"| {name} | {ours} | {p[0]:.2f} | {p[1]:.2f} | {p[2]:.2f} |"

    head = ("| input / model | PSNR | SSIM | SAM (rad) | paper PSNR | paper SSIM | paper SAM |\n"
            "|---|---:|---:|---:|---:|---:|---:|")
    t1 = "\n".join(["### Table 1: RS-SPADE against pix2pix (all sources)", "", head,
                    row("pix2pix", PAPER_TABLE1), row("RS-SPADE", PAPER_TABLE1)])
    t2_rows = [row(n, PAPER_TABLE2) for n in ("S1", "LULC", "LULC+S1", "LULC+DEM", "S1+DEM")]
    results.setdefault("S1+LULC+DEM", results.get("RS-SPADE"))
    t2_rows.append(row("S1+LULC+DEM", PAPER_TABLE2))
    t2 = "\n".join(["### Table 2: RS-SPADE on source subsets", "", head, *t2_rows])
    text = t1 + "\n\n" + t2 + "\n"
    (root / "tables.md").write_text(text)
    (root / "tables.json").write_text(json.dumps(
        {"ours": {k: v for k, v in results.items() if v}, "paper_table1": PAPER_TABLE1,
         "paper_table2": PAPER_TABLE2}, indent=2, default=float))
    return text


def add_arguments(parser) -> None:
    parser.add_argument("--workdir", default="work/tables",
                        help="root of the experiment's runs (one sub-workdir per run)")
    parser.add_argument("--variant", default="demo",
                        help="config argument every run gets ('' = full size)")
    parser.add_argument("--steps", type=cli.nonnegative_int, default=0,
                        help="override total_steps of every run (0: the config's)")
    parser.add_argument("--only", type=cli.name_list(tuple(RUNS)), default=",".join(RUNS),
                        help=f"comma-separated runs to do, of {','.join(RUNS)}")


def run(args) -> int:
    names = args.only
    for name in names:                      # every run's config loads before anything starts
        run_config(name, args.variant, args.steps)
    from rsjax.runtime import prepare_process
    prepare_process()
    root = Path(args.workdir)
    root.mkdir(parents=True, exist_ok=True)
    results = {}
    for i, name in enumerate(names, 1):
        print(f"[{i}/{len(names)}] {name}", flush=True)
        results[name] = run_one(name, root, args.variant, args.steps)
        print(json.dumps({name: results[name]}, default=float), flush=True)
    print(write_tables(results, root))
    return 0


main = cli.command_main(__name__)

if __name__ == "__main__":
    sys.exit(main())
