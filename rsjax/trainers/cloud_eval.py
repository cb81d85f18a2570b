"""Cloud-removal evaluation shared by the trainers: on a dataset with clouds,
every model's output is scored as SEN12MS-CR papers score it
(rsjax.cloud_metrics), beside the two baselines every such paper reports.

Three images per test tile, all against the clear target:
- `output`: the model's image as it comes;
- `composite`: the cloudy input where the mask says clear, the model's image
  under cloud and shadow (and wherever the mask is unknown or the cloudy
  image has no data): what a user keeps of a cloud-removal model;
- `cloudy_input`: the cloudy image itself (no removal at all).

Images are compared in metric space, reflectance mapped to [0, 1] by the
train split's 1st..99th percentiles (input_pipeline.image_to_reflectance01),
the space of every other image metric in rsjax. Padding examples of the last
batch (no valid pixel) are left out.
"""
from __future__ import annotations

import json
from typing import Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from rsjax import cloud_metrics, input_pipeline, uncertainty_metrics
from rsjax.data import contract

VARIANTS = ("output", "composite", "cloudy_input")
SUMMARY_REGIONS = ("all", "cloud")
SUMMARY_METRICS = ("psnr", "ssim", "sam_deg")


def has_clouds(batch: Mapping) -> bool:
    """Whether a batch comes from a dataset with clouds."""
    return "cloud_mask" in batch and "s2_cloudy" in batch


def composite(output, cloudy, cloud_mask):
    """The cloudy image with `output` under cloud and shadow (model space, jit-able).

    Where the mask is unknown (255) or the cloudy image has no data, the output
    is taken: nothing there can be trusted to be clear.
    """
    return jnp.where(kept_clear(cloudy, cloud_mask)[..., None], cloudy, output)


def kept_clear(cloudy, cloud_mask):
    """(B, H, W) bool: where `composite` keeps the cloudy image (mask clear, data there)."""
    return (cloud_mask == contract.CLOUD_CLEAR) & jnp.any(cloudy != 0, axis=-1)


def _variant_parts(output, batch) -> dict:
    target = input_pipeline.image_to_reflectance01(batch["image"])
    images = {"output": output,
              "composite": composite(output, batch["s2_cloudy"], batch["cloud_mask"]),
              "cloudy_input": batch["s2_cloudy"]}
    return {name: cloud_metrics.cloud_metric_parts(
        input_pipeline.image_to_reflectance01(image), target, batch["cloud_mask"], batch["valid"])
        for name, image in images.items()}


_variant_parts_jit = jax.jit(_variant_parts)


class CloudEvaluator:
    """Collects the per-image parts of the three images over a split."""

    def __init__(self):
        self._batches: list[dict] = []

    def add(self, output, batch) -> None:
        """One batch: the model's output (B, H, W, 4) in model space and the
        batch it was made from (image, valid, s2_cloudy, cloud_mask)."""
        parts = _variant_parts_jit(output, {k: batch[k] for k in
                                            ("image", "valid", "s2_cloudy", "cloud_mask")})
        self._batches.append(jax.device_get(parts))

    def parts(self) -> dict:
        """{variant: per-image parts over the split} (padding left out)."""
        if not self._batches:
            return {}
        out = {}
        for name in VARIANTS:
            parts = cloud_metrics.concat_parts([b[name] for b in self._batches])
            real = parts["n_pixels"][:, 0] > 0
            out[name] = {k: v[real] for k, v in parts.items()}
        return out

    def scores(self) -> dict:
        """{variant: rsjax.cloud_metrics.cloud_scores(...)}."""
        return {name: cloud_metrics.cloud_scores(p) for name, p in self.parts().items()}


def summary(scores: Mapping[str, dict]) -> dict:
    """A few flat scalars for logs: clouds_<variant>_<region>_<metric>."""
    out = {}
    for name, table in scores.items():
        for region in SUMMARY_REGIONS:
            for metric in SUMMARY_METRICS:
                out[f"clouds_{name}_{region}_{metric}"] = table["regions"][region][metric]
    return out


def write(workdir: str, split: str, step: int, evaluator: CloudEvaluator) -> Optional[dict]:
    """`eval_<split>_clouds.json` (the tables) and `eval_<split>_clouds.npz`
    (per-image parts, `<variant>/<part>`, for intervals over test tiles) in
    the workdir; returns the tables (process 0 writes)."""
    parts = evaluator.parts()
    if not parts:
        return None
    scores = {name: cloud_metrics.cloud_scores(p) for name, p in parts.items()}
    if jax.process_index() == 0:
        root = epath.Path(workdir)
        (root / f"eval_{split}_clouds.json").write_text(json.dumps(
            {"step": int(step), **scores}, indent=2, default=float))
        with (root / f"eval_{split}_clouds.npz").open("wb") as f:
            np.savez_compressed(f, **{f"{name}/{k}": v for name, p in parts.items()
                                      for k, v in p.items()})
    return scores


def load_parts(path) -> dict:
    """{variant: parts} back from an `eval_<split>_clouds.npz`."""
    out: dict = {}
    with epath.Path(path).open("rb") as f, np.load(f) as z:
        for key in z.files:
            name, part = key.split("/", 1)
            out.setdefault(name, {})[part] = np.asarray(z[key])
    return out


def grid_rows(batch: Mapping, output) -> dict:
    """The cloud-removal grid's rows, top to bottom: cloudy input, the model's
    output, the composite, the clear truth, the mask."""
    return {"cloudy": batch["s2_cloudy"], "generated": output,
            "composite": composite(output, batch["s2_cloudy"], batch["cloud_mask"]),
            "clear truth": batch["image"], "cloud mask": batch["cloud_mask"]}


def grid_options(rows: Mapping) -> dict:
    """viz.render_grid / image_grid keyword arguments for grid rows: with the
    cloud rows, the mask drawn as a mask and the optical rows stretched as the
    clear truth (bright clouds would darken the column)."""
    if "cloud mask" not in rows:
        return {}
    return {"kinds": {"cloud mask": "cloud_mask"}, "stretch_rows": ("clear truth",)}


def final_evaluation(workdir: str, split: str, step: int, evaluate, render, writer,
                     is_main: bool, uncertainty: bool = False) -> dict:
    """The end-of-training evaluation of a model that outputs S2 (RS-SPADE, pix2pix,
    DSen2-CR, UnCRtainTS), with the cloud-removal tables when the split has
    clouds: scores logged and written (loop.write_final_evaluation), a grid of
    the shown tiles; with `uncertainty` (a model with a variance), its
    calibration table and figure too (uncertainty_metrics.write).

    `evaluate(clouds, uncertainty)` -> (scores, shown rows or None) runs the
    trainer's own evaluation, feeding `clouds` (a CloudEvaluator) and
    `uncertainty` (an UncertaintyEvaluator, or None); `render(shown)` -> the grid.
    """
    from rsjax import viz                        # plotting only here
    from rsjax.trainers import loop

    clouds = CloudEvaluator()
    variances = uncertainty_metrics.UncertaintyEvaluator() if uncertainty else None
    scores, shown = evaluate(clouds, variances)
    if variances is not None and is_main:
        uncertainty_metrics.write(workdir, split, step, variances)
    cloud_scores = write(workdir, split, step, clouds)
    if cloud_scores:
        scores.update(summary(cloud_scores))
    writer.write_scalars(step, {f"{split}_{k}": v for k, v in scores.items()})
    if is_main and shown is not None:
        grid = render(shown)
        viz.save_png(grid, epath.Path(workdir) / f"eval_{split}.png")
        writer.write_images(step, {f"{split}_images": grid})
    loop.write_final_evaluation(workdir, split, step, scores)
    return scores


def train_and_score(config, workdir: str, *, state, step_fn, train_iter, learning_rates,
                    evaluate_split, write_images, render, is_main: bool,
                    uncertainty: bool = False) -> dict:
    """The training loop and evaluations of a model that outputs S2 (fusion and
    cloud removal share it): `write_images` every `image_every_steps`,
    validation scores every `eval_every_steps` (not at the last step, where the
    final evaluation follows), then `final_evaluation` on `final_eval_split`.

    `evaluate_split(state, split, **options)` -> (scores, shown) is the trainer's
    evaluation with its setup, config and mesh bound; `render(shown)` -> a grid.
    With `uncertainty`, the final evaluation scores the model's variance too
    (`evaluate_split` then takes an `uncertainty` evaluator). Returns {"step"}
    and the final scores, or {"step", "preempted": True}.
    """
    from rsjax.trainers import loop

    def validate(step, state, batch, writer):
        if step != config.total_steps:
            scores, _ = evaluate_split(state, "validation", max_batches=config.eval_max_batches)
            writer.write_scalars(step, {f"val_{k}": v for k, v in scores.items()})

    return loop.run_and_evaluate(
        config, workdir, state=state, step_fn=step_fn, train_iter=train_iter,
        periodic=((config.image_every_steps, write_images), (config.eval_every_steps, validate)),
        learning_rates=learning_rates,
        final_evaluation=lambda state, split, step, writer: final_evaluation(
            workdir, split, step,
            lambda clouds, variances: evaluate_split(
                state, split, collect_images=4, clouds=clouds,
                **({"uncertainty": variances} if variances is not None else {})),
            render, writer, is_main, uncertainty=uncertainty))
