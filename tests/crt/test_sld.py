"""SLD: the guidance term against a hand loop for every preset, images equal diffusers' StableDiffusionPipelineSafe,
fit/apply leave the base alone, and white-box attacks differentiate the same guidance."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from attacks.base import AttackContext, defended_noise, defended_unet_calls
from crt.base import OPEN_WEIGHTS, FitContext
from crt.guidance import ClassifierFreeGuidance, Conditions, GuidedPipeline, Step, step_of_timestep
from crt.sld import DEFAULT_SAFETY_CONCEPT, PRESETS, SLD, SafeLatentGuidance, SLDConfig, SLDState, resolve_config
from runners.spec import Family
from tests.crt.conftest import changed_keys, state_snapshot

# -- the guidance term by hand ------------------------------------------------------------------------------------

UNCOND, TEXT, SAFETY = 0.0, 1.0, 2.0  # which condition a row is: the fake UNet reads it from the condition


class TableUNet(torch.nn.Module):
    """Returns, for each row, the prediction the test set for (condition, timestep): no network in the way."""

    dtype = torch.float64

    def __init__(self, table: dict[tuple[float, int], torch.Tensor]):
        super().__init__()
        self.table = table

    def forward(self, sample, t, encoder_hidden_states, return_dict=True):
        t = int(torch.as_tensor(t).flatten()[0])
        rows = [self.table[(float(c), t)] for c in encoder_hidden_states[:, 0, 0]]
        return (torch.cat(rows).to(sample.dtype) + 0 * sample,)


def hand_loop(eps: dict[float, list[list[float]]], config: SLDConfig, scale: float) -> list[list[float]]:
    """SLD with Python floats, element by element (paper Eq. 3-8; diffusers' SafetyConfig semantics)."""
    steps, size = len(eps[TEXT]), len(eps[TEXT][0])
    momentum = [0.0] * size
    out = []
    for i in range(steps):
        row = []
        for k in range(size):
            u, p, s = eps[UNCOND][i][k], eps[TEXT][i][k], eps[SAFETY][i][k]
            diff = p - s
            mu = 0.0 if diff >= config.threshold else min(1.0, config.guidance_scale * abs(diff))
            gamma = mu * (s - u) + config.momentum_scale * momentum[k]
            momentum[k] = config.momentum_beta * momentum[k] + (1 - config.momentum_beta) * gamma
            guidance = (p - u) - (gamma if i >= config.warmup_steps else 0.0)
            row.append(u + scale * guidance)
        out.append(row)
    return out


def _differences(steps: int, size: int, gen: torch.Generator) -> torch.Tensor:
    """eps_p - eps_S per step and element, spread over the branches: above lambda, under it with mu clamped to 1,
    under it with mu < 1 for every preset's s_S, exactly zero."""
    magnitudes = torch.tensor([2e-5, 1e-4, 4e-4, 3e-3, 0.02, 0.3, 0.9, 0.0])
    signs = torch.where(torch.rand(steps, size, generator=gen) < 0.5, -1.0, 1.0)
    picks = torch.randint(len(magnitudes), (steps, size), generator=gen)
    return (signs * magnitudes[picks]).double()


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_guidance_equals_the_hand_loop_for_each_preset(preset):
    config = PRESETS[preset]
    steps, size, scale = 18, 16, 7.5  # past every preset's warm-up (15 at most)
    gen = torch.Generator().manual_seed(len(preset))
    text = torch.randn(steps, size, generator=gen).double()
    eps = {UNCOND: torch.randn(steps, size, generator=gen).double(), TEXT: text,
           SAFETY: text - _differences(steps, size, gen)}
    timesteps = list(range(900, 900 - 50 * steps, -50))
    unet = TableUNet({(c, timesteps[i]): eps[c][i].reshape(1, 4, 2, 2) for c in eps for i in range(steps)})
    cond = {c: torch.full((1, 77, 4), c, dtype=torch.float64) for c in eps}
    guidance = SafeLatentGuidance(config, "unused")
    conditions = Conditions(cond=cond[TEXT], uncond=cond[UNCOND], scale=scale)
    state = SLDState(safety=cond[SAFETY])
    latents = torch.zeros(1, 4, 2, 2, dtype=torch.float64)
    got = [guidance.noise(unet, latents, Step(i, torch.tensor(timesteps[i]), steps), conditions, state).flatten()
           for i in range(steps)]
    expected = hand_loop({c: v.tolist() for c, v in eps.items()}, config, scale)
    torch.testing.assert_close(torch.stack(got), torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    if config.momentum_scale > 0:  # the momentum really carries over: a fresh state at the last step differs
        fresh = guidance.noise(unet, latents, Step(steps - 1, torch.tensor(timesteps[-1]), steps), conditions,
                               SLDState(safety=cond[SAFETY]))
        assert not torch.allclose(fresh.flatten(), got[-1])


def test_presets_and_parity():
    assert resolve_config("weak", None, {}).guidance_scale == 20
    assert resolve_config("weak", "unlearndiffatk", {}).guidance_scale == 200
    assert resolve_config("max", "unlearndiffatk", {}) == PRESETS["max"]
    assert resolve_config("medium", None, {"warmup_steps": 5, "threshold": None}).warmup_steps == 5
    with pytest.raises(ValueError, match="preset"):
        resolve_config("extreme", None, {})
    guidance = SafeLatentGuidance(PRESETS["medium"], "x", warmup_by="timestep")
    assert guidance.active(Step(0, torch.tensor(981), 50)) and not guidance.active(Step(49, torch.tensor(1), 50))
    assert not SafeLatentGuidance(PRESETS["medium"], "x").active(Step(9, torch.tensor(801), 50))
    assert SLD(preset="strong").name == "sld_strong" and SLD().name == "sld"
    rescaled = {p: SafeLatentGuidance(c, "x", warmup_reference_steps=50).warmup(25) for p, c in PRESETS.items()}
    assert rescaled == {"weak": 8, "medium": 5, "strong": 4, "max": 0}  # 15, 10, 7, 0 of 50 at 25 steps
    assert SafeLatentGuidance(PRESETS["medium"], "x", warmup_reference_steps=50).warmup(50) == 10
    medium25 = SafeLatentGuidance(PRESETS["medium"], "x", warmup_reference_steps=50)
    assert not medium25.active(Step(4, torch.tensor(801), 25)) and medium25.active(Step(5, torch.tensor(761), 25))
    with pytest.raises(ValueError, match="reference"):
        SLD(parity="unlearndiffatk", warmup_reference_steps=50)


# -- parity with diffusers' StableDiffusionPipelineSafe ---------------------------------------------------------

def _safe_pipeline(pipe):
    from diffusers import StableDiffusionPipelineSafe

    components = {k: v for k, v in pipe.components.items() if k != "image_encoder"}
    safe = StableDiffusionPipelineSafe(**{**components, "safety_checker": None, "feature_extractor": None},
                                       requires_safety_checker=False)
    safe.safety_concept = DEFAULT_SAFETY_CONCEPT  # the paper's text; diffusers prefixes "an image showing"
    safe.set_progress_bar_config(disable=True)
    return safe


@pytest.mark.parametrize(("preset", "steps"), [("medium", 12), ("max", 4)])
def test_images_equal_diffusers_safe_pipeline(sd14, preset, steps):
    pipe, size = sd14.pipe, sd14.size
    config = PRESETS[preset]
    guided = GuidedPipeline.around(pipe, SafeLatentGuidance(config, DEFAULT_SAFETY_CONCEPT))
    kwargs = dict(prompt="a photo of a cat", num_inference_steps=steps, guidance_scale=7.5, height=size, width=size,
                  output_type="np")
    calls: list[tuple[torch.Tensor, torch.Tensor]] = []
    hook = pipe.unet.register_forward_hook(
        lambda module, args, kw, out: calls.append((args[0].clone(), kw["encoder_hidden_states"].clone())),
        with_kwargs=True)
    try:
        ours = guided(generator=torch.Generator().manual_seed(1), **kwargs).images
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            theirs = _safe_pipeline(pipe)(
                generator=torch.Generator().manual_seed(1), sld_guidance_scale=config.guidance_scale,
                sld_warmup_steps=config.warmup_steps, sld_threshold=config.threshold,
                sld_momentum_scale=config.momentum_scale, sld_mom_beta=config.momentum_beta, **kwargs).images
    finally:
        hook.remove()
    # the loop is exact: every UNet call gets bit-identical latents and conditions, step after step
    loop = len(guided.scheduler.timesteps)  # one UNet call per timestep (PNDM's PLMS has one more than steps)
    assert len(calls) == 2 * loop
    for (x_ours, h_ours), (x_theirs, h_theirs) in zip(calls[:loop], calls[loop:]):
        assert torch.equal(x_ours, x_theirs) and torch.equal(h_ours, h_theirs)
    # decoding differs by rounding only: diffusers' Safe pipeline scales latents by 1 / s, StableDiffusion by / s
    np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), rtol=0, atol=1e-5)
    plain = pipe(generator=torch.Generator().manual_seed(1), **kwargs).images
    assert np.abs(np.asarray(ours) - np.asarray(plain)).max() > 1e-3  # SLD acted


# -- the CRT on both shapes ---------------------------------------------------------------------------------------

def test_fit_and_apply(tiny, concept):
    pipe = tiny.pipe
    unet_before, text_before = state_snapshot(pipe.unet), state_snapshot(pipe.text_encoder)
    scheduler_before = type(pipe.scheduler)
    safety = "concept" if tiny.kind == "world" else "default"
    crt = SLD(preset="max", safety_concept=safety)
    artifact = crt.fit(FitContext(pipe=pipe, concept=concept, settings=tiny.settings, generate=tiny.generate))
    assert artifact.tensors == {}
    assert artifact.meta["safety_concept"] == (concept.c_u if safety == "concept" else DEFAULT_SAFETY_CONCEPT)
    defended = crt.apply(pipe, artifact)
    assert SLD.family is Family.GUIDANCE and defended.exposes == OPEN_WEIGHTS and defended.filter is None
    assert isinstance(defended.pipe, GuidedPipeline) and defended.pipe.guidance is defended.guidance
    assert defended.pipe.unet is pipe.unet and defended.pipe.text_encoder is pipe.text_encoder
    assert defended.negative_prompt is None and crt.reconstruction
    assert type(pipe) is not GuidedPipeline and type(pipe.scheduler) is scheduler_before

    target = concept.prompt_set("target")
    base_images = tiny.generate(list(target))
    images = tiny.generate(list(target), pipe=defended.pipe)
    assert images[0].size == (tiny.size, tiny.size)
    assert np.abs(np.asarray(images[0], dtype=float) - np.asarray(base_images[0], dtype=float)).max() > 0
    assert not changed_keys(unet_before, pipe.unet) and not changed_keys(text_before, pipe.text_encoder)


def test_warmup_longer_than_the_loop_leaves_plain_cfg(world, concept):
    """Medium's warm-up is 10 steps: a 2-step loop never applies the term, so it samples as plain CFG does."""
    crt = SLD(preset="medium", safety_concept="concept")
    defended = crt.apply(world.pipe, crt.fit(FitContext(pipe=world.pipe, concept=concept, settings=world.settings,
                                                        generate=world.generate)))
    target = list(concept.prompt_set("target"))
    ours = np.asarray(world.generate(target, pipe=defended.pipe)[0], dtype=float)
    plain = np.asarray(world.generate(target)[0], dtype=float)
    assert np.abs(ours - plain).max() <= 1  # the 3-row UNet batch may round differently from the 2-row one


# -- the hook white-box attacks use ---------------------------------------------------------------------------

def _attack_context(tiny, defended) -> AttackContext:
    from dataclasses import replace

    return AttackContext(defended=defended, concept=None, settings=replace(tiny.settings, steps=50))


def _latents(tiny, rows: int) -> torch.Tensor:
    side = tiny.size // 8
    return torch.randn(rows, 4, side, side, generator=torch.Generator().manual_seed(5))


def _cond(pipe, texts: list[str]) -> torch.Tensor:
    ids = pipe.tokenizer(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        return pipe.text_encoder(ids)[0]


def test_attack_hook_is_the_plain_unet_without_guidance(world):
    from crt.base import DefendedModel

    pipe = world.pipe
    ctx = _attack_context(world, DefendedModel(pipe=pipe, exposes=OPEN_WEIGHTS))
    latents, cond, t = _latents(world, 2), _cond(pipe, ["a nude circle", "a red square"]), torch.tensor([500, 20])
    with torch.no_grad():
        expected = pipe.unet(latents, t, encoder_hidden_states=cond).sample
        got = defended_noise(ctx, latents, t, cond)
    assert torch.equal(got, expected) and defended_unet_calls(ctx.defended) == 1


def test_attack_hook_is_sld_guided_noise_with_gradients(world, concept):
    pipe = world.pipe
    crt = SLD(preset="strong", safety_concept="concept")
    defended = crt.apply(pipe, crt.fit(FitContext(pipe=pipe, concept=concept, settings=world.settings,
                                                   generate=world.generate)))
    ctx = _attack_context(world, defended)
    schedule = type(pipe.scheduler).from_config(pipe.scheduler.config)
    schedule.set_timesteps(50)
    late, early = int(schedule.timesteps[40]), int(schedule.timesteps[2])  # past strong's warm-up (7) / inside it
    latents = _latents(world, 2)
    cond = _cond(pipe, ["a nude circle", "a red square"]).requires_grad_(True)
    t = torch.tensor([late, early])
    got = defended_noise(ctx, latents, t, cond, [5.0, 7.5])
    (grad,) = torch.autograd.grad(got.sum(), [cond])  # as the attacks take it: the condition's gradient only
    assert grad.abs().sum() > 0 and defended_unet_calls(defended) == 3
    assert all(p.grad is None for p in pipe.unet.parameters())

    # independently: the three UNet predictions, SLD's term with momentum 0, warm-up by the mapped step index
    config = PRESETS["strong"]
    uncond, safety = _cond(pipe, [""]), _cond(pipe, [concept.c_u])
    with torch.no_grad():
        for row, (scale, active) in enumerate([(5.0, True), (7.5, False)]):
            x, c, ti = latents[row:row + 1], cond[row:row + 1].detach(), t[row:row + 1]
            e_u, e_p, e_s = (pipe.unet(x, ti, encoder_hidden_states=h).sample for h in (uncond, c, safety))
            diff = e_p - e_s
            mu = torch.where(diff >= config.threshold, 0.0, (diff.abs() * config.guidance_scale).clamp(max=1.0))
            gamma = mu * (e_s - e_u)
            expected = e_u + scale * ((e_p - e_u) - (gamma if active else 0))
            # separate UNet calls round differently from the batched one; s_S = 2000 amplifies that in mu
            torch.testing.assert_close(got[row:row + 1].detach(), expected, rtol=1e-3, atol=2e-3)
            assert step_of_timestep(pipe.scheduler, 50, int(ti)).index == (40 if active else 2)
    assert not torch.allclose(got[0:1].detach(), pipe.unet(latents[:1], t[:1], encoder_hidden_states=cond[:1]).sample)


def test_unlearndiffatk_runs_one_step_against_sld(world, concept):
    from attacks.unlearndiffatk import UnlearnDiffAtk

    pipe = world.pipe
    unet_before = state_snapshot(pipe.unet)
    crt = SLD(preset="max", safety_concept="concept")
    defended = crt.apply(pipe, crt.fit(FitContext(pipe=pipe, concept=concept, settings=world.settings,
                                                   generate=world.generate)))
    generated = []

    def generate(model, items):
        generated.append(model.pipe)
        return world.generate(items, pipe=model.pipe)

    ctx = AttackContext(defended=defended, concept=concept, settings=world.settings,
                        oracle=lambda images: [False] * len(images), generate=generate,
                        reference_images=lambda items: world.generate(items))
    attack = UnlearnDiffAtk(k=2, iterations=1, timesteps=[500])
    [result] = attack.run(ctx, [concept.prompt_set("target")[0]])
    assert result.text and result.cost.forward == 3 and result.cost.backward == 1  # three UNet passes per SLD step
    assert generated and all(p is defended.pipe for p in generated)  # judged through SLD's sampling loop
    assert not changed_keys(unet_before, pipe.unet)
    assert all(p.grad is None for p in pipe.unet.parameters())


# -- SD 2.x and SDXL -------------------------------------------------------------------------------------------

def test_fit_and_apply_on_sd21_and_sdxl(other_backbone, concept):
    from crt.guidance import GuidedXLPipeline

    pipe = other_backbone.pipe
    encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if other_backbone.kind == "sdxl" else [])
    before = [state_snapshot(m) for m in (pipe.unet, *encoders)]
    crt = SLD(preset="max", safety_concept="concept")
    defended = crt.apply(pipe, crt.fit(FitContext(pipe=pipe, concept=concept, settings=other_backbone.settings,
                                                  generate=other_backbone.generate)))
    assert isinstance(defended.pipe, GuidedXLPipeline) == (other_backbone.kind == "sdxl")
    assert defended.pipe.unet is pipe.unet and type(pipe) is not type(defended.pipe)
    target = list(concept.prompt_set("target"))[:1]
    base, guarded = other_backbone.generate(target)[0], other_backbone.generate(target, pipe=defended.pipe)[0]
    assert np.abs(np.asarray(base, dtype=float) - np.asarray(guarded, dtype=float)).max() > 0
    assert all(not changed_keys(b, m) for b, m in zip(before, (pipe.unet, *encoders)))
    assert {"sd1", "sd2", "sdxl"} <= SLD.backbones


def _double_unet(pipe):
    """A float64 copy of the UNet: batched and separate calls then agree far below what s_S = 5000 amplifies."""
    import copy

    return copy.deepcopy(pipe.unet).double()


def _sld_by_hand(unet, latents, t, scale, cond, uncond, safety, config: SLDConfig) -> torch.Tensor:
    """One SLD step with momentum 0 from three separate ``unet_output`` calls (paper Eq. 3-6)."""
    from crt_bench.backbone import unet_output

    e_u, e_p, e_s = (unet_output(unet, latents, t, c, 8) for c in (uncond, cond, safety))
    diff = e_p - e_s
    mu = torch.where(diff >= config.threshold, 0.0, (diff.abs() * config.guidance_scale).clamp(max=1.0))
    return e_u + scale * ((e_p - e_u) - mu * (e_s - e_u))


def _as_double(cond):
    from crt_bench.backbone import TextConditioning

    return TextConditioning(cond.hidden.double(), cond.pooled.double())


def test_sld_noise_on_sdxl_is_the_hand_formula(sdxl, concept):
    """MAX (warm-up 0): the guided noise of the first step equals SLD's formula from three UNet calls, with the
    safety concept encoded by SDXL's text stack (both encoders, pooled embedding)."""
    from crt.guidance import condition_like
    from crt_bench.backbone import TextConditioning, encode_text

    pipe, config = sdxl.pipe, PRESETS["max"]
    guidance = SafeLatentGuidance(config, concept.c_u)
    with torch.no_grad():
        cond = _as_double(encode_text(pipe, ["a nude green cross", "a red circle"]))
        uncond = _as_double(encode_text(pipe, ["blurry"]))
        safety = _as_double(encode_text(pipe, [concept.c_u]))
    conditions = Conditions(cond=cond, uncond=uncond.repeat(2), scale=7.5)
    state = guidance.begin(pipe, conditions)
    assert isinstance(state.safety, TextConditioning) and state.safety.pooled.shape == (2, cond.pooled.shape[1])
    torch.testing.assert_close(state.safety.pooled[1:], safety.pooled)
    assert condition_like(state.safety, cond).hidden.dtype == torch.float64
    unet = _double_unet(pipe)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    t = torch.tensor(601)
    with torch.no_grad():
        got = guidance.noise(unet, latents, Step(0, t, 4), conditions, state)
        for row in range(2):
            expected = _sld_by_hand(unet, latents[row:row + 1], t, 7.5, cond[row:row + 1], uncond, safety, config)
            torch.testing.assert_close(got[row:row + 1], expected, rtol=1e-9, atol=1e-9)
        plain = ClassifierFreeGuidance().noise(unet, latents, Step(0, t, 4), conditions, None)
        without_pooled = _sld_by_hand(unet, latents[:1], t, 7.5, cond[:1], uncond,
                                      TextConditioning(safety.hidden, torch.zeros_like(safety.pooled)), config)
    assert not torch.allclose(got, plain)  # SLD acted
    assert not torch.allclose(got[:1], without_pooled)  # the safety concept's pooled embedding is read


def test_defended_noise_through_sld_on_sdxl_is_differentiable(sdxl, concept):
    from crt_bench.backbone import TextConditioning, encode_text

    pipe = sdxl.pipe
    crt = SLD(preset="max", safety_concept="concept")
    defended = crt.apply(pipe, crt.fit(FitContext(pipe=pipe, concept=concept, settings=sdxl.settings,
                                                   generate=sdxl.generate)))
    ctx = _attack_context(sdxl, defended)
    with torch.no_grad():
        cond = encode_text(pipe, ["a nude green cross"])
        zeros = TextConditioning(torch.zeros_like(cond.hidden), torch.zeros_like(cond.pooled))
        safety = encode_text(pipe, [concept.c_u])
    hidden, pooled = cond.hidden.clone().requires_grad_(True), cond.pooled.clone().requires_grad_(True)
    latents, t = _latents(sdxl, 1), torch.tensor([500])
    got = defended_noise(ctx, latents, t, TextConditioning(hidden, pooled))
    grads = torch.autograd.grad(got.pow(2).sum(), [hidden, pooled])
    assert all(g.abs().sum() > 0 for g in grads) and defended_unet_calls(defended) == 3
    assert all(p.grad is None for p in pipe.unet.parameters())
    with torch.no_grad():  # the deployed loop's branches: zeros for the empty negative prompt, the concept's safety
        expected = _sld_by_hand(pipe.unet, latents, t, sdxl.settings.guidance, cond, zeros, safety, PRESETS["max"])
    torch.testing.assert_close(got.detach(), expected, rtol=1e-3, atol=5e-3)  # float32: s_S amplifies rounding
