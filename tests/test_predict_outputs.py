"""rsjax.predict's output files: Cloud Optimized GeoTIFFs with overviews, with the user's permissions.

The writer is tested on its own (no model): the layout is checked in the
TIFF's own structure with tifffile, following GDAL's COG validation
(validate_cloud_optimized_geotiff.py): tiled, overviews present and halving,
every IFD before any image data, the smallest overview's data first and the
full resolution's last. What a GIS reads from the files (scale/offset, colour
interpretation, colour table, class names, no-data) is checked with rasterio
and with Debian's `gdalinfo -json`, a GDAL build other than the one that wrote
them; the STAC Item beside an output is read back with pystac and compared
with the file. Also here: the progress lines and the compilation message.
"""
import contextlib
import datetime as dt
import json
import logging
import os
import shutil
import stat
import subprocess

import numpy as np
import pytest
import rasterio
import tifffile
from affine import Affine
from rasterio.crs import CRS

from rsjax import predict, predict_outputs
from rsjax.data.contract import LULC_CLASSES, LULC_NODATA, LULC_PALETTE, S2_NODATA
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


# ---------------------------------------------------------------------------
# What a GIS reads: rasterio, and gdalinfo (Debian's GDAL, not rasterio's)
# ---------------------------------------------------------------------------
GDALINFO = shutil.which("gdalinfo")
needs_gdalinfo = pytest.mark.skipif(
    GDALINFO is None, reason="gdalinfo not installed (Debian/Ubuntu: apt-get install gdal-bin); "
    "it is the independent reader of the outputs")


def gdalinfo(path) -> dict:
    return json.loads(subprocess.run([GDALINFO, "-json", str(path)], check=True, capture_output=True,
                                     text=True).stdout)


def fusion_config():
    import ml_collections

    return ml_collections.ConfigDict({"trainer": "fusion", "generator": {"name": "rs_spade"}})


def write_spec_output(path, data, spec, tags=None):
    """What predict's `_run` does around the model: the COG with the spec's band metadata."""
    with predict.cog_output(path, predict.spec_profile(grid(data.shape[2], data.shape[1]), spec)) as dst:
        dst.write(data)
        predict_outputs.apply_band_metadata(dst, spec)
        dst.update_tags(**(tags or {}))


def reflectance(height=HEIGHT, width=WIDTH):
    data = np.random.default_rng(2).integers(1, 9000, size=(4, height, width)).astype(np.uint16)
    data[:, :40, :60] = S2_NODATA
    return data


def all_metadata(info: dict) -> list[str]:
    """Every metadata value gdalinfo reports, of the dataset and of each band, in every domain."""
    domains = list(info.get("metadata", {}).values())
    domains += [d for band in info["bands"] for d in band.get("metadata", {}).values()]
    return [str(v) for domain in domains for v in (domain.values() if isinstance(domain, dict) else domain)]


@needs_gdalinfo
def test_reflectance_output_reads_as_reflectance(tmp_path):
    """Scale 1e-4 and offset 0 on every band (uint16 reflectance x 10000, as the
    dataset stores it), B, G, R, NIR colour interpretation, no-data 0, band
    names: the same through rasterio and through gdalinfo."""
    from rsjax.data import optical

    out = tmp_path / "synthetic_s2.tif"
    data = reflectance()
    workdir = tmp_path / "runs" / "demo"
    tags = predict.provenance_tags(predict.provenance("fusion", fusion_config(), workdir, 3,
                                                      ["lulc"], 256, 64))
    write_spec_output(out, data, predict_outputs.SYNTHETIC, tags)
    with rasterio.open(out) as ds:
        assert ds.scales == (1e-4,) * 4 and ds.offsets == (0.0,) * 4
        assert [c.name for c in ds.colorinterp] == ["blue", "green", "red", "undefined"]
        assert ds.descriptions == ("B2", "B3", "B4", "B8") and ds.nodatavals == (S2_NODATA,) * 4
        assert [ds.tags(i)["COMMON_NAME"] for i in (1, 2, 3, 4)] == ["blue", "green", "red", "nir"]
        scaled = ds.read(1, masked=True) * ds.scales[0] + ds.offsets[0]
        # Ingestion reads such a file back as the dataset's unit: no offset to add.
        assert optical.declared_offsets(ds, (1, 2, 3, 4), ("B2", "B3", "B4", "B8"), out.name) == [0.0] * 4
    np.testing.assert_allclose(scaled.compressed(), data[0][data[0] != S2_NODATA] / 10000.0)
    assert 0 < scaled.max() <= 1

    info = gdalinfo(out)
    assert info["metadata"]["IMAGE_STRUCTURE"]["LAYOUT"] == "COG"
    bands = info["bands"]
    assert [b["colorInterpretation"] for b in bands] == ["Blue", "Green", "Red", "Undefined"]
    assert [(b["scale"], b["offset"], b["noDataValue"]) for b in bands] == [(1e-4, 0.0, 0.0)] * 4
    assert [b["description"] for b in bands] == ["B2", "B3", "B4", "B8"]
    assert [b["type"] for b in bands] == ["UInt16"] * 4
    assert not list(tmp_path.glob("*.aux.xml"))        # everything is inside the file
    metadata = all_metadata(info)
    assert "demo" in metadata and "blue" in metadata            # the run's name, band tags
    assert not [v for v in metadata if str(tmp_path) in v or os.sep + "tmp" in v]


@needs_gdalinfo
def test_land_cover_output_has_colours_class_names_and_nodata(tmp_path):
    out = tmp_path / "landcover.tif"
    labels = np.random.default_rng(3).integers(0, 9, size=(1, HEIGHT, WIDTH)).astype(np.uint8)
    labels[:, :50] = LULC_NODATA
    write_spec_output(out, labels, predict_outputs.LAND_COVER)
    with rasterio.open(out) as ds:
        assert ds.nodata == LULC_NODATA and ds.colorinterp[0].name == "palette"
        assert ds.colormap(1)[4] == tuple(int(LULC_PALETTE[4][i:i + 2], 16) for i in (1, 3, 5)) + (255,)
        assert ds.colormap(1)[LULC_NODATA][3] == 0                      # no data: transparent
        assert [ds.tags(1)[f"CLASS_{i}"] for i in range(9)] == list(LULC_CLASSES)

    info = gdalinfo(out)
    band = info["bands"][0]
    assert info["metadata"]["IMAGE_STRUCTURE"]["LAYOUT"] == "COG"
    assert band["colorInterpretation"] == "Palette" and band["noDataValue"] == LULC_NODATA
    assert band["colorTable"]["entries"][6] == [int(LULC_PALETTE[6][i:i + 2], 16) for i in (1, 3, 5)] + [255]
    assert band["metadata"][""]["CLASS_3"] == "flooded_vegetation"
    assert band["description"] == "label"


def test_provenance_names_the_run_never_its_path(tmp_path):
    workdir = tmp_path / "runs" / "fusion_demo"
    properties = predict.provenance("fusion", fusion_config(), workdir, 1200, ("lulc", "s1"), 256, 64)
    tags = predict.provenance_tags(properties)
    assert tags["RSJAX_RUN"] == "fusion_demo" and tags["RSJAX_CHECKPOINT_STEP"] == "1200"
    assert tags["RSJAX_MODEL"] == "rs_spade" and tags["RSJAX_SOURCES"] == "lulc,s1"
    assert not [v for v in [*tags.values(), *map(str, properties.values())] if "/" in v]
    assert predict_outputs.run_name("gs://bucket/runs/seg_real/") == "seg_real"
    assert predict_outputs.run_name(".") == os.path.basename(os.getcwd())


def write_input(path, **tags):
    """A small GeoTIFF standing for one of the inputs (tags in the IMAGERY domain)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(path, "w", driver="GTiff", width=8, height=8, count=1, dtype="uint8",
                       crs="EPSG:32631", transform=Affine(10, 0, 600000, 0, -10, 5600000)) as dst:
        dst.write(np.ones((1, 8, 8), np.uint8))
        if tags:
            dst.update_tags(ns="IMAGERY", **tags)
    return path


def write_item(out, spec, inputs, created=dt.datetime(2026, 3, 4, 5, 6, 7, tzinfo=dt.timezone.utc)):
    properties = predict.provenance("fusion", fusion_config(), out.parent / "runs" / "demo", 7,
                                    ["lulc", "s1"], 256, 64)
    item = predict_outputs.stac_item(out, spec, properties, inputs,
                                     predict_outputs.scene_datetime(inputs), created)
    return predict.write_stac(out, item.to_dict(include_self_link=False, transform_hrefs=False))


def test_stac_item_describes_the_file(tmp_path):
    """pystac reads the item back; its projection and raster fields are the file's,
    its footprint is where the grid is (UTM 31N, about 4.4 E 50.5 N), and it
    holds no local path: inputs nearby are relative links, others their names."""
    import pystac
    from rasterio.warp import transform as transform_points

    project = tmp_path / "a" / "b"
    out = project / "predictions" / "S_synthetic_s2.tif"
    out.parent.mkdir(parents=True)
    write_spec_output(out, reflectance(), predict_outputs.SYNTHETIC)
    near = write_input(project / "scenes" / "S_s1.tif")               # ../scenes
    far = write_input(tmp_path / "elsewhere" / "S_lulc.tif")         # ../../../elsewhere
    signed = "https://example.org/scenes/S_dem.tif?X-Amz-Signature=secret"
    path = write_item(out, predict_outputs.SYNTHETIC, [("s1", near), ("lulc", far), ("dem", signed)])
    assert path == out.parent / "S_synthetic_s2.tif.stac.json"

    item = pystac.Item.from_file(str(path))
    text = path.read_text()
    assert str(tmp_path) not in text and "secret" not in text
    assert item.id == "S_synthetic_s2" and item.assets["data"].get_absolute_href() == str(out)
    assert item.assets["data"].media_type == pystac.MediaType.COG
    with rasterio.open(out) as ds:
        props = item.properties
        assert props["proj:code"] == "EPSG:32631"
        assert props["proj:shape"] == [ds.height, ds.width]
        assert props["proj:transform"] == list(ds.transform)[:6]
        assert props["proj:bbox"] == list(ds.bounds)
        bands = item.assets["data"].extra_fields["raster:bands"]
        assert [(b["data_type"], b["nodata"], b["scale"], b["offset"]) for b in bands] == \
            [(dt_, nd, sc, off) for dt_, nd, sc, off in zip(ds.dtypes, ds.nodatavals, ds.scales, ds.offsets)]
        lons, lats = transform_points(ds.crs, "EPSG:4326", [ds.bounds.left, ds.bounds.right] * 2,
                                      [ds.bounds.bottom] * 2 + [ds.bounds.top] * 2)
    assert [b["data_type"] for b in bands] == ["uint16"] * 4 and bands[0]["scale"] == 1e-4
    assert '"nodata": 0,' in text                       # an integer for an integer type
    eo = item.assets["data"].extra_fields["eo:bands"]
    assert [b["common_name"] for b in eo] == ["blue", "green", "red", "nir"]
    west, south, east, north = item.bbox
    assert west <= min(lons) and east >= max(lons) and south <= min(lats) and north >= max(lats)
    assert 4.3 < west < east < 4.6 and 50.4 < south < north < 50.6
    assert item.geometry["type"] == "Polygon"
    assert item.datetime == dt.datetime(2026, 3, 4, 5, 6, 7, tzinfo=dt.timezone.utc)
    assert props["rsjax:datetime_source"] == "prediction" and props["created"] == "2026-03-04T05:06:07Z"
    assert props["rsjax:run"] == "demo" and props["rsjax:checkpoint_step"] == 7
    assert props["rsjax:version"] and props["rsjax:sources"] == ["lulc", "s1"]
    links = {link.title: link.href for link in item.links if link.rel == "derived_from"}
    assert links == {"input: s1": "../scenes/S_s1.tif", "input: lulc": "S_lulc.tif",
                     "input: dem": "https://example.org/scenes/S_dem.tif"}
    assert pystac.Item.from_dict(item.to_dict()).to_dict() == item.to_dict()


def test_stac_item_of_land_cover_lists_the_classes_and_dates_the_scene(tmp_path):
    """An input that declares its acquisition time (GDAL's IMAGERY metadata) dates the item."""
    import pystac

    out = tmp_path / "S_landcover.tif"
    write_spec_output(out, np.zeros((1, 64, 64), np.uint8), predict_outputs.LAND_COVER)
    s2 = write_input(tmp_path / "S_s2.tif", ACQUISITIONDATETIME="2023-06-01T10:30:21Z")
    item = pystac.Item.from_file(str(write_item(out, predict_outputs.LAND_COVER, [("s2", s2)])))
    assert item.datetime == dt.datetime(2023, 6, 1, 10, 30, 21, tzinfo=dt.timezone.utc)
    assert item.properties["rsjax:datetime_source"] == "scene"
    classes = item.assets["data"].extra_fields["classification:classes"]
    assert [(c["value"], c["name"]) for c in classes[:9]] == list(enumerate(LULC_CLASSES))
    assert classes[0]["color_hint"] == LULC_PALETTE[0].lstrip("#").upper()
    assert classes[9] == {"value": LULC_NODATA, "name": "no_data", "description": "no data",
                          "nodata": True}
    bands = item.assets["data"].extra_fields["raster:bands"]
    assert bands == [{"nodata": LULC_NODATA, "data_type": "uint8", "spatial_resolution": 10.0}]
    assert [link.href for link in item.links if link.rel == "derived_from"] == ["S_s2.tif"]


def test_stac_items_and_folders_follow_the_umask(tmp_path):
    data = np.ones((1, 64, 64), np.uint8)
    for mask, file_mode, dir_mode in ((0o022, 0o644, 0o755), (0o002, 0o664, 0o775)):
        out = tmp_path / f"new_{mask:03o}" / "out.tif"
        with umask(mask):
            write_spec_output(out, data, predict_outputs.LAND_COVER)
            stac = write_item(out, predict_outputs.LAND_COVER, [])
        assert stat.S_IMODE(out.stat().st_mode) == file_mode
        assert stat.S_IMODE(stac.stat().st_mode) == file_mode
        assert stat.S_IMODE(out.parent.stat().st_mode) == dir_mode
        assert sorted(p.name for p in out.parent.iterdir()) == ["out.tif", "out.tif.stac.json"]


# ---------------------------------------------------------------------------
# Feedback while predicting
# ---------------------------------------------------------------------------
class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_tile_progress_logs_the_first_batch_then_every_interval_and_the_last(caplog):
    clock = FakeClock()
    progress = predict.TileProgress(40, every_seconds=10.0, clock=clock)
    lines = []
    with caplog.at_level(logging.INFO, logger="rsjax"):
        for _ in range(5):                                  # 8 tiles a batch, 4 s each
            lines.append(progress(8))
            clock.now += 4.0
    assert lines[0] == "tile 8/40 (20.0%) | ? tiles/s | ETA ?"       # the first: compilation
    assert lines[1] is None and lines[2] is None                    # within 10 s of the last line
    assert lines[3] == "tile 32/40 (80.0%) | 2 tiles/s | ETA 4s"     # 24 tiles in 12 s since the first
    assert lines[4] == "tile 40/40 (100.0%) | 2 tiles/s | ETA 0s"    # the last, whatever the time
    assert [r.getMessage() for r in caplog.records] == [line for line in lines if line]
    quiet = predict.TileProgress(8, enabled=False, clock=clock)
    assert quiet(8) is None


def test_compilation_is_logged_once_per_batch_shape(caplog):
    calls = []
    fn = predict._logs_compilation(lambda batch: calls.append(batch["s1"].shape) or "out")
    with caplog.at_level(logging.INFO, logger="rsjax"):
        assert fn({"s1": np.zeros((8, 64, 64, 2))}) == "out"
        assert fn({"s1": np.zeros((8, 64, 64, 2))}) == "out"
        fn({"s1": np.zeros((16, 64, 64, 2))})
    messages = [r.getMessage() for r in caplog.records]
    assert messages[0] == "compiling the model for batches of 8 tiles of 64 x 64 px ..."
    assert messages[1].startswith("compiled in ") and len(messages) == 4 and len(calls) == 3
    assert messages[2] == "compiling the model for batches of 16 tiles of 64 x 64 px ..."
