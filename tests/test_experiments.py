"""The experiments: plans per scale, the resumable runner on real tiny runs,
and the report's tables, intervals and verdicts read from the runs' files."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from etils import epath

from rsjax import config_loader, input_pipeline
from rsjax.experiments import plan as plan_lib
from rsjax.errors import UserError
from rsjax.experiments import export
from rsjax.experiments import paper_tables as report, runner, stats, workers


@pytest.mark.parametrize("scale", plan_lib.SCALES)
def test_plans_name_every_run_once_and_order_dependencies(scale):
    runs = plan_lib.plan(scale)
    names = [r.name for r in runs]
    assert len(names) == len(set(names))
    position = {r.name: i for i, r in enumerate(runs)}
    for i, run in enumerate(runs):
        for needed in filter(None, (run.generator or "").split(",")):
            assert position[needed] < i, (run.name, needed)
    seeds = {r.seed for r in runs if r.table == "table1"}
    assert seeds == set(range(plan_lib.SEEDS[scale]))
    # Table 1 compares the three models on the same seeds; Table 3 every training set.
    for method in plan_lib.TABLE1:
        assert {r.seed for r in runs if r.table == "table1" and r.method == method} == seeds
    assert {r.method for r in runs if r.table == "table3" and r.kind == "segmentation"} == {
        "real", "mix_0.5", "mix_1", "mix_2", "real_optical_half", "new_layouts"}


@pytest.mark.parametrize("scale", plan_lib.SCALES)
def test_every_config_of_a_scale_loads_and_names_a_dataset_config(scale):
    """Each run's config (with its overrides) loads, locked, and its dataset is a
    builder config rsjax can build; the tile size is the scale's."""
    from rsjax import input_pipeline

    root = epath.Path("/nonexistent-experiment")
    tile = {"demo": 64, "bench": 64, "paper": 256}[scale]
    for run in plan_lib.plan(scale):
        config = runner.run_config(run, root)
        assert config.data.tile_size == tile, run.name
        assert input_pipeline.builder_config_for(config.data) is not None
        assert config.data.name.endswith({"demo": "synthetic_demo", "bench": "synthetic_bench",
                                          "paper": "synthetic_paper"}[scale])


def test_objective_axis_changes_only_the_loss():
    spade = config_loader.load_config("fusion:bench,objective=spade")
    l1 = config_loader.load_config("fusion:bench,objective=spade+l1")
    pix = config_loader.load_config("fusion:bench,model=pix2pix")
    assert (spade.gan.loss, spade.gan.lambda_feat, spade.gan.lambda_l1) == ("hinge", 10.0, 0.0)
    assert (l1.gan.loss, l1.gan.lambda_feat, l1.gan.lambda_l1) == ("hinge", 10.0, 100.0)
    assert (pix.gan.loss, pix.gan.lambda_l1) == ("vanilla", 100.0)
    a, b = spade.to_dict(), l1.to_dict()
    a.pop("gan"), b.pop("gan")
    assert a == b
    for c in (spade, l1, pix):             # the same data, length, batch and evaluation
        assert (c.total_steps, c.global_batch_size, c.eval_use_ema, c.data.name) == (
            spade.total_steps, spade.global_batch_size, False, spade.data.name)


def test_paper_scale_is_the_papers_setting():
    seg = config_loader.load_config("segmentation:paper")
    fus = config_loader.load_config("fusion:paper")
    assert seg.data.tile_size == fus.data.tile_size == 256
    assert fus.generator.ngf == 64 and seg.model.width == 64
    # 50 epochs of 1,558 tiles at batch 16.
    assert seg.total_steps == int(np.ceil(50 * 1558 / 16)) == fus.total_steps


@pytest.mark.parametrize("part,arg,size,run", [
    # RS-SPADE at full width
    pytest.param("fusion", "paper", 32, False, id="rs_spade-traced"),
    # U-Net-256 needs 256 px (8 downsamplings)
    pytest.param("fusion", "paper,model=pix2pix", 256, True, id="pix2pix_256px-stepped"),
    # RS-UNet, width 64, depth 5
    pytest.param("unet", "paper", 32, False, id="rs_unet-traced"),
])
def test_paper_scale_models_build_and_trace_their_training_step(part, arg, size, run):
    """The paper's configs start: their full-width models, optimizers and loss
    make the real train step (random inputs of the pipeline's shapes, batch 1,
    one device), traced through (shapes, dtypes, every config key used).
    Only pix2pix also takes the step, at the paper's 256 px; RS-SPADE and the
    U-Net are traced at 32 px without compiling, since compiling them costs
    1-1.5 minutes of the suite and the same code runs numerically at the small
    widths in every training test. Each scale's dataset config is checked in
    test_every_config_of_a_scale_loads_and_names_a_dataset_config."""
    import jax

    from rsjax.bench import steps as bench
    from rsjax import mesh as mesh_lib

    make = bench.fusion_step if part == "fusion" else bench.unet_step
    mesh = mesh_lib.create_mesh(jax.devices()[:1])
    if not run:
        with pytest.MonkeyPatch.context() as patch:     # the state's shapes, not its values
            patch.setattr(mesh_lib, "init_replicated", lambda init, mesh: jax.eval_shape(init))
            step, state, batch = make(size, 1, "float32", mesh, arg)
        _, metrics = jax.eval_shape(step, state, batch)
        assert all(m.shape == () for m in jax.tree.leaves(metrics))
        assert any("loss" in k for k in metrics)
        return
    step, state, batch = make(size, 1, "float32", mesh, arg)
    state, metrics = step(state, batch)
    losses = {k: float(v) for k, v in metrics.items() if "loss" in k}
    assert losses and all(np.isfinite(v) for v in losses.values()), metrics
    assert int(jax.device_get(metrics.get("nonfinite", 0))) == 0


def test_a_run_killed_and_resumed_reports_the_wall_time_of_every_attempt(tmp_path):
    """Attempt 1 starts at t=1000 and is killed after writing its last file at
    t=1600; attempt 2 starts at t=5000 and finishes at t=5300: 600 + 300 s of
    work, not the 300 s of the last piece nor the 4,300 s the run sat idle."""
    out = epath.Path(tmp_path / "table1" / "rs_spade" / "seed0")
    first = runner.start_attempt(out, now=1000.0)
    assert (first["earlier_seconds"], first["earlier_attempts"]) == (0.0, 0)
    for name, mtime in (("checkpoints/100/state", 1300.0), ("metrics.jsonl", 1600.0)):
        path = tmp_path / "table1" / "rs_spade" / "seed0" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x")
        os.utime(path, (mtime, mtime))
    second = runner.start_attempt(out, now=5000.0)
    assert (second["earlier_seconds"], second["earlier_attempts"]) == (600.0, 1)
    record = runner.finish_attempt(second, now=5300.0)
    assert record["seconds"] == 900.0 and record["attempts"] == 2
    assert not record["cpu_seconds_of_all_attempts"]
    assert runner.cpu_note(record) == " (last of 2 attempts)"
    # A run done in one go counts its CPU time whole.
    once = runner.finish_attempt(runner.start_attempt(epath.Path(tmp_path / "b"), now=10.0),
                                 now=70.0)
    assert (once["seconds"], once["attempts"], runner.cpu_note(once)) == (60.0, 1, "")
    # A run whose earlier attempts predate the counting says its times are the last attempt's.
    old = epath.Path(tmp_path / "c")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "metrics.jsonl").write_text("x")
    resumed = runner.finish_attempt(runner.start_attempt(old))
    assert runner.wall_note(resumed) == runner.cpu_note(resumed) == " (last attempt)"
    # A record from before attempts were counted says its times are the last attempt's.
    assert runner.cpu_note({"cpu_seconds": 5}) == runner.wall_note({"seconds": 5}) == " (last attempt)"


def _tiny(run):
    """Smaller models and 2 steps on the demo dataset: the runner's machinery is what
    is tested (on one device: 8-device programs compile a quarter slower, and data
    parallelism has its own tests)."""
    if run.config.startswith("segmentation"):
        # A length in epochs, as at the bench and paper scales (2 steps real-only,
        # 4 with Mix 1:1 on the demo split's 79 tiles).
        return ("model.width=4", "total_epochs=0.2", "eval_every_steps=1", "log_every_steps=1",
                "data.name=rs_multisource/synthetic_demo")
    out = ["generator.ngf=4", "discriminator.ndf=4", "total_steps=2", "log_every_steps=1",
           "image_every_steps=0", "data.name=rs_multisource/synthetic_demo"]
    if "pix2pix" not in run.config:
        out += ["generator.embed_dim=4", "generator.spade_hidden=8"]
    return tuple(out)


@pytest.mark.slow
def test_runner_resumes_run_by_run_and_the_report_reads_the_runs(demo_data_dir, tmp_path):
    runs = [r for r in plan_lib.plan("demo", seeds=1, tables=("table1", "table3"))
            if r.method in ("rs_spade", "real", "mix_1")
            or (r.kind == "synthesize" and "optical" not in r.name)]
    assert [r.kind for r in runs] == ["fusion", "synthesize", "segmentation", "segmentation"]
    root = epath.Path(tmp_path / "exp")
    lines = []
    # A first session stops after one run ...
    records = runner.run_plan(runs, root, str(demo_data_dir), print_fn=lines.append,
                              extra=_tiny, limit=1,
                              devices=jax.devices()[:1])
    assert records[0] is not None and records[1:] == [None, None, None]
    first = root / runs[0].name / runner.RUN_FILE
    stamp = os.stat(first).st_mtime_ns
    # ... the next one continues with the rest and leaves the finished run alone.
    records = runner.run_plan(runs, root, str(demo_data_dir), print_fn=lines.append, extra=_tiny,
                              devices=jax.devices()[:1])
    assert all(r is not None for r in records)
    assert os.stat(first).st_mtime_ns == stamp
    assert any("1 of 4 runs already finished; 3 to run" in line for line in lines)

    # Per-tile parts recompute the trainer's own split scores.
    fusion_record = records[0]
    with (root / runs[0].name / runner.TILES_FILE).open("rb") as f, np.load(f) as z:
        tiles = dict(z)
    assert stats.image_metric("psnr")(tiles) == pytest.approx(fusion_record["scores"]["psnr"], rel=1e-5)
    assert stats.image_metric("sam")(tiles) == pytest.approx(fusion_record["scores"]["sam"], rel=1e-5)
    seg_record = records[2]
    with (root / runs[2].name / runner.TILES_FILE).open("rb") as f, np.load(f) as z:
        cm = z["cm"]
    assert stats.segmentation_metric("miou")({"cm": cm}) == pytest.approx(
        seg_record["scores"]["miou"], rel=1e-6)
    # The per-tile record names each tile's scene, in the split's order.
    with (root / runs[0].name / runner.TILES_FILE).open("rb") as f, np.load(f) as z:
        scene_ids = z["scene_id"]
    source = input_pipeline.get_builder(runner.run_config(runs[0], root, str(demo_data_dir),
                                                          _tiny).data).as_data_source(split="test")
    assert list(scene_ids) == [source[i]["scene_id"].decode() if isinstance(source[i]["scene_id"], bytes)
                               else source[i]["scene_id"] for i in range(len(source))]
    assert len(set(scene_ids)) < len(scene_ids)            # tiles share scenes
    # Each record says what made it: the code, the libraries and the dataset.
    from rsjax import provenance
    made = records[0]["provenance"]
    assert made["code"] == provenance.code() and made["packages"]["jax"] == jax.__version__
    assert made["dataset"] == provenance.dataset_fingerprint(
        runner.run_config(runs[0], root, str(demo_data_dir), _tiny).data)
    # The Mix run trained on real tiles plus one generated image per tile.
    provenance = json.loads((root / runs[1].name / "provenance.json").read_text())
    assert provenance["num_tiles"] > 0

    rep = report.build_report(root, "demo", runs)
    # The span runs from the first attempt's start to the last run's end: one
    # worker ran them one after another, so it covers their wall times' sum.
    assert rep["elapsed"]["seconds"] >= sum(r["seconds"] for r in records) - 1.0
    # One worker, no pauses: busy time is the runs' wall times together.
    assert rep["elapsed"]["busy_seconds"] == pytest.approx(sum(r["seconds"] for r in records), abs=2.0)
    assert all(r["finished"] >= os.stat(root / r["name"] / runner.ATTEMPTS_FILE).st_mtime - 1.0
               for r in records)
    assert rep["machine"]["cpu_count"] == os.cpu_count()
    assert rep["table1"]["rs_spade"]["psnr"]["mean"] == pytest.approx(fusion_record["scores"]["psnr"], rel=1e-5)
    verdicts = {r["claim"]: r["verdict"] for r in rep["claims"]}
    assert verdicts["Mix 1:1 beats True Data on mIoU"] == "not resolved (1 seed)"
    assert verdicts["RS-SPADE beats pix2pix on PSNR (dB)"] == "not run"
    md = (root / "report.md").read_text()
    assert "## Table 1" in md and "| RS-SPADE | 1 |" in md
    assert (root / "grids" / "table1_rs_spade.png").exists()

    # Runs in epochs trained the steps their own training set makes, and a later
    # session finds every run finished: the record holds the planned config,
    # not the steps resolved from it.
    assert (records[2]["step"], records[3]["step"]) == (2, 4)
    runner.run_plan(runs, root, str(demo_data_dir), print_fn=lines.append, extra=_tiny,
                    devices=jax.devices()[:1])
    assert lines[-1] == "4 of 4 runs already finished; 0 to run."

    # A finished run whose config no longer matches the plan is an error, not a silent mix.
    def longer(run):
        return _tiny(run)[:-1] + ("total_steps=3",) if run.kind == "fusion" else _tiny(run)
    with pytest.raises(runner.UserError, match="another config"):
        runner.run_plan(runs, root, str(demo_data_dir), print_fn=lines.append, extra=longer,
                        devices=jax.devices()[:1])


def test_a_key_added_with_its_neutral_value_keeps_finished_runs_but_no_other_change_does():
    run = plan_lib.plan("bench", tables=("table3",), seeds=1)
    run = next(r for r in run if r.method == "real")
    root = epath.Path("/exp")
    config = runner.run_config(run, root, "/data")
    recorded = runner._portable(runner._resolved(config), root)
    del recorded["data"]["mix_all"]                     # a record from before the key existed
    runner.check_matches(run, {"config": recorded}, config, root)
    config.data.mix_all = True                          # not what the old run did
    with pytest.raises(runner.UserError, match="another config"):
        runner.check_matches(run, {"config": recorded}, config, root)
    config.data.mix_all = False
    config.total_steps += 1                             # any other change still counts
    with pytest.raises(runner.UserError, match="another config"):
        runner.check_matches(run, {"config": recorded}, config, root)


def test_busy_time_is_the_union_of_the_runs_attempts_without_pauses():
    # Two runs side by side (0-100, 50-150), a pause, then a run killed after
    # 30 s at 1000 and resumed at 5000 for its last 20 s: busy 150 + 50 s.
    runs = [report.run_intervals([0.0], 100.0, 100.0),
            report.run_intervals([50.0], 150.0, 100.0),
            report.run_intervals([1000.0, 5000.0], 5020.0, 50.0)]
    assert runs[2] == [(5000.0, 5020.0), (1000.0, 1030.0)]
    assert report.union_seconds([iv for r in runs for iv in r]) == pytest.approx(200.0)
    assert report.union_seconds([(0.0, 10.0), (2.0, 5.0), (20.0, 25.0)]) == pytest.approx(15.0)


def _fake_run(root, run, tiles, history=None):
    out = root / run.name
    out.mkdir(parents=True, exist_ok=True)
    record = {"kind": run.kind, "name": run.name, "table": run.table, "method": run.method,
              "seed": run.seed, "config": {}, "seconds": 1.0, "scores": {}}
    if history is not None:
        record["val_history"] = history
    (out / runner.RUN_FILE).write_text(json.dumps(record))
    with (out / runner.TILES_FILE).open("wb") as f:
        np.savez(f, **tiles)


def test_report_tables_and_verdicts_from_the_runs_files(tmp_path):
    """Three seeds of every Table 1 and Table 3 method, written as the runner
    writes them: a clear PSNR gain must hold, a clear loss be reversed, noise
    stay unresolved; cells are the means of the per-seed metrics."""
    rng = np.random.default_rng(0)
    root = epath.Path(tmp_path)
    runs = plan_lib.plan("bench", seeds=3, tables=("table1", "table3"))
    base = rng.normal(20, 2, 30)
    shift = {"pix2pix": 0.0, "rs_spade": 2.0, "rs_spade_l1": 2.0}
    for run in runs:
        if run.table == "table1":
            psnr = base + shift[run.method] + rng.normal(0, 0.1, 30)
            _fake_run(root, run, {"psnr": psnr, "ssim": np.full(30, 0.5) + rng.normal(0, 0.05, 30),
                                  "sam_sum": np.full(30, 10.0), "sam_count": np.full(30, 100.0)})
        elif run.kind == "segmentation":
            cm = np.zeros((20, 9, 9))
            good = {"real": 80, "mix_1": 60}.get(run.method, 70)
            cm[:, 0, 0], cm[:, 1, 1], cm[:, 0, 1] = good, good, 100 - good
            cm += rng.integers(0, 3, cm.shape)
            history = [{"step": s, "miou": min(1.0, s / 100 * good / 80)} for s in (50, 100, 150)]
            _fake_run(root, run, {"cm": cm}, history)
    rep = report.build_report(root, "bench", runs)
    verdicts = {r["claim"]: r["verdict"] for r in rep["claims"]}
    assert verdicts["RS-SPADE beats pix2pix on PSNR (dB)"] == stats.HOLDS
    assert verdicts["the L1 term improves RS-SPADE (the objective) on PSNR (dB)"] == stats.NOT_RESOLVED
    assert verdicts["Mix 1:1 beats True Data on mIoU"] == stats.REVERSED
    assert verdicts["all three sources beat S1 on PSNR (dB)"] == "not run"
    # A not-resolved claim says how many seeds would resolve its observed difference
    # (rsjax.experiments.stats.seeds_to_resolve); a resolved one does not.
    for row in rep["claims"]:
        assert ("seeds_to_resolve" in row) == (row["verdict"] == stats.NOT_RESOLVED), row["claim"]
    l1 = next(r for r in rep["claims"]
              if r["claim"] == "the L1 term improves RS-SPADE (the objective) on PSNR (dB)")
    assert l1["seeds_to_resolve"] is None or l1["seeds_to_resolve"] > 3
    assert "| seeds to resolve |" in (root / "report.md").read_text()
    per_seed = [stats.image_metric("psnr")(np.load(root / r.name / runner.TILES_FILE))
                for r in runs if r.table == "table1" and r.method == "rs_spade"]
    cell = rep["table1"]["rs_spade"]["psnr"]
    assert cell["mean"] == pytest.approx(np.mean(per_seed))
    assert cell["high"] - cell["mean"] == pytest.approx(
        stats.t_quantile(0.95, 2) * np.std(per_seed, ddof=1) / np.sqrt(3))
    assert (root / "figure8.png").exists() and (root / "report.json").exists()
    speed = rep["claims"][-1]
    assert speed["verdict"] == stats.REVERSED            # the worse Mix never gets there first


def test_claims_resample_scenes_where_the_tiles_name_them(tmp_path):
    """Runs whose per-tile records carry scene ids get the scene-cluster interval
    (and, for one release, the tile bootstrap's beside it); older runs the tile one."""
    rng = np.random.default_rng(5)
    runs = [r for r in plan_lib.plan("bench", seeds=3, tables=("table1",))
            if r.method in ("rs_spade", "pix2pix")]
    scenes = np.repeat([f"scene{k}" for k in range(8)], 4)
    base = rng.normal(20, 2, 32) + np.repeat(rng.normal(0, 2, 8), 4)
    for with_scenes, root in ((True, epath.Path(tmp_path / "new")), (False, epath.Path(tmp_path / "old"))):
        for run in runs:
            tiles = {"psnr": base + (1.0 if run.method == "rs_spade" else 0.0) + rng.normal(0, 0.3, 32),
                     "ssim": np.full(32, 0.5), "sam_sum": np.full(32, 10.0),
                     "sam_count": np.full(32, 100.0)}
            _fake_run(root, run, {**tiles, "scene_id": scenes} if with_scenes else tiles)
        rep = report.build_report(root, "bench", runs)
        row = next(r for r in rep["claims"] if r["claim"] == "RS-SPADE beats pix2pix on PSNR (dB)")
        a = [dict(np.load(root / r.name / runner.TILES_FILE)) for r in runs if r.method == "rs_spade"]
        b = [dict(np.load(root / r.name / runner.TILES_FILE)) for r in runs if r.method == "pix2pix"]
        want = stats.paired_difference(a, b, stats.image_metric("psnr"),
                                       clusters=scenes if with_scenes else None)
        assert row["difference"] == pytest.approx(want.as_dict())
        if with_scenes:
            assert row["interval"] == report.SCENE_BOOTSTRAP
            tile = stats.paired_difference(a, b, stats.image_metric("psnr"))
            assert row["difference_tile_bootstrap"] == pytest.approx(tile.as_dict())
            assert "resampled by scene" in (root / "report.md").read_text()
        else:
            assert row["interval"] == report.TILE_BOOTSTRAP and "difference_tile_bootstrap" not in row


def _finish(root, run):
    """A finished run as the runner records it (its config is the plan's)."""
    out = root / run.name
    out.mkdir(parents=True, exist_ok=True)
    config = runner._portable(runner._resolved(runner.run_config(run, root)), root)
    (out / runner.RUN_FILE).write_text(json.dumps({"kind": run.kind, "name": run.name,
                                                   "seconds": 1.0, "config": config}))


def _hold(root, run, pid):
    """A claim on `run` by process `pid`, as another worker writes it."""
    import psutil
    import socket

    from rsjax import locks

    out = root / run.name
    out.mkdir(parents=True, exist_ok=True)
    (out / runner.CLAIM_FILE).write_text(json.dumps({
        "host": socket.gethostname(), "pid": pid, "identity": locks.process_identity(pid),
        "started": psutil.Process(pid).create_time(),
        "command": "rsjax experiments report", "since": "now"}))


def test_workers_skip_held_runs_and_take_a_run_only_when_its_needs_are_finished(tmp_path):
    """Several workers on one experiment: a run another live worker holds is
    skipped, a run whose generator is unfinished waits, and a claim left by a
    dead worker is taken over."""
    import subprocess
    import sys

    root = epath.Path(tmp_path)
    runs = plan_lib.plan("bench", seeds=1, tables=("table1", "table3"))
    by_name = {r.name: r for r in runs}
    records = [None] * len(runs)

    def next_name():
        i, lock, busy = runner._next_run(runs, records, root, None, None)
        if lock is not None:
            lock.release()
        return (runs[i].name if i is not None else None), busy

    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        _hold(root, by_name["table1/rs_spade/seed0"], other.pid)
        _finish(root, by_name["table1/pix2pix/seed0"])
        # Finished elsewhere: read in; held: skipped; the next generator is taken.
        assert next_name() == ("table1/rs_spade_l1/seed0", ["table1/rs_spade/seed0"])
        assert records[0] is not None
        _finish(root, by_name["table1/rs_spade_l1/seed0"])
        # The synthesis of the held generator and what reads it wait; the next
        # run in plan order that needs nothing unfinished goes.
        assert next_name()[0] == "table3/real/seed0"
        _finish(root, by_name["table3/real/seed0"])
        assert next_name()[0] == "table3/generator_optical_half/seed0"
        for name in ("table3/generator_optical_half/seed0",
                     "generated/generator_optical_half_no_optical/seed0",
                     "table3/real_optical_half/seed0", "table3/new_layouts/seed0"):
            _finish(root, by_name[name])
        name, busy = next_name()
        assert name is None and busy == ["table1/rs_spade/seed0"]
    finally:
        other.kill()
        other.wait()
    # Its worker died: the claim is stale and taken over.
    assert next_name()[0] == "table1/rs_spade/seed0"


def test_run_plan_waits_for_another_worker_and_reads_its_record(tmp_path):
    """The one run left is held by another worker: run_plan waits until that
    worker's run.json appears, then returns its record without running it."""
    import subprocess
    import sys
    import threading

    root = epath.Path(tmp_path)
    run = plan_lib.plan("bench", seeds=1, tables=("table1",))[0]
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        _hold(root, run, other.pid)
        threading.Timer(1.0, _finish, (root, run)).start()
        lines = []
        # Bounded: if the other worker's record never appears, fail in 60 s
        # naming the run waited for (the held run is never trained here).
        records = runner.run_plan([run], root, print_fn=lines.append, poll_seconds=0.2,
                                  max_wait=60)
    finally:
        other.kill()
        other.wait()
    assert records[0]["name"] == run.name
    assert any("waiting for other workers (table1/pix2pix/seed0)" in line for line in lines)


def test_run_plan_waiting_past_max_wait_fails_naming_the_run_it_waited_for(tmp_path):
    import subprocess
    import sys

    root = epath.Path(tmp_path)
    run = plan_lib.plan("bench", seeds=1, tables=("table1",))[0]
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        _hold(root, run, other.pid)
        with pytest.raises(TimeoutError, match="table1/pix2pix/seed0"):
            runner.run_plan([run], root, print_fn=lambda _: None, poll_seconds=0.1, max_wait=0.5)
    finally:
        other.kill()
        other.wait()


_COUNT_XLA_THREADS = """
import os, sys
from rsjax.experiments import workers
workers.become_worker(sys.argv[1])
import jax, jax.numpy as jnp
x = jnp.ones((256, 256)); (x @ x).block_until_ready()
names = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
print(sum("XLAEigen" in n for n in names))
"""


def xla_pool_threads(cores: list[int], environ: dict) -> int:
    """XLA's CPU pool threads in a worker pinned to `cores` (a fresh process)."""
    out = subprocess.run([sys.executable, "-c", _COUNT_XLA_THREADS, ",".join(map(str, cores))],
                         env=environ, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return int(out.stdout.split()[-1])


def test_workers_get_disjoint_cores_and_xla_threads_for_their_cores_only():
    assert workers.cpu_shares([0, 1], 2) == [[0], [1]]
    assert workers.cpu_shares([0, 1, 2, 3, 4], 2) == [[0, 2, 4], [1, 3]]
    with pytest.raises(runner.UserError, match="at most 2 workers"):
        workers.cpu_shares([0, 1], 3)
    cores = sorted(os.sched_getaffinity(0))
    base = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    # A worker on one core runs XLA with one pool thread; on two, two (the
    # affinity is what sizes XLA's pool). Any share's environment must start
    # XLA at all: a stray non-flag token in XLA_FLAGS kills it.
    assert xla_pool_threads(cores[:1], workers.worker_env(cores[:1], base)) == 1
    assert xla_pool_threads(cores[:2], workers.worker_env(cores[:2], base)) == len(cores[:2])
    assert workers.worker_env([3], base)["XLA_FLAGS"] == "--xla_cpu_multi_thread_eigen=false"
    assert "XLA_FLAGS" not in workers.worker_env([0, 1, 2], base)


def test_a_worker_started_by_hand_gets_the_thread_settings_workers_would_give():
    by_hand = {"XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    workers.pin_worker_env([1], by_hand)
    assert by_hand["XLA_FLAGS"].split() == ["--xla_force_host_platform_device_count=1",
                                            "--xla_cpu_multi_thread_eigen=false"]
    assert by_hand["TF_NUM_INTRAOP_THREADS"] == "1"
    # One started by --workers already has them: not added twice.
    started = workers.worker_env([0], {})
    before = dict(started)
    workers.pin_worker_env([0], started)
    assert started == before


def test_the_machine_record_names_the_cpu_model_where_linux_gives_one():
    from rsjax import runtime

    facts = runtime.host()
    assert set(facts) >= {"cpu", "cpu_count", "memory_gib", "jax", "date_utc"}
    try:
        with open("/proc/cpuinfo") as f:
            names = [l.split(":", 1)[1].strip() for l in f if l.startswith("model name")]
    except OSError:
        names = []
    if names:
        assert facts["cpu"] == names[0]
    assert facts["memory_gib"] is None or facts["memory_gib"] > 0


def _fake_table1_and_3(root, seeds=2):
    """Finished Table 1 RS-SPADE, its syntheses and Table 3's real and Mix 1:1
    runs (records only), with the large files the records leave behind."""
    rng = np.random.default_rng(1)
    runs = [r for r in plan_lib.plan("bench", seeds=seeds, tables=("table3",))
            if r.method in ("rs_spade", "real", "mix_1")
            or (r.kind == "synthesize" and "optical" not in r.name)]
    for run in runs:
        if run.kind == "fusion":
            _fake_run(root, run, {"psnr": rng.normal(20, 1, 30), "ssim": np.full(30, 0.5),
                                  "sam_sum": np.full(30, 10.0), "sam_count": np.full(30, 100.0)})
            (root / run.name / "checkpoints" / "400").mkdir(parents=True)
            (root / run.name / "checkpoints" / "400" / "big").write_bytes(b"x" * 1000)
        elif run.kind == "synthesize":
            _fake_run(root, run, {})
            (root / run.name / "part-00000.npz").write_bytes(b"x" * 1000)
        else:
            cm = rng.integers(50, 80, (20, 9, 9))
            _fake_run(root, run, {"cm": cm}, [{"step": s, "miou": 0.1 * s} for s in (1, 2, 3)])
        # The config as the runner records it, so the plan finds these runs finished.
        path = root / run.name / runner.RUN_FILE
        record = json.loads(path.read_text())
        record["config"] = runner.config_record(runner.run_config(run, root), root)
        path.write_text(json.dumps(record))
    return runs


def test_export_carries_the_records_and_the_report_redraws_from_them(tmp_path):
    from rsjax import cli

    root = epath.Path(tmp_path / "exp")
    runs = _fake_table1_and_3(root)
    report.build_report(root, "bench", runs)
    out = tmp_path / "records"
    assert cli.main(["experiments", "export", "--workdir", str(root), "--out_dir", str(out)]) == 0
    copied = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert "table1/rs_spade/seed0/run.json" in copied
    assert "table3/mix_1/seed1/tiles_test.npz" in copied
    assert "report.json" in copied and "figure8.png" in copied
    assert not [p for p in copied if "checkpoints" in p or "part-" in p]     # left behind
    # The report redrawn from the records alone says what the original said.
    again = report.build_report(epath.Path(out), "bench", runs)
    first = json.loads((root / "report.json").read_text())
    assert json.dumps(again["claims"], default=float) == json.dumps(first["claims"])
    assert json.dumps(again["table3"], default=float) == json.dumps(first["table3"])
    with pytest.raises(UserError, match="inside the experiment"):
        export.export_records(root, root / "records")
    with pytest.raises(UserError, match="no finished run"):
        export.export_records(epath.Path(tmp_path / "empty_exp").mkdir() or
                              epath.Path(tmp_path / "empty_exp"), tmp_path / "r2")


def test_a_fresh_machine_continues_from_records_and_says_what_a_run_lacks(tmp_path):
    """Records of finished runs count as finished on another machine; a run
    that reads a finished run's checkpoints or images that stayed behind
    stops before anything runs, naming them, instead of failing mid-way."""
    root = epath.Path(tmp_path / "exp")
    runs = _fake_table1_and_3(root, seeds=1)
    moved = epath.Path(tmp_path / "fresh")
    export.export_records(root, moved)
    # Table 3's runs have not finished on the new machine; its synthesis has.
    for run in runs:
        if run.kind == "segmentation":
            (moved / run.name / runner.RUN_FILE).unlink()
    ran = []

    def run_one(run, root, data_dir, extra, devices):
        ran.append(run.name)
        return {"seconds": 0.0}

    with pytest.raises(UserError) as err:
        runner.run_plan(runs, moved, execute_run=run_one, print_fn=lambda line: None)
    message = str(err.value)
    assert "table3/mix_1/seed0 needs" in message and "part-*.npz" in message
    assert "generated/rs_spade/seed0/run.json aside" in message
    assert ran == ["table3/real/seed0"]        # the run that needs nothing ran first
    # With the images copied in, the rest runs.
    (moved / "generated/rs_spade/seed0/part-00000.npz").write_bytes(b"x")
    runner.run_plan(runs, moved, execute_run=run_one, print_fn=lambda line: None)
    assert ran[-1] == "table3/mix_1/seed0"
    # A synthesis whose generator came without checkpoints says so too.
    synth = next(r for r in runs if r.kind == "synthesize")
    assert runner.missing_inputs(synth, moved) == [
        f"{moved / 'table1/rs_spade/seed0/checkpoints'} (the generator's checkpoints)"]
    assert runner.missing_inputs(synth, root) == []
