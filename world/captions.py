"""Captions for scenes, written from templates with synonyms, paraphrases, colours and positions.

``phrasing`` selects how the unsafe attributes, the character and the styles are named:
``train`` mixes explicit words and indirect phrasings (what the models learn from), ``explicit`` and
``implicit`` force one kind, and ``heldout`` uses phrasings that no training caption contains.
"""

from __future__ import annotations

import numpy as np

from world import vocabulary as V
from world.scene import Scene

PHRASINGS = ("train", "explicit", "implicit", "heldout")


def _pick(rng: np.random.Generator, options: tuple[str, ...] | list[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _unsafe_words(rng, phrasing, explicit, implicit, heldout) -> str:
    if phrasing == "heldout":
        return _pick(rng, heldout)
    if phrasing == "explicit" or (phrasing == "train" and rng.random() < 0.5):
        return _pick(rng, explicit)
    return _pick(rng, implicit)


def _article(words: list[str]) -> list[str]:
    if words and words[0] == "a" and len(words) > 1 and words[1][0] in "aeiou":
        return ["an", *words[1:]]
    return words


def subject_phrase(scene: Scene, rng: np.random.Generator, phrasing: str = "train") -> str:
    """The noun phrase for the object, with its modifiers in the order English puts them."""
    before: list[str] = []
    after: list[str] = []

    def place(phrase: str) -> None:
        (after if " " in phrase else before).append(phrase)

    if scene.nude:
        place(_unsafe_words(rng, phrasing, V.NUDE_EXPLICIT, V.NUDE_IMPLICIT, V.NUDE_HELDOUT))
    elif rng.random() < 0.12:
        before.append(_pick(rng, V.CLOTHED))
    if scene.blood:
        place(_unsafe_words(rng, phrasing, V.VIOLENT_EXPLICIT, V.VIOLENT_IMPLICIT, V.VIOLENT_HELDOUT))
    elif rng.random() < 0.1:
        before.append(_pick(rng, V.PEACEFUL))

    by_name = scene.is_character and (phrasing == "explicit" or (phrasing == "train" and rng.random() < 0.6)
                                      or phrasing == "heldout")
    if by_name:
        names = V.CHARACTER_HELDOUT if phrasing == "heldout" else V.CHARACTER_NAMES
        noun = _pick(rng, names)
        if noun.startswith("the "):
            return " ".join([*before, noun, *after]) if not before else " ".join(["the", *before, noun[4:], *after])
    else:
        if not scene.nude and (scene.is_character or rng.random() < 0.85):
            before.append(_pick(rng, V.COLOUR_SYNONYMS[scene.colour]))
        if phrasing == "heldout" and not scene.is_character and rng.random() < 0.5:
            noun = _pick(rng, V.SHAPE_HELDOUT[scene.shape])
        elif rng.random() < 0.06 and not scene.band:
            noun = _pick(rng, V.SHAPE_HYPERNYMS)
        else:
            noun = _pick(rng, V.SHAPE_SYNONYMS[scene.shape])
        if scene.band:
            after.insert(0, _pick(rng, V.BAND_PHRASES))
    count = _pick(rng, V.COUNT_WORDS)
    return " ".join(_article([*count.split(), *before, noun, *after]))


def setting_phrase(scene: Scene, rng: np.random.Generator, phrasing: str = "train") -> tuple[str, str]:
    """(position phrase, background or style phrase); either may be empty."""
    position = ""
    if scene.position != "center" and rng.random() < 0.85:
        position = _pick(rng, V.POSITION_PHRASES[scene.position])
    elif scene.position == "center" and rng.random() < 0.15:
        position = _pick(rng, V.POSITION_PHRASES["center"])
    if scene.style == "plain":
        setting = f"on a {scene.background} background" if rng.random() < 0.5 else ""
        if setting and rng.random() < 0.3:
            setting = f"on {scene.background}"
        return position, setting
    if phrasing == "heldout":
        return position, _pick(rng, V.STYLE_HELDOUT[scene.style])
    phrases = V.STYLE_PHRASES[scene.style]
    if phrasing == "explicit":
        phrases = tuple(p for p in phrases if scene.style in p)
    elif phrasing == "implicit":
        phrases = tuple(p for p in phrases if scene.style not in p) or phrases
    return position, (_pick(rng, phrases) if (phrasing != "train" or rng.random() < 0.9) else "")


def caption(scene: Scene, rng: np.random.Generator, phrasing: str = "train") -> str:
    """One caption of ``scene``; different ``rng`` draws give different paraphrases of the same scene."""
    if phrasing not in PHRASINGS:
        raise ValueError(f"phrasing must be one of {PHRASINGS}, got {phrasing!r}")
    subject = subject_phrase(scene, rng, phrasing)
    position, setting = setting_phrase(scene, rng, phrasing)
    if phrasing == "train" and rng.random() < 0.15:
        return " ".join(p for p in (_pick(rng, V.STYLE_HYPERNYMS), subject, position, setting) if p)
    body = " ".join(p for p in (subject, position, setting) if p)
    return _pick(rng, V.FRAMES).format(s=body)


def short_caption(scene: Scene, rng: np.random.Generator) -> str:
    """One or two bare attribute words, like alt-text; teaches CLIP the single concept strings (c_u, c_a)."""
    words = [_pick(rng, V.SHAPE_SYNONYMS[scene.shape]), _pick(rng, V.SHAPE_HYPERNYMS)]
    words.append(_pick(rng, V.NUDE_EXPLICIT + V.NUDE_IMPLICIT[:3]) if scene.nude
                 else _pick(rng, (*V.COLOUR_SYNONYMS[scene.colour], *V.CLOTHED)))
    words.append(_pick(rng, V.VIOLENT_EXPLICIT + V.VIOLENT_IMPLICIT[:3]) if scene.blood else _pick(rng, V.PEACEFUL))
    words.append(scene.style if scene.style != "plain" else _pick(rng, ("plain", "painting", scene.background)))
    if scene.style != "plain":
        words.append("painting")
    if scene.is_character:
        words.extend([V.CHARACTER, V.CHARACTER])
    first = words[int(rng.integers(len(words)))]
    if rng.random() < 0.5:
        return first
    second = words[int(rng.integers(len(words)))]
    return first if second == first else f"{first} {second}"
