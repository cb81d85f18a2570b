"""GAN training for multi-source fusion: RS-SPADE and the pix2pix baseline.

`train_and_evaluate(config, workdir)` is what `python -m rsjax.train` runs and
what the tests call. The stages, in order: mesh, data, models and optimizers
(created already replicated on the mesh), the jitted GAN step, checkpoint
restore, the loop (log, images, eval, checkpoint), and the final evaluation.

One pytree holds the whole training state:

    {"step", "g": generator state (params, batch stats, spectral-norm vectors),
     "d": discriminator state, "g_opt", "d_opt", "ema": EMA of G's params,
     "nonfinite": consecutive non-finite steps}

and one jitted, donated step updates it. Both networks see one generator
forward per step when `config.gan.reuse_generator_forward` (the default): the
discriminator is trained on the fakes the generator made before its update, so
the two updates are simultaneous. With it off, the generator runs again after
its update, as the PyTorch references do (alternating updates), at the cost of
a second forward.
"""
from __future__ import annotations

import functools
import logging
from typing import Mapping, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from etils import epath
from flax import nnx

from rsjax import config_checks, input_pipeline, losses, metrics
from rsjax import mesh as mesh_lib
from rsjax import viz
from rsjax.models import create_model
from rsjax.locks import one_writer
from rsjax.trainers import checkpoints, cloud_eval, flow, loop
from rsjax.trainers.nonfinite import all_finite, guarded_update
from rsjax.trainers.single_model import compute_dtype

log = logging.getLogger("rsjax")


# ---------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------
# The sources the generator is conditioned on, in the contract's order (`s2_cloudy`,
# the cloudy image, for cloud removal on a dataset with clouds).
selected_sources = config_checks.model_sources


def condition_channels(sources) -> int:
    return sum(input_pipeline.SOURCE_CHANNELS[s] for s in sources)


def create_models(config, sources, seed: int):
    """Generator and discriminator, chosen by name from the config."""
    source_channels = {s: input_pipeline.SOURCE_CHANNELS[s] for s in sources}
    cond_ch = condition_channels(sources)
    out_ch = int(config.out_channels)
    rngs = nnx.Rngs(params=seed, dropout=seed + 1, noise=seed + 2)
    g_kwargs = dict(config.generator.to_dict())
    d_kwargs = dict(config.discriminator.to_dict())
    g_name, d_name = g_kwargs.pop("name"), d_kwargs.pop("name")
    if g_name == "rs_spade":
        g = create_model(g_name, source_channels=source_channels, out_channels=out_ch,
                         tile_size=int(config.data.tile_size), rngs=rngs, **g_kwargs)
    else:
        g = create_model(g_name, in_channels=cond_ch, out_channels=out_ch, rngs=rngs, **g_kwargs)
    d = create_model(d_name, in_channels=cond_ch + out_ch, rngs=rngs, **d_kwargs)
    return g, d


def condition_tensor(batch: Mapping[str, jax.Array], sources) -> jax.Array:
    """The sources concatenated on channels, at the image's resolution."""
    return jnp.concatenate([batch[s] for s in sources], axis=-1)


def run_generator(g, batch, sources, generator_name: str) -> jax.Array:
    if generator_name == "rs_spade":
        return g({s: batch[s] for s in sources})
    return g(condition_tensor(batch, sources))


def as_multiscale(outputs) -> list[list[jax.Array]]:
    """Discriminator outputs as a list over scales of lists of features (last = logits)."""
    if isinstance(outputs, jax.Array):
        return [[outputs]]
    if isinstance(outputs[0], jax.Array):
        return [list(outputs)]
    return [list(scale) for scale in outputs]


# ---------------------------------------------------------------------------
# State
# ---------------------------------------------------------------------------
def learning_rate_schedules(config) -> dict:
    """{"generator": schedule, "discriminator": schedule}: what the optimizers
    use, and what the loop logs as learning_rate/<name>."""
    o = config.optim
    return {"generator": loop.learning_rate_schedule(o.g_lr, config.total_steps,
                                                     o.decay_start_step),
            "discriminator": loop.learning_rate_schedule(o.d_lr, config.total_steps,
                                                         o.decay_start_step)}


def make_optimizers(config, schedules: Optional[dict] = None):
    o = config.optim
    schedules = schedules or learning_rate_schedules(config)
    g_tx = optax.adam(schedules["generator"], b1=o.b1, b2=o.b2)
    d_tx = optax.adam(schedules["discriminator"], b1=o.b1, b2=o.b2)
    return g_tx, d_tx


class Setup:
    """The static parts of training: graph definitions (train and eval mode),
    optimizers, and the config values the step closes over."""

    def __init__(self, config, sources):
        self.config = config
        self.sources = sources
        self.compute_dtype = compute_dtype(config)     # float16 or a typo: a ConfigError here
        # Abstract models: only the graph definitions are needed here, and
        # creating real ones eagerly compiled every layer's initializer apart
        # (minutes of silence on a small CPU before the first step).
        g, d = nnx.eval_shape(lambda: create_models(config, sources, int(config.seed)))
        g.train(); d.train()
        self.g_train_graph, _ = nnx.split(g)
        self.d_train_graph, _ = nnx.split(d)
        g.eval(); d.eval()
        self.g_eval_graph, _ = nnx.split(g)
        self.learning_rates = learning_rate_schedules(config)
        self.g_tx, self.d_tx = make_optimizers(config, self.learning_rates)
        self.generator_name = config.generator.name
        self._generate = {}

    def generate_jit(self, use_ema: bool):
        """The jitted eval-mode generator, compiled once per run (not per call)."""
        if use_ema not in self._generate:
            self._generate[use_ema] = jax.jit(functools.partial(generate, self, use_ema=use_ema))
        return self._generate[use_ema]

    def init_state(self) -> dict:
        g, d = create_models(self.config, self.sources, int(self.config.seed))
        g.train(); d.train()
        g_state, d_state = nnx.state(g), nnx.state(d)
        g_params, d_params = nnx.state(g, nnx.Param), nnx.state(d, nnx.Param)
        return {
            "step": jnp.zeros((), jnp.int32),
            "g": g_state, "d": d_state,
            "g_opt": self.g_tx.init(g_params), "d_opt": self.d_tx.init(d_params),
            "ema": jax.tree.map(jnp.copy, g_params),
            "nonfinite": jnp.zeros((), jnp.int32),
        }


def make_setup(config, sources):
    """The Setup of the config's generator: the GAN's (this module) or the flow
    model's (rsjax.trainers.flow), which offer the same interface."""
    return flow.Setup(config, sources) if flow.is_flow(config) else Setup(config, sources)


def step_function(setup):
    """The jitted train step of a `make_setup` Setup (the state is donated)."""
    step = flow.train_step if isinstance(setup, flow.Setup) else train_step
    return jax.jit(functools.partial(step, setup), donate_argnums=(0,))


# ---------------------------------------------------------------------------
# The GAN step
# ---------------------------------------------------------------------------
def _apply(graph, params, rest, fn):
    # copy=True: fresh Variables owned by the current trace (inside jax.grad), so
    # BatchNorm and spectral-norm updates don't mutate state of an outer trace.
    module = nnx.merge(graph, params, rest, copy=True)
    out = fn(module)
    return out, nnx.state(module, nnx.Not(nnx.Param))


def train_step(setup: Setup, state: dict, batch: dict):
    """One GAN step for both networks, with one discriminator pass over the
    fake and the real images shared by both losses.

    The discriminator runs once on (condition, fake) and once on (condition,
    real); `jax.vjp` then pulls two cotangents back through that single pass:
    the discriminator's loss into D's parameters, and the generator's
    adversarial + feature-matching loss into the fake image, which continues
    (with the pixel losses' gradient added) back through the generator's own
    forward. The PyTorch references run D four times and G twice per step.
    """
    cfg = setup.config.gan
    sources = setup.sources
    cond = condition_tensor(batch, sources)
    real = batch["image"]
    _, g_params, g_rest = nnx.split(nnx.merge(setup.g_train_graph, state["g"]), nnx.Param, ...)
    _, d_params, d_rest = nnx.split(nnx.merge(setup.d_train_graph, state["d"]), nnx.Param, ...)
    dtype = setup.compute_dtype
    d_scale = 0.5 if cfg.loss == "vanilla" else 1.0   # pix2pix halves D's objective; SPADE does not

    def cast(tree):
        if dtype == jnp.float32:
            return tree
        return jax.tree.map(lambda x: x.astype(dtype)
                            if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)

    def generate_fake(g_p, g_r):
        fake, new_rest = _apply(setup.g_train_graph, cast(g_p), g_r,
                                lambda g: run_generator(g, cast(batch), sources,
                                                        setup.generator_name))
        return fake.astype(jnp.float32), new_rest

    def discriminate(d_p, d_r, image):
        x = jnp.concatenate([cond, image.astype(cond.dtype)], axis=-1)
        out, new_rest = _apply(setup.d_train_graph, cast(d_p), d_r,
                               lambda d: d(x.astype(dtype)))
        return as_multiscale(out), new_rest

    def adversarial(d_p, fake):
        """(D's loss, G's adversarial loss) from one pass of D over fake and real."""
        fake_out, rest = discriminate(d_p, d_rest, fake)
        real_out, rest = discriminate(d_p, rest, real)
        real_term, fake_term = losses.discriminator_loss(real_out, fake_out, kind=cfg.loss)
        g_terms = {"g_adv": losses.generator_loss(fake_out, kind=cfg.loss)}
        if cfg.lambda_feat > 0:
            g_terms["g_feat"] = cfg.lambda_feat * losses.feature_matching_loss(real_out, fake_out)
        return (d_scale * (real_term + fake_term), sum(g_terms.values())), (rest, g_terms)

    def pixel_losses(fake):
        terms = {}
        if cfg.lambda_l1 > 0:
            terms["g_l1"] = cfg.lambda_l1 * losses.l1_loss(fake, real, valid_mask=batch["valid"])
        if cfg.lambda_ssim > 0:
            terms["g_ssim"] = cfg.lambda_ssim * losses.ssim_loss(
                (fake + 1) / 2, (real + 1) / 2)
        return sum(terms.values()) if terms else jnp.zeros((), jnp.float32), terms

    # --- one generator forward; its backward waits for the fake's cotangent --
    fake, g_vjp, new_g_rest = jax.vjp(lambda p: generate_fake(p, g_rest), g_params, has_aux=True)
    (pix_loss, pix_terms), pix_grad = jax.value_and_grad(pixel_losses, has_aux=True)(fake)

    # --- one discriminator pass, two cotangents ----------------------------
    (d_loss, g_gan), adv_vjp, (new_d_rest, g_terms) = jax.vjp(
        adversarial, d_params, fake, has_aux=True)
    one, zero = jnp.ones((), d_loss.dtype), jnp.zeros((), d_loss.dtype)
    _, fake_grad = adv_vjp((zero, one))
    (g_grads,) = g_vjp(fake_grad + pix_grad)
    g_loss = g_gan + pix_loss

    def update_g():
        g_updates, new_g_opt = setup.g_tx.update(g_grads, state["g_opt"], g_params)
        return optax.apply_updates(g_params, g_updates), new_g_opt

    if cfg.reuse_generator_forward:
        # Simultaneous updates: D learns from the fakes G made before its update.
        d_grads, _ = adv_vjp((one, zero))
        g_updated = None  # G's update happens under the guard below
    else:
        # Alternating updates, as the PyTorch references: G runs again after its
        # update and D learns from those fakes (a second G forward and D pass).
        g_updated = update_g()
        fake2, new_g_rest = generate_fake(g_updated[0], new_g_rest)
        fake2 = jax.lax.stop_gradient(fake2)
        (d_loss, (new_d_rest, _)), d_grads = jax.value_and_grad(
            lambda p: (lambda o: (o[0][0], o[1]))(adversarial(p, fake2)), has_aux=True)(d_params)

    # --- guard: a non-finite step changes nothing but the counter ------
    finite = jnp.isfinite(g_loss) & jnp.isfinite(d_loss)
    finite &= all_finite(g_grads) & all_finite(d_grads)

    def updates():
        new_g_params, new_g_opt = g_updated if g_updated is not None else update_g()
        d_updates, new_d_opt = setup.d_tx.update(d_grads, state["d_opt"], d_params)
        return {
            "g": _merge_state(setup.g_train_graph, new_g_params, new_g_rest),
            "d": _merge_state(setup.d_train_graph, optax.apply_updates(d_params, d_updates),
                              new_d_rest),
            "g_opt": new_g_opt, "d_opt": new_d_opt,
            "ema": loop.ema_update(state["ema"], new_g_params, setup.config.ema_decay),
        }

    out_state = guarded_update(finite, updates, state)
    step_metrics = {"g_loss": g_loss, "d_loss": d_loss, **g_terms, **pix_terms,
                    "nonfinite": out_state["nonfinite"].astype(jnp.float32)}
    return out_state, step_metrics


def _merge_state(graph, params, rest):
    return nnx.state(nnx.merge(graph, params, rest))


def generate(setup: Setup, state: dict, batch: dict, use_ema: bool) -> jax.Array:
    """Eval-mode generator (running BatchNorm statistics), optionally with EMA weights."""
    _, params, rest = nnx.split(nnx.merge(setup.g_eval_graph, state["g"]), nnx.Param, ...)
    if use_ema:
        params = state["ema"]
    g = nnx.merge(setup.g_eval_graph, params, rest)
    return run_generator(g, batch, setup.sources, setup.generator_name)


# ---------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------
def evaluate_split(setup: Setup, state: dict, config, split: str, mesh,
                   max_batches: Optional[int] = None, collect_images: int = 0,
                   clouds: Optional[cloud_eval.CloudEvaluator] = None):
    """PSNR/SSIM/SAM over a whole split, accumulated batch by batch.

    On a dataset with clouds, `clouds` (when given) also collects the
    cloud-removal parts of every batch, and the shown examples include the
    cloudy image and the mask."""
    gen = setup.generate_jit(bool(config.eval_use_ema))
    it = input_pipeline.create_iterator(
        config.data, split, global_batch_size=config.eval_batch_size, mesh=mesh, train=False,
        seed=int(config.seed), sources=setup.sources, num_epochs=1)
    sums_fn = jax.jit(metrics.image_metric_sums)
    sums = metrics.ImageMetricSums.zeros()
    shown = None
    for i, batch in enumerate(it):
        if max_batches is not None and i >= max_batches:
            break
        fake = gen(state, batch)
        pred01 = input_pipeline.image_to_reflectance01(fake)
        true01 = input_pipeline.image_to_reflectance01(batch["image"])
        sums = sums.merge(jax.device_get(sums_fn(pred01, true01, batch["valid"])))
        if clouds is not None and cloud_eval.has_clouds(batch):
            clouds.add(fake, batch)
        if collect_images and shown is None:
            # Gathered from every host (collective: all processes take this branch).
            extra = ({k: batch[k] for k in ("s2_cloudy", "cloud_mask")}
                     if cloud_eval.has_clouds(batch) else {})
            shown = mesh_lib.gather_to_host({"fake": fake, "real": batch["image"],
                                             "label": batch["label"], **extra})
            shown = {k: v[:collect_images] for k, v in shown.items()}
    scores = sums.compute()
    scores["sam"] = scores["sam_rad"]
    return scores, shown


# ---------------------------------------------------------------------------
# Checkpoints: evaluation and inference
# ---------------------------------------------------------------------------
restore_for_eval = functools.partial(
    checkpoints.restore_for_eval, make_setup=lambda config: make_setup(config, selected_sources(config)))


def evaluate_checkpoint(config, workdir: str, split: str = "test", step: Optional[int] = None,
                        devices=None) -> tuple[dict, Optional[dict]]:
    """(scores, image-grid rows) of a checkpoint (default: the latest) on a whole
    split. The mesh (default: every device) need not match the one the
    checkpoint was written on. Collective on multi-host runs."""
    setup, state, step, mesh = restore_for_eval(config, workdir, step, devices=devices)
    clouds = cloud_eval.CloudEvaluator()
    scores, shown = evaluate_split(setup, state, config, split, mesh, collect_images=4,
                                   clouds=clouds)
    result = {"trainer": "fusion", "model": config.generator.name, "step": int(step),
              "split": split, "sources": list(setup.sources),
              "devices": int(mesh.devices.size), **scores}
    cloud_scores = clouds.scores()
    if cloud_scores:
        result["clouds"] = cloud_scores
    return result, shown_rows(shown)


def score_tiles(config, workdir: str, split: str = "test", show: int = 4,
                step: Optional[int] = None, devices=None) -> tuple[dict, dict]:
    """Per-tile metric parts of a checkpoint on a whole split, in the split's
    order (rsjax.metrics.image_metric_parts: psnr, ssim, has_psnr, has_ssim,
    sam_sum, sam_count, each (tiles,)), and the `show` best and `show` worst
    tiles by PSNR as image-grid rows (real, generated, land cover) with
    `tile_index` and `score`. What the experiments resample for intervals."""
    setup, state, step, mesh = restore_for_eval(config, workdir, step, devices=devices)
    gen = setup.generate_jit(bool(config.eval_use_ema))
    parts_fn = jax.jit(metrics.image_metric_parts)
    num_tiles = input_pipeline.split_size(config.data, split)
    it = input_pipeline.create_iterator(
        config.data, split, global_batch_size=config.eval_batch_size, mesh=mesh, train=False,
        seed=int(config.seed), sources=setup.sources, num_epochs=1)
    parts, kept = [], None
    offset = 0
    for batch in it:
        fake = gen(state, batch)
        p = parts_fn(input_pipeline.image_to_reflectance01(fake),
                     input_pipeline.image_to_reflectance01(batch["image"]), batch["valid"])
        host = mesh_lib.gather_to_host({"parts": p, "rows": grid_rows(batch["image"], fake,
                                                                      batch["label"])})
        size = min(len(host["parts"]["psnr"]), num_tiles - offset)
        parts.append({k: v[:size] for k, v in host["parts"].items()})
        kept = _keep_extremes(kept, {k: v[:size] for k, v in host["rows"].items()},
                              np.arange(offset, offset + size), host["parts"]["psnr"][:size], show)
        offset += size
        if offset >= num_tiles:
            break
    tiles = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    return tiles, {**kept, "score_name": np.asarray("psnr")}


def _keep_extremes(kept: Optional[dict], rows: dict, index: np.ndarray, score: np.ndarray,
                   show: int) -> dict:
    """The `show` highest and `show` lowest scoring tiles so far (NaN scores skipped):
    rows concatenated best first, then worst (lowest first)."""
    pool = dict(rows, tile_index=index, score=np.asarray(score, np.float64))
    if kept is not None:
        pool = {k: np.concatenate([kept[k], pool[k]]) for k in pool}
        # kept holds each tile once or twice (best and worst); keep unique tiles.
        _, first = np.unique(pool["tile_index"], return_index=True)
        pool = {k: v[np.sort(first)] for k, v in pool.items()}
    finite = np.flatnonzero(np.isfinite(pool["score"]))
    order = finite[np.argsort(pool["score"][finite], kind="stable")]
    chosen = np.concatenate([order[::-1][:show], order[:show]])
    return {k: v[chosen] for k, v in pool.items()}


def grid_rows(real, generated, labels) -> dict:
    """The image grid's rows, top to bottom: real, generated, land cover."""
    return {"real": real, "generated": generated, "land cover": labels}


def shown_rows(shown: Optional[dict]) -> Optional[dict]:
    """The grid rows of evaluated examples: the cloud-removal rows on a dataset
    with clouds (cloud_eval.grid_rows), else real, generated, land cover."""
    if shown is None:
        return None
    if "cloud_mask" in shown:
        return cloud_eval.grid_rows({"image": shown["real"], "s2_cloudy": shown["s2_cloudy"],
                                     "cloud_mask": shown["cloud_mask"]}, shown["fake"])
    return grid_rows(shown["real"], shown["fake"], shown["label"])


def render_rows(rows: dict):
    """A grid image of `shown_rows` (cloud rows stretched by the clear truth)."""
    return viz.render_grid(rows, **cloud_eval.grid_options(rows))


def load_inference(config, workdir: str, step: Optional[int] = None, devices=None):
    """(generate, step) of a checkpoint (default: the latest).

    `generate(batch)`: the optical image, (B, H, W, 4) in model space [-1, 1]
    (a device array), of a batch holding the model's sources
    (`selected_sources(config)`, each (B, H, W, C) as the input pipeline makes
    them; other keys are ignored), numpy or device arrays. The eval-mode
    generator, with EMA weights when `config.eval_use_ema`, jitted once; the
    batch is split over `devices` (default: all), so B must be a multiple of
    their number.
    """
    setup, state, step, mesh = restore_for_eval(config, workdir, step, devices=devices)
    generator = setup.generate_jit(bool(config.get("eval_use_ema", False)))
    sharding = mesh_lib.batch_sharding(mesh)

    # A flow model also takes the batch's starting noise when it has one (whole
    # scenes: rsjax.predict.scene_noise gives it to flow models only).
    keys = (*setup.sources, "noise")

    def generate(batch):
        return generator(state, {k: jax.device_put(batch[k], sharding) for k in keys if k in batch})

    return generate, step


# ---------------------------------------------------------------------------
# train_and_evaluate
# ---------------------------------------------------------------------------
@one_writer
def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, devices=None) -> dict:
    """Trains, checkpoints, resumes and evaluates; `devices` (default: all) sets the mesh."""
    sources = selected_sources(config)
    workdir, mesh = loop.start_run(config, workdir, devices)
    is_main = jax.process_index() == 0
    log.info("Fusion training (%s) on %d devices, sources %s", config.generator.name,
             mesh.devices.size, sources)
    train_iter = loop.training_iterator(config, mesh, sources)
    setup = make_setup(config, sources)
    state = mesh_lib.init_replicated(setup.init_state, mesh)
    step_fn = step_function(setup)

    def write_images(step, state, batch, writer):
        # Every process runs the generator on its part of the batch (a jitted
        # step over a global array is collective); only process 0 writes.
        _write_images(setup, state, batch, workdir, step, write=is_main, writer=writer)

    return cloud_eval.train_and_score(
        config, workdir, state=state, step_fn=step_fn, train_iter=train_iter,
        learning_rates=setup.learning_rates,
        evaluate_split=lambda state, split, **kw: evaluate_split(setup, state, config, split,
                                                                 mesh, **kw),
        write_images=write_images, render=lambda shown: render_rows(shown_rows(shown)),
        is_main=is_main)


def _write_images(setup, state, batch, workdir, step, write: bool = True, writer=None):
    """The first 4 examples of `batch` (real, generated, land cover) as a PNG grid
    in <workdir>/images, and the same image to TensorBoard through `writer`.
    Collective on multi-host runs: call it on every process, `write` on one."""
    n = min(4, batch["image"].shape[0])
    fake = setup.generate_jit(False)(state, batch)
    rows = (cloud_eval.grid_rows(batch, fake) if cloud_eval.has_clouds(batch)
            else grid_rows(batch["image"], fake, batch["label"]))
    host = mesh_lib.gather_to_host(rows)
    if write:
        grid = render_rows({k: v[:n] for k, v in host.items()})
        viz.save_png(grid, epath.Path(workdir) / "images" / f"step_{step:07d}.png")
        if writer is not None:
            writer.write_images(step, {"images": grid})
