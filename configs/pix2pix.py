"""The pix2pix baseline (the paper's Table 1 comparison): the fusion config with model=pix2pix.

    rsjax train --config pix2pix:demo --workdir work/pix2pix_demo
"""
import ml_collections

from rsjax.configs import fusion


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = ",".join(filter(None, [arg or "", "model=pix2pix"]))
    return fusion.get_config(arg)
