"""Check your own exports: validate, register and tile them, writing nothing.

    rsjax ingest work/exports
    rsjax ingest work/exports --tile_size 128 --allow_missing_lulc
    rsjax ingest work/cloudy_exports --clouds      # with <scene>_s2_cloudy.tif (+ _cloudmask.tif)

The check to run before `rsjax build --dataset manual --manual_dir FOLDER`: it
prints the report (tiles kept and dropped per scene, grid, S1 units) as JSON,
and a bad file as one `error:` line naming it (exit 2). docs/data.md
describes the file contract and what each check does.
"""
from __future__ import annotations

import sys

from rsjax import cli
from rsjax.data import landcover, sar
from rsjax.data.contract import find_scenes
from rsjax.data.ingest import IngestOptions, IngestReport, TileProgress, iter_scene_tiles


def add_reading_options(parser, *, from_config: bool) -> None:
    """How the files' values are read (units, offsets, legends), for `ingest` and
    `build`; with `from_config`, an option left out keeps the dataset config's."""
    default = (lambda value: None) if from_config else (lambda value: value)
    note = " (default: the config's)" if from_config else ""
    parser.add_argument("--s1_units", default=default("auto"), choices=sar.UNITS,
                        help="units of the S1 files (auto: each file's metadata, else its "
                             "values)" + note)
    parser.add_argument("--s2_offset", type=float, default=None,
                        help="added to S2 values to give reflectance x 10000 (e.g. -1000 for L2A "
                             "of baseline 04.00+; default: what each file declares)")
    parser.add_argument("--lulc_map", default=None,
                        help="map another land-cover legend onto Dynamic World, e.g. '1:4,0:255'")
    parser.add_argument("--lulc_legend", default=default("auto"), choices=landcover.LEGENDS,
                        help="'dynamic_world': take a land-cover file whose values look like "
                             "another legend as it is" + note)


def add_arguments(parser) -> None:
    parser.add_argument("folder", help="folder of <scene>_{s2,s1,lulc,dem}.tif files (local, gs://, "
                        "s3://, https://) or a .txt list of scene prefixes")
    parser.add_argument("--tile_size", type=int, default=256, help="tile side in target-grid pixels")
    parser.add_argument("--stride", type=int, default=None,
                        help="step between tiles in pixels (default: tile_size)")
    parser.add_argument("--max_nodata_fraction", type=float, default=0.1,
                        help="tiles with a larger no-data fraction are dropped and counted")
    parser.add_argument("--target_crs", default=None,
                        help="registration CRS, projected in metres (default: each S2 file's)")
    parser.add_argument("--target_resolution", type=float, default=None,
                        help="registration pixel size in metres (default: the S2 file's)")
    parser.add_argument("--target_grid", default=None,
                        help="GeoTIFF whose grid to use (default: each S2 file's)")
    parser.add_argument("--allow_missing_lulc", action="store_true",
                        help="scenes may lack <scene>_lulc.tif")
    parser.add_argument("--clouds", action="store_true",
                        help="cloud removal: every scene also has <scene>_s2_cloudy.tif and maybe "
                             "<scene>_cloudmask.tif (0 clear, 1 cloud, 2 shadow); the report counts "
                             "tiles per cloud-cover bin")
    add_reading_options(parser, from_config=False)
    parser.add_argument("--max_grid_pixels", type=int, default=None,
                        help="refuse a target grid of more pixels (default 2.5e9, about 20 "
                             "Sentinel-2 granules, or $RSJAX_MAX_GRID_PIXELS)")
    parser.add_argument("--dry_run", action="store_true",
                        help="accepted and changes nothing: ingest never writes (the dataset is "
                             "written by `rsjax build --dataset manual --manual_dir FOLDER`)")
    parser.add_argument("--allow_any_format", action="store_true",
                        help="read source files in any GDAL format, VRTs and sidecar files included "
                             "(by default only plain GeoTIFFs: other formats can make GDAL read any "
                             "local file or URL); only for files you made yourself")


def run(args) -> int:
    opts = IngestOptions(tile_size=args.tile_size, stride=args.stride,
                         max_nodata_fraction=args.max_nodata_fraction, target_crs=args.target_crs,
                         target_resolution=args.target_resolution, target_grid=args.target_grid,
                         s1_units=args.s1_units, s2_offset=args.s2_offset,
                         lulc_map=args.lulc_map, lulc_legend=args.lulc_legend,
                         allow_any_format=args.allow_any_format,
                         **({} if args.max_grid_pixels is None else {"max_grid_pixels": args.max_grid_pixels}))
    report = IngestReport(progress=TileProgress(what="dry run"))
    for scene in find_scenes(args.folder, require_lulc=not args.allow_missing_lulc, clouds=args.clouds):
        for _ in iter_scene_tiles(scene, opts, report):
            pass
    report.require_tiles()
    cli.print_json(report.to_dict())
    return 0


main = cli.command_main(__name__)

if __name__ == "__main__":
    sys.exit(main())
