"""Ridge-R² couplings: the regression and R² against independent references, and the ordering."""
import json

import numpy as np
import pytest

from rsjax.data import couplings, synthetic
from rsjax.data.contract import NUM_CLASSES


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
    with pytest.raises(ValueError, match="too few valid pixels"):
        couplings.coupling_r2([])


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


# rasterio's own windows.py still multiplies Affines with `*` (its pending deprecation, not ours).
@pytest.mark.filterwarnings("ignore::PendingDeprecationWarning:rasterio.windows")
def test_command_on_written_scenes_through_ingestion(tmp_path, capsys):
    # The real path: GeoTIFFs from the writer, registered and tiled by rsjax.data.ingest.
    synthetic.write_scenes(tmp_path / "scenes", num_scenes=2, size=256, seed=0)
    out = tmp_path / "couplings.json"
    code = couplings.main(["--scenes_dir", str(tmp_path / "scenes"), "--tile_size", "128",
                           "--block", "16", "--json_out", str(out)])
    printed = capsys.readouterr().out
    assert "| lulc+s1+dem |" in printed
    result = json.loads(out.read_text())
    assert code == 0 and result["ordering_holds"] and result["violations"] == []
    assert result["tiles"] == 8
    r2 = {name: row["r2"] for name, row in result["subsets"].items()}
    assert couplings.ordering_violations(r2, margin=0.01) == []
