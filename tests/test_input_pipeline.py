"""The input pipeline's pure parts (splits, statistics, normalization, augmentation)
and the grain pipeline over in-memory tiles: sharding, padding, seeding, state."""
from __future__ import annotations

import math

import jax
import numpy as np
import pytest

from rsjax import input_pipeline as ip
from rsjax.data import contract
from rsjax.data import splits
from rsjax.data import statistics


# ----------------------------------------------------------------------------
# Helpers: contract tiles made with numpy
# ----------------------------------------------------------------------------

def horn_aspect(z: np.ndarray, res: float = 10.0) -> np.ndarray:
    """Aspect in degrees clockwise from north, Horn's method as gdaldem computes it
    (-9999 where the surface is flat). Border pixels use edge padding."""
    p = np.pad(np.asarray(z, np.float64), 1, mode="edge")
    a, b, c = p[:-2, :-2], p[:-2, 1:-1], p[:-2, 2:]
    d, f = p[1:-1, :-2], p[1:-1, 2:]
    g, h, i = p[2:, :-2], p[2:, 1:-1], p[2:, 2:]
    dx = ((c + 2 * f + i) - (a + 2 * d + g)) / (8 * res)
    dy = ((g + 2 * h + i) - (a + 2 * b + c)) / (8 * res)
    angle = np.degrees(np.arctan2(dy, -dx))
    aspect = np.where(angle > 90.0, 450.0 - angle, 90.0 - angle)
    aspect = np.mod(aspect, 360.0)
    return np.where((dx == 0) & (dy == 0), contract.ASPECT_FLAT, aspect)


def smooth_surface(size: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    z = np.zeros((size, size))
    for _ in range(5):
        cy, cx = rng.uniform(0, size, 2)
        z += rng.uniform(20, 80) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * rng.uniform(3, 8) ** 2))
    z[: size // 4, : size // 4] = 100.0   # a flat patch: aspect undefined there
    return z


def make_tile(size: int = 16, seed: int = 0, tile_index: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    s2 = rng.integers(1, 5000, (size, size, 4)).astype(np.uint16)
    s2[0, 0] = 0                                       # one pixel without optical data
    s1 = rng.normal(-12, 4, (size, size, 2)).astype(np.float32)
    s1[1, 1, 0] = np.nan
    lulc = rng.integers(0, 9, (size, size)).astype(np.uint8)
    lulc[2, 2] = contract.LULC_NODATA
    z = smooth_surface(size, seed)
    dem = np.stack([z, rng.uniform(0, 40, z.shape), horn_aspect(z),
                    rng.uniform(0, 255, z.shape)], -1).astype(np.float32)
    dem[3, 3, 0] = np.nan
    return {"s2": s2, "s1": s1, "lulc": lulc, "dem": dem,
            "tile_id": f"scene_r0_c{tile_index}", "scene_id": "scene", "crs": "EPSG:32631",
            "transform": np.array([10, 0, 600000 + 10 * size * tile_index, 0, -10, 5000000], np.float64)}


def stats_of(tiles) -> dict:
    acc = statistics.DatasetStatistics(seed=0)
    for t in tiles:
        acc.update(t)
    return acc.result()


# ----------------------------------------------------------------------------
# Splits
# ----------------------------------------------------------------------------

def test_lattice_index_is_consecutive_for_any_grid_origin():
    for x0 in (600000.0, 600003.7, 499999.999999):
        cols = [splits.lattice_index((10, 0, x0 + 1280 * k, 0, -10, 5e6 - 1280 * k), 128)
                for k in range(5)]
        assert [c for _, c in cols] == [cols[0][1] + k for k in range(5)]
        assert [r for r, _ in cols] == [cols[0][0] + k for k in range(5)]


def _grid_assignments(stride, tile=128, n=24, block_tiles=2, mode="block"):
    """Split of every tile of an n x n grid, keyed by the tile's lattice (row, col)."""
    out = {}
    for r in range(n):
        for c in range(n):
            tr = (10, 0, 600000 + 10 * stride * c, 0, -10, 5e6 - 10 * stride * r)
            out[splits.lattice_index(tr, stride)] = splits.assign_split(scene_id="s", tile_id=f"s_{r}_{c}", transform=tr,
                                              tile_size=tile, stride=stride, block_tiles=block_tiles,
                                              mode=mode)
    return out


def test_block_split_keeps_blocks_whole_and_is_deterministic():
    a = _grid_assignments(128)
    assert a == _grid_assignments(128)
    assert None not in a.values()                     # stride == tile: nothing straddles
    blocks = {}
    for (r, c), s in a.items():
        blocks.setdefault((r // 2, c // 2), set()).add(s)
    assert all(len(v) == 1 for v in blocks.values())  # a block never spans two splits
    counts = {s: sum(v == s for v in a.values()) / len(a) for s in splits.SPLITS}
    # 144 blocks: the 7:2:1 ratio holds within a few binomial standard deviations.
    for s, f in zip(splits.SPLITS, splits.DEFAULT_FRACTIONS):
        assert abs(counts[s] - f) < 4 * math.sqrt(f * (1 - f) / 144), counts


def test_overlapping_tiles_of_different_splits_share_no_pixel():
    stride, tile = 64, 128
    a = _grid_assignments(stride, tile)
    kept = {k: v for k, v in a.items() if v is not None}
    assert len(kept) < len(a)                         # some tiles straddle blocks and are dropped
    px = {}
    for (r, c), s in kept.items():
        for dr in range(tile // stride):
            for dc in range(tile // stride):
                px.setdefault((r + dr, c + dc), set()).add(s)
    assert all(len(v) == 1 for v in px.values())


def test_random_split_mode_places_each_tile_by_its_id():
    a = _grid_assignments(128, mode="random")
    blocks = {}
    for (r, c), s in a.items():
        blocks.setdefault((r // 2, c // 2), set()).add(s)
    assert any(len(v) > 1 for v in blocks.values())   # not by block
    assert abs(sum(v == "train" for v in a.values()) / len(a) - 0.7) < 0.08


def test_split_fractions_are_checked():
    with pytest.raises(ValueError, match="summing to 1"):
        splits.split_from_unit(0.5, (0.7, 0.2, 0.2))


# ----------------------------------------------------------------------------
# Statistics
# ----------------------------------------------------------------------------

def test_statistics_match_numpy_on_the_valid_pixels():
    tiles = [make_tile(16, seed) for seed in range(3)]
    st = stats_of(tiles)
    s1 = np.concatenate([t["s1"].reshape(-1, 2) for t in tiles]).astype(np.float64)
    for ch in range(2):
        v = s1[:, ch][np.isfinite(s1[:, ch])]
        assert st["s1"]["count"][ch] == v.size
        np.testing.assert_allclose(st["s1"]["mean"][ch], v.mean(), rtol=1e-12)
        np.testing.assert_allclose(st["s1"]["std"][ch], v.std(), rtol=1e-10)
        # Every pixel is sampled here (4096 per tile > 256), so percentiles are exact.
        np.testing.assert_allclose(st["s1"]["percentiles"]["p1"][ch], np.percentile(v, 1), rtol=1e-12)
        np.testing.assert_allclose(st["s1"]["percentiles"]["p99"][ch], np.percentile(v, 99), rtol=1e-12)
    s2 = np.concatenate([t["s2"].reshape(-1, 4) for t in tiles]).astype(np.float64)
    s2 = s2[np.any(s2 != 0, axis=1)]
    np.testing.assert_allclose(st["s2"]["mean"], s2.mean(0), rtol=1e-12)
    aspect = np.concatenate([t["dem"][..., 2].ravel() for t in tiles]).astype(np.float64)
    aspect = aspect[np.isfinite(aspect) & (aspect != contract.ASPECT_FLAT)]
    np.testing.assert_allclose(st["dem"]["mean"][2], aspect.mean(), rtol=1e-6)
    labels = np.concatenate([t["lulc"].ravel() for t in tiles])
    assert st["lulc"]["counts"] == np.bincount(labels[labels < 9], minlength=9).tolist()
    assert st["lulc"]["nodata_count"] == 3
    np.testing.assert_allclose(sum(st["lulc"]["frequencies"]), 1.0)


def test_percentiles_from_a_bounded_sample_are_close():
    rng = np.random.default_rng(1)
    acc = statistics.ChannelStatistics(["x"], samples_per_tile=500, max_samples=2000, seed=3)
    values = []
    for _ in range(40):
        x = rng.normal(0, 1, (50, 50, 1))
        values.append(x.ravel())
        acc.update(x, np.ones((50, 50), bool))
    res = acc.result()
    allv = np.concatenate(values)
    assert res["count"] == [allv.size]
    np.testing.assert_allclose(res["mean"][0], allv.mean(), atol=1e-12)
    assert abs(res["percentiles"]["p50"][0] - np.median(allv)) < 0.1
    assert abs(res["percentiles"]["p99"][0] - np.percentile(allv, 99)) < 0.25


def test_statistics_merge_in_any_order_and_grouping_bit_for_bit():
    """What the Beam build relies on: partial accumulators merged in any tree
    give exactly the single pass's numbers (mean/std exact, same sample)."""
    tiles = [make_tile(16, seed) for seed in range(9)]
    for t in tiles[4:]:                    # large values: a naive float sum would round differently
        t["dem"][..., 0] += 3000.0
    kwargs = dict(seed=0, samples_per_tile=60, max_samples=150)   # the sample is truncated

    def single(order):
        acc = statistics.DatasetStatistics(**kwargs)
        for i in order:
            acc.update(tiles[i])
        return acc.result()

    reference = single(range(9))
    assert single([8, 3, 0, 5, 1, 7, 2, 6, 4]) == reference
    rng = np.random.default_rng(0)
    for _ in range(3):
        order = rng.permutation(9)
        groups = np.array_split(order, 3)
        parts = []
        for g in groups:
            acc = statistics.DatasetStatistics(**kwargs)
            for i in g:
                acc.update(tiles[i])
            parts.append(acc)
        assert statistics.merged(parts[::-1], **kwargs).result() == reference
        nested = statistics.merged([parts[2], statistics.merged(parts[:2], **kwargs)], **kwargs)
        assert nested.result() == reference
    # Still the numbers of all pixels together.
    elevation = np.concatenate([t["dem"][..., 0].ravel() for t in tiles]).astype(np.float64)
    elevation = elevation[np.isfinite(elevation)]
    np.testing.assert_allclose(reference["dem"]["mean"][0], elevation.mean(), rtol=1e-14)
    np.testing.assert_allclose(reference["dem"]["std"][0], elevation.std(), rtol=1e-12)
    assert reference["num_tiles"] == 9


# ----------------------------------------------------------------------------
# Normalization
# ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def normalizer():
    return ip.Normalizer.from_statistics(stats_of([make_tile(16, s) for s in range(3)]))


def test_normalize_ranges_nodata_and_encodings(normalizer):
    tile = make_tile(16, 5)
    tile["dem"][4, 4, 2] = 90.0                        # facing east
    tile["dem"][5, 5, 2] = contract.ASPECT_FLAT
    out = ip.normalize_tile(tile, normalizer, ("lulc", "s1", "dem"))
    assert out["image"].shape == (16, 16, 4) and out["image"].dtype == np.float32
    assert out["lulc"].shape == (16, 16, 9) and out["s1"].shape == (16, 16, 2)
    assert out["dem"].shape == (16, 16, 5) and out["label"].dtype == np.int32
    for key in ("image", "s1"):
        assert np.all(np.abs(out[key]) <= 1.0)
    for key in ("image", "s1", "dem", "lulc"):
        assert np.all(np.isfinite(out[key]))
    # Clipping and scaling: a value at the 99th percentile maps to +1, above it stays +1.
    t2 = make_tile(16, 5)
    t2["s2"][6, 6] = normalizer.s2_high.astype(np.uint16) + 1000
    t2["s2"][7, 7] = np.ceil(normalizer.s2_low).astype(np.uint16)
    o2 = ip.normalize_tile(t2, normalizer, ())
    np.testing.assert_allclose(o2["image"][6, 6], 1.0)
    expected = 2 * (np.ceil(normalizer.s2_low) - normalizer.s2_low) / (normalizer.s2_high - normalizer.s2_low) - 1
    np.testing.assert_allclose(o2["image"][7, 7], expected, atol=1e-6)
    # No data: optical, SAR, land cover, DEM.
    assert not out["valid"][0, 0] and np.all(out["image"][0, 0] == 0)
    assert not out["valid"][1, 1] and out["s1"][1, 1, 0] == 0 and out["s1"][1, 1, 1] != 0
    assert not out["valid"][2, 2] and np.all(out["lulc"][2, 2] == 0) and out["label"][2, 2] == 255
    assert not out["valid"][3, 3] and out["dem"][3, 3, 0] == 0
    assert out["valid"].sum() == 16 * 16 - 4
    # One-hot of valid labels.
    np.testing.assert_array_equal(out["lulc"][8, 8].argmax(), tile["lulc"][8, 8])
    assert out["lulc"][8, 8].sum() == 1
    # Aspect: sin/cos, flat -> (0, 0); elevation standardized; hillshade in [-1, 1].
    np.testing.assert_allclose(out["dem"][4, 4, 2:4], [1.0, 0.0], atol=1e-6)
    np.testing.assert_array_equal(out["dem"][5, 5, 2:4], [0.0, 0.0])
    np.testing.assert_allclose(out["dem"][9, 9, 0],
                               (tile["dem"][9, 9, 0] - normalizer.elevation_mean) / normalizer.elevation_std,
                               rtol=1e-5)
    np.testing.assert_allclose(out["dem"][9, 9, 1], tile["dem"][9, 9, 1] / 90, rtol=1e-6)
    np.testing.assert_allclose(out["dem"][9, 9, 4], tile["dem"][9, 9, 3] / 127.5 - 1, rtol=1e-5)


def test_sources_select_the_outputs(normalizer):
    tile = make_tile(16, 0)
    assert set(ip.normalize_tile(tile, normalizer, ())) == {"image", "label", "valid"}
    assert set(ip.normalize_tile(tile, normalizer, ("s1",))) == {"image", "label", "valid", "s1"}
    with pytest.raises(ValueError, match="unknown"):
        ip.check_sources(("s1", "radar"))


def test_reflectance_mappings_invert_the_normalization(normalizer):
    tile = make_tile(16, 0)
    out = ip.normalize_tile(tile, normalizer, ())
    inside = out["valid"][..., None] & (tile["s2"] >= normalizer.s2_low) & (tile["s2"] <= normalizer.s2_high)
    back = ip.image_to_reflectance(out["image"], normalizer)
    np.testing.assert_allclose(back[inside], (tile["s2"] / 10000.0)[inside], rtol=1e-5)
    r01 = ip.image_to_reflectance01(out["image"])
    assert r01.min() >= 0 and r01.max() <= 1
    np.testing.assert_allclose(ip.image_to_reflectance01(np.array([-1.0, 0.0, 1.0, 2.0])), [0, 0.5, 1, 1])


# ----------------------------------------------------------------------------
# Augmentation keeps the terrain honest
# ----------------------------------------------------------------------------

def _terrain_aspect(z):
    from rsjax.data import terrain    # the ingestion's Horn aspect, checked against gdaldem there
    out = terrain.aspect_degrees(np.asarray(z, np.float64))
    if out.shape != z.shape:          # interior only: give it a halo like the local version
        out = terrain.aspect_degrees(np.pad(np.asarray(z, np.float64), 1, mode="edge"))
    return out


@pytest.mark.parametrize("reference", [horn_aspect, _terrain_aspect], ids=["local_horn", "rsjax_terrain"])
@pytest.mark.parametrize("flip", [False, True])
@pytest.mark.parametrize("quarter_turns", [0, 1, 2, 3])
def test_moved_aspect_equals_aspect_recomputed_on_the_moved_elevation(flip, quarter_turns, reference):
    tile = make_tile(32, 7)
    tile["dem"][3, 3, 0] = 1.0   # keep the elevation finite for Horn
    tile["dem"][..., 2] = reference(tile["dem"][..., 0])
    moved = ip.flip_and_rotate(tile, flip=flip, quarter_turns=quarter_turns)
    recomputed = reference(moved["dem"][..., 0])
    got = moved["dem"][..., 2]
    inner = (slice(1, -1), slice(1, -1))              # edge padding is not rotation-symmetric
    flat = recomputed[inner] == contract.ASPECT_FLAT
    assert flat.sum() > 10
    np.testing.assert_array_equal(got[inner][flat], contract.ASPECT_FLAT)
    diff = np.mod(got[inner][~flat] - recomputed[inner][~flat] + 180.0, 360.0) - 180.0
    assert np.abs(diff).max() < 1e-3
    # The other sources moved like the elevation.
    ref = tile["s2"][:, ::-1] if flip else tile["s2"]
    np.testing.assert_array_equal(moved["s2"], np.rot90(ref, quarter_turns))


def test_aspect_moves_as_documented():
    a = np.array([0.0, 90.0, 200.0, contract.ASPECT_FLAT, np.nan], np.float32)
    np.testing.assert_allclose(ip.transform_aspect(a, flip=False, quarter_turns=1)[:3], [270, 0, 110])
    np.testing.assert_allclose(ip.transform_aspect(a, flip=True, quarter_turns=0)[:3], [0, 270, 160])
    out = ip.transform_aspect(a, flip=True, quarter_turns=3)
    assert out[3] == contract.ASPECT_FLAT and np.isnan(out[4])


# ----------------------------------------------------------------------------
# The grain pipeline over in-memory tiles
# ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiles():
    return [make_tile(16, s, tile_index=s) for s in range(20)]


def _collect(it, n):
    return [jax.tree.map(np.asarray, next(it)) for _ in range(n)]


def test_eval_batches_are_global_arrays_sharded_on_data_and_padded(tiles, normalizer):
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("data",))
    it = ip.batch_iterator(tiles, normalizer, global_batch_size=8, mesh=mesh, train=False, seed=0,
                           sources=("lulc", "s1", "dem"))
    batches = list(it)
    assert len(batches) == 3                         # 20 tiles: 8 + 8 + 4 padded to 8
    b = batches[0]
    assert b["image"].shape == (8, 16, 16, 4) and b["lulc"].shape == (8, 16, 16, 9)
    assert b["dem"].shape == (8, 16, 16, 5) and b["s1"].shape == (8, 16, 16, 2)
    assert b["label"].dtype == np.int32 and b["valid"].dtype == bool
    assert isinstance(b["image"], jax.Array)
    assert b["image"].sharding.spec == jax.sharding.PartitionSpec("data")
    assert len(b["image"].addressable_shards) == 8
    expected = ip.normalize_tile(tiles[9], normalizer, ("lulc", "s1", "dem"))
    np.testing.assert_array_equal(np.asarray(batches[1]["dem"][1]), expected["dem"])
    last = jax.tree.map(np.asarray, batches[2])
    assert last["valid"][:4].any(axis=(1, 2)).all() and not last["valid"][4:].any()
    assert np.all(last["label"][4:] == 255)


def test_training_batches_are_seeded_and_resume_exactly(tiles, normalizer):
    def make(seed):
        return ip.batch_iterator(tiles, normalizer, global_batch_size=4, mesh=None, train=True,
                                 seed=seed, sources=("dem",))
    a, b = make(1), make(1)
    first = _collect(a, 3)
    np.testing.assert_array_equal(first[2]["dem"], _collect(b, 3)[2]["dem"])
    assert not np.array_equal(first[0]["image"], _collect(make(2), 1)[0]["image"])
    # Repeats past one epoch (20 tiles = 5 batches).
    state = a.get_state()
    expected = _collect(a, 4)
    c = make(1)
    c.set_state(state)
    for want, got in zip(expected, _collect(c, 4)):
        for key in want:
            np.testing.assert_array_equal(want[key], got[key])


def test_subset_and_mixed_sources_resume_in_a_new_process_like_object(tiles, normalizer):
    # A resumed run builds its source anew; grain compares repr(source) with the
    # saved one, so equal sources must have equal reprs and others not.
    images = np.stack([np.zeros_like(tiles[0]["s2"], np.float32)] * 3)

    def sources():
        return [ip.SubsetSource(tiles, range(2, 18)),
                ip.MixedSource(tiles, range(12), [(14, 0), (15, 1), (16, 2)], images)]
    for saved, fresh in zip(sources(), sources()):
        a = ip.batch_iterator(saved, normalizer, global_batch_size=4, mesh=None, train=True,
                              seed=5, sources=("dem",))
        _collect(a, 2)
        state = a.get_state()
        expected = _collect(a, 3)
        b = ip.batch_iterator(fresh, normalizer, global_batch_size=4, mesh=None, train=True,
                              seed=5, sources=("dem",))
        b.set_state(state)
        for want, got in zip(expected, _collect(b, 3)):
            np.testing.assert_array_equal(want["dem"], got["dem"])
    assert repr(ip.SubsetSource(tiles, range(2, 18))) != repr(ip.SubsetSource(tiles, range(3, 19)))
    other = images.copy()
    other[0, 0, 0, 0] = 1.0
    assert (repr(ip.MixedSource(tiles, range(12), [(14, 0)], images))
            != repr(ip.MixedSource(tiles, range(12), [(14, 0)], other)))


def test_pipeline_with_a_worker_process_resumes_exactly(tiles, normalizer):
    def make():   # batch_iterator marks absl flags parsed for grain's workers

        return ip.batch_iterator(tiles, normalizer, global_batch_size=4, mesh=None, train=True,
                                 seed=3, sources=("s1",), worker_count=1)
    a = make()
    _collect(a, 2)
    state = a.get_state()
    want = _collect(a, 2)
    b = make()
    b.set_state(state)
    got = _collect(b, 2)
    for w, g in zip(want, got):
        np.testing.assert_array_equal(w["s1"], g["s1"])
        np.testing.assert_array_equal(w["image"], g["image"])


def test_a_checkpoint_restores_the_iterator_where_it_was(tiles, normalizer, tmp_path):
    """The trainers' Checkpointer saves the iterator with grain's own Orbax
    handler (one file per process) and a restored iterator goes on exactly."""
    from rsjax.trainers.checkpoints import Checkpointer

    def make():
        return ip.batch_iterator(tiles, normalizer, global_batch_size=4, mesh=None, train=True,
                                 seed=5, sources=("s1",))
    a = make()
    _collect(a, 3)
    ckpt = Checkpointer(tmp_path, every_steps=1, keep=2, async_save=False)
    assert ckpt.save(3, {"w": np.ones(2, np.float32)}, a)
    ckpt.close()
    want = _collect(a, 4)                  # past the end of an epoch (5 batches)
    assert (tmp_path / "checkpoints" / "3" / "data_iter" / "process_0-of-1.json").exists()
    b = make()
    ckpt = Checkpointer(tmp_path, every_steps=1, keep=2, async_save=False)
    state, step = ckpt.restore({"w": jax.ShapeDtypeStruct((2,), np.float32)}, b)
    ckpt.close()
    assert step == 3
    np.testing.assert_array_equal(np.asarray(state["w"]), np.ones(2))
    for w, g in zip(want, _collect(b, 4)):
        np.testing.assert_array_equal(w["s1"], g["s1"])
        np.testing.assert_array_equal(w["image"], g["image"])


def test_batch_size_must_divide_the_mesh(tiles, normalizer):
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("data",))
    with pytest.raises(ValueError, match="'data' axis"):
        ip.batch_iterator(tiles, normalizer, global_batch_size=6, mesh=mesh, train=True, seed=0,
                          sources=())


# ----------------------------------------------------------------------------
# End to end: the dummy scenes built as a TFDS dataset, read by create_iterator
# ----------------------------------------------------------------------------

DUMMY_SCENES = __import__("pathlib").Path(__file__).resolve().parents[1] / "tfds_builder" / "rs_multisource" / "dummy_data"


def dummy_data_cfg(data_dir):
    import ml_collections
    cfg = ml_collections.ConfigDict()
    cfg.name = "rs_multisource/manual"
    cfg.data_dir = str(data_dir)
    cfg.tile_size = 16
    cfg.block_tiles = 1
    cfg.split_seed = 1
    cfg.worker_count = 0
    cfg.augment = True
    cfg.manual_dir = str(DUMMY_SCENES)
    return cfg


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    cfg = dummy_data_cfg(tmp_path_factory.mktemp("tfds"))
    with pytest.raises(FileNotFoundError, match=r"is not built in .*rsjax build --dataset manual"):
        ip.create_iterator(cfg, "train", global_batch_size=8, mesh=None, train=True, seed=0)
    builder = ip.ensure_dataset(cfg)
    assert builder.builder_config.name == "manual_b1_seed1_t16"
    return cfg, builder


def test_create_iterator_reads_the_built_dataset(built):
    cfg, builder = built
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("data",))
    train = ip.create_iterator(cfg, "train", global_batch_size=8, mesh=mesh, train=True, seed=0,
                               sources=("lulc", "dem"))
    batch = next(train)
    assert set(batch) == {"image", "lulc", "dem", "label", "valid"}
    assert batch["image"].shape == (8, 16, 16, 4) and batch["dem"].shape == (8, 16, 16, 5)
    assert batch["image"].sharding.spec == jax.sharding.PartitionSpec("data")
    image = np.asarray(batch["image"])
    assert -1.0 <= image.min() < 0.0 < image.max() <= 1.0
    # Evaluation sees every test tile once, in order, padded to whole batches.
    n_test = builder.info.splits["test"].num_examples
    batches = list(ip.create_iterator(cfg, "test", global_batch_size=8, mesh=mesh, train=False,
                                      seed=0, sources=("s1",)))
    assert len(batches) == math.ceil(n_test / 8)
    real = sum(int(np.asarray(b["valid"]).any(axis=(1, 2)).sum()) for b in batches)
    assert real == n_test
    # The normalizer comes from the stored train statistics.
    stats = ip.load_statistics(builder)
    norm = ip.Normalizer.from_statistics(stats)
    np.testing.assert_allclose(norm.s1_low, stats["s1"]["percentiles"]["p1"], rtol=1e-6)


def test_training_class_weights_come_from_the_train_frequencies(built):
    """What the segmentation trainer weighs its loss with: inverse train-split
    frequencies (the pixel-weighted mean weight 1), 0 for absent classes."""
    import ml_collections

    from rsjax.errors import ConfigError
    from rsjax.trainers import segmentation

    cfg, builder = built
    freq = np.asarray(ip.load_statistics(builder)["lulc"]["frequencies"])
    config = ml_collections.ConfigDict({"data": cfg, "class_weights": "inverse"})
    w = np.asarray(segmentation.class_weights(config))
    present = freq > 0
    assert present.sum() >= 2 and not present.all()       # the test can tell the classes apart
    assert np.all(w[~present] == 0)
    np.testing.assert_allclose(w[present] * freq[present], (w[present] * freq[present])[0], rtol=1e-5)
    np.testing.assert_allclose(np.sum(w * freq) / np.sum(freq), 1.0, rtol=1e-5)
    config.class_weights = "none"
    assert segmentation.class_weights(config) is None
    config.class_weights = "inverse_frequency"
    with pytest.raises(ConfigError, match="class_weights"):
        segmentation.class_weights(config)


def test_generated_images_mix_one_to_one_with_real_tiles(built, tmp_path):
    cfg, builder = built
    real = builder.as_data_source(split="train")
    ids = [real[i]["tile_id"].decode() for i in range(4)]
    norm = ip.Normalizer.from_statistics(ip.load_statistics(builder))
    image = np.zeros((4, 16, 16, 4), np.float32)          # mid-range reflectance in model space
    np.savez(tmp_path / "gen.npz", tile_id=np.array(ids), image=image)
    # Rate 1 over the 4 real tiles those images belong to: 4 real + 4 generated.
    mixed = ip.generated_source(real, str(tmp_path), norm, real_indices=range(4))
    assert len(mixed) == 8
    generated = [mixed[i] for i in range(4, 8)]
    assert sorted(r["tile_id"].decode() for r in generated) == sorted(ids)
    for rec in generated:                       # each image with its own tile's labels
        k = ids.index(rec["tile_id"].decode())
        np.testing.assert_array_equal(rec["lulc"], real[k]["lulc"])
        back = ip.normalize_tile(rec, norm, ())["image"]
        valid = np.any(real[k]["s2"] != 0, axis=-1)
        np.testing.assert_allclose(back[valid], 0.0, atol=2e-3)
    # The real part is the real records themselves.
    assert [mixed[i]["tile_id"].decode() for i in range(4)] == ids


def test_new_layouts_take_every_generated_image_of_the_other_tiles(built, tmp_path):
    # Real part: tiles 0-3; generated images for tiles 4-6 only (three, fewer
    # than the four real ones, as the optical-less half of a split can be).
    cfg, builder = built
    real = builder.as_data_source(split="train")
    ids = [real[i]["tile_id"].decode() for i in range(4, 7)]
    norm = ip.Normalizer.from_statistics(ip.load_statistics(builder))
    np.savez(tmp_path / "gen.npz", tile_id=np.array(ids), image=np.zeros((3, 16, 16, 4), np.float32))
    with pytest.raises(ValueError, match="mix_rate=1 asks for 4 generated images"):
        ip.generated_source(real, str(tmp_path), norm, real_indices=range(4))
    mixed = ip.generated_source(real, str(tmp_path), norm, rate=None, real_indices=range(4))
    assert len(mixed) == 7
    assert sorted(mixed[i]["tile_id"].decode() for i in range(4, 7)) == sorted(ids)
    for i in range(4, 7):                       # each with its own (unseen) tile's labels
        k = 4 + ids.index(mixed[i]["tile_id"].decode())
        np.testing.assert_array_equal(mixed[i]["lulc"], real[k]["lulc"])


def test_builders_of_named_and_derived_configs_survive_pickling(tmp_path):
    # grain's worker processes receive the data source, and with it the builder, pickled.
    import pickle
    cfg = dummy_data_cfg(tmp_path)
    cfg.tile_size, cfg.block_tiles, cfg.split_seed = 256, None, None      # exactly 'manual'
    named = ip.get_builder(cfg)
    assert named.builder_config.name == "manual"
    assert pickle.loads(pickle.dumps(named)).builder_config.name == "manual"
    cfg.tile_size = 128
    derived = ip.get_builder(cfg)
    assert pickle.loads(pickle.dumps(derived)).builder_config.name == "manual_t128"


def test_build_summary_reports_split_counts_and_reuses_a_built_dataset(built):
    cfg, builder = built
    summary = ip.build(cfg, manual_dir=cfg.manual_dir)
    assert summary["built"] is False and summary["tiles_per_s"] is None
    assert summary["dataset"] == "rs_multisource/manual_b1_seed1_t16"
    assert summary["splits"] == {"train": 21, "validation": 5, "test": 5}
    assert summary["build_report"]["ingest"]["tiles_dropped_nodata"] == 1   # scene_b's empty corner
