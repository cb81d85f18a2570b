"""rs_multisource: co-registered Sentinel-1, Sentinel-2, Dynamic World and Copernicus DEM tiles.

One example per tile, in physical units (rsjax.data.contract). Tiles are cut
by rsjax.data.ingest from scene GeoTIFFs named `<scene>_{s2,s1,lulc,dem}.tif`:
the `synthetic` configs write their scenes with rsjax.data.synthetic, the
`manual` config reads the user's exports from `manual_dir`.

Files are listed and read through etils.epath (never `os`/`open`, which
TFDS's test case forbids here); rasterio opens the GeoTIFFs in GDAL.

Two ways to build, one dataset: without a Beam runner the splits are
generated in this process, scene after scene; with one
(`tfds.download.DownloadConfig(beam_runner=..., beam_options=...)`, or
`rsjax build --beam_pipeline_options=...`, or `tfds build
--beam_pipeline_options=...`) the scenes, cut into strips of tile rows, are
ingested in parallel on the runner's workers (`beam_build.py`). Both cut the
same tiles with the same code (`scene_examples`), put them in the same splits,
and compute the statistics with the same mergeable accumulators, so the two
datasets hold the same examples, byte for byte, and the same metadata.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import re
import time
from typing import Optional

from etils import epath
import numpy as np
import rasterio.errors
import tensorflow_datasets as tfds

from rsjax import locks
from rsjax.data import contract
from rsjax.data import ingest
from rsjax.data import landcover
from rsjax.data import sar
from rsjax.data import splits as splits_lib
from rsjax.data import statistics as statistics_lib

# Keys of the dataset's metadata (metadata.json beside dataset_info.json).
STATISTICS_KEY = "statistics"
BUILD_REPORT_KEY = "build_report"

MANUAL_DOWNLOAD_INSTRUCTIONS = """
Put the co-registered scene exports in one folder (the manual_dir, by default
<data_dir>/downloads/manual/), four GeoTIFFs per scene:

    <scene_id>_s2.tif    Sentinel-2 surface reflectance B2, B3, B4, B8 (x 10000, uint16, 0 = no data)
    <scene_id>_s1.tif    Sentinel-1 GRD IW VV, VH (dB as exported by Earth Engine, or linear power)
    <scene_id>_lulc.tif  Dynamic World `label` (0..8)
    <scene_id>_dem.tif   Copernicus DEM GLO-30 elevation (m)

Scene ids must match across the four files. Instead of the files, the folder
may hold a `scenes.txt` listing scene prefixes, one per line, local or in
object storage (gs://, s3://, https://): <prefix>_s2.tif etc. are read there.
Sources may come in different
CRSs and resolutions; they are registered onto the Sentinel-2 grid (or the
configured target grid). `rsjax export_ee` exports them from Earth Engine
(see README.md beside this builder).
"""


@dataclasses.dataclass(eq=False)
class RsMultisourceConfig(tfds.core.BuilderConfig):
    """Tiling, filtering and splitting options, plus the synthetic scenes to write.

    Attributes:
      tile_size: tile side in pixels (of the registered grid).
      stride: step between tiles in pixels; None = tile_size (no overlap).
      max_nodata_fraction: tiles with a larger fraction of no-data pixels are dropped.
      block_tiles: side of a split block, in tiles (see rsjax.data.splits).
      split_mode: 'block' (spatial blocks, default) or 'random' (per tile, the paper's).
      split_fractions: train, validation, test fractions.
      split_seed: salt of the split hash; another value draws another partition.
      skip_incomplete_scenes: skip (and count) scenes missing a source instead of failing.
      synthetic_scenes: number of synthetic scenes to write; 0 = read manual_dir.
      synthetic_size: side of each synthetic scene in pixels (10 m).
      synthetic_seed: seed of the synthetic scene writer.
      target_crs, target_resolution: optional registration grid (default: the S2 file's).
      s2_offset: added to S2 values to give reflectance x 10000 (e.g. -1000 for L2A of
        processing baseline 04.00+); None: what each file declares (rsjax.data.optical).
      lulc_map: another land-cover legend mapped onto Dynamic World, "1:4,0:255"
        (rsjax.data.landcover); "" for none.
      lulc_legend: "auto" refuses land cover that cannot be Dynamic World (a 0/1 map);
        "dynamic_world" takes it as it is.
      s1_units: "auto" (the file's metadata, else its values; rsjax.data.sar), "linear" or "db".
      allow_missing_lulc: scenes may lack <scene>_lulc.tif (their `lulc` is all 255).
      clouds: cloud removal: every example also holds the cloudy S2 image
        (`s2_cloudy`), its cloud/shadow mask (`cloud_mask`, 255 where unknown)
        and `cloud_cover`; synthetic scenes are written with clouds, manual
        scenes need `<scene>_s2_cloudy.tif` and may have `<scene>_cloudmask.tif`.
    """

    tile_size: int = 256
    stride: Optional[int] = None
    max_nodata_fraction: float = 0.1
    block_tiles: int = 2
    split_mode: str = "block"
    split_fractions: tuple = splits_lib.DEFAULT_FRACTIONS
    split_seed: int = 0
    skip_incomplete_scenes: bool = False
    synthetic_scenes: int = 0
    synthetic_size: int = 512
    synthetic_seed: int = 0
    target_crs: Optional[str] = None
    target_resolution: Optional[float] = None
    s2_offset: Optional[float] = None
    lulc_map: str = ""
    lulc_legend: str = "auto"
    s1_units: str = "auto"
    allow_missing_lulc: bool = False
    clouds: bool = False

    def __post_init__(self):
        if self.tile_size < 8:
            raise ValueError(f"config {self.name}: tile_size={self.tile_size} is too small (>= 8)")
        if self.stride is not None and not 0 < self.stride <= self.tile_size:
            raise ValueError(f"config {self.name}: stride={self.stride} must be in (0, tile_size]")
        if not 0.0 <= self.max_nodata_fraction <= 1.0:
            raise ValueError(f"config {self.name}: max_nodata_fraction must be in [0, 1]")
        try:   # one canonical spelling, so equal mappings name the same derived config
            self.lulc_map = landcover.format_lulc_map(landcover.parse_lulc_map(self.lulc_map))
        except ValueError as err:
            raise ValueError(f"config {self.name}: {err}") from None
        if self.lulc_legend not in landcover.LEGENDS:
            raise ValueError(f"config {self.name}: lulc_legend={self.lulc_legend!r}; use one of "
                             f"{landcover.LEGENDS}")
        if self.s1_units not in sar.UNITS:
            raise ValueError(f"config {self.name}: s1_units={self.s1_units!r}; use one of {sar.UNITS}")
        if self.split_mode not in splits_lib.SPLIT_MODES:
            raise ValueError(f"config {self.name}: split_mode={self.split_mode!r}; "
                             f"use one of {splits_lib.SPLIT_MODES}")

    @property
    def effective_stride(self) -> int:
        return self.stride or self.tile_size

    @property
    def is_synthetic(self) -> bool:
        return self.synthetic_scenes > 0


def derived_config(base: RsMultisourceConfig, **changes) -> RsMultisourceConfig:
    """A copy of `base` with other options, under a name that says which (TFDS keys data by name)."""
    if changes.get("lulc_map"):
        changes["lulc_map"] = landcover.format_lulc_map(landcover.parse_lulc_map(changes["lulc_map"]))
    changes = {k: v for k, v in changes.items() if getattr(base, k) != v}
    if not changes:
        return base
    # TFDS config names allow word characters, '+', '-' and '.': "1:4,0:255" -> "1_4_0_255".
    suffix = "_".join(re.sub(r"[^\w+.-]", "_", f"{_SHORT.get(k, k)}{v}") for k, v in sorted(changes.items()))
    return dataclasses.replace(base, name=f"{base.name}_{suffix}", **changes)


_SHORT = {"tile_size": "t", "stride": "s", "max_nodata_fraction": "nd", "split_mode": "split",
          "block_tiles": "b", "split_seed": "seed", "synthetic_scenes": "n", "synthetic_size": "px",
          "s2_offset": "s2off", "lulc_map": "lmap", "lulc_legend": "legend", "s1_units": "s1",
          "skip_incomplete_scenes": "skip", "allow_missing_lulc": "nolulc", "clouds": "clouds"}


class Builder(tfds.core.GeneratorBasedBuilder):
    """Multi-source remote-sensing tiles for RS-SPADE fusion and segmentation."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {
        "1.0.0": "Initial release: S2, S1 (dB), Dynamic World, DEM with slope/aspect/hillshade; "
                 "block splits 7:2:1; train-split statistics in metadata.json.",
    }
    MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_DOWNLOAD_INSTRUCTIONS
    # Where README.md, CITATIONS.bib and TAGS.txt live. TFDS infers it from the
    # module name under its top-level package, which is wrong for a package
    # installed from another folder (rsjax.tfds_builder maps tfds_builder/).
    pkg_dir_path = epath.Path(__file__).parent
    BUILDER_CONFIGS = [
        RsMultisourceConfig(
            name="synthetic", description="8 synthetic scenes of 1024 x 1024 px, 256 px tiles.",
            tile_size=256, synthetic_scenes=8, synthetic_size=1024),
        RsMultisourceConfig(
            name="synthetic_demo",
            description="8 synthetic scenes of 256 x 256 px, 64 px tiles: the quick-start demo.",
            tile_size=64, synthetic_scenes=8, synthetic_size=256),
        RsMultisourceConfig(
            name="synthetic_bench",
            description="16 synthetic scenes of 512 x 512 px, 64 px tiles: the experiments' "
                        "scale on 2 CPU cores (rsjax experiments report --scale bench --run).",
            tile_size=64, synthetic_scenes=16, synthetic_size=512),
        RsMultisourceConfig(
            name="synthetic_paper",
            description="36 synthetic scenes of 2048 x 2048 px, 256 px tiles: about 1,600 training "
                        "tiles, the paper's segmentation setting (1,558).",
            tile_size=256, synthetic_scenes=36, synthetic_size=2048),
        RsMultisourceConfig(
            name="manual", description="The user's GeoTIFF exports from manual_dir, 256 px tiles.",
            tile_size=256),
        RsMultisourceConfig(
            name="manual_cloudy",
            description="The user's exports with a cloudy image (<scene>_s2_cloudy.tif) and "
                        "optionally its mask (<scene>_cloudmask.tif), for cloud removal; 256 px tiles.",
            tile_size=256, clouds=True),
        RsMultisourceConfig(
            name="synthetic_cloudy",
            description="The synthetic scenes under clouds (cloud removal): 8 x 1024 px, 256 px tiles.",
            tile_size=256, synthetic_scenes=8, synthetic_size=1024, clouds=True),
        RsMultisourceConfig(
            name="synthetic_cloudy_demo",
            description="The demo scenes under clouds (cloud removal): 8 x 256 px, 64 px tiles.",
            tile_size=64, synthetic_scenes=8, synthetic_size=256, clouds=True),
        RsMultisourceConfig(
            name="synthetic_cloudy_bench",
            description="The bench scenes under clouds (cloud removal): 16 x 512 px, 64 px tiles.",
            tile_size=64, synthetic_scenes=16, synthetic_size=512, clouds=True),
        RsMultisourceConfig(
            name="synthetic_cloudy_paper",
            description="The paper-scale scenes under clouds (cloud removal): 36 x 2048 px, "
                        "256 px tiles.",
            tile_size=256, synthetic_scenes=36, synthetic_size=2048, clouds=True),
    ]
    DEFAULT_BUILDER_CONFIG_NAME = "synthetic"

    def __init__(self, *, file_format=None, beam_tiles_per_element: int = 64, **kwargs):
        # array_record reads without TensorFlow (tfds.data_source); pass
        # file_format="tfrecord" for tf.data (needs the `tf` extra).
        # beam_tiles_per_element: how many tiles (about) one Beam element
        # ingests: a scene is cut into strips of whole tile rows of this size,
        # so big scenes spread over workers. It changes nothing in the data.
        super().__init__(file_format=file_format or "array_record", **kwargs)
        if beam_tiles_per_element < 1:
            raise ValueError(f"beam_tiles_per_element={beam_tiles_per_element}: must be >= 1")
        self.beam_tiles_per_element = beam_tiles_per_element

    def _info(self) -> tfds.core.DatasetInfo:
        t = self.builder_config.tile_size
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({
                "s2": tfds.features.Tensor(shape=(t, t, 4), dtype=np.uint16,
                                           doc="S2 surface reflectance x 10000, B2 B3 B4 B8; 0 = no data"),
                "s1": tfds.features.Tensor(shape=(t, t, 2), dtype=np.float32,
                                           doc="S1 backscatter dB, VV VH; NaN = no data"),
                "lulc": tfds.features.Tensor(shape=(t, t), dtype=np.uint8,
                                             doc="Dynamic World label 0..8; 255 = no data"),
                "dem": tfds.features.Tensor(shape=(t, t, 4), dtype=np.float32,
                                            doc="elevation m, slope deg, aspect deg (-9999 flat), "
                                                "hillshade 0..255; NaN = no data"),
                "tile_id": tfds.features.Text(),
                "scene_id": tfds.features.Text(),
                "crs": tfds.features.Text(),
                "transform": tfds.features.Tensor(shape=(6,), dtype=np.float64,
                                                  doc="affine a b c d e f (rasterio order)"),
                **(cloud_features(t) if self.builder_config.clouds else {}),
            }),
            supervised_keys=None,
            homepage="https://github.com/rsjax/rsjax",
            metadata=tfds.core.MetadataDict(),
        )

    # ------------------------------------------------------------------ scenes
    def _scenes(self, dl_manager) -> list[contract.ScenePaths]:
        cfg = self.builder_config
        if cfg.is_synthetic:
            from rsjax.data.synthetic import write_scenes  # heavy; only the synthetic configs need it
            out = epath.Path(dl_manager.download_dir) / "rs_multisource_synthetic" / (
                f"n{cfg.synthetic_scenes}_px{cfg.synthetic_size}_seed{cfg.synthetic_seed}"
                + ("_cloudy" if cfg.clouds else ""))
            out.mkdir(parents=True, exist_ok=True)
            return list(write_scenes(out, num_scenes=cfg.synthetic_scenes, size=cfg.synthetic_size,
                                     seed=cfg.synthetic_seed, cloudy=cfg.clouds))
        scenes = discover_scenes(epath.Path(dl_manager.manual_dir), cfg.skip_incomplete_scenes,
                                 self._report, require_lulc=not cfg.allow_missing_lulc,
                                 clouds=cfg.clouds)
        # Which files the dataset comes from, so that training on another
        # folder never silently takes this dataset (rsjax.input_pipeline).
        self._report["inputs"] = {"manual_dir": str(dl_manager.manual_dir), "scenes": len(scenes),
                                  "fingerprint": contract.inputs_fingerprint(scenes)}
        return scenes

    # TFDS prints "Downloading and preparing dataset Unknown size (download:
    # Unknown size, ...)" and "downloaded and prepared" to stdout: nothing is
    # downloaded here and the sizes are unknown, so say what happens instead,
    # in the log (rsjax's commands print their own summary).
    def _log_download_bytes(self) -> None:
        logging.info("Building %s/%s from %s into %s", self.name, self.builder_config.name,
                     "synthetic scenes" if self.builder_config.is_synthetic else "local files",
                     self.data_dir)

    def _log_download_done(self) -> None:
        logging.info("Built %s/%s in %s", self.name, self.builder_config.name, self.data_dir)

    def download_and_prepare(self, *args, **kwargs):
        """TFDS's build, one at a time per config: the build holds a lock file in the config's
        folder (another build of it waits; see rsjax.locks), and first removes the
        `incomplete.*` folders a killed build left there (TFDS removes its own only when the
        build ends, which SIGKILL prevents)."""
        config_dir = epath.Path(self.data_dir).parent
        lock = locks.FolderLock(config_dir, BUILD_LOCK, what=f"build of {self.name}/{self.builder_config.name}",
                                advice="Wait for it to finish")
        with lock.acquire(wait_seconds=BUILD_LOCK_WAIT_SECONDS):
            remove_stale_incomplete(config_dir)
            return super().download_and_prepare(*args, **kwargs)

    def _download_and_prepare(self, dl_manager, download_config):
        # TFDS builds with Beam when `_split_generators` takes a `pipeline`
        # (it creates the pipeline as soon as it sees the parameter), so the
        # signature is chosen per build: a runner or options in the download
        # config mean Beam, none means this process, as TFDS's own Beam
        # datasets behave.
        use_beam = (download_config.beam_runner is not None
                    or download_config.beam_options is not None)
        if use_beam:
            self._split_generators = self._beam_split_generators
        try:
            super()._download_and_prepare(dl_manager, download_config)
        except contract.InputError:
            raise
        except Exception as err:  # pylint: disable=broad-except
            if use_beam:
                _raise_input_error_of_worker(err)
                empty = re.search(r"examples is 0 for split (\w+)", str(err))
                if empty:        # TFDS's Beam writer checks this before we can
                    raise _empty_split_error(self.builder_config, empty[1],
                                             self._num_scenes) from err
            raise
        finally:
            self.__dict__.pop("_split_generators", None)
        if use_beam:
            self._read_beam_summary()

    def _split_generators(self, dl_manager):
        self._report = {"skipped_scenes": [], "dropped_straddling_tiles": 0}
        scenes = self._scenes(dl_manager)
        opts = self._ingest_options()
        # Bad inputs fail before anything is written; what tiling will cost is said up front.
        self._tile_positions = sum(ingest.announce_tiles(scene.scene_id, _validate(scene, opts), opts)
                                   for scene in scenes)
        logging.info("rs_multisource/%s: %d scenes, %d tile positions, read once per split",
                     self.builder_config.name, len(scenes), self._tile_positions)
        self._statistics = statistics_lib.DatasetStatistics(seed=STATISTICS_SEED)
        return {split: self._generate_examples(scenes, split) for split in splits_lib.SPLITS}

    def _beam_split_generators(self, dl_manager, pipeline):
        """The splits as Beam PCollections: scenes are listed here, ingested on the workers."""
        from . import beam_build  # needs apache-beam (the `beam` extra)

        self._report = {"skipped_scenes": [], "dropped_straddling_tiles": 0}
        scenes = self._scenes(dl_manager)
        logging.info("rs_multisource/%s: %d scenes, built with Beam", self.builder_config.name,
                     len(scenes))
        self._num_scenes = len(scenes)
        return beam_build.split_pcollections(
            pipeline, scenes, self.builder_config, self._ingest_options(),
            scene_examples=scene_examples, validate=_validate,
            tiles_per_element=self.beam_tiles_per_element,
            summary_path=str(self._beam_summary_path()), statistics_seed=STATISTICS_SEED)

    def _beam_summary_path(self) -> epath.Path:
        # Inside the build's temporary folder (self.data_dir during the build),
        # on storage the workers share; removed once read.
        return epath.Path(self.data_dir) / BEAM_SUMMARY_FILE

    def _read_beam_summary(self) -> None:
        """Statistics, report and split counts the Beam pipeline combined, into the metadata."""
        path = self._beam_summary_path()
        summary = json.loads(path.read_text())
        path.unlink()
        report = ingest.IngestReport(scenes={
            sid: ingest.SceneCounts(**{k: v for k, v in c.items() if k != "tiles_total"})
            for sid, c in summary["ingest"]["scenes"].items()})
        for counts in report.scenes.values():
            if counts.warning:
                logging.warning("%s", counts.warning)
        report.require_tiles()         # no scene yields a tile: say why, scene by scene
        for split in splits_lib.SPLITS:
            if not summary["split_counts"].get(split):
                raise _empty_split_error(self.builder_config, split, self._num_scenes)
        self.info.metadata[STATISTICS_KEY] = summary["statistics"]
        self.info.metadata[BUILD_REPORT_KEY] = build_report(
            self.builder_config, self._num_scenes, self._report["skipped_scenes"],
            summary["dropped_straddling_tiles"], _report_summary(report),
            self._report.get("inputs"))
        if self.builder_config.clouds:
            self.info.metadata[BUILD_REPORT_KEY]["tiles_by_cover"] = {
                split: cover_counts(summary["tiles_by_cover"].get(split, [0] * (len(contract.COVER_BINS) + 1)))
                for split in splits_lib.SPLITS}

    def _ingest_options(self):
        cfg = self.builder_config
        return ingest.IngestOptions(
            tile_size=cfg.tile_size, stride=cfg.effective_stride,
            max_nodata_fraction=cfg.max_nodata_fraction,
            target_crs=cfg.target_crs, target_resolution=cfg.target_resolution,
            s2_offset=cfg.s2_offset, lulc_map=cfg.lulc_map or None, lulc_legend=cfg.lulc_legend,
            s1_units=cfg.s1_units)

    # ----------------------------------------------------------------- examples
    def _generate_examples(self, scenes, split: str):
        """Tiles of every scene that fall in `split` (the build without Beam).

        Each split re-reads every scene (TFDS generates one split after the
        other), and the split of a tile depends on its georeference only, so
        the three passes agree without holding tiles in memory.
        """
        cfg = self.builder_config
        opts = self._ingest_options()
        report = ingest.IngestReport(progress=ingest.TileProgress(self._tile_positions, f"{split} split"))
        count = 0
        by_cover = [0] * (len(contract.COVER_BINS) + 1)     # the bins, then unknown (index -1)
        started = time.perf_counter()
        for scene in scenes:
            for chosen, key, example in scene_examples(scene, cfg, opts, report):
                if chosen is None:
                    if split == "train":    # count once, not once per split pass
                        self._report["dropped_straddling_tiles"] += 1
                    continue
                if chosen != split:
                    continue
                if cfg.clouds:
                    by_cover[contract.cover_bin(float(example["cloud_cover"]))] += 1
                if split == "train":
                    self._statistics.update(example)
                count += 1
                yield key, example
        report.require_tiles()         # no scene yields a tile: say why, scene by scene
        if count == 0:
            raise _empty_split_error(cfg, split, len(scenes))
        # The split's own count (the progress lines count positions read, all splits').
        logging.getLogger("rsjax").info("%s split: %d tiles kept in %.1f s", split, count,
                                        time.perf_counter() - started)
        if cfg.clouds:
            # One dict for all splits, referenced by the build report: complete
            # when TFDS writes metadata.json after the last split.
            self._report.setdefault("tiles_by_cover", {})[split] = cover_counts(by_cover)
        if split == "train":
            # TFDS generates the splits before it writes dataset_info.json and
            # metadata.json, so the train statistics are complete by then.
            self.info.metadata[STATISTICS_KEY] = self._statistics.result()
            self.info.metadata[BUILD_REPORT_KEY] = build_report(
                cfg, len(scenes), self._report["skipped_scenes"],
                self._report["dropped_straddling_tiles"], _report_summary(report),
                self._report.get("inputs"))
            if cfg.clouds:
                self.info.metadata[BUILD_REPORT_KEY]["tiles_by_cover"] = self._report.setdefault(
                    "tiles_by_cover", {})


# The lock file of a build, in <data_dir>/rs_multisource/<config>/ (TFDS ignores files there),
# and how long a second build of the same config waits for the first.
BUILD_LOCK = "rsjax_build.lock"
BUILD_LOCK_WAIT_SECONDS = 24 * 3600.0


def remove_stale_incomplete(config_dir: epath.Path) -> list[str]:
    """Removes the `incomplete.*` folders of killed builds from a config's folder (call it holding
    the build lock: then no live build owns one); returns their names."""
    if not config_dir.exists():
        return []
    removed = []
    for child in sorted(config_dir.iterdir(), key=lambda p: p.name):
        if child.name.startswith("incomplete.") and child.is_dir():
            logging.warning("Removing %s, left behind by a build that was killed.", child)
            child.rmtree()
            removed.append(child.name)
    return removed


# A manual_dir holding this file takes its scenes from it: one scene prefix per
# line, local or remote (rsjax.data.storage.scene_paths), e.g. https://host/exports/rhine_2023.
SCENE_LIST_FILE = "scenes.txt"
# Seed of the statistics' pixel sample (both build paths).
STATISTICS_SEED = 0
# What the Beam pipeline leaves in the build's temporary folder for the driver.
BEAM_SUMMARY_FILE = "beam_summary.json"


def scene_examples(scene: contract.ScenePaths, cfg: RsMultisourceConfig, opts,
                   report, rows: Optional[range] = None):
    """(split, key, example) for every kept tile of a scene (or of a strip of its tile rows).

    The one place where tiles become examples, for both build paths. split is
    None (and example None) for a tile that straddles blocks of two splits.
    Keys are tile ids (scene id + position): deterministic, no local paths.
    """
    for tile in _tiles_of(scene, opts, report, rows):
        chosen = splits_lib.assign_split(
            scene_id=str(tile["scene_id"]), tile_id=str(tile["tile_id"]),
            transform=tile["transform"], tile_size=cfg.tile_size,
            stride=cfg.effective_stride, block_tiles=cfg.block_tiles,
            mode=cfg.split_mode, fractions=cfg.split_fractions, seed=cfg.split_seed)
        if chosen is None:
            yield None, str(tile["tile_id"]), None
            continue
        example = {k: tile[k] for k in ("s2", "s1", "lulc", "dem")}
        if cfg.clouds:
            example.update({k: tile[k] for k in CLOUD_KEYS})
        example["tile_id"] = str(tile["tile_id"])
        example["scene_id"] = str(tile["scene_id"])
        example["crs"] = str(tile["crs"])
        example["transform"] = np.asarray(tile["transform"], np.float64)
        yield chosen, example["tile_id"], example


def build_report(cfg: RsMultisourceConfig, num_scenes: int, skipped_scenes, dropped_straddling: int,
                 ingest_summary: dict, inputs: Optional[dict] = None) -> dict:
    return {
        "config": _config_summary(cfg),
        **({"inputs": inputs} if inputs else {}),
        "num_scenes": int(num_scenes),
        "skipped_scenes": list(skipped_scenes),
        "dropped_straddling_tiles": int(dropped_straddling),
        "ingest": ingest_summary,
    }


def _raise_input_error_of_worker(err: Exception) -> None:
    """Re-raises a Beam worker's InputError (a bad scene) as the InputError it was.

    Runners report a failed element as their own exception whose text holds
    the worker's traceback; the user should get the one-line message that
    names the scene and says what to do, as without Beam."""
    match = re.search(r"InputError: (.*?)(?: \[while running '[^']*'\]|\Z)", str(err), re.DOTALL)
    if match:
        raise contract.InputError(match.group(1).strip()) from err


def _empty_split_error(cfg: RsMultisourceConfig, split: str, num_scenes: int) -> contract.InputError:
    return contract.InputError(
        f"rs_multisource/{cfg.name}: the {split} split got no tiles from {num_scenes} "
        f"scene(s). Add scenes, use a smaller block_tiles (now {cfg.block_tiles}) or "
        "tile_size, another split_seed, or split_mode='random'.")


CLOUD_KEYS = ("s2_cloudy", "cloud_mask", "cloud_cover")


def cloud_features(t: int) -> dict:
    """The features a `clouds` config adds (rsjax.data.contract)."""
    return {
        "s2_cloudy": tfds.features.Tensor(shape=(t, t, 4), dtype=np.uint16,
                                          doc="the cloudy S2 image, as s2; 0 = no data"),
        "cloud_mask": tfds.features.Tensor(shape=(t, t), dtype=np.uint8,
                                           doc="0 clear, 1 cloud, 2 cloud shadow; 255 = unknown"),
        "cloud_cover": tfds.features.Scalar(dtype=np.float32,
                                            doc="share of cloud pixels among those with a known "
                                                "mask; NaN when unknown"),
    }


def cover_counts(by_cover) -> dict:
    """{'0-10%': n, ..., 'unknown': n} from counts per contract.COVER_BINS (then unknown)."""
    labels = [f"{round(100 * lo)}-{round(100 * hi)}%" for lo, hi in contract.COVER_BINS]
    return {**dict(zip(labels, by_cover)), "unknown": by_cover[-1]}


def _validate(scene: contract.ScenePaths, opts):
    """ingest.validate_scene (returns the scene's grid), with an unreadable file turned
    into an error naming the scene."""
    try:
        return ingest.validate_scene(scene, opts)
    except rasterio.errors.RasterioError as e:
        raise contract.InputError(
            f"scene '{scene.scene_id}': a GeoTIFF cannot be opened ({e}). It is probably "
            "truncated or corrupt: export it again.") from e


def _tiles_of(scene: contract.ScenePaths, opts, report, rows: Optional[range] = None):
    """ingest.iter_scene_tiles, with a read failure turned into an error that names the scene."""
    try:
        yield from ingest.iter_scene_tiles(scene, opts, report, rows)
    except rasterio.errors.RasterioError as e:
        raise contract.InputError(
            f"scene '{scene.scene_id}': reading its GeoTIFFs failed mid-build ({e}). The file is "
            "probably truncated or corrupt: export it again. Nothing of this build was kept.") from e


def _config_summary(cfg: RsMultisourceConfig) -> dict:
    keys = ("tile_size", "stride", "max_nodata_fraction", "block_tiles", "split_mode",
            "split_fractions", "split_seed", "synthetic_scenes", "synthetic_size", "synthetic_seed",
            "target_crs", "target_resolution", "s2_offset", "lulc_map", "lulc_legend", "s1_units",
            "skip_incomplete_scenes", "allow_missing_lulc", "clouds")
    out = {k: getattr(cfg, k) for k in keys}
    out["split_fractions"] = list(out["split_fractions"])
    out["stride"] = cfg.effective_stride
    return out


def _report_summary(report) -> dict:
    """The ingestion report as JSON-able data."""
    if hasattr(report, "to_dict"):
        return report.to_dict()
    if dataclasses.is_dataclass(report):
        items = dataclasses.asdict(report)
    else:
        items = dict(getattr(report, "__dict__", {}))
    out = {}
    for k, v in items.items():
        if isinstance(v, (int, float, str, bool)) or v is None:
            out[k] = v
        elif isinstance(v, (list, tuple)):
            out[k] = [x if isinstance(x, (int, float, str, bool)) else str(x) for x in v][:100]
        elif isinstance(v, dict):
            out[k] = {str(a): (b if isinstance(b, (int, float, str, bool)) else str(b))
                      for a, b in list(v.items())[:100]}
        else:
            out[k] = str(v)
    return out


def discover_scenes(folder: epath.Path, skip_incomplete: bool = False,
                    report: Optional[dict] = None, require_lulc: bool = True,
                    clouds: bool = False) -> list[contract.ScenePaths]:
    """The manual_dir's scenes, by rsjax.data.contract.find_scenes (the one
    convention; scenes missing a source fail, or are skipped with
    skip_incomplete and listed in report['skipped_scenes']), with the manual
    download instructions added to its errors. A `scenes.txt` in the
    manual_dir lists scene prefixes instead, anywhere (gs://, s3://,
    https://; see rsjax.data.storage)."""
    scene_list = folder / SCENE_LIST_FILE
    try:
        return contract.find_scenes(scene_list if scene_list.exists() else folder,
                                    require_lulc=require_lulc, skip_incomplete=skip_incomplete,
                                    report=report, clouds=clouds)
    except contract.InputError as err:
        raise contract.InputError(f"manual_dir {err}\n{MANUAL_DOWNLOAD_INSTRUCTIONS}") from err
