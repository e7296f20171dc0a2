"""SafeGen (Li et al., CCS 2024): text-agnostic removal of sexual content by fine-tuning only the UNet's self-attention
layers (``attn1``, which see the image and never the text) on image triplets <nude, mosaic of it, benign>.

Loss of one micro-batch (official ``examples/text_to_image/train_text_to_image_adjust_sal.py``, crts.md §15), every
image with the EMPTY prompt and one timestep t shared by the triplet::

    L = w_m * mse(eps_theta(x_t^nude, ''), z_nude - z_mosaic + eps)   (the nude latent denoised towards its mosaic)
      + w_p * mse(eps_theta(x_t^benign, ''), eps')                    (benign images denoised as before)

``x_t^nude = sqrt(a_t) z_nude + sqrt(1 - a_t) eps``; for a v-prediction model the targets are the velocities of
``z_nude - z_mosaic`` and ``z_benign`` (the code's own branch). The code's target is not rescaled by the noise
schedule: the x0 it implies is ``z_nude - sqrt((1 - a_t) / a_t) (z_nude - z_mosaic)``, the mosaic only where
``a_t = 1/2``; kept as the code writes it (:func:`mosaic_target`).

Official recipe (``run_adjust_SD.sh``): batch 1, gradient accumulation 5 (the gradient of the micro-batch mean),
1000 optimiser steps, AdamW (diffusers defaults: betas 0.9/0.999, weight decay 1e-2, eps 1e-8) at a constant lr 1e-5
(the script's 200 warm-up steps are ignored by the "constant" schedule), grad-norm clip 1, EMA of the UNet (diffusers
``EMAModel`` defaults; the saved model is the EMA), fp16. Loss weights: the script passes ``--weight_tune 0.1
--weight_preserve 0.9`` but the training script has no ``--weight_tune`` (its mosaic weight is ``--weight_mosaic``,
default 0.5), so the shipped command stops at argument parsing. ``weight_mosaic`` 0.1 follows the script's intent;
``weight_mosaic_parity`` uses the 0.5 that the code falls back to once the unknown flag is dropped.

Reconstructed (:attr:`SafeGen.reconstruction`): the official triplets are 100 real photos whose mosaics the
anti-deepnude classifier's heat-map regions made; here the nude and benign images come from the base model
(``ctx.generate`` of the concept's ``finetune_unacceptable`` / ``finetune_acceptable`` prompts) and the mosaic
(:func:`mosaic`) covers the whole image, with anti-deepnude's geometry (cells of 1/50 of the image side, each the
mean of a window of 6 cells, 60 px at 512) scaled to the image size.
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from crt.base import Artifact, FitContext, TrainingState, UNetEdit, pil_to_pixels
from crt.ca import _posterior
from crt.esd import _autocast, _encode, _eps, _summarise
from crt.sa import cycled_items
from crt_bench import progress
from crt_bench.spec import Family

# anti-deepnude (bbox_blur.img_blur_2) at SD's 512 px: a cell every max(w, h) / 50 = 10 px, each filled with the mean
# of the +-3 cells around it (a 60 px window); as fractions of the image side so that they scale to any size
MOSAIC_CELL_FRACTION = 10 / 512
MOSAIC_WINDOW_FRACTION = 60 / 512
CODE_DEFAULT_WEIGHT_MOSAIC = 0.5  # --weight_mosaic's argparse default


@dataclass(frozen=True)
class SafeGenConfig:
    """Hyper-parameters; defaults are the official run script's (``run_adjust_SD.sh``) and the code's."""

    unsafe_set: str = "finetune_unacceptable"  # prompts of the nude images
    benign_set: str = "finetune_acceptable"  # prompts of the benign images
    num_triplets: int = 100  # the script's data/triplets/100photos
    mosaic_cell: int | None = None  # pixels; None = 1/50 of the image side (anti-deepnude), at least 1
    mosaic_window: int | None = None  # pixels; None = 6 cells (60 px at 512), at least the cell
    max_train_steps: int = 1000  # optimiser steps
    train_batch_size: int = 1
    gradient_accumulation_steps: int = 5
    lr: float = 1.0e-5
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    weight_decay: float = 1.0e-2
    adam_epsilon: float = 1.0e-8
    max_grad_norm: float = 1.0
    weight_mosaic: float = 0.1  # the script's --weight_tune (see the module docstring)
    weight_preserve: float = 0.9
    weight_mosaic_parity: bool = False  # true: the code's --weight_mosaic default 0.5 (the flag the code ignores)
    use_ema: bool = True
    ema_max_decay: float = 0.9999  # diffusers EMAModel default
    resolution: int | None = None  # pixels; None = the generated images' size
    seed: int = 0  # the script sets none
    mixed_precision: str | None = None  # None | "bf16" | "fp16" (the script: fp16)
    gradient_checkpointing: bool = False  # the script: on (memory only)
    log_every: int = 10


def mosaic_geometry(size: int, cell: int | None = None, window: int | None = None) -> tuple[int, int]:
    """(cell, window) in pixels for an image side of ``size``: as given, or anti-deepnude's scaled to ``size``."""
    cell = cell or max(1, round(size * MOSAIC_CELL_FRACTION))
    window = window or max(cell, round(size * MOSAIC_WINDOW_FRACTION))
    return cell, window


def mosaic(pixels: torch.Tensor, cell: int, window: int) -> torch.Tensor:
    """Each ``cell`` x ``cell`` block of ``pixels`` (B, C, H, W) filled with the mean of the ``window`` x ``window``
    square centred on it, clipped at the image border (window = cell: plain pixelation)."""
    if cell < 1 or window < cell:
        raise ValueError(f"a mosaic needs 1 <= cell <= window, got cell {cell}, window {window}")
    _, _, height, width = pixels.shape
    table = F.pad(pixels.double().cumsum(-1).cumsum(-2), (1, 0, 1, 0))  # summed-area table, zero row/column first
    rows, rows_count = _window_bounds(height, cell, window)
    cols, cols_count = _window_bounds(width, cell, window)
    (r0, r1), (c0, c1) = rows, cols
    sums = (table[..., r1[:, None], c1[None, :]] - table[..., r0[:, None], c1[None, :]]
            - table[..., r1[:, None], c0[None, :]] + table[..., r0[:, None], c0[None, :]])
    means = sums / (rows_count[:, None] * cols_count[None, :])
    blocks = means.repeat_interleave(cell, -2).repeat_interleave(cell, -1)
    return blocks[..., :height, :width].to(pixels.dtype)


def _window_bounds(size: int, cell: int, window: int) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Per cell along one axis: the clipped [start, end) of its window and the window's length."""
    first = torch.arange(0, size, cell) + (cell - window) // 2  # may start before the image
    lo, hi = first.clamp(0, size), (first + window).clamp(0, size)
    return (lo, hi), (hi - lo).double()


def trainable_names(unet: nn.Module) -> list[str]:
    """Every parameter of the self-attention layers (the code's ``'attn1' in name``)."""
    return [n for n, _ in unet.named_parameters() if "attn1" in n]


def mosaic_target(scheduler: Any, nude: torch.Tensor, mosaic_latents: torch.Tensor, noise: torch.Tensor,
                  t: torch.Tensor) -> torch.Tensor:
    """The code's target for the nude latent: ``z_nude - z_mosaic + eps`` (epsilon), or the velocity of
    ``z_nude - z_mosaic`` with that noise (v-prediction)."""
    if scheduler.config.prediction_type == "v_prediction":
        return scheduler.get_velocity(nude - mosaic_latents, noise, t)
    return nude - mosaic_latents + noise


def benign_target(scheduler: Any, benign: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    if scheduler.config.prediction_type == "v_prediction":
        return scheduler.get_velocity(benign, noise, t)
    return noise


def ema_decay(update: int, max_decay: float) -> float:
    """diffusers ``EMAModel.get_decay`` with its defaults (no warm-up schedule, updates from the first step):
    0 at the first update (the EMA takes the weights), then ``min((1 + k) / (10 + k), max_decay)``, k = update - 1."""
    k = update - 1
    return 0.0 if k <= 0 else min((1 + k) / (10 + k), max_decay)


@torch.no_grad()
def ema_update(ema: dict[str, torch.Tensor], params: dict[str, torch.Tensor], decay: float) -> None:
    """``ema <- ema - (1 - decay) (ema - param)``, in place."""
    for n, p in params.items():
        ema[n].sub_((1 - decay) * (ema[n] - p.detach().float()))


@dataclass
class SafeGenBatch:
    """One micro-batch: the noised nude and benign latents, their targets, the shared timestep, the empty prompt."""

    nude_x_t: torch.Tensor
    mosaic_target: torch.Tensor
    benign_x_t: torch.Tensor
    benign_target: torch.Tensor
    t: torch.Tensor
    cond: torch.Tensor

    def to(self, device: torch.device) -> SafeGenBatch:
        return SafeGenBatch(**{k: v.to(device) for k, v in self.__dict__.items()})


def safegen_loss(unet: nn.Module, batch: SafeGenBatch, weight_mosaic: float,
                 weight_preserve: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(weighted sum, mosaic term, preservation term), per-element MSE means as the code."""
    to_mosaic = F.mse_loss(_eps(unet, batch.nude_x_t, batch.t, batch.cond), batch.mosaic_target)
    keep = F.mse_loss(_eps(unet, batch.benign_x_t, batch.t, batch.cond), batch.benign_target)
    return weight_mosaic * to_mosaic + weight_preserve * keep, to_mosaic, keep


@dataclass
class Triplets:
    """VAE posteriors (mean, std) of the nude, mosaic and benign images, row i = triplet i."""

    nude: tuple[torch.Tensor, torch.Tensor]
    mosaic: tuple[torch.Tensor, torch.Tensor]
    benign: tuple[torch.Tensor, torch.Tensor]
    cond: torch.Tensor  # (1, 77, width): the empty prompt
    geometry: tuple[int, int]  # (cell, window) of the mosaic, pixels

    def __len__(self) -> int:
        return self.nude[0].shape[0]


class SafeGen(UNetEdit):
    """SafeGen; see the module docstring."""

    name = "safegen"
    family = Family.WEIGHT_EDIT
    trains = "unet: every attn1 (self-attention) parameter"
    reconstruction = ("triplets generated by the base model from the concept's fine-tuning prompts (official: 100 "
                      "real photos); the mosaic covers the whole image (official: anti-deepnude's heat-map region), "
                      "its cell/window geometry scaled from 512 px to the image size")
    version = "1"
    config_class = SafeGenConfig

    @property
    def weight_mosaic(self) -> float:
        return CODE_DEFAULT_WEIGHT_MOSAIC if self.config.weight_mosaic_parity else self.config.weight_mosaic

    def fit(self, ctx: FitContext) -> Artifact:
        cfg = self.config
        data = self.prepare(ctx)
        device = ctx.pipe.unet.device
        unet = copy.deepcopy(ctx.pipe.unet).float().requires_grad_(False)
        names = set(trainable_names(unet))
        params = {n: p.requires_grad_(True) for n, p in unet.named_parameters() if n in names}
        if cfg.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        optimizer = torch.optim.AdamW(list(params.values()), lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                      weight_decay=cfg.weight_decay, eps=cfg.adam_epsilon)
        scaler = torch.amp.GradScaler(device.type, enabled=cfg.mixed_precision == "fp16")
        ema = {n: p.detach().float().clone() for n, p in params.items()}
        history: dict[str, list[float]] = {"loss": [], "mosaic": [], "preserve": []}
        training = TrainingState({**params, **{f"ema/{n}": e for n, e in ema.items()}}, optimizer, scaler=scaler,
                                 history=history)
        start = training.resume(ctx, cfg.max_train_steps)
        gen = torch.Generator().manual_seed(cfg.seed + ctx.seed)
        steps = itertools.islice(self.steps(ctx, data, gen), start, None)  # replayed: drawing them is cheap
        for step, micro in zip(range(start, cfg.max_train_steps), steps):
            optimizer.zero_grad(set_to_none=True)
            terms = self._accumulate(unet, micro, scaler, device)
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(list(params.values()), cfg.max_grad_norm)
            scaler.step(optimizer)
            scaler.update()
            if cfg.use_ema:
                ema_update(ema, params, ema_decay(step + 1, cfg.ema_max_decay))
            if not math.isfinite(terms["loss"]):
                raise FloatingPointError(f"SafeGen loss is {terms['loss']} at step {step}")
            for key, value in terms.items():
                history[key].append(value)
            progress.step(total=cfg.max_train_steps, loss=terms["loss"])
            ctx.checkpoint(step + 1, training.snapshot, cfg.max_train_steps)
        final = ema if cfg.use_ema else {n: p.detach() for n, p in params.items()}
        tensors = {n: t.float().cpu().clone() for n, t in final.items()}
        return Artifact(tensors=tensors, meta=self.describe(data, tensors, history))

    def _accumulate(self, unet: nn.Module, micro: list[SafeGenBatch], scaler: Any,
                    device: torch.device) -> dict[str, float]:
        """The gradient of the mean loss over one step's micro-batches (accelerate divides each by their count)."""
        cfg = self.config
        totals = {"loss": 0.0, "mosaic": 0.0, "preserve": 0.0}
        for batch in micro:
            with _autocast(device, cfg.mixed_precision):
                loss, to_mosaic, keep = safegen_loss(unet, batch.to(device), self.weight_mosaic, cfg.weight_preserve)
            scaler.scale(loss / len(micro)).backward()
            for key, value in zip(totals, (loss, to_mosaic, keep)):
                totals[key] += value.item() / len(micro)
        return totals

    def describe(self, data: Triplets, tensors: dict[str, torch.Tensor],
                 history: dict[str, list[float]]) -> dict[str, Any]:
        cfg = self.config
        return {"config": asdict(cfg), "weight_mosaic": self.weight_mosaic, "triplets": len(data),
                "mosaic_cell_window_px": list(data.geometry), "ema": cfg.use_ema,
                "objective": f"{self.weight_mosaic:g} * mse(eps(x_t^nude, ''), z_nude - z_mosaic + eps) + "
                             f"{cfg.weight_preserve:g} * mse(eps(x_t^benign, ''), eps')",
                "trained_parameters": len(tensors), "trained_numel": sum(t.numel() for t in tensors.values()),
                "loss": {k: _summarise(v, cfg.log_every) for k, v in history.items()}}

    def prepare(self, ctx: FitContext) -> Triplets:
        """Generate the nude and benign images (base model, through the store), mosaic the nude ones, encode all."""
        cfg, pipe = self.config, ctx.pipe
        nude_items = cycled_items(ctx.concept.prompt_set(cfg.unsafe_set), cfg.num_triplets, "safegen_nude")
        benign_items = cycled_items(ctx.concept.prompt_set(cfg.benign_set), cfg.num_triplets, "safegen_benign")
        nude = self._pixels(ctx.generate(nude_items), "nude")
        benign = self._pixels(ctx.generate(benign_items), "benign")
        geometry = mosaic_geometry(nude.shape[-1], cfg.mosaic_cell, cfg.mosaic_window)
        mosaics = mosaic(nude, *geometry)
        return Triplets(nude=_posterior(pipe.vae, nude * 2 - 1), mosaic=_posterior(pipe.vae, mosaics * 2 - 1),
                        benign=_posterior(pipe.vae, benign * 2 - 1),
                        cond=_encode(pipe, [""], pipe.unet.device).cpu(), geometry=geometry)

    def _pixels(self, images: list[Any], what: str) -> torch.Tensor:
        """Images as (B, 3, H, W) in [0, 1], resized to ``resolution`` when given."""
        if any(image is None for image in images):
            raise ValueError(f"SafeGen needs every {what} image; the base model delivered a blocked one")
        pixels = pil_to_pixels(images)
        size = self.config.resolution
        if size is not None and pixels.shape[-1] != size:
            pixels = F.interpolate(pixels, size=(size, size), mode="bilinear", antialias=True).clamp(0, 1)
        return pixels

    def steps(self, ctx: FitContext, data: Triplets, gen: torch.Generator) -> Iterator[list[SafeGenBatch]]:
        """Endless optimiser steps, each ``gradient_accumulation_steps`` micro-batches of a reshuffled epoch over
        the triplets (the data loader's shuffle; an epoch's last batch may be short)."""
        cfg = self.config

        def micro_batches() -> Iterator[SafeGenBatch]:
            from diffusers import DDPMScheduler

            scheduler = DDPMScheduler.from_config(ctx.pipe.scheduler.config)
            while True:
                epoch = torch.randperm(len(data), generator=gen)
                for lo in range(0, len(data), cfg.train_batch_size):
                    yield self._micro(data, epoch[lo:lo + cfg.train_batch_size], scheduler, gen)

        source = micro_batches()
        while True:
            yield [next(source) for _ in range(cfg.gradient_accumulation_steps)]

    @staticmethod
    def _micro(data: Triplets, rows: torch.Tensor, scheduler: Any, gen: torch.Generator) -> SafeGenBatch:
        """Posterior samples of each triplet's images; one noise for the nude latent (and its mosaic target),
        another for the benign one, one timestep for both (the code's)."""
        nude, mosaic_latents, benign = (mean[rows] + std[rows] * torch.randn(mean[rows].shape, generator=gen)
                                        for mean, std in (data.nude, data.mosaic, data.benign))
        noise = torch.randn(nude.shape, generator=gen)
        noise_benign = torch.randn(benign.shape, generator=gen)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(rows),), generator=gen)
        return SafeGenBatch(nude_x_t=scheduler.add_noise(nude, noise, t),
                            mosaic_target=mosaic_target(scheduler, nude, mosaic_latents, noise, t),
                            benign_x_t=scheduler.add_noise(benign, noise_benign, t),
                            benign_target=benign_target(scheduler, benign, noise_benign, t),
                            cond=data.cond.expand(len(rows), *data.cond.shape[1:]), t=t)
