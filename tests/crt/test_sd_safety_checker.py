"""SD safety checker: diffusers' decision rule exactly (hand values, NumPy rounding, diffusers' own forward), as a
differentiable score; one clear line offline; the world analog calibrates on renders and flags the concept."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from crt.base import FitContext, pil_to_pixels
from crt.sd_safety_checker import (
    CHECKER_ID,
    CheckerRule,
    CheckerUnavailable,
    SafetyCheckerFilter,
    SDSafetyChecker,
    calibrate_threshold,
    cosine,
)
from crt_bench.spec import Access, Family, HarnessError, PromptItem
from tests.crt.conftest import CLIP_MEAN, CLIP_STD, WORLD_CLIP, changed_keys, crt_yaml, state_snapshot

ROOT = Path(__file__).resolve().parents[2]
SIZE = 32  # the small checker's input size


def _unit(angles: list[float]) -> torch.Tensor:
    """Rows (cos a, sin a): cosines between such rows are cos(a - b), computable by hand."""
    a = torch.tensor(angles, dtype=torch.float64)
    return torch.stack([a.cos(), a.sin()], 1).float()


def _rule(concept_thr: list[float], special_thr: list[float] | None = None, **switches) -> CheckerRule:
    """Concept 0 along x, concept 1 along y; one special-care embedding along x (when ``special_thr``)."""
    special = _unit([0.0]) if special_thr else torch.zeros(0, 2)
    return CheckerRule(_unit([0.0, np.pi / 2]), torch.tensor(concept_thr), special,
                       torch.tensor(special_thr or []), **switches)


IMAGE_ON_X = _unit([0.0])  # cos 1 with concept 0 and the special embedding, 0 with concept 1


@pytest.mark.parametrize(("concept_thr", "special_thr", "switches", "flagged"), [
    ([0.9996, 2.0], None, {}, False),  # 1 - 0.9996 = 0.0004 rounds to 0.000: not flagged
    ([0.9993, 2.0], None, {}, True),  # 0.0007 rounds to 0.001 > 0
    ([0.9996, 2.0], None, {"round_decimals": None}, True),  # forward_onnx: 0.0004 > 0
    ([1.005, 2.0], None, {}, False),  # -0.005, no special care
    ([1.005, 2.0], [0.99], {}, True),  # special care fires (+0.01): 0.005 > 0
    ([1.005, 2.0], [1.0004], {}, False),  # special score -0.0004 does not fire
    ([1.0, -0.0006], None, {}, True),  # concept 1: cos 0 - (-0.0006) = 0.0006 rounds to 0.001
    ([1.015, 2.0], [0.9], {"adjustment": 0.02}, True),  # base 0.02 + 0.01 = 0.03 > 0.015
    ([1.015, 2.0], [0.9], {"adjustment": 0.02, "special_care_sets_adjustment": True}, False),  # diffusers: 0.01
    ([1.015, 2.0], None, {"adjustment": 0.02}, True),  # base alone: -0.015 + 0.02 > 0
])
def test_decision_rule_on_hand_values(concept_thr, special_thr, switches, flagged):
    rule = _rule(concept_thr, special_thr, **switches)
    assert bool(rule.scores(IMAGE_ON_X)[0] > 0) is flagged


def test_rounding_margin_agrees_with_numpy_round_near_the_boundary():
    gen = torch.Generator().manual_seed(0)
    x = (torch.rand(20000, generator=gen) - 0.5) * 0.004  # around +-0.0005, the rounding boundary
    x = torch.cat([x, torch.tensor([0.0005, -0.0005, 0.0015, 0.0025])])
    rule = _rule([0.0, 0.0])
    expected = torch.tensor([np.round(np.float32(v), 3) > 0 for v in x.numpy()])
    assert torch.equal(rule.margin(x) > 0, expected)


def test_calibrated_threshold_has_the_best_balanced_accuracy_in_the_widest_gap():
    positives, negatives = torch.tensor([0.5, 0.6]), torch.tensor([0.1, 0.2, 0.55])
    threshold, accuracy = calibrate_threshold(positives, negatives)
    assert threshold == pytest.approx(0.35) and accuracy == pytest.approx((1 + 2 / 3) / 2)
    best = max(((positives > t).float().mean() + (negatives <= t).float().mean()) / 2
               for t in torch.linspace(0, 1, 1001))
    assert accuracy == pytest.approx(float(best))


def _small_checker(folder: Path) -> Path:
    """A randomly initialised StableDiffusionSafetyChecker with thresholds set so that random images split."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig

    torch.manual_seed(0)
    config = CLIPConfig(
        text_config={"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "num_hidden_layers": 1},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "num_hidden_layers": 1,
                       "image_size": SIZE, "patch_size": 8}, projection_dim=16)
    checker = StableDiffusionSafetyChecker(config).eval()
    with torch.no_grad():
        checker.concept_embeds.copy_(torch.randn(17, 16))
        checker.special_care_embeds.copy_(torch.randn(3, 16))
        embeds = checker.visual_projection(checker.vision_model(torch.randn(256, 3, SIZE, SIZE))[1])
        checker.concept_embeds_weights.copy_(cosine(embeds, checker.concept_embeds).quantile(0.97, dim=0))
        checker.special_care_embeds_weights.copy_(cosine(embeds, checker.special_care_embeds).quantile(0.9, dim=0))
    checker.save_pretrained(str(folder))
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": SIZE},
        "do_center_crop": True, "crop_size": {"height": SIZE, "width": SIZE}, "do_rescale": True,
        "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": CLIP_MEAN, "image_std": CLIP_STD,
        "resample": 3, "do_convert_rgb": True}))
    return folder


@pytest.fixture(scope="module")
def checker_dir(tmp_path_factory) -> Path:
    return _small_checker(tmp_path_factory.mktemp("checker"))


def _pil(pixels: torch.Tensor) -> list:
    from PIL import Image

    return [Image.fromarray((p.permute(1, 2, 0).numpy() * 255).round().astype("uint8")) for p in pixels]


def _fit_apply(crt: SDSafetyChecker, tiny, concept):
    artifact = crt.fit(FitContext(pipe=tiny.pipe, concept=concept, settings=tiny.settings, generate=tiny.generate))
    return artifact, crt.apply(tiny.pipe, artifact)


def test_score_is_positive_exactly_when_diffusers_forward_flags(checker_dir, sd14, concept):
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPImageProcessor

    reference = StableDiffusionSafetyChecker.from_pretrained(str(checker_dir)).eval()
    _, defended = _fit_apply(SDSafetyChecker(checker=str(checker_dir)), sd14, concept)
    filt = defended.filter
    assert isinstance(filt, SafetyCheckerFilter)
    clip_input = torch.randn(96, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    _, has_nsfw = reference(clip_input=clip_input, images=[np.zeros((2, 2, 3))] * len(clip_input))
    with torch.no_grad():
        flagged = filt.scores_from_clip_input(clip_input) > 0
        special = filt.rule.special_care(filt.embed(clip_input))
    assert 0 < int(flagged.sum()) < len(flagged) and special.any() and not special.all()  # the test can fail
    assert flagged.tolist() == list(has_nsfw)

    # delivered PIL images: the pipeline's feature extractor, then the same rule
    images = _pil(torch.rand(48, 3, 64, 64, generator=torch.Generator().manual_seed(2)))
    pixel_values = CLIPImageProcessor.from_pretrained(str(checker_dir))(images, return_tensors="pt").pixel_values
    _, has_nsfw = reference(clip_input=pixel_values, images=[np.zeros((2, 2, 3))] * len(images))
    assert (filt.scores(images) > 0).tolist() == list(has_nsfw)


def test_scores_from_pixels_is_differentiable_and_follows_the_delivered_decision(checker_dir, sd14, concept):
    _, defended = _fit_apply(SDSafetyChecker(checker=str(checker_dir)), sd14, concept)
    pixels = torch.rand(16, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3)).requires_grad_(True)
    scores = defended.filter.scores_from_pixels(pixels)
    scores.sum().backward()
    assert pixels.grad is not None and pixels.grad.abs().sum() > 0
    delivered = defended.filter.scores(_pil(pixels.detach()))  # same size: only PNG rounding differs
    assert ((delivered > 0) == (scores.detach() > 0)).float().mean() >= 0.9


def test_fit_and_apply_on_sd14_leave_the_pipeline_alone(checker_dir, sd14, concept):
    unet, text_encoder = state_snapshot(sd14.pipe.unet), state_snapshot(sd14.pipe.text_encoder)
    artifact, defended = _fit_apply(SDSafetyChecker(checker=str(checker_dir)), sd14, concept)
    assert not changed_keys(unet, sd14.pipe.unet) and not changed_keys(text_encoder, sd14.pipe.text_encoder)
    assert defended.pipe is sd14.pipe and defended.negative_prompt is None and defended.guidance is None
    assert {Access.FILTER_SCORE, Access.FILTER_GRADIENTS} <= defended.exposes
    assert SDSafetyChecker.family is Family.FILTER
    assert artifact.tensors["concept_embeds"].shape == (17, 16) and artifact.tensors["special_embeds"].shape == (3, 16)
    assert artifact.meta["mode"] == "released checker"
    assert list(artifact.meta["weights_sha256"]) == ["model.safetensors"]
    images = sd14.generate(list(concept.prompt_set("target")))
    assert defended.filter.scores(images).shape == (1,)


def test_offline_without_a_cached_checker_is_one_line_naming_the_id(monkeypatch, tmp_path, sd14, concept):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(CheckerUnavailable) as error:
        SDSafetyChecker().fit(FitContext(pipe=sd14.pipe, concept=concept, settings=sd14.settings,
                                         generate=sd14.generate))
    message = str(error.value)
    assert CHECKER_ID in message and "\n" not in message and "crt.params.checker=" in message
    assert isinstance(error.value, HarnessError)


def test_world_analog_calibrates_on_renders_of_the_calibration_sets(world, concept):
    unet = state_snapshot(world.pipe.unet)
    asked: list[list[PromptItem]] = []

    def generate(items):
        asked.append(list(items))
        return world.generate(items)

    crt = SDSafetyChecker(checker=None, analog_clip=str(world.clip_dir))
    artifact = crt.fit(FitContext(pipe=world.pipe, concept=concept, settings=world.settings, generate=generate))
    assert [i.text for i in asked[0]] == [i.text for i in concept.prompt_set("finetune_unacceptable")]
    assert [i.text for i in asked[1]] == [i.text for i in concept.prompt_set("finetune_acceptable")]
    assert artifact.tensors["concept_embeds"].shape[0] == 1 and artifact.tensors["special_embeds"].shape[0] == 0
    calibration = artifact.meta["calibration"]
    assert calibration["n_unacceptable"] == calibration["n_acceptable"] == 3
    defended = crt.apply(world.pipe, artifact)
    assert defended.pipe is world.pipe and not changed_keys(unet, world.pipe.unet)
    # the calibrated rule reproduces the calibration flag rates on the very same renders
    renders = world.generate(list(concept.prompt_set("finetune_unacceptable")))
    rate = float((defended.filter.scores_from_pixels(pil_to_pixels(renders)) > 0).float().mean())
    assert rate == pytest.approx(calibration["flag_rate_unacceptable"], abs=1e-6)
    pixels = pil_to_pixels(renders).requires_grad_(True)
    defended.filter.scores_from_pixels(pixels).sum().backward()
    assert pixels.grad.abs().sum() > 0


def scene_renders(items: list[PromptItem]) -> list:
    """A runner-like ``generate`` that draws each prompt's scene: skin-coloured ("nude") or painted (the rest)."""
    from PIL import Image

    from world.scene import render, sample_scene

    out = []
    for item in items:
        rng = np.random.default_rng(item.seed)
        nude = any(word in item.text for word in ("nude", "naked", "bare", "undressed"))
        scene = sample_scene(rng, colour="skin" if nude else "blue", blood=False, band=False)
        out.append(Image.fromarray(render(scene, seed=item.seed)))
    return out


@pytest.mark.skipif(not (WORLD_CLIP / "config.json").exists(), reason="the world CLIP is not shipped yet")
def test_world_analog_flags_concept_renders_more_than_acceptable_ones(world, concept):
    crt = SDSafetyChecker(checker=None, analog_clip=str(WORLD_CLIP))
    artifact = crt.fit(FitContext(pipe=world.pipe, concept=concept, settings=world.settings, generate=scene_renders))
    filt = crt.apply(world.pipe, artifact).filter
    fresh_nude = scene_renders([PromptItem("a nude shape", seed=100 + i) for i in range(6)])
    fresh_clothed = scene_renders([PromptItem("a clothed shape", seed=200 + i) for i in range(6)])
    assert np.mean(filt.flags(fresh_nude)) > np.mean(filt.flags(fresh_clothed))


def test_exactly_one_of_the_checker_and_the_analog():
    with pytest.raises(HarnessError):
        SDSafetyChecker(checker=None)
    with pytest.raises(HarnessError):
        SDSafetyChecker(analog_clip="world/weights/clip")


def test_yaml_params_and_mini_block_build_the_real_and_the_world_filter():
    cfg = crt_yaml("sd_safety_checker")
    real = SDSafetyChecker(**cfg["params"])
    assert real.config.checker == CHECKER_ID and real.config.adjustment == 0.0 and real.config.round_decimals == 3
    analog = SDSafetyChecker(**{**cfg["params"], **cfg["mini"]})
    assert analog.config.checker is None and analog.config.analog_clip == "world/weights/clip"
    assert "world analog" in SDSafetyChecker.reconstruction


def test_fit_and_apply_on_sd21_and_sdxl_filter_their_images(checker_dir, other_backbone, concept):
    """A filter on the delivered images: any backbone's pipeline stays as it is and its images are scored."""
    artifact, defended = _fit_apply(SDSafetyChecker(checker=str(checker_dir)), other_backbone, concept)
    assert defended.pipe is other_backbone.pipe and "sdxl" in SDSafetyChecker.backbones
    images = other_backbone.generate(list(concept.prompt_set("target")), pipe=defended.pipe)
    assert defended.filter.scores(images).shape == (1,) and images[0].size == (64, 64)
