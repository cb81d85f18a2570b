"""Input files are data, never instructions: what rsjax lets GDAL do with a file it is given.

Every source file is opened by `open_input`: GTiff driver only (unless
`any_format=True`, i.e. `IngestOptions.allow_any_format`), GDAL's sidecar
machinery off (`SIDECARS_OFF`, also for every read), and refused when the
file or a sidecar beside it would point GDAL elsewhere (`sidecar_problem`).
Where GDAL reopens a checked file by name (an exact warp, a split export's
mosaic) it is given `reopen_name`'s name, which opens GeoTIFF only.
docs/data.md (sections 'Untrusted input files' and, under 'Ingestion', item
'Files as data') says what a file could otherwise make GDAL do.
"""
from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import Path

import rasterio
import rasterio.errors

from rsjax.data.contract import InputError

# GDAL settings under which a GeoTIFF is read alone: no PAM (.aux.xml) files,
# and no directory listing on open, so GDAL finds no .ovr/.msk/.aux sidecar.
SIDECARS_OFF = {"GDAL_PAM_ENABLED": "NO", "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR"}

_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")   # classic TIFF and BigTIFF, both byte orders
_REMOTE = re.compile(r"^([a-z][a-z0-9+.-]*://|/vsi)", re.IGNORECASE)

_ADVICE = ("rsjax reads source files as plain GeoTIFFs only, because other formats and sidecar "
           "files can make GDAL read other local files or URLs")


def is_remote(path: str | Path) -> bool:
    """True for URLs and GDAL virtual paths (gs://, s3://, https://, /vsicurl/...): named on purpose."""
    return bool(_REMOTE.match(str(path)))


def _head(path: Path, size: int = 512) -> bytes:
    with path.open("rb") as f:
        return f.read(size)


def describe_format(path: Path) -> str:
    """A short name for what a local file holds, from its first bytes (never opened by GDAL)."""
    try:
        head = _head(path)
    except OSError:
        return "unreadable"
    if head[:4] in _TIFF_MAGIC:
        return "TIFF"
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n")
    if text.startswith(b"<VRTDataset"):
        return "a GDAL VRT (an XML file that makes GDAL read other files or URLs)"
    if text.startswith(b"<"):
        return "an XML file"
    return "unknown"


def _aux_xml_problem(sidecar: Path) -> str | None:
    """Why a PAM sidecar is refused, or None when it only holds statistics and metadata (ignored)."""
    try:
        root = ET.fromstring(sidecar.read_bytes())
    except (ET.ParseError, OSError) as err:
        return f"cannot be read as XML ({err}), so what it makes GDAL do cannot be checked"
    for el in root.iter():
        if el.tag == "Metadata" and (el.get("domain") or "").upper() == "OVERVIEWS":
            return "names an external overview file (metadata domain OVERVIEWS)"
        if el.tag == "SourceFilename" or (el.text and is_remote(el.text.strip())):
            return f"names another file or URL ({(el.text or '').strip()[:200]})"
    return None


def sidecar_problem(path: Path) -> str | None:
    """A message when a sidecar beside `path` would point GDAL elsewhere or change the pixels' meaning.

    - `.ovr` / `.aux` external overviews: refused unless they are TIFFs (GDAL
      writes them as TIFF; anything else, e.g. a VRT, would be read instead of
      the file on a decimated read). TIFF ones are ignored (never read).
    - `.msk` external masks: refused, since rsjax does not read them and the
      pixels they mark as missing would silently count as data.
    - `.aux.xml`: refused when it names another file or URL; one with only
      statistics or metadata (e.g. written by QGIS) is ignored.
    """
    candidates = {Path(f"{path}{ext}") for ext in (".ovr", ".OVR", ".aux", ".msk", ".MSK", ".aux.xml")}
    candidates.add(path.with_suffix(".aux"))
    for sidecar in sorted(c for c in candidates if c.is_file()):
        name = sidecar.name.lower()
        if name.endswith(".msk"):
            return (f"{sidecar}: an external mask beside {path.name}; rsjax does not read external masks, "
                    "so the pixels it marks as missing would count as data. Set a no-data value in the "
                    "GeoTIFF instead (e.g. gdal_translate -a_nodata), then remove the .msk file.")
        if name.endswith(".aux.xml"):
            why = _aux_xml_problem(sidecar)
            if why:
                return (f"{sidecar}: a sidecar of {path.name} that {why}; {_ADVICE}. Remove the sidecar "
                        "(rsjax does not use it).")
            continue
        kind = describe_format(sidecar)
        if kind != "TIFF":
            kind = "not a TIFF" if kind in ("unknown", "unreadable") else f"{kind}, not a TIFF"
            return (f"{sidecar}: external overviews of {path.name} that are {kind}; {_ADVICE}. "
                    "Remove the file (rsjax does not use overviews).")
    return None


def check_opened(ds: rasterio.DatasetReader, path) -> None:
    """Refuses a GeoTIFF whose own metadata names an external overview file (opened on a decimated read)."""
    if ds.tags(ns="OVERVIEWS"):
        raise InputError(
            f"{path}: its metadata names an external overview file "
            f"({_short(ds.tags(ns='OVERVIEWS'))}), which GDAL would open instead of the file's own "
            f"pixels; {_ADVICE}. Write the GeoTIFF again without that metadata (gdal_translate).")


def _file_kind(path: Path) -> str:
    """'a folder', 'a FIFO (named pipe)', ... for a path that is not a regular file."""
    import stat

    mode = path.stat().st_mode
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a plain file"


def _short(items: dict) -> str:
    return ", ".join(f"{k}={str(v)[:120]}" for k, v in items.items())


def reopen_name(ds: rasterio.DatasetReader, name: str) -> str:
    """The name under which a VRT that rsjax builds makes GDAL reopen `ds`'s file (`name`).

    For a GeoTIFF it is prefixed with `GTIFF_RAW:`, which GDAL opens with the GTiff
    driver only: a file swapped for a VRT after `open_input` checked it cannot be
    reopened as that VRT. The prefix changes nothing else but GDAL's colour
    conversion of CMYK and YCbCr files; those (`SOURCE_COLOR_SPACE`) keep their
    bare name, so that they read the same through a VRT as directly.
    """
    if ds.driver == "GTiff" and "SOURCE_COLOR_SPACE" not in ds.tags(ns="IMAGE_STRUCTURE"):
        return "GTIFF_RAW:" + name
    return name


def open_input(path: str | Path, what: str, any_format: bool = False) -> rasterio.DatasetReader:
    """Opens a source raster as data only (see the module docstring); the caller closes it.

    `what` names the file's role in messages ("Sentinel-1 SAR (VV, VH)").
    Raises InputError naming the file when it does not exist, is not a
    GeoTIFF (unless `any_format`), points GDAL at other files, or cannot be
    opened.
    """
    remote = is_remote(path)
    name = str(path)
    local = None if remote else Path(path)
    if local is not None and local.exists() and not local.is_file():
        # A FIFO or device would block GDAL's open forever (nothing writes to it), and
        # a folder is no raster: only regular files (or links to them) are opened.
        raise InputError(
            f"{local}: is not a regular file ({_file_kind(local)}), so it is not opened. Point "
            f"rsjax at the {what} GeoTIFF itself (a copy or a link to a file).")
    if local is not None and not any_format:
        # Checked before GDAL sees the file: a VRT is refused without being opened.
        if local.is_file():
            kind = describe_format(local)
            if kind in ("unknown", "unreadable"):
                raise InputError(
                    f"{local}: cannot be opened as a GeoTIFF: it does not start with a TIFF header. "
                    f"The file is probably truncated, corrupt or in another format: export or copy "
                    f"the {what} GeoTIFF again.")
            if kind != "TIFF":
                raise InputError(
                    f"{local}: is {kind}, not a GeoTIFF; {_ADVICE}. Export the {what} as a GeoTIFF "
                    "(e.g. gdal_translate -of GTiff), or, for a file you made yourself, allow other "
                    "formats explicitly (allow_any_format).")
            problem = sidecar_problem(local)
            if problem:
                raise InputError(problem)
    try:
        with rasterio.Env(**({} if any_format else SIDECARS_OFF)):
            ds = rasterio.open(local if local is not None else name,
                               driver=None if any_format else "GTiff")
    except rasterio.errors.RasterioError as err:
        if any(text in str(err) for text in ("No such file", "does not exist", "response code: 404",
                                             "HTTP error code: 404")) or (
                local is not None and not local.exists()):
            raise InputError(f"{name}: {what} file does not exist. Check the path or the scene "
                             "folder.") from err
        raise InputError(
            f"{name}: cannot be opened as a GeoTIFF ({err}). The file is probably truncated or "
            f"corrupt: export or copy the {what} GeoTIFF again.") from err
    if not any_format:
        try:
            check_opened(ds, name)
        except BaseException:
            ds.close()
            raise
    return ds
