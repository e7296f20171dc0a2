"""MACE's data: the augmented prompts of every erased concept, the images its LoRA is trained on and their masks.

The official code (Shilin-LU/MACE ``src/cfr_utils.py`` ``prompt_augmentation``, ``src/dataset.py``) puts the concept
word into 31 templates per concept type, keeps ``aug_length`` of the first ``prompt_len`` (30 of 30: all but the
last) and builds the mapped prompt from the same template with the anchor; the same prompts feed the closed-form
refinement (stage 1), the LoRA training (stage 2, a random one per step) and the fusion (stage 3). The training
images are 8 per concept from the base model (``inference.py``: "a photo of the {c}" for objects, "a photo in the
style of {c}" for styles), segmented by Grounded-SAM with the concept as the text query (objects only; styles train
on the whole image).

Grounded-SAM is not available here. ``masks: none`` trains on the whole image, the official code's mask-free path
(a deviation for object concepts). ``masks: world`` segments the miniature world's generated images by the colour
its judge predicate names (nudity: skin, violence: blood), the world's cheap analog of segmenting the concept;
a predicate without a colour (a shape, a style) gets the whole image.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from crt.base import FitContext, pil_to_pixels
from crt_bench.spec import ConceptSpec, PromptItem

# The official templates, in the official order (src/cfr_utils.py prompt_augmentation).
OBJECT_TEMPLATES: tuple[str, ...] = (
    "{} in a photo", "{} in a snapshot", "A snapshot of {}", "A photograph showcasing {}", "An illustration of {}",
    "A digital rendering of {}", "A visual representation of {}", "A graphic of {}", "A shot of {}", "A photo of {}",
    "A black and white image of {}", "A depiction in portrait form of {}",
    "A scene depicting {} during a public gathering", "{} captured in an image",
    "A depiction created with oil paints capturing {}", "An image of {}", "A drawing capturing the essence of {}",
    "An official photograph featuring {}", "A detailed sketch of {}", "{} during sunset/sunrise",
    "{} in a detailed portrait", "An official photo of {}", "Historic photo of {}", "Detailed portrait of {}",
    "A painting of {}", "HD picture of {}", "Magazine cover capturing {}", "Painting-like image of {}",
    "Hand-drawn art of {}", "An oil portrait of {}", "{} in a sketch painting",
)
STYLE_TEMPLATES: tuple[str, ...] = (
    "An artwork by {}", "Art piece by {}", "A recent creation by {}", "{}'s renowned art", "Latest masterpiece by {}",
    "A stunning image by {}", "An art in {}'s style", "Exhibition artwork of {}", "Art display by {}",
    "a beautiful painting by {}", "An image inspired by {}'s style", "A sketch by {}", "Art piece representing {}",
    "A drawing by {}", "Artistry showcasing {}", "An illustration by {}", "A digital art by {}", "A visual art by {}",
    "A reproduction inspired by {}'s colorful, expressive style", "Famous painting of {}", "A famous art by {}",
    "Artistic style of {}", "{}'s famous piece", "Abstract work of {}", "{}'s famous drawing",
    "Art from {}'s early period", "A portrait by {}", "An imitation reflecting the style of {}",
    "An painting from {}'s collection", "Vibrant reproduction of artwork by {}", "Artistic image influenced by {}",
)
TEMPLATES = {"object": OBJECT_TEMPLATES, "style": STYLE_TEMPLATES}
DATA_PROMPTS = {"object": "a photo of the {}", "style": "a photo in the style of {}"}  # inference.py
MASK_MODES = ("none", "world")
BLOOD_RGB = (150, 0, 0)  # world/scene.py draws blood drops in this colour


@dataclass(frozen=True)
class ConceptPrompts:
    """One erased concept: its text, its anchor, and the template-expanded prompts on both sides (same order)."""

    concept: str
    mapping: str
    erased: tuple[str, ...]  # templates filled with the concept: keys of stage 1, prompts of stage 2 and 3
    mapped: tuple[str, ...]  # the same templates filled with the anchor: values of stage 1


def concept_texts(concepts: Sequence[str] | None, mapping: str | Sequence[str] | None,
                  spec: ConceptSpec) -> list[tuple[str, str]]:
    """``(concept, anchor)`` per erased concept: ``concepts`` (None: the concept's c_u), one anchor for all or one each
    (None: the concept's c_a)."""
    erased = list(concepts) if concepts else [spec.c_u]
    anchors = [mapping or spec.c_a] * len(erased) if mapping is None or isinstance(mapping, str) else list(mapping)
    if len(anchors) != len(erased):
        raise ValueError(f"MACE needs one mapping or one per concept; got {len(anchors)} for {len(erased)}")
    return list(zip(erased, anchors))


def chosen_templates(templates: Sequence[str] | None, concept_type: str, prompt_len: int, aug_length: int,
                     rng: random.Random) -> list[str]:
    """``aug_length`` templates drawn without replacement from the first ``prompt_len`` (the official sampling; 30 of
    30 is the first 30 in a shuffled order). ``templates`` replaces the official list of ``concept_type``."""
    if templates is None:
        if concept_type not in TEMPLATES:
            raise ValueError(f"MACE concept_type must be one of {sorted(TEMPLATES)}, got {concept_type!r}")
        templates = TEMPLATES[concept_type]
    pool = list(templates)[:prompt_len]
    if not 0 < aug_length <= len(pool):
        raise ValueError(f"MACE aug_length {aug_length} needs 1..{len(pool)} templates (prompt_len {prompt_len})")
    return [pool[i] for i in rng.sample(range(len(pool)), aug_length)]


def concept_prompts(pairs: Sequence[tuple[str, str]], templates: Sequence[str]) -> list[ConceptPrompts]:
    """Every concept under every template, the concept and its anchor in the same template."""
    return [ConceptPrompts(c, m, tuple(t.format(c) for t in templates), tuple(t.format(m) for t in templates))
            for c, m in pairs]


def data_items(concept: str, concept_type: str, count: int, seed: int) -> list[PromptItem]:
    """The prompts of one concept's training images: the official "a photo of the {c}" (styles: "in the style of")."""
    text = DATA_PROMPTS[concept_type].format(concept)
    return [PromptItem(text, seed=seed + k, case=f"mace_{concept}_{k}") for k in range(count)]


def training_images(ctx: FitContext, concept: str, concept_type: str, count: int, seed: int) -> torch.Tensor:
    """The base model's images of ``concept`` (through the store) as (count, 3, H, W) in [0, 1]."""
    images = ctx.generate(data_items(concept, concept_type, count, seed))
    if any(image is None for image in images):
        raise ValueError("MACE needs every training image; the base model delivered a blocked one")
    return pil_to_pixels(images)


def predicate_colour(spec: ConceptSpec) -> tuple[int, int, int] | None:
    """The RGB colour a world concept's judge predicate names (its ``colour``, or blood), or None."""
    if spec.judge.get("name") != "world":
        return None
    predicate = spec.judge.get("predicate") or {}
    if predicate.get("colour"):
        from world import vocabulary as V

        label = str(predicate["colour"])
        return V.SKIN if label == "skin" else V.COLOURS[label]
    if predicate.get("blood"):
        return BLOOD_RGB
    return None


def colour_masks(pixels: torch.Tensor, colour: Sequence[int], threshold: float) -> torch.Tensor:
    """(B, 1, H, W) masks, 1 where a pixel lies within ``threshold`` (0-255 units, Euclidean RGB) of ``colour``."""
    rgb = torch.tensor(colour, dtype=pixels.dtype).view(1, 3, 1, 1) / 255
    return ((pixels - rgb).norm(dim=1, keepdim=True) * 255 <= threshold).to(pixels.dtype)


def concept_masks(pixels: torch.Tensor, mode: str, spec: ConceptSpec, threshold: float,
                  concept_type: str) -> tuple[torch.Tensor | None, str]:
    """The masks the attention loss is restricted to (None: the whole image) and where they came from."""
    if mode not in MASK_MODES:
        raise ValueError(f"MACE masks must be one of {MASK_MODES}, got {mode!r}")
    if mode == "none" or concept_type == "style":
        return None, "whole image" if mode == "none" else "whole image (style concept, as the official code)"
    colour = predicate_colour(spec)
    if colour is None:
        return None, "whole image (the concept's judge predicate names no colour)"
    return colour_masks(pixels, colour, threshold), f"world colour mask: RGB {tuple(colour)} within {threshold:g}"


def mask_coverage(masks: torch.Tensor | None) -> list[float]:
    """Per image, the fraction of pixels the mask keeps (1 without a mask)."""
    if masks is None:
        return []
    return [round(float(m.mean()), 4) for m in masks]


def to_model_pixels(pixels: torch.Tensor, imagenet_normalise: bool) -> torch.Tensor:
    """[0, 1] pixels as the VAE reads them: [-1, 1], or (official quirk, ``parity``) ImageNet-normalised as the
    official dataset's transform does (mean 0.485/0.456/0.406, std 0.229/0.224/0.225)."""
    if not imagenet_normalise:
        return pixels * 2 - 1
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    return (pixels - mean) / std

