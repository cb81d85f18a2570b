"""Pieces shared by the config files: argument parsing and the data block.

Config arguments follow big_vision: `--config fusion:demo,sources=lulc+s1` (a config
name, or a file: `--config path/to/fusion.py:demo`).
"""
from __future__ import annotations

import ml_collections

ALL_SOURCES = ("lulc", "s1", "dem")


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
    """'lulc+s1' -> ('lulc', 's1'); 'all' -> every source."""
    if text in ("all", ""):
        return ALL_SOURCES
    names = tuple(s.strip() for s in text.replace(",", "+").split("+") if s.strip())
    bad = [s for s in names if s not in ALL_SOURCES]
    if bad or not names:
        raise ValueError(f"sources='{text}': use a '+'-joined subset of {ALL_SOURCES}.")
    return tuple(s for s in ALL_SOURCES if s in names)


def data_config(demo: bool, tile_size: int | None = None) -> ml_collections.ConfigDict:
    """The dataset block: which TFDS dataset, where, and how to read it."""
    d = ml_collections.ConfigDict()
    d.name = "rs_multisource/synthetic_demo" if demo else "rs_multisource/synthetic"
    d.data_dir = "work/tensorflow_datasets"
    d.tile_size = tile_size or (64 if demo else 256)
    d.sources = ALL_SOURCES
    d.worker_count = 0          # grain worker processes; 0 reads in the main process
    d.augment = True            # flips and quarter turns, aspect rotated with the tile
    d.shuffle_buffer = 0        # grain shuffles by index; kept for compatibility
    return d
