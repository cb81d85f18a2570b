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

from trainer_utils import ROOT, convolution_dtypes, host_numpy, tiny_fusion_config


def _final_params(config, workdir, devices=None):
    from rsjax.trainers import fusion
    _, state, step, _ = fusion.restore_for_eval(config, str(workdir), devices=devices)
    return step, host_numpy(state["g"])


@pytest.mark.parametrize("total,start", [(300, 150), (10, 3), (7, 6), (5, None), (5, 5), (5, 9)])
def test_learning_rate_is_constant_then_linear_to_zero(total, start):
    """optax's schedule gives the formula the trainers used before it, to 1 ulp:
    the two round differently at some steps under the older CPU emitters the
    tests compile with (conftest.TEST_XLA_FLAGS; bit for bit under the
    default ones), and optax's is -9e-12, not 0, past the last update."""
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
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-11)
    assert got[0] == np.float32(2e-4) and (start is None or start >= total or abs(got[total]) < 1e-11)


@pytest.mark.parametrize("name", ["fusion:demo", "pix2pix:demo", "segmentation:demo"])
def test_demo_optimizers_decay_linearly_over_the_second_half(name):
    """The optimizers the trainers build from each demo config: the step size
    of every update, written out independently, is the base rate for the first
    150 of 300 updates, then falls linearly to base / 150 at the last one.

    With a constant gradient Adam's bias-corrected moments are g and g^2, so
    an update is -lr * g / (|g| + eps): the learning rate itself. Parameters
    stay at 0 (updates not applied), so AdamW's decoupled weight decay adds 0.
    """
    import jax.numpy as jnp

    from trainer_utils import load_config

    config = load_config(*name.split(":"))
    assert (config.total_steps, config.optim.decay_start_step) == (300, 150)
    if config.trainer == "fusion":
        from rsjax.trainers import fusion
        g_tx, d_tx = fusion.make_optimizers(config)
        optimizers = {"generator": (g_tx, config.optim.g_lr),
                      "discriminator": (d_tx, config.optim.d_lr)}
    else:
        from rsjax.trainers import segmentation
        config.model.width = 4
        optimizers = {"model": (segmentation.Setup(config).tx, config.optim.lr)}
    params = {"w": jnp.zeros(3)}
    grads = {"w": jnp.full(3, 0.5)}
    count = np.arange(300)
    for which, (tx, base) in optimizers.items():
        def update(opt_state, _):
            updates, opt_state = tx.update(grads, opt_state, params)
            return opt_state, -updates["w"][0]
        _, step_sizes = jax.lax.scan(update, tx.init(params), None, length=300)
        want = np.where(count < 150, base, base * (1 - (count - 150) / 150))
        np.testing.assert_allclose(np.asarray(step_sizes), want, rtol=1e-4, err_msg=which)
        assert np.asarray(step_sizes)[-1] == pytest.approx(base / 150, rel=1e-4)


def pix2pix_config(data_dir):
    """The tiny pix2pix run of these tests, with the demo configs' learning-rate
    decay on (they decay over the second half; the other tests turn it off)."""
    config = tiny_fusion_config(data_dir, "pix2pix", steps=4)
    config.optim.decay_start_step = 2
    config.image_every_steps = 4
    return config


@pytest.fixture(scope="module")
def pix2pix_run(demo_data_dir, tmp_path_factory):
    from rsjax.trainers import fusion

    config = pix2pix_config(demo_data_dir)
    workdir = tmp_path_factory.mktemp("pix2pix") / "run"
    return config, workdir, fusion.train_and_evaluate(config, str(workdir))


def test_pix2pix_trains_checkpoints_and_evaluates(pix2pix_run):
    config, tmp_path, result = pix2pix_run
    assert result["step"] == 4
    for key in ("psnr", "ssim", "sam", "sam_deg"):
        assert np.isfinite(result[key]), key
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "g_loss" in r] == [2, 4]
    assert {"g_adv", "g_l1", "d_loss"} <= set(records[0])
    # The decay from step 2 of 4: step s is made at optax count s - 1, so
    # steps 1-3 at 2e-4 and step 4 at half of it (an independent formula).
    rates = {r["step"]: r["learning_rate/generator"] for r in records if "g_loss" in r}
    assert rates == {2: pytest.approx(2e-4), 4: pytest.approx(1e-4)}
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


def test_evaluate_command_scores_the_step_it_is_given(pix2pix_run, capsys):
    """`rsjax evaluate --step 2` scores checkpoint 2 (not the latest, 4): the
    printed scores are what the library gives for step 2, and differ from step 4's."""
    from rsjax import cli
    from rsjax.trainers import fusion

    config, workdir, _ = pix2pix_run
    assert cli.main(["evaluate", "--workdir", str(workdir), "--step", "2",
                     "--split", "validation"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["step"] == 2 and printed["split"] == "validation"
    assert json.loads((workdir / "eval_validation_2.json").read_text()) == printed
    want, _ = fusion.evaluate_checkpoint(config, str(workdir), "validation", step=2)
    latest, _ = fusion.evaluate_checkpoint(config, str(workdir), "validation")
    assert latest["step"] == 4 and latest["psnr"] != pytest.approx(want["psnr"], rel=1e-6)
    for key in ("psnr", "ssim", "sam"):
        assert printed[key] == pytest.approx(want[key], rel=1e-6), key

    assert cli.main(["evaluate", "--workdir", str(workdir), "--step", "3"]) == 2
    err = capsys.readouterr().err
    assert "step 3" in err and "2, 4" in err and "Traceback" not in err


def test_sigterm_saves_stops_and_the_rerun_resumes_to_the_same_parameters(
        pix2pix_run, tmp_path, monkeypatch, caplog):
    """SIGTERM (what schedulers send before preempting) during step 2 of 4:
    the run saves step 2 (no periodic checkpoint is due) and returns
    preempted; the same call again resumes from step 2 and ends with the
    parameters of the uninterrupted run."""
    import logging
    import os
    import signal

    from rsjax import logging_utils
    from rsjax.trainers import fusion

    config, straight, _ = pix2pix_run
    config = config.copy_and_resolve_references()
    config.checkpoint_every_steps = 100
    config.final_eval_split = ""
    write_scalars = logging_utils.MetricWriter.write_scalars

    def terminated_at_step_2(self, step, scalars):
        write_scalars(self, step, scalars)
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)       # handled by the loop's PreemptionWatcher

    received = []                   # without the loop's handler, SIGTERM lands here
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
    try:
        with monkeypatch.context() as patch:
            patch.setattr(logging_utils.MetricWriter, "write_scalars", terminated_at_step_2)
            stopped = fusion.train_and_evaluate(config, str(tmp_path))
        assert signal.getsignal(signal.SIGTERM) is not previous   # the loop put ours back
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert not received and stopped == {"step": 2, "preempted": True}
    # Step 2 saved on the way out, and only it: no periodic checkpoint was due (and
    # the first step is not saved on its own, as Orbax's default policy would).
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()
                  if p.name.isdigit()) == [2]

    with caplog.at_level(logging.INFO, logger="rsjax"):
        resumed = fusion.train_and_evaluate(config, str(tmp_path))
    assert resumed == {"step": 4}
    assert "Resumed from step 2" in caplog.text
    step_a, a = _final_params(config, straight)
    step_b, b = _final_params(config, tmp_path)
    assert step_a == step_b == 4
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=0, atol=1e-6), a, b)


@pytest.mark.parametrize("model", ["pix2pix", "rs_spade"])  # rs_spade: spectral norm in bf16
def test_bfloat16_compute_trains(demo_data_dir, tmp_path, model):
    import functools

    from rsjax import input_pipeline
    from rsjax.trainers import fusion

    config = tiny_fusion_config(demo_data_dir, model, steps=2)
    config.dtype = "bfloat16"
    config.final_eval_split = ""
    # Every convolution of the step (both networks, forward and backward) takes
    # bfloat16 operands: the program that runs, traced (not compiled) here.
    setup = fusion.Setup(config, fusion.selected_sources(config))
    batch = next(input_pipeline.create_iterator(
        config.data, "train", global_batch_size=8, mesh=None, train=True, seed=0,
        sources=setup.sources))
    jaxpr = jax.make_jaxpr(functools.partial(fusion.train_step, setup))(
        jax.eval_shape(setup.init_state), batch)
    convolutions = convolution_dtypes(jaxpr.jaxpr)
    assert len(convolutions) > 20
    assert [d for d in convolutions if d != ("bfloat16", "bfloat16")] == []

    # Two real steps of that program (one device: the loop around it has its own tests).
    step = jax.jit(functools.partial(fusion.train_step, setup), donate_argnums=(0,))
    state = jax.jit(setup.init_state)()
    for _ in range(2):
        state, metrics = step(state, batch)
        assert np.isfinite(float(metrics["g_loss"])) and np.isfinite(float(metrics["d_loss"]))
        assert int(metrics["nonfinite"]) == 0
    floats = [x for x in jax.tree.leaves(state) if jax.numpy.issubdtype(x.dtype, jax.numpy.floating)]
    assert floats and all(x.dtype == jax.numpy.float32 for x in floats)   # params stay f32


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


def test_rs_spade_builds_and_traces_its_train_step_for_every_source_subset(demo_data_dir):
    """Each of the 7 source subsets builds its RS-SPADE and traces its whole train step
    (jax.eval_shape: every shape of the program, nothing compiled: one compile
    costs about 30 s on 2 cores). Real RS-SPADE steps run in test_bfloat16_compute_trains and
    test_cloud_removal's RS-SPADE run."""
    import functools
    import itertools

    from rsjax import input_pipeline
    from rsjax.data.contract import SOURCES
    from rsjax.trainers import fusion

    config = tiny_fusion_config(demo_data_dir, "rs_spade")
    # A batch of every source: each subset's step takes its own sources from it.
    batch = next(input_pipeline.create_iterator(
        config.data, "train", global_batch_size=8, mesh=None, train=True, seed=0, sources=SOURCES))
    batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), batch)

    def shape_and_dtype(x):
        return x.shape, x.dtype

    traced = []
    for subset in (c for n in range(1, len(SOURCES) + 1) for c in itertools.combinations(SOURCES, n)):
        config.data.sources = subset
        setup = fusion.Setup(config, fusion.selected_sources(config))
        abstract = jax.eval_shape(setup.init_state)
        state, metrics = jax.eval_shape(functools.partial(fusion.train_step, setup), abstract, batch)
        assert set(abstract["g"]["embed"].keys()) == set(subset)      # one embedding per source
        # The step returns the state it took: every array of the same shape and dtype.
        assert jax.tree.map(shape_and_dtype, state) == jax.tree.map(shape_and_dtype, abstract)
        assert metrics["g_loss"].shape == metrics["d_loss"].shape == ()
        traced.append(subset)
    assert len(traced) == 7


@pytest.fixture(scope="module")
def pix2pix_step(demo_data_dir):
    """(config, setup, mesh, initial state, a train batch, the jitted step) of a
    tiny pix2pix on 8 devices, compiled once for the tests that step by hand.
    EMA decay 0.5, so that the EMA is far from the parameters after 2 steps."""
    import functools

    from rsjax import input_pipeline
    from rsjax import mesh as mesh_lib
    from rsjax.trainers import fusion

    config = tiny_fusion_config(demo_data_dir, "pix2pix")
    config.ema_decay = 0.5
    mesh = mesh_lib.create_mesh()
    setup = fusion.Setup(config, fusion.selected_sources(config))
    state = mesh_lib.init_replicated(setup.init_state, mesh)
    batch = next(input_pipeline.create_iterator(
        config.data, "train", global_batch_size=8, mesh=mesh, train=True, seed=0,
        sources=setup.sources))
    step = jax.jit(functools.partial(fusion.train_step, setup))
    return config, setup, mesh, state, batch, step


def _generator_params(setup, g_state):
    from flax import nnx

    _, params, _ = nnx.split(nnx.merge(setup.g_train_graph, g_state), nnx.Param, ...)
    return params


def test_nonfinite_step_is_skipped_and_counted(pix2pix_step):
    from rsjax.trainers import nonfinite

    _, _, _, state, batch, step = pix2pix_step
    poisoned = dict(batch, image=batch["image"] * np.nan)
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


def test_ema_follows_the_generator_and_evaluation_uses_it_when_asked(pix2pix_step):
    """After two steps the EMA is 0.5 * (0.5 * initial + 0.5 * p1) + 0.5 * p2
    (computed here from the parameters of each step); evaluating with
    eval_use_ema=True scores the EMA weights: the same scores as the generator
    with its parameters replaced by the EMA, not those of its own parameters."""
    from flax import nnx

    from rsjax.trainers import fusion

    config, setup, mesh, state, batch, step = pix2pix_step
    ema = host_numpy(_generator_params(setup, state["g"]))
    for _ in range(2):
        state, _ = step(state, batch)
        params = host_numpy(_generator_params(setup, state["g"]))
        ema = jax.tree.map(lambda e, p: 0.5 * e + 0.5 * p, ema, params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                 ema, host_numpy(state["ema"]))
    assert not all(np.allclose(a, b) for a, b in zip(
        jax.tree.leaves(ema), jax.tree.leaves(params), strict=True))

    def scores(use_ema, state):
        c = config.copy_and_resolve_references()
        c.eval_use_ema = use_ema
        return fusion.evaluate_split(setup, state, c, "validation", mesh, max_batches=1)[0]

    _, _, rest = nnx.split(nnx.merge(setup.g_train_graph, state["g"]), nnx.Param, ...)
    ema_as_params = dict(state, g=nnx.state(nnx.merge(setup.g_train_graph, state["ema"], rest)))
    with_ema, own, swapped = scores(True, state), scores(False, state), scores(False, ema_as_params)
    assert with_ema["psnr"] == pytest.approx(swapped["psnr"], rel=1e-6)
    assert with_ema["ssim"] == pytest.approx(swapped["ssim"], rel=1e-6)
    assert with_ema["psnr"] != pytest.approx(own["psnr"], rel=1e-4)


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
    """SIGKILL after the step-k checkpoint, rerun: the rerun resumes from the
    last checkpoint the killed run left (k or a later multiple of k, before the
    last step) and reaches the same parameters at step 4k as a run that was
    never interrupted (the input iterator resumes too)."""
    import re

    k, total = 3, 12
    env = dict(os.environ, PYTHONUNBUFFERED="1",
               JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"))
    env["XLA_FLAGS"] = " ".join([f for f in env["XLA_FLAGS"].split()
                                 if not f.startswith("--xla_force_host_platform_device_count")]
                                + ["--xla_force_host_platform_device_count=2"])
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    subprocess.run(_train_command(straight, demo_data_dir, total, k), cwd=ROOT, env=env,
                   check=True, capture_output=True, timeout=600)

    proc = subprocess.Popen(_train_command(killed, demo_data_dir, 200, k), cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (killed / "checkpoints" / str(k)).exists():
        assert proc.poll() is None, "the run ended before its first checkpoint"
        assert time.time() < deadline, "no checkpoint within 300 s"
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    left = max(int(p.name) for p in (killed / "checkpoints").iterdir() if p.name.isdigit())
    assert k <= left < total, f"the killed run saved step {left}: nothing left to resume"
    rerun = subprocess.run(_train_command(killed, demo_data_dir, total, k), cwd=ROOT, env=env,
                           check=True, capture_output=True, text=True, timeout=600)
    resumed = [int(n) for n in re.findall(r"Resumed from step (\d+)", rerun.stderr)]
    assert resumed == [left], rerun.stderr[-3000:]

    config = tiny_fusion_config(demo_data_dir, "pix2pix", steps=total)
    config.checkpoint_every_steps = k
    step_a, a = _final_params(config, straight)
    step_b, b = _final_params(config, killed)
    assert step_a == step_b == total
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=0, atol=1e-6), a, b)
