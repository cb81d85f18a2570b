"""rsjax.models: layers against NumPy references, output shapes, parameter parity,
gradients, spectral norm. Multi-device behaviour is in test_models_parallel.py.

Models are tiny (ngf 2); parameter counts use nnx.eval_shape, so the full-size
models are never allocated or compiled.
"""
import itertools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rsjax.models import create_model
from rsjax.commands.params import main as param_table_main
from rsjax.models import cpu_conv, layers
from rsjax.models.param_table import (
    REFERENCE_COUNTS, REFERENCE_SOURCES, abstract_model, count_params,
    reference_configs,
)
from rsjax.models.patchgan import (
    MultiscaleDiscriminator, NLayerDiscriminator, conditional_input, downsample,
)
from rsjax.models.pix2pix import UNetGenerator
from rsjax.models.spade import SPADE, SPADEResBlock, RSSpadeGenerator
from rsjax.models.unet import RSUNet

def rngs(seed=0):
    # rbg keys: XLA's RngBitGenerator compiles in a fraction of threefry's time,
    # and building a model compiles one random op per parameter shape.
    return nnx.Rngs(jax.random.key(seed, impl="rbg"))


SOURCES = {"lulc": 9, "s1": 2, "dem": 5}  # dem: elevation, slope, sin/cos aspect, hillshade
SUBSETS = [dict((k, SOURCES[k]) for k in combo)
           for r in (1, 2, 3) for combo in itertools.combinations(SOURCES, r)]


def source_shapes(channels, size, batch=2):
    """Abstract inputs; terrain arrives at a third of the optical resolution (30 m vs 10 m)."""
    return {k: jax.ShapeDtypeStruct((batch, *(2 * [-(-size // 3) if k == "dem" else size]), c),
                                    jnp.float32) for k, c in channels.items()}


def random_sources(channels, size, batch=2, seed=0):
    rng = np.random.default_rng(seed)
    return {k: jnp.asarray(rng.normal(size=s.shape), jnp.float32)
            for k, s in source_shapes(channels, size, batch).items()}


# ----------------------------------------------------------------- NumPy references

def np_conv(x, kernel, bias=None, stride=1, pad=1):
    """Cross-correlation as PyTorch's Conv2d computes it, NHWC / HWIO, by loops."""
    x = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    kh, kw = kernel.shape[:2]
    out_h = (x.shape[1] - kh) // stride + 1
    out_w = (x.shape[2] - kw) // stride + 1
    y = np.zeros((x.shape[0], out_h, out_w, kernel.shape[3]))
    for i in range(kh):
        for j in range(kw):
            patch = x[:, i:i + stride * out_h:stride, j:j + stride * out_w:stride]
            y += patch @ kernel[i, j]
    return y if bias is None else y + bias


def np_conv_transpose(x, kernel, pad):
    """PyTorch ConvTranspose2d(stride=2, padding=pad) by scattering:
    out[2i - pad + t] += x[i] @ kernel[t] along each axis."""
    b, h, w, _ = x.shape
    k = kernel.shape[0]
    full = np.zeros((b, 2 * (h - 1) + k, 2 * (w - 1) + k, kernel.shape[3]))
    for i in range(h):
        for j in range(w):
            full[:, 2 * i:2 * i + k, 2 * j:2 * j + k] += np.einsum("bc,xyco->bxyo", x[:, i, j], kernel)
    out_h, out_w = 2 * (h - 1) - 2 * pad + k, 2 * (w - 1) - 2 * pad + k
    return full[:, pad:pad + out_h, pad:pad + out_w]


def np_nearest(x, size):
    """PyTorch F.interpolate(mode='nearest'): source index floor(dst * in / out)."""
    rows = np.floor(np.arange(size[0]) * (x.shape[1] / size[0])).astype(int)
    cols = np.floor(np.arange(size[1]) * (x.shape[2] / size[1])).astype(int)
    return x[:, rows][:, :, cols]


def test_conv2d_matches_numpy_convolution():
    conv = layers.Conv2d(3, 5, 3, rngs=rngs(0))
    conv.bias[...] = jnp.arange(5.0)
    x = np.random.default_rng(0).normal(size=(2, 7, 6, 3)).astype(np.float32)
    want = np_conv(x, np.asarray(conv.kernel[...]), np.arange(5.0))
    np.testing.assert_allclose(conv(jnp.asarray(x)), want, atol=1e-5)
    strided = layers.Conv2d(3, 4, 4, stride=2, padding=1, use_bias=False, rngs=rngs(1))
    want = np_conv(x, np.asarray(strided.kernel[...]), stride=2, pad=1)
    assert want.shape == (2, 3, 3, 4)  # PyTorch: floor((7 + 2 - 4) / 2) + 1 = 3
    np.testing.assert_allclose(strided(jnp.asarray(x)), want, atol=1e-5)
    # SPADE's discriminator: 4x4, stride 1, padding 2 (padded first, see Conv2d).
    wide = layers.Conv2d(3, 2, 4, padding=2, rngs=rngs(2))
    assert wide.pad_first
    want = np_conv(x, np.asarray(wide.kernel[...]), np.zeros(2), pad=2)
    assert want.shape == (2, 8, 7, 2)
    np.testing.assert_allclose(wide(jnp.asarray(x)), want, atol=1e-5)


@pytest.mark.parametrize("kernel_size,stride,padding", [(3, 1, 1), (4, 2, 1), (4, 1, 2), (1, 1, 0)])
def test_conv2d_matmul_path_matches_numpy_and_the_convolution_gradients(
        kernel_size, stride, padding, monkeypatch):
    """The im2col matmul form Conv2d uses on CPU for big kernels on small images
    gives NumPy's convolution, and the same output and gradients (kernel, input,
    through spectral norm's sigma) as the convolution form."""
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 7, 6, 3)), jnp.float32)
    conv = layers.Conv2d(3, 5, kernel_size, stride=stride, padding=padding, spectral_norm=True,
                         rngs=rngs(0))
    conv.bias[...] = jnp.arange(5.0)
    conv.eval()  # fixed u, v: both forms see the same sigma
    graph, params, rest = nnx.split(conv, nnx.Param, ...)

    def loss_and_grads(use_matmul):
        monkeypatch.setattr(cpu_conv, "enabled", lambda: use_matmul)
        monkeypatch.setattr(cpu_conv, "use_matmul", lambda *args: use_matmul)

        def loss(params, x):
            y = nnx.merge(graph, params, rest)(x)
            return jnp.sum(jnp.sin(y)), y
        (_, y), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, x)
        return y, grads

    y_mm, g_mm = loss_and_grads(True)
    y_conv, g_conv = loss_and_grads(False)
    kernel = np.asarray(conv.normalized_kernel())
    want = np_conv(np.asarray(x), kernel, np.arange(5.0), stride=stride, pad=padding)
    np.testing.assert_allclose(y_mm, want, atol=1e-5)
    np.testing.assert_allclose(y_mm, y_conv, atol=1e-5)
    for a, b in zip(jax.tree.leaves(g_mm), jax.tree.leaves(g_conv)):
        assert float(jnp.max(jnp.abs(b))) > 0
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)


def test_conv2d_chooses_the_matmul_form_for_big_kernels_on_small_images_and_1x1():
    conv = layers.Conv2d(64, 64, 3, rngs=rngs(0))
    pointwise = layers.Conv2d(64, 64, 1, rngs=rngs(0))

    def rewrite(x):
        return cpu_conv.rewrite_for(conv.kernel.shape, conv.stride, conv.padding, x)
    small, big = jnp.zeros((1, 4, 4, 64)), jnp.zeros((1, 64, 64, 64))
    assert cpu_conv.use_matmul(conv.kernel.shape, 1, conv.padding, small)  # 576 >= 4 * 16 pixels
    assert not cpu_conv.use_matmul(conv.kernel.shape, 1, conv.padding, big)
    assert cpu_conv.use_matmul(pointwise.kernel.shape, 1, pointwise.padding, big)
    assert not cpu_conv.use_matmul(pointwise.kernel.shape, 2, pointwise.padding, big)
    on_cpu = jax.default_backend() == "cpu"
    assert rewrite(small) == ("matmul" if on_cpu else None)       # never on GPU/TPU
    with cpu_conv.rewrites("off"):
        assert rewrite(small) is None
    with pytest.raises(ValueError, match="mode"):
        with cpu_conv.rewrites("on"):
            pass


@pytest.mark.parametrize("kernel_size,padding", [(3, 1), (4, 2), (3, ((0, 2), (1, 0)))])
def test_conv2d_row_chunked_kernel_gradient_matches_the_convolution_gradients(
        kernel_size, padding):
    """Conv2d's CPU kernel gradient (patches^T @ dy over chunks of rows, the last
    chunk padded: 37 rows in chunks of 25) gives the convolution's output and
    gradients (kernel, input, through spectral norm's sigma)."""
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 37, 40, 5)), jnp.float32)
    conv = layers.Conv2d(5, 128, kernel_size, padding=padding, spectral_norm=True, rngs=rngs(0))
    conv.bias[...] = jnp.linspace(-1, 1, 128)
    conv.eval()
    graph, params, rest = nnx.split(conv, nnx.Param, ...)

    def loss_and_grads(params, x):
        def loss(params, x):
            y = nnx.merge(graph, params, rest)(x)
            return jnp.sum(jnp.sin(y)), y
        (_, y), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, x)
        return y, grads

    def rewrite():
        return cpu_conv.rewrite_for(conv.kernel.shape, conv.stride, conv.padding, x)
    if jax.default_backend() == "cpu":
        assert rewrite() == "row_kernel_grad"
    y_rows, g_rows = loss_and_grads(params, x)
    with cpu_conv.rewrites("off"):
        assert rewrite() is None
        y_conv, g_conv = jax.jit(loss_and_grads)(params, x)
    np.testing.assert_allclose(y_rows, y_conv, atol=1e-5)
    for a, b in zip(jax.tree.leaves(g_rows), jax.tree.leaves(g_conv)):
        scale = float(jnp.max(jnp.abs(b)))
        assert scale > 0
        # Sums over 2960 pixels in another order: float32 noise relative to the
        # largest entry (~2e4 for the kernel), not to each entry.
        np.testing.assert_allclose(a, b, atol=1e-5 * scale, rtol=1e-4)


def test_conv2d_uses_the_row_kernel_gradient_for_wide_stride_1_outputs_only():
    x = jnp.zeros((1, 64, 64, 32))

    def rewrite(conv):
        return cpu_conv.rewrite_for(conv.kernel.shape, conv.stride, conv.padding, x)
    # 64: RS-UNet's first level, SPADE's last block; 32: SPADE's source embeddings
    for outputs in (128, 64, 32):
        assert rewrite(layers.Conv2d(32, outputs, 3, rngs=rngs(0))) == (
            "row_kernel_grad" if jax.default_backend() == "cpu" else None)
    assert rewrite(layers.Conv2d(32, 16, 3, rngs=rngs(0))) is None
    assert rewrite(layers.Conv2d(32, 128, 4, stride=2, rngs=rngs(0))) is None
    assert rewrite(layers.Conv2d(32, 128, 1, rngs=rngs(0))) == (   # 1x1: a matmul
        "matmul" if jax.default_backend() == "cpu" else None)


@pytest.mark.parametrize("kernel_size,padding", [(4, 1), (2, 0)])  # pix2pix, RS-UNet
def test_conv_transpose_matches_pytorch_definition(kernel_size, padding):
    conv = layers.ConvTranspose2d(3, 5, kernel_size, padding=padding, rngs=rngs(0))
    conv.bias[...] = jnp.arange(5.0)
    x = np.random.default_rng(0).normal(size=(2, 4, 3, 3)).astype(np.float32)
    want = np_conv_transpose(x, np.asarray(conv.kernel[...]), padding) + np.arange(5.0)
    assert want.shape == (2, 8, 6, 5)
    np.testing.assert_allclose(conv(jnp.asarray(x)), want, atol=1e-5)
    with pytest.raises(ValueError, match="output = 2 x input"):
        layers.ConvTranspose2d(3, 5, 3, padding=0, rngs=rngs(0))


def test_2x2_conv_transpose_and_its_gradients_match_lax_conv_transpose():
    """RS-UNet's upsampler (k2 p0), computed as one matmul, against XLA's
    transposed convolution: out[2i + r] = x[i] @ kernel[r] is lax.conv_transpose
    with the kernel flipped (it correlates the dilated input). Forward and both
    gradients, in float32 to rounding."""
    conv = layers.ConvTranspose2d(6, 5, 2, padding=0, rngs=rngs(0))
    conv.bias[...] = jnp.arange(5.0)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 4, 3, 6)), jnp.float32)
    cotangent = jnp.asarray(rng.normal(size=(2, 8, 6, 5)), jnp.float32)

    def ours(x, kernel):
        return layers._conv_transpose_2x2(x, kernel) + conv.bias[...]

    def xla(x, kernel):
        return jax.lax.conv_transpose(x, kernel[::-1, ::-1], (2, 2), "VALID",
                                      dimension_numbers=("NHWC", "HWIO", "NHWC")) + conv.bias[...]

    kernel = conv.kernel[...]
    np.testing.assert_allclose(conv(x), xla(x, kernel), rtol=1e-6, atol=1e-6)
    y, vjp = jax.vjp(ours, x, kernel)
    want_y, want_vjp = jax.vjp(xla, x, kernel)
    np.testing.assert_allclose(y, want_y, rtol=1e-6, atol=1e-6)
    for got, want in zip(vjp(cotangent), want_vjp(cotangent)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape,size", [((43, 43), (128, 128)), ((256, 256), (8, 8)),
                                        ((7, 5), (3, 4)), ((8, 4), (32, 8))])
def test_resize_nearest_follows_pytorch_rule(shape, size):
    x = np.random.default_rng(0).normal(size=(1, *shape, 2))
    np.testing.assert_array_equal(layers.resize_nearest(jnp.asarray(x), size),
                                  np_nearest(x, size).astype(np.float32))


def test_spade_matches_numpy_formula():
    spade = SPADE(4, 3, hidden=6, rngs=rngs(0))
    rng = np.random.default_rng(1)
    x = rng.normal(2.0, 3.0, size=(2, 4, 4, 4)).astype(np.float32)
    modulation = rng.normal(size=(2, 8, 8, 3)).astype(np.float32)
    out = np.asarray(nnx.jit(lambda m, x, mod: m(x, mod))(spade, x, modulation))

    # Parameter-free batch norm with the biased variance, as in training mode.
    normalized = (x - x.mean((0, 1, 2))) / np.sqrt(x.var((0, 1, 2)) + 1e-5)
    m = np_nearest(modulation, (4, 4))
    p = {name: (np.asarray(getattr(spade, name).kernel[...]),
                np.asarray(getattr(spade, name).bias[...]))
         for name in ("mlp_shared", "mlp_gamma", "mlp_beta")}
    hidden = np.maximum(np_conv(m, *p["mlp_shared"]), 0)
    want = normalized * (1 + np_conv(hidden, *p["mlp_gamma"])) + np_conv(hidden, *p["mlp_beta"])
    np.testing.assert_allclose(out, want, atol=1e-4)


def test_resblock_learns_shortcut_only_when_channels_change():
    same = SPADEResBlock(8, 8, 3, rngs=rngs(0))
    change = SPADEResBlock(8, 4, 3, rngs=rngs(0))
    assert not hasattr(same, "conv_s") and not hasattr(same, "norm_s")
    assert change.conv_s.bias is None and change.conv_s.spectral_norm
    assert change.conv_0.kernel.shape == (3, 3, 8, 4)  # middle width min(fin, fout)
    y = nnx.jit(lambda m, x, mod: m(x, mod))(change, jnp.ones((2, 4, 4, 8)), jnp.ones((2, 8, 8, 3)))
    assert y.shape == (2, 4, 4, 4)


def test_avg_pool_between_scales_does_not_count_padding():
    x = jnp.ones((1, 6, 6, 1))
    np.testing.assert_allclose(downsample(x), np.ones((1, 3, 3, 1)), rtol=1e-6)
    ramp = jnp.arange(36.0).reshape(1, 6, 6, 1)
    # Top-left window covers rows/cols 0..1 only: mean of 0, 1, 6, 7.
    assert float(downsample(ramp)[0, 0, 0, 0]) == pytest.approx(3.5)


# ----------------------------------------------------------------- spectral norm

def test_spectral_norm_largest_singular_value_is_one_after_power_iterations():
    conv = layers.Conv2d(5, 7, 3, spectral_norm=True, rngs=rngs(0))
    raw = 10.0 * jax.random.normal(jax.random.key(3), conv.kernel.shape)
    conv.kernel[...] = raw  # a fresh kernel: u, v no longer fit it
    for _ in range(30):  # one power iteration per training-mode call
        kernel = conv.normalized_kernel()
    top = np.linalg.svd(np.asarray(kernel).reshape(-1, 7), compute_uv=False)[0]
    assert top == pytest.approx(1.0, abs=1e-3)
    sigma = np.linalg.svd(np.asarray(raw).reshape(-1, 7), compute_uv=False)[0]
    assert sigma > 5  # the test is not trivially satisfied by the raw kernel
    # Unlike nnx.SpectralNorm, the trainable kernel itself is never rewritten.
    np.testing.assert_array_equal(conv.kernel[...], raw)


def test_spectral_norm_updates_vectors_only_in_training_mode():
    conv = layers.Conv2d(4, 6, 3, spectral_norm=True, rngs=rngs(0))
    conv.kernel[...] = jax.random.normal(jax.random.key(1), conv.kernel.shape)
    x = jnp.ones((1, 5, 5, 4))
    conv.eval()
    u_before = np.asarray(conv.u[...])
    first = conv(x)
    np.testing.assert_array_equal(conv.u[...], u_before)
    np.testing.assert_array_equal(conv(x), first)  # eval is deterministic
    conv.train()
    conv(x)
    assert not np.array_equal(np.asarray(conv.u[...]), u_before)
    assert {path for path, _ in nnx.to_flat_state(nnx.state(conv, nnx.BatchStat))} == {
        ("u",), ("v",)}
    assert count_params(conv) == 4 * 6 * 9 + 6  # u, v are not parameters


# ----------------------------------------------------------------- shapes

@pytest.mark.parametrize("channels", SUBSETS, ids=lambda c: "+".join(c))
def test_generator_shapes_for_every_source_subset(channels):
    def forward(sources):
        model = RSSpadeGenerator(channels, 4, ngf=2, embed_dim=4, tile_size=128,
                                 rngs=rngs(0))
        return model(sources)
    out = jax.eval_shape(forward, source_shapes(channels, 128))
    assert out.shape == (2, 128, 128, 4) and out.dtype == jnp.float32


@pytest.mark.parametrize("embedding", ["per_source", "none"])
def test_generator_shapes_at_256_and_noise(embedding):
    def forward(sources, z):
        model = RSSpadeGenerator(SOURCES, 4, ngf=2, embed_dim=4, tile_size=256, z_dim=3,
                                 embedding=embedding, rngs=rngs(0))
        return model(sources, z=z)
    out = jax.eval_shape(forward, source_shapes(SOURCES, 256, batch=1),
                         jax.ShapeDtypeStruct((1, 3), jnp.float32))
    assert out.shape == (1, 256, 256, 4)


def test_generator_rejects_bad_sources():
    # Validation happens before any computation, so a shape-only model suffices.
    model = nnx.eval_shape(lambda: RSSpadeGenerator(SOURCES, ngf=2, embed_dim=4, tile_size=64,
                                                    rngs=rngs()))
    sources = random_sources(SOURCES, 64)
    with pytest.raises(ValueError, match="missing \\['dem'\\]"):
        model({k: v for k, v in sources.items() if k != "dem"})
    with pytest.raises(ValueError, match="'s1' must be \\(B, H, W, 2\\)"):
        model({**sources, "s1": sources["s1"][..., :1]})
    with pytest.raises(ValueError, match="multiple of 32"):
        model(sources, out_size=(48, 48))
    with pytest.raises(ValueError, match="z given"):
        model(sources, z=jnp.zeros((2, 3)))
    with pytest.raises(ValueError, match="empty"):
        RSSpadeGenerator({}, rngs=rngs(0))
    with pytest.raises(ValueError, match="unknown model"):
        create_model("spade_xl")


def test_multiscale_discriminator_features_and_patch_sizes():
    def forward(x):
        return MultiscaleDiscriminator(19, ndf=2, rngs=rngs(0))(x)
    out = jax.eval_shape(forward, jax.ShapeDtypeStruct((2, 256, 256, 19), jnp.float32))
    assert len(out) == 2 and all(len(scale) == 5 for scale in out)

    def conv_out(n, stride):  # PyTorch: floor((n + 2p - k) / s) + 1 with k = 4, p = 2
        return (n + 4 - 4) // stride + 1
    for scale, size in zip(out, (256, 128)):
        sizes = [size]
        for stride in (2, 2, 2, 1, 1):
            sizes.append(conv_out(sizes[-1], stride))
        assert [f.shape[1] for f in scale] == sizes[1:]
        assert [f.shape[-1] for f in scale] == [2, 4, 8, 16, 1]


def test_pix2pix_shapes_and_70x70_patchgan_output():
    out = jax.eval_shape(lambda x: UNetGenerator(15, 4, ngf=2, rngs=rngs(0))(x),
                         jax.ShapeDtypeStruct((1, 256, 256, 15), jnp.float32))
    assert out.shape == (1, 256, 256, 4)
    logits = jax.eval_shape(
        lambda x: NLayerDiscriminator(19, ndf=2, n_layers=3, rngs=rngs(0))(x),
        jax.ShapeDtypeStruct((1, 256, 256, 19), jnp.float32))
    assert logits.shape == (1, 30, 30, 1)  # pix2pix's 30x30 grid of 70x70 patches


@pytest.mark.parametrize("in_channels", [4, 10, 13])
def test_rs_unet_logits_shape(in_channels):
    out = jax.eval_shape(lambda x: RSUNet(in_channels, 9, width=2, rngs=rngs(0))(x),
                         jax.ShapeDtypeStruct((2, 128, 128, in_channels), jnp.float32))
    assert out.shape == (2, 128, 128, 9)


def test_conditional_input_resizes_sources_to_the_image():
    sources = random_sources(SOURCES, 64)
    image = jnp.zeros((2, 64, 64, 4))
    x = conditional_input(sources, image)
    assert x.shape == (2, 64, 64, 9 + 2 + 5 + 4)
    np.testing.assert_array_equal(x[..., :9], sources["lulc"])
    np.testing.assert_array_equal(x[..., 11:16], np_nearest(np.asarray(sources["dem"]), (64, 64)))


# ----------------------------------------------------------------- parameter parity

def reference_count(label):
    name, kwargs = reference_configs()[label]
    return count_params(abstract_model(name, **kwargs))


@pytest.mark.parametrize("label", sorted(REFERENCE_COUNTS))
def test_parameter_counts_match_the_pytorch_references(label):
    assert reference_count(label) == REFERENCE_COUNTS[label][0]


def test_pix2pix_counts_match_the_published_3_channel_figures():
    # pix2pix logs "54.414 M" for G and "2.769 M" for D on RGB -> RGB (facades).
    g = count_params(abstract_model("pix2pix_unet", in_channels=3, out_channels=3))
    d = count_params(abstract_model("patchgan", in_channels=6))
    assert round(g / 1e6, 3) == 54.414 and round(d / 1e6, 3) == 2.769
    # The rounded figures at the reference config.
    assert round(reference_count("pix2pix_unet") / 1e6, 2) == 54.43
    assert round(reference_count("patchgan") / 1e6, 2) == 2.78


def test_per_source_embeddings_add_exactly_the_expected_parameters():
    embed, cond = 32, sum(REFERENCE_SOURCES.values())
    conv3 = lambda cin, cout: 9 * cin * cout + cout  # noqa: E731
    embeddings = sum(conv3(c, embed) + conv3(embed, embed) for c in REFERENCE_SOURCES.values())
    fusion = conv3(len(REFERENCE_SOURCES) * embed, embed)
    # Every SPADE's shared conv (3 per ResBlock with a learned shortcut, 2 otherwise:
    # 2 * 3 + 3 * 4 = 18) and the first conv read `embed` channels instead of 15.
    spade_layers = 18
    wider_inputs = (embed - cond) * 9 * (128 * spade_layers + 16 * 64)
    added = reference_count("rs_spade") - reference_count("spade_reference")
    assert added == embeddings + fusion + wider_inputs == 569_024


def test_param_table_command_reports_every_model(capsys):
    assert param_table_main(["--model", "all"]) == 0
    assert "| spade_reference | 92,419,588 | 92,419,588 | exact |" in capsys.readouterr().out
    assert param_table_main(["--model", "all", "--format", "json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert all(report[label]["matches"] for label in REFERENCE_COUNTS)
    assert report["rs_spade"]["added_by_embeddings"] == 569_024
    assert sum(report["rs_spade"]["modules"].values()) == report["rs_spade"]["total"]


# ----------------------------------------------------------------- gradients

def assert_every_param_gets_a_gradient(grads):
    """Every Param leaf has a finite gradient that is nonzero somewhere."""
    flat = nnx.to_flat_state(grads)
    assert len(flat) > 0
    dead = [".".join(map(str, path)) for path, g in flat if not np.any(np.asarray(g[...]) != 0)]
    assert not dead, f"parameters without gradient: {dead}"
    assert all(np.isfinite(np.asarray(g[...])).all() for _, g in flat)


@pytest.mark.parametrize("name,kwargs,shape", [
    # Shallower than the reference (num_downs 8, depth 5) to keep the compile short:
    # every level is the same code, and each kind of level is present.
    ("pix2pix_unet", dict(in_channels=3, out_channels=4, ngf=2, num_downs=5), (2, 32, 32, 3)),
    ("rs_unet", dict(in_channels=10, num_classes=9, width=2, depth=2), (2, 16, 16, 10)),
    ("patchgan", dict(in_channels=7, ndf=2), (2, 32, 32, 7)),
])
def test_baseline_gradients_reach_every_parameter(name, kwargs, shape):
    model = create_model(name, **kwargs, rngs=rngs())
    x = jax.random.normal(jax.random.key(1), shape)

    @nnx.jit
    def grads(model, x):
        return nnx.grad(lambda m: jnp.mean(jnp.sin(3 * m(x))))(model)
    assert_every_param_gets_a_gradient(grads(model, x))
