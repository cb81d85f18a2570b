"""Uncertainty for the experiments: a result is a distribution over seeds and
test tiles, never one number.

Every method is trained with the same seeds and scored on the same test tiles,
so differences are paired. `seed_interval`: a table cell (mean over seeds, 95%
Student-t interval); `paired_difference`: a claim's interval, the seeds' spread
plus a bootstrap of the test set (`resampler`: tiles, or scenes with all their
tiles); `verdict`: holds / reversed / not resolved. Metrics come per tile as
additive parts (`image_metric`, `segmentation_metric`), so ratios (SAM, mIoU)
are recomputed exactly on every resample.
docs/experiments.md (section "Intervals and verdicts") gives the formulas.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Mapping, Optional, Sequence

import numpy as np

LEVEL = 0.95


@dataclasses.dataclass(frozen=True)
class Interval:
    mean: float
    low: float
    high: float
    n_seeds: int
    # A paired difference's two parts (paired_difference): one seed's variance
    # and the test set's (the bootstrap's) variance of the mean over seeds.
    seed_variance: float = dataclasses.field(default=math.nan, compare=False)
    test_variance: float = dataclasses.field(default=math.nan, compare=False)

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2.0

    def as_dict(self) -> dict:
        return {"mean": self.mean, "low": self.low, "high": self.high, "n_seeds": self.n_seeds}


def t_quantile(level: float, df: int) -> float:
    """Two-sided Student-t quantile, e.g. 4.303 for 95% and 2 degrees of freedom."""
    from scipy import stats

    return float(stats.t.ppf(0.5 + level / 2.0, df))


def seed_interval(values: Sequence[float], level: float = LEVEL) -> Interval:
    """Mean of per-seed values with a Student-t interval (NaN bounds for one seed)."""
    x = np.asarray([v for v in values if v is not None and np.isfinite(v)], np.float64)
    n = x.size
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0)
    mean = float(x.mean())
    if n == 1:
        return Interval(mean, math.nan, math.nan, 1)
    half = t_quantile(level, n - 1) * float(x.std(ddof=1)) / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n)


# ---------------------------------------------------------------------------
# Per-tile parts -> split-level metrics
# ---------------------------------------------------------------------------
Metric = Callable[[Mapping[str, np.ndarray]], float]


def image_metric(name: str) -> Metric:
    """PSNR and SSIM are means over tiles, SAM a mean over valid pixels:
    parts `psnr`, `ssim` (per tile; `has_psnr`/`has_ssim` say which tiles
    count, default: the finite ones) and `sam_sum`, `sam_count` (per tile),
    as rsjax.metrics.image_metric_parts gives them."""
    if name in ("psnr", "ssim"):
        def mean_over_tiles(parts):
            v = np.asarray(parts[name], np.float64)
            counts = np.asarray(parts.get(f"has_{name}", np.isfinite(v)), bool)
            return float(v[counts].mean()) if counts.any() else math.nan
        return mean_over_tiles
    if name in ("sam", "sam_rad", "sam_deg"):
        scale = math.degrees(1.0) if name == "sam_deg" else 1.0

        def pixel_mean(parts):
            count = float(np.sum(parts["sam_count"]))
            return scale * float(np.sum(parts["sam_sum"])) / count if count > 0 else math.nan
        return pixel_mean
    raise ValueError(f"unknown image metric {name!r}: psnr, ssim, sam, sam_deg")


def segmentation_metric(name: str) -> Metric:
    """mIoU and overall accuracy from the sum of per-tile confusion matrices
    (part `cm`, shape (tiles, K, K)); a class absent from truth and prediction
    is left out of the mean, as rsjax.metrics.segmentation_scores does."""
    if name not in ("miou", "accuracy"):
        raise ValueError(f"unknown segmentation metric {name!r}: miou, accuracy")

    def from_confusion(parts):
        cm = np.asarray(parts["cm"], np.float64).sum(axis=0)
        total = cm.sum()
        if total <= 0:
            return math.nan
        if name == "accuracy":
            return float(np.trace(cm) / total)
        tp = np.diag(cm)
        union = cm.sum(0) + cm.sum(1) - tp
        present = union > 0
        return float(np.mean(tp[present] / union[present]))
    return from_confusion


def _take(parts: Mapping[str, np.ndarray], tiles: np.ndarray) -> dict:
    return {k: np.asarray(v)[tiles] for k, v in parts.items()}


def _check_runs(runs: Sequence[Mapping[str, np.ndarray]]) -> int:
    lengths = {len(next(iter(r.values()))) for r in runs}
    if len(lengths) != 1:
        raise ValueError(f"every run must be scored on the same tiles; got tile counts {lengths}")
    return lengths.pop()


def resampler(n_tiles: int, clusters: Optional[Sequence] = None) -> Callable:
    """`draw(rng)` -> tile indices of one bootstrap sample: `n_tiles` tiles
    drawn with replacement, or, given each tile's cluster (its scene), as many
    clusters drawn with replacement as there are, each bringing all its tiles.
    Tiles of one scene share its land, light and season: drawn one by one, as
    if independent, they understate the spread of a test set of new scenes."""
    if clusters is None:
        return lambda rng: rng.integers(0, n_tiles, n_tiles)
    labels = np.asarray(clusters)
    if len(labels) != n_tiles:
        raise ValueError(f"{len(labels)} cluster labels for {n_tiles} tiles")
    members = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    return lambda rng: np.concatenate([members[i] for i in
                                       rng.integers(0, len(members), len(members))])


def shared_scenes(ids: Sequence[Optional[Sequence]], n_tiles: int) -> Optional[np.ndarray]:
    """The scene of each of `n_tiles` test tiles, where every run names them and
    alike (runs recorded before scene ids were kept name none), and they are at
    least two scenes; else None, and the tile bootstrap is the one to use (one
    scene drawn with replacement is always itself: a bootstrap over it would
    say the test set has no spread at all)."""
    if not ids or any(i is None for i in ids):
        return None
    first = np.asarray(ids[0])
    if len(first) != n_tiles or any(not np.array_equal(first, i) for i in ids[1:]) \
            or len(np.unique(first)) < 2:
        return None
    return first


def paired_difference(a_runs: Sequence[Mapping[str, np.ndarray]],
                      b_runs: Sequence[Mapping[str, np.ndarray]], metric: Metric,
                      level: float = LEVEL, n_boot: int = 1000, seed: int = 0,
                      clusters: Optional[Sequence] = None) -> Interval:
    """Interval of mean_s [metric(A_s) - metric(B_s)] over seeds and test tiles.

    a_runs[s], b_runs[s]: per-tile parts of method A and B trained with seed s,
    every run scored on the same tiles in the same order. `clusters`: each
    tile's scene, to resample scenes rather than tiles (`resampler`).
    """
    if len(a_runs) != len(b_runs) or not a_runs:
        raise ValueError(f"need the same non-zero number of seeds for both methods, got "
                         f"{len(a_runs)} and {len(b_runs)}")
    n_tiles = _check_runs(list(a_runs) + list(b_runs))
    per_seed = np.array([metric(a) - metric(b) for a, b in zip(a_runs, b_runs)])
    mean = float(np.mean(per_seed))
    s = len(per_seed)
    if s < 2:
        return Interval(mean, math.nan, math.nan, s)
    rng = np.random.default_rng(seed)
    draw = resampler(n_tiles, clusters)
    boots = np.empty(n_boot)
    for i in range(n_boot):
        tiles = draw(rng)
        boots[i] = np.mean([metric(_take(a, tiles)) - metric(_take(b, tiles))
                            for a, b in zip(a_runs, b_runs)])
    var_seed = float(np.var(per_seed, ddof=1)) / s
    var_tiles = float(np.nanvar(boots, ddof=1))
    # Degrees of freedom of the seed part (the smaller, noisier one): the
    # Welch-Satterthwaite value covered only 0.88-0.92 in simulations with 3
    # seeds (tests/test_stats.py), this 0.95-1.0.
    half = t_quantile(level, s - 1) * math.sqrt(var_seed + var_tiles)
    return Interval(mean, mean - half, mean + half, s, seed_variance=var_seed * s,
                    test_variance=var_tiles)


def seeds_to_resolve(interval: Interval, power: float = 0.8, level: float = LEVEL,
                     max_seeds: int = 30) -> Optional[int]:
    """The fewest seeds whose interval (as paired_difference makes it) would
    leave 0 out with probability `power`, were the observed difference, one
    seed's variance and the test set's variance the truth: the smallest s with
    |d| >= (t_{level, s-1} + t_{power, s-1}) sqrt(var_seed / s + var_test)
    (the usual power rule for a t interval). The test set's term stays as it
    is: more seeds are scored on the same test set, so they do not shrink it.
    None where no count up to `max_seeds` does (then the test set, not the
    seeds, is what a claim would need more of)."""
    from scipy import stats as scipy_stats

    d, var_seed, var_test = abs(interval.mean), interval.seed_variance, interval.test_variance
    if not all(np.isfinite(v) for v in (d, var_seed, var_test)):
        return None
    for s in range(2, max_seeds + 1):
        need = t_quantile(level, s - 1) + float(scipy_stats.t.ppf(power, s - 1))
        if d >= need * math.sqrt(var_seed / s + var_test):
            return s
    return None


HOLDS, REVERSED, NOT_RESOLVED = "holds", "reversed", "not resolved"
# How a claim's interval resampled the test set (named in every report row).
SCENE_BOOTSTRAP = "scene-cluster bootstrap (the scenes resampled, each with all its tiles)"
TILE_BOOTSTRAP = "tile bootstrap (tiles resampled as if independent)"


def judge(interval: Interval, higher_is_better: bool = True) -> dict:
    """A claim's verdict from its paired interval, with one seed always not
    resolved, and how many seeds would resolve it where it is not."""
    if interval.n_seeds < 2:
        return {"verdict": f"{NOT_RESOLVED} (1 seed)"}
    found = verdict(interval, higher_is_better)
    return {"verdict": found, **({"seeds_to_resolve": seeds_to_resolve(interval)}
                                 if found == NOT_RESOLVED else {})}


def verdict(interval: Interval, higher_is_better: bool = True) -> str:
    """'holds' when the whole interval of (claimed winner - other) is on the
    winning side of 0, 'reversed' when it is all on the other side."""
    if not (np.isfinite(interval.low) and np.isfinite(interval.high)):
        return NOT_RESOLVED
    low, high = (interval.low, interval.high) if higher_is_better else (-interval.high, -interval.low)
    if low > 0:
        return HOLDS
    if high < 0:
        return REVERSED
    return NOT_RESOLVED


def resolve_note(row: Mapping) -> str:
    """A claim row's seeds-to-resolve cell: the count, '> 30' where more seeds
    would not do, or blank where the claim is resolved (or has one seed)."""
    if "seeds_to_resolve" not in row:
        return ""
    return "> 30 (the test set's spread)" if row["seeds_to_resolve"] is None else str(
        row["seeds_to_resolve"])


def band(curves: Sequence[Sequence[float]], level: float = LEVEL) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean and t-interval band over seeds of equally long curves (Figure 8)."""
    y = np.asarray(curves, np.float64)
    mean = y.mean(axis=0)
    if y.shape[0] < 2:
        return mean, mean, mean
    half = t_quantile(level, y.shape[0] - 1) * y.std(axis=0, ddof=1) / math.sqrt(y.shape[0])
    return mean, mean - half, mean + half
