"""Whole-scene prediction: real GeoTIFFs (the demo dataset's synthetic scenes),
real Orbax checkpoints written as the trainers write them, the real models on
8 fake CPU devices."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine

from trainer_utils import load_config, tiny_fusion_config

from rsjax import predict
from rsjax.config_loader import config_from_workdir
from rsjax.data.contract import InputError, LULC_NODATA, LULC_PALETTE, S2_NODATA
from rsjax.errors import UserError


# ---------------------------------------------------------------------------
# Fixtures: workdirs as `python -m rsjax.train` leaves them, and a scene
# ---------------------------------------------------------------------------
def _write_workdir(root: Path, config, init_state) -> Path:
    """config.json and an Orbax checkpoint of the model's initial state (step 0):
    what a training run writes, without spending the tests' time on GAN steps."""
    from rsjax import logging_utils
    from rsjax.trainers.checkpoints import Checkpointer

    ckpt = Checkpointer(root, every_steps=1, keep=1, async_save=False)
    ckpt.save(0, init_state(), None, force=True)
    ckpt.close()
    logging_utils.write_config(config, root)
    return root


@pytest.fixture(scope="module")
def fusion_workdir(demo_data_dir, tmp_path_factory) -> Path:
    from rsjax.trainers import fusion

    config = tiny_fusion_config(demo_data_dir, "pix2pix")
    setup = fusion.Setup(config, fusion.selected_sources(config))
    return _write_workdir(tmp_path_factory.mktemp("fusion_run"), config, setup.init_state)


@pytest.fixture(scope="module")
def segmentation_workdir(demo_data_dir, tmp_path_factory) -> Path:
    from rsjax.trainers import segmentation

    config = load_config("segmentation", "demo")
    config.data.data_dir = str(demo_data_dir)
    config.model.width = 4
    setup = segmentation.Setup(config)
    return _write_workdir(tmp_path_factory.mktemp("segmentation_run"), config, setup.init_state)


@pytest.fixture(scope="module")
def scene(demo_data_dir):
    """The first synthetic scene the demo dataset was built from (256 x 256 px S2)."""
    from rsjax.data.contract import find_scenes

    folder = next(demo_data_dir.rglob("*_s2.tif")).parent
    return find_scenes(folder)[0]


def _scene_tiles(demo_data_dir, scene_id: str) -> list[dict]:
    """Every tile of one scene in the dataset, from all splits."""
    from rsjax import input_pipeline

    cfg = tiny_fusion_config(demo_data_dir).data
    builder = input_pipeline.get_builder(cfg)
    tiles = []
    for split in builder.info.splits:
        source = builder.as_data_source(split=split)
        for i in range(len(source)):
            record = source[i]
            sid = record["scene_id"]
            if (sid.decode() if isinstance(sid, bytes) else str(sid)) == scene_id:
                tiles.append(record)
    return tiles


def _window_of(tile_transform, grid_transform: Affine) -> tuple[int, int]:
    """(row, col) of a tile's origin in the output grid."""
    t = Affine(*tile_transform)
    col = (t.c - grid_transform.c) / grid_transform.a
    row = (t.f - grid_transform.f) / grid_transform.e
    assert abs(col - round(col)) < 1e-6 and abs(row - round(row)) < 1e-6
    return int(round(row)), int(round(col))


def _assert_tiled_and_compressed(path) -> None:
    """Checked in the TIFF's own tags (tifffile), not through GDAL, which wrote them; a COG
    (tests/test_predict_outputs.py checks the layout in detail) with the user's permissions."""
    import os
    import stat

    import tifffile

    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        assert page.is_tiled and (page.tilewidth, page.tilelength) == (256, 256)
        assert page.compression.name == "ADOBE_DEFLATE" and page.predictor.name == "HORIZONTAL"
    with rasterio.open(path) as ds:
        assert ds.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~umask


def _assert_no_local_paths(out, stac, workdir, scene) -> None:
    """No tag of the GeoTIFF (any domain, dataset or band) nor the STAC Item holds the
    workdir's or the inputs' absolute path, or the temporary folder's; the item's
    projection is the file's."""
    import tempfile

    import pystac

    forbidden = [str(Path(workdir).absolute()), tempfile.gettempdir(), str(Path(scene.s1).parent)]
    with rasterio.open(out) as ds:
        # DERIVED_SUBDATASETS is GDAL's, made from the path it opened, not stored in the file.
        stored = [ns for ns in ds.tag_namespaces() if ns != "DERIVED_SUBDATASETS"]
        values = [v for ns in stored for v in ds.tags(ns=ns).values()]
        values += list(ds.tags().values())
        values += [v for band in range(1, ds.count + 1) for v in ds.tags(band).values()]
        shape, transform, epsg = [ds.height, ds.width], list(ds.transform)[:6], ds.crs.to_epsg()
    assert len(values) > 8 and not [v for v in values if any(f in v for f in forbidden)], values
    assert stac == f"{out}.stac.json"
    text = Path(stac).read_text()
    assert not [f for f in forbidden if f in text]
    item = pystac.Item.from_file(stac)
    assert item.properties["proj:shape"] == shape and item.properties["proj:transform"] == transform
    assert item.properties["proj:code"] == f"EPSG:{epsg}"
    assert item.properties["rsjax:run"] == Path(workdir).name
    assert [link.title for link in item.links if link.rel == "derived_from"]


def _grid_of(path) -> tuple:
    with rasterio.open(path) as ds:
        return ds.crs, ds.transform, ds.width, ds.height


# ---------------------------------------------------------------------------
# Atomic output
# ---------------------------------------------------------------------------
def test_failed_write_leaves_nothing(tmp_path):
    """atomic_output: a failure mid-write removes the partial file and keeps an older output."""
    out = tmp_path / "pred.tif"
    out.write_bytes(b"older result")
    with pytest.raises(RuntimeError):
        with predict.atomic_output(out) as tmp:
            with rasterio.open(tmp, "w", driver="GTiff", width=8, height=8, count=1, dtype="uint8",
                               crs="EPSG:32631", transform=Affine(10, 0, 0, 0, -10, 0)) as dst:
                dst.write(np.ones((1, 4, 8), np.uint8), window=rasterio.windows.Window(0, 0, 8, 4))
                raise RuntimeError("the model failed")
    assert out.read_bytes() == b"older result"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pred.tif"]


# ---------------------------------------------------------------------------
# Fusion
# ---------------------------------------------------------------------------
def test_fusion_scene_reproduces_the_training_tiles(fusion_workdir, scene, demo_data_dir, tmp_path):
    """Predicting the whole scene on the S2 grid with tiles at ingestion's
    offsets (overlap 0) gives, in every tile's window, what the model gives on
    that tile as the evaluation pipeline feeds it from the dataset."""
    import jax

    from rsjax import input_pipeline
    from rsjax.trainers import fusion

    out = tmp_path / "synthetic_s2.tif"
    result = predict.predict_fusion(fusion_workdir, scene.s1, scene.lulc, scene.dem, out,
                                    target_grid=scene.s2, overlap=0, progress=False)
    assert result["checkpoint_step"] == 0 and result["devices"] == len(jax.devices())

    config = config_from_workdir(fusion_workdir)
    generate, _ = fusion.load_inference(config, str(fusion_workdir))
    sources = fusion.selected_sources(config)
    normalizer = predict.dataset_normalizer(config.data)
    tiles = _scene_tiles(demo_data_dir, scene.scene_id)
    assert len(tiles) >= 4
    batches = input_pipeline.batch_iterator(tiles, normalizer, global_batch_size=8, mesh=None,
                                            train=False, seed=0, sources=sources)
    generated = np.concatenate([np.asarray(generate(b)) for b in batches])
    with rasterio.open(out) as ds:
        scene_pred = ds.read()                                    # (4, H, W) uint16
        grid_transform = ds.transform
    assert scene_pred.std() > 10           # the model's output varies: the comparison can fail
    for tile, image in zip(tiles, generated):
        row, col = _window_of(tile["transform"], grid_transform)
        expected = np.moveaxis(input_pipeline.image_to_s2(image, normalizer), -1, 0)
        nodata = predict.source_nodata(tile, sources)
        expected[:, nodata] = S2_NODATA
        got = scene_pred[:, row:row + 64, col:col + 64]
        np.testing.assert_array_equal(got == S2_NODATA, expected == S2_NODATA)
        assert np.abs(got.astype(np.int32) - expected).max() <= 1, tile["tile_id"]


@pytest.fixture(scope="module")
def flow_workdir(demo_data_dir, tmp_path_factory) -> Path:
    """An untrained flow model (seed 7): it predicts zero velocity, so each of
    its images is its starting noise, clipped to [-1, 1]."""
    from rsjax.trainers import fusion

    config = tiny_fusion_config(demo_data_dir, "flow")
    config.seed = 7
    setup = fusion.make_setup(config, fusion.selected_sources(config))
    return _write_workdir(tmp_path_factory.mktemp("flow_run"), config, setup.init_state)


def _noise_image(shape, streams=(0,)) -> np.ndarray:
    """(streams, H, W, 4): the untrained flow model's images over a whole scene."""
    from rsjax.trainers import flow

    return np.stack([np.clip(flow.grid_noise(7, 0, 0, *shape, 4, stream=k), -1, 1) for k in streams])


def test_a_flow_scene_starts_every_pixel_from_the_scenes_own_noise(flow_workdir, scene, tmp_path):
    """Predicted with overlapping tiles, the untrained model's scene must equal
    the noise of the whole scene drawn at once. Tiles that each drew their own
    noise would disagree where they overlap and blend to something else."""
    from rsjax import input_pipeline

    out = tmp_path / "flow_s2.tif"
    predict.predict_fusion(flow_workdir, scene.s1, scene.lulc, scene.dem, out, target_grid=scene.s2,
                           overlap=32, progress=False)
    with rasterio.open(out) as ds:
        got = ds.read()                                            # (4, H, W) uint16
    normalizer = predict.dataset_normalizer(config_from_workdir(flow_workdir).data)
    expected = np.moveaxis(input_pipeline.image_to_s2(_noise_image(got.shape[1:])[0], normalizer), -1, 0)
    valid = got != S2_NODATA
    assert valid.mean() > 0.9
    assert np.abs(got.astype(np.int32) - expected)[valid].max() <= 1


def test_flow_samples_are_written_as_their_mean_and_standard_deviation(flow_workdir, scene, tmp_path,
                                                                       fusion_workdir):
    from rsjax import input_pipeline

    out = tmp_path / "flow_k3.tif"
    result = predict.predict(flow_workdir, out, s1=scene.s1, lulc=scene.lulc, dem=scene.dem,
                             target_grid=scene.s2, overlap=16, progress=False, samples=3)
    assert result["samples"] == 3
    with rasterio.open(out) as ds:
        got = ds.read().astype(np.int64)                           # (8, H, W)
        assert ds.descriptions == ("B2", "B3", "B4", "B8", "B2_std", "B3_std", "B4_std", "B8_std")
    samples = _noise_image(got.shape[1:], streams=(0, 1, 2))
    normalizer = predict.dataset_normalizer(config_from_workdir(flow_workdir).data)
    mean, std = samples.mean(axis=0), samples.std(axis=0)
    valid = got[0] != S2_NODATA
    expected_mean = np.moveaxis(input_pipeline.image_to_s2(mean, normalizer), -1, 0)
    assert np.abs(got[:4] - expected_mean)[:, valid].max() <= 1
    # The standard deviation in the mean's unit: mean + std, written as an
    # image, sits std above the mean (where neither is clipped).
    above = np.moveaxis(input_pipeline.image_to_s2(mean + std, normalizer), -1, 0).astype(np.int64)
    inside = valid & np.all((mean + std < 0.99) & (mean > -0.99), axis=-1)
    assert inside.mean() > 0.3
    assert np.abs(got[4:] - (above - expected_mean))[:, inside].max() <= 2
    # Samples of a GAN, or of no model, are refused before anything is written.
    with pytest.raises(InputError, match="--samples is for flow models"):
        predict.predict(fusion_workdir, tmp_path / "gan.tif", s1=scene.s1, lulc=scene.lulc,
                        dem=scene.dem, samples=2, progress=False)
    assert not (tmp_path / "gan.tif").exists()


def test_fusion_output_is_on_the_target_grid_tiled_and_compressed(fusion_workdir, scene, tmp_path):
    """Default grid: the land-cover file's. Any other GeoTIFF can give the grid
    (here the DEM, in EPSG:4326), by ingestion's rule."""
    from rsjax.data.ingest import IngestOptions
    from rsjax.data.validate import grid_of_file

    out = tmp_path / "default_grid.tif"
    result = predict.predict_fusion(fusion_workdir, scene.s1, scene.lulc, scene.dem, out,
                                    progress=False)
    lulc_crs, lulc_transform, lulc_w, lulc_h = _grid_of(scene.lulc)
    with rasterio.open(out) as ds:
        assert ds.crs == lulc_crs and ds.transform == lulc_transform
        assert (ds.width, ds.height) == (lulc_w, lulc_h)
        assert ds.count == 4 and ds.dtypes == ("uint16",) * 4 and ds.nodata == S2_NODATA
        assert ds.descriptions == ("B2", "B3", "B4", "B8") and ds.scales == (1e-4,) * 4
        assert ds.tags()["RSJAX_MODE"] == "fusion"
        assert ds.tags()["RSJAX_RUN"] == fusion_workdir.name
        data = ds.read()
    _assert_tiled_and_compressed(out)
    _assert_no_local_paths(out, result["stac"], fusion_workdir, scene)
    assert (data > 0).mean() > 0.5

    out30 = tmp_path / "dem_grid.tif"
    predict.predict_fusion(fusion_workdir, scene.s1, scene.lulc, scene.dem, out30,
                           target_grid=scene.dem, overlap=8, progress=False)
    expected = grid_of_file(Path(scene.dem), IngestOptions())
    with rasterio.open(out30) as ds:
        assert ds.crs == expected.crs and ds.transform.almost_equals(expected.transform)
        assert (ds.width, ds.height) == (expected.width, expected.height)
        # The DEM is geographic (1 arc-second): its UTM zone at its pixel size in whole metres.
        assert ds.crs.is_projected and ds.transform.a == round(ds.transform.a) > 20
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]   # no temp left


def test_bad_inputs_name_the_file_and_leave_no_output(fusion_workdir, scene, tmp_path):
    out = tmp_path / "out.tif"
    missing = tmp_path / "no_such_dem.tif"
    with pytest.raises(InputError, match="no_such_dem.tif") as err:
        predict.predict_fusion(fusion_workdir, scene.s1, scene.lulc, missing, out, progress=False)
    assert "does not exist" in str(err.value)

    three_bands = tmp_path / "s1_three_bands.tif"
    with rasterio.open(scene.s1) as src:
        data, profile = src.read(), src.profile
    profile.update(count=3)
    with rasterio.open(three_bands, "w", **profile) as dst:
        dst.write(np.concatenate([data, data[:1]]))          # no band descriptions
    with pytest.raises(InputError, match="s1_three_bands.tif.*3 band"):
        predict.predict_fusion(fusion_workdir, three_bands, scene.lulc, scene.dem, out,
                               progress=False)

    with pytest.raises(InputError, match="--dem"):
        predict.predict_fusion(fusion_workdir, scene.s1, scene.lulc, None, out, progress=False)
    with pytest.raises(UserError, match="no saved config"):
        predict.predict_fusion(tmp_path, scene.s1, scene.lulc, scene.dem, out, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s1_three_bands.tif"]


def test_failure_mid_run_keeps_the_older_output(fusion_workdir, scene, tmp_path, monkeypatch):
    """Reading fails at the third strip of tiles, after the output file was opened."""
    out = tmp_path / "pred.tif"
    out.write_bytes(b"older result")
    real = predict.source_nodata
    calls = []

    def fails_on_third_strip(arrays, sources):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("disk full")
        return real(arrays, sources)

    monkeypatch.setattr(predict, "source_nodata", fails_on_third_strip)
    with pytest.raises(RuntimeError, match="disk full"):
        predict.predict_fusion(fusion_workdir, scene.s1, scene.lulc, scene.dem, out,
                               target_grid=scene.s2, overlap=0, progress=False)
    assert len(calls) == 3 and out.read_bytes() == b"older result"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pred.tif"]


# ---------------------------------------------------------------------------
# Segmentation
# ---------------------------------------------------------------------------
def test_landcover_map_on_the_s2_grid(segmentation_workdir, scene, demo_data_dir, tmp_path):
    from rsjax import input_pipeline
    from rsjax.trainers import segmentation

    out = tmp_path / "landcover.tif"
    result = predict.predict(segmentation_workdir, out, s2=scene.s2, overlap=0, progress=False)
    assert result["mode"] == "segmentation"
    s2_crs, s2_transform, width, height = _grid_of(scene.s2)
    with rasterio.open(out) as ds:
        assert ds.crs == s2_crs and ds.transform == s2_transform
        assert (ds.width, ds.height) == (width, height)
        assert ds.count == 1 and ds.dtypes == ("uint8",) and ds.nodata == LULC_NODATA
        cmap = ds.colormap(1)
        labels = ds.read(1)
    _assert_tiled_and_compressed(out)
    _assert_no_local_paths(out, result["stac"], segmentation_workdir, scene)
    assert cmap[1][:3] == tuple(int(LULC_PALETTE[1][i:i + 2], 16) for i in (1, 3, 5))
    assert set(np.unique(labels)) <= set(range(9)) | {LULC_NODATA}
    _assert_not_constant(labels)

    # The tiles of the dataset, as the evaluation feeds them: the same labels.
    config = config_from_workdir(segmentation_workdir)
    probabilities, _ = segmentation.load_inference(config, str(segmentation_workdir))
    normalizer = predict.dataset_normalizer(config.data)
    tiles = _scene_tiles(demo_data_dir, scene.scene_id)
    batches = input_pipeline.batch_iterator(tiles, normalizer, global_batch_size=8, mesh=None,
                                            train=False, seed=0, sources=())
    probs = [(np.asarray(probabilities(b)), b["valid"]) for b in batches]
    expected = np.concatenate([np.where(v, np.argmax(p, -1), LULC_NODATA) for p, v in probs])
    agree = []
    for tile, exp in zip(tiles, expected):
        row, col = _window_of(tile["transform"], s2_transform)
        agree.append(labels[row:row + 64, col:col + 64] == exp)
    assert np.mean(agree) > 0.999        # argmax ties of near-equal probabilities may flip


def _assert_not_constant(labels):
    """At least two classes with 5 % of the valid pixels each: a model whose argmax
    is the same everywhere would pass every comparison of labels."""
    counts = np.bincount(labels[labels != LULC_NODATA].ravel(), minlength=9)
    assert np.sum(counts >= 0.05 * counts.sum()) >= 2, counts


def test_landcover_with_overlap_blends_the_tiles_it_is_made_of(segmentation_workdir, scene,
                                                                tmp_path):
    """Overlap 16 on 64 px tiles (offsets 0, 48, 96, 144, 192): wherever the
    tiles covering a pixel agree on its class, the blended map has that class
    (probabilities are averaged with weights summing to one); each tile is
    predicted here on its own, read through ingestion's registration."""
    import dataclasses

    from rasterio.windows import Window

    from rsjax import input_pipeline
    from rsjax.data.ingest import IngestOptions, RegisteredScene
    from rsjax.tiling import tile_offsets
    from rsjax.trainers import segmentation

    out = tmp_path / "landcover_overlap.tif"
    result = predict.predict_landcover(segmentation_workdir, scene.s2, out, overlap=16,
                                       progress=False)
    offsets = tile_offsets(256, 64, 48)
    assert offsets == [0, 48, 96, 144, 192] and result["tiles"] == len(offsets) ** 2
    with rasterio.open(out) as ds:
        labels = ds.read(1)
        assert ds.tags()["RSJAX_OVERLAP"] == "16"
    _assert_not_constant(labels)

    config = config_from_workdir(segmentation_workdir)
    probabilities, _ = segmentation.load_inference(config, str(segmentation_workdir))
    normalizer = predict.dataset_normalizer(config.data)
    only_s2 = dataclasses.replace(scene, s1=None, dem=None, lulc=None)
    votes = np.full((len(offsets) ** 2, 256, 256), -1)       # each tile's class, -1 outside it
    valid = np.zeros((256, 256), bool)
    with RegisteredScene(only_s2, IngestOptions(tile_size=64)) as reg:
        windows = [(r, c) for r in offsets for c in offsets]
        tiles = [input_pipeline.normalize_tile(reg.read(Window(c, r, 64, 64)), normalizer, ())
                 for r, c in windows]
    for start in range(0, len(tiles), 8):
        chunk = tiles[start:start + 8]
        chunk += [chunk[-1]] * (8 - len(chunk))               # a whole batch for 8 devices
        image = np.stack([t["image"] for t in chunk])
        classes = np.asarray(probabilities({"image": image})).argmax(-1)
        for i, (r, c) in enumerate(windows[start:start + 8]):
            votes[start + i, r:r + 64, c:c + 64] = classes[i]
            valid[r:r + 64, c:c + 64] |= tiles[start + i]["valid"]
    covering = votes >= 0
    agreed = np.all((votes == votes.max(0)) | ~covering, axis=0)
    assert agreed.mean() > 0.8
    np.testing.assert_array_equal(labels[agreed & valid], votes.max(0)[agreed & valid])
    assert (labels[~valid] == LULC_NODATA).all()


# ---------------------------------------------------------------------------
# Registration without an S2 file (the ingest.py change prediction needs)
# ---------------------------------------------------------------------------
def test_scene_without_s2_registers_on_a_chosen_grid(scene):
    """Another file's grid (here the S2 file's, named as target_grid) gives the
    same arrays as ingestion of the full scene; the absent S2 reads as no-data
    and does not count as missing."""
    import dataclasses

    from rasterio.windows import Window

    from rsjax.data.ingest import IngestOptions, RegisteredScene

    window = Window(64, 128, 64, 64)
    with RegisteredScene(scene, IngestOptions(tile_size=64)) as full:
        expected = full.read(window)
        expected_mask = full.nodata_mask(expected)
    no_s2 = dataclasses.replace(scene, s2=None)
    with RegisteredScene(no_s2, IngestOptions(tile_size=64, target_grid=str(scene.s2))) as reg:
        assert (reg.crs, reg.transform) == (full.crs, full.transform)
        arrays = reg.read(window)
        assert not arrays["s2"].any()
        for key in ("s1", "lulc", "dem"):
            np.testing.assert_array_equal(arrays[key], expected[key])
        s2_missing = (expected["s2"] == S2_NODATA).any(axis=-1)
        np.testing.assert_array_equal(reg.nodata_mask(arrays) | s2_missing, expected_mask)
    with pytest.raises(InputError, match="no optical"):
        RegisteredScene(no_s2, IngestOptions(tile_size=64))
    with pytest.raises(InputError, match="missing_grid.tif.*target grid"):
        RegisteredScene(no_s2, IngestOptions(tile_size=64, target_grid="missing_grid.tif"))


def test_command_line_reports_bad_input_and_exits_2(fusion_workdir, scene, tmp_path, capsys):
    from rsjax import cli

    out = tmp_path / "new" / "out.tif"
    status = cli.main(["predict", f"--workdir={fusion_workdir}", f"--s1={scene.s1}",
                       f"--lulc={scene.lulc}", f"--dem={tmp_path / 'no_dem.tif'}", f"--out={out}"])
    err = capsys.readouterr().err
    assert status == 2, err[-2000:]
    assert "no_dem.tif" in err and "does not exist" in err and "Traceback" not in err
    assert not out.parent.exists()                       # nothing created
    # A segmentation input for a fusion run, and a missing workdir: the same way.
    assert cli.main(["predict", f"--workdir={fusion_workdir}", f"--s2={scene.s2}",
                     f"--out={out}"]) == 2
    assert "takes no --s2" in capsys.readouterr().err
    missing = tmp_path / "no_run"
    assert cli.main(["predict", f"--workdir={missing}", f"--s2={scene.s2}", f"--out={out}"]) == 2
    assert "workdir does not exist" in capsys.readouterr().err
    assert not missing.exists() and not out.parent.exists()


# ---------------------------------------------------------------------------
# Which model: the run's mode, its sources, a step
# ---------------------------------------------------------------------------
def test_each_mode_refuses_the_other_modes_inputs(fusion_workdir, segmentation_workdir, scene,
                                                   tmp_path):
    out = tmp_path / "out.tif"
    with pytest.raises(InputError, match="segmentation run .* takes no --s1, --dem"):
        predict.predict(segmentation_workdir, out, s2=scene.s2, s1=scene.s1, dem=scene.dem)
    with pytest.raises(InputError, match="fusion run .* takes no --s2"):
        predict.predict(fusion_workdir, out, s2=scene.s2, s1=scene.s1)
    with pytest.raises(InputError, match="a 'segmentation' run, not 'fusion'; use predict_landcover"):
        predict.predict_fusion(segmentation_workdir, scene.s1, scene.lulc, scene.dem, out)
    with pytest.raises(InputError, match="a 'fusion' run, not 'segmentation'; use predict_fusion"):
        predict.predict_landcover(fusion_workdir, scene.s2, out)
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def lulc_dem_workdir(demo_data_dir, tmp_path_factory) -> Path:
    """An RS-SPADE run on land cover and terrain only (no SAR)."""
    from rsjax.trainers import fusion

    config = tiny_fusion_config(demo_data_dir, "rs_spade", sources="lulc+dem")
    setup = fusion.Setup(config, fusion.selected_sources(config))
    return _write_workdir(tmp_path_factory.mktemp("lulc_dem_run"), config, setup.init_state)


def test_a_model_of_some_sources_needs_and_reads_only_those(lulc_dem_workdir, scene, demo_data_dir,
                                                            tmp_path, caplog):
    """No --s1 needed; an S1 file given anyway is left unread (same output); the
    output in a training tile's window is the model's output on that tile's
    land cover and terrain."""
    from rsjax import input_pipeline
    from rsjax.trainers import fusion

    with pytest.raises(InputError, match=r"sources lulc, dem; also give --dem"):
        predict.predict_fusion(lulc_dem_workdir, None, scene.lulc, None, tmp_path / "x.tif")
    out = tmp_path / "lulc_dem.tif"
    result = predict.predict_fusion(lulc_dem_workdir, None, scene.lulc, scene.dem, out,
                                    target_grid=scene.s2, overlap=0, progress=False)
    assert result["sources"] == ["lulc", "dem"]
    with_s1 = tmp_path / "with_s1.tif"
    predict.predict_fusion(lulc_dem_workdir, scene.s1, scene.lulc, scene.dem, with_s1,
                           target_grid=scene.s2, overlap=0, progress=False)
    assert "The model takes no s1" in caplog.text
    with rasterio.open(out) as a, rasterio.open(with_s1) as b:
        assert a.tags()["RSJAX_SOURCES"] == "lulc,dem"
        scene_pred, grid_transform = a.read(), a.transform
        np.testing.assert_array_equal(scene_pred, b.read())
    assert scene_pred.std() > 10

    config = config_from_workdir(lulc_dem_workdir)
    generate, _ = fusion.load_inference(config, str(lulc_dem_workdir))
    normalizer = predict.dataset_normalizer(config.data)
    tiles = _scene_tiles(demo_data_dir, scene.scene_id)[:8]
    batch = next(input_pipeline.batch_iterator(tiles, normalizer, global_batch_size=8, mesh=None,
                                               train=False, seed=0, sources=("lulc", "dem")))
    generated = np.asarray(generate(batch))
    assert len(generated) == 8 and len(tiles) >= 4
    for tile, image in zip(tiles, generated[:len(tiles)], strict=True):
        row, col = _window_of(tile["transform"], grid_transform)
        expected = np.moveaxis(input_pipeline.image_to_s2(image, normalizer), -1, 0)
        nodata = predict.source_nodata(tile, ("lulc", "dem"))
        expected[:, nodata] = S2_NODATA
        got = scene_pred[:, row:row + 64, col:col + 64]
        assert np.abs(got.astype(np.int32) - expected).max() <= 1, tile["tile_id"]


def _assert_feedback(err: str, workdir, out, summary) -> None:
    """What `rsjax predict` says on stderr while it works: the model it loads, the
    compilation and its time, progress with an ETA, and where the outputs went."""
    import re

    step = summary["checkpoint_step"]
    assert f"loading the model from {workdir} (" in err
    name = predict.model_name(config_from_workdir(workdir))
    assert f"loaded fusion {name}, step {step}, on {summary['devices']} device(s) in " in err
    assert re.search(r"compiling the model for batches of \d+ tiles of 64 x 64 px \.\.\.\n.*compiled in "
                     r"\d+\.\d s", err)
    total = summary["tiles"]
    assert re.search(rf"tile {total}/{total} \(100\.0%\) \| [0-9.?]+ tiles/s \| ETA 0s", err), err
    assert f"wrote {out} ({total} tiles in " in err and f"STAC item {out}.stac.json" in err
    lines = err.splitlines()
    order = [next(i for i, line in enumerate(lines) if re.search(key, line))
             for key in ("loading the model", "compiling", r" tile \d+/", "wrote")]
    assert order == sorted(order), lines


def test_command_line_predicts_with_the_checkpoint_of_the_step_given(
        fusion_workdir, demo_data_dir, scene, tmp_path, monkeypatch, capsys):
    """A run with checkpoints 0 (the fusion_workdir's state) and 5 (another
    initialization): `rsjax predict --step 0` gives the output of the
    fusion_workdir's model, and without --step, the latest (5), another one."""
    from rsjax import cli
    from rsjax.trainers import fusion
    from rsjax.trainers.checkpoints import Checkpointer

    config = config_from_workdir(fusion_workdir)
    workdir = tmp_path / "two_steps"
    ckpt = Checkpointer(workdir, every_steps=1, keep=2, async_save=False)
    for step, seed in ((0, config.seed), (5, config.seed + 1)):
        seeded = config.copy_and_resolve_references()
        seeded.seed = seed
        ckpt.save(step, fusion.Setup(seeded, fusion.selected_sources(seeded)).init_state(), None,
                  force=True)
    ckpt.close()
    (workdir / "config.json").write_text((fusion_workdir / "config.json").read_text())

    monkeypatch.chdir(tmp_path)
    outputs = {}
    for name, extra in (("step0", ["--step", "0"]), ("latest", [])):
        out = tmp_path / f"{name}.tif"
        assert cli.main(["predict", f"--workdir={workdir}", f"--s1={scene.s1}",
                         f"--lulc={scene.lulc}", f"--dem={scene.dem}", f"--out={out}",
                         *extra]) == 0
        captured = capsys.readouterr()
        printed = captured.out
        summary = json.loads(printed[printed.index("{"):])
        assert summary["out"] == str(out) and summary["mode"] == "fusion"
        assert summary["stac"] == f"{out}.stac.json" and Path(summary["stac"]).is_file()
        _assert_feedback(captured.err, workdir, out, summary)
        with rasterio.open(out) as ds:
            assert ds.tags()["RSJAX_CHECKPOINT_STEP"] == str(summary["checkpoint_step"])
            outputs[name] = (summary["checkpoint_step"], ds.read())
    reference = tmp_path / "reference.tif"
    predict.predict_fusion(fusion_workdir, scene.s1, scene.lulc, scene.dem, reference,
                           progress=False)
    with rasterio.open(reference) as ds:
        np.testing.assert_array_equal(outputs["step0"][1], ds.read())
    assert outputs["step0"][0] == 0 and outputs["latest"][0] == 5
    assert np.abs(outputs["latest"][1].astype(int) - outputs["step0"][1]).mean() > 10


# ---------------------------------------------------------------------------
# Outputs that would destroy an input, and checkpoints of another model
# ---------------------------------------------------------------------------
def test_out_that_is_an_input_or_a_folder_is_refused(fusion_workdir, scene, tmp_path, capsys):
    """Issue 28: --out equal to an input (also through a link) used to overwrite
    it; --out an existing folder was a traceback."""
    import shutil

    from rsjax import cli

    lulc = tmp_path / "lulc.tif"
    shutil.copy(scene.lulc, lulc)
    link = tmp_path / "link.tif"
    link.symlink_to(lulc)
    before = lulc.read_bytes()
    inputs = [f"--workdir={fusion_workdir}", f"--s1={scene.s1}", f"--lulc={lulc}",
              f"--dem={scene.dem}"]
    for out, message in ((lulc, "is the --lulc input"), (link, "is the --lulc input"),
                         (tmp_path, "is a folder")):
        status = cli.main(["predict", *inputs, f"--out={out}"])
        err = capsys.readouterr().err
        assert status == 2, err[-2000:]
        assert message in err and str(out) in err and "Traceback" not in err
        assert len([line for line in err.splitlines() if "error:" in line]) == 1
    assert lulc.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.tif", "lulc.tif"]


def test_a_checkpoint_of_another_model_is_one_line_naming_both(fusion_workdir, lulc_dem_workdir,
                                                               scene, tmp_path):
    """Issue 28: predicting with a config of another model or sources than the
    checkpoint holds was an Orbax or TypeError traceback."""
    other = config_from_workdir(lulc_dem_workdir)
    out = tmp_path / "out.tif"
    with pytest.raises(UserError) as err:
        predict.predict(fusion_workdir, out, s1=scene.s1, lulc=scene.lulc, dem=scene.dem,
                        config=other)
    message = str(err.value)
    assert "rs_spade" in message and "lulc+dem" in message
    assert "pix2pix_unet" in message and "lulc+s1+dem" in message
    assert "\n" not in message
    assert list(tmp_path.iterdir()) == []
