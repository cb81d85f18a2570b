"""The rsjax models, chosen by name from a config: `create_model(name, **kwargs)`.

| name                  | class                                   | reference           |
|-----------------------|-----------------------------------------|---------------------|
| `rs_spade`            | `spade.RSSpadeGenerator`                | NVlabs SPADE + per-source embeddings |
| `multiscale_patchgan` | `patchgan.MultiscaleDiscriminator`      | NVlabs SPADE        |
| `pix2pix_unet`        | `pix2pix.UNetGenerator`                 | junyanz pix2pix     |
| `patchgan`            | `patchgan.NLayerDiscriminator`          | junyanz pix2pix 70x70 |
| `rs_unet`             | `unet.RSUNet`                           | paper Sec. 4        |
| `dsen2cr`             | `dsen2cr.DSen2CR`                       | Meraner et al. 2020 (cloud removal) |
| `flow_unet`           | `flow.FlowUNet`                         | rectified flow (Liu et al. 2022), RS-SPADE's conditioning |
| `uncrtaints`          | `uncrtaints.UnCRtainTS`                 | Ebel et al. 2023, mono-temporal (cloud removal with variance) |
"""
from __future__ import annotations

from flax import nnx

from rsjax.models.dsen2cr import DSen2CR
from rsjax.models.flow import FlowUNet
from rsjax.models.patchgan import MultiscaleDiscriminator, NLayerDiscriminator
from rsjax.models.pix2pix import UNetGenerator
from rsjax.models.spade import RSSpadeGenerator
from rsjax.models.uncrtaints import UnCRtainTS
from rsjax.models.unet import RSUNet

MODELS = {
    "rs_spade": RSSpadeGenerator,
    "multiscale_patchgan": MultiscaleDiscriminator,
    "pix2pix_unet": UNetGenerator,
    "patchgan": NLayerDiscriminator,
    "rs_unet": RSUNet,
    "dsen2cr": DSen2CR,
    "flow_unet": FlowUNet,
    "uncrtaints": UnCRtainTS,
}


def create_model(name: str, *, rngs: nnx.Rngs | None = None, seed: int = 0, **kwargs) -> nnx.Module:
    """Builds the model registered as `name` with the constructor's kwargs.

    `rngs` defaults to `nnx.Rngs(seed)` (params and dropout streams).
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    if rngs is None:
        rngs = nnx.Rngs(seed)
    return MODELS[name](**kwargs, rngs=rngs)


__all__ = ["MODELS", "create_model", "DSen2CR", "FlowUNet", "MultiscaleDiscriminator", "NLayerDiscriminator",
           "RSSpadeGenerator", "RSUNet", "UNetGenerator", "UnCRtainTS"]
