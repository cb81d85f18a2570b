"""Pieces shared by the config files: argument parsing, the data block and the
loop's settings.

Config arguments follow big_vision: `--config fusion:demo,sources=lulc+s1` (a config
name, or a file: `--config path/to/fusion.py:demo`).
"""
from __future__ import annotations

import ml_collections

from rsjax.data.contract import CLOUDY, MODEL_SOURCES, SOURCES


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
    """'demo,sources=lulc+s1' -> ConfigDict(demo=True, sources='lulc+s1', ...defaults).

    Unknown names are an error, so a typo never silently runs the default.
    """
    out = ml_collections.ConfigDict(defaults)
    for part in filter(None, (arg or "").split(",")):
        key, _, value = part.partition("=")
        key = key.strip()
        if key not in defaults:
            raise KeyError(f"Unknown config argument '{key}'. Known: {', '.join(sorted(defaults))}.")
        if not value:
            out[key] = True
        else:
            out[key] = type(defaults[key])(value) if not isinstance(defaults[key], bool) else \
                value.lower() in ("1", "true", "yes")
    return out


def parse_sources(text: str) -> tuple[str, ...]:
    """'lulc+s1' -> ('lulc', 's1'); 'all' -> the paper's three (lulc, s1, dem);
    's2_cloudy+s1+dem+lulc' adds the cloudy image (cloud removal)."""
    if text in ("all", ""):
        return SOURCES
    names = tuple(s.strip() for s in text.replace(",", "+").split("+") if s.strip())
    bad = [s for s in names if s not in MODEL_SOURCES]
    if bad or not names:
        raise ValueError(f"sources='{text}': use a '+'-joined subset of {MODEL_SOURCES}.")
    return tuple(s for s in MODEL_SOURCES if s in names)


def data_config(demo: bool, tile_size: int | None = None, clouds: bool = False) -> ml_collections.ConfigDict:
    """The dataset block: which TFDS dataset, where, and how to read it
    (`clouds`: the cloud-removal dataset, the same scenes under clouds)."""
    d = ml_collections.ConfigDict()
    d.name = "rs_multisource/synthetic" + ("_cloudy" if clouds else "") + ("_demo" if demo else "")
    d.data_dir = "work/tensorflow_datasets"
    d.tile_size = tile_size or (64 if demo else 256)
    d.sources = SOURCES
    d.worker_count = 0          # grain worker processes; 0 reads in the main process
    d.augment = True            # flips and quarter turns, aspect rotated with the tile
    return d


def wants_clouds(clouds: bool, sources) -> bool:
    """The cloud-removal dataset: asked for, or needed by the cloudy image as a source."""
    return bool(clouds) or CLOUDY in tuple(sources)


def add_loop_settings(c: ml_collections.ConfigDict, *, demo: bool, steps: int,
                      total_steps: int, eval_every_steps: tuple[int, int]) -> None:
    """The fields of the training loop every trainer's config has (batch sizes,
    length, logging, evaluation and checkpoint cadences), at full size or the
    demo's (small enough for 2 CPU cores in minutes); `steps` (the config
    argument) replaces the length. `eval_every_steps`: (full size, demo).
    Needs `c.optim`, whose learning rates decay linearly over the demo's
    second half."""
    c.global_batch_size = 8 if demo else 16
    c.eval_batch_size = c.global_batch_size
    c.total_steps = 300 if demo else total_steps
    c.max_nonfinite_steps = 10
    c.log_every_steps = 10 if demo else 50
    c.eval_every_steps = eval_every_steps[1] if demo else eval_every_steps[0]
    c.checkpoint_every_steps = 100 if demo else 1000
    c.keep_checkpoints = 2 if demo else 3
    c.final_eval_split = "test"
    if demo:
        c.optim.decay_start_step = 150
    if steps:
        c.total_steps = steps
