"""The guidance protocol: plain CFG through GuidedPipeline is StableDiffusionPipeline, through GuidedXLPipeline
StableDiffusionXLPipeline, and timesteps map to steps."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from crt.guidance import (
    ClassifierFreeGuidance,
    Conditions,
    GuidedPipeline,
    GuidedXLPipeline,
    Step,
    branches,
    step_of_timestep,
)
from crt_bench.backbone import TextConditioning, encode_text, unet_output


def _images(pipe, size: int, **kwargs) -> np.ndarray:
    gens = [torch.Generator().manual_seed(s) for s in (3, 4)]
    out = pipe(num_inference_steps=3, guidance_scale=7.5, height=size, width=size, generator=gens,
               output_type="np", **kwargs)
    return np.asarray(out.images)


@pytest.mark.parametrize("negative", [None, "blurry"])
def test_plain_cfg_reproduces_the_stable_diffusion_pipeline(tiny, negative):
    guided = GuidedPipeline.around(tiny.pipe, ClassifierFreeGuidance())
    extra = {} if negative is None else {"negative_prompt": [negative] * 2}
    prompts = ["a nude circle", "a red square"]
    expected = _images(tiny.pipe, tiny.size, prompt=prompts, **extra)
    got = _images(guided, tiny.size, prompt=prompts, **extra)
    np.testing.assert_array_equal(got, expected)
    assert guided.unet is tiny.pipe.unet and guided.text_encoder is tiny.pipe.text_encoder


def test_plain_cfg_reproduces_the_pipeline_on_prompt_embeddings(sd14):
    pipe = sd14.pipe
    ids = pipe.tokenizer(["a cat", "a dog"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        embeds = pipe.text_encoder(ids)[0]
    guided = GuidedPipeline.around(pipe, ClassifierFreeGuidance())
    np.testing.assert_array_equal(_images(guided, sd14.size, prompt_embeds=embeds),
                                  _images(pipe, sd14.size, prompt_embeds=embeds))


@pytest.mark.parametrize("negative", [None, "blurry"])
def test_plain_cfg_reproduces_the_sdxl_pipeline(sdxl, negative):
    """SDXL: the zero unconditional branch of an empty negative prompt, pooled embeddings, time ids, Euler's begin
    index and the decoding all as StableDiffusionXLPipeline has them, bit for bit."""
    from diffusers import StableDiffusionXLPipeline

    guided = GuidedPipeline.around(sdxl.pipe, ClassifierFreeGuidance())
    assert isinstance(guided, GuidedXLPipeline) and isinstance(guided, StableDiffusionXLPipeline)
    assert guided.unet is sdxl.pipe.unet and guided.text_encoder_2 is sdxl.pipe.text_encoder_2
    extra = {} if negative is None else {"negative_prompt": [negative] * 2}
    prompts = ["a nude circle", "a red square"]
    expected = _images(sdxl.pipe, sdxl.size, prompt=prompts, **extra)
    got = _images(guided, sdxl.size, prompt=prompts, **extra)
    np.testing.assert_array_equal(got, expected)
    assert np.abs(got[0] - got[1]).max() > 0  # the prompts reach the UNet


def test_plain_cfg_reproduces_the_sdxl_pipeline_on_prompt_embeddings(sdxl):
    pipe = sdxl.pipe
    with torch.no_grad():
        cond = encode_text(pipe, ["a cat", "a dog"])
    guided = GuidedXLPipeline.around(pipe, ClassifierFreeGuidance())
    kwargs = dict(prompt_embeds=cond.hidden, pooled_prompt_embeds=cond.pooled)
    np.testing.assert_array_equal(_images(guided, sdxl.size, **kwargs), _images(pipe, sdxl.size, **kwargs))


def test_an_sdxl_loop_refuses_a_guidance_without_pooled_conditions(sdxl):
    class TokensOnly(ClassifierFreeGuidance):
        name = "tokens_only"
        pooled_conditions = False

    with pytest.raises(ValueError, match="tokens_only.*pooled"):
        GuidedPipeline.around(sdxl.pipe, TokensOnly())


def test_cfg_noise_on_sdxl_is_the_hand_combination_of_unet_outputs(sdxl):
    unet = sdxl.pipe.unet
    with torch.no_grad():
        cond, uncond = encode_text(sdxl.pipe, ["a nude circle"]), encode_text(sdxl.pipe, ["blurry"])
        latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        t = torch.tensor(500)
        e_c, e_u = (unet_output(unet, latents, t, c, 8) for c in (cond, uncond))
        got = ClassifierFreeGuidance().noise(unet, latents, Step(0, t, 1), Conditions(cond, uncond, 5.0), None)
        other_pooled = TextConditioning(cond.hidden, uncond.pooled)
        (e_other,) = branches(unet, latents, t, [other_pooled])
    torch.testing.assert_close(got, e_u + 5.0 * (e_c - e_u), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(e_other, e_c)  # the pooled embedding is read


def test_a_pipeline_rebuilt_without_its_guidance_refuses_to_sample(sd14):
    guided = GuidedPipeline.around(sd14.pipe, ClassifierFreeGuidance())
    rebuilt = type(guided)(**guided.components)
    with pytest.raises(ValueError, match="no guidance"):
        rebuilt("a cat", num_inference_steps=1)


def test_cfg_noise_is_the_hand_combination(sd14):
    unet = sd14.pipe.unet
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 8, 8, generator=gen)
    cond, uncond = torch.randn(2, 1, 77, unet.config.cross_attention_dim, generator=gen).unbind(0)
    t = torch.tensor(500)
    with torch.no_grad():
        e_c = unet(latents, t, encoder_hidden_states=cond).sample
        e_u = unet(latents, t, encoder_hidden_states=uncond).sample
        got = ClassifierFreeGuidance().noise(unet, latents, Step(0, t, 1), Conditions(cond, uncond, 7.5), None)
        plain = ClassifierFreeGuidance().noise(unet, latents, Step(0, t, 1), Conditions(cond, uncond, 1.0), None)
    torch.testing.assert_close(got, e_u + 7.5 * (e_c - e_u), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(plain, e_c)


def test_step_of_timestep_is_the_nearest_deployed_step(world):
    scheduler = world.pipe.scheduler
    before = scheduler.timesteps.clone() if scheduler.timesteps is not None else None
    schedule = type(scheduler).from_config(scheduler.config)
    schedule.set_timesteps(50)
    deployed = schedule.timesteps.tolist()
    for index in (0, 7, 10, 49):
        step = step_of_timestep(scheduler, 50, deployed[index])
        assert (step.index, step.total) == (index, 50)
    assert step_of_timestep(scheduler, 50, 999).index == 0
    assert step_of_timestep(scheduler, 50, 0).index == 49
    between = (deployed[10] + deployed[11]) / 2 + 0.4  # nearer step 10 (larger timestep)
    assert step_of_timestep(scheduler, 50, torch.tensor([between])).index == 10
    after = scheduler.timesteps
    assert (before is None and after is None) or torch.equal(before, after)  # a copy is set, not the deployed one
