"""Registration: every source read, window by window, on one target grid.

`target_grid_for` picks the grid: the S2 file's own, its UTM zone when the S2
file is geographic, or the `target_crs`/`target_resolution` given. S2, S1 and
land cover are read per window through `WarpedSource`, the DEM through
`DemSource`, which fills its voids in its own CRS before warping and says which
missing pixels lie beyond the DEM file's extent (for `terrain.py`). Every warp
uses GDAL's exact transformer (`gdalwarp -et 0`, via `exact_warped_vrt`), so a
pixel's value does not depend on the window it is read through.
docs/data.md (section 'Ingestion: GeoTIFFs to registered tiles', items 'Target
grid', 'Resampling', 'Exact, whatever the window', 'DEM and terrain') says why.
"""
from __future__ import annotations

import dataclasses
import math
import xml.etree.ElementTree as ET

import numpy as np
import rasterio
import rasterio.windows
from affine import Affine
from rasterio.crs import CRS
from rasterio.enums import Resampling
from rasterio.fill import fillnodata
from rasterio.io import MemoryFile
from rasterio.vrt import WarpedVRT
from rasterio.warp import aligned_target, calculate_default_transform, transform_bounds
from rasterio.warp import transform as transform_points
from rasterio.windows import Window

from rsjax.data import storage
from rsjax.data.plausible import implausible_elevation
from rsjax.data.untrusted import reopen_name


@dataclasses.dataclass(frozen=True)
class TargetGrid:
    """A north-up raster grid: CRS, affine transform and size in pixels."""

    crs: CRS
    transform: Affine
    width: int
    height: int

    @property
    def resolution(self) -> tuple[float, float]:
        return self.transform.a, -self.transform.e

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        return rasterio.transform.array_bounds(self.height, self.width, self.transform)[:4]

    def window_transform(self, window: Window) -> Affine:
        return rasterio.windows.transform(window, self.transform)

    def crs_string(self) -> str:
        """'EPSG:n' when the CRS has an EPSG code, WKT otherwise (the contract's `crs`)."""
        epsg = self.crs.to_epsg()
        return f"EPSG:{epsg}" if epsg else self.crs.to_wkt()


def utm_crs(lon: float, lat: float) -> CRS:
    """The WGS 84 UTM zone CRS holding a point (EPSG:326zz north, 327zz south)."""
    zone = int(math.floor((lon + 180.0) / 6.0)) % 60 + 1
    return CRS.from_epsg((32600 if lat >= 0 else 32700) + zone)


def is_metric(crs: CRS) -> bool:
    units = (crs.linear_units or "").lower()
    return bool(crs.is_projected) and units in ("metre", "meter", "m", "metres", "meters")


def target_grid_for(s2: rasterio.DatasetReader, target_crs: str | None = None,
                    target_resolution: float | None = None) -> TargetGrid:
    """The grid every source is registered onto (see the module docstring).

    Raises ValueError when the requested grid is not metric (terrain
    derivatives need metres).
    """
    src_crs = s2.crs
    if target_crs is None and target_resolution is None and is_metric(src_crs):
        return TargetGrid(src_crs, s2.transform, s2.width, s2.height)

    if target_crs is not None:
        dst_crs = CRS.from_user_input(target_crs)
        if not is_metric(dst_crs):
            raise ValueError(
                f"target_crs {target_crs!r} is not a projected CRS in metres; terrain derivatives "
                "need a metric grid. Use a UTM zone (e.g. 'EPSG:32631') or leave target_crs unset.")
    elif is_metric(src_crs):
        dst_crs = src_crs
    else:
        lon, lat = _centre_lonlat(s2)
        dst_crs = utm_crs(lon, lat)

    transform, width, height = calculate_default_transform(
        src_crs, dst_crs, s2.width, s2.height, *s2.bounds, resolution=target_resolution)
    if target_resolution is None:
        # GDAL's suggestion keeps the pixel count; real products have round pixel sizes.
        target_resolution = max(1.0, float(round(transform.a)))
        transform, width, height = calculate_default_transform(
            src_crs, dst_crs, s2.width, s2.height, *s2.bounds, resolution=target_resolution)
    if target_resolution <= 0:
        raise ValueError(f"target_resolution must be positive, got {target_resolution}")
    transform, width, height = aligned_target(transform, width, height, target_resolution)
    return TargetGrid(dst_crs, transform, int(width), int(height))


def _centre_lonlat(ds: rasterio.DatasetReader) -> tuple[float, float]:
    left, bottom, right, top = transform_bounds(ds.crs, "EPSG:4326", *ds.bounds)
    return (left + right) / 2.0, (bottom + top) / 2.0


def on_grid(ds: rasterio.DatasetReader, grid: TargetGrid) -> bool:
    """True when `ds` is exactly on `grid` (same CRS, transform and size): no warp needed."""
    return (ds.crs == grid.crs and ds.width == grid.width and ds.height == grid.height
            and ds.transform.almost_equals(grid.transform, precision=1e-9 * max(1.0, abs(grid.transform.a))))


def footprint_overlaps(ds: rasterio.DatasetReader, grid: TargetGrid) -> bool:
    """Whether the file's footprint, taken into the grid's CRS, overlaps the grid with some area."""
    try:
        left, bottom, right, top = transform_bounds(ds.crs, grid.crs, *ds.bounds, densify_pts=21)
    except Exception:  # noqa: BLE001 - a footprint that cannot be projected does not overlap
        return False
    g_left, g_bottom, g_right, g_top = grid.bounds
    return min(right, g_right) > max(left, g_left) and min(top, g_top) > max(bottom, g_bottom)


def exact_vrt_xml(vrt_xml: str, source: str) -> str:
    """A warped VRT description with GDAL's approximating transformer removed.

    GDAL serializes the transformer of a warped VRT as
    `<ApproxTransformer><MaxError/><BaseTransformer>T</BaseTransformer>`;
    keeping only T makes the warper call T for every pixel (gdalwarp -et 0).
    `source` (the source dataset's name) is written as an absolute reference:
    the description is opened from a string, which has no folder to be
    relative to. Raises RuntimeError when the description has no
    approximating transformer to remove (another GDAL layout): an approximate
    warp must never pass as an exact one.
    """
    root = ET.fromstring(vrt_xml)
    transformers = root.findall("GDALWarpOptions/Transformer")
    if not transformers or transformers[0].find("ApproxTransformer") is None:
        raise RuntimeError("GDAL's warped VRT has no <ApproxTransformer> to remove; rsjax cannot "
                           "make this warp exact with this GDAL version")
    for transformer in transformers:
        approx = transformer.find("ApproxTransformer")
        if approx is not None:
            base = approx.find("BaseTransformer")
            transformer.remove(approx)
            transformer.extend(list(base))
    dataset = root.find("GDALWarpOptions/SourceDataset")
    dataset.text = source
    dataset.set("relativeToVRT", "0")
    return ET.tostring(root, encoding="unicode")


def resampling_scale(ds: rasterio.DatasetReader, grid: TargetGrid) -> tuple[float, float]:
    """Target pixels per source pixel along the grid's x and y, at the grid's centre.

    GDAL's warper widens its resampling kernel by the inverse of this ratio
    when it downsamples (a source finer than the target, like Earth Engine's
    S1 in EPSG:4326 at 8.98e-5 degrees, about 6 m east-west at 50 degrees
    north) and otherwise derives the ratio from the shape of each chunk it
    warps, so a pixel would depend on the window read. Passed as the warp
    options XSCALE and YSCALE, one ratio holds for the whole grid.
    """
    col, row = grid.width / 2.0, grid.height / 2.0
    xs, ys = grid.transform * (np.array([col, col + 1.0, col]), np.array([row, row, row + 1.0]))
    sx, sy = transform_points(grid.crs, ds.crs, xs, ys)
    src_cols, src_rows = ~ds.transform * (np.asarray(sx), np.asarray(sy))
    cols_per_x = abs(src_cols[1] - src_cols[0])          # source columns per target pixel along x
    rows_per_y = abs(src_rows[2] - src_rows[0])
    if not (np.isfinite(cols_per_x) and np.isfinite(rows_per_y)) or cols_per_x == 0 or rows_per_y == 0:
        return 1.0, 1.0
    return float(1.0 / cols_per_x), float(1.0 / rows_per_y)


def exact_warped_vrt(ds: rasterio.DatasetReader, crs: CRS, transform: Affine, width: int, height: int,
                     resampling: Resampling, src_nodata: float | None, nodata: float,
                     scale: tuple[float, float], dtype: str = "float32") -> rasterio.DatasetReader:
    """`ds` warped onto a grid with GDAL's exact transformer, as a dataset to read windows from.

    The warp options are rasterio's `WarpedVRT` ones (source/destination
    no-data, working type, INIT_DEST) and the fixed resampling `scale`
    (`resampling_scale`); only the transformer differs. The caller closes the
    returned dataset.
    """
    with WarpedVRT(ds, crs=crs, transform=transform, width=width, height=height,
                   resampling=resampling, src_nodata=src_nodata, nodata=nodata, dtype=dtype,
                   XSCALE=repr(float(scale[0])), YSCALE=repr(float(scale[1]))) as vrt:
        description = vrt.tags(ns="xml:VRT")["xml:VRT"]
    # GDAL itself opens the source from the description: a URL needs its /vsicurl/
    # (/vsigs/, /vsis3/) name, or GDAL's HTTP driver would download the whole file;
    # a GeoTIFF is reopened as GeoTIFF only (untrusted.reopen_name).
    return rasterio.open(exact_vrt_xml(description, reopen_name(ds, storage.gdal_path(ds.name))))


class WarpedSource:
    """One source's bands on the target grid, read one window at a time, as float32.

    `dst_nodata` marks target pixels without a valid source value (outside the
    footprint or no-data in the source).
    """

    def __init__(self, ds: rasterio.DatasetReader, bands: tuple[int, ...], grid: TargetGrid,
                 resampling: Resampling, src_nodata: float | None, dst_nodata: float):
        self.ds = ds
        self.bands = list(bands)
        self.src_nodata = src_nodata
        self.dst_nodata = dst_nodata
        self.vrt = None
        if not on_grid(ds, grid):
            self.vrt = exact_warped_vrt(ds, grid.crs, grid.transform, grid.width, grid.height,
                                        resampling, src_nodata, dst_nodata, resampling_scale(ds, grid))

    def read(self, window: Window) -> np.ndarray:
        """(bands, h, w) float32 for a window inside the target grid.

        +-inf is no-data, like NaN and the declared value: read directly it
        becomes `dst_nodata`; through the warper (which knows one no-data value
        only) every target pixel whose kernel touched it is non-finite, and no-data."""
        if self.vrt is not None:
            data = self.vrt.read(self.bands, window=window, out_dtype="float32")
            data[~np.isfinite(data)] = self.dst_nodata
            return data
        data = self.ds.read(self.bands, window=window, out_dtype="float32")
        invalid = ~np.isfinite(data)
        if self.src_nodata is not None and not np.isnan(self.src_nodata):
            invalid |= data == np.float32(self.src_nodata)
        data[invalid] = self.dst_nodata
        return data

    def close(self) -> None:
        if self.vrt is not None:
            self.vrt.close()


class DemSource:
    """Elevation on the target grid with small voids filled, read window by window as float32 (NaN = missing)."""

    def __init__(self, ds: rasterio.DatasetReader, band: int, grid: TargetGrid,
                 src_nodata: float | None, fill_distance: float):
        self.ds = ds
        self.band = band
        self.grid = grid
        self.src_nodata = src_nodata
        self.fill_distance = float(fill_distance)
        # Margin of source pixels read around the window: the fill search
        # distance, plus the bilinear kernel, plus rounding.
        self.margin = int(math.ceil(self.fill_distance)) + 3
        self.scale = resampling_scale(ds, grid)

    def read(self, window: Window) -> tuple[np.ndarray, np.ndarray]:
        """Elevation for `window`, which may extend past the grid's edges (halos).

        Returns ((h, w) float32 elevation, NaN = missing; (h, w) bool, True
        where a missing pixel's centre lies beyond the DEM file's extent, as
        opposed to a void inside it).
        """
        height, width = int(window.height), int(window.width)
        dst_transform = self.grid.window_transform(window)
        out = np.full((height, width), np.nan, dtype=np.float32)
        src_window = self._source_window(dst_transform, height, width)
        if src_window is not None:
            elevation = self.ds.read(self.band, window=src_window, out_dtype="float32")
            valid = np.isfinite(elevation)
            if self.src_nodata is not None and not np.isnan(self.src_nodata):
                valid &= elevation != np.float32(self.src_nodata)
            valid &= ~implausible_elevation(elevation)      # undeclared voids (-9999, -3.4e38, ...)
            if valid.any():
                elevation[~valid] = np.nan
                if self.fill_distance > 0 and not valid.all():
                    elevation = fillnodata(elevation, mask=valid.astype(np.uint8),
                                           max_search_distance=self.fill_distance).astype(np.float32)
                out = self._warp(elevation, src_window, dst_transform, height, width)
        return out, self._beyond_extent(np.isnan(out), dst_transform)

    def _warp(self, elevation: np.ndarray, src_window: Window, dst_transform: Affine,
              height: int, width: int) -> np.ndarray:
        """Bilinear, exact transformer, from a filled source window held in memory."""
        profile = dict(driver="GTiff", width=elevation.shape[1], height=elevation.shape[0], count=1,
                       dtype="float32", crs=self.ds.crs, nodata=float("nan"),
                       transform=rasterio.windows.transform(src_window, self.ds.transform))
        with MemoryFile() as memfile:
            with memfile.open(**profile) as tmp:
                tmp.write(elevation, 1)
            with memfile.open() as src, exact_warped_vrt(
                    src, self.grid.crs, dst_transform, width, height, Resampling.bilinear,
                    float("nan"), float("nan"), self.scale) as vrt:
                return vrt.read(1, out_dtype="float32")

    def _beyond_extent(self, missing: np.ndarray, dst_transform: Affine) -> np.ndarray:
        """Of the missing target pixels, those whose centre lies beyond the DEM file's extent."""
        beyond = np.zeros(missing.shape, bool)
        rows, cols = np.nonzero(missing)
        if rows.size == 0:
            return beyond
        xs, ys = dst_transform * (cols + 0.5, rows + 0.5)
        sx, sy = transform_points(self.grid.crs, self.ds.crs, xs, ys)
        src_cols, src_rows = ~self.ds.transform * (np.asarray(sx), np.asarray(sy))
        with np.errstate(invalid="ignore"):
            inside = ((src_cols >= 0) & (src_cols < self.ds.width)
                      & (src_rows >= 0) & (src_rows < self.ds.height))
        beyond[rows, cols] = ~inside
        return beyond

    def _source_window(self, dst_transform: Affine, height: int, width: int) -> Window | None:
        """The source pixels under a target window, with margins, clipped to the file; None if none."""
        bounds = rasterio.transform.array_bounds(height, width, dst_transform)
        src_bounds = transform_bounds(self.grid.crs, self.ds.crs, *bounds, densify_pts=21)
        win = rasterio.windows.from_bounds(*src_bounds, transform=self.ds.transform)
        col0 = math.floor(win.col_off) - self.margin
        row0 = math.floor(win.row_off) - self.margin
        col1 = math.ceil(win.col_off + win.width) + self.margin
        row1 = math.ceil(win.row_off + win.height) + self.margin
        col0, row0 = max(col0, 0), max(row0, 0)
        col1, row1 = min(col1, self.ds.width), min(row1, self.ds.height)
        if col1 <= col0 or row1 <= row0:
            return None
        return Window(col0, row0, col1 - col0, row1 - row0)

    def close(self) -> None:
        pass
