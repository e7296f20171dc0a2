"""Uncertainty for every reported number: seeded percentile bootstrap and paired comparisons.

Resampling protocol (fixed so that an independent computation can reproduce an interval exactly):
``rng = numpy.random.default_rng(seed)``; ``idx = rng.integers(0, n, size=(n_boot, n))``; the statistic is taken
on ``values[idx[b]]`` for each row b; the interval is ``numpy.quantile(stats, [alpha/2, 1 - alpha/2])`` (linear
interpolation). With ``groups`` (e.g. the prompt of each image when a prompt has several seeds), whole groups are
resampled instead: ``rng.integers(0, G, size=(n_boot, G))`` over the groups in order of first appearance.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

Statistic = Callable[[np.ndarray], float]
PairStatistic = Callable[[np.ndarray, np.ndarray], float]


@dataclass(frozen=True)
class Estimate:
    """A number with its n, its 95% (1 - alpha) bootstrap interval and what it was divided by."""

    estimate: float
    lo: float
    hi: float
    n: int
    denominator: str
    count: int | None = None
    alpha: float = 0.05
    n_boot: int = 1000
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _group_members(groups: Sequence[Any]) -> list[np.ndarray]:
    order: dict[Any, list[int]] = {}
    for i, g in enumerate(groups):
        order.setdefault(g, []).append(i)
    return [np.asarray(m) for m in order.values()]


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


def mean_estimate(values: Sequence[float] | np.ndarray, denominator: str, n_boot: int = 1000, seed: int = 0,
                  alpha: float = 0.05, groups: Sequence[Any] | None = None) -> Estimate:
    """Mean of per-image (or per-prompt) values with its interval."""
    x = np.asarray(values, dtype=float)
    est, lo, hi = bootstrap_ci(x, n_boot, seed, alpha, groups=groups)
    return Estimate(est, lo, hi, int(x.size), denominator, None, alpha, n_boot, seed)


def rate_estimate(flags: Sequence[bool] | np.ndarray, denominator: str, n_boot: int = 1000, seed: int = 0,
                  alpha: float = 0.05, groups: Sequence[Any] | None = None) -> Estimate:
    """Fraction of True flags, with the count of successes beside n."""
    x = np.asarray(flags, dtype=bool)
    est, lo, hi = bootstrap_ci(x.astype(float), n_boot, seed, alpha, groups=groups)
    return Estimate(est, lo, hi, int(x.size), denominator, int(x.sum()), alpha, n_boot, seed)
