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
