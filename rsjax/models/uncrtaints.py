"""UnCRtainTS, mono-temporal (Ebel et al. 2023, CVPR EarthVision), in Flax NNX, NHWC:
cloud removal with a per-pixel, per-band predicted variance.

`UnCRtainTS` takes the concatenated sources (cloudy optical, SAR, any others, in
order) through a conv1x1 input block to width 128, 1 + 5 `MBConv` blocks and a
conv1x1 to a mean and a variance per band: the mean in rsjax's model space
[-1, 1] (2 sigmoid - 1), the variance softplus + 1e-3 in model-space units.
`depthwise_reflect` is its depthwise conv3x3 as nine shifted sums (fast on CPU).
docs/models.md (section "UnCRtainTS") gives the architecture as read from the
authors' code, its 520,218 parameters and the differences from it on purpose.
"""
from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from rsjax.models.layers import batch_norm

WIDTH = 128
EXPANSION = 2
SE_RATIO = 0.25          # of the block's input width
GROUPS = 4
VARIANCE_FLOOR = 1e-3


def _norm(kind: str, features: int, rngs: nnx.Rngs) -> nnx.Module:
    if kind == "group":      # PyTorch's GroupNorm: 4 groups, eps 1e-5, affine
        return nnx.GroupNorm(features, num_groups=GROUPS, epsilon=1e-5, rngs=rngs)
    if kind == "batch":
        return batch_norm(features, affine=True, rngs=rngs)
    raise ValueError(f"norm={kind!r}: choose group or batch")


def depthwise_reflect(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """3x3 depthwise conv (kernel (3, 3, 1, C)) of x reflect-padded by 1.

    Written as the sum of the nine shifted images times their weights, not as
    a grouped convolution: XLA:CPU computes a grouped convolution's kernel
    gradient as a dense C x C one (a (C, 3, 3, C) result, C times the work),
    which made it 83 % of UnCRtainTS's train step (rsjax bench steps --profile,
    2026-12-07); the sum's gradient is nine products and sums. Summed row by
    row of the kernel (one slice of rows, three of columns each), which XLA
    fuses better than nine independent slices: forward and backward of a
    (8, 64, 64, 256) input 0.20 s against 0.28 s, and 1.30 s as a grouped
    convolution (2-core AMD EPYC)."""
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="reflect")
    k = kernel.astype(x.dtype)
    height, width = x.shape[1], x.shape[2]
    out = None
    for dy in range(3):
        rows = padded[:, dy:dy + height]
        term = sum(rows[:, :, dx:dx + width] * k[dy, dx, 0] for dx in range(3))
        out = term if out is None else out + term
    return out


class MBConv(nnx.Module):
    """The inverted-residual block with squeeze-and-excitation (docs/models.md,
    section "UnCRtainTS")."""

    def __init__(self, width: int, *, norm: str, rngs: nnx.Rngs):
        hidden = width * EXPANSION
        squeezed = int(width * SE_RATIO)
        self.pre_norm = _norm(norm, width, rngs)
        self.expand = nnx.Linear(width, hidden, use_bias=False, rngs=rngs)
        self.norm_1 = _norm(norm, hidden, rngs)
        self.depthwise = nnx.Param(nnx.initializers.lecun_normal()(rngs.params(), (3, 3, 1, hidden)))
        self.norm_2 = _norm(norm, hidden, rngs)
        self.se_reduce = nnx.Linear(hidden, squeezed, use_bias=False, rngs=rngs)
        self.se_expand = nnx.Linear(squeezed, hidden, use_bias=False, rngs=rngs)
        self.project = nnx.Linear(hidden, width, use_bias=False, rngs=rngs)
        self.norm_3 = _norm(norm, width, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        gelu = lambda v: jax.nn.gelu(v, approximate=False)   # noqa: E731  (PyTorch's nn.GELU)
        h = gelu(self.norm_1(self.expand(self.pre_norm(x))))
        h = gelu(self.norm_2(depthwise_reflect(h, self.depthwise[...])))
        excite = jax.nn.sigmoid(self.se_expand(gelu(self.se_reduce(h.mean(axis=(1, 2))))))
        h = h * excite[:, None, None, :]
        return x + self.norm_3(self.project(h))


class UnCRtainTS(nnx.Module):
    """`__call__(sources)` -> (mean, variance), each (B, H, W, out_channels):
    the cloud-free image in model space [-1, 1] and its predicted per-pixel,
    per-band variance (> 0)."""

    predicts_variance = True          # rsjax.trainers.cloud_removal trains it with the Gaussian NLL

    def __init__(self, source_channels: Mapping[str, int], out_channels: int = 4, *,
                 width: int = WIDTH, encoder_blocks: int = 1, decoder_blocks: int = 5,
                 rngs: nnx.Rngs):
        if not source_channels:
            raise ValueError("source_channels is empty: UnCRtainTS needs at least one source")
        self.sources = tuple((str(k), int(v)) for k, v in source_channels.items())
        self.out_channels = out_channels
        in_channels = sum(v for _, v in self.sources)
        self.in_conv = nnx.Linear(in_channels, width, rngs=rngs)
        self.in_norm = _norm("group", width, rngs)
        self.encoder = nnx.List([MBConv(width, norm="group", rngs=rngs)
                                 for _ in range(encoder_blocks)])
        self.decoder = nnx.List([MBConv(width, norm="batch", rngs=rngs)
                                 for _ in range(decoder_blocks)])
        self.out_conv = nnx.Linear(width, 2 * out_channels, rngs=rngs)

    def __call__(self, sources: Mapping[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
        missing = [k for k, _ in self.sources if k not in sources]
        if missing:
            raise ValueError(f"sources missing {missing}; the model was built with "
                             f"{[k for k, _ in self.sources]}")
        x = jnp.concatenate([sources[k] for k, _ in self.sources], axis=-1)
        h = jax.nn.relu(self.in_norm(self.in_conv(x)))
        for block in (*self.encoder, *self.decoder):
            h = block(h)
        out = self.out_conv(h)
        mean, raw_variance = out[..., :self.out_channels], out[..., self.out_channels:]
        return 2.0 * jax.nn.sigmoid(mean) - 1.0, jax.nn.softplus(raw_variance) + VARIANCE_FLOOR
