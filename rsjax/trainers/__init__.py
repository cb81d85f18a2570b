"""Trainers, chosen by name from `config.trainer`.

Each trainer module exposes `train_and_evaluate(config, workdir)` (training),
`evaluate_checkpoint(config, workdir, split, step)` (scores of a saved
checkpoint) and `load_inference(config, workdir, step)` (`(fn, step)`: the
checkpoint's model as `fn(batch) -> outputs`, for prediction and synthesis),
so commands never reach into a trainer's internals. What they share is in
`loop` (the loop, the schedule), `checkpoints` and `nonfinite`.
"""
import importlib

from rsjax.errors import ConfigError

_TRAINERS = {"fusion": "rsjax.trainers.fusion", "segmentation": "rsjax.trainers.segmentation",
             "cloud_removal": "rsjax.trainers.cloud_removal"}


def trainer_module(name: str):
    """The module of the trainer named by `config.trainer`."""
    if name not in _TRAINERS:
        raise ConfigError(f"config.trainer='{name}': choose one of {', '.join(_TRAINERS)}.")
    return importlib.import_module(_TRAINERS[name])


def get_trainer(name: str):
    return trainer_module(name).train_and_evaluate
