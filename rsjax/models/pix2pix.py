"""The pix2pix baseline generator: junyanz's U-Net-256 (Flax NNX, NHWC).

`UNetGenerator` goes down `num_downs` 4x4 stride-2 convs to 1x1 (8 for 256
tiles) and back up through as many transposed convs, each level's encoder
output concatenated as a skip. pix2pix keeps dropout active at test time as its
noise source; here `model.eval()` switches it off: call
`model.set_attributes(nnx.Dropout, deterministic=False)` after `eval()` to
sample pix2pix-style. The 70x70 PatchGAN is
`rsjax.models.patchgan.NLayerDiscriminator`.
docs/models.md (section "pix2pix") gives the layers, norms and widths, and the
PatchGAN's arguments.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from rsjax.models.layers import Conv2d, ConvTranspose2d, batch_norm, leaky_relu, pix2pix_init


def _bn_scale_init(key, shape, dtype=jnp.float32):
    return 1.0 + 0.02 * jax.random.normal(key, shape, dtype)  # pix2pix: BN weight N(1, 0.02)


class UNetGenerator(nnx.Module):
    """pix2pix U-Net generator. `__call__(x)` -> (B, H, W, out_channels) tanh image;
    H and W must be multiples of 2**num_downs."""

    def __init__(self, in_channels: int, out_channels: int = 4, *, ngf: int = 64,
                 num_downs: int = 8, use_dropout: bool = True, rngs: nnx.Rngs):
        if num_downs < 5:
            raise ValueError(f"num_downs must be >= 5 (pix2pix's U-Net), got {num_downs}")
        self.num_downs = num_downs
        # inner[l]: channels after level l's downsampling conv; outer[l]: before it.
        inner = [ngf * min(2**level, 8) for level in range(num_downs)]
        outer = [out_channels] + inner[:-1]
        innermost = num_downs - 1

        down_convs, down_norms = [], []
        up_convs, up_norms, dropouts = [], [], []
        for level in range(num_downs):
            c_in = in_channels if level == 0 else outer[level]
            normed_down = 0 < level < innermost
            down_convs.append(Conv2d(c_in, inner[level], 4, stride=2, padding=1,
                                     use_bias=False,  # as pix2pix with BatchNorm, even outermost
                                     kernel_init=pix2pix_init, rngs=rngs))
            down_norms.append(batch_norm(inner[level], affine=True, scale_init=_bn_scale_init,
                                         rngs=rngs) if normed_down else None)
            # Decoder of this level: from the inner features (concatenated with the
            # skip except at the innermost level) back to `outer` channels.
            up_in = inner[level] if level == innermost else 2 * inner[level]
            up_convs.append(ConvTranspose2d(  # PyTorch ConvTranspose2d(k=4, s=2, p=1)
                up_in, outer[level], 4, padding=1, use_bias=level == 0,
                kernel_init=pix2pix_init, rngs=rngs))
            up_norms.append(batch_norm(outer[level], affine=True, scale_init=_bn_scale_init,
                                       rngs=rngs) if level else None)
            with_dropout = use_dropout and 4 <= level < innermost
            dropouts.append(nnx.Dropout(0.5, rngs=rngs) if with_dropout else None)
        self.down_convs = nnx.List(down_convs)
        self.down_norms = nnx.List(down_norms)
        self.up_convs = nnx.List(up_convs)
        self.up_norms = nnx.List(up_norms)
        self.dropouts = nnx.List(dropouts)

    def __call__(self, x: jax.Array) -> jax.Array:
        step = 2**self.num_downs
        if x.shape[1] % step or x.shape[2] % step:
            raise ValueError(f"input height and width must be multiples of {step} "
                             f"(num_downs={self.num_downs}), got {x.shape[1:3]}")
        down = []  # each level's encoder output
        h = x
        for level in range(self.num_downs):
            if level:
                h = leaky_relu(h)
            h = self.down_convs[level](h)
            if self.down_norms[level] is not None:
                h = self.down_norms[level](h)
            down.append(h)
        for level in reversed(range(self.num_downs)):
            h = self.up_convs[level](jax.nn.relu(h))
            if level == 0:
                return jnp.tanh(h)
            h = self.up_norms[level](h)
            if self.dropouts[level] is not None:
                h = self.dropouts[level](h)
            h = jnp.concatenate([down[level - 1], h], axis=-1)
        raise AssertionError("unreachable")
