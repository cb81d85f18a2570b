"""Parameter tables of the rsjax models, checked against the PyTorch references.

    rsjax params                 # all models, reference config
    rsjax params --model rs_spade --sources lulc=9,s1=2,dem=5
    rsjax params --format json

Counts trainable parameters only, as PyTorch's `parameters()` does; models
are built abstractly, so nothing is allocated or compiled.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from rsjax import cli
from rsjax.errors import UserError
from rsjax.models.param_table import (REFERENCE_SOURCES, build_report, markdown_table,
                                      reference_configs)


def _parse_sources(text: str) -> dict[str, int]:
    try:
        pairs = [item.split("=") for item in text.split(",") if item]
        sources = {k.strip(): int(v) for k, v in pairs}
    except ValueError:
        sources = {}
    if not sources or min(sources.values()) < 1:
        raise argparse.ArgumentTypeError(f"must look like lulc=9,s1=2,dem=4, got {text!r}")
    return sources


def add_arguments(parser) -> None:
    parser.add_argument("--model", default="all", choices=("all", *reference_configs()),
                        help="all models, or one of them")
    parser.add_argument("--sources", default="lulc=9,s1=2,dem=4", type=_parse_sources,
                        help="conditioning sources as name=channels (default: the reference)")
    parser.add_argument("--out_channels", type=cli.positive_int, default=4,
                        help="generated bands")
    parser.add_argument("--ngf", type=cli.positive_int, default=64, help="generator width")
    parser.add_argument("--ndf", type=cli.positive_int, default=64, help="discriminator width")
    parser.add_argument("--tile_size", type=cli.positive_int, default=256, help="tile side in pixels")
    parser.add_argument("--embed_dim", type=cli.positive_int, default=32,
                        help="RS-SPADE's per-source embedding width")
    parser.add_argument("--unet_in", type=cli.positive_int, default=4, help="RS-UNet input bands")
    parser.add_argument("--unet_width", type=cli.positive_int, default=64, help="RS-UNet width")
    parser.add_argument("--format", choices=("markdown", "json"), default="markdown",
                        help="markdown tables, or the JSON report")


def report_for(args) -> dict[str, Any]:
    """The parameter report of the models `args` selects."""
    configs = reference_configs(args.sources, out_channels=args.out_channels, ngf=args.ngf,
                                ndf=args.ndf, tile_size=args.tile_size,
                                embed_dim=args.embed_dim, unet_in=args.unet_in,
                                unet_width=args.unet_width)
    if args.model != "all":
        if args.model not in configs:
            raise UserError(f"--model {args.model}: choose all or one of {', '.join(configs)}")
        wanted = {args.model} | ({"spade_reference"} if args.model == "rs_spade" else set())
        configs = {k: v for k, v in configs.items() if k in wanted}
    is_reference = (args.sources == REFERENCE_SOURCES and args.out_channels == 4
                    and args.ngf == 64 and args.ndf == 64)
    return build_report(configs, check_reference=is_reference)


def run(args) -> int:
    report = report_for(args)
    if args.format == "json":
        print(json.dumps(report, indent=1))
        return 0
    summary = ["| model | parameters | reference | match |", "|---|---:|---:|---|"]
    for label, entry in report.items():
        ref = entry.get("reference")
        match = "" if ref is None else ("exact" if entry["matches"] else "DIFFERENT")
        if "added_by_embeddings" in entry:
            match = f"+{entry['added_by_embeddings']:,} from the per-source embeddings"
        summary.append(f"| {label} | {entry['total']:,} | "
                       f"{'' if ref is None else f'{ref:,}'} | {match} |")
    print("\n".join(summary))
    for label, entry in report.items():
        print()
        print(markdown_table(f"{label} ({entry['model']})", entry["modules"]))
    return 0


main = cli.command_main(__name__)

if __name__ == "__main__":
    sys.exit(main())
