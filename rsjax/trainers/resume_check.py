"""A resume's config against the one the run saved (`<workdir>/config.json`).

Resuming with keys that change the state's structure (models, sources, tile
size, optimizer kind, dtype, dataset) cannot restore the checkpoint: Orbax
says so in a hundred-line traceback, or worse, restores something else. So
such a difference is an error naming the keys, found before any restore or
write. Other differences (learning rates, total_steps, cadences) are what a
resume is for: they are recorded, the previous config going to
`config_history.jsonl` with the step it applied from, and config.json
written anew, so that evaluate and predict read the config now in use.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Optional

import jax
from etils import epath

from rsjax import logging_utils
from rsjax.errors import ConfigError

log = logging.getLogger("rsjax")

CONFIG_FILE = "config.json"
HISTORY_FILE = "config_history.jsonl"
# Keys (or prefixes of keys) whose value shapes the checkpointed state or what
# it means: the networks (names and sizes), their inputs and outputs, the
# optimizer's kind and its state, the compute dtype, the dataset (statistics,
# iterator state).
STRUCTURAL = ("trainer", "generator.", "discriminator.", "model.", "data.sources",
              "data.tile_size", "data.name", "data.train_data", "out_channels", "in_channels",
              "optim.name", "optim.weight_decay", "dtype", "ema_decay")


def is_structural(key: str) -> bool:
    return any(key == s or (s.endswith(".") and key.startswith(s)) for s in STRUCTURAL)


def flatten(tree: dict) -> dict:
    """{'a': {'b': 1}} -> {'a.b': 1} (both configs come through JSON: tuples are lists)."""
    return logging_utils.flatten_metrics(tree, sep=".")


def differences(saved: dict, current: dict) -> list[str]:
    """The dotted keys whose values differ (or that only one side has)."""
    a, b = flatten(saved), flatten(current)
    return sorted(k for k in set(a) | set(b) if a.get(k, _MISSING) != b.get(k, _MISSING))


_MISSING = object()


def latest_checkpoint_step(workdir: epath.Path) -> Optional[int]:
    """The newest finished step in `<workdir>/checkpoints` (Orbax's step folders)."""
    folder = workdir / "checkpoints"
    if not folder.is_dir():
        return None
    steps = [int(p.name) for p in folder.iterdir() if p.name.isdigit()]
    return max(steps) if steps else None


def check_resume(config, workdir) -> None:
    """Before a resume: an error on a structural change, else the change recorded."""
    workdir = epath.Path(os.fspath(workdir))
    saved_file = workdir / CONFIG_FILE
    step = latest_checkpoint_step(workdir)
    if step is None or not saved_file.exists():
        return      # nothing to resume: the run writes its config as a new one
    saved = json.loads(saved_file.read_text())
    # Through JSON, as config.json holds it (tuples as lists, odd values as str).
    current = json.loads(json.dumps(config.to_dict(), default=str))
    changed = differences(saved, current)
    structural = [k for k in changed if is_structural(k)]
    if structural:
        raise ConfigError(
            f"{workdir}: resuming with another config: {_describe(saved, current, structural)} "
            "would change the checkpointed state. Use another --workdir for a new run, or resume "
            f"with the saved config: --config {saved_file}.")
    if changed and jax.process_index() == 0:
        _record(workdir, saved, current, changed, step)


def _describe(saved: dict, current: dict, keys: list[str]) -> str:
    a, b = flatten(saved), flatten(current)
    return ", ".join(f"{k} {a.get(k, '(none)')!r} -> {b.get(k, '(none)')!r}" for k in keys)


def _record(workdir: epath.Path, saved: dict, current: dict, changed: list[str], step: int) -> None:
    """The previous config to the history, the current one to config.json."""
    log.info("Resuming at step %d with a changed config: %s (the previous one is kept in %s).",
             step, _describe(saved, current, changed), HISTORY_FILE)
    history = workdir / HISTORY_FILE
    previous = history.read_text() if history.exists() else ""
    lines = [json.loads(line) for line in previous.splitlines() if line.strip()]
    # The saved config applied from where the previous change left off (or the start).
    entry = {"from_step": lines[-1]["until_step"] if lines else 0, "until_step": step,
             "changed": changed, "config": saved}
    history.write_text(previous + json.dumps(entry, sort_keys=True) + "\n")
    logging_utils.write_config(current, workdir)
