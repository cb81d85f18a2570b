"""Cloud removal with a supervised network: DSen2-CR (Meraner et al. 2020)
trained with its cloud-adaptive regularized L1 loss (CARL), or UnCRtainTS
(Ebel et al. 2023, mono-temporal) trained with its Gaussian negative
log-likelihood on a predicted per-pixel, per-band variance (a model whose
class says `predicts_variance`), evaluated also for how well that variance
tells the error (rsjax.uncertainty_metrics).

DSen2-CR takes the cloudy optical image and SAR (and any other source of
`config.data.sources`, which must hold `s2_cloudy`), predicts a residual and
adds it to the cloudy image (rsjax.models.dsen2cr). The loss pulls the
output to the clear target under cloud and shadow and to the cloudy input
elsewhere, plus the L1 to the target everywhere (rsjax.losses.
cloud_adaptive_l1). Where a tile's mask is unknown (255), the whole tile is
treated as covered: the loss is then twice the L1 to the target.

No discriminator, one optimizer (Nadam, as published); the loop, checkpoints,
resume, data parallelism, logging and the final evaluation (the fusion
metrics plus the cloud-removal tables of rsjax.trainers.cloud_eval) are the
other trainers'.
"""
from __future__ import annotations

import functools
import logging
from typing import Optional

import jax
import jax.numpy as jnp
import ml_collections
import optax
from etils import epath
from flax import nnx

from rsjax import config_checks, input_pipeline, losses, metrics, uncertainty_metrics, viz
from rsjax import mesh as mesh_lib
from rsjax.data.contract import CLOUD, CLOUD_SHADOW, CLOUDY, CLOUD_MASK_UNKNOWN
from rsjax.errors import ConfigError
from rsjax.models import MODELS, create_model
from rsjax.locks import one_writer
from rsjax.trainers import checkpoints, cloud_eval, loop
from rsjax.trainers.nonfinite import guarded_model_step
from rsjax.trainers.single_model import SingleModelSetup

log = logging.getLogger("rsjax")

OPTIMIZERS = ("nadam", "adam")


def predicts_variance(config) -> bool:
    """Whether the run's model gives a variance beside its image (UnCRtainTS)."""
    return bool(getattr(MODELS.get(config.model.name), "predicts_variance", False))


# The model's inputs, in the contract's order; the cloudy image must be one.
selected_sources = config_checks.model_sources


class Setup(SingleModelSetup):
    """Graph definitions (train and eval mode), the optimizer and the config."""

    def __init__(self, config):
        self.config = config
        self.sources = selected_sources(config)
        self.variance = predicts_variance(config)
        o = config.optim
        if o.name not in OPTIMIZERS:
            raise ConfigError(f"config.optim.name={o.name!r}: choose one of {', '.join(OPTIMIZERS)}.")
        self._build(o.lr, lambda lr: getattr(optax, o.name)(lr, b1=o.b1, b2=o.b2))

    def _create(self):
        kw = dict(self.config.model.to_dict())
        name = kw.pop("name")
        channels = {s: input_pipeline.SOURCE_CHANNELS[s] for s in self.sources}
        try:
            return create_model(name, source_channels=channels,
                                rngs=nnx.Rngs(params=int(self.config.seed)), **kw)
        except TypeError as err:     # e.g. DSen2-CR's config.model keys given to UnCRtainTS
            raise ConfigError(f"config.model={kw}: {name} does not take these ({err}); start "
                              f"from its own config: --config cloud_removal:...,model={name}.") from err


def covered(cloud_mask) -> jax.Array:
    """(B, H, W) float32: 1 under cloud, shadow, or an unknown mask."""
    return ((cloud_mask == CLOUD) | (cloud_mask == CLOUD_SHADOW)
            | (cloud_mask == CLOUD_MASK_UNKNOWN)).astype(jnp.float32)


def predict_with_variance(setup: Setup, state: dict, batch: dict):
    """(image, variance or None), each (B, H, W, 4) in model space."""
    model = nnx.merge(setup.eval_graph, state["model"])
    out = model({s: batch[s] for s in setup.sources})
    return out if setup.variance else (out, None)


def predict(setup: Setup, state: dict, batch: dict) -> jax.Array:
    return predict_with_variance(setup, state, batch)[0]


def train_step(setup: Setup, state: dict, batch: dict):
    dtype = setup.compute_dtype

    def loss_of_model(model):
        inputs = {s: batch[s].astype(dtype) for s in setup.sources}
        if setup.variance:
            mean, variance = (x.astype(jnp.float32) for x in model(inputs))
            return losses.gaussian_nll(mean, variance, batch["image"], batch["valid"]), mean
        out = model(inputs).astype(jnp.float32)
        return losses.cloud_adaptive_l1(out, batch["image"], batch[CLOUDY], covered(batch["cloud_mask"]),
                                        batch["valid"], weight=float(setup.config.loss.carl_weight)), out

    new_state, loss, out = guarded_model_step(setup, state, loss_of_model, dtype)
    l1 = losses.l1_loss(out, batch["image"], valid_mask=batch["valid"])
    return new_state, {"loss": loss, "l1": l1, "nonfinite": new_state["nonfinite"].astype(jnp.float32)}


def evaluate_split(setup: Setup, state, config, split: str, mesh,
                   max_batches: Optional[int] = None, collect_images: int = 0,
                   clouds: Optional[cloud_eval.CloudEvaluator] = None,
                   uncertainty: Optional[uncertainty_metrics.UncertaintyEvaluator] = None):
    """PSNR/SSIM/SAM of the output over a split (as the fusion trainer scores
    its generators), the cloud-removal parts into `clouds`, and for a model
    with a variance its parts into `uncertainty` (one of its own if not given)
    and its summary (uncertainty_metrics.summary) among the scores."""
    run = setup.jitted("predict_with_variance", functools.partial(predict_with_variance, setup))
    if setup.variance and uncertainty is None:
        uncertainty = uncertainty_metrics.UncertaintyEvaluator()
    sums_fn = setup.jitted("sums", metrics.image_metric_sums)
    it = input_pipeline.create_iterator(
        config.data, split, global_batch_size=config.eval_batch_size, mesh=mesh, train=False,
        seed=int(config.seed), sources=setup.sources, num_epochs=1)
    sums = metrics.ImageMetricSums.zeros()
    shown = None
    for i, batch in enumerate(it):
        if max_batches is not None and i >= max_batches:
            break
        out, variance = run(state, batch)
        if variance is not None:
            uncertainty.add(out, variance, batch)
        sums = sums.merge(jax.device_get(sums_fn(input_pipeline.image_to_reflectance01(out),
                                                 input_pipeline.image_to_reflectance01(batch["image"]),
                                                 batch["valid"])))
        if clouds is not None:
            clouds.add(out, batch)
        if collect_images and shown is None:
            # Gathered from every host (collective: all processes take this branch).
            shown = mesh_lib.gather_to_host(cloud_eval.grid_rows(batch, out))
            shown = {k: v[:collect_images] for k, v in shown.items()}
    scores = sums.compute()
    scores["sam"] = scores["sam_rad"]
    if setup.variance and (table := uncertainty.scores()) is not None:
        scores.update(uncertainty_metrics.summary(table))
    return scores, shown


restore_for_eval = functools.partial(checkpoints.restore_for_eval, make_setup=Setup)


def evaluate_checkpoint(config, workdir: str, split: str = "test", step: Optional[int] = None,
                        devices=None) -> tuple[dict, Optional[dict]]:
    """(scores with the cloud-removal tables, image-grid rows) of a checkpoint on a split."""
    setup, state, step, mesh = restore_for_eval(config, workdir, step, devices=devices)
    clouds = cloud_eval.CloudEvaluator()
    uncertainty = uncertainty_metrics.UncertaintyEvaluator() if setup.variance else None
    scores, shown = evaluate_split(setup, state, config, split, mesh, collect_images=4,
                                   clouds=clouds, uncertainty=uncertainty)
    result = {"trainer": "cloud_removal", "model": config.model.name, "step": int(step),
              "split": split, "sources": list(setup.sources), "devices": int(mesh.devices.size),
              **scores, "clouds": clouds.scores()}
    if uncertainty is not None:
        result["uncertainty"] = uncertainty.scores()
    return result, shown


def _inference_output(setup: Setup, state: dict, batch: dict) -> jax.Array:
    image, variance = predict_with_variance(setup, state, batch)
    return image if variance is None else jnp.concatenate([image, variance], axis=-1)


def load_inference(config, workdir: str, step: Optional[int] = None, devices=None):
    """(remove_clouds, step) of a checkpoint (default: the latest).

    `remove_clouds(batch)`: the cloud-free optical image, (B, H, W, 4) in model
    space (a device array), of a batch holding the model's sources (each
    (B, H, W, C) as the input pipeline makes them; other keys are ignored);
    for a model with a variance (`predicts_variance`), (B, H, W, 8): the image
    then its variance (model space).
    The batch is split over `devices` (default: all), so B must be a multiple
    of their number.
    """
    setup, state, step, mesh = restore_for_eval(config, workdir, step, devices=devices)
    run = setup.jitted("inference", functools.partial(_inference_output, setup))
    sharding = mesh_lib.batch_sharding(mesh)

    def remove_clouds(batch):
        return run(state, {s: jax.device_put(batch[s], sharding) for s in setup.sources})

    return remove_clouds, step


@one_writer
def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, devices=None) -> dict:
    """Trains, checkpoints, resumes and evaluates; `devices` (default: all) sets the mesh."""
    sources = Setup(config).sources             # config errors before anything is created
    workdir, mesh = loop.start_run(config, workdir, devices)
    is_main = jax.process_index() == 0
    log.info("Cloud removal (%s) on %d devices, sources %s", config.model.name,
             mesh.devices.size, sources)
    train_iter = loop.training_iterator(config, mesh, sources)
    setup = Setup(config)                       # with the length its training set gives
    state = mesh_lib.init_replicated(setup.init_state, mesh)
    step_fn = jax.jit(functools.partial(train_step, setup), donate_argnums=(0,))

    def write_images(step, state, batch, writer):
        out = setup.jitted("predict", functools.partial(predict, setup))(state, batch)
        host = mesh_lib.gather_to_host(cloud_eval.grid_rows(batch, out))
        if is_main:
            rows = {k: v[:4] for k, v in host.items()}
            grid = viz.render_grid(rows, **cloud_eval.grid_options(rows))
            viz.save_png(grid, epath.Path(workdir) / "images" / f"step_{step:07d}.png")
            writer.write_images(step, {"images": grid})

    return cloud_eval.train_and_score(
        config, workdir, state=state, step_fn=step_fn, train_iter=train_iter,
        learning_rates=setup.learning_rates,
        evaluate_split=lambda state, split, **kw: evaluate_split(setup, state, config, split,
                                                                 mesh, **kw),
        write_images=write_images,
        render=lambda shown: viz.render_grid(shown, **cloud_eval.grid_options(shown)),
        is_main=is_main, uncertainty=setup.variance)
