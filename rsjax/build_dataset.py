"""Build the rs_multisource TFDS dataset, with progress bars, and print the split counts.

    rsjax build --dataset synthetic_demo
    rsjax build --dataset synthetic --tile_size 128
    rsjax build --dataset manual --manual_dir /path/to/exports --tile_size 256
    rsjax build --dataset manual --manual_dir gs://bucket/exports \\
        --beam_pipeline_options direct_num_workers=2,direct_running_mode=multi_processing

`--dataset` is one of the builder's configs: `synthetic` (8 scenes of 1024 px),
`synthetic_demo` (the quick start's small one) or `manual` (your GeoTIFF
exports in `--manual_dir`); for cloud removal `synthetic_cloudy[_demo]` and
`manual_cloudy` (with `<scene>_s2_cloudy.tif` and `<scene>_cloudmask.tif`). The same build as `tfds build` on the builder
(array_record files that read without TensorFlow). Options that differ from
the named config (tile size, stride, ...) build a derived config named after
them, e.g. `synthetic_t128`; `rsjax.input_pipeline` finds it from the data
config's `name` and `tile_size`. A dataset already built is found, not rebuilt
(`--overwrite` rebuilds it). Training builds its dataset itself when missing.
"""
from __future__ import annotations

import os
import sys

import ml_collections

from rsjax import cli
from rsjax.errors import ConfigError, UserError

DATASET = "rs_multisource"
TILING_OPTIONS = ("tile_size", "stride", "max_nodata_fraction", "split_mode", "block_tiles",
                  "split_seed", "s2_offset", "lulc_map", "lulc_legend", "s1_units",
                  "skip_incomplete_scenes", "allow_missing_lulc")

# Old option names, still taken for one release (see rsjax.cli.rename_options).
RENAMED_OPTIONS = {"--config": "--dataset"}


def add_arguments(parser) -> None:
    parser.add_argument("--dataset", default="synthetic", metavar="NAME",
                        help="builder config: synthetic, synthetic_demo or manual")
    parser.add_argument("--data_dir", default=None,
                        help="TFDS data_dir to write to (local path or gs://; default: "
                             "$TFDS_DATA_DIR, else ~/tensorflow_datasets)")
    parser.add_argument("--tile_size", type=int, default=None,
                        help="tile side in pixels (default: the config's)")
    parser.add_argument("--stride", type=int, default=None,
                        help="step between tiles in pixels (default: tile_size)")
    parser.add_argument("--max_nodata_fraction", type=float, default=None,
                        help="drop tiles with a larger no-data fraction (default: the config's)")
    parser.add_argument("--split_mode", default=None, choices=("block", "random"),
                        help="spatial blocks, or the paper's random split (default: the config's)")
    parser.add_argument("--block_tiles", type=int, default=None,
                        help="side of a split block, in tiles (default: the config's)")
    parser.add_argument("--split_seed", type=int, default=None,
                        help="salt of the split hash: another value, another partition "
                             "(default: the config's)")
    from rsjax.commands.ingest import add_reading_options

    add_reading_options(parser, from_config=True)
    parser.add_argument("--skip_incomplete_scenes", action="store_true", default=None,
                        help="skip (and list in the build report) scenes that miss a source, "
                             "instead of failing")
    parser.add_argument("--allow_missing_lulc", action="store_true", default=None,
                        help="scenes may lack <scene>_lulc.tif (their land cover is all 255, "
                             "no data)")
    parser.add_argument("--manual_dir", default=None,
                        help="folder of <scene>_{s2,s1,lulc,dem}.tif (the manual config)")
    parser.add_argument("--file_format", default="array_record", choices=("array_record", "tfrecord"),
                        help="tfrecord needs TensorFlow (the `tf` extra)")
    parser.add_argument("--overwrite", action="store_true",
                        help="rebuild even if the dataset is already there")
    parser.add_argument("--beam_pipeline_options", default=None, metavar="KEY=VALUE,...",
                        help="build on Apache Beam (the `beam` extra) with these pipeline options, "
                             "as `tfds build` takes them: e.g. "
                             "'direct_num_workers=2,direct_running_mode=multi_processing' (local "
                             "processes) or 'runner=DataflowRunner,project=P,region=R,"
                             "temp_location=gs://B/tmp,setup_file=./setup.py'; the same dataset "
                             "as without")


def data_config(name: str, data_dir: str, **options) -> ml_collections.ConfigDict:
    """The data config the training configs hold, for builder config `name`."""
    cfg = ml_collections.ConfigDict()
    cfg.name = f"{DATASET}/{name}"
    cfg.data_dir = data_dir
    for key in TILING_OPTIONS:
        cfg[key] = options.get(key)
    return cfg


def check_builder_config(data_cfg):
    """The builder config `data_cfg` names, with its options; ConfigError names
    the flag at fault. Creates nothing."""
    from rsjax import input_pipeline
    from rsjax.tfds_builder.rs_multisource import rs_multisource_dataset_builder as builder

    names = list(builder.Builder.builder_configs)
    name = str(data_cfg.name).partition("/")[2]
    if name not in names:
        import difflib
        close = difflib.get_close_matches(name, names, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"--dataset {name}: unknown dataset config.{hint} Choose one of "
                          f"{', '.join(names)}.")
    try:
        return input_pipeline.builder_config_for(data_cfg)
    except ValueError as err:            # a tiling option out of range, named by the builder
        raise ConfigError(f"{err}. Change that option (rsjax build --help).") from None


def check_manual_dir(config_name: str, manual_dir, require_lulc: bool = True,
                     skip_incomplete: bool = False) -> None:
    """The manual configs read scenes from `manual_dir`: check they are there
    (and complete, as the options ask) before TFDS creates anything."""
    if not config_name.startswith("manual"):
        return
    if manual_dir is None:
        raise UserError(f"--dataset {config_name} reads your exports: give --manual_dir FOLDER "
                        "(the folder of <scene>_{s2,s1,lulc,dem}.tif files).")
    from rsjax import input_pipeline

    input_pipeline.check_manual_dir(manual_dir, require_lulc=require_lulc,
                                    skip_incomplete=skip_incomplete,
                                    clouds=config_name.startswith("manual_cloudy"))


def check_file_format(file_format: str) -> None:
    """TFDS writes TFRecord files with TensorFlow: without it a build would stop
    at the end of its first split with an import error."""
    if file_format != "tfrecord":
        return
    try:
        import tensorflow  # noqa: F401
    except ImportError:
        raise UserError("--file_format tfrecord needs TensorFlow: pip install 'rsjax[tf]', or "
                        "build array_record files (the default), which read without it.") from None


def run(args) -> int:
    options = {key: getattr(args, key) for key in TILING_OPTIONS}
    cfg = data_config(args.dataset, args.data_dir, **options)
    check_builder_config(cfg)
    check_manual_dir(args.dataset, args.manual_dir, require_lulc=not args.allow_missing_lulc,
                     skip_incomplete=bool(args.skip_incomplete_scenes))
    if args.manual_dir is not None and not args.dataset.startswith("manual"):
        raise UserError(f"--manual_dir {args.manual_dir}: only the manual config reads it; "
                        f"--dataset {args.dataset} writes its own synthetic scenes.")
    check_file_format(args.file_format)
    from rsjax import input_pipeline
    from rsjax.data import storage

    if args.beam_pipeline_options:
        input_pipeline.beam_options(args.beam_pipeline_options)   # apache-beam there, options parse
    manual_dir = args.manual_dir
    if manual_dir is not None and not storage.is_url(manual_dir):
        manual_dir = os.path.abspath(manual_dir)
    cli.print_json(input_pipeline.build(cfg, manual_dir=manual_dir, file_format=args.file_format,
                                        overwrite=args.overwrite,
                                        beam_pipeline_options=args.beam_pipeline_options))
    return 0


main = cli.command_main(__name__)

if __name__ == "__main__":
    sys.exit(main())
