"""Whole-scene prediction to a Cloud Optimized GeoTIFF, from a training run's workdir.

    # a synthetic optical image from SAR, land cover and terrain (a fusion run)
    rsjax predict --workdir work/fusion_demo --s1 scene_s1.tif --lulc scene_lulc.tif \\
        --dem scene_dem.tif --out scene_synthetic_s2.tif
    # a land-cover map from an optical image (a segmentation run)
    rsjax predict --workdir work/seg_real --s2 scene_s2.tif --out scene_lulc_pred.tif
    # cloud removal; with a mask, only clouds and shadows change
    rsjax predict --workdir work/dsen2cr --s2_cloudy scene_s2_cloudy.tif --s1 scene_s1.tif \\
        --cloud_mask scene_cloudmask.tif --out scene_declouded_s2.tif

The run's config says which inputs it needs; they are registered as
ingestion registers them, predicted tile by tile with seamless blending and
written with a STAC Item beside the file. docs/prediction.md describes each
step; `--scenes` runs many scenes on Apache Beam.
"""
from __future__ import annotations

import sys

from rsjax import cli
from rsjax import predict as predict_lib
from rsjax.errors import UserError


def add_arguments(parser) -> None:
    parser.add_argument("--workdir", required=True,
                        help="workdir of the training run (checkpoints and config.json)")
    inputs = parser.add_argument_group("inputs (the ones the run's sources need)")
    inputs.add_argument("--s1", default=None, help="fusion: Sentinel-1 GeoTIFF (VV, VH; linear or dB)")
    inputs.add_argument("--lulc", default=None, help="fusion: Dynamic World land-cover GeoTIFF (label)")
    inputs.add_argument("--dem", default=None,
                        help="fusion: elevation GeoTIFF (slope, aspect, hillshade are derived)")
    inputs.add_argument("--s2", default=None, help="segmentation: Sentinel-2 GeoTIFF (B2, B3, B4, B8)")
    inputs.add_argument("--s2_cloudy", default=None,
                        help="cloud removal: the cloudy Sentinel-2 GeoTIFF (B2, B3, B4, B8); "
                             "a model with a variance (UnCRtainTS) writes 4 more bands, "
                             "its standard deviation")
    inputs.add_argument("--cloud_mask", default=None,
                        help="cloud removal, optional: its cloud/shadow mask GeoTIFF (0 clear, 1 "
                             "cloud, 2 shadow); the cloudy image is then kept where it is clear")
    model = parser.add_argument_group("model")
    model.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    model.add_argument("--data_dir", default=None,
                       help="TFDS data_dir of the training dataset (default: the config's)")
    cli.add_config_argument(model, required=False,
                            help="the training config (default: the workdir's config.json)")
    model.add_argument("--samples", type=cli.positive_int, default=1,
                       help="flow models (model=flow): samples per pixel; more than 1 writes "
                            "their mean (bands 1-4) and standard deviation (bands 5-8)")
    model.add_argument("--overlap", type=cli.nonnegative_int, default=None,
                       help="tile overlap in pixels (default: a quarter of the tile)")
    model.add_argument("--batch_size", type=cli.positive_int, default=None,
                       help="tiles per batch (default: the config's eval_batch_size)")
    output = parser.add_argument_group("output")
    output.add_argument("--out", default=None, help="GeoTIFF to write (one scene)")
    output.add_argument("--target_grid", default=None,
                        help="GeoTIFF whose grid the output is on (default: the land-cover file "
                             "for fusion, the S2 file for segmentation, the cloudy S2 file for "
                             "cloud removal)")
    output.add_argument("--target_crs", default=None,
                        help="output CRS (projected, metres), as in ingestion")
    output.add_argument("--target_resolution", type=float, default=None,
                        help="output pixel size in metres, as in ingestion")
    many = parser.add_argument_group("scale-out: many scenes on Apache Beam (the `beam` extra)")
    many.add_argument("--scenes", default=None,
                      help="a folder of <scene>_{s2,s1,lulc,dem}.tif (local, gs://, s3://, "
                           "https://) or a .txt list of scene prefixes; with --out_dir instead "
                           "of --out and the inputs")
    many.add_argument("--out_dir", default=None,
                      help="with --scenes: folder (local, gs://, s3://) for "
                           "<scene>_synthetic_s2.tif / <scene>_landcover.tif")
    many.add_argument("--beam_pipeline_options", default=None, metavar="KEY=VALUE,...",
                      help="with --scenes: Beam pipeline options, e.g. "
                           "'direct_num_workers=2,direct_running_mode=multi_processing' or "
                           "'runner=DataflowRunner,...' (default: the DirectRunner in this process)")


def run(args) -> int:
    if args.scenes:
        if args.out or any(v for v in (args.s1, args.lulc, args.dem, args.s2)):
            raise UserError("--scenes takes --out_dir and finds each scene's files itself: "
                            "leave out --out, --s1, --lulc, --dem and --s2.")
        if not args.out_dir:
            raise UserError("--scenes needs --out_dir (one output per scene goes there).")
        if args.samples != 1:
            raise UserError("--samples predicts one scene (--out); --scenes does not take it yet.")
    elif args.out is None:
        raise UserError("give --out (one scene), or --scenes with --out_dir (many scenes).")
    elif args.out_dir or args.beam_pipeline_options:
        raise UserError("--out_dir and --beam_pipeline_options go with --scenes.")
    config = cli.load_config_arg(args, workdir=args.workdir)
    from rsjax.runtime import prepare_process

    prepare_process()
    if args.scenes:
        from rsjax import predict_beam

        result = predict_beam.run_from_flags(
            args.workdir, args.scenes, args.out_dir, args.beam_pipeline_options, config=config,
            step=args.step, data_dir=args.data_dir, target_grid=args.target_grid,
            target_crs=args.target_crs, target_resolution=args.target_resolution,
            overlap=args.overlap, batch_size=args.batch_size)
        cli.print_json(result)
        return 1 if result["failed"] else 0
    result = predict_lib.predict(args.workdir, args.out, s1=args.s1, lulc=args.lulc, dem=args.dem, s2=args.s2,
                     s2_cloudy=args.s2_cloudy, cloud_mask=args.cloud_mask, config=config,
                     target_grid=args.target_grid, target_crs=args.target_crs,
                     target_resolution=args.target_resolution, step=args.step,
                     overlap=args.overlap, batch_size=args.batch_size, data_dir=args.data_dir,
                     samples=args.samples)
    cli.print_json(result)
    return 0


main = cli.command_main(__name__)

if __name__ == "__main__":
    sys.exit(main())
