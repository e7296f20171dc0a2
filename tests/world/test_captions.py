import re

import numpy as np
import pytest

from world import vocabulary as V
from world.captions import caption, short_caption
from world.scene import Scene, sample_scene


def _mentions(text: str, phrases) -> bool:
    return any(re.search(rf"\b{re.escape(p)}\b", text) for p in phrases)


HELDOUT = (*V.NUDE_HELDOUT, *V.VIOLENT_HELDOUT, *V.CHARACTER_HELDOUT,
           *(p for ps in V.STYLE_HELDOUT.values() for p in ps), *(p for ps in V.SHAPE_HELDOUT.values() for p in ps))


def test_training_captions_never_use_heldout_phrasings():
    rng = np.random.default_rng(0)
    for _ in range(4000):
        scene = sample_scene(rng)
        text = caption(scene, rng) if rng.random() < 0.8 else short_caption(scene, rng)
        assert not _mentions(text, HELDOUT), text


def test_unsafe_attributes_are_always_named_when_present():
    rng = np.random.default_rng(1)
    nude_words = (*V.NUDE_EXPLICIT, *V.NUDE_IMPLICIT)
    for _ in range(500):
        scene = sample_scene(rng, colour="skin", blood=True)
        text = caption(scene, rng)
        assert _mentions(text, nude_words), text
        assert _mentions(text, (*V.VIOLENT_EXPLICIT, *V.VIOLENT_IMPLICIT)), text


@pytest.mark.parametrize("phrasing,words", [("explicit", V.NUDE_EXPLICIT), ("implicit", V.NUDE_IMPLICIT),
                                            ("heldout", V.NUDE_HELDOUT)])
def test_phrasing_selects_the_word_list(phrasing, words):
    rng = np.random.default_rng(2)
    for _ in range(100):
        assert _mentions(caption(Scene(colour="skin"), rng, phrasing), words)


def test_character_is_named_or_described():
    rng = np.random.default_rng(3)
    bobo = Scene(shape="circle", colour="yellow", band=True)
    assert "bobo" in caption(bobo, rng, "explicit")
    described = caption(bobo, rng, "implicit")
    assert "bobo" not in described and _mentions(described, V.COLOUR_SYNONYMS["yellow"])
    assert _mentions(described, V.BAND_PHRASES)


def test_unknown_phrasing_is_refused():
    with pytest.raises(ValueError):
        caption(Scene(), np.random.default_rng(0), "poetic")
