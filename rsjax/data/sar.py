"""Sentinel-1 backscatter units: linear power to dB with a floor, or pass-through.

Ingestion stores dB (contract: float32, NaN = no data). Zero or negative power
is clamped to a floor (-50 dB by default) instead of becoming -inf or NaN.
Units, unless `s1_units` says, come from the file's metadata
(`declared_units`), else from the values (`detect_units`): at least `DB_SHARE`
of them below -1 means dB, at most `LINEAR_SHARE` means linear, anything
between is an error asking for `s1_units`.
docs/data.md (section 'SAR units') says which products deliver which units
and why magnitude, not sign, tells them apart.
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
