"""The rectified-flow generator (rsjax.models.flow, rsjax.trainers.flow): its
samplers against closed-form solutions of known ODEs, its network's
properties, and a tiny run through the fusion trainer, with and without the
cloudy image."""
from __future__ import annotations

import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from trainer_utils import (TINY_MODELS, host_numpy, load_config, tiny_cloud_config,
                           tiny_fusion_config)

from rsjax import losses
from rsjax.errors import ConfigError
from rsjax.models import flow as flow_model
from rsjax.trainers import flow as flow_trainer

SOURCES = {"lulc": 9, "s1": 2, "dem": 5}


def _tiny_net(**kw) -> flow_model.FlowUNet:
    args = dict(ngf=4, channel_mults=(1, 2), embed_dim=4, hidden=8, time_dim=16, groups=2)
    return flow_model.FlowUNet(SOURCES, rngs=nnx.Rngs(0), **{**args, **kw})


def _sources(batch: int, size: int = 16, seed: int = 0) -> dict:
    keys = jax.random.split(jax.random.key(seed), len(SOURCES))
    return {name: jax.random.normal(k, (batch, size, size, ch)) for k, (name, ch) in
            zip(keys, SOURCES.items())}


# ---------------------------------------------------------------------------- samplers
@pytest.mark.parametrize("steps", [1, 2, 4, 8])
def test_samplers_match_the_closed_forms_of_linear_odes(steps):
    """dx/dt = x from x0 reaches e x0 at t = 1; Euler's N steps give (1 + 1/N)^N x0
    and Heun's (1 + h + h^2/2)^N x0 (their amplification factors), so a wrong
    step size, step count or stage fails. dx/dt = t tests the time passed to
    the velocity: exactly x0 + 1/2, which Heun (trapezoid) reaches and Euler
    (left end points) misses by 1/(2N)."""
    x0 = jnp.array([[1.0, -2.0, 0.5]])
    h = 1.0 / steps
    euler = flow_model.sample(lambda x, t: x, x0, steps, "euler")
    heun = flow_model.sample(lambda x, t: x, x0, steps, "heun")
    np.testing.assert_allclose(euler, (1 + h) ** steps * x0, rtol=1e-6)
    np.testing.assert_allclose(heun, (1 + h + h * h / 2) ** steps * x0, rtol=1e-6)
    # Heun is second order: closer to e x0 than Euler at every step count.
    assert abs(float(heun[0, 0]) - math.e) < abs(float(euler[0, 0]) - math.e)

    def time_velocity(x, t):
        assert t.shape == (1,)                     # one time per image
        return jnp.broadcast_to(t[:, None], x.shape)
    np.testing.assert_allclose(flow_model.sample(time_velocity, x0, steps, "heun"), x0 + 0.5,
                               rtol=1e-6)
    np.testing.assert_allclose(flow_model.sample(time_velocity, x0, steps, "euler"),
                               x0 + 0.5 - 0.5 * h, rtol=1e-6)


def test_the_straight_path_and_its_loss():
    noise, image = jnp.zeros((2, 4, 4, 4)), jnp.ones((2, 4, 4, 4))
    x = flow_model.interpolate(noise, image, jnp.array([0.0, 0.25]))
    np.testing.assert_allclose(x[0], 0.0)
    np.testing.assert_allclose(x[1], 0.25)
    # The squared error counts valid pixels only (hand count: 3 valid pixels x 4 channels).
    pred = jnp.zeros((1, 2, 2, 4)).at[0, 0, 0].set(2.0).at[0, 1, 1].set(5.0)
    valid = jnp.array([[[True, True], [True, False]]])
    assert float(losses.l2_loss(pred, jnp.zeros_like(pred), valid)) == \
        pytest.approx(4 * 4 / 12)
    assert float(losses.l2_loss(pred, pred, jnp.zeros((1, 2, 2), bool))) == 0.0


def test_training_times_and_the_ema_warm_up():
    t = flow_model.sample_times(jax.random.key(0), 20_000, "logit_normal")
    assert 0 < float(t.min()) and float(t.max()) < 1
    assert float(jnp.median(t)) == pytest.approx(0.5, abs=0.02)
    # sigmoid(N(0, 1)): P(t < sigmoid(1)) = P(z < 1) = 0.841.
    assert float(jnp.mean(t < jax.nn.sigmoid(1.0))) == pytest.approx(0.841, abs=0.01)
    u = flow_model.sample_times(jax.random.key(0), 20_000, "uniform")
    assert float(jnp.mean(u < 0.25)) == pytest.approx(0.25, abs=0.01)
    with pytest.raises(ValueError, match="time_sampling"):
        flow_model.sample_times(jax.random.key(0), 2, "beta")
    decays = [float(flow_trainer.ema_decay_at(jnp.asarray(s), 0.999)) for s in (0, 8, 10_000)]
    assert decays == pytest.approx([0.1, 0.5, 0.999])


def test_grid_noise_is_a_function_of_the_scene_pixel_and_normal():
    from scipy import stats

    big = flow_trainer.grid_noise(3, 100, 200, 64, 80, 4)
    # Any window holds the values of the same scene pixels.
    np.testing.assert_array_equal(flow_trainer.grid_noise(3, 110, 230, 20, 30, 4),
                                  big[10:30, 30:60])
    assert big.dtype == np.float32 and big.shape == (64, 80, 4)
    assert stats.kstest(big.ravel(), "norm").pvalue > 0.01
    # Neighbours, bands, seeds and streams are uncorrelated.
    for a, b in ((big[:, :-1], big[:, 1:]), (big[:-1], big[1:]), (big[..., 0], big[..., 1]),
                 (big, flow_trainer.grid_noise(4, 100, 200, 64, 80, 4)),
                 (big, flow_trainer.grid_noise(3, 100, 200, 64, 80, 4, stream=1))):
        assert abs(np.corrcoef(a.ravel(), b.ravel())[0, 1]) < 0.05


# ---------------------------------------------------------------------------- the network
def test_the_network_starts_at_zero_velocity_and_every_parameter_learns():
    net = _tiny_net()
    x, t, src = jnp.ones((2, 16, 16, 4)), jnp.array([0.2, 0.7]), _sources(2)
    np.testing.assert_array_equal(net(x, t, src), 0.0)
    graph, params = nnx.split(net, nnx.Param)

    @jax.jit
    def descend(p):
        """(p after one gradient step, the gradient at p)."""
        g = jax.grad(lambda p: jnp.mean((nnx.merge(graph, p)(x, t, src) - 1.0) ** 2))(p)
        return jax.tree.map(lambda p, g: p - 0.5 * g, p, g), g
    # From zero-initialized layers, gradient steps must reach every parameter
    # (a layer nothing flows into would stay at its initial value).
    for _ in range(3):
        params, _ = descend(params)
    _, grads = descend(params)
    flat = jax.tree_util.tree_leaves_with_path(grads)
    dead = [jax.tree_util.keystr(p) for p, g in flat if not np.any(np.asarray(g))]
    assert not dead, dead


def test_a_tiles_velocity_does_not_depend_on_the_rest_of_its_batch():
    """GroupNorm, not BatchNorm: tiles sampled together give what each gives
    alone (whole-scene prediction batches tiles arbitrarily)."""
    net = _tiny_net()
    # Past the zero start: perturb every parameter so the output is not zero.
    graph, params = nnx.split(net, nnx.Param)
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    net = nnx.merge(graph, jax.tree.unflatten(
        tree, [p + 0.1 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)]))
    run = nnx.jit(lambda net, x, t, src: net(x, t, src))
    x, t, src = jax.random.normal(jax.random.key(2), (3, 16, 16, 4)), jnp.array([0.1, 0.5, 0.9]), _sources(3)
    together = run(net, x, t, src)
    assert float(jnp.abs(together).max()) > 1e-3
    alone = run(net, x[1:2], t[1:2], {k: v[1:2] for k, v in src.items()})
    np.testing.assert_allclose(alone[0], together[1], atol=1e-5)
    # ... and the sources and the time both matter.
    assert not np.allclose(run(net, x, t[::-1], src), together, atol=1e-4)
    assert not np.allclose(run(net, x, t, _sources(3, seed=5)), together, atol=1e-4)


def test_every_source_subset_builds_and_bad_shapes_are_refused():
    for n in range(1, 4):
        for subset in itertools.combinations(SOURCES, n):
            def build_and_call(subset=subset):
                net = flow_model.FlowUNet({k: SOURCES[k] for k in subset}, ngf=4,
                                          channel_mults=(1, 2), embed_dim=4, hidden=8,
                                          time_dim=16, groups=2, rngs=nnx.Rngs(0))
                return net(jnp.zeros((2, 16, 16, 4)), jnp.zeros((2,)),
                           {k: jnp.zeros((2, 16, 16, SOURCES[k])) for k in subset})
            assert jax.eval_shape(build_and_call).shape == (2, 16, 16, 4)   # traced, not compiled
    net = _tiny_net(channel_mults=(1, 2, 2))
    with pytest.raises(ValueError, match="multiple of 4"):
        net(jnp.zeros((1, 18, 18, 4)), jnp.zeros((1,)), _sources(1, size=18))
    with pytest.raises(ValueError, match="missing"):
        net(jnp.zeros((1, 16, 16, 4)), jnp.zeros((1,)), {"s1": jnp.zeros((1, 16, 16, 2))})


# ---------------------------------------------------------------------------- config
def test_flow_configs_and_their_errors(demo_data_dir):
    c = load_config("fusion", "demo,model=flow")
    assert (c.trainer, c.generator.name, c.eval_use_ema) == ("fusion", "flow_unet", True)
    assert "discriminator" not in c and "gan" not in c
    assert load_config("fusion", "demo").eval_use_ema is False
    with pytest.raises(ValueError, match="no GAN objective"):
        load_config("fusion", "demo,model=flow,objective=spade")
    for key, value, words in (("flow.solver", "rk4", "euler, heun"),
                              ("flow.sample_steps", 0, "at least 1"),
                              ("flow.time_sampling", "beta", "logit_normal"),
                              ("dtype", "float16", "float32, bfloat16")):
        bad = tiny_fusion_config(demo_data_dir, "flow")
        bad.update_from_flattened_dict({key: value})
        with pytest.raises(ConfigError, match=words):
            flow_trainer.Setup(bad, ("lulc", "s1", "dem"))


# ---------------------------------------------------------------------------- training
def test_one_step_on_8_devices_equals_the_step_on_1_device(demo_data_dir):
    """The noise and times of a step are drawn at the global batch's shape, so
    splitting the batch over devices changes nothing."""
    from rsjax import input_pipeline
    from rsjax import mesh as mesh_lib
    from rsjax.trainers import fusion

    if jax.device_count() < 8:
        pytest.skip("needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")
    config = tiny_fusion_config(demo_data_dir, "flow")
    sources = fusion.selected_sources(config)
    results = []
    for devices in (jax.devices()[:1], jax.devices()[:8]):
        mesh = mesh_lib.create_mesh(devices)
        batch = next(input_pipeline.create_iterator(
            config.data, "train", global_batch_size=8, mesh=mesh, train=True, seed=0,
            sources=sources))
        setup = fusion.make_setup(config, sources)
        state = mesh_lib.init_replicated(setup.init_state, mesh)
        before = host_numpy(state["ema"])
        state, metrics = fusion.step_function(setup)(state, batch)
        params = host_numpy(nnx.state(nnx.merge(setup.train_graph, state["model"]), nnx.Param))
        results.append((float(metrics["loss"]), host_numpy(state["ema"])))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-5)
    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-4, atol=1e-6),
                 results[0][1], results[1][1])
    # The first update's EMA decay is 1/10: 0.1 of the initial weights, 0.9 of the new.
    jax.tree.map(lambda e, b, p: np.testing.assert_allclose(e, 0.1 * b + 0.9 * p, rtol=1e-5,
                                                            atol=1e-7),
                 results[1][1], before, params)
    assert any(not np.allclose(b, p) for b, p in zip(jax.tree.leaves(before), jax.tree.leaves(params)))


def test_flow_trains_resumes_evaluates_and_samples_deterministically(demo_data_dir, tmp_path,
                                                                     caplog):
    from rsjax import evaluate
    from rsjax.logging_utils import read_metrics
    from rsjax.trainers import fusion

    devices = jax.devices()[:1]
    config = tiny_fusion_config(demo_data_dir, "flow", steps=2)
    first = config.copy_and_resolve_references()
    first.final_eval_split = ""
    assert fusion.train_and_evaluate(first, str(tmp_path), devices=devices) == {"step": 2}
    config.total_steps = 3
    with caplog.at_level("INFO", logger="rsjax"):
        result = fusion.train_and_evaluate(config, str(tmp_path), devices=devices)
    assert result["step"] == 3 and "Resumed from step 2" in caplog.text
    logged = [r["step"] for r in read_metrics(tmp_path, dedupe=False) if "loss" in r]
    assert logged == [2, 3]
    assert np.isfinite(result["psnr"]) and result["num_images"] > 0
    scores = evaluate.evaluate_checkpoint(config, str(tmp_path), "test")
    assert scores["model"] == "flow_unet" and scores["psnr"] == pytest.approx(result["psnr"])

    # Inference: the same seed gives the same images, another seed others;
    # Heun and more steps are other programs of the same checkpoint.
    from rsjax import input_pipeline

    batch = next(input_pipeline.create_iterator(
        config.data, "test", global_batch_size=2, mesh=None, train=False, seed=0,
        sources=fusion.selected_sources(config)))
    generate, step = fusion.load_inference(config, str(tmp_path), devices=devices)
    a, b = np.asarray(generate(batch)), np.asarray(generate(batch))
    assert step == 3 and a.shape == (2, 64, 64, 4)
    np.testing.assert_array_equal(a, b)
    assert np.all(np.abs(a) <= 1.0)
    other = config.copy_and_resolve_references()
    other.seed = 1
    c, _ = fusion.load_inference(other, str(tmp_path), devices=devices)
    assert not np.allclose(np.asarray(c(batch)), a)
    heun = config.copy_and_resolve_references()
    heun.flow.solver, heun.flow.sample_steps = "heun", 1
    h, _ = fusion.load_inference(heun, str(tmp_path), devices=devices)
    assert np.asarray(h(batch)).shape == a.shape


def test_flow_with_the_cloudy_image_trains_and_scores_cloud_removal(cloudy_data_dir, tmp_path):
    from rsjax.trainers import fusion

    config = tiny_cloud_config(cloudy_data_dir, "fusion", sources="s2_cloudy+s1", model="flow")
    result = fusion.train_and_evaluate(config, str(tmp_path), devices=jax.devices()[:1])
    assert result["step"] == 2 and np.isfinite(result["psnr"])
    assert np.isfinite(result["clouds_composite_cloud_psnr"])
    assert (tmp_path / "eval_test_clouds.json").exists() and (tmp_path / "eval_test.png").exists()


def test_the_train_command_trains_a_flow_model_and_predict_samples_it(demo_data_dir, tmp_path,
                                                                       capsys):
    """The command line's way (its config checks included): `rsjax train
    --config fusion:demo,model=flow`, then `rsjax predict --samples 2`."""
    from rsjax import cli
    from rsjax.data.contract import find_scenes

    tiny = [f"--config.{k}={','.join(map(str, v)) if isinstance(v, tuple) else v}"
            for k, v in TINY_MODELS["flow"].items()]
    workdir = tmp_path / "run"
    assert cli.main(["train", "--config", "fusion:demo,model=flow", "--workdir", str(workdir),
                     f"--config.data.data_dir={demo_data_dir}", "--config.total_steps=1",
                     "--config.image_every_steps=0", *tiny]) == 0
    assert (workdir / "eval_test.json").exists()
    scene = find_scenes(next(demo_data_dir.rglob("*_s2.tif")).parent)[0]
    out = tmp_path / "k2.tif"
    capsys.readouterr()
    assert cli.main(["predict", "--workdir", str(workdir), "--s1", str(scene.s1), "--lulc",
                     str(scene.lulc), "--dem", str(scene.dem), "--out", str(out),
                     "--samples", "2"]) == 0
    import rasterio
    with rasterio.open(out) as ds:
        assert ds.count == 8 and ds.descriptions[4] == "B2_std"
