"""RS-UNet: the 5-level U-Net segmenter of the paper's Sec. 4 (Flax NNX, NHWC).

The paper extends the classical U-Net (Ronneberger et al. 2015) to any number of
input bands and 5 down- and 5 up-sampling stages. Each stage is two
3x3 conv -> BatchNorm -> ReLU; downsampling is 2x2 max pooling, upsampling a 2x2
stride-2 transposed conv followed by concatenation with the encoder features of
the same resolution. Widths double per level from `width`, capped at 16*width
(the classical U-Net's deepest width; doubling once more at the 5th level would
give a 2048-channel 8x8 bottleneck for little gain). A final 1x1 conv gives the
class logits; apply softmax in the loss.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from rsjax.models.layers import Conv2d, ConvTranspose2d, batch_norm, he_init


class DoubleConv(nnx.Module):
    """(3x3 conv without bias -> BatchNorm -> ReLU) x 2."""

    def __init__(self, in_channels: int, out_channels: int, *, rngs: nnx.Rngs):
        self.conv_0 = Conv2d(in_channels, out_channels, 3, use_bias=False, kernel_init=he_init,
                             rngs=rngs)
        self.norm_0 = batch_norm(out_channels, affine=True, rngs=rngs)
        self.conv_1 = Conv2d(out_channels, out_channels, 3, use_bias=False, kernel_init=he_init,
                             rngs=rngs)
        self.norm_1 = batch_norm(out_channels, affine=True, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = jax.nn.relu(self.norm_0(self.conv_0(x)))
        return jax.nn.relu(self.norm_1(self.conv_1(x)))


def _max_pool(x: jax.Array) -> jax.Array:
    return nnx.max_pool(x, (2, 2), strides=(2, 2))


class RSUNet(nnx.Module):
    """`__call__(x)` with x (B, H, W, in_channels), H and W multiples of 2**depth
    -> logits (B, H, W, num_classes)."""

    def __init__(self, in_channels: int = 4, num_classes: int = 9, *, width: int = 64,
                 depth: int = 5, rngs: nnx.Rngs):
        if in_channels < 1 or num_classes < 2 or width < 1 or depth < 1:
            raise ValueError(f"bad RSUNet config: in_channels={in_channels}, "
                             f"num_classes={num_classes}, width={width}, depth={depth}")
        self.depth = depth
        widths = [width * 2**min(level, 4) for level in range(depth + 1)]
        self.encoders = nnx.List(
            [DoubleConv(in_channels, widths[0], rngs=rngs)]
            + [DoubleConv(widths[l - 1], widths[l], rngs=rngs) for l in range(1, depth + 1)])
        # Decoder l (depth .. 1) brings level l back to level l-1's resolution and width.
        self.upsamplers = nnx.List([
            ConvTranspose2d(widths[l], widths[l - 1], 2, padding=0, kernel_init=he_init, rngs=rngs)
            for l in range(1, depth + 1)])
        self.decoders = nnx.List([
            DoubleConv(2 * widths[l - 1], widths[l - 1], rngs=rngs) for l in range(1, depth + 1)])
        self.head = Conv2d(widths[0], num_classes, 1, kernel_init=he_init, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        step = 2**self.depth
        if x.ndim != 4 or x.shape[1] % step or x.shape[2] % step:
            raise ValueError(f"input must be (B, H, W, C) with H, W multiples of {step} "
                             f"(depth={self.depth}), got {x.shape}")
        skips = []
        h = x
        for level, encoder in enumerate(self.encoders):
            h = encoder(h if level == 0 else _max_pool(h))
            skips.append(h)
        for level in reversed(range(1, self.depth + 1)):
            h = self.upsamplers[level - 1](h)
            h = self.decoders[level - 1](jnp.concatenate([skips[level - 1], h], axis=-1))
        return self.head(h)
