"""Terrain derivatives (slope, aspect, hillshade) by Horn's method, exactly as gdaldem.

Every function takes elevation with a one-pixel halo, shape (H + 2, W + 2), and
returns (H, W), so a tile's derivatives never depend on how the scene was cut.
Missing elevation is NaN, and a pixel without elevation is NaN in every output;
next to missing cells the `gdaldem -compute_edges` rules apply (`outside` cells,
beyond the DEM's extent, are extrapolated linearly; voids take the centre value).
The grid is north-up and metric (`xres` > 0, `yres` as the transform stores it);
flat cells get aspect `contract.ASPECT_FLAT` (-9999).
docs/data.md (section 'Terrain derivatives') gives the conventions, the edge
rules and how closely the results match gdaldem.
"""
from __future__ import annotations

import numpy as np

from rsjax.data.contract import ASPECT_FLAT

DEFAULT_AZIMUTH = 315.0
DEFAULT_ALTITUDE = 45.0

_OFFSETS = {"nw": (0, 0), "n": (0, 1), "ne": (0, 2), "w": (1, 0), "c": (1, 1), "e": (1, 2),
            "sw": (2, 0), "s": (2, 1), "se": (2, 2)}


def _key(row: str, col: str) -> str:
    """The compass key of a window cell: row in ('n', '', 's'), column in ('w', '', 'e')."""
    return (row + col) or "c"


def _extrapolate_beyond_edge(cells: dict, beyond: dict) -> dict:
    """gdaldem -compute_edges at the raster's edge (docs/data.md, 'Terrain derivatives').

    `beyond[k]` marks window cells beyond the edge. Columns first (a corner
    repeats the centre column, elsewhere each row is extrapolated), then rows,
    then lone diagonal cells as the plane through their neighbours. Cells an
    extrapolation cannot fill (it needed a missing cell) stay NaN.
    """
    cells = dict(cells)
    corner = beyond["n"] | beyond["s"]
    for side, far in (("w", "e"), ("e", "w")):
        for row in ("n", "", "s"):
            k, mid, opposite = _key(row, side), _key(row, ""), _key(row, far)
            value = np.where(corner, cells[mid], 2.0 * cells[mid] - cells[opposite])
            cells[k] = np.where(beyond[side] & beyond[k], value, cells[k])
    for side, far in (("n", "s"), ("s", "n")):
        for col in ("w", "", "e"):
            k, mid, opposite = _key(side, col), _key("", col), _key(far, col)
            value = 2.0 * cells[mid] - cells[opposite]
            cells[k] = np.where(beyond[side] & beyond[k], value, cells[k])
    for row in ("n", "s"):
        for col in ("w", "e"):
            k = _key(row, col)
            value = cells[row] + cells[col] - cells["c"]
            cells[k] = np.where(beyond[k] & np.isnan(cells[k]), value, cells[k])
    return cells


def _window_cells(z: np.ndarray, compute_edges: bool,
                  outside: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The 3x3 window of every interior pixel as nine (H, W) arrays, keyed by compass direction."""
    z = np.asarray(z, dtype=np.float64)
    if z.ndim != 2 or z.shape[0] < 3 or z.shape[1] < 3:
        raise ValueError(f"elevation must be 2-D with a one-pixel halo (at least 3x3), got {z.shape}")
    h, w = z.shape[0] - 2, z.shape[1] - 2
    cells = {k: z[r:r + h, c:c + w] for k, (r, c) in _OFFSETS.items()}
    if compute_edges and np.isnan(z).any():
        if outside is not None:
            outside = np.asarray(outside, dtype=bool)
            if outside.shape != z.shape:
                raise ValueError(f"outside must have the elevation's shape {z.shape}, got {outside.shape}")
            beyond = outside & np.isnan(z)
            if beyond.any():
                cells = _extrapolate_beyond_edge(
                    cells, {k: beyond[r:r + h, c:c + w] for k, (r, c) in _OFFSETS.items()})
        centre = cells["c"]
        cells = {k: (v if k == "c" else np.where(np.isnan(v), centre, v)) for k, v in cells.items()}
    return cells


def _horn_sums(z: np.ndarray, compute_edges: bool = True,
               outside: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Horn's weighted column and row differences of a haloed array, unscaled.

    Returns (east_minus_west, south_minus_north), both (H, W), in elevation
    units per 8 pixels. Row 0 of the array is north. NaN where the result is
    undefined (see the module docstring).
    """
    k = _window_cells(z, compute_edges, outside)
    east_minus_west = (k["ne"] + 2.0 * k["e"] + k["se"]) - (k["nw"] + 2.0 * k["w"] + k["sw"])
    south_minus_north = (k["sw"] + 2.0 * k["s"] + k["se"]) - (k["nw"] + 2.0 * k["n"] + k["ne"])
    centre_missing = np.isnan(k["c"])
    east_minus_west[centre_missing] = np.nan
    south_minus_north[centre_missing] = np.nan
    return east_minus_west, south_minus_north


def _gradient(e_w: np.ndarray, s_n: np.ndarray, xres: float, yres: float, scale: float):
    """dz/dx (towards east) and dz/dy (towards north) from Horn sums, in vertical per horizontal units."""
    if xres <= 0:
        raise ValueError(f"xres must be positive (pixel width), got {xres}")
    dz_dx = e_w / (8.0 * xres * scale)
    # A north-up grid has yres < 0: south_minus_north / (8 * yres) is then the
    # rise per metre towards the north, as gdaldem's inverse nsres makes it.
    dz_dy = s_n / (8.0 * yres * scale)
    return dz_dx, dz_dy


def _slope(e_w, s_n, xres, yres, scale) -> np.ndarray:
    dz_dx, dz_dy = _gradient(e_w, s_n, xres, yres, scale)
    return np.degrees(np.arctan(np.hypot(dz_dx, dz_dy))).astype(np.float32)


def _aspect(e_w, s_n) -> np.ndarray:
    # gdaldem: atan2(dy, -dx) is the downhill direction counter-clockwise from
    # east; 90 - angle turns it into an azimuth clockwise from north.
    math_angle = np.degrees(np.arctan2(s_n, -e_w))
    azimuth = np.mod(90.0 - math_angle, 360.0)
    azimuth = np.where(azimuth >= 360.0, 0.0, azimuth)
    azimuth = np.where((e_w == 0) & (s_n == 0), ASPECT_FLAT, azimuth)
    azimuth = np.where(np.isnan(e_w) | np.isnan(s_n), np.nan, azimuth)
    return azimuth.astype(np.float32)


def _hillshade(e_w, s_n, xres, yres, scale, azimuth, altitude, z_factor) -> np.ndarray:
    dz_dx, dz_dy = _gradient(e_w, s_n, xres, yres, scale)
    p = z_factor * dz_dx
    q = z_factor * dz_dy
    az = np.radians(azimuth)
    alt = np.radians(altitude)
    cos_i = (np.sin(alt) - np.cos(alt) * (p * np.sin(az) + q * np.cos(az))) / np.sqrt(1.0 + p * p + q * q)
    shade = 1.0 + 254.0 * np.maximum(cos_i, 0.0)
    # GDAL's float-to-Byte conversion rounds half up; floor(x + 0.5) does the same.
    return np.floor(shade + 0.5).astype(np.float32)


def slope_degrees(z: np.ndarray, xres: float, yres: float, scale: float = 1.0,
                  compute_edges: bool = True, outside: np.ndarray | None = None) -> np.ndarray:
    """Slope in degrees, Horn's method (gdaldem slope).

    `outside` (bool, z's shape) marks cells beyond the raster's edge (see the
    module docstring); None: every missing cell is a void.
    """
    return _slope(*_horn_sums(z, compute_edges, outside), xres, yres, scale)


def aspect_degrees(z: np.ndarray, compute_edges: bool = True,
                   outside: np.ndarray | None = None) -> np.ndarray:
    """Aspect in degrees clockwise from north, the downhill direction (gdaldem aspect).

    Like gdaldem it uses the raw Horn differences (pixels are taken as square),
    and flat cells get ASPECT_FLAT (-9999). Missing elevation gives NaN.
    """
    return _aspect(*_horn_sums(z, compute_edges, outside))


def hillshade(z: np.ndarray, xres: float, yres: float, scale: float = 1.0,
              azimuth: float = DEFAULT_AZIMUTH, altitude: float = DEFAULT_ALTITUDE,
              z_factor: float = 1.0, compute_edges: bool = True,
              outside: np.ndarray | None = None) -> np.ndarray:
    """Hillshade 1..255 (gdaldem hillshade, default algorithm, Horn gradient).

    With the gradient (p, q) = (dz/dx, dz/dy) towards east and north, the
    sun's unit vector s = (sin az cos alt, cos az cos alt, sin alt) and the
    surface normal (-p, -q, 1) / sqrt(1 + p^2 + q^2):
        cos(i) = (sin alt - cos alt (p sin az + q cos az)) / sqrt(1 + p^2 + q^2)
    which equals the textbook cos(zenith) cos(slope) + sin(zenith) sin(slope)
    cos(az - aspect). The result is round(1 + 254 max(cos i, 0)), the Byte
    values gdaldem writes.
    """
    return _hillshade(*_horn_sums(z, compute_edges, outside), xres, yres, scale, azimuth, altitude, z_factor)


def terrain_channels(z_haloed: np.ndarray, xres: float, yres: float, scale: float = 1.0,
                     compute_edges: bool = True, outside: np.ndarray | None = None) -> np.ndarray:
    """The contract's four `dem` channels for the interior of a haloed elevation array.

    Returns (H, W, 4) float32: elevation, slope, aspect, hillshade. Where any of
    them is undefined all four are NaN, so one NaN test finds a no-data pixel.
    """
    z = np.asarray(z_haloed, dtype=np.float32)
    e_w, s_n = _horn_sums(z, compute_edges, outside)          # once for all three derivatives
    out = np.stack([
        z[1:-1, 1:-1],
        _slope(e_w, s_n, xres, yres, scale),
        _aspect(e_w, s_n),
        _hillshade(e_w, s_n, xres, yres, scale, DEFAULT_AZIMUTH, DEFAULT_ALTITUDE, 1.0),
    ], axis=-1).astype(np.float32)
    missing = np.isnan(out).any(axis=-1)
    out[missing] = np.nan
    return out


def edge_halo(z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A whole raster padded with the one-pixel halo beyond its edge, and that halo's mask.

    `terrain_channels(*edge_halo(z), ...)`-style calls (pass the mask as
    `outside`) give what `gdaldem -compute_edges` gives on the raster itself.
    """
    z = np.asarray(z, dtype=np.float32)
    haloed = np.pad(z, 1, constant_values=np.nan)
    outside = np.ones(haloed.shape, bool)
    outside[1:-1, 1:-1] = False
    return haloed, outside
