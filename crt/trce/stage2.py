"""TRCE stage 2: contrastive steering of the early denoising steps (crts.md §9, official
``stage2_data_preparation.py`` + ``run_trce_stage2.py``).

Data: DDIM trajectories of the base UNet on every malicious prompt (CFG 3, several seeds; only the early steps are
kept) and on the empty prompt (the regulariser). Training starts from the stage-1 UNet and updates every ``attn1``
parameter and ``attn2.to_q``. One iteration takes one malicious trajectory at an early step s, with the original
(reference) UNet's ``prefer = e_safe + g (e_safe - e_0)`` and ``reject = e_mal + g (e_mal - e_0)``:

``L_tgt = 1/2 sum_{c in {c_mal, ''}} max(0, beta (MSE(e_theta(x, c), prefer) - MSE(e_theta(x, c), reject) + m))``

plus ``reg_scale`` x the mean MSE between the trained and the stage-1 UNet's unconditional predictions on
``reg_batch`` unconditional trajectories at a random step. The iteration order is the official one: ``epochs``
passes over the malicious trajectories (pair by pair, seed by seed), the regulariser of iteration i taking the
unconditional trajectories ``i * reg_batch + j`` (i counted within the epoch, as the official loop does).

``parity`` replicates the official code: gradients are never zeroed (they accumulate across steps), the latent
stored for step s is the one after the step (paired with the step's own timestep t_s), the regulariser's step is
drawn from 0..S with S skipped (still counted in the mean), and its running sum starts at 0.01. The default zeroes
gradients every step, pairs x_{t_s} with t_s and draws the regulariser's step from 0..S-1.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from crt_bench import progress


@dataclass(frozen=True)
class Stage2Config:
    """Defaults of the official sexual configuration (``stage2_sexual_default.yaml``, data preparation)."""

    trajectory_template: str = "a photo of {}"  # applied to both sides of each pair
    seeds_per_prompt: int = 5
    trajectory_guidance: float = 3.0
    uncond_trajectories: int = 2000
    ddim_steps: int = 50
    max_early_step: int = 25  # s drawn from 0..max_early_step (inclusive)
    epochs: int = 3
    lr: float = 1.0e-6
    weight_decay: float = 0.01
    guidance: float = 15.0  # g of prefer / reject
    beta: float = 1.0
    margin: float = 0.01
    reg_scale: float = 100.0
    reg_batch: int = 4
    resolution: int | None = None  # pixels; None = the generation settings
    log_every: int = 10


def stage2_names(unet: nn.Module) -> list[str]:
    """Every ``attn1`` parameter and ``attn2.to_q`` (official selection), in ``named_parameters`` order."""
    return [n for n, _ in unet.named_parameters() if ".attn1." in f".{n}" or ".attn2.to_q." in f".{n}"]


def margin_loss(pred: torch.Tensor, prefer: torch.Tensor, reject: torch.Tensor, beta: float,
                margin: float) -> torch.Tensor:
    """Per sample ``max(0, beta (MSE(pred, prefer) - MSE(pred, reject) + margin))``, MSE over C, H, W."""
    dims = tuple(range(1, pred.dim()))
    closer = (pred - prefer).pow(2).mean(dim=dims)
    farther = (pred - reject).pow(2).mean(dim=dims)
    return torch.clamp(beta * (closer - farther + margin), min=0)


def guided(eps_c: torch.Tensor, eps_0: torch.Tensor, g: float) -> torch.Tensor:
    """``eps_c + g (eps_c - eps_0)``: the official prefer/reject targets."""
    return eps_c + g * (eps_c - eps_0)


def predict(unet: nn.Module, latents: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
    """The UNet's noise prediction in float32, inputs cast to its dtype; ``cond`` broadcast over the batch."""
    dtype = next(unet.parameters()).dtype
    cond = cond.expand(latents.shape[0], -1, -1) if cond.shape[0] == 1 else cond
    return unet(latents.to(dtype), t, encoder_hidden_states=cond.to(dtype)).sample.float()


@torch.no_grad()
def ddim_trajectory(unet: nn.Module, scheduler: Any, latents: torch.Tensor, steps: int, cond: torch.Tensor,
                    uncond: torch.Tensor | None, guidance: float) -> list[torch.Tensor]:
    """``[x before step 0, x after step 0, ..., x after step steps-1]`` (CPU); ``uncond`` None = no guidance."""
    out = [latents.cpu()]
    for t in scheduler.timesteps[:steps]:
        if uncond is None:
            eps = predict(unet, latents, t, cond)
        else:
            eps_u, eps_c = predict(unet, torch.cat([latents, latents]), t, torch.cat([uncond, cond])).chunk(2)
            eps = eps_u + guidance * (eps_c - eps_u)
        latents = scheduler.step(eps, t, latents.float()).prev_sample
        out.append(latents.cpu())
    return out


def stored_index(step: int, parity: bool) -> int:
    """Which trajectory entry is the sample of DDIM step ``step``: x_{t_s} (default) or the latent after the step
    (official code, ``parity``), both paired with t_s."""
    return step + 1 if parity else step


@dataclass
class Plan:
    """Every random choice of the training loop, drawn up front so only the needed latents are generated."""

    neg: list[tuple[int, int]] = field(default_factory=list)  # per iteration: (trajectory, step)
    reg: list[list[tuple[int, int] | None]] = field(default_factory=list)  # per iteration: (trajectory, step) | skip


def make_plan(n_neg: int, cfg: Stage2Config, parity: bool, gen: torch.Generator) -> Plan:
    """The official schedule: ``epochs`` passes over the malicious trajectories in order; the regulariser of the
    i-th iteration of an epoch uses unconditional trajectories ``(i * reg_batch + j) mod uncond_trajectories``."""
    plan = Plan()
    top = cfg.ddim_steps if parity else cfg.ddim_steps - 1  # parity: randint(0, S) and the step S is skipped
    for _ in range(cfg.epochs):
        for i in range(n_neg):
            plan.neg.append((i, int(torch.randint(cfg.max_early_step + 1, (), generator=gen))))
            regs: list[tuple[int, int] | None] = []
            for j in range(cfg.reg_batch):
                step = int(torch.randint(top + 1, (), generator=gen))
                regs.append(None if step >= cfg.ddim_steps else ((i * cfg.reg_batch + j) % cfg.uncond_trajectories,
                                                                step))
            plan.reg.append(regs)
    return plan


@dataclass
class Sample:
    """A latent, its timestep and (for the target term) the pair's text conditions."""

    x: torch.Tensor
    t: torch.Tensor
    neg: torch.Tensor | None = None
    safe: torch.Tensor | None = None


def optimizer_step(optimizer: torch.optim.Optimizer, loss: torch.Tensor, parity: bool) -> None:
    """One update. The official loop never calls ``zero_grad`` (gradients accumulate); ``parity`` replicates it."""
    if not parity:
        optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def steer(ft: nn.Module, ref: nn.Module, reg: nn.Module, optimizer: torch.optim.Optimizer, uncond: torch.Tensor,
          targets: Sequence[Sample], regs: Sequence[Sequence[Sample | None]], cfg: Stage2Config,
          parity: bool, history: dict[str, list[float]] | None = None, start: int = 0,
          after_step: Callable[[int], None] | None = None) -> dict[str, list[float]]:
    """The training loop over prepared samples: ``targets[k]`` with the regulariser samples ``regs[k]``, from
    iteration ``start`` (a resumed fit, ``history`` holding the earlier ones); ``after_step(k + 1)`` after each."""
    history = {"target": [], "reg": [], "loss": []} if history is None else history
    for k, (sample, batch) in enumerate(zip(targets, regs)):
        if k < start:
            continue
        x, t = sample.x, sample.t
        with torch.no_grad():
            eps_n, eps_s, eps_0 = predict(ref, torch.cat([x, x, x]), t, torch.cat([sample.neg, sample.safe, uncond])
                                          ).chunk(3)
            prefer, reject = guided(eps_s, eps_0, cfg.guidance), guided(eps_n, eps_0, cfg.guidance)
        pred = predict(ft, torch.cat([x, x]), t, torch.cat([sample.neg, uncond]))
        target = margin_loss(pred, torch.cat([prefer, prefer]), torch.cat([reject, reject]), cfg.beta,
                             cfg.margin).mean()
        kept = [s for s in batch if s is not None]
        reg_sum = torch.tensor(0.01 if parity else 0.0, device=x.device)
        if kept:  # one batch: the sum of per-sample MSEs, as the official per-sample loop adds them
            xs, ts = torch.cat([s.x for s in kept]), torch.stack([s.t.reshape(()) for s in kept])
            with torch.no_grad():
                anchor = predict(reg, xs, ts, uncond)
            reg_sum = reg_sum + (predict(ft, xs, ts, uncond) - anchor).pow(2).flatten(1).mean(dim=1).sum()
        reg_loss = reg_sum / max(len(batch), 1)
        loss = target + cfg.reg_scale * reg_loss
        optimizer_step(optimizer, loss, parity)
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"TRCE stage-2 loss is {loss.item()} at step {k}")
        history["target"].append(target.item())
        history["reg"].append(reg_loss.item())
        history["loss"].append(loss.item())
        progress.step(total=len(targets), loss=history["loss"][-1])
        if after_step is not None:
            after_step(k + 1)
    return history


@torch.no_grad()
def prepare_samples(pipe: Any, pairs: Sequence[tuple[str, str]], cfg: Stage2Config, plan: Plan, parity: bool,
                    size: tuple[int, int], gen: torch.Generator, encode: Any) -> tuple[list[Sample],
                                                                                         list[list[Sample | None]],
                                                                                         torch.Tensor, dict[str, Any]]:
    """Generate the trajectories the plan needs with the base UNet and turn the plan into samples."""
    from diffusers import DDIMScheduler

    unet, device = pipe.unet, pipe.unet.device
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(cfg.ddim_steps)
    timesteps = scheduler.timesteps
    shape = (1, unet.config.in_channels, size[0] // pipe.vae_scale_factor, size[1] // pipe.vae_scale_factor)
    prompts = [(cfg.trajectory_template.format(u), cfg.trajectory_template.format(s)) for u, s in pairs]
    neg_states = encode([p[0] for p in prompts])
    safe_states = encode([p[1] for p in prompts])
    uncond = encode([""])
    keep = cfg.max_early_step + 1 + int(parity)  # entries 0..stored_index(max_early_step)
    trajectories: list[tuple[int, list[torch.Tensor]]] = []
    for p in range(len(prompts)):
        for _ in range(cfg.seeds_per_prompt):
            noise = torch.randn(shape, generator=gen).to(device) * scheduler.init_noise_sigma
            path = ddim_trajectory(unet, scheduler, noise, keep - 1, neg_states[p:p + 1], uncond,
                                   cfg.trajectory_guidance)
            trajectories.append((p, path))
    needed: dict[int, int] = {}
    for batch in plan.reg:
        for entry in batch:
            if entry is not None:
                needed[entry[0]] = max(needed.get(entry[0], 0), stored_index(entry[1], parity))
    uncond_paths: dict[int, list[torch.Tensor]] = {}
    for u in range(max(needed, default=-1) + 1):
        noise = torch.randn(shape, generator=gen) * scheduler.init_noise_sigma  # drawn for every index: stable seeds
        if u in needed:
            uncond_paths[u] = ddim_trajectory(unet, scheduler, noise.to(device), needed[u], uncond, None, 0.0)
    targets = []
    for traj, step in plan.neg:
        p, path = trajectories[traj]
        targets.append(Sample(path[stored_index(step, parity)].to(device), timesteps[step].to(device),
                              neg_states[p:p + 1], safe_states[p:p + 1]))
    regs = [[None if e is None else Sample(uncond_paths[e[0]][stored_index(e[1], parity)].to(device),
                                           timesteps[e[1]].to(device)) for e in batch] for batch in plan.reg]
    info = {"target_trajectories": len(trajectories), "uncond_trajectories_used": len(uncond_paths),
            "steps_kept": keep, "example_prompts": list(prompts[0]),
            "timesteps_early": [int(timesteps[0]), int(timesteps[cfg.max_early_step])]}
    return targets, regs, uncond, info


def trainable_copy(unet: nn.Module, names: set[str]) -> nn.Module:
    """A float32 copy with only ``names`` requiring gradients."""
    ft = copy.deepcopy(unet).float().requires_grad_(False)
    for n, p in ft.named_parameters():
        p.requires_grad_(n in names)
    return ft


def summarise(history: list[float], every: int) -> list[float]:
    """Means over windows of ``every`` steps."""
    return [sum(history[i:i + every]) / len(history[i:i + every]) for i in range(0, len(history), every)]
