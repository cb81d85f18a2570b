"""Training losses: GAN losses for a multi-scale discriminator, feature matching,
masked L1, DSen2-CR's cloud-adaptive L1, SSIM, and masked cross-entropy for
segmentation.

Discriminator outputs follow the multi-scale PatchGAN convention of NVlabs
SPADE: a list over scales, each a list of that scale's intermediate features
with the patch logits last, e.g. `[[f1, f2, f3, logits], [g1, g2, g3, logits]]`.
A bare logits array is accepted as one scale with no features. GAN terms are
the mean over all logits of a scale, averaged over scales, as SPADE does.

Weights (feature matching x10, L1 x100, ...) are applied by the caller, and so
is any factor on the discriminator's total (pix2pix halves it; SPADE does not).
All functions are jit-able and differentiable.
"""
from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rsjax import metrics
from rsjax.data.contract import LULC_NODATA

GAN_LOSSES = ("hinge", "vanilla", "lsgan")


def _as_scales(outputs) -> list:
    """Normalizes discriminator outputs to a list over scales of feature lists."""
    if hasattr(outputs, "shape"):        # one array: a single scale's logits
        return [[outputs]]
    scales = list(outputs)
    if not scales:
        raise ValueError("discriminator outputs are empty: expected a list over scales of "
                         "lists of features with the logits last.")
    for i, scale in enumerate(scales):
        if hasattr(scale, "shape") or not isinstance(scale, (list, tuple)) or not scale:
            raise ValueError(f"discriminator output of scale {i} must be a non-empty list of "
                             "features with the logits last, e.g. [[f1, f2, logits], ...].")
    return [list(s) for s in scales]


def _check_kind(kind: str) -> None:
    if kind not in GAN_LOSSES:
        raise ValueError(f"unknown GAN loss '{kind}'; choose one of {', '.join(GAN_LOSSES)}.")


def _real_term(logits, kind):
    """Discriminator loss on real patches (target: real)."""
    logits = logits.astype(jnp.float32)
    if kind == "hinge":
        return jnp.mean(jax.nn.relu(1.0 - logits))
    if kind == "vanilla":
        return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, jnp.ones_like(logits)))
    return jnp.mean((logits - 1.0) ** 2)


def _fake_term(logits, kind):
    """Discriminator loss on generated patches (target: fake)."""
    logits = logits.astype(jnp.float32)
    if kind == "hinge":
        return jnp.mean(jax.nn.relu(1.0 + logits))
    if kind == "vanilla":
        return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, jnp.zeros_like(logits)))
    return jnp.mean(logits ** 2)


def _generator_term(logits, kind):
    """Generator loss on generated patches: make the discriminator call them real."""
    logits = logits.astype(jnp.float32)
    if kind == "hinge":
        return -jnp.mean(logits)
    if kind == "vanilla":        # the non-saturating form, -log D(G(z))
        return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, jnp.ones_like(logits)))
    return jnp.mean((logits - 1.0) ** 2)


def _mean_over_scales(outputs, term, kind):
    scales = _as_scales(outputs)
    return sum(term(scale[-1], kind) for scale in scales) / len(scales)


def discriminator_loss(real_outputs, fake_outputs, kind: str = "hinge"):
    """(real_term, fake_term) of the discriminator's GAN loss, each averaged over scales.

    hinge:   mean(relu(1 - D(x))),  mean(relu(1 + D(G(z))))            (SPADE)
    vanilla: BCE-with-logits against 1 and 0                          (pix2pix)
    lsgan:   mean((D(x) - 1)^2),    mean(D(G(z))^2)
    The discriminator minimizes real_term + fake_term (pix2pix: times 0.5).
    """
    _check_kind(kind)
    return (_mean_over_scales(real_outputs, _real_term, kind),
            _mean_over_scales(fake_outputs, _fake_term, kind))


def generator_loss(fake_outputs, kind: str = "hinge"):
    """The generator's adversarial loss, averaged over scales.

    hinge: -mean(D(G(z))); vanilla: BCE-with-logits against 1 (non-saturating);
    lsgan: mean((D(G(z)) - 1)^2).
    """
    _check_kind(kind)
    return _mean_over_scales(fake_outputs, _generator_term, kind)


def feature_matching_loss(real_outputs, fake_outputs, layer_reduction: str = "sum"):
    """L1 between the discriminator's intermediate features on real and generated
    images (logits excluded), averaged over scales.

    Real features are constants (stop_gradient): only the generator learns from
    this loss. `layer_reduction="sum"` adds the layers of a scale as NVlabs SPADE
    does, so its weight of 10 means the same here; "mean" averages them instead.
    """
    if layer_reduction not in ("sum", "mean"):
        raise ValueError(f"layer_reduction must be 'sum' or 'mean', got '{layer_reduction}'.")
    real_scales, fake_scales = _as_scales(real_outputs), _as_scales(fake_outputs)
    if len(real_scales) != len(fake_scales):
        raise ValueError(f"{len(real_scales)} real vs {len(fake_scales)} fake discriminator scales.")
    total = 0.0
    for i, (real, fake) in enumerate(zip(real_scales, fake_scales)):
        if len(real) != len(fake):
            raise ValueError(f"scale {i}: {len(real)} real vs {len(fake)} fake features.")
        layers = [l1_loss(f, jax.lax.stop_gradient(r)) for r, f in zip(real[:-1], fake[:-1])]
        if not layers:
            raise ValueError(f"scale {i} has no intermediate features to match (only logits); "
                             "return them from the discriminator or drop feature matching.")
        scale_loss = sum(layers)
        total = total + (scale_loss if layer_reduction == "sum" else scale_loss / len(layers))
    return total / len(real_scales)


def masked_mean(values, valid_mask=None):
    """Mean of (B, H, W, C) `values` over valid pixels and all channels.

    valid_mask: optional (B, H, W) (or anything broadcastable to values without
    its channel axis), True/1 where the target has data. 0 when nothing is valid.
    """
    if valid_mask is None:
        return jnp.mean(values)
    weights = jnp.broadcast_to(valid_mask.astype(jnp.float32)[..., None], values.shape)
    return jnp.sum(values * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def l1_loss(pred, target, valid_mask=None):
    """Mean absolute error over valid pixels and all channels (see masked_mean)."""
    return masked_mean(jnp.abs(pred.astype(jnp.float32) - target.astype(jnp.float32)), valid_mask)


def l2_loss(pred, target, valid_mask=None):
    """Mean squared error over valid pixels and all channels (see masked_mean)."""
    return masked_mean(jnp.square(pred.astype(jnp.float32) - target.astype(jnp.float32)),
                       valid_mask)


def gaussian_nll(mean, variance, target, valid_mask=None):
    """The negative log-likelihood of `target` under independent Gaussians of
    `mean` and `variance` (> 0) per pixel and band, without its constant
    0.5 log(2 pi): mean of 0.5 (log variance + (target - mean)^2 / variance)
    over valid pixels (valid_mask (B, H, W)) and bands. UnCRtainTS's loss with a
    diagonal covariance (Ebel et al. 2023)."""
    mean, variance, target = (jnp.asarray(a, jnp.float32) for a in (mean, variance, target))
    return masked_mean(0.5 * (jnp.log(variance) + jnp.square(target - mean) / variance),
                       valid_mask)


def cloud_adaptive_l1(pred, target, cloudy, covered, valid_mask=None, *, weight: float = 1.0):
    """DSen2-CR's cloud-adaptive regularized L1 loss (CARL, Meraner et al. 2020):

        mean(covered * |pred - target| + (1 - covered) * |pred - cloudy|)
        + weight * mean(|pred - target|)

    Under clouds and shadows (`covered`, (B, H, W), 1 there; the paper's
    binarised cloud and shadow mask) the prediction is pulled to the clear
    target, elsewhere to the cloudy input (which is the clear image there, up
    to the time between acquisitions), and the second term regularises
    towards the target everywhere (weight 1 as published). Means over valid
    pixels and all channels; 0 when nothing is valid.
    """
    pred, target, cloudy = (x.astype(jnp.float32) for x in (pred, target, cloudy))
    covered = covered.astype(jnp.float32)[..., None]
    adaptive = covered * jnp.abs(pred - target) + (1.0 - covered) * jnp.abs(pred - cloudy)
    if valid_mask is None:
        return jnp.mean(adaptive) + weight * jnp.mean(jnp.abs(pred - target))
    weights = jnp.broadcast_to(valid_mask.astype(jnp.float32)[..., None], pred.shape)
    count = jnp.maximum(jnp.sum(weights), 1.0)
    # where, not a product: no-data pixels may hold anything, NaN included.
    masked = lambda x: jnp.where(weights > 0, x, 0.0)
    return (jnp.sum(masked(adaptive)) + weight * jnp.sum(masked(jnp.abs(pred - target)))) / count


def ssim_loss(pred, target, data_range: float = 1.0):
    """1 - mean SSIM (dm-pix, 11x11 Gaussian window, sigma 1.5; the same SSIM as
    rsjax.metrics) for (B, H, W, C) images in [0, data_range] (map [-1, 1]
    outputs with (x + 1) / 2 first)."""
    return 1.0 - jnp.mean(metrics.ssim_map(pred, target, data_range))


def softmax_cross_entropy(logits, labels, ignore_index: int = LULC_NODATA,
                          class_weights: Optional[Sequence[float]] = None):
    """Per-pixel softmax cross-entropy averaged over labelled pixels.

    logits: (..., K); labels: (...) integers, `ignore_index` where unlabelled
    (labels outside [0, K) are ignored too). With class_weights (K,), pixel i
    weighs class_weights[labels_i] and the loss is sum(w_i * ce_i) / sum(w_i),
    the convention of PyTorch's weighted CrossEntropyLoss. 0 when no pixel counts.
    """
    num_classes = logits.shape[-1]
    if labels.shape != logits.shape[:-1]:
        raise ValueError(f"labels shape {labels.shape} must be logits shape without the class "
                         f"axis, {logits.shape[:-1]}.")
    labels = labels.astype(jnp.int32)
    counted = (labels != ignore_index) & (labels >= 0) & (labels < num_classes)
    safe_labels = jnp.where(counted, labels, 0)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), safe_labels)
    weights = counted.astype(jnp.float32)
    if class_weights is not None:
        class_weights = jnp.asarray(class_weights, jnp.float32)
        if class_weights.shape != (num_classes,):
            raise ValueError(f"class_weights must have shape ({num_classes},), "
                             f"got {class_weights.shape}.")
        weights = weights * class_weights[safe_labels]
    return jnp.sum(ce * weights) / jnp.maximum(jnp.sum(weights), 1e-12)


CLASS_WEIGHTINGS = ("median_frequency", "inverse", "inverse_sqrt")


def class_weights_from_counts(counts, method: str = "median_frequency"):
    """(K,) float32 class weights for `softmax_cross_entropy` from per-class pixel
    counts (e.g. the class frequencies stored with the dataset; no-data excluded).

    median_frequency: median(f) / f_c over the classes present (Eigen & Fergus 2015);
    inverse: 1 / f_c and inverse_sqrt: 1 / sqrt(f_c), both rescaled so the
    pixel-weighted mean weight is 1 (the loss keeps its scale).
    Classes with no pixels get weight 0: they never occur as labels.
    """
    if method not in CLASS_WEIGHTINGS:
        raise ValueError(f"unknown class weighting '{method}'; choose one of {', '.join(CLASS_WEIGHTINGS)}.")
    counts = np.asarray(counts, np.float64)
    if counts.ndim != 1 or np.any(counts < 0) or not np.any(counts > 0):
        raise ValueError(f"class counts must be a 1-D array of non-negative counts with at least "
                         f"one positive entry, got {counts!r}.")
    present = counts > 0
    frequency = counts / counts.sum()
    weights = np.zeros_like(frequency)
    if method == "median_frequency":
        weights[present] = np.median(frequency[present]) / frequency[present]
    else:
        power = 1.0 if method == "inverse" else 0.5
        weights[present] = frequency[present] ** -power
        weights /= np.sum(frequency * weights)
    return weights.astype(np.float32)
