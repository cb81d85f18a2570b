"""`python -m rsjax.train --config configs/fusion.py[:args] --workdir DIR [--config.x=y]`

Thin on purpose: flags, then the trainer named in the config. Tests call the
same `train_and_evaluate(config, workdir)` this runs.
"""
from __future__ import annotations


from absl import app, flags
from ml_collections import config_flags

from rsjax.trainers import get_trainer
from rsjax.trainers.common import prepare_process

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. configs/fusion.py:demo", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and figures go.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    prepare_process()
    config = _CONFIG.value
    get_trainer(config.trainer)(config, _WORKDIR.value)


if __name__ == "__main__":
    app.run(main)
