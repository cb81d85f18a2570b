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

from collections.abc import Mapping
from typing import Any

import jax
from flax import nnx

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
