"""Prediction over many scenes on Apache Beam (DirectRunner, 2 worker processes):
the one-scene command's outputs byte for byte, one model load per worker, a
failing scene reported while the others finish."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from trainer_utils import tiny_fusion_config

beam = pytest.importorskip("apache_beam")

from apache_beam.options.pipeline_options import PipelineOptions  # noqa: E402

from rsjax import predict, predict_beam  # noqa: E402
from rsjax.data.contract import find_scenes  # noqa: E402


@pytest.fixture(scope="module")
def fusion_workdir(demo_data_dir, tmp_path_factory) -> Path:
    """config.json and an Orbax checkpoint of the initial state, as a training run leaves them."""
    from rsjax import logging_utils
    from rsjax.trainers import fusion
    from rsjax.trainers.checkpoints import Checkpointer

    config = tiny_fusion_config(demo_data_dir, "pix2pix")
    setup = fusion.Setup(config, fusion.selected_sources(config))
    root = tmp_path_factory.mktemp("fusion_run")
    ckpt = Checkpointer(root, every_steps=1, keep=1, async_save=False)
    ckpt.save(0, setup.init_state(), None, force=True)
    ckpt.close()
    logging_utils.write_config(config, root)
    return root


def test_many_scenes_on_beam_equal_the_one_scene_command(fusion_workdir, demo_data_dir, tmp_path):
    folder = next(demo_data_dir.rglob("*_s2.tif")).parent
    scenes = find_scenes(folder)[:3]
    # A fourth scene without its DEM: reported as failed, the others finish.
    broken = tmp_path / "broken"
    broken.mkdir()
    for role in ("s1", "lulc"):
        shutil.copy(getattr(scenes[0], role), broken / f"nodem_{role}.tif")
    listing = tmp_path / "scenes.txt"
    listing.write_text("".join(f"{folder / s.scene_id}\n" for s in scenes) + f"{broken / 'nodem'}\n")

    out_dir = tmp_path / "many"
    result = predict_beam.predict_scenes(
        fusion_workdir, str(listing), str(out_dir), overlap=16,
        beam_options=PipelineOptions(["--direct_num_workers=2",
                                      "--direct_running_mode=multi_processing"]))
    assert result["scenes"] == 4 and result["ok"] == 3
    assert [f["scene_id"] for f in result["failed"]] == ["nodem"]
    assert "nodem_dem.tif" in result["failed"][0]["error"]
    ok = [r for r in result["results"] if r["status"] == "ok"]
    # One model load per worker process, however many scenes it predicted.
    loads = {(r["worker"]["pid"], r["worker"]["model_load"]) for r in ok}
    assert len(loads) == len({pid for pid, _ in loads}) and all(n == 1 for _, n in loads)
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(      # nothing else left behind
        f"{s.scene_id}_synthetic_s2.tif{suffix}" for s in scenes for suffix in ("", ".stac.json"))
    assert all(r["stac"] == r["out"] + ".stac.json" for r in ok)

    for s in scenes:
        single = tmp_path / "one" / f"{s.scene_id}_synthetic_s2.tif"
        single.parent.mkdir(exist_ok=True)
        predict.predict(fusion_workdir, single, s1=s.s1, lulc=s.lulc, dem=s.dem, overlap=16,
                        progress=False)
        assert (out_dir / single.name).read_bytes() == single.read_bytes(), s.scene_id


def test_scenes_that_are_not_there_are_a_user_error(fusion_workdir, tmp_path):
    with pytest.raises(predict_beam.UserError, match="no scene files"):
        predict_beam.predict_scenes(fusion_workdir, str(tmp_path), str(tmp_path / "out"))
