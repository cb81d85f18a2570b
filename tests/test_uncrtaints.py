"""UnCRtainTS (mono-temporal) against the authors' architecture, counted layer
by layer, its Gaussian negative log-likelihood against scipy and its gradient
against the hand-derived one, the uncertainty metrics against hand
computations, and the trainer: its config, loss, resume and evaluation."""
from __future__ import annotations

import json

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


def test_the_nll_gradient_is_the_hand_derived_one():
    """d/dmean = (mean - target) / var / N and d/dvar = (1/var - (target - mean)^2 / var^2) / 2N."""
    rng = np.random.default_rng(1)
    mean, target = rng.standard_normal((2, 2, 3, 4)), rng.standard_normal((2, 2, 3, 4))
    var = rng.uniform(0.2, 3.0, (2, 2, 3, 4))
    n = mean.size
    d_mean, d_var = jax.grad(losses.gaussian_nll, argnums=(0, 1))(mean, var, target)
    np.testing.assert_allclose(d_mean, (mean - target) / var / n, rtol=1e-5)
    np.testing.assert_allclose(d_var, (1 / var - (target - mean) ** 2 / var ** 2) / (2 * n), rtol=1e-5)


# ---------------------------------------------------------------------------- uncertainty metrics
def test_calibration_and_error_by_uncertainty_match_a_hand_computation():
    from rsjax import uncertainty_metrics as um

    # Six images; variances 0..1 in 2 bins of width 0.5: [0, 0.5) holds the
    # first three, [0.5, 1] the last three (1.0, the largest, included).
    variance = np.array([0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
    mse = np.array([0.01, 0.04, 0.25, 0.36, 0.49, 1.0])
    table = um.calibration(mse, variance, bins=2)
    low_rmse, low_rmv = np.sqrt((0.01 + 0.04 + 0.25) / 3), np.sqrt((0.0 + 0.2 + 0.4) / 3)
    high_rmse, high_rmv = np.sqrt((0.36 + 0.49 + 1.0) / 3), np.sqrt((0.6 + 0.8 + 1.0) / 3)
    assert [b["images"] for b in table["bins"]] == [3, 3]
    assert table["bins"][0]["rmse"] == pytest.approx(low_rmse)
    assert table["bins"][1]["rmv"] == pytest.approx(high_rmv)
    gaps = [abs(low_rmse - low_rmv), abs(high_rmse - high_rmv)]
    assert table["uce"] == pytest.approx(0.5 * gaps[0] + 0.5 * gaps[1])
    assert table["auce"] == pytest.approx(np.mean(gaps))
    # An empty bin counts in neither: 3 bins of width 1/3, the middle one empty.
    lopsided = um.calibration(np.array([0.1, 0.2, 0.3]), np.array([0.0, 0.1, 0.9]), bins=3)
    assert [b["images"] for b in lopsided["bins"]] == [2, 0, 1]
    gap_low = abs(np.sqrt(0.15) - np.sqrt(0.05))
    gap_high = abs(np.sqrt(0.3) - np.sqrt(0.9))
    assert lopsided["auce"] == pytest.approx((gap_low + gap_high) / 2)
    assert lopsided["uce"] == pytest.approx(2 / 3 * gap_low + 1 / 3 * gap_high)
    # A calibrated model (MSE = variance per image) has UCE 0.
    assert um.calibration(variance + 0.1, variance + 0.1, bins=4)["uce"] == pytest.approx(0, abs=1e-12)
    # Most certain first: the mean MSE of the most certain 25 %, 50 %, ... of 4 images.
    curve = um.error_by_uncertainty(np.array([4.0, 1.0, 3.0, 2.0]), np.array([0.4, 0.1, 0.3, 0.2]),
                                    percent=25)
    assert curve["kept_fraction"] == [0.25, 0.5, 0.75, 1.0]
    assert curve["mse"] == pytest.approx([1.0, 1.5, 2.0, 2.5])


def test_image_parts_are_metric_space_sums_over_valid_pixels():
    from rsjax import uncertainty_metrics as um

    rng = np.random.default_rng(2)
    mean, target = rng.uniform(-1, 1, (2, 4, 4, 4)), rng.uniform(-1, 1, (2, 4, 4, 4))
    var = rng.uniform(0.01, 0.5, (2, 4, 4, 4))
    valid = rng.uniform(size=(2, 4, 4)) > 0.25
    parts = jax.device_get(um.image_parts(mean, var, target, valid))
    for i in range(2):
        m01, t01, v01 = (mean[i] + 1) / 2, (target[i] + 1) / 2, var[i] / 4     # metric space
        keep = valid[i]
        se = (m01 - t01)[keep] ** 2
        assert parts["n"][i] == keep.sum() * 4
        assert parts["se"][i] == pytest.approx(se.sum(), rel=1e-5)
        assert parts["var"][i] == pytest.approx(v01[keep].sum(), rel=1e-5)
        assert parts["nll"][i] == pytest.approx((0.5 * (np.log(v01[keep]) + se / v01[keep])).sum(),
                                                rel=1e-4)


# ---------------------------------------------------------------------------- the trainer
def test_uncrtaints_config_is_the_published_setting_and_refuses_dsen2crs_keys(cloudy_data_dir):
    from rsjax import config_checks
    from rsjax.errors import ConfigError
    from rsjax.trainers import cloud_removal
    from trainer_utils import load_config, tiny_cloud_config

    full = load_config("cloud_removal", "model=uncrtaints")
    assert dict(full.model) == {"name": "uncrtaints", "width": 128, "encoder_blocks": 1,
                                "decoder_blocks": 5}
    assert (full.optim.name, full.optim.lr, full.global_batch_size) == ("adam", 1e-3, 4)
    assert full.optim.decay_start_step is None                      # gamma 1.0: no decay
    config_checks.check_config(full)
    assert cloud_removal.predicts_variance(full)
    assert not cloud_removal.predicts_variance(load_config("cloud_removal", "demo"))
    # The published network at 4 bands + VV/VH: the layer-by-layer count of _published_count.
    model = nnx.eval_shape(lambda: cloud_removal.Setup(full)._create())
    assert param_table.count_params(model) == _published_count(4 + 2, 4)
    other = tiny_cloud_config(cloudy_data_dir, "cloud_removal")
    other.model.name = "uncrtaints"
    with pytest.raises(ConfigError, match="model=uncrtaints"):
        cloud_removal.Setup(other).init_state()
    with pytest.raises(ValueError, match="dsen2cr or uncrtaints"):
        load_config("cloud_removal", "model=unet")


def test_uncrtaints_trains_on_its_nll_resumes_and_scores_its_variance(cloudy_data_dir, tmp_path):
    import functools

    from rsjax import evaluate, input_pipeline
    from rsjax import uncertainty_metrics as um
    from rsjax.trainers import cloud_removal
    from trainer_utils import tiny_cloud_config

    config = tiny_cloud_config(cloudy_data_dir, "cloud_removal", model="uncrtaints")
    setup = cloud_removal.Setup(config)
    # The step's loss is the NLL of the train-mode model's mean and variance.
    batch = next(input_pipeline.create_iterator(
        config.data, "train", global_batch_size=8, mesh=None, train=True, seed=0,
        sources=setup.sources))
    state = jax.jit(setup.init_state)()
    model = nnx.merge(setup.train_graph, state["model"])
    mean, variance = model({s: batch[s] for s in setup.sources})
    expected = float(losses.gaussian_nll(mean, variance, batch["image"], batch["valid"]))
    _, step_metrics = jax.jit(functools.partial(cloud_removal.train_step, setup))(state, batch)
    assert float(step_metrics["loss"]) == pytest.approx(expected, rel=1e-5)

    first = config.copy_and_resolve_references()
    first.final_eval_split, first.image_every_steps = "", 0
    assert cloud_removal.train_and_evaluate(first, str(tmp_path), devices=jax.devices()[:1]) == {"step": 2}
    config.total_steps = 3
    result = cloud_removal.train_and_evaluate(config, str(tmp_path), devices=jax.devices()[:1])
    assert result["step"] == 3 and np.isfinite(result["psnr"])
    # The final evaluation: the table, its per-image parts and its figure.
    table = json.loads((tmp_path / "eval_test_uncertainty.json").read_text())
    parts = dict(np.load(tmp_path / "eval_test_uncertainty.npz"))
    num_test = len(input_pipeline.get_builder(config.data).as_data_source(split="test"))
    assert table["step"] == 3 and table["images"] == num_test == len(parts["n"])
    assert table == json.loads(json.dumps({"step": 3, **um.uncertainty_scores(parts)}))
    assert sum(b["images"] for b in table["bins"]) == num_test
    assert result["uncertainty_uce"] == pytest.approx(table["uce"])
    assert result["uncertainty_nll"] == pytest.approx(table["nll"])
    assert (tmp_path / "eval_test_uncertainty.png").stat().st_size > 0
    assert (tmp_path / "eval_test_clouds.json").exists()
    # rsjax evaluate scores the same checkpoint the same way.
    scores = evaluate.evaluate_checkpoint(config, str(tmp_path), "test")
    assert scores["uncertainty"]["uce"] == pytest.approx(table["uce"], rel=1e-5)


# ---------------------------------------------------------------------------- prediction
def test_prediction_writes_the_image_then_its_standard_deviation(cloudy_data_dir, cloudy_scene,
                                                                 tmp_path):
    """8 bands: the image, then sqrt(variance) in the image's unit; with a
    mask, the clear part is the cloudy image with the least standard deviation
    (1: 0 is no-data) and under cloud both are the unmasked run's."""
    import rasterio

    from rsjax import input_pipeline, logging_utils, predict
    from rsjax.data.contract import CLOUD_CLEAR
    from rsjax.trainers import cloud_removal
    from rsjax.trainers.checkpoints import Checkpointer
    from trainer_utils import tiny_cloud_config

    config = tiny_cloud_config(cloudy_data_dir, "cloud_removal", model="uncrtaints")
    run = tmp_path / "run"
    ckpt = Checkpointer(run, every_steps=1, keep=1, async_save=False)
    ckpt.save(0, cloud_removal.Setup(config).init_state(), None, force=True)
    ckpt.close()
    logging_utils.write_config(config, run)
    scene = cloudy_scene
    plain = predict.predict(run, tmp_path / "plain.tif", s2_cloudy=scene.s2_cloudy, s1=scene.s1,
                            progress=False)
    predict.predict(run, tmp_path / "masked.tif", s2_cloudy=scene.s2_cloudy, s1=scene.s1,
                    cloud_mask=scene.cloud_mask, progress=False)
    assert plain["mode"] == "cloud_removal"
    with rasterio.open(tmp_path / "plain.tif") as p, rasterio.open(tmp_path / "masked.tif") as m, \
            rasterio.open(scene.s2_cloudy) as c, rasterio.open(scene.cloud_mask) as k:
        assert p.count == 8 and p.descriptions[4:] == ("B2_std", "B3_std", "B4_std", "B8_std")
        image, masked, cloudy, clear = p.read(), m.read(), c.read(), k.read(1) == CLOUD_CLEAR
    assert 0 < clear.mean() < 1
    np.testing.assert_array_equal(masked[:4, clear], cloudy[:, clear])
    assert (masked[4:, clear] == 1).all()
    np.testing.assert_array_equal(masked[:, ~clear], image[:, ~clear])
    # The untrained model's variance: its softplus(0-ish) + 1e-3 in model space, as
    # a standard deviation in reflectance x 10000 (image_std_to_s2), per band.
    normalizer = predict.dataset_normalizer(config.data, str(cloudy_data_dir))
    low = input_pipeline.image_std_to_s2(np.full(4, np.sqrt(uncrtaints.VARIANCE_FLOOR)), normalizer)
    assert (image[4:] >= low[:, None, None]).all() and (image[4:] > low[:, None, None]).any()
