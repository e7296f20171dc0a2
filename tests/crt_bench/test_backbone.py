"""The backbone functions reproduce what diffusers' own SD 1.x / 2.x / SDXL pipelines compute, on shaped pipelines."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from crt_bench.backbone import (
    ONLY_SD1,
    UNET_FAMILY,
    TextConditioning,
    backbone_of,
    check_backbone,
    concat,
    conditioning_encoder,
    encode_text,
    epsilon,
    key_value_widths,
    latent_scale,
    text_width,
    unet_output,
    vae_factor,
)
from crt_bench.spec import HarnessError

TEXTS = ["a nude square", "one red cross on the left"]


def _load(folder, xl: bool = False) -> Any:
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    cls = StableDiffusionXLPipeline if xl else StableDiffusionPipeline
    pipe = cls.from_pretrained(str(folder))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipes(sd14_shaped_folder, sd21_shaped_folder, sdxl_shaped_folder) -> dict[str, Any]:
    return {"sd1": _load(sd14_shaped_folder), "sd2": _load(sd21_shaped_folder),
            "sdxl": _load(sdxl_shaped_folder, xl=True)}


def test_the_backbone_is_read_from_the_structure(pipes):
    assert {name: backbone_of(pipe) for name, pipe in pipes.items()} == {"sd1": "sd1", "sd2": "sd2", "sdxl": "sdxl"}
    assert {name: text_width(pipe) for name, pipe in pipes.items()} == {"sd1": 768, "sd2": 1024, "sdxl": 2048}
    assert {name: latent_scale(pipe) for name, pipe in pipes.items()} == {"sd1": 0.18215, "sd2": 0.18215,
                                                                          "sdxl": 0.13025}
    for name, pipe in pipes.items():
        widths = set(key_value_widths(pipe.unet).values())
        assert {w_in for w_in, _ in widths} == {text_width(pipe)}, name
    assert len({w_out for _, w_out in key_value_widths(pipes["sdxl"].unet).values()}) > 1  # per-level widths


@pytest.mark.parametrize("name", ["sd1", "sd2", "sdxl"])
def test_text_conditioning_equals_the_pipelines_own(pipes, name):
    pipe = pipes[name]
    ours = encode_text(pipe, TEXTS)
    with torch.no_grad():
        if name == "sdxl":
            embeds, _, pooled, _ = pipe.encode_prompt(prompt=TEXTS, device="cpu", num_images_per_prompt=1,
                                                      do_classifier_free_guidance=False)
            torch.testing.assert_close(ours.pooled, pooled)
        else:
            embeds, _ = pipe.encode_prompt(TEXTS, "cpu", 1, False)
            assert ours.pooled is None
    torch.testing.assert_close(ours.hidden, embeds)


@pytest.mark.parametrize("name", ["sd1", "sd2", "sdxl"])
def test_unet_output_equals_the_call_inside_the_pipeline(pipes, name):
    """Capture the UNet call diffusers makes during one sampling step (no guidance) and redo it through ours."""
    pipe = pipes[name]
    seen: dict[str, Any] = {}

    def hook(module, args, kwargs, output):
        seen.setdefault("call", (args, kwargs, output[0].detach().clone()))

    handle = pipe.unet.register_forward_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            pipe(TEXTS[:1], num_inference_steps=1, guidance_scale=1.0, height=64, width=64, output_type="latent",
                 generator=torch.Generator().manual_seed(0))
    finally:
        handle.remove()
    args, kwargs, expected = seen["call"]
    latents, timestep = args[0], args[1]
    with torch.no_grad():
        cond = encode_text(pipe, TEXTS[:1])
        got = unet_output(pipe.unet, latents, timestep, cond, vae_factor(pipe))
    torch.testing.assert_close(got, expected)


def test_v_prediction_output_converts_to_the_noise_it_stands_for(sd21_shaped_folder, tmp_path):
    from diffusers import DDPMScheduler

    from world.sd_shaped import write_sd21_shaped_pipeline

    pipe = _load(write_sd21_shaped_pipeline(tmp_path / "v", v_prediction=True))
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    gen = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 4, 8, 8, generator=gen)
    t = torch.tensor([10, 900])
    x_t = scheduler.add_noise(x0, noise, t)
    v = scheduler.get_velocity(x0, noise, t)
    torch.testing.assert_close(epsilon(pipe, v, x_t, t), noise, rtol=1e-4, atol=1e-4)
    sd1 = type("P", (), {"scheduler": scheduler})()
    scheduler.register_to_config(prediction_type="epsilon")
    assert epsilon(sd1, v, x_t, t) is v


def test_a_plugin_without_the_backbone_is_refused_in_one_line():
    class Old:
        name = "esd_x"
        backbones = ONLY_SD1

    class New:
        name = "espresso"
        backbones = UNET_FAMILY

    check_backbone("sdxl", [New()], "sdxl")
    with pytest.raises(HarnessError, match=r"^esd_x does not support the sdxl backbone \(model=sdxl\); it supports "
                                           r"sd1$"):
        check_backbone("sdxl", [New(), Old()], "sdxl")
    with pytest.raises(HarnessError, match="transformer backbone"):
        check_backbone("flux", [New()], "flux")
    with pytest.raises(HarnessError, match="one of sd1, sd2, sdxl"):
        check_backbone("sd9", [New()])


def test_repeat_keeps_the_pooled_embedding_aligned():
    cond = TextConditioning(torch.arange(6.).reshape(1, 2, 3), torch.ones(1, 4))
    twice = cond.repeat(2)
    assert twice.hidden.shape == (2, 2, 3) and twice.pooled.shape == (2, 4)


@pytest.mark.parametrize("name", ["sd1", "sd2", "sdxl"])
def test_the_conditioning_encoder_reads_ids_as_the_pipeline_encodes_text(pipes, name):
    """What Ring-A-Bell and the other id-level attacks call: on SDXL both encoders, each with its own padding."""
    pipe = pipes[name]
    ids = pipe.tokenizer(TEXTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        states = conditioning_encoder(pipe)(ids).last_hidden_state
        torch.testing.assert_close(states, encode_text(pipe, TEXTS).hidden)
    assert conditioning_encoder(pipe).config.hidden_size == text_width(pipe)
    if name != "sdxl":
        assert conditioning_encoder(pipe) is pipe.text_encoder


def test_concat_keeps_tensors_tensors_and_stacks_pooled_embeddings():
    a, b = torch.zeros(1, 3, 4), torch.ones(2, 3, 4)
    assert torch.equal(concat([a, b]), torch.cat([a, b]))
    both = concat([TextConditioning(a, torch.zeros(1, 5)), TextConditioning(b, torch.ones(2, 5))])
    assert both.hidden.shape == (3, 3, 4) and torch.equal(both.pooled[1:], torch.ones(2, 5))
    with pytest.raises(ValueError, match="pooled"):
        concat([TextConditioning(a, torch.zeros(1, 5)), b])
