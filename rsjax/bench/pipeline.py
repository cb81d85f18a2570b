"""Benchmark of the data path: dataset build, then the training input pipeline.

    rsjax bench pipeline                        # synthetic_demo, 64 px tiles
    rsjax bench pipeline --dataset synthetic --tile_size 256 --batch_size 8

Prints JSON: the build's tiles/s (ingestion of every scene + TFDS writing,
all splits, into a fresh temporary data_dir) and the pipeline's tiles/s
(read from array_record + normalize + augment + batch, training mode, host
numpy batches) with 0, 1 and 2 grain worker processes.
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time

import ml_collections

from rsjax import build_dataset, cli, input_pipeline, runtime
from rsjax.errors import UserError


def time_pipeline(data_cfg, *, batch_size: int, batches: int, worker_count: int) -> dict:

    cfg = ml_collections.ConfigDict(data_cfg.to_dict())
    cfg.worker_count = worker_count
    started = time.perf_counter()
    it = input_pipeline.create_iterator(cfg, "train", global_batch_size=batch_size, mesh=None,
                                        train=True, seed=0)
    for _ in range(2):                      # start-up (worker processes, first reads) untimed
        next(it)
    startup = time.perf_counter() - started
    started = time.perf_counter()
    for _ in range(batches):
        next(it)
    seconds = time.perf_counter() - started
    del it
    return {"tiles_per_s": round(batches * batch_size / seconds, 1),
            "startup_s": round(startup, 2), "timed_tiles": batches * batch_size}

# Old option names, still taken for one release (see rsjax.cli.rename_options).
RENAMED_OPTIONS = {"--config": "--dataset"}


def add_arguments(parser) -> None:
    parser.add_argument("--dataset", default="synthetic_demo", metavar="NAME",
                        help="builder config: synthetic, synthetic_demo or manual")
    parser.add_argument("--tile_size", type=int, default=None, help="tile side (default: the config's)")
    parser.add_argument("--block_tiles", type=int, default=None,
                        help="split block side in tiles (default: the config's)")
    parser.add_argument("--split_seed", type=int, default=None,
                        help="split hash salt (default: the config's)")
    parser.add_argument("--manual_dir", default=None, help="scenes for the manual config")
    parser.add_argument("--data_dir", default=None,
                        help="reuse this data_dir (no build figure when already built; default: "
                             "a fresh temporary one, removed afterwards)")
    parser.add_argument("--batch_size", type=cli.positive_int, default=8, help="global batch size")
    parser.add_argument("--batches", type=cli.positive_int, default=40,
                        help="timed batches per worker setting")
    parser.add_argument("--workers", default="0,1,2",
                        help="grain worker counts to time, comma-separated")


def _worker_counts(text: str) -> list[int]:
    try:
        counts = [int(w) for w in text.split(",") if w.strip()]
    except ValueError:
        counts = []
    if not counts or min(counts) < 0:
        raise UserError(f"--workers {text}: give comma-separated worker counts (0 or more), e.g. 0,1,2")
    return counts


def run(args) -> int:
    workers = _worker_counts(args.workers)
    cfg = build_dataset.data_config(args.dataset, "", tile_size=args.tile_size,
                                    block_tiles=args.block_tiles, split_seed=args.split_seed)
    build_dataset.check_builder_config(cfg)
    build_dataset.check_manual_dir(args.dataset, args.manual_dir)
    data_dir = args.data_dir or tempfile.mkdtemp(prefix="rsjax_bench_")
    try:
        cfg.data_dir = data_dir
        cfg.augment = True
        summary = input_pipeline.build(cfg, manual_dir=args.manual_dir)
        cfg.tile_size = input_pipeline.get_builder(cfg).builder_config.tile_size
        out = {
            "machine": f"{runtime.cpu_name()}, {os.cpu_count()} CPUs",
            "dataset": summary["dataset"],
            "tile_size": cfg.tile_size,
            "splits": summary["splits"],
            "build": {"tiles": sum(summary["splits"].values()), "seconds": summary["seconds"],
                      "tiles_per_s": summary["tiles_per_s"]},
            "pipeline": {"batch_size": args.batch_size, "sources": ["lulc", "s1", "dem"],
                         "augment": True},
        }
        for count in workers:
            out["pipeline"][f"workers_{count}"] = time_pipeline(
                cfg, batch_size=args.batch_size, batches=args.batches, worker_count=count)
    finally:
        if not args.data_dir:
            shutil.rmtree(data_dir, ignore_errors=True)
    cli.print_json(out)
    return 0


main = cli.command_main(__name__)

if __name__ == "__main__":
    sys.exit(main())
