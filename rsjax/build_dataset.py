"""Builds the rs_multisource TFDS dataset, with progress bars, and prints the split counts.

    python -m rsjax.build_dataset --config synthetic_demo --data_dir work/tensorflow_datasets
    python -m rsjax.build_dataset --config synthetic --tile_size 128
    python -m rsjax.build_dataset --config manual --manual_dir /path/to/exports --tile_size 256

The same build as `tfds build tfds_builder/rs_multisource --config NAME`
(array_record files that read without TensorFlow). Options that differ from
the named config (tile size, stride, ...) build a derived config named after
them, e.g. `synthetic_t128`; `rsjax.input_pipeline` finds it from the data
config's `name` and `tile_size`.
"""
from __future__ import annotations

import json
import time

from absl import app
from absl import flags
import ml_collections

FLAGS = flags.FLAGS
flags.DEFINE_string("config", "synthetic", "builder config: synthetic, synthetic_demo or manual")
flags.DEFINE_string("data_dir", "work/tensorflow_datasets", "TFDS data_dir to write to")
flags.DEFINE_integer("tile_size", None, "tile side in pixels (default: the config's)")
flags.DEFINE_integer("stride", None, "step between tiles in pixels (default: tile_size)")
flags.DEFINE_float("max_nodata_fraction", None, "drop tiles with more no-data than this")
flags.DEFINE_enum("split_mode", None, ["block", "random"], "spatial blocks or the paper's random split")
flags.DEFINE_integer("block_tiles", None, "side of a split block, in tiles")
flags.DEFINE_string("manual_dir", None, "folder of <scene>_{s2,s1,lulc,dem}.tif (manual config)")
flags.DEFINE_enum("file_format", "array_record", ["array_record", "tfrecord"],
                  "tfrecord needs TensorFlow (the `tf` extra)")
flags.DEFINE_boolean("overwrite", False, "rebuild even if the dataset is already there")


def data_config_from_flags() -> ml_collections.ConfigDict:
    cfg = ml_collections.ConfigDict()
    cfg.name = f"rs_multisource/{FLAGS.config}"
    cfg.data_dir = FLAGS.data_dir
    for key in ("tile_size", "stride", "max_nodata_fraction", "split_mode", "block_tiles"):
        cfg[key] = getattr(FLAGS, key)
    return cfg


def build(data_cfg, *, manual_dir=None, file_format="array_record", overwrite=False) -> dict:
    """Builds (or finds) the dataset; returns a summary with split counts and tiles/s."""
    import tensorflow_datasets as tfds
    from rsjax import input_pipeline

    tfds.display_progress_bar(True)   # TFDS's tqdm bars: examples generated, shuffled, written
    config = input_pipeline.builder_config_for(data_cfg)
    module = input_pipeline._builder_module()  # pylint: disable=protected-access
    builder = module.Builder(config=config, data_dir=str(data_cfg.data_dir), file_format=file_format)
    started = time.perf_counter()
    mode = (tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS if overwrite
            else tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS)
    built = overwrite or not builder.is_prepared()
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        manual_dir=manual_dir, download_mode=mode))
    seconds = time.perf_counter() - started
    counts = {name: split.num_examples for name, split in builder.info.splits.items()}
    total = sum(counts.values())
    return {
        "dataset": f"{builder.name}/{builder.builder_config.name}",
        "data_dir": str(builder.data_dir),
        "splits": counts,
        "built": built,
        "seconds": round(seconds, 2),
        "tiles_per_s": round(total / seconds, 2) if built and seconds > 0 else None,
        "build_report": builder.info.metadata.get(module.BUILD_REPORT_KEY),
    }


def main(argv):
    del argv
    summary = build(data_config_from_flags(), manual_dir=FLAGS.manual_dir,
                    file_format=FLAGS.file_format, overwrite=FLAGS.overwrite)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    app.run(main)
