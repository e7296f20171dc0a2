"""SAFREE: the projection against a direct least-squares projection, the trigger rule and the self-validating step
count against hand values, the Fourier re-weighting against numpy's FFT, the hooks on real UNets, and a short
generation on both pipeline shapes that leaves the base pipeline as it was."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from crt.base import FitContext
from crt.guidance import Conditions, GuidedPipeline, Step
from crt.safree import NUDITY_KEYWORDS, SAFREE, concept_keywords, mined_words
from crt.safree.projection import (
    SelfValidation,
    analyse_prompt,
    complement,
    masked_prompt_ids,
    project_states,
    safe_states,
    self_validation_beta,
    span_projector,
    trigger_tokens,
)
from crt.safree.reweight import BranchLayout, LatentReweighting, reweight_low_frequencies, skip_sites
from crt_bench.spec import Access, ConceptSpec, Family
from tests.crt.conftest import changed_keys, crt_yaml, items, state_snapshot


def _lstsq_projection(basis_rows: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The orthogonal projection of the rows of ``x`` onto span(basis_rows), by least squares."""
    coeffs = torch.linalg.lstsq(basis_rows.T, x.T).solution
    return (basis_rows.T @ coeffs).T


@pytest.mark.parametrize(("k", "n"), [(1, 3), (3, 5), (4, 12)])
def test_projection_leaves_the_toxic_subspace_against_lstsq(k, n):
    gen = torch.Generator().manual_seed(10 * k + n)
    d = 24
    toxic = torch.randn(k, d, generator=gen, dtype=torch.float64)
    masked = torch.randn(n, d, generator=gen, dtype=torch.float64)
    states = torch.randn(7, d, generator=gen, dtype=torch.float64)
    p_c, p_i = span_projector(toxic), span_projector(masked)
    torch.testing.assert_close(states @ p_c.T, _lstsq_projection(toxic, states))
    torch.testing.assert_close(states @ p_i.T, _lstsq_projection(masked, states))
    projected = project_states(states, p_i, p_c)
    in_input = _lstsq_projection(masked, states)
    direct = in_input - _lstsq_projection(toxic, in_input)  # (I - P_C) P_I x, each step a least-squares residual
    torch.testing.assert_close(projected, direct)
    assert float((projected @ toxic.T).abs().max()) < 1e-9  # orthogonal to every keyword embedding
    assert float((states @ toxic.T).abs().max()) > 0.1


def test_rank_deficient_keywords_span_the_same_subspace():
    gen = torch.Generator().manual_seed(0)
    toxic = torch.randn(2, 16, generator=gen, dtype=torch.float64)
    repeated = torch.cat([toxic, toxic[:1] * 3.0 + toxic[1:] * -2.0])  # a third keyword inside the span
    torch.testing.assert_close(span_projector(repeated), span_projector(toxic))


def _hand_case() -> tuple[torch.Tensor, torch.Tensor]:
    """Toxic subspace = the first axis of R^3; masked embeddings whose distances to it are (3, 4, 5, 4)."""
    toxic = torch.tensor([[2.0, 0.0, 0.0]], dtype=torch.float64)
    masked = torch.tensor([[9.0, 3.0, 0.0], [1.0, 0.0, 4.0], [7.0, 3.0, 4.0], [0.0, 4.0, 0.0]], dtype=torch.float64)
    return toxic, masked


def test_trigger_rule_on_a_hand_built_case():
    toxic, masked = _hand_case()
    p_c = span_projector(toxic)
    # leave-one-out means of (3, 4, 5, 4): 13/3, 12/3, 11/3, 12/3; token 2 (5 >= 1.01 * 3.667) is the trigger
    assert trigger_tokens(masked, p_c, alpha=0.01).tolist() == [False, False, True, False]
    # token 1 (4 vs 1.01 * 4 = 4.04) is not, but is with a negative alpha: 4 >= 0.99 * 4; token 3 likewise
    assert trigger_tokens(masked, p_c, alpha=-0.01).tolist() == [False, True, True, True]
    # alpha large enough keeps every token: 5 < 1.4 * 11/3 = 5.13
    assert not trigger_tokens(masked, p_c, alpha=0.4).any()
    # one token alone is projected (the official NaN comparison fails)
    assert trigger_tokens(masked[:1], p_c, alpha=0.01).tolist() == [True]


def test_only_trigger_positions_are_projected():
    toxic, masked = _hand_case()
    p_c, p_i = span_projector(toxic), span_projector(masked)
    gen = torch.Generator().manual_seed(1)
    states = torch.randn(8, 3, generator=gen, dtype=torch.float64)
    triggers = torch.tensor([False, False, True, False])
    safe = safe_states(states, triggers, p_i, p_c)
    kept = [0, 1, 2, 4, 5, 6, 7]  # SOT, tokens 1, 2, 4 and the end/padding positions
    torch.testing.assert_close(safe[kept], states[kept])
    expected = states[3].clone()
    expected[0] = 0.0  # P_I = I (the masked rows span R^3), I - P_C zeroes the first axis
    torch.testing.assert_close(safe[3], expected)


def test_masked_prompts_replace_one_token_each():
    ids = torch.tensor([100, 5, 6, 7, 200, 200, 200])
    masked = masked_prompt_ids(ids, end=4)
    assert masked.tolist() == [[100, 0, 6, 7, 200], [100, 5, 0, 7, 200], [100, 5, 6, 0, 200]]


@pytest.mark.parametrize(("beta", "upper", "expected"), [
    (0.5333, 10, 5),   # sigmoid(0) = 0.5 -> round(5.0)
    (0.6, 10, 10),     # 10 * sigmoid(2 * 2.5 * 0.667) = 10 * 0.9656 -> 10
    (0.5, 10, 2),      # 10 * sigmoid(-1.665) = 1.59 -> 2
    (0.4, 10, 0),      # 10 * sigmoid(-6.665) = 0.013 -> 0
    (0.55, 5, 3),      # 5 * sigmoid(0.835) = 5 * 0.6974 = 3.49 -> 3
])
def test_self_validating_step_count_by_hand(beta, upper, expected):
    assert SelfValidation(upper=upper).last_step(beta) == expected
    assert SelfValidation(upper=upper, midpoint=5.5, slope=3.5).last_step(0.55) == round(upper * 0.5)


def test_self_validation_beta_by_hand():
    """States (2 attended + 1 padding) in R^2, toxic axis e1, input space R^2: projected = (0, y)."""
    states = torch.tensor([[3.0, 4.0], [0.0, 2.0], [5.0, 0.0]], dtype=torch.float64)
    p_c = span_projector(torch.tensor([[1.0, 0.0]], dtype=torch.float64))
    p_i = torch.eye(2, dtype=torch.float64)
    attended = torch.tensor([True, True, False])
    # cos((3,4), (0,4)) = 4/5, cos((0,2), (0,2)) = 1; the padding row (cos 0 / undefined) is ignored
    assert self_validation_beta(states, attended, p_i, p_c) == pytest.approx(1 - (0.8 + 1.0) / 2)


def _numpy_reweight(safe: np.ndarray, original: np.ndarray, scale: float, radius: int) -> np.ndarray:
    out = np.empty_like(safe)
    for b in range(safe.shape[0]):
        for c in range(safe.shape[1]):
            fs = np.fft.fftshift(np.fft.fft2(safe[b, c]))
            fo = np.fft.fftshift(np.fft.fft2(original[b, c]))
            h, w = fs.shape
            for u in range(h // 2 - radius, h // 2 + radius):
                for v in range(w // 2 - radius, w // 2 + radius):
                    if fs[u, v].real > fo[u, v].real:
                        fs[u, v] *= scale
            out[b, c] = np.fft.ifft2(np.fft.ifftshift(fs)).real
    return out


@pytest.mark.parametrize(("size", "radius"), [(4, 1), (6, 1), (8, 2)])
def test_fourier_reweighting_against_numpy(size, radius):
    gen = torch.Generator().manual_seed(size)
    safe = torch.randn(2, 3, size, size, generator=gen, dtype=torch.float64)
    original = torch.randn(2, 3, size, size, generator=gen, dtype=torch.float64)
    ours = reweight_low_frequencies(safe, original, 0.2, radius)
    np.testing.assert_allclose(ours.numpy(), _numpy_reweight(safe.numpy(), original.numpy(), 0.2, radius),
                               atol=1e-10)
    assert not torch.allclose(ours, safe)


def test_fourier_reweighting_by_hand():
    """A constant map has only a DC term (16 c): above the zero original's, it is scaled; equal branches are kept."""
    safe = torch.full((1, 1, 4, 4), 2.0)
    assert torch.allclose(reweight_low_frequencies(safe, torch.zeros_like(safe), 0.9), torch.full_like(safe, 1.8))
    assert torch.equal(reweight_low_frequencies(safe, safe.clone(), 0.9), safe)
    assert torch.allclose(reweight_low_frequencies(safe, torch.full_like(safe, 3.0), 0.9), safe)


def _up_block_inputs(unet, latents, cond) -> list[tuple[int, list[int]]]:
    """Per up-block resnet, (incoming hidden channels, skip channels), recorded from a real forward pass."""
    seen: list[tuple[int, list[int]]] = []

    def record(_module, args, kwargs):
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        res = kwargs.get("res_hidden_states_tuple", args[1] if len(args) > 1 else None)
        seen.append((hidden.shape[1], [r.shape[1] for r in reversed(res)]))

    handles = [block.register_forward_pre_hook(record, with_kwargs=True) for block in unet.up_blocks]
    with torch.no_grad():
        unet(latents, 10, encoder_hidden_states=cond)
    for handle in handles:
        handle.remove()
    return seen


def test_skip_sites_split_each_resnet_input_where_the_up_block_concatenates(tiny):
    unet = tiny.pipe.unet
    width = tiny.pipe.text_encoder.config.hidden_size
    size = unet.config.sample_size
    seen = _up_block_inputs(unet, torch.randn(1, 4, size, size), torch.randn(1, 77, width))
    sites = skip_sites(unet, (0.9, 0.2))
    widths = sorted(set(unet.config.block_out_channels), reverse=True)
    expected_sites = 0
    for block, (hidden, skips) in zip(unet.up_blocks, seen):
        for i, resnet in enumerate(block.resnets):
            incoming = hidden if i == 0 else block.resnets[i - 1].out_channels
            assert resnet.in_channels == incoming + skips[i]
            if incoming in widths[:2]:
                expected_sites += 1
                assert sites[resnet].hidden_channels == incoming
                assert sites[resnet].scale == (0.9 if incoming == widths[0] else 0.2)
            else:
                assert resnet not in sites
    assert len(sites) == expected_sites > 0


def test_hooks_reweight_only_the_active_safe_rows_and_are_removed(world):
    unet = world.pipe.unet
    gen = torch.Generator().manual_seed(3)
    latents = torch.randn(2, 4, 8, 8, generator=gen).repeat(3, 1, 1, 1)
    cond = torch.randn(6, 77, 128, generator=gen)
    with torch.no_grad():
        plain = unet(latents, 500, encoder_hidden_states=cond).sample
        reweighting = LatentReweighting((0.9, 0.2))
        with reweighting.applied(unet, BranchLayout(safe=2, original=4, active=torch.tensor([True, False]))):
            hooked = unet(latents, 500, encoder_hidden_states=cond).sample
        after = unet(latents, 500, encoder_hidden_states=cond).sample
    assert torch.equal(after, plain)
    keep = [0, 1, 3, 4, 5]  # the unconditional rows, the inactive safe row, the original rows
    torch.testing.assert_close(hooked[keep], plain[keep])
    assert not torch.allclose(hooked[2], plain[2], atol=1e-6)


@pytest.fixture
def nudity() -> ConceptSpec:
    return ConceptSpec(
        key="test_nudity", c_u="nude", c_a="clothed",
        prompts={
            "finetune_unacceptable": items("a nude circle", "a naked red square", "a nude blue triangle",
                                           "one naked cross"),
            "finetune_acceptable": items("a clothed circle", "a dressed red square", "a blue triangle"),
            "validation": items("an undressed cross", seed=10),
        })


def test_keywords_follow_the_category_or_the_concept(nudity):
    assert mined_words(nudity) == ["naked", "nude", "cross", "one"]
    cfg = SAFREE(mine_keywords=True).config
    assert concept_keywords(cfg, nudity) == ["nude", "naked", "cross", "one"]
    assert concept_keywords(SAFREE().config, nudity) == ["nude"]
    assert concept_keywords(SAFREE(keywords=["a", "b"]).config, nudity) == ["a", "b"]
    real = ConceptSpec(key="nudity", c_u="nude", c_a="clean")
    assert concept_keywords(SAFREE().config, real) == list(NUDITY_KEYWORDS) and len(NUDITY_KEYWORDS) == 17


def _generate(pipe, texts, negative, steps=2, size=32):
    gens = [torch.Generator().manual_seed(7 + i) for i in range(len(texts))]
    out = pipe(texts, num_inference_steps=steps, guidance_scale=7.5, height=size, width=size, generator=gens,
               negative_prompt=[negative] * len(texts), output_type="np")
    return torch.from_numpy(np.asarray(out.images))


def test_fit_apply_generate(tiny, nudity):
    pipe = tiny.pipe
    unet_before, text_before = state_snapshot(pipe.unet), state_snapshot(pipe.text_encoder)
    crt = SAFREE(mine_keywords=True)
    artifact = crt.fit(FitContext(pipe=pipe, concept=nudity, settings=tiny.settings, generate=tiny.generate))
    assert artifact.meta["keywords"][:2] == ["nude", "naked"]
    assert artifact.tensors["toxic_embeddings"].shape == (4, pipe.text_encoder.config.hidden_size)
    defended = crt.apply(pipe, artifact)
    assert isinstance(defended.pipe, GuidedPipeline) and defended.guidance is defended.pipe.guidance
    assert defended.pipe.unet is pipe.unet and defended.pipe.text_encoder is pipe.text_encoder
    assert defended.negative_prompt == "nude, naked, cross, one"
    assert SAFREE.family is Family.GUIDANCE and Access.UNET_GRADIENTS in defended.exposes
    assert Access.FILTER_SCORE not in defended.exposes

    texts = ["a nude red circle", "a naked blue square", ""]  # the empty prompt has no token to project
    base = _generate(pipe, texts, defended.negative_prompt, size=tiny.size)
    conditions = defended.pipe.conditions(texts, None, [defended.negative_prompt] * 3, None, 1, 7.5)
    state = defended.guidance.begin(defended.pipe, conditions)
    safe = _generate(defended.pipe, texts, defended.negative_prompt, size=tiny.size)
    assert safe.shape == base.shape and torch.isfinite(safe).all()
    # rows with a trigger are sampled differently at step 0; a row without one is the base pipeline's image
    assert state.projected.tolist()[2] is False and state.projected.any()
    for row, projected in enumerate(state.projected.tolist()):
        assert torch.equal(safe[row], base[row]) != projected
    assert not changed_keys(unet_before, pipe.unet) and not changed_keys(text_before, pipe.text_encoder)
    assert torch.equal(_generate(pipe, texts, defended.negative_prompt, size=tiny.size), base)  # hooks gone


def test_steps_on_the_safe_condition_follow_t_prime(world, nudity):
    crt = SAFREE(mine_keywords=True, upper_step=10)
    artifact = crt.fit(FitContext(pipe=world.pipe, concept=nudity, settings=world.settings, generate=world.generate))
    defended = crt.apply(world.pipe, artifact)
    guidance = defended.guidance
    texts = ["a nude red circle on a white background", "a red circle"]
    conditions = defended.pipe.conditions(texts, None, [defended.negative_prompt] * 2, None, 1, 5.0)
    state = guidance.begin(defended.pipe, conditions)
    for row, text in enumerate(texts):
        ids = conditions.prompt_ids[row]
        analysis = analyse_prompt(world.pipe.text_encoder, ids, conditions.cond[row], world.pipe.tokenizer.eos_token_id,
                                  guidance.toxic_projector, 0.01, guidance.validation)
        assert analysis.last_step == state.last_step[row]
        assert analysis.tokens == len(world.pipe.tokenizer(text).input_ids) - 2
        beta = analysis.beta
        hand = round(10 / (1 + math.exp(-2.0 * 2.5 * (10 * beta - 5.333))))
        assert state.last_step[row] == hand
        used = [bool(state.active(Step(i, 0, 25), True)[row]) for i in range(25)]
        assert sum(used) == (hand + 1 if state.projected[row] else 0) and used[:sum(used)] == [True] * sum(used)
        assert all(state.active(Step(i, 0, 25), False)[row] == state.projected[row] for i in range(25))


def test_attacks_differentiate_through_the_projection(world, nudity):
    """At a safe step the gradient of the noise with respect to a trigger token's state lies in the input space
    (the projection keeps nothing else); ``begin`` keeps the graph."""
    crt = SAFREE(mine_keywords=True)
    artifact = crt.fit(FitContext(pipe=world.pipe, concept=nudity, settings=world.settings, generate=world.generate))
    defended = crt.apply(world.pipe, artifact)
    plain = defended.pipe.conditions(["a nude red circle"], None, [defended.negative_prompt], None, 1, 5.0)
    cond = plain.cond.detach().clone().requires_grad_(True)
    conditions = Conditions(cond=cond, uncond=plain.uncond, scale=5.0, prompt_ids=plain.prompt_ids)
    state = defended.guidance.begin(defended.pipe, conditions)
    analysis = state.analyses[0]
    assert state.projected[0] and state.last_step[0] >= 0
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    eps = defended.guidance.noise(world.pipe.unet, latents, Step(0, 500, 25), conditions, state)
    (grad,) = torch.autograd.grad(eps.pow(2).sum(), [cond])  # no .grad left on the shared world UNet
    grad = grad[0].double()
    p_i = analysis.input_projector.double()
    for i, trigger in enumerate(analysis.triggers.tolist()):
        g = grad[1 + i]
        if trigger:
            assert float((g - g @ p_i.T).norm()) < 1e-4 * float(g.norm()) and float(g.norm()) > 0
    free = [1 + i for i, t in enumerate(analysis.triggers.tolist()) if not t]
    assert free and float(grad[free].norm()) > 0
    off_complement = complement(p_i)
    assert float((grad[free] @ off_complement.T).norm()) > 1e-3 * float(grad[free].norm())


def test_soft_prompts_get_the_negative_prompt_only(world, nudity):
    crt = SAFREE(mine_keywords=True)
    artifact = crt.fit(FitContext(pipe=world.pipe, concept=nudity, settings=world.settings, generate=world.generate))
    defended = crt.apply(world.pipe, artifact)
    text = defended.pipe.conditions(["a nude red circle"], None, [defended.negative_prompt], None, 1, 5.0)
    soft = Conditions(cond=text.cond, uncond=text.uncond, scale=5.0, prompt_ids=None)
    state = defended.guidance.begin(defended.pipe, soft)
    assert state.soft_prompt and not state.projected.any()
    embeds = _generate_embeds(defended.pipe, text.cond, defended.negative_prompt)
    reference = _generate_embeds(world.pipe, text.cond, defended.negative_prompt)
    assert torch.equal(embeds, reference)


def _generate_embeds(pipe, embeds, negative):
    out = pipe(prompt_embeds=embeds, negative_prompt=[negative], num_inference_steps=2, guidance_scale=5.0,
               height=32, width=32, generator=[torch.Generator().manual_seed(0)], output_type="np")
    return torch.from_numpy(np.asarray(out.images))


def test_reweighting_off_is_the_official_scripts_sampling(world, nudity):
    on = SAFREE(mine_keywords=True)
    off = SAFREE(mine_keywords=True, reweighting="off")
    ctx = FitContext(pipe=world.pipe, concept=nudity, settings=world.settings, generate=world.generate)
    artifact = on.fit(ctx)
    assert on.apply(world.pipe, artifact).guidance.reweighting is not None
    assert off.apply(world.pipe, off.fit(ctx)).guidance.reweighting is None
    with pytest.raises(ValueError, match="reweighting"):
        SAFREE(reweighting="high")


def test_yaml_defaults_are_the_official_arguments():
    from runners.registry import build_crt

    cfg = crt_yaml("safree")
    real = build_crt(cfg, model="sd14")
    assert isinstance(real, SAFREE) and real.name == cfg["name"] == "safree"
    c = real.config
    assert (c.alpha, c.upper_step, c.skip_scales, c.frequency_radius) == (0.01, 10, (0.9, 0.2), 1)
    assert c.self_validation and c.negative_prompt and c.reweighting == "paper" and not c.mine_keywords
    mini = build_crt(cfg, model="mini").config
    assert mini.mine_keywords and mini.upper_step == 5
