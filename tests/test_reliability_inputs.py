"""Inputs that used to cost unbounded work, hang, or pass as data (issue 28, items 3, 4, 5, 12).

Cases that blew memory or hung run in a subprocess under an address-space
limit (RLIMIT_AS) and a timeout, so a regression fails the test instead of the
machine.
"""
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import rasterio
from affine import Affine

from rsjax.data import contract
from rsjax.data.contract import InputError, ScenePaths
from rsjax.data.geotiff import write_geotiff
from rsjax.data.ingest import IngestOptions, IngestReport, iter_scene_tiles, validate_scene

pytestmark = pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")

CRS = "EPSG:32631"
T = Affine(10.0, 0.0, 500000.0, 0.0, -10.0, 5600000.0)
N = 48
TILE = 16
MEMORY_LIMIT = 3 << 30          # bytes: rasterio + GDAL need a few hundred MiB, a runaway read far more


def scene(d, *, s2=None, s1=None, dem=None, s2_cloudy=None, cloudy=False) -> ScenePaths:
    """A small valid scene on one grid; keyword arrays replace a source's values (float32 files)."""
    rng = np.random.default_rng(0)
    d.mkdir(exist_ok=True)
    s2v = rng.integers(300, 4000, (4, N, N)).astype(np.float32) if s2 is None else s2
    s1v = rng.gamma(2.0, 0.05, (2, N, N)).astype(np.float32) if s1 is None else s1
    demv = (100 + rng.random((N, N)) * 5).astype(np.float32) if dem is None else dem
    paths = dict(
        s2=write_geotiff(d / "x_s2.tif", s2v, CRS, T, nodata=0, descriptions=["B2", "B3", "B4", "B8"]),
        s1=write_geotiff(d / "x_s1.tif", s1v, CRS, T, nodata=np.nan, descriptions=["VV", "VH"]),
        dem=write_geotiff(d / "x_dem.tif", demv, CRS, T, nodata=-32767.0),
        lulc=write_geotiff(d / "x_lulc.tif", rng.integers(0, 9, (N, N)).astype(np.uint8), CRS, T, nodata=255),
    )
    if cloudy or s2_cloudy is not None:
        cv = rng.integers(300, 4000, (4, N, N)).astype(np.float32) if s2_cloudy is None else s2_cloudy
        paths["s2_cloudy"] = write_geotiff(d / "x_s2_cloudy.tif", cv, CRS, T, nodata=0,
                                           descriptions=["B2", "B3", "B4", "B8"])
    return ScenePaths("x", **paths)


def tiles(sc, opts=IngestOptions(tile_size=TILE)) -> tuple[dict, IngestReport]:
    report = IngestReport()
    return {t["tile_id"]: t for t in iter_scene_tiles(sc, opts, report)}, report


def run_limited(code: str, timeout: float = 90.0) -> subprocess.CompletedProcess:
    """Runs `code` in a fresh Python under MEMORY_LIMIT of address space; fails the test on timeout."""
    preamble = f"import resource\nresource.setrlimit(resource.RLIMIT_AS, ({MEMORY_LIMIT}, {MEMORY_LIMIT}))\n"
    try:
        return subprocess.run([sys.executable, "-c", preamble + textwrap.dedent(code)], capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running after {timeout} s (unbounded work)")


def refused_under_limit(scene: ScenePaths, call: str, accepted: str, timeout: float = 90.0) -> str:
    """Runs the one-line `call` on `scene` (a ScenePaths named `scene` there) in a
    limited subprocess; the InputError it must raise, as text (`accepted`: the
    failure when it raises none)."""
    paths = ", ".join(f"{role}=Path({str(getattr(scene, role))!r})" for role in ("s2", "s1", "dem", "lulc"))
    result = run_limited(f"""
        from pathlib import Path
        from rsjax.data.contract import InputError, ScenePaths
        from rsjax.data.ingest import IngestOptions, iter_scene_tiles, validate_scene
        scene = ScenePaths({scene.scene_id!r}, {paths})
        try:
            {call}
        except InputError as err:
            print(err)
            raise SystemExit(0)
        raise SystemExit({accepted!r})
    """, timeout=timeout)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


# ---------------------------------------------------------------------------
# Item 4: +-inf is no-data in every reader, exactly as the source's own no-data
# ---------------------------------------------------------------------------
def _with_block(values: np.ndarray, fill: float) -> np.ndarray:
    """`values` with the first tile's area (and 20 % of the scene in all: rows 0..9) set to `fill`."""
    out = values.copy()
    out[..., :TILE, :TILE] = fill
    out[..., : N // 5, :] = fill
    return out


def _base(role):
    rng = np.random.default_rng(1)
    return {"s2": rng.integers(300, 4000, (4, N, N)).astype(np.float32),
            "s2_cloudy": rng.integers(300, 4000, (4, N, N)).astype(np.float32),
            "s1": rng.gamma(2.0, 0.05, (2, N, N)).astype(np.float32),
            "dem": (100 + rng.random((N, N)) * 5).astype(np.float32)}[role]


NODATA = {"s2": 0.0, "s2_cloudy": 0.0, "s1": np.nan, "dem": -32767.0}


@pytest.mark.parametrize("sign", [1.0, -1.0])
@pytest.mark.parametrize("role", ["s2", "s1", "dem", "s2_cloudy"])
def test_infinite_values_read_as_the_sources_nodata(tmp_path, role, sign):
    base = _base(role)
    with_inf = tiles(scene(tmp_path / "inf", **{role: _with_block(base, sign * np.inf)}))
    with_nodata = tiles(scene(tmp_path / "nodata", **{role: _with_block(base, NODATA[role])}))
    assert sorted(with_inf[0]) == sorted(with_nodata[0])
    counts_inf, counts_nodata = with_inf[1].scenes["x"], with_nodata[1].scenes["x"]
    assert counts_inf.tiles_dropped_nodata == counts_nodata.tiles_dropped_nodata
    for tid, tile in with_inf[0].items():
        for key in ("s2", "s1", "dem", "s2_cloudy"):
            if key in tile:
                np.testing.assert_array_equal(tile[key], with_nodata[0][tid][key], err_msg=f"{tid} {key}")
                if tile[key].dtype.kind == "f":
                    assert not np.isinf(tile[key]).any()


# ---------------------------------------------------------------------------
# Item 5: only regular files are opened
# ---------------------------------------------------------------------------
def test_a_fifo_named_like_a_source_is_refused_not_opened(tmp_path):
    sc = scene(tmp_path)
    fifo = tmp_path / "y_s2.tif"
    os.mkfifo(fifo)
    out = refused_under_limit(ScenePaths("y", s2=fifo, s1=sc.s1, dem=sc.dem, lulc=sc.lulc),
                              "validate_scene(scene)", "accepted a FIFO", timeout=60)
    assert str(fifo) in out and "not a regular file" in out


def test_a_symlink_to_a_regular_file_is_read_as_before(tmp_path):
    sc = scene(tmp_path / "real")
    link = tmp_path / "y_s2.tif"
    link.symlink_to(sc.s2)
    validate_scene(ScenePaths("y", s2=link, s1=sc.s1, dem=sc.dem, lulc=sc.lulc), IngestOptions(tile_size=TILE))


# ---------------------------------------------------------------------------
# Item 12: cloud-cover bins from integer counts
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("cloudy, known, expected", [
    (0, 100, 0), (9, 100, 0), (10, 100, 1), (49, 100, 1), (50, 100, 2), (89, 100, 2), (90, 100, 3),
    (100, 100, 3), (9, 10, 3), (1, 10, 1), (899999, 1000000, 2), (900000, 1000000, 3), (0, 0, -1),
])
def test_cover_bins_from_counts_at_the_edges(cloudy, known, expected):
    assert contract.cover_bin_of_counts(cloudy, known) == expected


@pytest.mark.parametrize("cloud_pixels, expected_bin", [(90, 3), (89, 2), (10, 1), (9, 0), (50, 2)])
def test_a_tiles_cover_bin_counts_pixels_exactly(tmp_path, cloud_pixels, expected_bin):
    side = 10                               # 100 pixels: 90 % cloud is 0.9 exactly, not float32(0.9)
    grid = Affine(10.0, 0.0, 500000.0, 0.0, -10.0, 5600000.0)
    rng = np.random.default_rng(0)
    mask = np.zeros(side * side, np.uint8)
    mask[:cloud_pixels] = contract.CLOUD
    d = tmp_path
    bands = ["B2", "B3", "B4", "B8"]
    sc = ScenePaths(
        "c",
        s2=write_geotiff(d / "c_s2.tif", rng.integers(300, 4000, (4, side, side)).astype(np.uint16), CRS,
                         grid, nodata=0, descriptions=bands),
        s1=write_geotiff(d / "c_s1.tif", rng.gamma(2.0, 0.05, (2, side, side)).astype(np.float32), CRS, grid,
                         nodata=np.nan, descriptions=["VV", "VH"]),
        dem=write_geotiff(d / "c_dem.tif", (100 + rng.random((side, side))).astype(np.float32), CRS, grid,
                          nodata=-32767.0),
        s2_cloudy=write_geotiff(d / "c_s2_cloudy.tif", rng.integers(300, 4000, (4, side, side)).astype(np.uint16),
                                CRS, grid, nodata=0, descriptions=bands),
        cloud_mask=write_geotiff(d / "c_cloudmask.tif", mask.reshape(side, side), CRS, grid, nodata=255),
    )
    report = IngestReport()
    kept = list(iter_scene_tiles(sc, IngestOptions(tile_size=side), report))
    assert len(kept) == 1
    by_cover = report.scenes["c"].tiles_by_cover
    assert by_cover[expected_bin] == 1 and sum(by_cover) == 1, by_cover


# ---------------------------------------------------------------------------
# Item 3: work bounded by the data, not by what a file declares
# ---------------------------------------------------------------------------
def _sparse_geotiff(path, width, height, transform, dtype="float32", block=None):
    """A GeoTIFF declaring width x height pixels with no block written (a few hundred bytes to kB)."""
    extra = dict(tiled=True, blockxsize=512, blockysize=512) if block is None else dict(blockysize=block)
    with rasterio.open(path, "w", driver="GTiff", width=width, height=height, count=1, dtype=dtype, crs=CRS,
                       transform=transform, sparse_ok=True, compress="deflate", **extra):
        pass
    return path


def test_a_dem_with_centimetre_pixels_is_refused_naming_the_file(tmp_path):
    sc = scene(tmp_path)
    fine = Affine(0.01, 0.0, T.c, 0.0, -0.01, T.f)            # 1 cm pixels over the 480 m scene
    dem = _sparse_geotiff(tmp_path / "x_dem.tif", N * 1000, N * 1000, fine)
    assert dem.stat().st_size < 5_000_000
    out = refused_under_limit(ScenePaths("x", s2=sc.s2, s1=sc.s1, dem=dem, lulc=sc.lulc),
                              "for _ in iter_scene_tiles(scene, IngestOptions(tile_size=32)): pass",
                              "ingested a DEM of 1 cm pixels")
    assert str(dem) in out and "finer than the target grid" in out


def test_a_grid_of_a_million_pixels_squared_is_refused_unless_allowed(tmp_path):
    sc = scene(tmp_path)
    grid_file = _sparse_geotiff(tmp_path / "grid.tif", 1_000_000, 1_000_000, T, dtype="uint8", block=1_000_000)
    assert grid_file.stat().st_size < 2000
    out = refused_under_limit(
        sc, f"for _ in iter_scene_tiles(scene, IngestOptions(tile_size=16, target_grid={str(grid_file)!r})): pass",
        "tiled a grid of 10^12 pixels", timeout=60)
    assert str(grid_file) in out and "max_grid_pixels" in out
    # The documented override takes it (validation only: nothing is tiled here).
    grid = validate_scene(sc, IngestOptions(tile_size=16, target_grid=str(grid_file), max_grid_pixels=10**12))
    assert (grid.width, grid.height) == (1_000_000, 1_000_000)


def test_a_sentinel2_granule_is_within_the_default_grid_size():
    assert IngestOptions().max_grid_pixels >= 12000 * 12000


def test_tiled_predict_starts_without_listing_every_tile_position():
    # 10^6 x 64 px, 8 px tiles at step 1: 57 million positions, gigabytes as a list.
    result = run_limited("""
        import numpy as np
        from rsjax.tiling import tiled_predict

        class Started(Exception):
            pass

        def read_tile(row, col, h, w):
            raise Started

        try:
            tiled_predict(1_000_000, 64, tile=8, overlap=7, channels=1, read_tile=read_tile,
                          predict_batch=lambda x: x["a"], write_rows=lambda *a: None, batch_size=4,
                          flush_rows=8)
        except Started:
            raise SystemExit(0)
    """)
    assert result.returncode == 0, result.stderr[-2000:]
