"""DSen2-CR: the published architecture's parameter count (counted layer by
layer here, not from the module), the long skip, and the CARL loss by hand."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rsjax import losses
from rsjax.models.dsen2cr import DSen2CR


def _conv(k, cin, cout):
    return k * k * cin * cout + cout            # kernel + bias


def published_parameter_count(optical_bands, sar_channels=2, features=256, blocks=16):
    """Meraner et al. 2020, Fig. 3: conv3x3(bands + SAR -> F) + ReLU, B residual
    blocks of two conv3x3(F -> F), conv3x3(F -> bands); all with biases."""
    head = _conv(3, optical_bands + sar_channels, features)
    body = blocks * 2 * _conv(3, features, features)
    tail = _conv(3, features, optical_bands)
    return head + body + tail


def _count(model):
    return sum(int(x.size) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


@pytest.mark.parametrize("bands,expected", [(13, 18_947_341), (4, 18_905_860)],
                         ids=["sentinel2_13_bands", "rsjax_4_bands"])
def test_parameter_count_of_the_published_architecture(bands, expected):
    assert published_parameter_count(bands) == expected
    model = nnx.eval_shape(lambda: DSen2CR({"s2_cloudy": bands, "s1": 2}, rngs=nnx.Rngs(0)))
    assert _count(model) == expected


def test_output_is_the_cloudy_input_plus_a_residual():
    model = DSen2CR({"s2_cloudy": 4, "s1": 2}, features=8, num_blocks=2, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    sources = {"s2_cloudy": jnp.asarray(rng.uniform(-1, 1, (2, 12, 12, 4)), jnp.float32),
               "s1": jnp.asarray(rng.uniform(-1, 1, (2, 12, 12, 2)), jnp.float32)}
    out = model(sources)
    assert out.shape == (2, 12, 12, 4)
    assert not np.allclose(out, sources["s2_cloudy"])
    model.tail.kernel[...] = jnp.zeros_like(model.tail.kernel[...])
    model.tail.bias[...] = jnp.zeros_like(model.tail.bias[...])
    np.testing.assert_array_equal(model(sources), sources["s2_cloudy"])   # the long skip
    with pytest.raises(ValueError, match="s1"):
        model({"s2_cloudy": sources["s2_cloudy"]})
    with pytest.raises(ValueError, match="s2_cloudy"):
        DSen2CR({"s1": 2}, rngs=nnx.Rngs(0))


def test_residual_blocks_are_scaled_by_a_tenth():
    model = DSen2CR({"s2_cloudy": 1}, features=2, num_blocks=1, rngs=nnx.Rngs(0))
    block = model.blocks[0]
    x = jnp.asarray(np.random.default_rng(1).normal(size=(1, 5, 5, 2)), jnp.float32)
    inner = block.conv_1(jax.nn.relu(block.conv_0(x)))
    np.testing.assert_allclose(block(x), x + 0.1 * inner, rtol=1e-6)


def test_carl_loss_by_hand():
    rng = np.random.default_rng(2)
    pred, target, cloudy = (rng.normal(size=(2, 5, 6, 3)) for _ in range(3))
    covered = rng.random((2, 5, 6)) < 0.4
    valid = np.ones((2, 5, 6), bool)
    valid[1, :2] = False
    pred_nan = pred.copy()
    pred_nan[1, 0, 0] = np.nan                              # under no-data: ignored
    got = losses.cloud_adaptive_l1(jnp.asarray(pred_nan), jnp.asarray(target), jnp.asarray(cloudy),
                                   jnp.asarray(covered), jnp.asarray(valid))
    total, count = 0.0, 0
    for b in range(2):
        for i in range(5):
            for j in range(6):
                if not valid[b, i, j]:
                    continue
                for c in range(3):
                    ref = target if covered[b, i, j] else cloudy
                    total += abs(pred[b, i, j, c] - ref[b, i, j, c]) + abs(pred[b, i, j, c] - target[b, i, j, c])
                    count += 1
    np.testing.assert_allclose(got, total / count, rtol=1e-5)
    unmasked = losses.cloud_adaptive_l1(jnp.asarray(pred), jnp.asarray(target), jnp.asarray(cloudy),
                                        jnp.asarray(covered), weight=0.0)
    expected = np.mean(np.where(covered[..., None], np.abs(pred - target), np.abs(pred - cloudy)))
    np.testing.assert_allclose(unmasked, expected, rtol=1e-5)
