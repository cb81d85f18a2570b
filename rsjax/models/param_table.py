"""Parameter tables of the rsjax models, checked against the PyTorch references.

    rsjax params                 # all models, reference config
    rsjax params --model rs_spade --sources lulc=9,s1=2,dem=5
    rsjax params --format json

Counts only trainable parameters (`nnx.Param`), as PyTorch's
`sum(p.numel() for p in net.parameters())` does: BatchNorm running statistics
and spectral norm's u/v vectors are state, not parameters, in both. Models are
built with `nnx.eval_shape`, so nothing is allocated or compiled.

Reference configuration (the paper, Sec. 6): 15 conditioning channels (9 land-cover
one-hot + 2 SAR + 4 terrain), 4 output bands, 256x256 tiles, ngf = ndf = 64.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping
from typing import Any

import jax
from flax import nnx

from rsjax import cli
from rsjax.errors import UserError
from rsjax.models import create_model

REFERENCE_SOURCES = {"lulc": 9, "s1": 2, "dem": 4}

# Trainable parameters of the reference implementations at the reference config.
# exact=True: same architecture here, the count must be equal.
REFERENCE_COUNTS = {
    "spade_reference": (92_419_588, True, "NVlabs SPADE generator (segmap concatenated)"),
    "multiscale_patchgan": (5_560_450, True, "NVlabs SPADE multi-scale discriminator"),
    "pix2pix_unet": (54_428_292, True, "junyanz pix2pix unet_256 (about 54.43 M)"),
    "patchgan": (2_782_017, True, "junyanz pix2pix basic 70x70 PatchGAN (about 2.78 M)"),
    # Counted layer by layer from the published architecture (tests/test_dsen2cr.py):
    # 4 bands + VV/VH in, F 256, B 16; 18,947,341 with Sentinel-2's 13 bands.
    "dsen2cr": (18_905_860, True, "DSen2-CR (Meraner et al. 2020), 4 bands + SAR"),
    # The authors' mono-temporal model, 13 bands + VV/VH, counted layer by layer
    # from their code (tests/test_uncrtaints.py): the tables' "0.52 M".
    "uncrtaints": (520_218, True, "UnCRtainTS mono-temporal (Ebel et al. 2023), 13 bands + SAR"),
}


def reference_configs(sources: Mapping[str, int] = REFERENCE_SOURCES, *, out_channels: int = 4,
                      ngf: int = 64, ndf: int = 64, tile_size: int = 256, embed_dim: int = 32,
                      unet_in: int = 4, unet_width: int = 64) -> dict[str, tuple[str, dict]]:
    """label -> (registry name, constructor kwargs) for every model of the project."""
    cond = sum(sources.values())
    spade = dict(source_channels=dict(sources), out_channels=out_channels, ngf=ngf,
                 tile_size=tile_size, embed_dim=embed_dim)
    return {
        "rs_spade": ("rs_spade", spade),
        "spade_reference": ("rs_spade", {**spade, "embedding": "none"}),
        "multiscale_patchgan": ("multiscale_patchgan",
                                dict(in_channels=cond + out_channels, ndf=ndf)),
        "pix2pix_unet": ("pix2pix_unet", dict(in_channels=cond, out_channels=out_channels,
                                              ngf=ngf)),
        "patchgan": ("patchgan", dict(in_channels=cond + out_channels, ndf=ndf, n_layers=3,
                                      norm="batch", use_spectral_norm=False)),
        "rs_unet": ("rs_unet", dict(in_channels=unet_in, num_classes=9, width=unet_width)),
        "dsen2cr": ("dsen2cr", dict(source_channels={"s2_cloudy": out_channels, "s1": 2})),
        "uncrtaints": ("uncrtaints", dict(source_channels={"s2_cloudy": 13, "s1": 2},
                                          out_channels=13)),
        # rsjax's own (no published reference): the fusion config's model=flow.
        "flow_unet": ("flow_unet", dict(source_channels=dict(sources), out_channels=out_channels,
                                        ngf=ngf, embed_dim=embed_dim)),
    }


def abstract_model(name: str, **kwargs) -> nnx.Module:
    """The model with shape-only parameters (no memory, no compilation)."""
    return nnx.eval_shape(lambda: create_model(name, **kwargs))


def count_params(model: nnx.Module) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def param_counts(model: nnx.Module) -> dict[str, int]:
    """Trainable parameters per top-level module (sorted by name, as NNX stores them).

    Containers (nnx.Dict / nnx.List: the per-source embeddings, the scales of a
    multi-scale discriminator, the levels of a U-Net) are split one level deeper.
    """
    counts: dict[str, int] = {}
    for path, value in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        head = getattr(model, str(path[0]))
        depth = 2 if isinstance(head, (nnx.Dict, nnx.List)) else 1
        key = ".".join(str(p) for p in path[:depth])
        counts[key] = counts.get(key, 0) + int(value.size)

    def natural_order(key: str):  # 'up_convs.10' after 'up_convs.9'
        return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in key.split(".")]
    return dict(sorted(counts.items(), key=lambda item: natural_order(item[0])))


def markdown_table(label: str, counts: Mapping[str, int]) -> str:
    total = sum(counts.values())
    lines = [f"### {label}", "", "| module | parameters | share |", "|---|---:|---:|"]
    for key, n in counts.items():
        lines.append(f"| {key} | {n:,} | {100 * n / total:.2f}% |")
    lines.append(f"| **total** | **{total:,}** | 100% |")
    return "\n".join(lines)


def build_report(configs: Mapping[str, tuple[str, dict]], *, check_reference: bool
                 ) -> dict[str, Any]:
    report: dict[str, Any] = {}
    for label, (name, kwargs) in configs.items():
        counts = param_counts(abstract_model(name, **kwargs))
        entry: dict[str, Any] = {"model": name, "total": sum(counts.values()),
                                 "modules": counts}
        if check_reference and label in REFERENCE_COUNTS:
            ref, exact, what = REFERENCE_COUNTS[label]
            entry.update(reference=ref, reference_name=what, exact=exact,
                         matches=entry["total"] == ref)
        report[label] = entry
    if "rs_spade" in report and "spade_reference" in report:
        report["rs_spade"]["added_by_embeddings"] = (
            report["rs_spade"]["total"] - report["spade_reference"]["total"])
    return report


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
