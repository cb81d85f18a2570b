"""Export scenes from Earth Engine as the four GeoTIFFs ingestion reads, for a list of areas.

For every area (a GeoJSON Feature in longitude/latitude) `task_descriptions`
builds four export tasks as plain data: Cloud Optimized GeoTIFFs with explicit
no-data named `<scene>_{s2,s1,lulc,dem}.tif`, on one exact grid (the area's UTM
zone, its bounds snapped outward to whole pixels of `scale` metres). A dry run
prints them without importing `ee`; `start_task` translates the same data into
Earth Engine calls. The command is rsjax/commands/export_ee.py.
docs/data.md (section 'Earth Engine exports') says what each product holds and
how the grid is chosen.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import math
import re
from pathlib import Path
from typing import Any, Optional, Sequence

from rsjax.errors import UserError

PRODUCTS = ("s2", "s1", "lulc", "dem")

S2_COLLECTION = "COPERNICUS/S2_SR_HARMONIZED"
CLOUD_SCORE_COLLECTION = "GOOGLE/CLOUD_SCORE_PLUS/V1/S2_HARMONIZED"
S1_COLLECTION = "COPERNICUS/S1_GRD"
DW_COLLECTION = "GOOGLE/DYNAMICWORLD/V1"
DEM_COLLECTION = "COPERNICUS/DEM/GLO30"

S2_NODATA = 0
S1_NODATA = -32768.0
LULC_NODATA = 255
DEM_NODATA = -32767.0

ORBITS = ("ASCENDING", "DESCENDING")
DESTINATIONS = ("gcs", "drive")
# Earth Engine computes exports in shards of this many pixels; fileDimensions
# must be a multiple of it. One file per product needs fileDimensions >= the image.
SHARD_SIZE = 256
# Scenes larger than this (per side) are refused: split the area. Earth Engine
# would otherwise cut the export into several files that ingestion cannot pair.
MAX_SIDE = 32768
# Earth Engine's task descriptions allow these characters, at most 100 of them.
_TASK_NAME = re.compile(r"[^A-Za-z0-9_.,:;-]")
_SCENE_ID = re.compile(r"[^A-Za-z0-9_-]+")


@dataclasses.dataclass(frozen=True)
class ExportOptions:
    """What every area's export looks like (docs/data.md, 'Earth Engine exports').

    start, end: ISO dates, the composites' period [start, end).
    destination: 'gcs' (bucket, prefix) or 'drive' (drive_folder).
    crs: the export CRS for every area (metric, projected); None = each area's UTM zone.
    scale: pixel size in metres of s2, s1 and lulc; dem_scale: of the DEM.
    """

    start: str
    end: str
    destination: str = "gcs"
    bucket: Optional[str] = None
    prefix: str = ""
    drive_folder: Optional[str] = None
    orbit: str = "ASCENDING"
    max_cloud_percent: float = 30.0
    cloud_score_threshold: float = 0.6
    scale: float = 10.0
    dem_scale: float = 30.0
    dem_margin_px: int = 3
    crs: Optional[str] = None
    max_pixels: int = 10**10


@dataclasses.dataclass(frozen=True)
class Area:
    """One area to export: its scene id and its geometry (GeoJSON, longitude/latitude)."""

    scene_id: str
    geometry: dict

    @property
    def lonlat_bounds(self) -> tuple[float, float, float, float]:
        xs, ys = zip(*_positions(self.geometry["coordinates"]))
        return min(xs), min(ys), max(xs), max(ys)


# ---------------------------------------------------------------- validation
def check_options(opts: ExportOptions) -> None:
    """Raises UserError naming the flag when an option cannot work."""
    start, end = _parse_date(opts.start, "--start"), _parse_date(opts.end, "--end")
    if start >= end:
        raise UserError(f"--start {opts.start} is not before --end {opts.end}: the period is "
                        "[start, end), so end must be at least a day later.")
    if opts.destination not in DESTINATIONS:
        raise UserError(f"destination {opts.destination!r}: use one of {DESTINATIONS}.")
    if opts.destination == "gcs" and not opts.bucket:
        raise UserError("Cloud Storage exports need --bucket (or use --drive_folder for Drive).")
    if opts.destination == "drive" and not opts.drive_folder:
        raise UserError("Drive exports need --drive_folder (or use --bucket for Cloud Storage).")
    if opts.bucket and (opts.bucket.startswith("gs://") or "/" in opts.bucket):
        raise UserError(f"--bucket {opts.bucket!r}: give the bucket name alone (no gs://, no "
                        "folders); put folders in --prefix.")
    if opts.orbit not in ORBITS:
        raise UserError(f"--orbit {opts.orbit!r}: use one of {', '.join(ORBITS)}.")
    if not 0 <= opts.max_cloud_percent <= 100:
        raise UserError(f"--max_cloud_percent {opts.max_cloud_percent}: must be in 0..100.")
    if not 0 <= opts.cloud_score_threshold <= 1:
        raise UserError(f"--cloud_score_threshold {opts.cloud_score_threshold}: must be in 0..1 "
                        "(Cloud Score+ cs_cdf; 0.6 is Google's suggestion).")
    for flag, value in (("--scale", opts.scale), ("--dem_scale", opts.dem_scale)):
        if not value > 0:
            raise UserError(f"{flag} {value}: the pixel size in metres must be positive.")
    if opts.dem_margin_px < 0:
        raise UserError(f"--dem_margin_px {opts.dem_margin_px}: must be >= 0.")
    if opts.crs is not None:
        _check_metric_crs(opts.crs)


def _parse_date(text: str, flag: str) -> datetime.date:
    try:
        return datetime.date.fromisoformat(text)
    except (TypeError, ValueError):
        raise UserError(f"{flag} {text!r}: not a date; write it as YYYY-MM-DD.") from None


def _check_metric_crs(crs: str) -> None:
    from rasterio.crs import CRS
    from rasterio.errors import CRSError

    try:
        parsed = CRS.from_user_input(crs)
    except CRSError as err:
        raise UserError(f"--crs {crs!r}: not a CRS ({err}). Use e.g. EPSG:32632.") from None
    if not parsed.is_projected or (parsed.linear_units or "").lower() not in ("metre", "meter"):
        raise UserError(f"--crs {crs!r}: must be a projected CRS in metres (e.g. a UTM zone, "
                        "EPSG:326xx / 327xx): slope and pixel sizes are metric.")


# ---------------------------------------------------------------- areas
def read_areas(path: str | Path) -> list[Area]:
    """The areas of a GeoJSON file: a FeatureCollection, a Feature or a bare Polygon.

    A feature's scene id is its `scene_id`, `id` or `name` property (or the
    feature's id), made file-name safe; else `area_000`, `area_001`, ...
    Coordinates must be longitude/latitude (RFC 7946).
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"--areas {path}: no such file. Give a GeoJSON file of the areas "
                        "to export (a FeatureCollection of polygons).") from None
    except (OSError, ValueError) as err:
        raise UserError(f"--areas {path}: cannot be read as JSON ({err}).") from None
    return areas_from_geojson(data, str(path))


def areas_from_geojson(data: Any, source: str = "areas") -> list[Area]:
    if not isinstance(data, dict) or "type" not in data:
        raise UserError(f"{source}: not GeoJSON (no 'type'). Give a FeatureCollection of polygons.")
    if data["type"] == "FeatureCollection":
        features = data.get("features") or []
    elif data["type"] == "Feature":
        features = [data]
    else:
        features = [{"type": "Feature", "geometry": data, "properties": {}}]
    if not features:
        raise UserError(f"{source}: the FeatureCollection has no features.")
    areas, seen = [], {}
    for k, feature in enumerate(features):
        geometry = (feature or {}).get("geometry") or {}
        where = f"{source}: feature {k}"
        if geometry.get("type") not in ("Polygon", "MultiPolygon"):
            raise UserError(f"{where}: geometry type {geometry.get('type')!r}; each area must be a "
                            "Polygon or MultiPolygon.")
        try:
            positions = list(_positions(geometry["coordinates"]))
        except (KeyError, TypeError, ValueError):
            raise UserError(f"{where}: malformed coordinates.") from None
        if not positions:
            raise UserError(f"{where}: the polygon has no coordinates.")
        if any(not (-180 <= x <= 180 and -90 <= y <= 90) for x, y in positions):
            raise UserError(f"{where}: coordinates outside longitude -180..180 / latitude -90..90; "
                            "GeoJSON areas must be in longitude/latitude (EPSG:4326).")
        xs, ys = zip(*positions)
        if max(xs) - min(xs) > 180:
            raise UserError(f"{where}: spans more than 180 degrees of longitude (crosses the "
                            "antimeridian?); split it into areas on either side.")
        scene_id = _scene_id(feature, k)
        if scene_id in seen:
            raise UserError(f"{where}: scene id '{scene_id}' is also feature {seen[scene_id]}'s; "
                            "give every area a distinct scene_id property.")
        seen[scene_id] = k
        areas.append(Area(scene_id=scene_id, geometry={"type": geometry["type"],
                                                       "coordinates": geometry["coordinates"]}))
    return areas


def _scene_id(feature: dict, k: int) -> str:
    props = feature.get("properties") or {}
    for value in (props.get("scene_id"), props.get("id"), props.get("name"), feature.get("id")):
        if value is not None and str(value).strip():
            cleaned = _SCENE_ID.sub("_", str(value).strip()).strip("_")
            if cleaned:
                return cleaned
    return f"area_{k:03d}"


def _positions(coords):
    """(x, y) pairs of nested GeoJSON coordinates."""
    if isinstance(coords, (list, tuple)) and coords and isinstance(coords[0], (int, float)):
        if len(coords) < 2:
            raise ValueError("a position needs two numbers")
        yield float(coords[0]), float(coords[1])
        return
    for part in coords:
        yield from _positions(part)


# ---------------------------------------------------------------- grids
def utm_crs(lon: float, lat: float) -> str:
    """The UTM zone of a point as 'EPSG:326zz' (north) or 'EPSG:327zz' (south).

    The standard 6-degree zones; Norway's and Svalbard's exceptions are not
    applied (give --crs there if it matters)."""
    zone = min(int(math.floor((lon + 180.0) / 6.0)) + 1, 60)
    return f"EPSG:{(32600 if lat >= 0 else 32700) + zone}"


def export_grid(lonlat_bounds: Sequence[float], crs: str, scale: float,
                margin_px: int = 0, snap_to: Optional[float] = None) -> dict:
    """The exact export grid covering `lonlat_bounds` in `crs` at `scale` metres.

    The bounds are projected (densified edges, so a curved edge is covered),
    widened by `margin_px` pixels, and snapped outward to multiples of
    `snap_to` (default: `scale`). Returns crs, crs_transform (Earth Engine's
    order: xScale, xShear, xTranslation, yShear, yScale, yTranslation, which
    is rasterio's a b c d e f), dimensions [width, height] and the projected
    bounds.
    """
    from rasterio.warp import transform_bounds

    left, bottom, right, top = transform_bounds("EPSG:4326", crs, *lonlat_bounds, densify_pts=21)
    snap = snap_to or scale
    left = math.floor((left - margin_px * scale) / snap) * snap
    bottom = math.floor((bottom - margin_px * scale) / snap) * snap
    right = math.ceil((right + margin_px * scale) / snap) * snap
    top = math.ceil((top + margin_px * scale) / snap) * snap
    width = int(round((right - left) / scale))
    height = int(round((top - bottom) / scale))
    return {
        "crs": crs,
        "crs_transform": [float(scale), 0.0, float(left), 0.0, -float(scale), float(top)],
        "dimensions": [width, height],
        "bounds": [float(left), float(top - height * scale), float(left + width * scale),
                   float(top)],
    }


# ---------------------------------------------------------------- recipes
def image_recipe(product: str, opts: ExportOptions) -> dict:
    """How the product's image is computed, as plain data (read by `build_image`).

    collection: the ImageCollection id; filters: applied in order (`bounds`
    is the area's geometry, `date` the period); cloud_mask: an optional
    linked collection whose band must be >= min; bands: selected; resample:
    None (nearest) or 'bilinear', set on every source image; reducer:
    median, mode or mosaic; clamp_min: valid values raised to at least this;
    unmask: the value of masked pixels; dtype: the exported type.
    """
    date = {"filter": "date", "start": opts.start, "end": opts.end}
    bounds = {"filter": "bounds"}
    if product == "s2":
        return {
            "collection": S2_COLLECTION,
            "filters": [bounds, date, {"filter": "lt", "property": "CLOUDY_PIXEL_PERCENTAGE",
                                       "value": opts.max_cloud_percent}],
            "cloud_mask": {"collection": CLOUD_SCORE_COLLECTION, "band": "cs_cdf",
                           "min": opts.cloud_score_threshold},
            "bands": ["B2", "B3", "B4", "B8"],
            "resample": None,
            "reducer": "median",
            "clamp_min": 1,
            "unmask": S2_NODATA,
            "dtype": "uint16",
            "units": "surface reflectance x 10000",
        }
    if product == "s1":
        return {
            "collection": S1_COLLECTION,
            "filters": [bounds, date,
                        {"filter": "eq", "property": "instrumentMode", "value": "IW"},
                        {"filter": "listContains", "property": "transmitterReceiverPolarisation",
                         "value": "VV"},
                        {"filter": "listContains", "property": "transmitterReceiverPolarisation",
                         "value": "VH"},
                        {"filter": "eq", "property": "orbitProperties_pass", "value": opts.orbit}],
            "cloud_mask": None,
            "bands": ["VV", "VH"],
            "resample": "bilinear",
            "reducer": "median",
            "clamp_min": None,
            "unmask": S1_NODATA,
            "dtype": "float32",
            "units": "dB",
        }
    if product == "lulc":
        return {
            "collection": DW_COLLECTION,
            "filters": [bounds, date],
            "cloud_mask": None,
            "bands": ["label"],
            "resample": None,
            "reducer": "mode",
            "clamp_min": None,
            "unmask": LULC_NODATA,
            "dtype": "uint8",
            "units": "Dynamic World label 0..8",
        }
    if product == "dem":
        return {
            "collection": DEM_COLLECTION,
            "filters": [bounds],
            "cloud_mask": None,
            "bands": ["DEM"],
            "resample": "bilinear",
            "reducer": "mosaic",
            "clamp_min": None,
            "unmask": DEM_NODATA,
            "dtype": "float32",
            "units": "metre",
        }
    raise ValueError(f"unknown product {product!r}; one of {PRODUCTS}")


def task_descriptions(areas: Sequence[Area], opts: ExportOptions) -> list[dict]:
    """Every export task (4 per area), fully described as JSON-able data. Pure: no ee, no network."""
    check_options(opts)
    tasks = []
    for area in areas:
        lon0, lat0, lon1, lat1 = area.lonlat_bounds
        crs = opts.crs or utm_crs((lon0 + lon1) / 2, (lat0 + lat1) / 2)
        grid = export_grid(area.lonlat_bounds, crs, opts.scale)
        # The DEM covers the scene's grid plus a margin, on its own coarser pixels.
        dem_grid = export_grid(area.lonlat_bounds, crs, opts.dem_scale,
                               margin_px=opts.dem_margin_px)
        for product in PRODUCTS:
            g = dem_grid if product == "dem" else grid
            scale = opts.dem_scale if product == "dem" else opts.scale
            width, height = g["dimensions"]
            if max(width, height) > MAX_SIDE or width * height > opts.max_pixels:
                raise UserError(
                    f"area '{area.scene_id}': the {product} export would be {width} x {height} px at "
                    f"{scale:g} m (at most {MAX_SIDE} px per side and --max_pixels "
                    f"{opts.max_pixels}); split it into smaller areas.")
            recipe = image_recipe(product, opts)
            name = f"{area.scene_id}_{product}"
            tasks.append({
                "task": _TASK_NAME.sub("_", f"rsjax_{name}")[:100],
                "scene_id": area.scene_id,
                "product": product,
                "file_name": f"{name}.tif",
                "destination": _destination(name, opts),
                "region": area.geometry,
                "crs": g["crs"],
                "crs_transform": g["crs_transform"],
                "dimensions": g["dimensions"],
                "scale": float(scale),
                "bounds": g["bounds"],
                "bands": list(recipe["bands"]),
                "dtype": recipe["dtype"],
                "nodata": recipe["unmask"],
                "file_format": "GeoTIFF",
                "format_options": {"cloudOptimized": True, "noData": float(recipe["unmask"])},
                "file_dimensions": [_round_up(width, SHARD_SIZE), _round_up(height, SHARD_SIZE)],
                "shard_size": SHARD_SIZE,
                "max_pixels": int(opts.max_pixels),
                "image": recipe,
            })
    return tasks


def _destination(name: str, opts: ExportOptions) -> dict:
    prefix = opts.prefix.strip("/")
    if opts.destination == "gcs":
        key = f"{prefix}/{name}" if prefix else name
        return {"type": "gcs", "bucket": opts.bucket, "file_name_prefix": key,
                "uri": f"gs://{opts.bucket}/{key}.tif"}
    return {"type": "drive", "folder": opts.drive_folder, "file_name_prefix": name}


def _round_up(n: int, multiple: int) -> int:
    return max(multiple, -(-n // multiple) * multiple)


# ---------------------------------------------------------------- Earth Engine
def build_image(ee, recipe: dict, region: dict):
    """The ee.Image a recipe describes (`region`: the area's GeoJSON geometry)."""
    geometry = ee.Geometry(region)
    collection = ee.ImageCollection(recipe["collection"])
    for f in recipe["filters"]:
        kind = f["filter"]
        if kind == "bounds":
            collection = collection.filterBounds(geometry)
        elif kind == "date":
            collection = collection.filterDate(f["start"], f["end"])
        elif kind in ("eq", "lt", "gt", "listContains"):
            collection = collection.filter(getattr(ee.Filter, kind)(f["property"], f["value"]))
        else:
            raise ValueError(f"unknown filter {kind!r}")
    mask = recipe.get("cloud_mask")
    if mask:
        band, threshold = mask["band"], mask["min"]
        collection = (collection.linkCollection(ee.ImageCollection(mask["collection"]), [band])
                      .map(lambda im: im.updateMask(im.select(band).gte(threshold))))
    collection = collection.select(recipe["bands"])
    if recipe.get("resample"):
        method = recipe["resample"]
        collection = collection.map(lambda im: im.resample(method))
    image = getattr(collection, recipe["reducer"])()
    if recipe.get("clamp_min") is not None:
        image = image.max(recipe["clamp_min"])      # masked pixels stay masked
    image = image.unmask(recipe["unmask"])
    cast = {"uint16": image.toUint16, "uint8": image.toUint8, "float32": image.toFloat}
    return cast[recipe["dtype"]]().rename(recipe["bands"])


def start_task(ee, desc: dict):
    """Starts the export a description holds; returns the ee task."""
    image = build_image(ee, desc["image"], desc["region"])
    dest = desc["destination"]
    kwargs = dict(
        image=image, description=desc["task"], fileNamePrefix=dest["file_name_prefix"],
        crs=desc["crs"], crsTransform=desc["crs_transform"],
        dimensions=f"{desc['dimensions'][0]}x{desc['dimensions'][1]}",
        maxPixels=desc["max_pixels"], shardSize=desc["shard_size"],
        fileDimensions=tuple(desc["file_dimensions"]), fileFormat=desc["file_format"],
        formatOptions=dict(desc["format_options"]))
    if dest["type"] == "gcs":
        task = ee.batch.Export.image.toCloudStorage(bucket=dest["bucket"], **kwargs)
    else:
        task = ee.batch.Export.image.toDrive(folder=dest["folder"], **kwargs)
    task.start()
    return task


def import_ee():
    try:
        import ee  # noqa: PLC0415
    except ImportError:
        raise UserError("the Earth Engine client is not installed: `pip install rsjax[ee]` "
                        "(earthengine-api), or run with --dry_run to see the tasks.") from None
    return ee
