"""ShieldDiff: DDPO's Gaussian step log-probability and clipped surrogate against independent computations, the
per-prompt advantage, the LoRA (zero at init, only its factors train), the reward's separation from the judge and
its one-line failure, and one short fit + apply on the SD-v1.4-shaped pipeline with a stand-in concept scorer."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy.stats import norm
from torch import nn

from crt.base import OPEN_WEIGHTS, FitContext
from crt.shielddiff import ShieldDiff, ShieldDiffConfig
from crt.shielddiff.ddpo import (
    PerPromptStatTracker,
    clipped_surrogate,
    ddim_step_with_logprob,
    policy_log_prob,
    sample_trajectories,
)
from crt.shielddiff.lora import LoRALinear, inject_lora, lora_parameters, merged_state, target_names
from crt.shielddiff.reward import ConceptScorer, RewardUnavailable, combine
from runners.spec import Family
from tests.crt.conftest import ROOT, changed_keys, crt_yaml, state_snapshot


def _toy_scheduler(steps: int = 5, train_steps: int = 100):
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(num_train_timesteps=train_steps, beta_start=0.001, beta_end=0.05,
                              beta_schedule="linear", clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    scheduler.set_timesteps(steps)
    return scheduler


def _hand_gaussian(scheduler, t: int, x: np.ndarray, eps: np.ndarray, eta: float) -> tuple[np.ndarray, float]:
    """DDIM's step mean and std written out from the DDIM paper's eq. 12 with numpy, from the raw betas."""
    betas = np.linspace(0.001, 0.05, scheduler.config.num_train_timesteps)
    abar = np.cumprod(1 - betas)
    prev = t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    a_t, a_prev = abar[t], (abar[prev] if prev >= 0 else abar[0])
    sigma = eta * math.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
    x0 = (x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
    return math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev - sigma ** 2) * eps, sigma


@pytest.mark.parametrize("eta", [1.0, 0.5])
def test_ddim_step_log_prob_is_the_gaussian_log_density_of_the_step(eta):
    scheduler = _toy_scheduler()
    gen = torch.Generator().manual_seed(0)
    x, eps, noise = (torch.randn(3, 2, 4, 4, generator=gen, dtype=torch.float64) for _ in range(3))
    for t in scheduler.timesteps.tolist():  # includes the last step, whose previous level is alphas_cumprod[0]
        sample, log_prob, mean, std = ddim_step_with_logprob(scheduler, eps, t, x, eta, noise=noise)
        hand_mean, hand_std = _hand_gaussian(scheduler, t, x.numpy(), eps.numpy(), eta)
        # the scheduler keeps alphas_cumprod in float32: agreement to ~1e-7
        np.testing.assert_allclose(mean.numpy(), hand_mean, rtol=1e-5, atol=1e-6)
        assert float(std) == pytest.approx(hand_std, rel=1e-5)
        # the sample is diffusers' own DDIM step with the same noise
        ref = scheduler.step(eps, t, x, eta=eta, variance_noise=noise).prev_sample
        torch.testing.assert_close(sample, ref, rtol=1e-5, atol=1e-6)  # diffusers steps in float32
        # log-density: scipy's per element, averaged over each sample's elements
        expected = norm.logpdf(sample.numpy(), loc=hand_mean, scale=hand_std).reshape(3, -1).mean(1)
        np.testing.assert_allclose(log_prob.numpy(), expected, rtol=1e-5, atol=1e-5)
        # scoring a given sample (training) gives the same value; per-sample timesteps are accepted
        again = ddim_step_with_logprob(scheduler, eps, torch.full((3,), t), x, eta, prev_sample=sample)[1]
        torch.testing.assert_close(again, log_prob)
    with pytest.raises(ValueError):
        ddim_step_with_logprob(scheduler, eps, 1, x, 0.0, noise=noise)


def test_clipped_surrogate_hand_values_and_gradients():
    advantages = torch.tensor([1.0, -1.0, 2.0, 0.5])
    ratio = torch.tensor([1.2, 1.2, 0.5, 1.05])
    old = torch.tensor([-1.0, 0.3, 2.0, 0.0])
    log_prob = (old + ratio.log()).requires_grad_(True)
    loss, info = clipped_surrogate(log_prob, old, advantages, clip_range=0.1)
    # max(-A r, -A clip(r)): A=1, r=1.2 -> max(-1.2, -1.1) = -1.1 (clipped); A=-1, r=1.2 -> max(1.2, 1.1) = 1.2;
    # A=2, r=0.5 -> max(-1.0, -1.8) = -1.0; A=0.5, r=1.05 (inside) -> -0.525
    assert loss.item() == pytest.approx((-1.1 + 1.2 - 1.0 - 0.525) / 4, abs=1e-6)
    loss.backward()
    # d/dlogp of -A r = -A r where the unclipped term is the max, 0 where the clipped (constant) one is
    expected = torch.tensor([0.0, 1.2, -1.0, -0.525]) / 4
    torch.testing.assert_close(log_prob.grad, expected, rtol=1e-5, atol=1e-6)
    assert info["clipfrac"] == pytest.approx(0.75)
    # at ratio 1 (first update after sampling) the gradient is the plain policy gradient -A / n
    lp = old.clone().requires_grad_(True)
    clipped_surrogate(lp, old, advantages, 1e-4)[0].backward()
    torch.testing.assert_close(lp.grad, -advantages / 4)


def test_per_prompt_advantages_use_the_buffer_once_full_and_the_batch_before():
    tracker = PerPromptStatTracker(buffer_size=4, min_count=3)
    prompts = ["a", "a", "b", "b"]
    adv, per_prompt = tracker.update(prompts, torch.tensor([1.0, 3.0, 10.0, 14.0]))
    batch_mean, batch_std = 7.0, float(np.std([1.0, 3.0, 10.0, 14.0]))
    torch.testing.assert_close(adv, (torch.tensor([1.0, 3.0, 10.0, 14.0]) - batch_mean) / (batch_std + 1e-6))
    assert not per_prompt.any()
    adv, per_prompt = tracker.update(["a", "b", "a"], torch.tensor([5.0, 12.0, 7.0]))
    # "a" now has [1, 3, 5, 7] (>= 3): its own mean 4, std sqrt(5); "b" has 3 = min_count: [10, 14, 12]
    a_std, b_std = float(np.std([1, 3, 5, 7])), float(np.std([10, 14, 12]))
    expected = torch.tensor([(5 - 4) / (a_std + 1e-6), 0.0, (7 - 4) / (a_std + 1e-6)])
    torch.testing.assert_close(adv, expected, rtol=1e-5, atol=1e-6)
    assert per_prompt.all()
    tracker.update(["a", "a"], torch.tensor([100.0, 100.0]))
    assert list(tracker.buffers["a"]) == [5.0, 7.0, 100.0, 100.0]  # the buffer keeps the last 4
    assert b_std > 0


def test_lora_is_a_zero_delta_at_init_and_merges_exactly():
    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    lora = LoRALinear(base, rank=2, alpha=4.0)
    x = torch.randn(3, 6)
    torch.testing.assert_close(lora(x), base(x))
    assert lora.delta().abs().max().item() == 0.0 and lora.down.abs().sum().item() > 0
    with torch.no_grad():
        lora.up.normal_()
    by_hand = x @ (base.weight + 2.0 * lora.up @ lora.down).T + base.bias
    torch.testing.assert_close(lora(x), by_hand)
    torch.testing.assert_close(lora.merged_weight(), base.weight + 2.0 * lora.up @ lora.down)


def test_only_the_lora_factors_train_on_the_sd_shaped_unet(sd14):
    import copy

    unet = copy.deepcopy(sd14.pipe.unet).float().requires_grad_(False)
    names = target_names(unet)
    assert names and all(n.split(".")[-1] in ("to_q", "to_k", "to_v") or n.endswith("to_out.0") for n in names)
    assert any(".attn1." in n for n in names) and any(".attn2." in n for n in names)
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    # 16x16 latents: the mid block's self-attention sees 2x2 tokens (at 1x1 its q, k get no gradient)
    x, t = torch.randn(2, 4, 16, 16), torch.tensor([500, 200])
    text = torch.randn(2, 77, unet.config.cross_attention_dim)
    with torch.no_grad():
        reference = unet(x, t, encoder_hidden_states=text).sample
    adapters = inject_lora(unet, rank=4, alpha=4.0, generator=torch.Generator().manual_seed(0))
    out = unet(x, t, encoder_hidden_states=text).sample
    torch.testing.assert_close(out, reference)  # zero delta at init, through the whole UNet
    params = lora_parameters(adapters)
    assert {id(p) for p in unet.parameters() if p.requires_grad} == {id(p) for p in params}
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    out.pow(2).mean().backward()
    optimizer.step()
    after = unet.state_dict()
    for key, value in before.items():  # every base tensor, now under ".base." where adapted, is unchanged
        module, _, leaf = key.rpartition(".")
        moved = f"{module}.base.{leaf}" if module in adapters else key
        assert torch.equal(after[moved], value), key
    assert all(a.up.abs().max().item() > 0 for a in adapters.values())
    assert set(merged_state(adapters)) == {f"{n}.weight" for n in names}


def test_reward_combines_concept_and_clip_with_their_signs():
    r = combine(torch.tensor([1.0, 0.0]), torch.tensor([0.2, 0.3]), w_concept=2.0, w_clip=0.5)
    torch.testing.assert_close(r, torch.tensor([-2.0 + 0.1, 0.15]))


def test_real_path_reward_fails_with_one_line_when_nudenet_is_missing(monkeypatch):
    import metrics.judges.nudenet as nudenet

    def missing():
        raise ImportError("No module named 'nudenet'")

    monkeypatch.setattr(nudenet, "_nudenet_module", missing)
    with pytest.raises(RewardUnavailable) as error:
        ShieldDiff(reward="nudenet").identity()
    message = str(error.value)
    assert "\n" not in message and "NudeNet" in message and "pip install nudenet" in message

    def no_weights():
        return SimpleNamespace(__file__=str(ROOT / "does-not-exist" / "__init__.py"),
                               NudeDetector=lambda: (_ for _ in ()).throw(FileNotFoundError("320n.onnx missing")))

    monkeypatch.setattr(nudenet, "_nudenet_module", no_weights)
    with pytest.raises(RewardUnavailable) as error:
        ShieldDiff(reward="nudenet").identity()
    assert "\n" not in str(error.value) and "320n.onnx" in str(error.value)


def test_yaml_parses_and_the_world_block_uses_the_world_reward_and_generator_clip():

    cfg = crt_yaml("shielddiff")
    ShieldDiffConfig(**{k: v for k, v in cfg["params"].items()})  # every param is a config field
    assert set(cfg["mini"]) <= set(cfg["params"])
    assert cfg["params"]["reward"] == "nudenet" and cfg["mini"]["reward"] == "world"
    assert cfg["mini"]["clip"] == "world/weights/clip"  # the run's evaluator is world/weights/clip_eval
    assert ShieldDiff.reconstruction and ShieldDiff.family is Family.WEIGHT_EDIT


class StandInScorer(ConceptScorer):
    """A tiny concept score for the SD-shaped test: the mean red level of the image (NudeNet is not needed)."""

    def __init__(self, concept=None, **options):
        self.options = options

    @classmethod
    def describe(cls, options):
        return {"kind": "reward", "name": "stand-in red level"}

    @property
    def identity(self):
        return self.describe(self.options)

    def scores(self, images):
        return torch.tensor([float(np.asarray(im)[..., 0].mean() / 255) for im in images])


def test_fit_and_apply_change_only_the_lora_targets(sd14, concept):
    pipe = sd14.pipe
    before = state_snapshot(pipe.unet)
    crt = ShieldDiff(reward="tests.crt.test_shielddiff.StandInScorer", clip=str(sd14.clip_dir), epochs=1,
                     prompts_per_epoch=2, samples_per_prompt=2, sample_steps=2, sample_batch_size=4,
                     train_batch_size=2, gradient_accumulation_steps=1, timestep_chunk=2, min_count=2, lr=1e-2,
                     clip_range=0.2, resolution=64)
    assert crt.identity()["reward"]["concept"]["name"] == "stand-in red level"
    ctx = FitContext(pipe=pipe, concept=concept, settings=sd14.settings, generate=sd14.generate)
    artifact = crt.fit(ctx)
    declared = crt.declared_parameters(pipe.unet)
    assert set(artifact.tensors) == declared
    assert not changed_keys(before, pipe.unet), "fit modified the base UNet"
    meta = artifact.meta
    assert meta["reward"]["concept"]["name"] == "stand-in red level" and len(meta["history"]) == 1
    assert meta["history"][0]["updates"] == 2 and meta["lora"]["delta_norm"] > 0
    assert meta["prompts"] == {"unacceptable": 3, "acceptable": 3}

    defended = crt.apply(pipe, artifact)
    assert defended.pipe.unet is not pipe.unet and defended.pipe.text_encoder is pipe.text_encoder
    changed = changed_keys(before, defended.pipe.unet)
    assert changed and changed <= declared
    assert not changed_keys(before, pipe.unet), "apply modified the base UNet"
    assert defended.exposes == OPEN_WEIGHTS and defended.filter is None
    image = sd14.generate([concept.prompt_set("target")[0]], pipe=defended.pipe)[0]
    assert image.size == (sd14.size, sd14.size)


def test_sampled_log_probs_are_recomputed_exactly_by_the_unchanged_policy(world):
    """Ratio 1 before the first update: the training pass reproduces the sampling pass's log-probabilities."""
    from diffusers import DDIMScheduler

    pipe = world.pipe
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(4)
    with torch.no_grad():
        cond = pipe.encode_prompt(["a nude circle", "a red square"], "cpu", 1, False)[0]
        uncond = pipe.encode_prompt([""], "cpu", 1, False)[0].expand(2, -1, -1)
    gen = torch.Generator().manual_seed(0)
    traj = sample_trajectories(pipe.unet, scheduler, torch.randn(2, 4, 8, 8, generator=gen), cond, uncond, 5.0, 1.0,
                               gen)
    assert traj.latents.shape == (2, 5, 4, 8, 8) and traj.log_probs.shape == (2, 4)
    rows, cols = torch.tensor([0, 1, 1]), torch.tensor([3, 0, 2])
    with torch.no_grad():
        again = policy_log_prob(pipe.unet, scheduler, traj.latents[rows, cols], traj.timesteps[cols],
                                traj.latents[rows, cols + 1], cond[rows], uncond[rows], 5.0, 1.0)
    torch.testing.assert_close(again, traj.log_probs[rows, cols], rtol=1e-5, atol=1e-5)
