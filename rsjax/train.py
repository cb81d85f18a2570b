"""Train a model: RS-SPADE or pix2pix (fusion), or RS-UNet (segmentation), as the config says.

    rsjax train --config fusion:demo --workdir work/demo
    rsjax train --config pix2pix:demo --workdir work/pix2pix
    rsjax train --config segmentation:demo,data=real --workdir work/seg_real
    rsjax train --config fusion:demo,sources=lulc+s1 --workdir DIR --config.total_steps=1000
    rsjax train --config my_config.py:arg --workdir DIR

The workdir receives metrics.jsonl and TensorBoard event files, config.json,
image grids, Orbax checkpoints and the final evaluation. Rerun the same command
on the same workdir to resume from its last checkpoint. Thin on purpose: tests
call the same `train_and_evaluate(config, workdir)` this runs.
"""
from __future__ import annotations

import logging
import sys

from rsjax import cli

log = logging.getLogger("rsjax")


def add_arguments(parser) -> None:
    cli.add_config_argument(parser, required=True)
    parser.add_argument("--workdir", required=True,
                        help="where checkpoints, metrics and figures go (local path or gs://)")
    parser.add_argument("--show_config", action="store_true",
                        help="print the resolved config (after overrides) and exit")


def run(args) -> int:
    config = cli.load_config_arg(args)
    from rsjax import config_checks, input_pipeline

    # Values before anything is created: a bad one is one line, no workdir or dataset.
    config_checks.check_config(config)

    # The saved config.json then names the same dataset from any directory.
    input_pipeline.resolve_paths(config.data)
    if args.show_config:
        print(config)
        return 0
    from rsjax import runtime
    from rsjax.runtime import prepare_process
    from rsjax.trainers import get_trainer

    trainer = get_trainer(config.trainer)
    prepare_process()
    workdir = runtime.workdir_path(args.workdir)
    log.info("Workdir %s; dataset %s (tile_size %s) in %s%s; compilation cache %s", workdir,
             input_pipeline.dataset_name(config.data), config.data.tile_size, config.data.data_dir,
             f", exports from {config.data.manual_dir}" if config.data.get("manual_dir") else "",
             runtime.cache_dir_in_use() or "off")
    # The dataset before the trainer takes the workdir's lock: a missing or
    # mismatched dataset is then an error that leaves no workdir behind.
    input_pipeline.ensure_dataset(config.data)
    result = trainer(config, workdir)
    cli.print_json(result)
    if result.get("preempted"):
        return 143
    log.info("Next: rsjax evaluate --workdir %s | rsjax report --workdir %s | rsjax predict --workdir %s "
             "%s--out OUT.tif", workdir, workdir, workdir, _predict_inputs(config))
    return 0


def _predict_inputs(config) -> str:
    """The input flags `rsjax predict` takes for this run's model."""
    if config.trainer == "segmentation":
        return "--s2 SCENE_s2.tif "
    sources = tuple(config.data.get("sources") or ())
    return "".join(f"--{source} SCENE_{source}.tif " for source in sources)


main = cli.command_main(__name__)

if __name__ == "__main__":
    sys.exit(main())
