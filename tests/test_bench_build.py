"""rsjax.data.bench_build.run_build: one real build in a fresh process, on the
builder's dummy data (two 64 px scenes) at 16 px tiles, without Beam."""
from pathlib import Path

import numpy as np
import pytest
import rasterio

from rsjax.bench import build as bench_build

DUMMY_DATA = Path(__file__).resolve().parents[1] / "tfds_builder" / "rs_multisource" / "dummy_data"


def _tiles_with_optical_data(tile: int) -> int:
    """16 px tiles of the dummy scenes with at most 10 % of pixels without S2
    (all bands 0): the ingest's default max_nodata_fraction drops the others.
    (The dummy S1 and LULC are complete, and its DEM covers every kept tile.)"""
    count = 0
    for path in sorted(DUMMY_DATA.glob("*_s2.tif")):
        with rasterio.open(path) as f:
            missing = np.all(f.read() == 0, axis=0)
        rows, cols = missing.shape[0] // tile, missing.shape[1] // tile
        blocks = missing[:rows * tile, :cols * tile].reshape(rows, tile, cols, tile)
        count += int((blocks.mean(axis=(1, 3)) <= 0.1).sum())
    return count


def test_run_build_times_a_real_build_and_measures_its_memory():
    result = bench_build.run_build(str(DUMMY_DATA), tile_size=16, workers=0)
    # split_mode="random": every tile with data is kept (31 of the 2 x 16).
    assert result["tiles"] == _tiles_with_optical_data(16) == 31
    assert result["seconds"] > 0
    # The child imports TensorFlow: far more than 50 MiB resident, all of it in
    # the building process itself, since without Beam there are no workers.
    assert result["peak_main_mib"] > 50
    assert result["peak_mib"] >= result["peak_main_mib"]
    assert result["peak_worker_mib"] <= result["peak_mib"] - result["peak_main_mib"]


def test_run_build_reports_the_builds_own_error(tmp_path):
    # A folder without scenes: the child's build fails; its stderr tail is the message.
    with pytest.raises(RuntimeError, match=r"(?s)build with 0 worker\(s\) failed:.*Error"):
        bench_build.run_build(str(tmp_path), tile_size=16, workers=0)
