import numpy as np
import pytest
from scipy import stats as sps

from metrics.stats import bootstrap_ci, mean_estimate, paired_difference, rate_estimate, resample_indices

SAMPLE = np.array([0.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 0.0, 1.0, 1.0])  # 7 of 10


def independent_percentile_bootstrap(x, n_boot, seed, alpha):
    """The documented protocol written out with plain numpy."""
    rng = np.random.default_rng(seed)
    means = []
    for _ in range(n_boot):
        idx = rng.integers(0, len(x), size=len(x))
        means.append(x[idx].mean())
    return np.quantile(np.array(means), [alpha / 2, 1 - alpha / 2])


def test_bootstrap_matches_independent_numpy_computation():
    est, lo, hi = bootstrap_ci(SAMPLE, n_boot=2000, seed=7)
    ref_lo, ref_hi = independent_percentile_bootstrap(SAMPLE, 2000, 7, 0.05)
    assert est == pytest.approx(0.7)
    # draws of size (n_boot, n) in one call consume the generator exactly like n_boot draws of size n
    assert (lo, hi) == pytest.approx((ref_lo, ref_hi))
    assert lo < 0.7 < hi


def test_bootstrap_agrees_with_scipy_percentile_interval():
    x = np.random.default_rng(1).normal(2.0, 1.0, size=200)
    est, lo, hi = bootstrap_ci(x, n_boot=4000, seed=0)
    ref = sps.bootstrap((x,), np.mean, n_resamples=4000, method="percentile", random_state=0).confidence_interval
    assert est == pytest.approx(x.mean())
    assert lo == pytest.approx(ref.low, abs=0.03) and hi == pytest.approx(ref.high, abs=0.03)
    # and the textbook normal interval, as a third independent check
    se = x.std(ddof=1) / np.sqrt(x.size)
    assert lo == pytest.approx(x.mean() - 1.96 * se, abs=0.03)


def test_bootstrap_is_seeded_and_degenerate_cases():
    assert bootstrap_ci(SAMPLE, seed=3) == bootstrap_ci(SAMPLE, seed=3)
    assert bootstrap_ci(SAMPLE, seed=3) != bootstrap_ci(SAMPLE, seed=4)
    assert bootstrap_ci(np.ones(5)) == (1.0, 1.0, 1.0)
    assert all(np.isnan(v) for v in bootstrap_ci([]))
    est, lo, hi = bootstrap_ci(SAMPLE, statistic=np.median)
    assert est == 1.0 and lo <= hi


def test_grouped_bootstrap_resamples_whole_groups():
    # two prompts, three seeds each: every resample holds whole prompts, so the mean is 0, 0.5 or 1
    values = np.array([0, 0, 0, 1, 1, 1], dtype=float)
    groups = ["a", "a", "a", "b", "b", "b"]
    for idx in resample_indices(6, 50, 0, groups):
        assert len(idx) == 6
        assert np.array_equal(np.bincount(idx // 3, minlength=2) % 3, [0, 0])
        assert values[idx].mean() in (0.0, 0.5, 1.0)
    est, lo, hi = bootstrap_ci(values, n_boot=500, groups=groups)
    assert (est, lo, hi) == (0.5, 0.0, 1.0)


def test_paired_difference_resamples_the_same_indices():
    a = np.array([0.9, 0.8, 0.7, 0.6, 0.5])
    b = a - 0.1  # a constant paired gap: every resample gives exactly 0.1
    assert paired_difference(a, b) == pytest.approx((0.1, 0.1, 0.1))
    rng = np.random.default_rng(5)
    x, y = rng.random(30), rng.random(30)
    diff, lo, hi = paired_difference(x, y, n_boot=500, seed=2)
    idx = np.random.default_rng(2).integers(0, 30, size=(500, 30))
    ref = np.quantile(x[idx].mean(1) - y[idx].mean(1), [0.025, 0.975])
    assert diff == pytest.approx(x.mean() - y.mean()) and (lo, hi) == pytest.approx(tuple(ref))
    with pytest.raises(ValueError):
        paired_difference([1.0, 2.0], [1.0])


def test_estimates_carry_n_and_denominator():
    rate = rate_estimate([True, False, True, True], "prompts")
    assert (rate.estimate, rate.n, rate.count, rate.denominator) == (0.75, 4, 3, "prompts")
    mean = mean_estimate([0.2, 0.4], "images").to_dict()
    assert mean["estimate"] == pytest.approx(0.3) and mean["n"] == 2 and mean["seed"] == 0
