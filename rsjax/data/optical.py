"""Sentinel-2 values: the BOA offset of processing baseline 04.00 and later.

Level-2A files of baseline 04.00 on store DN = 10000 x reflectance + 1000
(BOA_ADD_OFFSET -1000); the contract stores reflectance x 10000, so ingestion
adds the offset after resampling and stores a valid pixel that would fall to
0 or below as 1. `s2_offsets` takes the offset per band from what the file
says (band or dataset metadata, GDAL's offset and scale); sources that
disagree are an error, and `IngestOptions.s2_offset` overrides them.
docs/data.md (section 'Sentinel-2 offset') lists the metadata read and which
products carry the offset.
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
