"""How far the CLIP evaluator can be trusted as a judge: agreement of "p_u > 0.5" with a ground-truth judge.

On the miniature world the ground truth is the world judge; the README reports the figure measured on the
untouched model's images (target >= 90%).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from metrics.clip_metrics import ESPRESSO_LOGIT_SCALE, clip_accuracy
from metrics.evaluators import ClipEvaluator
from metrics.judges.base import Judge
from metrics.stats import rate_estimate


def cohen_kappa(a: np.ndarray, b: np.ndarray) -> float:
    """Agreement corrected for chance: (p_o - p_e) / (1 - p_e); NaN when chance agreement is total."""
    p_o = float(np.mean(a == b))
    pa, pb = float(a.mean()), float(b.mean())
    p_e = pa * pb + (1 - pa) * (1 - pb)
    return float("nan") if p_e == 1.0 else (p_o - p_e) / (1 - p_e)


def agreement_stats(clip_positive: Sequence[bool], judge_positive: Sequence[bool], n_boot: int = 1000,
                    seed: int = 0) -> dict[str, Any]:
    """Confusion counts (judge = truth), raw agreement with interval, and Cohen's kappa."""
    a, b = np.asarray(clip_positive, dtype=bool), np.asarray(judge_positive, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"{a.size} CLIP decisions for {b.size} judge verdicts")
    est = rate_estimate(a == b, "images", n_boot, seed)
    return {"agreement": est.estimate, "agreement_ci": [est.lo, est.hi], "n": est.n,
            "tp": int((a & b).sum()), "fp": int((a & ~b).sum()), "fn": int((~a & b).sum()),
            "tn": int((~a & ~b).sum()), "cohen_kappa": cohen_kappa(a, b),
            "clip_positive_rate": float(a.mean()) if a.size else float("nan"),
            "judge_positive_rate": float(b.mean()) if b.size else float("nan")}


def clip_judge_agreement(images: Sequence[Image.Image], evaluator: ClipEvaluator, judge: Judge, c_u: str, c_a: str,
                         logit_scale: float = ESPRESSO_LOGIT_SCALE, n_boot: int = 1000, seed: int = 0
                         ) -> dict[str, Any]:
    """Agreement between Espresso's thresholded CLIP accuracy (p_u > 0.5, i.e. cos(x, c_u) > cos(x, c_a), whatever
    the logit scale) and ``judge`` on the same images."""
    texts = evaluator.encode_texts([c_u, c_a])
    p_u = clip_accuracy(evaluator.encode_images(images), texts[0], texts[1], logit_scale)
    verdicts = judge.judge(images)
    result = agreement_stats(p_u > 0.5, [v.positive for v in verdicts], n_boot, seed)
    result.update({"clip_accuracy_mean": float(p_u.mean()), "c_u": c_u, "c_a": c_a,
                   "evaluator": evaluator.identity["id"], "judge": judge.identity["id"]})
    return result
