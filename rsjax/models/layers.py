"""Building blocks shared by the rsjax models (Flax NNX, NHWC).

Why our own convolution instead of `nnx.Conv` + `nnx.SpectralNorm`: in
flax 0.12.8 `nnx.SpectralNorm` writes the normalized kernel W/sigma back into
the wrapped layer's `Param` on every call. The stored weights then change in the
forward pass (not only in the optimizer update), and a jitted step that keeps the
mutated module behaves differently from one that discards it. PyTorch's
`spectral_norm` (the one NVlabs SPADE uses) keeps the raw weight as the trainable
parameter and divides by sigma on the fly; `Conv2d(spectral_norm=True)` does the
same, keeping the power-iteration vectors u, v as `nnx.BatchStat` (like
PyTorch's buffers they are state, not parameters).
"""
from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from rsjax.models import cpu_conv

Initializer = Callable[..., jax.Array]

# NVlabs SPADE initializes every conv with xavier_normal(gain=0.02)
# (BaseNetwork.init_weights, init_type='xavier', init_variance=0.02).
spade_init = nnx.initializers.variance_scaling(0.02**2, "fan_avg", "normal")
# pix2pix (junyanz) initializes conv weights from N(0, 0.02).
pix2pix_init = nnx.initializers.normal(0.02)
# He/Kaiming normal for ReLU networks trained without a GAN recipe (RS-UNet,
# the per-source embeddings whose outputs should have unit scale from the start).
he_init = nnx.initializers.variance_scaling(2.0, "fan_in", "normal")

_SPECTRAL_EPS = 1e-12  # as in torch.nn.utils.spectral_norm


def _l2_normalize(x: jax.Array) -> jax.Array:
    return x / jnp.maximum(jnp.linalg.norm(x), _SPECTRAL_EPS)


def _pad(padding: int | Sequence[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    # A tuple, not a list: static module attributes must be hashable for NNX's graphdef.
    if isinstance(padding, int):
        return ((padding, padding), (padding, padding))
    return tuple((int(lo), int(hi)) for lo, hi in padding)


def compute_dtype(kernel: nnx.Param):
    """The dtype a convolution runs in: its kernel's, float32 as initialized or
    the compute dtype a trainer cast the parameters to (`--config.dtype=bfloat16`).

    Not the input's: normalization layers compute their statistics in float32
    and return float32 whatever they are given, so every convolution after one
    would silently run in float32 (in bfloat16 training, most of them did).
    """
    return kernel[...].dtype


class Conv2d(nnx.Module):
    """2-D convolution with PyTorch-style explicit padding and optional spectral norm.

    kernel (kh, kw, in, out) and bias (out,) are `nnx.Param`. With
    `spectral_norm=True` the kernel used in the forward pass is W / sigma(W),
    where sigma is estimated by one power iteration per call in training mode
    (the vectors u, v are `nnx.BatchStat` and updated then) and taken from the
    stored u, v in eval mode (`model.eval()` sets `use_running_average=True`).
    Gradients flow through sigma but not through u and v, as in PyTorch.
    On CPU a call may be computed another way that gives the same function
    faster (`rsjax.models.cpu_conv`, switched by `cpu_conv.rewrites`).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        *,
        stride: int = 1,
        padding: int | Sequence[tuple[int, int]] | None = None,
        use_bias: bool = True,
        spectral_norm: bool = False,
        kernel_init: Initializer = spade_init,
        init_power_iterations: int = 10,
        rngs: nnx.Rngs,
    ):
        if padding is None:  # 'same' for odd kernels, as PyTorch's padding=k//2
            padding = kernel_size // 2
        self.stride = stride
        self.padding = _pad(padding)
        # XLA:CPU (jax 0.10) computes the kernel gradient of a conv whose padding
        # exceeds kernel_size - 1 in total (output larger than input, e.g. SPADE's
        # 4x4 stride-1 discriminator convs with padding 2) on a slow path: 6.1 s
        # for 256->512 at 17x17, batch 4, against 0.13 s when the input is padded
        # first and the conv is 'VALID'. The result is identical, and a pad before
        # the conv costs nothing on other backends: not one of cpu_conv's switched rewrites.
        self.pad_first = any(lo + hi > kernel_size - 1 for lo, hi in self.padding)
        self.kernel = nnx.Param(
            kernel_init(rngs.params(), (kernel_size, kernel_size, in_channels, out_channels))
        )
        self.bias = nnx.Param(jnp.zeros((out_channels,))) if use_bias else None
        self.spectral_norm = spectral_norm
        # Read by model.train()/model.eval(): False -> update u, v each call.
        self.use_running_average = False
        if spectral_norm:
            w = self.kernel[...].reshape(-1, out_channels)
            u = _l2_normalize(jax.random.normal(rngs.params(), (out_channels,)))
            # A few power iterations at construction so sigma is already accurate
            # at the first step (PyTorch's parametrization does 15).
            u, v = _power_iteration(w, u, init_power_iterations)
            self.u = nnx.BatchStat(u)
            self.v = nnx.BatchStat(v)

    def _sigma(self) -> jax.Array | None:
        """Spectral norm's sigma (None without it); updates u, v in training mode."""
        if not self.spectral_norm:
            return None
        kernel = self.kernel[...]
        # In float32 whatever the compute dtype: u, v are float32 state, and a
        # bfloat16 power iteration would carry bfloat16 into their loop.
        w = kernel.reshape(-1, kernel.shape[-1]).astype(jnp.float32)  # (kh*kw*in, out)
        if self.use_running_average:
            u, v = self.u[...], self.v[...]
        else:
            u, v = _power_iteration(w, self.u[...], 1)
            self.u[...] = u
            self.v[...] = v
        # sigma = v^T W u, written as a matrix-vector product and a dot: XLA:CPU
        # materializes W^T (37.7 MB at 1024 channels) for `v @ w`, this is free.
        return jnp.dot(v, w @ u)

    def normalized_kernel(self) -> jax.Array:
        """The kernel the forward pass uses (W / sigma with spectral norm)."""
        sigma = self._sigma()
        return self.kernel[...] if sigma is None else self.kernel[...] / sigma

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(compute_dtype(self.kernel))
        rewrite = cpu_conv.rewrite_for(self.kernel.shape, self.stride, self.padding, x)
        if rewrite == "matmul":
            # Spectral norm divides the (small) output instead of the (big) kernel.
            sigma = self._sigma()
            y = cpu_conv.conv_as_matmul(x, self.kernel[...].astype(x.dtype), self.stride,
                                        self.padding)
            if sigma is not None:
                y = y / sigma.astype(y.dtype)
        elif rewrite == "row_kernel_grad":
            x = jnp.pad(x, ((0, 0), *self.padding, (0, 0)))
            y = cpu_conv.conv_valid_row_kernel_grad(x, self.normalized_kernel().astype(x.dtype))
        else:
            padding = self.padding
            if self.pad_first:
                x = jnp.pad(x, ((0, 0), *padding, (0, 0)))
                padding = "VALID"
            y = jax.lax.conv_general_dilated(
                x, self.normalized_kernel().astype(x.dtype),
                window_strides=(self.stride, self.stride), padding=padding,
                dimension_numbers=("NHWC", "HWIO", "NHWC"))
        if self.bias is not None:
            y = y + self.bias[...].astype(y.dtype)
        return y


class ConvTranspose2d(nnx.Module):
    """PyTorch's ConvTranspose2d(kernel_size, stride=2, padding) for the cases that
    double the resolution (kernel_size - 2 * padding == 2: pix2pix's k4 p1,
    the U-Net's k2 p0): k2 p0 as one matmul (`_conv_transpose_2x2`), k4 p1
    as four sub-pixel convolutions.

    out[2i - padding + t] += x[i] @ kernel[t] (per axis), as in PyTorch. Why not
    `lax.conv_transpose`: on XLA:CPU (jax 0.10) the kernel gradient of a
    transposed conv takes a slow path: 1.55 s for 128->64 at 64x64, batch 4,
    k4 s2, against about 0.1 s here. Each output phase (r, s) (the output pixels
    2m + r, 2n + s) is an ordinary stride-1 conv of the input with the taps of
    the kernel that land on that phase, so forward and backward take XLA's fast
    paths, with exactly the transposed conv's FLOPs.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, *,
                 padding: int = 0, use_bias: bool = True, kernel_init: Initializer = he_init,
                 rngs: nnx.Rngs):
        if kernel_size - 2 * padding != 2:
            raise ValueError("ConvTranspose2d supports stride 2 with kernel_size - 2 * padding == 2 "
                             f"(output = 2 x input), got kernel {kernel_size}, padding {padding}")
        self.kernel_size = kernel_size
        self.padding = padding
        self.kernel = nnx.Param(
            kernel_init(rngs.params(), (kernel_size, kernel_size, in_channels, out_channels)))
        self.bias = nnx.Param(jnp.zeros((out_channels,))) if use_bias else None

    def _phase_taps(self, phase: int) -> tuple[list[int], int]:
        """Kernel taps reaching output phase `phase`, ordered by input offset,
        and the smallest input offset (input row = output row m + offset)."""
        taps = {}
        for t in range(self.kernel_size):
            if (t - phase - self.padding) % 2 == 0:
                taps[-(t - phase - self.padding) // 2] = t
        offsets = sorted(taps)
        return [taps[o] for o in offsets], offsets[0]

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(compute_dtype(self.kernel))
        kernel = self.kernel[...].astype(x.dtype)
        if self.kernel_size == 2:
            y = _conv_transpose_2x2(x, kernel)
        else:
            y = self._by_phases(x, kernel)
        if self.bias is not None:
            y = y + self.bias[...].astype(y.dtype)
        return y

    def _by_phases(self, x: jax.Array, kernel: jax.Array) -> jax.Array:
        b, h, w, _ = x.shape
        phases = []
        for r in (0, 1):
            rows, row0 = self._phase_taps(r)
            for s in (0, 1):
                cols, col0 = self._phase_taps(s)
                k = kernel[jnp.array(rows)][:, jnp.array(cols)]
                pad_h = (max(0, -row0), max(0, row0 + len(rows) - 1))
                pad_w = (max(0, -col0), max(0, col0 + len(cols) - 1))
                xp = jnp.pad(x, ((0, 0), pad_h, pad_w, (0, 0)))
                top, left = row0 + pad_h[0], col0 + pad_w[0]
                xp = xp[:, top:top + h + len(rows) - 1, left:left + w + len(cols) - 1]
                phases.append(jax.lax.conv_general_dilated(
                    xp, k, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")))
        y = jnp.stack(phases, axis=3).reshape(b, h, w, 2, 2, -1)  # (.., r, s, out)
        return y.transpose(0, 1, 3, 2, 4, 5).reshape(b, 2 * h, 2 * w, -1)


def _conv_transpose_2x2(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """Stride-2 transposed conv with a 2x2 kernel and no padding (the U-Net's
    upsampler): out[2i + r, 2j + s] = x[i, j] @ kernel[r, s], one matmul of the
    pixels with the (in, 2*2*out) kernel, then the pixel shuffle.

    The four phases do not overlap, so this is the whole transposed conv, and
    its gradients are two matmuls. As four 1x1 convolutions (`_by_phases`),
    XLA:CPU (jax 0.10) computed each kernel gradient as a convolution over the
    whole image with the batch as its feature axis: 1.5-2 s per phase at
    128->64, 256x256, batch 4, against tens of ms as a matmul.
    """
    b, h, w, c = x.shape
    out = kernel.shape[-1]
    y = x.reshape(-1, c) @ kernel.transpose(2, 0, 1, 3).reshape(c, 4 * out)   # (pixels, r*s*out)
    y = y.reshape(b, h, w, 2, 2, out).transpose(0, 1, 3, 2, 4, 5)             # (b, i, r, j, s, out)
    return y.reshape(b, 2 * h, 2 * w, out)


@functools.partial(jax.jit, static_argnums=2)  # one compile per shape, not per op
def _power_iteration(w: jax.Array, u: jax.Array, steps: int) -> tuple[jax.Array, jax.Array]:
    """`steps` power iterations on w (fan_in, out) from u (out,); no gradient."""
    if steps < 1:
        raise ValueError(f"power iteration needs at least 1 step, got {steps}")
    w = jax.lax.stop_gradient(w)

    def iteration(_, uv):
        v = _l2_normalize(w @ uv[0])
        # W^T v as a weighted column sum: `w.T @ v` makes XLA:CPU copy W transposed.
        return _l2_normalize(jnp.sum(w * v[:, None], axis=0)), v
    # A rolled loop keeps the program small: unrolled, 10 steps in 40 layers
    # made the model's initialization compile for seconds.
    u, v = jax.lax.fori_loop(0, steps, iteration, (u, jnp.zeros(w.shape[0], w.dtype)))
    return jax.lax.stop_gradient(u), jax.lax.stop_gradient(v)


def batch_norm(num_features: int, *, affine: bool, rngs: nnx.Rngs, scale_init=None) -> nnx.BatchNorm:
    """BatchNorm with PyTorch's defaults (momentum 0.1 = Flax 0.9, eps 1e-5).

    Statistics are `jnp.mean` over batch and space; under `jax.jit` with the batch
    sharded over a Mesh, XLA computes them over the global batch (SyncBatchNorm),
    which tests/test_models.py checks on 8 fake devices.
    """
    kwargs = {} if scale_init is None else {"scale_init": scale_init}
    return nnx.BatchNorm(
        num_features, momentum=0.9, epsilon=1e-5,
        use_scale=affine, use_bias=affine, rngs=rngs, **kwargs,
    )


def instance_norm(num_features: int, *, rngs: nnx.Rngs) -> nnx.InstanceNorm:
    """InstanceNorm without affine parameters (PyTorch's InstanceNorm2d default)."""
    return nnx.InstanceNorm(num_features, epsilon=1e-5, use_scale=False, use_bias=False, rngs=rngs)


def leaky_relu(x: jax.Array) -> jax.Array:
    return jax.nn.leaky_relu(x, 0.2)


def resize_nearest(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """Nearest-neighbour resize of NHWC `x` to `size` = (h, w).

    Source index floor(i * in / out), the rule of PyTorch's
    `F.interpolate(mode='nearest')` that SPADE uses for its segmentation map.
    """
    h, w = size
    in_h, in_w = x.shape[1], x.shape[2]
    if (in_h, in_w) == (h, w):
        return x
    if in_h % h == 0 and in_w % w == 0:
        # Integer shrink: floor(i * in / out) = i * factor, a strided slice, whose
        # gradient is a cheap pad rather than the scatter-add a gather needs.
        return x[:, ::in_h // h, ::in_w // w]
    if h % in_h == 0 and w % in_w == 0:  # integer enlargement: repeat
        return jnp.repeat(jnp.repeat(x, h // in_h, axis=1), w // in_w, axis=2)
    rows = (jnp.arange(h) * in_h) // h
    cols = (jnp.arange(w) * in_w) // w
    return x[:, rows][:, :, cols]


def resize_linear(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """Bilinear resize (antialiased when shrinking) for continuous feature maps."""
    if x.shape[1:3] == tuple(size):
        return x
    return jax.image.resize(x, (x.shape[0], *size, x.shape[3]), method="linear")


def upsample2x(x: jax.Array) -> jax.Array:
    """Nearest-neighbour upsampling by 2 (PyTorch nn.Upsample(scale_factor=2))."""
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
