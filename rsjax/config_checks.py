"""Value checks of a training config, run before anything is created.

The config loader checks keys and types; this checks values (ranges and
names), so that `rsjax train --config.total_steps=-5` or
`--config.generator.name=foo` is one `error:` line with exit status 2 and no
workdir, dataset or checkpoint behind it, instead of a traceback from deep in
a trainer after the run has started writing files.
"""
from __future__ import annotations

import math

from rsjax.errors import ConfigError

TRAINERS = ("fusion", "segmentation", "cloud_removal")
# What the trainers honour: float16 is refused rather than run silently in float32.
DTYPES = ("float32", "bfloat16")
GAN_LOSSES = ("hinge", "vanilla", "lsgan")
# Model keys by trainer, and the roles each may play.
GENERATORS = ("rs_spade", "pix2pix_unet", "flow_unet")
DISCRIMINATORS = ("multiscale_patchgan", "patchgan")
MODELS_BY_TRAINER = {"segmentation": ("rs_unet",), "cloud_removal": ("dsen2cr", "uncrtaints")}
# At least 1: the loop divides by them or counts up to them.
POSITIVE = ("total_steps", "global_batch_size", "eval_batch_size", "log_every_steps",
            "keep_checkpoints", "max_nonfinite_steps", "out_channels", "in_channels")
# 0 turns the action off; negative is a typo.
NON_NEGATIVE = ("checkpoint_every_steps", "eval_every_steps", "image_every_steps",
                "eval_max_batches", "optim.decay_start_step", "data.worker_count")
# Below this the models' down-sampling leaves no pixels (and the dataset builder refuses it).
MIN_TILE_SIZE = 8


def check_config(config) -> None:
    """Raises ConfigError naming the first key whose value cannot train."""
    _check_names(config)
    for key in POSITIVE:
        _check_int(config, key, 1)
    for key in NON_NEGATIVE:
        _check_int(config, key, 0)
    _check_int(config, "data.tile_size", MIN_TILE_SIZE)
    _check_learning_rates(config)
    model_sources(config)


def _get(config, key: str):
    """The value at a dotted key, or None where the config has no such key."""
    node = config
    for part in key.split("."):
        if not hasattr(node, "get") or part not in node:
            return None
        node = node[part]
    return node


def _choice(config, key: str, choices) -> None:
    value = _get(config, key)
    if value is not None and value not in choices:
        raise ConfigError(f"--config.{key}={value}: unknown; choose one of {', '.join(choices)}.")


def _check_names(config) -> None:
    _choice(config, "trainer", TRAINERS)
    _choice(config, "dtype", DTYPES)
    if config.get("trainer") == "fusion":
        _choice(config, "generator.name", GENERATORS)
        _choice(config, "discriminator.name", DISCRIMINATORS)
        _choice(config, "gan.loss", GAN_LOSSES)
        if _get(config, "generator.name") == "flow_unet":
            check_flow(config)
    else:
        _choice(config, "model.name", MODELS_BY_TRAINER.get(config.get("trainer"), ()))


def check_flow(config) -> None:
    """The flow model's sampling and training-time settings (also checked by its Setup)."""
    from rsjax.models.flow import SOLVERS, TIME_SAMPLINGS

    _choice(config, "flow.solver", SOLVERS)
    _choice(config, "flow.time_sampling", TIME_SAMPLINGS)
    _check_int(config, "flow.sample_steps", 1)


def _check_int(config, key: str, minimum: int) -> None:
    value = _get(config, key)
    # bool is an int to Python, but never a count.
    if value is None or isinstance(value, bool) or not isinstance(value, int):
        return
    if value < minimum:
        raise ConfigError(f"--config.{key}={value}: must be at least {minimum}.")


def _check_learning_rates(config) -> None:
    optim = config.get("optim")
    if optim is None:
        return
    for name, value in optim.items():
        if name.endswith("lr") and isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value) or value <= 0:
                raise ConfigError(f"--config.optim.{name}={value}: a learning rate must be a "
                                  "finite number above 0.")


def model_sources(config) -> tuple[str, ...]:
    """The sources the run's model takes, in the contract's order: the one check of
    `config.data.sources`, made by `rsjax train` before anything starts and by
    every trainer's Setup (its `selected_sources`) for library callers."""
    from rsjax.data.contract import CLOUDY, MODEL_SOURCES

    sources = tuple(_get(config, "data.sources") or ())
    unknown = [s for s in sources if s not in MODEL_SOURCES]
    if unknown:
        raise ConfigError(f"--config.data.sources: unknown {', '.join(unknown)}; choose from "
                          f"{', '.join(MODEL_SOURCES)}.")
    if config.get("trainer") in ("fusion", "cloud_removal") and not sources:
        raise ConfigError("--config.data.sources is empty: the model needs at least one source.")
    if config.get("trainer") == "cloud_removal" and CLOUDY not in sources:
        raise ConfigError(f"--config.data.sources={'+'.join(sources)}: cloud removal needs {CLOUDY} "
                          f"and any of {', '.join(s for s in MODEL_SOURCES if s != CLOUDY)} "
                          "(e.g. s2_cloudy+s1, as DSen2-CR).")
    return tuple(s for s in MODEL_SOURCES if s in sources)
