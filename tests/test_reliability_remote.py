"""Reliability (issue 28): list files of scenes are data, and the compile cache
is never a folder of the current directory.

A `scenes.txt` may come from a web server or a bucket someone else fills. Its
lines must not point rsjax at other hosts, at local files, or at GDAL paths
with options: `/vsicurl?header_file=FILE&url=...` makes GDAL send FILE's
lines as HTTP headers. Lists are served by the range-answering server of
tests/test_remote_inputs.py, which here also records every request's headers.
"""
from __future__ import annotations

import functools
import http.server
import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from rsjax.data import contract, ingest, storage, synthetic
from test_remote_inputs import RangeHandler

pytest.importorskip("aiohttp")        # fsspec's HTTP backend: remote lists are read with it

SECRET = "X-Rsjax-Secret: not-for-the-network"


class _Server:
    """A RangeHandler server on 127.0.0.1 serving `root`, keeping every request's headers."""

    def __init__(self, root: Path):
        self.seen: list[tuple[str, dict]] = []
        seen = self.seen

        class Handler(RangeHandler):
            requests: list = []

            def parse_request(self):
                ok = super().parse_request()
                if ok:
                    seen.append((self.path, dict(self.headers)))
                return ok

        self.httpd = http.server.ThreadingHTTPServer(
            ("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def two_hosts(tmp_path_factory):
    """One small scene served by the lists' own host, and a second ("foreign") host
    serving the same files; a local file holding a header line."""
    root = tmp_path_factory.mktemp("listed")
    scene = synthetic.write_scenes(root, num_scenes=1, size=64, seed=5, sar_db=True)[0]
    secret = tmp_path_factory.mktemp("private") / "headers.txt"
    secret.write_text(SECRET + "\n")
    home, foreign = _Server(root), _Server(root)
    try:
        yield root, scene.scene_id, home, foreign, secret
    finally:
        home.close()
        foreign.close()


def _serve_list(root: Path, name: str, lines: list[str]) -> str:
    (root / name).write_text("# scenes\n" + "".join(line + "\n" for line in lines))
    return name


def _sent_secret(server: _Server) -> bool:
    return any(SECRET.split(":")[0].lower() in (k.lower() for k in headers)
               for _, headers in server.seen)


def test_a_remote_list_names_files_on_its_own_host(two_hosts):
    root, sid, home, foreign, _ = two_hosts
    for entry in (sid, f"{home.url}{sid}"):            # relative, or a URL on the list's host
        good = _serve_list(root, "good.txt", [entry])
        assert [str(s.s2) for s in contract.find_scenes(home.url + good)] == [
            f"{home.url}{sid}_s2.tif"]
    foreign.seen.clear()
    bad = _serve_list(root, "foreign.txt", [f"{foreign.url}{sid}"])
    with pytest.raises(storage.UserError, match=r"foreign\.txt, line 2: .* not on the list's own"):
        contract.find_scenes(home.url + bad)
    assert foreign.seen == []          # not even a HEAD to see whether the files exist


@pytest.mark.parametrize("line, why", [
    ("{root}/{sid}", "is a local path"),
    ("/vsicurl/{url}{sid}_s2.tif", "GDAL virtual path"),
    ("/vsicurl?header_file={secret}&url={url}{sid}_s2.tif", "GDAL virtual path"),
    ("{url}{sid}_s2.tif?header_file={secret}", "query string"),
    ("../{sid}", "'..'"),
    ("https://{host}/{sid}", "not on the list's own"),       # another scheme, same host
])
def test_a_remote_list_refuses_local_files_gdal_paths_and_queries(two_hosts, line, why):
    root, sid, home, _, secret = two_hosts
    entry = line.format(root=root, sid=sid, url=home.url, secret=secret,
                        host=home.url.split("//")[1].rstrip("/"))
    listing = _serve_list(root, "bad.txt", [entry])
    home.seen.clear()
    with pytest.raises(storage.UserError, match=rf"bad\.txt, line 2: .*{why}"):
        contract.find_scenes(home.url + listing)
    assert not _sent_secret(home)


def test_header_file_is_refused_whatever_gdals_extension_setting(two_hosts, tmp_path, monkeypatch):
    """CPL_VSIL_CURL_ALLOWED_EXTENSIONS (for speed) happens to stop GDAL opening a
    /vsicurl? path; without it GDAL would send the file's lines as headers. The
    list check must hold on its own."""
    root, sid, home, _, secret = two_hosts
    fast = storage.gdal_options()
    monkeypatch.setattr(storage, "gdal_options", lambda: {
        k: v for k, v in fast.items() if k != "CPL_VSIL_CURL_ALLOWED_EXTENSIONS"})
    listing = tmp_path / "scenes.txt"                  # a local list, naming the server's files
    listing.write_text("".join(f"/vsicurl?header_file={secret}&url={home.url}{sid}_{role}.tif\n"
                               for role in ("s2", "s1", "lulc", "dem")))
    home.seen.clear()
    refused = None
    try:
        scenes = contract.find_scenes(listing)
        list(ingest.iter_scene_tiles(scenes[0], ingest.IngestOptions(tile_size=32),
                                     ingest.IngestReport()))
    except storage.UserError as err:
        refused = str(err)
    assert not _sent_secret(home), "GDAL sent the local file's lines as HTTP headers"
    assert refused and re.search(r"scenes\.txt, line 1: .*GDAL virtual path", refused), refused


def test_a_local_list_is_yours_but_hands_gdal_no_options(two_hosts, tmp_path):
    """A local list is given like a folder (the manual_dir's scenes.txt naming
    https:// exports, predict's lists of absolute paths); what it may not do is
    pass GDAL a virtual path or a query string."""
    root, sid, home, _, secret = two_hosts
    listing = root / "local.txt"
    for entry, s2 in ((sid, root / f"{sid}_s2.tif"), (str(root / sid), root / f"{sid}_s2.tif"),
                      (f"{home.url}{sid}   # named on purpose", f"{home.url}{sid}_s2.tif")):
        listing.write_text(entry + "\n")
        assert [str(s.s2) for s in contract.find_scenes(listing)] == [str(s2)]
    for entry, why in ((f"/vsicurl/{home.url}{sid}_s2.tif", "GDAL virtual path"),
                       (f"{home.url}{sid}_s2.tif?header_file={secret}", "query string"),
                       (f"file://{root}/{sid}", "unsupported scheme")):
        listing.write_text(f"# mine\n{entry}\n")
        with pytest.raises(storage.UserError, match=rf"local\.txt, line 2: .*{why}"):
            contract.find_scenes(listing)


def test_the_compile_cache_ignores_a_work_jax_cache_in_the_current_folder(tmp_path):
    """Item 11: the cache once was the cwd-relative work/jax_cache."""
    (tmp_path / "work" / "jax_cache").mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env["RSJAX_CACHE_DIR"] = str(tmp_path / "cache_home")
    code = ("import json, jax, rsjax.runtime as r; r.prepare_process(); "
            "print(json.dumps(jax.config.jax_compilation_cache_dir))")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, check=True,
                         capture_output=True, text=True, timeout=300).stdout
    used = json.loads(out.strip().splitlines()[-1])
    assert used == str(tmp_path / "cache_home" / "jax")
    assert not Path(used).resolve().is_relative_to((tmp_path / "work").resolve())
