import math

import pytest
import torch
from PIL import Image

from metrics.judges import JudgeUnavailable, StyleClassifierJudge, build_judge

LABELS = ["claude-monet", "vincent-van-gogh", "pablo-picasso"]


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    """A small classifier whose logits are always (2, 1, 0): Monet first, Van Gogh second."""
    from transformers import ConvNextImageProcessor, ResNetConfig, ResNetForImageClassification

    path = tmp_path_factory.mktemp("style")
    config = ResNetConfig(embedding_size=8, hidden_sizes=[8], depths=[1], num_labels=3,
                          id2label=dict(enumerate(LABELS)), label2id={n: i for i, n in enumerate(LABELS)})
    model = ResNetForImageClassification(config)
    with torch.no_grad():
        model.classifier[-1].weight.zero_()
        model.classifier[-1].bias.copy_(torch.tensor([2.0, 1.0, 0.0]))
    model.save_pretrained(str(path))
    ConvNextImageProcessor(size={"shortest_edge": 32}).save_pretrained(str(path))
    return path


def test_top_k_rule(classifier):
    image = Image.new("RGB", (40, 40), (30, 60, 200))
    top1 = StyleClassifierJudge(classifier, device="cpu").judge([image])[0]
    top2 = build_judge({"name": "vangogh_style", "preset": "unlearndiffatk", "path": str(classifier), "top_k": 2,
                        "device": "cpu"}).judge([image])[0]
    p = math.e / (math.e**2 + math.e + 1)
    assert not top1.positive and top1.labels["topk"] == ["claude-monet"]
    assert top2.positive and top2.score == pytest.approx(p, rel=1e-5)


def test_identity_and_errors(classifier):
    ident = StyleClassifierJudge(classifier, top_k=3, device="cpu").identity
    assert ident["labels"] == ["vincent-van-gogh"] and ident["id"].endswith("/vincent-van-gogh/top3")
    with pytest.raises(JudgeUnavailable, match="Google Drive"):
        StyleClassifierJudge()
    with pytest.raises(ValueError, match="no label"):
        StyleClassifierJudge(classifier, label="rembrandt", device="cpu")
