"""SPADE normalization, SPADE ResBlocks and the RS-SPADE generator (Flax NNX, NHWC).

The trunk follows NVlabs SPADE's `SPADEGenerator` without the VAE
(`num_upsampling_layers='normal'`): a 3x3 conv from the modulation features
downsampled to H/32 to 16*ngf channels, seven SPADE ResBlocks
(head, two middle, four up) with nearest upsampling between them, then
LeakyReLU -> 3x3 conv -> tanh.

The RS-SPADE change (paper, Sec. 3.1, Fig. 4-5): instead of feeding the
concatenated label map to every SPADE layer, every source (land cover one-hot,
SAR, terrain) goes through its own embedding network, at its own channel count
and its own resolution, into a common feature space; a fusion conv merges the
embeddings into the modulation features that every SPADE layer consumes.
`embedding='none'` gives the plain SPADE generator (sources resized to the
output grid and concatenated), whose parameter count equals NVlabs SPADE's.
"""
from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from rsjax.models.layers import (
    Conv2d, batch_norm, he_init, leaky_relu, resize_linear, resize_nearest, upsample2x,
)

SPADE_HIDDEN = 128  # NVlabs SPADE's hard-coded hidden width of the modulation MLP
NUM_UPSAMPLINGS = 5  # the trunk starts at H/32 ('normal' in NVlabs SPADE)
EMBEDDINGS = ("per_source", "none")


class SPADE(nnx.Module):
    """Spatially-adaptive normalization.

    Parameter-free BatchNorm of `x`, then `x_norm * (1 + gamma) + beta` where
    gamma and beta come from the modulation features (resized, nearest, to x's
    resolution) through a shared 3x3 conv + ReLU and two 3x3 convs.
    """

    def __init__(self, num_features: int, modulation_channels: int, *, hidden: int = SPADE_HIDDEN,
                 rngs: nnx.Rngs):
        self.norm = batch_norm(num_features, affine=False, rngs=rngs)
        self.mlp_shared = Conv2d(modulation_channels, hidden, 3, rngs=rngs)
        self.mlp_gamma = Conv2d(hidden, num_features, 3, rngs=rngs)
        self.mlp_beta = Conv2d(hidden, num_features, 3, rngs=rngs)

    def __call__(self, x: jax.Array, modulation: jax.Array) -> jax.Array:
        normalized = self.norm(x)
        modulation = resize_nearest(modulation, x.shape[1:3])
        hidden = jax.nn.relu(self.mlp_shared(modulation))
        return normalized * (1 + self.mlp_gamma(hidden)) + self.mlp_beta(hidden)


class SPADEResBlock(nnx.Module):
    """SPADE -> LeakyReLU(0.2) -> 3x3 conv, twice, plus a shortcut.

    The middle width is min(fin, fout). When fin != fout the shortcut is learned:
    its own SPADE then a 1x1 conv without bias. Spectral norm on all three convs.
    """

    def __init__(self, fin: int, fout: int, modulation_channels: int, *,
                 use_spectral_norm: bool = True, spade_hidden: int = SPADE_HIDDEN,
                 rngs: nnx.Rngs):
        fmiddle = min(fin, fout)
        self.learned_shortcut = fin != fout
        self.norm_0 = SPADE(fin, modulation_channels, hidden=spade_hidden, rngs=rngs)
        self.conv_0 = Conv2d(fin, fmiddle, 3, spectral_norm=use_spectral_norm, rngs=rngs)
        self.norm_1 = SPADE(fmiddle, modulation_channels, hidden=spade_hidden, rngs=rngs)
        self.conv_1 = Conv2d(fmiddle, fout, 3, spectral_norm=use_spectral_norm, rngs=rngs)
        if self.learned_shortcut:
            self.norm_s = SPADE(fin, modulation_channels, hidden=spade_hidden, rngs=rngs)
            self.conv_s = Conv2d(fin, fout, 1, use_bias=False, spectral_norm=use_spectral_norm,
                                 rngs=rngs)

    def __call__(self, x: jax.Array, modulation: jax.Array) -> jax.Array:
        if self.learned_shortcut:
            shortcut = self.conv_s(self.norm_s(x, modulation))
        else:
            shortcut = x
        dx = self.conv_0(leaky_relu(self.norm_0(x, modulation)))
        dx = self.conv_1(leaky_relu(self.norm_1(dx, modulation)))
        return shortcut + dx


class SourceEmbedding(nnx.Module):
    """One source's embedding: 3x3 conv -> LeakyReLU -> 3x3 conv -> LeakyReLU.

    Runs at the source's own resolution (cheap for coarse terrain), so each source
    keeps its native sampling until the embedding is resized to the output grid.
    He init: these features should carry unit-scale signal from the first step,
    like the one-hot map SPADE feeds its modulation MLP.
    """

    def __init__(self, in_channels: int, embed_dim: int, *, rngs: nnx.Rngs):
        self.conv_0 = Conv2d(in_channels, embed_dim, 3, kernel_init=he_init, rngs=rngs)
        self.conv_1 = Conv2d(embed_dim, embed_dim, 3, kernel_init=he_init, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return leaky_relu(self.conv_1(leaky_relu(self.conv_0(x))))


class SourceFusion(nnx.Module):
    """Merges the per-source embeddings (concatenated) with a 3x3 conv + LeakyReLU."""

    def __init__(self, num_sources: int, embed_dim: int, *, rngs: nnx.Rngs):
        self.conv = Conv2d(num_sources * embed_dim, embed_dim, 3, kernel_init=he_init, rngs=rngs)

    def __call__(self, embeddings: list[jax.Array]) -> jax.Array:
        return leaky_relu(self.conv(jnp.concatenate(embeddings, axis=-1)))


def _check_sources(sources: Mapping[str, jax.Array], expected: Mapping[str, int]) -> int:
    """Validates the source dict against the constructor's; returns the batch size."""
    missing = [k for k in expected if k not in sources]
    unexpected = [k for k in sources if k not in expected]
    if missing or unexpected:
        raise ValueError(
            f"sources must have exactly the keys {list(expected)} the generator was built with; "
            f"missing {missing}, unexpected {unexpected}. Build one generator per source subset."
        )
    batch = None
    for name, channels in expected.items():
        x = sources[name]
        if x.ndim != 4 or x.shape[-1] != channels:
            raise ValueError(
                f"source {name!r} must be (B, H, W, {channels}) channels-last, got shape {x.shape}"
            )
        if batch is None:
            batch = x.shape[0]
        elif x.shape[0] != batch:
            raise ValueError(f"source {name!r} has batch size {x.shape[0]}, others have {batch}")
    return batch


class RSSpadeGenerator(nnx.Module):
    """The RS-SPADE generator: per-source embeddings + fusion + the SPADE trunk.

    Args:
      source_channels: name -> channel count of every source the model is
        conditioned on, e.g. {'lulc': 9, 's1': 2, 'dem': 5}; any non-empty subset.
        Their order is the channel order of the concatenation.
      out_channels: output bands (4: B, G, R, NIR).
      ngf: trunk width (64 in SPADE); the trunk runs 16*ngf ... 1*ngf channels.
      tile_size: default output height and width (divisible by 32); the trunk
        starts at tile_size/32. `__call__(out_size=...)` overrides it.
      embed_dim: width of the common feature space of the source embeddings and
        of the fused modulation features.
      z_dim: length of an optional noise vector, broadcast over the H/32 grid and
        concatenated to the downsampled modulation features before the first conv
        (a tile-size-independent stand-in for SPADE's VAE path). 0: no noise.
      use_spectral_norm: spectral norm on the ResBlock convs (as SPADE).
      embedding: 'per_source' (RS-SPADE) or 'none' (plain SPADE: sources resized,
        nearest, to the output grid and concatenated).

    `__call__(sources, z=None)` -> (B, H, W, out_channels) in [-1, 1].
    """

    def __init__(
        self,
        source_channels: Mapping[str, int],
        out_channels: int = 4,
        *,
        ngf: int = 64,
        tile_size: int = 256,
        embed_dim: int = 32,
        z_dim: int = 0,
        use_spectral_norm: bool = True,
        embedding: str = "per_source",
        spade_hidden: int = SPADE_HIDDEN,
        rngs: nnx.Rngs,
    ):
        if not source_channels:
            raise ValueError("source_channels is empty: the generator needs at least one source")
        for name, channels in source_channels.items():
            if not name.isidentifier() or int(channels) < 1:
                raise ValueError(f"bad source {name!r}: {channels} channels (need a name and >= 1)")
        if embedding not in EMBEDDINGS:
            raise ValueError(f"embedding must be one of {EMBEDDINGS}, got {embedding!r}")
        _check_size((tile_size, tile_size))
        # Stored as a tuple of pairs: static module attributes must be hashable.
        self.sources = tuple((str(k), int(v)) for k, v in source_channels.items())
        self.tile_size = tile_size
        self.z_dim = z_dim
        self.embedding = embedding

        if embedding == "per_source":
            self.embed = nnx.Dict({
                name: SourceEmbedding(channels, embed_dim, rngs=rngs)
                for name, channels in self.source_channels.items()
            })
            self.fusion = SourceFusion(len(self.source_channels), embed_dim, rngs=rngs)
            modulation_channels = embed_dim
        else:
            modulation_channels = sum(self.source_channels.values())

        nf = ngf
        # spade_hidden: width of every SPADE modulation MLP (128 in NVlabs SPADE).
        # It dominates the FLOPs at small ngf, so the CPU demo narrows it.
        kw = dict(use_spectral_norm=use_spectral_norm, spade_hidden=spade_hidden, rngs=rngs)
        self.fc = Conv2d(modulation_channels + z_dim, 16 * nf, 3, rngs=rngs)
        self.head_0 = SPADEResBlock(16 * nf, 16 * nf, modulation_channels, **kw)
        self.middle_0 = SPADEResBlock(16 * nf, 16 * nf, modulation_channels, **kw)
        self.middle_1 = SPADEResBlock(16 * nf, 16 * nf, modulation_channels, **kw)
        self.up_0 = SPADEResBlock(16 * nf, 8 * nf, modulation_channels, **kw)
        self.up_1 = SPADEResBlock(8 * nf, 4 * nf, modulation_channels, **kw)
        self.up_2 = SPADEResBlock(4 * nf, 2 * nf, modulation_channels, **kw)
        self.up_3 = SPADEResBlock(2 * nf, 1 * nf, modulation_channels, **kw)
        self.conv_img = Conv2d(nf, out_channels, 3, rngs=rngs)

    @property
    def source_channels(self) -> dict[str, int]:
        """Source name -> channel count, in concatenation order."""
        return dict(self.sources)

    def modulation_features(self, sources: Mapping[str, jax.Array],
                            size: tuple[int, int]) -> jax.Array:
        """The (B, H, W, C) features every SPADE layer is modulated by."""
        if self.embedding == "none":
            return jnp.concatenate(
                [resize_nearest(sources[k], size) for k in self.source_channels], axis=-1)
        embeddings = [resize_linear(self.embed[k](sources[k]), size) for k in self.source_channels]
        return self.fusion(embeddings)

    def __call__(self, sources: Mapping[str, jax.Array], *, z: jax.Array | None = None,
                 out_size: tuple[int, int] | None = None) -> jax.Array:
        batch = _check_sources(sources, self.source_channels)
        size = _check_size(out_size or (self.tile_size, self.tile_size))
        if self.z_dim and (z is None or z.shape != (batch, self.z_dim)):
            raise ValueError(f"z must be ({batch}, {self.z_dim}) for z_dim={self.z_dim}, "
                             f"got {None if z is None else z.shape}")
        if not self.z_dim and z is not None:
            raise ValueError("z given but the generator was built with z_dim=0")

        modulation = self.modulation_features(sources, size)
        start = (size[0] >> NUM_UPSAMPLINGS, size[1] >> NUM_UPSAMPLINGS)
        x = resize_nearest(modulation, start)
        if self.z_dim:
            noise = jnp.broadcast_to(z[:, None, None, :].astype(x.dtype), (batch, *start, self.z_dim))
            x = jnp.concatenate([x, noise], axis=-1)
        x = self.fc(x)
        x = self.head_0(x, modulation)
        x = self.middle_0(upsample2x(x), modulation)
        x = self.middle_1(x, modulation)
        for block in (self.up_0, self.up_1, self.up_2, self.up_3):
            x = block(upsample2x(x), modulation)
        return jnp.tanh(self.conv_img(leaky_relu(x)))


def _check_size(size: tuple[int, int]) -> tuple[int, int]:
    h, w = size
    step = 2 ** NUM_UPSAMPLINGS
    if h < step or w < step or h % step or w % step:
        raise ValueError(f"output size {size} must be a positive multiple of {step} "
                         f"(the SPADE trunk starts at H/{step})")
    return int(h), int(w)
