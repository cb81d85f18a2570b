"""rsjax.predict's output files: Cloud Optimized GeoTIFFs with overviews, with the user's permissions.

The writer is tested on its own (no model): the layout is checked in the
TIFF's own structure with tifffile, following GDAL's COG validation
(validate_cloud_optimized_geotiff.py): tiled, overviews present and halving,
every IFD before any image data, the smallest overview's data first and the
full resolution's last.
"""
import contextlib
import os
import stat

import numpy as np
import pytest
import rasterio
import tifffile
from affine import Affine
from rasterio.crs import CRS

from rsjax import predict
from rsjax.data.contract import LULC_NODATA, S2_NODATA
from rsjax.data.register import TargetGrid

pytestmark = pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")

WIDTH, HEIGHT = 700, 600          # more than two 256 px blocks: two overview levels (350, 175)


def grid(width=WIDTH, height=HEIGHT) -> TargetGrid:
    return TargetGrid(CRS.from_epsg(32631), Affine(10.0, 0.0, 600000.0, 0.0, -10.0, 5600000.0), width, height)


def cog_layout_problems(path) -> list[str]:
    """What keeps `path` from being a valid COG, by GDAL's validation rules (empty: valid)."""
    problems = []
    with tifffile.TiffFile(path) as tif:
        pages = list(tif.pages)
        main, overviews = pages[0], pages[1:]
        if not main.is_tiled:
            problems.append("the full-resolution image is not tiled")
        if main.is_reduced:
            problems.append("the first IFD is not the full-resolution image")
        if not overviews:
            problems.append("no overviews")
        sizes = [(p.imagewidth, p.imagelength) for p in pages]
        for before, page, after in zip(pages, overviews, sizes[1:]):
            if not page.is_reduced or not page.is_tiled:
                problems.append(f"IFD at {page.offset} is not a tiled reduced-resolution image")
            if not (after[0] < before.imagewidth and after[1] < before.imagelength):
                problems.append(f"overview {after} is not smaller than the image before it")
        ifd_offsets = [p.offset for p in pages]
        first_data = min(min(o for o in p.dataoffsets if o) for p in pages)
        if ifd_offsets != sorted(ifd_offsets) or max(ifd_offsets) > first_data:
            problems.append("the IFDs are not all before the image data")
        # Smallest overview first, full resolution last; tiles of each image in row-major order.
        data = [[o for o in p.dataoffsets if o] for p in pages]
        for smaller, larger in zip(data[:0:-1], data[-2::-1]):
            if max(smaller) > min(larger):
                problems.append("the data of a smaller overview is not before that of a larger image")
        for i, offsets in enumerate(data):
            if offsets != sorted(offsets):
                problems.append(f"the tiles of IFD {i} are not in row-major order")
    with rasterio.open(path) as ds:
        if ds.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") != "COG":
            problems.append("GDAL does not read it as LAYOUT=COG")
    return problems


def write_output(path, data, profile, **extras):
    with predict.cog_output(path, profile) as dst:
        dst.write(data)
        if "descriptions" in extras:
            for i, name in enumerate(extras["descriptions"], start=1):
                dst.set_band_description(i, name)
        if "colormap" in extras:
            dst.write_colormap(1, extras["colormap"])
        dst.update_tags(RSJAX_MODE="test")


@contextlib.contextmanager
def umask(mask):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def test_reflectance_output_is_a_cog_with_averaged_overviews(tmp_path):
    rng = np.random.default_rng(0)
    data = rng.integers(1, 9000, size=(4, HEIGHT, WIDTH)).astype(np.uint16)
    data[:, :40, :60] = S2_NODATA
    out = tmp_path / "synthetic_s2.tif"
    write_output(out, data, predict.output_profile(grid(), 4, "uint16", S2_NODATA),
                 descriptions=("B2", "B3", "B4", "B8"))
    assert cog_layout_problems(out) == []
    with rasterio.open(out) as ds:
        assert ds.overviews(1) == [2, 4]
        assert ds.block_shapes[0] == (256, 256) and ds.nodata == S2_NODATA
        assert ds.descriptions == ("B2", "B3", "B4", "B8") and ds.tags()["RSJAX_MODE"] == "test"
        np.testing.assert_array_equal(ds.read(), data)
    with rasterio.open(out, overview_level=0) as half:
        overview = half.read().astype(np.float64)
    blocks = data.astype(np.float64).reshape(4, HEIGHT // 2, 2, WIDTH // 2, 2).mean(axis=(2, 4))
    inside = np.ones(overview.shape[1:], bool)
    inside[:20, :30] = False                                     # no-data blocks stay no-data
    assert np.abs(overview[:, inside] - blocks[:, inside]).max() <= 1.0      # the mean of each 2 x 2
    assert np.all(overview[:, :20, :30] == S2_NODATA)


def test_label_output_overviews_take_the_most_frequent_label(tmp_path):
    # Every 2 x 2 block holds three of one label and one of another: mode and mean disagree.
    rng = np.random.default_rng(1)
    major = rng.integers(0, 4, size=(HEIGHT // 2, WIDTH // 2)).astype(np.uint8)
    labels = np.repeat(np.repeat(major, 2, axis=0), 2, axis=1)
    labels[1::2, 1::2] = 8
    out = tmp_path / "landcover.tif"
    cmap = predict._palette_colormap()
    write_output(out, labels[None], predict.output_profile(grid(), 1, "uint8", LULC_NODATA, overviews="mode"),
                 descriptions=("label",), colormap=cmap)
    assert cog_layout_problems(out) == []
    with rasterio.open(out) as ds:
        assert ds.colormap(1)[1] == cmap[1] and ds.nodata == LULC_NODATA
    with rasterio.open(out, overview_level=0) as half:
        np.testing.assert_array_equal(half.read(1), major)


def test_outputs_get_the_users_normal_permissions(tmp_path):
    data = np.ones((1, 64, 64), np.uint8)
    for mask in (0o022, 0o002, 0o077):
        out = tmp_path / f"out_{mask:03o}.tif"
        with umask(mask):
            write_output(out, data, predict.output_profile(grid(64, 64), 1, "uint8", LULC_NODATA))
        assert stat.S_IMODE(out.stat().st_mode) == 0o666 & ~mask
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]     # no temporary left


def test_a_failed_write_leaves_nothing_and_keeps_the_older_output(tmp_path):
    out = tmp_path / "pred.tif"
    out.write_bytes(b"older result")
    with pytest.raises(RuntimeError):
        with predict.cog_output(out, predict.output_profile(grid(64, 64), 1, "uint8", LULC_NODATA)) as dst:
            dst.write(np.ones((1, 32, 64), np.uint8), window=rasterio.windows.Window(0, 0, 64, 32))
            raise RuntimeError("the model failed")
    assert out.read_bytes() == b"older result"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pred.tif"]
