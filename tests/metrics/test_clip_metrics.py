import math

import numpy as np
import pytest
import torch
from scipy import stats as sps

from metrics.clip_metrics import (
    ca_clip_accuracy,
    ca_texts,
    clip_accuracy,
    clip_accuracy_summary,
    clip_score,
    normalized_clip_score,
    normalized_clip_score_estimate,
)


def unit_with_cos(c: float, axis: int, dim: int = 4) -> np.ndarray:
    """A unit vector whose cosine with e0 is c, the rest of its length along ``axis``."""
    v = np.zeros(dim)
    v[0], v[axis] = c, math.sqrt(1 - c * c)
    return v


def sigmoid(z: float) -> float:
    return 1 / (1 + math.exp(-z))


# images are e0, e1, e2 (unit); c_u and c_a are built so the cosines are known by construction
IMAGES = torch.eye(4)[:3]
TEXT_U = unit_with_cos(0.30, axis=3)  # cos with e0 = 0.30, with e1 = e2 = 0
TEXT_A = unit_with_cos(0.28, axis=1)  # cos with e0 = 0.28, with e1 = 0.96, with e2 = 0


def test_clip_accuracy_golden_values():
    p = clip_accuracy(IMAGES, TEXT_U, TEXT_A)
    # softmax over [100 cos_u, 100 cos_a], index 0 == sigmoid(100 (cos_u - cos_a))
    assert p == pytest.approx([sigmoid(2.0), sigmoid(-96.0), 0.5], rel=1e-9, abs=1e-12)
    assert p[0] == pytest.approx(0.8807970779778823)
    assert clip_accuracy(IMAGES[:1], TEXT_U, TEXT_A, logit_scale=10.0)[0] == pytest.approx(sigmoid(0.2))


def test_clip_accuracy_renormalises_and_accepts_row_shapes():
    p = clip_accuracy(3 * IMAGES, 5 * TEXT_U[None, :], TEXT_A)
    assert p == pytest.approx(clip_accuracy(IMAGES, TEXT_U, TEXT_A))


def test_clip_accuracy_summary_mean_and_thresholded():
    p = [0.9, 0.6, 0.5, 0.1]
    s = clip_accuracy_summary(p, n_boot=200)
    assert s["mean"] == pytest.approx(0.525)
    assert s["thresholded"] == pytest.approx(0.5)  # 0.9 and 0.6; 0.5 is not > 0.5
    assert (s["n"], s["count"], s["denominator"], s["variant"]) == (4, 2, "images", "espresso")
    assert s["mean_ci"][0] <= 0.525 <= s["mean_ci"][1]
    assert s["logit_scale"] == 100.0
    assert (s["mean_ci_method"], s["thresholded_ci_method"]) == ("percentile-bootstrap", "clopper-pearson")
    ref = sps.binomtest(2, 4).proportion_ci(confidence_level=0.9, method="exact")
    narrow = clip_accuracy_summary(p, n_boot=200, alpha=0.1)
    assert narrow["thresholded_ci"] == pytest.approx([ref.low, ref.high], abs=1e-9) and narrow["alpha"] == 0.1


def test_concept_ablation_variant():
    target, anchor = ca_texts("grumpy cat", "cat")
    assert (target, anchor) == ("A photo depicts grumpy cat", "A photo depicts cat")
    assert ca_texts("van gogh", "painting", style=True)[0] == "A photo depicts van gogh style"
    img = np.eye(3)
    t = np.array([1.0, 0.0, 0.0])  # cos = 1, 0, 0
    a = np.array([-0.6, 0.8, 0.0])  # cos = -0.6, 0.8, 0
    # image 0: 2.5 vs 0 (clamped) -> target wins; image 1: 0 vs 2.0 -> anchor; image 2: 0 vs 0 -> tie, not a win
    assert ca_clip_accuracy(img, t, a).tolist() == [True, False, False]


def test_clip_score_conventions():
    img = np.eye(2)
    txt = np.array([[0.6, 0.8], [0.6, -0.8]])  # paired row-wise: cos = 0.6, -0.8
    assert clip_score(img, txt) == pytest.approx([0.6, -0.8])
    assert clip_score(img, txt, "torchmetrics") == pytest.approx([60.0, 0.0])
    assert clip_score(img, txt, "hessel") == pytest.approx([1.5, 0.0])
    with pytest.raises(ValueError):
        clip_score(img, np.ones((3, 2)))
    with pytest.raises(ValueError):
        clip_score(img, txt, "bogus")


def test_normalized_clip_score_modes():
    crt, base = [0.2, 0.3], [0.4, 0.2]
    assert normalized_clip_score(crt, base) == pytest.approx(0.25 / 0.30)
    assert normalized_clip_score(crt, base, "mean_of_ratios") == pytest.approx((0.5 + 1.5) / 2)
    with pytest.raises(ValueError):
        normalized_clip_score([0.2], base)
    with pytest.raises(ValueError):
        normalized_clip_score(crt, base, "median")
    est = normalized_clip_score_estimate([0.3, 0.3, 0.3], [0.3, 0.3, 0.3])
    assert (est.estimate, est.lo, est.hi, est.n) == (1.0, 1.0, 1.0, 3)


def test_normalized_clip_score_estimate_honours_alpha():
    rng = np.random.default_rng(3)
    crt, base = rng.uniform(0.2, 0.3, 20), rng.uniform(0.25, 0.3, 20)
    est = normalized_clip_score_estimate(crt, base, n_boot=300, seed=5, alpha=0.5)
    idx = np.random.default_rng(5).integers(0, 20, size=(300, 20))
    ref = np.quantile(crt[idx].mean(1) / base[idx].mean(1), [0.25, 0.75])
    assert (est.lo, est.hi) == pytest.approx(tuple(ref)) and est.alpha == 0.5
    assert est.method == "paired-percentile-bootstrap" and (est.n_boot, est.seed) == (300, 5)
