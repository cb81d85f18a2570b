"""`rsjax bench predict`: a tiny scene through the real prediction path, in a
child process, to a COG; the JSON's figures and the output checked."""
from __future__ import annotations

import json

import pytest
import rasterio

from rsjax import cli
from rsjax.bench import predict as bench_predict


def test_bench_predict_tiny_scene(tmp_path, capsys):
    output = tmp_path / "bench.json"
    status = cli.main(["bench_predict", "--size", "300", "--tile_size", "64",
                       "--model_alone_batches", "1",
                       "--out_dir", str(tmp_path / "work"), "--out", str(output)])
    printed = capsys.readouterr().out
    assert status == 0
    report = json.loads(output.read_text())
    assert json.loads(printed) == report

    assert report["machine"]["cpu"] and report["machine"]["cpu_count"] >= 1
    assert isinstance(report["machine"]["cpu_flags"], list)
    assert report["model"]["generator"] == {"name": "rs_spade", "ngf": 4, "spade_hidden": 8,
                                            "embed_dim": 4}        # the tiny default
    assert report["model"]["checkpoint_step"] == 0
    assert report["model"]["generator_parameters"] > 0
    (result,) = report["results"]
    assert (result["size"], result["width"], result["height"]) == (300, 300, 300)
    assert result["tile_size"] == 64 and result["overlap"] == 16
    assert result["tiles"] == 36                       # offsets 0, 48, ..., 192, 236 each way
    assert result["wall_s"] > 0
    assert result["tiles_per_s"] == pytest.approx(result["tiles"] / result["wall_s"], rel=0.02)
    assert result["s_per_megapixel"] == pytest.approx(result["wall_s"] / 0.09, rel=0.02)
    assert result["inputs_write_s"] is not None          # written this time

    shares = result["phase_shares"]
    assert set(shares) == {"read", "model", "blend", "write", "cog", "other"}
    assert all(v >= 0 for v in shares.values())
    assert sum(shares.values()) == pytest.approx(1.0, abs=0.01)
    assert shares["read"] > 0 and shares["model"] > 0
    assert sum(result["phases_s"].values()) == pytest.approx(result["wall_s"], abs=0.05)

    memory = result["memory"]
    assert memory["samples"] > 0
    assert 0 < memory["rss_before_predict_mib"] <= memory["peak_rss_mib"]
    assert memory["peak_rss_mib"] <= memory["vm_hwm_mib"] + 1      # sampled <= the kernel's high-water mark
    assert memory["ru_maxrss_mib"] >= memory["vm_hwm_mib"] - 1
    assert report["under_memory_goal"] == (report["peak_rss_gib_max"] < 4.0)
    assert report["linearity"]["s_per_megapixel"] == {"300": result["s_per_megapixel"]}
    assert result["cpu_s"] > 0 and result["cores_busy"] > 0
    assert report["granule_extrapolated"]["kind"].startswith("linear extrapolation")

    # The output: a valid COG on the input grid, with data.
    out = tmp_path / "work" / "out_300" / "granule300_synthetic_s2.tif"
    assert out.exists() and result["output"]["layout"] == "COG"
    with rasterio.open(out) as ds:
        assert (ds.width, ds.height, ds.count, ds.dtypes[0]) == (300, 300, 4, "uint16")
        assert ds.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
        assert ds.block_shapes[0] == (256, 256) and ds.overviews(1) == [2]
        data = ds.read()
        grid = ds.crs, ds.transform
    assert (data != 0).mean() > 0.9                     # reflectance; no-data only at the S1 edge
    with rasterio.open(tmp_path / "work" / "inputs_300" / "granule300_lulc.tif") as lulc:
        assert grid == (lulc.crs, lulc.transform)


def test_linearity_and_extrapolation():
    results = [{"size": 100, "s_per_megapixel": 2.0, "cpu_s_per_megapixel": 3.0, "ms_per_tile": 10.0},
               {"size": 200, "s_per_megapixel": 2.2, "cpu_s_per_megapixel": 3.6, "ms_per_tile": 11.0}]
    linearity = bench_predict.linearity(results)
    assert linearity["largest_over_smallest_s_per_megapixel"] == 1.1
    assert linearity["largest_over_smallest_cpu_s_per_megapixel"] == 1.2
    assert linearity["cpu_s_per_megapixel"] == {"100": 3.0, "200": 3.6}
    extra = bench_predict.extrapolation(results)
    assert extra["from_size"] == 200 and extra["wall_s"] == pytest.approx(2.2 * 10980 ** 2 / 1e6, abs=0.1)
    assert bench_predict.extrapolation([{"size": 10980, "s_per_megapixel": 1.0}]) is None


@pytest.mark.parametrize("argv, message", [
    (["--config", "segmentation:demo"], "choose a fusion config"),
    (["--workdir", "nosuch_run"], "nosuch_run: workdir does not exist"),
    (["--data_dir", "tfds"], "--data_dir goes with --workdir"),
    (["--config.generator.ngff=4"], "no such config key"),
])
def test_user_errors(argv, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["bench_predict", "--size", "64", *argv]) == 2
    assert message in capsys.readouterr().err
