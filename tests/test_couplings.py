"""Ridge-R² couplings: the regression and R² against independent references, and the ordering."""
import json

import numpy as np
import pytest

from rsjax import cli
from rsjax.data import couplings, synthetic
from rsjax.data.contract import NUM_CLASSES
from rsjax.errors import UserError


def _toy(n=300, d=5, k=4, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)) * rng.uniform(0.5, 20, d) + rng.normal(size=d) * 5
    y = x @ rng.normal(size=(d, k)) + 0.3 + rng.normal(size=(n, k))
    return x, y


def test_ridge_without_penalty_is_least_squares_with_intercept():
    x, y = _toy()
    fitted = couplings.ridge_predict(couplings.ridge_fit(x, y, lam=0.0), x)
    design = np.column_stack([x, np.ones(len(x))])
    reference = design @ np.linalg.lstsq(design, y, rcond=None)[0]
    np.testing.assert_allclose(fitted, reference, rtol=1e-9, atol=1e-9)


def test_ridge_with_constant_and_collinear_columns_still_fits():
    # A one-hot with an absent class (constant 0) and columns that sum to one.
    labels = np.random.default_rng(1).integers(0, 3, 200)
    x = (labels[:, None] == np.arange(5)).astype(float)
    y = np.array([0.1, 0.5, 0.9])[labels][:, None]
    prediction = couplings.ridge_predict(couplings.ridge_fit(x, y, lam=0.0), x)
    np.testing.assert_allclose(prediction, y, atol=1e-9)


def test_ridge_penalty_matches_augmented_least_squares():
    # Ridge = least squares on the standardised data stacked over sqrt(lam) * I.
    x, y = _toy(seed=2)
    lam = 50.0
    model = couplings.ridge_fit(x, y, lam)
    z = (x - x.mean(0)) / x.std(0)
    stacked_x = np.vstack([z, np.sqrt(lam) * np.eye(z.shape[1])])
    stacked_y = np.vstack([y - y.mean(0), np.zeros((z.shape[1], y.shape[1]))])
    weights = np.linalg.lstsq(stacked_x, stacked_y, rcond=None)[0]
    np.testing.assert_allclose(model["weights"], weights, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(couplings.ridge_predict(model, x), z @ weights + y.mean(0), atol=1e-12)


def test_r2_by_hand():
    y = np.array([[1.0, 2.0], [2.0, 0.0], [4.0, 1.0], [5.0, 5.0]])
    pred = np.array([[1.5, 2.0], [2.0, 1.0], [3.0, 1.0], [5.0, 3.0]])
    expected = []
    for b in range(2):
        ss_res = sum((y[i, b] - pred[i, b]) ** 2 for i in range(4))
        mean = sum(y[:, b]) / 4
        ss_tot = sum((y[i, b] - mean) ** 2 for i in range(4))
        expected.append(1 - ss_res / ss_tot)
    np.testing.assert_allclose(couplings.r2_per_band(y, pred), expected, rtol=1e-12)
    np.testing.assert_allclose(couplings.r2_per_band(y, y), 1.0)
    np.testing.assert_allclose(couplings.r2_per_band(y, np.broadcast_to(y.mean(0), y.shape)), 0.0, atol=1e-12)


def test_local_mean_3x3_with_replicated_edges():
    x = np.arange(20.0).reshape(4, 5, 1)
    out = couplings.local_mean_3x3(x)
    assert out[1, 1, 0] == pytest.approx(x[0:3, 0:3, 0].mean())
    padded = np.pad(x[..., 0], 1, mode="edge")
    assert out[0, 0, 0] == pytest.approx(padded[0:3, 0:3].mean())
    assert out[3, 4, 0] == pytest.approx(padded[3:6, 4:7].mean())


def _tile(h=8, w=8, seed=0):
    rng = np.random.default_rng(seed)
    return dict(
        s2=rng.integers(100, 3000, (h, w, 4)).astype(np.uint16),
        s1=rng.normal(-12, 3, (h, w, 2)).astype(np.float32),
        lulc=rng.integers(0, NUM_CLASSES, (h, w)).astype(np.uint8),
        dem=np.stack([rng.uniform(100, 900, (h, w)), rng.uniform(0, 30, (h, w)),
                      rng.uniform(0, 360, (h, w)), rng.uniform(1, 255, (h, w))], -1).astype(np.float32))


def test_source_channels():
    tile = _tile()
    tile["lulc"][0, 0] = 255
    tile["dem"][1, 1, 2] = -9999.0                          # flat cell: no aspect
    tile["dem"][2, 2, 2] = 90.0
    onehot = couplings.source_channels(tile, "lulc")
    assert onehot.shape == (8, 8, NUM_CLASSES)
    assert np.isnan(onehot[0, 0]).all()
    assert onehot[3, 3].sum() == 1 and onehot[3, 3, tile["lulc"][3, 3]] == 1
    dem = couplings.source_channels(tile, "dem")
    assert dem.shape == (8, 8, 5)
    np.testing.assert_array_equal(dem[1, 1, 2:4], [0.0, 0.0])
    np.testing.assert_allclose(dem[2, 2, 2:4], [1.0, 0.0], atol=1e-12)   # sin, cos of east
    with pytest.raises(ValueError, match="unknown source 'sar'"):
        couplings.source_channels(tile, "sar")


def test_nodata_pixels_are_never_sampled():
    tile = _tile(16, 16)
    tile["s1"][:4, :, 0] = np.nan                          # rows 0-3 and, via 3x3 means, row 4
    tile["lulc"][:, 12:] = 255                             # columns 12-15 and column 11
    tile["s2"][10, 0] = 0                                  # one S2 nodata pixel
    split = couplings.tile_samples(tile, ["lulc", "s1", "dem"], 10_000, np.random.default_rng(0),
                                   test_every=2, block=4)
    n = sum(len(target) for _, target in split.values())
    assert n == 11 * 11 - 1
    for features, target in split.values():
        assert all(np.isfinite(f).all() for f in features.values())
        assert target.min() > 0


def test_holdout_mask_puts_a_share_of_every_tile_in_both_splits():
    mask = couplings.holdout_mask((256, 256), block=32, test_every=4)
    assert mask.mean() == pytest.approx(0.25, abs=0.02)
    assert mask[:128, :128].any() and (~mask[:128, :128]).any()


def test_ordering_violations():
    good = {"lulc": 0.5, "s1": 0.1, "dem": 0.2, "lulc+s1": 0.6, "lulc+dem": 0.7, "s1+dem": 0.3,
            "lulc+s1+dem": 0.8}
    assert couplings.ordering_violations(good) == []
    bad = dict(good, **{"lulc+dem": 0.85})
    broken = couplings.ordering_violations(bad)
    assert len(broken) == 1 and broken[0].startswith("lulc+s1+dem")
    assert couplings.ordering_violations(good, margin=0.15) != []


def test_too_few_tiles_is_a_clear_error():
    with pytest.raises(UserError, match="too few valid pixels: no tiles"):
        couplings.coupling_r2([])


def test_holdout_stripes_run_over_the_scene_so_tiles_smaller_than_the_stripes_get_a_share():
    """Issue 27: with 64 px tiles and 32 px blocks, stripes restarted in every
    tile never reach the held-out phase (block indices sum to 2 at most, the
    held-out one is 3): nothing was held out. Laid over the scene, the tiles'
    masks are the scene's mask cut into tiles."""
    scene = couplings.holdout_mask((256, 256), block=32, test_every=4)
    tiles = synthetic.scene_tiles(synthetic.render_scene_arrays("s", 256, (0, 0)), tile_size=64)
    seen = np.zeros_like(scene)
    for index, tile in enumerate(tiles):
        row, col = couplings.tile_origin(tile, index)
        seen[row:row + 64, col:col + 64] = couplings.holdout_mask((64, 64), 32, 4, (row, col))
    np.testing.assert_array_equal(seen, scene)
    assert scene.mean() == pytest.approx(0.25, abs=0.02)
    assert not couplings.holdout_mask((64, 64), 32, 4).any()     # one tile at the origin: none


def test_tile_origin_from_the_tile_id_or_side_by_side():
    from rsjax.data.ingest import tile_id

    assert couplings.tile_origin({"tile_id": tile_id("a_r1_c2", 512, 64), "s2": np.zeros((64, 64, 4))},
                                 7) == (512, 64)
    assert couplings.tile_origin({"s2": np.zeros((64, 48, 4))}, 3) == (0, 144)
    # Tiles without ids, laid side by side: small tiles still land in both splits.
    result = couplings.coupling_r2((_tile(64, 64, seed=k) for k in range(4)), [("s1",)])
    assert result["test_pixels"] == pytest.approx(0.25 * 4 * 62 * 62, rel=0.1)


@pytest.fixture(scope="module")
def small_result():
    def tiles():
        for k in range(3):
            scene = synthetic.render_scene_arrays(f"synth_s0_{k:03d}", 256, (0, k))
            yield from synthetic.scene_tiles(scene, tile_size=128, seed=(0, k, 1))
    return couplings.coupling_r2(tiles(), pixels_per_tile=4096, block=16)


def test_every_source_adds_information(small_result):
    r2 = {name: row["r2"] for name, row in small_result["subsets"].items()}
    assert list(r2) == ["lulc", "s1", "dem", "lulc+s1", "lulc+dem", "s1+dem", "lulc+s1+dem"]
    assert couplings.ordering_violations(r2, margin=0.01) == []
    assert small_result["test_pixels"] > 5000 and small_result["train_pixels"] > 3 * 5000


def test_markdown_table(small_result):
    table = couplings.markdown_table(small_result).splitlines()
    assert table[0].startswith("| sources | R² (mean) | B2 | B3 | B4 | B8 |")
    assert len(table) == 2 + 7 and table[-1].startswith("| lulc+s1+dem |")


@pytest.fixture(scope="module")
def written_scenes(tmp_path_factory):
    scenes = tmp_path_factory.mktemp("couplings") / "scenes"
    synthetic.write_scenes(scenes, num_scenes=2, size=256, seed=0)
    return scenes


# rasterio's own windows.py still multiplies Affines with `*` (its pending deprecation, not ours).
@pytest.mark.filterwarnings("ignore::PendingDeprecationWarning:rasterio.windows")
def test_command_on_written_scenes_through_ingestion(written_scenes, tmp_path, capsys):
    # The real path: GeoTIFFs from the writer, registered and tiled by rsjax.data.ingest.
    out = tmp_path / "couplings.json"
    code = cli.main(["couplings", "--scenes_dir", str(written_scenes), "--tile_size", "128",
                           "--block", "16", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "| lulc+s1+dem |" in printed
    result = json.loads(out.read_text())
    assert code == 0 and result["ordering_holds"] and result["violations"] == []
    assert result["tiles"] == 8
    r2 = {name: row["r2"] for name, row in result["subsets"].items()}
    assert couplings.ordering_violations(r2, margin=0.01) == []


@pytest.mark.filterwarnings("ignore::PendingDeprecationWarning:rasterio.windows")
def test_command_with_tiles_smaller_than_the_stripes(written_scenes, tmp_path, capsys):
    """`rsjax couplings --tile_size 64` (issue 27) was a ValueError traceback
    ("too few valid pixels (... 0 to score)"): now a quarter of the pixels are held out."""
    out = tmp_path / "couplings.json"
    code = cli.main(["couplings", "--scenes_dir", str(written_scenes), "--tile_size", "64",
                           "--out", str(out)])
    captured = capsys.readouterr()
    assert code in (0, 1) and "Traceback" not in captured.err and "error:" not in captured.err
    result = json.loads(out.read_text())
    assert result["tiles"] == 32
    share = result["test_pixels"] / (result["test_pixels"] + result["train_pixels"])
    assert share == pytest.approx(0.25, abs=0.03)


@pytest.mark.filterwarnings("ignore::PendingDeprecationWarning:rasterio.windows")
@pytest.mark.parametrize("args, message", [
    (["--test_every", "1"], "error: --test_every 1: must be at least 2"),
    (["--test_every", "100"], "the held-out blocks (32 x 32 px, one in 100 in diagonal stripes "
                              "over each scene) cover too few pixels"),
    (["--tile_size", "512"], "no tiles (every scene smaller than the tile, or mostly no-data): "
                             "give larger scenes or a smaller --tile_size"),
    (["--lam", "-1"], "error: --lam -1.0: the ridge penalty must be 0 or more"),
])
def test_command_mistakes_are_one_error_line(written_scenes, capsys, args, message):
    code = cli.main(["couplings", "--scenes_dir", str(written_scenes), *args])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err
    assert len([line for line in err.splitlines() if line.startswith("error:")]) == 1
