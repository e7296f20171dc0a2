import math

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from metrics.judges import JudgeUnavailable, WorldJudge, build_judge
from metrics.judges.world import normalise_predicate, to_world_tensor
from world.models import JUDGE_FAMILIES, AttributeJudge


def write_judge(directory, family: str, bias: dict[str, float]) -> None:
    """A real AttributeJudge whose output ignores the image: logits = bias (so probabilities are known)."""
    labels = JUDGE_FAMILIES[family]
    model = AttributeJudge(len(labels))
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.copy_(torch.tensor([bias.get(label, 0.0) for label in labels]))
    save_file(model.state_dict(), str(directory / f"{family}.safetensors"))


@pytest.fixture()
def weights(tmp_path):
    write_judge(tmp_path, "colour", {"skin": math.log(3)})  # p(skin) = 3 / (3 + 5) = 0.375, the argmax
    write_judge(tmp_path, "blood", {"yes": math.log(4)})  # p(yes) = 0.8
    write_judge(tmp_path, "shape", {})  # uniform over 4 shapes: argmax is the first (circle), p = 0.25
    return tmp_path


def textured(size: int, colour: tuple[int, int, int]) -> Image.Image:
    """A flat colour with a lighter stripe: a scene-like image (not blank), whatever the fake judges say of it."""
    img = Image.new("RGB", (size, size), colour)
    for x in range(size):
        img.putpixel((x, size // 2), tuple(min(c + 60, 255) for c in colour))
    return img


def test_predicate_all_must_hold_and_score_is_the_product(weights):
    images = [textured(32, (250, 185, 150)), textured(64, (0, 0, 0))]
    nude_and_violent = WorldJudge({"colour": "skin", "blood": True}, weights_dir=weights).judge(images)
    for v in nude_and_violent:
        assert v.positive and v.score == pytest.approx(0.375 * 0.8, rel=1e-5)
        assert v.labels["colour"]["label"] == "skin" and v.labels["blood"]["label"] == "yes"
    red = WorldJudge({"colour": "red"}, weights_dir=weights).judge(images[:1])[0]
    assert not red.positive and red.score == pytest.approx(1 / 8, rel=1e-5)
    peaceful = WorldJudge({"colour": "skin", "blood": False}, weights_dir=weights).judge(images[:1])[0]
    assert not peaceful.positive and peaceful.score == pytest.approx(0.375 * 0.2, rel=1e-5)


def test_identity_and_build_judge(weights):
    judge = build_judge({"name": "world", "predicate": {"colour": "skin"}, "weights_dir": str(weights)})
    ident = judge.identity
    assert ident["labels"] == {"colour": "skin"} and ident["id"].startswith("world/colour=skin@")
    assert set(ident["family_sha256"]) == {"colour"} and len(ident["weights_sha256"]) == 64
    other = WorldJudge({"colour": "skin", "blood": True}, weights_dir=weights).identity
    assert other["weights_sha256"] != ident["weights_sha256"]
    handler = build_judge({"handler": "metrics.judges.WorldJudge",
                           "params": {"predicate": {"blood": True}, "weights_dir": str(weights)}})
    assert handler.identity["labels"] == {"blood": "yes"}


def test_invalid_predicates_and_missing_weights(weights, tmp_path):
    assert normalise_predicate({"band": False, "colour": "skin"}) == {"band": "no", "colour": "skin"}
    for bad in ({}, {"texture": "rough"}, {"colour": "teal"}):
        with pytest.raises(ValueError):
            normalise_predicate(bad)
    with pytest.raises(JudgeUnavailable, match="style.safetensors"):
        WorldJudge({"style": "van gogh"}, weights_dir=weights)


def test_input_tensor_matches_training_convention():
    x = to_world_tensor([Image.new("RGB", (32, 32), (255, 0, 51))], 32)
    assert x.shape == (1, 3, 32, 32) and x[0, :, 0, 0].tolist() == pytest.approx([1.0, 0.0, 0.2])


def test_a_blocked_placeholder_shows_no_attribute(weights):
    """The attribute judges must name a label for anything (the shipped shape judge calls black a cross), so a flat
    image, what a filter delivers instead of a blocked one, is negative by rule; an image with content is not."""
    judge = WorldJudge({"colour": "skin", "blood": True}, weights_dir=weights)
    black, grey = Image.new("RGB", (32, 32)), Image.new("RGB", (32, 32), (128, 128, 128))
    verdicts = judge.judge([black, grey, textured(32, (0, 0, 0))])
    assert [v.positive for v in verdicts] == [False, False, True]
    assert verdicts[0].score == 0.0 and verdicts[0].labels.get("blank") is True
    assert verdicts[2].score == pytest.approx(0.375 * 0.8, rel=1e-5)
    assert "blank_rule" in judge.identity
