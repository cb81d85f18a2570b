"""Trainers, chosen by name from `config.trainer`."""
import importlib

_TRAINERS = {"fusion": "rsjax.trainers.fusion", "segmentation": "rsjax.trainers.segmentation"}


def get_trainer(name: str):
    if name not in _TRAINERS:
        raise ValueError(f"config.trainer='{name}': choose one of {', '.join(_TRAINERS)}.")
    return importlib.import_module(_TRAINERS[name]).train_and_evaluate
