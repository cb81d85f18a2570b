"""Losses against hand-computed small cases, and their gradients."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rsjax import losses


def _softplus(x):
    return np.log1p(np.exp(x))


REAL_1 = np.array([2.0, 0.5, -1.0])
FAKE_1 = np.array([-2.0, 0.0, 1.0])
REAL_2 = np.array([0.0, 3.0])
FAKE_2 = np.array([0.5, -0.5])


def _outputs(logits_1, logits_2, feature=0.0):
    """Two scales, one intermediate feature each, logits last."""
    return [[jnp.full((1, 2, 2, 3), feature), jnp.asarray(logits_1)],
            [jnp.full((1, 1, 1, 2), feature), jnp.asarray(logits_2)]]


def test_hinge_losses_by_hand():
    d_real, d_fake = losses.discriminator_loss(_outputs(REAL_1, REAL_2), _outputs(FAKE_1, FAKE_2))
    # relu(1 - x): scale 1 [0, 0.5, 2] -> 5/6; scale 2 [1, 0] -> 1/2; mean over scales.
    assert float(d_real) == pytest.approx((5 / 6 + 1 / 2) / 2)
    # relu(1 + x): scale 1 [0, 1, 2] -> 1; scale 2 [1.5, 0.5] -> 1.
    assert float(d_fake) == pytest.approx(1.0)
    # -mean(x): scale 1 -> 1/3, scale 2 -> 0.
    g = losses.generator_loss(_outputs(FAKE_1, FAKE_2))
    assert float(g) == pytest.approx((1 / 3 + 0.0) / 2)


def test_vanilla_losses_by_hand():
    d_real, d_fake = losses.discriminator_loss(_outputs(REAL_1, REAL_2), _outputs(FAKE_1, FAKE_2),
                                               kind="vanilla")
    # BCE(x, 1) = softplus(-x); BCE(x, 0) = softplus(x).
    assert float(d_real) == pytest.approx(
        (_softplus(-REAL_1).mean() + _softplus(-REAL_2).mean()) / 2, rel=1e-6)
    assert float(d_fake) == pytest.approx(
        (_softplus(FAKE_1).mean() + _softplus(FAKE_2).mean()) / 2, rel=1e-6)
    g = losses.generator_loss(_outputs(FAKE_1, FAKE_2), kind="vanilla")
    assert float(g) == pytest.approx((_softplus(-FAKE_1).mean() + _softplus(-FAKE_2).mean()) / 2,
                                     rel=1e-6)


def test_lsgan_losses_by_hand():
    d_real, d_fake = losses.discriminator_loss(_outputs(REAL_1, REAL_2), _outputs(FAKE_1, FAKE_2),
                                               kind="lsgan")
    assert float(d_real) == pytest.approx(((REAL_1 - 1) ** 2).mean() / 2 + ((REAL_2 - 1) ** 2).mean() / 2)
    assert float(d_fake) == pytest.approx((FAKE_1 ** 2).mean() / 2 + (FAKE_2 ** 2).mean() / 2)
    g = losses.generator_loss(_outputs(FAKE_1, FAKE_2), kind="lsgan")
    assert float(g) == pytest.approx(((FAKE_1 - 1) ** 2).mean() / 2 + ((FAKE_2 - 1) ** 2).mean() / 2)


def test_single_logits_array_is_one_scale():
    d_real, _ = losses.discriminator_loss(jnp.asarray(REAL_1), jnp.asarray(FAKE_1))
    assert float(d_real) == pytest.approx(5 / 6)


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="unknown GAN loss 'wgan'"):
        losses.generator_loss(jnp.zeros(3), kind="wgan")
    with pytest.raises(ValueError, match="scale 0"):
        losses.generator_loss([jnp.zeros(3), jnp.zeros(3)])      # not nested per scale
    with pytest.raises(ValueError, match="no intermediate features"):
        losses.feature_matching_loss([[jnp.zeros(3)]], [[jnp.zeros(3)]])
    with pytest.raises(ValueError, match="class_weights"):
        losses.softmax_cross_entropy(jnp.zeros((2, 3)), jnp.zeros(2, jnp.int32), class_weights=[1, 2])


def test_feature_matching_by_hand_excludes_logits():
    real = [[jnp.full((1, 2, 2, 3), 1.0), jnp.full((1, 2), 1.0), jnp.full((1, 4), 100.0)],
            [jnp.full((1, 2, 2, 3), 0.0), jnp.full((1, 2), 0.0), jnp.full((1, 4), 100.0)]]
    fake = [[jnp.full((1, 2, 2, 3), 0.5), jnp.full((1, 2), -1.0), jnp.full((1, 4), -100.0)],
            [jnp.full((1, 2, 2, 3), 0.25), jnp.full((1, 2), 0.0), jnp.full((1, 4), 0.0)]]
    # Scale 1 layers: 0.5 and 2.0; scale 2: 0.25 and 0. Logits (last) never count.
    assert float(losses.feature_matching_loss(real, fake)) == pytest.approx((2.5 + 0.25) / 2)
    assert float(losses.feature_matching_loss(real, fake, layer_reduction="mean")) == pytest.approx(
        (2.5 / 2 + 0.25 / 2) / 2)
    # Only the generated side gets gradients.
    grad_real = jax.grad(lambda r: losses.feature_matching_loss(r, fake))(real)
    assert all(float(jnp.abs(g).sum()) == 0.0 for scale in grad_real for g in scale)


def test_masked_l1_by_hand():
    pred = jnp.asarray([[[[1.0, 2.0], [0.0, 0.0]]]])            # (1, 1, 2, 2)
    target = jnp.asarray([[[[0.0, 0.0], [5.0, 5.0]]]])
    assert float(losses.l1_loss(pred, target)) == pytest.approx((1 + 2 + 5 + 5) / 4)
    mask = jnp.asarray([[[True, False]]])
    assert float(losses.l1_loss(pred, target, mask)) == pytest.approx(1.5)
    assert float(losses.l1_loss(pred, target, jnp.zeros((1, 1, 2), bool))) == 0.0


def test_ssim_loss_is_zero_for_identical_and_positive_otherwise():
    rng = np.random.default_rng(0)
    image = jnp.asarray(rng.uniform(0, 1, (2, 16, 16, 4)), jnp.float32)
    assert float(losses.ssim_loss(image, image)) == pytest.approx(0.0, abs=1e-6)
    assert float(losses.ssim_loss(image, 1.0 - image)) > 1.0          # anti-correlated: SSIM < 0


def test_cross_entropy_by_hand_with_ignore_and_class_weights():
    logits = np.array([[2.0, 0.0, -1.0],
                       [0.0, 0.0, 0.0],
                       [1.0, 3.0, 0.0],
                       [5.0, 5.0, 5.0]])
    labels = np.array([0, 2, 1, 255])
    log_softmax = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    ce = -log_softmax[np.arange(3), labels[:3]]
    got = losses.softmax_cross_entropy(jnp.asarray(logits), jnp.asarray(labels))
    assert float(got) == pytest.approx(ce.mean(), rel=1e-6)
    weights = np.array([0.5, 2.0, 1.0])
    w = weights[labels[:3]]
    got = losses.softmax_cross_entropy(jnp.asarray(logits), jnp.asarray(labels), class_weights=weights)
    assert float(got) == pytest.approx((w * ce).sum() / w.sum(), rel=1e-6)
    # Works on (B, H, W, K) logits with uint8 labels, and an all-ignored batch gives 0, not NaN.
    image_logits = jnp.asarray(logits[:3]).reshape(1, 1, 3, 3)
    got = losses.softmax_cross_entropy(image_logits, jnp.asarray(labels[:3], jnp.uint8).reshape(1, 1, 3))
    assert float(got) == pytest.approx(ce.mean(), rel=1e-6)
    assert float(losses.softmax_cross_entropy(jnp.asarray(logits), jnp.full(4, 255))) == 0.0


def test_gradients_are_finite_even_on_degenerate_inputs():
    @jax.jit            # one compilation for all cases keeps the test fast
    def all_gradients(noise):
        flat = jnp.full((1, 16, 16, 4), 0.5)                          # zero variance everywhere
        ssim_grad = jax.grad(losses.ssim_loss)
        return {
            "hinge_g": jax.grad(lambda x: losses.generator_loss([[x, x]]))(flat),
            "vanilla_d": jax.grad(lambda x: sum(losses.discriminator_loss([[x]], [[-x]], "vanilla")))(
                jnp.full((2, 3), 80.0)),
            "lsgan_d": jax.grad(lambda x: sum(losses.discriminator_loss([[x]], [[x]], "lsgan")))(flat),
            "l1_all_masked": jax.grad(lambda x: losses.l1_loss(x, flat, jnp.zeros((1, 16, 16), bool)))(flat),
            "l1_at_zero_error": jax.grad(losses.l1_loss)(flat, flat),
            "ssim_identical_flat": ssim_grad(flat, flat),
            "ssim_random": ssim_grad(noise, flat),
            "ce_all_ignored": jax.grad(lambda z: losses.softmax_cross_entropy(z, jnp.full(4, 255)))(
                jnp.zeros((4, 9))),
            "ce_extreme_logits": jax.grad(lambda z: losses.softmax_cross_entropy(z, jnp.arange(4)))(
                jnp.full((4, 9), 1e4).at[:, 0].set(-1e4)),
        }

    noise = np.random.default_rng(0).uniform(0, 1, (1, 16, 16, 4)).astype(np.float32)
    for name, grad in all_gradients(noise).items():
        assert bool(jnp.all(jnp.isfinite(grad))), name
    # The random case has a real gradient (the test would not notice an all-zero one otherwise).
    assert float(jnp.abs(all_gradients(noise)["ssim_random"]).sum()) > 0


def test_losses_jit():
    outputs = _outputs(REAL_1, REAL_2)
    jitted = jax.jit(lambda r, f: losses.discriminator_loss(r, f, "hinge"))
    d_real, d_fake = jitted(outputs, _outputs(FAKE_1, FAKE_2))
    assert math.isclose(float(d_real), (5 / 6 + 1 / 2) / 2, rel_tol=1e-6)


def test_class_weights_from_counts_by_hand():
    counts = [600, 300, 100, 0]
    # Frequencies 0.6, 0.3, 0.1 (class 3 absent): median 0.3.
    np.testing.assert_allclose(losses.class_weights_from_counts(counts), [0.5, 1.0, 3.0, 0.0], rtol=1e-6)
    inverse = losses.class_weights_from_counts(counts, "inverse")
    # 1/f = 1.667, 3.333, 10; pixel-weighted mean = 3 -> divided by 3.
    np.testing.assert_allclose(inverse, [5 / 9, 10 / 9, 10 / 3, 0.0], rtol=1e-6)
    sqrt = losses.class_weights_from_counts(counts, "inverse_sqrt")
    assert np.dot([0.6, 0.3, 0.1, 0.0], sqrt) == pytest.approx(1.0, rel=1e-6)
    assert sqrt[2] / sqrt[0] == pytest.approx(math.sqrt(6), rel=1e-6)
    with pytest.raises(ValueError, match="unknown class weighting"):
        losses.class_weights_from_counts(counts, "focal")
    with pytest.raises(ValueError, match="non-negative"):
        losses.class_weights_from_counts([0, 0])
