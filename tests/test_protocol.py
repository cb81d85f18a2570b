"""The paper's training protocol: runs measured in epochs of their own
training set (so a Mix 1:1 run sees each real tile as often as a real-only
run), the best validation checkpoint as the run's model, and the report's
check that validation has flattened."""
from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rsjax import config_loader, input_pipeline
from rsjax.errors import UserError
from rsjax.experiments import paper_tables
from rsjax.trainers import checkpoints, loop


# --------------------------------------------------------------------------- length in epochs
def test_steps_for_epochs_round_up_to_cover_every_epoch():
    assert loop.steps_for_epochs(4, 667, 8) == math.ceil(4 * 667 / 8) == 334
    assert loop.steps_for_epochs(1, 16, 8) == 2
    assert loop.steps_for_epochs(0.5, 17, 8) == 2          # 8.5 records: two batches
    assert loop.steps_for_epochs(1e-9, 10, 8) == 1


def test_bench_and_paper_scales_train_by_epochs_and_a_named_length_wins():
    seg = config_loader.load_config("segmentation:bench")
    gan = config_loader.load_config("fusion:bench")
    assert (seg.total_epochs, gan.total_epochs) == (4.0, 5.0)
    assert config_loader.load_config("segmentation:paper").total_epochs == 50.0
    # demo runs stay a fixed number of steps (minutes on a laptop).
    assert config_loader.load_config("segmentation:demo").total_epochs == 0.0
    # steps=N, or --config.total_steps=N, is a length in steps; epochs=E a length in epochs.
    assert config_loader.load_config("segmentation:bench,steps=30").total_epochs == 0.0
    assert config_loader.load_config("fusion:bench", ["total_steps=30"]).total_epochs == 0.0
    both = config_loader.load_config("fusion:bench", ["total_steps=30", "total_epochs=2"])
    assert (both.total_steps, both.total_epochs) == (30, 2.0)
    assert config_loader.load_config("segmentation:demo,epochs=2.5").total_epochs == 2.5


def test_resolve_length_sets_the_steps_and_moves_the_decay_in_proportion():
    config = config_loader.load_config("segmentation:bench", lock=False)
    assert config.optim.decay_start_step == config.total_steps // 2       # 150 of 300
    loop.resolve_length(config, records=667)
    assert config.total_steps == 334
    assert config.optim.decay_start_step == 167                           # still half
    loop.resolve_length(config, records=667)                              # idempotent
    assert (config.total_steps, config.optim.decay_start_step) == (334, 167)
    fixed = config_loader.load_config("segmentation:bench,steps=30", lock=False)
    loop.resolve_length(fixed, records=667)
    assert fixed.total_steps == 30


def test_an_epoch_of_a_mix_run_holds_its_generated_images(demo_data_dir, tmp_path):
    """One epoch is the records the training iterator passes over: the real
    tiles, the chosen half of the scenes, and a Mix run's generated images."""
    config = config_loader.load_config("segmentation:demo,data=mix", lock=False)
    config.data.data_dir = str(demo_data_dir)
    real = input_pipeline.split_size(config.data, "train")
    config.data.train_data = "real"
    assert _epoch(config) == real
    config.data.train_scenes = "optical"
    half = _epoch(config)
    assert 0 < half < real
    # Counted against what the iterator yields in one epoch, without shuffling.
    it = input_pipeline.create_iterator(config.data, "train", global_batch_size=8, train=False,
                                        seed=0, sources=(), num_epochs=1)
    assert sum(int(b["valid"].any(axis=(1, 2)).sum()) for b in it) == half

    config.data.train_scenes = "all"
    folder = tmp_path / "generated"
    folder.mkdir()
    source = input_pipeline.get_builder(config.data).as_data_source(split="train")
    ids = [_text(source[i]["tile_id"]) for i in range(len(source))]
    np.savez(folder / "part-00000.npz", tile_id=np.array(ids),
             s2=np.full((len(ids), 64, 64, 4), 1000, np.uint16))
    config.data.train_data = "mix"
    config.data.generated_dir = str(folder)
    assert _epoch(config) == 2 * real       # Mix 1:1
    config.data.mix_rate = 0.5
    assert _epoch(config) == real + round(0.5 * real)


def _epoch(config) -> int:
    """The records one epoch of the run's training iterator passes over, as the
    segmentation trainer builds it."""
    generated = config.data.generated_dir if config.data.train_data == "mix" else None
    return loop.training_iterator(config, None, (), generated).num_records


def _text(tile_id) -> str:
    return tile_id.decode() if isinstance(tile_id, bytes) else str(tile_id)


# --------------------------------------------------------------------------- best checkpoint
def _state(value: float) -> dict:
    return {"w": jnp.full((3,), value, jnp.float32), "step": jnp.asarray(0, jnp.int32)}


def test_best_checkpoint_keeps_the_best_state_and_survives_a_restart(tmp_path):
    workdir = str(tmp_path)
    best = checkpoints.BestCheckpoint(workdir, "miou")
    assert best.offer(2, _state(2.0), 0.30)
    assert not best.offer(4, _state(4.0), 0.20)             # worse: not kept
    assert not best.offer(5, _state(5.0), float("nan"))     # never a NaN score
    assert best.offer(6, _state(6.0), 0.40, accuracy=0.7)
    assert not best.offer(7, _state(7.0), 0.10)             # the last offer is not the best
    best.close()
    record = checkpoints.best_record(workdir)
    assert record == {"step": 6, "metric": "miou", "value": 0.40, "accuracy": 0.7}
    kept = sorted(p.name for p in (tmp_path / checkpoints.BEST_FOLDER).iterdir() if p.name.isdigit())
    assert kept == ["6"]                                    # one state, the best

    # A resumed run knows the best so far: a lower score later is not kept,
    # and steps it validated before the restart are not offered again.
    again = checkpoints.BestCheckpoint(workdir, "miou")
    assert not again.offer(6, _state(0.0), 0.99)
    assert not again.offer(8, _state(8.0), 0.35)
    assert again.offer(10, _state(10.0), 0.45)
    assert not again.offer(12, _state(12.0), 0.2)
    again.close()
    ckpt = checkpoints.Checkpointer(workdir, 1, 1, folder=checkpoints.BEST_FOLDER)
    state, step = ckpt.restore_state_only(checkpoints.abstract_like(_state(0.0)))
    ckpt.close()
    assert step == 10
    np.testing.assert_array_equal(np.asarray(state["w"]), np.full(3, 10.0))


def test_evaluate_checkpoint_names_its_choices():
    config = config_loader.load_config("segmentation:demo", lock=False)
    assert checkpoints.evaluates_best(config)
    config.evaluate_checkpoint = "last"
    assert not checkpoints.evaluates_best(config)
    config.evaluate_checkpoint = "best"
    with pytest.raises(UserError, match="evaluate_checkpoint='best': choose one of last, "
                                        "best_validation"):
        checkpoints.evaluates_best(config)


def _tiny_segmentation(data_dir, steps: int, every: int):
    config = config_loader.load_config("segmentation:demo", lock=False)
    config.data.data_dir = str(data_dir)
    config.total_steps = steps
    config.model.width = 4
    config.log_every_steps = config.checkpoint_every_steps = every
    config.eval_every_steps = every
    config.optim.decay_start_step = None
    return config


def test_a_run_is_scored_with_its_best_validation_checkpoint(demo_data_dir, tmp_path):
    """The U-Net's final evaluation, `restore_for_eval` (evaluate, predict,
    the experiments) and the record agree on one state: the one whose
    validation mIoU is the best of the run's validations, the last step's
    included (validated at the end when the cadence missed it). Re-scoring
    that state on the validation split gives the recorded value, so the state
    kept is the state that scored it. `evaluate_checkpoint=last` scores the
    last step."""
    from rsjax.trainers import segmentation

    config = _tiny_segmentation(demo_data_dir, steps=5, every=2)
    devices = jax.devices()[:1]
    result = segmentation.train_and_evaluate(config, str(tmp_path), devices=devices)
    history = [json.loads(l) for l in (tmp_path / "val_history.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == [2, 4, 5]
    values = [h["miou"] for h in history]
    best = checkpoints.best_record(str(tmp_path))
    assert best["value"] == pytest.approx(max(values))
    assert best["step"] == history[int(np.argmax(values))]["step"]
    saved = json.loads((tmp_path / "eval_test.json").read_text())
    assert saved["step"] == result["scored_step"] == best["step"]
    assert result["step"] == 5 and saved["selected"] == "best_validation"

    setup, state, step, mesh = segmentation.restore_for_eval(config, str(tmp_path), devices=devices)
    assert step == best["step"]
    rescored, _, _ = segmentation.evaluate_split(setup, state, config, "validation", mesh)
    assert rescored["miou"] == pytest.approx(best["value"], abs=1e-6)
    test_scores, _, _ = segmentation.evaluate_split(setup, state, config, "test", mesh)
    assert test_scores["miou"] == pytest.approx(saved["miou"], abs=1e-6)
    # A named step is that step, from the periodic checkpoints.
    _, _, step, _ = segmentation.restore_for_eval(config, str(tmp_path), step=4, devices=devices)
    assert step == 4

    config.evaluate_checkpoint = "last"
    _, _, step, _ = segmentation.restore_for_eval(config, str(tmp_path), devices=devices)
    assert step == 5


def test_a_run_in_epochs_trains_the_steps_its_epochs_make(demo_data_dir, tmp_path):
    from rsjax.trainers import segmentation

    config = _tiny_segmentation(demo_data_dir, steps=999, every=100)
    config.total_epochs = 0.25
    config.evaluate_checkpoint = "last"
    config.final_eval_split = ""
    records = input_pipeline.split_size(config.data, "train")
    expected = math.ceil(0.25 * records / config.global_batch_size)
    result = segmentation.train_and_evaluate(config, str(tmp_path), devices=jax.devices()[:1])
    assert result["step"] == expected
    assert json.loads((tmp_path / "config.json").read_text())["total_steps"] == expected


# --------------------------------------------------------------------------- has it flattened?
def test_plateau_by_hand():
    rising = [{"step": s, "miou": v} for s, v in zip(range(50, 350, 50), (.1, .2, .3, .4, .5, .6))]
    out = paper_tables.plateau(rising)
    # last third: steps 250, 300 (best 0.6); before: best 0.4.
    assert out["gain"] == pytest.approx(0.2) and out["flat"] is False
    assert (out["best_step"], out["last_step"], out["validations"]) == (300, 300, 6)
    flat = [{"step": s, "miou": v} for s, v in zip(range(1, 7), (.1, .4, .5, .502, .49, .503))]
    out = paper_tables.plateau(flat)
    # last third: .49, .503; before: best .502.
    assert out["gain"] == pytest.approx(0.001) and out["flat"] is True
    assert out["best_step"] == 6
    # A resumed run's repeated step counts once, with its later value.
    repeated = rising[:4] + [{"step": 200, "miou": 0.0}] + rising[4:]
    assert paper_tables.plateau(repeated)["validations"] == 6
    assert paper_tables.plateau(rising[:2])["flat"] is None
    assert paper_tables.plateau([])["best_step"] is None


def test_report_says_which_methods_are_still_rising():
    def record(curve):
        return {"record": {"val_history": [{"step": i + 1, "miou": v} for i, v in enumerate(curve)],
                           "step": len(curve), "scores": {"scored_step": 3}}}
    results = {("table3", "real"): {0: record([.1, .5, .5, .5, .5, .5]),
                                    1: record([.1, .5, .5, .5, .5, .5])},
               ("table3", "mix_1"): {0: record([.1, .2, .3, .4, .5, .6]),
                                     1: record([.1, .5, .5, .5, .5, .5])}}
    lines, out = paper_tables.validation_summary(results)
    assert (out["real"]["flat"], out["real"]["judged"]) == (2, 2)
    assert (out["mix_1"]["flat"], out["mix_1"]["judged"]) == (1, 2)
    assert out["mix_1"]["seeds"][0]["scored_step"] == 3
    text = "\n".join(lines)
    assert "Still rising in some seeds: Mix 1:1 (the paper's)" in text
    assert "| True Data (real only) | 2 of 2 |" in text


def test_figure8_and_the_speed_claim_count_epochs_when_runs_trained_in_epochs():
    """Under epochs a Mix 1:1 run takes twice the steps per pass over its data:
    Figure 8 and its speed claim compare per epoch, the paper's axis. Here both
    reach the threshold after 50 steps, which is 2 epochs of real-only
    training and 1 of Mix."""
    def record(steps, total, curve):
        return {"record": {"config": {"total_epochs": 4.0}, "step": total,
                           "val_history": [{"step": s, "miou": v} for s, v in zip(steps, curve)]}}
    results = {("table3", "real"): {k: record((25, 50, 75, 100), 100, (.1, .5, .5, .5))
                                    for k in (0, 1)},
               ("table3", "mix_1"): {k: record((50, 100, 150, 200), 200, (.5, .5, .5, .5))
                                     for k in (0, 1)}}
    assert paper_tables.curve_unit(results) == "epoch"
    assert paper_tables.curves(results, "mix_1", "epoch")[0][0] == [1.0, 2.0, 3.0, 4.0]
    row = paper_tables.speed_claim(results)
    assert row["claim"].endswith("in fewer epochs")
    assert row["epochs_saved_per_seed"] == [1.0, 1.0]
    # Runs with a length in steps keep the steps axis.
    for seeds in results.values():
        for e in seeds.values():
            e["record"]["config"] = {}
    assert paper_tables.curve_unit(results) == "step"
    assert paper_tables.speed_claim(results)["steps_saved_per_seed"] == [0.0, 0.0]
