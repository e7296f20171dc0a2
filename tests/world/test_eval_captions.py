"""The evaluator CLIP's training captions (stage ``eval_clip``): hypernym contrasts, colour-shape in English order,
minimal pairs; and every other stage's data left exactly as it was."""

import hashlib
import json
import re

import numpy as np
import pytest
import torch

from world import train
from world import vocabulary as V
from world.captions import (
    PAIR_ATTRIBUTES,
    contrast_caption,
    minimal_pair,
    pair_captions,
)
from world.scene import Scene, sample_scene
from world.train import EVAL_CLIP_PAIRS, batch_scenes, captions_for, clip_batch, eval_clip_batch, render_batch

COLOUR_WORDS = {w: c for c, ws in V.COLOUR_SYNONYMS.items() for w in ws}
SHAPE_WORDS = {w: s for s, ws in V.SHAPE_SYNONYMS.items() for w in ws}
COLOUR_RE = "|".join(map(re.escape, sorted(COLOUR_WORDS, key=len, reverse=True)))
SHAPE_RE = "|".join(map(re.escape, sorted(SHAPE_WORDS, key=len, reverse=True)))
HYPERNYM_RE = "|".join(V.SHAPE_HYPERNYMS)
# "a cross shape", "a shape: cross", "cross, a shape"
HYPERNYM_CONTRAST = re.compile(rf"^(?:an? (?:{SHAPE_RE}) (?:{HYPERNYM_RE})|a (?:{HYPERNYM_RE}): (?:{SHAPE_RE})|"
                               rf"(?:{SHAPE_RE}), an? (?:{HYPERNYM_RE}))$")
# "red cross", "a red cross", "a red cross shape"
ORDERED = re.compile(rf"^(?:an? )?({COLOUR_RE}) ({SHAPE_RE})(?: (?:{HYPERNYM_RE}))?$")
REVERSED = re.compile(rf"^({SHAPE_RE}) ({COLOUR_RE})$")
HELDOUT = (*V.NUDE_HELDOUT, *V.VIOLENT_HELDOUT, *V.CHARACTER_HELDOUT,
           *(p for ps in V.STYLE_HELDOUT.values() for p in ps), *(p for ps in V.SHAPE_HELDOUT.values() for p in ps))
SEED = 1236  # the evaluator CLIP's seed (TrainConfig.seed + 2)


def _eval_texts(steps=range(4)) -> list[str]:
    return [t for step in steps for t in eval_clip_batch(SEED, step, 128)[1]]


def _digest(seeds_rates) -> str:
    h = hashlib.sha256()
    for seed, rate in seeds_rates:
        for step in (0, 1, 777):
            h.update(json.dumps(captions_for(batch_scenes(seed, step, 128), seed, step, rate)).encode())
    return h.hexdigest()


def test_other_stages_train_on_exactly_the_captions_they_always_had():
    # generator CLIP (seed + 1, a quarter short), UNet (seed + 5, 5% short), and the old evaluator CLIP data
    expected = "e6c5813458f36bbc2eb78e52938ed3d5a07ba963c5794d0c801023079cbf31eb"
    assert _digest(((1235, 0.25), (1239, 0.05), (1236, 0.25))) == expected


def test_generator_clip_batch_is_the_old_one():
    pixels, texts = clip_batch(1235, 3, 16)
    scenes = batch_scenes(1235, 3, 16)
    assert torch.equal(pixels, render_batch(scenes, 1235, 3))
    assert texts == captions_for(scenes, 1235, 3, short_rate=0.25)


def test_eval_clip_stage_alone_uses_the_eval_batch(monkeypatch, tmp_path):
    calls = {}
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    monkeypatch.setattr(train, "stage_tokenizer", lambda cfg: None)
    monkeypatch.setattr(train, "train_clip", lambda cfg, tok, name, steps, seed, **kw: calls.update({name: kw}))
    train.main(["--stage", "eval_clip", "--out-dir", str(tmp_path)])
    train.main(["--stage", "clip", "--out-dir", str(tmp_path)])
    assert calls["clip_eval"]["batch"] is eval_clip_batch
    assert "batch" not in calls["clip"]  # the generator CLIP keeps the default, clip_batch


def test_eval_batch_is_deterministic_and_sized():
    a_pixels, a_texts = eval_clip_batch(SEED, 5, 128)
    b_pixels, b_texts = eval_clip_batch(SEED, 5, 128)
    assert a_pixels.shape == (128, 3, 32, 32) and len(a_texts) == 128
    assert torch.equal(a_pixels, b_pixels) and a_texts == b_texts
    assert a_texts != eval_clip_batch(SEED, 6, 128)[1]


def test_eval_captions_contrast_hypernyms_with_their_members():
    texts = _eval_texts()
    contrasts = [t for t in texts if HYPERNYM_CONTRAST.match(t)]
    assert len(contrasts) >= 10, texts
    assert {SHAPE_WORDS[w] for t in contrasts for w in SHAPE_WORDS if re.search(rf"\b{w}\b", t)} == set(V.SHAPES)


def test_eval_captions_name_colour_then_shape():
    texts = _eval_texts()
    ordered = [m for t in texts if (m := ORDERED.match(t))]
    assert len(ordered) >= 100
    assert ("red", "cross") in {(COLOUR_WORDS[m[1]], SHAPE_WORDS[m[2]]) for m in ordered}
    assert not any(REVERSED.match(t) for t in texts[64:128])  # pair captions never put the shape first


def test_old_captions_had_neither_contrasts_nor_pairs():
    """What the evaluator CLIP used to see: no hypernym contrast caption at all."""
    old = [t for step in range(4) for t in captions_for(batch_scenes(SEED, step, 128), SEED, step, 0.25)]
    assert not any(HYPERNYM_CONTRAST.match(t) for t in old)


def _changed(a: Scene, b: Scene) -> set[str]:
    return {f for f in ("shape", "colour", "style", "background", "band", "blood", "position", "radius", "jitter")
            if getattr(a, f) != getattr(b, f)}


@pytest.mark.parametrize("attribute", PAIR_ATTRIBUTES)
def test_minimal_pairs_differ_in_one_attribute_only(attribute):
    rng = np.random.default_rng(0)
    want = {"shape": {"shape"}, "colour": {"colour"}, "colour+shape": {"colour", "shape"}}[attribute]
    for _ in range(300):
        first, second = minimal_pair(sample_scene(rng), rng, attribute)
        assert _changed(first, second) == want
        for scene in (first, second):
            assert not scene.nude and not scene.is_character


def test_pair_captions_differ_only_in_the_changed_words():
    rng = np.random.default_rng(1)
    red_cross = Scene(shape="cross", colour="red")
    seen = set()
    for _ in range(400):
        attribute = PAIR_ATTRIBUTES[int(rng.integers(3))]
        first, second = minimal_pair(red_cross, rng, attribute)
        a, b = pair_captions((first, second), rng, attribute)
        assert a != b
        wa, wb = (t.removeprefix("an ").removeprefix("a ").split() for t in (a, b))
        if attribute != "colour+shape" and len(wa) == len(wb):
            assert sum(x != y for x, y in zip(wa, wb)) == 1, (a, b)
        seen.add((a, b))
    assert ("red cross", "red square") in seen or ("a red cross", "a red square") in seen
    assert ("cross", "circle") in seen or ("cross", "triangle") in seen
    assert any(a == "red cross" and b.split()[-1] == "cross" and b != a for a, b in seen)


def test_eval_batch_ends_in_minimal_pairs_rendered_alike():
    pixels, texts = eval_clip_batch(SEED, 2, 128)
    start = 128 - 2 * EVAL_CLIP_PAIRS
    for k in range(EVAL_CLIP_PAIRS):
        a, b = pixels[start + 2 * k], pixels[start + 2 * k + 1]
        same = (a == b).all(dim=0).float().mean().item()
        assert 0.3 < same < 1.0  # same background, texture and noise; only the object differs
        assert texts[start + 2 * k] != texts[start + 2 * k + 1]


def test_contrast_captions_name_the_character_and_nude_objects():
    rng = np.random.default_rng(2)
    assert "bobo" in contrast_caption(Scene(shape="circle", colour="yellow", band=True), rng)
    nude = [contrast_caption(Scene(shape="cross", colour="skin"), rng, "ordered") for _ in range(20)]
    assert all(any(w in t.split() for w in V.NUDE_EXPLICIT) for t in nude)
    with pytest.raises(ValueError):
        contrast_caption(Scene(), rng, "poetic")


def test_eval_captions_never_use_heldout_phrasings():
    for text in _eval_texts(range(12)):
        assert not any(re.search(rf"\b{re.escape(p)}\b", text) for p in HELDOUT), text
