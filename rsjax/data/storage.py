"""Scene files on local disk or in object storage: gs://, s3://, http(s)://.

Pixels are read by GDAL (through rasterio), which opens URLs itself:
`gs://b/k` through /vsigs/, `s3://b/k` through /vsis3/, `https://h/p` through
/vsicurl/. A windowed read of a tiled GeoTIFF (a COG, as `rsjax export_ee`
writes) fetches only the byte ranges of the blocks it needs, never the whole
file; `gdal_options` turns off GDAL's probing of sibling files, which over
HTTP would be one request each. Credentials are GDAL's: for gs://, e.g.
`GOOGLE_APPLICATION_CREDENTIALS` or `gcloud auth application-default login`;
for s3://, `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY` or `~/.aws`.

Folders are listed with etils.epath (local paths, gs:// and s3://; the `gcs`
/ `s3` extras bring its backends) or fsspec (http(s):// folders whose server
answers with an HTML index, with the `remote` extra). Object stores served
over https rarely list folders, so a scene source may instead be a list
file: a text file (`*.txt`, local or remote) with one scene prefix per line,
`<prefix>_s2.tif` etc. being that scene's files (a line may also name one
file; blank lines and `#` comments are skipped; relative prefixes are taken
from the list file's folder).

Paths stay strings when they are URLs: `pathlib.Path` would fold `//`.
"""
from __future__ import annotations

import posixpath
import re
from pathlib import Path
from typing import Union

from rsjax.errors import UserError

PathLike = Union[str, Path]
URL_SCHEMES = ("gs", "s3", "http", "https")
_URL = re.compile(r"^(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*)://")
# The sources of a scene, as the files' suffixes name them (<scene>_s2.tif, ...).
SOURCES = ("s2", "s1", "lulc", "dem")
CLOUD_SOURCES = ("s2_cloudy", "cloudmask")     # cloud removal's files, taken when they exist


def scheme(path: PathLike) -> str:
    """'gs', 's3', 'http', 'https', or '' for a local path."""
    m = _URL.match(str(path))
    return m["scheme"].lower() if m else ""


def is_url(path: PathLike) -> bool:
    return scheme(path) != ""


def as_path(path: PathLike) -> PathLike:
    """A local path as pathlib.Path, a URL unchanged (as a string)."""
    if is_url(path):
        if scheme(path) not in URL_SCHEMES:
            raise UserError(f"{path}: unsupported scheme '{scheme(path)}://'; use a local path, "
                            "gs://, s3://, http:// or https://.")
        return str(path)
    return Path(path)


def gdal_path(path: PathLike) -> str:
    """The name GDAL itself opens a path or URL by (/vsigs/, /vsis3/, /vsicurl/), for
    places where rasterio does not translate it, such as a VRT's source files."""
    s, text = scheme(path), str(path)
    if s == "gs":
        return "/vsigs/" + text[len("gs://"):]
    if s == "s3":
        return "/vsis3/" + text[len("s3://"):]
    if s in ("http", "https"):
        return "/vsicurl/" + text
    return text


def name(path: PathLike) -> str:
    """The last component of a path or URL."""
    return posixpath.basename(str(path).rstrip("/")) if is_url(path) else Path(path).name


def join(folder: PathLike, child: str) -> PathLike:
    if is_url(folder):
        return str(folder).rstrip("/") + "/" + child
    return Path(folder) / child


def parent(path: PathLike) -> PathLike:
    if is_url(path):
        return str(path).rstrip("/").rsplit("/", 1)[0]
    return Path(path).parent


def gdal_options() -> dict:
    """GDAL settings for reading scenes, local or remote (rasterio.Env keywords).

    GDAL_DISABLE_READDIR_ON_OPEN: do not list the folder or probe for .aux.xml,
    .ovr and similar sidecars on open (each one is a request on object storage);
    CPL_VSIL_CURL_ALLOWED_EXTENSIONS: only GeoTIFFs are fetched over HTTP;
    GDAL_HTTP_MERGE_CONSECUTIVE_RANGES: neighbouring blocks in one request.
    """
    return {
        "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR",
        "CPL_VSIL_CURL_ALLOWED_EXTENSIONS": ".tif,.tiff,.TIF,.TIFF",
        "GDAL_HTTP_MERGE_CONSECUTIVE_RANGES": "YES",
    }


# ---------------------------------------------------------------- listing
def _fsspec(path: str):
    import fsspec  # noqa: PLC0415

    try:
        return fsspec.filesystem(scheme(path))
    except ImportError as err:
        raise UserError(
            f"{path}: listing or reading {scheme(path)}:// needs fsspec's {scheme(path)} "
            f"backend ({err}); install `pip install rsjax[remote]`, or give a list file of "
            "scene prefixes instead of a folder.") from None


def _epath(path: PathLike):
    from etils import epath  # noqa: PLC0415

    return epath.Path(str(path))


def is_dir(path: PathLike) -> bool:
    s = scheme(path)
    if s in ("http", "https"):
        # HTTP has no folders to ask about: a URL that names no file is taken as one.
        return not name(path).lower().endswith((".tif", ".tiff", ".txt"))
    try:
        return _epath(path).is_dir()
    except ImportError as err:
        raise _backend_error(path, err) from None


def exists(path: PathLike) -> bool:
    s = scheme(path)
    if s in ("http", "https"):
        # A HEAD request (fsspec's exists() would start a GET of the whole file).
        try:
            _fsspec(str(path)).info(str(path))
        except FileNotFoundError:
            return False
        return True
    try:
        return _epath(path).exists()
    except ImportError as err:
        raise _backend_error(path, err) from None


def list_folder(folder: PathLike) -> list[PathLike]:
    """The entries of a folder (full paths, sorted)."""
    s = scheme(folder)
    if s in ("http", "https"):
        url = str(folder).rstrip("/") + "/"
        try:
            entries = _fsspec(url).ls(url, detail=False)
        except FileNotFoundError:
            raise UserError(f"{url}: not found (HTTP 404).") from None
        return sorted({e.rstrip("/") for e in entries if e.rstrip("/") != url.rstrip("/")})
    if not s:
        return sorted(Path(folder).iterdir())
    try:
        return sorted(str(p) for p in _epath(folder).iterdir())
    except ImportError as err:
        raise _backend_error(folder, err) from None


def read_text(path: PathLike) -> str:
    s = scheme(path)
    if s in ("http", "https"):
        with _fsspec(str(path)).open(str(path), "rt") as f:
            return f.read()
    try:
        return _epath(path).read_text()
    except ImportError as err:
        raise _backend_error(path, err) from None


def _backend_error(path: PathLike, err: Exception) -> UserError:
    extra = {"gs": "gcs", "s3": "s3"}.get(scheme(path), "remote")
    return UserError(f"{path}: reading {scheme(path)}:// paths needs a backend that is not "
                     f"installed ({err}): pip install rsjax[{extra}].")


# ---------------------------------------------------------------- scenes
def is_list_file(source: PathLike) -> bool:
    return name(source).lower().endswith(".txt")


def scene_paths(source: PathLike) -> list[PathLike]:
    """The files a folder or a list file names, for contract.group_scene_files to pair.

    A folder gives all its entries. A list file gives the files it names, and
    for each scene prefix the prefix's `_s2.tif`, `_s1.tif`, `_lulc.tif` and
    `_dem.tif` that exist, and `_s2_cloudy.tif`, `_cloudmask.tif` (cloud
    removal) when they do (the pieces of a split export must be listed one
    by one); missing ones are for the caller to report.
    """
    if not is_list_file(source):
        return list_folder(source)
    base = parent(source)
    paths: list[PathLike] = []
    for line in read_text(source).splitlines():
        entry = line.split("#", 1)[0].strip()
        if not entry:
            continue
        if not is_url(entry) and not Path(entry).is_absolute():
            entry = str(join(base, entry))
        if entry.lower().endswith((".tif", ".tiff")):
            paths.append(as_path(entry))
            continue
        found = [as_path(f"{entry}_{role}.tif") for role in SOURCES]
        found = [p for p in found if exists(p)]
        if not found:
            raise UserError(f"{source}: scene prefix {entry} has none of the files "
                            f"{entry}_{{s2,s1,lulc,dem}}.tif. Check the prefix and the storage.")
        paths.extend(found)
        paths.extend(p for p in (as_path(f"{entry}_{role}.tif") for role in CLOUD_SOURCES)
                     if exists(p))
    return paths
