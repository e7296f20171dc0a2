"""SDD, Safe self-Distillation Diffusion (Kim et al., arXiv 2307.05977; crts.md §6): the student UNet learns to
predict, for the removal concept, what it predicts for the empty prompt, on latents the EMA teacher generates.

Per step (official ``train_sdd.py``): ``k ~ U{0..S-1}`` (S = 50 DDIM steps); the EMA teacher denoises ``z_T`` for
``k`` DDIM steps (eta 0) at classifier-free guidance 3 on the comma-joined removal concepts; ``t ~ U[round(1000 (1 -
(k+1)/S)), round(1000 (1 - k/S)))``, the DDPM timesteps of that noise level; the loss is

    ``L = || sg(eps_student(z_t, t, '')) - eps_student(z_t, t, c_s) ||^2``   (per-element mean)

with ``c_s`` one removal concept (``iterative``: step ``s`` takes concept ``(s-1) mod n``). AdamW, grad-norm clip,
constant lr; after every optimiser step the teacher moves towards the student, ``ema = d ema + (1 - d) student``
(d = 0.999). The teacher, not the student, is the released model: the artifact holds the EMA weights of the
parameters ``finetuning_method`` trains (the other parameters are never updated, so their EMA is the base value).

Parity switch ``k0_full_denoise``: the official sampling loop breaks after step ``k``, which never happens for
``k = 0``, so 1 step in S pairs a *fully* denoised latent with ``t ~ 980-1000``; false (default) gives k = 0 its
meaning, the pure noise ``z_T``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from crt.base import Artifact, FitContext, TrainingState, UNetEdit, frozen_params
from crt.esd import _autocast, _encode, _eps, _summarise, partial_ddim
from crt_bench import progress
from crt_bench.spec import Family

FINETUNING_METHODS = ("xattn", "full", "selfattn", "noxattn", "notime")
CONCEPT_METHODS = ("iterative", "composite", "random")


@dataclass(frozen=True)
class SDDConfig:
    """Hyper-parameters; defaults are the official ``train_sdd.py`` / ``run_sdd_nudity.sh`` ones (crts.md §6)."""

    concepts: tuple[str, ...] | None = None  # the removal concepts; None = (the concept's c_u,)
    concept_method: Literal["iterative", "composite", "random"] = "iterative"  # which one is c_s at a step
    finetuning_method: Literal["xattn", "full", "selfattn", "noxattn", "notime"] = "xattn"
    num_train_steps: int = 1500
    lr: float = 1.0e-5
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1.0e-8
    weight_decay: float = 1.0e-4
    max_grad_norm: float = 1.0
    ema_decay: float = 0.999
    guidance_scale: float = 3.0  # CFG of the teacher's sampling of z_t
    num_ddim_steps: int = 50
    num_ddpm_steps: int = 1000
    batch_size: int = 1
    resolution: int | None = None  # pixels; None = the generation settings' height/width (the code: 512)
    k0_full_denoise: bool = False  # parity switch: the code's k = 0 (a fully denoised z_t); see the module docstring
    seed: int = 42  # run_sdd_nudity.sh
    mixed_precision: str | None = None  # None | "bf16" | "fp16" (autocast on the student; the code: fp32)
    gradient_checkpointing: bool = False
    log_every: int = 10


def trains_parameter(name: str, method: str) -> bool:
    """Whether ``finetuning_method`` trains the UNet parameter ``name`` (the official ``gather_parameters``: substring
    tests on diffusers names; ``noxattn`` / ``notime`` leave ``conv_out`` and the time embedding alone)."""
    if method == "full":
        return True
    if method == "selfattn":
        return "attn1" in name
    if method == "xattn":
        return "attn2" in name
    frozen_always = name.startswith("conv_out.") or "time_embed" in name
    if method == "noxattn":
        return not frozen_always and "attn2" not in name
    if method == "notime":
        return not frozen_always
    raise ValueError(f"SDD finetuning_method must be one of {FINETUNING_METHODS}, got {method!r}")


def trainable_names(unet: nn.Module, method: str) -> list[str]:
    """Names of the parameters ``finetuning_method`` trains, in ``named_parameters`` order."""
    return [n for n, _ in unet.named_parameters() if trains_parameter(n, method)]


def ddpm_interval(k: int, ddim_steps: int, ddpm_steps: int = 1000) -> tuple[int, int]:
    """``[lo, hi)`` of the DDPM timestep paired with a latent after ``k`` of ``ddim_steps`` DDIM steps, rounded as
    the official code rounds: ``round((1 - (k+1)/S) T)``, ``round((1 - k/S) T)``."""
    if not 0 <= k < ddim_steps:
        raise ValueError(f"k must be in 0..{ddim_steps - 1}, got {k}")
    return round((1 - (k + 1) / ddim_steps) * ddpm_steps), round((1 - k / ddim_steps) * ddpm_steps)


@torch.no_grad()
def ema_update(teacher: dict[str, torch.Tensor], student: dict[str, torch.Tensor], decay: float) -> None:
    """``teacher = decay * teacher + (1 - decay) * student``, in place, tensor by tensor of the same name."""
    for name, ema in teacher.items():
        ema.mul_(decay).add_(student[name].to(ema.device, ema.dtype), alpha=1 - decay)


def sdd_loss(student: nn.Module, z_t: torch.Tensor, t: torch.Tensor, uncond: torch.Tensor,
             removal: torch.Tensor) -> torch.Tensor:
    """``mse(sg(eps_student(z_t, t, '')), eps_student(z_t, t, c_s))``: the target is the student's own
    unconditional prediction, without gradient."""
    with torch.no_grad():
        target = _eps(student, z_t, t, uncond)
    return F.mse_loss(_eps(student, z_t, t, removal), target)


def removal_concept(concepts: tuple[str, ...], method: str, step: int, gen: torch.Generator) -> str:
    """The removal concept ``c_s`` of (1-based) ``step``: iterative = in turn, composite = all comma-joined, random =
    uniform (from ``gen``)."""
    if method == "iterative":
        return concepts[(step - 1) % len(concepts)]
    if method == "composite":
        return ", ".join(concepts)
    if method == "random":
        return concepts[int(torch.randint(len(concepts), (), generator=gen))]
    raise ValueError(f"SDD concept_method must be one of {CONCEPT_METHODS}, got {method!r}")


@dataclass
class SDDExample:
    """One step's input: the teacher's partially denoised latent, its DDPM timestep and how it was drawn."""

    z_t: torch.Tensor
    t: torch.Tensor
    k: int


class SDD(UNetEdit):
    """Safe self-distillation with an EMA teacher; see the module docstring."""

    name = "sdd"
    family = Family.WEIGHT_EDIT
    trains = "unet: every attn2 parameter (xattn; or full / selfattn / noxattn / notime); the EMA teacher is released"
    version = "1"
    config_class = SDDConfig

    @staticmethod
    def config_params(params: dict[str, Any]) -> dict[str, Any]:
        concepts = params.get("concepts")
        return frozen_params({**params, "concepts": [concepts] if isinstance(concepts, str) else concepts},
                             ("concepts",))

    def __init__(self, **params: Any):
        super().__init__(**params)
        cfg = self.config
        if cfg.finetuning_method not in FINETUNING_METHODS:
            raise ValueError(f"SDD finetuning_method must be one of {FINETUNING_METHODS}, "
                             f"got {cfg.finetuning_method!r}")
        if cfg.concept_method not in CONCEPT_METHODS:
            raise ValueError(f"SDD concept_method must be one of {CONCEPT_METHODS}, got {cfg.concept_method!r}")
        if cfg.concepts is not None and not cfg.concepts:
            raise ValueError("SDD concepts must name at least one concept (or be null for the concept's c_u)")

    def fit(self, ctx: FitContext) -> Artifact:
        cfg, pipe = self.config, ctx.pipe
        concepts = cfg.concepts or (ctx.concept.c_u,)
        device = pipe.unet.device
        student = copy.deepcopy(pipe.unet).float().requires_grad_(False)
        teacher = copy.deepcopy(student)  # the EMA model: samples z_t, and is what the artifact holds
        names = trainable_names(student, cfg.finetuning_method)
        trained = {n: p.requires_grad_(True) for n, p in student.named_parameters() if n in set(names)}
        ema = {n: p for n, p in teacher.named_parameters() if n in trained}
        if cfg.gradient_checkpointing:
            student.enable_gradient_checkpointing()
        optimizer = torch.optim.AdamW(list(trained.values()), lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                      eps=cfg.adam_epsilon, weight_decay=cfg.weight_decay)
        scaler = torch.amp.GradScaler(device.type, enabled=cfg.mixed_precision == "fp16")
        gen = torch.Generator().manual_seed(cfg.seed + ctx.seed)  # the run seed shifts the paper seed
        history: dict[str, list[Any]] = {"loss": [], "k": []}
        state = TrainingState({**{f"student.{n}": p for n, p in trained.items()},
                               **{f"teacher.{n}": p for n, p in ema.items()}}, optimizer, gen, scaler, history)
        start = state.resume(ctx, cfg.num_train_steps)  # examples draw from ``gen`` and the teacher: both restored
        uncond = _encode(pipe, [""] * cfg.batch_size, device)
        sampling_cond = _encode(pipe, [", ".join(concepts)] * cfg.batch_size, device)
        removal_conds: dict[str, torch.Tensor] = {}
        examples = self.examples(ctx, teacher, sampling_cond, uncond, gen)
        for step in range(start + 1, cfg.num_train_steps + 1):
            example = next(examples)
            text = removal_concept(concepts, cfg.concept_method, step, gen)
            if text not in removal_conds:
                removal_conds[text] = _encode(pipe, [text] * cfg.batch_size, device)
            with _autocast(device, cfg.mixed_precision):
                loss = sdd_loss(student, example.z_t, example.t, uncond, removal_conds[text])
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            if cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(list(trained.values()), cfg.max_grad_norm)
            scaler.step(optimizer)
            scaler.update()
            ema_update(ema, trained, cfg.ema_decay)
            if not math.isfinite(loss.item()):
                raise FloatingPointError(f"SDD loss is {loss.item()} at step {step}")
            history["loss"].append(loss.item())
            history["k"].append(example.k)
            progress.step(total=cfg.num_train_steps, loss=history["loss"][-1])
            ctx.checkpoint(step, state.snapshot, cfg.num_train_steps)
        tensors = {n: p.detach().float().cpu().clone() for n, p in ema.items()}
        return Artifact(tensors=tensors, meta={
            "config": asdict(cfg), "concepts": list(concepts), "sampling_prompt": ", ".join(concepts),
            "released": "EMA teacher", "trained_parameters": len(tensors),
            "trained_numel": sum(t.numel() for t in tensors.values()),
            "loss": _summarise(history["loss"], cfg.log_every),
            "objective": "||sg(eps_theta(z_t, t, '')) - eps_theta(z_t, t, c_s)||^2, z_t from the EMA teacher",
            "k0_draws": history["k"].count(0)})

    def examples(self, ctx: FitContext, teacher: nn.Module, cond: torch.Tensor, uncond: torch.Tensor,
                 gen: torch.Generator) -> Iterator[SDDExample]:
        """Endless examples: ``k`` uniform in 0..S-1, ``z_t`` after ``k`` guided DDIM steps of the (current) EMA
        teacher from fresh noise, ``t`` uniform in k's DDPM interval."""
        from diffusers import DDIMScheduler

        cfg, pipe = self.config, ctx.pipe
        scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        scheduler.set_timesteps(cfg.num_ddim_steps)
        height = (cfg.resolution or ctx.settings.height) // pipe.vae_scale_factor
        width = (cfg.resolution or ctx.settings.width) // pipe.vae_scale_factor
        shape = (cfg.batch_size, pipe.unet.config.in_channels, height, width)
        device = pipe.unet.device
        while True:
            k = int(torch.randint(cfg.num_ddim_steps, (), generator=gen))
            lo, hi = ddpm_interval(k, cfg.num_ddim_steps, cfg.num_ddpm_steps)
            t = torch.randint(lo, hi, (cfg.batch_size,), generator=gen).to(device)
            z_t = torch.randn(shape, generator=gen).to(device) * scheduler.init_noise_sigma
            z_t = partial_ddim(teacher, scheduler, z_t, sampled_steps(k, cfg), cond, uncond, cfg.guidance_scale)
            yield SDDExample(z_t=z_t, t=t, k=k)


def sampled_steps(k: int, cfg: SDDConfig) -> int:
    """How many DDIM steps the teacher takes for ``k``: ``k``, or all of them for k = 0 under ``k0_full_denoise``."""
    return cfg.num_ddim_steps if cfg.k0_full_denoise and k == 0 else k

