"""Benchmark of the data path: dataset build, then the training input pipeline.

    python -m rsjax.bench_pipeline                        # synthetic_demo, 64 px tiles
    python -m rsjax.bench_pipeline --config synthetic --tile_size 256 --batch_size 8

Prints JSON: the build's tiles/s (ingestion of every scene + TFDS writing,
all splits, into a fresh temporary data_dir) and the pipeline's tiles/s
(read from array_record + normalize + augment + batch, training mode, host
numpy batches) with 0, 1 and 2 grain worker processes.
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import tempfile
import time

from absl import app
from absl import flags
import ml_collections

from rsjax import input_pipeline

FLAGS = flags.FLAGS
flags.DEFINE_string("config", "synthetic_demo", "builder config")
flags.DEFINE_integer("tile_size", None, "tile size (default: the config's)")
flags.DEFINE_integer("block_tiles", None, "split block side in tiles (default: the config's)")
flags.DEFINE_integer("split_seed", None, "split hash salt (default: the config's)")
flags.DEFINE_string("manual_dir", None, "scenes for the manual config")
flags.DEFINE_string("data_dir", None, "reuse this data_dir (skips the build figure when built)")
flags.DEFINE_integer("batch_size", 8, "global batch size")
flags.DEFINE_integer("batches", 40, "timed batches per worker setting")
flags.DEFINE_list("workers", ["0", "1", "2"], "grain worker counts to time")


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


def main(argv):
    del argv

    data_dir = FLAGS.data_dir or tempfile.mkdtemp(prefix="rsjax_bench_")
    cfg = ml_collections.ConfigDict()
    cfg.name = f"rs_multisource/{FLAGS.config}"
    cfg.data_dir = data_dir
    cfg.tile_size = FLAGS.tile_size
    cfg.block_tiles = FLAGS.block_tiles
    cfg.split_seed = FLAGS.split_seed
    cfg.augment = True
    summary = input_pipeline.build(cfg, manual_dir=FLAGS.manual_dir)
    cfg.tile_size = input_pipeline.get_builder(cfg).builder_config.tile_size
    out = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "dataset": summary["dataset"],
        "tile_size": cfg.tile_size,
        "splits": summary["splits"],
        "build": {"tiles": sum(summary["splits"].values()), "seconds": summary["seconds"],
                  "tiles_per_s": summary["tiles_per_s"]},
        "pipeline": {"batch_size": FLAGS.batch_size, "sources": ["lulc", "s1", "dem"],
                     "augment": True},
    }
    for workers in (int(w) for w in FLAGS.workers):
        out["pipeline"][f"workers_{workers}"] = time_pipeline(
            cfg, batch_size=FLAGS.batch_size, batches=FLAGS.batches, worker_count=workers)
    print(json.dumps(out, indent=2))
    if not FLAGS.data_dir:
        shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
    app.run(main)
