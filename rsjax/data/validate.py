"""Checks every file of a scene before any work starts.

Each file must open as a raster, have the expected bands and a CRS, overlap
the target grid and not be all no-data; land cover must hold Dynamic World
labels (or come with `lulc_map` / `lulc_legend`); S2 files are checked for a
declared BOA offset. Costs are bounded: a decimated read of at most
`SAMPLE_PIXELS` per side, except the label band, read whole block by block.
All problems of a scene are raised together in one InputError, one line per
file.
docs/data.md (section 'Validation') lists the checks and what they cost.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np
import rasterio
import rasterio.errors
from rasterio.enums import Resampling

from rsjax.data import landcover, optical, plausible, sar, storage
from rsjax.data.contract import (CLOUD_MASK_CODES, CLOUD_MASK_UNKNOWN, LULC_NODATA, NUM_CLASSES, S2_BANDS,
                                 InputError, ScenePaths, Source, as_source)
from rsjax.data.rasterio_io import WHAT, open_raster, read_failure, select_bands, source_name
from rsjax.data.register import TargetGrid, footprint_overlaps, resampling_scale, target_grid_for

log = logging.getLogger(__name__)

SAMPLE_PIXELS = 512
# Work is bounded by what the files hold, not by what they declare:
# - a source may be at most this many times finer than the target grid along
#   each axis: reading one target window costs (ratio * window)^2 source
#   pixels (the DEM's window is read whole, to fill voids), so a DEM of 1 cm
#   pixels declared over a 10 m grid would ask for gigabytes per tile. 32
#   takes a 1 m LiDAR DEM onto a 30 m grid; a 256 px tile then reads at most
#   8192^2 source pixels (256 MiB as float32) per band.
MAX_SOURCE_OVERSAMPLING = 32
# - the target grid may hold at most this many pixels (IngestOptions.max_grid_pixels,
#   --max_grid_pixels, or RSJAX_MAX_GRID_PIXELS): 2.5e9 is 50000 x 50000 px,
#   about 20 Sentinel-2 granules (10980^2) on one grid. Beyond it a file of a
#   few hundred bytes could announce millions of tiles and hours of reading.
DEFAULT_MAX_GRID_PIXELS = 2_500_000_000
_MAX_LISTED = 10
_MAX_VALUES = 1000            # distinct label values: far more than any legend


@dataclasses.dataclass(frozen=True)
class SourceSpec:
    """What validation learned about one source file, for the readers."""

    role: str
    path: Source                  # a file, or the pieces of a split export
    bands: tuple[int, ...]
    nodata: float | None          # the no-data value source pixels carry (file's, or the role's default)
    units: str | None = None      # S1 only: 'linear' or 'db'
    offsets: tuple[float, ...] | None = None   # S2 only: added to each band to give reflectance x 10000
    warnings: tuple[str, ...] = ()  # implausible or constant values (plausible.py), logged by inspect_scene


def _any_format(opts) -> bool:
    """Whether the user allowed formats other than GeoTIFF (see `untrusted`)."""
    return bool(getattr(opts, "allow_any_format", False))


def default_nodata(role: str, ds: rasterio.DatasetReader) -> float | None:
    """The file's declared no-data, else the convention of its role.

    S2 without a declared value uses 0 (the contract's no-data); float files
    use NaN; labels use 255; a DEM without one has no missing pixels but NaN.
    """
    if ds.nodata is not None:
        return float(ds.nodata)
    if role in ("s2", "s2_cloudy"):
        return 0.0
    if role == "lulc":
        return float(LULC_NODATA)
    if role == "cloud_mask":
        return float(CLOUD_MASK_UNKNOWN)
    return float("nan") if np.dtype(ds.dtypes[0]).kind == "f" else None


def _invalid(values: np.ndarray, nodata: float | None) -> np.ndarray:
    bad = ~np.isfinite(values) if values.dtype.kind == "f" else np.zeros(values.shape, bool)
    if nodata is not None and not np.isnan(nodata):
        bad |= values == nodata
    return bad


def _sample(ds: rasterio.DatasetReader, bands: tuple[int, ...], role: str) -> np.ndarray:
    """A decimated (bands, h, w) float64 read of at most SAMPLE_PIXELS per side."""
    out_h = min(ds.height, SAMPLE_PIXELS)
    out_w = min(ds.width, SAMPLE_PIXELS)
    try:
        data = ds.read(list(bands), out_shape=(len(bands), out_h, out_w), resampling=Resampling.nearest)
    except rasterio.errors.RasterioError as err:
        raise read_failure(source_name(ds), role, err) from err
    return data.astype(np.float64)


def _label_values(ds: rasterio.DatasetReader, band: int, nodata: float | None,
                  role: str = "lulc") -> tuple[set, set]:
    """(whole values, fractional values) of a label band's valid pixels, read block by block.

    Stops early once either set is too large to be a legend (the file is in error then anyway).
    """
    values: set = set()
    fractional: set = set()
    try:
        for _, window in ds.block_windows(band):
            data = ds.read(band, window=window)
            if data.dtype == np.uint8:
                # Fast path for the usual label dtype: which of the 256 values occur.
                present = np.flatnonzero(np.bincount(data.ravel(), minlength=256))
                uniques = present[present != (nodata if nodata is not None else -1)]
            else:
                uniques = np.unique(data[~_invalid(data, nodata)])
            if uniques.dtype.kind == "f":
                whole = uniques == np.round(uniques)
                fractional.update(uniques[~whole].tolist()[:_MAX_LISTED])
                uniques = uniques[whole]
            values.update(int(v) for v in uniques.tolist())
            if len(values) > _MAX_VALUES or len(fractional) >= _MAX_LISTED:
                break
    except rasterio.errors.RasterioError as err:
        raise read_failure(source_name(ds), role, err) from err
    return values, fractional


def check_labels(ds: rasterio.DatasetReader, band: int, nodata: float | None,
                 lulc_map: landcover.LulcMap | None = None, lulc_legend: str = "auto") -> None:
    """Reads the label band; raises InputError when its values cannot be read as Dynamic World labels.

    Fractional values are always an error. With `lulc_map`, every value must
    be mapped; without, values must lie in 0..8 (and 255), and unless
    `lulc_legend` is 'dynamic_world' the value set must be plausible for
    Dynamic World (`landcover.not_dynamic_world`).
    """
    name = source_name(ds)
    values, fractional = _label_values(ds, band, nodata)
    if fractional:
        raise InputError(
            f"{name}: land cover band {band} holds fractional values "
            f"{sorted(fractional)[:_MAX_LISTED]}; labels must be whole numbers 0..{NUM_CLASSES - 1} "
            f"(Dynamic World) or {LULC_NODATA} for no data. Export the `label` band, not class probabilities.")
    if lulc_map is not None:
        unmapped = sorted(v for v in values if v not in dict(lulc_map))
        if unmapped:
            raise InputError(
                f"{name}: land cover band {band} holds values {unmapped[:_MAX_LISTED]} that lulc_map "
                f"'{landcover.format_lulc_map(lulc_map)}' does not map. Map every value the file holds "
                f"(to {LULC_NODATA} for no data), or declare a value as the file's no-data value.")
        return
    bad = sorted(v for v in values if v not in set(range(NUM_CLASSES)) | {LULC_NODATA})
    if bad:
        raise InputError(
            f"{name}: land cover band {band} holds values outside 0..{NUM_CLASSES - 1} and "
            f"{LULC_NODATA}: {bad[:_MAX_LISTED]}, so it is not Dynamic World. Map its legend onto "
            f"Dynamic World labels with lulc_map (e.g. '10:1,20:5,80:0'), set those values to "
            f"{LULC_NODATA} (no data), or declare their value as the file's no-data value.")
    reason = landcover.not_dynamic_world(values - {LULC_NODATA}) if lulc_legend == "auto" else None
    if reason:
        legend = ds.tags().get("LEGEND")
        raise InputError(
            f"{name}: land cover band {band} {reason}" + (f" (its LEGEND tag: {legend!r})" if legend else "")
            + ". Map its values onto Dynamic World labels with lulc_map (e.g. '1:4,0:255' reads 1 as "
            "crops and 0 as no data), or, if it really is Dynamic World, set lulc_legend='dynamic_world'.")


def s1_units_of(ds: rasterio.DatasetReader, bands: tuple[int, ...], values: np.ndarray) -> str:
    """'linear' or 'db' for an S1 file: what its metadata declares, checked against its values.

    Raises InputError naming the file when metadata and values disagree, or when
    neither tells (the user then says it with s1_units).
    """
    texts = [ds.units[b - 1] for b in bands] + [ds.descriptions[b - 1] for b in bands]
    for tags in [ds.tags()] + [ds.tags(b) for b in bands]:
        texts += [f"{k} {v}" for k, v in tags.items() if "unit" in k.lower()]
    declared = sar.declared_units(texts)
    try:
        measured, why = sar.detect_units(values), ""
    except ValueError as err:
        measured, why = None, str(err)
    if declared and measured and declared != measured:
        raise InputError(
            f"{source_name(ds)}: its metadata says the backscatter is in {declared} "
            f"({_short(t for t in texts if t)}), but its values look like {measured} "
            f"({sar.share_below_minus_one(values):.1%} below -1). Say which with s1_units='linear' or 'db'.")
    if declared or measured:
        return declared or measured
    raise InputError(
        f"{source_name(ds)}: cannot tell whether the backscatter is linear power or dB ({why}). "
        "Say which with s1_units='linear' or 'db'.")


def _short(texts, limit: int = 4) -> str:
    texts = list(texts)
    return ", ".join(texts[:limit]) + (", ..." if len(texts) > limit else "")


def check_cloud_mask(ds: rasterio.DatasetReader, band: int, nodata: float | None) -> None:
    """Raises InputError unless the mask's valid pixels hold only 0 (clear), 1 (cloud), 2 (shadow)."""
    values, fractional = _label_values(ds, band, nodata, "cloud_mask")
    bad = sorted(values - set(CLOUD_MASK_CODES)) + sorted(fractional)
    if bad:
        raise InputError(
            f"{source_name(ds)}: cloud mask values {_listed(bad)} are not codes 0 (clear), 1 (cloud), "
            f"2 (cloud shadow) or the no-data {nodata:g}. Convert the mask first: e.g. from the "
            "Sentinel-2 scene classification (SCL) 8, 9, 10 (clouds) and 7 -> 1, 3 (shadow) -> 2, "
            "the rest -> 0; from a cloud probability, threshold it to 0/1.")


def _listed(values) -> str:
    shown = ", ".join(f"{v:g}" for v in values[:_MAX_LISTED])
    return shown + (" ..." if len(values) > _MAX_LISTED else "")


def inspect_source(path: Source, role: str, grid: TargetGrid | None, opts) -> SourceSpec:
    """Validates one file; returns its SourceSpec or raises InputError naming it."""
    with open_raster(path, role, _any_format(opts)) as ds:
        if ds.crs is None:
            raise InputError(
                f"{path}: has no CRS (coordinate reference system). Export it georeferenced, "
                f"or assign one, e.g. `gdal_edit.py -a_srs EPSG:32631 {path}`.")
        bands = select_bands(ds, role)
        if grid is not None and not footprint_overlaps(ds, grid):
            raise InputError(
                f"{path}: its footprint {tuple(round(b, 6) for b in ds.bounds)} in {ds.crs} does not "
                f"overlap the target grid (the optical scene's area). Check that this file belongs "
                f"to the same scene and has the right CRS.")
        if grid is not None:
            check_resolution_ratio(ds, grid, path, role)
        nodata = default_nodata(role, ds)
        sample = _sample(ds, bands, role)
        invalid = _invalid(sample, nodata)
        warnings = []
        if role == "dem":
            # Elevations no place on Earth has are voids, declared or not (plausible.py).
            warnings.append(plausible.range_warning(path, role, sample[~invalid]))
            invalid |= plausible.implausible_elevation(sample)
        # A pixel is missing when any of its channels is (contract: one no-data per pixel).
        pixel_missing = invalid.any(axis=0)
        if pixel_missing.all():
            raise InputError(
                f"{path}: the {WHAT[role]} file is entirely no-data (no-data value {nodata}). "
                f"Export the scene again" + (", or leave the land cover out." if role == "lulc" else "."))
        units = None
        valid_values = sample[:, ~pixel_missing]
        if role in ("s2", "s2_cloudy") and valid_values.max() <= 2.0:
            raise InputError(
                f"{path}: optical values are at most {valid_values.max():.3g}: this looks like "
                f"reflectance in 0..1. Provide reflectance x 10000 (as Sentinel-2 L2A products store it).")
        if role == "s1":
            units = opts.s1_units if opts.s1_units != "auto" else s1_units_of(ds, bands, valid_values)
        offsets = None
        if role in ("s2", "s2_cloudy"):
            offsets = optical.s2_offsets(ds, bands, S2_BANDS, getattr(opts, "s2_offset", None), source_name(ds))
        if role == "cloud_mask":
            check_cloud_mask(ds, bands[0], nodata)
        if role == "lulc":
            check_labels(ds, bands[0], nodata, getattr(opts, "lulc_map", None),
                         getattr(opts, "lulc_legend", "auto"))
        if role == "s2":
            warnings.append(plausible.range_warning(path, role, valid_values + np.asarray(offsets)[:, None]))
        if role == "s1":
            warnings.append(plausible.range_warning(path, role, valid_values, units))
        warnings.append(plausible.constant_warning(path, role, valid_values))
        return SourceSpec(role=role, path=path, bands=bands, nodata=nodata, units=units, offsets=offsets,
                          warnings=tuple(w for w in warnings if w))


def check_resolution_ratio(ds: rasterio.DatasetReader, grid: TargetGrid, path, role: str) -> None:
    """InputError when `ds` is more than MAX_SOURCE_OVERSAMPLING times finer than the grid."""
    target_per_source = min(resampling_scale(ds, grid))
    finer = 1.0 / target_per_source if target_per_source > 0 else float("inf")
    if finer > MAX_SOURCE_OVERSAMPLING:
        raise InputError(
            f"{path}: its pixels are {finer:.4g} times finer than the target grid's "
            f"({abs(ds.transform.a):.4g} {_units(ds.crs)} against {grid.resolution[0]:.4g} m), more "
            f"than the {MAX_SOURCE_OVERSAMPLING}x rsjax reads (each target tile would read "
            f"{finer:.4g}^2 times its pixels from this file). Resample the {WHAT[role]} file nearer "
            f"the target resolution first (e.g. gdalwarp -tr {grid.resolution[0]:g} "
            f"{grid.resolution[1]:g} -r average), or register onto a finer grid (--target_resolution).")


def _units(crs) -> str:
    return "degrees" if crs is not None and crs.is_geographic else "m"


def check_grid_size(grid: TargetGrid, where: str, opts) -> None:
    """InputError when the grid holds more pixels than `opts.max_grid_pixels` allows."""
    limit = max_grid_pixels(opts)
    pixels = grid.width * grid.height
    if pixels > limit:
        raise InputError(
            f"{where}: the target grid it gives is {grid.width} x {grid.height} px ({pixels:.3g} "
            f"pixels), more than max_grid_pixels ({limit:.3g}; a Sentinel-2 granule is 1.2e8). "
            "Check its size and resolution; if the grid is meant, raise the limit: "
            "RSJAX_MAX_GRID_PIXELS=N before any rsjax command (or rsjax ingest --max_grid_pixels N).")


def max_grid_pixels(opts) -> int:
    """The grid-size limit of `opts`, else `default_max_grid_pixels()`."""
    value = getattr(opts, "max_grid_pixels", None)
    return default_max_grid_pixels() if value is None else int(value)


def default_max_grid_pixels() -> int:
    """$RSJAX_MAX_GRID_PIXELS (so a dataset build can raise it), else DEFAULT_MAX_GRID_PIXELS."""
    import os

    value = os.environ.get("RSJAX_MAX_GRID_PIXELS")
    if not value:
        return DEFAULT_MAX_GRID_PIXELS
    try:
        return max(1, int(float(value)))
    except (ValueError, OverflowError):
        # Read when options are made (also at import): a warning, not a traceback.
        log.warning("RSJAX_MAX_GRID_PIXELS=%r is not a number of pixels; using %d.", value,
                    DEFAULT_MAX_GRID_PIXELS)
        return DEFAULT_MAX_GRID_PIXELS


def grid_of_file(path: Path, opts) -> TargetGrid:
    """The target grid taken from any GeoTIFF (`opts.target_grid`), by the rule used for S2 files."""
    with open_raster(path, "grid", _any_format(opts)) as ds:
        if ds.crs is None:
            raise InputError(f"{path}: has no CRS, so its grid cannot be the target grid. Choose a "
                             "georeferenced GeoTIFF as the target grid.")
        return target_grid_for(ds, opts.target_crs, opts.target_resolution)


def inspect_scene(scene: ScenePaths, opts) -> tuple[TargetGrid, dict[str, SourceSpec]]:
    """Validates all files of a scene. Returns the target grid and a SourceSpec per source.

    The grid comes from `opts.target_grid` (a GeoTIFF path) when set, else from
    the S2 file. Sources that are None are skipped (lulc in training data;
    any of s2, s1, dem when predicting from the others, with a target grid).

    Raises InputError listing every problem found (one line per file), or
    ValueError for options that cannot work (e.g. a geographic target CRS).
    """
    problems: list[str] = []
    specs: dict[str, SourceSpec] = {}
    grid = None
    grid_file = getattr(opts, "target_grid", None)
    try:
        if grid_file is not None:
            grid = grid_of_file(storage.as_path(grid_file), opts)
        elif scene.s2 is None:
            raise InputError(
                f"scene '{scene.scene_id}' has no optical (S2) file to take the target grid from: "
                "name a GeoTIFF whose grid to use (IngestOptions.target_grid).")
        else:
            specs["s2"] = inspect_source(as_source(scene.s2), "s2", None, opts)
            with open_raster(scene.s2, "s2", _any_format(opts)) as ds:
                grid = target_grid_for(ds, opts.target_crs, opts.target_resolution)
        check_grid_size(grid, str(grid_file if grid_file is not None else scene.s2), opts)
    except InputError as err:
        problems.append(str(err))
        grid = None
    # A scene read for prediction may lack any source but the one the grid comes from;
    # S2 was inspected above unless another file gives the grid.
    roles = [r for r in ("s2", "s1", "dem", "lulc", "s2_cloudy", "cloud_mask")
             if getattr(scene, r) is not None and (r != "s2" or grid_file is not None)]
    for role in roles:
        try:
            specs[role] = inspect_source(as_source(getattr(scene, role)), role, grid, opts)
        except InputError as err:
            problems.append(str(err))
    for spec in specs.values():
        for warning in spec.warnings:
            log.warning("%s", warning)
    if problems:
        lines = "\n".join(f"  - {p}" for p in problems)
        raise InputError(f"scene '{scene.scene_id}': {len(problems)} problem(s) found before ingestion:\n{lines}")
    return grid, specs
