"""The data contract shared by ingestion, the TFDS builder and the input pipeline.

One place for the names, units and no-data conventions of every source, so the
writer of a record and its reader cannot drift apart. See DESIGN.md / README.

Stored per tile (physical units, channels last):

| feature   | shape      | dtype   | no data                                      |
|-----------|------------|---------|----------------------------------------------|
| s2        | (H, W, 4)  | uint16  | 0 in every band (reflectance x 10000, B G R NIR) |
| s1        | (H, W, 2)  | float32 | NaN (backscatter in dB, VV VH)               |
| lulc      | (H, W)     | uint8   | 255 (Dynamic World labels 0..8)              |
| dem       | (H, W, 4)  | float32 | NaN (elevation m, slope deg, aspect deg, hillshade 0..255) |
| tile_id, scene_id | () | string |                                              |
| crs       | ()         | string  | WKT or "EPSG:n"                              |
| transform | (6,)       | float64 | affine a, b, c, d, e, f (rasterio order)     |
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

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

# Sources a model can be conditioned on, and the record features behind them.
SOURCES = ("lulc", "s1", "dem")

# Flat cells (slope 0) have no aspect; GDAL's gdaldem writes -9999 there and so do we.
ASPECT_FLAT = -9999.0


class InputError(UserError):
    """A user-facing problem with an input file: the message names the file,
    what is wrong, and what to do about it."""


@dataclasses.dataclass(frozen=True)
class ScenePaths:
    """The four GeoTIFFs of one scene. `lulc` may be None for scenes without land cover.

    Paths are pathlib.Path for local files and strings for URLs (gs://, s3://,
    http(s)://; see rsjax.data.storage), which rasterio opens as they are."""

    scene_id: str
    s2: Path | str
    s1: Path | str
    dem: Path | str
    lulc: Optional[Path | str] = None

    def as_dict(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "scene_id"}


# Folder naming convention (in storage.py, which lists folders local and remote).
_SCENE_FILE = storage.SCENE_FILE


def find_scenes(folder: str | Path, require_lulc: bool = True) -> list[ScenePaths]:
    """Groups `<scene_id>_{s2,s1,lulc,dem}.tif` files of a folder into scenes.

    `folder` may be local, gs://, s3:// or http(s)://, or a list file of
    scene prefixes (see rsjax.data.storage). Raises InputError naming the
    scene and the missing source when a scene is incomplete, so that a build
    never starts on half a scene.
    """
    if not storage.is_list_file(folder) and not storage.is_dir(folder):
        raise InputError(f"{folder}: not a folder. Point to the folder holding <scene>_s2.tif, "
                         "<scene>_s1.tif, <scene>_lulc.tif and <scene>_dem.tif files, or to a "
                         ".txt file listing scene prefixes.")
    found = storage.scene_files(folder)
    if not found:
        raise InputError(f"{folder}: no scene files found. Expected names like "
                         "<scene>_s2.tif, <scene>_s1.tif, <scene>_lulc.tif, <scene>_dem.tif.")
    scenes = []
    needed = ("s2", "s1", "dem") + (("lulc",) if require_lulc else ())
    for scene_id, files in sorted(found.items()):
        missing = [s for s in needed if s not in files]
        if missing:
            raise InputError(
                f"scene '{scene_id}' in {folder}: missing source(s) {', '.join(missing)} "
                f"(have {', '.join(sorted(files))}). Add {', '.join(f'{scene_id}_{m}.tif' for m in missing)} "
                "or remove the scene's other files.")
        scenes.append(ScenePaths(scene_id=scene_id, s2=files["s2"], s1=files["s1"],
                                 dem=files["dem"], lulc=files.get("lulc")))
    return scenes
