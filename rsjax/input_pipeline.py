"""TFDS data source -> grain -> global batches sharded on a Mesh 'data' axis.

`create_iterator(data_cfg, split, ...)` turns the dataset's tiles (physical
units, rsjax.data.contract) into batches of model inputs: 'image' (B, H, W, 4)
in [-1, 1], one array per selected source, 'label' (B, H, W) int32 with
255 = no data, and 'valid' (B, H, W) bool. A `Normalizer` holds the train
split's stored statistics; `image_to_reflectance01`, `image_to_reflectance`
and `image_to_s2` map model space back. The one rule: every missing value is
0 after normalization, and `valid` is False there.
docs/training.md ("The input pipeline") gives every key, the normalization,
augmentation, evaluation order and the data config fields.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any, Mapping, Optional, Sequence

import grain
import numpy as np

from rsjax.data import contract

SOURCE_CHANNELS = {"lulc": contract.NUM_CLASSES, "s1": 2, "dem": 5,
                   contract.CLOUDY: len(contract.S2_BANDS)}
CLOUD_RECORD_KEYS = ("s2_cloudy", "cloud_mask")     # rasters of a dataset with clouds

log = logging.getLogger("rsjax")


# ----------------------------------------------------------------------------
# Normalization
# ----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Normalizer:
    """The constants that map stored physical units to model space."""

    s2_low: np.ndarray      # (4,) reflectance x 10000 mapped to -1
    s2_high: np.ndarray     # (4,) ... mapped to +1
    s1_low: np.ndarray      # (2,) dB mapped to -1
    s1_high: np.ndarray     # (2,) dB mapped to +1
    elevation_mean: float
    elevation_std: float

    @classmethod
    def from_statistics(cls, stats: Mapping[str, Any], low: str = "p1", high: str = "p99") -> "Normalizer":
        """Builds the constants from the dataset's stored statistics (train split)."""
        def pair(source: str) -> tuple[np.ndarray, np.ndarray]:
            pct = stats[source]["percentiles"]
            lo = np.asarray(pct[low], np.float64)
            hi = np.asarray(pct[high], np.float64)
            if np.any(~np.isfinite(lo)) or np.any(~np.isfinite(hi)):
                raise ValueError(f"statistics of {source!r} have no {low}/{high} percentiles "
                                 "(no valid pixel in the train split?); rebuild the dataset")
            # A constant band would divide by zero: give it a 1-unit range.
            hi = np.maximum(hi, lo + 1.0)
            return lo.astype(np.float32), hi.astype(np.float32)

        s2_low, s2_high = pair("s2")
        s1_low, s1_high = pair("s1")
        elevation = contract.DEM_CHANNELS.index("elevation")
        mean = stats["dem"]["mean"][elevation]
        std = stats["dem"]["std"][elevation]
        if mean is None or std is None:
            raise ValueError("statistics of 'dem' have no elevation mean/std; rebuild the dataset")
        return cls(s2_low, s2_high, s1_low, s1_high, float(mean), max(float(std), 1.0))

    def to_json(self) -> dict:
        return {k: (v.tolist() if isinstance(v, np.ndarray) else v)
                for k, v in dataclasses.asdict(self).items()}


def _scale_to_unit(x: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """Clips x (..., C) to [low, high] per channel and maps that range linearly to [-1, 1].

    Computed on rows of W * C values with the bounds tiled along the row:
    numpy broadcasts a (C,) operand over a last axis of 4 or 2 several times
    slower than it streams a long row.
    """
    y = np.array(x, np.float32)          # a float32 copy we may overwrite
    shape = y.shape
    if y.ndim >= 2:
        y = y.reshape(-1, shape[-2] * shape[-1])
        reps = shape[-2]
    else:
        reps = 1
    lo = np.tile(np.asarray(low, np.float32), reps)
    hi = np.tile(np.asarray(high, np.float32), reps)
    np.maximum(y, lo, out=y)
    np.minimum(y, hi, out=y)
    y -= lo
    y *= 2.0 / (hi - lo)
    y -= 1.0
    return y.reshape(shape)


# Row k is the one-hot vector of label k; rows 9..255 (no data, invalid) are zeros.
_ONE_HOT = np.zeros((256, contract.NUM_CLASSES), np.float32)
_ONE_HOT[np.arange(contract.NUM_CLASSES), np.arange(contract.NUM_CLASSES)] = 1.0


def image_to_reflectance01(x):
    """Model space [-1, 1] -> [0, 1] for metrics (PSNR/SSIM with data range 1, SAM).

    The mapping is (x + 1) / 2, clipped to [0, 1]: 0 is a band's 1st percentile
    of train-split reflectance and 1 its 99th, so it is reflectance rescaled
    per band to the dataset's range (what the paper's metrics compare), not
    physical reflectance; for that use `image_to_reflectance(x, normalizer)`.
    Works on numpy and jax arrays.
    """
    y = (x + 1.0) * 0.5
    return y.clip(0.0, 1.0)


def image_to_reflectance(x, normalizer: Normalizer):
    """Model space [-1, 1] -> physical surface reflectance (0..1, not x 10000)."""
    low = normalizer.s2_low / 10000.0
    high = normalizer.s2_high / 10000.0
    return low + (x + 1.0) * 0.5 * (high - low)


def image_to_s2(x, normalizer: Normalizer) -> np.ndarray:
    """Model space [-1, 1] -> the dataset's S2 unit, uint16 reflectance x 10000,
    valid pixels at least 1 (0 is the contract's no-data): how generated images
    are stored (rsjax.synthesize) and written (rsjax.predict)."""
    reflectance = image_to_reflectance(np.asarray(x, np.float32), normalizer)
    return np.clip(np.round(reflectance * 10000.0), 1, 65535).astype(np.uint16)


def image_std_to_s2(std, normalizer: Normalizer) -> np.ndarray:
    """A standard deviation in model space -> the S2 unit (uint16 reflectance x
    10000; image_to_s2's slope, no offset), at least 1 (0 is no-data)."""
    scale = 0.5 * (np.asarray(normalizer.s2_high, np.float64) - np.asarray(normalizer.s2_low, np.float64))
    return np.clip(np.round(np.asarray(std, np.float64) * scale), 1, 65535).astype(np.uint16)


def cloudy_to_model(s2_cloudy: np.ndarray, norm: Normalizer) -> np.ndarray:
    """The cloudy S2 image (uint16 x 10000) in the clear image's model space:
    the same affine per band, not clipped to the clear image's percentiles
    (only to reflectance 0..1), so it maps back to its stored values exactly
    (`image_to_s2`) and clouds keep their brightness."""
    low = np.asarray(norm.s2_low, np.float32)
    scale = np.float32(2.0) / (np.asarray(norm.s2_high, np.float32) - low)
    y = (np.asarray(s2_cloudy, np.float32) - low) * scale - np.float32(1.0)
    return np.clip(y, -low * scale - 1.0, (np.float32(10000.0) - low) * scale - 1.0)


def _any_nan(x: np.ndarray) -> np.ndarray:
    """(..., C) -> (...): NaN in any channel (OR of channel slices: numpy's any()
    over a short last axis is about ten times slower)."""
    missing = np.isnan(x[..., 0])
    for c in range(1, x.shape[-1]):
        missing |= np.isnan(x[..., c])
    return missing


def normalize_tile(tile: Mapping[str, np.ndarray], norm: Normalizer,
                   sources: Sequence[str]) -> dict[str, np.ndarray]:
    """One contract tile (physical units) -> the model inputs of one example."""
    s2 = np.ascontiguousarray(tile["s2"], np.uint16)
    lulc = np.asarray(tile["lulc"], np.uint8)
    # A pixel without optical data is 0 in all four bands: one 64-bit word.
    valid = s2.view(np.uint64)[..., 0] != 0
    out = {"label": lulc.astype(np.int32)}

    if "lulc" in sources:
        out["lulc"] = _ONE_HOT[lulc]          # 255 (no data) -> all zeros
        valid &= lulc != contract.LULC_NODATA
    if "s1" in sources:
        s1 = _scale_to_unit(tile["s1"], norm.s1_low, norm.s1_high)   # NaN stays NaN
        valid &= ~_any_nan(s1)
        out["s1"] = np.nan_to_num(s1, copy=False, nan=0.0)
    if "dem" in sources:
        dem = np.asarray(tile["dem"], np.float32)
        channels = np.empty(dem.shape[:-1] + (5,), np.float32)
        np.subtract(dem[..., 0], np.float32(norm.elevation_mean), out=channels[..., 0])
        channels[..., 0] /= np.float32(norm.elevation_std)
        np.multiply(dem[..., 1], np.float32(1.0 / 90.0), out=channels[..., 1])
        angle = np.radians(dem[..., 2])
        np.sin(angle, out=channels[..., 2])
        np.cos(angle, out=channels[..., 3])
        has_direction = dem[..., 2] != contract.ASPECT_FLAT     # flat cells: (0, 0)
        channels[..., 2] *= has_direction
        channels[..., 3] *= has_direction
        np.multiply(dem[..., 3], np.float32(1.0 / 127.5), out=channels[..., 4])
        channels[..., 4] -= 1.0
        valid &= ~_any_nan(channels)
        out["dem"] = np.nan_to_num(channels, copy=False, nan=0.0)

    if "s2_cloudy" in tile:
        cloudy = np.ascontiguousarray(tile["s2_cloudy"], np.uint16)
        cloudy_valid = cloudy.view(np.uint64)[..., 0] != 0
        if contract.CLOUDY in sources:
            valid &= cloudy_valid
        out["s2_cloudy"] = cloudy_to_model(cloudy, norm) * cloudy_valid[..., None]
        out["cloud_mask"] = np.asarray(tile["cloud_mask"], np.int32)

    image = _scale_to_unit(s2, norm.s2_low, norm.s2_high)
    image *= valid[..., None]
    out["image"] = image
    out["valid"] = valid
    return out


# ----------------------------------------------------------------------------
# Augmentation
# ----------------------------------------------------------------------------

def transform_aspect(aspect: np.ndarray, *, flip: bool, quarter_turns: int) -> np.ndarray:
    """Aspect (degrees clockwise from north) after `flip_and_rotate` of its tile.

    Flat cells (-9999) and NaN stay as they are.
    """
    a = np.asarray(aspect, np.float32)
    keep = ~np.isfinite(a) | (a == contract.ASPECT_FLAT)
    turned = a
    if flip:                      # left-right mirror: east <-> west
        turned = 360.0 - turned
    turned = np.mod(turned - 90.0 * quarter_turns, 360.0)
    return np.where(keep, a, turned).astype(np.float32)


def flip_and_rotate(tile: Mapping[str, np.ndarray], *, flip: bool, quarter_turns: int) -> dict:
    """Mirrors the tile left-right (if flip), then turns it k quarter turns counterclockwise.

    Every raster source moves alike (the cloudy image and the cloud mask too,
    when the tile has them); the aspect channel is transformed with it. Keys
    other than the contract's rasters are dropped (the georeference no longer
    describes the moved pixels).
    """
    out = {}
    for key in _RASTERS + tuple(k for k in CLOUD_RECORD_KEYS if k in tile):
        x = np.asarray(tile[key])
        if flip:
            x = x[:, ::-1]
        out[key] = np.ascontiguousarray(np.rot90(x, quarter_turns, axes=(0, 1)))
    aspect = contract.DEM_CHANNELS.index("aspect")
    dem = out["dem"].copy()
    dem[..., aspect] = transform_aspect(dem[..., aspect], flip=flip, quarter_turns=quarter_turns)
    out["dem"] = dem
    return out


# ----------------------------------------------------------------------------
# The dataset: builder, statistics
# ----------------------------------------------------------------------------

def _builder_module():
    # Importing registers the builder with TFDS under the name 'rs_multisource'.
    from rsjax.tfds_builder.rs_multisource import rs_multisource_dataset_builder
    return rs_multisource_dataset_builder


def builder_config_for(data_cfg):
    """The BuilderConfig named by data_cfg.name, with data_cfg's tiling options
    (a config name when they are the named config's, else a derived config).

    'rs_multisource/synthetic' with tile_size 128 (the named config has 256)
    gives a derived config 'synthetic_t128': TFDS keeps it in its own folder,
    so datasets of different tile sizes never overwrite each other.
    """
    module = _builder_module()
    name, _, config_name = str(data_cfg.name).partition("/")
    if name != module.Builder.name:
        raise ValueError(f"data.name={data_cfg.name!r}: rsjax reads '{module.Builder.name}/<config>' "
                         f"datasets (configs: {', '.join(module.Builder.builder_configs)})")
    configs = module.Builder.builder_configs
    base = configs.get(config_name or module.Builder.DEFAULT_BUILDER_CONFIG_NAME)
    if base is None:
        raise ValueError(f"data.name={data_cfg.name!r}: unknown config {config_name!r}; "
                         f"choose one of {', '.join(configs)}")
    changes = {}
    for key in ("tile_size", "stride", "max_nodata_fraction", "split_mode", "block_tiles", "split_seed",
                "s2_offset", "lulc_map", "lulc_legend", "s1_units", "skip_incomplete_scenes",
                "allow_missing_lulc", "synthetic_scenes", "synthetic_size"):
        if key in data_cfg and data_cfg[key] is not None:
            changes[key] = type(getattr(base, key) if getattr(base, key) is not None else data_cfg[key])(
                data_cfg[key])
    config = module.derived_config(base, **changes)
    # A registered config goes by name: TFDS insists on its own instance, and
    # a pickled copy (grain worker processes) is another instance.
    return config.name if config is base else config


def default_data_dir() -> str:
    """Where datasets go when no data_dir is given: $TFDS_DATA_DIR, else TFDS's
    own default, ~/tensorflow_datasets (never a folder relative to the current
    directory, so a run started elsewhere finds the same dataset)."""
    return os.environ.get("TFDS_DATA_DIR") or os.path.join(os.path.expanduser("~"),
                                                           "tensorflow_datasets")


def absolute(path: Optional[str]) -> Optional[str]:
    """A local path made absolute (so a saved config means the same from any
    directory); URLs (gs://, s3://, https://) and None as they are."""
    if path is None or "://" in str(path):
        return path
    return os.path.abspath(os.path.expanduser(str(path)))


def data_dir_of(data_cfg) -> str:
    """The data config's data_dir, or the default one, absolute."""
    given = data_cfg.get("data_dir") if hasattr(data_cfg, "get") else data_cfg.data_dir
    return absolute(str(given) if given else default_data_dir())


def resolve_paths(data_cfg) -> None:
    """Fills in the data config's default data_dir and makes its local paths
    absolute, in place: what a run saves in config.json then reads the same
    dataset from any directory."""
    data_cfg.data_dir = data_dir_of(data_cfg)
    if data_cfg.get("manual_dir"):
        data_cfg.manual_dir = absolute(str(data_cfg.manual_dir))


def dataset_name(data_cfg) -> str:
    """'rs_multisource/manual_t64': the dataset's TFDS name with its (derived) config."""
    config = builder_config_for(data_cfg)
    return f"{_builder_module().Builder.name}/{config if isinstance(config, str) else config.name}"


def get_builder(data_cfg):
    import tensorflow_datasets as tfds  # noqa: F401
    module = _builder_module()
    return module.Builder(config=builder_config_for(data_cfg), data_dir=data_dir_of(data_cfg))


def check_manual_dir(manual_dir, *, require_lulc: bool = True, skip_incomplete: bool = False,
                     clouds: bool = False) -> list:
    """The scenes of the user's export folder (a `scenes.txt` there lists scene
    prefixes instead), checked before TFDS creates anything: a missing folder,
    no scenes or a missing source is an InputError that names it."""
    from rsjax.data import storage
    from rsjax.data.contract import find_scenes
    from rsjax.tfds_builder.rs_multisource.rs_multisource_dataset_builder import SCENE_LIST_FILE

    listing = storage.join(manual_dir, SCENE_LIST_FILE)
    return find_scenes(listing if storage.exists(listing) else manual_dir, require_lulc=require_lulc,
                       skip_incomplete=skip_incomplete, clouds=clouds)


def built_inputs(builder) -> Optional[dict]:
    """{manual_dir, scenes, fingerprint} of the files a built manual dataset
    came from (None for datasets built before this was recorded)."""
    module = _builder_module()
    return (builder.info.metadata.get(module.BUILD_REPORT_KEY) or {}).get("inputs")


def other_manual_datasets(data_cfg) -> list[str]:
    """The manual datasets built in data_cfg's data_dir under any options (tile
    size, ...), each as 'config (tile_size N, from FOLDER)', for messages."""
    from etils import epath

    module = _builder_module()
    base = str(data_cfg.name).partition("/")[2] or "manual"
    root = epath.Path(data_dir_of(data_cfg)) / module.Builder.name
    found = []
    for info in sorted(root.glob("*/*/metadata.json")) if root.is_dir() else []:
        config = info.parent.parent.name
        derived_of_other = any(config.startswith(other) and not base.startswith(other)
                               for other in module.Builder.builder_configs if other != base)
        if not (config == base or config.startswith(base + "_")) or derived_of_other:
            continue
        try:
            report = json.loads(info.read_text()).get(module.BUILD_REPORT_KEY) or {}
        except (OSError, ValueError):
            continue
        found.append(f"{config} (tile_size {(report.get('config') or {}).get('tile_size')}, from "
                     f"{(report.get('inputs') or {}).get('manual_dir', 'a folder not recorded')})")
    return found


def _check_manual(data_cfg, builder, manual_dir: Optional[str]) -> Optional[list]:
    """For a dataset of the user's exports: the scenes to build from when it is
    not built yet (the folder checked first), None when the built one is this
    folder's. Never takes a dataset built from other files, nor one of another
    tile size: the UserError says which exists and what to pass."""
    from rsjax.data import contract
    from rsjax.errors import UserError

    name = f"{builder.name}/{builder.builder_config.name}"
    where = data_dir_of(data_cfg)
    if builder.is_prepared():
        built = built_inputs(builder)
        if manual_dir is None or built is None:
            return None
        scenes = check_manual_dir(manual_dir, require_lulc=not builder.builder_config.allow_missing_lulc,
                                  skip_incomplete=builder.builder_config.skip_incomplete_scenes,
                                  clouds=builder.builder_config.clouds)
        if contract.inputs_fingerprint(scenes) != built.get("fingerprint"):
            raise UserError(
                f"{name} in {where} was built from other files ({built.get('scenes')} scenes in "
                f"{built.get('manual_dir')}) than {manual_dir} holds now ({len(scenes)} scenes). "
                f"Rebuild it with `rsjax build --dataset {builder.builder_config.name} --manual_dir "
                f"{manual_dir} --tile_size {builder.builder_config.tile_size} --data_dir {where} "
                f"--overwrite`, or keep both by giving this run another --config.data.data_dir.")
        return None
    if manual_dir is None:
        others = other_manual_datasets(data_cfg)
        known = (f" Built there: {'; '.join(others)}; to use one, pass its "
                 f"--config.data.tile_size=N (and --config.data.manual_dir=DIR)." if others else "")
        raise UserError(
            f"{name} (your exports, tile_size {data_cfg.tile_size}) is not built in {where}, and "
            f"no folder of exports was given: pass --config.data.manual_dir=DIR (the folder of "
            f"<scene>_s2.tif, _s1.tif, _lulc.tif, _dem.tif files); it is built on first use.{known}")
    return check_manual_dir(manual_dir, require_lulc=not builder.builder_config.allow_missing_lulc,
                            skip_incomplete=builder.builder_config.skip_incomplete_scenes,
                            clouds=builder.builder_config.clouds)


def ensure_dataset(data_cfg, *, manual_dir: Optional[str] = None):
    """Builds the dataset named by data_cfg unless it is already prepared; returns the builder.

    The synthetic configs build themselves; the manual config reads
    `manual_dir` (or data_cfg.manual_dir), checked before anything is
    created, and a built manual dataset is used only when it was built from
    the same files (see _check_manual). On several hosts, process 0 builds
    and the others wait for it (data_dir must be shared storage).
    """
    import jax
    import tensorflow_datasets as tfds

    builder = get_builder(data_cfg)
    manual_dir = absolute(manual_dir or (data_cfg.get("manual_dir") if hasattr(data_cfg, "get")
                                         else None))
    manual = not builder.builder_config.is_synthetic
    if manual:
        _check_manual(data_cfg, builder, manual_dir)
    if builder.is_prepared():
        return builder
    if jax.process_index() == 0:
        log.info("Building %s/%s in %s%s (once; later runs find it)", builder.name,
                 builder.builder_config.name, data_dir_of(data_cfg),
                 f" from {manual_dir}" if manual else "")
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
        log.info("Built: %s", split_counts_line(builder))
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("rsjax.ensure_dataset")
        builder = get_builder(data_cfg)
    return builder


def split_counts_line(builder) -> str:
    """'train 70, validation 20, test 10 tiles' of a built dataset."""
    splits = builder.info.splits
    return ", ".join(f"{name} {splits[name].num_examples}" for name in ("train", "validation", "test")
                     if name in splits) + " tiles"


def beam_options(beam_pipeline_options: str):
    """Beam PipelineOptions from TFDS's `--beam_pipeline_options` syntax:
    'runner=DataflowRunner,project=P,region=R' (comma-separated key=value)."""
    try:
        from apache_beam.options.pipeline_options import PipelineOptions
    except ImportError:
        from rsjax.errors import UserError
        raise UserError("--beam_pipeline_options needs Apache Beam: pip install rsjax[beam]") from None
    return PipelineOptions(flags=[f"--{opt.strip()}" for opt in beam_pipeline_options.split(",")
                                  if opt.strip()])


def build(data_cfg, *, manual_dir=None, file_format="array_record", overwrite=False,
          beam_pipeline_options: Optional[str] = None) -> dict:
    """Builds (or finds) the dataset; returns a summary with split counts and tiles/s.

    beam_pipeline_options: build with Apache Beam on the runner these options
    name ('direct_num_workers=2,direct_running_mode=multi_processing' for the
    local DirectRunner); None builds in this process. Same dataset either way.
    """
    import time
    import tensorflow_datasets as tfds

    tfds.display_progress_bar(True)   # TFDS's tqdm bars: examples generated, shuffled, written
    config = builder_config_for(data_cfg)
    module = _builder_module()
    builder = module.Builder(config=config, data_dir=data_dir_of(data_cfg), file_format=file_format)
    if not builder.builder_config.is_synthetic and not overwrite:
        _check_manual(data_cfg, builder, absolute(manual_dir))   # never another folder's dataset
    started = time.perf_counter()
    mode = (tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS if overwrite
            else tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS)
    built = overwrite or not builder.is_prepared()
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        manual_dir=manual_dir, download_mode=mode,
        beam_options=beam_options(beam_pipeline_options) if beam_pipeline_options else None))
    seconds = time.perf_counter() - started
    counts = {name: split.num_examples for name, split in builder.info.splits.items()}
    total = sum(counts.values())
    return {
        "dataset": f"{builder.name}/{builder.builder_config.name}",
        "data_dir": str(builder.data_dir),
        "splits": counts,
        "built": built,
        "seconds": round(seconds, 2),
        "tiles_per_s": round(total / seconds, 2) if built and seconds > 0 else None,
        "build_report": builder.info.metadata.get(module.BUILD_REPORT_KEY),
    }


def load_statistics(builder) -> dict:
    """The train-split statistics stored with the dataset (metadata.json)."""
    module = _builder_module()
    metadata = builder.info.metadata
    if metadata is not None and module.STATISTICS_KEY in metadata:
        return metadata[module.STATISTICS_KEY]
    path = builder.data_path / "metadata.json"
    if path.exists():
        stats = json.loads(path.read_text()).get(module.STATISTICS_KEY)
        if stats is not None:
            return stats
    raise ValueError(f"{builder.data_path}: the dataset has no stored statistics "
                     "(built by an older builder?); rebuild it with `python -m rsjax.build_dataset`.")


# ----------------------------------------------------------------------------
# grain: sharding, shuffling, repeat, per-record transforms, batching
# ----------------------------------------------------------------------------

_RASTERS = ("s2", "s1", "lulc", "dem")


def check_sources(sources: Sequence[str]) -> tuple[str, ...]:
    """The selected sources in canonical order; () is allowed (optical image only)."""
    bad = [s for s in sources if s not in contract.MODEL_SOURCES]
    if bad:
        raise ValueError(f"sources {tuple(sources)}: unknown {bad}; choose a subset of "
                         f"{contract.MODEL_SOURCES}")
    return tuple(s for s in contract.MODEL_SOURCES if s in sources)


def _rasters(element) -> dict:
    """The raster features of a record (the cloud ones when the dataset has them)."""
    return {k: element[k] for k in _RASTERS + CLOUD_RECORD_KEYS if k in element}


class Normalize(grain.transforms.Map):
    """A stored tile -> model inputs (evaluation: no augmentation)."""

    def __init__(self, normalizer: Normalizer, sources: tuple[str, ...]):
        self.normalizer = normalizer
        self.sources = sources

    def map(self, element):
        return normalize_tile(_rasters(element), self.normalizer, self.sources)


class AugmentAndNormalize(grain.transforms.RandomMap):
    """A random flip and quarter turns (aspect moved along), then normalize.

    grain seeds `rng` from the sampler's seed and the record's position in the
    sampled order, so a run and a run resumed from a checkpointed iterator
    state draw the same augmentations.
    """

    def __init__(self, normalizer: Normalizer, sources: tuple[str, ...]):
        self.normalizer = normalizer
        self.sources = sources

    def random_map(self, element, rng: np.random.Generator):
        flip = bool(rng.integers(2))
        quarter_turns = int(rng.integers(4))
        tile = flip_and_rotate(_rasters(element), flip=flip, quarter_turns=quarter_turns)
        return normalize_tile(tile, self.normalizer, self.sources)


def pad_batch(batch: dict[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
    """Pads a short final batch to `size` examples that count for nothing:
    zeros everywhere, label 255 (no data), cloud mask 255 (unknown) and valid False."""
    n = len(batch["valid"])
    if n == size:
        return batch
    out = {}
    for key, x in batch.items():
        fill = {"label": contract.LULC_NODATA, "cloud_mask": contract.CLOUD_MASK_UNKNOWN}.get(key, 0)
        pad = np.full((size - n,) + x.shape[1:], fill, x.dtype)
        out[key] = np.concatenate([x, pad])
    return out



TRAIN_SCENES = ("all", "optical", "no_optical")


def record_scene_ids(source) -> list[str]:
    """The scene id of every record of a data source (one pass over the records)."""
    out = []
    for i in range(len(source)):
        sid = source[i]["scene_id"]
        out.append(sid.decode() if isinstance(sid, bytes) else str(sid))
    return out


def scene_half(scene_ids: Sequence[str], which: str) -> list[int]:
    """Indices of the records whose scene is in `which` half of the scenes.

    'optical' and 'no_optical' split the sorted scene ids alternately (the
    first, third, ... scene have an optical image; the others stand for scenes
    whose optical image is cloudy or missing), 'all' keeps every record. A
    whole scene goes to one side, so the other side's label layouts are new.
    """
    if which not in TRAIN_SCENES:
        raise ValueError(f"data.train_scenes={which!r}: choose one of {', '.join(TRAIN_SCENES)}")
    if which == "all":
        return list(range(len(scene_ids)))
    ordered = sorted(set(scene_ids))
    chosen = set(ordered[0::2] if which == "optical" else ordered[1::2])
    if not chosen:
        raise ValueError(f"data.train_scenes={which!r}: the split has {len(ordered)} scene(s); "
                         "halving needs at least 2.")
    return [i for i, sid in enumerate(scene_ids) if sid in chosen]


class SubsetSource:
    """Records `indices` of a random-access source, in that order."""

    def __init__(self, source, indices: Sequence[int]):
        self._source, self._indices = source, list(indices)

    def __len__(self) -> int:
        return len(self._indices)

    def __getitem__(self, i: int) -> dict:
        return self._source[self._indices[i]]

    def __repr__(self) -> str:
        # grain checks that a restored iterator reads the source it was saved
        # from by comparing repr(source): say what the records are, not where
        # this object lives in memory, so a resumed run matches.
        return f"SubsetSource({self._source!r}, indices={_digest(np.asarray(self._indices))})"


class MixedSource:
    """Real tiles followed by generated ones.

    Record k < len(real_indices) is the base record real_indices[k]; record
    len(real_indices) + j is the base record pairs[j][0] with its optical image
    replaced by images[pairs[j][1]] (land cover, SAR and terrain stay real, as
    the paper pairs them). Pixels without real optical data stay without data.
    The generated tiles need not be among the real ones: a scene without an
    optical image can be represented by generated images alone.
    """

    def __init__(self, base, real_indices: Sequence[int], pairs: Sequence[tuple[int, int]],
                 images: np.ndarray):
        self._base = base
        self._real = list(real_indices)
        self._pairs = list(pairs)
        self._images = images
        self._repr = None

    @property
    def num_generated(self) -> int:
        return len(self._pairs)

    def __len__(self) -> int:
        return len(self._real) + len(self._pairs)

    def __getitem__(self, i: int) -> dict:
        n = len(self._real)
        if i < n:
            return self._base[self._real[i]]
        record_index, image_index = self._pairs[i - n]
        record = dict(self._base[record_index])
        nodata = np.all(record["s2"] == contract.S2_NODATA, axis=-1, keepdims=True)
        record["s2"] = np.where(nodata, contract.S2_NODATA, self._images[image_index])
        return record

    def __repr__(self) -> str:
        # What the records are (see SubsetSource.__repr__), the generated
        # images' content included: a resumed run must read the same images.
        if self._repr is None:
            images = self._images if self._images is not None else np.zeros(0)
            self._repr = (f"MixedSource({self._base!r}, real={_digest(np.asarray(self._real))}, "
                          f"pairs={_digest(np.asarray(self._pairs))}, images={_digest(images)})")
        return self._repr


def _digest(array: np.ndarray) -> str:
    """A short content hash of an array (shape, dtype and bytes)."""
    import hashlib
    array = np.ascontiguousarray(array)
    h = hashlib.sha256(f"{array.shape}{array.dtype}".encode())
    h.update(array.tobytes())
    return h.hexdigest()[:16]


def _stable_rank(text: str) -> int:
    import hashlib
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


def load_generated(generated_dir: str, normalizer: Normalizer) -> list[tuple[list[str], np.ndarray]]:
    """[(tile ids, s2 uint16 images)] of each '+'-separated folder of generated images.

    A folder holds .npz files, each with `tile_id` (N,) strings and either
    `s2` (N, H, W, 4) uint16 reflectance x 10000, or `image` (N, H, W, 4) float
    in model space [-1, 1] (converted back with the dataset's normalizer).
    """
    from etils import epath

    out = []
    for folder in [d for d in str(generated_dir).split("+") if d]:
        files = sorted(epath.Path(folder).glob("*.npz"))
        if not files:
            raise FileNotFoundError(f"{folder}: no .npz files of generated images "
                                    "(tile_id + s2 or image arrays); run rsjax synthesize first")
        tile_ids, images = [], []
        for path in files:
            with path.open("rb") as f, np.load(f) as z:
                if "tile_id" not in z or not ({"s2", "image"} & set(z.files)):
                    raise ValueError(f"{path}: needs arrays 'tile_id' and 's2' or 'image' "
                                     f"(has {z.files})")
                s2 = (np.asarray(z["s2"], np.uint16) if "s2" in z
                      else image_to_s2(np.asarray(z["image"], np.float32), normalizer))
                tile_ids += [str(t) for t in z["tile_id"]]
                images.append(s2)
        out.append((tile_ids, np.concatenate(images)))
    return out


def generated_source(base, generated_dir: str, normalizer: Normalizer, *,
                     rate: Optional[float] = 1.0,
                     real_indices: Optional[Sequence[int]] = None) -> MixedSource:
    """The real records `real_indices` of `base` (default: all) plus generated images.

    `rate` generated images per real one: round(rate x real count) images are
    taken from the folders' pool, the first folder first and, within a folder,
    in an order fixed by a hash of the tile id (so rate 0.5 takes a fixed half
    of one folder, rate 2 needs two folders, e.g. two generators'). A pool
    smaller than that is an error, not a silent repeat of images.
    rate=None takes every image in the folders, whatever the real count: for
    generated images of tiles the real part does not hold (new layouts), whose
    number follows from the split, not from a rate. Each generated image is
    paired with the base record of its tile id.
    """
    real_indices = list(range(len(base))) if real_indices is None else list(real_indices)
    index = {}
    for i in range(len(base)):
        tid = base[i]["tile_id"]
        index[tid.decode() if isinstance(tid, bytes) else str(tid)] = i
    pool, images = [], []
    offset = 0
    for folder, (tile_ids, s2) in enumerate(load_generated(generated_dir, normalizer)):
        missing = [t for t in tile_ids if t not in index]
        if missing:
            raise ValueError(f"{len(missing)} generated image(s) name tiles that are not in this "
                             f"split, e.g. {missing[:3]}; generate them from the same dataset and split")
        pool += [(folder, _stable_rank(t), index[t], offset + k) for k, t in enumerate(tile_ids)]
        images.append(s2)
        offset += len(tile_ids)
    wanted = len(pool) if rate is None else int(round(rate * len(real_indices)))
    if (rate is not None and rate < 0) or wanted > len(pool):
        raise ValueError(f"data.mix_rate={rate:g} asks for {wanted} generated images for "
                         f"{len(real_indices)} real tiles, but {generated_dir} holds {len(pool)}: "
                         "give more folders of generated images, '+'-separated, or a lower rate.")
    chosen = sorted(pool)[:wanted]
    pairs = [(record, image) for _, _, record, image in chosen]
    return MixedSource(base, real_indices, pairs, np.concatenate(images) if images else None)


class BatchIterator:
    """Yields batches as global jax.Arrays sharded on the mesh's 'data' axis.

    Each process reads its own shard of the split (grain's ShardByJaxProcess)
    and assembles its slice of the global batch; the slices are joined with
    jax.make_array_from_process_local_data. With mesh=None the batches stay
    numpy arrays on the host.

    get_state() / set_state() save and restore the position (grain's
    DataLoader iterator state, bytes): a restored iterator yields exactly the
    batch that would have come next. grain's Orbax checkpoint handler takes it
    as it takes grain's own iterators.
    """

    def __init__(self, loader: grain.DataLoader, mesh, per_process_batch: int, pad_final: bool,
                 num_records: int):
        self._loader = loader
        self.num_records = num_records      # one epoch: the records of its source
        self._iterator = iter(loader)
        self._mesh = mesh
        self._per_process_batch = per_process_batch
        self._pad_final = pad_final
        self._sharding = None
        if mesh is not None:
            from rsjax.mesh import batch_sharding
            self._sharding = batch_sharding(mesh)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        batch = next(self._iterator)
        if self._pad_final:
            batch = pad_batch(batch, self._per_process_batch)
        if self._sharding is None:
            return batch
        import jax
        return {k: jax.make_array_from_process_local_data(self._sharding, np.asarray(v))
                for k, v in batch.items()}

    def get_state(self) -> bytes:
        return self._iterator.get_state()

    def set_state(self, state: bytes) -> None:
        self._iterator.set_state(state)

    def start_prefetch(self) -> None:
        self._iterator.start_prefetch()


def split_size(data_cfg, split: str) -> int:
    """Number of examples of a split of the dataset named by data_cfg."""
    return int(get_builder(data_cfg).info.splits[split].num_examples)


def create_iterator(data_cfg, split: str, *, global_batch_size: int, mesh=None, train: bool,
                    seed: int, sources: Sequence[str] = contract.SOURCES,
                    num_epochs: Optional[int] = None,
                    generated_dir: Optional[str] = None) -> BatchIterator:
    """Batches of one split of the dataset named by data_cfg (see the module docstring).

    train=True: shuffled (seeded), repeated for num_epochs (None = forever),
    augmented (unless data_cfg.augment is False), final partial batch dropped.
    train=False: in order, not augmented, num_epochs defaults to 1, and the
    final partial batch is padded with examples whose `valid` is all False
    and label 255, so that every tile is seen once and masked metrics ignore
    the padding.
    generated_dir: add generated optical images to the split (see generated_source;
    `data_cfg.mix_rate` generated images per real one, default 1; or every
    image in the folders with `data_cfg.mix_all`).
    `data_cfg.train_scenes` ('all', 'optical', 'no_optical'; see scene_half)
    restricts the train split's real tiles to half of its scenes.
    """
    builder = get_builder(data_cfg)
    if not builder.is_prepared():
        raise FileNotFoundError(
            f"{data_cfg.name} (tile_size {data_cfg.tile_size}) is not built in {data_dir_of(data_cfg)}: "
            f"run `rsjax build --dataset {str(data_cfg.name).partition('/')[2] or 'synthetic'} "
            f"--data_dir {data_dir_of(data_cfg)} --tile_size {data_cfg.tile_size}`, or call ensure_dataset")
    if split not in builder.info.splits:
        raise ValueError(f"split {split!r} not in {data_cfg.name}: {list(builder.info.splits)}")
    check_cloud_sources(sources, builder, data_cfg)
    normalizer = Normalizer.from_statistics(load_statistics(builder))
    source = builder.as_data_source(split=split)
    train_scenes = str(data_cfg.get("train_scenes", "all")) if split == "train" else "all"
    real_indices = None
    if train_scenes != "all":
        real_indices = scene_half(record_scene_ids(source), train_scenes)
    if generated_dir is not None:
        source = generated_source(source, generated_dir, normalizer,
                                  rate=None if data_cfg.get("mix_all", False)
                                  else float(data_cfg.get("mix_rate", 1.0)),
                                  real_indices=real_indices)
    elif real_indices is not None:
        source = SubsetSource(source, real_indices)
    return batch_iterator(
        source, normalizer, global_batch_size=global_batch_size, mesh=mesh, train=train, seed=seed,
        sources=sources, num_epochs=num_epochs, augment=train and bool(data_cfg.get("augment", True)),
        worker_count=int(data_cfg.get("worker_count", 0)),
        worker_buffer_size=int(data_cfg.get("worker_buffer_size", 2)),
        read_threads=int(data_cfg.get("read_threads", 2)))


def has_clouds(builder) -> bool:
    """Whether the dataset holds the cloudy image and the cloud mask (a `clouds` config)."""
    return "s2_cloudy" in builder.info.features


def check_cloud_sources(sources: Sequence[str], builder, data_cfg) -> None:
    """The cloudy image as a source needs a dataset with clouds: say which to use."""
    if contract.CLOUDY in sources and not has_clouds(builder):
        from rsjax.errors import ConfigError
        raise ConfigError(
            f"sources include {contract.CLOUDY}, but the dataset {data_cfg.name} has no cloudy "
            "images: use a dataset built with clouds (--config.data.name="
            "rs_multisource/synthetic_cloudy_demo or synthetic_cloudy; for your exports, the "
            "manual config with clouds=True and <scene>_s2_cloudy.tif files).")


def batch_iterator(source, normalizer: Normalizer, *, global_batch_size: int, mesh, train: bool,
                   seed: int, sources: Sequence[str], num_epochs: Optional[int] = None,
                   augment: Optional[bool] = None, worker_count: int = 0,
                   worker_buffer_size: int = 2, read_threads: int = 2) -> BatchIterator:
    """The grain pipeline over any random-access source of contract tiles (len + getitem)."""
    import jax

    sources = check_sources(sources)
    num_processes = jax.process_count()
    if global_batch_size % num_processes:
        raise ValueError(f"global_batch_size={global_batch_size} must be divisible by the "
                         f"number of processes ({num_processes})")
    if mesh is not None and global_batch_size % mesh.shape["data"]:
        raise ValueError(f"global_batch_size={global_batch_size} must be divisible by the "
                         f"mesh's 'data' axis ({mesh.shape['data']} devices)")
    per_process_batch = global_batch_size // num_processes
    if augment is None:
        augment = train
    if num_epochs is None and not train:
        num_epochs = 1
    if worker_count > 0:
        from absl import flags
        if not flags.FLAGS.is_parsed():
            # grain's worker processes read absl flags; outside absl.app.run
            # (notebooks, tests) nothing parsed them, and the workers would fail.
            flags.FLAGS.mark_as_parsed()
    # One global order (shuffled over every record), and the DataLoader gives
    # process p the records at global positions p, p + P, p + 2P, ... (grain's
    # sharding in the DataLoader, not the sampler). The P per-process batches
    # k then hold exactly the records of global batch k of a one-process run,
    # with the same augmentation draws (seeded by global position): a run on
    # any number of hosts trains on the same batches.
    sampler = grain.samplers.IndexSampler(
        num_records=len(source), shard_options=grain.sharding.NoSharding(),
        shuffle=train, num_epochs=num_epochs, seed=seed)
    transform = (AugmentAndNormalize if augment else Normalize)(normalizer, sources)
    # Training drops the final partial batch (grain batches inside each worker,
    # so with workers a kept remainder would mean one short batch per worker).
    loader = grain.DataLoader(
        data_source=source, sampler=sampler,
        shard_options=grain.sharding.ShardByJaxProcess(drop_remainder=True),
        operations=[transform, grain.transforms.Batch(per_process_batch, drop_remainder=train)],
        worker_count=worker_count, worker_buffer_size=worker_buffer_size,
        # grain's default of 16 reader threads thrashes a few cores; records are
        # small and decode fast, so 2 threads per process keep up (measured).
        read_options=grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=8 * read_threads))
    return BatchIterator(loader, mesh, per_process_batch, pad_final=not train,
                         num_records=len(source))
