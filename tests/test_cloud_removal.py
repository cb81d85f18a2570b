"""Cloud removal end to end at tiny width on a small cloudy dataset: the
configs, RS-SPADE with the cloudy image as a source and DSen2-CR each
training a step or two, their cloud-removal evaluation beside the two
baselines, and whole-scene prediction with and without a mask."""
from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest
import rasterio

from trainer_utils import load_config, tiny_cloud_config

from rsjax import predict
from rsjax.data.contract import CLOUD_CLEAR, InputError, S2_NODATA
from rsjax.trainers import cloud_eval


# ---------------------------------------------------------------------------- configs
@pytest.mark.parametrize("sources", ["s2_cloudy+s1+dem+lulc", "s2_cloudy", "s2_cloudy+s1",
                                     "s2_cloudy+dem", "s2_cloudy+lulc+dem"])
def test_rs_spade_takes_the_cloudy_image_as_one_more_source(sources):
    from rsjax.trainers import fusion

    config = load_config("fusion", f"demo,sources={sources}")
    assert config.data.name == "rs_multisource/synthetic_cloudy_demo"
    chosen = fusion.selected_sources(config)
    assert "s2_cloudy" in chosen and set(chosen) == set(sources.split("+"))
    from flax import nnx

    g = nnx.eval_shape(lambda: fusion.create_models(config, chosen, 0)[0])
    assert set(g.embed.keys()) == set(chosen)               # its own embedding per source
    assert g.source_channels["s2_cloudy"] == 4


def test_cloud_configs():
    full = load_config("cloud_removal", "")
    assert (full.model.features, full.model.num_blocks, full.model.residual_scale) == (256, 16, 0.1)
    assert (full.optim.name, full.optim.lr, full.global_batch_size) == ("nadam", 7e-5, 16)
    assert full.data.name == "rs_multisource/synthetic_cloudy"
    assert load_config("fusion", "demo,clouds").data.name == "rs_multisource/synthetic_cloudy_demo"
    assert load_config("fusion", "demo").data.name == "rs_multisource/synthetic_demo"
    with pytest.raises(Exception, match="needs s2_cloudy"):
        load_config("cloud_removal", "demo,sources=s1+dem")


# ---------------------------------------------------------------------------- training
def _check_cloud_evaluation(workdir: Path, num_test: int):
    tables = json.loads((workdir / "eval_test_clouds.json").read_text())
    assert set(tables) == {"step", *cloud_eval.VARIANTS}
    baseline = tables["cloudy_input"]["regions"]
    # The cloudy image is the clear one where the mask says clear.
    assert baseline["clear"]["psnr"] == pytest.approx(100.0)
    assert baseline["clear"]["ssim"] == pytest.approx(1.0)
    assert baseline["cloud"]["psnr"] < 15
    composite = tables["composite"]["regions"]
    assert composite["clear"]["psnr"] == pytest.approx(100.0)
    assert composite["cloud"]["psnr"] == pytest.approx(tables["output"]["regions"]["cloud"]["psnr"])
    parts = cloud_eval.load_parts(workdir / "eval_test_clouds.npz")
    assert len(parts["output"]["cover"]) == num_test == tables["output"]["num_images"]
    assert sum(b["num_images"] for b in tables["output"]["by_cover"].values()) == num_test


def _num_test(config):
    from rsjax import input_pipeline

    return len(input_pipeline.get_builder(config.data).as_data_source(split="test"))


def test_rs_spade_with_the_cloudy_image_trains_and_scores_cloud_removal(cloudy_data_dir, tmp_path):
    from rsjax.trainers import fusion

    config = tiny_cloud_config(cloudy_data_dir, "fusion", sources="s2_cloudy+s1+dem+lulc")
    result = fusion.train_and_evaluate(config, str(tmp_path), devices=jax.devices()[:1])
    assert result["step"] == 2 and np.isfinite(result["psnr"])
    assert np.isfinite(result["clouds_composite_cloud_psnr"])
    _check_cloud_evaluation(tmp_path, _num_test(config))
    assert (tmp_path / "images" / "step_0000002.png").exists() and (tmp_path / "eval_test.png").exists()


def test_dsen2cr_trains_resumes_and_scores_cloud_removal(cloudy_data_dir, tmp_path, caplog):
    from rsjax import evaluate
    from rsjax.logging_utils import read_metrics
    from rsjax.trainers import cloud_removal

    config = tiny_cloud_config(cloudy_data_dir, "cloud_removal")
    # Two steps, saved at step 2; no final evaluation yet (the resumed run's is the one scored).
    first = config.copy_and_resolve_references()
    first.final_eval_split, first.image_every_steps = "", 0
    assert cloud_removal.train_and_evaluate(first, str(tmp_path), devices=jax.devices()[:1]) == {"step": 2}
    config.total_steps = 3
    with caplog.at_level("INFO", logger="rsjax"):
        result = cloud_removal.train_and_evaluate(config, str(tmp_path), devices=jax.devices()[:1])
    assert result["step"] == 3 and "Resumed from step 2" in caplog.text, caplog.text[-2000:]
    # It continued: step 3 follows the first run's steps 1 and 2, none of them trained twice.
    logged = [(r["step"], r["loss"]) for r in read_metrics(tmp_path, dedupe=False) if "loss" in r]
    assert [step for step, _ in logged] == [1, 2, 3] and all(np.isfinite([loss for _, loss in logged]))
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == [2, 3]
    _check_cloud_evaluation(tmp_path, _num_test(config))
    # rsjax evaluate reads the checkpoint through the trainer's entry point and
    # draws the cloud grid.
    scores = evaluate.evaluate_checkpoint(config, str(tmp_path), "test")
    assert scores["trainer"] == "cloud_removal" and scores["step"] == 3
    assert scores["psnr"] == pytest.approx(result["psnr"])
    assert scores["clouds"]["output"]["regions"]["all"]["psnr"] == pytest.approx(
        result["clouds_output_all_psnr"])
    assert (tmp_path / "eval_test_3.png").exists()


# ---------------------------------------------------------------------------- prediction
@pytest.fixture(scope="module")
def dsen2cr_workdir(cloudy_data_dir, tmp_path_factory) -> Path:
    """config.json and a checkpoint of DSen2-CR's initial state, as a run leaves them."""
    from rsjax import logging_utils
    from rsjax.trainers import cloud_removal
    from rsjax.trainers.checkpoints import Checkpointer

    root = tmp_path_factory.mktemp("dsen2cr_run")
    config = tiny_cloud_config(cloudy_data_dir, "cloud_removal")
    ckpt = Checkpointer(root, every_steps=1, keep=1, async_save=False)
    ckpt.save(0, cloud_removal.Setup(config).init_state(), None, force=True)
    ckpt.close()
    logging_utils.write_config(config, root)
    return root


def test_prediction_removes_clouds_and_keeps_the_clear_part(dsen2cr_workdir, cloudy_scene, tmp_path):
    s = cloudy_scene
    plain = predict.predict(dsen2cr_workdir, tmp_path / "plain.tif", s2_cloudy=s.s2_cloudy, s1=s.s1,
                            progress=False)
    masked = predict.predict(dsen2cr_workdir, tmp_path / "masked.tif", s2_cloudy=s.s2_cloudy, s1=s.s1,
                             cloud_mask=s.cloud_mask, progress=False)
    assert plain["mode"] == masked["mode"] == "cloud_removal" and masked["cloud_mask"]
    with rasterio.open(tmp_path / "plain.tif") as p, rasterio.open(tmp_path / "masked.tif") as m, \
            rasterio.open(s.s2_cloudy) as c, rasterio.open(s.cloud_mask) as k:
        assert m.crs == c.crs and m.transform == c.transform and m.shape == c.shape
        assert m.tags()["RSJAX_MODE"] == "cloud_removal" and m.dtypes[0] == "uint16"
        model, composite, cloudy, mask = p.read(), m.read(), c.read(), k.read(1)
    clear = mask == CLOUD_CLEAR
    assert 0 < clear.mean() < 1
    # The clear part is the cloudy image as it was, the rest the model's image.
    np.testing.assert_array_equal(composite[:, clear], cloudy[:, clear])
    np.testing.assert_array_equal(composite[:, ~clear], model[:, ~clear])
    assert not np.array_equal(model[:, clear], cloudy[:, clear])
    assert (model != S2_NODATA).all()


def test_prediction_flags_are_checked_before_anything_is_written(dsen2cr_workdir, cloudy_scene,
                                                                 cloudy_data_dir, tmp_path):
    s = cloudy_scene
    with pytest.raises(InputError, match="--s2_cloudy"):
        predict.predict(dsen2cr_workdir, tmp_path / "x.tif", s1=s.s1, progress=False)
    with pytest.raises(InputError, match="not --s2"):
        predict.predict(dsen2cr_workdir, tmp_path / "x.tif", s2=s.s2, s2_cloudy=s.s2_cloudy,
                        s1=s.s1, progress=False)
    # A run that does not take the cloudy image refuses cloud-removal flags.
    from rsjax import logging_utils

    other = tmp_path / "fusion_run"
    other.mkdir()
    logging_utils.write_config(tiny_cloud_config(cloudy_data_dir, "fusion", sources="all",
                                                 extra="clouds"), other)
    with pytest.raises(InputError, match="does not remove clouds"):
        predict.predict(other, tmp_path / "x.tif", s1=s.s1, lulc=s.lulc, dem=s.dem,
                        s2_cloudy=s.s2_cloudy, progress=False)
    assert not list(tmp_path.glob("x.tif*"))


def test_dsen2cr_in_bfloat16_computes_every_convolution_in_bfloat16(cloudy_data_dir):
    """`config.dtype=bfloat16` reaches DSen2-CR's convolutions (forward and backward);
    parameters and optimizer state stay float32. (It once cast only the inputs, and
    the convolutions computed in their float32 parameters' dtype.)"""
    import jax
    import jax.numpy as jnp

    from trainer_utils import convolution_dtypes
    from rsjax import input_pipeline
    from rsjax.trainers import cloud_removal

    config = tiny_cloud_config(cloudy_data_dir, "cloud_removal")
    config.dtype = "bfloat16"
    setup = cloud_removal.Setup(config)
    batch = next(input_pipeline.create_iterator(
        config.data, "train", global_batch_size=8, mesh=None, train=True, seed=0,
        sources=setup.sources))
    step = lambda state, b: cloud_removal.train_step(setup, state, b)
    ops = convolution_dtypes(jax.make_jaxpr(step)(jax.eval_shape(setup.init_state), batch).jaxpr)
    assert len(ops) >= 8
    assert [d for d in ops if d != ("bfloat16", "bfloat16")] == []
    state, m = jax.jit(step)(setup.init_state(), batch)
    assert np.isfinite(float(m["loss"]))
    assert {x.dtype for x in jax.tree.leaves(state) if jnp.issubdtype(
        x.dtype, jnp.floating)} == {jnp.dtype(jnp.float32)}
