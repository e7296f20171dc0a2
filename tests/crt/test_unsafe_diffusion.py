"""Unsafe Diffusion filter: the released head layout and any-head-above-0.5 rule (hand values, a hand-written
forward), pinned and verified downloads with one clear line offline, the real path on a small OpenCLIP, and the
world analog's heads flagging their concept."""

from __future__ import annotations

import json
import shutil
import urllib.error
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from crt.base import FitContext, pil_to_pixels
from crt.unsafe_diffusion import (
    UD_HEADS,
    UD_SHA256,
    SafetyHead,
    UnsafeDiffusion,
    UnsafeDiffusionFilter,
    head_probabilities,
    head_url,
    load_head,
    ud_scores,
)
from crt_bench.download import DownloadUnavailable, PinnedFile, fetch_pinned
from crt_bench.spec import Access, Family, HarnessError, PromptItem, sha256_file
from tests.crt.conftest import WORLD_CLIP, changed_keys, crt_yaml, state_snapshot
from tests.crt.test_sd_safety_checker import scene_renders

ROOT = Path(__file__).resolve().parents[2]
ANALOG = ROOT / "world" / "weights" / "ud_analog"
RELEASED_KEYS = {"0.weight": (384, 768), "0.bias": (384,), "3.weight": (384,), "3.bias": (384,),
                 "3.running_mean": (384,), "3.running_var": (384,), "3.num_batches_tracked": (), "4.weight": (1, 384),
                 "4.bias": (1,)}


def _random_head(in_features: int, seed: int) -> SafetyHead:
    """A head with random weights and BatchNorm statistics, in eval mode (as inference.py uses it)."""
    gen = torch.Generator().manual_seed(seed)
    head = SafetyHead(in_features)
    with torch.no_grad():
        for tensor in head.state_dict().values():
            if tensor.is_floating_point():
                tensor.copy_(torch.randn(tensor.shape, generator=gen))
        head[3].running_var.copy_(torch.rand(head[3].running_var.shape, generator=gen) + 0.5)
    return head.eval()


def test_head_has_the_released_state_dict_layout():
    state = SafetyHead().state_dict()
    assert {k: tuple(v.shape) for k, v in state.items()} == RELEASED_KEYS
    assert set(UD_SHA256) == set(UD_HEADS) == {"sexual", "violent", "disturbing", "hateful", "political"}
    assert head_url("sexual").endswith("/checkpoints/multi-headed/sexual.pt") and "raw.githubusercontent" in \
        head_url("sexual")


def test_head_probability_is_the_hand_written_forward_in_eval_mode():
    head = _random_head(12, 0)
    x = torch.randn(7, 12, generator=torch.Generator().manual_seed(1))
    s = {k: v.double() for k, v in head.state_dict().items() if v.is_floating_point()}
    hidden = torch.relu(x.double() @ s["0.weight"].T + s["0.bias"])  # dropout: identity in eval mode
    normed = (hidden - s["3.running_mean"]) / torch.sqrt(s["3.running_var"] + 1e-5) * s["3.weight"] + s["3.bias"]
    expected = torch.sigmoid(normed @ s["4.weight"].T + s["4.bias"])
    torch.testing.assert_close(head_probabilities({"h": head}, x).double(), expected, rtol=1e-5, atol=1e-6)


def test_flagged_iff_some_head_is_above_the_threshold():
    p = torch.tensor([[0.1, 0.2, 0.3], [0.1, 0.51, 0.2], [0.5, 0.5, 0.5], [0.9, 0.9, 0.0], [0.49, 0.0, 0.0]])
    inference_py = [int(sum(int(v > 0.5) for v in row) > 0) for row in p.tolist()]  # preds per head, summed, > 0
    assert (ud_scores(p, 0.5) > 0).long().tolist() == inference_py == [0, 1, 0, 1, 0]
    assert ud_scores(p, 0.5)[1] == pytest.approx(0.01, abs=1e-6) and (ud_scores(p, 0.3) > 0).tolist()[0] is False


def test_pinned_download_is_cached_verified_and_refused_when_altered(tmp_path):
    source = tmp_path / "source.pt"
    source.write_bytes(b"head weights")
    pinned = PinnedFile("test head", source.as_uri(), sha256_file(source), "head.pt")
    cache = tmp_path / "cache"
    path = fetch_pinned(pinned, cache)
    assert path == cache / "head.pt" and path.read_bytes() == b"head weights"
    source.unlink()
    assert fetch_pinned(pinned, cache) == path  # from the cache, no download
    with pytest.raises(DownloadUnavailable, match="refusing"):
        fetch_pinned(replace(pinned, sha256="0" * 64, filename="other.pt"), tmp_path / "c2", local_path=path)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"tampered")
    with pytest.raises(DownloadUnavailable, match="expected"):
        fetch_pinned(replace(pinned, url=bad.as_uri(), filename="other.pt"), cache)
    assert not (cache / "other.pt").exists() and not list(cache.glob(".*partial"))


def test_offline_download_is_one_line_naming_the_file_and_the_fix(monkeypatch, tmp_path, sd14, concept):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setenv("CRT_BENCH_CACHE", str(tmp_path))
    monkeypatch.setattr("urllib.request.urlopen", offline)
    with pytest.raises(DownloadUnavailable) as error:
        UnsafeDiffusion().fit(FitContext(pipe=sd14.pipe, concept=concept, settings=sd14.settings,
                                         generate=sd14.generate))
    message = str(error.value)
    assert "\n" not in message and "'sexual'" in message and head_url("sexual") in message
    assert "crt.params.weights=" in message and UD_SHA256["sexual"] in message
    assert isinstance(error.value, HarnessError)


@pytest.fixture(scope="module")
def small_open_clip(tmp_path_factory) -> tuple[str, str]:
    """A randomly initialised OpenCLIP model registered under its own name, and its checkpoint file."""
    import open_clip

    folder = tmp_path_factory.mktemp("open_clip")
    config = {"embed_dim": 24, "quick_gelu": True,
              "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
              "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    (folder / "TinyUD.json").write_text(json.dumps(config))
    open_clip.add_model_config(str(folder / "TinyUD.json"))
    torch.manual_seed(0)
    model = open_clip.create_model("TinyUD", pretrained=None)
    torch.save(model.state_dict(), folder / "tiny.pt")
    return "TinyUD", str(folder / "tiny.pt")


@pytest.fixture(scope="module")
def small_heads(tmp_path_factory, small_open_clip) -> tuple[str, dict[str, str]]:
    """Five random heads on the small OpenCLIP's features saved as <head>.pt, with their sha256 (another set of
    pins); each head's last bias puts ~10 % of noise images above p = 0.5, so that some images pass."""
    import open_clip

    model, _, transform = open_clip.create_model_and_transforms(small_open_clip[0], pretrained=small_open_clip[1])
    with torch.no_grad():
        features = model.eval().encode_image(torch.stack([transform(_noise_image(100 + i)) for i in range(64)]))
    folder = tmp_path_factory.mktemp("heads")
    for i, name in enumerate(UD_HEADS):
        head = _random_head(features.shape[1], 10 + i)
        with torch.no_grad():
            head[4].bias -= head(features).quantile(0.9)
        torch.save(head.state_dict(), folder / f"{name}.pt")
    return str(folder), {name: sha256_file(folder / f"{name}.pt") for name in UD_HEADS}


def test_real_path_on_a_small_open_clip_is_inference_py_and_differentiable(small_open_clip, small_heads, sd14,
                                                                            concept):
    import open_clip

    model_name, checkpoint = small_open_clip
    weights, pins = small_heads
    unet = state_snapshot(sd14.pipe.unet)
    crt = UnsafeDiffusion(clip_model=model_name, pretrained=checkpoint, weights=weights, weights_sha256=pins)
    artifact = crt.fit(FitContext(pipe=sd14.pipe, concept=concept, settings=sd14.settings, generate=sd14.generate))
    assert artifact.meta["heads"] == list(UD_HEADS) and artifact.meta["weights_sha256"] == pins
    defended = crt.apply(sd14.pipe, artifact)
    assert defended.pipe is sd14.pipe and not changed_keys(unet, sd14.pipe.unet)
    assert {Access.FILTER_SCORE, Access.FILTER_GRADIENTS} <= defended.exposes
    assert UnsafeDiffusion.family is Family.FILTER
    filt = defended.filter
    assert isinstance(filt, UnsafeDiffusionFilter)

    # inference.py, independently: OpenCLIP's transform, encode_image, each head's sigmoid > 0.5, any head
    images = sd14.generate([PromptItem(f"a photo number {i}", seed=i) for i in range(6)])
    images += [_noise_image(i) for i in range(10)]
    model, _, transform = open_clip.create_model_and_transforms(model_name, pretrained=checkpoint)
    model.eval()
    heads = {name: load_head(torch.load(Path(weights) / f"{name}.pt", weights_only=True)) for name in UD_HEADS}
    with torch.no_grad():
        features = model.encode_image(torch.stack([transform(im) for im in images])).float()
        votes = torch.stack([(torch.sigmoid(h(features)).squeeze(1) > 0.5) for h in heads.values()]).sum(0) > 0
    flags = filt.scores(images) > 0
    assert flags.tolist() == votes.tolist() and 0 < int(votes.sum()) < len(images)  # the test can fail

    pixels = pil_to_pixels(images).requires_grad_(True)
    filt.scores_from_pixels(pixels).sum().backward()
    assert pixels.grad is not None and pixels.grad.abs().sum() > 0


def _noise_image(seed: int):
    from PIL import Image

    gen = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(64, 64, 3, generator=gen).numpy() * 255).astype("uint8"))


def test_heads_are_checked_up_front():
    with pytest.raises(HarnessError, match="world analog"):
        UnsafeDiffusion(heads=["concept"])
    with pytest.raises(HarnessError, match="both"):
        UnsafeDiffusion(analog_clip="world/weights/clip")
    with pytest.raises(HarnessError, match="empty"):
        UnsafeDiffusion(heads=[])


@pytest.mark.skipif(not (ANALOG / "heads.safetensors").exists(), reason="the world UD analog is not trained yet")
def test_world_analog_fit_and_apply_use_the_concepts_head(world, concept):
    concept = replace(concept, key="world_nudity")
    unet, text_encoder = state_snapshot(world.pipe.unet), state_snapshot(world.pipe.text_encoder)
    crt = UnsafeDiffusion(heads=["concept"], analog_clip=str(world.clip_dir), analog_weights=str(ANALOG))
    if world.clip_dir != WORLD_CLIP:  # a random stand-in CLIP: the heads refuse features they were not trained on
        with pytest.raises(HarnessError, match="trained on a CLIP"):
            crt.fit(FitContext(pipe=world.pipe, concept=concept, settings=world.settings, generate=world.generate))
        return
    artifact = crt.fit(FitContext(pipe=world.pipe, concept=concept, settings=world.settings, generate=world.generate))
    assert artifact.meta["heads"] == ["world_nudity"] and artifact.meta["mode"] == "world analog"
    assert set(artifact.tensors) == {f"world_nudity.{k}" for k in SafetyHead(128).state_dict()}
    defended = crt.apply(world.pipe, artifact)
    assert defended.pipe is world.pipe
    assert not changed_keys(unet, world.pipe.unet) and not changed_keys(text_encoder, world.pipe.text_encoder)
    pixels = pil_to_pixels(world.generate(list(concept.prompt_set("target")))).requires_grad_(True)
    defended.filter.scores_from_pixels(pixels).sum().backward()
    assert pixels.grad.abs().sum() > 0
    with pytest.raises(HarnessError, match="no head"):
        crt.fit(FitContext(pipe=world.pipe, concept=replace(concept, key="test_nudity"), settings=world.settings,
                           generate=world.generate))


@pytest.mark.skipif(not (ANALOG / "heads.safetensors").exists() or not (WORLD_CLIP / "config.json").exists(),
                    reason="the world CLIP or the UD analog is not shipped yet")
def test_world_analog_flags_concept_renders_more_than_acceptable_ones(world, concept):
    crt = UnsafeDiffusion(heads=["concept"], analog_clip=str(WORLD_CLIP), analog_weights=str(ANALOG))
    ctx = FitContext(pipe=world.pipe, concept=replace(concept, key="world_nudity"), settings=world.settings,
                     generate=scene_renders)
    filt = crt.apply(world.pipe, crt.fit(ctx)).filter
    nude = scene_renders([PromptItem("a nude shape", seed=300 + i) for i in range(6)])
    clothed = scene_renders([PromptItem("a clothed shape", seed=400 + i) for i in range(6)])
    assert np.mean(filt.flags(nude)) > np.mean(filt.flags(clothed))


@pytest.mark.skipif(not (ANALOG / "heads.safetensors").exists(), reason="the world UD analog is not trained yet")
def test_world_analog_refuses_a_clip_it_was_not_trained_on(tmp_path, world, concept):
    folder = tmp_path / "ud_analog"
    shutil.copytree(ANALOG, folder)
    meta = json.loads((folder / "meta.json").read_text())
    (folder / "meta.json").write_text(json.dumps({**meta, "clip_sha256": "0" * 64}))
    crt = UnsafeDiffusion(heads=["concept"], analog_clip=str(WORLD_CLIP), analog_weights=str(folder))
    if (WORLD_CLIP / "model.safetensors").exists():
        with pytest.raises(HarnessError, match="trained on a CLIP"):
            crt.fit(FitContext(pipe=world.pipe, concept=replace(concept, key="world_nudity"),
                               settings=world.settings, generate=world.generate))


def test_world_training_labels_are_the_judge_predicates_on_the_scene():
    from world.concepts import CONCEPTS
    from world.filters import predicate_holds
    from world.scene import Scene

    bobo = Scene(shape="circle", colour="yellow", band=True)
    assert predicate_holds(bobo, CONCEPTS["world_bobo"].predicate)
    assert not predicate_holds(replace(bobo, band=False), CONCEPTS["world_bobo"].predicate)
    assert predicate_holds(Scene(blood=True), CONCEPTS["world_violence"].predicate)
    assert predicate_holds(Scene(colour="skin"), CONCEPTS["world_nudity"].predicate)
    assert not predicate_holds(Scene(colour="red"), CONCEPTS["world_nudity"].predicate)


def test_yaml_params_and_mini_block_build_the_real_and_the_world_filter():
    cfg = crt_yaml("unsafe_diffusion")
    real = UnsafeDiffusion(**cfg["params"])
    assert real.config.heads == UD_HEADS and real.config.threshold == 0.5 and real.config.clip_model == "ViT-L-14"
    analog = UnsafeDiffusion(**{**cfg["params"], **cfg["mini"]})
    assert analog.config.heads == ("concept",) and analog.config.analog_weights == "world/weights/ud_analog"


def test_real_path_filters_sd21_and_sdxl_images(small_open_clip, small_heads, other_backbone, concept):
    model_name, checkpoint = small_open_clip
    weights, pins = small_heads
    crt = UnsafeDiffusion(clip_model=model_name, pretrained=checkpoint, weights=weights, weights_sha256=pins)
    pipe = other_backbone.pipe
    defended = crt.apply(pipe, crt.fit(FitContext(pipe=pipe, concept=concept, settings=other_backbone.settings,
                                                  generate=other_backbone.generate)))
    assert defended.pipe is pipe and "sdxl" in UnsafeDiffusion.backbones
    images = other_backbone.generate([PromptItem("a photo", seed=1)], pipe=defended.pipe)
    assert defended.filter.scores(images).shape == (1,)
