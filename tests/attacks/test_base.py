"""The attack contract: three modes named after what an attack uses, and the target set an attack is run on."""

from __future__ import annotations

import inspect
import sys
import time

import pytest
import torch

from attacks.base import (
    MODES,
    AdversarialPrompt,
    AttackContext,
    AttackCost,
    IncompatibleAttack,
    check_compatible,
    reference_per_target,
    require_context,
    retire_successes,
    search_each,
    share_wall_time,
)
from attacks.none import NoAttack
from attacks.ringabell import RingABell
from attacks.unlearndiffatk import UnlearnDiffAtk
from crt.base import DefendedModel
from crt.guidance import ClassifierFreeGuidance, Conditions
from crt_bench.spec import HarnessError
from runners.registry import available, build_attack
from runners.spec import Access, PromptItem
from tests.runners.conftest import compose_config


@pytest.mark.parametrize(("attack", "mode", "agnostic"), [
    (NoAttack(), "transfer", True),
    (RingABell(), "transfer", True),  # the public base text encoder only: one search serves every CRT
    (RingABell(adaptive=True), "adaptive", False),  # + the filter's score
    (UnlearnDiffAtk(), "white-box", False),  # the deployed UNet's gradients and judged queries of the defended model
    (UnlearnDiffAtk(adaptive=True), "adaptive", False),  # + the filter's gradients
])
def test_mode_is_derived_from_what_the_attack_uses(attack, mode, agnostic):
    assert attack.mode == mode and mode in MODES and attack.identity()["mode"] == mode
    assert attack.model_agnostic is agnostic


def test_the_oracle_alone_makes_an_attack_white_box():
    """The judge is the attacker's own tool, but it judges generations of the defended system."""

    class QueriesOnly(NoAttack):
        name = "queries_only"
        requires = frozenset({Access.JUDGE_ORACLE})

    attack = QueriesOnly()
    assert attack.mode == "white-box" and not attack.model_agnostic
    check_compatible(attack, DefendedModel(pipe=None, exposes=frozenset()))  # and no CRT can withhold it


def test_target_set_defaults_to_unacceptable_and_is_a_param():
    assert NoAttack().target_set == "unacceptable" and RingABell().target_set == "unacceptable"
    attack = RingABell(target_set="ringabell_nudity")
    assert attack.target_set == "ringabell_nudity" and attack.identity()["params"]["target_set"] == "ringabell_nudity"
    assert UnlearnDiffAtk(target_set="x").config.target_set == "x"


def test_queries_alone_make_an_attack_white_box():
    """A black-box attack sends prompts to the deployed system: no CRT can withhold that, but it is searched per CRT."""

    class BlackBox(NoAttack):
        name = "black_box"
        requires = frozenset({Access.SYSTEM_QUERIES})

    attack = BlackBox()
    assert attack.mode == "white-box" and not attack.model_agnostic
    check_compatible(attack, DefendedModel(pipe=None, exposes=frozenset()))


@pytest.mark.parametrize("name", available("attack"))
def test_an_attack_that_queries_the_system_declares_it(name: str):
    """``AttackContext.generate`` is only given with ``SYSTEM_QUERIES``: an attack calling it must declare it."""
    attack = build_attack(compose_config([f"attack={name}"])["attack"], "mini")
    source = inspect.getsource(sys.modules[type(attack).__module__])
    if "ctx.generate(" in source:
        assert Access.SYSTEM_QUERIES in attack.requires, f"{name} queries the system without declaring it"


# What an attack without an adaptive variant refuses with, by config name: each declares it once (Attack.no_adaptive).
NO_ADAPTIVE = {"mma": "MMA-Diffusion's text attack", "sneakyprompt": "SneakyPrompt already searches",
               "p4d_n": "p4d_n has no adaptive variant", "p4d_k": "p4d_k has no adaptive variant",
               "p4d_uda": "p4d_uda has no adaptive variant", "none": "attack=none searches nothing"}


@pytest.mark.parametrize("name", available("attack"))
def test_adaptive_is_refused_exactly_by_the_attacks_that_declare_no_adaptive_variant(name: str):
    cfg = compose_config([f"attack={name}"])["attack"]
    attack_class = type(build_attack(cfg, "mini"))
    if name not in NO_ADAPTIVE:
        assert attack_class.no_adaptive is None
        return
    with pytest.raises(IncompatibleAttack, match=NO_ADAPTIVE[name]):  # one line in a sweep, which goes on
        build_attack({**cfg, "adaptive": True}, "mini")


def test_no_adaptive_names_the_attack_and_refuses_before_anything_is_set():
    class Plain(NoAttack):
        name = "plain"
        no_adaptive = "{name} has no adaptive variant"

    with pytest.raises(ValueError, match="^plain has no adaptive variant$"):
        Plain(adaptive=True, k=1)
    attack = Plain(k=1)
    assert attack.mode == "transfer" and attack.identity()["params"] == {"k": 1}


def test_search_each_gives_every_target_its_own_cost_in_order():
    targets = [PromptItem("a", seed=0), PromptItem("b", seed=1), PromptItem("a", seed=0)]
    seen: list[tuple[str, int]] = []

    def search(target: PromptItem, cost: AttackCost) -> AdversarialPrompt:
        assert cost.wall_s == 0.0 and cost.queries == 0  # a fresh cost, not the previous target's
        seen.append((target.text, id(cost)))
        cost.queries += len(seen)
        time.sleep(0.01 * len(seen))
        return AdversarialPrompt(target=target, text=target.text.upper(), cost=cost)

    results = search_each(targets, search)
    assert [r.text for r in results] == ["A", "B", "A"] and [r.target for r in results] == targets
    assert [r.cost.queries for r in results] == [1, 2, 3] and len({c for _, c in seen}) == 3
    for i, r in enumerate(results, start=1):  # the timer covers each search alone
        assert 0.01 * i <= r.cost.wall_s < 0.01 * i + 0.5


def test_a_batch_shares_its_wall_time_equally_and_successes_leave_it(monkeypatch):
    from types import SimpleNamespace

    from attacks import base

    monkeypatch.setattr(base.time, "perf_counter", lambda: 10.0)
    costs = [AttackCost(wall_s=1.0), AttackCost(), AttackCost(), AttackCost()]
    share_wall_time(costs, began=4.0)  # 6 s for four targets
    assert [c.wall_s for c in costs] == [2.5, 1.5, 1.5, 1.5]
    steps: list[int] = []
    monkeypatch.setattr(base.progress, "step", lambda n=1, **_: steps.append(n))
    searches = [SimpleNamespace(name=n, success=s) for n, s in (("a", True), ("b", False), ("c", True), ("d", False))]
    assert [s.name for s in retire_successes(searches)] == ["b", "d"] and steps == [1, 1]


def test_require_context_names_every_missing_field_before_any_search():
    ctx = AttackContext(defended=DefendedModel(pipe=None), concept=None, settings=None, oracle=lambda ims: [],
                        generate=None)
    require_context(ctx, "X", ("oracle",))
    with pytest.raises(ValueError, match=r"^Y needs \['generate', 'reference_images', 'defended.filter'\] in its "):
        require_context(ctx, "Y", ("oracle", "generate", "reference_images"), ["defended.filter"])
    with pytest.raises(ValueError, match=r"needs \['extra'\]"):
        require_context(ctx, "Z", ("oracle",), ["extra"])


@pytest.mark.parametrize(("per_target", "expected"), [(1, ["t0", "t1", "t2"]), (3, ["t0", "t1", "t2"])])
def test_reference_per_target_takes_each_targets_first_image(per_target: int, expected: list[str]):
    targets = [PromptItem(f"t{i}", seed=i) for i in range(3)]
    asked: list[list[PromptItem]] = []

    def reference_images(items: list[PromptItem]) -> list[str]:
        asked.append(items)
        return [f"{t.text}" if j == 0 else f"{t.text}/{j}" for t in items for j in range(per_target)]

    ctx = AttackContext(defended=DefendedModel(pipe=None), concept=None, settings=None,
                        reference_images=reference_images)
    assert reference_per_target(ctx, targets) == expected and asked == [targets]


# -- defended_noise on every backbone, and the prompt ids it forwards ----------------------------------------------


def test_defended_noise_is_the_backbones_own_unet_call_and_differentiable(other_backbone):
    """No sampling-loop defence: the UNet's prediction with what the backbone needs (SDXL: pooled + time ids)."""
    from attacks.base import defended_noise
    from crt_bench.backbone import encode_text, unet_output, vae_factor

    pipe = other_backbone.pipe
    ctx = AttackContext(defended=DefendedModel(pipe=pipe), concept=None, settings=other_backbone.settings)
    with torch.no_grad():
        cond = encode_text(pipe, ["a nude green cross", "a red circle"])
    leaf = cond.hidden.clone().requires_grad_(True)
    cond = type(cond)(leaf, cond.pooled)
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 8, 8, generator=gen)
    t = torch.tensor([100, 700])
    got = defended_noise(ctx, latents, t, cond)
    with torch.no_grad():
        expected = unet_output(pipe.unet, latents, t, cond, vae_factor(pipe))
        torch.testing.assert_close(got.detach(), expected)
        if other_backbone.kind == "sdxl":  # the pooled embedding is read: another one changes the prediction
            other = defended_noise(ctx, latents, t, type(cond)(leaf.detach(), cond.pooled.flip(0)))
            assert not torch.allclose(other, expected)
    (grad,) = torch.autograd.grad(got.pow(2).sum(), [leaf])
    assert grad.abs().sum() > 0


def test_prediction_target_is_the_noise_or_the_velocity():
    from diffusers import DDPMScheduler

    from attacks.base import prediction_target

    schedule = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    gen = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 4, 3, 3, generator=gen), torch.randn(2, 4, 3, 3, generator=gen)
    t = torch.tensor([5, 800])
    assert prediction_target(schedule, x0, noise, t) is noise
    v_schedule = DDPMScheduler.from_config(schedule.config, prediction_type="v_prediction")
    abar = schedule.alphas_cumprod[t].view(-1, 1, 1, 1)
    hand = abar.sqrt() * noise - (1 - abar).sqrt() * x0  # v = sqrt(abar) eps - sqrt(1 - abar) x0
    torch.testing.assert_close(prediction_target(v_schedule, x0, noise, t), hand)
    with pytest.raises(HarnessError, match="sample"):
        prediction_target(DDPMScheduler.from_config(schedule.config, prediction_type="sample"), x0, noise, t)


class _Recording(ClassifierFreeGuidance):
    """Plain CFG that records the conditions each ``begin`` receives."""

    name = "recording"

    def __init__(self):
        self.seen: list[Conditions] = []

    def begin(self, pipe, conditions):
        self.seen.append(conditions)
        return None


def test_prompt_ids_reach_the_guidance_row_by_row(world):
    """Rows are grouped by timestep: each group's Conditions carry that group's ids (None when none are given)."""
    from attacks.base import defended_noise
    from crt_bench.backbone import encode_text

    pipe = world.pipe
    guidance = _Recording()
    ctx = AttackContext(defended=DefendedModel(pipe=pipe, guidance=guidance), concept=None, settings=world.settings)
    texts = ["a nude green cross", "a red circle", "a blue square"]
    ids = pipe.tokenizer(texts, padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        cond = encode_text(pipe, texts).hidden
        latents = torch.randn(3, 4, 4, 4, generator=torch.Generator().manual_seed(0))
        t = torch.tensor([900, 100, 900])
        with_ids = defended_noise(ctx, latents, t, cond, 5.0, prompt_ids=ids)
        assert [c.prompt_ids.tolist() for c in guidance.seen] == [ids[[0, 2]].tolist(), ids[[1]].tolist()]
        assert torch.equal(guidance.seen[0].cond, cond[[0, 2]])
        guidance.seen.clear()
        without = defended_noise(ctx, latents, t, cond, 5.0)
    assert [c.prompt_ids for c in guidance.seen] == [None, None]
    torch.testing.assert_close(with_ids, without)  # plain CFG does not read them


class _TokensOnly(_Recording):
    """A guidance that reads SD 1.x / 2.x token states only (as SAFREE does)."""

    name = "tokens_only"
    pooled_conditions = False


def test_a_guidance_without_pooled_conditions_refuses_an_sdxl_condition(sdxl):
    from attacks.base import defended_noise
    from crt_bench.backbone import encode_text

    ctx = AttackContext(defended=DefendedModel(pipe=sdxl.pipe, crt_name="safree", guidance=_TokensOnly()),
                        concept=None, settings=sdxl.settings)
    with torch.no_grad():
        cond = encode_text(sdxl.pipe, ["a red circle"])
    with pytest.raises(HarnessError, match="^safree: this sampling-loop defence"):
        defended_noise(ctx, torch.zeros(1, 4, 8, 8), torch.tensor([500]), cond)


@pytest.mark.parametrize("negative", ["", "blurry"])
def test_cfg_guidance_on_sdxl_is_the_deployed_unconditional_branch_and_differentiable(sdxl, negative):
    """A pooled condition through a guidance: the unconditional branch is the one StableDiffusionXLPipeline uses
    (zeros for an empty negative prompt under force_zeros_for_empty_prompt, else the encoded negative), the
    prompt's pooled embedding is read, and the prediction is differentiable in the condition."""
    from dataclasses import replace

    from attacks.base import defended_noise
    from crt_bench.backbone import TextConditioning, encode_text, unet_output

    pipe = sdxl.pipe
    guidance = _Recording()
    ctx = AttackContext(defended=DefendedModel(pipe=pipe, crt_name="cfg", guidance=guidance), concept=None,
                        settings=replace(sdxl.settings, negative_prompt=negative))
    with torch.no_grad():
        cond = encode_text(pipe, ["a nude green cross", "a red circle"])
        uncond = encode_text(pipe, [negative]) if negative else TextConditioning(
            torch.zeros_like(cond.hidden[:1]), torch.zeros_like(cond.pooled[:1]))
    leaf = cond.hidden.clone().requires_grad_(True)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([100, 700])
    got = defended_noise(ctx, latents, t, TextConditioning(leaf, cond.pooled), 5.0)
    assert all(c.uncond.pooled is not None for c in guidance.seen)
    with torch.no_grad():
        for row in range(2):
            x, ti = latents[row:row + 1], t[row:row + 1]
            e_c, e_u = (unet_output(pipe.unet, x, ti, c, 8) for c in (cond[row:row + 1], uncond))
            torch.testing.assert_close(got[row:row + 1].detach(), e_u + 5.0 * (e_c - e_u), rtol=1e-4, atol=1e-5)
    (grad,) = torch.autograd.grad(got.pow(2).sum(), [leaf])
    assert grad.abs().sum() > 0
