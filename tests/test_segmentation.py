"""Segmentation end to end: real and mix training data, synthesis from a fusion
checkpoint, metrics from one confusion matrix over the split."""
from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from trainer_utils import convolution_dtypes, host_numpy, load_config, tiny_fusion_config


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
    fusion.train_and_evaluate(config, str(root), devices=jax.devices()[:1])
    out = root / "generated"
    result = synthesize.synthesize(config, str(root), "train", out=str(out), part_size=32)
    assert result["checkpoint_step"] == 2
    return out


def _tile_id(record) -> str:
    tid = record["tile_id"]
    return tid.decode() if isinstance(tid, bytes) else str(tid)


def _parts(folder) -> dict:
    """{part name: (tile ids, s2)} of a folder of generated images."""
    out = {}
    for path in sorted(folder.glob("part-*.npz")):
        with np.load(path) as z:
            out[path.name] = ([str(t) for t in z["tile_id"]], z["s2"])
    return out


def test_synthesis_stores_each_image_under_its_own_tile(generated_dir, demo_data_dir):
    """Every train tile gets one image, and the image stored under a tile id
    is what the generator makes from that tile's sources: recomputed here for
    tiles taken from every part, in another order and other batches."""
    from rsjax import input_pipeline
    from rsjax.trainers import fusion

    config = tiny_fusion_config(demo_data_dir, "pix2pix", steps=2)
    builder = input_pipeline.get_builder(config.data)
    source = builder.as_data_source(split="train")
    by_id = {_tile_id(source[i]): source[i] for i in range(len(source))}
    parts = _parts(generated_dir)
    assert sorted(parts) == ["part-00000.npz", "part-00001.npz", "part-00002.npz"]
    stored = {t: img for ids, s2 in parts.values() for t, img in zip(ids, s2, strict=True)}
    assert sum(len(ids) for ids, _ in parts.values()) == len(stored) == len(by_id)
    assert sorted(stored) == sorted(by_id)
    first = next(iter(parts.values()))[1]
    assert first.dtype == np.uint16 and first.shape[1:] == (64, 64, 4)
    prov = json.loads((generated_dir / "provenance.json").read_text())
    assert prov["checkpoint_step"] == 2 and prov["split"] == "train"

    sample = sorted(by_id)[::10][::-1][:8]                 # across the parts, reversed
    generate, _ = fusion.load_inference(config, str(generated_dir.parent))
    normalizer = input_pipeline.Normalizer.from_statistics(input_pipeline.load_statistics(builder))
    batch = next(input_pipeline.batch_iterator(
        [by_id[t] for t in sample], normalizer, global_batch_size=8, mesh=None, train=False,
        seed=0, sources=fusion.selected_sources(config)))
    expected = input_pipeline.image_to_s2(np.asarray(generate(batch)), normalizer).astype(int)
    for i, tile_id in enumerate(sample):
        diff = np.abs(stored[tile_id].astype(int) - expected)
        assert diff[i].max() <= 1, tile_id
        # No other tile's image would pass as this one: a wrong pairing shows.
        assert all(diff[j].max() > 1 for j in range(len(sample)) if j != i), tile_id


def test_synthesize_command_resumes_a_run_interrupted_with_parts_missing(generated_dir, tmp_path,
                                                                       monkeypatch, capsys):
    """An interrupted run: part 0 done, part 1 missing, part 2 half-written
    (only its temporary file). `rsjax synthesize` again keeps part 0 as it
    is, writes parts 1 and 2 (the same tiles and images as an uninterrupted
    run) and leaves no temporary file."""
    import os
    import shutil

    from rsjax import cli

    out = tmp_path / "generated"
    shutil.copytree(generated_dir, out)
    (out / "part-00001.npz").unlink()
    (out / "part-00002.npz").rename(out / "part-00002.npz.tmp")
    (out / "part-00002.npz.tmp").write_bytes((out / "part-00002.npz.tmp").read_bytes()[:1000])
    (out / "provenance.json").unlink()                    # written at the end only
    kept = (out / "part-00000.npz").stat().st_mtime_ns
    monkeypatch.chdir(tmp_path)
    assert cli.main(["synthesize", "--workdir", str(generated_dir.parent), "--split",
                     "train", "--out_dir", str(out), "--part_size", "32"]) == 0
    text = capsys.readouterr().out
    printed = json.loads(text[text.index("{"):])
    num_tiles = json.loads((generated_dir / "provenance.json").read_text())["num_tiles"]
    assert printed == {"out": str(out), "num_tiles": num_tiles, "checkpoint_step": 2}
    assert [line.split(" |")[0] for line in text.splitlines() if line.startswith("part ")] == [
        "part 2/3", "part 3/3"]                          # parts 1 and 2 (from 0) only
    assert (out / "part-00000.npz").stat().st_mtime_ns == kept
    assert sorted(os.listdir(out)) == ["part-00000.npz", "part-00001.npz", "part-00002.npz",
                                       "provenance.json"]
    again, first = _parts(out), _parts(generated_dir)
    for name in first:
        assert again[name][0] == first[name][0], name
        assert np.abs(again[name][1].astype(int) - first[name][1]).max() <= 1, name
    assert json.loads((out / "provenance.json").read_text())["num_tiles"] == num_tiles


def _confusion(pred, label) -> np.ndarray:
    """9 x 9 counts (rows: truth), label 255 left out: numpy, not rsjax.metrics."""
    keep = label != 255
    return np.bincount(label[keep].astype(int) * 9 + pred[keep], minlength=81).reshape(9, 9)


@pytest.mark.parametrize("data", ["real", "mix"])
def test_segmentation_trains_and_scores(demo_data_dir, generated_dir, tmp_path, data):
    """The saved scores are those of the model: the confusion matrix is
    recounted from the checkpoint's predictions on the test split, and
    accuracy, per-class IoU and mIoU recomputed from it (IoU = TP / (TP + FP +
    FN), classes in neither truth nor prediction left out of the mean)."""
    import functools

    import jax

    from rsjax import input_pipeline
    from rsjax.trainers import segmentation

    config = tiny_segmentation_config(demo_data_dir, data)
    config.data.generated_dir = str(generated_dir)
    result = segmentation.train_and_evaluate(config, str(tmp_path))
    assert result["step"] == 4
    saved = json.loads((tmp_path / "eval_test.json").read_text())
    cm = np.asarray(saved["confusion_matrix"])

    # The run's model is its best validation checkpoint (tests/test_protocol.py):
    # the scores saved are that checkpoint's.
    setup, state, step, _ = segmentation.restore_for_eval(config, str(tmp_path))
    assert step == saved["step"] == result["scored_step"]
    logits = jax.jit(functools.partial(segmentation.predict, setup))
    builder = input_pipeline.get_builder(config.data)
    source = builder.as_data_source(split="test")
    normalizer = input_pipeline.Normalizer.from_statistics(input_pipeline.load_statistics(builder))
    recount = np.zeros((9, 9), np.int64)
    for batch in input_pipeline.batch_iterator([source[i] for i in range(len(source))], normalizer,
                                               global_batch_size=8, mesh=None, train=False, seed=0,
                                               sources=()):
        pred = np.asarray(jax.device_get(logits(state, batch["image"]))).argmax(-1)
        recount += _confusion(pred, batch["label"])
    assert recount.sum() == cm.sum() > 0
    # Argmax ties between two jitted programs may flip a pixel or two.
    assert np.abs(recount - cm).sum() <= 1e-4 * cm.sum()

    tp = np.diag(cm).astype(float)
    union = cm.sum(0) + cm.sum(1) - tp
    iou = [tp[k] / union[k] if union[k] else None for k in range(9)]
    assert saved["accuracy"] == pytest.approx(tp.sum() / cm.sum())
    for k in range(9):
        if iou[k] is None:
            assert np.isnan(saved["per_class_iou"][k]), k
        else:
            assert saved["per_class_iou"][k] == pytest.approx(iou[k]), k
    assert saved["miou"] == pytest.approx(np.mean([v for v in iou if v is not None]))
    assert result["miou"] == pytest.approx(saved["miou"])
    history = [json.loads(l) for l in (tmp_path / "val_history.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == [2, 4]
    assert (tmp_path / "eval_test.png").exists()


def test_mix_training_data_holds_each_generated_image_with_its_tile(demo_data_dir, tmp_path):
    """data=mix trains on the real tiles and one generated image per tile: an
    epoch of the pipeline the trainer builds has 2N records, N of them the
    generated images (marker images here, one constant value per tile), each
    with the land cover of the tile it names (matched by id, not by position:
    the file lists the tiles in reverse)."""
    from rsjax import input_pipeline
    from rsjax.trainers import segmentation

    config = tiny_segmentation_config(demo_data_dir, "mix")
    builder = input_pipeline.get_builder(config.data)
    source = builder.as_data_source(split="train")
    n = len(source)
    real = {_tile_id(source[i]): source[i] for i in range(n)}
    ids = list(real)[::-1]
    normalizer = input_pipeline.Normalizer.from_statistics(input_pipeline.load_statistics(builder))
    # Reflectance x 10000 inside every band's p1..p99, where normalization does not clip.
    low, high = float(np.max(normalizer.s2_low)) + 1, float(np.min(normalizer.s2_high)) - 1
    assert high - low > n
    marker = {t: int(v) for t, v in zip(ids, np.linspace(low, high, n), strict=True)}
    folder = tmp_path / "generated"
    folder.mkdir()
    np.savez(folder / "part-00000.npz", tile_id=np.array(ids),
             s2=np.stack([np.full((64, 64, 4), marker[t], np.uint16) for t in ids]))
    expected = {t: input_pipeline.normalize_tile(
        {**real[t], "s2": np.full((64, 64, 4), marker[t], np.uint16)}, normalizer, ()) for t in ids}
    tile_of = {round(float(e["image"][e["valid"]][0, 0]), 5): t for t, e in expected.items()}
    assert len(tile_of) == n

    # In order (no shuffle, no augmentation): the real tiles, then the generated.
    records = []
    for batch in input_pipeline.create_iterator(config.data, "train", global_batch_size=8,
                                                train=False, seed=0, sources=(),
                                                generated_dir=str(folder)):
        records += [(batch["image"][i], batch["label"][i], batch["valid"][i])
                    for i in range(len(batch["valid"])) if batch["valid"][i].any()]
    assert len(records) == 2 * n
    assert not any(np.ptp(image[valid], axis=0).max() == 0 for image, _, valid in records[:n])
    found = []
    for image, label, valid in records[n:]:
        assert np.ptp(image[valid], axis=0).max() == 0            # a marker
        tile_id = tile_of[round(float(image[valid][0, 0]), 5)]
        np.testing.assert_allclose(image[valid], expected[tile_id]["image"][valid], atol=1e-6)
        np.testing.assert_array_equal(label, real[tile_id]["lulc"])
        found.append(tile_id)
    assert sorted(found) == sorted(ids)

    # Shuffled and augmented, as training reads it: each marker at most once per
    # epoch, and all but the last partial batch's (training drops it).
    seen = []
    for batch in input_pipeline.create_iterator(config.data, "train", global_batch_size=8,
                                                train=True, seed=0, sources=(), num_epochs=1,
                                                generated_dir=str(folder)):
        for image, valid in zip(batch["image"], batch["valid"], strict=True):
            if np.ptp(image[valid], axis=0).max() == 0:       # a constant image: a marker
                seen.append(tuple(np.round(image[valid][0], 4)))
    assert len(seen) == len(set(seen)) >= n - 7

    # The trainer builds its training data from config.data.generated_dir.
    config.data.generated_dir = str(folder / "nothing_here")
    with pytest.raises(FileNotFoundError, match="nothing_here: no .npz files"):
        segmentation.train_and_evaluate(config, str(tmp_path / "mix"))


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


def test_bfloat16_compute_step_matches_float32_and_keeps_the_state_float32(demo_data_dir):
    """`config.dtype=bfloat16`: every convolution and matmul of the U-Net's step
    (forward and backward) takes bfloat16 operands, its loss is within bfloat16's
    rounding of the float32 forward's, and parameters, BatchNorm statistics and
    Adam's moments stay float32."""
    import functools

    import jax
    import jax.numpy as jnp
    from flax import nnx

    from rsjax import input_pipeline
    from rsjax import losses
    from rsjax.errors import ConfigError
    from rsjax.trainers import segmentation

    config = tiny_segmentation_config(demo_data_dir)
    config.dtype = "bfloat16"
    batch = next(input_pipeline.create_iterator(
        config.data, "train", global_batch_size=8, mesh=None, train=True, seed=0, sources=()))
    setup = segmentation.Setup(config)
    step = functools.partial(segmentation.train_step, setup, None)
    jaxpr = jax.make_jaxpr(step)(jax.eval_shape(setup.init_state), batch).jaxpr
    ops = convolution_dtypes(jaxpr, ("conv_general_dilated", "dot_general"))
    assert len(ops) > 40
    assert [d for d in ops if d != ("bfloat16", "bfloat16")] == []

    state = setup.init_state()
    float32_loss = jax.jit(lambda model: losses.softmax_cross_entropy(
        nnx.merge(setup.train_graph, model)(batch["image"]), batch["label"]))(state["model"])
    state, m = jax.jit(step)(state, batch)
    assert np.isfinite(float(m["loss"]))
    assert float(m["loss"]) == pytest.approx(float(float32_loss), rel=0.02)
    assert {x.dtype for x in jax.tree.leaves(state) if jnp.issubdtype(
        x.dtype, jnp.floating)} == {jnp.dtype(jnp.float32)}
    config.dtype = "float16"
    with pytest.raises(ConfigError, match="config.dtype='float16'"):
        segmentation.Setup(config)
