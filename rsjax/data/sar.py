"""Sentinel-1 backscatter units: linear power to dB with a floor, or pass-through.

ESA GRD products and most processors (SNAP, openEO) deliver sigma0 as linear
power; Earth Engine's COPERNICUS/S1_GRD delivers it already in dB. Ingestion
stores dB (contract: float32, NaN = no data).

- Zero or negative power (thermal-noise removal produces both) would be -inf or
  NaN in dB; it is clamped to a floor instead (default -50 dB, well below the
  Sentinel-1 noise-equivalent sigma0 of about -22 to -25 dB), so it stays a
  valid, very dark value and never turns into no-data by accident.
- Units, when not given (`s1_units`), come from the file's metadata where it
  declares them (`declared_units`: a band's unit type, a `units` tag, band
  names such as `VV_dB` or SNAP's `Sigma0_VV_db`), else from the values
  (`detect_units`). The sign of the values is not enough: thermal-noise
  removal leaves many linear files with a large share of small negative
  values (a median below 0 is common over water). What tells the two apart
  is magnitude: dB backscatter is mostly far below -1 (VH is about -30..-10
  dB everywhere, VV about -25..+5), while linear power below -1 would be
  noise ten times stronger than the brightest land surface, which noise
  removal never produces (its negatives are about the noise floor, 0.001..0.01).
  So: at least `DB_SHARE` of the values below -1 means dB, at most
  `LINEAR_SHARE` means linear, and anything between is ambiguous and an
  error that asks for `s1_units`.
"""
from __future__ import annotations

import numpy as np

import re
from typing import Iterable

UNITS = ("auto", "linear", "db")

# Share of values below -1 (dB evidence, see the module docstring).
DB_SHARE = 0.3
LINEAR_SHARE = 0.01
_DB_WORDS = {"db", "decibel", "decibels"}
_LINEAR_WORDS = {"linear", "power", "intensity"}


def linear_to_db(power: np.ndarray, floor_db: float = -50.0) -> np.ndarray:
    """10 log10(power), with power below the floor (zeros, negatives) set to the floor. NaN stays NaN."""
    power = np.asarray(power, dtype=np.float64)
    floor_power = 10.0 ** (floor_db / 10.0)
    with np.errstate(invalid="ignore"):
        clamped = np.where(power < floor_power, floor_power, power)
    return (10.0 * np.log10(clamped)).astype(np.float32)


def share_below_minus_one(values: np.ndarray) -> float:
    """Fraction of the finite values below -1: dB backscatter mostly is, linear power never is."""
    finite = np.asarray(values, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    if finite.size == 0:
        raise ValueError("no finite SAR value to detect the units from")
    return float(np.mean(finite < -1.0))


def detect_units(values: np.ndarray) -> str:
    """'db' or 'linear' from the values' magnitudes (see the module docstring).

    Raises ValueError when there is no finite value, or when the values fit
    neither (between LINEAR_SHARE and DB_SHARE of them below -1).
    """
    share = share_below_minus_one(values)
    if share >= DB_SHARE:
        return "db"
    if share <= LINEAR_SHARE:
        return "linear"
    raise ValueError(f"{share:.1%} of the values are below -1: too many for linear power, too few for dB")


def declared_units(texts: Iterable[str | None]) -> str | None:
    """'db' or 'linear' when metadata texts (unit types, tags, band names) name one of them, else None.

    Words are matched whole ("VV_dB", "Sigma0_VV_db", "units=decibels" say dB;
    "linear", "power", "intensity" say linear); texts naming both, or neither, say nothing.
    """
    words = set()
    for text in texts:
        if text:
            words.update(w for w in re.split(r"[^a-z0-9]+", str(text).lower()) if w)
    db, linear = bool(words & _DB_WORDS), bool(words & _LINEAR_WORDS)
    if db != linear:
        return "db" if db else "linear"
    return None


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
