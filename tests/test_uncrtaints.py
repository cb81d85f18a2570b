"""UnCRtainTS (mono-temporal) against the authors' architecture, counted layer
by layer, and its Gaussian negative log-likelihood against scipy."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rsjax import losses
from rsjax.models import param_table, uncrtaints


def _published_count(in_channels: int, bands: int, width: int = 128, blocks: int = 6) -> int:
    """The parameters of PatrickTUM/UnCRtainTS's mono-temporal model, layer by
    layer (model/src/backbones/uncrtaints.py with parse_args' defaults:
    encoder_widths [128], decoder_widths 5 x [128], out_conv [bands] plus
    bands variances for covmode 'diag')."""
    hidden, squeezed = 2 * width, width // 4
    norm = lambda c: 2 * c                                          # noqa: E731  (scale, bias)
    in_block = in_channels * width + width + norm(width)            # conv1x1 with bias, GroupNorm
    mbconv = (norm(width)                                           # PreNorm
              + width * hidden + norm(hidden)                       # pw 1x1, no bias
              + 9 * hidden + norm(hidden)                           # depthwise 3x3, no bias
              + hidden * squeezed + squeezed * hidden               # SE, no biases
              + hidden * width + norm(width))                       # pw-linear 1x1, no bias
    out = width * 2 * bands + 2 * bands                             # conv1x1 with bias
    return in_block + blocks * mbconv + out


def test_the_parameter_count_is_the_published_architectures():
    model = param_table.abstract_model("uncrtaints", source_channels={"s2_cloudy": 13, "s1": 2},
                                       out_channels=13)
    assert param_table.count_params(model) == _published_count(15, 13) == 520_218   # "0.52 M"
    ours = param_table.abstract_model("uncrtaints", source_channels={"s2_cloudy": 4, "s1": 2})
    assert param_table.count_params(ours) == _published_count(6, 4)


def test_the_mean_is_in_model_space_the_variance_positive_and_the_sources_checked():
    model = uncrtaints.UnCRtainTS({"s2_cloudy": 4, "s1": 2}, width=16, rngs=nnx.Rngs(0))
    sources = {"s2_cloudy": jax.random.normal(jax.random.key(1), (2, 16, 16, 4)) * 3,
               "s1": jax.random.normal(jax.random.key(2), (2, 16, 16, 2))}
    model.eval()
    mean, var = nnx.jit(lambda m, s: m(s))(model, sources)
    assert mean.shape == var.shape == (2, 16, 16, 4)
    assert float(jnp.abs(mean).max()) < 1.0 and float(var.min()) >= uncrtaints.VARIANCE_FLOOR
    with pytest.raises(ValueError, match="missing"):
        model({"s2_cloudy": sources["s2_cloudy"]})


def test_depthwise_conv_pads_by_reflection():
    """Against numpy: each channel convolved with its own 3x3 kernel over a
    reflect-padded image (PyTorch's padding_mode='reflect')."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 5, 6, 3)).astype(np.float32)
    k = rng.standard_normal((3, 3, 1, 3)).astype(np.float32)
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="reflect")
    expected = np.zeros_like(x)
    for i in range(5):
        for j in range(6):
            expected[0, i, j] = np.einsum("abc,abc->c", padded[0, i:i + 3, j:j + 3], k[:, :, 0])
    np.testing.assert_allclose(uncrtaints.depthwise_reflect(jnp.asarray(x), jnp.asarray(k)),
                               expected, rtol=1e-5, atol=1e-5)


def test_gaussian_nll_is_scipys_without_its_constant():
    from scipy import stats

    rng = np.random.default_rng(0)
    mean, target = rng.standard_normal((2, 3, 3, 4)), rng.standard_normal((2, 3, 3, 4))
    var = rng.uniform(0.1, 2.0, (2, 3, 3, 4))
    valid = rng.uniform(size=(2, 3, 3)) > 0.3
    nll = -stats.norm.logpdf(target, mean, np.sqrt(var)) - 0.5 * np.log(2 * np.pi)
    expected = nll[valid].mean()
    assert float(losses.gaussian_nll(mean, var, target, valid)) == pytest.approx(expected, rel=1e-5)
    assert float(losses.gaussian_nll(mean, var, target)) == pytest.approx(nll.mean(), rel=1e-5)
