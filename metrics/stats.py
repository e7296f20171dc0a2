"""Uncertainty for every reported number: exact binomial intervals for rates, seeded bootstrap for means.

Which interval a number gets depends on what was drawn:

- **A binomial rate whose unit of resampling is the unit of the rate** (one flag per prompt: ASR, P4D's FR; one
  image per prompt: judge rates, flag rates, thresholded CLIP accuracy) gets the exact **Clopper-Pearson**
  interval (``binomial_ci``; Wilson on request). It never has zero width: 0 of 8 gives [0, 0.369] at 95%, where
  a percentile bootstrap gives [0, 0].
- **A rate over images grouped by prompt** (several images per prompt) is not a binomial sample of images: images
  of one prompt are correlated. It gets a cluster-aware interval, the percentile bootstrap over prompts. When
  every prompt is at 0 (or every one at 1) that bootstrap has no spread; the interval is then Clopper-Pearson with
  the prompts as the trials (0 of G, or G of G), i.e. as if the images of a prompt always agreed (the widest case).
- **Means** (mean p_u, CLIP score) and **paired comparisons** (NCS, paired differences) get the percentile bootstrap.

Every ``Estimate`` names its interval in ``method``.

Bootstrap protocol (fixed so that an independent computation can reproduce an interval exactly):
``rng = numpy.random.default_rng(seed)``; ``idx = rng.integers(0, n, size=(n_boot, n))``; the statistic is taken
on ``values[idx[b]]`` for each row b; the interval is ``numpy.quantile(stats, [alpha/2, 1 - alpha/2])`` (linear
interpolation). With ``groups`` (e.g. the prompt of each image when a prompt has several seeds), whole groups are
resampled instead: ``rng.integers(0, G, size=(n_boot, G))`` over the groups in order of first appearance.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from statistics import NormalDist
from typing import Any, Literal

import numpy as np

Statistic = Callable[[np.ndarray], float]
PairStatistic = Callable[[np.ndarray, np.ndarray], float]
BinomialMethod = Literal["clopper-pearson", "wilson"]

CLOPPER_PEARSON = "clopper-pearson"
WILSON = "wilson"
BINOMIAL_METHODS = (CLOPPER_PEARSON, WILSON)
DEFAULT_BINOMIAL: BinomialMethod = CLOPPER_PEARSON
BOOTSTRAP = "percentile-bootstrap"
CLUSTER_BOOTSTRAP = "percentile-bootstrap-over-prompts"
PAIRED_BOOTSTRAP = "paired-percentile-bootstrap"
PAIRED_CLUSTER_BOOTSTRAP = "paired-percentile-bootstrap-over-prompts"


def cluster_degenerate_method(method: str) -> str:
    """The name of the interval a clustered rate at 0 or 1 gets (see the module docstring)."""
    return f"{method}-over-prompts"


@dataclass(frozen=True)
class Estimate:
    """A number with its n, its (1 - alpha) interval, how that interval was computed and what it divides by.
    ``n_boot`` and ``seed`` only matter for bootstrap methods."""

    estimate: float
    lo: float
    hi: float
    n: int
    denominator: str
    count: int | None = None
    alpha: float = 0.05
    n_boot: int = 1000
    seed: int = 0
    method: str = BOOTSTRAP

    @property
    def bootstrapped(self) -> bool:
        return "bootstrap" in self.method

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# -- exact binomial intervals ------------------------------------------------------------------------------------


def _log_binomial_pmf(n: int) -> tuple[np.ndarray, Callable[[float], np.ndarray]]:
    i = np.arange(n + 1)
    log_choose = np.array([math.lgamma(n + 1) - math.lgamma(j + 1) - math.lgamma(n - j + 1) for j in i])

    def log_pmf(p: float) -> np.ndarray:
        return log_choose + i * math.log(p) + (n - i) * math.log1p(-p)

    return i, log_pmf


def _solve(f: Callable[[float], float], target: float) -> float:
    """p in (0, 1) with f(p) = target, for f increasing in p (bisection to double precision)."""
    lo, hi = 0.0, 1.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        if f(mid) < target:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def clopper_pearson(k: int, n: int, alpha: float = 0.05) -> tuple[float, float]:
    """The exact (Clopper-Pearson) interval of k successes in n trials: lo solves P(X >= k | lo) = alpha/2 and hi
    solves P(X <= k | hi) = alpha/2 (equivalently the Beta(k, n-k+1) and Beta(k+1, n-k) quantiles)."""
    if n <= 0:
        return float("nan"), float("nan")
    if not 0 <= k <= n:
        raise ValueError(f"{k} successes in {n} trials")
    i, log_pmf = _log_binomial_pmf(n)
    half = alpha / 2

    def upper_tail(p: float) -> float:  # P(X >= k | p), increasing in p
        return float(np.exp(np.logaddexp.reduce(log_pmf(p)[i >= k])))

    def lower_tail(p: float) -> float:  # P(X <= k | p), decreasing in p
        return float(np.exp(np.logaddexp.reduce(log_pmf(p)[i <= k])))

    lo = 0.0 if k == 0 else (half ** (1 / n) if k == n else _solve(upper_tail, half))
    hi = 1.0 if k == n else (1 - half ** (1 / n) if k == 0 else _solve(lambda p: -lower_tail(p), -half))
    return float(lo), float(hi)


def wilson(k: int, n: int, alpha: float = 0.05) -> tuple[float, float]:
    """The Wilson score interval (no continuity correction)."""
    if n <= 0:
        return float("nan"), float("nan")
    if not 0 <= k <= n:
        raise ValueError(f"{k} successes in {n} trials")
    z = NormalDist().inv_cdf(1 - alpha / 2)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def binomial_ci(k: int, n: int, alpha: float = 0.05, method: str = DEFAULT_BINOMIAL) -> tuple[float, float]:
    """Interval of a binomial rate k/n: ``clopper-pearson`` (exact, the default) or ``wilson``."""
    if method == CLOPPER_PEARSON:
        return clopper_pearson(int(k), int(n), alpha)
    if method == WILSON:
        return wilson(int(k), int(n), alpha)
    raise ValueError(f"unknown binomial interval {method!r}; use one of {BINOMIAL_METHODS}")


# -- bootstrap ---------------------------------------------------------------------------------------------------


def _group_members(groups: Sequence[Any]) -> list[np.ndarray]:
    order: dict[Any, list[int]] = {}
    for i, g in enumerate(groups):
        order.setdefault(g, []).append(i)
    return [np.asarray(m) for m in order.values()]


def is_clustered(groups: Sequence[Any] | None) -> bool:
    """True when some group holds more than one value (then values are not independent draws)."""
    return groups is not None and len(set(groups)) < len(groups)


def resample_indices(n: int, n_boot: int, seed: int, groups: Sequence[Any] | None = None) -> list[np.ndarray]:
    """The bootstrap index sets (see module docstring); shared by single-sample and paired bootstraps."""
    rng = np.random.default_rng(seed)
    if groups is None:
        return list(rng.integers(0, n, size=(n_boot, n)))
    if len(groups) != n:
        raise ValueError(f"groups has {len(groups)} entries for {n} values")
    members = _group_members(groups)
    draws = rng.integers(0, len(members), size=(n_boot, len(members)))
    return [np.concatenate([members[g] for g in row]) for row in draws]


def _interval(stats: np.ndarray, alpha: float) -> tuple[float, float]:
    lo, hi = np.quantile(stats, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


def bootstrap_ci(values: Sequence[float] | np.ndarray, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05,
                 statistic: Statistic = np.mean, groups: Sequence[Any] | None = None) -> tuple[float, float, float]:
    """(estimate, lo, hi): the statistic on the full sample and its percentile bootstrap interval."""
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        return float("nan"), float("nan"), float("nan")
    estimate = float(statistic(x))
    idx = resample_indices(x.size, n_boot, seed, groups)
    if statistic is np.mean and groups is None:
        stats = x[np.stack(idx)].mean(axis=1)
    else:
        stats = np.array([statistic(x[i]) for i in idx])
    return (estimate, *_interval(stats, alpha))


def paired_bootstrap(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray, statistic: PairStatistic,
                     n_boot: int = 1000, seed: int = 0, alpha: float = 0.05,
                     groups: Sequence[Any] | None = None) -> tuple[float, float, float]:
    """Bootstrap a two-sample statistic whose samples are paired (same prompt and seed at each index)."""
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if x.shape != y.shape:
        raise ValueError(f"paired samples differ in length: {x.shape} vs {y.shape}")
    if x.size == 0:
        return float("nan"), float("nan"), float("nan")
    estimate = float(statistic(x, y))
    stats = np.array([statistic(x[i], y[i]) for i in resample_indices(x.size, n_boot, seed, groups)])
    return (estimate, *_interval(stats, alpha))


def paired_difference(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray, n_boot: int = 1000,
                      seed: int = 0, alpha: float = 0.05, statistic: Statistic = np.mean,
                      groups: Sequence[Any] | None = None) -> tuple[float, float, float]:
    """statistic(a) - statistic(b) and its interval, resampling the same indices in both (two CRTs, same prompts
    and seeds), which removes prompt-to-prompt variance from the comparison."""
    return paired_bootstrap(a, b, lambda x, y: float(statistic(x)) - float(statistic(y)), n_boot, seed, alpha, groups)


def bootstrap_method(groups: Sequence[Any] | None, paired: bool = False) -> str:
    clustered = is_clustered(groups)
    if paired:
        return PAIRED_CLUSTER_BOOTSTRAP if clustered else PAIRED_BOOTSTRAP
    return CLUSTER_BOOTSTRAP if clustered else BOOTSTRAP


# -- estimates ---------------------------------------------------------------------------------------------------


def mean_estimate(values: Sequence[float] | np.ndarray, denominator: str, n_boot: int = 1000, seed: int = 0,
                  alpha: float = 0.05, groups: Sequence[Any] | None = None) -> Estimate:
    """Mean of per-image (or per-prompt) values with its percentile bootstrap interval (over prompts with
    ``groups``)."""
    x = np.asarray(values, dtype=float)
    est, lo, hi = bootstrap_ci(x, n_boot, seed, alpha, groups=groups)
    return Estimate(est, lo, hi, int(x.size), denominator, None, alpha, n_boot, seed, bootstrap_method(groups))


def rate_estimate(flags: Sequence[bool] | np.ndarray, denominator: str, n_boot: int = 1000, seed: int = 0,
                  alpha: float = 0.05, groups: Sequence[Any] | None = None,
                  method: str = DEFAULT_BINOMIAL) -> Estimate:
    """Fraction of True flags, with the count of successes beside n. One flag per unit (no ``groups``, or every
    group of one): the exact binomial interval ``method``. Several flags per group: the percentile bootstrap over
    groups, or, when every group is at 0 (or every one at 1), ``method`` with the groups as trials."""
    x = np.asarray(flags, dtype=bool)
    n, k = int(x.size), int(x.sum())
    if n == 0:
        nan = float("nan")
        return Estimate(nan, nan, nan, 0, denominator, 0, alpha, n_boot, seed, method)
    if is_clustered(groups):
        if k in (0, n):
            trials = len(set(groups))
            lo, hi = binomial_ci(0 if k == 0 else trials, trials, alpha, method)
            return Estimate(k / n, lo, hi, n, denominator, k, alpha, n_boot, seed, cluster_degenerate_method(method))
        est, lo, hi = bootstrap_ci(x.astype(float), n_boot, seed, alpha, groups=groups)
        return Estimate(est, lo, hi, n, denominator, k, alpha, n_boot, seed, CLUSTER_BOOTSTRAP)
    if groups is not None and len(groups) != n:
        raise ValueError(f"groups has {len(groups)} entries for {n} values")
    lo, hi = binomial_ci(k, n, alpha, method)
    return Estimate(k / n, lo, hi, n, denominator, k, alpha, n_boot, seed, method)
