"""Opening source GeoTIFFs and choosing their bands, with errors a user can act on.

Band selection follows what real exports look like:
- when the file's bands carry descriptions, the wanted bands are picked by
  description (case-insensitive; "B02" matches "B2"), wherever they are and
  however many other bands there are (Earth Engine exports carry an `angle`
  band with S1, Dynamic World exports carry nine probability bands beside
  `label`, CropHarvest-style exports carry 200 bands);
- otherwise the file must have exactly the expected number of bands, taken in
  order (S2 B2, B3, B4, B8; S1 VV, VH; one band for land cover and DEM).
"""
from __future__ import annotations

import contextlib
import re
from pathlib import Path
from typing import Iterator

import rasterio

from rsjax.data.contract import InputError
from rsjax.data.untrusted import open_input

# Descriptions accepted for each source, in channel order. Each channel lists
# the names it may go by (the first is the canonical one).
BAND_NAMES: dict[str, tuple[tuple[str, ...], ...]] = {
    "s2": (("B2",), ("B3",), ("B4",), ("B8",)),
    "s1": (("VV",), ("VH",)),
    "lulc": (("label", "lulc", "landcover", "land_cover", "classification"),),
    "dem": (("DEM", "elevation", "height"),),
}

WHAT = {
    "s2": "Sentinel-2 optical (B2, B3, B4, B8)",
    "s1": "Sentinel-1 SAR (VV, VH)",
    "lulc": "land cover labels",
    "dem": "elevation (DEM)",
    "grid": "target grid",
}


def _normalize(name: str) -> str:
    """Case-folds and drops leading zeros of band numbers: 'B02' -> 'b2'."""
    name = name.strip().lower()
    return re.sub(r"^b0+(\d)", r"b\1", name)


@contextlib.contextmanager
def open_raster(path: str | Path, role: str, any_format: bool = False) -> Iterator[rasterio.DatasetReader]:
    """Opens a source file as data only (`untrusted.open_input`): InputError names the file."""
    # No Python file-system call here beyond untrusted's checks of the file and its
    # sidecars: TFDS builder tests patch os/open inside builders only, not here.
    ds = open_input(path, WHAT[role], any_format)
    try:
        yield ds
    finally:
        ds.close()


def read_failure(path: str | Path, role: str, err: Exception) -> InputError:
    """The InputError for a file that opened but whose pixels cannot be read."""
    return InputError(
        f"{path}: pixels cannot be read ({err}). The file is probably truncated or corrupt: "
        f"export or copy the {WHAT[role]} GeoTIFF again.")


def select_bands(ds: rasterio.DatasetReader, role: str) -> tuple[int, ...]:
    """1-based band indexes of the wanted channels of `role` in `ds`, in channel order.

    Raises InputError naming the file when the bands cannot be told apart.
    """
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
                    f"{ds.name}: bands {hits} are all described as {names[0]!r}; cannot tell which "
                    f"to use. Give each band of the {WHAT[role]} file a distinct description.")
            if not hits:
                raise InputError(
                    f"{ds.name}: no band described as {' / '.join(names)} among its {ds.count} bands "
                    f"(descriptions: {_short_list(ds.descriptions)}). Expected the {WHAT[role]} bands "
                    f"{', '.join(n[0] for n in wanted)}: set the band descriptions, or write a file "
                    f"with exactly {len(wanted)} band(s) in that order.")
            indexes.append(hits[0])
        return tuple(indexes)
    if ds.count != len(wanted):
        raise InputError(
            f"{ds.name}: has {ds.count} band(s) where {len(wanted)} are expected for {WHAT[role]}, "
            f"and no band description names them. Write exactly "
            f"{', '.join(n[0] for n in wanted)} in that order, or set band descriptions.")
    return tuple(range(1, ds.count + 1))


def _short_list(items, limit: int = 8) -> str:
    items = [str(i) for i in items]
    return ", ".join(items[:limit]) + (f", ... ({len(items)} in all)" if len(items) > limit else "")
