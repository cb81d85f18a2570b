"""Data that would be silently wrong: SAR units, undeclared DEM voids, values outside physical ranges, constant files."""
import logging

import numpy as np
import pytest
import rasterio
from affine import Affine

from rsjax.data import sar
from rsjax.data.contract import InputError, ScenePaths
from rsjax.data.geotiff import write_geotiff
from rsjax.data.ingest import IngestOptions, IngestReport, iter_scene_tiles

pytestmark = pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")

CRS = "EPSG:32631"
T = Affine(10.0, 0.0, 500000.0, 0.0, -10.0, 5600000.0)
N = 48
OPTS = IngestOptions(tile_size=16)


def scene(d, s1=None, dem=None, s2=None, dem_nodata=-32767.0, s1_units=None) -> ScenePaths:
    """A valid scene on one grid; s1 / dem / s2 arrays replace the defaults."""
    rng = np.random.default_rng(0)
    if s2 is None:
        s2 = rng.integers(300, 4000, (4, N, N)).astype(np.uint16)
    if s1 is None:
        s1 = rng.gamma(2.0, 0.05, (2, N, N)).astype(np.float32)
    if dem is None:
        dem = (100 + np.add.outer(np.arange(N), np.arange(N)) * 0.5).astype(np.float32)
    s1_path = write_geotiff(d / "s1.tif", s1, CRS, T, nodata=np.nan, descriptions=["VV", "VH"])
    if s1_units:
        with rasterio.open(s1_path, "r+") as ds:
            ds.units = (s1_units, s1_units)
    return ScenePaths(
        "x",
        s2=write_geotiff(d / "s2.tif", s2, CRS, T, nodata=0, descriptions=["B2", "B3", "B4", "B8"]),
        s1=s1_path,
        dem=write_geotiff(d / "dem.tif", dem, CRS, T, nodata=dem_nodata),
        lulc=write_geotiff(d / "lulc.tif", rng.integers(0, 9, (N, N)).astype(np.uint8), CRS, T, nodata=255),
    )


def ingest(s, opts=OPTS):
    report = IngestReport()
    tiles = list(iter_scene_tiles(s, opts, report))
    return tiles, report.scenes[s.scene_id]


# -- SAR units ----------------------------------------------------------------

def noisy_linear(rng, negative_share=0.6):
    """Linear sigma0 after thermal-noise removal over much water: most values small negatives."""
    power = rng.gamma(2.0, 0.05, (2, N, N))
    noise = rng.uniform(-0.004, -0.0005, (2, N, N))
    return np.where(rng.random((2, N, N)) < negative_share, noise, power).astype(np.float32)


def test_linear_with_many_small_negative_values_is_linear(tmp_path):
    s1 = noisy_linear(np.random.default_rng(1))
    assert np.median(s1) < 0          # the old rule (median below 0 means dB) called this dB
    tiles, counts = ingest(scene(tmp_path, s1=s1))
    assert counts.s1_units == "linear"
    db = np.stack([t["s1"] for t in tiles])
    assert db.min() == -50.0 and db.max() < 0.0    # negatives at the floor, power below 1 negative in dB


@pytest.mark.parametrize("unit", ["dB", "decibels"])
def test_units_declared_in_metadata(tmp_path, unit):
    """An ambiguous file is taken as its metadata says."""
    rng = np.random.default_rng(2)
    ambiguous = np.where(rng.random((2, N, N)) < 0.1, -3.0, 0.5).astype(np.float32)
    with pytest.raises(InputError, match=r"s1\.tif.*s1_units"):
        ingest(scene(tmp_path, s1=ambiguous))
    _, counts = ingest(scene(tmp_path, s1=ambiguous, s1_units=unit))
    assert counts.s1_units == "db"


def test_metadata_contradicting_the_values_is_an_error(tmp_path):
    db_values = np.random.default_rng(3).uniform(-25, -5, (2, N, N)).astype(np.float32)
    with pytest.raises(InputError) as info:
        ingest(scene(tmp_path, s1=db_values, s1_units="linear"))
    assert str(tmp_path / "s1.tif") in str(info.value) and "s1_units" in str(info.value)
    # Saying the units explicitly settles it.
    _, counts = ingest(scene(tmp_path, s1=db_values, s1_units="linear"),
                       IngestOptions(tile_size=16, s1_units="db"))
    assert counts.s1_units == "db"


def test_declared_units_words():
    assert sar.declared_units(["VV_dB"]) == "db"
    assert sar.declared_units(["Sigma0_VV_db", None]) == "db"
    assert sar.declared_units(["units linear"]) == "linear"
    assert sar.declared_units(["Sigma0_VV", "VH"]) is None
    assert sar.declared_units(["dB", "linear"]) is None
    assert sar.declared_units(["dbz_band"]) is None       # whole words only


# -- DEM voids without a declared no-data value --------------------------------

@pytest.mark.parametrize("void", [-32767.0, -9999.0, -3.4e38])
def test_undeclared_dem_voids_are_voids(tmp_path, caplog, void):
    dem = (100 + np.add.outer(np.arange(N), np.arange(N)) * 0.5).astype(np.float32)
    dem[20:23, 20:23] = void
    with caplog.at_level(logging.WARNING):
        tiles, counts = ingest(scene(tmp_path, dem=dem, dem_nodata=None))
    terrain = np.stack([t["dem"] for t in tiles])
    assert np.nanmin(terrain[..., 0]) > 90          # no void stored as an elevation
    assert np.nanmax(terrain[..., 1]) < 10          # the ramp: about 4 deg; 89.96 next to a stored void
    assert any("dem.tif" in w and "voids" in w for w in counts.data_warnings), counts.data_warnings
    assert any("dem.tif" in r.getMessage() and "%" in r.getMessage() for r in caplog.records)


def test_dem_entirely_undeclared_voids_is_entirely_nodata(tmp_path):
    with pytest.raises(InputError, match=r"dem\.tif.*entirely no-data"):
        ingest(scene(tmp_path, dem=np.full((N, N), -9999.0, np.float32), dem_nodata=None))


# -- ranges and constant files ---------------------------------------------------

def test_out_of_range_values_are_warned_with_their_fraction(tmp_path):
    rng = np.random.default_rng(4)
    s2 = rng.integers(300, 4000, (4, N, N)).astype(np.uint16)
    s2[:, :12, :] = 40000                           # a quarter of the pixels: reflectance 4.0
    db = rng.uniform(-25, -5, (2, N, N)).astype(np.float32)
    db[:, :, :6] = 45.0                             # an eighth: +45 dB
    _, counts = ingest(scene(tmp_path, s2=s2, s1=db))
    by_file = {w.split(":")[0]: w for w in counts.data_warnings}
    s2_warning = by_file[str(tmp_path / "s2.tif")]
    s1_warning = by_file[str(tmp_path / "s1.tif")]
    assert "25.00%" in s2_warning and "20000" in s2_warning
    assert "12.50%" in s1_warning and "dB" in s1_warning


def test_plausible_scene_has_no_warning(tmp_path):
    _, counts = ingest(scene(tmp_path))
    assert counts.data_warnings == []


def test_all_zero_sar_is_warned(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        _, counts = ingest(scene(tmp_path, s1=np.zeros((2, N, N), np.float32)))
    assert any("s1.tif" in w and "one value (0)" in w for w in counts.data_warnings), counts.data_warnings
    assert any("one value" in r.getMessage() for r in caplog.records)
