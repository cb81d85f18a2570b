"""The synthetic scene writer: real GeoTIFFs shaped like the real products, and a coherent scene."""
import dataclasses

import numpy as np
import pytest
import rasterio
from rasterio.crs import CRS
from rasterio.warp import transform_bounds

from rsjax import cli
from rsjax.data import synthetic
from rsjax.data.contract import LULC_CLASSES, S1_BANDS, S2_BANDS, find_scenes

SIZE = 96          # not a multiple of the 256 GeoTIFF block: exercises partial blocks
SEED = 3


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    return out, synthetic.write_scenes(out, num_scenes=2, size=SIZE, seed=SEED, cloudy=True)


@pytest.fixture(scope="module")
def big_scene():
    """One 256 px scene in memory, large enough for every class statistic."""
    return synthetic.render_scene_arrays("synth_s0_000", 256, (0, 0))


def _fraction(x):
    return abs(x - round(x))


def test_scene_ids_and_folder_convention(scenes):
    out, paths = scenes
    assert [p.scene_id for p in paths] == [f"synth_s{SEED}_000", f"synth_s{SEED}_001"]
    # The cloudy twin and its mask sit beside the scene and find_scenes ignores them.
    assert (out / f"synth_s{SEED}_000_s2_cloudy.tif").exists()
    assert (out / f"synth_s{SEED}_000_cloudmask.tif").exists()
    assert find_scenes(out, clouds=True) == paths
    assert find_scenes(out) == [dataclasses.replace(p, s2_cloudy=None, cloud_mask=None) for p in paths]


def test_s2_is_like_l2a(scenes):
    _, paths = scenes
    with rasterio.open(paths[0].s2) as src:
        assert src.count == 4 and src.dtypes == ("uint16",) * 4
        assert src.descriptions == S2_BANDS
        assert src.nodata == 0
        assert src.res == (10.0, 10.0)
        assert 32601 <= src.crs.to_epsg() <= 32660          # WGS 84 / UTM north
        assert src.profile["tiled"] and src.block_shapes[0] == (256, 256)
        assert src.compression.name.lower() == "deflate"
        data = src.read()
    assert data.shape == (4, SIZE, SIZE)
    assert data.min() >= 1                                  # 0 is nodata: never a valid pixel


def test_s1_is_like_grd_and_not_pixel_aligned(scenes):
    _, paths = scenes
    with rasterio.open(paths[0].s2) as s2, rasterio.open(paths[0].s1) as s1:
        assert s1.count == 2 and s1.dtypes == ("float32",) * 2
        assert s1.descriptions == S1_BANDS
        assert s1.crs == s2.crs and s1.res == (10.0, 10.0)
        # Origin off the S2 grid by a fraction of a pixel in both directions.
        assert _fraction((s1.transform.c - s2.transform.c) / 10.0) > 0.1
        assert _fraction((s1.transform.f - s2.transform.f) / 10.0) > 0.1
        assert s1.shape != s2.shape
        # Covers the optical footprint, so registration leaves no gaps.
        assert s1.bounds.left < s2.bounds.left and s1.bounds.right > s2.bounds.right
        assert s1.bounds.bottom < s2.bounds.bottom and s1.bounds.top > s2.bounds.top
        assert s1.tags()["UNITS"] == "linear power"
        sigma0 = s1.read()
    assert np.all(np.isfinite(sigma0)) and sigma0.min() > 0
    vv_db = 10 * np.log10(np.median(sigma0[0]))
    assert -20 < vv_db < 0                                  # a land scene's typical VV


def test_lulc_is_like_dynamic_world_on_the_s2_grid(scenes):
    _, paths = scenes
    with rasterio.open(paths[0].s2) as s2, rasterio.open(paths[0].lulc) as lulc:
        assert lulc.count == 1 and lulc.dtypes == ("uint8",)
        assert lulc.descriptions == ("label",)
        assert lulc.nodata == 255
        assert lulc.crs == s2.crs and lulc.transform == s2.transform and lulc.shape == s2.shape
        labels = lulc.read(1)
    assert labels.max() <= len(LULC_CLASSES) - 1


def test_dem_is_like_glo30(scenes):
    _, paths = scenes
    with rasterio.open(paths[0].s2) as s2, rasterio.open(paths[0].dem) as dem:
        assert dem.crs == CRS.from_epsg(4326)
        assert dem.dtypes == ("float32",) and dem.count == 1
        assert np.allclose(dem.res, (1 / 3600, 1 / 3600), rtol=0, atol=1e-12)
        assert dem.nodata == -32767
        west, south, east, north = transform_bounds(s2.crs, dem.crs, *s2.bounds, densify_pts=21)
        margin = 0.001                                      # at least ~100 m on every side
        assert dem.bounds.left < west - margin and dem.bounds.right > east + margin
        assert dem.bounds.bottom < south - margin and dem.bounds.top > north + margin
        elevation = dem.read(1)
    voids = elevation == -32767
    # A few small voids and nothing else missing (the truth grid covers the whole DEM).
    assert 0 < voids.sum() <= 5 * np.pi * 4.0 ** 2 + 10
    valid = elevation[~voids]
    assert valid.min() > 0 and valid.max() < 3000


def test_cloudy_twin_and_mask(scenes):
    out, paths = scenes
    with rasterio.open(paths[0].s2) as clear, \
            rasterio.open(out / f"{paths[0].scene_id}_s2_cloudy.tif") as cloudy, \
            rasterio.open(out / f"{paths[0].scene_id}_cloudmask.tif") as mask_file:
        assert cloudy.profile["transform"] == clear.transform
        clear_px, cloudy_px, mask = clear.read(), cloudy.read(), mask_file.read(1)
    assert set(np.unique(mask)) <= {0, 1, 2}
    np.testing.assert_array_equal(clear_px[:, mask == 0], cloudy_px[:, mask == 0])
    assert (mask == 1).any() and (mask == 2).any() and (mask == 0).any()
    assert cloudy_px[:, mask == 1].mean() > clear_px[:, mask == 1].mean()      # clouds brighten
    assert cloudy_px[:, mask == 2].mean() < clear_px[:, mask == 2].mean()      # shadows darken


def test_sar_db_option_writes_the_same_scene_in_db(tmp_path):
    linear = synthetic.write_scene(tmp_path / "lin", "x", 64, 5)
    db = synthetic.write_scene(tmp_path / "db", "x", 64, 5, sar_db=True)
    with rasterio.open(linear.s1) as a, rasterio.open(db.s1) as b:
        assert b.tags()["UNITS"] == "dB"
        np.testing.assert_allclose(b.read(), 10 * np.log10(a.read()), atol=1e-4)


def test_same_seed_same_bytes_other_seed_other_scene(tmp_path):
    first = synthetic.write_scene(tmp_path / "a", "x", 48, 11, cloudy=True)
    again = synthetic.write_scene(tmp_path / "b", "x", 48, 11, cloudy=True)
    other = synthetic.write_scene(tmp_path / "c", "x", 48, 12)
    for name in ("s2", "s1", "lulc", "dem"):
        assert getattr(first, name).read_bytes() == getattr(again, name).read_bytes(), name
    assert (tmp_path / "a" / "x_s2_cloudy.tif").read_bytes() == (tmp_path / "b" / "x_s2_cloudy.tif").read_bytes()
    with rasterio.open(first.s2) as a, rasterio.open(other.s2) as c:
        assert a.crs != c.crs or not np.array_equal(a.read(), c.read())


def test_every_class_appears_and_labels_stay_in_range(big_scene):
    counts = np.bincount(big_scene.lulc.ravel(), minlength=len(LULC_CLASSES))
    assert len(counts) == len(LULC_CLASSES)                 # nothing above 8
    present = [LULC_CLASSES[i] for i in np.flatnonzero(counts)]
    assert {"water", "trees", "crops", "built"} <= set(present), present
    assert len(present) >= 7, present


def _class_median(scene, class_name, values):
    return float(np.median(values[..., scene.lulc == LULC_CLASSES.index(class_name)], axis=-1)
                 if values.ndim == 3 else np.median(values[scene.lulc == LULC_CLASSES.index(class_name)]))


def test_reflectance_and_backscatter_magnitudes_per_class(big_scene):
    s2 = big_scene.s2 / 10000.0
    blue, nir = s2[0], s2[3]
    assert _class_median(big_scene, "water", nir) < 0.04 < _class_median(big_scene, "water", blue) + 0.01
    assert _class_median(big_scene, "water", nir) < _class_median(big_scene, "water", blue)
    assert 0.2 < _class_median(big_scene, "trees", nir) < 0.45
    assert _class_median(big_scene, "water", nir) < _class_median(big_scene, "trees", nir)
    assert 0.08 < _class_median(big_scene, "built", s2[2]) < 0.25
    vv = 10 * np.log10(big_scene.truth["sigma0"][0] + 1e-4)    # radar shadow is 0
    assert _class_median(big_scene, "water", vv) < -15
    assert _class_median(big_scene, "water", vv) < _class_median(big_scene, "trees", vv) \
        < _class_median(big_scene, "built", vv)
    assert _class_median(big_scene, "built", vv) > -3


def test_snow_is_bright():
    # Scene (0, 1) has snow at 256 px (the snow line varies by scene).
    scene = synthetic.render_scene_arrays("s", 256, (0, 1))
    snow = scene.lulc == LULC_CLASSES.index("snow_and_ice")
    assert snow.sum() > 20
    assert np.median(scene.s2[0][snow]) / 10000 > 0.6


def _corr(a, b):
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def test_couplings_are_physical(big_scene):
    t = big_scene.truth
    trees = big_scene.lulc == LULC_CLASSES.index("trees")
    # Denser canopy: brighter NIR and stronger VH volume scattering.
    nir_flat = t["reflectance"][3] / np.clip(t["cos_sun"], 0.2, None)
    assert _corr(t["density"][trees], nir_flat[trees]) > 0.5
    assert _corr(t["density"][trees], 10 * np.log10(t["sigma0"][1][trees] + 1e-4)) > 0.3
    # Sunlit slopes are brighter: illumination comes from the terrain.
    assert _corr(t["cos_sun"][trees], t["reflectance"][3][trees]) > 0.4
    # The label does not know the density: it spans most of its range inside one class.
    assert np.percentile(t["density"][trees], 90) - np.percentile(t["density"][trees], 10) > 0.4


def test_horn_slope_and_aspect_on_tilted_planes():
    rows, cols = np.indices((8, 9)).astype(float)
    east_up = 0.3 * cols * 10.0                             # rises 0.3 m per metre eastwards
    slope, aspect = synthetic.horn_slope_aspect(east_up, 10.0)
    np.testing.assert_allclose(slope[1:-1, 1:-1], np.degrees(np.arctan(0.3)), atol=1e-9)
    np.testing.assert_allclose(aspect[1:-1, 1:-1], 270.0, atol=1e-9)   # faces west
    south_up = 0.2 * rows * 10.0                            # rows run south: faces north
    slope, aspect = synthetic.horn_slope_aspect(south_up, 10.0)
    np.testing.assert_allclose(slope[1:-1, 1:-1], np.degrees(np.arctan(0.2)), atol=1e-9)
    np.testing.assert_allclose(aspect[1:-1, 1:-1] % 360.0, 0.0, atol=1e-9)
    _, aspect = synthetic.horn_slope_aspect(np.full((4, 4), 7.0), 10.0)
    assert np.all(aspect == -9999.0)


def test_cos_incidence_and_hillshade_formula():
    # A 30 deg slope facing the light at 60 deg elevation is lit head-on.
    assert synthetic.cos_incidence(np.array(30.0), np.array(135.0), 135.0, 60.0) == pytest.approx(1.0)
    # Flat ground: cos i = sin(elevation); gdaldem's 1 + 254 cos i.
    assert synthetic.hillshade(np.array(0.0), np.array(-9999.0)) == pytest.approx(1 + 254 * np.sin(np.radians(45)))


def test_fractal_noise_is_normalised_and_seeded():
    a = synthetic.fractal_noise((64, 80), 3.0, np.random.default_rng(1))
    b = synthetic.fractal_noise((64, 80), 3.0, np.random.default_rng(1))
    assert a.shape == (64, 80)
    np.testing.assert_array_equal(a, b)
    assert abs(a.mean()) < 1e-9 and a.std() == pytest.approx(1.0)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="too small"):
        synthetic.render_scene_arrays("x", 8, 0)
    with pytest.raises(ValueError, match="num_scenes"):
        synthetic.write_scenes("unused", num_scenes=0)


def test_command_line(tmp_path, capsys):
    cli.main(["scenes", "--out_dir", str(tmp_path), "--scenes", "1", "--size", "32", "--seed", "7", "--sar_db"])
    printed = capsys.readouterr().out
    assert "synth_s7_000" in printed and "wrote 1 scene" in printed
    [scene] = find_scenes(tmp_path)
    with rasterio.open(scene.s1) as s1:
        assert s1.tags()["UNITS"] == "dB"


def test_scene_tiles_follow_the_data_contract(big_scene):
    tiles = list(synthetic.scene_tiles(big_scene, tile_size=128))
    assert len(tiles) == 4
    tile = tiles[3]                                          # bottom-right
    assert tile["s2"].shape == (128, 128, 4) and tile["s2"].dtype == np.uint16
    assert tile["s1"].shape == (128, 128, 2) and tile["s1"].dtype == np.float32
    assert tile["lulc"].shape == (128, 128) and tile["lulc"].dtype == np.uint8
    assert tile["dem"].shape == (128, 128, 4) and tile["dem"].dtype == np.float32
    np.testing.assert_array_equal(tile["s2"], big_scene.s2[:, 128:, 128:].transpose(1, 2, 0))
    g = big_scene.geometry.s2.transform
    np.testing.assert_allclose(tile["transform"], [10, 0, g.c + 1280, 0, -10, g.f - 1280])
    assert tile["tile_id"] == "synth_s0_000_r128_c128" and tile["scene_id"] == "synth_s0_000"
    vv_db = tile["s1"][..., 0]
    assert np.isfinite(vv_db).all() and -40 < np.median(vv_db) < 5
    assert 1 <= tile["dem"][..., 3].min() and tile["dem"][..., 3].max() <= 255


# ----------------------------------------------------------------------------- clouds

def _tile_covers(mask, tile=64):
    n = mask.shape[0] // tile
    return [float((mask[r * tile:(r + 1) * tile, c * tile:(c + 1) * tile] == 1).mean())
            for r in range(n) for c in range(n)]


def test_cloud_cover_spreads_over_every_bin():
    """The demo layout (256 px scenes, 64 px tiles): tiles in all four of
    SEN12MS-CR's cover bins, clear and overcast ones included."""
    covers = np.array([c for k in range(8) for c in _tile_covers(
        synthetic.render_scene_arrays("x", 256, (0, k), cloudy=True).cloud_mask)])
    counts = np.histogram(covers, [0.0, 0.1, 0.5, 0.9, 1.0 + 1e-9])[0]
    assert (counts >= 8).all(), counts
    assert (covers == 0).any() and (covers == 1).any()


def test_thin_and_thick_clouds_and_a_fixed_cover():
    arrays = synthetic.render_scene_arrays("x", 128, (0, 3), cloudy=True)   # a scene with cirrus
    clouds, mask = arrays.clouds, arrays.cloud_mask
    assert (clouds.thin > 0).any() and clouds.thin.max() <= 0.45
    opacity = clouds.opacity[mask == 1]
    assert (opacity < 0.3).mean() > 0.1 and (opacity > 0.95).mean() > 0.1   # both kinds
    # Through thin cloud (out of the shadows) the surface still shows.
    thin_only = (clouds.thick == 0) & (clouds.thin > 0) & (clouds.blocked == 0)
    assert thin_only.sum() > 500
    clear, cloudy = arrays.s2[3][thin_only].astype(float), arrays.s2_cloudy[3][thin_only].astype(float)
    assert np.corrcoef(clear, cloudy)[0, 1] > 0.95
    # cloud_cover fixes the target: nothing at 0, (almost) everything at 1.
    assert not (synthetic.render_scene_arrays("x", 64, (0, 1), cloudy=True,
                                              cloud_cover=0.0).clouds.thick > 0).any()
    full = synthetic.render_scene_arrays("x", 64, (0, 1), cloudy=True, cloud_cover=1.0)
    assert (full.cloud_mask == 1).mean() > 0.95


def test_shadows_fall_away_from_the_sun_at_the_cloud_height():
    """The thick layer's shadow is the cloud moved by height / tan(elevation)
    towards the anti-solar azimuth: the cross-correlation of the cloud field and
    the blocked-light field peaks there (computed here from the geometry)."""
    rng = synthetic.scene_rng(5)
    geometry = synthetic.scene_geometry("x", 192, rng)
    clouds = synthetic.cloud_layers(geometry.truth.shape, geometry, rng, cover=0.1)
    if (clouds.thin > 0).any():      # keep the test about the thick layer
        clouds = synthetic.cloud_layers(geometry.truth.shape, geometry, synthetic.scene_rng(6), cover=0.1)
    assert not (clouds.thin > 0).any()
    distance_px = clouds.thick_height_m / np.tan(np.radians(geometry.sun_elevation)) / 10.0
    away = np.radians(geometry.sun_azimuth + 180.0)
    expected = np.array([-distance_px * np.cos(away), distance_px * np.sin(away)])  # rows south, cols east
    assert expected[0] < 0 and expected[1] < 0          # sun in the south-east: shadows go north-west
    spectrum = np.conj(np.fft.fft2(clouds.thick)) * np.fft.fft2(clouds.blocked)
    correlation = np.real(np.fft.ifft2(spectrum))
    peak = np.array(np.unravel_index(np.argmax(correlation), correlation.shape), float)
    shape = np.array(correlation.shape)
    offset = (peak - expected + shape / 2) % shape - shape / 2     # periodic difference
    assert np.abs(offset).max() <= 1.0, (peak, expected)


def test_shadows_darken_by_the_direct_share_only():
    """A shadow takes direct sunlight, never skylight (20 % of the irradiance on
    flat ground, less on a slope facing the sun): a shadowed pixel keeps at
    least the skylit share of its clear reflectance, and a slope the sun does
    not reach is never marked as shadow."""
    arrays = synthetic.render_scene_arrays("x", 128, (0, 2), cloudy=True)
    shadow = arrays.cloud_mask == 2
    assert shadow.mean() > 0.05
    cos_sun = arrays.truth["cos_sun"]
    assert not (shadow & (cos_sun <= 0)).any()
    irradiance = 0.2 + 0.8 * np.clip(cos_sun, 0, None) / np.sin(np.radians(arrays.geometry.sun_elevation))
    sky_share = 0.2 / np.minimum(irradiance, 3.0)
    bright = shadow & (arrays.s2.min(axis=0) > 300)            # quantisation aside
    ratio = arrays.s2_cloudy[:, bright].astype(float) / arrays.s2[:, bright]
    assert (ratio >= sky_share[bright] - 0.01).all()
    assert np.median(ratio) < 0.8
