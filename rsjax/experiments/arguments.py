"""The options both experiment commands share (`rsjax experiments report` and
`rsjax experiments cloud_removal`): which experiment, and how to run it."""
from __future__ import annotations

import argparse
from typing import Mapping, Sequence

from rsjax import cli


def add_experiment_arguments(parser, scales: Sequence[str], seeds: Mapping[str, int]) -> None:
    """--scale, --workdir and --seeds (default: the scale's, from `seeds`)."""
    parser.add_argument("--scale", default="demo", choices=scales, help="experiment scale")
    parser.add_argument("--workdir", required=True, help="root folder of the experiment's runs")
    parser.add_argument("--seeds", type=cli.positive_int, default=None,
                        help="seeds per method (default: the scale's, "
                             + ", ".join(f"{k} {v}" for k, v in seeds.items()) + ")")


def add_run_arguments(parser) -> None:
    """--data_dir, --run and --workers (with the workers' own hidden --worker_cpus)."""
    parser.add_argument("--data_dir", default=None,
                        help="TFDS data_dir of the datasets (default: the configs')")
    parser.add_argument("--run", action="store_true",
                        help="first train every run that has not finished (resuming one that "
                             "was stopped): minutes at the demo scale, hours at bench; without "
                             "it, the report is written from the finished runs only")
    parser.add_argument("--workers", type=cli.positive_int, default=1,
                        help="runs at once on this machine, each on its share of the CPU cores "
                             "(for CPU machines with more cores than one small run uses; see "
                             "docs/experiments.md); more machines sharing the workdir can each "
                             "run the same command")
    parser.add_argument("--worker_cpus", default=None, help=argparse.SUPPRESS)
