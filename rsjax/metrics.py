"""Evaluation metrics: PSNR, SSIM and SAM for synthetic optical images, and
confusion-matrix accuracy / per-class IoU / mIoU for land-cover segmentation.

Image metrics take NHWC reflectance scaled to [0, 1] and an optional (B, H, W)
mask, True where valid; everything is jit-able, and a split is summed on the
host (segmentation: `confusion_matrix` per batch, then `segmentation_scores`):
    sums = ImageMetricSums.zeros()
    for batch in split:
        sums = sums.merge(jax.device_get(jitted_image_metric_sums(pred, target, mask)))
    scores = sums.compute()   # {"psnr": .., "ssim": .., "sam_rad": .., "sam_deg": .., ...}
docs/training.md ("Metrics") defines each split-level number and its caveats.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence

import dm_pix
import jax
import jax.numpy as jnp
import numpy as np

from rsjax.data.contract import LULC_CLASSES, LULC_NODATA, NUM_CLASSES

# SSIM constants of Wang et al. 2004, used by SPADE/pix2pix evaluations and dm-pix defaults.
SSIM_FILTER_SIZE = 11
SSIM_FILTER_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03

# Floor for an image's MSE, so a perfect reconstruction has a finite PSNR (100 dB at range 1).
_MIN_MSE = 1e-10


def _check_images(pred, target, valid_mask) -> None:
    """Shape checks at trace time: a wrong layout fails loudly instead of broadcasting."""
    if pred.shape != target.shape:
        raise ValueError(f"pred and target shapes differ: {pred.shape} vs {target.shape}; "
                         "both must be (B, H, W, C) images.")
    if pred.ndim != 4:
        raise ValueError(f"expected (B, H, W, C) images, got shape {pred.shape}. "
                         "Add a batch axis with x[None] for a single image.")
    if valid_mask is not None and valid_mask.shape != pred.shape[:3]:
        raise ValueError(f"valid_mask must have shape (B, H, W) = {pred.shape[:3]}, "
                         f"got {valid_mask.shape}.")


def _pixel_weights(pred, valid_mask):
    """(B, H, W) float32 weights: 1 for valid pixels, 0 for no-data."""
    if valid_mask is None:
        return jnp.ones(pred.shape[:3], jnp.float32)
    return valid_mask.astype(jnp.float32)


def _masked(values, weights):
    """Values where weights > 0, else 0: unlike values * weights, a NaN or inf
    under the mask (garbage in no-data areas) cannot leak into the sums."""
    return jnp.where(weights > 0, values, 0.0)


# --------------------------------------------------------------------------- PSNR

def _psnr_with_count(pred, target, valid_mask, data_range):
    """(per-image PSNR, per-image has-valid-pixels). NaN or inf *on valid
    pixels* gives a NaN/inf PSNR on purpose: a broken generator must show."""
    _check_images(pred, target, valid_mask)
    pred = pred.astype(jnp.float32)
    target = target.astype(jnp.float32)
    weights = _pixel_weights(pred, valid_mask)
    squared_error = jnp.sum((pred - target) ** 2, axis=-1)            # (B, H, W)
    n_values = jnp.sum(weights, axis=(1, 2)) * pred.shape[-1]
    mse = jnp.sum(_masked(squared_error, weights), axis=(1, 2)) / jnp.maximum(n_values, 1.0)
    return 10.0 * jnp.log10(data_range ** 2 / jnp.maximum(mse, _MIN_MSE)), n_values > 0


def _mean_over_images(values, has_data):
    """Mean of values over the images that have data (NaN values still propagate)."""
    count = jnp.sum(has_data)
    return jnp.where(count > 0, jnp.sum(jnp.where(has_data, values, 0.0)) / jnp.maximum(count, 1),
                     jnp.nan)


def psnr_per_image(pred, target, valid_mask=None, *, data_range: float = 1.0):
    """PSNR in dB of each image, (B,), from its MSE over valid pixels and all bands.

    Images without valid pixels get NaN.
    """
    values, has_data = _psnr_with_count(pred, target, valid_mask, data_range)
    return jnp.where(has_data, values, jnp.nan)


def psnr(pred, target, data_range: float = 1.0, *, valid_mask=None):
    """Mean over the batch's images (those with valid pixels) of per-image PSNR in dB."""
    return _mean_over_images(*_psnr_with_count(pred, target, valid_mask, data_range))


# --------------------------------------------------------------------------- SSIM

def _valid_windows(valid_mask, filter_size: int = SSIM_FILTER_SIZE):
    """(B, H-f+1, W-f+1) bool: True where the whole f x f window is valid.

    Aligned with dm-pix's 'valid' SSIM map, whose pixel (i, j) comes from the
    window with top-left corner (i, j).
    """
    invalid = (~valid_mask).astype(jnp.float32)
    # A window max is separable: along rows, then along columns (22 reads, not 121).
    for window in ((1, filter_size, 1), (1, 1, filter_size)):
        invalid = jax.lax.reduce_window(invalid, 0.0, jax.lax.max, window, (1, 1, 1), "VALID")
    return invalid == 0.0


# dm-pix's own Gaussian filter (jnp.convolve under vmap) lowers to many tiny
# convolutions that run slowly on CPU: 1.2 s for 8 tiles of 256x256x4 on the
# 2-core dev machine. The same 'valid' separable filter written as two matmuls
# with a banded (n - 10, n) matrix gives the same SSIM (tested) about 7x faster,
# and matmuls suit TPUs too. Beyond this size the band matrix grows
# quadratically, so larger images keep dm-pix's filter.
_BANDED_FILTER_MAX_SIZE = 1024


def _gaussian_taps(size: int = SSIM_FILTER_SIZE, sigma: float = SSIM_FILTER_SIGMA) -> np.ndarray:
    offsets = np.arange(size) - size // 2
    taps = np.exp(-0.5 * (offsets / sigma) ** 2)
    return taps / taps.sum()


def _band_matrix(n: int, taps: np.ndarray) -> np.ndarray:
    """(n - k + 1, n) matrix whose row i holds the taps at columns i..i+k-1."""
    k = len(taps)
    band = np.zeros((n - k + 1, n), np.float32)
    for i in range(n - k + 1):
        band[i, i:i + k] = taps
    return band


def _gaussian_blur_valid(images):
    """11x11 Gaussian (sigma 1.5) 'valid' filter of (B, H, W, C) images, as dm-pix
    computes it, by two banded matmuls (a constant of the trace)."""
    taps = _gaussian_taps()
    rows = jnp.asarray(_band_matrix(images.shape[-3], taps))
    cols = jnp.asarray(_band_matrix(images.shape[-2], taps))
    # HIGHEST: sigma^2 = E[x^2] - E[x]^2 cancels digits, so no bf16 passes on TPU/GPU.
    images = jnp.einsum("ih,...hwc->...iwc", rows, images, precision=jax.lax.Precision.HIGHEST)
    return jnp.einsum("jw,...iwc->...ijc", cols, images, precision=jax.lax.Precision.HIGHEST)


def ssim_map(pred, target, data_range: float = 1.0):
    """dm-pix SSIM map, (B, H-10, W-10, C), 11x11 Gaussian window, sigma 1.5,
    k1 0.01, k2 0.03; entry (i, j) is the window with top-left corner (i, j)."""
    if min(pred.shape[-3:-1]) < SSIM_FILTER_SIZE:
        raise ValueError(f"SSIM needs images of at least {SSIM_FILTER_SIZE}x{SSIM_FILTER_SIZE} "
                         f"pixels, got {pred.shape[-3]}x{pred.shape[-2]}.")
    fast = max(pred.shape[-3:-1]) <= _BANDED_FILTER_MAX_SIZE
    return dm_pix.ssim(
        pred.astype(jnp.float32), target.astype(jnp.float32), max_val=data_range,
        filter_size=SSIM_FILTER_SIZE, filter_sigma=SSIM_FILTER_SIGMA, k1=SSIM_K1, k2=SSIM_K2,
        return_map=True, filter_fn=_gaussian_blur_valid if fast else None)


def _ssim_with_count(pred, target, valid_mask, data_range):
    """(per-image mean SSIM over fully valid windows, per-image has-such-a-window)."""
    _check_images(pred, target, valid_mask)
    if valid_mask is not None:
        # Zero the no-data pixels first: the banded filter multiplies every pixel
        # of a column (by 0 outside the window), so a NaN there would reach all.
        valid = valid_mask[..., None]
        pred, target = jnp.where(valid, pred, 0.0), jnp.where(valid, target, 0.0)
    per_pixel = jnp.mean(ssim_map(pred, target, data_range), axis=-1)   # (B, H-10, W-10)
    if valid_mask is None:
        return jnp.mean(per_pixel, axis=(1, 2)), jnp.ones(per_pixel.shape[0], bool)
    weights = _valid_windows(valid_mask).astype(jnp.float32)
    n_windows = jnp.sum(weights, axis=(1, 2))
    mean = jnp.sum(_masked(per_pixel, weights), axis=(1, 2)) / jnp.maximum(n_windows, 1.0)
    return mean, n_windows > 0


def ssim_per_image(pred, target, valid_mask=None, *, data_range: float = 1.0):
    """Mean SSIM of each image, (B,), over bands and (fully valid) 11x11 windows.

    Images without any fully valid window get NaN.
    """
    values, has_data = _ssim_with_count(pred, target, valid_mask, data_range)
    return jnp.where(has_data, values, jnp.nan)


def ssim(pred, target, data_range: float = 1.0, *, valid_mask=None):
    """Mean over the batch's images (those with a fully valid window) of per-image SSIM."""
    return _mean_over_images(*_ssim_with_count(pred, target, valid_mask, data_range))


# --------------------------------------------------------------------------- SAM

def spectral_angle(pred, target, eps: float = 1e-12):
    """Angle in radians between the band vectors of each pixel, (..., H, W).

    Uses Kahan's form 2*atan2(|u - v|, |u + v|) of the unit vectors u, v, which
    stays accurate near 0 and pi where arccos of the cosine loses half its
    digits in float32. A zero vector has no direction: against a non-zero
    vector it gives pi/2, against another zero vector 0 (no NaN either way).
    """
    pred = pred.astype(jnp.float32)
    target = target.astype(jnp.float32)
    u = pred / jnp.maximum(jnp.linalg.norm(pred, axis=-1, keepdims=True), eps)
    v = target / jnp.maximum(jnp.linalg.norm(target, axis=-1, keepdims=True), eps)
    return 2.0 * jnp.arctan2(jnp.linalg.norm(u - v, axis=-1), jnp.linalg.norm(u + v, axis=-1))


def sam(pred, target, valid_mask=None):
    """Mean spectral angle in radians over the valid pixels of the batch.

    NaN when no pixel is valid. Degrees: `jnp.degrees(sam(...))`.
    """
    _check_images(pred, target, valid_mask)
    weights = _pixel_weights(pred, valid_mask)
    count = jnp.sum(weights)
    total = jnp.sum(_masked(spectral_angle(pred, target), weights))
    return jnp.where(count > 0, total / jnp.maximum(count, 1.0), jnp.nan)


# --------------------------------------------------------------------------- whole split

class ImageMetricSums(NamedTuple):
    """Running sums of the image metrics over an evaluation split (a pytree).

    Per-batch values are computed on device by `image_metric_sums`; combine
    them on the host with `merge` (after `jax.device_get`, so the running
    totals live in float64 numpy) and call `compute` once at the end.
    """

    psnr_sum: jax.Array          # sum of per-image PSNR (dB)
    psnr_count: jax.Array        # images with at least one valid pixel
    ssim_sum: jax.Array          # sum of per-image SSIM
    ssim_count: jax.Array        # images with at least one fully valid window
    sam_sum: jax.Array           # sum of per-pixel spectral angles (rad)
    sam_count: jax.Array         # valid pixels

    @classmethod
    def zeros(cls) -> "ImageMetricSums":
        return cls(*(np.zeros((), np.float64) for _ in cls._fields))

    def merge(self, other: "ImageMetricSums") -> "ImageMetricSums":
        """Field-wise sum. On host numpy inputs the result is float64."""
        return ImageMetricSums(*(np.asarray(a, np.float64) + np.asarray(b, np.float64)
                                 for a, b in zip(self, other)))

    def compute(self) -> dict:
        """{'psnr', 'ssim', 'sam_rad', 'sam_deg'} as Python floats (NaN when nothing
        was valid), plus the counts they were averaged over."""
        def mean(total, count):
            count = float(count)
            return float(total) / count if count > 0 else math.nan

        sam_rad = mean(self.sam_sum, self.sam_count)
        return {
            "psnr": mean(self.psnr_sum, self.psnr_count),
            "ssim": mean(self.ssim_sum, self.ssim_count),
            "sam_rad": sam_rad,
            "sam_deg": math.degrees(sam_rad),
            "num_images": int(self.psnr_count),
            "num_ssim_images": int(self.ssim_count),
            "num_valid_pixels": int(self.sam_count),
        }


def image_metric_parts(pred, target, valid_mask=None, *, data_range: float = 1.0) -> dict:
    """Per-image parts of the split's image metrics (jit-able), each (B,):
    `psnr` and `ssim` (NaN for an image without valid data), `has_psnr` and
    `has_ssim` (whether the image counts: valid pixels, a fully valid SSIM
    window; a NaN on valid pixels still counts, so a broken generator shows),
    `sam_sum` (sum of the valid pixels' spectral angles, rad) and `sam_count`
    (valid pixels).

    Split-level PSNR and SSIM are means over images, SAM a mean over valid
    pixels; keeping the parts per image lets the experiments resample test
    tiles and recompute every metric exactly (rsjax.experiments.stats).
    """
    psnr_values, psnr_has_data = _psnr_with_count(pred, target, valid_mask, data_range)
    ssim_values, ssim_has_data = _ssim_with_count(pred, target, valid_mask, data_range)
    weights = _pixel_weights(pred, valid_mask)
    angles = _masked(spectral_angle(pred, target), weights)
    return {
        "psnr": jnp.where(psnr_has_data, psnr_values, jnp.nan),
        "ssim": jnp.where(ssim_has_data, ssim_values, jnp.nan),
        "has_psnr": psnr_has_data,
        "has_ssim": ssim_has_data,
        "sam_sum": jnp.sum(angles, axis=(-2, -1)),
        "sam_count": jnp.sum(weights, axis=(-2, -1)),
    }


def image_metric_sums(pred, target, valid_mask=None, *, data_range: float = 1.0) -> ImageMetricSums:
    """One batch's contribution to the split's image metrics (jit-able).

    pred, target: (B, H, W, C) reflectance in [0, data_range]; valid_mask:
    optional (B, H, W) bool, True where the target has data. In a data-parallel
    eval step with batch-sharded inputs the sums come back as replicated scalars.
    """
    return sums_of_parts(image_metric_parts(pred, target, valid_mask, data_range=data_range))


def sums_of_parts(parts: dict) -> ImageMetricSums:
    """Per-image parts (numpy or jax) -> the running sums of a split."""
    xp = jnp if isinstance(parts["psnr"], jax.Array) else np
    psnr_ok, ssim_ok = parts["has_psnr"], parts["has_ssim"]
    return ImageMetricSums(
        psnr_sum=xp.sum(xp.where(psnr_ok, parts["psnr"], 0.0)),
        psnr_count=xp.sum(psnr_ok).astype(xp.float32),
        ssim_sum=xp.sum(xp.where(ssim_ok, parts["ssim"], 0.0)),
        ssim_count=xp.sum(ssim_ok).astype(xp.float32),
        sam_sum=xp.sum(parts["sam_sum"]),
        sam_count=xp.sum(parts["sam_count"]),
    )


# --------------------------------------------------------------------------- segmentation

def confusion_matrix(pred, label, num_classes: int = NUM_CLASSES,
                     ignore_index: int = LULC_NODATA):
    """(num_classes, num_classes) int32 counts, rows = true class, columns = predicted.

    pred, label: integer class maps of the same shape (e.g. (B, H, W); pred is
    usually `logits.argmax(-1)`). Pixels whose label is `ignore_index` -- or
    any value outside [0, num_classes), which the data contract never stores --
    are not counted. jit-able; sum per-batch matrices on the host in int64
    (int32 overflows past 2**31 pixels, about 32k tiles of 256x256).
    """
    if pred.shape != label.shape:
        raise ValueError(f"pred and label shapes differ: {pred.shape} vs {label.shape}; pass "
                         "class maps (e.g. logits.argmax(-1)), not logits.")
    pred = pred.reshape(-1).astype(jnp.int32)
    label = label.reshape(-1).astype(jnp.int32)
    counted = (label != ignore_index) & (label >= 0) & (label < num_classes)
    counted &= (pred >= 0) & (pred < num_classes)
    index = jnp.where(counted, label * num_classes + pred, 0)
    counts = jnp.bincount(index, weights=counted.astype(jnp.int32), length=num_classes ** 2)
    return counts.reshape(num_classes, num_classes).astype(jnp.int32)


def segmentation_scores(cm, class_names: Optional[Sequence[str]] = None) -> dict:
    """Scores of one confusion matrix accumulated over a whole split (host, numpy).

    Returns:
      accuracy: overall pixel accuracy, trace / total.
      per_class_iou: (K,) TP / (TP + FP + FN); NaN for a class absent from both
        truth and prediction.
      miou: nanmean of per_class_iou (absent classes left out).
      per_class_accuracy: (K,) recall TP / (TP + FN); NaN for classes absent from the truth.
      mean_accuracy: nanmean of per_class_accuracy.
      fwiou: frequency-weighted IoU (weights = true pixel share of each class).
      iou_by_class: {class name: IoU} for logging (names default to Dynamic World's).
      num_pixels: total counted pixels.
    All NaN-valued scalars when the matrix is empty.
    """
    cm = np.asarray(cm, np.float64)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
        raise ValueError(f"expected a square confusion matrix, got shape {cm.shape}.")
    num_classes = cm.shape[0]
    if class_names is None:
        class_names = LULC_CLASSES if num_classes == NUM_CLASSES else [
            str(i) for i in range(num_classes)]
    if len(class_names) != num_classes:
        raise ValueError(f"{len(class_names)} class names for a {num_classes}-class matrix.")
    true_positive = np.diag(cm)
    true_count = cm.sum(axis=1)
    pred_count = cm.sum(axis=0)
    union = true_count + pred_count - true_positive
    total = cm.sum()
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(union > 0, true_positive / union, np.nan)
        recall = np.where(true_count > 0, true_positive / true_count, np.nan)
    present = ~np.isnan(iou)
    return {
        "accuracy": float(true_positive.sum() / total) if total > 0 else math.nan,
        "per_class_iou": iou,
        "miou": float(np.mean(iou[present])) if present.any() else math.nan,
        "per_class_accuracy": recall,
        "mean_accuracy": float(np.nanmean(recall)) if (true_count > 0).any() else math.nan,
        "fwiou": float(np.sum(true_count[present] * iou[present]) / total) if total > 0 else math.nan,
        "iou_by_class": {name: float(v) for name, v in zip(class_names, iou)},
        "num_pixels": int(total),
    }
