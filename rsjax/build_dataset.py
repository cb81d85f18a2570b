"""Builds the rs_multisource TFDS dataset, with progress bars, and prints the split counts.

    python -m rsjax.build_dataset --config synthetic_demo --data_dir work/tensorflow_datasets
    python -m rsjax.build_dataset --config synthetic --tile_size 128
    python -m rsjax.build_dataset --config manual --manual_dir /path/to/exports --tile_size 256
    python -m rsjax.build_dataset --config synthetic --beam_pipeline_options \
        direct_num_workers=2,direct_running_mode=multi_processing       # on Apache Beam

The same build as `tfds build tfds_builder/rs_multisource --config NAME`
(array_record files that read without TensorFlow). Options that differ from
the named config (tile size, stride, ...) build a derived config named after
them, e.g. `synthetic_t128`; `rsjax.input_pipeline` finds it from the data
config's `name` and `tile_size`.
"""
from __future__ import annotations

import json

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
flags.DEFINE_integer("split_seed", None, "salt of the split hash (another value, another partition)")
flags.DEFINE_string("manual_dir", None, "folder of <scene>_{s2,s1,lulc,dem}.tif (manual config)")
flags.DEFINE_enum("file_format", "array_record", ["array_record", "tfrecord"],
                  "tfrecord needs TensorFlow (the `tf` extra)")
flags.DEFINE_boolean("overwrite", False, "rebuild even if the dataset is already there")
flags.DEFINE_string("beam_pipeline_options", None,
                    "build with Apache Beam (the `beam` extra): comma-separated key=value "
                    "pipeline options, as `tfds build` takes them, e.g. "
                    "'direct_num_workers=2,direct_running_mode=multi_processing' or "
                    "'runner=DataflowRunner,project=P,region=R,temp_location=gs://B/tmp'")


def data_config_from_flags() -> ml_collections.ConfigDict:
    cfg = ml_collections.ConfigDict()
    cfg.name = f"rs_multisource/{FLAGS.config}"
    cfg.data_dir = FLAGS.data_dir
    for key in ("tile_size", "stride", "max_nodata_fraction", "split_mode", "block_tiles", "split_seed"):
        cfg[key] = getattr(FLAGS, key)
    return cfg


def main(argv):
    del argv
    from rsjax import input_pipeline
    summary = input_pipeline.build(data_config_from_flags(), manual_dir=FLAGS.manual_dir,
                    file_format=FLAGS.file_format, overwrite=FLAGS.overwrite,
                    beam_pipeline_options=FLAGS.beam_pipeline_options)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    app.run(main)
