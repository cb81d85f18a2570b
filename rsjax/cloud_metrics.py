"""Cloud-removal metrics as SEN12MS-CR papers report them: MAE, RMSE, PSNR, SSIM
and SAM, over the whole tile, under cloud, under shadow, in the clear part, and
by cloud-cover bin.

Inputs: reflectance in [0, 1], NHWC; the *cloudy* image's mask, (B, H, W) uint8
(0 clear, 1 cloud, 2 shadow, 255 unknown); optionally a (B, H, W) bool
`valid_mask`. `cloud_metric_parts` (device, jit-able) gives additive per-image
parts, `cloud_scores` (host) turns a split's parts into the table; per-image
parts let rsjax.experiments.stats resample test tiles and recompute exactly.
docs/cloud_removal.md (section "How the cloud-removal metrics are defined")
defines each number: regions, PSNR's floor, SSIM's windows, the cover bins.
"""
from __future__ import annotations

import math
from typing import Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rsjax.data.contract import COVER_BINS, cover_bin
from rsjax.data.contract import CLOUD as MASK_CLOUD, CLOUD_CLEAR as MASK_CLEAR
from rsjax.data.contract import CLOUD_MASK_UNKNOWN as MASK_UNKNOWN, CLOUD_SHADOW as MASK_SHADOW
from rsjax.metrics import SSIM_FILTER_SIZE, _valid_windows, spectral_angle, ssim_map

REGIONS = ("all", "cloud", "shadow", "clear")
METRICS = ("mae", "rmse", "psnr", "ssim", "sam_deg")
HIGHER_IS_BETTER = {"mae": False, "rmse": False, "psnr": True, "ssim": True, "sam_deg": False}
_MIN_MSE = 1e-10
_NEEDS_MASK = ("needs a cloud mask: no image of the split has one (give <scene>_cloudmask.tif "
               "beside <scene>_s2_cloudy.tif)")


def bin_label(low: float, high: float) -> str:
    return f"{round(100 * low)}-{round(100 * high)}%"


def _check(pred, target, cloud_mask, valid_mask) -> None:
    if pred.shape != target.shape or pred.ndim != 4:
        raise ValueError(f"pred and target must be (B, H, W, C) images of one shape, got "
                         f"{pred.shape} and {target.shape}.")
    for name, mask in (("cloud_mask", cloud_mask), ("valid_mask", valid_mask)):
        if mask is not None and mask.shape != pred.shape[:3]:
            raise ValueError(f"{name} must have shape (B, H, W) = {pred.shape[:3]}, got {mask.shape}.")


def region_masks(cloud_mask, valid_mask, shape) -> tuple[jax.Array, jax.Array]:
    """((B, R, H, W) bool regions in REGIONS order, (B,) bool has_mask)."""
    valid = jnp.ones(shape, bool) if valid_mask is None else valid_mask.astype(bool)
    if cloud_mask is None:
        none = jnp.zeros(shape, bool)
        return jnp.stack([valid, none, none, none], axis=1), jnp.zeros(shape[0], bool)
    code = cloud_mask.astype(jnp.int32)
    has_mask = ~jnp.any(valid & (code == MASK_UNKNOWN), axis=(1, 2))
    known = valid & has_mask[:, None, None]
    return jnp.stack([valid, known & (code == MASK_CLOUD), known & (code == MASK_SHADOW),
                      known & (code == MASK_CLEAR)], axis=1), has_mask


def cloud_metric_parts(pred, target, cloud_mask=None, valid_mask=None) -> dict:
    """Per-image additive parts (jit-able): each (B, R) over REGIONS, except
    `cover` and `has_mask` (B,).

    n_pixels (region pixels), abs_sum and sq_sum (over pixels of the band mean),
    sam_sum (degrees, over pixels), ssim_sum and ssim_count (windows centred
    in the region, fully valid). `cover` is NaN for an image without a mask.
    """
    _check(pred, target, cloud_mask, valid_mask)
    pred = pred.astype(jnp.float32)
    target = target.astype(jnp.float32)
    regions, has_mask = region_masks(cloud_mask, valid_mask, pred.shape[:3])

    def region_sum(per_pixel):                                           # (B, H, W) -> (B, R)
        # where, not a product: NaN or inf outside the region cannot leak in.
        return jnp.sum(jnp.where(regions, per_pixel[:, None], 0.0), axis=(2, 3))

    error = pred - target
    parts = {
        "n_pixels": jnp.sum(regions.astype(jnp.float32), axis=(2, 3)),
        "abs_sum": region_sum(jnp.mean(jnp.abs(error), axis=-1)),
        "sq_sum": region_sum(jnp.mean(error ** 2, axis=-1)),
        "sam_sum": region_sum(jnp.degrees(spectral_angle(pred, target))),
    }
    # SSIM of a region: the prediction outside the region replaced by the truth
    # (so a window at the region's edge sees the region's errors only), averaged
    # over the windows centred in the region that hold no no-data pixel. No-data
    # is zeroed first (the banded filter multiplies every pixel of a column, so
    # a NaN would reach all).
    valid = jnp.ones(pred.shape[:3], bool) if valid_mask is None else valid_mask.astype(bool)
    target0 = jnp.where(valid[..., None], target, 0.0)
    pred0 = jnp.where(valid[..., None], pred, 0.0)
    b, h, w, c = pred.shape
    within = jnp.where(regions[..., None], pred0[:, None], target0[:, None])      # (B, R, H, W, C)
    truth = jnp.broadcast_to(target0[:, None], within.shape)
    per_window = jnp.mean(ssim_map(within.reshape(-1, h, w, c), truth.reshape(-1, h, w, c)),
                          axis=-1).reshape(b, len(REGIONS), h - SSIM_FILTER_SIZE + 1, -1)
    half = SSIM_FILTER_SIZE // 2
    centred = regions[:, :, half:h - half, half:w - half]
    counted = centred & _valid_windows(valid)[:, None]
    parts["ssim_sum"] = jnp.sum(jnp.where(counted, per_window, 0.0), axis=(2, 3))
    parts["ssim_count"] = jnp.sum(counted.astype(jnp.float32), axis=(2, 3))
    n_valid = parts["n_pixels"][:, 0]
    parts["cover"] = jnp.where(has_mask & (n_valid > 0),
                               parts["n_pixels"][:, 1] / jnp.maximum(n_valid, 1.0), jnp.nan)
    parts["has_mask"] = has_mask
    return parts


def concat_parts(batches: Sequence[Mapping[str, np.ndarray]]) -> dict:
    """Per-batch parts (device or host) -> one dict of host float64 arrays over the split."""
    if not batches:
        raise ValueError("no batches: the split is empty.")
    return {k: np.concatenate([np.asarray(jax.device_get(b[k]), np.float64) for b in batches])
            for k in batches[0]}


def per_image_values(parts: Mapping[str, np.ndarray]) -> dict:
    """{metric: (B, R) per-image values, NaN where the image has no such region}."""
    n = np.asarray(parts["n_pixels"], np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        mse = np.where(n > 0, parts["sq_sum"] / n, np.nan)
        ssim_count = np.asarray(parts["ssim_count"], np.float64)
        return {
            "mae": np.where(n > 0, parts["abs_sum"] / n, np.nan),
            "rmse": np.sqrt(mse),
            "psnr": np.where(n > 0, 10.0 * np.log10(1.0 / np.maximum(mse, _MIN_MSE)), np.nan),
            "ssim": np.where(ssim_count > 0, parts["ssim_sum"] / ssim_count, np.nan),
            "sam_deg": np.where(n > 0, parts["sam_sum"] / n, np.nan),
        }


def _take(parts: Mapping[str, np.ndarray], images: np.ndarray) -> dict:
    return {k: np.asarray(v)[images] for k, v in parts.items()}


def cover_bin_index(cover) -> np.ndarray:
    """Bin of each image's cloud cover in COVER_BINS (-1 where it is unknown)."""
    return np.array([cover_bin(float(c)) for c in np.asarray(cover, np.float64).ravel()],
                    dtype=int).reshape(np.shape(cover))


def _counted(parts: Mapping[str, np.ndarray], name: str, r: int) -> np.ndarray:
    """Which images count for a metric in region r (SSIM: a window centred there)."""
    return np.asarray(parts["ssim_count" if name == "ssim" else "n_pixels"])[:, r] > 0


def region_scores(parts: Mapping[str, np.ndarray]) -> dict:
    """{region: {metric: mean over images having the region, num_images, num_ssim_images}}."""
    values = per_image_values(parts)
    has_mask = np.asarray(parts["has_mask"], bool)
    out = {}
    for r, region in enumerate(REGIONS):
        row = {}
        for name in METRICS:
            ok = _counted(parts, name, r)
            row[name] = float(values[name][ok, r].mean()) if ok.any() else math.nan
        row["num_images"] = int(_counted(parts, "mae", r).sum())
        row["num_ssim_images"] = int(_counted(parts, "ssim", r).sum())
        if region != "all" and not has_mask.any():
            row["note"] = _NEEDS_MASK
        out[region] = row
    return out


def cloud_scores(parts: Mapping[str, np.ndarray]) -> dict:
    """The split's table from its per-image parts (host, numpy).

    {'regions': {region: {...}}, 'by_cover': {'0-10%': {'num_images', 'regions'}, ...},
     'num_images', 'num_images_with_mask', 'mean_cover'} and, when no image has
    a mask, 'note' saying that the regions and the bins need one.
    """
    has_mask = np.asarray(parts["has_mask"], bool)
    cover = np.asarray(parts["cover"], np.float64)
    index = cover_bin_index(cover)
    out = {"regions": region_scores(parts), "by_cover": {},
           "num_images": int(len(has_mask)), "num_images_with_mask": int(has_mask.sum()),
           "mean_cover": float(np.nanmean(cover)) if has_mask.any() else math.nan}
    for i, (low, high) in enumerate(COVER_BINS):
        images = np.flatnonzero(index == i)
        entry = {"num_images": int(images.size)}
        if images.size:
            entry["regions"] = region_scores(_take(parts, images))
        out["by_cover"][bin_label(low, high)] = entry
    if not has_mask.any():
        out["note"] = "the cloud, shadow and clear rows and the cover bins " + _NEEDS_MASK
    return out


def split_metric(name: str, region: str = "all", cover_bin: Optional[int] = None):
    """parts -> one split-level number (for rsjax.experiments.stats' resampling)."""
    if name not in METRICS or region not in REGIONS:
        raise ValueError(f"unknown metric {name!r} or region {region!r}: {METRICS}, {REGIONS}")
    r = REGIONS.index(region)

    def metric(parts):
        if cover_bin is not None:
            parts = _take(parts, np.flatnonzero(cover_bin_index(parts["cover"]) == cover_bin))
        ok = _counted(parts, name, r)
        return float(per_image_values(parts)[name][ok, r].mean()) if ok.any() else math.nan
    return metric


def per_image_metric(parts: Mapping[str, np.ndarray], name: str, region: str = "all") -> np.ndarray:
    """(B,) one metric per image in one region, NaN for an image that does not
    count there: `split_metric(name, region)(parts)` is their nanmean (what the
    claims' bootstrap resamples, computed once instead of per draw)."""
    r = REGIONS.index(region)
    return np.where(_counted(parts, name, r), per_image_values(parts)[name][:, r], np.nan)
