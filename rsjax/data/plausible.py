"""Physical ranges of every source, and warnings when a file's values stray outside them.

Values outside these ranges are not measurements: a DEM void written as
-32767, -9999 or -3.4e38 without a declared no-data value would otherwise be
stored as an elevation (and give slopes of 89.96 degrees next to it); an all-
zero SAR file would become -50 dB everywhere. So:
- elevations outside `ELEVATION_M` are voids, whatever the file declares
  (`implausible_elevation`, applied when the DEM is read and in validation);
- every source's decimated validation sample is checked against its range,
  and the fraction outside it is reported as a warning naming the file;
- a source whose valid values are all equal (a band) is reported too.

Warnings do not stop a build: they are logged and listed per scene in the
ingestion report (`SceneCounts.warnings`).
"""
from __future__ import annotations

import numpy as np

# Metres: the lowest land (Dead Sea shore, about -430 m) and the highest
# (Everest, 8849 m), with margins. Bathymetric DEMs are not a source here.
ELEVATION_M = (-500.0, 9000.0)
# Reflectance x 10000: above 2.0 nothing on Earth reflects (bright clouds and
# snow reach about 1.5, with the L2A offset of baseline 04.00 about 1.6).
REFLECTANCE_MAX = 20000.0
# Backscatter in dB: -50 is rsjax's floor (far below the sensor's noise
# floor, about -25 dB); +30 dB is brighter than any natural target.
BACKSCATTER_DB = (-50.0, 30.0)
# Fractions below this are not worth a warning (a few odd pixels).
WARN_FRACTION = 1e-3


def implausible_elevation(values: np.ndarray) -> np.ndarray:
    """True where a finite elevation cannot be real (see ELEVATION_M); NaN is not flagged here."""
    values = np.asarray(values)
    with np.errstate(invalid="ignore"):
        return np.isfinite(values) & ((values < ELEVATION_M[0]) | (values > ELEVATION_M[1]))


def _examples(values: np.ndarray, limit: int = 3) -> str:
    uniques = np.unique(values)
    shown = ", ".join(f"{v:.6g}" for v in uniques[:limit])
    return shown + (", ..." if uniques.size > limit else "")


def range_warning(path, role: str, values: np.ndarray, units: str | None = None) -> str | None:
    """A warning for the share of a source's valid values outside its physical range, or None.

    `values`: (bands, n) valid sample values in the file's units (S1 in
    `units`). DEM: values beyond ELEVATION_M are voids, so they are never
    among the valid values handed in here; pass the raw ones.
    """
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return None
    if role == "s2":
        outside = values > REFLECTANCE_MAX
        what = f"above {REFLECTANCE_MAX:.0f} (reflectance 2.0), which no surface reflects"
        consequence = "check the scale of the file (reflectance x 10000 expected)"
    elif role == "s1":
        with np.errstate(divide="ignore", invalid="ignore"):
            db = values if units == "db" else 10.0 * np.log10(values)
        outside = ~((db >= BACKSCATTER_DB[0]) & (db <= BACKSCATTER_DB[1]))
        what = (f"outside {BACKSCATTER_DB[0]:.0f}..+{BACKSCATTER_DB[1]:.0f} dB"
                + (" (zero or negative power included)" if units == "linear" else ""))
        consequence = f"those below {BACKSCATTER_DB[0]:.0f} dB are set to it; check the units (s1_units)"
    elif role == "dem":
        outside = implausible_elevation(values)
        what = f"outside {ELEVATION_M[0]:.0f}..{ELEVATION_M[1]:.0f} m"
        consequence = "they are treated as voids (no-data); declare the file's no-data value to say so"
    else:
        return None
    fraction = float(outside.mean())
    if fraction < WARN_FRACTION and not (role == "dem" and fraction > 0):
        return None
    return (f"{path}: {fraction:.2%} of the {role.upper()} values are {what} "
            f"(e.g. {_examples(values[outside])}); {consequence}.")


def constant_warning(path, role: str, values: np.ndarray) -> str | None:
    """A warning when a band's valid values are all the same (an empty or placeholder export)."""
    values = np.asarray(values, dtype=np.float64)
    if role == "lulc" or values.shape[-1] < 2:
        return None          # one class everywhere is a plausible land cover
    for band, row in enumerate(values, start=1):
        if np.all(row == row[0]):
            return (f"{path}: band {band} of the {role.upper()} file holds one value ({row[0]:.6g}) "
                    "everywhere it has data: probably an empty or placeholder export. Check the file.")
    return None
