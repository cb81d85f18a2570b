"""Synthetic multi-source scenes: the embedded default dataset of rsjax.

`write_scenes` writes, per scene, `<id>_s2.tif`, `<id>_s1.tif`, `<id>_lulc.tif`
and `<id>_dem.tif` (and a cloudy S2 twin with its mask), shaped like the real
products, from one physical scene model: terrain, land cover, within-class
variation, optics lit by the overpass sun, SAR by the local incidence angle,
clouds and their shadows. Every value follows from the seed. docs/synthetic.md
describes the files and the model; `rsjax scenes` is the command.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import rasterio
from rasterio.crs import CRS
from rasterio.enums import Resampling
from rasterio.transform import Affine
from rasterio.warp import reproject, transform as warp_transform, transform_bounds

from rsjax.data.contract import CLOUD as CLOUD_CODE, CLOUD_CLEAR, CLOUD_MASK_UNKNOWN, CLOUD_SHADOW
from rsjax.data.contract import (ASPECT_FLAT, LULC_CLASSES, LULC_NODATA, S1_BANDS, S2_BANDS,
                                 S2_NODATA, ScenePaths)
from rsjax.errors import UserError

Seed = Union[int, Sequence[int]]

PIXEL_M = 10.0                 # S2, S1, land cover and truth grids
ARCSEC = 1.0 / 3600.0          # DEM pixel in degrees
DEM_VOID = -32767.0            # Copernicus DEM's void value
DEM_MARGIN_DEG = 0.002         # DEM covers the S2 footprint plus ~150-220 m
SAR_LOOKS = 4.4                # equivalent number of looks of S1 IW GRD high resolution
SAR_NESZ_DB = -26.0            # thermal noise floor
SAR_DB_FLOOR = -50.0           # floor for --sar_db so that zero power is not -inf
SENSOR_AZIMUTH_DEG = 100.0     # S1 descending pass: the sensor sits to the east
SKY_FRACTION = 0.2             # diffuse skylight share of irradiance
BLOCK = 256                    # GeoTIFF tile size

(WATER, TREES, GRASS, FLOODED, CROPS, SHRUB, BUILT, BARE, SNOW) = range(len(LULC_CLASSES))

# Surface reflectance (B2, B3, B4, B8) of each class at vegetation density /
# moisture d = 0 and d = 1; a pixel interpolates linearly. Magnitudes follow
# typical L2A values of these covers.
SPECTRA_SPARSE = np.array([
    [0.045, 0.040, 0.025, 0.012],   # water: clear
    [0.040, 0.060, 0.050, 0.220],   # trees: open canopy
    [0.060, 0.090, 0.100, 0.240],   # grass: dry
    [0.040, 0.060, 0.050, 0.140],   # flooded vegetation
    [0.080, 0.110, 0.140, 0.200],   # crops: bare soil / stubble
    [0.070, 0.100, 0.120, 0.220],   # shrub and scrub
    [0.140, 0.150, 0.160, 0.190],   # built: roofs and pavement
    [0.140, 0.180, 0.220, 0.280],   # bare rock, dry
    [0.920, 0.900, 0.880, 0.800],   # snow: dry, fine grained
])
SPECTRA_DENSE = np.array([
    [0.060, 0.070, 0.050, 0.030],   # water: turbid
    [0.020, 0.045, 0.025, 0.360],   # trees: dense canopy
    [0.030, 0.080, 0.040, 0.400],   # grass: lush
    [0.030, 0.060, 0.035, 0.260],
    [0.025, 0.070, 0.030, 0.480],   # crops: full canopy
    [0.040, 0.070, 0.060, 0.300],
    [0.090, 0.110, 0.100, 0.250],   # built: with gardens
    [0.100, 0.130, 0.160, 0.220],   # bare rock, moist
    [0.800, 0.780, 0.760, 0.620],   # snow: wet, coarse
])
# sigma0 in dB (VV, VH) at the reference incidence, d = 0 and d = 1.
SIGMA0_SPARSE_DB = np.array([
    [-24.0, -30.0],   # water: calm
    [-9.5, -16.0],    # trees
    [-13.0, -21.0],   # grass
    [-8.0, -19.0],    # flooded vegetation
    [-15.0, -24.0],   # crops: bare field
    [-12.0, -19.0],   # shrub
    [4.0, -4.0],      # built: dense buildings, double bounce
    [-14.0, -24.0],   # bare, dry
    [-13.0, -22.0],   # snow, dry
])
SIGMA0_DENSE_DB = np.array([
    [-16.0, -25.0],   # water: wind-roughened
    [-7.0, -12.0],
    [-9.0, -16.0],
    [-3.0, -14.0],    # flooded vegetation: strong double bounce
    [-9.0, -14.0],    # crops: full canopy, volume scattering
    [-9.0, -15.0],
    [-2.0, -10.0],    # built with gardens
    [-10.0, -19.0],   # bare, moist
    [-18.0, -26.0],   # snow, wet: absorbs
])


# ----------------------------------------------------------------------------- geometry

@dataclasses.dataclass(frozen=True)
class Grid:
    """A raster grid: CRS, north-up affine transform and (height, width)."""

    crs: CRS
    transform: Affine
    shape: tuple[int, int]

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        t, (h, w) = self.transform, self.shape
        return (t.c, t.f + t.e * h, t.c + t.a * w, t.f)   # left, bottom, right, top


@dataclasses.dataclass(frozen=True)
class SceneGeometry:
    """Where a scene is, the grids of its products, and the sun and radar geometry."""

    scene_id: str
    lon: float
    lat: float
    s2: Grid
    s1: Grid
    dem: Grid
    truth: Grid
    s2_offset: tuple[int, int]          # (row, col) of the S2 grid's origin in the truth grid
    sun_azimuth: float                  # degrees clockwise from north
    sun_elevation: float
    sar_incidence: float                # reference incidence angle, degrees


def scene_geometry(scene_id: str, size: int, rng: np.random.Generator) -> SceneGeometry:
    """Places a scene in a random UTM zone of the northern mid-latitudes and builds its grids."""
    zone = int(rng.integers(29, 38))                     # Europe: 9W .. 42E
    lon = -180.0 + 6.0 * (zone - 1) + 3.0 + float(rng.uniform(-2.0, 2.0))
    lat = float(rng.uniform(36.0, 58.0))
    crs = CRS.from_epsg(32600 + zone)
    (x,), (y,) = warp_transform(CRS.from_epsg(4326), crs, [lon], [lat])
    half = size * PIXEL_M / 2
    x0 = np.floor((x - half) / PIXEL_M) * PIXEL_M
    y0 = np.ceil((y + half) / PIXEL_M) * PIXEL_M
    s2 = Grid(crs, Affine(PIXEL_M, 0, x0, 0, -PIXEL_M, y0), (size, size))

    # S1: same zone and pixel size, origin shifted by a whole pixel plus a random
    # fraction (never pixel-aligned), a few pixels larger so that it covers S2.
    dx = -PIXEL_M * (1 + float(rng.uniform(0.2, 0.8)))
    dy = PIXEL_M * (1 + float(rng.uniform(0.2, 0.8)))
    s1 = Grid(crs, Affine(PIXEL_M, 0, x0 + dx, 0, -PIXEL_M, y0 + dy),
              (size + 3 + int(rng.integers(0, 3)), size + 3 + int(rng.integers(0, 3))))

    # DEM: 1 arc-second pixels on whole arc-seconds, footprint plus a margin.
    west, south, east, north = transform_bounds(crs, CRS.from_epsg(4326), *s2.bounds, densify_pts=21)
    west = np.floor((west - DEM_MARGIN_DEG) / ARCSEC) * ARCSEC
    north = np.ceil((north + DEM_MARGIN_DEG) / ARCSEC) * ARCSEC
    width = int(np.ceil((east + DEM_MARGIN_DEG - west) / ARCSEC))
    height = int(np.ceil((north - (south - DEM_MARGIN_DEG)) / ARCSEC))
    dem = Grid(CRS.from_epsg(4326), Affine(ARCSEC, 0, west, 0, -ARCSEC, north), (height, width))

    # Truth: the S2 grid extended to cover every product, plus 2 pixels.
    left, bottom, right, top = s2.bounds
    for b in (s1.bounds, transform_bounds(dem.crs, crs, *dem.bounds, densify_pts=21)):
        left, bottom, right, top = min(left, b[0]), min(bottom, b[1]), max(right, b[2]), max(top, b[3])
    pad_left = int(np.ceil((x0 - left) / PIXEL_M)) + 2
    pad_top = int(np.ceil((top - y0) / PIXEL_M)) + 2
    pad_right = int(np.ceil((right - (x0 + size * PIXEL_M)) / PIXEL_M)) + 2
    pad_bottom = int(np.ceil(((y0 - size * PIXEL_M) - bottom) / PIXEL_M)) + 2
    truth = Grid(crs, Affine(PIXEL_M, 0, x0 - pad_left * PIXEL_M, 0, -PIXEL_M, y0 + pad_top * PIXEL_M),
                 (size + pad_top + pad_bottom, size + pad_left + pad_right))
    return SceneGeometry(
        scene_id=scene_id, lon=lon, lat=lat, s2=s2, s1=s1, dem=dem, truth=truth,
        s2_offset=(pad_top, pad_left),
        sun_azimuth=float(rng.uniform(140.0, 165.0)), sun_elevation=float(rng.uniform(30.0, 60.0)),
        sar_incidence=float(rng.uniform(31.0, 44.0)))


# ----------------------------------------------------------------------------- fields

def _frequencies(shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Cycles per pixel of a real 2-D FFT of `shape` (rows, then rfft columns)."""
    return np.fft.fftfreq(shape[0])[:, None], np.fft.rfftfreq(shape[1])[None, :]


def fractal_noise(shape: tuple[int, int], beta: float, rng: np.random.Generator,
                  min_wavelength_px: float = 2.0) -> np.ndarray:
    """Zero-mean, unit-std Gaussian field with power spectrum ~ f^-beta (spectral synthesis).

    Periodic on `shape`; wavelengths below `min_wavelength_px` are removed.
    """
    fy, fx = _frequencies(shape)
    f = np.hypot(fy, fx)
    f[0, 0] = 1.0
    amplitude = f ** (-beta / 2)
    amplitude[0, 0] = 0.0
    amplitude[f > 1.0 / min_wavelength_px] = 0.0
    spectrum = np.fft.rfft2(rng.standard_normal(shape)) * amplitude
    field = np.fft.irfft2(spectrum, s=shape)
    return (field - field.mean()) / (field.std() + 1e-12)


def gaussian_smooth(field: np.ndarray, sigma_px: float) -> np.ndarray:
    """Gaussian blur by FFT (periodic edges, like the fields it is used on)."""
    fy, fx = _frequencies(field.shape)
    kernel = np.exp(-2.0 * np.pi ** 2 * sigma_px ** 2 * (fy ** 2 + fx ** 2))
    return np.fft.irfft2(np.fft.rfft2(field) * kernel, s=field.shape)


def horn_slope_aspect(elevation: np.ndarray, pixel_m: float) -> tuple[np.ndarray, np.ndarray]:
    """Slope (degrees) and aspect (degrees clockwise from north, the downslope
    direction; ASPECT_FLAT where the slope is 0) by Horn's 3x3 method, edges replicated."""
    z = np.pad(elevation.astype(np.float64), 1, mode="edge")
    a, b, c = z[:-2, :-2], z[:-2, 1:-1], z[:-2, 2:]
    d, f = z[1:-1, :-2], z[1:-1, 2:]
    g, h, i = z[2:, :-2], z[2:, 1:-1], z[2:, 2:]
    dz_east = ((c + 2 * f + i) - (a + 2 * d + g)) / (8 * pixel_m)
    dz_north = ((a + 2 * b + c) - (g + 2 * h + i)) / (8 * pixel_m)   # rows run south
    slope = np.degrees(np.arctan(np.hypot(dz_east, dz_north)))
    aspect = np.degrees(np.arctan2(-dz_east, -dz_north)) % 360.0
    aspect = np.where((dz_east == 0) & (dz_north == 0), ASPECT_FLAT, aspect)
    return slope, aspect


def cos_incidence(slope_deg: np.ndarray, aspect_deg: np.ndarray, azimuth_deg: float,
                  elevation_deg: float) -> np.ndarray:
    """Cosine of the angle between the surface normal and a direction (a sun or a
    sensor) at `azimuth_deg` and `elevation_deg` above the horizon."""
    zenith = np.radians(90.0 - elevation_deg)
    s = np.radians(slope_deg)
    aspect = np.where(aspect_deg == ASPECT_FLAT, 0.0, np.radians(aspect_deg))
    return (np.cos(zenith) * np.cos(s)
            + np.sin(zenith) * np.sin(s) * np.cos(np.radians(azimuth_deg) - aspect))


def hillshade(slope_deg: np.ndarray, aspect_deg: np.ndarray, azimuth_deg: float = 315.0,
              altitude_deg: float = 45.0) -> np.ndarray:
    """gdaldem's hillshade: 1 + 254 cos i, 1 where the cell faces away from the light."""
    return 1.0 + 254.0 * np.clip(cos_incidence(slope_deg, aspect_deg, azimuth_deg, altitude_deg), 0, 1)


def _rescale(field: np.ndarray, low_q: float = 1.0, high_q: float = 99.0) -> np.ndarray:
    lo, hi = np.percentile(field, [low_q, high_q])
    return np.clip((field - lo) / (hi - lo + 1e-12), 0.0, 1.0)


def synth_terrain(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Elevation in metres: fractal relief, flat lowlands (power curve), per-scene base and relief."""
    z = _rescale(fractal_noise(shape, beta=4.4, rng=rng), 0.5, 99.5)
    base = float(rng.uniform(50.0, 600.0))
    relief = float(rng.uniform(250.0, 1000.0))
    return base + relief * z ** 2.0


def _parcels(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Rectangular field ids: strips of 12-35 px, each cut into fields 12-60 px long."""
    h, w = shape
    ids = np.empty(shape, np.int64)
    top, next_id = 0, 0
    while top < h:
        bottom = min(h, top + int(rng.integers(12, 36)))
        cuts = np.cumsum(rng.integers(12, 61, size=w // 12 + 2))
        ids[top:bottom] = next_id + np.searchsorted(cuts, np.arange(w), side="right")[None, :]
        next_id += len(cuts) + 1
        top = bottom
    return ids


def _per_parcel_mean(values: np.ndarray, ids: np.ndarray) -> np.ndarray:
    sums = np.bincount(ids.ravel(), weights=values.ravel())
    counts = np.bincount(ids.ravel())
    return (sums / np.maximum(counts, 1))[ids]


@dataclasses.dataclass
class TruthFields:
    """The true state of a scene on its 10 m truth grid."""

    elevation: np.ndarray      # metres (lakes flat at their level)
    slope: np.ndarray          # degrees
    aspect: np.ndarray         # degrees, ASPECT_FLAT on flat cells
    labels: np.ndarray         # uint8 Dynamic World label
    density: np.ndarray        # vegetation density / moisture in [0, 1]
    parcels: np.ndarray        # crop field ids
    blocks: np.ndarray         # 50 m city block ids (built orientation)


def synth_truth(shape: tuple[int, int], rng: np.random.Generator) -> TruthFields:
    """Terrain, land cover and the density field on the truth grid (see the module docstring)."""
    elevation = synth_terrain(shape, rng)
    noise = [fractal_noise(shape, beta=3.2, rng=rng) for _ in range(5)]
    lo, hi = elevation.min(), elevation.max()
    relief = hi - lo

    # Lakes fill the lowest basins to a flat level.
    water_level = np.quantile(elevation, float(rng.uniform(0.03, 0.08)))
    water = elevation <= water_level
    elevation = np.where(water, water_level, elevation)
    slope, aspect = horn_slope_aspect(elevation, PIXEL_M)

    # Land cover follows the landform, not 10 m slope noise: rules use a smoothed slope.
    steep = gaussian_smooth(slope, 2.0)
    lowness = (elevation - lo) / relief                           # 0 at the lakes, 1 at the peaks
    # Wetness: below the ~300 m neighbourhood mean and flat.
    hollow = gaussian_smooth(elevation, 30.0) - elevation
    wetness = hollow / (hollow.std() + 1e-6) - steep / 6.0 + 0.6 * noise[0]

    labels = np.full(shape, GRASS, np.uint8)
    shrub = (lowness > 0.25) & (wetness + 0.8 * noise[1] < -0.3)
    labels[shrub] = SHRUB
    trees = ((steep > 9.0 + 4.0 * noise[2]) | (noise[2] > 1.1) | (wetness > 1.6)) & (lowness < 0.8)
    labels[trees] = TREES

    parcels = _parcels(shape, rng)
    parcel_slope = _per_parcel_mean(steep, parcels)
    parcel_low = _per_parcel_mean(lowness, parcels)
    farmed = rng.random(parcels.max() + 1)[parcels] < 0.8
    crops = farmed & (parcel_slope < 8.0) & (parcel_low < 0.55)
    labels[crops] = CROPS

    snow_line = lo + relief * float(rng.uniform(0.8, 1.1))
    bare = (steep > 32.0 + 5.0 * noise[3]) | (elevation > snow_line - 0.08 * relief + 0.02 * relief * noise[3])
    labels[bare] = BARE

    # Built clusters around a few centres on flat lowland, cut into blocks with green gaps.
    rows, cols = np.ogrid[:shape[0], :shape[1]]          # broadcast, not two full grids
    built = np.zeros(shape, bool)
    candidates = np.flatnonzero((steep.ravel() < 4.0) & (lowness.ravel() < 0.35) & ~water.ravel())
    for _ in range(int(rng.integers(1, 4))):
        if candidates.size == 0:
            break
        centre = np.unravel_index(rng.choice(candidates), shape)
        radius_px = float(rng.uniform(12.0, 40.0))
        distance = np.hypot(rows - centre[0], cols - centre[1]) / radius_px
        built |= (distance < 1.0 + 0.35 * noise[4]) & (steep < 12.0)
    blocks = (rows // 5) * (shape[1] // 5 + 1) + cols // 5
    green_gap = rng.random(blocks.max() + 1)[blocks] < 0.12
    labels[built & ~green_gap] = BUILT

    snow = (elevation > snow_line + 0.02 * relief * noise[3]) & (steep < 50.0)
    labels[snow] = SNOW
    flooded = ~water & (elevation < water_level + 4.0 * (1.0 + 0.5 * noise[1])) & (steep < 6.0)
    labels[flooded] = FLOODED
    labels[water] = WATER

    # Density / moisture: smooth and independent of the class; crops by parcel.
    density = 1.0 / (1.0 + np.exp(-2.5 * fractal_noise(shape, beta=3.0, rng=rng)))
    growth = rng.random(parcels.max() + 1)[parcels]
    density = np.where(labels == CROPS, 0.85 * growth + 0.15 * density, density)
    return TruthFields(elevation=elevation, slope=slope, aspect=aspect, labels=labels,
                       density=density, parcels=parcels, blocks=blocks)


def surface_reflectance(truth: TruthFields, geometry: SceneGeometry,
                        rng: np.random.Generator) -> np.ndarray:
    """(4, H, W) at-surface reflectance as the sensor sees it, on the truth grid."""
    cos_i = cos_incidence(truth.slope, truth.aspect, geometry.sun_azimuth, geometry.sun_elevation)
    cos_z = np.sin(np.radians(geometry.sun_elevation))
    illumination = SKY_FRACTION + (1 - SKY_FRACTION) * np.clip(cos_i, 0.0, None) / cos_z
    texture = np.exp(0.04 * rng.standard_normal(truth.labels.shape))
    light = np.minimum(illumination, 3.0) * texture
    blurred = np.empty((len(S2_BANDS),) + truth.labels.shape)
    for b in range(len(S2_BANDS)):          # band by band: no (4, H, W) temporaries
        sparse, dense = SPECTRA_SPARSE[truth.labels, b], SPECTRA_DENSE[truth.labels, b]
        blurred[b] = gaussian_smooth((sparse + truth.density * (dense - sparse)) * light, 0.5)
    return blurred + 0.002 * rng.standard_normal(blurred.shape)


def sar_sigma0(truth: TruthFields, geometry: SceneGeometry, rng: np.random.Generator) -> np.ndarray:
    """(2, H, W) noise-free sigma0 (linear power, VV and VH) on the truth grid."""
    d = truth.density[None]
    sparse = SIGMA0_SPARSE_DB[truth.labels].transpose(2, 0, 1)
    dense = SIGMA0_DENSE_DB[truth.labels].transpose(2, 0, 1)
    sigma_db = sparse + d * (dense - sparse)
    # Double bounce of a built block depends on its street orientation to the sensor.
    orientation = rng.uniform(-3.0, 3.0, truth.blocks.max() + 1)[truth.blocks]
    sigma_db = sigma_db + np.where(truth.labels == BUILT, orientation, 0.0)[None]
    cos_loc = cos_incidence(truth.slope, truth.aspect, SENSOR_AZIMUTH_DEG, 90.0 - geometry.sar_incidence)
    terrain = (np.clip(cos_loc, 0.0, None) / np.cos(np.radians(geometry.sar_incidence))) ** 2
    terrain = np.where(truth.labels == WATER, 1.0, terrain)     # lakes are flat
    return 10.0 ** (sigma_db / 10.0) * terrain[None]


def speckle(sigma0: np.ndarray, rng: np.random.Generator, looks: float = SAR_LOOKS) -> np.ndarray:
    """Adds the thermal noise floor and multiplicative gamma speckle (mean 1, `looks` looks)."""
    power = sigma0 + 10.0 ** (SAR_NESZ_DB / 10.0)
    return power * rng.gamma(looks, 1.0 / looks, size=power.shape)


# Per-scene cloud regime (see the module docstring, item 6): the scene's cloud
# cover target is drawn from this mixture, (weight, low, high) of uniform parts.
CLOUD_COVER_MIXTURE = ((0.20, 0.0, 0.1), (0.65, 0.1, 0.9), (0.15, 0.9, 1.0))
THICK_CLOUD_HEIGHT_M = (800.0, 3000.0)     # cumulus / stratocumulus tops
THIN_CLOUD_HEIGHT_M = (7000.0, 11000.0)    # cirrus
CIRRUS_PROBABILITY = 0.4
CLOUD_DETAIL_WEIGHT = 0.6    # cells against weather systems in the thick-cloud field
CIRRUS_FORWARD_SCATTER = 0.5      # share of the light cirrus removes from the direct beam that still reaches the ground
# Spectral shape of cloud-top reflectance (B2, B3, B4, B8): thick water clouds
# are nearly white; thin cirrus with the haze above it is bluer.
THICK_CLOUD_SPECTRUM = np.array([1.00, 0.99, 0.98, 0.96])
THIN_CLOUD_SPECTRUM = np.array([1.06, 1.02, 1.00, 0.94])
# Opacity and shadow below this are left out, so that the mask's "clear" is
# exactly clear (the cloudy image equals the clear one there).
CLOUD_VISIBLE = 0.05
SHADOW_VISIBLE = 0.02
CLEAR, CLOUD, SHADOW = CLOUD_CLEAR, CLOUD_CODE, CLOUD_SHADOW      # cloud mask codes (the contract's)


@dataclasses.dataclass
class CloudLayers:
    """One scene's clouds on the truth grid (all fields in [0, 1]).

    thick: opacity of the cumulus layer (1 - exp(-optical thickness));
    thin: opacity of the cirrus layer (0 where the scene has none);
    blocked: fraction of the direct sunlight the two layers, seen from the
    ground along the sun direction, take away (what makes the shadows);
    thick_reflectance: cloud-top reflectance of the thick layer (textured);
    thin_reflectance: the cirrus layer's reflectance (a scalar);
    cover: the scene's drawn cloud-cover target; the heights (m) of both layers.
    """

    thick: np.ndarray
    thin: np.ndarray
    blocked: np.ndarray
    thick_reflectance: np.ndarray
    thin_reflectance: float
    cover: float
    thick_height_m: float
    thin_height_m: float

    def crop(self, window) -> "CloudLayers":
        """The layers on a window (a tuple of slices) of their grid."""
        return dataclasses.replace(self, thick=self.thick[window], thin=self.thin[window],
                                   blocked=self.blocked[window],
                                   thick_reflectance=self.thick_reflectance[window])

    @property
    def opacity(self) -> np.ndarray:
        """Opacity of both layers together."""
        return 1.0 - (1.0 - self.thick) * (1.0 - self.thin)


def draw_cloud_cover(rng: np.random.Generator) -> float:
    """A scene's cloud-cover target from CLOUD_COVER_MIXTURE."""
    weights = np.array([w for w, _, _ in CLOUD_COVER_MIXTURE])
    _, low, high = CLOUD_COVER_MIXTURE[int(rng.choice(len(weights), p=weights / weights.sum()))]
    return float(rng.uniform(low, high))


def anisotropic_noise(shape: tuple[int, int], beta: float, angle_deg: float, stretch: float,
                      rng: np.random.Generator) -> np.ndarray:
    """Like fractal_noise, but `stretch` times longer along `angle_deg` (clockwise
    from north): the streaks of cirrus drawn out by the wind aloft."""
    fy, fx = _frequencies(shape)
    a = np.radians(angle_deg)
    along = fx * np.sin(a) - fy * np.cos(a)          # rows run south
    across = fx * np.cos(a) + fy * np.sin(a)
    f = np.hypot(along * stretch, across)
    f[0, 0] = 1.0
    amplitude = f ** (-beta / 2)
    amplitude[0, 0] = 0.0
    amplitude[np.hypot(fy, fx) > 0.5] = 0.0
    field = np.fft.irfft2(np.fft.rfft2(rng.standard_normal(shape)) * amplitude, s=shape)
    return (field - field.mean()) / (field.std() + 1e-12)


def shadow_shift(height_m: float, geometry: SceneGeometry) -> tuple[int, int]:
    """(rows, cols) from a cloud to its shadow: height / tan(sun elevation) away from the sun."""
    reach = height_m / np.tan(np.radians(geometry.sun_elevation)) / PIXEL_M
    away = np.radians(geometry.sun_azimuth + 180.0)
    return int(round(-reach * np.cos(away))), int(round(reach * np.sin(away)))   # rows run south


def cloud_layers(truth_shape: tuple[int, int], geometry: SceneGeometry, rng: np.random.Generator,
                 cover: Optional[float] = None) -> CloudLayers:
    """Draws a scene's clouds on the truth grid (`cover` fixes the cover target).

    Every field is periodic on the truth grid, so a shadow shifted by np.roll is
    the shadow of the same (periodic) cloud field, however far it falls.
    """
    cover = draw_cloud_cover(rng) if cover is None else float(cover)
    # Thick clouds: cells (fractal detail) inside weather systems (a smooth
    # regional field), so one part of a scene can be overcast and another clear.
    detail = fractal_noise(truth_shape, beta=3.0, rng=rng)
    regional = fractal_noise(truth_shape, beta=6.0, rng=rng)
    field = CLOUD_DETAIL_WEIGHT * detail + (1.0 - CLOUD_DETAIL_WEIGHT) * regional
    threshold = np.quantile(field, 1.0 - cover) if cover > 0 else np.inf
    gain = float(rng.uniform(3.0, 9.0))              # how fast optical thickness grows inwards
    thick = 1.0 - np.exp(-gain * np.clip(field - threshold, 0.0, None))
    thick = np.where(thick < CLOUD_VISIBLE, 0.0, thick)
    brightness = float(rng.uniform(0.45, 0.8))
    texture = fractal_noise(truth_shape, beta=2.5, rng=rng)
    thick_reflectance = np.clip(brightness * (1.0 + 0.12 * texture), 0.2, 0.95)

    # Thin clouds: in half of the scenes a cirrus layer of streaks along the wind.
    thin = np.zeros(truth_shape)
    thin_reflectance = float(rng.uniform(0.25, 0.4))
    if rng.random() < CIRRUS_PROBABILITY:
        streaks = anisotropic_noise(truth_shape, 3.0, float(rng.uniform(0.0, 180.0)),
                                    float(rng.uniform(3.0, 6.0)), rng)
        level = np.quantile(streaks, 1.0 - float(rng.uniform(0.1, 0.6)))
        thin = float(rng.uniform(0.1, 0.45)) * np.clip((streaks - level) / 0.7, 0.0, 1.0)
        thin = np.where(thin < CLOUD_VISIBLE, 0.0, thin)

    thick_height = float(rng.uniform(*THICK_CLOUD_HEIGHT_M))
    thin_height = float(rng.uniform(*THIN_CLOUD_HEIGHT_M))
    transmitted = ((1.0 - np.roll(thick, shadow_shift(thick_height, geometry), axis=(0, 1)))
                   * (1.0 - (1.0 - CIRRUS_FORWARD_SCATTER)
                      * np.roll(thin, shadow_shift(thin_height, geometry), axis=(0, 1))))
    blocked = np.where(1.0 - transmitted < CLOUD_VISIBLE, 0.0, 1.0 - transmitted)
    return CloudLayers(thick=thick, thin=thin, blocked=blocked, thick_reflectance=thick_reflectance,
                       thin_reflectance=thin_reflectance, cover=cover, thick_height_m=thick_height,
                       thin_height_m=thin_height)


def direct_share(cos_sun: np.ndarray, sun_elevation: float) -> np.ndarray:
    """Share of a pixel's irradiance that comes straight from the sun (the rest is
    skylight), as surface_reflectance lights the scene."""
    illumination = SKY_FRACTION + (1 - SKY_FRACTION) * np.clip(cos_sun, 0.0, None) / np.sin(
        np.radians(sun_elevation))
    light = np.minimum(illumination, 3.0)
    return (light - SKY_FRACTION) / light


def shadow_darkening(clouds: CloudLayers, cos_sun: np.ndarray, sun_elevation: float) -> np.ndarray:
    """Fraction of a pixel's reflectance its cloud shadow takes away: the blocked
    share of the direct sunlight (skylight stays, so a slope the sun does not
    reach is not darkened). Below SHADOW_VISIBLE it is left out (clear stays clear)."""
    darkening = direct_share(cos_sun, sun_elevation) * clouds.blocked
    return np.where(darkening < SHADOW_VISIBLE, 0.0, darkening)


def render_clouds(reflectance: np.ndarray, clouds: CloudLayers, cos_sun: np.ndarray,
                  sun_elevation: float) -> np.ndarray:
    """(4, H, W) top-of-cloud reflectance of a clear scene under `clouds` (on its grid).

    The shadows darken the surface first, then the cirrus layer and the thick
    layer are laid over it, each blending its own reflectance with what it
    transmits.
    """
    shaded = reflectance * (1.0 - shadow_darkening(clouds, cos_sun, sun_elevation))[None]
    thin_top = clouds.thin_reflectance * THIN_CLOUD_SPECTRUM[:, None, None]
    through_thin = shaded * (1.0 - clouds.thin)[None] + thin_top * clouds.thin[None]
    thick_top = clouds.thick_reflectance[None] * THICK_CLOUD_SPECTRUM[:, None, None]
    return through_thin * (1.0 - clouds.thick)[None] + thick_top * clouds.thick[None]


def cloud_mask_codes(clouds: CloudLayers, cos_sun: np.ndarray, sun_elevation: float) -> np.ndarray:
    """uint8 mask: 1 cloud (either layer visible), 2 shadow (a visibly darkened
    surface outside the clouds), 0 clear (the cloudy image equals the clear one)."""
    shadow = shadow_darkening(clouds, cos_sun, sun_elevation) > 0
    return np.where(clouds.opacity > 0, CLOUD, np.where(shadow, SHADOW, CLEAR)).astype(np.uint8)


# ----------------------------------------------------------------------------- products

@dataclasses.dataclass
class SceneArrays:
    """One scene's products as written (each on its own grid) and its truth on the S2 grid."""

    geometry: SceneGeometry
    s2: np.ndarray                 # (4, H, W) uint16, S2 grid
    s1: np.ndarray                 # (2, h1, w1) float32 linear sigma0, S1 grid
    lulc: np.ndarray               # (H, W) uint8, S2 grid
    dem: np.ndarray                # (hd, wd) float32 metres, DEM grid, DEM_VOID in voids
    truth: dict                    # fields on the S2 grid (see render_scene_arrays)
    s2_cloudy: Optional[np.ndarray] = None   # (4, H, W) uint16
    cloud_mask: Optional[np.ndarray] = None  # (H, W) uint8: 0 clear, 1 cloud, 2 shadow
    clouds: Optional["CloudLayers"] = None   # the cloud layers on the S2 grid


def _to_uint16_reflectance(reflectance: np.ndarray) -> np.ndarray:
    # 1 is the smallest valid value: 0 is S2's nodata.
    return np.clip(np.round(reflectance * 10000.0), 1, 65535).astype(np.uint16)


def _resample(bands: np.ndarray, src: Grid, dst: Grid, resampling: Resampling,
              dst_nodata: float = np.nan) -> np.ndarray:
    out = np.full((bands.shape[0],) + dst.shape, dst_nodata, np.float32)
    reproject(bands.astype(np.float32), out, src_transform=src.transform, src_crs=src.crs,
              dst_transform=dst.transform, dst_crs=dst.crs, resampling=resampling,
              src_nodata=np.nan, dst_nodata=dst_nodata)
    return out


def _punch_voids(dem: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A few small round voids (2-5 of radius 1.5-4 px), as radar-shadow voids of real DEMs."""
    rows, cols = np.ogrid[:dem.shape[0], :dem.shape[1]]
    out = dem.copy()
    for _ in range(int(rng.integers(2, 6))):
        r, c = rng.integers(0, dem.shape[0]), rng.integers(0, dem.shape[1])
        out[np.hypot(rows - r, cols - c) <= rng.uniform(1.5, 4.0)] = DEM_VOID
    return out


def scene_rng(seed: Seed) -> np.random.Generator:
    return np.random.default_rng(list(np.atleast_1d(seed).astype(np.int64)))


MIN_SIZE = 16


def check_size(size: int) -> None:
    if size < MIN_SIZE:
        raise UserError(f"scene size {size} px is too small: use at least {MIN_SIZE} pixels.")


def render_scene_arrays(scene_id: str, size: int, seed: Seed, *, cloudy: bool = False,
                        cloud_cover: Optional[float] = None) -> SceneArrays:
    """Computes every product of one scene in memory (nothing is written).

    `truth` holds, on the S2 grid: elevation, slope, aspect (ASPECT_FLAT on flat
    cells), hillshade (315/45), labels, density, reflectance (4, H, W, before
    quantisation), sigma0 (2, H, W, linear, noise free) and cos_sun (cos of the
    solar incidence on the terrain). With `cloudy`, `clouds` holds the cloud
    layers on the S2 grid; `cloud_cover` fixes the scene's cover target
    instead of drawing it. The clouds are drawn last, so the clear products do
    not depend on `cloudy`.
    """
    check_size(size)
    rng = scene_rng(seed)
    geometry = scene_geometry(scene_id, size, rng)
    truth = synth_truth(geometry.truth.shape, rng)
    reflectance = surface_reflectance(truth, geometry, rng)
    sigma0 = sar_sigma0(truth, geometry, rng)

    r0, c0 = geometry.s2_offset
    on_s2 = (slice(r0, r0 + size), slice(c0, c0 + size))
    s2 = _to_uint16_reflectance(reflectance[(slice(None),) + on_s2])
    s1 = speckle(_resample(sigma0, geometry.truth, geometry.s1, Resampling.bilinear), rng)
    dem = _resample(truth.elevation[None], geometry.truth, geometry.dem, Resampling.average,
                    dst_nodata=DEM_VOID)[0]
    dem = _punch_voids(dem, rng)

    arrays = SceneArrays(
        geometry=geometry, s2=s2, s1=s1.astype(np.float32), lulc=truth.labels[on_s2].copy(),
        dem=dem.astype(np.float32),
        truth=dict(elevation=truth.elevation[on_s2], slope=truth.slope[on_s2],
                   aspect=truth.aspect[on_s2],
                   hillshade=hillshade(truth.slope[on_s2], truth.aspect[on_s2]),
                   labels=truth.labels[on_s2], density=truth.density[on_s2],
                   reflectance=reflectance[(slice(None),) + on_s2],
                   sigma0=sigma0[(slice(None),) + on_s2],
                   cos_sun=cos_incidence(truth.slope[on_s2], truth.aspect[on_s2],
                                         geometry.sun_azimuth, geometry.sun_elevation)))
    if cloudy:
        clouds = cloud_layers(geometry.truth.shape, geometry, rng, cover=cloud_cover)
        on_grid = clouds.crop(on_s2)
        cos_sun = arrays.truth["cos_sun"]
        arrays.s2_cloudy = _to_uint16_reflectance(
            render_clouds(arrays.truth["reflectance"], on_grid, cos_sun, geometry.sun_elevation))
        arrays.cloud_mask = cloud_mask_codes(on_grid, cos_sun, geometry.sun_elevation)
        arrays.clouds = on_grid
    return arrays


def scene_tiles(arrays: SceneArrays, tile_size: int = 256, seed: Seed = 0):
    """Data-contract tile dicts straight from a scene's truth on the S2 grid.

    For tests and for measuring the couplings without the GeoTIFF round trip:
    s1 gets its own speckle on the S2 grid (dB), dem holds the truth elevation
    with its Horn slope/aspect and the 315/45 hillshade. The ingestion path
    (rsjax.data.ingest) gives the same contract from the written files.
    """
    rng = scene_rng(seed)
    t = arrays.truth
    s1_db = 10.0 * np.log10(speckle(t["sigma0"], rng)).transpose(1, 2, 0).astype(np.float32)
    dem = np.stack([t["elevation"], t["slope"], t["aspect"], t["hillshade"]], -1).astype(np.float32)
    s2 = arrays.s2.transpose(1, 2, 0)
    size = s2.shape[0]
    g = arrays.geometry.s2
    for r in range(0, size - tile_size + 1, tile_size):
        for c in range(0, size - tile_size + 1, tile_size):
            window = (slice(r, r + tile_size), slice(c, c + tile_size))
            yield dict(
                s2=s2[window], s1=s1_db[window], lulc=arrays.lulc[window], dem=dem[window],
                scene_id=arrays.geometry.scene_id, tile_id=f"{arrays.geometry.scene_id}_r{r}_c{c}",
                crs=g.crs.to_string(), transform=np.array(g.transform @ Affine.translation(c, r))[:6])


# ----------------------------------------------------------------------------- writing

def _write_geotiff(path: Path, bands: np.ndarray, grid: Grid, nodata, descriptions: Sequence[str],
                   tags: Optional[dict] = None) -> None:
    height, width = grid.shape
    integer = np.issubdtype(bands.dtype, np.integer)
    profile = dict(driver="GTiff", height=height, width=width, count=bands.shape[0],
                   dtype=bands.dtype, crs=grid.crs, transform=grid.transform, nodata=nodata,
                   tiled=True, blockxsize=BLOCK, blockysize=BLOCK, compress="deflate",
                   predictor=2 if integer else 3, interleave="band")
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(bands)
        for i, name in enumerate(descriptions, start=1):
            dst.set_band_description(i, name)
        if tags:
            dst.update_tags(**tags)


def scene_id_for(seed: int, index: int) -> str:
    return f"synth_s{seed}_{index:03d}"


def write_scene(out_dir: str | Path, scene_id: str, size: int, seed: Seed, *,
                sar_db: bool = False, cloudy: bool = False) -> ScenePaths:
    """Writes one scene's GeoTIFFs into `out_dir` and returns their paths.

    Everything is computed in memory first: peak memory is about 230 bytes per
    S2 pixel (0.94 GB at 2048 x 2048, ~0.1 GB at 512), so very large scenes
    (8192 px: ~15 GB) are better built by other means.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    arrays = render_scene_arrays(scene_id, size, seed, cloudy=cloudy)
    g = arrays.geometry
    common = {"SOURCE": "rsjax.data.synthetic", "SCENE_ID": scene_id,
              "SEED": " ".join(str(s) for s in np.atleast_1d(seed))}
    paths = ScenePaths(scene_id=scene_id, s2=out_dir / f"{scene_id}_s2.tif",
                       s1=out_dir / f"{scene_id}_s1.tif", dem=out_dir / f"{scene_id}_dem.tif",
                       lulc=out_dir / f"{scene_id}_lulc.tif",
                       s2_cloudy=out_dir / f"{scene_id}_s2_cloudy.tif" if cloudy else None,
                       cloud_mask=out_dir / f"{scene_id}_cloudmask.tif" if cloudy else None)
    s2_tags = dict(common, UNITS="surface reflectance x 10000", SUN_AZIMUTH=f"{g.sun_azimuth:.2f}",
                   SUN_ELEVATION=f"{g.sun_elevation:.2f}")
    _write_geotiff(paths.s2, arrays.s2, g.s2, S2_NODATA, S2_BANDS, s2_tags)
    if sar_db:
        s1 = (10.0 * np.log10(np.maximum(arrays.s1, 10.0 ** (SAR_DB_FLOOR / 10.0)))).astype(np.float32)
        units = "dB"
    else:
        s1, units = arrays.s1, "linear power"
    _write_geotiff(paths.s1, s1, g.s1, np.nan, S1_BANDS,     # NaN: the contract's S1 no-data
                   dict(common, UNITS=units, INCIDENCE_ANGLE=f"{g.sar_incidence:.2f}",
                        SENSOR_AZIMUTH=f"{SENSOR_AZIMUTH_DEG:.1f}"))
    _write_geotiff(paths.lulc, arrays.lulc[None], g.s2, LULC_NODATA, ("label",),
                   dict(common, CLASSES=",".join(LULC_CLASSES)))
    _write_geotiff(paths.dem, arrays.dem[None], g.dem, DEM_VOID, ("DEM",), dict(common, UNITS="metre"))
    if cloudy:
        _write_geotiff(paths.s2_cloudy, arrays.s2_cloudy, g.s2, S2_NODATA, S2_BANDS, s2_tags)
        _write_geotiff(paths.cloud_mask, arrays.cloud_mask[None], g.s2, CLOUD_MASK_UNKNOWN,
                       ("cloud_mask",), dict(common, CODES="0 clear, 1 cloud, 2 cloud shadow"))
    return paths


def write_scenes(out_dir: str | Path, num_scenes: int = 4, size: int = 512, seed: int = 0, *,
                 sar_db: bool = False, cloudy: bool = False) -> list[ScenePaths]:
    """Writes `num_scenes` scenes `synth_s{seed}_{k:03d}`; scene k is drawn from seed (seed, k)."""
    if num_scenes < 1:
        raise UserError(f"num_scenes must be at least 1, got {num_scenes}.")
    check_size(size)                    # before the folder is created
    return [write_scene(out_dir, scene_id_for(seed, k), size, (seed, k), sar_db=sar_db, cloudy=cloudy)
            for k in range(num_scenes)]
