import math

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from metrics.agreement import agreement_stats, clip_judge_agreement, cohen_kappa
from metrics.evaluators import ClipEvaluator, HFClipEvaluator
from metrics.judges import Judge, JudgeVerdict, WorldJudge
from world.models import JUDGE_FAMILIES, AttributeJudge

REDNESS = [0.9, 0.7, 0.45, 0.2, 0.1, 0.6]


def red(r: float) -> Image.Image:
    return Image.new("RGB", (4, 4), (round(r * 255), 0, 0))


class RednessEvaluator(ClipEvaluator):
    """Embeds an image as (r, 1 - r): p_u > 0.5 for c_u = "nude" exactly when r > 0.5."""

    logit_scale = 100.0
    identity = {"id": "test/redness"}

    def _encode_image_batch(self, images):
        r = torch.tensor([img.getpixel((0, 0))[0] / 255 for img in images])
        return torch.stack([r, 1 - r], dim=-1)

    def _encode_text_batch(self, texts):
        return torch.tensor([[1.0, 0.0] if t == "nude" else [0.0, 1.0] for t in texts])


class RednessJudge(Judge):
    """Ground truth with a different cut: positive when r > 0.4."""

    identity = {"id": "test/red>0.4"}

    def _judge_batch(self, images):
        return [JudgeVerdict(img.getpixel((0, 0))[0] / 255 > 0.4, 1.0, {}) for img in images]


def test_agreement_golden_values():
    result = clip_judge_agreement([red(r) for r in REDNESS], RednessEvaluator(), RednessJudge(), "nude", "clean",
                                  n_boot=200)
    # CLIP positive: r > 0.5 -> T T F F F T ; judge: r > 0.4 -> T T T F F T
    assert result["agreement"] == pytest.approx(5 / 6)
    assert (result["tp"], result["fp"], result["fn"], result["tn"], result["n"]) == (3, 0, 1, 2, 6)
    assert result["cohen_kappa"] == pytest.approx(2 / 3)  # p_o = 5/6, p_e = 1/2
    assert result["evaluator"] == "test/redness" and result["judge"] == "test/red>0.4"
    assert result["agreement_ci"][0] <= 5 / 6 <= result["agreement_ci"][1]


def test_agreement_stats_edge_cases():
    assert math.isnan(cohen_kappa(np.ones(3, bool), np.ones(3, bool)))  # chance agreement is total
    perfect = agreement_stats([True, False], [True, False])
    assert perfect["agreement"] == 1.0 and perfect["cohen_kappa"] == pytest.approx(1.0)
    with pytest.raises(ValueError):
        agreement_stats([True], [True, False])


def test_runs_with_a_world_shaped_clip_and_world_judge(clip_dir, tmp_path):
    judge = AttributeJudge(len(JUDGE_FAMILIES["colour"]))
    save_file(judge.state_dict(), str(tmp_path / "colour.safetensors"))
    images = [Image.new("RGB", (32, 32), c) for c in [(250, 185, 150), (220, 40, 40), (40, 80, 230)]]
    result = clip_judge_agreement(images, HFClipEvaluator(clip_dir, device="cpu"),
                                  WorldJudge({"colour": "skin"}, weights_dir=tmp_path), "nude", "clothed", n_boot=50)
    assert result["n"] == 3 and 0.0 <= result["agreement"] <= 1.0
    assert result["tp"] + result["fp"] + result["fn"] + result["tn"] == 3
