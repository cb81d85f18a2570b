"""Tiled inference and blending (rsjax.tiling): pure numpy, no model, no files."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from rsjax import tiling


def test_tile_offsets_cover_the_scene_and_end_flush():
    assert tiling.tile_offsets(256, 64, 64) == [0, 64, 128, 192]      # ingestion's tiles
    assert tiling.tile_offsets(256, 64, 48) == [0, 48, 96, 144, 192]
    assert tiling.tile_offsets(200, 64, 48) == [0, 48, 96, 136]        # last flush with the edge
    assert tiling.tile_offsets(50, 64, 48) == [0]                      # smaller than a tile
    with pytest.raises(ValueError, match="1 <= step <= tile, got tile=64, step=65"):
        tiling.tile_offsets(100, 64, 65)


def test_blend_weights_are_a_partition_of_unity():
    tile, overlap = 64, 16
    w = tiling.blend_weights_1d(tile, overlap)
    assert np.all(w > 0) and w.max() == 1.0
    np.testing.assert_allclose(w[:overlap] + w[tile - overlap:], 1.0, atol=1e-12)
    # Tiles at a regular step: the weights sum to 1 away from the scene's ends.
    length = tile + 3 * (tile - overlap)
    total = np.zeros(length)
    for off in tiling.tile_offsets(length, tile, tile - overlap):
        total[off:off + tile] += w
    np.testing.assert_allclose(total[overlap:length - overlap], 1.0, atol=1e-12)
    assert np.all(total > 0)
    np.testing.assert_array_equal(tiling.blend_weights_1d(tile, 0), np.ones(tile))
    window = tiling.blend_window(tile, overlap)
    np.testing.assert_allclose(window, np.outer(w, w), rtol=1e-6)


@pytest.mark.parametrize("height,width,tile,overlap", [
    (150, 170, 32, 8),      # not a multiple of the step: last tiles flush with the edges
    (20, 50, 32, 8),        # shorter than a tile: padded
    (64, 64, 32, 0),        # no overlap
    (97, 33, 16, 15),       # overlap almost a tile: many tiles on each pixel
])
def test_blending_identical_tiles_is_the_identity(height, width, tile, overlap):
    """A model that returns (an affine map of) its input: the blended scene must be
    exactly that map of the scene, whatever the overlap, at edges and corners too."""
    rng = np.random.default_rng(0)
    field = rng.normal(size=(height, width, 3)).astype(np.float32)
    nodata = rng.random((height, width)) < 0.1
    out = np.full((height, width, 3), np.nan, np.float32)
    out_nodata = np.zeros((height, width), bool)
    written = []

    reads = []

    def read_tile(row, col, nrows, ncols):
        reads.append((row, col, nrows, ncols))
        return {"x": field[row:row + nrows, col:col + ncols]}, nodata[row:row + nrows, col:col + ncols]

    def write_rows(row, values, mask):
        written.append((row, len(values)))
        out[row:row + len(values)] = values
        out_nodata[row:row + len(values)] = mask

    calls = []

    def model(batch):
        calls.append(batch["x"].shape)
        return 2.0 * batch["x"] + 1.0

    n = tiling.tiled_predict(height, width, tile=tile, overlap=overlap, channels=3,
                              read_tile=read_tile, predict_batch=model, write_rows=write_rows,
                              batch_size=4, flush_rows=16)
    np.testing.assert_allclose(out, 2.0 * field + 1.0, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(out_nodata, nodata)
    rows = tiling.tile_offsets(height, tile, tile - overlap)
    cols = tiling.tile_offsets(width, tile, tile - overlap)
    assert n == len(rows) * len(cols)
    assert reads == [(r, c, min(tile, height - r), min(tile, width - c)) for r in rows for c in cols]
    # Batches run across rows of tiles: only the last one is padded (to the batch size).
    assert len(calls) == -(-n // 4) and all(shape == (4, tile, tile, 3) for shape in calls)
    # Rows written once each, in order, in whole blocks of 16 except the last write.
    starts = [r for r, _ in written]
    assert starts == sorted(starts) and sum(k for _, k in written) == height
    assert all(r % 16 == 0 for r in starts) and all(k % 16 == 0 for _, k in written[:-1])


# -- properties over any scene, tile, overlap, batch and flush size (hypothesis) ---------------

def reference_weights(tile: int, overlap: int) -> np.ndarray:
    """The documented ramp, written out pixel by pixel: sin^2 rising over the
    first `overlap` pixels (centred on pixel centres), 1 in the middle, and the
    mirror image falling at the far end."""
    w = np.ones(tile)
    for i in range(overlap):
        ramp = np.sin(0.5 * np.pi * (i + 0.5) / overlap) ** 2
        w[i] = min(w[i], ramp)
        w[tile - 1 - i] = min(w[tile - 1 - i], ramp)
    return w


@st.composite
def scenes(draw):
    tile = draw(st.integers(2, 24))
    return dict(height=draw(st.integers(1, 70)), width=draw(st.integers(1, 70)), tile=tile,
                overlap=draw(st.integers(0, tile - 1)), batch_size=draw(st.integers(1, 5)),
                flush_rows=draw(st.integers(1, 20)))


def run_tiled(case, read_tile, model):
    """tiled_predict over `case`'s sizes with `read_tile` and `model`; returns the
    written scene and mask, and checks that rows were written once each, in order."""
    height, width = case["height"], case["width"]
    out = np.full((height, width, 1), np.nan, np.float32)
    out_nodata = np.zeros((height, width), bool)
    next_row = [0]

    def write_rows(row, values, mask):
        assert row == next_row[0]
        next_row[0] += len(values)
        out[row:row + len(values)] = values
        out_nodata[row:row + len(values)] = mask

    tiling.tiled_predict(height, width, tile=case["tile"], overlap=case["overlap"], channels=1,
                         read_tile=read_tile, predict_batch=model, write_rows=write_rows,
                         batch_size=case["batch_size"], flush_rows=case["flush_rows"])
    assert next_row[0] == height
    return out[..., 0], out_nodata


@given(tile=st.integers(1, 64), data=st.data())
def test_blend_weights_match_the_documented_ramp_and_cross_fade_to_one(tile, data):
    overlap = data.draw(st.integers(0, tile - 1))
    w = tiling.blend_weights_1d(tile, overlap)
    np.testing.assert_allclose(w, reference_weights(tile, overlap), atol=1e-12)
    assert np.all(w > 0) and np.all(w <= 1.0)
    # Two tiles `tile - overlap` apart: their weights sum to 1 where they overlap.
    if 2 * overlap <= tile:
        np.testing.assert_allclose(w[tile - overlap:] + w[:overlap], 1.0, atol=1e-12)


@given(scenes())
def test_any_tiling_of_an_affine_model_reproduces_the_scene(case):
    """Whatever the sizes, every pixel is covered and blends back to the model's
    value of it; a pixel is no-data exactly where the input said so."""
    rng = np.random.default_rng(case["height"] * 1000 + case["width"])
    field = rng.normal(size=(case["height"], case["width"], 1)).astype(np.float32)
    nodata = rng.random((case["height"], case["width"])) < 0.1

    def read_tile(row, col, nrows, ncols):
        return ({"x": field[row:row + nrows, col:col + ncols]},
                nodata[row:row + nrows, col:col + ncols])
    out, out_nodata = run_tiled(case, read_tile, model=lambda b: 3.0 * b["x"] - 1.0)
    np.testing.assert_allclose(out, 3.0 * field[..., 0] - 1.0, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(out_nodata, nodata)


@given(scenes())
def test_any_tiling_blends_tiles_with_the_documented_weights(case):
    """A model whose output differs per tile (each tile returns its own number):
    each pixel must be the weighted mean of the numbers of the tiles over it, with
    the documented weights, computed here by brute force over the tile grid."""
    height, width, tile, overlap = case["height"], case["width"], case["tile"], case["overlap"]
    rows = tiling.tile_offsets(height, tile, tile - overlap)
    cols = tiling.tile_offsets(width, tile, tile - overlap)
    # The tile's number rides in the input: constant over the tile.
    numbers = {}
    total = np.zeros((height, width))
    weight = np.zeros((height, width))
    w1 = reference_weights(tile, overlap)
    for k, (r, c) in enumerate((r, c) for r in rows for c in cols):
        numbers[(r, c)] = float(k + 1)
        h, w = min(tile, height - r), min(tile, width - c)
        win = np.outer(w1[:h], w1[:w])
        total[r:r + h, c:c + w] += win * (k + 1)
        weight[r:r + h, c:c + w] += win

    def read_number(row, col, nrows, ncols):
        return ({"n": np.full((nrows, ncols, 1), numbers[(row, col)], np.float32)},
                np.zeros((nrows, ncols), bool))
    out, _ = run_tiled(case, read_number, model=lambda b: b["n"])
    np.testing.assert_allclose(out, total / weight, rtol=1e-5)
