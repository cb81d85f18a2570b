"""Opening source GeoTIFFs and choosing their bands, with errors a user can act on.

Band selection follows what real exports look like:
- when the file's bands carry descriptions, the wanted bands are picked by
  description (case-insensitive; "B02" matches "B2"), wherever they are and
  however many other bands there are (Earth Engine exports carry an `angle`
  band with S1, Dynamic World exports carry nine probability bands beside
  `label`, CropHarvest-style exports carry 200 bands);
- otherwise the file must have exactly the expected number of bands, taken in
  order (S2 B2, B3, B4, B8; S1 VV, VH; one band for land cover and DEM).

A source split by Earth Engine into pieces (`contract.Mosaic`) opens as one
raster: a VRT mosaic described in memory (`mosaic_vrt_xml`), after checking
that the pieces fit together (one CRS, pixel size, band layout and no-data; on
whole-pixel offsets that agree with the offsets in their names).
"""
from __future__ import annotations

import contextlib
import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Iterator

import numpy as np
import rasterio
import rasterio.dtypes

from rsjax.data import storage
from rsjax.data.contract import InputError, Mosaic, Source, split_offsets
from rsjax.data.untrusted import open_input, reopen_name

# Descriptions accepted for each source, in channel order. Each channel lists
# the names it may go by (the first is the canonical one).
BAND_NAMES: dict[str, tuple[tuple[str, ...], ...]] = {
    "s2": (("B2",), ("B3",), ("B4",), ("B8",)),
    "s1": (("VV",), ("VH",)),
    "lulc": (("label", "lulc", "landcover", "land_cover", "classification"),),
    "dem": (("DEM", "elevation", "height"),),
    "s2_cloudy": (("B2",), ("B3",), ("B4",), ("B8",)),
    "cloud_mask": (("cloud_mask", "cloudmask", "cloud_shadow_mask", "mask"),),
}

WHAT = {
    "s2": "Sentinel-2 optical (B2, B3, B4, B8)",
    "s1": "Sentinel-1 SAR (VV, VH)",
    "lulc": "land cover labels",
    "dem": "elevation (DEM)",
    "s2_cloudy": "cloudy Sentinel-2 optical (B2, B3, B4, B8)",
    "cloud_mask": "cloud/shadow mask (0 clear, 1 cloud, 2 shadow)",
    "grid": "target grid",
}


def _normalize(name: str) -> str:
    """Case-folds and drops leading zeros of band numbers: 'B02' -> 'b2'."""
    name = name.strip().lower()
    return re.sub(r"^b0+(\d)", r"b\1", name)


# Dataset tag that carries a mosaic's readable name (its `name` is the VRT description itself).
MOSAIC_NAME_TAG = "RSJAX_MOSAIC"


def source_name(ds: rasterio.DatasetReader) -> str:
    """The name to show for a dataset: the file, or the pieces of a mosaic."""
    return ds.tags().get(MOSAIC_NAME_TAG) or ds.name


def open_source(source: Source | str, role: str, any_format: bool = False) -> rasterio.DatasetReader:
    """Opens a source file, or the mosaic of a split export's pieces; InputError names what failed.

    A file is opened as data only (`untrusted.open_input`: GeoTIFF, no sidecar,
    unless `any_format`); a mosaic is rsjax's own VRT, described in memory from
    pieces that each passed that check. The caller closes the dataset.
    """
    # No Python file-system call here beyond untrusted's checks of the file and its
    # sidecars: TFDS builder tests patch os/open inside builders only, not here.
    if isinstance(source, Mosaic):
        return rasterio.open(mosaic_vrt_xml(source, role, any_format))
    return open_input(storage.as_path(source), WHAT[role], any_format)   # URLs stay strings: GDAL opens them


@contextlib.contextmanager
def open_raster(source: Source | str, role: str, any_format: bool = False) -> Iterator[rasterio.DatasetReader]:
    """`open_source` as a context manager."""
    ds = open_source(source, role, any_format)
    try:
        yield ds
    finally:
        ds.close()


def _piece_layout(ds: rasterio.DatasetReader) -> dict:
    """What every piece of one export must share."""
    return {"CRS": ds.crs, "pixel size": (ds.transform.a, ds.transform.e),
            "rotation": (ds.transform.b, ds.transform.d), "band count": ds.count,
            "data types": ds.dtypes, "no-data": ds.nodatavals, "band descriptions": ds.descriptions}


def _same(a, b) -> bool:
    """Equality, element by element for tuples, with NaN (no-data) equal to NaN."""
    if isinstance(a, tuple) and isinstance(b, tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float) and np.isnan(a) and np.isnan(b):
        return True
    return a == b


def mosaic_vrt_xml(mosaic: Mosaic, role: str, any_format: bool = False) -> str:
    """A VRT description of the pieces of a split export as one raster (opened by rasterio.open).

    Band descriptions, no-data, offsets/scales and metadata come from the first
    piece (all pieces must agree on the layout). Raises InputError naming the
    piece that does not fit.
    """
    infos = []
    for piece in mosaic.pieces:
        with open_raster(piece, role, any_format) as ds:
            infos.append(dict(path=str(piece), source=reopen_name(ds, storage.gdal_path(piece)),
                              layout=_piece_layout(ds), transform=ds.transform,
                              width=ds.width, height=ds.height, tags=ds.tags(),
                              band_tags=[ds.tags(i) for i in ds.indexes],
                              offsets=ds.offsets, scales=ds.scales))
    first = infos[0]
    for info in infos[1:]:
        for what, value in first["layout"].items():
            if not _same(info["layout"][what], value):
                raise InputError(
                    f"{info['path']}: its {what} ({info['layout'][what]}) differs from that of "
                    f"{first['path']} ({value}); the pieces of one split export share it. Check "
                    f"that every piece of {mosaic} comes from the same export.")
    xres, yres = first["transform"].a, first["transform"].e
    left = min(i["transform"].c for i in infos)
    top = max(i["transform"].f for i in infos) if yres < 0 else min(i["transform"].f for i in infos)
    placed = []
    for info in infos:
        col = (info["transform"].c - left) / xres
        row = (info["transform"].f - top) / yres
        if abs(col - round(col)) > 1e-6 or abs(row - round(row)) > 1e-6:
            raise InputError(f"{info['path']}: lies {col:.3f}, {row:.3f} pixels from the mosaic's "
                             f"corner, not on whole pixels: it is not a piece of the same grid as "
                             f"{first['path']}. Check that every piece of {mosaic} comes from one export.")
        placed.append((info, int(round(col)), int(round(row))))
    named = [split_offsets(storage.name(info["path"])) for info in infos]
    if all(n is not None for n in named):
        origin = (min(n[0] for n in named), min(n[1] for n in named))
        for (info, col, row), (name_row, name_col) in zip(placed, named):
            if (name_row - origin[0], name_col - origin[1]) != (row, col):
                raise InputError(
                    f"{info['path']}: its name says row {name_row}, column {name_col} of the export, "
                    f"but its georeference puts it at row {row + origin[0]}, column {col + origin[1]}. "
                    f"Check that every piece of {mosaic} comes from one export.")
    width = max(col + info["width"] for info, col, _ in placed)
    height = max(row + info["height"] for info, _, row in placed)

    root = ET.Element("VRTDataset", rasterXSize=str(width), rasterYSize=str(height))
    ET.SubElement(root, "SRS").text = first["layout"]["CRS"].to_wkt()
    gt = (left, xres, first["transform"].b, top, first["transform"].d, yres)
    ET.SubElement(root, "GeoTransform").text = ", ".join(repr(float(v)) for v in gt)
    _metadata(root, {**first["tags"], MOSAIC_NAME_TAG: str(mosaic)})
    for band in range(1, first["layout"]["band count"] + 1):
        dtype = first["layout"]["data types"][band - 1]
        el = ET.SubElement(root, "VRTRasterBand", band=str(band),
                           dataType=rasterio.dtypes.typename_fwd[rasterio.dtypes.dtype_rev[dtype]])
        nodata = first["layout"]["no-data"][band - 1]
        if nodata is not None:
            ET.SubElement(el, "NoDataValue").text = repr(float(nodata))
        description = first["layout"]["band descriptions"][band - 1]
        if description:
            ET.SubElement(el, "Description").text = description
        if first["offsets"][band - 1] != 0.0:
            ET.SubElement(el, "Offset").text = repr(float(first["offsets"][band - 1]))
        if first["scales"][band - 1] != 1.0:
            ET.SubElement(el, "Scale").text = repr(float(first["scales"][band - 1]))
        _metadata(el, first["band_tags"][band - 1])
        for info, col, row in placed:
            source = ET.SubElement(el, "SimpleSource")
            ET.SubElement(source, "SourceFilename", relativeToVRT="0").text = info["source"]
            ET.SubElement(source, "SourceBand").text = str(band)
            ET.SubElement(source, "SrcRect", xOff="0", yOff="0", xSize=str(info["width"]),
                          ySize=str(info["height"]))
            ET.SubElement(source, "DstRect", xOff=str(col), yOff=str(row), xSize=str(info["width"]),
                          ySize=str(info["height"]))
    return ET.tostring(root, encoding="unicode")


def _metadata(parent: ET.Element, items: dict) -> None:
    if items:
        md = ET.SubElement(parent, "Metadata")
        for key, value in items.items():
            ET.SubElement(md, "MDI", key=str(key)).text = str(value)


def read_failure(path: str | Path, role: str, err: Exception) -> InputError:
    """The InputError for a file that opened but whose pixels cannot be read."""
    return InputError(
        f"{path}: pixels cannot be read ({err}). The file is probably truncated or corrupt: "
        f"export or copy the {WHAT[role]} GeoTIFF again.")


def select_bands(ds: rasterio.DatasetReader, role: str) -> tuple[int, ...]:
    """1-based band indexes of the wanted channels of `role` in `ds`, in channel order.

    Raises InputError naming the file when the bands cannot be told apart.
    """
    name = source_name(ds)
    wanted = BAND_NAMES[role]
    descriptions = [(_normalize(d) if d else "") for d in ds.descriptions]
    all_names = {_normalize(n) for names in wanted for n in names}
    # Descriptions that name none of the wanted bands (e.g. "Band 1", or GDAL's
    # empty ones) say nothing: fall back to band order.
    if any(d in all_names for d in descriptions):
        indexes = []
        for names in wanted:
            keys = {_normalize(n) for n in names}
            hits = [i + 1 for i, d in enumerate(descriptions) if d in keys]
            if len(hits) > 1:
                raise InputError(
                    f"{name}: bands {hits} are all described as {names[0]!r}; cannot tell which "
                    f"to use. Give each band of the {WHAT[role]} file a distinct description.")
            if not hits:
                raise InputError(
                    f"{name}: no band described as {' / '.join(names)} among its {ds.count} bands "
                    f"(descriptions: {_short_list(ds.descriptions)}). Expected the {WHAT[role]} bands "
                    f"{', '.join(n[0] for n in wanted)}: set the band descriptions, or write a file "
                    f"with exactly {len(wanted)} band(s) in that order.")
            indexes.append(hits[0])
        return tuple(indexes)
    if ds.count != len(wanted):
        raise InputError(
            f"{name}: has {ds.count} band(s) where {len(wanted)} are expected for {WHAT[role]}, "
            f"and no band description names them. Write exactly "
            f"{', '.join(n[0] for n in wanted)} in that order, or set band descriptions.")
    return tuple(range(1, ds.count + 1))


def _short_list(items, limit: int = 8) -> str:
    items = [str(i) for i in items]
    return ", ".join(items[:limit]) + (f", ... ({len(items)} in all)" if len(items) > limit else "")
