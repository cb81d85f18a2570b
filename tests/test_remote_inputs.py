"""Scenes read over HTTP (GDAL's /vsicurl/) from a real local server with range requests.

The server (http.server, plus single byte-range GETs as object stores answer
them) serves Cloud Optimized GeoTIFFs; ingestion and the Beam build must read
from it exactly the tiles they read from the same files on disk, and fetch
byte ranges, never whole files.
"""
from __future__ import annotations

import functools
import http.server
import os
import re
import threading
from pathlib import Path

import pytest
import rasterio
import rasterio.shutil
from rasterio.windows import Window

from rsjax.data import contract, ingest, storage, synthetic

pytest.importorskip("aiohttp")        # fsspec's HTTP backend: folder listing over HTTP


class RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Static files with `Range: bytes=a-b` answered 206; every request logged."""

    requests: list = []             # replaced per server

    def log_message(self, *args):   # quiet
        pass

    def end_headers(self):
        self.send_header("Accept-Ranges", "bytes")
        super().end_headers()

    def do_GET(self):
        path = self.translate_path(self.path)
        header = self.headers.get("Range")
        m = re.fullmatch(r"bytes=(\d+)-(\d*)", header or "")
        if not m or not os.path.isfile(path):
            self.requests.append(("GET", self.path, header, None))
            return super().do_GET()
        size = os.path.getsize(path)
        start = int(m[1])
        end = min(int(m[2]) if m[2] else size - 1, size - 1)
        if start >= size:
            self.send_error(416)
            return None
        with open(path, "rb") as f:
            f.seek(start)
            data = f.read(end - start + 1)
        self.requests.append(("GET", self.path, header, len(data)))
        self.send_response(206)
        self.send_header("Content-Type", "image/tiff")
        self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        return None

    def do_HEAD(self):
        self.requests.append(("HEAD", self.path, None, 0))
        return super().do_HEAD()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """Two synthetic scenes as COGs (64 px blocks) in a folder, and its URL on a local server."""
    root = tmp_path_factory.mktemp("served")
    raw = root / "raw"
    cogs = root / "cogs"
    cogs.mkdir()
    for scene in synthetic.write_scenes(raw, num_scenes=2, size=256, seed=3, sar_db=True):
        for path in scene.as_dict().values():
            rasterio.shutil.copy(path, cogs / Path(path).name, driver="COG", BLOCKSIZE=64,
                                 COMPRESS="DEFLATE")
    # The same files under a second URL, which the byte-counting test tells GDAL
    # not to cache (GDAL keeps what it fetched per URL for the process's lifetime).
    (root / "uncached").symlink_to(cogs, target_is_directory=True)
    handler = type("Handler", (RangeHandler,), {"requests": []})
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(handler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}/cogs/"
    try:
        yield cogs, url, handler.requests
    finally:
        server.shutdown()
        server.server_close()


def _assert_only_ranges(requests):
    tif_gets = [r for r in requests if r[0] == "GET" and r[1].endswith(".tif")]
    assert tif_gets, "nothing was read over HTTP"
    assert all(r[2] is not None for r in tif_gets), [r for r in tif_gets if r[2] is None]


def _all_tiles(scenes, opts):
    report = ingest.IngestReport()
    tiles = [t for s in scenes for t in ingest.iter_scene_tiles(s, opts, report)]
    return tiles, report.to_dict()


def test_ingestion_reads_the_same_tiles_over_http(served, tmp_path):
    cogs, url, requests = served
    opts = ingest.IngestOptions(tile_size=64)
    local = contract.find_scenes(cogs)
    remote = contract.find_scenes(url)                      # folder listed over HTTP
    assert [s.scene_id for s in remote] == [s.scene_id for s in local]
    assert all(str(s.s2).startswith("http://") for s in remote)
    listing = tmp_path / "scenes.txt"                       # or a list file of prefixes
    listing.write_text("# two scenes\n" + "".join(f"{url}{s.scene_id}\n" for s in local))
    assert contract.find_scenes(listing) == remote
    requests.clear()
    local_tiles, local_report = _all_tiles(local, opts)
    remote_tiles, remote_report = _all_tiles(remote, opts)
    assert remote_report == local_report and len(local_tiles) > 0
    for a, b in zip(local_tiles, remote_tiles, strict=True):
        assert a["tile_id"] == b["tile_id"]
        for key in ("s2", "s1", "lulc", "dem", "transform"):
            assert a[key].tobytes() == b[key].tobytes(), (a["tile_id"], key)
    _assert_only_ranges(requests)


def test_a_window_read_fetches_only_its_blocks(served):
    cogs, url, requests = served
    uncached = url.replace("/cogs/", "/uncached/")
    scene = contract.find_scenes(uncached)[0]
    sizes = {p.name: p.stat().st_size for p in cogs.glob(f"{scene.scene_id}_*.tif")}
    # Validation (when the scene opens) reads samples and every label; what counts
    # here is what one tile's read fetches, so nothing may come from GDAL's cache.
    with rasterio.Env(CPL_VSIL_CURL_NON_CACHED=f"/vsicurl/{uncached}"), \
            ingest.RegisteredScene(scene, ingest.IngestOptions(tile_size=64)) as reg:
        requests.clear()
        arrays = reg.read(Window(128, 128, 64, 64))
    assert arrays["s2"].shape == (64, 64, 4)
    _assert_only_ranges(requests)
    fetched = {}
    for method, path, _, size in requests:
        if method == "GET" and size:
            fetched[Path(path).name] = fetched.get(Path(path).name, 0) + size
    # One 64 px window of a 256 px scene: S2 on its own grid needs its 64 px block
    # (6 % of the file when written); the resampled S1 and the DEM need neighbouring
    # blocks too, and GDAL fetches at least 16 KiB a request. Measured: about a
    # quarter of all bytes; the DEM (100 x 157 px, 70 KB) is mostly read because its
    # voids are filled from up to 16 pixels around the window.
    print({name: (fetched.get(name, 0), size) for name, size in sizes.items()})
    s2 = f"{scene.scene_id}_s2.tif"
    assert fetched.get(s2, 0) < 0.15 * sizes[s2], (fetched, sizes)
    assert sum(fetched.values()) < 0.4 * sum(sizes.values()), (fetched, sizes)


def test_storage_paths_keep_urls_whole():
    assert storage.as_path("https://h:8000/a//b_s2.tif") == "https://h:8000/a//b_s2.tif"
    assert storage.as_path("gs://bucket/x/y_s2.tif") == "gs://bucket/x/y_s2.tif"
    assert isinstance(storage.as_path("/tmp/x_s2.tif"), Path)
    assert storage.name("s3://b/k/scene_dem.tif") == "scene_dem.tif"
    assert storage.join("gs://b/k/", "s_s1.tif") == "gs://b/k/s_s1.tif"
    with pytest.raises(storage.UserError, match="unsupported scheme"):
        storage.as_path("ftp://h/x.tif")


def test_a_missing_remote_file_is_named(served, tmp_path):
    _, url, _ = served
    listing = tmp_path / "scenes.txt"
    listing.write_text(f"{url}no_such_scene\n")
    with pytest.raises(storage.UserError, match="no_such_scene has none of the files"):
        contract.find_scenes(listing)


def test_the_beam_build_reads_the_same_dataset_over_http(served, tmp_path):
    beam = pytest.importorskip("apache_beam")
    import dataclasses

    import tensorflow_datasets as tfds
    from apache_beam.options.pipeline_options import PipelineOptions

    from rsjax.tfds_builder.rs_multisource import rs_multisource_dataset_builder as rsm

    cogs, url, requests = served
    config = dataclasses.replace(rsm.Builder.builder_configs["manual"], name="manual_http",
                                 tile_size=64, split_mode="random")
    local = rsm.Builder(config=config, data_dir=str(tmp_path / "local"))
    local.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(cogs)))
    # A manual_dir with a scenes.txt of URL prefixes: the files stay on the server.
    manual = tmp_path / "manual"
    manual.mkdir()
    (manual / rsm.SCENE_LIST_FILE).write_text(
        "".join(f"{url}{s.scene_id}\n" for s in contract.find_scenes(cogs)))
    requests.clear()
    remote = rsm.Builder(config=config, data_dir=str(tmp_path / "remote"), beam_tiles_per_element=8)
    remote.download_and_prepare(download_config=tfds.download.DownloadConfig(
        manual_dir=str(manual), beam_runner=beam.runners.DirectRunner(),
        beam_options=PipelineOptions(["--direct_num_workers=1", "--direct_running_mode=in_memory"])))
    _assert_only_ranges(requests)
    for split in ("train", "validation", "test"):
        a, b = local.as_data_source(split=split), remote.as_data_source(split=split)
        assert len(a) == len(b) > 0
        for i in range(len(a)):
            assert a[i]["tile_id"] == b[i]["tile_id"]
            for key in ("s2", "s1", "lulc", "dem", "transform"):
                assert a[i][key].tobytes() == b[i][key].tobytes()
    assert remote.info.metadata[rsm.STATISTICS_KEY] == local.info.metadata[rsm.STATISTICS_KEY]
    # The report names the scenes by id, never by where they were read from; only
    # its `inputs` (which folder, to find the dataset again) tells the two apart.
    remote_report, local_report = (dict(b.info.metadata[rsm.BUILD_REPORT_KEY]) for b in (remote, local))
    remote_inputs, local_inputs = remote_report.pop("inputs"), local_report.pop("inputs")
    assert remote_report == local_report
    assert remote_inputs["scenes"] == local_inputs["scenes"] == len(contract.find_scenes(cogs))
    assert (remote_inputs["manual_dir"], local_inputs["manual_dir"]) == (str(manual), str(cogs))
