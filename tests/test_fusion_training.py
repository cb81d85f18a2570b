"""Fusion training end to end: the real trainer, dataset, Orbax checkpoints and
8 fake CPU devices, at tiny width."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from trainer_utils import ROOT, host_numpy, tiny_fusion_config


def _final_params(config, workdir, devices=None):
    from rsjax.trainers import fusion
    _, state, step, _ = fusion.restore_for_eval(config, str(workdir), devices=devices)
    return step, host_numpy(state["g"])


@pytest.mark.parametrize("total,start", [(300, 150), (10, 3), (7, 6), (5, None), (5, 5), (5, 9)])
def test_learning_rate_is_constant_then_linear_to_zero(total, start):
    """optax's schedule gives, bit for bit, the formula the trainers used before it."""
    import jax.numpy as jnp

    from rsjax.trainers.loop import learning_rate_schedule

    def reference(step):            # constant, then linear to 0 at `total`
        if start is None or start >= total:
            return jnp.asarray(2e-4, jnp.float32)
        frac = jnp.clip((step - start) / max(1, total - start), 0.0, 1.0)
        return 2e-4 * (1.0 - frac)

    schedule = learning_rate_schedule(2e-4, total, start)
    steps = jnp.arange(total + 3, dtype=jnp.int32)
    got = np.asarray(jax.jit(jax.vmap(lambda s: jnp.asarray(schedule(s), jnp.float32)))(steps))
    want = np.asarray(jax.jit(jax.vmap(lambda s: jnp.asarray(reference(s), jnp.float32)))(steps))
    np.testing.assert_array_equal(got, want)
    assert got[0] == np.float32(2e-4) and (start is None or start >= total or got[total] == 0)


def test_pix2pix_trains_checkpoints_and_evaluates(demo_data_dir, tmp_path):
    from rsjax.trainers import fusion

    config = tiny_fusion_config(demo_data_dir, "pix2pix", steps=4)
    config.image_every_steps = 4
    result = fusion.train_and_evaluate(config, str(tmp_path))
    assert result["step"] == 4
    for key in ("psnr", "ssim", "sam", "sam_deg"):
        assert np.isfinite(result[key]), key
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "g_loss" in r] == [2, 4]
    assert {"g_adv", "g_l1", "d_loss"} <= set(records[0])
    assert (tmp_path / "config.json").exists()
    assert (tmp_path / "images" / "step_0000004.png").exists()
    assert json.loads((tmp_path / "eval_test.json").read_text())["step"] == 4
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()
                  if p.name.isdigit()) == [2, 4]

    # Written on 8 devices, scored on 1: same numbers, plus the table and figure.
    from rsjax import evaluate
    scored = evaluate.evaluate_checkpoint(config, str(tmp_path), "test", devices=jax.devices()[:1])
    assert scored["devices"] == 1 and scored["step"] == 4
    for key in ("psnr", "ssim", "sam"):
        assert scored[key] == pytest.approx(result[key], rel=1e-4), key
    assert "| pix2pix_unet |" in (tmp_path / "eval_test_4.md").read_text()
    assert (tmp_path / "eval_test_4.png").exists()


@pytest.mark.parametrize("model", ["pix2pix", "rs_spade"])  # rs_spade: spectral norm in bf16
def test_bfloat16_compute_trains(demo_data_dir, tmp_path, model):
    from rsjax.trainers import fusion

    config = tiny_fusion_config(demo_data_dir, model, steps=2)
    config.dtype = "bfloat16"
    config.final_eval_split = ""
    fusion.train_and_evaluate(config, str(tmp_path))
    records = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records and all(np.isfinite(r["g_loss"]) for r in records)
    _, params = _final_params(config, tmp_path)
    assert all(x.dtype != jax.numpy.bfloat16 for x in jax.tree.leaves(params))  # params stay f32


def test_one_and_eight_devices_give_the_same_losses(demo_data_dir, tmp_path):
    """Data parallelism changes where the work runs, not the result."""
    from rsjax.trainers import fusion

    config = tiny_fusion_config(demo_data_dir, "pix2pix", steps=2)
    config.log_every_steps = 1
    config.final_eval_split = ""
    fusion.train_and_evaluate(config, str(tmp_path / "one"), devices=jax.devices()[:1])
    fusion.train_and_evaluate(config, str(tmp_path / "eight"), devices=jax.devices()[:8])

    def losses(run):
        return [(r["g_loss"], r["d_loss"]) for r in map(json.loads,
                (tmp_path / run / "metrics.jsonl").read_text().splitlines()) if "g_loss" in r]

    np.testing.assert_allclose(losses("one"), losses("eight"), rtol=2e-4)


def test_rs_spade_every_source_subset_trains_a_step(demo_data_dir, tmp_path):
    from rsjax.trainers import fusion

    config = tiny_fusion_config(demo_data_dir, "rs_spade", steps=2, sources="lulc+dem")
    config.final_eval_split = "validation"
    result = fusion.train_and_evaluate(config, str(tmp_path))
    assert result["step"] == 2 and np.isfinite(result["psnr"])
    assert json.loads((tmp_path / "config.json").read_text())["data"]["sources"] == ["lulc", "dem"]


def test_nonfinite_step_is_skipped_and_counted(demo_data_dir):
    import functools

    from rsjax import input_pipeline
    from rsjax import mesh as mesh_lib
    from rsjax.trainers import fusion, nonfinite

    config = tiny_fusion_config(demo_data_dir, "pix2pix")
    mesh = mesh_lib.create_mesh()
    setup = fusion.Setup(config, fusion.selected_sources(config))
    state = mesh_lib.init_replicated(setup.init_state, mesh)
    batch = next(input_pipeline.create_iterator(
        config.data, "train", global_batch_size=8, mesh=mesh, train=True, seed=0,
        sources=setup.sources))
    poisoned = dict(batch, image=batch["image"] * np.nan)
    step = jax.jit(functools.partial(fusion.train_step, setup))
    frozen = ("g", "d", "g_opt", "d_opt", "ema")
    before = host_numpy({k: state[k] for k in frozen})
    state, m = step(state, poisoned)
    assert int(m["nonfinite"]) == 1 and int(state["step"]) == 1
    # Everything but the step and the counter is as it was: both networks (and
    # their statistics), both optimizers, the EMA.
    jax.tree.map(np.testing.assert_array_equal, before, host_numpy({k: state[k] for k in frozen}))
    state, m = step(state, batch)          # a finite step resets the counter
    assert int(m["nonfinite"]) == 0 and int(state["step"]) == 2
    changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), before["g"],
                           host_numpy(state["g"]))
    assert any(jax.tree.leaves(changed))
    with pytest.raises(nonfinite.NonFiniteLossError, match="non-finite"):
        nonfinite.check_nonfinite(3, 3, step=7, workdir="w")


def test_poisoned_state_is_never_checkpointed(tmp_path):
    from rsjax.trainers.checkpoints import Checkpointer

    ckpt = Checkpointer(tmp_path, every_steps=1, keep=2, async_save=False)
    good = {"w": jax.numpy.ones(3)}
    assert ckpt.save(1, good, None)
    assert not ckpt.save(2, {"w": jax.numpy.array([1.0, np.nan, 2.0])}, None)
    ckpt.wait()
    assert ckpt.latest_step() == 1
    ckpt.close()


def _train_command(workdir, data_dir, steps, every):
    return [sys.executable, "-m", "rsjax.train", "--config", "pix2pix:demo",
            f"--workdir={workdir}", f"--config.data.data_dir={data_dir}",
            f"--config.total_steps={steps}", f"--config.checkpoint_every_steps={every}",
            "--config.log_every_steps=1", "--config.image_every_steps=0",
            "--config.final_eval_split=", "--config.generator.ngf=4",
            "--config.discriminator.ndf=4", "--config.optim.decay_start_step=100000"]


def test_killed_run_resumes_to_the_same_parameters(demo_data_dir, tmp_path):
    """SIGKILL after the step-k checkpoint, rerun: the same parameters at step 2k
    as a run that was never interrupted (the input iterator resumes too)."""
    k = 3
    env = dict(os.environ, PYTHONUNBUFFERED="1",
               JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"))
    env["XLA_FLAGS"] = env["XLA_FLAGS"].replace("device_count=8", "device_count=2")
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    subprocess.run(_train_command(straight, demo_data_dir, 2 * k, k), cwd=ROOT, env=env,
                   check=True, capture_output=True, timeout=600)

    proc = subprocess.Popen(_train_command(killed, demo_data_dir, 200, k), cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (killed / "checkpoints" / str(k)).exists():
        assert proc.poll() is None, "the run ended before its first checkpoint"
        assert time.time() < deadline, "no checkpoint within 300 s"
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    subprocess.run(_train_command(killed, demo_data_dir, 2 * k, k), cwd=ROOT, env=env,
                   check=True, capture_output=True, timeout=600)

    config = tiny_fusion_config(demo_data_dir, "pix2pix", steps=2 * k)
    config.checkpoint_every_steps = k
    step_a, a = _final_params(config, straight)
    step_b, b = _final_params(config, killed)
    assert step_a == step_b == 2 * k
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=0, atol=1e-6), a, b)
