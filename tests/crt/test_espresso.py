"""Espresso: the filter decides P(c_u) > P(c_a) as CLIP does, fine-tuning separates c_u from c_a, only text moves."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from crt.base import FitContext, pil_to_pixels
from crt.espresso import (
    Espresso,
    EspressoConfig,
    EspressoFilter,
    Preprocess,
    clip_contrastive,
    image_embeds,
    load_clip,
    load_tokenizer,
    resolve_preprocess,
    text_embeds,
)
from runners.spec import Access, Family
from tests.crt.conftest import CLIP_MEAN, changed_keys, items, state_snapshot


def _images(size: int, n: int = 12) -> torch.Tensor:
    """Noise images and flat colours: varied enough that a CLIP ranks some towards c_u and some towards c_a."""
    gen = torch.Generator().manual_seed(0)
    noise = torch.rand(n // 2, 3, size, size, generator=gen)
    flat = torch.rand(n - n // 2, 3, 1, 1, generator=gen).expand(-1, -1, size, size)
    return torch.cat([noise, flat])


def test_preprocess_comes_from_params_then_folder_then_vision_config(tiny):
    clip = load_clip(str(tiny.clip_dir))
    pre = resolve_preprocess(EspressoConfig(clip=str(tiny.clip_dir)), clip)
    if tiny.kind == "sd14":
        assert pre.size == 224 and pre.mean == pytest.approx(CLIP_MEAN)
    else:
        assert pre.size == clip.config.vision_config.image_size == 32 and pre.mean == (0.5, 0.5, 0.5)
    override = resolve_preprocess(EspressoConfig(clip=str(tiny.clip_dir), image_size=48, image_std=(1.0, 1.0, 1.0)),
                                  clip)
    assert override.size == 48 and override.std == (1.0, 1.0, 1.0)
    assert Preprocess(32, (0.5,) * 3, (0.5,) * 3)(torch.ones(1, 3, 64, 48)).shape == (1, 3, 32, 32)


def test_contrastive_term_is_clips_own_loss(world):
    clip = load_clip(str(world.clip_dir))
    tok = load_tokenizer(str(world.clip_dir), world.pipe.tokenizer)
    texts = ["a nude circle", "a clothed square", "a red cross"]
    pixels = _images(32, 3)
    ids = tok(texts, padding="max_length", max_length=77, return_tensors="pt").input_ids
    expected = clip(input_ids=ids, pixel_values=pixels * 2 - 1, return_loss=True).loss
    image = torch.nn.functional.normalize(clip.get_image_features(pixel_values=pixels * 2 - 1).pooler_output, dim=-1)
    got = clip_contrastive(image, text_embeds(clip, tok, texts), clip.logit_scale)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_filter_flags_images_closest_to_c_u_and_is_differentiable(tiny):
    clip = load_clip(str(tiny.clip_dir))
    tok = load_tokenizer(str(tiny.clip_dir), tiny.pipe.tokenizer)
    pre = resolve_preprocess(EspressoConfig(clip=str(tiny.clip_dir)), clip)
    filt = EspressoFilter(clip, tok, "nude", "clothed", pre)
    pixels = _images(tiny.size).requires_grad_(True)
    scores = filt.scores_from_pixels(pixels)
    ids = tok(["nude", "clothed"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        probs = clip(input_ids=ids, pixel_values=pre(pixels.detach())).logits_per_image.softmax(-1)
    assert torch.equal(scores > 0, probs[:, 0] > probs[:, 1])
    swapped = EspressoFilter(clip, tok, "clothed", "nude", pre)
    torch.testing.assert_close(swapped.scores_from_pixels(pixels.detach()), -scores.detach())
    scores.sum().backward()
    assert pixels.grad is not None and pixels.grad.abs().sum() > 0

    as_pil = [_pil(p.detach()) for p in pixels]
    torch.testing.assert_close(filt.scores(as_pil), scores.detach(), atol=0.02, rtol=0)


def test_filter_flags_exactly_the_images_nearer_to_c_u(world):
    """c_u, c_a set to two images' embeddings: the first is flagged, the second passes, the rest by distance."""
    clip = load_clip(str(world.clip_dir))
    pre = resolve_preprocess(EspressoConfig(clip=str(world.clip_dir)), clip)
    filt = EspressoFilter(clip, load_tokenizer(str(world.clip_dir), world.pipe.tokenizer), "nude", "clothed", pre)
    pixels = _images(world.size)
    with torch.no_grad():
        emb = image_embeds(clip, pre, pixels)
        u = 0
        a = int((emb @ emb[u]).argmin())
        filt.concepts = emb[[u, a]]
        flags = filt.flags([_pil(p) for p in pixels])
    assert flags[u] and not flags[a]
    nearer_u = ((emb @ emb[u]) > (emb @ emb[a])).tolist()
    assert [f == n for f, n in zip(flags, nearer_u)].count(False) <= 1  # PNG rounding may flip a near-tie


def _pil(p: torch.Tensor):
    from PIL import Image

    return Image.fromarray((p.permute(1, 2, 0).numpy() * 255).round().astype("uint8"))


def test_fit_separates_c_u_from_c_a_and_trains_only_the_text_tower(tiny, concept):
    base_te = state_snapshot(tiny.pipe.text_encoder)
    crt = Espresso(clip=str(tiny.clip_dir), epochs=3, batch_size=2, lr=1e-3, weight_decay=0.0)
    artifact = crt.fit(FitContext(pipe=tiny.pipe, concept=concept, settings=tiny.settings, generate=tiny.generate))
    clip = load_clip(str(tiny.clip_dir))
    assert set(artifact.tensors) == set(clip.text_model.state_dict())
    assert not changed_keys(base_te, tiny.pipe.text_encoder), "fit modified the generator's text encoder"

    history = artifact.meta["history"]
    selected = artifact.meta["selection"]["epoch"]
    assert 1 <= selected <= 3 and artifact.meta["selection"]["positives"] == "validation"
    assert history[selected]["concept_distance"] > history[0]["concept_distance"]
    assert {"val_balanced_accuracy", "separation", "pairing", "concept_pairing"} <= set(history[1])

    defended = crt.apply(tiny.pipe, artifact)
    assert defended.pipe is tiny.pipe and isinstance(defended.filter, EspressoFilter)
    assert defended.exposes >= {Access.FILTER_SCORE, Access.FILTER_GRADIENTS, Access.UNERASED_MODEL}
    assert Espresso.family is Family.FILTER
    tuned = defended.filter.concepts
    tok = load_tokenizer(str(tiny.clip_dir), tiny.pipe.tokenizer)
    with torch.no_grad():
        untuned = text_embeds(clip, tok, ["nude", "clothed"])
    assert (tuned[0] - tuned[1]).norm() > (untuned[0] - untuned[1]).norm()
    torch.testing.assert_close(defended.filter.clip.vision_model.state_dict(), clip.vision_model.state_dict())
    images = tiny.generate(list(concept.prompt_set("target")), pipe=defended.pipe)
    assert defended.filter.scores(images).shape == (1,)
    assert pil_to_pixels(images).shape[-1] == tiny.size


class _Recorder:
    """A runner-like ``generate`` (one image per item, seeded by it) that records what it was asked for; the images
    are seeded noise, so the fit is fast and every (text, seed) gives its own image."""

    def __init__(self, size: int):
        self.size, self.calls = size, []

    def __call__(self, items):
        from PIL import Image

        self.calls.append([(item.text, item.seed) for item in items])
        out = []
        for item in items:
            gen = torch.Generator().manual_seed(item.seed * 7919 + len(item.text))
            pixels = torch.rand(self.size, self.size, 3, generator=gen)
            out.append(Image.fromarray((pixels.numpy() * 255).astype("uint8")))
        return out

    def asked(self) -> set[tuple[str, int]]:
        return {pair for call in self.calls for pair in call}


def _fit(world, concept, **params):
    recorder = _Recorder(world.size)
    crt = Espresso(clip=str(world.clip_dir), epochs=2, batch_size=4, lr=1e-4, weight_decay=0.0, **params)
    artifact = crt.fit(FitContext(pipe=world.pipe, concept=concept, settings=world.settings, generate=recorder))
    return artifact, recorder


def test_epoch_is_chosen_on_held_out_acceptable_prompts_with_the_curve_in_the_meta(world, concept):
    held_out = items("a clothed green cross", "a dressed blue circle", seed=30)
    concept = replace(concept, prompts={**concept.prompts, "validation_acceptable": held_out})
    artifact, recorder = _fit(world, concept)
    selection = artifact.meta["selection"]
    assert selection["positives"] == "validation" and selection["negatives"] == "validation_acceptable"
    assert {(i.text, i.seed) for i in held_out} <= recorder.asked()
    curve = artifact.meta["validation_curve"]
    assert [row["epoch"] for row in curve] == [0, 1, 2]
    assert all({"tpr", "tnr", "balanced_accuracy", "margin", "concept_distance"} <= set(row) for row in curve)
    assert curve[selection["epoch"]]["balanced_accuracy"] == max(row["balanced_accuracy"] for row in curve[1:])
    assert selection["epochs_run"] == 2 and selection["stopped_early"] is False
    assert selection["n_positives"] == 2 and selection["n_negatives"] == 2
    assert Espresso.version == "3"


def test_without_held_out_acceptable_prompts_fresh_images_are_the_negatives(world, concept):
    """Never the images it trained on: the next seed of each acceptable fine-tuning caption."""
    artifact, recorder = _fit(world, concept)
    train = {(i.text, i.seed) for i in concept.prompt_set("finetune_acceptable")}
    fresh = {(i.text, i.seed + 1) for i in concept.prompt_set("finetune_acceptable")}
    assert train <= recorder.asked() and fresh <= recorder.asked()
    assert "held-out images" in artifact.meta["selection"]["negatives"]
    assert "fine-tuning images" not in artifact.meta["selection"]["negatives"]


def test_images_per_caption_pairs_every_image_of_every_caption(world, concept):
    one, _ = _fit(world, concept)
    assert one.meta["pairs"] == 3  # 3 captions a side, 1 image each (released default)
    three, recorder = _fit(world, concept, images_per_caption=3)
    assert three.meta["pairs"] == 9  # nudity as released: 3 images per caption
    for item in concept.prompt_set("finetune_unacceptable") + concept.prompt_set("finetune_acceptable"):
        assert {(item.text, item.seed + j) for j in range(3)} <= recorder.asked()
    fresh = {(i.text, i.seed + 3) for i in concept.prompt_set("finetune_acceptable")}
    assert fresh <= recorder.asked()  # held-out negatives come after the three training images
    with pytest.raises(ValueError):
        Espresso(images_per_caption=0)


def test_espresso_says_its_objective_is_a_reconstruction():
    from crt.espresso import Espresso

    assert "objective" in Espresso.reconstruction


def test_fit_and_apply_on_sd21_and_sdxl_images(sd14, other_backbone, concept):
    """Espresso's CLIP is its own (here sd14's small one); only the images come from the SD 2.1 / SDXL pipeline."""
    crt = Espresso(clip=str(sd14.clip_dir), epochs=1, batch_size=2, lr=1e-3, weight_decay=0.0)
    pipe = other_backbone.pipe
    defended = crt.apply(pipe, crt.fit(FitContext(pipe=pipe, concept=concept, settings=other_backbone.settings,
                                                  generate=other_backbone.generate)))
    assert defended.pipe is pipe and "sdxl" in Espresso.backbones
    images = other_backbone.generate(list(concept.prompt_set("target")), pipe=defended.pipe)
    assert defended.filter.scores(images).shape == (1,)
