"""Deterministic train/validation/test assignment of tiles, by spatial block.

A tile's lattice index (origin / (stride x pixel size)) comes from its
georeference alone; lattice cells form square blocks of `block_tiles` x
`block_tiles`, and each block goes to the split that a hash of (scene id,
block row, block column) picks (7:2:1 by default). `assign_split` returns None
for a tile reaching into a block of another split, so no pixel appears in two
splits. `split_mode="random"` places each tile by a hash of its tile id alone
(the paper's split).
docs/data.md (section 'Splits') gives the reasons and the caveats.
"""
from __future__ import annotations

import hashlib
import math
from typing import Optional, Sequence

SPLITS = ("train", "validation", "test")
DEFAULT_FRACTIONS = (0.7, 0.2, 0.1)
SPLIT_MODES = ("block", "random")


def unit_hash(key: str) -> float:
    """A stable hash of `key` mapped to [0, 1) (Python's hash() is salted per process)."""
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def split_from_unit(u: float, fractions: Sequence[float] = DEFAULT_FRACTIONS) -> str:
    """Cuts [0, 1) at the cumulative split fractions: u < 0.7 -> train, < 0.9 -> validation, else test."""
    if len(fractions) != len(SPLITS) or any(f < 0 for f in fractions) or not math.isclose(sum(fractions), 1.0):
        raise ValueError(f"split fractions {tuple(fractions)} must be three non-negative numbers "
                         f"for {SPLITS} summing to 1")
    edge = 0.0
    for name, fraction in zip(SPLITS, fractions):
        edge += fraction
        if u < edge:
            return name
    return SPLITS[-1]


def _lattice_coordinate(x: float) -> int:
    """floor(x), except that values within rounding noise of an integer snap to it.

    Tiles of one scene lie on x0 + k (k integer); floor keeps consecutive tiles on
    consecutive indices for any x0, and the snap keeps float noise from making
    an aligned grid (x0 integer) jump by one.
    """
    nearest = round(x)
    return int(nearest) if abs(x - nearest) < 1e-6 else math.floor(x)


def lattice_index(transform: Sequence[float], stride: int) -> tuple[int, int]:
    """(row, col) of a tile's upper-left corner on the lattice of `stride` pixels.

    `transform` is the tile's affine in rasterio order (a, b, c, d, e, f): pixel
    width a, origin x c, pixel height e (negative for north-up), origin y f.
    """
    a, b, c, d, e, f = (float(v) for v in transform[:6])
    if b != 0 or d != 0 or a == 0 or e == 0:
        raise ValueError(f"tile transform {tuple(transform)} is rotated or degenerate; "
                         "tiles must be cut from a north-up grid")
    col = _lattice_coordinate(c / (stride * a))
    row = _lattice_coordinate(f / (stride * e))
    return row, col


def block_split(scene_id: str, block_row: int, block_col: int,
                fractions: Sequence[float] = DEFAULT_FRACTIONS, seed: int = 0) -> str:
    salt = f"{seed}/" if seed else ""
    return split_from_unit(unit_hash(f"{salt}{scene_id}/block/{block_row}/{block_col}"), fractions)


def assign_split(*, scene_id: str, tile_id: str, transform: Sequence[float], tile_size: int,
                 stride: int, block_tiles: int = 4, mode: str = "block",
                 fractions: Sequence[float] = DEFAULT_FRACTIONS, seed: int = 0) -> Optional[str]:
    """The split of one tile, or None when the tile straddles blocks of two splits.

    See the module docstring for the scheme. Depends only on the tile's scene id,
    tile id and georeference, so every pass over the scenes agrees.
    """
    if mode == "random":
        salt = f"{seed}/" if seed else ""
        return split_from_unit(unit_hash(f"{salt}tile/{tile_id}"), fractions)
    if mode != "block":
        raise ValueError(f"split mode {mode!r} unknown; use one of {SPLIT_MODES}")
    if block_tiles < 1:
        raise ValueError(f"block_tiles must be >= 1, got {block_tiles}")
    row, col = lattice_index(transform, stride)
    own = block_split(scene_id, row // block_tiles, col // block_tiles, fractions, seed)
    # Lattice cells the tile's footprint covers: one when stride == tile_size.
    span = math.ceil(tile_size / stride)
    blocks = {((row + i) // block_tiles, (col + j) // block_tiles)
              for i in range(span) for j in range(span)}
    if any(block_split(scene_id, br, bc, fractions, seed) != own for br, bc in blocks):
        return None
    return own
