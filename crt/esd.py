"""ESD (Gandikota et al., ICCV 2023): fine-tune the UNet so that the concept's conditional noise prediction points
away from the concept by negative guidance on the frozen model. With ``delta = eps_0(x_t, c) - eps_0(x_t, '')`` the
two official versions write the target differently (crts.md §2), ``target`` picks one:

- ``new`` (diffusers code, default): ``eps_0(x_t, c) - eta * delta`` with eta = 2;
- ``old`` (CompVis code, the paper): ``eps_0(x_t, '') - eta * delta`` with eta = 1.

Both push by ``1 * delta`` away from the unconditional prediction; ``eta`` null takes the version's own value, so
the new code's 2 is never combined with the old code's first term (a 2x push).

One module, two variants chosen by ``method``: ``x`` trains every parameter of the cross-attention layers
(``attn2``), ``u`` every Linear/Conv module outside them (the new official code's ``esd-u``; norms are not trained).
``x_t`` comes from partial DDIM sampling with the frozen base UNet (new code), ``t`` from the DDPM bin that has the
same noise level as ``x_t``. The artifact is the trained parameters only.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from crt.base import CRT, OPEN_WEIGHTS, Artifact, DefendedModel, FitContext, TrainingState, edited_copy, replace_module
from crt_bench import progress
from crt_bench.backbone import UNET_FAMILY, Condition, concat, encode_text, unet_output
from crt_bench.spec import Family

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# per official version: the first term of the target, and the eta that version uses with it
TARGET_FIRST_TERM = {"new": "eps_0(x_t, c, t)", "old": "eps_0(x_t, '', t)"}
DEFAULT_ETA = {"new": 2.0, "old": 1.0}


@dataclass(frozen=True)
class ESDConfig:
    """Hyper-parameters; defaults are the new official code's (crts.md §2) except ``resolution`` (null = settings)."""

    method: Literal["x", "u"] = "x"
    concept: str | None = None  # text to erase; None = the concept's c_u
    iterations: int = 200
    lr: float = 5e-5
    target: Literal["new", "old"] = "new"  # whose target formula; see the module docstring
    eta: float | None = None  # negative guidance; None = the target version's own (new 2, old 1)
    start_guidance: float = 3.0
    ddim_steps: int = 50
    batch_size: int = 1
    resolution: int | None = None  # pixels; None = the generation settings' height/width
    seed: int = 0
    mixed_precision: str | None = None  # None | "bf16" | "fp16" (autocast on the trained copy)
    gradient_checkpointing: bool = False
    log_every: int = 10


def resolve_eta(target: str, eta: float | None) -> float:
    """``eta`` as given, or the one the ``target`` version uses."""
    if target not in DEFAULT_ETA:
        raise ValueError(f"ESD target must be 'new' or 'old', got {target!r}")
    return DEFAULT_ETA[target] if eta is None else float(eta)


def target_formula(target: str, eta: float) -> dict[str, Any]:
    """The target as text plus its effective push along ``delta`` (1 for both official settings); for the meta."""
    push = eta - 1.0 if target == "new" else eta
    return {"target": target, "eta": eta, "push": push,
            "formula": f"{TARGET_FIRST_TERM[target]} - {eta:g} * (eps_0(x_t, c, t) - eps_0(x_t, '', t))"}


def trainable_names(unet: nn.Module, method: str) -> list[str]:
    """Names of the parameters the variant trains, in ``named_parameters`` order."""
    if method == "x":
        return [n for n, _ in unet.named_parameters() if ".attn2." in f".{n}"]
    if method == "u":
        names = []
        for module_name, module in unet.named_modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)) and ".attn2." not in f".{module_name}.":
                names += [f"{module_name}.{p}" for p, _ in module.named_parameters(recurse=False)]
        return names
    raise ValueError(f"ESD method must be 'x' or 'u', got {method!r}")


def ddpm_bin(scheduler: Any, k: int) -> tuple[int, int]:
    """The DDPM timesteps ``[lo, hi)`` around the noise level of the latent after ``k`` DDIM steps of ``scheduler``.

    The bin is the DDIM stride that holds ``scheduler.timesteps[k]``; with 50 steps over 1000 and SD's offset of 1
    it is the official ``[1000 (1 - (k+1)/50), 1000 (1 - k/50))``, and it stays right for step counts that do not
    divide 1000.
    """
    train_steps = scheduler.config.num_train_timesteps
    stride = train_steps // scheduler.num_inference_steps
    lo = max(int(scheduler.timesteps[k]) - scheduler.config.steps_offset, 0)
    return lo, min(lo + stride, train_steps)


def _eps(unet: nn.Module, latents: torch.Tensor, t: torch.Tensor | int, cond: Condition) -> torch.Tensor:
    """The UNet's prediction in float32, inputs cast to the UNet's dtype (ESD's target is linear in the predictions,
    so it holds for v-prediction models as it is)."""
    dtype = next(unet.parameters()).dtype
    return unet_output(unet, latents.to(dtype), t, cond).float()


@torch.no_grad()
def partial_ddim(unet: nn.Module, scheduler: Any, latents: torch.Tensor, k: int, cond: Condition,
                 uncond: Condition, guidance: float) -> torch.Tensor:
    """The first ``k`` DDIM steps (classifier-free guidance) from ``latents``; ``scheduler`` has its timesteps set."""
    for t in scheduler.timesteps[:k]:
        both = _eps(unet, torch.cat([latents, latents]), t, concat([uncond, cond]))
        eps_u, eps_c = both.chunk(2)
        latents = scheduler.step(eps_u + guidance * (eps_c - eps_u), t, latents).prev_sample
    return latents


@torch.no_grad()
def esd_target(frozen: nn.Module, x_t: torch.Tensor, t: torch.Tensor, cond: Condition, uncond: Condition,
               eta: float, target: str = "new") -> torch.Tensor:
    """The frozen base UNet's target: ``first - eta * (eps_0(c) - eps_0(''))``, ``first`` = ``eps_0(c)`` (new code)
    or ``eps_0('')`` (old code)."""
    both = _eps(frozen, torch.cat([x_t, x_t]), torch.cat([t, t]), concat([uncond, cond]))
    eps_u, eps_c = both.chunk(2)
    if target == "new":
        return eps_c - eta * (eps_c - eps_u)
    if target == "old":
        return eps_u - eta * (eps_c - eps_u)
    raise ValueError(f"ESD target must be 'new' or 'old', got {target!r}")


@dataclass
class ESDBatch:
    """One training example: a partially denoised latent, its DDPM timestep and the two text conditions."""

    x_t: torch.Tensor
    t: torch.Tensor
    cond: Condition
    uncond: Condition


def esd_loss(unet: nn.Module, frozen: nn.Module, batch: ESDBatch, eta: float, target: str = "new") -> torch.Tensor:
    """MSE between the trained UNet's conditional prediction and the frozen target."""
    goal = esd_target(frozen, batch.x_t, batch.t, batch.cond, batch.uncond, eta, target)
    return F.mse_loss(_eps(unet, batch.x_t, batch.t, batch.cond), goal)


class ESD(CRT):
    """ESD-x / ESD-u; see the module docstring."""

    name = "esd"
    family = Family.WEIGHT_EDIT
    exposes = OPEN_WEIGHTS  # an edit of a public model: its weights and the unerased base
    trains = "unet: attn2 (x) or Linear/Conv outside attn2 (u)"
    version = "2"  # 2: the target follows one official version (1 mixed the old first term with the new eta: 2 delta)
    backbones = UNET_FAMILY

    def __init__(self, **params: Any):
        super().__init__(**params)
        self.config = ESDConfig(**params)
        if self.config.method not in ("x", "u"):
            raise ValueError(f"ESD method must be 'x' or 'u', got {self.config.method!r}")
        self.eta = resolve_eta(self.config.target, self.config.eta)
        self.name = f"esd_{self.config.method}"  # two variants, two names in results and leaderboards

    def fit(self, ctx: FitContext) -> Artifact:
        cfg = self.config
        frozen = ctx.pipe.unet
        device = frozen.device
        text = cfg.concept or ctx.concept.c_u
        cond = _encode(ctx.pipe, [text] * cfg.batch_size, device)
        uncond = _encode(ctx.pipe, [""] * cfg.batch_size, device)
        unet, names = _trainable_copy(frozen, cfg)
        params = [p for n, p in unet.named_parameters() if n in names]
        optimizer = torch.optim.Adam(params, lr=cfg.lr)
        scaler = torch.amp.GradScaler(device.type, enabled=cfg.mixed_precision == "fp16")
        gen = torch.Generator().manual_seed(cfg.seed + ctx.seed)  # the run seed shifts the paper seed
        history: list[float] = []
        training = TrainingState({n: p for n, p in unet.named_parameters() if n in names}, optimizer, gen, scaler,
                                 history)
        start = training.resume(ctx, cfg.iterations)  # the batches draw from ``gen``: restored, they go on
        for step, batch in zip(range(start, cfg.iterations), self._batches(ctx, cond, uncond, gen)):
            with _autocast(device, cfg.mixed_precision):
                loss = esd_loss(unet, frozen, batch, self.eta, cfg.target)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            if not math.isfinite(loss.item()):
                raise FloatingPointError(f"ESD loss is {loss.item()} at step {step}")
            history.append(loss.item())
            progress.step(total=cfg.iterations, loss=history[-1])
            ctx.checkpoint(step + 1, training.snapshot, cfg.iterations)
        tensors = {n: p.detach().float().cpu().clone() for n, p in unet.named_parameters() if n in names}
        meta = {"config": asdict(cfg), "concept_text": text, "trained_parameters": len(tensors),
                "trained_numel": sum(t.numel() for t in tensors.values()), "loss": _summarise(history, cfg.log_every),
                "target": target_formula(cfg.target, self.eta),
                "sampling": "partial DDIM with the frozen base UNet (new official code)"}
        return Artifact(tensors=tensors, meta=meta)

    def _batches(self, ctx: FitContext, cond: Condition, uncond: Condition,
                 gen: torch.Generator) -> Iterator[ESDBatch]:
        """Endless ESD examples: k uniform in 0..S-1, ``x_t`` after k DDIM steps, ``t`` uniform in k's DDPM bin."""
        cfg, pipe = self.config, ctx.pipe
        from diffusers import DDIMScheduler

        scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        scheduler.set_timesteps(cfg.ddim_steps)
        size = cfg.resolution or ctx.settings.height
        width = cfg.resolution or ctx.settings.width
        shape = (cfg.batch_size, pipe.unet.config.in_channels, size // pipe.vae_scale_factor,
                 width // pipe.vae_scale_factor)
        device = pipe.unet.device
        while True:
            k = int(torch.randint(cfg.ddim_steps, (), generator=gen))
            latents = torch.randn(shape, generator=gen).to(device) * scheduler.init_noise_sigma
            x_t = partial_ddim(pipe.unet, scheduler, latents, k, cond, uncond, cfg.start_guidance)
            lo, hi = ddpm_bin(scheduler, k)
            t = torch.randint(lo, hi, (cfg.batch_size,), generator=gen).to(device)
            yield ESDBatch(x_t=x_t, t=t, cond=cond, uncond=uncond)

    def apply(self, pipe: Any, artifact: Artifact) -> DefendedModel:
        unet = edited_copy(pipe.unet, artifact.tensors)
        return DefendedModel(pipe=replace_module(pipe, "unet", unet), crt_name=self.name, exposes=self.exposes)


def _encode(pipe: Any, texts: list[str], device: torch.device) -> Condition:
    """The pipeline's own conditioning: token states on SD 1.x / 2.x, with the pooled embedding on SDXL."""
    with torch.no_grad():
        cond = encode_text(pipe, texts)
    return cond if cond.pooled is not None else cond.hidden.to(device)


def _trainable_copy(frozen: nn.Module, cfg: ESDConfig) -> tuple[nn.Module, set[str]]:
    """A float32 copy of the UNet with only the variant's parameters requiring gradients."""
    unet = copy.deepcopy(frozen).float().requires_grad_(False)
    names = set(trainable_names(unet, cfg.method))
    for n, p in unet.named_parameters():
        p.requires_grad_(n in names)
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    return unet, names


def _autocast(device: torch.device, mixed_precision: str | None):
    if mixed_precision is None:
        return nullcontext()
    return torch.autocast(device.type, dtype=AMP_DTYPES[mixed_precision])


def _summarise(history: list[float], every: int) -> dict[str, Any]:
    """Loss means over windows of ``every`` steps, enough to see whether training moved."""
    windows = [history[i:i + every] for i in range(0, len(history), every)]
    return {"steps": len(history), "window": every, "mean_per_window": [sum(w) / len(w) for w in windows]}
