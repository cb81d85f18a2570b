"""Per-channel statistics of every source and land-cover class frequencies.

Accumulated tile by tile during the dataset build (over the train split) and
stored in the dataset's metadata as plain JSON, so that the input pipeline
normalizes from numbers that travel with the data.

- mean and std: exact, over every valid pixel (Chan et al.'s pairwise merge of
  per-tile mean and sum of squared deviations, in float64).
- min and max: exact.
- percentiles (1, 2, 50, 98, 99 by default): from a uniform random sample of
  the valid pixels (a bottom-k sketch: every offered pixel gets a random key
  and the `max_samples` smallest keys are kept), so memory stays bounded on
  any number of tiles. Each tile offers at most `samples_per_tile` pixels.
  The sample is seeded, so the same build gives the same numbers.
- class frequencies: exact pixel counts of every Dynamic World label and of
  no-data (255).

No-data conventions are the data contract's: s2 0 in every band, s1 NaN,
lulc 255, dem NaN; aspect's flat marker (-9999) is not an angle and is left
out of aspect's statistics.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from rsjax.data import contract

PERCENTILES = (1.0, 2.0, 50.0, 98.0, 99.0)
# Channel names per source, in storage order (stats are keyed by them).
CHANNELS = {
    "s2": contract.S2_BANDS,
    "s1": contract.S1_BANDS,
    "dem": contract.DEM_CHANNELS,
}


class ChannelStatistics:
    """Running statistics of the valid values of C channels."""

    def __init__(self, names: Sequence[str], *, samples_per_tile: int = 4096,
                 max_samples: int = 1 << 20, seed: int = 0):
        self.names = tuple(names)
        c = len(self.names)
        self.count = np.zeros(c, np.int64)
        self.mean = np.zeros(c, np.float64)
        self.m2 = np.zeros(c, np.float64)      # sum of squared deviations from the mean
        self.min = np.full(c, np.inf)
        self.max = np.full(c, -np.inf)
        self.samples_per_tile = samples_per_tile
        self.max_samples = max_samples
        self._rng = np.random.default_rng(seed)
        self._keys = [np.empty(0) for _ in range(c)]
        self._values = [np.empty(0) for _ in range(c)]

    def update(self, values: np.ndarray, valid: np.ndarray) -> None:
        """values (..., C); valid (..., C) or (...) bool: which values to count."""
        values = np.asarray(values, np.float64).reshape(-1, len(self.names))
        valid = np.asarray(valid, bool)
        valid = np.broadcast_to(valid.reshape(values.shape[0], -1), values.shape)
        for ch in range(len(self.names)):
            x = values[valid[:, ch], ch]
            if x.size == 0:
                continue
            self._merge_moments(ch, x)
            self._offer_samples(ch, x)

    def _merge_moments(self, ch: int, x: np.ndarray) -> None:
        n_b = x.size
        mean_b = x.mean()
        m2_b = ((x - mean_b) ** 2).sum()
        n_a = self.count[ch]
        n = n_a + n_b
        delta = mean_b - self.mean[ch]
        self.mean[ch] += delta * n_b / n
        self.m2[ch] += m2_b + delta**2 * n_a * n_b / n
        self.count[ch] = n
        self.min[ch] = min(self.min[ch], x.min())
        self.max[ch] = max(self.max[ch], x.max())

    def _offer_samples(self, ch: int, x: np.ndarray) -> None:
        if x.size > self.samples_per_tile:
            x = self._rng.choice(x, self.samples_per_tile, replace=False)
        keys = np.concatenate([self._keys[ch], self._rng.random(x.size)])
        values = np.concatenate([self._values[ch], x])
        if keys.size > self.max_samples:
            keep = np.argpartition(keys, self.max_samples)[: self.max_samples]
            keys, values = keys[keep], values[keep]
        self._keys[ch], self._values[ch] = keys, values

    def result(self, percentiles: Sequence[float] = PERCENTILES) -> dict:
        out = {"channels": list(self.names), "count": self.count.tolist()}
        with np.errstate(invalid="ignore", divide="ignore"):
            std = np.sqrt(self.m2 / self.count)
        empty = self.count == 0
        out["mean"] = [None if e else float(v) for e, v in zip(empty, self.mean)]
        out["std"] = [None if e else float(v) for e, v in zip(empty, std)]
        out["min"] = [None if e else float(v) for e, v in zip(empty, self.min)]
        out["max"] = [None if e else float(v) for e, v in zip(empty, self.max)]
        out["percentiles"] = {}
        for p in percentiles:
            out["percentiles"][_percentile_key(p)] = [
                None if v.size == 0 else float(np.percentile(v, p)) for v in self._values]
        return out


def _percentile_key(p: float) -> str:
    return f"p{p:g}"


def valid_masks(tile: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per-source validity of a contract tile: s2 (H,W), s1 (H,W,2), dem (H,W,4)."""
    s2 = np.asarray(tile["s2"])
    dem = np.asarray(tile["dem"], np.float32)
    dem_valid = np.isfinite(dem)
    dem_valid[..., 2] &= dem[..., 2] != contract.ASPECT_FLAT
    return {
        "s2": np.any(s2 != contract.S2_NODATA, axis=-1),
        "s1": np.isfinite(np.asarray(tile["s1"], np.float32)),
        "dem": dem_valid,
    }


class DatasetStatistics:
    """Statistics of all sources of a stream of contract tiles."""

    def __init__(self, *, seed: int = 0, samples_per_tile: int = 4096, max_samples: int = 1 << 20):
        self.sources = {name: ChannelStatistics(channels, seed=seed + i,
                                                samples_per_tile=samples_per_tile,
                                                max_samples=max_samples)
                        for i, (name, channels) in enumerate(CHANNELS.items())}
        self.class_counts = np.zeros(256, np.int64)
        self.num_tiles = 0

    def update(self, tile: Mapping[str, np.ndarray]) -> None:
        masks = valid_masks(tile)
        for name, stats in self.sources.items():
            stats.update(tile[name], masks[name])
        self.class_counts += np.bincount(np.asarray(tile["lulc"], np.uint8).ravel(), minlength=256)
        self.num_tiles += 1

    def result(self) -> dict:
        counts = self.class_counts[: contract.NUM_CLASSES]
        labelled = int(counts.sum())
        return {
            "num_tiles": self.num_tiles,
            **{name: stats.result() for name, stats in self.sources.items()},
            "lulc": {
                "classes": list(contract.LULC_CLASSES),
                "counts": counts.tolist(),
                "frequencies": (counts / max(labelled, 1)).tolist(),
                "nodata_count": int(self.class_counts[contract.LULC_NODATA]),
                # Any other value is outside the contract; counted so that it shows.
                "invalid_count": int(self.class_counts[contract.NUM_CLASSES:contract.LULC_NODATA].sum()),
            },
        }
