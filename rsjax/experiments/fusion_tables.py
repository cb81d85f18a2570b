"""The paper's Tables 1 and 2 on one dataset, in one command.

    python -m rsjax.experiments.fusion_tables --workdir work/tables [--variant demo]

Table 1: RS-SPADE against pix2pix, all sources. Table 2: RS-SPADE on each
source subset of the paper (S1, LULC, LULC+S1, LULC+DEM, S1+DEM, all three).
Each run trains in its own sub-workdir (so a killed experiment resumes run by
run, and finished runs are not trained again), is scored on the test split,
and the results are written as `tables.md` and `tables.json` with the paper's
numbers beside ours.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from absl import app, flags

FLAGS = flags.FLAGS


# The paper's numbers (PSNR, SSIM, SAM).
PAPER_TABLE1 = {"pix2pix": (18.84, 0.62, 0.23), "RS-SPADE": (23.14, 0.84, 0.19)}
PAPER_TABLE2 = {"S1": (18.83, 0.76, 0.25), "LULC": (20.77, 0.80, 0.21),
                "LULC+S1": (21.10, 0.80, 0.22), "LULC+DEM": (21.36, 0.81, 0.21),
                "S1+DEM": (21.89, 0.82, 0.20), "S1+LULC+DEM": (23.14, 0.84, 0.19)}

# run name -> (config file, sources)
RUNS = {
    "pix2pix": ("configs/pix2pix.py", "all"),
    "RS-SPADE": ("configs/fusion.py", "all"),
    "S1": ("configs/fusion.py", "s1"),
    "LULC": ("configs/fusion.py", "lulc"),
    "LULC+S1": ("configs/fusion.py", "lulc+s1"),
    "LULC+DEM": ("configs/fusion.py", "lulc+dem"),
    "S1+DEM": ("configs/fusion.py", "s1+dem"),
}


REPO_ROOT = Path(__file__).resolve().parents[2]


def load_config(path: str, arg: str):
    """get_config(arg) of a config file (relative to the repository root)."""
    import importlib.util
    full = Path(path) if Path(path).is_absolute() else REPO_ROOT / path
    spec = importlib.util.spec_from_file_location(f"cfg_{full.stem}", full)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(arg)
    config.lock()
    return config


def run_one(name: str, root: Path, variant: str, steps: int) -> dict:
    from rsjax.trainers import fusion

    path, sources = RUNS[name]
    arg = ",".join(filter(None, [variant, f"sources={sources}"]))
    config = load_config(path, arg)
    if steps:
        config.total_steps = steps
        if config.optim.decay_start_step is not None:
            config.optim.decay_start_step = steps // 2
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


def main(argv):
    del argv
    from rsjax.runtime import prepare_process
    prepare_process()
    root = Path(FLAGS.workdir)
    root.mkdir(parents=True, exist_ok=True)
    names = FLAGS.only or list(RUNS)
    results = {}
    for i, name in enumerate(names, 1):
        print(f"[{i}/{len(names)}] {name}", flush=True)
        results[name] = run_one(name, root, FLAGS.variant, FLAGS.steps)
        print(json.dumps({name: results[name]}, default=float), flush=True)
    print(write_tables(results, root))


def define_flags():
    """Command-line flags, defined only when run as a command, so that importing
    this module beside other commands (tests, experiments) defines nothing."""
    flags.DEFINE_string("workdir", "work/tables", "Root of the experiment's runs.")
    flags.DEFINE_string("variant", "demo", "Config argument every run gets ('' = full size).")
    flags.DEFINE_integer("steps", 0, "Override total_steps of every run (0: the config's).")
    flags.DEFINE_list("only", [], "Run only these run names (default: all).")


if __name__ == "__main__":
    define_flags()
    app.run(main)
