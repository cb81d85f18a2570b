"""Writing GeoTIFFs: small arrays in one call, large rasters window by window.

Used by tests, benchmarks and the scene writers; the files are tiled and
deflate-compressed like real products.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import rasterio
from affine import Affine
from rasterio.windows import Window


def _profile(count: int, height: int, width: int, dtype, crs, transform: Affine,
             nodata: float | None, block: int) -> dict:
    tiled = width >= block and height >= block
    profile = dict(driver="GTiff", count=count, height=height, width=width, dtype=np.dtype(dtype).name,
                   crs=crs, transform=transform, nodata=nodata, compress="deflate")
    if tiled:
        profile.update(tiled=True, blockxsize=block, blockysize=block)
    return profile


def write_geotiff(path: str | Path, array: np.ndarray, crs, transform: Affine,
                  nodata: float | None = None, descriptions: Sequence[str] | None = None,
                  dtype=None) -> Path:
    """Writes a (bands, H, W) or (H, W) array; `crs` None writes a file without CRS."""
    array = np.asarray(array)
    if array.ndim == 2:
        array = array[None]
    dtype = np.dtype(dtype or array.dtype)
    count, height, width = array.shape
    path = Path(path)
    with rasterio.open(path, "w", **_profile(count, height, width, dtype, crs, transform, nodata, 256)) as dst:
        dst.write(array.astype(dtype))
        if descriptions:
            for i, name in enumerate(descriptions, start=1):
                dst.set_band_description(i, name)
    return path


def write_geotiff_by_windows(path: str | Path, count: int, height: int, width: int, dtype, crs,
                             transform: Affine, make_window: Callable[[Window], np.ndarray],
                             nodata: float | None = None, descriptions: Sequence[str] | None = None,
                             block: int = 512) -> Path:
    """Writes a large raster one row of blocks at a time: memory stays one block row.

    `make_window(window)` returns the (count, h, w) values of that window.
    """
    path = Path(path)
    with rasterio.open(path, "w", **_profile(count, height, width, dtype, crs, transform, nodata, block)) as dst:
        for row in range(0, height, block):
            window = Window(0, row, width, min(block, height - row))
            dst.write(np.asarray(make_window(window)).astype(dtype), window=window)
        if descriptions:
            for i, name in enumerate(descriptions, start=1):
                dst.set_band_description(i, name)
    return path
