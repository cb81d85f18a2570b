"""Whole-scene prediction to GeoTIFF: a run's model over scenes of any size.

`predict` (mode from the workdir's saved config.json), `predict_fusion`,
`predict_landcover`, `predict_clouds`: register the inputs with ingestion's
code (`rsjax.data.ingest.RegisteredScene`), run tiles of the training size
through the trainer's `load_inference` on this process's devices, blend them
without seams (`rsjax.tiling`), write a Cloud Optimized GeoTIFF under a
temporary name (renamed when complete) and describe it (`rsjax.predict_outputs`,
a STAC Item beside it). `load_model` loads a run once for many scenes
(`model=`, used by `rsjax.predict_beam`). Memory grows with the scene's width,
never its height. docs/prediction.md describes each step and the outputs.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
import logging
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import numpy as np

from rsjax import predict_outputs
from rsjax.data.contract import (CLOUDY, LULC_NODATA, NUM_CLASSES, S2_BANDS, S2_NODATA, SOURCES,
                                 InputError, ScenePaths)
from rsjax.errors import UserError
from rsjax.file_modes import new_file_mode
from rsjax.predict_outputs import (CLOUD_FREE, CLOUD_FREE_MEAN_STD, LAND_COVER, SYNTHETIC,
                                   SYNTHETIC_MEAN_STD, OutputSpec)
from rsjax.tiling import tile_offsets, tiled_predict

log = logging.getLogger("rsjax")

OUTPUT_BLOCK = 256          # GeoTIFF block side of the outputs (and rows written at a time)
REFLECTANCE_UNITS = "surface reflectance x 10000 (GDAL scale 1e-4, offset 0: reflectance)"


def _check_sources(workdir, sources, given: dict, flags_of: dict) -> None:
    """InputError naming the flags of the model's sources that were not given;
    a warning for given files the model does not take."""
    missing = [flags_of[s] for s in sources if given[s] is None]
    if missing:
        raise InputError(f"{workdir}: the model was trained on sources {', '.join(sources)}; "
                         f"also give {', '.join(missing)}.")
    unused = [s for s in given if given[s] is not None and s not in sources]
    if unused:
        log.warning("The model takes no %s: ignoring those files.", ", ".join(unused))


def check_output_path(out, inputs: Mapping[str, Any]) -> Path:
    """`out` as a Path, or an InputError when writing it would destroy something:
    `out` is one of the inputs (the same file, through links or not), or an
    existing folder. Inputs that are URLs or mosaics cannot be `out` and are skipped."""
    out = Path(out)
    if out.is_dir():
        raise InputError(f"--out {out}: is a folder; give the path of the GeoTIFF to write, "
                         f"e.g. {out / 'prediction.tif'}.")
    for flag, given in inputs.items():
        if not isinstance(given, (str, os.PathLike)) or "://" in str(given):
            continue
        if _same_file(out, Path(given)):
            raise InputError(f"--out {out}: is the {flag} input ({given}); writing it would "
                             "overwrite that input. Give another --out path.")
    return out


def _same_file(a: Path, b: Path) -> bool:
    """Whether two paths name one file: the same inode when both exist (hard and soft
    links too), else the same path once links and '..' are resolved."""
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
        return a.resolve() == b.resolve()
    except OSError:
        return False


# ---------------------------------------------------------------------------
# Output GeoTIFFs
# ---------------------------------------------------------------------------
def output_profile(grid, count: int, dtype: str, nodata: float, block: int = OUTPUT_BLOCK,
                   overviews: str = "average") -> dict:
    """Tiled, deflate-compressed GeoTIFF on the target grid (horizontal predictor for integers).

    `overviews`: how the COG's overviews are resampled, "average" for
    reflectance, "mode" for labels (`cog_output` takes it out of the profile).
    """
    return dict(driver="GTiff", width=grid.width, height=grid.height, count=count, dtype=dtype,
                crs=grid.crs, transform=grid.transform, nodata=nodata, tiled=True,
                blockxsize=block, blockysize=block, compress="deflate", predictor=2,
                BIGTIFF="IF_SAFER", overviews=overviews)


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary path beside `path`; renames it to `path` when the block
    succeeds and deletes it when it fails, so `path` is never half-written.

    The renamed file gets the user's normal permissions (0o666 less the umask),
    not the owner-only mode of a temporary file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.chmod(tmp, new_file_mode())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_cog(src: Path, dst: Path, overviews: str, block: int = OUTPUT_BLOCK) -> None:
    """Copies a GeoTIFF as a Cloud Optimized GeoTIFF (GDAL's COG driver, in rasterio's wheel).

    Overviews halve the size down to one block, resampled by `overviews`
    ("average" or "mode"); tiles of `block` pixels, deflate with a predictor.
    Band descriptions, tags, no-data and the colour map are copied.
    """
    import rasterio.shutil

    rasterio.shutil.copy(str(src), str(dst), driver="COG", BLOCKSIZE=str(block), COMPRESS="DEFLATE",
                         PREDICTOR="YES", OVERVIEWS="AUTO", OVERVIEW_RESAMPLING=overviews.upper(),
                         BIGTIFF="IF_SAFER")


@contextlib.contextmanager
def cog_output(path: str | os.PathLike, profile: Mapping) -> Iterator:
    """Yields an open rasterio dataset to write the output into; when the block
    succeeds, the output becomes a COG at `path` (see `write_cog`), atomically
    (`atomic_output`). The dataset is a tiled GeoTIFF in a temporary folder
    beside `path` (the COG driver cannot be written window by window); the
    profile's `overviews` entry names the overview resampling.
    """
    import rasterio

    profile = dict(profile)
    overviews = profile.pop("overviews", "average")
    path = Path(path)
    with atomic_output(path) as final, \
            tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.") as staging_dir:
        staging = Path(staging_dir) / "staging.tif"
        with rasterio.open(staging, "w", **profile) as dst:
            yield dst
        write_cog(staging, final, overviews, int(profile.get("blockxsize", OUTPUT_BLOCK)))


_palette_colormap = predict_outputs.palette_colormap


def write_stac(out: str | os.PathLike, item: dict) -> Path:
    """Writes a STAC Item (a dict) as `<out>.stac.json`, atomically, with the user's permissions."""
    path = predict_outputs.stac_path(out)
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(item, indent=2) + "\n", encoding="utf-8")
    return path


# ---------------------------------------------------------------------------
# Configs and statistics
# ---------------------------------------------------------------------------
def run_config(workdir, config=None):
    """`config`, or the one the training run saved in `workdir`."""
    from rsjax.config_loader import config_from_workdir

    return config if config is not None else config_from_workdir(workdir)


def dataset_normalizer(data_cfg, data_dir: Optional[str] = None):
    """The training dataset's Normalizer (its stored train-split statistics)."""
    from rsjax import input_pipeline

    if data_dir is not None:
        data_cfg = data_cfg.copy_and_resolve_references()
        data_cfg.data_dir = str(data_dir)
    builder = input_pipeline.get_builder(data_cfg)
    if not builder.is_prepared():
        raise InputError(
            f"the training dataset {data_cfg.name} (tile size {data_cfg.tile_size}) is not in "
            f"{data_cfg.data_dir}: its stored statistics normalize the inputs as in training. "
            "Pass --data_dir with the TFDS data_dir of the training run.")
    return input_pipeline.Normalizer.from_statistics(input_pipeline.load_statistics(builder))


@dataclasses.dataclass
class LoadedModel:
    """A checkpoint restored once for many scenes (`rsjax.predict_beam`'s workers).

    inference: (fn, checkpoint step), as the trainer's `load_inference`
    returns them; `fn` is jitted once, so the model compiles once, not once
    per scene. num_devices: how many devices `fn` splits a batch over.
    """

    workdir: str
    config: Any
    normalizer: Any
    inference: tuple
    num_devices: int


def load_model(workdir, *, config=None, step: Optional[int] = None, data_dir: Optional[str] = None,
               devices=None) -> LoadedModel:
    """Restores a training run's checkpoint (default: the latest) and its dataset's statistics."""
    from rsjax.trainers import trainer_module

    config = run_config(workdir, config)
    if config.get("trainer") not in ("fusion", "segmentation", "cloud_removal"):
        raise InputError(f"{workdir}: its config is a {config.get('trainer')!r} run; prediction "
                         "takes fusion, segmentation and cloud_removal runs.")
    normalizer = dataset_normalizer(config.data, data_dir)
    devices = _local_devices(devices)
    inference = _restore(trainer_module(config.trainer), config, workdir, step, devices)
    return LoadedModel(str(workdir), config, normalizer, inference, len(devices))


def _inference(model, trainer, config, workdir, step, devices):
    """(the model's function, checkpoint step, device count): of a model loaded
    once (`load_model`, e.g. one per Beam worker) or restored here."""
    if model is not None:
        fn, ckpt_step = model.inference
        return fn, ckpt_step, model.num_devices
    devices = _local_devices(devices)
    fn, ckpt_step = _restore(trainer, config, workdir, step, devices)
    return fn, ckpt_step, len(devices)


def scene_noise(config, samples: int = 1) -> Callable[[int, int, int, int], dict]:
    """`noise_of(row, col, nrows, ncols)`: the extra model input of a scene's
    window: for a flow model, {"noise": its starting noise}, a function of the
    seed and the scene pixel (rsjax.trainers.flow.grid_noise), so the tiles
    overlapping at a pixel start from the same noise there and blend without
    seams ((nrows, ncols, samples, 4) for several samples, one noise stream
    each); for the other models, nothing."""
    from rsjax.trainers import flow

    if not is_flow_run(config):
        return lambda row, col, nrows, ncols: {}
    seed, bands = int(config.seed), len(S2_BANDS)
    if samples == 1:
        return lambda row, col, nrows, ncols: {
            "noise": flow.grid_noise(seed, row, col, nrows, ncols, bands)}
    # The samples axis after the pixels': a tile cut by the scene's edge is padded
    # on its first two axes (rsjax.tiling.pad_tile).
    return lambda row, col, nrows, ncols: {"noise": np.stack(
        [flow.grid_noise(seed, row, col, nrows, ncols, bands, stream=k) for k in range(samples)],
        axis=2)}


def is_flow_run(config) -> bool:
    from rsjax.trainers import flow

    return config.get("trainer") == "fusion" and flow.is_flow(config)


def model_name(config) -> str:
    """The network a run trained: its generator (fusion) or its model (the others)."""
    return str(config.generator.name if config.trainer == "fusion" else config.model.name)


def _restore(trainer, config, workdir, step, devices) -> tuple:
    """The trainer's `load_inference`, saying what it loads and how long it took
    (restoring a checkpoint takes seconds to minutes, with nothing else to see)."""
    log.info("loading the model from %s (%s) ...", workdir,
             f"step {step}" if step is not None else "its latest checkpoint")
    started = time.perf_counter()
    saved = _saved_config(workdir)
    if saved is not None and model_description(saved) != model_description(config):
        raise UserError(_other_model_message(workdir, config, saved))
    try:
        fn, ckpt_step = trainer.load_inference(config, str(workdir), step, devices=devices)
    except (ValueError, TypeError, KeyError) as err:
        if isinstance(err, UserError):
            raise
        # Orbax's "tree structures do not match" and its kin: a config of another model.
        raise UserError(_other_model_message(workdir, config, saved, err)) from err
    log.info("loaded %s %s, step %d, on %d device(s) in %.1f s", config.trainer, model_name(config),
             int(ckpt_step), len(devices), time.perf_counter() - started)
    return _logs_compilation(fn), ckpt_step


def model_description(config) -> str:
    """'rs_spade on lulc+dem': the network and the sources it takes, as a checkpoint holds them."""
    from rsjax import input_pipeline

    sources = tuple(config.get("data", {}).get("sources", ()) or ())
    try:
        sources = input_pipeline.check_sources(sources)
    except ValueError:
        pass
    try:
        name = model_name(config)
    except AttributeError:
        name = "?"
    return f"{config.get('trainer')} {name} on {'+'.join(sources) or 'no sources'}"


def _saved_config(workdir):
    """The config the run saved in `workdir`, or None (no config.json, or unreadable)."""
    from rsjax.config_loader import config_from_workdir

    try:
        return config_from_workdir(workdir)
    except (UserError, OSError, ValueError):
        return None


def _other_model_message(workdir, config, saved, err: Optional[BaseException] = None) -> str:
    """One line: what the checkpoint holds, what the config describes, what to do."""
    if saved is not None and model_description(saved) == model_description(config):
        why = str(err).splitlines()[0][:200] if err is not None else "other sizes"
        return (f"{workdir}: the checkpoint does not fit the config given ({model_description(config)} "
                f"of other sizes, e.g. generator.ngf: {why}). Leave --config out to predict with "
                "the run's own config.")
    holds = (f"holds {model_description(saved)} (its config.json)" if saved is not None
             else "holds another model")
    return (f"{workdir}: the checkpoint {holds}, but the config given describes "
            f"{model_description(config)}. Leave --config out to predict with the run's own "
            "config, or give the workdir of a run of that model.")


def _logs_compilation(fn: Callable[[dict], Any]) -> Callable[[dict], Any]:
    """`fn` (a jitted model), logging the compilation its first call on each batch
    shape does: jit compiles inside that call, before the computation is dispatched
    asynchronously, so the call's duration is the compile time. A model loaded
    once for many scenes (`load_model`) compiles, and says so, once."""
    compiled: set = set()

    def call(batch: dict):
        shapes = tuple(sorted((k, tuple(np.shape(v))) for k, v in batch.items()))
        if shapes in compiled:
            return fn(batch)
        first = np.shape(next(iter(batch.values())))
        log.info("compiling the model for batches of %d tiles of %d x %d px ...", *first[:3])
        started = time.perf_counter()
        outputs = fn(batch)
        compiled.add(shapes)
        log.info("compiled in %.1f s", time.perf_counter() - started)
        return outputs

    return call


def _batch_size(requested: Optional[int], config, num_devices: int) -> int:
    size = int(requested or config.get("eval_batch_size", num_devices))
    if size < 1:
        raise ValueError(f"batch_size must be positive, got {size}")
    return math.ceil(size / num_devices) * num_devices       # a whole share per device


def _overlap(overlap: Optional[int], tile: int) -> int:
    overlap = tile // 4 if overlap is None else int(overlap)
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap={overlap}: must be in [0, {tile}) pixels (the tile size is {tile})")
    return overlap


def _local_devices(devices):
    import jax

    if jax.process_count() > 1:
        raise ValueError("rsjax.predict runs in one process (on its local devices); run it "
                         "without jax.distributed, one scene per process.")
    return list(devices) if devices is not None else jax.local_devices()


# ---------------------------------------------------------------------------
# The two modes
# ---------------------------------------------------------------------------
class TileProgress:
    """Logs `tile 96/400 (24.0%) | 12.3 tiles/s | ETA 25s` as batches of tiles
    finish: at the first batch, then at most every `every_seconds`, and at the
    last. The rate counts from the first batch on, so the compilation the first
    batch carries does not slow the estimate."""

    def __init__(self, total: int, every_seconds: float = 10.0, enabled: bool = True,
                 clock: Callable[[], float] = time.monotonic):
        self.total, self.every_seconds, self.enabled, self._clock = total, every_seconds, enabled, clock
        self.done = 0
        self._first: Optional[tuple[int, float]] = None      # (tiles done, time) at the first batch
        self._last_line = -math.inf

    def __call__(self, tiles: int) -> Optional[str]:
        self.done += tiles
        now = self._clock()
        if self._first is None:
            self._first = (self.done, now)
        elif self.done < self.total and now - self._last_line < self.every_seconds:
            return None
        if not self.enabled:
            return None
        self._last_line = now
        line = self.line(now)
        log.info("%s", line)
        return line

    def line(self, now: float) -> str:
        from rsjax.logging_utils import eta_seconds, format_duration

        tiles, seconds = self.done - self._first[0], now - self._first[1]
        rate = f"{tiles / seconds:.3g} tiles/s" if tiles > 0 and seconds > 0 else "? tiles/s"
        eta = format_duration(eta_seconds(tiles, seconds, self.total - self.done))
        return (f"tile {self.done}/{self.total} ({100.0 * self.done / self.total:.1f}%) | {rate} | "
                f"ETA {eta}")


def _run(reg, *, tile: int, overlap: int, channels: int, read_tile, predict_batch, batch_size: int,
         out: Path, profile: dict, to_output: Callable[[np.ndarray, np.ndarray], np.ndarray],
         spec: OutputSpec, tags: Mapping[str, str], progress: bool = True,
         timings: Optional[dict] = None) -> dict:
    """Tiled prediction of a registered scene into an atomically written GeoTIFF
    with `spec`'s band metadata and `tags`.

    timings: a dict to add seconds to by phase: `tiled_predict`'s ("read",
    "model", "blend", "write") and "cog" (closing the staged GeoTIFF and
    copying it as a COG with overviews)."""
    import rasterio
    from rasterio.windows import Window

    step = tile - overlap
    total = len(tile_offsets(reg.height, tile, step)) * len(tile_offsets(reg.width, tile, step))
    log.info("predicting %s: %d x %d px in %d tiles of %d px (overlap %d), batches of %d",
             out.name, reg.width, reg.height, total, tile, overlap, batch_size)
    bar = TileProgress(total, enabled=progress)
    started = time.perf_counter()
    with rasterio.Env(GDAL_CACHEMAX=64 * 2**20), cog_output(out, profile) as dst:

        def write_rows(row, values, nodata):
            data = to_output(values, nodata)                  # (count, nrows, width)
            dst.write(data, window=Window(0, row, reg.width, data.shape[1]))

        tiles = tiled_predict(reg.height, reg.width, tile=tile, overlap=overlap, channels=channels,
                              read_tile=read_tile, predict_batch=predict_batch, write_rows=write_rows,
                              batch_size=batch_size, flush_rows=OUTPUT_BLOCK, on_tiles=bar,
                              timings=timings)
        predict_outputs.apply_band_metadata(dst, spec)
        dst.update_tags(**tags)
        finishing = time.perf_counter()
    seconds = time.perf_counter() - started
    if timings is not None:
        timings["cog"] = timings.get("cog", 0.0) + (started + seconds - finishing)
    return {"out": str(out), "width": reg.width, "height": reg.height, "crs": reg.grid.crs_string(),
            "transform": list(reg.grid.transform)[:6], "tile_size": tile, "overlap": overlap,
            "tiles": tiles, "seconds": round(seconds, 2),
            "tiles_per_s": round(tiles / seconds, 2) if seconds > 0 else None}


def provenance(mode: str, config, workdir, ckpt_step, sources: Sequence[str], tile: int,
               overlap: int) -> dict:
    """What made an output, as STAC properties: no local path, the run by its name."""
    import rsjax

    return {"rsjax:mode": mode, "rsjax:trainer": str(config.trainer), "rsjax:model": model_name(config),
            "rsjax:sources": list(sources), "rsjax:run": predict_outputs.run_name(workdir),
            "rsjax:checkpoint_step": int(ckpt_step), "rsjax:version": rsjax.__version__,
            "rsjax:tile_size": int(tile), "rsjax:overlap": int(overlap)}


def provenance_tags(properties: Mapping[str, Any]) -> dict[str, str]:
    """The same as GeoTIFF tags: rsjax:checkpoint_step -> RSJAX_CHECKPOINT_STEP, lists comma-joined."""
    return {"RSJAX_" + key.split(":", 1)[1].upper(): ",".join(v) if isinstance(v, list) else str(v)
            for key, v in properties.items()}


def _finish(result: dict, out: Path, spec: OutputSpec, properties: Mapping[str, Any],
            inputs: Sequence[tuple[str, Any]]) -> dict:
    """Writes the STAC Item beside the finished output and says where both are.

    inputs: (role, source), the one whose acquisition time dates the scene first."""
    created = dt.datetime.now(dt.timezone.utc)
    item = predict_outputs.stac_item(out, spec, properties, inputs,
                                     predict_outputs.scene_datetime(inputs), created)
    stac = write_stac(out, item.to_dict(include_self_link=False, transform_hrefs=False))
    log.info("wrote %s (%d tiles in %.1f s) and its STAC item %s", out, result["tiles"],
             result["seconds"], stac)
    result["stac"] = str(stac)
    return result


def spec_profile(grid, spec: OutputSpec) -> dict:
    """`output_profile` of an output kind (its band count, data type, no-data, overviews)."""
    return output_profile(grid, len(spec.bands), spec.dtype, spec.nodata, overviews=spec.overviews)


def _ingest_options(tile: int, target_grid, target_crs, target_resolution, s1_units: str):
    from rsjax.data.ingest import IngestOptions

    return IngestOptions(tile_size=max(tile, 3), target_grid=None if target_grid is None else str(target_grid),
                         target_crs=target_crs, target_resolution=target_resolution, s1_units=s1_units)


def _check_trainer(config, expected: str, workdir) -> None:
    trainer = config.get("trainer")
    if trainer != expected:
        other = {"fusion": "predict_fusion (--s1/--lulc/--dem)",
                 "segmentation": "predict_landcover (--s2)"}.get(trainer, "another command")
        raise InputError(f"{workdir}: its config is a {trainer!r} run, not {expected!r}; use {other}.")


def _as_path(path):
    """A local path as Path; a URL (gs://, s3://, http(s)://) as it is; a Mosaic as it is."""
    from rsjax.data.contract import as_source

    return as_source(path)


def predict_fusion(workdir, s1=None, lulc=None, dem=None, out=None, *, target_grid=None,
                   target_crs: Optional[str] = None, target_resolution: Optional[float] = None,
                   step: Optional[int] = None, overlap: Optional[int] = None,
                   batch_size: Optional[int] = None, devices=None, config=None,
                   data_dir: Optional[str] = None, s1_units: str = "auto",
                   progress: bool = True, model: Optional[LoadedModel] = None,
                   timings: Optional[dict] = None, samples: int = 1) -> dict:
    """A fusion checkpoint over whole-scene S1 / land cover / DEM GeoTIFFs -> a
    synthetic 4-band optical GeoTIFF at `out` (see the module docstring).
    `samples` > 1 (flow models): that many samples per pixel, written as their
    mean (bands 1-4) and standard deviation (bands 5-8).

    Only the sources the model was trained on are needed (and read). `step`:
    checkpoint step (default: the latest); `config`: the training config
    (default: the workdir's config.json); `data_dir`: where the training
    dataset is, when not where the config says; `model`: a `load_model`
    result to use instead of restoring the checkpoint (config, step, data_dir
    and devices then come from it); `timings`: a dict to add seconds to by
    phase (see `_run`; `rsjax bench predict`). Returns a summary dict.
    """
    from rasterio.windows import Window

    from rsjax import input_pipeline
    from rsjax.data.ingest import RegisteredScene
    from rsjax.trainers import fusion

    if out is None:
        raise ValueError("out: give the path of the GeoTIFF to write")
    out = check_output_path(out, {"--s1": s1, "--lulc": lulc, "--dem": dem, "--target_grid": target_grid})
    config = model.config if model is not None else run_config(workdir, config)
    _check_trainer(config, "fusion", workdir)
    if uses_clouds(config):
        raise InputError(f"{workdir}: its generator takes the cloudy image: use predict_clouds "
                         "(--s2_cloudy).")
    sources = fusion.selected_sources(config)
    if samples < 1:
        raise InputError(f"--samples {samples}: give 1 or more.")
    if samples > 1 and not is_flow_run(config):
        raise InputError(f"{workdir}: --samples is for flow models (model=flow), whose images "
                         "vary with their starting noise; this run's generator is "
                         f"{model_name(config)}.")
    noise_of = scene_noise(config, samples)
    spec = SYNTHETIC_MEAN_STD if samples > 1 else SYNTHETIC
    given = {"lulc": _as_path(lulc), "s1": _as_path(s1), "dem": _as_path(dem)}
    flags_of = {"lulc": "--lulc (land cover)", "s1": "--s1 (Sentinel-1 VV/VH)", "dem": "--dem (elevation)"}
    _check_sources(workdir, sources, given, flags_of)
    grid_file = target_grid or next(given[s] for s in SOURCES if given[s] is not None)
    tile = int(config.data.tile_size)
    overlap = _overlap(overlap, tile)
    opts = _ingest_options(tile, grid_file, target_crs, target_resolution, s1_units)
    scene = ScenePaths(scene_id=out.stem, s2=None, s1=given["s1"] if "s1" in sources else None,
                       dem=given["dem"] if "dem" in sources else None,
                       lulc=given["lulc"] if "lulc" in sources else None)
    normalizer = model.normalizer if model is not None else dataset_normalizer(config.data, data_dir)
    with RegisteredScene(scene, opts) as reg:
        generate, ckpt_step, num_devices = _inference(model, fusion, config, workdir, step, devices)
        size = _batch_size(batch_size, config, num_devices)

        def read_tile(row, col, nrows, ncols):
            arrays = reg.read(Window(col, row, ncols, nrows))
            model_inputs = input_pipeline.normalize_tile(arrays, normalizer, sources)
            inputs = {s: model_inputs[s] for s in sources}
            return {**inputs, **noise_of(row, col, nrows, ncols)}, source_nodata(arrays, sources)

        def to_output(values, nodata):
            bands = len(S2_BANDS)
            return s2_bands(values[..., :bands], nodata, normalizer,
                            std=values[..., bands:] if samples > 1 else None)

        properties = provenance("fusion", config, workdir, ckpt_step, sources, tile, overlap)
        if samples > 1:
            properties["rsjax:samples"] = samples
        tags = {**provenance_tags(properties), "UNITS": REFLECTANCE_UNITS}
        result = _run(reg, tile=tile, overlap=overlap, channels=len(spec.bands), read_tile=read_tile,
                      predict_batch=generate, batch_size=size,
                      out=out, profile=spec_profile(reg.grid, spec),
                      to_output=to_output, spec=spec, tags=tags, progress=progress,
                      timings=timings)
    result.update(mode="fusion", checkpoint_step=int(ckpt_step), sources=list(sources),
                  devices=num_devices, batch_size=size, samples=samples)
    return _finish(result, out, spec, properties,
                   [(s, given[s]) for s in ("s1", "lulc", "dem") if s in sources])


def predict_landcover(workdir, s2=None, out=None, *, target_grid=None,
                      target_crs: Optional[str] = None, target_resolution: Optional[float] = None,
                      step: Optional[int] = None, overlap: Optional[int] = None,
                      batch_size: Optional[int] = None, devices=None, config=None,
                      data_dir: Optional[str] = None, progress: bool = True,
                      model: Optional[LoadedModel] = None) -> dict:
    """A segmentation checkpoint over a whole-scene S2 GeoTIFF -> a uint8
    land-cover GeoTIFF at `out` (Dynamic World labels, 255 = no data, with
    Dynamic World's colour map). Arguments as in `predict_fusion`."""
    from rasterio.windows import Window

    from rsjax import input_pipeline
    from rsjax.data.ingest import RegisteredScene
    from rsjax.trainers import segmentation

    if out is None:
        raise ValueError("out: give the path of the GeoTIFF to write")
    if s2 is None:
        raise InputError(f"{workdir}: a land-cover model needs the optical image: give --s2.")
    out = check_output_path(out, {"--s2": s2, "--target_grid": target_grid})
    config = model.config if model is not None else run_config(workdir, config)
    _check_trainer(config, "segmentation", workdir)
    tile = int(config.data.tile_size)
    overlap = _overlap(overlap, tile)
    opts = _ingest_options(tile, target_grid, target_crs, target_resolution, "auto")
    scene = ScenePaths(scene_id=out.stem, s2=_as_path(s2), s1=None, dem=None, lulc=None)
    normalizer = model.normalizer if model is not None else dataset_normalizer(config.data, data_dir)
    with RegisteredScene(scene, opts) as reg:
        probabilities, ckpt_step, num_devices = _inference(model, segmentation, config, workdir,
                                                           step, devices)
        size = _batch_size(batch_size, config, num_devices)

        def read_tile(row, col, nrows, ncols):
            arrays = reg.read(Window(col, row, ncols, nrows))
            model_inputs = input_pipeline.normalize_tile(arrays, normalizer, ())
            return {"image": model_inputs["image"]}, ~model_inputs["valid"]

        def to_output(values, nodata):
            labels = np.argmax(values, axis=-1).astype(np.uint8)
            labels[nodata] = LULC_NODATA
            return labels[None]

        properties = provenance("segmentation", config, workdir, ckpt_step, ("s2",), tile, overlap)
        tags = {**provenance_tags(properties), "CLASSES": ",".join(LAND_COVER.classes)}
        result = _run(reg, tile=tile, overlap=overlap, channels=NUM_CLASSES, read_tile=read_tile,
                      predict_batch=probabilities, batch_size=size, out=out,
                      profile=spec_profile(reg.grid, LAND_COVER), to_output=to_output,
                      spec=LAND_COVER, tags=tags, progress=progress)
    result.update(mode="segmentation", checkpoint_step=int(ckpt_step),
                  devices=num_devices, batch_size=size)
    return _finish(result, out, LAND_COVER, properties, [("s2", scene.s2)])


def uses_clouds(config) -> bool:
    """Whether a run removes clouds: its model takes the cloudy image."""
    return CLOUDY in tuple(config.data.get("sources", ()))


def predict_clouds(workdir, s2_cloudy=None, out=None, *, s1=None, lulc=None, dem=None,
                   cloud_mask=None, target_grid=None, target_crs: Optional[str] = None,
                   target_resolution: Optional[float] = None, step: Optional[int] = None,
                   overlap: Optional[int] = None, batch_size: Optional[int] = None, devices=None,
                   config=None, data_dir: Optional[str] = None, s1_units: str = "auto",
                   progress: bool = True, model: Optional[LoadedModel] = None) -> dict:
    """A cloud-removal checkpoint (a run whose sources include `s2_cloudy`:
    the cloud_removal trainer's DSen2-CR or UnCRtainTS, or RS-SPADE) over a
    whole-scene cloudy S2 GeoTIFF and the other sources it takes -> a
    cloud-free 4-band GeoTIFF at `out`; 8 bands for a model with a variance
    (UnCRtainTS): the image, then the square root of its variance (blended
    across tiles as a variance). With `cloud_mask`, the cloudy image is kept
    where the mask says clear, with a standard deviation of 0 there (written as
    1, the least value that is not no-data; see the module docstring).
    Arguments as in `predict_fusion`.
    """
    import jax.numpy as jnp
    from rasterio.windows import Window

    from rsjax import input_pipeline
    from rsjax.data.ingest import RegisteredScene
    from rsjax.trainers import cloud_eval, cloud_removal, trainer_module

    if out is None:
        raise ValueError("out: give the path of the GeoTIFF to write")
    out = check_output_path(out, {"--s2_cloudy": s2_cloudy, "--cloud_mask": cloud_mask, "--s1": s1,
                                  "--lulc": lulc, "--dem": dem, "--target_grid": target_grid})
    config = model.config if model is not None else run_config(workdir, config)
    if not uses_clouds(config):
        raise InputError(f"{workdir}: its model does not take a cloudy image (sources "
                         f"{tuple(config.data.get('sources', ()))}); --s2_cloudy and --cloud_mask "
                         "are for cloud-removal runs.")
    trainer = trainer_module(config.trainer)
    sources = trainer.selected_sources(config)
    given = {"lulc": _as_path(lulc), "s1": _as_path(s1), "dem": _as_path(dem),
             CLOUDY: _as_path(s2_cloudy)}
    flags_of = {"lulc": "--lulc (land cover)", "s1": "--s1 (Sentinel-1 VV/VH)",
                "dem": "--dem (elevation)", CLOUDY: "--s2_cloudy (the cloudy Sentinel-2 image)"}
    _check_sources(workdir, sources, given, flags_of)
    tile = int(config.data.tile_size)
    overlap = _overlap(overlap, tile)
    opts = _ingest_options(tile, target_grid or given[CLOUDY], target_crs, target_resolution, s1_units)
    scene = ScenePaths(scene_id=out.stem, s2=None, s1=given["s1"] if "s1" in sources else None,
                       dem=given["dem"] if "dem" in sources else None,
                       lulc=given["lulc"] if "lulc" in sources else None,
                       s2_cloudy=given[CLOUDY], cloud_mask=_as_path(cloud_mask))
    normalizer = model.normalizer if model is not None else dataset_normalizer(config.data, data_dir)
    noise_of = scene_noise(config)
    variance = config.trainer == "cloud_removal" and cloud_removal.predicts_variance(config)
    spec = CLOUD_FREE_MEAN_STD if variance else CLOUD_FREE
    bands = len(S2_BANDS)
    with RegisteredScene(scene, opts) as reg:
        remove_clouds, ckpt_step, num_devices = _inference(model, trainer, config, workdir, step,
                                                           devices)
        size = _batch_size(batch_size, config, num_devices)

        def read_tile(row, col, nrows, ncols):
            arrays = reg.read(Window(col, row, ncols, nrows))
            model_inputs = input_pipeline.normalize_tile(arrays, normalizer, sources)
            inputs = {s: model_inputs[s] for s in sources}
            if cloud_mask is not None:
                inputs["cloud_mask"] = model_inputs["cloud_mask"]
            return {**inputs, **noise_of(row, col, nrows, ncols)}, source_nodata(arrays, sources)

        def predict_batch(batch):
            out = remove_clouds(batch)
            if cloud_mask is None:
                return out
            cloudy, mask = jnp.asarray(batch[CLOUDY]), jnp.asarray(batch["cloud_mask"])
            image = cloud_eval.composite(out[..., :bands], cloudy, mask)
            if not variance:
                return image
            kept = cloud_eval.kept_clear(cloudy, mask)[..., None]
            return jnp.concatenate([image, jnp.where(kept, 0.0, out[..., bands:])], axis=-1)

        def to_output(values, nodata):
            std = np.sqrt(np.maximum(values[..., bands:], 0.0)) if variance else None
            return s2_bands(values[..., :bands], nodata, normalizer, std=std)

        properties = {
            **provenance("cloud_removal", config, workdir, ckpt_step, sources, tile, overlap),
            "rsjax:cloud_mask": ("cloudy image kept where the mask is clear (0), model under "
                                 "cloud (1) and shadow (2)") if cloud_mask is not None
            else "none: the model's image everywhere"}
        tags = {**provenance_tags(properties), "UNITS": REFLECTANCE_UNITS}
        result = _run(reg, tile=tile, overlap=overlap, channels=len(spec.bands), read_tile=read_tile,
                      predict_batch=predict_batch, batch_size=size,
                      out=out, profile=spec_profile(reg.grid, spec),
                      to_output=to_output, spec=spec, tags=tags, progress=progress)
    result.update(mode="cloud_removal", checkpoint_step=int(ckpt_step), sources=list(sources),
                  cloud_mask=cloud_mask is not None, devices=num_devices, batch_size=size)
    inputs = [(CLOUDY, given[CLOUDY]), *((s, given[s]) for s in ("s1", "lulc", "dem") if s in sources),
              ("cloud_mask", _as_path(cloud_mask))]          # None (no mask) is left out
    return _finish(result, out, spec, properties, inputs)


def s2_bands(image, nodata, normalizer, std=None) -> np.ndarray:
    """(bands, H, W) uint16 of a model-space image (H, W, 4), then of its
    standard deviation (model space) when given: the S2 unit, no-data where
    `nodata` (H, W) is set."""
    from rsjax import input_pipeline

    s2 = input_pipeline.image_to_s2(image, normalizer)
    if std is not None:
        s2 = np.concatenate([s2, input_pipeline.image_std_to_s2(std, normalizer)], axis=-1)
    s2[nodata] = S2_NODATA
    return np.moveaxis(s2, -1, 0)


def source_nodata(arrays: Mapping[str, np.ndarray], sources: Sequence[str]) -> np.ndarray:
    """(h, w) bool: pixels where any of `sources` is missing (contract no-data)."""
    mask = np.zeros(arrays["lulc"].shape, bool)
    if "lulc" in sources:
        mask |= arrays["lulc"] == LULC_NODATA
    if "s1" in sources:
        mask |= np.isnan(arrays["s1"]).any(axis=-1)
    if "dem" in sources:
        mask |= np.isnan(arrays["dem"]).any(axis=-1)
    if CLOUDY in sources:
        mask |= (arrays[CLOUDY] == S2_NODATA).all(axis=-1)
    return mask


def predict(workdir, out, *, s1=None, lulc=None, dem=None, s2=None, s2_cloudy=None,
            cloud_mask=None, config=None, samples: int = 1, **kwargs) -> dict:
    """One of the modes, chosen by the workdir's run: cloud removal (its model
    takes the cloudy image), segmentation or fusion (`samples`: see predict_fusion)."""
    model = kwargs.get("model")
    config = model.config if model is not None else run_config(workdir, config)
    if samples != 1 and (uses_clouds(config) or not is_flow_run(config)):
        raise InputError(f"{workdir}: --samples is for flow models (fusion:...,model=flow) "
                         "without the cloudy image; this run's model is "
                         f"{model_name(config)}" + (" with the cloudy image." if uses_clouds(config) else "."))
    if uses_clouds(config):
        if s2 is not None:
            raise InputError(f"{workdir}: a cloud-removal run takes the cloudy image (--s2_cloudy), "
                             "not --s2.")
        return predict_clouds(workdir, s2_cloudy, out, s1=s1, lulc=lulc, dem=dem,
                              cloud_mask=cloud_mask, config=config, **kwargs)
    if s2_cloudy is not None or cloud_mask is not None:
        raise InputError(f"{workdir}: its model does not remove clouds (it takes no cloudy "
                         "image): --s2_cloudy and --cloud_mask are for runs trained with "
                         "sources including s2_cloudy (rsjax train --config cloud_removal).")
    if config.get("trainer") == "segmentation":
        given = [name for name, v in (("--s1", s1), ("--lulc", lulc), ("--dem", dem)) if v is not None]
        if given:
            raise InputError(f"{workdir}: a segmentation run maps an optical image (--s2) to land "
                             f"cover; it takes no {', '.join(given)}.")
        return predict_landcover(workdir, s2, out, config=config, **kwargs)
    if s2 is not None:
        raise InputError(f"{workdir}: a fusion run generates the optical image from --s1, --lulc "
                         "and --dem; it takes no --s2.")
    return predict_fusion(workdir, s1, lulc, dem, out, config=config, samples=samples, **kwargs)
