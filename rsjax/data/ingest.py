"""Ingestion: validate, register and tile a scene's GeoTIFFs into the data contract.

`iter_scene_tiles(scene, IngestOptions(tile_size=256), report)` yields the tile
dicts (rsjax/data/contract.py) of a scene from `contract.find_scenes` and counts
kept and dropped tiles in an `IngestReport`. In order: validate every file
(`validate.py`), register every source onto the target grid (`register.py`),
S1 to dB (`sar.py`), fill DEM voids and derive the terrain (`terrain.py`), cut
tiles at multiples of `stride`; a tile is dropped when more than
`max_nodata_fraction` of its pixels miss a source. Only windows are read.
docs/data.md (section 'Ingestion: GeoTIFFs to registered tiles') describes
every step, the no-data rules and the cloud-removal inputs.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from typing import Callable, Iterator, Optional

import numpy as np
import rasterio
import rasterio.errors
from rasterio.enums import Resampling
from rasterio.windows import Window

from rsjax.data import landcover, sar, storage, terrain
from rsjax.data.contract import (CLOUD, CLOUD_MASK_UNKNOWN, COVER_BINS, LULC_NODATA, S2_NODATA,
                                 InputError, ScenePaths, cover_bin_of_counts)
from rsjax.data.rasterio_io import open_source, read_failure
from rsjax.errors import UserError
from rsjax.data.register import DemSource, WarpedSource
from rsjax.data.untrusted import SIDECARS_OFF
from rsjax.data.validate import SourceSpec, default_max_grid_pixels, inspect_scene

log = logging.getLogger("rsjax")


@dataclasses.dataclass(frozen=True)
class IngestOptions:
    """How scenes are registered and tiled.

    tile_size, stride: tile side and step in target-grid pixels (stride None
        means tile_size, i.e. no overlap).
    max_nodata_fraction: tiles with a larger fraction of no-data pixels (see the
        module docstring) are dropped and counted in the report.
    target_crs, target_resolution: the registration grid; None keeps the S2
        file's grid (or its UTM zone when the S2 file is geographic). The CRS
        must be projected in metres.
    target_grid: a GeoTIFF whose grid to register onto instead of the S2
        file's, by the same rule (target_crs / target_resolution apply to it
        as they would to S2). Needed when a scene has no S2 file, as in
        whole-scene prediction of optical images (rsjax.predict).
    s1_units: "auto" (detect from values), "linear" or "db".
    s1_floor_db: dB value given to zero/negative power, instead of -inf.
    dem_fill_distance: DEM voids are filled by interpolation from valid cells
        up to this many DEM (source) pixels away, i.e. about 480 m for GLO-30;
        cells farther from data stay missing (NaN). 0 disables filling.
    gdal_cache_mb: cap on GDAL's block cache while reading (memory bound).
    s2_offset: added to the S2 values to give reflectance x 10000, e.g. -1000
        for L2A of processing baseline 04.00 and later; None takes what the
        file declares (BOA_ADD_OFFSET metadata, GDAL offset/scale; 0 when it
        declares nothing). See `optical.py`.
    lulc_map: another legend mapped onto Dynamic World labels, {file value:
        label 0..8 or 255}, or its text form "1:4,0:255" / JSON; stored as
        sorted pairs. See `landcover.py`.
    lulc_legend: "auto" refuses a land-cover file whose values cannot be
        Dynamic World (a 0/1 map); "dynamic_world" takes it as it is.
    max_grid_pixels: refuse a target grid of more pixels (default: $RSJAX_MAX_GRID_PIXELS,
        else 2.5e9, about 20 Sentinel-2 granules; see validate.py), so that a
        file declaring an absurd size is an error, not hours of reading.
    allow_any_format: open source files with any GDAL format and their sidecar
        files (VRTs included, following the files and URLs they name). Off by
        default: sources are read as plain GeoTIFFs only (`untrusted.py`),
        because such files can make GDAL read any local file or URL. Only for
        files you made yourself.
    """

    tile_size: int = 256
    stride: int | None = None
    max_nodata_fraction: float = 0.1
    target_crs: str | None = None
    target_resolution: float | None = None
    target_grid: str | None = None
    s1_units: str = "auto"
    s1_floor_db: float = -50.0
    dem_fill_distance: float = 16.0
    gdal_cache_mb: int = 128
    s2_offset: float | None = None
    lulc_map: landcover.LulcMap | str | None = None
    lulc_legend: str = "auto"
    allow_any_format: bool = False
    max_grid_pixels: int = dataclasses.field(default_factory=default_max_grid_pixels)

    def __post_init__(self):
        # UserError (a ValueError): the command line prints it as one line.
        # Frozen: normalize the legend mapping once, to hashable sorted pairs.
        object.__setattr__(self, "lulc_map", landcover.parse_lulc_map(self.lulc_map))
        if self.s2_offset is not None and not np.isfinite(self.s2_offset):
            raise UserError(f"s2_offset must be a finite number (e.g. -1000) or None, got {self.s2_offset}")
        if self.lulc_legend not in landcover.LEGENDS:
            raise UserError(f"lulc_legend must be one of {landcover.LEGENDS}, got {self.lulc_legend!r}")
        if self.tile_size < 3:
            raise UserError(f"tile_size must be at least 3 pixels, got {self.tile_size}")
        if self.stride is not None and self.stride < 1:
            raise UserError(f"stride must be a positive number of pixels, got {self.stride}")
        if not 0.0 <= self.max_nodata_fraction <= 1.0:
            raise UserError(f"max_nodata_fraction must be in [0, 1], got {self.max_nodata_fraction}")
        if self.s1_units not in sar.UNITS:
            raise UserError(f"s1_units must be one of {sar.UNITS}, got {self.s1_units!r}")
        if self.max_grid_pixels < 1:
            raise UserError(f"max_grid_pixels must be a positive number of pixels, got {self.max_grid_pixels}")
        if self.dem_fill_distance < 0:
            raise UserError(f"dem_fill_distance must be >= 0, got {self.dem_fill_distance}")

    @property
    def step(self) -> int:
        return self.stride if self.stride is not None else self.tile_size


@dataclasses.dataclass
class SceneCounts:
    """What ingestion did with one scene."""

    tiles_kept: int = 0
    tiles_dropped_nodata: int = 0
    s1_units: str = ""
    has_lulc: bool = True
    crs: str = ""
    width: int = 0
    height: int = 0
    resolution: float = 0.0
    s2_offset: list = dataclasses.field(default_factory=list)   # added to B2, B3, B4, B8
    warning: str = ""                                           # why the scene yields no tile
    data_warnings: list = dataclasses.field(default_factory=list)  # implausible or constant values (plausible.py)
    has_clouds: bool = False           # a cloudy S2 image (cloud removal)
    has_cloud_mask: bool = False       # ... and its cloud/shadow mask
    # kept tiles per cloud-cover bin (contract.COVER_BINS), then unknown cover
    tiles_by_cover: list = dataclasses.field(default_factory=list)

    @property
    def tiles_total(self) -> int:
        return self.tiles_kept + self.tiles_dropped_nodata


@dataclasses.dataclass
class IngestReport:
    """Counts per scene (`scenes[scene_id]`), and their totals.

    `progress`, when set, is called once per tile position read (kept or
    dropped), e.g. a `TileProgress`; it is not part of the report's data."""

    scenes: dict[str, SceneCounts] = dataclasses.field(default_factory=dict)
    progress: Optional[Callable[[], None]] = dataclasses.field(default=None, repr=False, compare=False)

    def scene(self, scene_id: str) -> SceneCounts:
        return self.scenes.setdefault(scene_id, SceneCounts())

    @property
    def tiles_kept(self) -> int:
        return sum(c.tiles_kept for c in self.scenes.values())

    @property
    def tiles_dropped_nodata(self) -> int:
        return sum(c.tiles_dropped_nodata for c in self.scenes.values())

    def require_tiles(self) -> None:
        """Raises InputError when no scene yielded a tile, with each scene's reason."""
        if self.scenes and self.tiles_kept == 0:
            reasons = "\n".join(f"  - {c.warning or f'scene {sid!r}: no tile'}" for sid, c in sorted(self.scenes.items()))
            raise InputError(f"no scene yields a tile ({len(self.scenes)} scene(s)):\n{reasons}")

    def to_dict(self) -> dict:
        return {
            "tiles_kept": self.tiles_kept,
            "tiles_dropped_nodata": self.tiles_dropped_nodata,
            "scenes": {sid: {**dataclasses.asdict(c), "tiles_total": c.tiles_total}
                       for sid, c in sorted(self.scenes.items())},
        }


def _gdal_env(opts: IngestOptions) -> dict:
    """GDAL settings while reading: a capped block cache (GDAL's default is 5 % of RAM), no
    probing for sidecar files (a request each on object storage, see storage.py), and no
    sidecar file read at all (`untrusted.SIDECARS_OFF`) unless any format is allowed."""
    return {"GDAL_CACHEMAX": int(opts.gdal_cache_mb) * 2**20, **storage.gdal_options(),
            **({} if opts.allow_any_format else SIDECARS_OFF)}


def validate_scene(scene: ScenePaths, opts: IngestOptions = IngestOptions()):
    """Checks every file of the scene; raises contract.InputError listing each problem (file, what, what to do).

    Returns the scene's target grid (`register.TargetGrid`), e.g. to plan
    which tiles it has before reading any of them."""
    with rasterio.Env(**_gdal_env(opts)):
        grid, _ = inspect_scene(scene, opts)
    return grid


class RegisteredScene:
    """One scene's sources registered on the target grid; a context manager.

        with RegisteredScene(scene, opts) as reg:
            arrays = reg.read(Window(0, 0, 256, 256))

    `read` returns the contract's arrays for a window of the target grid
    (s2, s1, lulc, dem) and reads only that window (plus a one-pixel halo of
    DEM for the derivatives), never the whole scene.

    Any of scene.s2, s1, dem, lulc may be None (prediction reads only what a
    model takes; without S2, opts.target_grid names the grid): that source
    reads as no-data and does not count in `nodata_mask`.
    """

    def __init__(self, scene: ScenePaths, opts: IngestOptions = IngestOptions()):
        self.scene = scene
        self.opts = opts
        self._env = _gdal_env(opts)
        self._datasets = []
        with rasterio.Env(**self._env):
            self.grid, self.specs = inspect_scene(scene, opts)
        self.has_lulc = scene.lulc is not None
        self.s1_units = self.specs["s1"].units if "s1" in self.specs else None
        self._s2 = self._s1 = self._lulc = self._dem = None
        self._s2_cloudy = self._cloud_mask = None
        self.has_clouds = scene.s2_cloudy is not None
        try:
            with rasterio.Env(**self._env):
                if "s2" in self.specs:
                    self._s2 = self._warped("s2", Resampling.bilinear, float(S2_NODATA))
                if "s2_cloudy" in self.specs:
                    self._s2_cloudy = self._warped("s2_cloudy", Resampling.bilinear, float(S2_NODATA))
                if "cloud_mask" in self.specs:
                    self._cloud_mask = self._warped("cloud_mask", Resampling.nearest,
                                                    float(CLOUD_MASK_UNKNOWN))
                if "s1" in self.specs:
                    self._s1 = self._warped("s1", Resampling.bilinear, float("nan"))
                if self.has_lulc:
                    self._lulc = self._warped("lulc", Resampling.nearest, float(LULC_NODATA))
                if "dem" in self.specs:
                    dem = self.specs["dem"]
                    self._dem = DemSource(self._open(dem), dem.bands[0], self.grid, dem.nodata,
                                          opts.dem_fill_distance)
        except BaseException:
            self.close()
            raise

    # -- grid ---------------------------------------------------------------
    @property
    def crs(self):
        return self.grid.crs

    @property
    def transform(self):
        return self.grid.transform

    @property
    def width(self) -> int:
        return self.grid.width

    @property
    def height(self) -> int:
        return self.grid.height

    # -- opening / closing --------------------------------------------------
    def _open(self, spec: SourceSpec) -> rasterio.DatasetReader:
        ds = open_source(spec.path, spec.role, self.opts.allow_any_format)
        self._datasets.append(ds)
        return ds

    def _warped(self, role: str, resampling: Resampling, dst_nodata: float) -> WarpedSource:
        spec = self.specs[role]
        return WarpedSource(self._open(spec), spec.bands, self.grid, resampling, spec.nodata, dst_nodata)

    def close(self) -> None:
        for name in ("_s2", "_s1", "_lulc", "_dem", "_s2_cloudy", "_cloud_mask"):
            source = getattr(self, name, None)
            if source is not None:
                source.close()
        for ds in self._datasets:
            ds.close()
        self._datasets = []

    def __enter__(self) -> "RegisteredScene":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- reading --------------------------------------------------------------
    def read(self, window: Window) -> dict:
        """{'s2', 's1', 'lulc', 'dem'} (and 's2_cloudy', 'cloud_mask' for a scene
        with a cloudy image) for `window` of the target grid, contract dtypes and no-data."""
        window = Window(int(window.col_off), int(window.row_off), int(window.width), int(window.height))
        if (window.col_off < 0 or window.row_off < 0 or window.col_off + window.width > self.width
                or window.row_off + window.height > self.height):
            raise ValueError(f"window {window} is not inside the {self.width}x{self.height} target grid")
        with rasterio.Env(**self._env):
            arrays = {
                "s2": self._guarded("s2", lambda: self._read_s2(window)),
                "s1": self._guarded("s1", lambda: self._read_s1(window)),
                "lulc": self._guarded("lulc", lambda: self._read_lulc(window)),
                "dem": self._guarded("dem", lambda: self._read_dem(window)),
            }
            if self.has_clouds:
                arrays["s2_cloudy"] = self._guarded(
                    "s2_cloudy", lambda: self._read_optical(self._s2_cloudy, "s2_cloudy", window))
                arrays["cloud_mask"] = self._guarded("cloud_mask", lambda: self._read_cloud_mask(window))
            return arrays

    def _guarded(self, role: str, read):
        try:
            return read()
        except rasterio.errors.RasterioError as err:
            raise read_failure(self.specs[role].path, role, err) from err

    def _read_s2(self, window: Window) -> np.ndarray:
        return self._read_optical(self._s2, "s2", window)

    def _read_optical(self, source, role: str, window: Window) -> np.ndarray:
        """S2 or the cloudy S2 image: uint16 reflectance x 10000, offsets applied, 0 = missing."""
        if source is None:
            return np.full((int(window.height), int(window.width), 4), S2_NODATA, np.uint16)
        bands = source.read(window)                          # (4, h, w) float32, 0 = missing
        missing = np.isnan(bands).any(axis=0) | (bands == S2_NODATA).any(axis=0)
        offsets = self.specs[role].offsets
        if offsets is not None and any(offsets):
            bands = bands + np.asarray(offsets, np.float32)[:, None, None]
        s2 = np.clip(np.rint(np.nan_to_num(bands, nan=0.0)), 0, 65535).astype(np.uint16)
        s2 = np.moveaxis(s2, 0, -1)
        # A valid reflectance that rounds to 0 would read as missing: keep it at 1.
        s2[~missing] = np.maximum(s2[~missing], 1)
        s2[missing] = S2_NODATA
        return s2

    def _read_cloud_mask(self, window: Window) -> np.ndarray:
        h, w = int(window.height), int(window.width)
        if self._cloud_mask is None:
            return np.full((h, w), CLOUD_MASK_UNKNOWN, np.uint8)
        codes = self._cloud_mask.read(window)[0]
        # Validation guarantees codes 0..2 on valid pixels; anything else is unknown.
        return np.where(np.isfinite(codes) & (codes >= 0) & (codes <= 2), codes,
                        CLOUD_MASK_UNKNOWN).astype(np.uint8)

    def _read_s1(self, window: Window) -> np.ndarray:
        if self._s1 is None:
            return np.full((int(window.height), int(window.width), 2), np.nan, np.float32)
        bands = self._s1.read(window)                        # (2, h, w), NaN = missing
        db = sar.to_db(bands, self.s1_units, self.opts.s1_floor_db)
        db[:, np.isnan(db).any(axis=0)] = np.nan
        return np.moveaxis(db, 0, -1).astype(np.float32)

    def _read_lulc(self, window: Window) -> np.ndarray:
        h, w = int(window.height), int(window.width)
        if self._lulc is None:
            return np.full((h, w), LULC_NODATA, dtype=np.uint8)
        labels = self._lulc.read(window)[0]
        if self.opts.lulc_map is not None:
            return landcover.apply_lulc_map(labels, self.opts.lulc_map)
        labels = np.where(np.isfinite(labels), labels, LULC_NODATA)
        # Validation guarantees whole numbers in 0..8 or 255 for valid pixels.
        return np.rint(labels).astype(np.uint8)

    def _read_dem(self, window: Window) -> np.ndarray:
        if self._dem is None:
            return np.full((int(window.height), int(window.width), 4), np.nan, np.float32)
        haloed = Window(window.col_off - 1, window.row_off - 1, window.width + 2, window.height + 2)
        elevation, beyond_extent = self._dem.read(haloed)
        xres, yres = self.grid.transform.a, self.grid.transform.e
        return terrain.terrain_channels(elevation, xres, yres, outside=beyond_extent)

    def nodata_mask(self, arrays: dict) -> np.ndarray:
        """(h, w) bool: pixels where any source is missing (only sources the scene has a file for)."""
        mask = np.zeros(arrays["lulc"].shape, bool)
        if self._s2 is not None:
            mask |= (arrays["s2"] == S2_NODATA).any(axis=-1)
        if self._s1 is not None:
            mask |= np.isnan(arrays["s1"]).any(axis=-1)
        if self._dem is not None:
            mask |= np.isnan(arrays["dem"]).any(axis=-1)
        if self.has_lulc:
            mask |= arrays["lulc"] == LULC_NODATA
        if self._s2_cloudy is not None:
            mask |= (arrays["s2_cloudy"] == S2_NODATA).any(axis=-1)
        return mask


def tile_count(width: int, height: int, tile_size: int, stride: int) -> int:
    """How many tile positions `tile_windows` gives: what a scene costs to tile, known up front."""
    if width < tile_size or height < tile_size:
        return 0
    return ((height - tile_size) // stride + 1) * ((width - tile_size) // stride + 1)


def announce_tiles(scene_id: str, grid, opts: IngestOptions) -> int:
    """Logs how many tile positions a scene has (before any is read); returns the number."""
    count = tile_count(grid.width, grid.height, opts.tile_size, opts.step)
    log.info("scene '%s': %d x %d px on the target grid, %d tile position(s) of %d px (stride %d)",
             scene_id, grid.width, grid.height, count, opts.tile_size, opts.step)
    return count


class TileProgress:
    """Counts tile positions read and logs `what: 1200/5000 tile positions read (24.0%), 35.2/s, ETA 1m48s`
    at most every `every_seconds`, so a long tiling is never silent (an IngestReport's `progress`).

    `total`: the positions to read, when known up front (the dataset build
    validates every scene first); otherwise 0, and each scene adds its own
    when it starts (`add_scene`, which also announces it)."""

    def __init__(self, total: int = 0, what: str = "tiling", every_seconds: float = 30.0,
                 clock: Callable[[], float] = time.monotonic, log_fn: Optional[Callable[[str], None]] = None):
        self.total, self.what, self.every_seconds = int(total), what, float(every_seconds)
        self.grows = self.total == 0
        self.clock = clock
        self.log_fn = log_fn or (lambda line: log.info("%s", line))
        self.done = 0
        self.started = self._last = clock()

    def add_scene(self, scene_id: str, grid, opts: IngestOptions) -> None:
        """A scene starts: announce its tile positions, and count them when the total grows."""
        if self.grows:
            self.total += announce_tiles(scene_id, grid, opts)

    def __call__(self) -> None:
        self.done += 1
        now = self.clock()
        if now - self._last >= self.every_seconds or self.done == self.total:
            self._last = now
            self.log_fn(self.line(now))

    def line(self, now: Optional[float] = None) -> str:
        from rsjax.logging_utils import eta_seconds, format_duration  # noqa: PLC0415

        elapsed = (self.clock() if now is None else now) - self.started
        rate = self.done / elapsed if elapsed > 0 else 0.0
        share = f" ({100.0 * self.done / self.total:.1f}%)" if self.total else ""
        return (f"{self.what}: {self.done}/{self.total} tile positions read{share}, {rate:.3g}/s, ETA "
                f"{format_duration(eta_seconds(self.done, elapsed, self.total - self.done))}")


def tile_windows(width: int, height: int, tile_size: int, stride: int) -> Iterator[Window]:
    """Row-major windows of tile_size that fit entirely in a width x height grid."""
    for row in range(0, height - tile_size + 1, stride):
        for col in range(0, width - tile_size + 1, stride):
            yield Window(col, row, tile_size, tile_size)


def tile_id(scene_id: str, row: int, col: int) -> str:
    """Deterministic tile key from the scene id and the tile's pixel offsets (no paths)."""
    return f"{scene_id}_r{row:06d}_c{col:06d}"


def iter_scene_tiles(scene: ScenePaths, opts: IngestOptions = IngestOptions(),
                     report: IngestReport | None = None, rows: range | None = None) -> Iterator[dict]:
    """Validates, registers and tiles one scene; yields the kept tiles as contract dicts.

    Counts kept and dropped tiles in `report` (when given) under the scene id.
    `rows`: only the tiles whose top pixel row is in this range (a strip of
    the scene, so that strips of one scene can be ingested in parallel).
    """
    with RegisteredScene(scene, opts) as reg:
        counts = report.scene(scene.scene_id) if report is not None else SceneCounts()
        counts.s1_units = reg.s1_units
        counts.data_warnings = [w for spec in reg.specs.values() for w in spec.warnings]
        counts.has_lulc = reg.has_lulc
        counts.has_clouds = reg.has_clouds
        counts.has_cloud_mask = reg.has_clouds and scene.cloud_mask is not None
        if reg.has_clouds:
            counts.tiles_by_cover = [0] * (len(COVER_BINS) + 1)
        counts.crs = reg.grid.crs_string()
        counts.width, counts.height = reg.width, reg.height
        counts.resolution = float(reg.grid.resolution[0])
        counts.s2_offset = list(reg.specs["s2"].offsets) if "s2" in reg.specs else []
        crs = reg.grid.crs_string()
        if report is not None and report.progress is not None and rows is None:
            getattr(report.progress, "add_scene", lambda *a: None)(scene.scene_id, reg.grid, opts)
        for window in tile_windows(reg.width, reg.height, opts.tile_size, opts.step):
            if rows is not None and int(window.row_off) not in rows:
                continue
            if report is not None and report.progress is not None:
                report.progress()
            arrays = reg.read(window)
            if reg.nodata_mask(arrays).mean() > opts.max_nodata_fraction:
                counts.tiles_dropped_nodata += 1
                continue
            counts.tiles_kept += 1
            t = reg.grid.window_transform(window)
            if reg.has_clouds:
                cloudy, known = cloud_counts(arrays["cloud_mask"])
                arrays["cloud_cover"] = cloud_cover(arrays["cloud_mask"])
                counts.tiles_by_cover[cover_bin_of_counts(cloudy, known)] += 1   # -1: unknown
            yield {
                **arrays,
                "tile_id": tile_id(scene.scene_id, int(window.row_off), int(window.col_off)),
                "scene_id": scene.scene_id,
                "crs": crs,
                "transform": np.array([t.a, t.b, t.c, t.d, t.e, t.f], dtype=np.float64),
            }
        if counts.tiles_kept == 0 and rows is None:   # a strip's caller judges the whole scene
            counts.warning = no_tile_reason(scene.scene_id, reg.width, reg.height, opts, counts)
            log.warning("%s", counts.warning)


def cloud_counts(mask: np.ndarray) -> tuple[int, int]:
    """(cloud pixels, pixels with a known mask code): code 1 is cloud, shadows are not."""
    return int(np.count_nonzero(mask == CLOUD)), int(np.count_nonzero(mask != CLOUD_MASK_UNKNOWN))


def cloud_cover(mask: np.ndarray) -> np.float32:
    """Share of cloud pixels (code 1; shadows are not cloud) among the pixels with
    a known mask code; NaN when no code is known. Stored with the tile; its
    cover bin comes from the counts (`contract.cover_bin_of_counts`)."""
    cloudy, known = cloud_counts(mask)
    return np.float32(cloudy / known) if known else np.float32(np.nan)


def no_tile_reason(scene_id: str, width: int, height: int, opts: IngestOptions, counts: SceneCounts) -> str:
    """Why a scene yields no tile, and what to do, for the warning and the report."""
    if width < opts.tile_size or height < opts.tile_size:
        return (f"scene '{scene_id}': {width} x {height} pixels on the target grid is smaller than the "
                f"tile size {opts.tile_size} x {opts.tile_size}, so it yields no tile. Use a tile_size of "
                f"at most {min(width, height)}, or export a larger area.")
    return (f"scene '{scene_id}': all {counts.tiles_dropped_nodata} tiles of {opts.tile_size} x "
            f"{opts.tile_size} have more than {opts.max_nodata_fraction:.0%} no-data pixels (a source "
            "missing) and were dropped, so it yields no tile. Check the sources' coverage, or raise "
            "max_nodata_fraction.")
