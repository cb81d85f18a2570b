"""Pieces shared by the config files: argument parsing, the data block and the
loop's settings.

Config arguments follow big_vision: `--config fusion:demo,sources=lulc+s1` (a config
name, or a file: `--config path/to/fusion.py:demo`).
"""
from __future__ import annotations

from typing import Optional

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


SCALES = ("full", "demo", "bench", "paper")

# The synthetic dataset and tile size of each scale (rs_multisource builder configs).
DATASETS = {"full": ("synthetic", 256), "demo": ("synthetic_demo", 64),
            "bench": ("synthetic_bench", 64), "paper": ("synthetic_paper", 256)}


def scale_of(a: ml_collections.ConfigDict) -> str:
    """The scale named by the config arguments `demo`, `bench`, `paper` (at most
    one); 'full' (the reference sizes) when none is given."""
    named = [name for name in ("demo", "bench", "paper") if a.get(name)]
    if len(named) > 1:
        raise ValueError(f"choose one scale of {', '.join(named)}.")
    return named[0] if named else "full"


# Your own exports (the `manual` config argument): the builder's manual
# configs, at the paper's 256 px tiles unless --config.data.tile_size says other.
MANUAL_TILE_SIZE = 256


def data_config(scale: str, clouds: bool = False, manual: bool = False) -> ml_collections.ConfigDict:
    """The dataset block: which TFDS dataset, where, and how to read it
    (`clouds`: the scale's cloud-removal dataset, the same scenes under clouds,
    e.g. synthetic_cloudy_demo; `manual`: the user's exports in
    data.manual_dir, built on first use, whatever the scale)."""
    name, tile_size = DATASETS[scale]
    if manual:
        name, tile_size = "manual", MANUAL_TILE_SIZE
    if clouds:
        name = name.replace("synthetic", "synthetic_cloudy", 1).replace("manual", "manual_cloudy", 1)
    d = ml_collections.ConfigDict()
    d.name = f"rs_multisource/{name}"
    # None: $TFDS_DATA_DIR, else ~/tensorflow_datasets (rsjax.input_pipeline.data_dir_of);
    # a run saves the folder it used in its config.json.
    d.data_dir = ml_collections.FieldReference(None, field_type=str)
    if manual:
        d.manual_dir = ml_collections.FieldReference(None, field_type=str)
    d.tile_size = tile_size
    d.sources = SOURCES
    d.worker_count = 0          # grain worker processes; 0 reads in the main process
    d.augment = True            # flips and quarter turns, aspect rotated with the tile
    # The train split's scenes whose tiles are used: all, or one half of them
    # (rsjax.input_pipeline.scene_half), for experiments where the other
    # half's optical images are missing.
    d.train_scenes = "all"
    return d


def optical_output_config(trainer: str, scale: str, sources, *, clouds: bool,
                          manual: bool) -> ml_collections.ConfigDict:
    """What every trainer with the 4 optical bands as output starts from (fusion,
    cloud removal): its name, the seed, the scale's dataset with `sources`, the
    output bands and the compute dtype."""
    c = ml_collections.ConfigDict()
    c.trainer = trainer
    c.seed = 0
    c.data = data_config(scale, clouds=clouds, manual=manual)
    c.data.sources = sources
    c.out_channels = 4
    c.dtype = "float32"              # or "bfloat16" (compute only; params stay float32)
    return c


def wants_clouds(clouds: bool, sources) -> bool:
    """The cloud-removal dataset: asked for, or needed by the cloudy image as a source."""
    return bool(clouds) or CLOUDY in tuple(sources)


# The paper's segmentation setting: 1,558 training tiles of 256 px, 50 epochs;
# rsjax trains both models for that long at batch 16 at the paper scale.
PAPER_TRAIN_TILES, PAPER_EPOCHS, PAPER_BATCH = 1558, 50, 16
PAPER_STEPS = -(-PAPER_TRAIN_TILES * PAPER_EPOCHS // PAPER_BATCH)      # 4869


def add_loop_settings(c: ml_collections.ConfigDict, *, scale: str, steps: int,
                      total_steps: dict, eval_every_steps: dict, epochs: float = 0,
                      total_epochs: Optional[dict] = None) -> None:
    """The fields of the training loop every trainer's config has (batch sizes,
    length, logging, evaluation and checkpoint cadences) at a scale:
    `total_steps` and `eval_every_steps` map each scale to its value. The
    length is in epochs instead where `total_epochs` names the scale (the
    paper's protocol: each arm trains that many passes over its own training
    set; `total_steps` is then set when the run starts, see
    rsjax.trainers.loop.resolve_length). `steps` or `epochs` (the config
    arguments) replace the length. Needs `c.optim`: the learning
    rates stay constant for the first half and decay linearly to zero over
    the second half (SPADE and pix2pix's niter = niter_decay), except at the
    full reference size, where they stay constant."""
    small = scale in ("demo", "bench")
    c.global_batch_size = 8 if small else 16
    c.eval_batch_size = c.global_batch_size
    c.total_steps = steps or total_steps[scale]
    # > 0: the length in epochs of the run's own training set (real tiles, plus
    # generated ones in a Mix run), which sets total_steps (and moves the
    # learning-rate decay with it) when the run starts; 0: total_steps as given.
    c.total_epochs = float(0 if steps else (epochs or (total_epochs or {}).get(scale, 0)))
    c.max_nonfinite_steps = 10
    c.log_every_steps = 10 if small else 50
    c.eval_every_steps = eval_every_steps[scale]
    c.checkpoint_every_steps = 100 if small else 1000
    c.keep_checkpoints = 2 if small else 3
    c.final_eval_split = "test"
    if scale != "full":
        c.optim.decay_start_step = c.total_steps // 2


# How long the models that output an S2 image (fusion's generators, cloud
# removal's DSen2-CR) train at each scale, and how often they are validated.
# bench: 400 steps, so that Tables 1 and 3 (12 generator trainings among 36
# runs, three seeds) finish in about two hours on 2 CPU cores with two
# one-core workers (docs/experiments.md has the measured costs).
IMAGE_MODEL_STEPS = {"full": 100_000, "demo": 300, "bench": 400, "paper": PAPER_STEPS}
IMAGE_MODEL_EVAL_EVERY = {"full": 5000, "demo": 0, "bench": 0, "paper": 1000}
# The experiments' scales train by epochs (the paper's protocol, 50 epochs of
# its own data): bench 5 epochs of its 672 training tiles at batch 8 (420
# steps, the length that fits Tables 1 and 3 in a few hours of 2 CPU cores),
# paper 50. These replace IMAGE_MODEL_STEPS at those scales.
IMAGE_MODEL_EPOCHS = {"bench": 5, "paper": PAPER_EPOCHS}


def add_image_model_loop_settings(c: ml_collections.ConfigDict, *, scale: str,
                                  steps: int, epochs: float = 0) -> None:
    """`add_loop_settings` with the image models' lengths, plus their image
    grids and the number of validation batches scored."""
    c.image_every_steps = 100 if scale in ("demo", "bench") else 1000
    c.eval_max_batches = 20
    add_loop_settings(c, scale=scale, steps=steps, total_steps=IMAGE_MODEL_STEPS,
                      eval_every_steps=IMAGE_MODEL_EVAL_EVERY, epochs=epochs,
                      total_epochs=IMAGE_MODEL_EPOCHS)
