"""Input files stay data: no file of a scene folder makes rsjax read another file or a URL.

"Refused" means refused before GDAL touched what the file names, not just an
error after the fact, so each attack has an observer:
- a real HTTP server on 127.0.0.1 records every request;
- the "secret" local file is a FIFO whose writer thread records every open for
  reading (a FIFO's open blocks until both ends are there, so an open cannot
  go unseen), and hands the reader known bytes.
Each attack also has a control: plain rasterio/GDAL, without rsjax's checks,
given the same file, does fetch the URL or copy the secret, so the refusal is
what keeps it out.
"""
import errno
import http.server
import os
import threading
import time

import numpy as np
import pytest
import rasterio
from affine import Affine
from rasterio.vrt import WarpedVRT
from rasterio.warp import transform_bounds

from rsjax.data.contract import InputError, ScenePaths
from rsjax.data.geotiff import write_geotiff
from rsjax.data.ingest import IngestOptions, RegisteredScene, iter_scene_tiles, validate_scene
from rsjax.data.untrusted import SIDECARS_OFF, open_input

pytestmark = pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")

CRS = "EPSG:32631"
T = Affine(10.0, 0.0, 500000.0, 0.0, -10.0, 5600000.0)
N = 32
OPTS = IngestOptions(tile_size=16)


class _Recorder(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def send_head(self):
        self.server.requests.append(f"{self.command} {self.path}")
        return super().send_head()


@pytest.fixture
def server(tmp_path):
    """An HTTP server on 127.0.0.1 (port chosen by the OS) serving tmp_path/www, recording requests."""
    root = tmp_path / "www"
    root.mkdir()
    handler = lambda *a, **k: _Recorder(*a, directory=str(root), **k)  # noqa: E731
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    srv.requests = []
    srv.root = root
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}"
    # A short poll so that shutdown() returns at once (the default waits up to 0.5 s).
    thread = threading.Thread(target=srv.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


class SecretFifo:
    """A local "secret" that knows whether anything opened it: a FIFO plus a writer thread.

    The writer polls with a non-blocking open for writing, which succeeds only
    while a reader has the FIFO open; it then counts the reader and hands it
    `data`. So a reader never blocks for long (no test can hang on it), and
    every open for reading is counted. The writer stops after `timeout`
    seconds at the latest.
    """

    def __init__(self, path, data: bytes = bytes(range(256)) * 32, timeout: float = 30.0):
        self.path, self.data = path, data
        self.readers = 0
        self.error = None
        self._polls = 0
        self._stop = threading.Event()
        os.mkfifo(path)
        self._deadline = time.monotonic() + timeout
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self):
        while not self._stop.is_set() and time.monotonic() < self._deadline:
            self._polls += 1
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_NONBLOCK)
            except OSError as err:
                if err.errno != errno.ENXIO:       # ENXIO: no reader right now
                    self.error = err               # a blind observer must not pass a test
                    return
                time.sleep(0.002)
                continue
            self.readers += 1                      # counted before the reader can get a byte
            try:
                os.set_blocking(fd, True)
                os.write(fd, self.data)            # fits the pipe buffer: never blocks
            except BrokenPipeError:
                pass                               # the reader left without reading
            finally:
                os.close(fd)

    def opened(self) -> int:
        """How many times the FIFO was opened for reading, once the writer has polled twice
        more (so a reader that came and went just before is counted too)."""
        polls = self._polls
        while self._polls < polls + 2 and self._thread.is_alive():
            time.sleep(0.001)
        if self.error is not None:
            raise self.error
        return self.readers

    def as_uint16(self, count: int) -> np.ndarray:
        return np.frombuffer(self.data, "<u2", count)

    def close(self):
        self._stop.set()
        self._thread.join(5)


@pytest.fixture
def secret(tmp_path):
    fifo = SecretFifo(tmp_path / "secret.key")
    yield fifo
    fifo.close()


def scene(folder) -> ScenePaths:
    """A small valid scene, all four sources on one grid."""
    rng = np.random.default_rng(0)
    folder.mkdir(exist_ok=True)
    return ScenePaths(
        "x",
        s2=write_geotiff(folder / "x_s2.tif", rng.integers(300, 4000, (4, N, N)).astype(np.uint16), CRS, T,
                         nodata=0, descriptions=["B2", "B3", "B4", "B8"]),
        s1=write_geotiff(folder / "x_s1.tif", rng.gamma(2.0, 0.05, (2, N, N)).astype(np.float32), CRS, T,
                         nodata=np.nan, descriptions=["VV", "VH"]),
        dem=write_geotiff(folder / "x_dem.tif", (100 + rng.random((N, N)) * 5).astype(np.float32), CRS, T,
                          nodata=-32767.0),
        lulc=write_geotiff(folder / "x_lulc.tif", rng.integers(0, 9, (N, N)).astype(np.uint8), CRS, T, nodata=255),
    )


def vrt_xml(source: str, size: int = N, raw: bool = False, crs: str = CRS, transform: Affine = T) -> str:
    """A four-band VRT on a grid (the scene's by default) taking its pixels from `source`
    (raw: the bytes of any file, as uint16; else band 1 of a raster)."""
    if raw:
        band = ('<VRTRasterBand dataType="UInt16" band="{b}" subClass="VRTRawRasterBand">'
                f'<SourceFilename relativeToVRT="0">{source}</SourceFilename><ImageOffset>0</ImageOffset>'
                f'<PixelOffset>2</PixelOffset><LineOffset>{2 * size}</LineOffset></VRTRasterBand>')
    else:
        band = ('<VRTRasterBand dataType="UInt16" band="{b}"><SimpleSource>'
                f'<SourceFilename relativeToVRT="0">{source}</SourceFilename><SourceBand>1</SourceBand>'
                '</SimpleSource></VRTRasterBand>')
    bands = "".join(band.format(b=b) for b in range(1, 5))
    t = transform
    return (f'<VRTDataset rasterXSize="{size}" rasterYSize="{size}"><SRS>{crs}</SRS>'
            f'<GeoTransform>{t.c!r}, {t.a!r}, 0, {t.f!r}, 0, {t.e!r}</GeoTransform>{bands}</VRTDataset>')


def refused(s: ScenePaths, opts=OPTS) -> str:
    with pytest.raises(InputError) as info:
        validate_scene(s, opts)
    with pytest.raises(InputError):
        next(iter_scene_tiles(s, opts))
    return str(info.value)


def test_vrt_named_tif_reading_a_local_file_is_refused(tmp_path, secret):
    s = scene(tmp_path / "scenes")
    s.s2.write_text(vrt_xml(str(secret.path), raw=True))
    message = refused(s)
    assert str(s.s2) in message and "VRT" in message and "not a GeoTIFF" in message
    assert str(secret.path) not in message
    assert secret.opened() == 0, "the secret was opened, even if its bytes did not come out"
    # Control: GDAL itself, given the same file, copies the secret's bytes into the pixels.
    with rasterio.open(s.s2) as ds:
        pixels = ds.read(1)
    assert secret.opened() > 0
    np.testing.assert_array_equal(pixels.ravel(), secret.as_uint16(N * N))


def test_vrt_named_tif_fetching_a_url_sends_no_request(tmp_path, server):
    s = scene(tmp_path / "scenes")
    write_geotiff(server.root / "payload.tif", np.full((1, N, N), 7, np.uint16), CRS, T)
    s.s1.write_text(vrt_xml(f"/vsicurl/{server.url}/payload.tif"))
    message = refused(s)
    assert str(s.s1) in message and "VRT" in message
    assert server.requests == []
    # Control: GDAL itself, given the same file, fetches the URL's pixels.
    with rasterio.open(s.s1) as ds:
        assert (ds.read(1) == 7).all()
    assert any("payload.tif" in r for r in server.requests)


def _overview_in_ovr(s: ScenePaths, url: str):
    ovr = s.s2.parent / "x_s2.tif.ovr"
    ovr.write_text(vrt_xml(f"/vsicurl/{url}", size=N // 2))
    return s.s2, ovr


def _overview_in_aux_xml(s: ScenePaths, url: str):
    aux = s.dem.parent / "x_dem.tif.aux.xml"
    aux.write_text('<PAMDataset><Metadata domain="OVERVIEWS">'
                   f'<MDI key="OVERVIEW_FILE">/vsicurl/{url}</MDI></Metadata></PAMDataset>')
    return s.dem, aux


def _overview_in_own_metadata(s: ScenePaths, url: str):
    with rasterio.open(s.lulc, "r+") as ds:
        ds.update_tags(ns="OVERVIEWS", OVERVIEW_FILE=f"/vsicurl/{url}")
    return s.lulc, s.lulc


@pytest.mark.parametrize("arm", [_overview_in_ovr, _overview_in_aux_xml, _overview_in_own_metadata])
def test_overviews_pointing_at_a_url_are_refused_before_any_request(tmp_path, server, arm):
    """Ingestion reads full resolution only, so it would not fetch these overviews even
    unrefused; the control shows that any decimated read of the file would, which is
    why the file is refused rather than trusted never to be read that way."""
    s = scene(tmp_path / "scenes")
    name = f"{arm.__name__}.tif"          # one URL per case: GDAL caches what it fetched
    write_geotiff(server.root / name, np.full((4, N // 2, N // 2), 7, np.uint16), CRS, T * T.scale(2))
    attacked, named = arm(s, f"{server.url}/{name}")
    message = refused(s)
    assert str(named) in message and "overview" in message
    assert server.requests == []
    # Control: a decimated read by plain GDAL fetches the URL and returns its pixels. The
    # file's own metadata is honoured under rsjax's sidecar settings too (so the refusal
    # is the only defence there); sidecars only with GDAL's defaults.
    own_metadata = attacked == named
    with rasterio.Env(**(SIDECARS_OFF if own_metadata else {})), rasterio.open(attacked) as ds:
        assert (ds.read(1, out_shape=(N // 2, N // 2)) == 7).all()
    assert any(name in r for r in server.requests)


def test_external_mask_is_refused(tmp_path):
    s = scene(tmp_path / "scenes")
    msk = tmp_path / "scenes" / "x_s1.tif.msk"
    write_geotiff(msk, np.zeros((1, N, N), np.uint8), CRS, T)
    message = refused(s)
    assert str(msk) in message and "no-data" in message


def test_harmless_sidecars_are_ignored(tmp_path):
    """Statistics in an .aux.xml (QGIS writes them) and GeoTIFF overviews are never read, and not refused."""
    s = scene(tmp_path / "scenes")
    with rasterio.open(s.s2) as ds:
        expected = np.moveaxis(ds.read(window=((0, 16), (0, 16))), 0, -1)
    # A sidecar that would declare the first pixel's value as no-data, were it read.
    (tmp_path / "scenes" / "x_s2.tif.aux.xml").write_text(
        f'<PAMDataset><PAMRasterBand band="1"><NoDataValue>{expected[0, 0, 0]}</NoDataValue><Metadata>'
        '<MDI key="STATISTICS_MEAN">1234</MDI></Metadata></PAMRasterBand></PAMDataset>')
    write_geotiff(tmp_path / "scenes" / "x_s2.tif.ovr", np.zeros((4, N // 2, N // 2), np.uint16), CRS, T * T.scale(2))
    tiles = list(iter_scene_tiles(s, OPTS))
    assert len(tiles) == 4
    np.testing.assert_array_equal(tiles[0]["s2"], expected)


def test_vrt_allowed_explicitly(tmp_path):
    """A VRT the user made and names on purpose is read when other formats are allowed."""
    s = scene(tmp_path / "scenes")
    copy = write_geotiff(tmp_path / "optical.tif", rasterio.open(s.s2).read(), CRS, T, nodata=0,
                         descriptions=["B2", "B3", "B4", "B8"])
    s.s2.write_text(vrt_xml(str(copy)))
    refused(s)
    opts = IngestOptions(tile_size=16, allow_any_format=True)
    assert len(list(iter_scene_tiles(s, opts))) == 4


def test_remote_geotiff_named_on_purpose_is_read(tmp_path, server):
    """A URL the user gives is a different thing from a URL inside a file: it is opened (as GeoTIFF)."""
    s = scene(tmp_path / "scenes")
    (server.root / "x_dem.tif").write_bytes(s.dem.read_bytes())
    remote = ScenePaths("x", s2=s.s2, s1=s.s1, lulc=s.lulc, dem=f"{server.url}/x_dem.tif")
    tiles = list(iter_scene_tiles(remote, OPTS))
    assert len(tiles) == 4 and any("x_dem.tif" in r for r in server.requests)
    # No sidecar of the remote file was asked for (GDAL lists nothing beside it).
    assert not any(r.endswith((".ovr", ".aux.xml", ".msk", "/")) for r in server.requests), server.requests


def test_split_export_mosaic_is_read_but_a_piece_that_is_a_vrt_is_refused(tmp_path, server):
    """rsjax's own in-memory VRT of an Earth Engine split export is fine; a piece that is a VRT is not."""
    from rsjax.data.contract import find_scenes
    folder = tmp_path / "scenes"
    s = scene(folder)
    with rasterio.open(s.s2) as ds:
        pixels, descriptions = ds.read(), ds.descriptions
    s.s2.unlink()
    pieces = [write_geotiff(folder / f"x_s2-0000000000-{col:010d}.tif", pixels[:, :, col:col + N // 2], CRS,
                            T * T.translation(col, 0), nodata=0, descriptions=descriptions)
              for col in (0, N // 2)]
    (found,) = find_scenes(folder)
    assert len(list(iter_scene_tiles(found, OPTS))) == 4
    pieces[1].write_text(vrt_xml(f"/vsicurl/{server.url}/piece.tif", size=N // 2))
    message = refused(found)
    assert str(pieces[1]) in message and "VRT" in message
    assert server.requests == []


def test_dry_run_refuses_a_vrt_unless_formats_are_allowed(tmp_path, capsys):
    from rsjax import cli
    folder = tmp_path / "scenes"
    s = scene(folder)
    copy = write_geotiff(tmp_path / "optical.tif", rasterio.open(s.s2).read(), CRS, T, nodata=0)
    s.s2.write_text(vrt_xml(str(copy)))
    assert cli.main(["ingest", str(folder), "--tile_size", "16"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err and str(s.s2) in err and "allow_any_format" in err
    assert cli.main(["ingest", str(folder), "--tile_size", "16", "--allow_any_format"]) == 0


# ---------------------------------------------------------------------------
# .aux.xml sidecars naming other files
# ---------------------------------------------------------------------------
def test_aux_xml_naming_a_source_file_is_refused_unread(tmp_path, secret):
    """A PAM sidecar with a VRT-like source element: GDAL has no use for it in a GeoTIFF's
    .aux.xml, but rsjax refuses it rather than rely on that, and never opens the file."""
    s = scene(tmp_path / "scenes")
    aux = tmp_path / "scenes" / "x_s1.tif.aux.xml"
    aux.write_text('<PAMDataset><PAMRasterBand band="1"><SimpleSource>'
                   f'<SourceFilename relativeToVRT="0">{secret.path}</SourceFilename>'
                   '</SimpleSource></PAMRasterBand></PAMDataset>')
    message = refused(s)
    assert str(aux) in message and "names another file or URL" in message
    assert secret.opened() == 0


def test_aux_xml_naming_a_url_is_refused_before_any_request(tmp_path, server):
    s = scene(tmp_path / "scenes")
    aux = tmp_path / "scenes" / "x_lulc.tif.aux.xml"
    aux.write_text(f'<PAMDataset><Metadata><MDI key="SOURCE">/vsicurl/{server.url}/aux.tif</MDI>'
                   '</Metadata></PAMDataset>')
    message = refused(s)
    assert str(aux) in message and "names another file or URL" in message
    assert server.requests == []


# ---------------------------------------------------------------------------
# Sources on another grid: warped through a VRT that GDAL reopens by name
# ---------------------------------------------------------------------------
def _geographic_transform() -> Affine:
    """A 32 x 32 px EPSG:4326 grid over the scene's footprint (an Earth Engine export's CRS)."""
    left, bottom, right, top = transform_bounds(CRS, "EPSG:4326", T.c, T.f - N * 10.0, T.c + N * 10.0, T.f)
    return Affine((right - left) / N, 0.0, left, 0.0, -(top - bottom) / N, top)


def test_hostile_source_needing_reprojection_is_refused_unread(tmp_path, secret):
    """S2 in EPSG:4326, so every source is warped onto a UTM grid, and the S2 file is a
    VRT reading the secret: refused before any warp reopens it by name."""
    s = scene(tmp_path / "scenes")
    s.s2.write_text(vrt_xml(str(secret.path), raw=True, crs="EPSG:4326", transform=_geographic_transform()))
    message = refused(s)
    assert str(s.s2) in message and "VRT" in message
    assert secret.opened() == 0
    # Control: GDAL's warped VRT over the same file carries the secret's bytes into the output.
    with rasterio.open(s.s2) as ds, WarpedVRT(ds, crs=CRS) as warped:
        assert warped.read(1).any()
    assert secret.opened() > 0


def _swap_for(path, xml: str) -> None:
    """Replaces `path` by a VRT in one rename, as someone writing into the folder could."""
    staged = path.with_name(path.name + ".new")
    staged.write_text(xml)
    os.replace(staged, path)


def test_a_source_swapped_after_its_check_is_not_reopened_as_a_vrt(tmp_path, secret):
    """The exact warp makes GDAL reopen the source by its name: a file replaced by a VRT
    between rsjax's check and that reopen must not be read as the VRT. GDAL is told to
    reopen it as GeoTIFF only (untrusted.reopen_name); with the bare name it read the
    secret. Called at the level where the race is: between open_input and the warp."""
    from rasterio.enums import Resampling
    from rsjax.data.register import WarpedSource, target_grid_for

    transform = _geographic_transform()
    path = write_geotiff(tmp_path / "x_s2.tif", np.full((4, N, N), 1000, np.uint16), "EPSG:4326", transform,
                         nodata=0)
    with rasterio.Env(**SIDECARS_OFF), open_input(path, "S2") as ds:
        grid = target_grid_for(ds)
        _swap_for(path, vrt_xml(str(secret.path), raw=True, crs="EPSG:4326", transform=transform))
        try:
            source = WarpedSource(ds, (1, 2, 3, 4), grid, Resampling.bilinear, 0.0, 0.0)
            source.read(rasterio.windows.Window(0, 0, grid.width, grid.height))
            source.close()
        except rasterio.errors.RasterioError:
            pass                             # refusing to warp a swapped file is fine too
    assert secret.opened() == 0


def test_a_mosaic_piece_swapped_after_its_check_is_not_reopened_as_a_vrt(tmp_path, secret):
    """Same for rsjax's in-memory mosaic of a split export, which names its pieces and is
    opened after each piece was checked."""
    from rsjax.data.contract import Mosaic
    from rsjax.data.rasterio_io import mosaic_vrt_xml

    pieces = [write_geotiff(tmp_path / f"x_s2-0000000000-{col:010d}.tif", np.full((4, N, N // 2), 1000, np.uint16),
                            CRS, T * T.translation(col, 0), nodata=0) for col in (0, N // 2)]
    with rasterio.Env(**SIDECARS_OFF):
        xml = mosaic_vrt_xml(Mosaic(tuple(pieces)), "s2")
        _swap_for(pieces[1], vrt_xml(str(secret.path), size=N // 2, raw=True, transform=T * T.translation(N // 2, 0)))
        try:
            with rasterio.open(xml) as ds:
                ds.read()
        except rasterio.errors.RasterioError:
            pass
    assert secret.opened() == 0


# ---------------------------------------------------------------------------
# Symbolic links
# ---------------------------------------------------------------------------
def _link(path, target) -> None:
    path.unlink()
    path.symlink_to(target)


def test_symlink_to_a_fifo_is_refused_unopened(tmp_path, secret):
    s = scene(tmp_path / "scenes")
    _link(s.s1, secret.path)
    message = refused(s)
    assert str(s.s1) in message and "not a regular file" in message and "FIFO" in message
    assert secret.opened() == 0


def test_symlink_to_a_device_is_refused(tmp_path):
    s = scene(tmp_path / "scenes")
    _link(s.dem, "/dev/zero")                 # GDAL would read zeros (or block) forever
    message = refused(s)
    assert str(s.dem) in message and "character device" in message


def test_symlink_to_a_vrt_is_refused_unread(tmp_path, secret):
    s = scene(tmp_path / "scenes")
    hostile = tmp_path / "elsewhere.vrt"
    hostile.write_text(vrt_xml(str(secret.path), raw=True))
    _link(s.s2, hostile)
    message = refused(s)
    assert str(s.s2) in message and "VRT" in message
    assert secret.opened() == 0


def test_symlink_to_a_private_non_tiff_file_is_refused_without_its_contents(tmp_path):
    """Only a TIFF header is looked for; nothing of the file shows in the message."""
    s = scene(tmp_path / "scenes")
    private = tmp_path / "id_rsa"
    private.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\n")
    _link(s.lulc, private)
    message = refused(s)
    assert str(s.lulc) in message and "TIFF header" in message
    assert "PRIVATE" not in message and "b3Bl" not in message


def test_symlink_to_a_geotiff_is_read_like_the_file(tmp_path):
    """Links into a scene folder are how folders are assembled without copies
    (bench_build does it): a link to a regular GeoTIFF reads exactly as the file."""
    s = scene(tmp_path / "scenes")
    direct = list(iter_scene_tiles(s, OPTS))
    real = tmp_path / "store" / "x_s2.tif"
    real.parent.mkdir()
    os.replace(s.s2, real)
    s.s2.symlink_to(real)
    linked = list(iter_scene_tiles(s, OPTS))
    assert [t["tile_id"] for t in linked] == [t["tile_id"] for t in direct]
    for a, b in zip(linked, direct):
        np.testing.assert_array_equal(a["s2"], b["s2"])


# ---------------------------------------------------------------------------
# rsjax predict
# ---------------------------------------------------------------------------
def _model_that_must_not_run(batch):
    raise AssertionError("the model ran on a refused input")


@pytest.mark.parametrize("flag", ["s2", "target_grid"])
def test_predict_refuses_a_vrt_input_before_reading_it(tmp_path, secret, flag):
    """Prediction registers its inputs as ingestion does: a VRT given as --s2 or as
    --target_grid is refused before its source is opened or the model runs. No
    checkpoint is needed: the refusal comes first, so a model that must not run stands in."""
    from trainer_utils import load_config

    from rsjax import predict

    config = load_config("segmentation", "demo")
    model = predict.LoadedModel(str(tmp_path), config, normalizer=None,
                                inference=(_model_that_must_not_run, 0), num_devices=1)
    s = scene(tmp_path / "scenes")
    hostile = tmp_path / "scenes" / "hostile.tif"
    hostile.write_text(vrt_xml(str(secret.path), raw=True))
    inputs = {"s2": hostile} if flag == "s2" else {"s2": s.s2, "target_grid": hostile}
    out = tmp_path / "landcover.tif"
    with pytest.raises(InputError) as info:
        predict.predict(tmp_path, out, model=model, progress=False, **inputs)
    assert str(hostile) in str(info.value) and "VRT" in str(info.value)
    assert secret.opened() == 0 and not out.exists()
