"""Cloud removal data: the cloudy image and the cloud/shadow mask from scene
files to batches (scene discovery, validation, ingestion with the cover per
tile, the TFDS features and splits, normalization and augmentation)."""
import dataclasses
import math

import jax
import ml_collections
import numpy as np
import pytest
import rasterio

from rsjax import cloud_metrics
from rsjax import input_pipeline as ip
from rsjax.data import contract, synthetic
from rsjax.data.ingest import IngestOptions, IngestReport, cloud_cover, iter_scene_tiles
from rsjax.errors import ConfigError


@pytest.fixture(scope="module")
def cloudy_scenes(tmp_path_factory):
    out = tmp_path_factory.mktemp("cloudy")
    return out, synthetic.write_scenes(out, num_scenes=2, size=96, seed=4, cloudy=True)


def test_scene_discovery_takes_the_cloudy_files_only_when_asked(cloudy_scenes, tmp_path):
    out, paths = cloudy_scenes
    with_clouds = contract.find_scenes(out, clouds=True)
    assert with_clouds == paths
    assert with_clouds[0].s2_cloudy.name.endswith("_s2_cloudy.tif")
    assert with_clouds[0].cloud_mask.name.endswith("_cloudmask.tif")
    assert all(s.s2_cloudy is None and s.cloud_mask is None for s in contract.find_scenes(out))
    # A scene without a cloudy image cannot train cloud removal; a mask is optional.
    for name in ("s2", "s1", "lulc", "dem", "cloudmask"):
        (tmp_path / f"a_{name}.tif").write_bytes(b"")
    with pytest.raises(contract.InputError, match="scene 'a'.*missing s2_cloudy"):
        contract.find_scenes(tmp_path, clouds=True)
    (tmp_path / "a_cloudmask.tif").unlink()
    (tmp_path / "a_s2_cloudy.tif").write_bytes(b"")
    (scene,) = contract.find_scenes(tmp_path, clouds=True)
    assert scene.cloud_mask is None and scene.s2_cloudy.name == "a_s2_cloudy.tif"


def test_tiles_carry_the_cloudy_image_the_mask_and_the_cover(cloudy_scenes):
    _, paths = cloudy_scenes
    arrays = synthetic.render_scene_arrays(paths[0].scene_id, 96, (4, 0), cloudy=True)
    report = IngestReport()
    tiles = list(iter_scene_tiles(paths[0], IngestOptions(tile_size=32), report))
    assert len(tiles) == 9
    for tile in tiles:
        r, c = (int(x) for x in tile["tile_id"].split("_r")[1].split("_c"))
        window = (slice(r, r + 32), slice(c, c + 32))
        # On the S2 grid the cloudy image and the mask come back as written.
        np.testing.assert_array_equal(tile["s2_cloudy"], arrays.s2_cloudy.transpose(1, 2, 0)[window])
        np.testing.assert_array_equal(tile["cloud_mask"], arrays.cloud_mask[window])
        assert tile["cloud_cover"] == pytest.approx((arrays.cloud_mask[window] == 1).mean())
        clear = tile["cloud_mask"] == contract.CLOUD_CLEAR
        np.testing.assert_array_equal(tile["s2_cloudy"][clear], tile["s2"][clear])
    counts = report.scenes[paths[0].scene_id]
    assert counts.has_clouds and counts.has_cloud_mask and sum(counts.tiles_by_cover) == 9


def test_a_scene_without_a_mask_reads_unknown_and_the_metrics_say_so(cloudy_scenes):
    _, paths = cloudy_scenes
    scene = dataclasses.replace(paths[1], cloud_mask=None)
    tiles = list(iter_scene_tiles(scene, IngestOptions(tile_size=48)))
    assert all((t["cloud_mask"] == contract.CLOUD_MASK_UNKNOWN).all() for t in tiles)
    assert all(math.isnan(t["cloud_cover"]) for t in tiles)
    target = np.stack([t["s2"] for t in tiles]) / 10000.0
    cloudy = np.stack([t["s2_cloudy"] for t in tiles]) / 10000.0
    parts = cloud_metrics.concat_parts([jax.jit(cloud_metrics.cloud_metric_parts)(
        np.clip(cloudy, 0, 1), target, np.stack([t["cloud_mask"] for t in tiles]))])
    scores = cloud_metrics.cloud_scores(parts)
    assert "needs a cloud mask" in scores["note"]
    assert math.isfinite(scores["regions"]["all"]["psnr"])
    assert cloud_cover(np.array([[255, 1], [0, 2]], np.uint8)) == pytest.approx(1 / 3)


def test_a_mask_with_other_codes_is_refused_with_what_to_do(cloudy_scenes, tmp_path):
    _, paths = cloudy_scenes
    bad = tmp_path / "x_cloudmask.tif"
    with rasterio.open(paths[0].cloud_mask) as src:
        profile, data = src.profile, src.read()
    data[0, :5, :5] = 9                                   # an SCL code, not ours
    with rasterio.open(bad, "w", **profile) as dst:
        dst.write(data)
    scene = dataclasses.replace(paths[0], cloud_mask=bad)
    with pytest.raises(contract.InputError, match=r"x_cloudmask.tif.*values 9 are not codes.*SCL"):
        next(iter_scene_tiles(scene, IngestOptions(tile_size=32)))


# ----------------------------------------------------------------------------- normalization

def _cloudy_tile(size=16, seed=0):
    rng = np.random.default_rng(seed)
    s2 = rng.integers(200, 4000, (size, size, 4)).astype(np.uint16)
    mask = np.zeros((size, size), np.uint8)
    mask[:5, 2:9] = contract.CLOUD
    mask[10:12, :4] = contract.CLOUD_SHADOW
    cloudy = s2.copy()
    cloudy[mask == 1] = 7000                             # bright cloud, above the clear 99th percentile
    cloudy[mask == 2] //= 3
    return {"s2": s2, "s1": rng.normal(-12, 3, (size, size, 2)).astype(np.float32),
            "lulc": rng.integers(0, 9, (size, size)).astype(np.uint8),
            "dem": np.stack([rng.uniform(0, 100, (size, size)), rng.uniform(0, 30, (size, size)),
                             rng.uniform(0, 360, (size, size)), rng.uniform(0, 255, (size, size))],
                            -1).astype(np.float32),
            "s2_cloudy": cloudy, "cloud_mask": mask}


def _normalizer():
    return ip.Normalizer(s2_low=np.full(4, 100, np.float32), s2_high=np.full(4, 4000, np.float32),
                         s1_low=np.full(2, -25, np.float32), s1_high=np.full(2, 0, np.float32),
                         elevation_mean=50.0, elevation_std=20.0)


def test_the_cloudy_image_shares_the_clear_images_map_and_keeps_cloud_brightness():
    tile = _cloudy_tile()
    out = ip.normalize_tile(tile, _normalizer(), ("s2_cloudy", "s1"))
    clear = tile["cloud_mask"] == 0
    np.testing.assert_allclose(out["s2_cloudy"][clear], out["image"][clear], atol=1e-6)
    # 7000 is past the clear image's +1 (4000): kept on the same affine map.
    np.testing.assert_allclose(out["s2_cloudy"][tile["cloud_mask"] == 1], (7000 - 100) * 2 / 3900 - 1,
                               rtol=1e-6)
    # Below the clear image's 1st percentile too, and back to the stored values exactly.
    tile["s2_cloudy"][1, 1] = 40
    out = ip.normalize_tile(tile, _normalizer(), ("s2_cloudy", "s1"))
    np.testing.assert_allclose(out["s2_cloudy"][1, 1], (40 - 100) * 2 / 3900 - 1, rtol=1e-6)
    np.testing.assert_array_equal(ip.image_to_s2(out["s2_cloudy"], _normalizer()), tile["s2_cloudy"])
    assert out["cloud_mask"].dtype == np.int32
    np.testing.assert_array_equal(out["cloud_mask"], tile["cloud_mask"])
    # A pixel without a cloudy image is no-data when the model takes it as a source.
    tile["s2_cloudy"][0, 0] = 0
    assert not ip.normalize_tile(tile, _normalizer(), ("s2_cloudy",))["valid"][0, 0]
    assert ip.normalize_tile(tile, _normalizer(), ("s1",))["valid"][0, 0]


@pytest.mark.parametrize("flip,quarter_turns", [(False, 1), (True, 0), (True, 3)])
def test_augmentation_moves_the_mask_and_the_cloudy_image_with_the_tile(flip, quarter_turns):
    tile = _cloudy_tile()
    moved = ip.flip_and_rotate(tile, flip=flip, quarter_turns=quarter_turns)

    def move(x):
        return np.rot90(x[:, ::-1] if flip else x, quarter_turns, axes=(0, 1))
    for key in ("s2", "s2_cloudy", "cloud_mask"):
        np.testing.assert_array_equal(moved[key], move(tile[key]))
    # Still where the clouds are: bright cloudy pixels exactly under the moved mask.
    np.testing.assert_array_equal(moved["cloud_mask"] == 1, moved["s2_cloudy"][..., 0] == 7000)


def test_padding_marks_the_mask_unknown():
    batch = {"cloud_mask": np.zeros((1, 4, 4), np.int32), "valid": np.ones((1, 4, 4), bool),
             "label": np.zeros((1, 4, 4), np.int32)}
    padded = ip.pad_batch(batch, 3)
    assert (padded["cloud_mask"][1:] == contract.CLOUD_MASK_UNKNOWN).all()


# ----------------------------------------------------------------------------- the dataset

def _data_cfg(data_dir, name, **kw):
    return ml_collections.ConfigDict(dict(name=f"rs_multisource/{name}", data_dir=str(data_dir),
                                          tile_size=32, worker_count=0, **kw))


def test_the_cloudy_dataset_keeps_the_clear_datasets_splits(tmp_path):
    """A small cloudy dataset (3 scenes of 128 px, 32 px tiles): the cloud
    features, the cover recorded per tile and per split, and the very same
    tiles in each split as the dataset without clouds (spatial blocks)."""
    from rsjax.tfds_builder.rs_multisource import rs_multisource_dataset_builder as module

    tile_ids = {}
    for name in ("synthetic_demo", "synthetic_cloudy_demo"):
        cfg = _data_cfg(tmp_path, name)
        base = module.Builder.builder_configs[name]
        config = module.derived_config(base, tile_size=32, synthetic_scenes=3, synthetic_size=128)
        builder = module.Builder(config=config, data_dir=str(tmp_path))
        builder.download_and_prepare()
        tile_ids[name] = {split: sorted(str(builder.as_data_source(split=split)[i]["tile_id"])
                                        for i in range(len(builder.as_data_source(split=split))))
                          for split in ("train", "validation", "test")}
        assert ip.has_clouds(builder) == (name == "synthetic_cloudy_demo")
        del cfg
    assert tile_ids["synthetic_demo"] == tile_ids["synthetic_cloudy_demo"]
    record = builder.as_data_source(split="train")[0]
    assert record["s2_cloudy"].shape == (32, 32, 4) and record["cloud_mask"].shape == (32, 32)
    assert record["cloud_cover"] == pytest.approx((record["cloud_mask"] == 1).mean())
    by_cover = builder.info.metadata["build_report"]["tiles_by_cover"]
    assert {split: sum(v.values()) for split, v in by_cover.items()} == {
        split: len(ids) for split, ids in tile_ids["synthetic_cloudy_demo"].items()}

    # Batches of it: the cloudy source and the mask, sharded like the rest.
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
    it = ip.batch_iterator(builder.as_data_source(split="train"),
                           ip.Normalizer.from_statistics(ip.load_statistics(builder)),
                           global_batch_size=8, mesh=mesh, train=True, seed=0,
                           sources=("s2_cloudy", "s1"))
    batch = next(it)
    assert batch["s2_cloudy"].shape == (8, 32, 32, 4) and batch["cloud_mask"].dtype == np.int32
    # The cloudy image as a source of a dataset without clouds: a clear error.
    clear = module.Builder(config=module.derived_config(
        module.Builder.builder_configs["synthetic_demo"], tile_size=32, synthetic_scenes=3,
        synthetic_size=128), data_dir=str(tmp_path))
    with pytest.raises(ConfigError, match="synthetic_cloudy_demo"):
        ip.check_cloud_sources(("s2_cloudy", "s1"), clear, _data_cfg(tmp_path, "synthetic_demo"))
