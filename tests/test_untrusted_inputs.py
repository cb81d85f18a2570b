"""Input files stay data: no file of a scene folder makes rsjax read another file or a URL.

A real HTTP server on 127.0.0.1 records every request, so "refused" means
refused before GDAL sent anything, not just an error after the fact.
"""
import http.server
import threading

import numpy as np
import pytest
import rasterio
from affine import Affine

from rsjax.data.contract import InputError, ScenePaths
from rsjax.data.geotiff import write_geotiff
from rsjax.data.ingest import IngestOptions, iter_scene_tiles, validate_scene

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
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


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


def vrt_xml(source: str, size: int = N, raw: bool = False) -> str:
    """A one-band VRT on the scene's grid taking its pixels from `source` (a raw file or a raster)."""
    if raw:
        band = ('<VRTRasterBand dataType="UInt16" band="{b}" subClass="VRTRawRasterBand">'
                f'<SourceFilename relativeToVRT="0">{source}</SourceFilename><ImageOffset>0</ImageOffset>'
                f'<PixelOffset>2</PixelOffset><LineOffset>{2 * size}</LineOffset></VRTRasterBand>')
    else:
        band = ('<VRTRasterBand dataType="UInt16" band="{b}"><SimpleSource>'
                f'<SourceFilename relativeToVRT="0">{source}</SourceFilename><SourceBand>1</SourceBand>'
                '</SimpleSource></VRTRasterBand>')
    bands = "".join(band.format(b=b) for b in range(1, 5))
    return (f'<VRTDataset rasterXSize="{size}" rasterYSize="{size}"><SRS>{CRS}</SRS>'
            f'<GeoTransform>{T.c}, {T.a}, 0, {T.f}, 0, {T.e}</GeoTransform>{bands}</VRTDataset>')


def refused(s: ScenePaths, opts=OPTS) -> str:
    with pytest.raises(InputError) as info:
        validate_scene(s, opts)
    with pytest.raises(InputError):
        next(iter_scene_tiles(s, opts))
    return str(info.value)


def test_vrt_named_tif_reading_a_local_file_is_refused(tmp_path):
    secret = tmp_path / "secret.bin"
    secret.write_bytes(bytes(range(256)) * 64)
    s = scene(tmp_path / "scenes")
    s.s2.write_text(vrt_xml(str(secret), raw=True))
    message = refused(s)
    assert str(s.s2) in message and "VRT" in message and "not a GeoTIFF" in message


def test_vrt_named_tif_fetching_a_url_sends_no_request(tmp_path, server):
    s = scene(tmp_path / "scenes")
    s.s1.write_text(vrt_xml(f"/vsicurl/{server.url}/payload.tif"))
    message = refused(s)
    assert str(s.s1) in message and "VRT" in message
    assert server.requests == []


def test_external_overviews_pointing_at_a_url_are_refused(tmp_path, server):
    s = scene(tmp_path / "scenes")
    ovr = tmp_path / "scenes" / "x_s2.tif.ovr"
    ovr.write_text(vrt_xml(f"/vsicurl/{server.url}/ovr.tif", size=N // 2))
    message = refused(s)
    assert str(ovr) in message and "overviews" in message
    assert server.requests == []


def test_aux_xml_naming_an_overview_url_is_refused(tmp_path, server):
    s = scene(tmp_path / "scenes")
    aux = tmp_path / "scenes" / "x_dem.tif.aux.xml"
    aux.write_text('<PAMDataset><Metadata domain="OVERVIEWS">'
                   f'<MDI key="OVERVIEW_FILE">/vsicurl/{server.url}/aux.tif</MDI></Metadata></PAMDataset>')
    message = refused(s)
    assert str(aux) in message and "overview" in message
    assert server.requests == []


def test_geotiff_whose_own_metadata_names_an_overview_url_is_refused(tmp_path, server):
    s = scene(tmp_path / "scenes")
    with rasterio.open(s.lulc, "r+") as ds:
        ds.update_tags(ns="OVERVIEWS", OVERVIEW_FILE=f"/vsicurl/{server.url}/internal.tif")
    message = refused(s)
    assert str(s.lulc) in message and "overview" in message
    assert server.requests == []


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
    from rsjax.data import ingest
    folder = tmp_path / "scenes"
    s = scene(folder)
    copy = write_geotiff(tmp_path / "optical.tif", rasterio.open(s.s2).read(), CRS, T, nodata=0)
    s.s2.write_text(vrt_xml(str(copy)))
    assert ingest.main([str(folder), "--tile_size", "16"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err and str(s.s2) in err and "allow_any_format" in err
    assert ingest.main([str(folder), "--tile_size", "16", "--allow_any_format"]) == 0
