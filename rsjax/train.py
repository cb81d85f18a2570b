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

import sys

from rsjax import cli


def add_arguments(parser) -> None:
    cli.add_config_argument(parser, required=True)
    parser.add_argument("--workdir", required=True,
                        help="where checkpoints, metrics and figures go (local path or gs://)")
    parser.add_argument("--show_config", action="store_true",
                        help="print the resolved config (after overrides) and exit")


def run(args) -> int:
    config = cli.load_config_arg(args)
    if args.show_config:
        print(config)
        return 0
    from rsjax.runtime import prepare_process
    from rsjax.trainers import get_trainer

    trainer = get_trainer(config.trainer)
    prepare_process()
    result = trainer(config, args.workdir)
    cli.print_json(result)
    return 143 if result.get("preempted") else 0


main = cli.command_main(__name__)

if __name__ == "__main__":
    sys.exit(main())
