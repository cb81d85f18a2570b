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
    assert "±" in dsen2cr_row
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


def test_grid_tiles_cover_every_bin():
    covers = np.array([0.95, 0.0, 0.3, 1.0, 0.05, 0.6, np.nan, 0.99])
    assert experiment.pick_tiles(covers, per_bin=2) == [1, 4, 2, 5, 0, 3]


def test_the_command_is_registered(tmp_path, capsys):
    from rsjax.experiments import SUBCOMMANDS

    assert SUBCOMMANDS["cloud_removal"][0] == "rsjax.experiments.cloud_removal"
    assert experiment.main(["--help"]) == 0 and "SEN12MS-CR" in capsys.readouterr().out
    # Nothing finished and nothing to run: a one-line error, exit 2.
    assert experiment.main(["--workdir", str(tmp_path / "none"), "--no_run"]) == 2
    assert "no such experiment folder" in capsys.readouterr().err
