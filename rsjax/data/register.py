"""Registration: every source read, window by window, on one target grid.

The target grid is the optical (S2) file's own grid by default. Terrain
derivatives need a metric grid, so when the S2 file is in geographic
coordinates (Earth Engine exports often are, EPSG:4326) the default becomes the
UTM zone of the scene centre at the S2 pixel size in metres, rounded to whole
metres. A CRS and/or a resolution can be given instead; the grid then covers
the S2 footprint and its origin is aligned to multiples of the resolution, so
scenes of one area share pixel edges.

Reading never loads a whole scene: each source is read for one window of the
target grid at a time.
- S2, S1 and land cover go through a rasterio `WarpedVRT` on the target grid
  (bilinear for continuous values, nearest for labels). A source already on
  the target grid is read directly (no resampling at all). Source no-data is
  passed to GDAL's warper, which leaves it out of the bilinear kernel; target
  pixels the source does not cover get the destination no-data (0 for S2, NaN
  for S1, 255 for labels), never a valid value or class.
- The DEM is read in its own CRS for the source window under the target
  window (plus margins), its voids are filled there by
  `rasterio.fill.fillnodata` (up to `fill_distance` source pixels from valid
  data; larger voids stay missing), and it is then reprojected bilinearly onto
  the target window. Filling before resampling keeps a void from growing by
  the kernel width, and filling a window with margins gives the same values
  whatever window a pixel is read through. Like any void rim, a no-data
  collar inside the DEM file is extrapolated up to `fill_distance` pixels;
  beyond the file's own extent nothing is extrapolated (no-data).
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import rasterio
import rasterio.windows
from affine import Affine
from rasterio.crs import CRS
from rasterio.enums import Resampling
from rasterio.fill import fillnodata
from rasterio.vrt import WarpedVRT
from rasterio.warp import aligned_target, calculate_default_transform, reproject, transform_bounds
from rasterio.windows import Window

from rsjax.data.plausible import implausible_elevation


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
            self.vrt = WarpedVRT(
                ds, crs=grid.crs, transform=grid.transform, width=grid.width, height=grid.height,
                resampling=resampling, src_nodata=src_nodata, nodata=dst_nodata, dtype="float32")

    def read(self, window: Window) -> np.ndarray:
        """(bands, h, w) float32 for a window inside the target grid."""
        if self.vrt is not None:
            return self.vrt.read(self.bands, window=window, out_dtype="float32")
        data = self.ds.read(self.bands, window=window, out_dtype="float32")
        if self.src_nodata is not None:
            invalid = np.isnan(data) if np.isnan(self.src_nodata) else (data == np.float32(self.src_nodata))
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

    def read(self, window: Window) -> np.ndarray:
        """(h, w) float32 elevation for `window`, which may extend past the grid's edges (halos)."""
        height, width = int(window.height), int(window.width)
        dst_transform = self.grid.window_transform(window)
        out = np.full((height, width), np.nan, dtype=np.float32)
        src_window = self._source_window(dst_transform, height, width)
        if src_window is None:
            return out
        elevation = self.ds.read(self.band, window=src_window, out_dtype="float32")
        valid = np.isfinite(elevation)
        if self.src_nodata is not None and not np.isnan(self.src_nodata):
            valid &= elevation != np.float32(self.src_nodata)
        valid &= ~implausible_elevation(elevation)      # undeclared voids (-9999, -3.4e38, ...)
        if not valid.any():
            return out
        elevation[~valid] = np.nan
        if self.fill_distance > 0 and not valid.all():
            elevation = fillnodata(elevation, mask=valid.astype(np.uint8),
                                   max_search_distance=self.fill_distance).astype(np.float32)
        reproject(elevation, out,
                  src_transform=rasterio.windows.transform(src_window, self.ds.transform),
                  src_crs=self.ds.crs, src_nodata=np.nan,
                  dst_transform=dst_transform, dst_crs=self.grid.crs, dst_nodata=np.nan,
                  resampling=Resampling.bilinear)
        return out

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
