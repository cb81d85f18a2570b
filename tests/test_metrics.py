"""Metrics against independent references: scikit-image for PSNR/SSIM, hand
computation for SAM and the segmentation scores."""
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from rsjax import metrics


def _skimage_ssim(pred, target):
    return structural_similarity(target, pred, gaussian_weights=True, sigma=1.5,
                                 use_sample_covariance=False, data_range=1.0, channel_axis=-1)


def _image_pairs():
    """Random noise and structured scenes (smooth ramps, edges, flat blocks), (B, H, W, 4)."""
    rng = np.random.default_rng(0)
    random_target = rng.uniform(0, 1, (2, 24, 20, 4))
    random_pred = np.clip(random_target + rng.normal(0, 0.1, random_target.shape), 0, 1)

    yy, xx = np.mgrid[0:32, 0:32] / 31.0
    bands = [0.3 * xx, 0.5 * yy, (xx + yy) / 2, np.where(xx > 0.5, 0.9, 0.1)]
    structured_target = np.stack(bands, -1)[None]
    structured_target[:, 8:16, 8:16, :] = 0.25                      # a flat block: zero variance
    structured_pred = np.clip(0.9 * structured_target + 0.05 * np.sin(6 * xx)[None, ..., None], 0, 1)
    return [(random_pred, random_target), (structured_pred, structured_target)]


@pytest.mark.parametrize("case", [0, 1], ids=["random", "structured"])
def test_psnr_and_ssim_match_scikit_image(case):
    pred, target = _image_pairs()[case]
    psnr_values = np.asarray(metrics.psnr_per_image(jnp.asarray(pred, jnp.float32),
                                                    jnp.asarray(target, jnp.float32)))
    ssim_values = np.asarray(metrics.ssim_per_image(jnp.asarray(pred, jnp.float32),
                                                    jnp.asarray(target, jnp.float32)))
    for i in range(len(pred)):
        expected_psnr = peak_signal_noise_ratio(target[i], pred[i], data_range=1.0)
        np.testing.assert_allclose(psnr_values[i], expected_psnr, rtol=1e-5)
        # dm-pix's 'valid' map covers exactly the windows scikit-image keeps after
        # cropping its reflect-padded border, so no cropping is needed here.
        np.testing.assert_allclose(ssim_values[i], _skimage_ssim(pred[i], target[i]), rtol=2e-5)
    np.testing.assert_allclose(metrics.psnr(jnp.asarray(pred), jnp.asarray(target)),
                               psnr_values.mean(), rtol=1e-6)
    np.testing.assert_allclose(metrics.ssim(jnp.asarray(pred), jnp.asarray(target)),
                               ssim_values.mean(), rtol=1e-6)


def test_masked_psnr_and_ssim_use_only_valid_pixels_and_windows():
    pred, target = (jnp.asarray(a, jnp.float32) for a in _image_pairs()[1])
    mask = np.ones(target.shape[:3], bool)
    mask[0, :, 20:] = False                                        # right strip is no-data
    # Garbage under the mask, NaN included, must not change anything.
    poisoned = pred.at[0, :, 20:, :].set(1.0).at[0, 3, 25, :].set(jnp.nan)
    masked_psnr = metrics.psnr(poisoned, target, valid_mask=jnp.asarray(mask))
    np.testing.assert_allclose(
        masked_psnr, peak_signal_noise_ratio(np.asarray(target)[0, :, :20],
                                             np.asarray(pred)[0, :, :20], data_range=1.0), rtol=1e-5)
    # Fully valid 11x11 windows of a 32x20 crop = the SSIM of that crop.
    masked_ssim = metrics.ssim(poisoned, target, valid_mask=jnp.asarray(mask))
    np.testing.assert_allclose(
        masked_ssim, _skimage_ssim(np.asarray(pred)[0, :, :20], np.asarray(target)[0, :, :20]),
        rtol=1e-4)
    whole_sam = metrics.sam(pred[:, :, :20], target[:, :, :20])
    np.testing.assert_allclose(metrics.sam(poisoned, target, jnp.asarray(mask)), whole_sam, rtol=1e-6)


def test_perfect_reconstruction_has_finite_psnr():
    image = jnp.full((1, 16, 16, 4), 0.3)
    assert float(metrics.psnr(image, image)) == pytest.approx(100.0)
    assert float(metrics.ssim(image, image)) == pytest.approx(1.0, abs=1e-6)


def test_sam_hand_computed_angles():
    def angle(p, t, mask=None):
        p = jnp.asarray(p, jnp.float32).reshape(1, 1, -1, len(p[0]))
        t = jnp.asarray(t, jnp.float32).reshape(1, 1, -1, len(t[0]))
        return float(metrics.sam(p, t, None if mask is None else jnp.asarray(mask).reshape(1, 1, -1)))

    assert angle([[1, 0, 0, 0]], [[0, 1, 0, 0]]) == pytest.approx(math.pi / 2, rel=1e-6)
    assert angle([[0.2, 0.4, 0.1, 0.7]], [[0.2, 0.4, 0.1, 0.7]]) == pytest.approx(0.0, abs=1e-6)
    # Scale-invariant: a brighter copy has the same spectrum.
    assert angle([[0.4, 0.8, 0.2, 1.4]], [[0.2, 0.4, 0.1, 0.7]]) == pytest.approx(0.0, abs=1e-6)
    assert angle([[1, 0, 0, 0]], [[1, 1, 0, 0]]) == pytest.approx(math.pi / 4, rel=1e-6)
    assert angle([[1, 0, 0, 0]], [[-1, 0, 0, 0]]) == pytest.approx(math.pi, rel=1e-6)
    # 60 degrees: cos = 1/2.
    assert angle([[1, 0, 0, 0]], [[0.5, math.sqrt(3) / 2, 0, 0]]) == pytest.approx(math.pi / 3, rel=1e-6)
    # Zero vectors: no NaN.
    assert angle([[0, 0, 0, 0]], [[0.1, 0.2, 0.3, 0.4]]) == pytest.approx(math.pi / 2, rel=1e-6)
    assert angle([[0, 0, 0, 0]], [[0, 0, 0, 0]]) == 0.0
    # Mean over valid pixels only: (pi/2 + 0) / 2, the third pixel (pi/4) masked out.
    assert angle([[1, 0, 0, 0], [0, 1, 0, 0], [1, 0, 0, 0]],
                 [[0, 1, 0, 0], [0, 1, 0, 0], [1, 1, 0, 0]],
                 mask=[True, True, False]) == pytest.approx(math.pi / 4, rel=1e-6)


def test_sam_small_angles_are_accurate_in_float32():
    # arccos(cos) would round a 1e-4 rad angle to 0 or 3.5e-4 in float32.
    theta = 1e-4
    p = jnp.asarray([[[[1.0, 0.0, 0.0, 0.0]]]])
    t = jnp.asarray([[[[math.cos(theta), math.sin(theta), 0.0, 0.0]]]])
    assert float(metrics.sam(p, t)) == pytest.approx(theta, rel=1e-3)


def test_split_accumulation_equals_whole_split_computation():
    rng = np.random.default_rng(1)
    target = rng.uniform(0, 1, (6, 16, 16, 4)).astype(np.float32)
    pred = np.clip(target + rng.normal(0, 0.05, target.shape), 0, 1).astype(np.float32)
    mask = np.ones(target.shape[:3], bool)
    mask[1, 0:3, :] = False                      # SSIM keeps the windows below this strip
    mask[3] = False                              # an image with no data at all: left out
    mask[4, 5:7, :] = False                      # no fully valid 11x11 window: out of SSIM only
    update = jax.jit(metrics.image_metric_sums)

    sums = metrics.ImageMetricSums.zeros()
    for start in (0, 2, 5):                      # uneven batches
        end = {0: 2, 2: 5, 5: 6}[start]
        sums = sums.merge(jax.device_get(update(pred[start:end], target[start:end], mask[start:end])))
    scores = sums.compute()

    keep = [i for i in range(6) if i != 3]
    valid = mask[keep]
    expected_psnr = np.mean([peak_signal_noise_ratio(target[i][mask[i]], pred[i][mask[i]],
                                                     data_range=1.0) for i in keep])
    whole_sam = metrics.sam(pred[keep], target[keep], valid)
    whole_ssim = metrics.ssim(pred[keep], target[keep], valid_mask=valid)
    assert scores["num_images"] == 5 and scores["num_valid_pixels"] == int(mask.sum())
    assert scores["num_ssim_images"] == 4
    np.testing.assert_allclose(scores["psnr"], expected_psnr, rtol=1e-5)
    np.testing.assert_allclose(scores["ssim"], whole_ssim, rtol=1e-5)
    np.testing.assert_allclose(scores["sam_rad"], whole_sam, rtol=1e-5)
    np.testing.assert_allclose(scores["sam_deg"], np.degrees(whole_sam), rtol=1e-5)


def test_per_tile_parts_recompute_the_split_metrics_and_match_skimage():
    """The experiments resample tiles from per-tile parts: each tile's PSNR is
    scikit-image's, and the stats module's metrics of all parts equal the
    split-level scores."""
    from rsjax.experiments import stats

    rng = np.random.default_rng(7)
    target = rng.uniform(0, 1, (5, 16, 16, 4)).astype(np.float32)
    pred = np.clip(target + rng.normal(0, 0.05, target.shape), 0, 1).astype(np.float32)
    mask = np.ones(target.shape[:3], bool)
    mask[2] = False                              # no data: counts for nothing
    mask[3, 4:9, :] = False
    parts = jax.device_get(jax.jit(metrics.image_metric_parts)(pred, target, mask))
    assert np.isnan(parts["psnr"][2]) and not parts["has_psnr"][2] and parts["sam_count"][2] == 0
    for i in (0, 1, 3, 4):
        assert parts["psnr"][i] == pytest.approx(
            peak_signal_noise_ratio(target[i][mask[i]], pred[i][mask[i]], data_range=1.0), rel=1e-5)
    scores = metrics.ImageMetricSums.zeros().merge(metrics.sums_of_parts(parts)).compute()
    whole = metrics.ImageMetricSums.zeros().merge(
        jax.device_get(metrics.image_metric_sums(pred, target, mask))).compute()
    for name in ("psnr", "ssim", "sam"):
        assert stats.image_metric(name)(parts) == pytest.approx(whole[name if name != "sam" else "sam_rad"], rel=1e-6)
        assert scores[name if name != "sam" else "sam_rad"] == pytest.approx(
            whole[name if name != "sam" else "sam_rad"], rel=1e-6)


def test_a_nan_on_valid_pixels_still_shows_in_the_split_psnr():
    target = np.full((2, 16, 16, 4), 0.5, np.float32)
    pred = target.copy()
    pred[0, 3, 3, 0] = np.nan                    # a broken generator
    parts = jax.device_get(metrics.image_metric_parts(pred, target))
    scores = metrics.ImageMetricSums.zeros().merge(metrics.sums_of_parts(parts)).compute()
    assert np.isnan(scores["psnr"])


def test_sums_on_a_batch_sharded_over_devices_match_one_device():
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    devices = np.array(jax.devices())
    mesh = Mesh(devices, ("data",))
    n = len(devices)
    if n < 2:    # on one device the comparison cannot fail
        pytest.skip(f"needs several devices, this process has {n} (XLA_FLAGS={os.environ.get('XLA_FLAGS')!r})")
    rng = np.random.default_rng(3)
    target = rng.uniform(0, 1, (n, 12, 12, 4)).astype(np.float32)
    pred = np.clip(target + rng.normal(0, 0.1, target.shape), 0, 1).astype(np.float32)
    mask = rng.uniform(size=target.shape[:3]) > 0.05
    sharding = NamedSharding(mesh, P("data"))
    sharded = [jax.device_put(a, sharding) for a in (pred, target, mask)]
    assert len(sharded[0].sharding.device_set) == n
    got = jax.device_get(jax.jit(metrics.image_metric_sums)(*sharded))
    want = jax.device_get(metrics.image_metric_sums(pred, target, mask))
    for name, a, b in zip(metrics.ImageMetricSums._fields, got, want, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, err_msg=name)
    cm = jax.jit(metrics.confusion_matrix)(jax.device_put(mask.astype(np.int32), sharding),
                                           jax.device_put((target[..., 0] > 0.5).astype(np.uint8), sharding))
    np.testing.assert_array_equal(np.asarray(cm), np.asarray(metrics.confusion_matrix(
        mask.astype(np.int32), (target[..., 0] > 0.5).astype(np.uint8))))


def test_image_metrics_reject_wrong_layouts():
    with pytest.raises(ValueError, match="shapes differ"):
        metrics.psnr(jnp.zeros((1, 16, 16, 4)), jnp.zeros((1, 16, 16, 3)))
    with pytest.raises(ValueError, match="B, H, W, C"):
        metrics.ssim(jnp.zeros((16, 16, 4)), jnp.zeros((16, 16, 4)))
    with pytest.raises(ValueError, match="at least 11x11"):
        metrics.ssim(jnp.zeros((1, 8, 8, 4)), jnp.zeros((1, 8, 8, 4)))
    with pytest.raises(ValueError, match="valid_mask"):
        metrics.sam(jnp.zeros((1, 8, 8, 4)), jnp.zeros((1, 8, 8, 4)), jnp.ones((1, 8, 8, 1), bool))


# --------------------------------------------------------------------------- segmentation

# 3 classes + one absent class (3), 255 = no data.
LABEL = np.array([[0, 0, 1, 1],
                  [2, 255, 1, 0]])
PRED = np.array([[0, 1, 1, 1],
                 [1, 2, 1, 0]])
# Rows truth, columns prediction, by hand (the 255 pixel is ignored):
#   truth 0: pred 0 at (0,0), (1,3); pred 1 at (0,1)  -> [2, 1, 0, 0]
#   truth 1: pred 1 at (0,2), (0,3), (1,2)            -> [0, 3, 0, 0]
#   truth 2: pred 1 at (1,0)                          -> [0, 1, 0, 0]
HAND_CM = np.array([[2, 1, 0, 0],
                    [0, 3, 0, 0],
                    [0, 1, 0, 0],
                    [0, 0, 0, 0]])


def test_confusion_matrix_by_hand_and_ignore_index():
    cm = jax.jit(metrics.confusion_matrix, static_argnums=(2, 3))(
        jnp.asarray(PRED), jnp.asarray(LABEL, jnp.uint8), 4, 255)
    np.testing.assert_array_equal(np.asarray(cm), HAND_CM)
    assert cm.dtype == jnp.int32
    # Labels outside [0, num_classes) are ignored too; ignore_index is configurable.
    label = LABEL.copy()
    label[0, 0] = 7
    cm = metrics.confusion_matrix(jnp.asarray(PRED), jnp.asarray(label), 4, ignore_index=1)
    expected = HAND_CM.copy()
    expected[0, 0] -= 1                           # the 7 is gone
    expected[1] = 0                               # class 1 is now ignored
    np.testing.assert_array_equal(np.asarray(cm), expected)


def test_segmentation_scores_by_hand_with_absent_class():
    scores = metrics.segmentation_scores(HAND_CM, class_names=["a", "b", "c", "d"])
    assert scores["accuracy"] == pytest.approx(5 / 7)
    # IoU = TP / (TP + FP + FN): class 0: 2/(2+0+1); class 1: 3/(3+2+0); class 2: 0/(0+0+1);
    # class 3 appears nowhere -> NaN, left out of the mean.
    expected_iou = [2 / 3, 3 / 5, 0.0, np.nan]
    np.testing.assert_allclose(scores["per_class_iou"], expected_iou)
    assert scores["miou"] == pytest.approx((2 / 3 + 3 / 5 + 0.0) / 3)
    np.testing.assert_allclose(scores["per_class_accuracy"], [2 / 3, 1.0, 0.0, np.nan])
    assert scores["mean_accuracy"] == pytest.approx((2 / 3 + 1.0 + 0.0) / 3)
    assert scores["fwiou"] == pytest.approx((3 * 2 / 3 + 3 * 3 / 5 + 1 * 0.0) / 7)
    assert scores["iou_by_class"]["b"] == pytest.approx(0.6)
    assert math.isnan(scores["iou_by_class"]["d"])
    assert scores["num_pixels"] == 7


def test_class_predicted_but_absent_from_truth_counts_as_zero():
    cm = np.array([[5, 1],
                   [0, 0]])                       # class 1 only predicted (a false positive)
    scores = metrics.segmentation_scores(cm, class_names=["x", "y"])
    np.testing.assert_allclose(scores["per_class_iou"], [5 / 6, 0.0])
    assert scores["miou"] == pytest.approx(5 / 12)


def test_confusion_matrix_accumulates_over_batches():
    rng = np.random.default_rng(2)
    label = rng.integers(0, 9, (5, 8, 8)).astype(np.uint8)
    label[rng.uniform(size=label.shape) < 0.2] = 255
    pred = rng.integers(0, 9, (5, 8, 8))
    total = np.zeros((9, 9), np.int64)
    for i in range(0, 5, 2):
        total += np.asarray(jax.device_get(metrics.confusion_matrix(pred[i:i + 2], label[i:i + 2])))
    valid = label != 255
    expected = np.zeros((9, 9), np.int64)
    np.add.at(expected, (label[valid].astype(int), pred[valid]), 1)
    np.testing.assert_array_equal(total, expected)
    assert metrics.segmentation_scores(total)["num_pixels"] == int(valid.sum())


def test_empty_confusion_matrix_gives_nan_not_errors():
    scores = metrics.segmentation_scores(np.zeros((9, 9), np.int64))
    assert math.isnan(scores["accuracy"]) and math.isnan(scores["miou"])
    assert set(scores["iou_by_class"]) == {"water", "trees", "grass", "flooded_vegetation", "crops",
                                           "shrub_and_scrub", "built", "bare", "snow_and_ice"}


def test_fast_ssim_filter_matches_dm_pix_default_filter():
    import dm_pix
    pred, target = (jnp.asarray(a, jnp.float32) for a in _image_pairs()[0])
    reference = dm_pix.ssim(pred, target, return_map=True)       # dm-pix's own jnp.convolve filter
    np.testing.assert_allclose(metrics.ssim_map(pred, target), reference, atol=2e-5)
    np.testing.assert_allclose(metrics.ssim_per_image(pred, target), reference.mean(axis=(1, 2, 3)),
                               rtol=1e-6)


def test_nan_on_valid_pixels_is_not_hidden():
    rng = np.random.default_rng(4)
    target = jnp.asarray(rng.uniform(0, 1, (2, 12, 12, 4)), jnp.float32)
    pred = target.at[1, 6, 6, 0].set(jnp.nan)                 # a diverged generator's pixel
    scores = metrics.ImageMetricSums.zeros().merge(
        jax.device_get(metrics.image_metric_sums(pred, target))).compute()
    assert scores["num_images"] == 2
    assert math.isnan(scores["psnr"]) and math.isnan(scores["ssim"]) and math.isnan(scores["sam_rad"])
    assert math.isnan(float(metrics.psnr(pred, target)))


def test_data_range_other_than_one_matches_scikit_image():
    pred, target = _image_pairs()[0]
    pred, target = 2 * pred[:1] - 1, 2 * target[:1] - 1        # [-1, 1] images, range 2
    np.testing.assert_allclose(metrics.psnr(jnp.asarray(pred), jnp.asarray(target), data_range=2.0),
                               peak_signal_noise_ratio(target[0], pred[0], data_range=2.0), rtol=1e-5)
    expected = structural_similarity(target[0], pred[0], gaussian_weights=True, sigma=1.5,
                                     use_sample_covariance=False, data_range=2.0, channel_axis=-1)
    np.testing.assert_allclose(metrics.ssim(jnp.asarray(pred, jnp.float32), jnp.asarray(target, jnp.float32),
                                            data_range=2.0), expected, rtol=2e-5)
