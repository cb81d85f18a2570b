"""A conditional rectified-flow generator: the velocity network and its samplers.

Rectified flow (Liu et al. 2022; Lipman et al. 2022's flow matching with the
straight path): an image x1 and Gaussian noise x0 are joined by the straight
line x_t = (1 - t) x0 + t x1, whose velocity is x1 - x0. The network learns
that velocity from (x_t, t, the sources); sampling integrates dx/dt = v from
noise at t = 0 to the image at t = 1 in a few Euler or Heun steps.

The network is a small U-Net whose every normalization is modulated as in
RS-SPADE: the sources go through the same per-source embeddings and fusion
conv (rsjax.models.spade), and the fused features set a per-pixel scale and
shift of each normalized activation (SPADE), to which the time embedding adds
a per-channel scale and shift. The normalization is GroupNorm, not SPADE's
BatchNorm: a flow model is sampled tile by tile, and a tile's output must not
depend on the other tiles of its batch. Modulation and output layers start
at zero (adaLN-zero, Peebles & Xie 2023), so the untrained network is a plain
U-Net predicting zero velocity.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from rsjax.models.layers import Conv2d, he_init, resize_linear, resize_nearest, upsample2x
from rsjax.models.spade import SourceEmbedding, SourceFusion, _check_sources

SOLVERS = ("euler", "heun")
# How training draws the time t of each example (trainers/flow.py).
TIME_SAMPLINGS = ("logit_normal", "uniform")
_zeros = nnx.initializers.zeros_init()


def time_features(t: jax.Array, dim: int) -> jax.Array:
    """(B,) times in [0, 1] -> (B, dim) sinusoids (transformer positions of 1000 t)."""
    half = dim // 2
    freqs = jnp.exp(-math.log(10_000.0) * jnp.arange(half, dtype=jnp.float32) / half)
    angles = 1000.0 * t.astype(jnp.float32)[:, None] * freqs[None, :]
    return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)


def _groups(features: int, wanted: int) -> int:
    """The largest group count <= `wanted` that divides `features`."""
    return math.gcd(features, wanted)


class ModulatedNorm(nnx.Module):
    """GroupNorm (no affine) then x * (1 + gamma(m) + s(t)) + beta(m) + b(t):
    SPADE's per-pixel scale and shift from the source features m, plus a
    per-channel scale and shift from the time embedding."""

    def __init__(self, features: int, modulation_channels: int, time_dim: int, *, hidden: int,
                 groups: int, rngs: nnx.Rngs):
        self.norm = nnx.GroupNorm(features, num_groups=_groups(features, groups), use_bias=False,
                                  use_scale=False, rngs=rngs)
        self.mlp_shared = Conv2d(modulation_channels, hidden, 3, kernel_init=he_init, rngs=rngs)
        self.mlp_gamma = Conv2d(hidden, features, 3, kernel_init=_zeros, rngs=rngs)
        self.mlp_beta = Conv2d(hidden, features, 3, kernel_init=_zeros, rngs=rngs)
        self.time = nnx.Linear(time_dim, 2 * features, kernel_init=_zeros, rngs=rngs)

    def spatial(self, modulation: jax.Array, size: tuple[int, int]) -> tuple[jax.Array, jax.Array]:
        """(gamma, beta) at `size`: the part that depends on the sources only."""
        hidden = jax.nn.relu(self.mlp_shared(resize_nearest(modulation, size)))
        return self.mlp_gamma(hidden), self.mlp_beta(hidden)

    def __call__(self, x: jax.Array, spatial: tuple[jax.Array, jax.Array],
                 temb: jax.Array) -> jax.Array:
        gamma, beta = spatial
        scale, shift = jnp.split(self.time(temb)[:, None, None, :].astype(x.dtype), 2, axis=-1)
        return self.norm(x) * (1 + gamma + scale) + beta + shift


class FlowBlock(nnx.Module):
    """Modulated norm -> SiLU -> 3x3 conv, twice, plus a shortcut (1x1 conv
    when the width changes); the second conv starts at zero, so the block
    starts as its shortcut."""

    def __init__(self, fin: int, fout: int, modulation_channels: int, time_dim: int, *,
                 hidden: int, groups: int, rngs: nnx.Rngs):
        kw = dict(hidden=hidden, groups=groups, rngs=rngs)
        self.norm_0 = ModulatedNorm(fin, modulation_channels, time_dim, **kw)
        self.conv_0 = Conv2d(fin, fout, 3, kernel_init=he_init, rngs=rngs)
        self.norm_1 = ModulatedNorm(fout, modulation_channels, time_dim, **kw)
        self.conv_1 = Conv2d(fout, fout, 3, kernel_init=_zeros, rngs=rngs)
        self.shortcut = (Conv2d(fin, fout, 1, use_bias=False, kernel_init=he_init, rngs=rngs)
                         if fin != fout else None)

    def spatial(self, modulation, size):
        """Both norms' (gamma, beta) at the block's resolution `size`."""
        return self.norm_0.spatial(modulation, size), self.norm_1.spatial(modulation, size)

    def __call__(self, x, spatial, temb):
        h = self.conv_0(jax.nn.silu(self.norm_0(x, spatial[0], temb)))
        h = self.conv_1(jax.nn.silu(self.norm_1(h, spatial[1], temb)))
        return (x if self.shortcut is None else self.shortcut(x)) + h


class FlowUNet(nnx.Module):
    """The velocity network v(x_t, t, sources) -> (B, H, W, out_channels).

    A U-Net over `len(channel_mults)` resolutions (widths ngf * mult, one
    FlowBlock per level on the way down and on the way up, average pooling
    down, nearest up), every block modulated by the fused source embeddings
    and the time. H and W must be multiples of 2 ** (levels - 1).
    """

    def __init__(self, source_channels: Mapping[str, int], out_channels: int = 4, *,
                 ngf: int = 64, channel_mults: Sequence[int] = (1, 2, 4), embed_dim: int = 32,
                 hidden: int = 128, time_dim: int = 256, groups: int = 8, rngs: nnx.Rngs):
        if not source_channels:
            raise ValueError("source_channels is empty: the flow model needs at least one source")
        if not channel_mults or min(channel_mults) < 1:
            raise ValueError(f"channel_mults must be positive integers, got {channel_mults}")
        self.sources = tuple((str(k), int(v)) for k, v in source_channels.items())
        self.out_channels = out_channels
        self.levels = len(channel_mults)
        self.time_dim = time_dim
        self.embed = nnx.Dict({name: SourceEmbedding(channels, embed_dim, rngs=rngs)
                               for name, channels in self.sources})
        self.fusion = SourceFusion(len(self.sources), embed_dim, rngs=rngs)
        self.time_0 = nnx.Linear(time_dim, time_dim, rngs=rngs)
        self.time_1 = nnx.Linear(time_dim, time_dim, rngs=rngs)
        kw = dict(hidden=hidden, groups=groups, rngs=rngs)
        widths = [ngf * int(m) for m in channel_mults]
        self.conv_in = Conv2d(out_channels, widths[0], 3, kernel_init=he_init, rngs=rngs)
        down, prev = [], widths[0]
        for width in widths:
            down.append(FlowBlock(prev, width, embed_dim, time_dim, **kw))
            prev = width
        self.down = nnx.List(down)
        self.middle = FlowBlock(prev, prev, embed_dim, time_dim, **kw)
        up = []
        for width in reversed(widths):
            up.append(FlowBlock(prev + width, width, embed_dim, time_dim, **kw))
            prev = width
        self.up = nnx.List(up)
        self.norm_out = nnx.GroupNorm(prev, num_groups=_groups(prev, groups), rngs=rngs)
        self.conv_out = Conv2d(prev, out_channels, 3, kernel_init=_zeros, rngs=rngs)

    @property
    def source_channels(self) -> dict[str, int]:
        return dict(self.sources)

    def __call__(self, x: jax.Array, t: jax.Array, sources: Mapping[str, jax.Array]) -> jax.Array:
        return self.velocity(x, t, self.condition(sources, x.shape[1:3], x.dtype))

    def condition(self, sources: Mapping[str, jax.Array], size: tuple[int, int],
                  dtype=jnp.float32) -> list:
        """What the velocity takes from the sources, for images of `size`: every
        block's SPADE scale and shift, in the blocks' order. It does not depend
        on x or t, so a sampler computes it once for all its steps (most of the
        network's work at the default widths)."""
        _check_sources(sources, self.source_channels)
        step = 2 ** (self.levels - 1)
        if size[0] % step or size[1] % step:
            raise ValueError(f"image size {tuple(size)} must be a multiple of {step} "
                             f"({self.levels} levels)")
        # As RS-SPADE: each source embedded at its own resolution, then resized to the image's.
        modulation = self.fusion([resize_linear(self.embed[k](sources[k]), size)
                                  for k, _ in self.sources]).astype(dtype)
        sizes = [(size[0] >> i, size[1] >> i) for i in range(self.levels)]
        return ([b.spatial(modulation, sz) for b, sz in zip(self.down, sizes)]
                + [self.middle.spatial(modulation, sizes[-1])]
                + [b.spatial(modulation, sz) for b, sz in zip(self.up, reversed(sizes))])

    def velocity(self, x: jax.Array, t: jax.Array, condition: list) -> jax.Array:
        """v(x_t, t) given `condition(sources, ...)` of the same images."""
        if x.shape[-1] != self.out_channels:
            raise ValueError(f"x must have {self.out_channels} channels, got shape {x.shape}")
        t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), x.shape[:1])
        features = time_features(t, self.time_dim).astype(x.dtype)
        temb = self.time_1(jax.nn.silu(self.time_0(features)))
        spatial = iter(condition)
        h = self.conv_in(x)
        skips = []
        for i, block in enumerate(self.down):
            h = block(h, next(spatial), temb)
            skips.append(h)
            if i < self.levels - 1:
                b, hh, ww, c = h.shape
                h = h.reshape(b, hh // 2, 2, ww // 2, 2, c).mean(axis=(2, 4))
        h = self.middle(h, next(spatial), temb)
        for i, block in enumerate(self.up):
            h = block(jnp.concatenate([h, skips.pop()], axis=-1), next(spatial), temb)
            if i < self.levels - 1:
                h = upsample2x(h)
        return self.conv_out(jax.nn.silu(self.norm_out(h)))


# ---------------------------------------------------------------------------
# The path, the loss's target and the samplers
# ---------------------------------------------------------------------------
def interpolate(noise: jax.Array, image: jax.Array, t: jax.Array) -> jax.Array:
    """x_t = (1 - t) noise + t image, t of shape (B,)."""
    t = t.astype(image.dtype)[:, None, None, None]
    return (1.0 - t) * noise + t * image


def sample_times(key: jax.Array, batch: int, kind: str = "logit_normal") -> jax.Array:
    """(batch,) training times in (0, 1): `uniform`, or `logit_normal` (the
    sigmoid of a standard normal: more weight mid-path, where the velocity is
    hardest to predict; Esser et al. 2024 found it best among their schemes)."""
    if kind == "uniform":
        return jax.random.uniform(key, (batch,))
    if kind == "logit_normal":
        return jax.nn.sigmoid(jax.random.normal(key, (batch,)))
    raise ValueError(f"time_sampling={kind!r}: choose uniform or logit_normal")


def sample(velocity: Callable[[jax.Array, jax.Array], jax.Array], noise: jax.Array, steps: int,
           solver: str = "euler") -> jax.Array:
    """Integrates dx/dt = velocity(x, t) from `noise` at t = 0 to t = 1 in
    `steps` equal steps: Euler (one velocity per step) or Heun (two: the
    Euler step's end point corrects it, second-order). `t` is passed as (B,)."""
    if steps < 1:
        raise ValueError(f"sampling needs at least 1 step, got {steps}")
    if solver not in SOLVERS:
        raise ValueError(f"solver={solver!r}: choose one of {', '.join(SOLVERS)}")
    h = 1.0 / steps
    batch = noise.shape[0]

    def times(i):
        return jnp.full((batch,), i * h, jnp.float32)

    def euler(i, x):
        return x + h * velocity(x, times(i))

    def heun(i, x):
        v0 = velocity(x, times(i))
        v1 = velocity(x + h * v0, times(i + 1))
        return x + 0.5 * h * (v0 + v1)

    return jax.lax.fori_loop(0, steps, euler if solver == "euler" else heun, noise)
