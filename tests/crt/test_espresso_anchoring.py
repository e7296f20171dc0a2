"""Espresso's separation must not carry c_u and c_a off the images: they stay paired with the images of their side.

Version 2 put c_u and c_a in the separation term only. Nothing tied them to any image, so fine-tuning pushed them
apart in a direction the (frozen) image embeddings do not follow; on the world's shape, style and character concepts
the held-out detection rate fell from 1.0 to 0.0-0.5 within 10-30 epochs and the epoch selection could only keep one
of the first few (cross vs shape: epoch 4 of 14, early stop).
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from crt.base import FitContext
from crt.espresso import Espresso, EspressoConfig, espresso_loss
from runners.spec import ConceptSpec, PromptItem
from tests.crt.conftest import WORLD_CLIP


def _unit(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=-1)


def test_loss_pairs_c_u_with_unacceptable_and_c_a_with_acceptable_images():
    """Swapping c_u and c_a leaves the separation and the prompt pairing unchanged; the loss must still prefer the
    c_u that lies with the unacceptable images, else the separation may move c_u anywhere."""
    gen = torch.Generator().manual_seed(0)
    img_u = _unit(torch.randn(6, 16, generator=gen) + 3 * torch.eye(16)[0])
    img_a = _unit(torch.randn(6, 16, generator=gen) + 3 * torch.eye(16)[1])
    txt_u = _unit(img_u + 0.1 * torch.randn(6, 16, generator=gen))
    txt_a = _unit(img_a + 0.1 * torch.randn(6, 16, generator=gen))
    c_u, c_a = _unit(img_u.mean(0, keepdim=True)), _unit(img_a.mean(0, keepdim=True))
    cfg = EspressoConfig()
    assert cfg.gamma > 0
    scale = torch.tensor(np.log(100.0), dtype=torch.float32)
    right = espresso_loss(torch.cat([txt_u, c_u]), torch.cat([txt_a, c_a]), img_u, img_a, scale,
                          cfg.alpha, cfg.beta, cfg.gamma)
    swapped = espresso_loss(torch.cat([txt_u, c_a]), torch.cat([txt_a, c_u]), img_u, img_a, scale,
                            cfg.alpha, cfg.beta, cfg.gamma)
    torch.testing.assert_close(right["separation"], swapped["separation"])
    torch.testing.assert_close(right["pairing"], swapped["pairing"])
    assert right["loss"] < swapped["loss"] - 1.0
    assert right["concept_pairing"] < 0.1 < swapped["concept_pairing"]
    without = espresso_loss(torch.cat([txt_u, c_u]), torch.cat([txt_a, c_a]), img_u, img_a, scale, 1.0, 1.0, 0.0)
    torch.testing.assert_close(without["loss"], -without["separation"] + without["pairing"])


def _scenes(shape_filter, n: int, seed: int):
    from world.scene import sample_scene

    rng = np.random.default_rng(seed)
    out = []
    while len(out) < n:
        scene = sample_scene(rng, colour=["red", "green", "blue", "yellow", "purple"][len(out) % 5],
                             blood=False, band=False)
        if shape_filter(scene.shape):
            out.append(scene)
    return out


@pytest.mark.skipif(not WORLD_CLIP.joinpath("config.json").exists(), reason="needs the trained world CLIP")
def test_fine_tuning_keeps_detecting_crosses_on_held_out_images():
    """cross vs shape on ground-truth world images (rendered scenes, captioned as the world's CLIP was trained):
    20 epochs of the released optimiser settings must not lose the crosses the untouched filter detects."""
    from world.captions import caption
    from world.scene import render

    rng = np.random.default_rng(0)
    scenes: dict[str, object] = {}

    def prompts(chosen, seed0: int) -> tuple[PromptItem, ...]:
        out = []
        for i, scene in enumerate(chosen):
            text = caption(scene, rng)
            while text in scenes:
                text = caption(scene, rng)
            scenes[text] = scene
            out.append(PromptItem(text, seed=seed0 + i, case=str(i)))
        return tuple(out)

    concept = ConceptSpec(key="test_cross", c_u="cross", c_a="shape", prompts={
        "finetune_unacceptable": prompts(_scenes(lambda s: s == "cross", 24, 1), 4000),
        "finetune_acceptable": prompts(_scenes(lambda s: s != "cross", 24, 2), 4000),
        "validation": prompts(_scenes(lambda s: s == "cross", 10, 3), 5000),
    })

    def generate(items):
        return [Image.fromarray(render(scenes[item.text], seed=item.seed)) for item in items]

    crt = Espresso(clip=str(WORLD_CLIP), epochs=20, patience=None)
    artifact = crt.fit(FitContext(pipe=SimpleNamespace(device=torch.device("cpu"), tokenizer=None), concept=concept,
                                      settings=None, generate=generate))
    curve = artifact.meta["validation_curve"]
    assert [row["epoch"] for row in curve] == list(range(21))
    assert curve[0]["tpr"] >= 0.9, "the untouched world CLIP should already tell these crosses from other shapes"
    assert min(row["tpr"] for row in curve) >= 0.8, " ".join(f"{row['tpr']:.1f}" for row in curve)
    assert curve[-1]["tpr"] >= 0.9 and curve[-1]["tnr"] >= 0.9
    assert curve[-1]["margin"] > curve[0]["margin"]  # and the fine-tuning did separate them
