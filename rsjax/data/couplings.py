"""How much each source tells about the optical bands: ridge-regression R².

`coupling_r2` fits a per-pixel ridge regression of B2, B3, B4, B8 on each
subset of the sources (lulc one-hot, s1 dB, dem channels, each with its 3x3
local mean) and scores it on held-out 32 x 32 blocks; `ordering_violations`
lists the subsets that do not beat their parts (on the synthetic scenes all
three must beat every pair, every pair each of its members). The functions
take any iterable of tile dicts in the data-contract format; `rsjax couplings`
feeds them from `rsjax.data.ingest.iter_scene_tiles`.
docs/data.md (section 'Measuring the couplings') gives the features, the
held-out split and why blocks rather than tiles.
"""
from __future__ import annotations

import itertools
import re
from typing import Iterable, Optional, Sequence

import numpy as np

from rsjax.data.contract import ASPECT_FLAT, LULC_NODATA, NUM_CLASSES, S2_BANDS, S2_NODATA, SOURCES
from rsjax.errors import UserError

REFLECTANCE_SCALE = 10000.0


def all_subsets(sources: Sequence[str] = SOURCES) -> list[tuple[str, ...]]:
    """Every non-empty subset, singles first, then pairs, then all three."""
    return [s for n in range(1, len(sources) + 1) for s in itertools.combinations(sources, n)]


def subset_name(subset: Sequence[str]) -> str:
    return "+".join(subset)


def local_mean_3x3(x: np.ndarray) -> np.ndarray:
    """Mean over each pixel's 3x3 neighbourhood, edges replicated; x is (H, W, C)."""
    p = np.pad(x, ((1, 1), (1, 1), (0, 0)), mode="edge")
    h, w = x.shape[:2]
    return sum(p[r:r + h, c:c + w] for r in range(3) for c in range(3)) / 9.0


def source_channels(tile: dict, source: str) -> np.ndarray:
    """The per-pixel channels of one source, (H, W, C) float64, NaN where the source has no data."""
    if source == "lulc":
        labels = np.asarray(tile["lulc"])
        onehot = (labels[..., None] == np.arange(NUM_CLASSES)).astype(np.float64)
        return np.where((labels == LULC_NODATA)[..., None], np.nan, onehot)
    if source == "s1":
        return np.asarray(tile["s1"], np.float64)
    if source == "dem":
        dem = np.asarray(tile["dem"], np.float64)
        elevation, slope, aspect, shade = (dem[..., i] for i in range(4))
        flat = aspect == ASPECT_FLAT
        radians = np.radians(np.where(flat, 0.0, aspect))
        sin_a = np.where(flat, 0.0, np.sin(radians))
        cos_a = np.where(flat, 0.0, np.cos(radians))
        return np.stack([elevation, slope, sin_a, cos_a, shade], axis=-1)
    raise ValueError(f"unknown source '{source}': expected one of {', '.join(SOURCES)}.")


def holdout_mask(shape: tuple[int, int], block: int = 32, test_every: int = 4,
                 origin: tuple[int, int] = (0, 0)) -> np.ndarray:
    """True for held-out pixels: one block of `block` x `block` pixels in
    `test_every`, in diagonal stripes, so that every tile (and every kind of
    terrain and cover) lands in both splits while the split pixels stay in
    separate blocks (3x3 means only straddle block edges).

    `origin` is the (row, col) of the tile's top-left pixel in its scene: the
    stripes are laid over the scene, not restarted in every tile, so a tile
    narrower than the stripes' period (64 px with the default 32 px blocks,
    whose local block indices sum to 2 at most, never 3) still lands in both
    splits across the scene's tiles."""
    rows, cols = np.indices(shape)
    rows, cols = rows + origin[0], cols + origin[1]
    return ((rows // block) + (cols // block)) % test_every == test_every - 1


TILE_ORIGIN = re.compile(r"_r(\d+)_c(\d+)$")     # rsjax.data.ingest.tile_id, synthetic.scene_tiles


def tile_origin(tile: dict, index: int) -> tuple[int, int]:
    """The tile's top-left pixel (row, col) in its scene, from its tile id
    (`<scene>_r<row>_c<col>`, as ingestion and the synthetic tiles name them);
    a tile without one is placed as if the tiles so far lay side by side in
    one row (the `index`-th tile at column `index` x its width)."""
    match = TILE_ORIGIN.search(str(tile.get("tile_id", "")))
    if match:
        return int(match.group(1)), int(match.group(2))
    return 0, index * int(np.shape(tile["s2"])[1])


def tile_samples(tile: dict, sources: Sequence[str], max_pixels: int, rng: np.random.Generator,
                 test_every: int = 4, block: int = 32, origin: tuple[int, int] = (0, 0)) -> dict:
    """Draws up to `max_pixels` valid pixels of a tile, split into train and held-out.

    Returns {"train"/"test": ({source: (N, 2C) channels and their 3x3 means},
    (N, 4) reflectance)}. A pixel is valid when every source and every 3x3 mean
    is finite and S2 has data. `origin`: the tile's place in its scene (`holdout_mask`).
    """
    s2 = np.asarray(tile["s2"])
    valid = ~np.all(s2 == S2_NODATA, axis=-1)
    features = {}
    for source in sources:
        channels = source_channels(tile, source)
        both = np.concatenate([channels, local_mean_3x3(channels)], axis=-1)
        valid &= np.all(np.isfinite(both), axis=-1)
        features[source] = both
    index = np.flatnonzero(valid.ravel())
    if index.size > max_pixels:
        index = np.sort(rng.choice(index, max_pixels, replace=False))
    held_out = holdout_mask(s2.shape[:2], block, test_every, origin).ravel()[index]
    target = s2.reshape(-1, s2.shape[-1]).astype(np.float64) / REFLECTANCE_SCALE
    out = {}
    for split, chosen in (("train", index[~held_out]), ("test", index[held_out])):
        out[split] = ({s: f.reshape(-1, f.shape[-1])[chosen] for s, f in features.items()},
                      target[chosen])
    return out


def ridge_fit(x: np.ndarray, y: np.ndarray, lam: float = 1.0) -> dict:
    """Closed-form ridge regression of y (N, K) on x (N, D).

    Features are standardised with the training statistics (constant ones get
    scale 1), the intercept is not penalised: W = (Z^T Z + lam I)^-1 Z^T (y - mean y).
    """
    mean = x.mean(axis=0)
    scale = x.std(axis=0)
    scale = np.where(scale > 1e-12, scale, 1.0)
    z = (x - mean) / scale
    y_mean = y.mean(axis=0)
    gram = z.T @ z + lam * np.eye(z.shape[1])
    # lstsq rather than solve: with lam = 0, constant or collinear columns (a
    # one-hot with a class absent, or the one-hot's sum) make the Gram matrix singular.
    weights = np.linalg.lstsq(gram, z.T @ (y - y_mean), rcond=None)[0]
    return dict(mean=mean, scale=scale, weights=weights, intercept=y_mean)


def ridge_predict(model: dict, x: np.ndarray) -> np.ndarray:
    return ((x - model["mean"]) / model["scale"]) @ model["weights"] + model["intercept"]


def r2_per_band(y_true: np.ndarray, y_pred: np.ndarray) -> np.ndarray:
    """Coefficient of determination 1 - SS_res / SS_tot, per column."""
    ss_res = np.sum((y_true - y_pred) ** 2, axis=0)
    ss_tot = np.sum((y_true - y_true.mean(axis=0)) ** 2, axis=0)
    return 1.0 - ss_res / ss_tot


def coupling_r2(tiles: Iterable[dict], subsets: Optional[Sequence[Sequence[str]]] = None, *,
                lam: float = 1.0, pixels_per_tile: int = 4096, test_every: int = 4,
                block: int = 32, seed: int = 0) -> dict:
    """Held-out R² of predicting the optical bands from each source subset.

    Tiles are read once (any iterable, e.g. a generator over scenes). One
    block of `block` x `block` pixels in `test_every`, in stripes over each
    scene, is held out for scoring (`holdout_mask`, `tile_origin`); the rest
    trains. All subsets are scored on
    the same pixels. Returns {"subsets": {name: {"r2": mean over bands,
    "r2_per_band": {band: r2}}}, "train_pixels", "test_pixels", "tiles", "lambda"}.
    """
    if test_every < 2:
        raise UserError(f"--test_every {test_every}: must be at least 2 (1 would hold out every "
                        "pixel and leave none to fit).")
    subsets = [tuple(s) for s in (subsets or all_subsets())]
    for subset in subsets:
        for source in subset:
            if source not in SOURCES:
                raise ValueError(f"unknown source '{source}' in subset {subset}: "
                                 f"expected some of {', '.join(SOURCES)}.")
    sources = sorted({s for subset in subsets for s in subset}, key=SOURCES.index)
    rng = np.random.default_rng(seed)
    parts = {"train": ([], []), "test": ([], [])}
    num_tiles = 0
    for tile in tiles:
        origin = tile_origin(tile, num_tiles)
        num_tiles += 1
        for split, (features, target) in tile_samples(tile, sources, pixels_per_tile, rng,
                                                      test_every, block, origin).items():
            parts[split][0].append(features)
            parts[split][1].append(target)

    def stacked(split, subset):
        if not parts[split][1]:
            return np.zeros((0, 0)), np.zeros((0, len(S2_BANDS)))
        x = np.concatenate([np.concatenate([f[s] for s in subset], axis=1) for f in parts[split][0]])
        return x, np.concatenate(parts[split][1])

    results = {}
    for subset in subsets:
        x_train, y_train = stacked("train", subset)
        x_test, y_test = stacked("test", subset)
        if len(x_train) < 2 or len(x_test) < 2:
            raise UserError(too_few_pixels(len(x_train), len(x_test), num_tiles, block, test_every))
        r2 = r2_per_band(y_test, ridge_predict(ridge_fit(x_train, y_train, lam), x_test))
        results[subset_name(subset)] = dict(r2=float(r2.mean()),
                                            r2_per_band=dict(zip(S2_BANDS, map(float, r2))))
    return dict(subsets=results, train_pixels=int(len(y_train)), test_pixels=int(len(y_test)),
                tiles=num_tiles, **{"lambda": lam})


def too_few_pixels(train: int, test: int, num_tiles: int, block: int, test_every: int) -> str:
    """Why there is nothing to fit or to score, and what to pass."""
    counts = f"{train} valid pixel(s) to fit, {test} to score, in {num_tiles} tile(s)"
    if num_tiles == 0:
        return ("too few valid pixels: no tiles (every scene smaller than the tile, or mostly "
                "no-data): give larger scenes or a smaller --tile_size.")
    if train >= 2:
        return (f"too few valid pixels ({counts}): the held-out blocks ({block} x {block} px, one "
                f"in {test_every} in diagonal stripes over each scene) cover too few pixels with "
                f"data in every source: pass a smaller --block or --test_every, or give larger "
                "scenes.")
    return (f"too few valid pixels ({counts}): give more or larger tiles with data in every "
            "source (no-data in S2, S1, the land cover or the DEM drops a pixel).")


def ordering_violations(r2: dict, margin: float = 0.0) -> list[str]:
    """Checks that every superset beats each of its subsets by more than `margin`.

    `r2` maps subset names ("lulc+s1") to R². Returns the broken comparisons
    (empty when the ordering holds): all three > every pair > each member.
    """
    broken = []
    names = {frozenset(k.split("+")): k for k in r2}
    for big, big_name in names.items():
        for small, small_name in names.items():
            if small < big and len(big) == len(small) + 1:
                if not r2[big_name] > r2[small_name] + margin:
                    broken.append(f"{big_name} ({r2[big_name]:.4f}) does not beat "
                                  f"{small_name} ({r2[small_name]:.4f}) by {margin}")
    return broken


def markdown_table(result: dict) -> str:
    lines = ["| sources | R² (mean) | " + " | ".join(S2_BANDS) + " |",
             "|---|---|" + "---|" * len(S2_BANDS)]
    for name, row in result["subsets"].items():
        bands = " | ".join(f"{row['r2_per_band'][b]:.3f}" for b in S2_BANDS)
        lines.append(f"| {name} | {row['r2']:.3f} | {bands} |")
    return "\n".join(lines)
