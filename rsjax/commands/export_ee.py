"""Export scenes from Earth Engine as the four GeoTIFFs ingestion reads, for a list of areas.

    rsjax export_ee --areas areas.geojson --start 2023-06-01 --end 2023-09-01 \\
        --bucket my-bucket --prefix exports --dry_run          # print every task, touch nothing
    rsjax export_ee --areas areas.geojson --start 2023-06-01 --end 2023-09-01 \\
        --bucket my-bucket --prefix exports --project my-ee-project
    rsjax build --dataset manual --manual_dir gs://my-bucket/exports   # once the tasks are done

Four tasks per area (a GeoJSON feature in longitude/latitude) write
`<scene>_{s2,s1,lulc,dem}.tif` on one exact grid (the area's UTM zone unless
`--crs`). `--dry_run` prints every task as JSON without `ee`, credentials or
network; a real run needs `pip install rsjax[ee]` and `earthengine
authenticate`. docs/data.md says what each product holds.
"""
from __future__ import annotations

import sys

from rsjax import cli
from rsjax.data.export_ee import (ORBITS, ExportOptions, import_ee, check_options, read_areas,
                                  start_task, task_descriptions)
from rsjax.errors import UserError


def add_arguments(parser) -> None:
    parser.add_argument("--areas", required=True,
                        help="GeoJSON file of the areas (polygons, lon/lat); a feature's "
                             "scene_id / id / name property names its scene")
    parser.add_argument("--start", required=True, help="first day of the period, YYYY-MM-DD")
    parser.add_argument("--end", required=True, help="day after the period, YYYY-MM-DD (exclusive)")
    dest = parser.add_mutually_exclusive_group(required=True)
    dest.add_argument("--bucket", default=None, help="Cloud Storage bucket to export to")
    dest.add_argument("--drive_folder", default=None, help="Google Drive folder to export to")
    parser.add_argument("--prefix", default="", help="folder inside the bucket")
    parser.add_argument("--orbit", default="ASCENDING", choices=ORBITS,
                        help="Sentinel-1 orbit direction (one, so that all pairs share a look "
                             "direction)")
    parser.add_argument("--max_cloud_percent", type=float, default=30.0,
                        help="drop Sentinel-2 images with more cloudy pixels (CLOUDY_PIXEL_PERCENTAGE)")
    parser.add_argument("--cloud_score_threshold", type=float, default=0.6,
                        help="Cloud Score+ cs_cdf a pixel needs to be kept")
    parser.add_argument("--scale", type=float, default=10.0,
                        help="pixel size in metres of s2, s1 and lulc")
    parser.add_argument("--dem_scale", type=float, default=30.0, help="pixel size of the DEM in metres")
    parser.add_argument("--dem_margin_px", type=int, default=3,
                        help="DEM pixels exported beyond the scene on every side")
    parser.add_argument("--crs", default=None,
                        help="export CRS for every area (projected, metres); default: each "
                             "area's UTM zone")
    parser.add_argument("--max_pixels", type=int, default=10**10,
                        help="Earth Engine's maxPixels per export")
    parser.add_argument("--project", default=None,
                        help="Google Cloud project for Earth Engine (needed unless --dry_run)")
    parser.add_argument("--dry_run", action="store_true",
                        help="print every task's description as JSON; no ee, credentials or network")


def options_from_args(args) -> ExportOptions:
    return ExportOptions(
        start=args.start, end=args.end,
        destination="drive" if args.drive_folder else "gcs",
        bucket=args.bucket, prefix=args.prefix, drive_folder=args.drive_folder,
        orbit=args.orbit, max_cloud_percent=args.max_cloud_percent,
        cloud_score_threshold=args.cloud_score_threshold, scale=args.scale,
        dem_scale=args.dem_scale, dem_margin_px=args.dem_margin_px, crs=args.crs,
        max_pixels=args.max_pixels)


def run(args) -> int:
    opts = options_from_args(args)
    check_options(opts)
    tasks = task_descriptions(read_areas(args.areas), opts)
    if args.dry_run:
        cli.print_json({"dry_run": True, "num_tasks": len(tasks), "tasks": tasks})
        return 0
    if not args.project:
        raise UserError("--project is needed to start Earth Engine tasks (the Google Cloud "
                        "project registered for Earth Engine); or use --dry_run.")
    ee = import_ee()
    ee.Initialize(project=args.project)
    started = []
    for desc in tasks:
        task = start_task(ee, desc)
        started.append({"task": desc["task"], "id": task.id, "file_name": desc["file_name"],
                        "destination": desc["destination"]})
    cli.print_json({"started": started,
                    "check": "earthengine task list (or the Tasks tab of the Code Editor)"})
    return 0


main = cli.command_main(__name__)

if __name__ == "__main__":
    sys.exit(main())
