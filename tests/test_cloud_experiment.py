"""rsjax experiments cloud_removal: its tables from finished runs' per-image
parts (two seeds, intervals), the peers' published numbers labelled as other
data, the choice of tiles for the grid, and the command's registration."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from etils import epath

from rsjax import cloud_metrics as cm
from rsjax.experiments import cloud_removal as experiment
from rsjax.experiments import runner

_parts = jax.jit(cm.cloud_metric_parts)


def _fake_parts(noise: float, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    target = rng.uniform(0.1, 0.5, (6, 16, 16, 4))
    mask = np.zeros((6, 16, 16), np.uint8)
    for k, rows in enumerate([0, 1, 4, 9, 15, 16]):         # covers 0 .. 100 %
        mask[k, :rows] = cm.MASK_CLOUD
    mask[2, 10:12] = cm.MASK_SHADOW
    pred = np.clip(target + noise * rng.normal(size=target.shape), 0, 1)
    return cm.concat_parts([_parts(jnp.asarray(pred), jnp.asarray(target), jnp.asarray(mask))])


def _write_run(root: epath.Path, key: str, seed: int, noise: float) -> None:
    out = root / key / f"seed{seed}"
    out.mkdir(parents=True)
    variants = {"output": _fake_parts(noise, seed), "composite": _fake_parts(noise / 2, seed),
                "cloudy_input": _fake_parts(0.2, 99)}
    with (out / experiment.RESULTS_FILE).open("wb") as f:
        np.savez_compressed(f, **{f"{v}/{k}": a for v, p in variants.items() for k, a in p.items()})
    (out / experiment.RUN_FILE).write_text(json.dumps(
        {"method": key, "seed": seed, "config": {}, "seconds": 12.0, "cpu_seconds": 20.0, "step": 300,
         "attempts": 1 + seed, "cpu_seconds_of_all_attempts": seed == 0}))


def test_report_from_finished_runs(tmp_path):
    root = epath.Path(tmp_path)
    methods = [m for m in experiment.METHODS if m.key in ("rs_spade_all", "dsen2cr")]
    for seed in (0, 1):
        _write_run(root, "rs_spade_all", seed, 0.05)
        _write_run(root, "dsen2cr", seed, 0.02)
    rows = experiment.collect(root, methods, seeds=2)
    assert list(rows) == ["cloudy_input", "rs_spade_all", "rs_spade_all_composite", "dsen2cr"]
    assert len(rows["dsen2cr"]["runs"]) == 2 and len(rows["cloudy_input"]["runs"]) == 1
    records = [json.loads((root / k / f"seed{s}" / experiment.RUN_FILE).read_text())
               for k in ("rs_spade_all", "dsen2cr") for s in (0, 1)]
    text = experiment.report_markdown(rows, "demo", records, None)
    # Our rows with intervals over the two seeds, the peers' rows labelled as other data.
    dsen2cr_row = next(line for line in text.splitlines() if line.startswith("| DSen2-CR | S2 cloudy + S1 |"))
    # Each cell is the mean over the two seeds ± the t-interval's half width
    # (t at 97.5 % with 1 degree of freedom: 12.706, any statistics table).
    expected = []
    for metric, _, fmt in experiment.COLUMNS:
        per_seed = [cm.split_metric(metric, "all")(r) for r in rows["dsen2cr"]["runs"]]
        half = 12.706 * np.std(per_seed, ddof=1) / np.sqrt(2)
        expected.append(f"{fmt.format(np.mean(per_seed))} ± {fmt.format(half)}")
    assert dsen2cr_row == "| DSen2-CR | S2 cloudy + S1 | " + " | ".join(expected) + " |"
    for label, _, (psnr, ssim, sam) in experiment.PEERS:
        row = next(line for line in text.splitlines() if label in line)
        assert "published, other data" in row and psnr in row
    assert "| tiles | 2 | 1 | 1 | 2 |" in text                  # tiles per cover bin
    assert "| dsen2cr/seed0 | 300 | 12 s | 20 s |" in text
    assert "| dsen2cr/seed1 | 300 | 12 s | 20 s (last of 2 attempts) |" in text   # resumed once
    # The numbers are the split metrics of the parts, averaged over seeds.
    want = np.mean([cm.split_metric("psnr", "cloud")(r) for r in rows["dsen2cr"]["runs"]])
    got = experiment.report_json(rows)["ours"]["dsen2cr"]["cells"]["cloud/psnr"]["mean"]
    assert got == pytest.approx(want)
    published = experiment.report_json(rows)["published_other_data"]
    assert {p["method"] for p in published} == {label for label, _, _ in experiment.PEERS}


def test_claims_pair_seeds_and_resample_scenes_where_runs_name_them(tmp_path):
    """A claim is the paired difference of a per-image metric in a region over
    the seeds both methods ran: its mean is the seeds' mean difference of the
    split metrics (recomputed here from the parts), its verdict follows the
    metric's direction, and the test images' scenes are resampled once the
    runs record them."""
    from rsjax.experiments import stats

    root = epath.Path(tmp_path)
    for seed in (0, 1, 2):
        _write_run(root, "rs_spade_s1", seed, 0.02)
        _write_run(root, "dsen2cr", seed, 0.06)
    methods = [m for m in experiment.METHODS if m.key in ("rs_spade_s1", "dsen2cr")]

    def psnr_under_cloud(parts):
        r = cm.REGIONS.index("cloud")
        n = np.asarray(parts["n_pixels"])[:, r]
        mse = np.asarray(parts["sq_sum"])[n > 0, r] / n[n > 0]
        return np.mean(10 * np.log10(1 / mse))

    def found(rows):
        return {(r["a"], r["b"], r["region"], r["metric"]): r for r in experiment.claims(rows)}

    rows = experiment.collect(root, methods, seeds=3)
    # The claims average per-image values: their nanmean is the split metric.
    for parts in rows["dsen2cr"]["runs"][:1] + rows["cloudy_input"]["runs"]:
        for metric in cm.METRICS:
            for region in cm.REGIONS:
                assert np.nanmean(cm.per_image_metric(parts, metric, region)) == pytest.approx(
                    cm.split_metric(metric, region)(parts), nan_ok=True)
    want = np.mean([psnr_under_cloud(a) - psnr_under_cloud(b)
                    for a, b in zip(rows["rs_spade_s1"]["runs"], rows["dsen2cr"]["runs"])])
    claimed = found(rows)
    row = claimed[("rs_spade_s1", "dsen2cr", "cloud", "psnr")]
    assert row["difference"]["mean"] == pytest.approx(want) and want > 5
    assert row["seeds"] == [0, 1, 2] and row["verdict"] == stats.HOLDS
    assert row["interval"] == stats.TILE_BOOTSTRAP                 # no scenes recorded yet
    assert claimed[("rs_spade_s1", "dsen2cr", "cloud", "sam_deg")]["verdict"] == stats.HOLDS
    assert claimed[("rs_spade_all", "dsen2cr_all", "cloud", "psnr")]["verdict"] == "not run"
    assert ("dsen2cr", "cloudy_input", "shadow", "ssim") in claimed   # each row vs the input
    # Each run names its test images' scenes: the scenes are resampled, the mean is the same.
    for key in ("rs_spade_s1", "dsen2cr"):
        for seed in (0, 1, 2):
            with (root / key / f"seed{seed}" / runner.SCENES_FILE).open("wb") as f:
                np.savez_compressed(f, scene_id=np.array(["a", "a", "b", "b", "c", "c"]))
    rows = experiment.collect(root, methods, seeds=3)
    claimed = found(rows)
    row = claimed[("rs_spade_s1", "dsen2cr", "cloud", "psnr")]
    assert row["interval"] == stats.SCENE_BOOTSTRAP
    assert row["difference"]["mean"] == pytest.approx(want)
    # One scene for every image: nothing to resample by scene, so images are (and say so).
    for key in ("rs_spade_s1", "dsen2cr"):
        for seed in (0, 1, 2):
            with (root / key / f"seed{seed}" / runner.SCENES_FILE).open("wb") as f:
                np.savez_compressed(f, scene_id=np.array(["a"] * 6))
    one_scene = found(experiment.collect(root, methods, seeds=3))
    assert one_scene[("rs_spade_s1", "dsen2cr", "cloud", "psnr")]["interval"] == stats.TILE_BOOTSTRAP
    text = experiment.report_markdown(rows, "demo", [], None, claim_rows=list(claimed.values()))
    assert ("| RS-SPADE beats DSen2-CR on the peers' inputs (S2 cloudy + S1) | cloud | PSNR (dB) | "
            f"{want:+.4g} [") in text


def test_the_uncertainty_table_is_each_seeds_scores_averaged(tmp_path):
    from rsjax import uncertainty_metrics as um

    root = epath.Path(tmp_path)
    methods = [m for m in experiment.METHODS if m.key in ("uncrtaints", "dsen2cr")]
    per_seed = []
    for seed in (0, 1):
        rng = np.random.default_rng(seed)
        n = rng.integers(100, 200, 30).astype(np.float64)
        var = rng.uniform(0.001, 0.01, 30)
        parts = {"n": n, "var": var * n, "se": var * n * rng.uniform(0.5, 2.0, 30),
                 "nll": rng.normal(-2.0, 0.1, 30) * n}
        out = root / "uncrtaints" / f"seed{seed}"
        out.mkdir(parents=True)
        with (out / experiment.UNCERTAINTY_FILE).open("wb") as f:
            np.savez_compressed(f, **parts)
        per_seed.append(um.uncertainty_scores(parts))
    (root / "dsen2cr" / "seed0").mkdir(parents=True)          # no variance: no row
    rows = experiment.uncertainty_rows(root, methods, seeds=2)
    assert list(rows) == ["uncrtaints"]
    uce = [t["uce"] for t in per_seed]
    half = 12.706 * np.std(uce, ddof=1) / np.sqrt(2)
    row = next(line for line in experiment.uncertainty_table(rows).splitlines()
               if line.startswith("| UnCRtainTS |"))
    assert f"| {np.mean(uce):.4f} ± {half:.4f} |" in row
    assert rows["uncrtaints"]["cells"]["nll"].mean == pytest.approx(np.mean([t["nll"] for t in per_seed]))


def test_grid_tiles_cover_every_bin():
    covers = np.array([0.95, 0.0, 0.3, 1.0, 0.05, 0.6, np.nan, 0.99])
    assert experiment.pick_tiles(covers, per_bin=2) == [1, 4, 2, 5, 0, 3]


def test_the_command_is_registered(tmp_path, capsys):
    from rsjax.experiments import SUBCOMMANDS

    assert SUBCOMMANDS["cloud_removal"][0] == "rsjax.experiments.cloud_removal"
    assert experiment.main(["--help"]) == 0 and "SEN12MS-CR" in capsys.readouterr().out
    # Nothing finished and nothing to run: a one-line error, exit 2.
    assert experiment.main(["--workdir", str(tmp_path / "none")]) == 2
    assert "no such experiment folder" in capsys.readouterr().err


def _hold(folder: epath.Path, pid: int) -> None:
    """A claim on a run's folder by process `pid`, as another worker writes it."""
    import socket

    import psutil

    from rsjax import locks

    folder.mkdir(parents=True, exist_ok=True)
    (folder / runner.CLAIM_FILE).write_text(json.dumps({
        "host": socket.gethostname(), "pid": pid, "identity": locks.process_identity(pid),
        "started": psutil.Process(pid).create_time(),
        "command": "rsjax experiments cloud_removal", "since": "now"}))


def _finish(root: epath.Path, key: str, seed: int) -> dict:
    """The record a finished run leaves, with the config the experiment asks for."""

    method = next(m for m in experiment.METHODS if m.key == key)
    config = runner.config_record(experiment.method_config(method, "demo", seed), root)
    record = {"method": key, "seed": seed, "seconds": 3.0, "config": config}
    out = root / key / f"seed{seed}"
    out.mkdir(parents=True, exist_ok=True)
    (out / experiment.RUN_FILE).write_text(json.dumps(record))
    return record


def test_workers_share_the_runs_skip_held_ones_and_wait_for_them(tmp_path):
    """The experiment's runs go through the experiments' runner (run_plan): a
    finished run is read, a run another live worker holds is skipped and waited
    for (its record read once it appears), the others run here, each under a
    claim on `<workdir>/<method>/seed<k>` that is released after it."""
    import subprocess
    import sys
    import threading


    root = epath.Path(tmp_path)
    a, b, c = (m for m in experiment.METHODS if m.key in ("rs_spade_s1", "dsen2cr", "dsen2cr_all"))
    runs = [experiment.method_run(m, "demo", 0) for m in (a, b, c)]
    _finish(root, a.key, 0)
    ran = []

    def run_one(run, root_, data_dir, extra, devices):       # stands in for training
        assert (root_ / run.name / runner.CLAIM_FILE).exists()        # claimed while it runs
        ran.append(run.method)
        return _finish(root_, run.method, run.seed)

    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    lines = []
    try:
        _hold(root / b.key / "seed0", other.pid)
        threading.Timer(1.5, _finish, (root, b.key, 0)).start()
        records = runner.run_plan(runs, root, print_fn=lines.append, poll_seconds=0.2,
                                  execute_run=run_one)
    finally:
        other.kill()
        other.wait()
    assert ran == ["dsen2cr_all"]                             # only the free, unfinished run
    assert [r["method"] for r in records] == ["rs_spade_s1", "dsen2cr", "dsen2cr_all"]
    assert not (root / c.key / "seed0" / runner.CLAIM_FILE).exists()     # released
    assert any(line.startswith("[2/3] dsen2cr_all/seed0 (cloud_removal) | ETA of the rest")
               for line in lines)
    assert any("waiting for other workers (dsen2cr/seed0)" in line for line in lines)


def test_a_worker_is_the_same_command_on_its_cores():
    """--workers starts copies of the command with the same choices."""
    import argparse

    parser = argparse.ArgumentParser()
    experiment.add_arguments(parser)
    args = parser.parse_args(["--scale", "bench", "--workdir", "w", "--seeds", "3",
                              "--only", "dsen2cr,rs_spade_all", "--steps", "5", "--workers", "2",
                              "--data_dir", "d"])
    command = experiment._worker_command(args, epath.Path("/abs/w"))
    assert command[1:3] == ["-m", "rsjax.experiments.cloud_removal"]
    again = parser.parse_args(command[3:] + ["--worker_cpus", "1"])
    for name in ("scale", "seeds", "only", "steps", "workers", "data_dir"):
        assert getattr(again, name) == getattr(args, name), name
    assert again.workdir == "/abs/w" and again.worker_cpus == "1"


# ---------------------------------------------------------------------------
# A real run through the runner, and write_grid: the suite's tiny DSen2-CR, 2 steps
# ---------------------------------------------------------------------------
def _method_with_config(config, folder) -> experiment.Method:
    """The experiment's DSen2-CR method with `config`: a Method's config may
    be a saved config.json, which keeps the run as cheap as the suite's tiny one."""
    import dataclasses

    from rsjax import logging_utils

    logging_utils.write_config(config, folder)
    dsen2cr = next(m for m in experiment.METHODS if m.key == "dsen2cr")
    return dataclasses.replace(dsen2cr, config=str(folder / "config.json"))


@pytest.fixture(scope="module")
def finished_dsen2cr(cloudy_data_dir, tmp_path_factory):
    """(root, method, record) of the experiment's one DSen2-CR run, trained once."""
    from trainer_utils import tiny_cloud_config

    method = _method_with_config(tiny_cloud_config(cloudy_data_dir), tmp_path_factory.mktemp("config"))
    root = epath.Path(tmp_path_factory.mktemp("experiment"))
    [record] = runner.run_plan([experiment.method_run(method, "demo", 0)], root)
    return root, method, record


def test_a_method_trains_once_then_its_record_is_read(finished_dsen2cr, cloudy_data_dir, tmp_path):
    from trainer_utils import tiny_cloud_config


    root, method, record = finished_dsen2cr
    out = root / "dsen2cr" / "seed0"
    assert json.loads((out / experiment.RUN_FILE).read_text()) == record
    assert record["method"] == "dsen2cr" and record["seed"] == 0 and record["step"] == 2
    assert record["config"]["seed"] == 0 and record["config"]["model"]["features"] == 8
    assert record["attempts"] == 1 and record["seconds"] > 0
    from rsjax import provenance
    assert record["provenance"]["dataset"] == provenance.dataset_fingerprint(
        tiny_cloud_config(cloudy_data_dir).data)
    assert record["provenance"]["code"] == provenance.code()
    # Its per-image parts are what the tables read: one value per test tile.
    rows = experiment.collect(root, [method], seeds=1)
    assert list(rows) == ["cloudy_input", "dsen2cr"]
    assert len(np.asarray(rows["dsen2cr"]["runs"][0]["cover"])) == 5    # conftest.CLOUDY_DATA's test split
    # The run names its test images' scenes, in the split's order, for the claims' bootstrap.
    assert list(rows["dsen2cr"]["scenes"]) == list(runner.test_scene_ids(
        tiny_cloud_config(cloudy_data_dir).data, 5))
    # Asked again, the finished run is read, not trained (no new attempt), also
    # from datasets moved elsewhere (data_dir is not part of a run's identity).
    attempts = (out / runner.ATTEMPTS_FILE).read_text()
    assert runner.run_plan([experiment.method_run(method, "demo", 0)], root,
                           data_dir=str(tmp_path)) == [record]
    assert (out / runner.ATTEMPTS_FILE).read_text() == attempts
    # Another config for the same folder is refused, naming the folder; nothing moves.
    other = tiny_cloud_config(cloudy_data_dir)
    other.optim.lr = 1e-3
    changed = _method_with_config(other, tmp_path)
    with pytest.raises(experiment.UserError, match="finished with another config") as err:
        runner.run_plan([experiment.method_run(changed, "demo", 0)], root)
    assert str(out) in str(err.value)
    assert json.loads((out / experiment.RUN_FILE).read_text()) == record


def test_write_grid_shows_each_method_on_tiles_of_every_cover_bin(finished_dsen2cr):
    """The grid is the cloudy input, the run's own output, the clear truth and
    the mask, on up to 2 test tiles per cover bin, pixel for pixel."""
    from PIL import Image

    from rsjax import input_pipeline, viz
    from rsjax.trainers import cloud_eval, cloud_removal

    root, method, _ = finished_dsen2cr
    assert experiment.write_grid(root, [method], "demo", seed=1) is None     # nothing finished
    path = experiment.write_grid(root, [method], "demo", seed=0)
    assert path == str(root / "grids" / "cloud_removal_seed0.png")

    config = experiment.method_config(method, "demo", 0)
    builder = input_pipeline.get_builder(config.data)
    source = builder.as_data_source(split="test")
    covers = np.array([float(t["cloud_cover"]) for t in source])
    chosen = experiment.pick_tiles(covers)
    bins = set(cm.cover_bin_index(covers).tolist())
    assert set(cm.cover_bin_index(covers[chosen]).tolist()) == bins and len(bins) > 1
    norm = input_pipeline.Normalizer.from_statistics(input_pipeline.load_statistics(builder))
    tiles = [input_pipeline.normalize_tile(source[i], norm, ("lulc", "s1", "dem", "s2_cloudy"))
             for i in chosen]
    batch = {k: np.stack([t[k] for t in tiles]) for k in ("s1", "s2_cloudy", "image", "cloud_mask")}
    remove_clouds, step = cloud_removal.load_inference(config, str(root / "dsen2cr" / "seed0"),
                                                       devices=jax.devices()[:1])
    assert step == 2
    output = np.asarray(remove_clouds(batch))
    assert not np.allclose(output, batch["s2_cloudy"])          # the model's image, not its input
    rows = {"cloudy": batch["s2_cloudy"], "DSen2-CR (S2 cloudy + S1)": output,
            "clear truth": batch["image"], "cloud mask": batch["cloud_mask"]}
    want = viz.render_grid(rows, label_width=190, column_titles=[
        f"cover {100 * covers[i]:.0f}%" for i in chosen], **cloud_eval.grid_options(rows))
    np.testing.assert_array_equal(np.asarray(Image.open(path).convert("RGB")), want)
