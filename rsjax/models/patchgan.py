"""PatchGAN discriminators (Flax NNX, NHWC): pix2pix's 70x70 and SPADE's multi-scale one.

Both are the same stack of 4x4 convs: a first conv (stride 2, bias, no norm),
`n_layers` normalized convs without bias (all stride 2 except the last one,
stride 1; widths ndf*2, *4, ... capped at ndf*8), LeakyReLU(0.2) after each, and
a last 4x4 conv to one channel of patch logits. Conventions of the references:

- pix2pix (junyanz `NLayerDiscriminator`, n_layers=3): padding 1, BatchNorm,
  no spectral norm: the "70x70 PatchGAN".
- SPADE (NVlabs `NLayerDiscriminator`, n_layers_D=4 counts the first conv too,
  so it is `n_layers=3` here): padding 2, spectral norm + InstanceNorm without
  affine on the normalized convs only (the first and last conv are plain, as in
  SPADE's `get_nonspade_norm_layer` use), 2 scales with 3x3 average pooling
  (stride 2, padding not counted) between them.
"""
from __future__ import annotations

from collections.abc import Mapping

import flax.linen
import jax
import jax.numpy as jnp
from flax import nnx

from rsjax.models.layers import (
    Conv2d, batch_norm, instance_norm, leaky_relu, pix2pix_init, resize_nearest, spade_init,
)

NORMS = ("batch", "instance", "none")


class NLayerDiscriminator(nnx.Module):
    """A PatchGAN. `__call__(x)` -> patch logits (B, h, w, 1); with
    `return_features=True` -> list of every layer's output, logits last."""

    def __init__(self, in_channels: int, ndf: int = 64, n_layers: int = 3, *,
                 norm: str = "batch", use_spectral_norm: bool = False, padding: int = 1,
                 rngs: nnx.Rngs):
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        if n_layers < 1:
            raise ValueError(f"n_layers must be >= 1, got {n_layers}")
        init = pix2pix_init if norm == "batch" else spade_init
        self.first = Conv2d(in_channels, ndf, 4, stride=2, padding=padding, kernel_init=init,
                            rngs=rngs)
        convs, norms = [], []
        nf = ndf
        for n in range(1, n_layers + 1):
            nf_prev, nf = nf, min(ndf * 2**n, ndf * 8)
            stride = 1 if n == n_layers else 2
            # A conv followed by a norm has no bias: the norm would cancel it.
            convs.append(Conv2d(nf_prev, nf, 4, stride=stride, padding=padding,
                                use_bias=norm == "none", spectral_norm=use_spectral_norm,
                                kernel_init=init, rngs=rngs))
            if norm == "batch":
                scale_init = lambda key, shape, dtype=jnp.float32: (  # noqa: E731
                    1.0 + 0.02 * jax.random.normal(key, shape, dtype))  # pix2pix: N(1, 0.02)
                norms.append(batch_norm(nf, affine=True, rngs=rngs, scale_init=scale_init))
            elif norm == "instance":
                norms.append(instance_norm(nf, rngs=rngs))
        self.convs = nnx.List(convs)
        self.norms = nnx.List(norms)
        self.last = Conv2d(nf, 1, 4, stride=1, padding=padding, kernel_init=init, rngs=rngs)

    def __call__(self, x: jax.Array, *, return_features: bool = False):
        features = [leaky_relu(self.first(x))]
        for i, conv in enumerate(self.convs):
            h = conv(features[-1])
            if len(self.norms):
                h = self.norms[i](h)
            features.append(leaky_relu(h))
        features.append(self.last(features[-1]))
        return features if return_features else features[-1]


def downsample(x: jax.Array) -> jax.Array:
    """3x3 average pooling, stride 2, padding 1 not counted (SPADE's between scales)."""
    return flax.linen.avg_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)),
                               count_include_pad=False)


class MultiscaleDiscriminator(nnx.Module):
    """SPADE's multi-scale PatchGAN.

    `n_layers` counts convs the SPADE way (n_layers_D=4: the first conv plus 3
    normalized ones). `__call__(x)` -> one list per scale (full resolution first)
    of every layer's output, the last entry being that scale's patch logits:
    what the hinge loss (last entries) and feature matching (the rest) need.
    """

    def __init__(self, in_channels: int, *, ndf: int = 64, n_layers: int = 4,
                 num_scales: int = 2, use_spectral_norm: bool = True, norm: str = "instance",
                 rngs: nnx.Rngs):
        if n_layers < 2:
            raise ValueError(f"n_layers must be >= 2 (SPADE's n_layers_D), got {n_layers}")
        self.scales = nnx.List([
            NLayerDiscriminator(in_channels, ndf=ndf, n_layers=n_layers - 1, norm=norm,
                                use_spectral_norm=use_spectral_norm, padding=2, rngs=rngs)
            for _ in range(num_scales)
        ])

    def __call__(self, x: jax.Array) -> list[list[jax.Array]]:
        outputs = []
        for i, discriminator in enumerate(self.scales):
            if i:
                x = downsample(x)
            outputs.append(discriminator(x, return_features=True))
        return outputs


def concat_sources(sources: Mapping[str, jax.Array], size: tuple[int, int],
                   order: tuple[str, ...] | None = None) -> jax.Array:
    """The sources resized (nearest) to `size` and concatenated, channels last:
    the input of pix2pix's U-Net and the condition of the discriminators.

    `order` fixes the channel order (default: the mapping's order; pass the
    generator's `tuple(source_channels)` to keep G and D consistent).
    """
    order = tuple(sources) if order is None else order
    return jnp.concatenate([resize_nearest(sources[k], size) for k in order], axis=-1)


def conditional_input(sources: Mapping[str, jax.Array], image: jax.Array,
                      order: tuple[str, ...] | None = None) -> jax.Array:
    """The conditional discriminator's input: `concat_sources` on the image grid,
    then the image's bands."""
    condition = concat_sources(sources, image.shape[1:3], order).astype(image.dtype)
    return jnp.concatenate([condition, image], axis=-1)
