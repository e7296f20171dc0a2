"""Captions for scenes, written from templates with synonyms, paraphrases, colours and positions.

``phrasing`` selects how the unsafe attributes, the character and the styles are named:
``train`` mixes explicit words and indirect phrasings (what the models learn from), ``explicit`` and
``implicit`` force one kind, and ``heldout`` uses phrasings that no training caption contains.
"""

from __future__ import annotations

from dataclasses import replace

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


# ---------------------------------------------------------------- evaluator CLIP captions
# Only the evaluator CLIP's training (``world.train``, stage ``eval_clip``) uses what follows; every caption above
# draws exactly what it drew before, so the generator CLIP, the UNet and the judges train on unchanged data.

CONTRAST_FORMS = ("ordered", "hypernym", "member")


NAME_RATE = 0.75  # how often a contrast caption names an attribute by its own name rather than a synonym


def _name(rng: np.random.Generator, value: str, synonyms: tuple[str, ...]) -> str:
    """The attribute's own name most of the time (the word a prompt uses), else one of its synonyms."""
    return value if rng.random() < NAME_RATE else _pick(rng, synonyms)


def shape_word(scene: Scene, rng: np.random.Generator) -> str:
    return _name(rng, scene.shape, V.SHAPE_SYNONYMS[scene.shape])


def colour_word(scene: Scene, rng: np.random.Generator) -> str:
    """The object's colour, or how a nude one is named (it has no paint colour)."""
    if scene.nude:
        return _pick(rng, V.NUDE_EXPLICIT)
    return _name(rng, scene.colour, V.COLOUR_SYNONYMS[scene.colour])


def ordered_caption(scene: Scene, rng: np.random.Generator) -> str:
    """Colour then shape, in English order: ``red cross``, ``a red cross``, ``a red cross shape``."""
    colour, shape = colour_word(scene, rng), shape_word(scene, rng)
    r = rng.random()
    if r < 0.4:
        return f"{colour} {shape}"
    if r < 0.75:
        return " ".join(_article(["a", colour, shape]))
    return " ".join(_article(["a", colour, shape, _pick(rng, V.SHAPE_HYPERNYMS)]))


def hypernym_caption(scene: Scene, rng: np.random.Generator) -> str:
    """A member named beside its hypernym, so the hypernym cannot stand for the member: ``a cross shape``,
    ``a shape: cross``, ``cross, a shape``."""
    shape, hypernym = shape_word(scene, rng), _pick(rng, V.SHAPE_HYPERNYMS)
    r = rng.random()
    if r < 0.4:
        return " ".join(_article(["a", shape, hypernym]))
    if r < 0.7:
        return f"a {hypernym}: {shape}"
    return " ".join([shape + ",", *_article(["a", hypernym])])


def contrast_caption(scene: Scene, rng: np.random.Generator, form: str | None = None) -> str:
    """A short caption that names the object's members (``ordered``: colour then shape; ``hypernym``: the shape
    beside ``shape``/``object``/``thing``; ``member``: the bare shape or colour word); the character by name."""
    if form is None:
        form = _pick(rng, CONTRAST_FORMS)
    if form not in CONTRAST_FORMS:
        raise ValueError(f"form must be one of {CONTRAST_FORMS}, got {form!r}")
    if scene.is_character:
        return V.CHARACTER if rng.random() < 0.6 else f"{V.CHARACTER}, a yellow circle with a black band"
    if form == "ordered":
        return ordered_caption(scene, rng)
    if form == "hypernym":
        return hypernym_caption(scene, rng)
    return shape_word(scene, rng) if rng.random() < 0.6 else colour_word(scene, rng)


PAIR_ATTRIBUTES = ("shape", "colour", "colour+shape")


def minimal_pair(scene: Scene, rng: np.random.Generator, attribute: str) -> tuple[Scene, Scene]:
    """Two scenes identical except ``attribute`` (shape, colour, or both), neither nude nor the character, so
    each is captioned by its member words alone (``red cross`` vs ``red square``/``green cross``/``green
    square``)."""
    if attribute not in PAIR_ATTRIBUTES:
        raise ValueError(f"attribute must be one of {PAIR_ATTRIBUTES}, got {attribute!r}")
    colours = list(V.COLOURS)
    if scene.nude:
        scene = replace(scene, colour=_pick(rng, colours))
    other = scene
    if "shape" in attribute:
        other = replace(other, shape=_pick(rng, [s for s in V.SHAPES if s != scene.shape]))
    if "colour" in attribute:
        other = replace(other, colour=_pick(rng, [c for c in colours if c != scene.colour]))
    if scene.is_character or other.is_character:  # a yellow banded circle is bobo: both lose the band
        scene, other = replace(scene, band=False), replace(other, band=False)
    return scene, other


PAIR_FORMS = ("ordered", "member")


def pair_captions(pair: tuple[Scene, Scene], rng: np.random.Generator, attribute: str,
                  form: str | None = None) -> tuple[str, str]:
    """Captions of a minimal pair in one shared form that differ only where the scenes differ, so the loss must
    use those words. ``ordered``: colour then shape for both (``a red cross`` / ``a red square``, ``red cross`` /
    ``green cross``); ``member``: the bare changed word (``cross`` / ``square``, ``red`` / ``green``; a pair that
    differs in both is captioned ``ordered``)."""
    first, second = pair
    if form is None:
        form = PAIR_FORMS[int(rng.integers(len(PAIR_FORMS)))]
    if form not in PAIR_FORMS:
        raise ValueError(f"form must be one of {PAIR_FORMS}, got {form!r}")
    describe = ordered_caption
    if form == "member" and attribute != "colour+shape":
        describe = shape_word if attribute == "shape" else colour_word
    state = rng.bit_generator.state
    a = describe(first, rng)
    rng.bit_generator.state = state  # the same draws (name or synonym, article, hypernym) for both
    return a, describe(second, rng)
