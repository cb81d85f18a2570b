"""Convolutions rewritten for XLA:CPU, where some of its own are slow.

`layers.Conv2d` asks `rewrite_for(...)` how to compute a call: None (XLA's
convolution; always so off the CPU), "matmul" (one matmul over im2col patches)
or "row_kernel_grad" (the kernel gradient as matmuls over chunks of rows).
Both compute the same function as the convolution, forward and backward.
`rewrites(mode)`, read when a model is traced, switches them: "auto" (the
default; on when JAX's default backend is the CPU) or "off" (e.g. to count
FLOPs exactly). The comments below hold the measurements behind each rule.
docs/benchmarks.md (section "The CPU convolution rewrites") says when each
applies and why "off" counts FLOPs right.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator, Optional

import jax
import jax.numpy as jnp

MODES = ("auto", "off")
_mode = contextvars.ContextVar("rsjax_cpu_conv_rewrites", default="auto")


@contextlib.contextmanager
def rewrites(mode: str) -> Iterator[None]:
    """Within the block, models trace with the CPU rewrites `mode` says:
    "auto" (on when the default backend is the CPU) or "off"."""
    if mode not in MODES:
        raise ValueError(f"CPU convolution rewrites: mode {mode!r}, choose one of {MODES}")
    token = _mode.set(mode)
    try:
        yield
    finally:
        _mode.reset(token)


def enabled() -> bool:
    """Whether the rewrites apply to what is traced now."""
    return _mode.get() == "auto" and jax.default_backend() == "cpu"


def rewrite_for(kernel_shape, stride: int, padding, x: jax.Array) -> Optional[str]:
    """How Conv2d computes a call on `x`: "matmul", "row_kernel_grad" or None
    (XLA's convolution)."""
    if not enabled():
        return None
    if use_matmul(kernel_shape, stride, padding, x):
        return "matmul"
    if use_row_kernel_grad(kernel_shape, stride, x):
        return "row_kernel_grad"
    return None


# ---------------------------------------------------------------------------
# The matmul form
# ---------------------------------------------------------------------------
def use_matmul(kernel_shape, stride: int, padding, x: jax.Array) -> bool:
    """Whether to compute the call as one matmul over im2col patches.

    On XLA:CPU the input gradient of a convolution first copies the whole
    kernel, flipped and transposed, at a fraction of memory speed: about 130 ms
    for a 3x3 1024->1024 kernel (37.7 MB), while the convolution itself, at
    SPADE's 4x4 or 8x8 starting resolutions, is a few ms of arithmetic.
    Written as patches @ W, the forward and both gradients are plain matmuls
    that read the kernel as stored; for the same layers that is 2-3x faster.
    It only pays while the kernel outweighs the activations, so the rule is
    kernel columns (kh*kw*out) at least 4x the output pixels (batch*H*W); big
    images keep the convolution.

    A 1x1 stride-1 convolution is a matmul of the pixels with the kernel and
    copies nothing as one, so it always takes this form: XLA:CPU computes its
    kernel gradient as a convolution over the whole image, 2.03 s against
    0.19 s as a matmul (forward + both gradients, SPADE's 128 -> 64 shortcut at
    4x256x256), 0.94 against 0.13 s (256 -> 128 at 4x128x128), 0.098 against
    0.057 s (RS-UNet's 64 -> 9 head at 4x256x256), 0.010 against 0.0045 s
    (1024 -> 512 at 1x16x16); best of 3 interleaved in one process on the
    quiet 2-core development machine, 2026-12-01.
    """
    kh, kw, _, out = kernel_shape
    if kh == kw == 1 and stride == 1:
        return True
    b, h, w = x.shape[0], x.shape[1], x.shape[2]
    (lo_h, hi_h), (lo_w, hi_w) = padding
    out_pixels = b * ((h + lo_h + hi_h - kh) // stride + 1) * (
        (w + lo_w + hi_w - kw) // stride + 1)
    return kh * kw * out >= 4 * out_pixels


def conv_as_matmul(x: jax.Array, kernel: jax.Array, stride: int, padding) -> jax.Array:
    """The convolution of NHWC `x` with HWIO `kernel` as patches @ kernel."""
    kh, kw = kernel.shape[0], kernel.shape[1]
    return patches(x, kh, kw, stride, padding) @ kernel.reshape(-1, kernel.shape[-1])


def patches(x: jax.Array, kh: int, kw: int, stride: int,
            padding: tuple[tuple[int, int], ...]) -> jax.Array:
    """im2col: (B, Ho, Wo, kh*kw*C) patches of NHWC `x`, taps in HWIO order, so
    `patches @ kernel.reshape(-1, out)` is the convolution."""
    x = jnp.pad(x, ((0, 0), *padding, (0, 0)))
    ho = (x.shape[1] - kh) // stride + 1
    wo = (x.shape[2] - kw) // stride + 1
    taps = [x[:, i:i + stride * (ho - 1) + 1:stride, j:j + stride * (wo - 1) + 1:stride]
            for i in range(kh) for j in range(kw)]
    return jnp.concatenate(taps, axis=-1)


# ---------------------------------------------------------------------------
# The row-chunked kernel gradient
# ---------------------------------------------------------------------------
# Fewest output channels for which the kernel gradient is computed by rows.
_ROW_KERNEL_GRAD_MIN_OUTPUTS = 32


def use_row_kernel_grad(kernel_shape, stride: int, x: jax.Array) -> bool:
    """Whether the kernel gradient is computed by `conv_valid_row_kernel_grad`.

    XLA:CPU computes the kernel gradient of a stride-1 3x3 convolution as a
    convolution over the whole image (the pixels as its window): with 128
    outputs over a 256x256 image at 27-39 GFLOP/s against 170-200 for the
    forward pass; written as patches^T @ dy over chunks of rows it runs at
    68-83. The same holds with 64 outputs (RS-UNet's first and last level,
    SPADE's last block): forward + both gradients took 0.39-0.54x XLA's time
    at 4x256x256 (4, 64 or 128 -> 64 channels), 4x128x128 and 1x256x256
    (64 or 128 -> 64), measured interleaved in one process on the 2-core
    development machine on 2026-11-30 (a loaded one: XLA's own is slower
    still under load, the ratio is the figure). In RS-UNet's 4x256 step these
    gradients were 38% of the time. Measured no slower at 1x128x128, 128 -> 64
    (0.96x). Narrower layers keep XLA's.
    """
    if stride != 1 or _explicitly_sharded(x):
        # Under explicit sharding the gradient's contraction over the (sharded)
        # batch axis needs an output sharding we leave to XLA's own.
        return False
    return kernel_shape[-1] >= _ROW_KERNEL_GRAD_MIN_OUTPUTS and kernel_shape[0] > 1


def _explicitly_sharded(x: jax.Array) -> bool:
    """Whether x's type carries an explicit sharding (jax.make_mesh's default
    axis types) on some axis; the trainers' meshes are automatic."""
    spec = getattr(getattr(jax.typeof(x), "sharding", None), "spec", None)
    return any(axis is not None for axis in (spec or ()))


# Output pixels (batch x rows x width) per chunk of the row-wise kernel gradient:
# small enough that a chunk's patches (pixels x kh*kw*C floats) stay near cache.
_KERNEL_GRAD_CHUNK_PIXELS = 2048


def _conv_valid(x: jax.Array, kernel: jax.Array) -> jax.Array:
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), "VALID",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


@jax.custom_vjp
def conv_valid_row_kernel_grad(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """A stride-1 'VALID' convolution whose kernel gradient is a sum of matmuls.

    dK[i, j] = sum over output pixels of x[p + (i, j)]^T dy[p]: per chunk of
    output rows, the chunk's im2col patches (pixels, kh*kw*C) contracted with
    dy (pixels, O) over the pixels, accumulated over the chunks so the
    patches never exist for the whole image. Forward pass and input gradient
    are XLA's own.
    """
    return _conv_valid(x, kernel)


def _row_kernel_grad_fwd(x, kernel):
    return _conv_valid(x, kernel), (x, kernel)


def _row_kernel_grad_bwd(residuals, dy):
    x, kernel = residuals
    _, input_vjp = jax.vjp(lambda x: _conv_valid(x, kernel), x)
    (dx,) = input_vjp(dy)
    return dx, _kernel_grad_by_rows(x, dy, kernel.shape).astype(kernel.dtype)


conv_valid_row_kernel_grad.defvjp(_row_kernel_grad_fwd, _row_kernel_grad_bwd)


def _kernel_grad_by_rows(x: jax.Array, dy: jax.Array, kernel_shape) -> jax.Array:
    """(kh, kw, C, O) gradient of `_conv_valid(x, K)` given its output's cotangent."""
    kh, kw, c, o = kernel_shape
    b, ho, wo, _ = dy.shape
    rows = max(1, min(ho, _KERNEL_GRAD_CHUNK_PIXELS // (b * wo)))
    chunks = -(-ho // rows)
    # Pad dy's rows (and x's to match) to whole chunks; the zero rows add nothing.
    extra = chunks * rows - ho
    dy = jnp.pad(dy, ((0, 0), (0, extra), (0, 0), (0, 0)))
    x = jnp.pad(x, ((0, 0), (0, extra), (0, 0), (0, 0)))
    # (O, B, H, W): contracting dy's leading pixel axes with the patches' gives
    # the (O, taps*C) product XLA:CPU runs fastest (measured against (taps*C, O)).
    dy_t = jnp.transpose(dy, (3, 0, 1, 2))

    def chunk(k, acc):
        r0 = k * rows
        window = jax.lax.dynamic_slice_in_dim(x, r0, rows + kh - 1, axis=1)
        taps = jnp.concatenate([window[:, i:i + rows, j:j + wo]
                                for i in range(kh) for j in range(kw)], axis=-1)
        dy_rows = jax.lax.dynamic_slice_in_dim(dy_t, r0, rows, axis=2)
        return acc + jax.lax.dot_general(
            dy_rows, taps, (((1, 2, 3), (0, 1, 2)), ((), ())),
            preferred_element_type=jnp.float32)

    # A rolled loop (measured faster than the unrolled one: 130 against 103
    # GFLOP/s for dx + dK at 256x256, 128->128). XLA's cost analysis counts a
    # loop body once, which is why the benchmark counts FLOPs without it.
    acc = jax.lax.fori_loop(0, chunks, chunk, jnp.zeros((o, kh * kw * c), jnp.float32))
    return acc.reshape(o, kh, kw, c).transpose(1, 2, 3, 0)
