"""Cloud-removal metrics against hand computation (numpy, float64, arccos for
SAM) and scikit-image's SSIM map, region by region and bin by bin."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpy.lib.stride_tricks import sliding_window_view
from skimage.metrics import structural_similarity

from rsjax import cloud_metrics as cm

H = W = 24


_parts = jax.jit(cm.cloud_metric_parts)


def _batch():
    """Three images: clouds, shadows and no-data in known places; the third has no mask."""
    rng = np.random.default_rng(1)
    target = rng.uniform(0.02, 0.6, (3, H, W, 4))
    pred = np.clip(target + rng.normal(0, 0.05, target.shape), 0.001, 1)
    pred[0, :8] = 0.8 * target[0, :8] + 0.1               # worse under the cloud
    mask = np.zeros((3, H, W), np.uint8)
    mask[0, :8] = cm.MASK_CLOUD
    mask[0, 8:11, :12] = cm.MASK_SHADOW
    mask[1, :, :20] = cm.MASK_CLOUD                        # 20/24 cloud, no shadow
    mask[2, 5, 5] = cm.MASK_UNKNOWN                        # exported without a mask
    valid = np.ones((3, H, W), bool)
    valid[0, 20:, 18:] = False                             # a no-data corner
    pred[0, 22, 20] = np.nan                               # garbage under it
    return pred, target, mask, valid


def _reference(pred, target, region, valid):
    """One image's metrics in a region by hand."""
    p, t = pred[region].astype(np.float64), target[region].astype(np.float64)
    if not len(p):
        return None
    e = p - t
    mse = np.mean(e ** 2)
    cos = np.sum(p * t, -1) / (np.linalg.norm(p, axis=-1) * np.linalg.norm(t, axis=-1))
    # The prediction with the truth put back outside the region.
    within = np.where(region[..., None], pred, target)
    _, full = structural_similarity(np.where(valid[..., None], target, 0),
                                    np.where(valid[..., None], within, 0), data_range=1.0,
                                    channel_axis=-1, gaussian_weights=True, sigma=1.5,
                                    use_sample_covariance=False, full=True)
    windows_valid = sliding_window_view(valid, (11, 11)).all(axis=(-2, -1))      # (H-10, W-10)
    centred = region[5:-5, 5:-5] & windows_valid
    return {"mae": np.mean(np.abs(e)), "rmse": math.sqrt(mse), "psnr": 10 * math.log10(1 / mse),
            "sam_deg": np.degrees(np.arccos(np.clip(cos, -1, 1))).mean(),
            "ssim": full.mean(-1)[5:-5, 5:-5][centred].mean() if centred.any() else None}


def _regions(mask, valid):
    return {"all": valid, "cloud": valid & (mask == 1), "shadow": valid & (mask == 2),
            "clear": valid & (mask == 0)}


def test_every_region_matches_hand_computation():
    pred, target, mask, valid = _batch()
    parts = _parts(jnp.asarray(pred, jnp.float32), jnp.asarray(target, jnp.float32),
                                           jnp.asarray(mask), jnp.asarray(valid))
    parts = cm.concat_parts([parts])
    values = cm.per_image_values(parts)
    np.testing.assert_array_equal(parts["has_mask"], [True, True, False])
    np.testing.assert_allclose(parts["cover"][:2], [8 * 24 / (24 * 24 - 24), 20 / 24])
    assert np.isnan(parts["cover"][2])
    expected_by_region = {name: [] for name in cm.METRICS}
    for i in range(3):
        for r, (region, pixels) in enumerate(_regions(mask[i], valid[i]).items()):
            if i == 2 and region != "all":
                pixels = np.zeros_like(pixels)              # unknown mask: 'all' only
            ref = _reference(pred[i], target[i], pixels, valid[i])
            for name in cm.METRICS:
                got = values[name][i, r]
                want = None if ref is None else ref[name]
                if want is None:
                    assert np.isnan(got), (i, region, name)
                else:
                    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5,
                                               err_msg=f"image {i} {region} {name}")
                    expected_by_region[name].append((region, want))
    scores = cm.cloud_scores(parts)
    for name in cm.METRICS:
        for region in cm.REGIONS:
            want = [v for reg, v in expected_by_region[name] if reg == region]
            np.testing.assert_allclose(scores["regions"][region][name], np.mean(want), rtol=2e-4)
    assert scores["regions"]["all"]["num_images"] == 3
    assert scores["regions"]["shadow"]["num_images"] == 1
    assert scores["regions"]["cloud"]["num_images"] == 2
    assert scores["num_images_with_mask"] == 2
    # The worse cloud part shows: under cloud the error exceeds the clear part's.
    assert scores["regions"]["cloud"]["mae"] > scores["regions"]["clear"]["mae"]


def test_cover_bins():
    assert list(cm.cover_bin_index([0.0, 0.0999, 0.1, 0.49, 0.5, 0.9, 1.0, np.nan])) == [
        0, 0, 1, 1, 2, 3, 3, -1]
    rng = np.random.default_rng(0)
    target = rng.uniform(0.1, 0.5, (5, 16, 16, 4))
    pred = target + 0.01 * np.arange(1, 6)[:, None, None, None]   # image k: error 0.01 k
    mask = np.zeros((5, 16, 16), np.uint8)
    for k, rows in enumerate([1, 5, 12, 15, 16]):                  # covers 1/16 .. 16/16
        mask[k, :rows] = cm.MASK_CLOUD
    parts = cm.concat_parts([_parts(jnp.asarray(pred), jnp.asarray(target),
                                                   jnp.asarray(mask))])
    scores = cm.cloud_scores(parts)
    bins = scores["by_cover"]
    assert list(bins) == ["0-10%", "10-50%", "50-90%", "90-100%"]
    assert [b["num_images"] for b in bins.values()] == [1, 1, 1, 2]
    np.testing.assert_allclose(bins["0-10%"]["regions"]["all"]["mae"], 0.01, rtol=1e-4)
    np.testing.assert_allclose(bins["90-100%"]["regions"]["all"]["mae"], 0.045, rtol=1e-4)
    np.testing.assert_allclose(bins["90-100%"]["regions"]["all"]["rmse"], 0.045, rtol=1e-4)
    np.testing.assert_allclose(bins["90-100%"]["regions"]["all"]["psnr"],
                               np.mean([-20 * np.log10(0.04), -20 * np.log10(0.05)]), rtol=1e-4)
    # The 100 % tile has no clear part: the bin's clear row averages one image.
    assert bins["90-100%"]["regions"]["clear"]["num_images"] == 1
    # split_metric gives the same numbers from the parts (for resampling).
    assert cm.split_metric("mae", "all", cover_bin=3)(parts) == pytest.approx(0.045, rel=1e-4)
    assert cm.split_metric("psnr")(parts) == pytest.approx(scores["regions"]["all"]["psnr"])


def test_without_a_mask_the_region_metrics_say_so():
    pred, target, _, _ = _batch()
    parts = cm.concat_parts([_parts(jnp.asarray(np.nan_to_num(pred)), jnp.asarray(target))])
    scores = cm.cloud_scores(parts)
    assert np.isfinite(scores["regions"]["all"]["psnr"])
    for region in ("cloud", "shadow", "clear"):
        assert math.isnan(scores["regions"][region]["psnr"])
        assert "needs a cloud mask" in scores["regions"][region]["note"]
    assert "needs a cloud mask" in scores["note"]
    assert all(b["num_images"] == 0 for b in scores["by_cover"].values())


def test_an_exact_copy_and_nan_on_valid_pixels():
    pred, target, mask, valid = _batch()
    parts = cm.concat_parts([_parts(jnp.asarray(target), jnp.asarray(target),
                                                   jnp.asarray(mask), jnp.asarray(valid))])
    scores = cm.cloud_scores(parts)["regions"]["all"]
    assert scores["mae"] == 0 and scores["psnr"] == pytest.approx(100.0)
    # A prediction right in the clear part and wrong under cloud: the clear
    # part scores perfectly, SSIM included (its windows see no cloud errors).
    half_wrong = np.where((mask == cm.MASK_CLOUD)[..., None], 0.5 * target, target)
    parts = cm.concat_parts([_parts(jnp.asarray(half_wrong), jnp.asarray(target), jnp.asarray(mask),
                                    jnp.asarray(valid))])
    clear = cm.cloud_scores(parts)["regions"]["clear"]
    assert clear["ssim"] == pytest.approx(1.0) and clear["psnr"] == pytest.approx(100.0)
    assert cm.cloud_scores(parts)["regions"]["cloud"]["ssim"] < 0.99
    assert scores["ssim"] == pytest.approx(1.0) and scores["sam_deg"] == pytest.approx(0.0, abs=1e-3)
    broken = target.copy()
    broken[1, 3, 3, 0] = np.nan                    # a diverged generator must show
    parts = cm.concat_parts([_parts(jnp.asarray(broken), jnp.asarray(target),
                                                   jnp.asarray(mask), jnp.asarray(valid))])
    assert math.isnan(cm.cloud_scores(parts)["regions"]["all"]["mae"])
