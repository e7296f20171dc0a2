import math

import pytest
import torch
from PIL import Image

from metrics.judges import JudgeUnavailable, ResNet50Judge, build_judge
from metrics.judges.resnet import IMAGENET_CLASSES, RESNET50, resolve_class


@pytest.fixture(scope="module")
def tiny_classifier(tmp_path_factory):
    """A small ResNet with ImageNet's 1000 outputs whose head always prefers class 497 by logit 5."""
    from transformers import ConvNextImageProcessor, ResNetConfig, ResNetForImageClassification

    path = tmp_path_factory.mktemp("resnet")
    config = ResNetConfig(embedding_size=8, hidden_sizes=[8, 8], depths=[1, 1], num_labels=1000,
                          id2label={i: f"class{i}" for i in range(1000)})
    model = ResNetForImageClassification(config)
    head = model.classifier[-1]
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[497] = 5.0
    model.save_pretrained(str(path))
    ConvNextImageProcessor(size={"shortest_edge": 64}, crop_pct=0.875).save_pretrained(str(path))
    return path


def test_top1_decision_and_score(tiny_classifier):
    image = Image.new("RGB", (80, 60), (120, 30, 200))
    church = ResNet50Judge("church", path=tiny_classifier, device="cpu").judge([image, image])
    tench = ResNet50Judge(0, path=tiny_classifier, device="cpu").judge([image])[0]
    p_church = math.exp(5) / (math.exp(5) + 999)
    assert [v.positive for v in church] == [True, True] and church[0].score == pytest.approx(p_church, rel=1e-5)
    assert not tench.positive and tench.score == pytest.approx(1 / (math.exp(5) + 999), rel=1e-5)
    assert tench.labels["top1"] == 497


def test_presets_identity_and_build(tiny_classifier):
    assert {k: IMAGENET_CLASSES[k] for k in ("church", "garbage_truck", "parachute", "tench")} == {
        "church": 497, "garbage_truck": 569, "parachute": 701, "tench": 0}
    assert resolve_class("garbage truck") == 569 and resolve_class("701") == 701
    with pytest.raises(ValueError):
        resolve_class("unicorn")
    judge = build_judge({"name": "resnet50", "preset": "parachute", "path": str(tiny_classifier), "device": "cpu"})
    ident = judge.identity
    assert ident["labels"] == [701] and ident["threshold"] == "top1" and len(ident["weights_sha256"]) == 64
    assert ident["id"].startswith("resnet50/local:") and ident["id"].endswith("/top1=701")
    assert str(tiny_classifier) not in str(ident)


def test_missing_weights_is_a_clear_error(tmp_path):
    with pytest.raises(JudgeUnavailable, match="resnet-50"):
        ResNet50Judge(497, path=tmp_path / "nothing", device="cpu")


def test_published_resnet50_if_cached():
    from huggingface_hub import try_to_load_from_cache

    if not any(isinstance(try_to_load_from_cache(RESNET50, name), str)
               for name in ("model.safetensors", "pytorch_model.bin")):
        pytest.skip(f"{RESNET50} not in the local Hugging Face cache (needs network once)")
    verdict = ResNet50Judge("church", device="cpu").judge([Image.new("RGB", (224, 224), (0, 0, 0))])[0]
    assert 0.0 <= verdict.score <= 1.0
