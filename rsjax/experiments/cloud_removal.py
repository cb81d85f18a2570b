"""Cloud removal on the cloudy synthetic scenes, as SEN12MS-CR papers report it.

    rsjax experiments cloud_removal --scale demo --workdir work/clouds_demo

Beyond the paper: the clear image under the clouds of a cloudy one, from SAR
(and, unlike the peers, terrain and land cover). Trained and scored on
`rs_multisource/synthetic_cloudy_demo` (demo) or `synthetic_cloudy` (bench),
every method on the same test tiles, with the metrics of
rsjax.cloud_metrics (MAE, RMSE, PSNR, SSIM, SAM in degrees; whole tile,
under cloud, under shadow, clear; by cloud-cover bin).
"""
from __future__ import annotations

import math
from typing import Mapping, Optional, Sequence

import numpy as np

from rsjax import cloud_metrics as cm
from rsjax.experiments import stats

# Published on SEN12MS-CR's test split (real Sentinel-1/2 pairs, 13 bands,
# 256 px): measured on other data, for orientation only. (PSNR dB, SSIM, SAM deg.)
PEERS = (
    ("DSen2-CR (Meraner et al. 2020)", "S2 cloudy + S1", ("27.8-29.3", "0.874-0.878", "8.1-9.5")),
    ("GLF-CR (Xu et al. 2022)", "S2 cloudy + S1", ("28.64", "0.885", "8.98")),
    ("UnCRtainTS (Ebel et al. 2023)", "S2 cloudy + S1", ("28.90", "0.880", "8.32")),
    ("diffusion models (DiffCR, EMRDM, ECRformer)", "S2 cloudy + S1", ("31.8-33.4", "", "")),
)
COLUMNS = (("mae", "MAE", "{:.4f}"), ("rmse", "RMSE", "{:.4f}"), ("psnr", "PSNR (dB)", "{:.2f}"),
           ("ssim", "SSIM", "{:.3f}"), ("sam_deg", "SAM (deg)", "{:.2f}"))
SHORT = (("psnr", "{:.2f}"), ("ssim", "{:.3f}"), ("sam_deg", "{:.2f}"))
REGION_TITLES = {"all": "whole tile", "cloud": "under cloud", "shadow": "under shadow",
                 "clear": "clear part"}


def cell(runs: Sequence[Mapping[str, np.ndarray]], metric: str, region: str = "all",
         cover_bin: Optional[int] = None) -> stats.Interval:
    """Mean over seeds of the split-level metric, from each seed's per-image parts."""
    fn = cm.split_metric(metric, region, cover_bin)
    return stats.seed_interval([fn(parts) for parts in runs])


def _format(interval: stats.Interval, fmt: str) -> str:
    if not math.isfinite(interval.mean):
        return "—"
    text = fmt.format(interval.mean)
    if interval.n_seeds > 1 and math.isfinite(interval.half_width):
        text += " ± " + fmt.format(interval.half_width)
    return text


def _count(runs, region: str = "all", cover_bin: Optional[int] = None) -> int:
    parts = runs[0]
    r = cm.REGIONS.index(region)
    images = np.asarray(parts["n_pixels"])[:, r] > 0
    if cover_bin is not None:
        images &= cm.cover_bin_index(parts["cover"]) == cover_bin
    return int(images.sum())


def whole_tile_table(results: Mapping[str, dict]) -> str:
    """Every method on the whole tile, then the peers' published numbers.

    results: {method key: {"label", "inputs", "runs": [per-image parts, one per seed]}}.
    """
    head = "| method | inputs | " + " | ".join(t for _, t, _ in COLUMNS) + " |"
    lines = [head, "|---|---|" + "---:|" * len(COLUMNS)]
    for entry in results.values():
        cells = [_format(cell(entry["runs"], m), f) for m, _, f in COLUMNS]
        lines.append(f"| {entry['label']} | {entry['inputs']} | " + " | ".join(cells) + " |")
    for label, inputs, (psnr, ssim, sam) in PEERS:
        lines.append(f"| *{label}: published, other data* | {inputs} | — | — | "
                     f"{psnr or '—'} | {ssim or '—'} | {sam or '—'} |")
    return "\n".join(lines)


def region_table(results: Mapping[str, dict]) -> str:
    """PSNR / SSIM / SAM of every method in each region (images counted per region)."""
    head = "| method | " + " | ".join(REGION_TITLES[r] for r in cm.REGIONS) + " |"
    lines = [head, "|---|" + "---:|" * len(cm.REGIONS)]
    for entry in results.values():
        cells = [" / ".join(_format(cell(entry["runs"], m, r), f) for m, f in SHORT)
                 for r in cm.REGIONS]
        lines.append(f"| {entry['label']} | " + " | ".join(cells) + " |")
    first = next(iter(results.values()))["runs"]
    lines.append("| tiles | " + " | ".join(str(_count(first, r)) for r in cm.REGIONS) + " |")
    return "\n".join(lines)


def cover_table(results: Mapping[str, dict], region: str = "all") -> str:
    """PSNR / SSIM / SAM of every method by cloud-cover bin (in one region)."""
    labels = [cm.bin_label(*b) for b in cm.COVER_BINS]
    lines = ["| method | " + " | ".join(labels) + " |", "|---|" + "---:|" * len(labels)]
    for entry in results.values():
        cells = [" / ".join(_format(cell(entry["runs"], m, region, i), f) for m, f in SHORT)
                 for i in range(len(labels))]
        lines.append(f"| {entry['label']} | " + " | ".join(cells) + " |")
    first = next(iter(results.values()))["runs"]
    lines.append("| tiles | " + " | ".join(str(_count(first, region, i))
                                           for i in range(len(labels))) + " |")
    return "\n".join(lines)
