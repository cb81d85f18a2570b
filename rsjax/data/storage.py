"""Scene files on local disk or in object storage: gs://, s3://, http(s)://.

GDAL (through rasterio) reads pixels from URLs itself (/vsigs/, /vsis3/,
/vsicurl/), fetching only the blocks a window needs; `gdal_options` turns off
its probing of sibling files. Folders are listed with etils.epath or fsspec,
or a scene source is a list file (`*.txt`, one scene prefix per line, each
entry checked by `list_entry`). Paths stay strings when they are URLs:
`pathlib.Path` would fold `//`.
docs/data.md (section 'Scene files in object storage') gives credentials,
extras and the list-file rules.
"""
from __future__ import annotations

import posixpath
import re
import urllib.parse
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

    These are for speed, not safety. A `/vsicurl?header_file=FILE&url=...` path
    makes GDAL send FILE's lines as HTTP headers (a local secret to any host);
    GDAL 3.10 (rasterio 1.4's wheel) has no setting that turns the `header_file`
    key off (it also reads use_head, cookie, proxy*, unsafessl, ... from such a
    path). So paths taken from list files are checked before GDAL sees them
    (`list_entry`: no `/vsi` paths, no query strings), and that check does not
    depend on CPL_VSIL_CURL_ALLOWED_EXTENSIONS, which happens to refuse such a
    path as well. GDAL_HTTP_HEADER_FILE, when the user sets it (credentials), is
    left alone: it is theirs, not a list's.
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
        found = _http_head(str(path))
        if found is not None:
            return found
        try:  # the server refused HEAD: fsspec's probe (it may GET)
            _fsspec(str(path)).info(str(path))
        except FileNotFoundError:
            return False
        return True
    try:
        return _epath(path).exists()
    except ImportError as err:
        raise _backend_error(path, err) from None


def _http_head(url: str, timeout: float = 30.0):
    """True/False from a HEAD request (2xx / 404 or 410), None when the server does
    not answer HEAD. By hand because fsspec's exists() follows a failed HEAD (a
    404 included) with a GET, which without a range asks for a whole file."""
    import urllib.error
    import urllib.request
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout):
            return True
    except urllib.error.HTTPError as err:
        if err.code in (404, 410):
            return False
        if err.code in (403, 405, 501):   # HEAD not allowed (e.g. some signed URLs)
            return None
        raise UserError(f"{url}: the server answered HEAD with HTTP {err.code} ({err.reason}). "
                        "Check the URL and that the files are readable.") from None


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
    paths: list[PathLike] = []
    for lineno, line in enumerate(read_text(source).splitlines(), start=1):
        entry = line.split("#", 1)[0].strip()
        if not entry:
            continue
        entry = str(list_entry(source, lineno, entry))
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


# ---------------------------------------------------------------- list entries
# A remote list (gs://, s3://, http(s)://) may be filled by someone else: its
# lines must not send requests to other hosts or read local files, so it names
# files on its own scheme and host (bucket) only, relative ones below its
# folder. A local list is the user's own file, given like a folder on the command
# line (the manual_dir's scenes.txt naming https:// exports, predict's lists of
# absolute paths): it may name local paths and URLs. No list hands GDAL a path
# with options: `/vsi...` lines and query strings are refused (see gdal_options).
# Signed URLs go with the other query strings: a prefix gets `_s2.tif` appended,
# which would land after the query, and a signature's keys cannot be told from
# GDAL's own (`/vsicurl?header_file=...`).
_LIST_ADVICE = ("A list names scene prefixes or files: paths relative to its folder, or URLs "
                "(a remote list: on its own host or bucket only); credentials come from GDAL's "
                "settings, never from a list.")


def list_entry(source: PathLike, lineno: int, entry: str) -> PathLike:
    """The path line `lineno` of list file `source` names (relative entries taken
    from the list's folder), or a UserError naming the list, the line and the fix."""
    problem = _gdal_problem(entry) or (_remote_problem(source, entry) if is_url(source) else None)
    if problem:
        raise UserError(f"{source}, line {lineno}: '{entry}' {problem}. {_LIST_ADVICE}")
    return as_path(entry) if is_url(entry) else join(parent(source), entry)


def _gdal_problem(entry: str):
    """Why any list refuses `entry` as a way to hand GDAL options, or None."""
    if entry.lower().startswith("/vsi"):
        return ("is a GDAL virtual path, whose options can make GDAL send local files "
                "as HTTP headers; write the plain URL (gs://, s3://, https://)")
    if "?" in entry:
        return "has a query string (signed URLs and GDAL options are not taken from lists)"
    if is_url(entry) and scheme(entry) not in URL_SCHEMES:
        return f"has the unsupported scheme '{scheme(entry)}://'; use gs://, s3:// or https://"
    return None


def _remote_problem(source: PathLike, entry: str):
    """Why a remote list refuses `entry` (another host, a local file, '..'), or None."""
    if not is_url(entry) and entry.startswith(("/", "\\", "~")):
        return "is a local path; a remote list names files beside it only"
    if ".." in entry.replace("\\", "/").split("/"):
        return "leaves the list's folder with '..'; write a path below that folder"
    if is_url(entry) and _origin(entry) != _origin(source):
        return (f"is not on the list's own {_origin(source)}; a remote list names files "
                "on its own host or bucket only (write another list there, or a local list)")
    return None


def _origin(url: PathLike) -> str:
    """'scheme://host[:port]' (the bucket for gs:// and s3://), lowercased."""
    parts = urllib.parse.urlsplit(str(url))
    return f"{parts.scheme}://{parts.netloc}".lower()
