"""Registration: sources in other CRSs and resolutions land on the right target pixels."""
import shutil
import subprocess

import numpy as np
import pytest
import rasterio
from affine import Affine
from hypothesis import given, settings
from hypothesis import strategies as st
from rasterio.warp import transform as transform_points
from rasterio.windows import Window

from rsjax.data.contract import ASPECT_FLAT, LULC_NODATA, ScenePaths
from rsjax.data.geotiff import write_geotiff
from rsjax.data.ingest import IngestOptions, RegisteredScene
from rsjax.data.register import resampling_scale

# rasterio 1.4 itself multiplies Affine objects with `*`, which affine 3 flags as pending deprecation.
pytestmark = pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")


# Target: the S2 grid, UTM 31N, 10 m, 64 x 64 pixels.
S2_CRS = "EPSG:32631"
S2_TRANSFORM = Affine(10.0, 0.0, 600000.0, 0.0, -10.0, 5600000.0)
SIZE = 64
FEATURE = (20, 37)        # (row, col) of the target pixel the bright S1 spot covers


def target_pixel_centres(transform=S2_TRANSFORM, size=SIZE):
    rows, cols = np.mgrid[0:size, 0:size]
    xs, ys = transform @ (cols + 0.5, rows + 0.5)
    return xs, ys


def geographic_grid(margin_px=0, deg=0.00005):
    """An EPSG:4326 grid over the target area (plus a margin) at `deg` pixels."""
    xs = [S2_TRANSFORM.c - 200, S2_TRANSFORM.c + 10 * SIZE + 200]
    ys = [S2_TRANSFORM.f - 10 * SIZE - 200, S2_TRANSFORM.f + 200]
    lons, lats = transform_points(S2_CRS, "EPSG:4326", [xs[0], xs[1], xs[0], xs[1]], [ys[0], ys[0], ys[1], ys[1]])
    west, east, south, north = min(lons), max(lons), min(lats), max(lats)
    width = int(np.ceil((east - west) / deg))
    height = int(np.ceil((north - south) / deg))
    return Affine(deg, 0.0, west, 0.0, -deg, north), width, height


def source_centres_in(crs, transform, width, height, target_crs=S2_CRS):
    """The centres of a source grid's pixels, in the target CRS."""
    rows, cols = np.mgrid[0:height, 0:width]
    x, y = transform @ (cols + 0.5, rows + 0.5)
    tx, ty = transform_points(crs, target_crs, x.ravel(), y.ravel())
    return np.asarray(tx).reshape(height, width), np.asarray(ty).reshape(height, width)


def write_s2(path, size=SIZE):
    rng = np.random.default_rng(1)
    data = rng.integers(500, 3000, size=(4, size, size), dtype=np.uint16)
    return write_geotiff(path, data, S2_CRS, S2_TRANSFORM, nodata=0, descriptions=["B2", "B3", "B4", "B8"])


def write_s1_with_spot(path):
    """Linear S1 in EPSG:4326 (~5 m), dark, except where pixel centres fall in target pixel FEATURE."""
    transform, width, height = geographic_grid()
    cx, cy = source_centres_in("EPSG:4326", transform, width, height)
    r, c = FEATURE
    left, top = S2_TRANSFORM @ (c, r)
    spot = (cx >= left) & (cx < left + 10.0) & (cy <= top) & (cy > top - 10.0)
    assert spot.sum() >= 4
    vv = np.where(spot, 1.0, 0.01).astype(np.float32)
    return write_geotiff(path, np.stack([vv, vv / 4]), "EPSG:4326", transform, nodata=np.nan,
                         descriptions=["VV", "VH"])


def write_dem_plane(path, dz_de=0.05):
    """A DEM in EPSG:4326 (1 arc-second) holding a plane that rises 5 % to the east in UTM metres."""
    arcsec = 1.0 / 3600.0
    transform, width, height = geographic_grid(deg=arcsec)
    cx, _ = source_centres_in("EPSG:4326", transform, width, height)
    z = (200.0 + dz_de * (cx - S2_TRANSFORM.c)).astype(np.float32)
    return write_geotiff(path, z, "EPSG:4326", transform, nodata=-32767.0, descriptions=["DEM"])


def write_labels(path, crs, transform, width, height, inside, background, square, covered=None):
    """Labels in their own grid: `inside` where centres fall in the UTM square, else `background`.

    `covered` (a predicate on UTM x) leaves the rest of the file as no-data (255).
    """
    cx, cy = source_centres_in(crs, transform, width, height)
    x0, y0, x1, y1 = square
    labels = np.where((cx >= x0) & (cx < x1) & (cy >= y0) & (cy < y1), inside, background).astype(np.uint8)
    if covered is not None:
        labels[~covered(cx)] = LULC_NODATA
    return write_geotiff(path, labels, crs, transform, nodata=LULC_NODATA, descriptions=["label"])


def utm32_grid(res=20.0):
    """EPSG:32632 (the next UTM zone) grid over the target area at `res` metres."""
    xs, ys = target_pixel_centres()
    tx, ty = transform_points(S2_CRS, "EPSG:32632", [xs.min() - 300, xs.max() + 300], [ys.min() - 300, ys.max() + 300])
    west, east = min(tx) - 200, max(tx) + 200
    south, north = min(ty) - 200, max(ty) + 200
    width = int(np.ceil((east - west) / res))
    height = int(np.ceil((north - south) / res))
    return Affine(res, 0.0, west, 0.0, -res, north), width, height


# A 150 m square of class 6 (built) in UTM 31N metres: target pixels cols 10..24, rows 40..54.
SQUARE = (S2_TRANSFORM.c + 100.0, S2_TRANSFORM.f - 550.0, S2_TRANSFORM.c + 250.0, S2_TRANSFORM.f - 400.0)


@pytest.fixture(scope="module")
def multi_crs_scene(tmp_path_factory):
    d = tmp_path_factory.mktemp("multicrs")
    t32, w32, h32 = utm32_grid()
    return ScenePaths(
        scene_id="multicrs",
        s2=write_s2(d / "s2.tif"),
        s1=write_s1_with_spot(d / "s1.tif"),
        dem=write_dem_plane(d / "dem.tif"),
        lulc=write_labels(d / "lulc.tif", "EPSG:32632", t32, w32, h32, 6, 1, SQUARE),
    )


def test_s1_spot_in_4326_lands_on_its_target_pixel(multi_crs_scene):
    with RegisteredScene(multi_crs_scene) as reg:
        arrays = reg.read(Window(0, 0, SIZE, SIZE))
    vv = arrays["s1"][..., 0]
    assert np.unravel_index(np.nanargmax(vv), vv.shape) == FEATURE
    assert vv[FEATURE] > -3.0                      # 1.0 linear is 0 dB; bilinear blurs it a little
    assert np.nanmedian(vv) == pytest.approx(-20.0, abs=0.01)   # 0.01 linear


def test_labels_from_another_utm_zone_at_20m_land_on_the_square(multi_crs_scene):
    with RegisteredScene(multi_crs_scene) as reg:
        lulc = reg.read(Window(0, 0, SIZE, SIZE))["lulc"]
    xs, ys = target_pixel_centres()
    x0, y0, x1, y1 = SQUARE
    # Nearest neighbour from 20 m pixels: pixels whose centre lies a source
    # pixel (20 m) or more inside / outside the square are certain.
    deep_inside = (xs > x0 + 20) & (xs < x1 - 20) & (ys > y0 + 20) & (ys < y1 - 20)
    far_outside = (xs < x0 - 20) | (xs > x1 + 20) | (ys < y0 - 20) | (ys > y1 + 20)
    assert deep_inside.sum() > 50
    assert np.all(lulc[deep_inside] == 6)
    assert np.all(lulc[far_outside] == 1)
    assert set(np.unique(lulc)) <= {1, 6}


def test_dem_plane_in_geographic_coordinates_gives_metric_slope_after_registration(multi_crs_scene):
    with RegisteredScene(multi_crs_scene) as reg:
        dem = reg.read(Window(8, 8, 48, 48))["dem"]
    elevation, slope, aspect = dem[..., 0], dem[..., 1], dem[..., 2]
    xs, _ = target_pixel_centres()
    np.testing.assert_allclose(elevation, 200.0 + 0.05 * (xs[8:56, 8:56] - S2_TRANSFORM.c), atol=0.05)
    # Rising to the east by 5 %: slope atan(0.05) = 2.862 deg, facing west (270).
    np.testing.assert_allclose(slope, np.degrees(np.arctan(0.05)), atol=0.02)
    np.testing.assert_allclose(aspect, 270.0, atol=0.5)


def test_configured_target_crs_and_resolution(multi_crs_scene):
    opts = IngestOptions(target_crs="EPSG:32632", target_resolution=20.0)
    with RegisteredScene(multi_crs_scene, opts) as reg:
        assert reg.crs.to_epsg() == 32632
        assert (reg.transform.a, reg.transform.e) == (20.0, -20.0)
        assert reg.transform.c % 20.0 == 0 and reg.transform.f % 20.0 == 0   # aligned origin
        arrays = reg.read(Window(0, 0, reg.width, reg.height))
    # Nearest from the labels' own 20 m grid (same CRS, another origin): pixels
    # whose centre lies well inside the square keep its class.
    rows, cols = np.mgrid[0:reg.height, 0:reg.width]
    cx, cy = reg.transform @ (cols + 0.5, rows + 0.5)
    ux, uy = transform_points("EPSG:32632", S2_CRS, cx.ravel(), cy.ravel())
    ux, uy = np.reshape(ux, cx.shape), np.reshape(uy, cy.shape)
    x0, y0, x1, y1 = SQUARE
    deep_inside = (ux > x0 + 25) & (ux < x1 - 25) & (uy > y0 + 25) & (uy < y1 - 25)
    assert deep_inside.sum() >= 9
    assert np.all(arrays["lulc"][deep_inside] == 6)
    # The S1 spot is found at the 20 m pixel that holds the spot's centre.
    r, c = FEATURE
    sx, sy = S2_TRANSFORM @ (c + 0.5, r + 0.5)
    (px,), (py,) = transform_points(S2_CRS, "EPSG:32632", [sx], [sy])
    col, row = ~reg.transform @ (px, py)
    vv = arrays["s1"][..., 0]
    peak = np.unravel_index(np.nanargmax(vv), vv.shape)
    assert abs(peak[0] - int(row)) <= 1 and abs(peak[1] - int(col)) <= 1
    # Terrain is still computed on metres: the same 5 % plane, in a rotated zone.
    slope = arrays["dem"][..., 1]
    assert np.nanmedian(slope) == pytest.approx(np.degrees(np.arctan(0.05)), abs=0.05)


def test_partial_coverage_becomes_nodata_not_class_zero(tmp_path):
    """Land cover of class 0 (water) covering only the west half: the east half is 255, never 0."""
    half = S2_TRANSFORM.c + 10 * SIZE / 2
    lulc = write_labels(tmp_path / "lulc.tif", S2_CRS, S2_TRANSFORM, SIZE // 2, SIZE, 0, 0, SQUARE)
    transform, width, height = geographic_grid()
    cx, _ = source_centres_in("EPSG:4326", transform, width, height)
    vv = np.where(cx < half, 0.05, np.nan).astype(np.float32)    # S1 with no-data over the east half
    s1 = write_geotiff(tmp_path / "s1.tif", np.stack([vv, vv]), "EPSG:4326", transform, nodata=np.nan,
                       descriptions=["VV", "VH"])
    # The DEM covers only rows 0..39 of the target.
    dem = write_geotiff(tmp_path / "dem.tif", np.full((40, SIZE), 120.0, np.float32), S2_CRS, S2_TRANSFORM,
                        nodata=-32767.0)
    scene = ScenePaths("partial", s2=write_s2(tmp_path / "s2.tif"), s1=s1, dem=dem, lulc=lulc)
    with RegisteredScene(scene) as reg:
        a = reg.read(Window(0, 0, SIZE, SIZE))
        mask = reg.nodata_mask(a)
    assert np.all(a["lulc"][:, :32] == 0)
    assert np.all(a["lulc"][:, 32:] == LULC_NODATA)
    assert np.all(np.isnan(a["s1"][:, 34:]))          # beyond the bilinear kernel of the edge
    assert np.all(np.isfinite(a["s1"][:, :30]))
    assert np.all(np.isnan(a["dem"][40:]))
    # Row 39 lacks its southern neighbours: like gdaldem -compute_edges it still gets derivatives.
    assert np.all(np.isfinite(a["dem"][:40]))
    assert np.all(a["dem"][:40, :, 2] == ASPECT_FLAT)
    assert mask[:, 32:].all() and mask[40:].all()
    assert not mask[1:39, 1:30].any()


def test_windows_agree_with_a_larger_read(multi_crs_scene, tmp_path):
    """A tile read on its own equals the same pixels of a larger read: halos and DEM fill are window-independent."""
    # Punch a small void into the DEM so the fill takes part.
    import rasterio
    with rasterio.open(multi_crs_scene.dem) as ds:
        z, profile = ds.read(1), ds.profile
    z[60:63, 70:72] = -32767.0
    with rasterio.open(tmp_path / "dem.tif", "w", **profile) as dst:
        dst.write(z, 1)
    scene = ScenePaths("w", s2=multi_crs_scene.s2, s1=multi_crs_scene.s1, dem=tmp_path / "dem.tif",
                       lulc=multi_crs_scene.lulc)
    with RegisteredScene(scene) as reg:
        big = reg.read(Window(0, 0, SIZE, SIZE))
        for col, row in [(0, 0), (16, 24), (40, 40), (5, 33)]:
            small = reg.read(Window(col, row, 24, 24))
            crop = {k: v[row:row + 24, col:col + 24] for k, v in big.items()}
            for key in ("s2", "s1", "lulc"):
                np.testing.assert_array_equal(small[key], crop[key], err_msg=f"{key} at {(row, col)}")
            # The DEM is warped with the exact transformer from each window's own source
            # window: values differ only by floating-point rounding (about 1e-5 m), and a
            # hillshade on a rounding boundary may move by 1.
            for channel, atol in enumerate((1e-3, 1e-3, 1e-2, 1.0)):
                np.testing.assert_allclose(small["dem"][..., channel], crop["dem"][..., channel], atol=atol,
                                           err_msg=f"dem channel {channel} at {(row, col)}")
            np.testing.assert_array_equal(np.isnan(small["dem"]), np.isnan(crop["dem"]))


# -- exactness: values do not depend on the read window, and equal gdalwarp -et 0 ---------------
#
# An Earth Engine-like scene: the optical grid in UTM 31N at 10 m (288 x 288 px), the DEM at
# 1 arc-second in EPSG:4326 like Earth Engine's COP-DEM, S1 at about 10 m in EPSG:4326, labels at
# 20 m; and the same sources in the next UTM zone (EPSG:32632). GDAL's default approximate
# transformer made values depend on the window they were read through (up to metres of elevation).

EXACT_SIZE = 288
EXACT_T = Affine(10.0, 0.0, 600000.0, 0.0, -10.0, 5600000.0)
WINDOW_SIZES = (16, 64, 256)

needs_gdal = pytest.mark.skipif(
    shutil.which("gdalwarp") is None or shutil.which("gdaldem") is None,
    reason="gdalwarp/gdaldem not installed (Debian/Ubuntu: apt-get install gdal-bin); they are the reference")


def fractal_surface(x, y, seed=0):
    """A rough but smooth terrain sampled at arbitrary metric coordinates: a sum of random waves."""
    rng = np.random.default_rng(seed)
    z = np.zeros_like(x, dtype=np.float64)
    for k in range(24):
        wavelength = 2500.0 / 1.35 ** k                        # 2.5 km down to ~2 pixels of 1"
        theta = rng.uniform(0, np.pi)
        phase = rng.uniform(0, 2 * np.pi)
        z += 0.09 * wavelength * np.sin(2 * np.pi * (x * np.cos(theta) + y * np.sin(theta)) / wavelength + phase)
    return 400.0 + z


def source_grid(crs, res, margin=400.0):
    """A north-up grid in `crs` at `res` (its units) over the target area plus a margin (metres)."""
    x0, y1 = EXACT_T.c - margin, EXACT_T.f + margin
    x1, y0 = EXACT_T.c + 10 * EXACT_SIZE + margin, EXACT_T.f - 10 * EXACT_SIZE - margin
    xs = np.array([x0, x1, x0, x1, (x0 + x1) / 2, (x0 + x1) / 2, x0, x1])
    ys = np.array([y0, y0, y1, y1, y0, y1, (y0 + y1) / 2, (y0 + y1) / 2])
    tx, ty = transform_points(S2_CRS, crs, xs, ys)
    west, east, south, north = min(tx), max(tx), min(ty), max(ty)
    return Affine(res, 0.0, west, 0.0, -res, north), int(np.ceil((east - west) / res)), int(np.ceil((north - south) / res))


def write_exact_scene(d, crs):
    """S2 on the target grid; DEM, S1 and labels in `crs` (EPSG:4326 or EPSG:32632)."""
    geographic = crs == "EPSG:4326"
    rng = np.random.default_rng(3)
    s2 = rng.integers(300, 4000, size=(4, EXACT_SIZE, EXACT_SIZE), dtype=np.uint16)
    paths = {"s2": write_geotiff(d / "s2.tif", s2, S2_CRS, EXACT_T, nodata=0, descriptions=["B2", "B3", "B4", "B8"])}
    # DEM: 1" (about 30 m) or 30 m; heights follow the UTM 31N coordinates of each pixel centre.
    t, w, h = source_grid(crs, 1 / 3600 if geographic else 30.0)
    cx, cy = source_centres_in(crs, t, w, h)
    paths["dem"] = write_geotiff(d / "dem.tif", fractal_surface(cx, cy).astype(np.float32), crs, t,
                                 nodata=-32767.0, descriptions=["DEM"])
    # S1: linear power finer than the grid east-west (about 8 m), with detail at every scale.
    t, w, h = source_grid(crs, 0.00011 if geographic else 7.5)
    cx, cy = source_centres_in(crs, t, w, h)
    vv = (0.02 + 0.015 * np.sin(cx / 37.0) * np.cos(cy / 23.0) + 0.01 * rng.random(cx.shape)).astype(np.float32)
    paths["s1"] = write_geotiff(d / "s1.tif", np.stack([vv, vv / 5]), crs, t, nodata=np.nan,
                                descriptions=["VV", "VH"])
    # Labels: 20 m (or 0.0002 deg) cells, blobs of the nine classes.
    t, w, h = source_grid(crs, 0.0002 if geographic else 20.0)
    cx, cy = source_centres_in(crs, t, w, h)
    labels = ((np.floor(cx / 130.0) * 7 + np.floor(cy / 90.0) * 3) % 9).astype(np.uint8)
    paths["lulc"] = write_geotiff(d / "lulc.tif", labels, crs, t, nodata=LULC_NODATA, descriptions=["label"])
    return ScenePaths("exact", **paths)


@pytest.fixture(scope="module", params=["EPSG:4326", "EPSG:32632"], ids=["geographic", "utm32"])
def exact_scene(request, tmp_path_factory):
    return write_exact_scene(tmp_path_factory.mktemp("exact"), request.param)


def window_reads(reg):
    """(window, arrays) for the whole grid and for windows of 16, 64 and 256 px at a few places."""
    yield Window(0, 0, EXACT_SIZE, EXACT_SIZE), reg.read(Window(0, 0, EXACT_SIZE, EXACT_SIZE))
    for size in WINDOW_SIZES:
        for col, row in [(0, 0), (EXACT_SIZE - size, EXACT_SIZE - size), (13, 29)]:
            if col + size <= EXACT_SIZE and row + size <= EXACT_SIZE:
                window = Window(col, row, size, size)
                yield window, reg.read(window)


def crop(array, window):
    r, c, h, w = int(window.row_off), int(window.col_off), int(window.height), int(window.width)
    return array[r:r + h, c:c + w]


def test_registered_values_do_not_depend_on_the_read_window(exact_scene):
    with RegisteredScene(exact_scene) as reg:
        reads = list(window_reads(reg))
    (_, whole), windows = reads[0], reads[1:]
    assert np.isfinite(whole["dem"]).all() and np.isfinite(whole["s1"]).all()
    for window, arrays in windows:
        where = f"window {window}"
        np.testing.assert_array_equal(arrays["lulc"], crop(whole["lulc"], window), err_msg=where)
        np.testing.assert_array_equal(arrays["s2"], crop(whole["s2"], window), err_msg=where)
        np.testing.assert_allclose(arrays["s1"], crop(whole["s1"], window), rtol=0, atol=1e-3, err_msg=where)
        np.testing.assert_allclose(arrays["dem"][..., 0], crop(whole["dem"], window)[..., 0], rtol=0, atol=1e-3,
                                   err_msg=where)
        np.testing.assert_allclose(arrays["dem"][..., 1], crop(whole["dem"], window)[..., 1], rtol=0, atol=0.01,
                                   err_msg=where)


@pytest.fixture(scope="module")
def registered_whole(exact_scene):
    """The exact scene registered and open, with its whole grid read once."""
    with RegisteredScene(exact_scene) as reg:
        yield reg, reg.read(Window(0, 0, EXACT_SIZE, EXACT_SIZE))


@settings(max_examples=25)
@given(data=st.data())
def test_any_window_reads_the_pixels_of_the_whole_grid(registered_whole, data):
    """Property (hypothesis): a window of any position, width and height (1 px to the
    whole grid, at the grid's edges too) reads what the whole grid holds there."""
    reg, whole = registered_whole
    row, col = data.draw(st.integers(0, EXACT_SIZE - 1)), data.draw(st.integers(0, EXACT_SIZE - 1))
    window = Window(col, row, data.draw(st.integers(1, EXACT_SIZE - col)),
                    data.draw(st.integers(1, EXACT_SIZE - row)))
    arrays = reg.read(window)
    where = f"window {window}"
    np.testing.assert_array_equal(arrays["lulc"], crop(whole["lulc"], window), err_msg=where)
    np.testing.assert_array_equal(arrays["s2"], crop(whole["s2"], window), err_msg=where)
    np.testing.assert_allclose(arrays["s1"], crop(whole["s1"], window), rtol=0, atol=1e-3, err_msg=where)
    for band, atol in ((0, 1e-3), (1, 0.01)):                    # elevation (m), slope (deg)
        np.testing.assert_allclose(arrays["dem"][..., band], crop(whole["dem"], window)[..., band],
                                   rtol=0, atol=atol, err_msg=where)


def gdalwarp(src, dst, grid_transform, width, height, resampling, extra=()):
    """`gdalwarp -et 0` (GDAL's exact transformer) onto a UTM 31N grid: the reference."""
    left, top = grid_transform.c, grid_transform.f
    right, bottom = left + grid_transform.a * width, top + grid_transform.e * height
    subprocess.run(["gdalwarp", "-q", "-overwrite", "-et", "0", "-r", resampling, "-t_srs", S2_CRS,
                    "-te", repr(left), repr(bottom), repr(right), repr(top), "-tr", "10", "10", *extra,
                    str(src), str(dst)], check=True)
    with rasterio.open(dst) as ds:
        assert (ds.width, ds.height) == (width, height)
        return ds.read()


def gdaldem_terrain(src, tmp_path):
    """Slope, aspect and hillshade by gdaldem -compute_edges."""
    out = {}
    for mode in ("slope", "aspect", "hillshade"):
        dst = tmp_path / f"{mode}.tif"
        subprocess.run(["gdaldem", mode, str(src), str(dst), "-q", "-compute_edges"], check=True)
        with rasterio.open(dst) as ds:
            out[mode] = ds.read(1).astype(np.float64)
    return out


@needs_gdal
def test_registration_equals_gdalwarp_exact_and_terrain_equals_gdaldem_in_every_window(exact_scene, tmp_path):
    """Every window's DEM, terrain, S1 and labels against gdalwarp -et 0 (+ gdaldem on the exact DEM)."""
    # The DEM is warped onto the grid plus its one-pixel halo, as a read gets it, so gdaldem's
    # edge rule only touches the halo, which is cut off.
    halo_t = EXACT_T * Affine.translation(-1, -1)
    ref_dem_path = tmp_path / "dem_utm.tif"
    ref_dem = gdalwarp(exact_scene.dem, ref_dem_path, halo_t, EXACT_SIZE + 2, EXACT_SIZE + 2, "bilinear",
                       ["-ot", "Float32"])[0]
    ref = {k: v[1:-1, 1:-1] for k, v in gdaldem_terrain(ref_dem_path, tmp_path).items()}
    ref["elevation"] = ref_dem[1:-1, 1:-1].astype(np.float64)
    # S1 is finer than the grid east-west: GDAL widens the bilinear kernel by the ratio of pixel
    # sizes, which it derives per warped chunk unless told. rsjax fixes it for the grid (XSCALE,
    # YSCALE); the reference is warped with the same ratios.
    with RegisteredScene(exact_scene) as reg, rasterio.open(exact_scene.s1) as s1:
        xscale, yscale = resampling_scale(s1, reg.grid)
        assert xscale < 1.0                                  # really downsampled east-west
        t, _ = transform_points(S2_CRS, s1.crs, [EXACT_T.c + 1440.0, EXACT_T.c + 1450.0],
                                   [EXACT_T.f - 1440.0] * 2)
        assert xscale == pytest.approx(s1.transform.a / abs(t[1] - t[0]), rel=0.01)   # source px / 10 m
    ref_s1 = gdalwarp(exact_scene.s1, tmp_path / "s1_utm.tif", EXACT_T, EXACT_SIZE, EXACT_SIZE, "bilinear",
                      ["-srcnodata", "nan", "-dstnodata", "nan", "-wo", f"XSCALE={xscale!r}",
                       "-wo", f"YSCALE={yscale!r}"])
    ref_s1_db = np.moveaxis(10.0 * np.log10(ref_s1.astype(np.float64)), 0, -1)
    ref_lulc = gdalwarp(exact_scene.lulc, tmp_path / "lulc_utm.tif", EXACT_T, EXACT_SIZE, EXACT_SIZE, "near")[0]
    assert np.isfinite(ref["elevation"]).all() and (ref["slope"] > 1.0).mean() > 0.9

    with RegisteredScene(exact_scene) as reg:
        for window, arrays in window_reads(reg):
            where = f"window {window}"
            dem = arrays["dem"].astype(np.float64)
            np.testing.assert_allclose(dem[..., 0], crop(ref["elevation"], window), rtol=0, atol=1e-3, err_msg=where)
            np.testing.assert_allclose(dem[..., 1], crop(ref["slope"], window), rtol=0, atol=0.01, err_msg=where)
            steep = crop(ref["slope"], window) > 1.0
            aspect_diff = np.abs((dem[..., 2] - crop(ref["aspect"], window) + 180.0) % 360.0 - 180.0)
            assert aspect_diff[steep].max() < 0.1, where
            assert np.abs(dem[..., 3] - crop(ref["hillshade"], window)).max() <= 1.0, where
            np.testing.assert_allclose(arrays["s1"], crop(ref_s1_db, window), rtol=0, atol=1e-3, err_msg=where)
            np.testing.assert_array_equal(arrays["lulc"], crop(ref_lulc, window), err_msg=where)


def test_the_exact_transformer_reaches_gdal(exact_scene):
    """The warped VRT that reads a source has no approximating transformer left (gdalwarp -et 0)."""
    with RegisteredScene(exact_scene) as reg:
        description = reg._s1.vrt.tags(ns="xml:VRT")["xml:VRT"]
    assert "GenImgProjTransformer" in description
    assert "ApproxTransformer" not in description and "MaxError" not in description
