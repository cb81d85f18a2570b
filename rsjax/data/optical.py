"""Sentinel-2 values: the BOA offset of processing baseline 04.00 and later.

From processing baseline 04.00 (products from 25 January 2022 on, and ESA's
reprocessed Collection-1) Level-2A files store DN = 10000 x reflectance + 1000,
so that dark surfaces keep negative reflectances instead of being clamped:
reflectance = (DN + BOA_ADD_OFFSET) / 10000 with BOA_ADD_OFFSET = -1000 (Level-1C
likewise with RADIO_ADD_OFFSET). Earth Engine's COPERNICUS/S2_SR_HARMONIZED
has the offset removed already; ESA's products and archives of them keep it.
The contract stores reflectance x 10000, so ingestion adds the offset to the
file's values (after resampling, which commutes with adding a constant; the
no-data value 0 is recognised before), and a valid pixel that would fall to 0
or below is stored as 1, the smallest valid value.

The offset comes, per band, from what the file says:
- band metadata `BOA_ADD_OFFSET` or `RADIO_ADD_OFFSET`, as GDAL's SENTINEL2
  driver reports them for a product of baseline 04.00 or later, and as
  `gdal_translate` copies them into a GeoTIFF;
- dataset metadata `BOA_ADD_OFFSET_<band>` (e.g. `BOA_ADD_OFFSET_B2`, the
  per-band product properties) or `BOA_ADD_OFFSET`;
- GDAL's band offset and scale (rasterio's `offsets` and `scales`), meaning
  value = DN x scale + offset: in reflectance x 10000 when the scale is 1, in
  reflectance when it is 1e-4 (offset -0.1 is then -1000 DN).
Sources that disagree are an error naming the file. An explicit option
(`IngestOptions.s2_offset`, e.g. -1000, or 0 to add nothing) overrides what
the file says, for exports that carry no such metadata.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import rasterio

from rsjax.data.contract import InputError

OFFSET_TAGS = ("BOA_ADD_OFFSET", "RADIO_ADD_OFFSET")
# GDAL scale -> factor from the scaled unit to reflectance x 10000.
_SCALES = ((1.0, 1.0), (1e-4, 1e4))


def _number(text, name: str, where: str) -> float:
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise InputError(f"{name}: metadata {where}={text!r} is not a number. Fix the tag, or set "
                         "s2_offset explicitly.") from None
    if not math.isfinite(value):
        raise InputError(f"{name}: metadata {where}={text!r} is not finite. Fix the tag, or set "
                         "s2_offset explicitly.")
    return value


def _band_keys(description: Optional[str], canonical: str) -> set[str]:
    """Dataset-tag suffixes that name a band: B2, B02 and the file's own description."""
    number = canonical[1:]
    keys = {canonical.upper(), f"B{int(number):02d}" if number.isdigit() else canonical.upper()}
    if description:
        keys.add(description.strip().upper())
    return keys


def declared_offsets(ds: rasterio.DatasetReader, bands: Sequence[int], names: Sequence[str],
                     display_name: str) -> list[float]:
    """The offset (in reflectance x 10000) the file declares for each selected band; 0 where none.

    `names` are the canonical band names (B2, B3, B4, B8) of `bands`.
    Raises InputError when the file declares offsets that disagree, or a
    scale rsjax does not know.
    """
    dataset_tags = {k.upper(): v for k, v in ds.tags().items()}
    offsets = []
    for band, canonical in zip(bands, names):
        found: dict[str, float] = {}
        band_tags = {k.upper(): v for k, v in ds.tags(band).items()}
        for tag in OFFSET_TAGS:
            if tag in band_tags:
                found[f"band {band} {tag}"] = _number(band_tags[tag], display_name, tag)
        for key in _band_keys(ds.descriptions[band - 1], canonical):
            tag = f"BOA_ADD_OFFSET_{key}"
            if tag in dataset_tags:
                found[tag] = _number(dataset_tags[tag], display_name, tag)
        if not found and "BOA_ADD_OFFSET" in dataset_tags:
            found["BOA_ADD_OFFSET"] = _number(dataset_tags["BOA_ADD_OFFSET"], display_name, "BOA_ADD_OFFSET")
        offset, scale = ds.offsets[band - 1], ds.scales[band - 1]
        if offset != 0.0:
            factor = next((f for s, f in _SCALES if math.isclose(scale, s, rel_tol=1e-6)), None)
            if factor is None:
                raise InputError(
                    f"{display_name}: band {band} ({canonical}) declares offset {offset} and scale {scale}; "
                    "rsjax reads reflectance x 10000 (scale 1) or reflectance (scale 0.0001). Set "
                    "s2_offset to the offset in reflectance x 10000 units, or fix the band's scale.")
            found[f"band {band} offset/scale"] = offset * factor
        values = set(round(v, 6) for v in found.values())
        if len(values) > 1:
            listed = ", ".join(f"{k}={v:g}" for k, v in found.items())
            raise InputError(f"{display_name}: band {band} ({canonical}) declares different BOA offsets "
                             f"({listed}). Fix the metadata, or set s2_offset explicitly.")
        offsets.append(values.pop() if values else 0.0)
    return offsets


def s2_offsets(ds: rasterio.DatasetReader, bands: Sequence[int], names: Sequence[str],
               explicit: Optional[float], display_name: str) -> tuple[float, ...]:
    """What to add to each selected band's values to get reflectance x 10000."""
    if explicit is not None:
        return tuple(float(explicit) for _ in bands)
    return tuple(declared_offsets(ds, bands, names, display_name))
