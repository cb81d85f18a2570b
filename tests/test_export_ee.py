"""rsjax export_ee: the dry run's task descriptions, without ee, credentials or network."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from rasterio.crs import CRS
from rasterio.warp import transform as warp_transform

from rsjax import cli
from rsjax.data import contract, export_ee

ROOT = Path(__file__).resolve().parents[1]

RHINE = [[7.50, 47.90], [7.62, 47.90], [7.62, 47.98], [7.50, 47.98], [7.50, 47.90]]
# Southern hemisphere (Chile), a triangle.
ANDES = [[-70.70, -33.50], [-70.60, -33.50], [-70.65, -33.42], [-70.70, -33.50]]


def _areas_file(tmp_path, features=None) -> Path:
    features = features if features is not None else [
        {"type": "Feature", "properties": {"scene_id": "rhine_2023"},
         "geometry": {"type": "Polygon", "coordinates": [RHINE]}},
        {"type": "Feature", "properties": {"name": "Andes east"},
         "geometry": {"type": "Polygon", "coordinates": [ANDES]}},
    ]
    path = tmp_path / "areas.geojson"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    return path


def _poisoned_env(tmp_path) -> dict:
    """PYTHONPATH with an `ee` package that fails on import: the dry run must never import it."""
    poison = tmp_path / "poison" / "ee"
    poison.mkdir(parents=True)
    (poison / "__init__.py").write_text("raise ImportError('ee must not be imported by --dry_run')\n")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(poison.parent), str(ROOT), env.get("PYTHONPATH", "")])
    # No credentials anywhere: the dry run must not look for them.
    for key in list(env):
        if key.startswith(("GOOGLE_", "EE_")):
            del env[key]
    return env


def _run(args, env, cwd):
    return subprocess.run([sys.executable, "-m", "rsjax.commands.export_ee", *args],
                          capture_output=True, text=True, env=env, cwd=cwd, timeout=120)


def test_dry_run_prints_every_task_without_ee(tmp_path):
    areas = _areas_file(tmp_path)
    proc = _run(["--areas", str(areas), "--start", "2023-06-01", "--end", "2023-09-01",
                 "--bucket", "my-bucket", "--prefix", "exports/", "--orbit", "DESCENDING",
                 "--dry_run"], _poisoned_env(tmp_path), tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    tasks = out["tasks"]
    assert out["num_tasks"] == len(tasks) == 8

    # File names pair up by ingestion's own naming rule: 2 scenes x 4 sources.
    paired = {}
    for t in tasks:
        m = contract._SCENE_FILE.match(t["file_name"])  # pylint: disable=protected-access
        assert m, t["file_name"]
        paired.setdefault(m["scene"], set()).add(m["source"])
        assert t["destination"] == {
            "type": "gcs", "bucket": "my-bucket", "file_name_prefix": f"exports/{t['file_name'][:-4]}",
            "uri": f"gs://my-bucket/exports/{t['file_name']}"}
        assert t["file_format"] == "GeoTIFF"
        assert t["format_options"] == {"cloudOptimized": True, "noData": float(t["nodata"])}
        assert t["image"]["unmask"] == t["nodata"]
        w, h = t["dimensions"]
        fw, fh = t["file_dimensions"]
        assert fw >= w and fh >= h and fw % t["shard_size"] == 0 and fh % t["shard_size"] == 0
        assert len(t["task"]) <= 100
    assert paired == {"rhine_2023": {"s2", "s1", "lulc", "dem"},
                      "Andes_east": {"s2", "s1", "lulc", "dem"}}

    by = {(t["scene_id"], t["product"]): t for t in tasks}
    s2 = by["rhine_2023", "s2"]
    assert s2["bands"] == ["B2", "B3", "B4", "B8"] and s2["dtype"] == "uint16" and s2["nodata"] == 0
    assert s2["image"]["collection"] == "COPERNICUS/S2_SR_HARMONIZED"
    assert s2["image"]["reducer"] == "median"
    assert s2["image"]["cloud_mask"]["collection"] == "GOOGLE/CLOUD_SCORE_PLUS/V1/S2_HARMONIZED"
    assert {"filter": "date", "start": "2023-06-01", "end": "2023-09-01"} in s2["image"]["filters"]
    assert {"filter": "lt", "property": "CLOUDY_PIXEL_PERCENTAGE", "value": 30.0} in s2["image"]["filters"]

    s1 = by["rhine_2023", "s1"]
    assert s1["image"]["collection"] == "COPERNICUS/S1_GRD"
    assert s1["bands"] == ["VV", "VH"] and s1["dtype"] == "float32"
    filters = s1["image"]["filters"]
    assert {"filter": "eq", "property": "instrumentMode", "value": "IW"} in filters
    assert {"filter": "eq", "property": "orbitProperties_pass", "value": "DESCENDING"} in filters
    for pol in ("VV", "VH"):
        assert {"filter": "listContains", "property": "transmitterReceiverPolarisation",
                "value": pol} in filters

    lulc = by["rhine_2023", "lulc"]
    assert lulc["image"]["collection"] == "GOOGLE/DYNAMICWORLD/V1"
    assert lulc["bands"] == ["label"] and lulc["image"]["reducer"] == "mode"
    assert lulc["dtype"] == "uint8" and lulc["nodata"] == 255

    dem = by["rhine_2023", "dem"]
    assert dem["image"]["collection"] == "COPERNICUS/DEM/GLO30" and dem["bands"] == ["DEM"]
    assert dem["scale"] == 30.0 and dem["image"]["reducer"] == "mosaic"


@pytest.mark.parametrize("ring, epsg", [(RHINE, 32632), (ANDES, 32719)])
def test_grids_cover_the_area_on_whole_pixels(ring, epsg):
    areas = export_ee.areas_from_geojson({"type": "Polygon", "coordinates": [ring]})
    opts = export_ee.ExportOptions(start="2023-01-01", end="2023-02-01", bucket="b")
    tasks = {t["product"]: t for t in export_ee.task_descriptions(areas, opts)}
    # The UTM zone, checked against PROJ's own definition of the CRS.
    assert tasks["s2"]["crs"] == f"EPSG:{epsg}"
    assert "UTM zone" in CRS.from_epsg(epsg).to_wkt()
    # Reference extent: the area's lon/lat bounding box, its edges sampled densely and
    # projected point by point (the grid must cover the box, edges bulge in UTM).
    lon, lat = np.array(ring, float).T
    t = np.linspace(0, 1, 101)
    edge_lon = np.concatenate([lon.min() + t * np.ptp(lon), np.full(101, lon.max()),
                               lon.min() + t * np.ptp(lon), np.full(101, lon.min())])
    edge_lat = np.concatenate([np.full(101, lat.min()), lat.min() + t * np.ptp(lat),
                               np.full(101, lat.max()), lat.min() + t * np.ptp(lat)])
    xs, ys = warp_transform("EPSG:4326", f"EPSG:{epsg}", edge_lon.tolist(), edge_lat.tolist())
    for product in ("s2", "s1", "lulc", "dem"):
        task = tasks[product]
        a, b, c, d, e, f = task["crs_transform"]
        w, h = task["dimensions"]
        assert a == task["scale"] and e == -task["scale"] and b == d == 0
        # Origin on whole multiples of the pixel size (the Sentinel-2 10 m lattice for s2).
        assert c % a == 0 and f % a == 0
        assert task["bounds"] == [c, f - h * a, c + w * a, f]
        left, bottom, right, top = task["bounds"]
        margin = opts.dem_margin_px * a if product == "dem" else 0.0
        # Covers the area with the margin, and overshoots by less than a pixel on every side.
        assert left <= min(xs) - margin and right >= max(xs) + margin
        assert bottom <= min(ys) - margin and top >= max(ys) + margin
        assert min(xs) - margin - left < a and right - max(xs) - margin < a
        assert min(ys) - margin - bottom < a and top - max(ys) - margin < a
    s2, dem = tasks["s2"]["bounds"], tasks["dem"]["bounds"]
    m = opts.dem_margin_px * opts.dem_scale
    assert dem[0] <= s2[0] - m and dem[1] <= s2[1] - m and dem[2] >= s2[2] + m and dem[3] >= s2[3] + m
    assert tasks["s2"]["dimensions"] == tasks["s1"]["dimensions"] == tasks["lulc"]["dimensions"]


def test_drive_destination_and_explicit_crs(tmp_path):
    areas = export_ee.read_areas(_areas_file(tmp_path))
    opts = export_ee.ExportOptions(start="2023-01-01", end="2023-02-01", destination="drive",
                                   drive_folder="rsjax", crs="EPSG:3857")
    tasks = export_ee.task_descriptions(areas, opts)
    assert {t["crs"] for t in tasks} == {"EPSG:3857"}
    assert tasks[0]["destination"] == {"type": "drive", "folder": "rsjax",
                                       "file_name_prefix": "rhine_2023_s2"}


@pytest.mark.parametrize("extra, message", [
    (["--start", "2023-09-01", "--end", "2023-06-01", "--bucket", "b"], "--start 2023-09-01 is not before"),
    (["--start", "June", "--end", "2023-06-01", "--bucket", "b"], "--start 'June': not a date"),
    (["--start", "2023-06-01", "--end", "2023-09-01", "--bucket", "gs://b/x"], "--bucket"),
    (["--start", "2023-06-01", "--end", "2023-09-01", "--bucket", "b", "--crs", "EPSG:4326"],
     "projected CRS in metres"),
    (["--start", "2023-06-01", "--end", "2023-09-01", "--bucket", "b", "--scale", "0.01"],
     "split it into smaller areas"),
    (["--start", "2023-06-01", "--end", "2023-09-01", "--bucket", "b"], "--project is needed"),
])
def test_bad_arguments_name_the_flag(tmp_path, capsys, extra, message):
    areas = _areas_file(tmp_path)
    status = cli.main(["export_ee", "--areas", str(areas), *extra] + (
        ["--dry_run"] if message != "--project is needed" else []))
    err = capsys.readouterr().err
    assert status == 2 and message in err, err


@pytest.mark.parametrize("features, message", [
    ([], "has no features"),
    ([{"type": "Feature", "properties": {}, "geometry": {"type": "Point", "coordinates": [1, 2]}}],
     "must be a Polygon"),
    ([{"type": "Feature", "properties": {},
       "geometry": {"type": "Polygon", "coordinates": [[[500000, 5000000], [500100, 5000000],
                                                        [500100, 5000100], [500000, 5000000]]]}}],
     "longitude/latitude"),
    ([{"type": "Feature", "properties": {"scene_id": "a"},
       "geometry": {"type": "Polygon", "coordinates": [RHINE]}}] * 2, "scene id 'a'"),
])
def test_bad_areas_are_named(tmp_path, features, message):
    with pytest.raises(export_ee.UserError, match=message):
        export_ee.read_areas(_areas_file(tmp_path, features))


def test_missing_areas_file(tmp_path):
    with pytest.raises(export_ee.UserError, match="no such file"):
        export_ee.read_areas(tmp_path / "nope.geojson")


def test_real_run_without_the_client_says_what_to_install(tmp_path):
    proc = _run(["--areas", str(_areas_file(tmp_path)), "--start", "2023-06-01", "--end",
                 "2023-09-01", "--bucket", "b", "--project", "p"], _poisoned_env(tmp_path), tmp_path)
    assert proc.returncode == 2
    assert "pip install rsjax[ee]" in proc.stderr


def test_scene_ids_are_file_name_safe():
    areas = export_ee.areas_from_geojson({"type": "FeatureCollection", "features": [
        {"type": "Feature", "id": "x/y z", "properties": {},
         "geometry": {"type": "Polygon", "coordinates": [RHINE]}},
        {"type": "Feature", "properties": {},
         "geometry": {"type": "Polygon", "coordinates": [ANDES]}}]})
    assert [a.scene_id for a in areas] == ["x_y_z", "area_001"]
