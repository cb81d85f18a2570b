"""What a predicted GeoTIFF says about itself, and the STAC Item beside it.

rsjax.predict writes these; this module holds what a GIS reads from them:

- per-band metadata (`apply_band_metadata`): descriptions, GDAL scale/offset,
  colour interpretation, band tags; the Dynamic World colour table and class
  names for land cover;
- provenance without local paths (`run_name`): the run is named by its
  workdir's last component, never by an absolute path;
- a STAC Item (`stac_item`, written as `<output>.stac.json` by
  `rsjax.predict`) with the projection, raster, eo and classification
  extensions, read from the finished file so it cannot disagree with it.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import os
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence
from urllib.parse import urlsplit, urlunsplit

from rsjax.data.contract import (LULC_CLASSES, LULC_NODATA, LULC_PALETTE, S2_NODATA, InputError,
                                 Mosaic)

log = logging.getLogger("rsjax")

STAC_SUFFIX = ".stac.json"
# An input this many folders above the output's at most is linked by a relative
# href (a scene folder beside the output folder); one further away by its name only.
NEARBY_LEVELS = 2
# GDAL's acquisition time (IMAGERY domain), then what GDAL's SENTINEL2 and SAFE
# drivers report (copied by gdal_translate): the scene's time when an input has one.
DATETIME_TAGS = (("IMAGERY", "ACQUISITIONDATETIME"), (None, "ACQUISITIONDATETIME"),
                 (None, "PRODUCT_START_TIME"), (None, "ACQUISITION_START_TIME"))


@dataclasses.dataclass(frozen=True)
class BandSpec:
    name: str                            # the band description: what ingestion reads back
    common_name: Optional[str] = None    # STAC eo common name
    center_wavelength: Optional[float] = None      # micrometres
    colorinterp: str = "undefined"       # rasterio ColorInterp member


@dataclasses.dataclass(frozen=True)
class OutputSpec:
    """The pixel contract of one kind of output."""

    title: str
    dtype: str
    nodata: int
    bands: tuple[BandSpec, ...]
    overviews: str                       # COG overview resampling
    scale: Optional[float] = None        # GDAL scale/offset: physical = DN x scale + offset
    offset: Optional[float] = None
    classes: tuple[str, ...] = ()        # label value i names classes[i]


# Sentinel-2 surface reflectance x 10000 with no offset: the dataset's unit (ingestion
# removes the baseline-04.00 BOA offset), so scale 1e-4 and offset 0 give reflectance.
# Centre wavelengths as the Sentinel-2 STAC collections give them (S2A, micrometres).
S2_BAND_SPECS = (BandSpec("B2", "blue", 0.49, "blue"), BandSpec("B3", "green", 0.56, "green"),
                 BandSpec("B4", "red", 0.665, "red"), BandSpec("B8", "nir", 0.842, "undefined"))
REFLECTANCE = OutputSpec("Sentinel-2 surface reflectance (B2, B3, B4, B8)", "uint16", S2_NODATA,
                         S2_BAND_SPECS, "average", scale=1e-4, offset=0.0)
CLOUD_FREE = dataclasses.replace(
    REFLECTANCE, title="cloud-free Sentinel-2 surface reflectance (B2, B3, B4, B8)")
SYNTHETIC = dataclasses.replace(
    REFLECTANCE, title="synthetic Sentinel-2 surface reflectance (B2, B3, B4, B8)")
# A flow model's K samples: their per-pixel mean (the four bands) then their
# standard deviation, in the same unit (reflectance x 10000, at least 1).
SYNTHETIC_MEAN_STD = dataclasses.replace(
    REFLECTANCE, title="synthetic Sentinel-2 surface reflectance (B2, B3, B4, B8): mean, then "
                       "standard deviation over samples",
    bands=S2_BAND_SPECS + tuple(BandSpec(f"{b.name}_std") for b in S2_BAND_SPECS))
# A model with a predicted variance (UnCRtainTS): the image, then the square
# root of its variance, in the image's unit (reflectance x 10000, at least 1).
CLOUD_FREE_MEAN_STD = dataclasses.replace(
    REFLECTANCE, title="cloud-free Sentinel-2 surface reflectance (B2, B3, B4, B8), then its "
                       "predicted standard deviation (square root of the model's variance)",
    bands=S2_BAND_SPECS + tuple(BandSpec(f"{b.name}_std") for b in S2_BAND_SPECS))
LAND_COVER = OutputSpec("land cover (Dynamic World classes)", "uint8", LULC_NODATA,
                        (BandSpec("label", colorinterp="palette"),), "mode", classes=LULC_CLASSES)


# ---------------------------------------------------------------------------
# The GeoTIFF's own metadata
# ---------------------------------------------------------------------------
def palette_colormap() -> dict[int, tuple[int, int, int, int]]:
    """Dynamic World's colours for labels 0..8; every other value (255 = no data) transparent."""
    cmap = {i: (0, 0, 0, 0) for i in range(256)}
    for label, hex_colour in enumerate(LULC_PALETTE):
        h = hex_colour.lstrip("#")
        cmap[label] = (int(h[0:2], 16), int(h[2:4], 16), int(h[4:6], 16), 255)
    return cmap


def class_tags(classes: Sequence[str]) -> dict[str, str]:
    """CLASS_<value>=<name> band tags. GDAL's category names and raster attribute
    tables live only in a .aux.xml sidecar for GTiff (and rasterio writes neither),
    so the names travel inside the file as band metadata."""
    return {f"CLASS_{value}": name for value, name in enumerate(classes)}


def band_tags(band: BandSpec) -> dict[str, str]:
    tags = {}
    if band.common_name:
        tags["COMMON_NAME"] = band.common_name
    if band.center_wavelength:
        tags["CENTER_WAVELENGTH_UM"] = f"{band.center_wavelength:g}"
    return tags


def apply_band_metadata(dst, spec: OutputSpec) -> None:
    """Descriptions, scale/offset, colour interpretation and band tags of `spec` on an
    open rasterio dataset (all copied into the COG)."""
    from rasterio.enums import ColorInterp

    for i, band in enumerate(spec.bands, start=1):
        dst.set_band_description(i, band.name)
        dst.update_tags(i, **band_tags(band))
    if spec.scale is not None:
        dst.scales = (spec.scale,) * len(spec.bands)
        dst.offsets = (spec.offset or 0.0,) * len(spec.bands)
    if spec.classes:
        dst.write_colormap(1, palette_colormap())       # makes band 1's interpretation "palette"
        dst.update_tags(1, **class_tags(spec.classes))
    else:
        # B, G, R, NIR: saying which band is which colour lets QGIS and GDAL
        # show true colour although the bands are not in R, G, B order.
        dst.colorinterp = [ColorInterp[band.colorinterp] for band in spec.bands]


def run_name(workdir) -> str:
    """A training run's name for provenance: its workdir's last component (never a local path)."""
    text = str(workdir).rstrip("/")
    if "://" not in text:
        text = os.path.abspath(text)            # "." names the current folder
    return text.rsplit("/", 1)[-1]


# ---------------------------------------------------------------------------
# STAC
# ---------------------------------------------------------------------------
def stac_path(out: str | os.PathLike) -> Path:
    """`scene_synthetic_s2.tif` -> `scene_synthetic_s2.tif.stac.json` (a sidecar, as GDAL's .aux.xml)."""
    out = Path(out)
    return out.with_name(out.name + STAC_SUFFIX)


def input_hrefs(source, out_dir: Path) -> list[str]:
    """Link targets of one input: URLs without their query (signed URLs carry
    credentials there), nearby local files relative to `out_dir`, others by
    their file name only. A split export gives one href per piece."""
    if source is None:
        return []
    if isinstance(source, Mosaic):
        return [href for piece in source.pieces for href in input_hrefs(piece, out_dir)]
    text = os.fspath(source)
    if "://" in text:
        parts = urlsplit(text)
        return [urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))]
    relative = os.path.relpath(os.path.abspath(text), os.path.abspath(out_dir))
    ups = Path(relative).parts.count("..")
    return [Path(relative).as_posix() if ups <= NEARBY_LEVELS else Path(text).name]


def scene_datetime(sources: Sequence[tuple[str, Any]]) -> Optional[dt.datetime]:
    """The acquisition time the first of `sources` ((role, source), most telling
    first) that declares one declares, in UTC; None when none does."""
    for role, source in sources:
        if source is None:
            continue
        when = _declared_datetime(role, source)
        if when is not None:
            return when
    return None


def _declared_datetime(role: str, source) -> Optional[dt.datetime]:
    from rsjax.data.rasterio_io import open_source

    try:
        with open_source(source, role) as ds:
            found = [ds.tags(ns=ns).get(key) if ns else ds.tags().get(key) for ns, key in DATETIME_TAGS]
    except InputError:
        return None
    for text in filter(None, found):
        try:
            when = dt.datetime.fromisoformat(text.strip())
        except ValueError:
            log.debug("%s: acquisition time %r is not ISO 8601; ignored", role, text)
            continue
        return when.replace(tzinfo=dt.timezone.utc) if when.tzinfo is None else when.astimezone(dt.timezone.utc)
    return None


def wgs84_footprint(crs, transform, width: int, height: int, per_edge: int = 16) -> tuple[dict, list]:
    """(GeoJSON polygon, bbox) of the raster's extent in WGS84 (EPSG:4326, lon/lat).
    The edges are densified first: a straight UTM edge is curved in lon/lat."""
    from rasterio.warp import transform_geom

    columns = [width * k / per_edge for k in range(per_edge)]
    rows = [height * k / per_edge for k in range(per_edge)]
    pixels = ([(c, 0) for c in columns] + [(width, r) for r in rows]
              + [(width - c, height) for c in columns] + [(0, height - r) for r in rows])
    ring = [transform * p for p in pixels]
    ring.append(ring[0])
    geometry = transform_geom(crs, "EPSG:4326", {"type": "Polygon", "coordinates": [ring]})
    points = [p for part in _rings(geometry) for p in part]
    lons, lats = [p[0] for p in points], [p[1] for p in points]
    return geometry, [min(lons), min(lats), max(lons), max(lats)]


def _rings(geometry: Mapping) -> list:
    if geometry["type"] == "Polygon":
        return list(geometry["coordinates"])
    return [ring for polygon in geometry["coordinates"] for ring in polygon]   # cut at ±180°


def stac_item(out: str | os.PathLike, spec: OutputSpec, properties: Mapping[str, Any],
              inputs: Sequence[tuple[str, Any]], scene_time: Optional[dt.datetime],
              created: dt.datetime):
    """A pystac Item for the finished output `out`: proj/raster fields read from the file.

    properties: the model's provenance (rsjax:* keys); inputs: (role, source)
    pairs, linked as derived_from; scene_time: the item's datetime when known,
    else `created` (the prediction time), and `rsjax:datetime_source` says which.
    """
    import pystac
    import rasterio

    out = Path(out)
    with rasterio.open(out) as ds:
        geometry, bbox = wgs84_footprint(ds.crs, ds.transform, ds.width, ds.height)
        item = pystac.Item(
            id=out.stem, geometry=geometry, bbox=bbox,
            datetime=scene_time or created,
            properties={**properties, "created": _iso(created),
                        "rsjax:datetime_source": "scene" if scene_time else "prediction"})
        asset = pystac.Asset(out.name, title=spec.title, media_type=pystac.MediaType.COG,
                             roles=["data"])
        item.add_asset("data", asset)
        _add_projection(item, ds)
        _add_raster_bands(asset, ds, spec)
    _add_band_meaning(asset, spec)
    for role, source in inputs:
        for href in input_hrefs(source, out.parent):
            item.add_link(pystac.Link("derived_from", href, media_type=pystac.MediaType.GEOTIFF,
                                      title=f"input: {role}"))
    return item


def _iso(when: dt.datetime) -> str:
    return when.astimezone(dt.timezone.utc).isoformat().replace("+00:00", "Z")


def _add_projection(item, ds) -> None:
    from pystac.extensions.projection import ProjectionExtension

    epsg = ds.crs.to_epsg()
    ProjectionExtension.ext(item, add_if_missing=True).apply(
        code=f"EPSG:{epsg}" if epsg else None, wkt2=None if epsg else ds.crs.to_wkt(),
        shape=[ds.height, ds.width], transform=list(ds.transform)[:6], bbox=list(ds.bounds))


def _add_raster_bands(asset, ds, spec: OutputSpec) -> None:
    """Data type, no-data, scale and offset of each band as the file stores them.
    No unit: reflectance and class labels are dimensionless (the Sentinel-2
    collections' items give none either)."""
    from pystac.extensions.raster import RasterBand, RasterExtension

    bands = []
    for i in range(ds.count):
        scaled = spec.scale is not None
        nodata = ds.nodatavals[i]
        if nodata is not None and "int" in ds.dtypes[i]:
            nodata = int(nodata)                # GDAL reports it as a float: 0.0 for uint16
        bands.append(RasterBand.create(
            data_type=ds.dtypes[i], nodata=nodata, spatial_resolution=abs(ds.transform.a),
            scale=ds.scales[i] if scaled else None, offset=ds.offsets[i] if scaled else None))
    RasterExtension.ext(asset, add_if_missing=True).apply(bands)


def _add_band_meaning(asset, spec: OutputSpec) -> None:
    """eo:bands for reflectance (common names blue/green/red/nir), classification:classes
    for land cover (names, Dynamic World colours, 255 as no data)."""
    if spec.classes:
        from pystac.extensions.classification import Classification, ClassificationExtension

        classes = [Classification.create(value=i, name=name, description=name.replace("_", " "),
                                         color_hint=LULC_PALETTE[i].lstrip("#").upper())
                   for i, name in enumerate(spec.classes)]
        classes.append(Classification.create(value=spec.nodata, name="no_data", nodata=True,
                                             description="no data"))
        ClassificationExtension.ext(asset, add_if_missing=True).apply(classes=classes)
        return
    from pystac.extensions.eo import Band, EOExtension

    EOExtension.ext(asset, add_if_missing=True).apply(bands=[
        Band.create(name=b.name, common_name=b.common_name, center_wavelength=b.center_wavelength)
        for b in spec.bands])
