"""Prediction over many scenes on Apache Beam (the `beam` extra).

    rsjax predict --workdir RUN --scenes FOLDER_OR_LIST.txt --out_dir OUT \\
        [--beam_pipeline_options direct_num_workers=2,direct_running_mode=multi_processing]

Each scene is one Beam element; each worker process loads the model once
(Beam's `Shared`) and predicts scene after scene with the one-scene code
(`rsjax.predict.predict`), so every output is, byte for byte, the file the
one-scene command writes. A scene that fails is reported; the others finish.
docs/scaling.md ("Prediction over many scenes") describes inputs and outputs.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
import traceback
import uuid
from typing import Optional

from rsjax.data import contract, storage
from rsjax.errors import UserError

log = logging.getLogger("rsjax")

# What each trainer reads, and the suffix of what it writes.
NEEDS = {"segmentation": ("s2",)}
SUFFIX = {"fusion": "_synthetic_s2.tif", "segmentation": "_landcover.tif"}


def output_name(scene_id: str, trainer: str) -> str:
    return scene_id + SUFFIX[trainer]


def required_sources(config) -> tuple[str, ...]:
    """The files a scene must have for this run: its model's sources (fusion) or S2."""
    if config.trainer == "fusion":
        from rsjax.trainers import fusion

        return tuple(fusion.selected_sources(config))
    return NEEDS[config.trainer]


def list_scenes(source) -> list[contract.ScenePaths]:
    """Every scene of a folder or list file, complete or not (prediction needs only some sources)."""
    if not storage.is_list_file(source) and not storage.is_dir(source):
        raise UserError(f"--scenes {source}: not a folder or a .txt list of scene prefixes.")
    found = contract.group_scene_files(storage.scene_paths(source), source)
    if not found:
        raise UserError(f"--scenes {source}: no scene files (<scene>_s2.tif, _s1.tif, _lulc.tif, "
                        "_dem.tif) found.")
    return [contract.ScenePaths(scene_id=sid, s2=files.get("s2"), s1=files.get("s1"),
                                dem=files.get("dem"), lulc=files.get("lulc"))
            for sid, files in sorted(found.items())]


class _ModelHolder:
    """What Beam's Shared keeps per worker process (it needs a weak-referenceable object)."""

    loads = 0              # models loaded in this process (reported with each scene)

    def __init__(self, model):
        type(self).loads += 1
        self.model, self.load_number = model, type(self).loads


def _predict_fn():
    """The DoFn class, defined when Beam is imported (only this command needs it)."""
    import apache_beam as beam
    from apache_beam.utils import shared

    class PredictScene(beam.DoFn):
        """One scene in, one result dict out; the model is loaded once per worker process."""

        def __init__(self, workdir: str, config, step, data_dir, out_dir: str, options: dict):
            self.workdir, self.config, self.step = workdir, config, step
            self.data_dir, self.out_dir, self.options = data_dir, out_dir, options
            self._shared = shared.Shared()

        def _load(self):
            from rsjax import predict
            from rsjax.runtime import prepare_process

            prepare_process()
            return _ModelHolder(predict.load_model(self.workdir, config=self.config, step=self.step,
                                                   data_dir=self.data_dir))

        def setup(self):
            self._holder = self._shared.acquire(self._load)

        def process(self, record):
            scene = contract.scene_from_record(record)
            model = self._holder.model
            worker = {"pid": os.getpid(), "model_load": self._holder.load_number}
            yield predict_one(scene, model, self.out_dir, self.options, worker)

    return PredictScene


def predict_one(scene: contract.ScenePaths, model, out_dir: str, options: dict, worker: dict) -> dict:
    """One scene with a loaded model; every failure becomes a result with its reason."""
    from rsjax import predict, predict_outputs

    trainer = model.config.trainer
    out = storage.join(out_dir, output_name(scene.scene_id, trainer))
    result = {"scene_id": scene.scene_id, "out": str(out), "worker": worker}
    missing = [s for s in required_sources(model.config) if getattr(scene, s) is None]
    if missing:
        return {**result, "status": "failed",
                "error": f"scene '{scene.scene_id}': no {', '.join(f'{scene.scene_id}_{m}.tif' for m in missing)}"
                         f" (the model reads {', '.join(required_sources(model.config))})."}
    inputs = ({"s2": scene.s2} if trainer == "segmentation" else
              {s: getattr(scene, s) for s in required_sources(model.config)})
    try:
        if storage.is_url(out):
            with tempfile.TemporaryDirectory(prefix="rsjax_predict_") as tmp:
                local = os.path.join(tmp, storage.name(out))
                summary = predict.predict(model.workdir, local, model=model, progress=False,
                                          **inputs, **options)
                _upload(local, out)
                _upload(summary["stac"], out + predict_outputs.STAC_SUFFIX)
                summary["stac"] = out + predict_outputs.STAC_SUFFIX
        else:
            summary = predict.predict(model.workdir, out, model=model, progress=False,
                                      **inputs, **options)
    except Exception as err:  # pylint: disable=broad-except  # reported, the others go on
        log.warning("scene %s failed:\n%s", scene.scene_id, traceback.format_exc())
        return {**result, "status": "failed", "error": f"{type(err).__name__}: {err}"}
    summary["out"] = str(out)
    return {**result, **summary, "status": "ok"}


def _upload(local: str, dst: str) -> None:
    """Copies a finished file to object storage (one object, so never seen half written)."""
    from etils import epath

    epath.Path(local).copy(epath.Path(dst), overwrite=True)


def predict_scenes(workdir, scenes, out_dir, *, config=None, step: Optional[int] = None,
                   data_dir: Optional[str] = None, beam_options=None, **options) -> dict:
    """Every scene of `scenes` (folder or list file) through one run's model, on Beam.

    `beam_options`: apache_beam PipelineOptions (None: the DirectRunner here).
    `options`: predict's per-scene options (overlap, batch_size, target_crs, ...).
    Returns {"scenes", "ok", "failed", "results"} with one result per scene.
    """
    import apache_beam as beam

    from rsjax import predict

    config = predict.run_config(workdir, config)
    if config.get("trainer") not in SUFFIX:
        raise UserError(f"{workdir}: its config is a {config.get('trainer')!r} run; prediction "
                        "takes fusion and segmentation runs.")
    listed = list_scenes(scenes)
    if storage.is_url(out_dir):
        report_dir = out_dir
    else:
        os.makedirs(out_dir, exist_ok=True)
        report_dir = os.path.abspath(out_dir)
    # The workers write their results here (shared storage for a distributed runner).
    report = storage.join(report_dir, f".rsjax_predict_{uuid.uuid4().hex}.jsonl")
    records = [contract.scene_to_record(s) for s in listed]
    predict_scene = _predict_fn()(str(workdir), config, step, data_dir, str(report_dir), options)
    with beam.Pipeline(options=beam_options) as pipeline:
        _ = (pipeline
             | "Scenes" >> beam.Create(records)
             | "Spread" >> beam.Reshuffle()
             | "Predict" >> beam.ParDo(predict_scene)
             | "Json" >> beam.Map(lambda r: json.dumps(r, default=str))
             | "Report" >> beam.io.WriteToText(str(report), num_shards=1, shard_name_template=""))
    results = [json.loads(line) for line in storage.read_text(report).splitlines() if line]
    _remove(report)
    results.sort(key=lambda r: r["scene_id"])
    failed = [{"scene_id": r["scene_id"], "error": r["error"]} for r in results
              if r["status"] != "ok"]
    return {"scenes": len(results), "ok": len(results) - len(failed), "failed": failed,
            "out_dir": str(out_dir), "results": results}


def _remove(path) -> None:
    if storage.is_url(path):
        from etils import epath

        epath.Path(str(path)).unlink(missing_ok=True)
    else:
        os.remove(path)


def beam_options_from(text: Optional[str]):
    """PipelineOptions from `--beam_pipeline_options` (None: Beam's defaults, the DirectRunner)."""
    from rsjax import input_pipeline

    return input_pipeline.beam_options(text or "")


def run_from_flags(workdir, scenes, out_dir, beam_pipeline_options: Optional[str],
                   config=None, step=None, data_dir=None, **options) -> dict:
    import importlib.util

    if importlib.util.find_spec("apache_beam") is None:
        raise UserError("--scenes runs on Apache Beam: pip install rsjax[beam]")
    return predict_scenes(workdir, scenes, out_dir, config=config, step=step, data_dir=data_dir,
                          beam_options=beam_options_from(beam_pipeline_options), **options)

