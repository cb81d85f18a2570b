"""Writes dummy_data/: two tiny scenes in the manual-download folder convention.

    python tfds_builder/rs_multisource/write_dummy_data.py

Run once; the GeoTIFFs are committed (a few KB each, deflate-compressed).
They are real GeoTIFFs as Earth Engine exports them: band descriptions set,
S2 reflectance x 10000 as uint16 with 0 = no data, S1 in dB, the Dynamic World
label as uint8, the DEM as float32 metres. scene_b has a no-data corner in
S2 (one tile of 16 px is empty and gets dropped) and its DEM comes in
geographic coordinates (EPSG:4326, about 1 arc-second) like GLO-30 does, so
the build registers it onto the 10 m grid.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import rasterio
from rasterio.transform import from_origin

OUT = Path(__file__).resolve().parent / "dummy_data"
SIZE = 64          # pixels at 10 m: 4 x 4 tiles of 16 px
PROFILE = dict(driver="GTiff", compress="deflate", zlevel=9)


def _smooth(size: int, rng: np.random.Generator, bumps: int = 4) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    z = np.zeros((size, size))
    for _ in range(bumps):
        cy, cx = rng.uniform(0, size, 2)
        z += rng.uniform(0.5, 1.0) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * rng.uniform(6, 14) ** 2))
    return z / z.max()


def _write(path: Path, data: np.ndarray, crs: str, transform, descriptions, nodata=None) -> None:
    data = data if data.ndim == 3 else data[None]
    predictor = 3 if data.dtype.kind == "f" else 2
    with rasterio.open(path, "w", height=data.shape[1], width=data.shape[2], count=data.shape[0],
                       dtype=data.dtype, crs=crs, transform=transform, nodata=nodata,
                       predictor=predictor, **PROFILE) as dst:
        dst.write(data)
        for i, d in enumerate(descriptions, 1):
            dst.set_band_description(i, d)


def write_scene(scene_id: str, origin: tuple[float, float], seed: int, *, geographic_dem: bool,
                nodata_corner: bool) -> None:
    rng = np.random.default_rng(seed)
    crs = "EPSG:32631"
    transform = from_origin(origin[0], origin[1], 10.0, 10.0)
    veg = _smooth(SIZE, rng)
    lulc = np.digitize(veg, [0.15, 0.3, 0.45, 0.6, 0.75]).astype(np.uint8)   # labels 0..5
    lulc[:, -4:] = 6                                                        # a built-up strip
    # Reflectance x 10000: water dark, vegetation bright in NIR; quantized so it compresses.
    s2 = np.stack([400 + 600 * veg, 500 + 700 * veg, 300 + 900 * (1 - veg), 1500 + 3000 * veg])
    s2 = (np.round(s2 / 10) * 10).astype(np.uint16)
    if nodata_corner:
        s2[:, :16, :16] = 0
    vv = -15.0 + 8.0 * veg
    s1 = np.round(np.stack([vv, vv - 6.0]) * 4) / 4
    elevation = np.round(50.0 + 120.0 * _smooth(SIZE, rng, bumps=3), 1)
    _write(OUT / f"{scene_id}_s2.tif", s2, crs, transform, ["B2", "B3", "B4", "B8"], nodata=0)
    _write(OUT / f"{scene_id}_s1.tif", s1.astype(np.float32), crs, transform, ["VV", "VH"], nodata=np.nan)
    _write(OUT / f"{scene_id}_lulc.tif", lulc, crs, transform, ["label"])
    if geographic_dem:
        # The same surface resampled on a ~1 arc-second grid that covers the scene with a margin.
        from rasterio.warp import calculate_default_transform, reproject, Resampling
        margin = 40.0
        bounds = (origin[0] - margin, origin[1] - SIZE * 10 - margin, origin[0] + SIZE * 10 + margin,
                  origin[1] + margin)
        big_t = from_origin(bounds[0], bounds[3], 10.0, 10.0)
        big = np.pad(elevation, int(margin / 10), mode="edge").astype(np.float32)
        dst_t, w, h = calculate_default_transform(crs, "EPSG:4326", big.shape[1], big.shape[0], *bounds,
                                                  resolution=(1 / 3600, 1 / 3600))
        dem = np.full((h, w), -32767.0, np.float32)
        reproject(big, dem, src_transform=big_t, src_crs=crs, dst_transform=dst_t, dst_crs="EPSG:4326",
                  resampling=Resampling.bilinear, dst_nodata=-32767.0)
        _write(OUT / f"{scene_id}_dem.tif", np.round(dem, 1), "EPSG:4326", dst_t, ["DEM"], nodata=-32767.0)
    else:
        _write(OUT / f"{scene_id}_dem.tif", elevation.astype(np.float32), crs, transform, ["DEM"])


def main() -> None:
    OUT.mkdir(exist_ok=True)
    write_scene("scene_a", (600000.0, 5600000.0), seed=1, geographic_dem=False, nodata_corner=False)
    write_scene("scene_b", (612800.0, 5600640.0), seed=2, geographic_dem=True, nodata_corner=True)
    for p in sorted(OUT.glob("*.tif")):
        print(f"{p.name}: {p.stat().st_size / 1024:.1f} KB")


if __name__ == "__main__":
    main()
