"""Ingestion end to end: real samples with their quirks, SAR units, tiling and the report."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio
import rasterio.fill
from rasterio.windows import Window

from rsjax.data import sar
from rsjax.data.contract import LULC_NODATA, InputError, ScenePaths
from rsjax.data.ingest import IngestOptions, IngestReport, RegisteredScene, iter_scene_tiles, validate_scene
from rsjax.data.rasterio_io import open_raster, select_bands

# rasterio 1.4 itself multiplies Affine objects with `*`, which affine 3 flags as pending deprecation.
pytestmark = pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")



# belgium_cropland.tif is not the Dynamic World legend (0/1 only): the tests that read it as land
# cover, for dtypes, alignment and no-data, say so with lulc_legend="dynamic_world".
DW = "dynamic_world"


@pytest.fixture
def belgium(tests_data) -> ScenePaths:
    d = tests_data / "worldcereal_belgium_2021"
    return ScenePaths("belgium", s2=d / "belgium_s2.tif", s1=d / "belgium_s1.tif", dem=d / "belgium_dem.tif",
                      lulc=d / "belgium_cropland.tif")


@pytest.fixture
def togo(tests_data) -> ScenePaths:
    d = tests_data / "cropharvest_togo_2019"
    return ScenePaths("togo", s2=d / "togo_s2.tif", s1=d / "togo_s1.tif", dem=d / "togo_dem.tif")


def read(path, band=None):
    with rasterio.open(path) as ds:
        return ds.read(band) if band else ds.read()


def derived(path, tmp_path, name, edit, **profile_changes):
    """A copy of `path` in tmp_path with its pixels changed by `edit(array) -> array`."""
    with rasterio.open(path) as ds:
        data, profile, descriptions = ds.read(), ds.profile, ds.descriptions
    profile.update(profile_changes)
    out = tmp_path / name
    with rasterio.open(out, "w", **profile) as dst:
        dst.write(edit(data).astype(profile["dtype"]))
        for i, d in enumerate(descriptions, start=1):
            if d:
                dst.set_band_description(i, d)
    return out


# -- contract --------------------------------------------------------------------------

def test_belgium_tiles_follow_the_contract(belgium):
    report = IngestReport()
    tiles = list(iter_scene_tiles(belgium, IngestOptions(lulc_legend=DW, tile_size=32, stride=32), report))
    assert len(tiles) == 9                                     # 3 x 3 full tiles in 100 x 100
    t = tiles[4]
    assert t["s2"].shape == (32, 32, 4) and t["s2"].dtype == np.uint16
    assert t["s1"].shape == (32, 32, 2) and t["s1"].dtype == np.float32
    assert t["lulc"].shape == (32, 32) and t["lulc"].dtype == np.uint8
    assert t["dem"].shape == (32, 32, 4) and t["dem"].dtype == np.float32
    assert t["transform"].dtype == np.float64 and t["transform"].shape == (6,)
    np.testing.assert_array_equal(t["transform"], [10.0, 0.0, 664320.0, 0.0, -10.0, 5611800.0])
    assert t["crs"] == "EPSG:32631"
    assert t["scene_id"] == "belgium" and t["tile_id"] == "belgium_r000032_c000032"
    assert len({x["tile_id"] for x in tiles}) == 9
    assert report.to_dict()["scenes"]["belgium"]["tiles_kept"] == 9
    assert report.scenes["belgium"].s1_units == "linear"


def test_belgium_on_its_own_grid_is_copied_without_resampling(belgium):
    """All four files share the S2 grid: registration must be the identity."""
    with RegisteredScene(belgium, IngestOptions(lulc_legend=DW)) as reg:
        a = reg.read(Window(0, 0, 100, 100))
    np.testing.assert_array_equal(a["s2"], np.moveaxis(read(belgium.s2), 0, -1))
    np.testing.assert_allclose(a["s1"], np.moveaxis(10 * np.log10(read(belgium.s1)), 0, -1), atol=1e-5)
    np.testing.assert_array_equal(a["lulc"], read(belgium.lulc, 1))
    np.testing.assert_array_equal(a["dem"][..., 0], read(belgium.dem, 1))
    # The DEM covers exactly the S2 grid: the outer ring lacks part of its 3x3
    # window and still gets derivatives (gdaldem -compute_edges convention).
    assert np.isfinite(a["dem"]).all()


def test_tiles_are_deterministic_and_stride_overlaps(belgium):
    opts = IngestOptions(lulc_legend=DW, tile_size=40, stride=20)
    first = list(iter_scene_tiles(belgium, opts))
    again = list(iter_scene_tiles(belgium, opts))
    assert [t["tile_id"] for t in first] == [t["tile_id"] for t in again]
    assert len(first) == 16                                     # offsets 0, 20, 40, 60 in both axes
    for a, b in zip(first, again, strict=True):
        for key in ("s2", "s1", "lulc", "dem"):
            np.testing.assert_array_equal(a[key], b[key])
    by_id = {t["tile_id"]: t for t in first}
    left, right = by_id["belgium_r000020_c000020"], by_id["belgium_r000020_c000040"]
    np.testing.assert_array_equal(left["s2"][:, 20:], right["s2"][:, :20])


def test_scene_smaller_than_a_tile_is_a_warning_naming_it_and_no_tile_at_all_an_error(belgium, caplog):
    report = IngestReport()
    with caplog.at_level("WARNING", logger="rsjax"):
        assert list(iter_scene_tiles(belgium, IngestOptions(lulc_legend=DW, tile_size=256), report)) == []
    assert report.scenes["belgium"].tiles_total == 0
    warning = report.scenes["belgium"].warning
    assert "scene 'belgium'" in warning and "100 x 100" in warning and "256 x 256" in warning
    assert warning in caplog.text
    assert report.to_dict()["scenes"]["belgium"]["warning"] == warning
    with pytest.raises(InputError, match=r"(?s)no scene yields a tile.*scene .belgium.: 100 x 100"):
        report.require_tiles()
    # One scene with tiles is enough: no error, the small one stays a warning.
    list(iter_scene_tiles(ScenePaths("other", s2=belgium.s2, s1=belgium.s1, dem=belgium.dem),
                          IngestOptions(tile_size=50), report))
    report.require_tiles()


# -- quirks of real exports ------------------------------------------------------------

def test_togo_earth_engine_export_in_4326_with_db_sar_and_no_land_cover(togo):
    report = IngestReport()
    opts = IngestOptions(tile_size=8, stride=4, max_nodata_fraction=0.3)
    tiles = list(iter_scene_tiles(togo, opts, report))
    counts = report.scenes["togo"]
    # Geographic S2 -> registered on its UTM zone (31N) at 10 m.
    assert counts.crs == "EPSG:32631" and counts.resolution == 10.0
    assert counts.s1_units == "db" and not counts.has_lulc
    assert tiles and counts.tiles_kept == len(tiles)
    for t in tiles:
        assert np.all(t["lulc"] == LULC_NODATA)                # no land cover: all 255 ...
    # ... and that does not make tiles no-data: an interior tile is complete.
    inner = [t for t in tiles if t["tile_id"] == "togo_r000004_c000004"][0]
    assert np.isfinite(inner["s1"]).all() and np.isfinite(inner["dem"]).all() and inner["s2"].min() > 0
    # dB passes through (bilinear in dB): registered values stay in the file's range.
    vv = np.concatenate([t["s1"][..., 0].ravel() for t in tiles])
    vv = vv[np.isfinite(vv)]
    assert -14.7 < vv.min() and vv.max() < -5.7


def test_bands_chosen_by_description_in_the_206_band_export(tests_data, tmp_path):
    d = tests_data / "cropharvest_togo_2019"
    original = d / "export_original.tif"
    with rasterio.open(original) as ds:
        names = list(ds.descriptions)
    assert len(names) == 206
    # Un-suffixed names are timestep 0 (the README): found wherever they are.
    with open_raster(original, "s2") as ds:
        assert select_bands(ds, "s2") == tuple(names.index(b) + 1 for b in ("B2", "B3", "B4", "B8"))
        assert select_bands(ds, "s1") == (names.index("VV") + 1, names.index("VH") + 1)
        assert select_bands(ds, "dem") == (names.index("elevation") + 1,)

    # Ingesting the raw export equals ingesting a 4-band file cut from it by position.
    data = read(original)
    cut = tmp_path / "s2_cut.tif"
    with rasterio.open(original) as ds:
        profile = ds.profile
    profile.update(count=4)
    with rasterio.open(cut, "w", **profile) as dst:
        dst.write(np.stack([data[names.index(b)] for b in ("B2", "B3", "B4", "B8")]))
    opts = IngestOptions(tile_size=8, stride=4, max_nodata_fraction=1.0)
    raw = ScenePaths("t", s2=original, s1=original, dem=original)
    cut_scene = ScenePaths("t", s2=cut, s1=d / "togo_s1.tif", dem=d / "togo_dem.tif")
    raw_tiles = list(iter_scene_tiles(raw, opts))
    cut_tiles = list(iter_scene_tiles(cut_scene, opts))
    assert len(raw_tiles) == len(cut_tiles) > 0
    for a, b in zip(raw_tiles, cut_tiles, strict=True):
        assert a["tile_id"] == b["tile_id"]
        np.testing.assert_array_equal(a["s2"], b["s2"])
    # February (timestep 0) S1 is not the November file: selection really took the raw bands.
    assert not np.allclose(np.nan_to_num(raw_tiles[0]["s1"]), np.nan_to_num(cut_tiles[0]["s1"]))


def test_s1_with_an_extra_angle_band_first(tmp_path, togo):
    with rasterio.open(togo.s1) as ds:
        vv_vh, profile = ds.read(), ds.profile
    angle = np.full(vv_vh.shape[1:], 38.5, np.float32)
    profile.update(count=3)
    path = tmp_path / "s1_angle.tif"
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(np.stack([angle, vv_vh[0], vv_vh[1]]))
        for i, name in enumerate(["angle", "VV", "VH"], start=1):
            dst.set_band_description(i, name)
    opts = IngestOptions(tile_size=8, stride=4, max_nodata_fraction=1.0)
    with_angle = list(iter_scene_tiles(ScenePaths("t", s2=togo.s2, s1=path, dem=togo.dem), opts))
    plain = list(iter_scene_tiles(togo, opts))
    assert len(with_angle) == len(plain) > 0
    for a, b in zip(with_angle, plain, strict=True):
        assert a["tile_id"].removeprefix("t_") == b["tile_id"].removeprefix("togo_")
        np.testing.assert_array_equal(a["s1"], b["s1"])


@pytest.mark.parametrize("dtype", ["int32", "float32"])
def test_labels_as_int32_or_float_are_converted(belgium, tmp_path, dtype):
    labels = derived(belgium.lulc, tmp_path, f"lulc_{dtype}.tif", lambda a: a, dtype=dtype)
    scene = ScenePaths("b", s2=belgium.s2, s1=belgium.s1, dem=belgium.dem, lulc=labels)
    with RegisteredScene(scene, IngestOptions(lulc_legend=DW)) as reg:
        lulc = reg.read(Window(0, 0, 100, 100))["lulc"]
    assert lulc.dtype == np.uint8
    np.testing.assert_array_equal(lulc, read(belgium.lulc, 1))


def test_int32_labels_with_their_own_nodata_become_255(belgium, tmp_path):
    def mark(a):
        a = a.astype(np.int32)
        a[:, :10, :] = -1
        return a
    labels = derived(belgium.lulc, tmp_path, "lulc_neg.tif", mark, dtype="int32", nodata=-1)
    scene = ScenePaths("b", s2=belgium.s2, s1=belgium.s1, dem=belgium.dem, lulc=labels)
    with RegisteredScene(scene, IngestOptions(lulc_legend=DW)) as reg:
        lulc = reg.read(Window(0, 0, 100, 100))["lulc"]
    assert np.all(lulc[:10] == LULC_NODATA)
    np.testing.assert_array_equal(lulc[10:], read(belgium.lulc, 1)[10:])


def test_partial_land_cover_coverage_is_nodata_and_drops_tiles(belgium, tmp_path):
    """Land cover for the north 50 rows only: the south is 255 (not class 0) and its tiles are dropped."""
    with rasterio.open(belgium.lulc) as ds:
        north, profile = ds.read(window=Window(0, 0, 100, 50)), ds.profile
    profile.update(height=50)
    path = tmp_path / "lulc_north.tif"
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(north)
    scene = ScenePaths("b", s2=belgium.s2, s1=belgium.s1, dem=belgium.dem, lulc=path)
    report = IngestReport()
    tiles = list(iter_scene_tiles(scene, IngestOptions(lulc_legend=DW, tile_size=25, stride=25), report))
    assert report.scenes["b"].tiles_dropped_nodata == 8          # rows 50..99: 2 x 4 tiles
    assert report.scenes["b"].tiles_kept == len(tiles) == 8
    with RegisteredScene(scene, IngestOptions(lulc_legend=DW)) as reg:
        lulc = reg.read(Window(0, 0, 100, 100))["lulc"]
    assert np.all(lulc[50:] == LULC_NODATA)
    np.testing.assert_array_equal(lulc[:50], north[0])


def test_dem_voids_small_filled_large_left_missing(belgium, tmp_path):
    original = read(belgium.dem, 1)

    def voids(a):
        a = a.copy()
        a[0, 20:23, 20:23] = -32767.0           # small: filled by interpolation
        a[0, 50:90, 40:80] = -32767.0           # 40 x 40: only its rim (16 px deep) is filled
        return a
    dem = derived(belgium.dem, tmp_path, "dem_voids.tif", voids)
    scene = ScenePaths("b", s2=belgium.s2, s1=belgium.s1, dem=dem, lulc=belgium.lulc)
    with RegisteredScene(scene, IngestOptions(lulc_legend=DW)) as reg:
        d = reg.read(Window(0, 0, 100, 100))["dem"]
    assert np.isfinite(d[19:24, 19:24]).all()
    assert np.isnan(d[68:72, 58:62]).all()                         # > 16 px from any valid cell
    assert np.isfinite(d[50:54, 40:44, 0]).all()                   # the rim is filled
    # The DEM is on the S2 grid (no resampling): the elevations are GDAL's
    # inverse-distance fill of the whole voided file, up to 16 px, within a
    # millimetre. (The small void's 3 x 3 cells span 145-146 m and its
    # neighbours 144-146 m: the tolerance must be far below that.)
    voided = voids(original[None])[0]
    valid = voided != -32767.0
    reference = rasterio.fill.fillnodata(np.where(valid, voided, np.nan).astype(np.float32),
                                         mask=valid.astype(np.uint8), max_search_distance=16)
    np.testing.assert_allclose(d[..., 0], reference, atol=1e-3, equal_nan=True)
    assert np.ptp(original[19:24, 19:24]) == 2.0
    report = IngestReport()
    list(iter_scene_tiles(scene, IngestOptions(lulc_legend=DW, tile_size=25, stride=25), report))
    assert report.scenes["b"].tiles_dropped_nodata >= 1


def test_dem_fill_can_be_disabled(belgium, tmp_path):
    dem = derived(belgium.dem, tmp_path, "dem_void.tif", lambda a: np.where(
        (np.arange(100)[None, :, None] == 30) & (np.arange(100)[None, None, :] == 30), -32767.0, a))
    scene = ScenePaths("b", s2=belgium.s2, s1=belgium.s1, dem=dem)
    with RegisteredScene(scene, IngestOptions(lulc_legend=DW, dem_fill_distance=0)) as reg:
        d = reg.read(Window(20, 20, 20, 20))["dem"]
    missing = np.isnan(d).any(axis=-1)
    assert missing[10, 10] and missing.sum() == 1


# -- SAR units -------------------------------------------------------------------------

def test_sar_zero_power_gives_the_floor_not_minus_infinity():
    power = np.array([0.0, -1e-4, 1e-7, 1.0, np.nan], dtype=np.float32)
    db = sar.linear_to_db(power, floor_db=-50.0)
    np.testing.assert_array_equal(db[:3], [-50.0, -50.0, -50.0])
    assert db[3] == 0.0 and np.isnan(db[4])
    assert not np.isinf(db).any()


def test_sar_db_input_passes_through():
    db = np.array([-25.3, -12.0, 3.1, np.nan], dtype=np.float32)
    np.testing.assert_array_equal(sar.to_db(db, "db"), db)
    assert sar.to_db(np.array([-np.inf], np.float32), "db")[0] == -50.0


def test_sar_units_detected_from_values(belgium, togo):
    assert sar.detect_units(read(belgium.s1)) == "linear"
    assert sar.detect_units(read(togo.s1)) == "db"


def test_sar_zeros_in_a_file_give_the_floor_end_to_end(belgium, tmp_path):
    def zero_block(a):
        a = a.copy()
        a[:, 40:60, 40:60] = 0.0
        return a
    s1 = derived(belgium.s1, tmp_path, "s1_zeros.tif", zero_block)
    scene = ScenePaths("b", s2=belgium.s2, s1=s1, dem=belgium.dem, lulc=belgium.lulc)
    with RegisteredScene(scene, IngestOptions(lulc_legend=DW, s1_floor_db=-45.0)) as reg:
        s = reg.read(Window(0, 0, 100, 100))["s1"]
    assert np.all(s[40:60, 40:60] == -45.0)
    assert np.isfinite(s).all()


def test_explicit_s1_units_override_detection(belgium):
    with RegisteredScene(belgium, IngestOptions(lulc_legend=DW, s1_units="db")) as reg:
        s = reg.read(Window(0, 0, 100, 100))["s1"]
    # Declared dB: the linear values pass through untouched.
    np.testing.assert_allclose(s, np.moveaxis(read(belgium.s1), 0, -1), rtol=1e-6)


# -- options and report ----------------------------------------------------------------

def test_max_nodata_fraction_drops_and_counts(belgium, tmp_path):
    s2 = derived(belgium.s2, tmp_path, "s2_gap.tif", lambda a: np.where(np.arange(100)[None, None, :] < 30, 0, a))
    scene = ScenePaths("b", s2=s2, s1=belgium.s1, dem=belgium.dem, lulc=belgium.lulc)
    strict, lenient = IngestReport(), IngestReport()
    list(iter_scene_tiles(scene, IngestOptions(lulc_legend=DW, tile_size=50, max_nodata_fraction=0.1), strict))
    list(iter_scene_tiles(scene, IngestOptions(lulc_legend=DW, tile_size=50, max_nodata_fraction=0.7), lenient))
    # Columns 0..29 are missing: the western tiles are 60 % no-data.
    assert (strict.tiles_kept, strict.tiles_dropped_nodata) == (2, 2)
    assert (lenient.tiles_kept, lenient.tiles_dropped_nodata) == (4, 0)
    assert strict.to_dict()["tiles_dropped_nodata"] == 2


def test_validate_scene_accepts_the_real_samples(belgium, togo):
    validate_scene(belgium, IngestOptions(lulc_legend=DW))
    validate_scene(togo)


@pytest.mark.parametrize("bad, message", [
    (dict(tile_size=0), "tile_size must be at least 3 pixels, got 0"),
    (dict(stride=0), "stride must be a positive number of pixels, got 0"),
    (dict(max_nodata_fraction=1.5), r"max_nodata_fraction must be in \[0, 1\], got 1.5"),
    (dict(s1_units="dB10"), "s1_units must be one of .*'db'.*, got 'dB10'"),
    (dict(dem_fill_distance=-1), "dem_fill_distance must be >= 0, got -1")])
def test_bad_options_are_value_errors(bad, message):
    with pytest.raises(ValueError, match=message):
        IngestOptions(**bad)


def test_geographic_target_crs_is_refused(belgium):
    with pytest.raises(ValueError, match="metric"):
        validate_scene(belgium, IngestOptions(target_crs="EPSG:4326"))


def test_input_error_is_a_value_error():
    assert issubclass(InputError, ValueError)


def test_command_line_dry_run_reports_and_exits_2_on_bad_input(belgium, tmp_path, capsys):
    import shutil
    from rsjax.commands.ingest import main
    for role in ("s2", "s1", "dem"):
        shutil.copy(getattr(belgium, role), tmp_path / f"be_{role}.tif")
    shutil.copy(belgium.lulc, tmp_path / "be_lulc.tif")
    assert main([str(tmp_path), "--tile_size", "50", "--lulc_legend", DW]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["scenes"]["be"]["tiles_kept"] == 4
    (tmp_path / "be_s1.tif").write_bytes((tmp_path / "be_s1.tif").read_bytes()[:500])
    assert main([str(tmp_path), "--tile-size", "50", "--lulc-legend", DW]) == 2       # the kebab spelling still works
    err = capsys.readouterr().err
    assert "be_s1.tif" in err and "Traceback" not in err
    assert main([str(tmp_path), "--tile_size", "2"]) == 2
    assert "error: tile_size must be at least 3" in capsys.readouterr().err


def test_dynamic_world_export_label_band_chosen_among_probabilities(belgium, tmp_path):
    """Dynamic World exports carry nine class-probability bands beside `label` (here placed last)."""
    from rsjax.data.contract import LULC_CLASSES
    labels = read(belgium.lulc, 1)
    with rasterio.open(belgium.lulc) as ds:
        profile = ds.profile
    probabilities = np.random.default_rng(0).random((9, 100, 100)).astype(np.float32)
    profile.update(count=10, dtype="float32", nodata=None)
    path = tmp_path / "dw.tif"
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(np.concatenate([probabilities, labels[None].astype(np.float32)]))
        for i, name in enumerate(list(LULC_CLASSES) + ["label"], start=1):
            dst.set_band_description(i, name)
    scene = ScenePaths("b", s2=belgium.s2, s1=belgium.s1, dem=belgium.dem, lulc=path)
    with RegisteredScene(scene, IngestOptions(lulc_legend=DW)) as reg:
        np.testing.assert_array_equal(reg.read(Window(0, 0, 100, 100))["lulc"], labels)


def test_benchmark_scene_writer_and_memory_probe(tmp_path):
    """The benchmark's windowed writer gives a valid scene, and the child-side probe reports memory."""
    from rsjax.bench import ingest as bench_ingest
    scene = bench_ingest.write_simple_scene(tmp_path, "bench", size=300, seed=1)
    validate_scene(scene)
    with rasterio.open(scene.dem) as ds:
        assert ds.crs.to_epsg() == 4326 and (read(scene.dem) == -32767.0).any()     # geographic, with voids
    # In a fresh process, as the benchmark runs it: the pytest process's own peak
    # RSS holds JAX and every earlier test.
    out = subprocess.run([sys.executable, "-m", "rsjax.bench.ingest", "--child_register",
                          str(tmp_path), "--tile_size", "100"], check=True, capture_output=True,
                         text=True, cwd=Path(__file__).resolve().parents[1]).stdout
    result = json.loads(out.strip().splitlines()[-1])
    assert result["tiles"] == 9 and result["tiles_per_s"] > 0
    assert 0 < result["peak_rss_mib"] < 2048


def ingest_synthetic(folder, sar_db: bool) -> float:
    """Ingests one small synthetic scene, checks the contract, returns the median registered VV (dB)."""
    from rsjax.data.synthetic import write_scenes
    scene = write_scenes(folder, num_scenes=1, size=128, seed=3, sar_db=sar_db)[0]
    with rasterio.open(scene.s1) as ds:
        assert np.isnan(ds.nodata)                   # rsjax writes SAR with the contract's no-data, NaN
    report = IngestReport()
    tiles = list(iter_scene_tiles(scene, IngestOptions(tile_size=64), report))
    counts = report.scenes[scene.scene_id]
    assert counts.s1_units == ("db" if sar_db else "linear")
    assert counts.tiles_total == 4 and len(tiles) == counts.tiles_kept > 0
    for t in tiles:
        assert t["s2"].dtype == np.uint16 and t["s1"].dtype == np.float32 and t["lulc"].dtype == np.uint8
        assert set(np.unique(t["lulc"])) <= set(range(9)) | {LULC_NODATA}
        assert np.isfinite(t["dem"]).all()
    vv = np.concatenate([t["s1"][..., 0].ravel() for t in tiles])
    assert -25.0 < np.nanmedian(vv) < 0.0
    return float(np.nanmedian(vv))


def test_synthetic_scenes_with_linear_or_db_sar_agree(tmp_path):
    linear = ingest_synthetic(tmp_path / "linear", sar_db=False)
    db = ingest_synthetic(tmp_path / "db", sar_db=True)
    # Same backscatter, resampled in power for one and in dB for the other: a
    # power average is above the dB average (Jensen), by well under a dB here.
    assert 0.0 <= linear - db < 1.0


# -- Earth Engine split exports ---------------------------------------------------------------

def split_like_earth_engine(path, out_dir, prefix, piece):
    """Cuts a GeoTIFF into `piece`-pixel pieces named as Earth Engine names a split export:
    `<prefix>-RRRRRRRRRR-CCCCCCCCCC.tif`, the row and column offsets of each piece."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    with rasterio.open(path) as src:
        for row in range(0, src.height, piece):
            for col in range(0, src.width, piece):
                window = Window(col, row, min(piece, src.width - col), min(piece, src.height - row))
                profile = dict(src.profile, width=int(window.width), height=int(window.height),
                               transform=src.window_transform(window))
                name = out_dir / f"{prefix}-{row:010d}-{col:010d}.tif"
                with rasterio.open(name, "w", **profile) as dst:
                    dst.write(src.read(window=window))
                    dst.update_tags(**src.tags())
                    for i, d in enumerate(src.descriptions, start=1):
                        if d:
                            dst.set_band_description(i, d)
                written.append(name)
    return written


@pytest.mark.parametrize("sample", ["belgium", "togo"])
def test_split_earth_engine_export_ingests_like_the_whole_file(sample, belgium, togo, tmp_path):
    """Pieces of 64 (Belgium, on the grid) or 10 px (Togo, EPSG:4326, warped) found by find_scenes
    and read as one mosaic give exactly the tiles of the whole files."""
    from rsjax.data.contract import Mosaic, find_scenes
    scene = {"belgium": belgium, "togo": togo}[sample]
    piece = 64 if sample == "belgium" else 10
    folder = tmp_path / "exports"
    for role in ("s2", "s1", "dem"):
        pieces = split_like_earth_engine(getattr(scene, role), folder, f"{sample}_{role}", piece)
        assert len(pieces) == 4
    (found,) = find_scenes(folder, require_lulc=False)
    assert found.scene_id == sample and isinstance(found.s2, Mosaic) and len(found.s2.pieces) == 4
    whole = ScenePaths(sample, s2=scene.s2, s1=scene.s1, dem=scene.dem)
    opts = IngestOptions(tile_size=8 if sample == "togo" else 32, stride=4 if sample == "togo" else 32,
                         max_nodata_fraction=1.0)
    split_tiles = list(iter_scene_tiles(found, opts))
    whole_tiles = list(iter_scene_tiles(whole, opts))
    assert len(split_tiles) == len(whole_tiles) > 0
    for a, b in zip(split_tiles, whole_tiles, strict=True):
        assert a["tile_id"] == b["tile_id"]
        for key in ("s2", "s1", "lulc", "dem"):
            np.testing.assert_array_equal(a[key], b[key], err_msg=f"{key} of {a['tile_id']}")


def test_split_export_pieces_that_do_not_fit_are_named(belgium, tmp_path):
    from rsjax.data.contract import find_scenes
    folder = tmp_path / "exports"
    pieces = split_like_earth_engine(belgium.s2, folder, "be_s2", 64)
    for role in ("s1", "dem"):
        split_like_earth_engine(getattr(belgium, role), folder, f"be_{role}", 64)
    # A piece shifted by half a pixel, as if from another export.
    with rasterio.open(pieces[1], "r+") as ds:
        ds.transform = ds.transform * ds.transform.translation(0.5, 0)
    (scene,) = find_scenes(folder, require_lulc=False)
    with pytest.raises(InputError, match=r"be_s2-0000000000-0000000064\.tif.*not on whole pixels"):
        validate_scene(scene)
    # The whole file beside its pieces is ambiguous.
    (folder / "be_s2.tif").write_bytes(belgium.s2.read_bytes())
    with pytest.raises(InputError, match="both as be_s2.tif and as 4 split export piece"):
        find_scenes(folder, require_lulc=False)


# -- the samples through the command line, as the README documents -----------------------------

def test_samples_are_usable_by_the_dry_run_as_documented(tests_data, capsys):
    """`rsjax ingest tests/data/<sample> ...` on the folders as they are."""
    from rsjax.commands.ingest import main
    assert main([str(tests_data / "worldcereal_belgium_2021"), "--allow_missing_lulc",
                 "--tile_size", "50"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["scenes"]["belgium"]["tiles_kept"] == 4
    assert main([str(tests_data / "cropharvest_togo_2019"), "--allow_missing_lulc", "--tile_size", "8",
                 "--max_nodata_fraction", "0.3"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["scenes"]["togo"]["tiles_kept"] >= 1 and out["scenes"]["togo"]["crs"] == "EPSG:32631"
    # At the default tile size (256) the 17 x 17 Togo scene yields nothing: the error says why.
    assert main([str(tests_data / "cropharvest_togo_2019"), "--allow_missing_lulc"]) == 2
    err = capsys.readouterr().err
    assert "no scene yields a tile" in err and "scene 'togo'" in err and "256 x 256" in err


# -- Sentinel-2 BOA offset (processing baseline 04.00) -----------------------------------------

def offset_copy(belgium, tmp_path, name, tag_band=None, tag_dataset=None, offset_scale=None):
    """Belgium's S2 as a baseline-04.00 product stores it (DN = reflectance x 10000 + 1000),
    saying so the way real files do."""
    with rasterio.open(belgium.s2) as ds:
        profile, dn = ds.profile, ds.read().astype(np.int32) + 1000
        descriptions = ds.descriptions
    path = tmp_path / name
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(dn.astype(np.uint16))
        for i, d in enumerate(descriptions, start=1):
            dst.set_band_description(i, d)
            if tag_band is not None:            # GDAL's SENTINEL2 driver: band metadata
                dst.update_tags(i, **{tag_band: "-1000"})
        if tag_dataset is not None:             # per-band product properties
            dst.update_tags(**{f"{tag_dataset}_{d}": "-1000" for d in descriptions})
        if offset_scale is not None:            # GDAL offset/scale (reflectance = DN * 1e-4 - 0.1)
            dst.offsets = [offset_scale[0]] * 4
            dst.scales = [offset_scale[1]] * 4
    return path


@pytest.mark.parametrize("declared", ["band_metadata", "dataset_metadata", "offset_scale"])
def test_s2_boa_offset_declared_by_the_file_is_applied(belgium, tmp_path, declared):
    kwargs = {"band_metadata": dict(tag_band="BOA_ADD_OFFSET"),
              "dataset_metadata": dict(tag_dataset="BOA_ADD_OFFSET"),
              "offset_scale": dict(offset_scale=(-0.1, 1e-4))}[declared]
    s2 = offset_copy(belgium, tmp_path, f"s2_{declared}.tif", **kwargs)
    scene = ScenePaths("b", s2=s2, s1=belgium.s1, dem=belgium.dem)
    report = IngestReport()
    tiles = list(iter_scene_tiles(scene, IngestOptions(tile_size=50), report))
    plain = list(iter_scene_tiles(ScenePaths("b", s2=belgium.s2, s1=belgium.s1, dem=belgium.dem),
                                  IngestOptions(tile_size=50)))
    assert report.scenes["b"].s2_offset == [-1000.0] * 4
    assert len(tiles) == len(plain) > 0
    for a, b in zip(tiles, plain, strict=True):
        assert a["tile_id"] == b["tile_id"]
        np.testing.assert_array_equal(a["s2"], b["s2"])


def test_s2_offset_option_overrides_and_dark_pixels_stay_valid(belgium, tmp_path):
    bare = offset_copy(belgium, tmp_path, "s2_bare.tif")               # says nothing
    tagged = offset_copy(belgium, tmp_path, "s2_tagged.tif", tag_band="BOA_ADD_OFFSET")
    original = np.moveaxis(read(belgium.s2), 0, -1)
    window = Window(0, 0, 100, 100)
    with RegisteredScene(ScenePaths("b", s2=bare, s1=belgium.s1, dem=belgium.dem)) as reg:
        np.testing.assert_array_equal(reg.read(window)["s2"], original + 1000)      # taken as it is
    with RegisteredScene(ScenePaths("b", s2=bare, s1=belgium.s1, dem=belgium.dem),
                         IngestOptions(s2_offset=-1000)) as reg:
        np.testing.assert_array_equal(reg.read(window)["s2"], original)
    with RegisteredScene(ScenePaths("b", s2=tagged, s1=belgium.s1, dem=belgium.dem),
                         IngestOptions(s2_offset=0)) as reg:
        np.testing.assert_array_equal(reg.read(window)["s2"], original + 1000)      # explicit 0 wins
    # A DN below the offset is a negative reflectance: still valid (1), never no-data (0).
    with RegisteredScene(ScenePaths("b", s2=bare, s1=belgium.s1, dem=belgium.dem),
                         IngestOptions(s2_offset=-3000)) as reg:
        s2 = reg.read(window)["s2"]
    dark = original + 1000 <= 3000
    assert dark.any() and np.all(s2[dark] == 1) and np.all(s2 > 0)


def test_s2_offsets_that_disagree_are_an_error(belgium, tmp_path):
    s2 = offset_copy(belgium, tmp_path, "s2_both.tif", tag_band="BOA_ADD_OFFSET", offset_scale=(-0.2, 1e-4))
    with pytest.raises(InputError, match=r"s2_both.tif: band 1 \(B2\) declares different BOA offsets"):
        validate_scene(ScenePaths("b", s2=s2, s1=belgium.s1, dem=belgium.dem))


# -- land-cover legends ------------------------------------------------------------------------

def test_a_binary_land_cover_map_is_refused_as_dynamic_world(belgium):
    with pytest.raises(InputError) as info:
        validate_scene(belgium)
    message = str(info.value)
    assert "belgium_cropland.tif" in message and "holds only the values 0 and 1" in message
    assert "not a Dynamic World" in message and "lulc_map" in message and "lulc_legend" in message
    assert "NOT the Dynamic World legend" in message            # the file's own LEGEND tag


def test_lulc_map_maps_another_legend_and_every_value_must_be_mapped(belgium):
    cropland = read(belgium.lulc, 1)
    with RegisteredScene(belgium, IngestOptions(lulc_map="1:4,0:255")) as reg:
        lulc = reg.read(Window(0, 0, 100, 100))["lulc"]
    np.testing.assert_array_equal(lulc, np.where(cropland == 1, 4, LULC_NODATA))
    with RegisteredScene(belgium, IngestOptions(lulc_map={"0": 2, "1": 4})) as reg:    # JSON-like mapping
        np.testing.assert_array_equal(reg.read(Window(0, 0, 100, 100))["lulc"], np.where(cropland == 1, 4, 2))
    with pytest.raises(InputError, match=r"holds values \[0\] that lulc_map '1:4' does not map"):
        validate_scene(belgium, IngestOptions(lulc_map="1:4"))


@pytest.mark.parametrize("bad", ["1:9", "a:4", "1-4", "{1: 4}", "1:4,1:5", "2.5:4"])
def test_bad_lulc_map_is_an_error_naming_the_option(bad):
    with pytest.raises(ValueError, match="lulc_map"):
        IngestOptions(lulc_map=bad)


def test_lulc_map_parses_text_and_json_alike():
    from rsjax.data.landcover import parse_lulc_map
    assert parse_lulc_map("1:4, 0:255") == parse_lulc_map('{"0": 255, "1": 4}') == ((0, 255), (1, 4))
    assert IngestOptions(lulc_map="1:4,0:255") == IngestOptions(lulc_map={1: 4, 0: 255})


def test_only_water_or_only_trees_is_still_plausible_dynamic_world():
    from rsjax.data.landcover import not_dynamic_world
    assert not_dynamic_world([0]) is None and not_dynamic_world([1]) is None     # a lake, a forest
    assert not_dynamic_world([0, 1, 4]) is None
    assert "binary map" in not_dynamic_world([0, 1])
