"""The data contract shared by ingestion, the TFDS builder and the input pipeline.

One place for the names, units and no-data conventions of every source, so the
writer of a record and its reader cannot drift apart. Per tile, channels last:
s2 (H, W, 4) uint16 reflectance x 10000 (no data 0), s1 (H, W, 2) float32 dB
(NaN), lulc (H, W) uint8 Dynamic World labels (255), dem (H, W, 4) float32
elevation, slope, aspect, hillshade (NaN); tile_id, scene_id, crs, transform;
cloud-removal datasets add s2_cloudy, cloud_mask and cloud_cover.
docs/data.md (section 'The data contract') has the full table.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import re
from pathlib import Path
from typing import Iterable, Optional, Union

from rsjax.data import storage
from rsjax.errors import UserError

S2_BANDS = ("B2", "B3", "B4", "B8")          # blue, green, red, NIR
S1_BANDS = ("VV", "VH")
DEM_CHANNELS = ("elevation", "slope", "aspect", "hillshade")

# Dynamic World labels, in label order. 255 marks pixels without a label.
LULC_CLASSES = (
    "water", "trees", "grass", "flooded_vegetation", "crops",
    "shrub_and_scrub", "built", "bare", "snow_and_ice",
)
NUM_CLASSES = len(LULC_CLASSES)
LULC_NODATA = 255
S2_NODATA = 0
# Dynamic World's published palette (hex), used for every land-cover figure.
LULC_PALETTE = (
    "#419bdf", "#397d49", "#88b053", "#7a87c6", "#e49635",
    "#dfc35a", "#c4281b", "#a59b8f", "#b39fe1",
)

# Sources a model can be conditioned on, and the record features behind them:
# the paper's three ("all"), and the cloudy optical image of the cloud-removal
# datasets (RS-SPADE takes it as one more source with its own embedding).
SOURCES = ("lulc", "s1", "dem")
CLOUDY = "s2_cloudy"
MODEL_SOURCES = SOURCES + (CLOUDY,)

# Cloud/shadow mask codes (the synthetic writer's, and what a user's
# <scene>_cloudmask.tif must hold); 255 where the mask is unknown.
CLOUD_CLEAR, CLOUD, CLOUD_SHADOW = 0, 1, 2
CLOUD_MASK_CODES = (CLOUD_CLEAR, CLOUD, CLOUD_SHADOW)
CLOUD_MASK_UNKNOWN = 255
# SEN12MS-CR's cloud-cover bins of a tile (fractions): [low, high), the last one closed.
COVER_BINS = ((0.0, 0.1), (0.1, 0.5), (0.5, 0.9), (0.9, 1.0))


def cover_bin(cover: float) -> int:
    """Index of a tile's cloud cover in COVER_BINS, -1 when it is unknown (NaN).

    A stored share is float32: 90 cloud pixels of 100 read back as 0.89999998,
    so the share is rounded to 6 decimals first (shares of tiles of up to a
    million pixels stay apart). Where the pixel counts are at hand, use
    `cover_bin_of_counts`, which is exact."""
    if cover == cover:                      # not NaN
        cover = round(float(cover), 6)
    for i, (low, high) in enumerate(COVER_BINS):
        if low <= cover < high or (i == len(COVER_BINS) - 1 and cover == high):
            return i
    return -1


def cover_bin_of_counts(cloudy: int, known: int) -> int:
    """Index in COVER_BINS of `cloudy` cloud pixels among `known` ones, -1 when none is known.

    Exact: the bin edges are compared as integers (cloudy * 1000 against
    edge * 1000 * known), so 90 cloud pixels of 100 are in the 90-100 % bin."""
    cloudy, known = int(cloudy), int(known)
    if known <= 0:
        return -1
    for i, (low, high) in enumerate(COVER_BINS):
        lo, hi = round(low * 1000), round(high * 1000)
        last = i == len(COVER_BINS) - 1
        if lo * known <= cloudy * 1000 and (cloudy * 1000 < hi * known or (last and cloudy <= known)):
            return i
    return -1

# Flat cells (slope 0) have no aspect; GDAL's gdaldem writes -9999 there and so do we.
ASPECT_FLAT = -9999.0


class InputError(UserError):
    """A user-facing problem with an input file: the message names the file,
    what is wrong, and what to do about it."""


@dataclasses.dataclass(frozen=True)
class Mosaic:
    """One source exported in pieces, read as one raster.

    Earth Engine splits a large export into `<prefix>-RRRRRRRRRR-CCCCCCCCCC.tif`
    files, the ten-digit numbers being the piece's row and column offsets in
    the whole image. `find_scenes` groups the pieces of a source into a
    Mosaic; `rasterio_io.open_source` opens it as one raster (a VRT described
    in memory, so reads stay windowed: a window reads only the pieces under it).
    """

    pieces: tuple[Union[Path, str], ...]

    def __str__(self) -> str:
        first = self.pieces[0]
        name = storage.name(first)
        m = _SCENE_FILE.match(name)
        prefix = name[:m.start("row") - 1] if m and m["row"] else name.rsplit(".", 1)[0]
        return f"{storage.join(storage.parent(first), prefix)}-*.tif ({len(self.pieces)} pieces)"


# A source is one GeoTIFF (a local Path, or a URL string: gs://, s3://, http(s)://,
# see storage.py) or the pieces of a split export.
Source = Union[Path, str, Mosaic]


@dataclasses.dataclass(frozen=True)
class ScenePaths:
    """The four GeoTIFFs of one scene. `lulc` may be None for scenes without land cover.

    Each source is a path (pathlib.Path for local files, a string for URLs,
    which rasterio opens as they are), or a `Mosaic` of the pieces of a split
    export. `s2_cloudy` (a cloudy S2 image of the same area) and `cloud_mask`
    (its cloud/shadow mask, CLOUD_MASK_CODES) are there for cloud removal only.
    """

    scene_id: str
    s2: Source
    s1: Source
    dem: Source
    lulc: Optional[Source] = None
    s2_cloudy: Optional[Source] = None
    cloud_mask: Optional[Source] = None

    def as_dict(self) -> dict:
        """The sources the scene has, by name (None ones left out)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name != "scene_id" and getattr(self, f.name) is not None}


def _file_key(path) -> tuple[str, int]:
    """(file name, size in bytes; -1 where the size is not cheap to know: remote files)."""
    text = os.fspath(path) if not isinstance(path, str) else path
    if storage.is_url(text):
        return storage.name(text), -1
    try:
        return storage.name(text), os.path.getsize(text)
    except OSError:
        return storage.name(text), -1


def inputs_fingerprint(scenes: Iterable[ScenePaths]) -> str:
    """A short digest of which files a dataset is built from: every scene's
    source files by name and size. The same exports copied elsewhere give the
    same digest; another set of files (added, removed, replaced) another one,
    so a dataset built from other files is never taken for this folder's."""
    import hashlib

    keys = []
    for scene in scenes:
        for source, path in sorted(scene.as_dict().items()):
            pieces = path.pieces if isinstance(path, Mosaic) else (path,)
            keys += [(scene.scene_id, source, *_file_key(piece)) for piece in pieces]
    return hashlib.sha256(repr(sorted(keys)).encode()).hexdigest()[:16]


def scene_to_record(scene: ScenePaths) -> tuple:
    """A scene as plain data, (scene_id, ((source, path or (piece, ...) or None), ...)),
    to hand to other processes (Beam would turn the dataclass into a schema row)."""
    def plain(source):
        if source is None:
            return None
        if isinstance(source, Mosaic):
            return tuple(str(p) for p in source.pieces)
        return str(source)
    return scene.scene_id, tuple((k, plain(v)) for k, v in sorted(scene.as_dict().items()))


def scene_from_record(record: tuple) -> ScenePaths:
    """The inverse of `scene_to_record`."""
    scene_id, paths = record

    def source(value):
        if isinstance(value, tuple):
            return Mosaic(tuple(storage.as_path(p) for p in value))
        return None if value is None else storage.as_path(value)
    # Every field named, so a scene without a required source (a prediction
    # scene has no S2) comes back as it went, with None there.
    fields = {f.name: None for f in dataclasses.fields(ScenePaths) if f.name != "scene_id"}
    fields.update({k: source(v) for k, v in paths})
    return ScenePaths(scene_id=scene_id, **fields)


def as_source(source) -> Optional[Source]:
    """A path-like as a Path, a Mosaic as it is, None as None."""
    if source is None or isinstance(source, Mosaic):
        return source
    return storage.as_path(source)


# Folder naming convention: <scene_id>_<source>.tif with source in s2, s1, lulc, dem,
# and for cloud removal s2_cloudy and cloudmask (".tiff" accepted too); a source
# split by Earth Engine comes as <scene_id>_<source>-RRRRRRRRRR-CCCCCCCCCC.tif pieces.
_SCENE_FILE = re.compile(
    r"^(?P<scene>.+)_(?P<source>s2_cloudy|cloudmask|s2|s1|lulc|dem)"
    r"(?:-(?P<row>\d{10})-(?P<col>\d{10}))?\.tiff?$",
    re.IGNORECASE)


def split_offsets(name: str) -> Optional[tuple[int, int]]:
    """(row, column) offsets from a split export piece's file name, None for a whole file."""
    m = _SCENE_FILE.match(name)
    return (int(m["row"]), int(m["col"])) if m and m["row"] else None


def group_scene_files(paths: Iterable, folder) -> dict[str, dict[str, Source]]:
    """{scene_id: {source: Path or Mosaic}} for the scene files among `paths` (others ignored).

    Raises InputError when a source comes both as a whole file and in pieces.
    """
    found: dict[str, dict[str, list]] = {}
    for path in sorted(paths, key=storage.name):
        m = _SCENE_FILE.match(storage.name(path))
        if m:
            found.setdefault(m["scene"], {}).setdefault(m["source"].lower(), []).append(
                storage.as_path(path) if isinstance(path, str) else path)
    scenes: dict[str, dict[str, Source]] = {}
    for scene_id, sources in found.items():
        scenes[scene_id] = {}
        for source, files in sources.items():
            whole = [f for f in files if split_offsets(storage.name(f)) is None]
            if len(whole) > 1:
                raise InputError(f"scene '{scene_id}' in {folder}: {source} comes as "
                                 f"{' and '.join(storage.name(f) for f in whole)}. Keep one of them.")
            if whole and len(files) > 1:
                raise InputError(
                    f"scene '{scene_id}' in {folder}: {source} comes both as {storage.name(whole[0])} and as "
                    f"{len(files) - len(whole)} split export piece(s) ({', '.join(storage.name(f) for f in files if f not in whole)}). "
                    "Keep either the whole file or the pieces.")
            scenes[scene_id][source] = whole[0] if whole else Mosaic(tuple(files))
    return scenes


def find_scenes(folder: str | os.PathLike, require_lulc: bool = True, skip_incomplete: bool = False,
                report: Optional[dict] = None, clouds: bool = False) -> list[ScenePaths]:
    """Groups `<scene_id>_{s2,s1,lulc,dem}.tif` files of a folder into scenes.

    With `clouds` (cloud removal), every scene needs `<scene_id>_s2_cloudy.tif`
    too, and takes `<scene_id>_cloudmask.tif` when there is one; without, those
    files are ignored.

    The pieces of a split Earth Engine export (`<scene_id>_s2-0000000000-0000000000.tif`,
    ...) become one `Mosaic` source. `folder` may be local, gs://, s3:// or
    http(s)://, or a `.txt` list of scene prefixes (see rsjax.data.storage);
    an etils epath folder (TFDS's manual_dir, its test sandbox) is listed
    through epath and its paths come back as epath Paths. A scene missing a
    source (land cover only when `require_lulc`) is
    an InputError naming every such scene and what it misses, so a build never
    starts on half a scene; with `skip_incomplete` it is skipped instead,
    logged and listed in `report["skipped_scenes"]` (if a report is given).
    When the incomplete scenes together hold every source, the ids most likely
    differ between sources, and the message says so.
    """
    from etils import epath

    if isinstance(folder, epath.Path) and not storage.is_list_file(folder):
        if not folder.is_dir():
            raise InputError(f"{folder}: not a folder. Point to the folder holding <scene>_s2.tif, "
                             "<scene>_s1.tif, <scene>_lulc.tif and <scene>_dem.tif files.")
        paths = [type(folder)(p) for p in folder.iterdir()]
    else:
        if not storage.is_list_file(folder) and not storage.is_dir(folder):
            raise InputError(f"{folder}: not a folder. Point to the folder holding <scene>_s2.tif, "
                             "<scene>_s1.tif, <scene>_lulc.tif and <scene>_dem.tif files, or to a "
                             ".txt file listing scene prefixes.")
        paths = storage.scene_paths(folder)
    found = group_scene_files(paths, folder)
    if not found:
        raise InputError(f"{folder}: no scene files found. Expected names like "
                         "<scene>_s2.tif, <scene>_s1.tif, <scene>_lulc.tif, <scene>_dem.tif.")
    needed = ("s2", "s1", "dem") + (("lulc",) if require_lulc else ()) + ((CLOUDY,) if clouds else ())
    scenes, incomplete = [], {}
    for scene_id, files in sorted(found.items()):
        if not clouds:
            files = {k: v for k, v in files.items() if k not in (CLOUDY, "cloudmask")}
            if not files:
                continue
        missing = [s for s in needed if s not in files]
        if missing:
            incomplete[scene_id] = (sorted(files), missing)
        else:
            scenes.append(ScenePaths(scene_id=scene_id, s2=files["s2"], s1=files["s1"],
                                     dem=files["dem"], lulc=files.get("lulc"),
                                     s2_cloudy=files.get(CLOUDY), cloud_mask=files.get("cloudmask")))
    if incomplete and not skip_incomplete:
        lines = [f"  scene '{sid}': has {', '.join(have)}; missing {', '.join(miss)}"
                 for sid, (have, miss) in incomplete.items()]
        hint = ""
        held = {s for have, _ in incomplete.values() for s in have}
        if len(incomplete) > 1 and set(needed) <= held:
            hint = ("\nThe incomplete scenes together hold every source: the scene ids probably "
                    "differ between sources. Rename the files so that the sources of a scene "
                    "share one <scene_id> prefix.")
        raise InputError(
            f"{folder}: {len(incomplete)} scene(s) miss a source:\n" + "\n".join(lines) + hint +
            "\nAdd the missing files, or remove the scene's other files; `rsjax build "
            "--skip_incomplete_scenes` skips such scenes" + ("" if not require_lulc else
            ", and --allow_missing_lulc (rsjax ingest and rsjax build) accepts scenes without "
            "land cover") + ".")
    for sid, (_, miss) in incomplete.items():
        logging.getLogger("rsjax").warning("Skipping scene '%s': missing %s", sid, ", ".join(miss))
        if report is not None:
            report.setdefault("skipped_scenes", []).append({"scene_id": sid, "missing": miss})
    if not scenes:
        raise InputError(f"{folder}: no complete scene (every scene misses a source).")
    return scenes
