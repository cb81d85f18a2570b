"""RS-UNet land-cover segmentation on the 4 optical bands (the paper's section 4).

`config.data.train_data` chooses the training images: `real` (the paper's True
Dataset) or `mix` (real and generated 1:1, each generated image paired with
its tile's real land-cover map). Validation and test always use real tiles.
Metrics come from one confusion matrix accumulated over the whole split.

The loop, checkpoints, resume, data parallelism and logging are the fusion
trainer's (rsjax.trainers.loop); only the model, loss and metrics differ.
"""
from __future__ import annotations

import functools
import json
import logging
from typing import Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from etils import epath
from flax import nnx

from rsjax import input_pipeline, losses, metrics, viz
from rsjax import mesh as mesh_lib
from rsjax.data.contract import NUM_CLASSES
from rsjax.errors import ConfigError
from rsjax.models import create_model
from rsjax.locks import one_writer
from rsjax.trainers import checkpoints, loop
from rsjax.trainers.nonfinite import guarded_model_step
from rsjax.trainers.single_model import SingleModelSetup

log = logging.getLogger("rsjax")

class Setup(SingleModelSetup):
    def __init__(self, config):
        self.config = config
        o = config.optim
        self._build(o.lr, lambda lr: optax.adamw(lr, b1=o.b1, b2=o.b2,
                                                 weight_decay=o.weight_decay))

    def _create(self):
        kw = dict(self.config.model.to_dict())
        name = kw.pop("name")
        return create_model(name, in_channels=int(self.config.in_channels),
                            num_classes=NUM_CLASSES, rngs=nnx.Rngs(params=int(self.config.seed)),
                            **kw)


def class_weights(config) -> Optional[jax.Array]:
    """The cross-entropy's class weights, (9,) float32, or None (every labelled
    pixel counts alike) when `config.class_weights` is "none". Otherwise it
    names a weighting of `losses.class_weights_from_counts`, applied to the
    train split's class frequencies stored with the dataset."""
    method = config.class_weights
    if method == "none":
        return None
    if method not in losses.CLASS_WEIGHTINGS:
        raise ConfigError(f"config.class_weights={method!r}: choose none or one of "
                          f"{', '.join(losses.CLASS_WEIGHTINGS)}.")
    stats = input_pipeline.load_statistics(input_pipeline.get_builder(config.data))
    return jnp.asarray(losses.class_weights_from_counts(stats["lulc"]["frequencies"], method))


def train_step(setup: Setup, class_weights, state: dict, batch: dict):
    def loss_of_model(model):
        logits = model(batch["image"].astype(setup.compute_dtype)).astype(jnp.float32)
        return losses.softmax_cross_entropy(logits, batch["label"], class_weights=class_weights), logits

    out, loss, logits = guarded_model_step(setup, state, loss_of_model, setup.compute_dtype)
    cm = metrics.confusion_matrix(jnp.argmax(logits, -1), batch["label"], NUM_CLASSES)
    acc = jnp.trace(cm) / jnp.maximum(cm.sum(), 1)
    return out, {"loss": loss, "train_accuracy": acc,
                 "nonfinite": out["nonfinite"].astype(jnp.float32)}


def predict(setup: Setup, state: dict, image: jax.Array) -> jax.Array:
    model = nnx.merge(setup.eval_graph, state["model"])
    return model(image)


def eval_step(setup: Setup, state: dict, batch: dict) -> jax.Array:
    logits = predict(setup, state, batch["image"])
    return metrics.confusion_matrix(jnp.argmax(logits, -1), batch["label"], NUM_CLASSES)


def evaluate_split(setup: Setup, state, config, split: str, mesh,
                   max_batches: Optional[int] = None, collect: int = 0):
    step = setup.jitted("eval_step", functools.partial(eval_step, setup))
    it = input_pipeline.create_iterator(
        config.data, split, global_batch_size=config.eval_batch_size, mesh=mesh, train=False,
        seed=int(config.seed), sources=(), num_epochs=1)
    cm = np.zeros((NUM_CLASSES, NUM_CLASSES), np.int64)
    shown = None
    for i, batch in enumerate(it):
        if max_batches is not None and i >= max_batches:
            break
        cm += np.asarray(jax.device_get(step(state, batch)), np.int64)
        if collect and shown is None:
            logits = setup.jitted("predict", functools.partial(predict, setup))(state, batch["image"])
            # Gathered from every host (collective: all processes take this branch).
            shown = mesh_lib.gather_to_host({"image": batch["image"], "label": batch["label"],
                                             "pred": jnp.argmax(logits, -1)})
            shown = {k: v[:collect] for k, v in shown.items()}
    scores = metrics.segmentation_scores(cm)
    return scores, cm, shown


restore_for_eval = functools.partial(checkpoints.restore_for_eval, make_setup=Setup)


def evaluate_checkpoint(config, workdir: str, split: str = "test", step: Optional[int] = None,
                        devices=None) -> tuple[dict, Optional[dict]]:
    """(scores with the confusion matrix, image-grid rows) of a checkpoint
    (default: the latest) on a whole split, on any mesh."""
    setup, state, step, mesh = restore_for_eval(config, workdir, step, devices=devices)
    scores, cm, shown = evaluate_split(setup, state, config, split, mesh, collect=4)
    result = {"trainer": "segmentation", "model": config.model.name, "step": int(step),
              "split": split, "devices": int(mesh.devices.size),
              **jax.tree.map(lambda x: np.asarray(x).tolist(), scores),
              "confusion_matrix": cm.tolist()}
    return result, _grid_rows(shown)


def score_tiles(config, workdir: str, split: str = "test", show: int = 4,
                step: Optional[int] = None, devices=None) -> tuple[dict, dict]:
    """Per-tile confusion matrices of a checkpoint on a whole split, in the
    split's order ({"cm": (tiles, K, K)}, rows = truth), and the `show` best
    and `show` worst tiles by their own mIoU as image-grid rows (image, truth,
    prediction) with `tile_index` and `score`. What the experiments resample
    for intervals (rsjax.experiments.stats.segmentation_metric)."""
    from rsjax.trainers.fusion import _keep_extremes

    setup, state, step, mesh = restore_for_eval(config, workdir, step, devices=devices)
    predict_fn = setup.jitted("predict", functools.partial(predict, setup))
    per_tile = setup.jitted("per_tile_cm", jax.vmap(
        lambda p, t: metrics.confusion_matrix(p, t, NUM_CLASSES)))
    num_tiles = input_pipeline.split_size(config.data, split)
    it = input_pipeline.create_iterator(
        config.data, split, global_batch_size=config.eval_batch_size, mesh=mesh, train=False,
        seed=int(config.seed), sources=(), num_epochs=1)
    cms, kept, offset = [], None, 0
    for batch in it:
        pred = jnp.argmax(predict_fn(state, batch["image"]), -1)
        host = mesh_lib.gather_to_host({"cm": per_tile(pred, batch["label"]),
                                        "rows": {"image": batch["image"], "truth": batch["label"],
                                                 "prediction": pred}})
        size = min(len(host["cm"]), num_tiles - offset)
        cm = np.asarray(host["cm"][:size], np.int64)
        cms.append(cm)
        score = np.array([metrics.segmentation_scores(m)["miou"] for m in cm])
        kept = _keep_extremes(kept, {k: v[:size] for k, v in host["rows"].items()},
                              np.arange(offset, offset + size), score, show)
        offset += size
        if offset >= num_tiles:
            break
    return {"cm": np.concatenate(cms)}, {**kept, "score_name": np.asarray("miou")}


def _grid_rows(shown: Optional[dict]) -> Optional[dict]:
    return None if shown is None else {"image": shown["image"], "truth": shown["label"],
                                       "prediction": shown["pred"]}


def load_inference(config, workdir: str, step: Optional[int] = None, devices=None):
    """(probabilities, step) of a checkpoint (default: the latest).

    `probabilities(batch)`: class probabilities, (B, H, W, 9) float32 (a device
    array; softmax of the eval-mode model's logits), of `batch["image"]`, the
    optical image as the input pipeline makes it, (B, H, W, 4), numpy or device
    array (other keys are ignored). The batch is split over `devices` (default:
    all), so B must be a multiple of their number.
    """
    setup, state, step, mesh = restore_for_eval(config, workdir, step, devices=devices)
    sharding = mesh_lib.batch_sharding(mesh)

    def softmax(state, image):
        return jax.nn.softmax(predict(setup, state, image).astype(jnp.float32), axis=-1)

    model = setup.jitted("probabilities", softmax)

    def probabilities(batch):
        return model(state, jax.device_put(batch["image"], sharding))

    return probabilities, step


@one_writer
def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, devices=None) -> dict:
    """Trains, checkpoints, resumes and evaluates; `devices` (default: all) sets the mesh."""
    workdir, mesh = loop.start_run(config, workdir, devices)
    is_main = jax.process_index() == 0
    train_iter = loop.training_iterator(
        config, mesh, sources=(),
        generated_dir=config.data.generated_dir if config.data.train_data == "mix" else None)

    setup = Setup(config)
    weights = class_weights(config)
    state = mesh_lib.init_replicated(setup.init_state, mesh)

    step_fn = jax.jit(functools.partial(train_step, setup, weights), donate_argnums=(0,))
    history_path = epath.Path(workdir) / "val_history.jsonl"
    history = []
    # The paper's "best model": the state of the best validation mIoU is kept
    # beside the periodic checkpoints, and it is what the run is scored with.
    best = (checkpoints.BestCheckpoint(workdir, "miou")
            if checkpoints.evaluates_best(config) else None)
    validated = []

    def validate(step, state, batch, writer):
        scores, _, _ = evaluate_split(setup, state, config, "validation", mesh)
        validated.append(step)
        writer.write_scalars(step, {f"val_{k}": v for k, v in scores.items() if np.isscalar(v)})
        if is_main:   # the learning curve of Figure 8
            if not history and history_path.exists():     # a resumed run extends its file
                history.append(history_path.read_text())
            history.append(json.dumps({"step": step, "miou": scores["miou"],
                                       "accuracy": scores["accuracy"]}) + "\n")
            # Rewritten whole: objects on Cloud Storage cannot be appended to.
            history_path.write_text("".join(history))
        if best is not None:
            best.offer(step, state, scores["miou"], accuracy=scores["accuracy"])

    def final_evaluation(state, split, step, writer):
        selected = {}
        if best is not None:
            if config.eval_every_steps and step not in validated:
                validate(step, state, None, writer)       # the last steps count too
            if best.best is not None:
                if int(best.best["step"]) != step:
                    step = int(best.best["step"])
                    state, _ = checkpoints.restore_state(config, workdir, setup.init_state, mesh,
                                                         step, folder=checkpoints.BEST_FOLDER)
                selected = {"selected": "best_validation", "scored_step": step,
                            "validation_miou": best.best["value"]}
                log.info("Scoring the best validation checkpoint: step %d (validation mIoU %.4g).",
                         step, best.best["value"])
        scores, cm, shown = evaluate_split(setup, state, config, split, mesh, collect=4)
        loop.write_final_evaluation(workdir, split, step,
                                    {**scores, **selected, "confusion_matrix": cm.tolist()})
        if is_main and shown is not None:
            grid = viz.render_grid(_grid_rows(shown))
            viz.save_png(grid, epath.Path(workdir) / f"eval_{split}.png")
            writer.write_images(step, {f"{split}_images": grid})
        return {**scores, **selected}

    try:
        return loop.run_and_evaluate(
            config, workdir, state=state, step_fn=step_fn, train_iter=train_iter,
            periodic=((config.eval_every_steps, validate),), learning_rates=setup.learning_rates,
            final_evaluation=final_evaluation)
    finally:
        if best is not None:
            best.close()
