"""How well a predicted per-pixel variance tells the error (UnCRtainTS, Ebel et
al. 2023): the paper's per-image evaluation, written down.

Each test image gives its MSE over valid pixels and bands and its mean predicted
variance, both in metric space (a model-space variance is 4 times larger:
`MODEL_TO_METRIC_VARIANCE`). `UncertaintyEvaluator` gathers per-image parts
(`image_parts`); `calibration` (RMSE against RMV in `BINS` bins, UCE, AUCE),
`error_by_uncertainty` (the "discard" curve) and `uncertainty_scores` make the
table; `write` and `plot` the files. docs/cloud_removal.md (section "How the
uncertainty metrics are defined") gives the formulas and the two choices that
differ from the authors' code on purpose.
"""
from __future__ import annotations

from typing import Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from rsjax import input_pipeline

BINS = 20
DISCARD_PERCENT = 5
# Metric space is (x + 1) / 2 of model space: variances scale by a quarter.
MODEL_TO_METRIC_VARIANCE = 0.25


def image_parts(mean, variance, target, valid) -> dict:
    """Per-image sums (jit-able): `se` (squared error), `var` (predicted
    variance), `nll` and `n` (valid pixel-bands) over each image of a batch.
    `mean`, `variance`, `target`: (B, H, W, C) in model space; `valid`: (B, H, W)."""
    mean01 = input_pipeline.image_to_reflectance01(mean.astype(jnp.float32))
    target01 = input_pipeline.image_to_reflectance01(target.astype(jnp.float32))
    var01 = variance.astype(jnp.float32) * MODEL_TO_METRIC_VARIANCE
    weight = jnp.broadcast_to(valid.astype(jnp.float32)[..., None], mean.shape)
    se = jnp.square(mean01 - target01)
    nll = 0.5 * (jnp.log(var01) + se / var01)

    def total(x):
        return jnp.sum(x * weight, axis=(1, 2, 3))
    return {"se": total(se), "var": total(var01), "nll": total(nll), "n": total(jnp.ones_like(se))}


_image_parts_jit = jax.jit(image_parts)


class UncertaintyEvaluator:
    """Collects per-image parts over a split; `scores()` -> `uncertainty_scores`."""

    def __init__(self):
        self._batches: list[dict] = []

    def add(self, mean, variance, batch: Mapping) -> None:
        self._batches.append(jax.device_get(
            _image_parts_jit(mean, variance, batch["image"], batch["valid"])))

    def parts(self) -> dict:
        """{part: (images,)} over the split, padding examples (no valid pixel) left out."""
        if not self._batches:
            return {}
        parts = {k: np.concatenate([np.asarray(b[k], np.float64) for b in self._batches])
                 for k in self._batches[0]}
        real = parts["n"] > 0
        return {k: v[real] for k, v in parts.items()}

    def scores(self) -> Optional[dict]:
        parts = self.parts()
        return uncertainty_scores(parts) if parts and len(parts["n"]) else None


def calibration(mse, variance, bins: int = BINS) -> dict:
    """UCE, AUCE and the bins (docs/cloud_removal.md) of per-image MSE and mean variance."""
    mse, variance = np.asarray(mse, np.float64), np.asarray(variance, np.float64)
    low, high = float(variance.min()), float(variance.max())
    edges = np.linspace(low, high, bins + 1)
    # Bin k holds [edges[k], edges[k+1]); the last also holds the largest value.
    index = np.clip(np.searchsorted(edges, variance, side="right") - 1, 0, bins - 1)
    rows, gaps = [], []
    for k in range(bins):
        inside = index == k
        count = int(inside.sum())
        rmse = float(np.sqrt(mse[inside].mean())) if count else None
        rmv = float(np.sqrt(variance[inside].mean())) if count else None
        rows.append({"low": float(edges[k]), "high": float(edges[k + 1]), "images": count,
                     "rmse": rmse, "rmv": rmv})
        if count:
            gaps.append((count / len(mse), abs(rmse - rmv)))
    return {"uce": float(sum(share * gap for share, gap in gaps)),
            "auce": float(np.mean([gap for _, gap in gaps])), "bins": rows}


def error_by_uncertainty(mse, variance, percent: int = DISCARD_PERCENT) -> dict:
    """The mean MSE of the most certain `percent` %, 2 x `percent` %, ..., 100 % of images."""
    mse, variance = np.asarray(mse, np.float64), np.asarray(variance, np.float64)
    order = np.argsort(variance, kind="stable")
    fractions = np.arange(percent, 101, percent) / 100.0
    kept = np.maximum(1, np.round(fractions * len(mse)).astype(int))
    return {"kept_fraction": fractions.tolist(),
            "mse": [float(mse[order[:k]].mean()) for k in kept]}


def uncertainty_scores(parts: Mapping[str, np.ndarray]) -> dict:
    """The split's uncertainty table from `UncertaintyEvaluator.parts()`."""
    from scipy import stats

    n = np.asarray(parts["n"], np.float64)
    mse, variance = parts["se"] / n, parts["var"] / n
    rho = stats.spearmanr(variance, mse).statistic if len(n) > 2 else float("nan")
    return {"images": int(len(n)), "nll": float(parts["nll"].sum() / n.sum()),
            "rmse": float(np.sqrt(mse.mean())), "rmv": float(np.sqrt(variance.mean())),
            **calibration(mse, variance),
            "spearman_variance_error": float(rho) if np.isfinite(rho) else None,
            "error_by_uncertainty": error_by_uncertainty(mse, variance)}


def summary(scores: Mapping) -> dict:
    """The flat scalars logged beside the image metrics."""
    return {f"uncertainty_{k}": scores[k] for k in ("nll", "uce", "auce", "rmse", "rmv")}


def write(workdir: str, split: str, step: int, evaluator: UncertaintyEvaluator) -> Optional[dict]:
    """`eval_<split>_uncertainty.json` (the table), `.npz` (per-image parts, for
    intervals over test images) and `.png` (`plot`) in the workdir; returns the table."""
    import json

    from etils import epath

    parts = evaluator.parts()
    if not parts or not len(parts["n"]):
        return None
    scores = uncertainty_scores(parts)
    root = epath.Path(workdir)
    (root / f"eval_{split}_uncertainty.json").write_text(
        json.dumps({"step": int(step), **scores}, indent=2))
    with (root / f"eval_{split}_uncertainty.npz").open("wb") as f:
        np.savez_compressed(f, **parts)
    plot(scores, root / f"eval_{split}_uncertainty.png")
    return scores


def plot(scores: Mapping, path) -> None:
    """Two panels as PNG: RMSE against RMV per bin (with the calibrated
    diagonal) and the MSE of the most certain images against their share."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from rsjax import viz

    figure = Figure(figsize=(9.0, 4.0), dpi=100)
    FigureCanvasAgg(figure)
    left, right = figure.subplots(1, 2)
    rows = [r for r in scores["bins"] if r["images"]]
    rmv, rmse = [r["rmv"] for r in rows], [r["rmse"] for r in rows]
    top = max(rmv + rmse)
    left.plot([0, top], [0, top], color="0.5", linestyle="--", label="calibrated")
    left.scatter(rmv, rmse, s=[12 + 4 * r["images"] for r in rows], label="bins (size: images)")
    left.set_xlabel("RMV (root mean predicted variance)")
    left.set_ylabel("RMSE")
    left.set_title(f"UCE {scores['uce']:.4f}, AUCE {scores['auce']:.4f}")
    left.legend()
    curve = scores["error_by_uncertainty"]
    right.plot(np.asarray(curve["kept_fraction"]) * 100, curve["mse"], marker="o", markersize=3)
    right.set_xlabel("most certain images kept (%)")
    right.set_ylabel("MSE")
    rho = scores["spearman_variance_error"]
    right.set_title("Spearman rho (variance, error) " + ("n/a" if rho is None else f"{rho:.2f}"))
    for axes in (left, right):
        axes.grid(True, alpha=0.3)
    figure.tight_layout()
    viz.save_figure(figure, path)
