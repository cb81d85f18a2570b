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


def test_degenerate_inputs_give_the_hand_computed_losses_and_gradients():
    """Edge cases where a naive formula divides by zero or overflows: each loss
    and its gradient against the value worked out by hand from the formula."""
    flat = jnp.full((1, 16, 16, 4), 0.5)                              # zero variance everywhere
    n = flat.size

    @jax.jit            # one compilation for all cases keeps the test fast
    def all_cases(noise):
        def at(loss, x):
            return jax.value_and_grad(loss)(x)
        ssim = losses.ssim_loss
        return {
            "hinge_g": at(lambda x: losses.generator_loss([[x, x]]), flat),
            "vanilla_d": at(lambda x: sum(losses.discriminator_loss([[x]], [[-x]], "vanilla")),
                            jnp.full((2, 3), 80.0)),
            "lsgan_d": at(lambda x: sum(losses.discriminator_loss([[x]], [[x]], "lsgan")), flat),
            "l1_all_masked": at(lambda x: losses.l1_loss(x, flat, jnp.zeros((1, 16, 16), bool)), flat),
            "l1_at_zero_error": at(lambda x: losses.l1_loss(x, flat), flat),
            "ssim_identical_flat": at(lambda x: ssim(x, flat), flat),
            "ssim_random": at(lambda x: ssim(x, flat), noise),
            "ce_all_ignored": at(lambda z: losses.softmax_cross_entropy(z, jnp.full(4, 255)),
                                 jnp.zeros((4, 9))),
            "ce_extreme_logits": at(lambda z: losses.softmax_cross_entropy(z, jnp.arange(4)),
                                    jnp.full((4, 9), 1e4).at[:, 0].set(-1e4)),
        }

    # Extreme logits: every row's softmax puts 0 on column 0 (-1e4) and 1/8 on
    # the 8 others (1e4). Row 0's label is column 0: ce = 2e4 + log 8; rows
    # 1-3 hit a 1e4 column: ce = log 8. Gradient of the mean: (softmax - onehot) / 4.
    softmax = np.full((4, 9), 1 / 8).astype(np.float64)
    softmax[:, 0] = 0
    ce_grad = (softmax - np.eye(4, 9)) / 4
    want = {
        # -mean(logits): -0.5, and -1/n on every logit.
        "hinge_g": (-0.5, np.full(flat.shape, -1 / n)),
        # softplus(-80) twice, and d/dx of 2 * mean(softplus(-x)) over 6 logits
        # = -2 * sigmoid(-80) / 6: tiny, but a float32 normal number, not 0 or NaN.
        "vanilla_d": (2 * np.log1p(np.exp(-80.0)), np.full((2, 3), -np.exp(-80.0) / 3)),
        # (0.5 - 1)^2 + 0.5^2, and (2 (x - 1) + 2 x) / n = 0 at x = 0.5.
        "lsgan_d": (0.5, np.zeros(flat.shape)),
        # Nothing valid: 0 / max(0, 1), a constant.
        "l1_all_masked": (0.0, np.zeros(flat.shape)),
        # SSIM of identical images is 1 whatever the (zero) variance: loss 0, its
        # minimum, so the gradient of this smooth function vanishes there.
        "ssim_identical_flat": (0.0, np.zeros(flat.shape)),
        # No labelled pixel: the loss is defined as 0, a constant.
        "ce_all_ignored": (0.0, np.zeros((4, 9))),
        "ce_extreme_logits": ((2e4 + 4 * np.log(8)) / 4, ce_grad),
    }
    noise = np.random.default_rng(0).uniform(0, 1, (1, 16, 16, 4)).astype(np.float32)
    got = all_cases(noise)
    for name, (value, grad) in want.items():
        # Non-zero references to float32 round-off, relatively (the vanilla case's
        # 1e-35 included); zero ones to the round-off of sums over 1024 terms
        # (SSIM's E[x^2] - E[x]^2 of a flat image is not exactly 0).
        assert float(got[name][0]) == pytest.approx(value, rel=1e-6, abs=1e-6 if value == 0 else 0), name
        np.testing.assert_allclose(got[name][1], grad, rtol=1e-5, atol=0 if np.any(grad) else 1e-7,
                                   err_msg=name)
    # |x| has no derivative at 0: any subgradient in [-1/n, 1/n] is right (JAX
    # takes the right derivative, +1/n; PyTorch sign(0) = 0), anything outside is not.
    value, grad = got["l1_at_zero_error"]
    assert float(value) == 0.0
    assert np.all(np.abs(np.asarray(grad)) <= 1 / n), "l1_at_zero_error"
    # The random case has a real gradient (the test would not notice an all-zero one otherwise).
    assert float(jnp.abs(got["ssim_random"][1]).sum()) > 0


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
