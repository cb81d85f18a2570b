"""Segmentation end to end: real and mix training data, synthesis from a fusion
checkpoint, metrics from one confusion matrix over the split."""
from __future__ import annotations

import json

import numpy as np
import pytest

from trainer_utils import host_numpy, load_config, tiny_fusion_config


def tiny_segmentation_config(data_dir, data="real", steps=4):
    c = load_config("segmentation", f"demo,data={data}")
    c.data.data_dir = str(data_dir)
    c.total_steps = steps
    c.model.width = 4
    c.log_every_steps = 2
    c.eval_every_steps = 2
    c.checkpoint_every_steps = 2
    c.optim.decay_start_step = None
    return c


@pytest.fixture(scope="module")
def generated_dir(demo_data_dir, tmp_path_factory):
    """Generated images for the train split, from a 2-step pix2pix run."""
    from rsjax import synthesize
    from rsjax.trainers import fusion

    root = tmp_path_factory.mktemp("fusion")
    config = tiny_fusion_config(demo_data_dir, "pix2pix", steps=2)
    config.final_eval_split = ""
    fusion.train_and_evaluate(config, str(root))
    out = root / "generated"
    result = synthesize.synthesize(config, str(root), "train", out=str(out), part_size=32)
    assert result["checkpoint_step"] == 2
    return out


def test_synthesis_covers_every_train_tile_and_resumes(generated_dir, demo_data_dir):
    from rsjax import input_pipeline

    cfg = tiny_fusion_config(demo_data_dir)
    source = input_pipeline.get_builder(cfg.data).as_data_source(split="train")
    parts = sorted(generated_dir.glob("part-*.npz"))
    ids = np.concatenate([np.load(p)["tile_id"] for p in parts])
    assert sorted(map(str, ids)) == sorted(
        (r["tile_id"].decode() if isinstance(r["tile_id"], bytes) else str(r["tile_id"]))
        for r in (source[i] for i in range(len(source))))
    s2 = np.load(parts[0])["s2"]
    assert s2.dtype == np.uint16 and s2.shape[1:] == (64, 64, 4)
    prov = json.loads((generated_dir / "provenance.json").read_text())
    assert prov["checkpoint_step"] == 2 and prov["split"] == "train"
    # A rerun finds every part and regenerates nothing.
    mtimes = [p.stat().st_mtime_ns for p in parts]
    from rsjax import synthesize
    config = tiny_fusion_config(demo_data_dir, "pix2pix", steps=2)
    synthesize.synthesize(config, str(generated_dir.parent), "train", out=str(generated_dir),
                          part_size=32)
    assert [p.stat().st_mtime_ns for p in parts] == mtimes


@pytest.mark.parametrize("data", ["real", "mix"])
def test_segmentation_trains_and_scores(demo_data_dir, generated_dir, tmp_path, data):
    from rsjax.trainers import segmentation

    config = tiny_segmentation_config(demo_data_dir, data)
    config.data.generated_dir = str(generated_dir)
    result = segmentation.train_and_evaluate(config, str(tmp_path))
    assert result["step"] == 4
    saved = json.loads((tmp_path / "eval_test.json").read_text())
    cm = np.asarray(saved["confusion_matrix"])
    # The reported scores are those of the saved confusion matrix.
    assert saved["accuracy"] == pytest.approx(np.trace(cm) / cm.sum())
    history = [json.loads(l) for l in (tmp_path / "val_history.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == [2, 4]
    assert (tmp_path / "eval_test.png").exists()


def test_nonfinite_segmentation_step_is_skipped_and_counted(demo_data_dir):
    import functools

    import jax

    from rsjax import input_pipeline
    from rsjax import mesh as mesh_lib
    from rsjax.trainers import segmentation

    config = tiny_segmentation_config(demo_data_dir)
    mesh = mesh_lib.create_mesh()
    setup = segmentation.Setup(config)
    state = mesh_lib.init_replicated(setup.init_state, mesh)
    batch = next(input_pipeline.create_iterator(
        config.data, "train", global_batch_size=8, mesh=mesh, train=True, seed=0, sources=()))
    step = jax.jit(functools.partial(segmentation.train_step, setup, None))
    before = host_numpy({"model": state["model"], "opt": state["opt"]})
    state, m = step(state, dict(batch, image=batch["image"] * np.nan))
    assert int(m["nonfinite"]) == 1 and int(state["step"]) == 1
    jax.tree.map(np.testing.assert_array_equal, before,
                 host_numpy({"model": state["model"], "opt": state["opt"]}))
    state, m = step(state, batch)
    assert int(m["nonfinite"]) == 0 and int(state["step"]) == 2
    assert not all(np.array_equal(a, b) for a, b in zip(
        jax.tree.leaves(before["model"]), jax.tree.leaves(host_numpy(state["model"]))))
