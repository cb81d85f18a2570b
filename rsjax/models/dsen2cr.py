"""DSen2-CR: the residual network of Meraner et al. 2020 for cloud removal with
SAR-optical fusion (ISPRS J. Photogramm. 166, 333-346), in Flax NNX, NHWC.

`DSen2CR` concatenates its sources (`source_channels`, in order), runs a
conv3x3 + ReLU, 16 residual blocks of width 256 scaled by 0.1 and a conv3x3 back
to the bands, and adds that residual to the source named `base` (the cloudy
image, in rsjax's normalised model space). Its loss, the cloud-adaptive
regularized L1 (CARL), is rsjax.losses.cloud_adaptive_l1.
docs/models.md (section "DSen2-CR") gives the architecture, its parameter
counts and the differences from the published setting on purpose.
"""
from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from rsjax.models.layers import Conv2d

FEATURES = 256          # F in the paper
NUM_BLOCKS = 16         # B in the paper
RESIDUAL_SCALE = 0.1
he_uniform = nnx.initializers.variance_scaling(2.0, "fan_in", "uniform")   # Keras' he_uniform


class ResBlock(nnx.Module):
    """x + scale * conv(ReLU(conv(x))), width kept."""

    def __init__(self, features: int, scale: float, *, rngs: nnx.Rngs):
        self.conv_0 = Conv2d(features, features, 3, kernel_init=he_uniform, rngs=rngs)
        self.conv_1 = Conv2d(features, features, 3, kernel_init=he_uniform, rngs=rngs)
        self.scale = scale

    def __call__(self, x: jax.Array) -> jax.Array:
        return x + self.scale * self.conv_1(jax.nn.relu(self.conv_0(x)))


class DSen2CR(nnx.Module):
    """The DSen2-CR residual network.

    Args:
      source_channels: name -> channels of every input, in concatenation order,
        e.g. {'s2_cloudy': 4, 's1': 2} (the published inputs).
      base: the source the predicted residual is added to (the cloudy optical
        image); its channel count is the output's.
      features, num_blocks: width F and depth B (256 and 16 as published).
      residual_scale: the constant each block's residual is scaled by (0.1).

    `__call__(sources)` -> (B, H, W, channels of base): base + residual. Any
    image size works (no down-sampling).
    """

    def __init__(self, source_channels: Mapping[str, int], *, base: str = "s2_cloudy",
                 features: int = FEATURES, num_blocks: int = NUM_BLOCKS,
                 residual_scale: float = RESIDUAL_SCALE, rngs: nnx.Rngs):
        if base not in source_channels:
            raise ValueError(f"DSen2-CR adds its residual to the source {base!r}, which is not "
                             f"among its sources {list(source_channels)}: add it (e.g. "
                             f"sources=s2_cloudy+s1).")
        if num_blocks < 0 or features < 1:
            raise ValueError(f"need features >= 1 and num_blocks >= 0, got {features}, {num_blocks}")
        self.sources = tuple((str(k), int(v)) for k, v in source_channels.items())
        self.base = base
        in_channels = sum(c for _, c in self.sources)
        out_channels = dict(self.sources)[base]
        self.head = Conv2d(in_channels, features, 3, kernel_init=he_uniform, rngs=rngs)
        self.blocks = nnx.List([ResBlock(features, residual_scale, rngs=rngs)
                                for _ in range(num_blocks)])
        self.tail = Conv2d(features, out_channels, 3, kernel_init=he_uniform, rngs=rngs)

    @property
    def source_channels(self) -> dict[str, int]:
        return dict(self.sources)

    def __call__(self, sources: Mapping[str, jax.Array]) -> jax.Array:
        missing = [k for k, _ in self.sources if k not in sources]
        if missing:
            raise ValueError(f"DSen2-CR needs the sources {list(self.source_channels)}; "
                             f"missing {missing}")
        for name, channels in self.sources:
            if sources[name].ndim != 4 or sources[name].shape[-1] != channels:
                raise ValueError(f"source {name!r} must be (B, H, W, {channels}), got "
                                 f"{sources[name].shape}")
        base = sources[self.base]
        x = jnp.concatenate([sources[k].astype(base.dtype) for k, _ in self.sources], axis=-1)
        x = jax.nn.relu(self.head(x))
        for block in self.blocks:
            x = block(x)
        return base + self.tail(x)
