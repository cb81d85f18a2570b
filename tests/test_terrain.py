"""Terrain derivatives: exact on planes, and equal to gdaldem on a rough DEM."""
import shutil
import subprocess

import numpy as np
import pytest
import rasterio
from affine import Affine

from rsjax.data import terrain
from rsjax.data.contract import ASPECT_FLAT
from rsjax.data.geotiff import write_geotiff

# rasterio 1.4 itself multiplies Affine objects with `*`, which affine 3 flags as pending deprecation.
pytestmark = pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")


RES = 10.0


def plane(p: float, q: float, size: int = 9, res: float = RES) -> np.ndarray:
    """z = 100 + p * east + q * north on a north-up grid (row 0 is north)."""
    rows, cols = np.mgrid[0:size, 0:size].astype(np.float64)
    east = cols * res
    north = -rows * res
    return 100.0 + p * east + q * north


def textbook_hillshade(slope_deg, aspect_deg, azimuth=315.0, altitude=45.0):
    """Lambertian illumination from slope and aspect (Burrough & McDonnell), on gdaldem's Byte scale."""
    zenith = np.radians(90.0 - altitude)
    s, a = np.radians(slope_deg), np.radians(aspect_deg)
    cos_i = np.cos(zenith) * np.cos(s) + np.sin(zenith) * np.sin(s) * np.cos(np.radians(azimuth) - a)
    return np.floor(1.0 + 254.0 * np.maximum(cos_i, 0.0) + 0.5)


@pytest.mark.parametrize("p, q", [(0.1, 0.0), (0.0, -0.2), (0.3, 0.4), (-0.5, 0.25), (-1.2, -0.7), (2.0, 0.0)])
def test_tilted_plane_gives_exact_slope_aspect_and_hillshade(p, q):
    z = plane(p, q)
    slope = terrain.slope_degrees(z, RES, -RES)
    aspect = terrain.aspect_degrees(z)
    shade = terrain.hillshade(z, RES, -RES)
    expected_slope = np.degrees(np.arctan(np.hypot(p, q)))
    # The slope faces downhill: the direction of (-p, -q) in (east, north), clockwise from north.
    expected_aspect = np.degrees(np.arctan2(-p, -q)) % 360.0
    assert slope.shape == (7, 7)
    np.testing.assert_allclose(slope, expected_slope, atol=1e-4)
    circular = np.abs((aspect - expected_aspect + 180.0) % 360.0 - 180.0)
    assert circular.max() < 1e-3
    np.testing.assert_array_equal(shade, textbook_hillshade(expected_slope, expected_aspect))


def test_plane_facing_the_sun_is_brightest_and_facing_away_is_dark():
    # A 45-degree slope facing north-west (the default sun azimuth 315, altitude 45)
    # is lit head-on: cos i = 1. Facing south-east at 45 degrees it is lit at grazing 0.
    toward = plane(np.sqrt(0.5), -np.sqrt(0.5))        # rises to the south-east -> faces north-west
    away = plane(-np.sqrt(0.5), np.sqrt(0.5))
    assert np.all(terrain.hillshade(toward, RES, -RES) == 255.0)
    assert np.all(terrain.hillshade(away, RES, -RES) == 1.0)


def test_flat_cells_get_the_flat_aspect_value():
    z = np.full((6, 7), 250.0)
    assert np.all(terrain.slope_degrees(z, RES, -RES) == 0.0)
    assert np.all(terrain.aspect_degrees(z) == ASPECT_FLAT)
    # Flat: cos i = sin(altitude) -> round(1 + 254 * sin 45deg) = 181.
    assert np.all(terrain.hillshade(z, RES, -RES) == 181.0)


def test_without_compute_edges_missing_elevation_blanks_its_3x3_neighbourhood():
    z = plane(0.2, 0.1, size=10)
    z[4, 5] = np.nan
    out = terrain.terrain_channels(z, RES, -RES, compute_edges=False)
    assert out.shape == (8, 8, 4)
    missing = np.isnan(out).any(axis=-1)
    expected = np.zeros((8, 8), bool)
    expected[2:5, 3:6] = True        # output (i, j) sees input rows i..i+2, cols j..j+2
    np.testing.assert_array_equal(missing, expected)
    assert np.isnan(out[missing]).all()


def test_with_compute_edges_only_the_missing_cell_is_missing():
    z = plane(0.2, 0.1, size=10)
    z[4, 5] = np.nan
    out = terrain.terrain_channels(z, RES, -RES)
    missing = np.isnan(out).any(axis=-1)
    assert missing.sum() == 1 and missing[3, 4]
    # Neighbours of the hole use the centre value in its place: still a slope, lower than the plane's.
    assert 0 < out[3, 5, 1] < np.degrees(np.arctan(np.hypot(0.2, 0.1)))


def test_slope_scales_with_pixel_size():
    z = plane(0.3, 0.0, res=RES)
    # The same heights read as 20 m pixels are half as steep.
    np.testing.assert_allclose(terrain.slope_degrees(z, 2 * RES, -2 * RES), np.degrees(np.arctan(0.15)), atol=1e-4)


def rough_dem(height=40, width=50, seed=0) -> np.ndarray:
    """Hills, a ridge, noise and a flat plateau (to exercise the flat-aspect rule)."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[0:height, 0:width].astype(np.float64)
    z = 300.0 + 40.0 * np.sin(cols / 7.0) * np.cos(rows / 5.0) + 0.8 * cols - 0.5 * rows
    z += rng.normal(0.0, 2.0, size=z.shape)
    z[5:12, 30:42] = 350.0
    return z.astype(np.float32)


def gdaldem(mode: str, src, dst, extra=()) -> np.ndarray:
    subprocess.run(["gdaldem", mode, str(src), str(dst), "-q", *extra], check=True)
    with rasterio.open(dst) as ds:
        return ds.read(1).astype(np.float64)


needs_gdaldem = pytest.mark.skipif(
    shutil.which("gdaldem") is None,
    reason="gdaldem not installed (Debian/Ubuntu: apt-get install gdal-bin); it is the reference")


@needs_gdaldem
@pytest.mark.parametrize("with_voids", [False, True], ids=["complete", "voids_compute_edges"])
def test_slope_aspect_hillshade_agree_with_gdaldem(tmp_path, with_voids):
    z = rough_dem()
    extra = []
    if with_voids:
        # Missing cells inside: next to them gdaldem -compute_edges uses the centre value.
        z[20:23, 10:14] = -32767.0
        z[30, 40] = -32767.0
        extra = ["-compute_edges"]
    transform = Affine(30.0, 0.0, 500000.0, 0.0, -30.0, 5600000.0)
    src = write_geotiff(tmp_path / "dem.tif", z, "EPSG:32631", transform, nodata=-32767.0)
    ref_slope = gdaldem("slope", src, tmp_path / "slope.tif", extra)[1:-1, 1:-1]
    ref_aspect = gdaldem("aspect", src, tmp_path / "aspect.tif", extra)[1:-1, 1:-1]
    ref_shade = gdaldem("hillshade", src, tmp_path / "shade.tif", extra)[1:-1, 1:-1]

    z = np.where(z == -32767.0, np.nan, z)
    ours = terrain.terrain_channels(z, transform.a, transform.e, compute_edges=with_voids)
    holes = np.isnan(z[1:-1, 1:-1])
    np.testing.assert_array_equal(np.isnan(ours).all(axis=-1), holes)
    assert np.all(ref_slope[holes] == -9999.0) and np.all(ref_shade[holes] == 0)
    ours, ref_slope, ref_aspect, ref_shade = ours[~holes], ref_slope[~holes], ref_aspect[~holes], ref_shade[~holes]
    np.testing.assert_allclose(ours[..., 0], z[1:-1, 1:-1][~holes])
    np.testing.assert_allclose(ours[..., 1], ref_slope, atol=1e-4)

    flat = ref_aspect == ASPECT_FLAT
    assert flat.sum() > 10, "the plateau should give flat cells"
    np.testing.assert_array_equal(ours[..., 2] == ASPECT_FLAT, flat)
    # gdaldem sums the 3x3 window in float32 for a float32 DEM; on gentle slopes
    # that rounding moves its aspect by up to a few thousandths of a degree.
    circular = np.abs((ours[..., 2][~flat] - ref_aspect[~flat] + 180.0) % 360.0 - 180.0)
    assert circular.max() < 5e-3
    assert np.median(circular) < 1e-4

    # gdaldem divides by an SSE reciprocal square root (one Newton step), so a
    # value lying at a rounding boundary may come out one level apart.
    diff = np.abs(ours[..., 3] - ref_shade)
    assert diff.max() <= 1.0
    assert (diff == 0).mean() > 0.99


# -- the raster's edge: gdaldem -compute_edges extrapolates linearly --------------------------

def fractal_dem(size=64, seed=0, beta=3.2) -> np.ndarray:
    """Spectral synthesis: a random surface with a power-law spectrum (fractal terrain)."""
    rng = np.random.default_rng(seed)
    k = np.hypot(np.fft.fftfreq(size)[:, None], np.fft.fftfreq(size)[None, :])
    k[0, 0] = 1.0
    spectrum = (rng.normal(size=(size, size)) + 1j * rng.normal(size=(size, size))) / k ** (beta / 2)
    z = np.real(np.fft.ifft2(spectrum))
    return (200.0 + 400.0 * (z - z.min()) / (z.max() - z.min())).astype(np.float32)


def gdaldem_all(z, tmp_path, transform=Affine(10.0, 0.0, 500000.0, 0.0, -10.0, 5600000.0)):
    src = write_geotiff(tmp_path / "edge_dem.tif", z, "EPSG:32631", transform)
    return {mode: gdaldem(mode, src, tmp_path / f"edge_{mode}.tif", ["-compute_edges"])
            for mode in ("slope", "aspect", "hillshade")}


def assert_like_gdaldem(ours, ref, slope_atol=2e-4):
    np.testing.assert_allclose(ours[..., 1], ref["slope"], rtol=0, atol=slope_atol)
    steep = ref["slope"] > 1.0
    circular = np.abs((ours[..., 2] - ref["aspect"] + 180.0) % 360.0 - 180.0)
    assert circular[steep].max() < 0.01
    diff = np.abs(ours[..., 3] - ref["hillshade"])
    assert diff.max() <= 1.0 and (diff == 0).mean() > 0.99


@needs_gdaldem
def test_a_20_degree_plane_keeps_its_slope_at_the_raster_edge_like_gdaldem(tmp_path):
    """Beyond the raster's edge gdaldem extrapolates linearly: the plane's slope holds up to the border."""
    tan = np.tan(np.radians(20.0))
    z = plane(0.6 * tan, -0.8 * tan, size=24).astype(np.float32)        # 20 degrees, facing north-west
    ref = gdaldem_all(z, tmp_path)
    ours = terrain.terrain_channels(*terrain.edge_halo(z)[:1], RES, -RES, outside=terrain.edge_halo(z)[1])
    assert ours.shape == (24, 24, 4) and np.isfinite(ours).all()
    assert_like_gdaldem(ours, ref)
    # Every border pixel but the four corners (where gdaldem repeats the centre column) has the plane's slope.
    border = np.zeros((24, 24), bool)
    border[[0, -1], :] = border[:, [0, -1]] = True
    border[[0, 0, -1, -1], [0, -1, 0, -1]] = False
    np.testing.assert_allclose(ours[..., 1][border], 20.0, atol=1e-3)
    # Centre replacement (the rule for voids) would bend the edge by degrees.
    voids = terrain.terrain_channels(terrain.edge_halo(z)[0], RES, -RES)
    assert np.abs(voids[..., 1][border] - 20.0).max() > 5.0


@needs_gdaldem
def test_fractal_dem_equals_gdaldem_everywhere_including_edges_and_corners(tmp_path):
    z = fractal_dem()
    haloed, outside = terrain.edge_halo(z)
    ours = terrain.terrain_channels(haloed, RES, -RES, outside=outside)
    ref = gdaldem_all(z, tmp_path)
    assert (ref["slope"] > 1.0).mean() > 0.9
    assert_like_gdaldem(ours, ref)


@needs_gdaldem
def test_edge_and_voids_together_like_gdaldem(tmp_path):
    """A void touching the raster's edge: beyond the edge extrapolation, in the void the centre rule."""
    z = fractal_dem(seed=1)
    z[20:26, 0:5] = -32767.0                    # a void on the west edge
    z[40:43, 30:34] = -32767.0                  # and one inside
    src = write_geotiff(tmp_path / "voids.tif", z, "EPSG:32631",
                        Affine(10.0, 0.0, 500000.0, 0.0, -10.0, 5600000.0), nodata=-32767.0)
    ref = {mode: gdaldem(mode, src, tmp_path / f"v_{mode}.tif", ["-compute_edges"])
           for mode in ("slope", "aspect", "hillshade")}
    haloed, outside = terrain.edge_halo(np.where(z == -32767.0, np.nan, z))
    ours = terrain.terrain_channels(haloed, RES, -RES, outside=outside)
    holes = z == -32767.0
    assert np.isnan(ours[holes]).all() and np.isfinite(ours[~holes]).all()
    assert_like_gdaldem(np.where(holes[..., None], 0.0, ours),
                        {k: np.where(holes, 0.0, v) for k, v in ref.items()})


@needs_gdaldem
def test_registered_scene_border_follows_gdaldem_on_the_dem_file(tests_data, tmp_path):
    """A real DEM exactly on the optical grid (WorldCereal Belgium): the halo of the scene lies beyond
    the DEM file, so the scene's border pixels get what gdaldem -compute_edges gives on that file."""
    from rasterio.windows import Window

    from rsjax.data.contract import ScenePaths
    from rsjax.data.ingest import RegisteredScene

    d = tests_data / "worldcereal_belgium_2021"
    scene = ScenePaths("belgium", s2=d / "belgium_s2.tif", s1=d / "belgium_s1.tif", dem=d / "belgium_dem.tif")
    with RegisteredScene(scene) as reg:
        whole = reg.read(Window(0, 0, 100, 100))["dem"]
        corner = reg.read(Window(60, 0, 40, 40))["dem"]           # a window at the north-east corner
    ref = {mode: gdaldem(mode, scene.dem, tmp_path / f"b_{mode}.tif", ["-compute_edges"])
           for mode in ("slope", "aspect", "hillshade")}
    assert np.isfinite(whole).all()
    assert_like_gdaldem(whole, ref)
    np.testing.assert_array_equal(corner, whole[:40, 60:])
