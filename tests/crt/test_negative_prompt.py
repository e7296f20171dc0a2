"""Negative prompt: the concept (or a given text) becomes CFG's unconditional branch; nothing else changes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from crt.base import OPEN_WEIGHTS, FitContext
from crt.negative_prompt import NegativePrompt
from runners.spec import Family
from tests.crt.conftest import changed_keys, state_snapshot


def _fit(crt, tiny, concept):
    return crt.fit(FitContext(pipe=tiny.pipe, concept=concept, settings=tiny.settings, generate=tiny.generate))


def test_text_defaults_to_the_concept_and_a_given_string_wins(world, concept):
    assert _fit(NegativePrompt(), world, concept).meta == {"negative_prompt": concept.c_u}
    given = "nude, blur haze naked"
    assert _fit(NegativePrompt(text=given), world, concept).meta == {"negative_prompt": given}
    with pytest.raises(ValueError, match="non-empty"):
        NegativePrompt(text="  ")


def test_fit_and_apply_change_nothing_but_the_negative_prompt(tiny, concept):
    pipe = tiny.pipe
    unet_before, text_before = state_snapshot(pipe.unet), state_snapshot(pipe.text_encoder)
    crt = NegativePrompt()
    defended = crt.apply(pipe, _fit(crt, tiny, concept))
    assert NegativePrompt.family is Family.GUIDANCE and defended.exposes == OPEN_WEIGHTS
    assert defended.negative_prompt == concept.c_u and defended.guidance is None and defended.filter is None
    assert defended.pipe is pipe and crt.reconstruction is None
    assert not changed_keys(unet_before, pipe.unet) and not changed_keys(text_before, pipe.text_encoder)


def test_generation_is_cfg_with_the_concept_as_unconditional_branch(tiny, concept):
    """What the runner does with the defended model (negative_prompt passed to the pipeline) equals a hand-written
    CFG loop whose unconditional branch is the concept text, and differs from the undefended images."""
    pipe, size = tiny.pipe, tiny.size
    crt = NegativePrompt()
    defended = crt.apply(pipe, _fit(crt, tiny, concept))
    prompt, steps, scale = concept.prompt_set("target")[0].text, 3, 7.5

    def run(negative):
        return np.asarray(pipe(prompt, negative_prompt=negative, num_inference_steps=steps, guidance_scale=scale,
                               height=size, width=size, generator=torch.Generator().manual_seed(0),
                               output_type="np").images)

    defended_images, base_images = run(defended.negative_prompt), run(None)

    def encode(text):
        ids = pipe.tokenizer([text], padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        return pipe.text_encoder(ids.input_ids)[0]

    with torch.no_grad():
        cond, neg = encode(prompt), encode(concept.c_u)
        scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
        scheduler.set_timesteps(steps)
        side = size // pipe.vae_scale_factor
        latents = torch.randn(1, pipe.unet.config.in_channels, side, side, generator=torch.Generator().manual_seed(0))
        latents = latents * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            x = scheduler.scale_model_input(latents, t)
            e_n = pipe.unet(x, t, encoder_hidden_states=neg).sample
            e_p = pipe.unet(x, t, encoder_hidden_states=cond).sample
            latents = scheduler.step(e_n + scale * (e_p - e_n), t, latents).prev_sample
        image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
        by_hand = ((image / 2 + 0.5).clamp(0, 1)).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(defended_images, by_hand, rtol=0, atol=2e-3)  # separate vs batched UNet calls
    assert np.abs(defended_images - base_images).max() > 1e-3


def test_generation_on_sd21_and_sdxl_changes_with_the_negative_prompt(other_backbone, concept):
    crt = NegativePrompt()
    defended = crt.apply(other_backbone.pipe, _fit(crt, other_backbone, concept))
    item = concept.prompt_set("target")[0]

    def image(negative: str | None):
        gen = torch.Generator().manual_seed(0)
        return np.asarray(other_backbone.pipe(item.text, negative_prompt=negative, num_inference_steps=2,
                                              height=64, width=64, generator=gen).images[0], dtype=float)

    assert np.abs(image(defended.negative_prompt) - image(None)).max() > 0
    assert "sdxl" in NegativePrompt.backbones
