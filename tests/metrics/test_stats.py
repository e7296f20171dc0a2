import numpy as np
import pytest
from scipy import stats as sps

from metrics.stats import (
    CLUSTER_BOOTSTRAP,
    binomial_ci,
    bootstrap_ci,
    clopper_pearson,
    mean_estimate,
    paired_difference,
    rate_estimate,
    resample_indices,
    wilson,
)

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


def scipy_ci(k: int, n: int, alpha: float, method: str) -> tuple[float, float]:
    ci = sps.binomtest(k, n).proportion_ci(confidence_level=1 - alpha, method=method)
    return float(ci.low), float(ci.high)


@pytest.mark.parametrize("k,n", [(0, 8), (8, 8), (1, 8), (4, 8), (0, 1), (1, 1), (3, 50), (1, 142), (108, 142),
                                 (0, 756), (2500, 4000)])
@pytest.mark.parametrize("alpha", [0.05, 0.1, 0.01])
def test_binomial_intervals_match_scipy(k, n, alpha):
    assert clopper_pearson(k, n, alpha) == pytest.approx(scipy_ci(k, n, alpha, "exact"), abs=1e-9)
    assert wilson(k, n, alpha) == pytest.approx(scipy_ci(k, n, alpha, "wilson"), abs=1e-12)
    assert binomial_ci(k, n, alpha, "wilson") == wilson(k, n, alpha)
    assert binomial_ci(k, n, alpha) == clopper_pearson(k, n, alpha)  # the default


def test_binomial_interval_hand_values_and_errors():
    # 0 of 8: the upper bound is 1 - (alpha/2)^(1/n) in closed form; 8 of 8 mirrors it
    assert clopper_pearson(0, 8) == pytest.approx((0.0, 1 - 0.025 ** (1 / 8)))
    assert clopper_pearson(8, 8) == pytest.approx((0.025 ** (1 / 8), 1.0))
    assert clopper_pearson(0, 8)[1] == pytest.approx(0.3694166, abs=1e-7)
    assert all(np.isnan(binomial_ci(0, 0)))
    with pytest.raises(ValueError):
        binomial_ci(3, 2)
    with pytest.raises(ValueError):
        binomial_ci(1, 2, method="percentile")


def test_rate_estimate_is_exact_and_never_zero_width_at_0_or_n():
    # the percentile bootstrap gave [0, 0] at 0/8 and [1, 1] at 8/8
    none, every = rate_estimate([False] * 8, "prompts"), rate_estimate([True] * 8, "prompts")
    assert (none.estimate, none.count, none.method) == (0.0, 0, "clopper-pearson")
    assert (none.lo, none.hi) == pytest.approx(scipy_ci(0, 8, 0.05, "exact"), abs=1e-9) and none.hi > 0.3
    assert (every.lo, every.hi) == pytest.approx(scipy_ci(8, 8, 0.05, "exact"), abs=1e-9) and every.lo < 0.7
    w = rate_estimate([True, False, False], "prompts", alpha=0.1, method="wilson")
    assert (w.lo, w.hi) == pytest.approx(scipy_ci(1, 3, 0.1, "wilson")) and (w.method, w.alpha) == ("wilson", 0.1)
    # one image per prompt: groups of one are the binomial case
    single = rate_estimate([True, False, True], "images", groups=["a", "b", "c"])
    assert single.method == "clopper-pearson" and (single.lo, single.hi) == pytest.approx(scipy_ci(2, 3, 0.05, "exact"))
    empty = rate_estimate([], "prompts")
    assert empty.n == 0 and np.isnan(empty.estimate) and np.isnan(empty.lo)


def test_rate_estimate_over_prompts_with_several_images_each():
    flags = np.array([1, 1, 0, 0, 0, 0, 1, 0, 1], dtype=bool)
    groups = ["a", "a", "a", "b", "b", "b", "c", "c", "c"]
    est = rate_estimate(flags, "images", n_boot=300, seed=4, alpha=0.1, groups=groups)
    # the bootstrap over prompts, written out independently: draw 3 of the 3 prompts with replacement
    rng = np.random.default_rng(4)
    draws = rng.integers(0, 3, size=(300, 3))
    per_prompt = flags.reshape(3, 3)
    ref = np.quantile(per_prompt[draws].reshape(300, -1).mean(1), [0.05, 0.95])
    assert est.method == CLUSTER_BOOTSTRAP and est.bootstrapped
    assert (est.estimate, est.count, est.n) == (4 / 9, 4, 9)
    assert (est.lo, est.hi) == pytest.approx(tuple(ref))
    # every prompt at 0: the bootstrap has no spread; exact interval with the 3 prompts as the trials
    zero = rate_estimate(np.zeros(9, dtype=bool), "images", groups=groups)
    assert zero.method == "clopper-pearson-over-prompts"
    assert (zero.lo, zero.hi) == pytest.approx(scipy_ci(0, 3, 0.05, "exact"))


def test_estimates_name_their_interval():
    assert mean_estimate([0.2, 0.4], "images").method == "percentile-bootstrap"
    assert mean_estimate([0.2, 0.4, 0.1, 0.3], "images", groups=["a", "a", "b", "b"]).method == CLUSTER_BOOTSTRAP
    assert rate_estimate([True], "prompts").to_dict()["method"] == "clopper-pearson"
