"""`python -m rsjax.train --config configs/fusion.py[:args] --workdir DIR [--config.x=y]`

Thin on purpose: flags, then the trainer named in the config. Tests call the
same `train_and_evaluate(config, workdir)` this runs.
"""
from __future__ import annotations

import logging

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from rsjax.trainers import get_trainer
from rsjax.trainers.common import maybe_initialize_distributed

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. configs/fusion.py:demo", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and figures go.")
flags.mark_flags_as_required(["config", "workdir"])


def setup_logging() -> None:
    """rsjax's own messages at INFO; the libraries' (Orbax logs every save at
    INFO) only from WARNING up, unless --verbosity asks for more."""
    if absl_logging.get_verbosity() <= absl_logging.INFO and not flags.FLAGS["verbosity"].present:
        absl_logging.set_verbosity(absl_logging.WARNING)
    log = logging.getLogger("rsjax")
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        log.addHandler(handler)
        log.propagate = False
    log.setLevel(logging.INFO)


def enable_compilation_cache(directory: str = "work/jax_cache") -> None:
    """Reuse compiled steps across runs (resume, evaluation, the experiment
    tables): compiling a GAN step costs a minute on a small CPU."""
    import jax
    if directory and not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", directory)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 2.0)


def main(argv):
    del argv
    setup_logging()
    enable_compilation_cache()
    maybe_initialize_distributed()
    config = _CONFIG.value
    get_trainer(config.trainer)(config, _WORKDIR.value)


if __name__ == "__main__":
    app.run(main)
