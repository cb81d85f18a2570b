"""Sentinel-1 backscatter units: linear power to dB with a floor, or pass-through.

ESA GRD products and most processors (SNAP, openEO) deliver sigma0 as linear
power; Earth Engine's COPERNICUS/S1_GRD delivers it already in dB. Ingestion
stores dB (contract: float32, NaN = no data).

- Zero or negative power (thermal-noise removal produces both) would be -inf or
  NaN in dB; it is clamped to a floor instead (default -50 dB, well below the
  Sentinel-1 noise-equivalent sigma0 of about -22 to -25 dB), so it stays a
  valid, very dark value and never turns into no-data by accident.
- Units are detected from the values when not given: dB backscatter of land
  and water is almost entirely negative (VV about -25..+5, VH about -30..-5),
  while linear power is never negative except for a few noise-removal pixels.
  So the median of the finite values decides: below 0 means dB.
"""
from __future__ import annotations

import numpy as np

UNITS = ("auto", "linear", "db")


def linear_to_db(power: np.ndarray, floor_db: float = -50.0) -> np.ndarray:
    """10 log10(power), with power below the floor (zeros, negatives) set to the floor. NaN stays NaN."""
    power = np.asarray(power, dtype=np.float64)
    floor_power = 10.0 ** (floor_db / 10.0)
    with np.errstate(invalid="ignore"):
        clamped = np.where(power < floor_power, floor_power, power)
    return (10.0 * np.log10(clamped)).astype(np.float32)


def detect_units(values: np.ndarray) -> str:
    """'db' when the median of the finite values is negative, else 'linear'.

    Raises ValueError when there is no finite value to decide from.
    """
    finite = np.asarray(values, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    if finite.size == 0:
        raise ValueError("no finite SAR value to detect the units from")
    return "db" if float(np.median(finite)) < 0.0 else "linear"


def to_db(values: np.ndarray, units: str, floor_db: float = -50.0) -> np.ndarray:
    """Backscatter in dB from values in `units` ('linear' or 'db').

    dB input passes through unchanged apart from the same floor (so both paths
    give the same value range) and the float32 cast.
    """
    if units == "linear":
        return linear_to_db(values, floor_db)
    if units == "db":
        values = np.asarray(values, dtype=np.float32)
        with np.errstate(invalid="ignore"):
            return np.where(values < floor_db, np.float32(floor_db), values).astype(np.float32)
    raise ValueError(f"SAR units must be 'linear' or 'db' here, got {units!r}")
