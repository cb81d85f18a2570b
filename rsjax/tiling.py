"""Tiled inference over a scene larger than a model's tile, blended without seams.

Pure numpy, independent of any model or file format: `tiled_predict` reads
tiles through a callback, runs a batched model callback, and hands blended
rows to a writer callback (see rsjax.predict for the GeoTIFF version).

- Tiles of side `tile` at a step of `tile - overlap`, the last tile of a row or
  column flush with the far edge (`tile_offsets`); a scene smaller than a tile
  gets one tile, padded.
- Each tile's output is weighted by a flat-top window with squared-cosine
  ramps over the overlap (`blend_window`); weighted sums and weights are
  accumulated (`RowAccumulator`) and divided, so overlapping tiles cross-fade
  with weights that sum to one and there are no seams.
- Memory: two batches of tiles and the accumulator rows that tiles in flight
  touch, never the whole scene.
"""
from __future__ import annotations

import collections
import itertools
import time
from typing import Callable, Optional

import numpy as np


def tile_offsets(length: int, tile: int, step: int) -> list[int]:
    """Offsets of tiles of side `tile` that cover [0, length): 0, step, 2 step, ...
    and a last tile flush with the far edge (nearer than `step` to the one
    before it when the length is not a multiple). A length shorter than a
    tile gets one tile at 0 that reaches past the edge (its input is padded)."""
    if tile < 1 or not 1 <= step <= tile:
        raise ValueError(f"need tile >= 1 and 1 <= step <= tile, got tile={tile}, step={step}")
    if length < 1:
        raise ValueError(f"length must be positive, got {length}")
    if length <= tile:
        return [0]
    offsets = list(range(0, length - tile + 1, step))
    if offsets[-1] != length - tile:
        offsets.append(length - tile)
    return offsets


def blend_weights_1d(tile: int, overlap: int) -> np.ndarray:
    """(tile,) float64 weights: 1 in the middle, squared-cosine ramps over
    `overlap` pixels at both ends.

    The rising ramp is sin^2(pi/2 (i + 1/2) / overlap) for i < overlap. Tiles
    `tile - overlap` apart overlap where one falls as cos^2 and the next rises
    as sin^2, so their weights sum to exactly 1 there (a partition of unity):
    the blend cross-fades from one tile to the next. The half-pixel offset
    keeps every weight above 0, so a pixel covered by one ramp only (at the
    scene's edges) still gets that tile's value once divided by the weights.
    """
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap must be in [0, tile={tile}), got {overlap}")
    i = np.arange(tile, dtype=np.float64)
    if overlap == 0:
        return np.ones(tile)
    rise = np.sin(0.5 * np.pi * np.minimum((i + 0.5) / overlap, 1.0)) ** 2
    return np.minimum(rise, rise[::-1])


def blend_window(tile: int, overlap: int) -> np.ndarray:
    """(tile, tile) float32: the separable product of `blend_weights_1d`."""
    w = blend_weights_1d(tile, overlap)
    return np.outer(w, w).astype(np.float32)


class RowAccumulator:
    """Weighted sums and weights of the output rows not yet written.

    Holds rows [start, start + n) of the scene's full width; `add` accumulates
    a tile, `flush` hands finished rows (weighted average, no-data mask) to a
    writer and drops them.
    """

    def __init__(self, width: int, channels: int):
        self.width, self.channels = width, channels
        self.start = 0
        self.sums = np.zeros((0, width, channels), np.float32)
        self.weights = np.zeros((0, width), np.float32)
        self.nodata = np.zeros((0, width), bool)

    @property
    def end(self) -> int:
        return self.start + len(self.weights)

    def extend_to(self, end: int) -> None:
        extra = end - self.end
        if extra > 0:
            self.sums = np.concatenate([self.sums, np.zeros((extra, self.width, self.channels), np.float32)])
            self.weights = np.concatenate([self.weights, np.zeros((extra, self.width), np.float32)])
            self.nodata = np.concatenate([self.nodata, np.zeros((extra, self.width), bool)])

    def add(self, row: int, col: int, values: np.ndarray, weights: np.ndarray) -> None:
        """values (h, w, C) and weights (h, w) of a tile at (row, col), already cropped to the scene."""
        h, w = weights.shape
        r = row - self.start
        self.sums[r:r + h, col:col + w] += values * weights[..., None]
        self.weights[r:r + h, col:col + w] += weights

    def or_nodata(self, row: int, col: int, nodata: np.ndarray) -> None:
        h, w = nodata.shape
        r = row - self.start
        self.nodata[r:r + h, col:col + w] |= nodata

    def flush(self, upto: int, write: Callable[[int, np.ndarray, np.ndarray], None]) -> None:
        """Writes rows [start, upto) as weighted averages and forgets them."""
        k = upto - self.start
        if k <= 0:
            return
        weights = self.weights[:k]
        if not np.all(weights > 0):
            raise AssertionError("an output pixel was covered by no tile (tiling bug)")
        write(self.start, self.sums[:k] / weights[..., None], self.nodata[:k])
        self.sums, self.weights, self.nodata = self.sums[k:], self.weights[k:], self.nodata[k:]
        self.start = upto


def pad_tile(array: np.ndarray, tile: int) -> np.ndarray:
    """A (h, w, ...) tile cut by the scene's edge, padded with zeros (no-data in model space)."""
    pad = [(0, tile - array.shape[0]), (0, tile - array.shape[1])] + [(0, 0)] * (array.ndim - 2)
    return np.pad(array, pad) if pad[0][1] or pad[1][1] else array


def tiled_predict(height: int, width: int, *, tile: int, overlap: int, channels: int,
                  read_tile: Callable[[int, int, int, int], tuple[dict, np.ndarray]],
                  predict_batch: Callable[[dict], object],
                  write_rows: Callable[[int, np.ndarray, np.ndarray], None],
                  batch_size: int, flush_rows: int,
                  on_tiles: Optional[Callable[[int], None]] = None,
                  timings: Optional[dict] = None) -> int:
    """Runs a model over a height x width scene tile by tile and blends the outputs.

    read_tile(row, col, h, w) -> (inputs, nodata): model inputs {name: (h, w, c)}
        of the window at (row, col) and its (h, w) no-data mask. Each tile is
        read through its own window, as ingestion reads training tiles (GDAL's
        warper gives values that differ slightly with the window read through);
        a pixel is no-data when any tile read says so;
    predict_batch({name: (batch_size, tile, tile, c)}) -> (batch_size, tile, tile,
        channels) outputs (numpy or a device array, fetched one batch later, so the
        host reads the next batch while the devices work);
    write_rows(row, values, nodata): blended (nrows, width, channels) float32 rows,
        called in order, `flush_rows` rows at a time (block-aligned writes) and
        once for the remainder.
    Tiles stream in row-major order and batches run across rows of tiles (only
    the scene's last batch is padded, with zero tiles); rows are written once
    every tile that touches them is in.
    timings: a dict to add this thread's seconds to, by phase: "read"
        (read_tile), "model" (predict_batch and waiting for its outputs; the
        devices' work while the host reads is not counted), "blend" (padding,
        stacking, accumulating) and "write" (weighted averages and write_rows).
    Returns the number of tiles run.
    """
    clock = time.perf_counter

    def spent(phase: str, since: float) -> float:
        now = clock()
        if timings is not None:
            timings[phase] = timings.get(phase, 0.0) + (now - since)
        return now

    step = tile - overlap
    rows = tile_offsets(height, tile, step)
    cols = tile_offsets(width, tile, step)
    # Produced as the batches need them: a list of every position of a large grid
    # would cost gigabytes before the first tile is read.
    positions = ((i, row, col) for i, row in enumerate(rows) for col in cols)
    window = blend_window(tile, overlap)
    acc = RowAccumulator(width, channels)
    missing = [len(cols)] * len(rows)        # tiles of each row of tiles not yet accumulated
    first_open = 0                           # the first row of tiles with tiles missing

    def collect(batch, outputs):
        nonlocal first_open
        t = clock()
        outputs = np.asarray(outputs, np.float32)
        t = spent("model", t)
        for k, (i, row, col) in enumerate(batch):
            h, w = min(tile, height - row), min(tile, width - col)
            acc.add(row, col, outputs[k, :h, :w], window[:h, :w])
            missing[i] -= 1
        while first_open < len(rows) and missing[first_open] == 0:
            first_open += 1
        # Rows above the first incomplete row of tiles are final: write them in whole blocks.
        upto = height if first_open == len(rows) else (rows[first_open] // flush_rows) * flush_rows
        t = spent("blend", t)
        acc.flush(upto, write_rows)
        spent("write", t)
        if on_tiles is not None:
            on_tiles(len(batch))

    pending: collections.deque = collections.deque()
    while batch := list(itertools.islice(positions, batch_size)):
        tiles = []
        for _, row, col in batch:
            h, w = min(tile, height - row), min(tile, width - col)
            t = clock()
            inputs, nodata = read_tile(row, col, h, w)
            t = spent("read", t)
            acc.extend_to(row + h)
            acc.or_nodata(row, col, nodata)
            tiles.append({k: pad_tile(v, tile) for k, v in inputs.items()})
            spent("blend", t)
        t = clock()
        tiles += [{k: np.zeros_like(v) for k, v in tiles[0].items()}] * (batch_size - len(tiles))
        stacked = {k: np.stack([x[k] for x in tiles]) for k in tiles[0]}
        t = spent("blend", t)
        pending.append((batch, predict_batch(stacked)))
        spent("model", t)
        if len(pending) > 1:
            collect(*pending.popleft())
    while pending:
        collect(*pending.popleft())
    return len(rows) * len(cols)
