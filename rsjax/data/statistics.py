"""Per-channel statistics of every source and land-cover class frequencies.

Accumulated tile by tile over the train split during the dataset build and
stored in the dataset's metadata as plain JSON, so the input pipeline
normalizes from numbers that travel with the data. The accumulators are
mergeable (`merge`, used by the Beam build's combiner) and give the same
numbers, bit for bit, whatever the order and grouping of the tiles: count,
mean, std, min and max exact, percentiles from a seeded bottom-k sample, class
counts exact. No-data follows the data contract.
docs/data.md (section 'Statistics') says how each statistic stays exact and
order-independent.
"""
from __future__ import annotations

import fractions
import hashlib
import math
from typing import Iterable, Mapping, Optional, Sequence

import numpy as np

from rsjax.data import contract

PERCENTILES = (1.0, 2.0, 50.0, 98.0, 99.0)
# Channel names per source, in storage order (stats are keyed by them).
CHANNELS = {
    "s2": contract.S2_BANDS,
    "s1": contract.S1_BANDS,
    "dem": contract.DEM_CHANNELS,
}

_ZERO = fractions.Fraction(0)


def _exact(x: float) -> fractions.Fraction:
    return fractions.Fraction(float(x))


def _tile_words(key: str) -> list[int]:
    """Seed material of a tile key (stable across processes and Python versions)."""
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return [int.from_bytes(digest[i:i + 4], "little") for i in range(0, 16, 4)]


class ChannelStatistics:
    """Mergeable statistics of the valid values of C channels."""

    def __init__(self, names: Sequence[str], *, samples_per_tile: int = 4096,
                 max_samples: int = 1 << 20, seed: int = 0):
        self.names = tuple(names)
        c = len(self.names)
        self.count = [0] * c
        self.sum = [_ZERO] * c             # exact sum of the values
        self.m2_tiles = [_ZERO] * c        # exact sum of the tiles' own squared deviations
        self.sq_tiles = [_ZERO] * c        # exact sum of sum_tile^2 / n_tile (each rounded once)
        self.min = [math.inf] * c
        self.max = [-math.inf] * c
        self.samples_per_tile = samples_per_tile
        self.max_samples = max_samples
        self.seed = seed
        self._updates = 0                  # key of an update that names no tile
        self._keys = [np.empty(0) for _ in range(c)]
        self._values = [np.empty(0) for _ in range(c)]

    def update(self, values: np.ndarray, valid: np.ndarray, key: Optional[str] = None) -> None:
        """values (..., C); valid (..., C) or (...) bool: which values to count.

        `key` names the tile (its id) and seeds its sample; without one,
        updates are numbered in arrival order (fine for one sequential pass).
        """
        if key is None:
            key = f"#{self._updates}"
        self._updates += 1
        values = np.asarray(values, np.float64).reshape(-1, len(self.names))
        valid = np.asarray(valid, bool)
        valid = np.broadcast_to(valid.reshape(values.shape[0], -1), values.shape)
        words = _tile_words(key)
        for ch in range(len(self.names)):
            x = values[valid[:, ch], ch]
            if x.size == 0:
                continue
            self._add_moments(ch, x)
            self._offer_samples(ch, x, np.random.default_rng([self.seed, ch, *words]))

    def _add_moments(self, ch: int, x: np.ndarray) -> None:
        n = x.size
        s = float(x.sum())
        m2 = float(((x - s / n) ** 2).sum())
        self.count[ch] += n
        self.sum[ch] += _exact(s)
        self.m2_tiles[ch] += _exact(m2)
        self.sq_tiles[ch] += _exact(s * s / n)
        self.min[ch] = min(self.min[ch], float(x.min()))
        self.max[ch] = max(self.max[ch], float(x.max()))

    def _offer_samples(self, ch: int, x: np.ndarray, rng: np.random.Generator) -> None:
        if x.size > self.samples_per_tile:
            x = rng.choice(x, self.samples_per_tile, replace=False)
        self._keep(ch, np.concatenate([self._keys[ch], rng.random(x.size)]),
                   np.concatenate([self._values[ch], x]))

    def _keep(self, ch: int, keys: np.ndarray, values: np.ndarray) -> None:
        """Keeps the max_samples smallest (key, value) pairs: the same set for any input order."""
        k = self.max_samples
        if keys.size > k:
            kth = np.partition(keys, k - 1)[k - 1]
            below = np.flatnonzero(keys < kth)
            tied = np.flatnonzero(keys == kth)
            tied = tied[np.argsort(values[tied], kind="stable")][: k - below.size]
            keep = np.concatenate([below, tied])
            keys, values = keys[keep], values[keep]
        self._keys[ch], self._values[ch] = keys, values

    def merge(self, other: "ChannelStatistics") -> "ChannelStatistics":
        """Adds `other`'s values to this accumulator (in place); returns self."""
        if other.names != self.names or other.max_samples != self.max_samples:
            raise ValueError("merging statistics of different channels or sample sizes")
        for ch in range(len(self.names)):
            self.count[ch] += other.count[ch]
            self.sum[ch] += other.sum[ch]
            self.m2_tiles[ch] += other.m2_tiles[ch]
            self.sq_tiles[ch] += other.sq_tiles[ch]
            self.min[ch] = min(self.min[ch], other.min[ch])
            self.max[ch] = max(self.max[ch], other.max[ch])
            self._keep(ch, np.concatenate([self._keys[ch], other._keys[ch]]),
                       np.concatenate([self._values[ch], other._values[ch]]))
        self._updates += other._updates
        return self

    def result(self, percentiles: Sequence[float] = PERCENTILES) -> dict:
        out = {"channels": list(self.names), "count": [int(n) for n in self.count]}
        mean, std = [], []
        for ch, n in enumerate(self.count):
            if n == 0:
                mean.append(None)
                std.append(None)
                continue
            m2 = self.m2_tiles[ch] + self.sq_tiles[ch] - self.sum[ch] ** 2 / n
            mean.append(float(self.sum[ch] / n))
            std.append(math.sqrt(max(float(m2 / n), 0.0)))
        out["mean"], out["std"] = mean, std
        out["min"] = [None if n == 0 else float(v) for n, v in zip(self.count, self.min)]
        out["max"] = [None if n == 0 else float(v) for n, v in zip(self.count, self.max)]
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
    """Mergeable statistics of all sources of a stream of contract tiles."""

    def __init__(self, *, seed: int = 0, samples_per_tile: int = 4096, max_samples: int = 1 << 20):
        self.sources = {name: ChannelStatistics(channels, seed=seed + i,
                                                samples_per_tile=samples_per_tile,
                                                max_samples=max_samples)
                        for i, (name, channels) in enumerate(CHANNELS.items())}
        self.class_counts = np.zeros(256, np.int64)
        self.num_tiles = 0

    def update(self, tile: Mapping[str, np.ndarray]) -> None:
        """Adds one tile; its `tile_id` (when present) seeds its pixel sample."""
        masks = valid_masks(tile)
        key = str(tile["tile_id"]) if "tile_id" in tile else None
        for name, stats in self.sources.items():
            stats.update(tile[name], masks[name], key=key)
        self.class_counts += np.bincount(np.asarray(tile["lulc"], np.uint8).ravel(), minlength=256)
        self.num_tiles += 1

    def merge(self, other: "DatasetStatistics") -> "DatasetStatistics":
        """Adds `other`'s tiles to this accumulator (in place); returns self."""
        for name, stats in self.sources.items():
            stats.merge(other.sources[name])
        self.class_counts += other.class_counts
        self.num_tiles += other.num_tiles
        return self

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


def merged(accumulators: Iterable[DatasetStatistics], **kwargs) -> DatasetStatistics:
    """One accumulator holding every tile of `accumulators` (a fresh one when there are none)."""
    total = DatasetStatistics(**kwargs)
    for acc in accumulators:
        total.merge(acc)
    return total
