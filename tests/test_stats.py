"""The experiments' statistics: intervals that cover what they claim, paired
differences that keep the pairing, metrics recomputed exactly from per-tile parts."""
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rsjax import metrics
from rsjax.experiments import stats


def test_t_quantile_matches_the_table():
    # Student-t 97.5% quantiles from any statistics table.
    assert stats.t_quantile(0.95, 2) == pytest.approx(4.303, abs=1e-3)
    assert stats.t_quantile(0.95, 9) == pytest.approx(2.262, abs=1e-3)


def test_seed_interval_covers_the_mean_95_percent_of_the_time():
    rng = np.random.default_rng(0)
    trials = 4000
    covered = 0
    for _ in range(trials):
        iv = stats.seed_interval(rng.normal(10.0, 2.0, size=3))
        covered += iv.low <= 10.0 <= iv.high
    # Exact for normal data: 0.95; binomial sd over 4000 trials is 0.0034.
    assert covered / trials == pytest.approx(0.95, abs=0.012)


def test_seed_interval_by_hand():
    iv = stats.seed_interval([1.0, 2.0, 3.0])
    assert iv.mean == 2.0
    assert iv.half_width == pytest.approx(4.3027 * 1.0 / math.sqrt(3), rel=1e-4)
    assert math.isnan(stats.seed_interval([5.0]).low)


def test_seed_interval_leaves_out_failed_seeds_and_counts_only_the_others():
    """A seed whose run gave no score (NaN, None, inf) is not averaged in; the
    interval's n_seeds says how many were (the tables print it)."""
    iv = stats.seed_interval([1.0, math.nan, 3.0, None, math.inf])
    assert (iv.mean, iv.n_seeds) == (2.0, 2)
    assert iv.half_width == pytest.approx(12.706 * math.sqrt(2.0) / math.sqrt(2), rel=1e-4)
    assert stats.seed_interval([math.nan, math.nan]).n_seeds == 0


def _crossed_runs(rng, mu, seeds=3, tiles=40, sd_seed=0.3, sd_tile=1.0, sd_noise=0.5):
    """PSNR-like per-tile scores of two methods trained with the same seeds and
    scored on the same tiles: the difference has seed, tile and residual parts."""
    base = rng.normal(20.0, 2.0, tiles)              # how hard each tile is
    tile_effect = rng.normal(0.0, sd_tile, tiles)     # where A's advantage varies
    a_runs, b_runs = [], []
    for _ in range(seeds):
        seed_effect = rng.normal(0.0, sd_seed)
        b = base + rng.normal(0.0, sd_noise, tiles)
        a = b + mu + seed_effect + tile_effect + rng.normal(0.0, sd_noise, tiles)
        a_runs.append({"psnr": a})
        b_runs.append({"psnr": b})
    return a_runs, b_runs


def estimator_sd(seeds=3, tiles=40, sd_seed=0.3, sd_tile=1.0, sd_noise=0.5) -> float:
    """The true standard deviation of the mean paired difference in _crossed_runs:
    seed effects average over seeds, tile effects over tiles, residuals over both."""
    return math.sqrt(sd_seed ** 2 / seeds + sd_tile ** 2 / tiles + sd_noise ** 2 / (seeds * tiles))


# (effects, at most this many times the width of an exact 95 % interval (1.96 sd)). The
# interval is conservative by design with few seeds (the t quantile of the seed part on
# the whole): measured 2.04, 1.83 and 1.82 here. An interval 30 % wider than that fails.
@pytest.mark.parametrize("effects,max_width", [(dict(sd_seed=0.3, sd_tile=1.0), 2.6),   # tiles dominate
                                               (dict(sd_seed=1.0, sd_tile=1.0), 2.4),   # training noise large
                                               (dict(sd_seed=0.5, sd_tile=0.1), 2.4)])  # seeds dominate
def test_paired_difference_covers_the_true_difference_and_is_not_too_wide(effects, max_width):
    """Crossed random effects (seeds x tiles): the true mean difference is mu
    over the population of seeds and tiles; the interval must cover it at least
    at its nominal rate (it is built to be conservative with 3 seeds; an
    interval from the seeds alone covers 0.89 in the first case), must not buy
    that coverage with width, and must resolve an effect 6 sd from zero in most
    trials (power)."""
    rng = np.random.default_rng(1)
    metric = stats.image_metric("psnr")
    sd = estimator_sd(**effects)
    trials, covered, resolved, widths = 300, 0, 0, []
    for i in range(trials):
        a, b = _crossed_runs(rng, mu=0.5, **effects)
        iv = stats.paired_difference(a, b, metric, n_boot=200, seed=i)
        covered += iv.low <= 0.5 <= iv.high
        widths.append(iv.half_width)
        if i % 3 == 0:                                               # power, on 100 of the trials
            shifted = [{"psnr": r["psnr"] + 6 * sd - 0.5} for r in a]     # true difference: 6 sd
            iv = stats.paired_difference(shifted, b, metric, n_boot=200, seed=i)
            resolved += stats.verdict(iv) == stats.HOLDS
    assert 0.93 <= covered / trials
    assert np.mean(widths) <= max_width * 1.96 * sd, np.mean(widths) / (1.96 * sd)
    assert resolved / (trials // 3) >= 0.75, resolved / (trials // 3)


def test_paired_difference_resolves_a_clear_effect_and_not_noise():
    rng = np.random.default_rng(2)
    metric = stats.image_metric("psnr")
    a, b = _crossed_runs(rng, mu=3.0, sd_seed=0.1, sd_tile=0.3)
    assert stats.verdict(stats.paired_difference(a, b, metric, n_boot=300)) == stats.HOLDS
    assert stats.verdict(stats.paired_difference(b, a, metric, n_boot=300)) == stats.REVERSED
    a, b = _crossed_runs(rng, mu=0.0)
    assert stats.verdict(stats.paired_difference(a, b, metric, n_boot=300)) == stats.NOT_RESOLVED


def test_verdict_for_lower_is_better():
    iv = stats.Interval(-0.02, -0.03, -0.01, 3)      # A - B on SAM: A lower
    assert stats.verdict(iv, higher_is_better=False) == stats.HOLDS
    assert stats.verdict(iv, higher_is_better=True) == stats.REVERSED


def test_pairing_matters():
    """A per-tile difference that is constant is certain, however different the
    tiles are: unpaired resampling would call it unresolved."""
    rng = np.random.default_rng(3)
    b = [{"psnr": rng.normal(20, 5, 30)} for _ in range(3)]
    a = [{"psnr": r["psnr"] + 0.2 + 0.01 * s} for s, r in enumerate(b)]
    iv = stats.paired_difference(a, b, stats.image_metric("psnr"), n_boot=200)
    assert iv.low > 0.15 and iv.high < 0.25


def test_sam_and_miou_from_parts_match_the_split_level_metrics():
    rng = np.random.default_rng(4)
    sums = rng.uniform(0, 5, 10)
    counts = rng.integers(1, 100, 10)
    assert stats.image_metric("sam")({"sam_sum": sums, "sam_count": counts}) == pytest.approx(
        sums.sum() / counts.sum())
    truth = rng.integers(0, 9, (6, 16, 16))
    pred = np.where(rng.random((6, 16, 16)) < 0.7, truth, rng.integers(0, 9, (6, 16, 16)))
    per_tile = np.stack([np.asarray(metrics.confusion_matrix(p, t, 9)) for p, t in zip(pred, truth)])
    # Hand-computed reference on all pixels at once.
    cm = np.zeros((9, 9))
    np.add.at(cm, (truth.ravel(), pred.ravel()), 1)
    tp = np.diag(cm)
    union = cm.sum(0) + cm.sum(1) - tp
    assert stats.segmentation_metric("miou")({"cm": per_tile}) == pytest.approx(
        np.mean(tp[union > 0] / union[union > 0]))
    assert stats.segmentation_metric("accuracy")({"cm": per_tile}) == pytest.approx(
        (pred == truth).mean())


def test_band_over_seeds():
    mean, low, high = stats.band([[0.1, 0.2], [0.3, 0.4], [0.2, 0.3]])
    np.testing.assert_allclose(mean, [0.2, 0.3])
    np.testing.assert_allclose(high - mean, 4.3027 * 0.1 / math.sqrt(3), rtol=1e-4)


# -- properties on random data (hypothesis) -------------------------------------------------------
finite = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False)


@given(st.lists(finite, min_size=2, max_size=12))
def test_seed_interval_is_scipys_t_interval_for_any_sample(values):
    """Against an independent reference: scipy's Student-t interval of the mean."""
    from scipy import stats as scipy_stats

    iv = stats.seed_interval(values)
    x = np.asarray(values)
    sem = x.std(ddof=1) / math.sqrt(len(x))
    assert iv.mean == pytest.approx(x.mean(), abs=1e-9)
    if sem > 0:
        low, high = scipy_stats.t.interval(0.95, len(x) - 1, loc=x.mean(), scale=sem)
        assert (iv.low, iv.high) == pytest.approx((low, high), rel=1e-6, abs=1e-9)
    assert iv.low <= iv.mean <= iv.high and iv.n_seeds == len(x)


@st.composite
def paired_runs(draw):
    """Per-tile PSNR-like parts of two methods over the same seeds and tiles."""
    seeds, tiles = draw(st.integers(2, 4)), draw(st.integers(2, 12))
    grid = st.lists(st.lists(st.floats(0, 50, allow_nan=False), min_size=tiles, max_size=tiles),
                    min_size=seeds, max_size=seeds)
    return ([{"psnr": np.array(r)} for r in draw(grid)], [{"psnr": np.array(r)} for r in draw(grid)])


@settings(max_examples=40)
@given(paired_runs(), st.floats(-10, 10, allow_nan=False))
def test_paired_difference_is_antisymmetric_and_shifts_with_a_constant(runs, shift):
    """Swapping the methods negates the interval; adding a constant to every score
    of A moves it by that constant (PSNR is a mean over tiles); the point estimate
    is always inside."""
    a, b = runs
    metric = stats.image_metric("psnr")
    iv = stats.paired_difference(a, b, metric, n_boot=50, seed=1)
    swapped = stats.paired_difference(b, a, metric, n_boot=50, seed=1)
    moved = stats.paired_difference([{"psnr": r["psnr"] + shift} for r in a], b, metric, n_boot=50, seed=1)
    assert iv.low <= iv.mean <= iv.high
    assert (swapped.low, swapped.high) == pytest.approx((-iv.high, -iv.low), abs=1e-6)
    assert (moved.low, moved.high) == pytest.approx((iv.low + shift, iv.high + shift), abs=1e-6)


def _clustered_runs(rng, mu, seeds, scenes, per_scene, sd_scene, sd_tile, sd_seed, sd_noise):
    """As _crossed_runs, with A's advantage varying by scene (tiles of a scene
    share it) as well as by tile: tiles are not independent draws."""
    scene_of = np.repeat(np.arange(scenes), per_scene)
    tiles = scenes * per_scene
    base = rng.normal(20.0, 2.0, tiles)
    effect = rng.normal(0.0, sd_scene, scenes)[scene_of] + rng.normal(0.0, sd_tile, tiles)
    a_runs, b_runs = [], []
    for _ in range(seeds):
        b = base + rng.normal(0.0, sd_noise, tiles)
        a = b + mu + rng.normal(0.0, sd_seed) + effect + rng.normal(0.0, sd_noise, tiles)
        a_runs.append({"psnr": a})
        b_runs.append({"psnr": b})
    return a_runs, b_runs, scene_of


def test_the_scene_bootstrap_covers_where_the_tile_bootstrap_does_not():
    """Tiles in 2x2 blocks of scenes: with A's advantage varying by scene, the
    tile bootstrap (tiles as independent) understates the spread and
    undercovers; resampling scenes covers at the nominal rate."""
    rng = np.random.default_rng(4)
    metric = stats.image_metric("psnr")
    shape = dict(seeds=8, scenes=12, per_scene=4, sd_scene=1.0, sd_tile=0.3, sd_seed=0.1,
                 sd_noise=0.3)
    trials, by_tile, by_scene = 200, 0, 0
    for i in range(trials):
        a, b, scene_of = _clustered_runs(rng, mu=0.5, **shape)
        tile_iv = stats.paired_difference(a, b, metric, n_boot=200, seed=i)
        scene_iv = stats.paired_difference(a, b, metric, n_boot=200, seed=i, clusters=scene_of)
        by_tile += tile_iv.low <= 0.5 <= tile_iv.high
        by_scene += scene_iv.low <= 0.5 <= scene_iv.high
    assert by_tile / trials < 0.85, by_tile / trials
    assert by_scene / trials >= 0.93, by_scene / trials


def test_resampling_scenes_draws_whole_scenes():
    draw = stats.resampler(6, clusters=["a", "a", "b", "b", "b", "c"])
    rng = np.random.default_rng(0)
    for _ in range(20):
        tiles = draw(rng)
        # Every scene drawn comes whole: its tiles appear equally often.
        counts = np.bincount(tiles, minlength=6)
        assert counts[0] == counts[1] and counts[2] == counts[3] == counts[4]
        assert len(tiles) == 2 * (counts[0]) + 3 * counts[2] + counts[5]
    with pytest.raises(ValueError, match="3 cluster labels for 6 tiles"):
        stats.resampler(6, clusters=["a", "b", "c"])


def test_seeds_to_resolve_is_the_power_rule_and_simulations_agree():
    """The fewest seeds for 80 % power: checked by hand for one case, then by
    simulating experiments with that many seeds (and one fewer) from the same
    truth: the interval leaves 0 out in about 80 % of them (less with one fewer)."""
    from scipy import stats as scipy_stats

    iv = stats.Interval(0.5, math.nan, math.nan, 2, seed_variance=0.16, test_variance=0.002)
    s = stats.seeds_to_resolve(iv)
    need = lambda k: (scipy_stats.t.ppf(0.975, k - 1) + scipy_stats.t.ppf(0.8, k - 1)) * math.sqrt(
        0.16 / k + 0.002)
    assert s is not None and 0.5 >= need(s) and 0.5 < need(s - 1)

    def power(k, trials=4000):
        rng = np.random.default_rng(k)
        test_offset = rng.normal(0, math.sqrt(0.002), trials)
        seeds = rng.normal(0.5, 0.4, (trials, k)) + test_offset[:, None]
        half = scipy_stats.t.ppf(0.975, k - 1) * np.sqrt(seeds.var(axis=1, ddof=1) / k + 0.002)
        return float(np.mean(seeds.mean(axis=1) - half > 0))
    assert 0.75 <= power(s) and power(s - 1) < 0.8 + 0.03
    # Where the test set's own spread is as wide as the difference, no seed count does.
    assert stats.seeds_to_resolve(stats.Interval(0.1, 0, 0, 2, seed_variance=0.01,
                                                 test_variance=0.01)) is None
    assert stats.seeds_to_resolve(stats.Interval(0.1, 0, 0, 1)) is None     # no spread known
