"""DDPO (Black et al., arXiv 2305.13301), the policy-gradient core of ShieldDiff as crts.md §10 reconstructs it.

Sampling is DDIM with ``eta > 0``, so each denoising step is a Gaussian policy
``x_{t-1} ~ N(mu_theta(x_t, c, t), sigma_t^2 I)`` with DDIM's own mean and ``sigma_t = eta * sqrt(variance_t)``;
its log-density is averaged over the latent's elements (as Black et al.'s code does, which keeps ratios near 1 at
their clip range 1e-4). Training maximises the reward with the per-step clipped importance-sampling surrogate
``max(-A rho_t, -A clip(rho_t, 1 - eps, 1 + eps))``, ``rho_t = p_theta / p_old`` on the stored trajectory, with
``A`` the reward normalised per prompt (a buffer of recent rewards of the same prompt) or, until a prompt has
``min_count`` rewards, over the whole batch.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A scalar or per-sample (B,) tensor broadcast against ``like`` (B, ...)."""
    values = torch.as_tensor(values, device=like.device, dtype=like.dtype)
    return values.reshape(-1, *([1] * (like.ndim - 1))) if values.ndim else values


def ddim_step_with_logprob(scheduler: Any, eps: torch.Tensor, t: torch.Tensor | int, x_t: torch.Tensor, eta: float,
                           prev_sample: torch.Tensor | None = None, noise: torch.Tensor | None = None,
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One DDIM step as a Gaussian policy: ``(x_{t-1}, log p(x_{t-1} | x_t), mean, std)``.

    ``scheduler`` is a diffusers ``DDIMScheduler`` with its timesteps set (epsilon prediction); ``t`` a timestep or
    one per sample. Given ``prev_sample`` its log-probability is computed (training); otherwise it is drawn as
    ``mean + std * noise`` (``noise`` standard normal, required). The log-density is the mean over the latent's
    elements, one value per sample.
    """
    if eta <= 0:
        raise ValueError(f"DDPO needs a stochastic sampler: eta must be > 0, got {eta}")
    if scheduler.config.prediction_type != "epsilon":
        raise ValueError(f"DDPO here supports epsilon prediction only, got {scheduler.config.prediction_type!r}")
    t = torch.as_tensor(t, device=x_t.device).long()
    prev_t = t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    abar = scheduler.alphas_cumprod.to(x_t.device, torch.float64)
    final = torch.as_tensor(scheduler.final_alpha_cumprod, dtype=torch.float64, device=x_t.device)
    a_t = abar[t]
    a_prev = torch.where(prev_t >= 0, abar[prev_t.clamp(min=0)], final)
    variance = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
    std64 = eta * variance.sqrt()
    a_t, a_prev, std = (_per_sample(v, x_t) for v in (a_t, a_prev, std64))
    x0 = (x_t - (1 - a_t).sqrt() * eps) / a_t.sqrt()
    if scheduler.config.clip_sample:
        x0 = x0.clamp(-scheduler.config.clip_sample_range, scheduler.config.clip_sample_range)
    mean = a_prev.sqrt() * x0 + (1 - a_prev - std ** 2).clamp(min=0).sqrt() * eps
    if prev_sample is None:
        if noise is None:
            raise ValueError("pass prev_sample (to score it) or noise (to draw it)")
        prev_sample = mean + std * noise
    log_prob = -((prev_sample.detach() - mean) ** 2) / (2 * std ** 2) - std.log() - LOG_SQRT_2PI
    return prev_sample, log_prob.mean(dim=tuple(range(1, log_prob.ndim))), mean, std


def clipped_surrogate(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor,
                      clip_range: float) -> tuple[torch.Tensor, dict[str, float]]:
    """DDPO's loss ``mean(max(-A rho, -A clip(rho, 1 - eps, 1 + eps)))`` and diagnostics (clip fraction, approx KL)."""
    ratio = torch.exp(log_prob - old_log_prob)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    loss = torch.maximum(unclipped, clipped).mean()
    with torch.no_grad():
        info = {"clipfrac": float(((ratio - 1).abs() > clip_range).float().mean()),
                "approx_kl": float(0.5 * ((log_prob - old_log_prob) ** 2).mean())}
    return loss, info


class PerPromptStatTracker:
    """DDPO's advantage: per prompt, ``(r - mean) / (std + 1e-6)`` over a buffer of that prompt's last
    ``buffer_size`` rewards (this batch's included); while a prompt has fewer than ``min_count``, the whole batch's
    mean and std (the global fallback). Population std, as numpy's default."""

    def __init__(self, buffer_size: int, min_count: int):
        self.buffer_size, self.min_count = buffer_size, min_count
        self.buffers: dict[str, deque[float]] = {}

    def update(self, prompts: list[str], rewards: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Advantages for ``rewards`` (one per prompt occurrence) and a mask of those normalised per prompt."""
        rewards = rewards.double()
        advantages = torch.empty_like(rewards)
        per_prompt = torch.zeros(len(prompts), dtype=torch.bool)
        for prompt in dict.fromkeys(prompts):
            idx = torch.tensor([i for i, p in enumerate(prompts) if p == prompt])
            buffer = self.buffers.setdefault(prompt, deque(maxlen=self.buffer_size))
            buffer.extend(rewards[idx].tolist())
            if len(buffer) < self.min_count:
                mean, std = rewards.mean(), rewards.std(unbiased=False)
            else:
                stats = torch.tensor(list(buffer), dtype=torch.float64)
                mean, std = stats.mean(), stats.std(unbiased=False)
                per_prompt[idx] = True
            advantages[idx] = (rewards[idx] - mean) / (std + 1e-6)
        return advantages.float(), per_prompt


def guided_eps(unet: nn.Module, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor,
               guidance: float) -> torch.Tensor:
    """Classifier-free guided noise prediction (one UNet call on the doubled batch), in float32."""
    dtype = next(unet.parameters()).dtype
    t = torch.as_tensor(t, device=x_t.device).long()
    t = t.expand(len(x_t)) if t.ndim == 0 else t
    out = unet(torch.cat([x_t, x_t]).to(dtype), torch.cat([t, t]),
               encoder_hidden_states=torch.cat([uncond, cond]).to(dtype)).sample.float()
    eps_u, eps_c = out.chunk(2)
    return eps_u + guidance * (eps_c - eps_u)


@dataclass
class Trajectories:
    """Sampled DDIM trajectories: ``latents`` (B, T + 1, ...) from noise to x_0, ``log_probs`` (B, T) of each step
    under the sampling policy, the ``timesteps`` (T,) and each sample's text conditions."""

    latents: torch.Tensor
    log_probs: torch.Tensor
    timesteps: torch.Tensor
    cond: torch.Tensor
    uncond: torch.Tensor


@torch.no_grad()
def sample_trajectories(unet: nn.Module, scheduler: Any, noise: torch.Tensor, cond: torch.Tensor,
                        uncond: torch.Tensor, guidance: float, eta: float, generator: torch.Generator,
                        ) -> Trajectories:
    """DDIM from ``noise`` over ``scheduler.timesteps``, recording every latent and its log-probability."""
    x = noise * scheduler.init_noise_sigma
    latents, log_probs = [x], []
    for t in scheduler.timesteps:
        eps = guided_eps(unet, x, t.to(x.device), cond, uncond, guidance)
        step_noise = torch.randn(x.shape, generator=generator).to(x.device, x.dtype)
        x, log_prob, _, _ = ddim_step_with_logprob(scheduler, eps, t, x, eta, noise=step_noise)
        latents.append(x)
        log_probs.append(log_prob)
    return Trajectories(torch.stack(latents, 1), torch.stack(log_probs, 1), scheduler.timesteps.clone(), cond, uncond)


def policy_log_prob(unet: nn.Module, scheduler: Any, x_t: torch.Tensor, t: torch.Tensor, x_prev: torch.Tensor,
                    cond: torch.Tensor, uncond: torch.Tensor, guidance: float, eta: float) -> torch.Tensor:
    """log p_theta(x_prev | x_t, c) under the current UNet (differentiable in its trainable parameters)."""
    eps = guided_eps(unet, x_t, t, cond, uncond, guidance)
    return ddim_step_with_logprob(scheduler, eps, t, x_t, eta, prev_sample=x_prev)[1]
