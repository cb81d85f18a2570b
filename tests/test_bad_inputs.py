"""Each bad input gets a clear InputError that names the file and says what to do."""
import numpy as np
import pytest
from affine import Affine

from rsjax.data.contract import InputError, ScenePaths
from rsjax.data.geotiff import write_geotiff
from rsjax.data.ingest import IngestOptions, iter_scene_tiles, validate_scene

# rasterio 1.4 itself multiplies Affine objects with `*`, which affine 3 flags as pending deprecation.
pytestmark = pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")


CRS = "EPSG:32631"
T = Affine(10.0, 0.0, 500000.0, 0.0, -10.0, 5600000.0)
N = 48


def good_scene(d, **override) -> ScenePaths:
    """A small valid scene on one grid; `override` replaces a source's path."""
    rng = np.random.default_rng(0)
    paths = dict(
        s2=write_geotiff(d / "s2.tif", rng.integers(300, 4000, (4, N, N)).astype(np.uint16), CRS, T, nodata=0,
                         descriptions=["B2", "B3", "B4", "B8"]),
        s1=write_geotiff(d / "s1.tif", rng.gamma(2.0, 0.05, (2, N, N)).astype(np.float32), CRS, T, nodata=np.nan,
                         descriptions=["VV", "VH"]),
        dem=write_geotiff(d / "dem.tif", (100 + rng.random((N, N)) * 5).astype(np.float32), CRS, T,
                          nodata=-32767.0),
        lulc=write_geotiff(d / "lulc.tif", rng.integers(0, 9, (N, N)).astype(np.uint8), CRS, T, nodata=255),
    )
    paths.update(override)
    return ScenePaths("bad", **paths)


def error_for(scene, opts=IngestOptions(tile_size=16)) -> str:
    with pytest.raises(InputError) as info:
        validate_scene(scene, opts)
    # iter_scene_tiles validates before yielding anything, with the same error.
    with pytest.raises(InputError):
        next(iter_scene_tiles(scene, opts))
    return str(info.value)


def test_good_scene_passes(tmp_path):
    scene = good_scene(tmp_path)
    validate_scene(scene)
    assert len(list(iter_scene_tiles(scene, IngestOptions(tile_size=16)))) == 9


@pytest.mark.parametrize("keep", [0.5, 0.02])
def test_truncated_geotiff(tmp_path, keep):
    scene = good_scene(tmp_path)
    big = np.random.default_rng(1).integers(1, 60000, (4, 600, 600)).astype(np.uint16)   # incompressible
    path = write_geotiff(tmp_path / "s2_big.tif", big, CRS, T, nodata=0, descriptions=["B2", "B3", "B4", "B8"])
    content = path.read_bytes()
    truncated = tmp_path / "s2_truncated.tif"
    truncated.write_bytes(content[: int(len(content) * keep)])
    message = error_for(good_scene(tmp_path, s2=truncated))
    assert str(truncated) in message
    assert "truncated or corrupt" in message and "again" in message
    assert "Traceback" not in message


def test_not_a_geotiff_at_all(tmp_path):
    junk = tmp_path / "junk_s1.tif"
    junk.write_text("this is not a raster")
    message = error_for(good_scene(tmp_path, s1=junk))
    assert str(junk) in message and "cannot be opened" in message


def test_missing_file(tmp_path):
    message = error_for(good_scene(tmp_path, dem=tmp_path / "nowhere_dem.tif"))
    assert "nowhere_dem.tif" in message and "does not exist" in message


def test_three_bands_where_four_are_expected(tmp_path):
    three = write_geotiff(tmp_path / "s2_rgb.tif", np.full((3, N, N), 1000, np.uint16), CRS, T, nodata=0)
    message = error_for(good_scene(tmp_path, s2=three))
    assert str(three) in message
    assert "3 band(s) where 4 are expected" in message and "B2, B3, B4, B8" in message


def test_described_bands_missing_one(tmp_path):
    wrong = write_geotiff(tmp_path / "s2_b8a.tif", np.full((4, N, N), 1000, np.uint16), CRS, T, nodata=0,
                          descriptions=["B2", "B3", "B4", "B8A"])
    message = error_for(good_scene(tmp_path, s2=wrong))
    assert str(wrong) in message and "no band described as B8" in message


def test_ambiguous_band_descriptions(tmp_path):
    twice = write_geotiff(tmp_path / "s1_twice.tif", np.full((3, N, N), 0.1, np.float32), CRS, T,
                          descriptions=["VV", "VV", "VH"])
    message = error_for(good_scene(tmp_path, s1=twice))
    assert str(twice) in message and "distinct description" in message


def test_file_without_crs(tmp_path):
    no_crs = write_geotiff(tmp_path / "s1_nocrs.tif", np.full((2, N, N), 0.1, np.float32), None, T,
                           descriptions=["VV", "VH"])
    message = error_for(good_scene(tmp_path, s1=no_crs))
    assert str(no_crs) in message and "has no CRS" in message and "gdal_edit.py -a_srs" in message


def test_extents_that_do_not_overlap(tmp_path):
    far = Affine(10.0, 0.0, 700000.0, 0.0, -10.0, 5600000.0)    # 200 km east
    elsewhere = write_geotiff(tmp_path / "dem_far.tif", np.full((N, N), 50.0, np.float32), CRS, far,
                              nodata=-32767.0)
    message = error_for(good_scene(tmp_path, dem=elsewhere))
    assert str(elsewhere) in message and "does not overlap" in message


def test_all_nodata_scene(tmp_path):
    empty = write_geotiff(tmp_path / "s2_empty.tif", np.zeros((4, N, N), np.uint16), CRS, T, nodata=0,
                          descriptions=["B2", "B3", "B4", "B8"])
    message = error_for(good_scene(tmp_path, s2=empty))
    assert str(empty) in message and "entirely no-data" in message


def test_reflectance_in_zero_one_is_refused(tmp_path):
    unit = write_geotiff(tmp_path / "s2_unit.tif", np.full((4, N, N), 0.2, np.float32), CRS, T,
                         descriptions=["B2", "B3", "B4", "B8"])
    message = error_for(good_scene(tmp_path, s2=unit))
    assert str(unit) in message and "x 10000" in message


@pytest.mark.parametrize("dtype", ["uint8", "int32"])
def test_labels_outside_the_legend(tmp_path, dtype):
    labels = np.random.default_rng(2).integers(0, 9, (N, N)).astype(dtype)
    labels[3, 4] = 9
    labels[40, 41] = 42
    if dtype == "int32":
        labels[10, 10] = -5
    path = write_geotiff(tmp_path / f"lulc_{dtype}.tif", labels, CRS, T, nodata=255)
    message = error_for(good_scene(tmp_path, lulc=path))
    assert str(path) in message and "outside 0..8 and 255" in message
    assert "9" in message and "42" in message
    if dtype == "int32":
        assert "-5" in message


def test_fractional_labels(tmp_path):
    labels = np.random.default_rng(2).integers(0, 9, (N, N)).astype(np.float32)
    labels[5, 5] = 2.5
    path = write_geotiff(tmp_path / "lulc_prob.tif", labels, CRS, T)
    message = error_for(good_scene(tmp_path, lulc=path))
    assert str(path) in message and "fractional" in message and "2.5" in message


def test_bad_label_in_a_far_block_is_found(tmp_path):
    """The label check reads every block, not a sample."""
    labels = np.zeros((600, 600), np.uint8)
    labels[599, 599] = 17
    path = write_geotiff(tmp_path / "lulc_big.tif", labels, CRS, T, nodata=255)
    message = error_for(good_scene(tmp_path, lulc=path))
    assert "17" in message


def test_all_problems_are_reported_together(tmp_path):
    no_crs = write_geotiff(tmp_path / "s1_nocrs.tif", np.full((2, N, N), 0.1, np.float32), None, T)
    labels = np.full((N, N), 12, np.uint8)
    bad_labels = write_geotiff(tmp_path / "lulc_12.tif", labels, CRS, T, nodata=255)
    message = error_for(good_scene(tmp_path, s1=no_crs, lulc=bad_labels))
    assert "2 problem(s)" in message
    assert str(no_crs) in message and str(bad_labels) in message


def test_dem_voids_are_handled_not_refused(tmp_path):
    """DEM voids are not an input error: small ones are filled, large ones become no-data (see test_ingest)."""
    z = (100 + np.random.default_rng(3).random((N, N)) * 5).astype(np.float32)
    z[10:12, 10:12] = -32767.0
    z[30:, 30:] = -32767.0
    dem = write_geotiff(tmp_path / "dem_voids.tif", z, CRS, T, nodata=-32767.0)
    scene = good_scene(tmp_path, dem=dem)
    validate_scene(scene)
    tiles = list(iter_scene_tiles(scene, IngestOptions(tile_size=16, dem_fill_distance=4)))
    ids = {t["tile_id"] for t in tiles}
    assert "bad_r000000_c000000" in ids and "bad_r000032_c000032" not in ids
    first = [t for t in tiles if t["tile_id"] == "bad_r000000_c000000"][0]
    assert np.isfinite(first["dem"][9:13, 9:13]).all()


def test_entirely_void_dem(tmp_path):
    dem = write_geotiff(tmp_path / "dem_void.tif", np.full((N, N), -32767.0, np.float32), CRS, T, nodata=-32767.0)
    message = error_for(good_scene(tmp_path, dem=dem))
    assert str(dem) in message and "entirely no-data" in message


def test_options_errors_are_value_errors_not_input_errors(tmp_path):
    with pytest.raises(ValueError, match="metric grid"):
        validate_scene(good_scene(tmp_path), IngestOptions(target_crs="EPSG:4326"))
