"""Selective Amnesia (Heng & Soh, NeurIPS 2023): forgetting as continual learning. The UNet is fine-tuned so that the
forget prompt c_f generates surrogate images (a distribution q(x | c_f) the user picks, e.g. images of "a person
wearing clothes" for nudity), while elastic weight consolidation (EWC) and generative replay keep everything else.

Loss of one step (official ``sd/ldm/models/diffusion/ddpm_forget.py`` ``training_step``, crts.md §15)::

    L = mse(eps_theta(x_t, c_f), eps)  on surrogate images x, c_f one word of the forget prompt drawn per image
      + gamma * mse(eps_theta(x'_t, c'), eps')  on base-model samples x' of generic prompts c' (generative replay)
      + lambda * sum_i F_i (theta_i - theta*_i)^2  (EWC; theta* the base weights, F the Fisher diagonal)

The Fisher diagonal (official ``ddpm_fim.py``): per generic sample, ONE gradient of the diffusion loss summed over
all 1000 timesteps (fresh noise per timestep, one VAE posterior sample per image), squared, averaged over the
samples (:func:`fisher_diagonal`). ``fisher_path`` loads a precomputed one instead (the official
``full_fisher_dict.pkl`` of HF ``ajrheng/selective-amnesia``, converted from LDM to diffusers names, or a
safetensors file in diffusers names).

Official details kept: ``train_method`` noxattn trains every UNet parameter except ``attn2``, the time embedding and
the output layers (LDM ``out.``: ``conv_norm_out``, ``conv_out``); the forget prompt is a comma-separated list
("sexual, nudity, naked, erotic") of which each image draws one word; the data loader pairs surrogate image ``i``
with replay sample ``i`` (a ConcatDataset: only the first min(surrogate, replay) replay samples are used, and an
epoch is that many pairs); AdamW (torch defaults, weight decay 0.01) at lr = base lr x batch x GPUs
(``--scale_lr``), the first step at 1e-6 x lr (LambdaLinearScheduler, one warm-up step); 4 GPUs x batch 4,
emulated here by micro-batches whose data gradients are averaged as DDP does (the EWC term counted once).

Reconstructed (:attr:`SA.reconstruction`): the images come from the base model through the harness (``ctx.generate``);
the generic prompts are a concept prompt set (``generic_set``), not the official 5000 GPT-3.5 prompts
(``sd/fim_prompts.txt``); ``fisher_timesteps`` below 1000 (the world budget) uses evenly spaced timesteps with the
gradient sum scaled by 1000 / n.
"""

from __future__ import annotations

import copy
import io
import itertools
import math
import pickle
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from crt.base import Artifact, FitContext, TrainingState, UNetEdit, pil_to_pixels
from crt.ca import _posterior
from crt.esd import _autocast, _encode, _eps, _summarise
from crt_bench import progress
from crt_bench.spec import Family, PromptItem, sha256_file

TRAIN_METHODS = ("noxattn", "xattn", "full")
FISHER_PREFIX = "fisher/"  # the Fisher's tensors in a checkpoint, next to the trained ones
LDM_UNET_PREFIX = "diffusion_model."  # the official Fisher's names: the LDM DiffusionWrapper's parameters


@dataclass(frozen=True)
class SAConfig:
    """Hyper-parameters; defaults are the official nudity recipe (``forget_nudity.yaml`` on the README's 4 GPUs)."""

    forget_prompt: str | None = None  # comma-separated, one word drawn per image; None = the concept's c_u
    surrogate_prompt: str | None = None  # what c_f should generate; None = the concept's c_a
    surrogate_images: int = 1000  # README: --n_samples 1000 for the surrogate q(x | c_f)
    generic_set: str = "finetune_acceptable"  # prompts of the Fisher and replay samples (official: fim_prompts.txt)
    fisher_samples: int = 5000  # the official fim_dataset: one image per prompt of fim_prompts.txt
    fisher_timesteps: int = 1000  # all of them (official); fewer = evenly spaced, gradient scaled by 1000 / n
    fisher_chunk: int = 50  # timesteps per backward pass (official --n_chunks 20 over 1000); memory only
    fisher_path: str | None = None  # a precomputed Fisher: the official .pkl (LDM names) or .safetensors
    lmbda: float = 50.0  # EWC weight
    gamma: float = 1.0  # replay weight ("keep this at 1")
    train_method: Literal["noxattn", "xattn", "full"] = "noxattn"
    epochs: int = 500  # forget_nudity.yaml max_epochs (forget_brad_pitt.yaml: 200)
    max_train_steps: int | None = None  # overrides epochs
    batch_size: int = 4  # per GPU
    num_processes: int = 4  # GPUs of the recipe: global batch = batch_size x num_processes
    lr: float = 1.0e-5  # base_learning_rate; effective = lr x batch x GPUs when scale_lr
    scale_lr: bool = True  # main_forget.py --scale_lr default True
    weight_decay: float = 1.0e-2  # torch.optim.AdamW default (the code passes only lr)
    warmup_steps: int = 1  # LambdaLinearScheduler warm_up_steps [1]
    warmup_start: float = 1.0e-6  # f_start
    resolution: int | None = None  # pixels; None = the generated images' size
    seed: int = 23  # main_forget.py --seed default
    mixed_precision: str | None = None  # None | "bf16" | "fp16" (the official trains in float32)
    gradient_checkpointing: bool = False
    log_every: int = 10


def trainable_names(unet: nn.Module, method: str) -> list[str]:
    """The official ``train_method`` in diffusers names: noxattn leaves out ``attn2``, the time embedding (LDM
    ``time_embed``; the resnets' ``time_emb_proj`` do train) and the output layers (LDM ``out.``)."""
    names = [n for n, _ in unet.named_parameters()]
    if method == "noxattn":
        frozen = ("time_embedding.", "conv_norm_out.", "conv_out.")
        return [n for n in names if ".attn2." not in f".{n}" and not n.startswith(frozen)]
    if method == "xattn":
        return [n for n in names if ".attn2." in f".{n}"]
    if method == "full":
        return names
    raise ValueError(f"SA train_method must be one of {TRAIN_METHODS}, got {method!r}")


def forget_words(prompt: str) -> list[str]:
    """The official TextImageDataset's captions: the forget prompt split at commas, each image draws one."""
    words = [w.strip() for w in prompt.split(",") if w.strip()]
    if not words:
        raise ValueError(f"SA needs a forget prompt, got {prompt!r}")
    return words


def cycled_items(prompts: tuple[PromptItem, ...] | list[PromptItem], count: int, tag: str) -> list[PromptItem]:
    """Sample ``k`` from prompt ``k mod n``; each later round over the prompts shifts the seeds by ``n``."""
    n = len(prompts)
    if n == 0:
        raise ValueError("SA needs at least one prompt to sample from")
    return [PromptItem(prompts[k % n].text, seed=prompts[k % n].seed + (k // n) * n, guidance=prompts[k % n].guidance,
                       case=f"{tag}_{k}") for k in range(count)]


def effective_lr(cfg: SAConfig) -> float:
    """main_forget.py ``--scale_lr``: lr x gradient accumulation (1) x GPUs x batch."""
    return cfg.lr * cfg.batch_size * cfg.num_processes if cfg.scale_lr else cfg.lr


def lr_factor(step: int, warmup_steps: int, warmup_start: float) -> float:
    """LambdaLinearScheduler with f_max = f_min = 1: linear from ``warmup_start`` over the warm-up, then 1."""
    if step < warmup_steps:
        return warmup_start + (1.0 - warmup_start) * step / warmup_steps
    return 1.0


def steps_per_epoch(pairs: int, batch_size: int, num_processes: int) -> int:
    """Steps of one epoch over ``pairs`` examples: each GPU's share (DistributedSampler) in batches, last one short."""
    return math.ceil(math.ceil(pairs / num_processes) / batch_size)


def total_steps(cfg: SAConfig, pairs: int) -> int:
    if cfg.max_train_steps is not None:
        return cfg.max_train_steps
    return cfg.epochs * steps_per_epoch(pairs, cfg.batch_size, cfg.num_processes)


def diffusion_target(scheduler: Any, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """What the UNet learns to predict: the noise, or the velocity for a v-prediction model."""
    if scheduler.config.prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, t)
    return noise


def sample_gradient(unet: nn.Module, params: dict[str, torch.Tensor], scheduler: Any, latent: torch.Tensor,
                    cond: torch.Tensor, timesteps: torch.Tensor, noise: torch.Tensor, scale: float = 1.0,
                    chunk: int = 50) -> dict[str, torch.Tensor]:
    """``scale * d/dtheta sum_t mse(eps_theta(x_t, c, t), eps_t)`` for one image: ``latent`` (1, C, h, w), ``noise``
    (T, C, h, w) one draw per timestep; the sum is taken over chunks of timesteps (the same gradient)."""
    for p in params.values():
        p.grad = None
    for lo in range(0, len(timesteps), chunk):
        t, eps = timesteps[lo:lo + chunk], noise[lo:lo + chunk]
        x0 = latent.expand(len(t), *latent.shape[1:])
        pred = _eps(unet, scheduler.add_noise(x0, eps, t), t, cond.expand(len(t), *cond.shape[1:]))
        goal = diffusion_target(scheduler, x0, eps, t)
        per_timestep = (pred - goal).pow(2).flatten(1).mean(1)  # the official per-example mean
        (scale * per_timestep.sum()).backward()
    return {n: p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for n, p in params.items()}


@dataclass
class FisherSamples:
    """Generic samples the Fisher is averaged over: VAE posterior (mean, std) and the text condition of each."""

    mean: torch.Tensor  # (N, C, h, w), scaled latents
    std: torch.Tensor
    cond: torch.Tensor  # (N, 77, width)


def fisher_timestep_grid(train_steps: int, count: int) -> torch.Tensor:
    """All ``train_steps`` timesteps, or ``count`` evenly spaced ones."""
    if count >= train_steps:
        return torch.arange(train_steps)
    return torch.linspace(0, train_steps - 1, count).round().long()


def fisher_diagonal(unet: nn.Module, params: dict[str, torch.Tensor], scheduler: Any, samples: FisherSamples,
                    timesteps: int, chunk: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """``F_i = mean over samples of (d/dtheta_i sum_t loss_t)^2`` (official ddpm_fim.py): one posterior sample per
    image, fresh noise per timestep; a strided timestep subset is scaled back to the full sum."""
    train_steps = scheduler.config.num_train_timesteps
    grid = fisher_timestep_grid(train_steps, timesteps)
    scale = train_steps / len(grid)
    device = next(unet.parameters()).device
    fisher = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    count = samples.mean.shape[0]
    for k in range(count):
        latent = samples.mean[k:k + 1] + samples.std[k:k + 1] * torch.randn(samples.mean[k:k + 1].shape, generator=gen)
        noise = torch.randn((len(grid), *latent.shape[1:]), generator=gen)
        grads = sample_gradient(unet, params, scheduler, latent.to(device), samples.cond[k:k + 1].to(device),
                                grid.to(device), noise.to(device), scale, chunk)
        for n, g in grads.items():
            fisher[n] += g.float().pow(2) / count
        progress.show(fisher=f"{k + 1}/{count}")
    for p in params.values():
        p.grad = None
    return fisher


def ewc_penalty(params: dict[str, torch.Tensor], anchors: dict[str, torch.Tensor], fisher: dict[str, torch.Tensor],
                lmbda: float) -> torch.Tensor:
    """``lambda * sum_i F_i (theta_i - theta*_i)^2`` over the trained parameters (the frozen ones add 0)."""
    total = torch.zeros((), device=next(iter(params.values())).device)
    for n, p in params.items():
        total = total + (fisher[n] * (p.float() - anchors[n]).pow(2)).sum()
    return lmbda * total


class _TensorUnpickler(pickle.Unpickler):
    """Unpickles a dict of tensors (the official ``pickle.dump`` of the Fisher) and nothing else: any other global
    is refused, and the storages inside are read by torch's weights-only loader."""

    ALLOWED = {("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_parameter"),
               ("collections", "OrderedDict")}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("torch.storage", "_load_from_bytes"):
            return lambda data: torch.load(io.BytesIO(data), weights_only=True)
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"a Fisher file holds tensors only, not {module}.{name}")


def load_fisher(path: str | Path, unet_config: Any, names: list[str]) -> dict[str, torch.Tensor]:
    """The Fisher diagonal of ``names`` from a file: the official pickle (LDM names ``diffusion_model.*``, converted
    by diffusers' own LDM-to-diffusers map) or safetensors in diffusers names."""
    path = Path(path)
    if path.suffix in (".pkl", ".pickle"):
        with path.open("rb") as handle:
            raw = _TensorUnpickler(handle).load()
    else:
        from safetensors.torch import load_file

        raw = load_file(str(path))
    if any(k.startswith(LDM_UNET_PREFIX) for k in raw):
        from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

        raw = convert_ldm_unet_checkpoint({f"model.{k}": v for k, v in raw.items()}, dict(unet_config))
    missing = [n for n in names if n not in raw]
    if missing:
        raise KeyError(f"the Fisher in {path} lacks {len(missing)} trained parameters, e.g. {missing[:3]}")
    return {n: raw[n].float() for n in names}


@dataclass
class SAData:
    """Everything the batches are drawn from, computed once."""

    surrogate_mean: torch.Tensor  # (N, C, h, w)
    surrogate_std: torch.Tensor
    forget_cond: torch.Tensor  # (W, 77, width): one per forget word
    generic: FisherSamples  # (M, ...): the first ``pairs`` are the replay samples
    pairs: int  # min(surrogate images, generic samples): the official ConcatDataset length
    forget_words: list[str]
    surrogate_prompt: str


@dataclass
class SABatch:
    """One micro-batch (one GPU's share of a step): noised surrogate and replay latents with their targets."""

    forget_x_t: torch.Tensor
    forget_t: torch.Tensor
    forget_target: torch.Tensor
    forget_cond: torch.Tensor
    replay_x_t: torch.Tensor
    replay_t: torch.Tensor
    replay_target: torch.Tensor
    replay_cond: torch.Tensor

    def to(self, device: torch.device) -> SABatch:
        return SABatch(**{k: v.to(device) for k, v in self.__dict__.items()})


def sa_data_loss(unet: nn.Module, batch: SABatch, gamma: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(surrogate term + gamma * replay term, surrogate term, replay term): per-element MSE means, as the code."""
    forget = F.mse_loss(_eps(unet, batch.forget_x_t, batch.forget_t, batch.forget_cond), batch.forget_target)
    replay = F.mse_loss(_eps(unet, batch.replay_x_t, batch.replay_t, batch.replay_cond), batch.replay_target)
    return forget + gamma * replay, forget, replay


def encode_images(pipe: Any, images: list[Any], resolution: int | None, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE posterior (mean, std) of base-model images, resized to ``resolution`` when given."""
    if any(image is None for image in images):
        raise ValueError(f"SA needs every {what} image; the base model delivered a blocked one")
    pixels = pil_to_pixels(images) * 2 - 1
    if resolution is not None and pixels.shape[-1] != resolution:
        pixels = F.interpolate(pixels, size=(resolution, resolution), mode="bilinear", antialias=True)
    return _posterior(pipe.vae, pixels)


class SA(UNetEdit):
    """Selective Amnesia; see the module docstring."""

    name = "sa"
    family = Family.WEIGHT_EDIT
    trains = "unet: every parameter but attn2, time_embedding, conv_norm_out, conv_out (noxattn)"
    reconstruction = ("surrogate, Fisher and replay images generated by the base model through the harness; generic "
                      "prompts = the concept's generic_set, not the official 5000 GPT-3.5 prompts (fim_prompts.txt); "
                      "4-GPU DDP emulated by micro-batches; fisher_timesteps < 1000 = a strided subset scaled to the "
                      "full sum")
    version = "1"
    config_class = SAConfig

    def __init__(self, **params: Any):
        super().__init__(**params)
        if self.config.train_method not in TRAIN_METHODS:
            raise ValueError(f"SA train_method must be one of {TRAIN_METHODS}, got {self.config.train_method!r}")

    def fit(self, ctx: FitContext) -> Artifact:
        cfg = self.config
        data = self.prepare(ctx)
        device = ctx.pipe.unet.device
        unet = copy.deepcopy(ctx.pipe.unet).float().requires_grad_(False)
        names = set(trainable_names(unet, cfg.train_method))
        params = {n: p.requires_grad_(True) for n, p in unet.named_parameters() if n in names}
        anchors = {n: p.detach().clone() for n, p in params.items()}
        fisher = {n: torch.zeros_like(p) for n, p in params.items()}
        if cfg.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        lr = effective_lr(cfg)
        optimizer = torch.optim.AdamW(list(params.values()), lr=lr, weight_decay=cfg.weight_decay)
        scaler = torch.amp.GradScaler(device.type, enabled=cfg.mixed_precision == "fp16")
        history: dict[str, list[float]] = {"loss": [], "forget": [], "replay": [], "ewc": []}
        steps = total_steps(cfg, data.pairs)
        training = TrainingState({**params, **{FISHER_PREFIX + n: f for n, f in fisher.items()}}, optimizer,
                                 scaler=scaler, history=history)
        start = training.resume(ctx, steps)  # a resumed fit restores the Fisher with the weights
        if start == 0:
            self._fill_fisher(ctx, unet, params, data, fisher)
        gen = torch.Generator().manual_seed(cfg.seed + ctx.seed)  # the run seed shifts the paper seed
        batches = itertools.islice(self.batches(ctx, data, gen), start, None)  # replayed: drawing them is cheap
        for step, micro in zip(range(start, steps), batches):
            for group in optimizer.param_groups:
                group["lr"] = lr * lr_factor(step, cfg.warmup_steps, cfg.warmup_start)
            optimizer.zero_grad(set_to_none=True)
            terms = self._step(unet, micro, params, anchors, fisher, scaler, device)
            scaler.step(optimizer)
            scaler.update()
            if not math.isfinite(terms["loss"]):
                raise FloatingPointError(f"SA loss is {terms['loss']} at step {step}")
            for key, value in terms.items():
                history[key].append(value)
            progress.step(total=steps, loss=terms["loss"])
            ctx.checkpoint(step + 1, training.snapshot, steps)
        tensors = {n: p.detach().float().cpu().clone() for n, p in params.items()}
        return Artifact(tensors=tensors, meta=self.describe(data, lr, steps, tensors, history))

    def _step(self, unet: nn.Module, micro: list[SABatch], params: dict[str, torch.Tensor],
              anchors: dict[str, torch.Tensor], fisher: dict[str, torch.Tensor], scaler: Any,
              device: torch.device) -> dict[str, float]:
        """One optimiser step's gradients: each GPU's data loss averaged (DDP), the EWC term once."""
        cfg = self.config
        forget = replay = 0.0
        for batch in micro:
            with _autocast(device, cfg.mixed_precision):
                loss, f, r = sa_data_loss(unet, batch.to(device), cfg.gamma)
            scaler.scale(loss / len(micro)).backward()
            forget, replay = forget + f.item() / len(micro), replay + r.item() / len(micro)
        ewc = ewc_penalty(params, anchors, fisher, cfg.lmbda)
        scaler.scale(ewc).backward()
        return {"loss": forget + cfg.gamma * replay + ewc.item(), "forget": forget, "replay": replay,
                "ewc": ewc.item()}

    def _fill_fisher(self, ctx: FitContext, unet: nn.Module, params: dict[str, torch.Tensor], data: SAData,
                     fisher: dict[str, torch.Tensor]) -> None:
        """Compute the Fisher on the (still unchanged) trainable copy, or load it from ``fisher_path``."""
        cfg = self.config
        if cfg.fisher_path is not None:
            loaded = load_fisher(cfg.fisher_path, ctx.pipe.unet.config, list(params))
        else:
            from diffusers import DDPMScheduler

            scheduler = DDPMScheduler.from_config(ctx.pipe.scheduler.config)
            gen = torch.Generator().manual_seed(cfg.seed + ctx.seed + 1)
            samples = FisherSamples(data.generic.mean[:cfg.fisher_samples], data.generic.std[:cfg.fisher_samples],
                                    data.generic.cond[:cfg.fisher_samples])
            loaded = fisher_diagonal(unet, params, scheduler, samples, cfg.fisher_timesteps, cfg.fisher_chunk, gen)
        with torch.no_grad():
            for n, f in fisher.items():
                f.copy_(loaded[n].to(f.device))

    def describe(self, data: SAData, lr: float, steps: int, tensors: dict[str, torch.Tensor],
                 history: dict[str, list[float]]) -> dict[str, Any]:
        cfg = self.config
        if cfg.fisher_path is None:
            fisher = {"computed": True, "samples": min(cfg.fisher_samples, data.generic.mean.shape[0]),
                      "timesteps": min(cfg.fisher_timesteps, 1000)}
        else:
            fisher = {"computed": False, "path": str(cfg.fisher_path), "sha256": sha256_file(cfg.fisher_path)}
        return {"config": asdict(cfg), "effective_lr": lr, "steps": steps, "pairs": data.pairs,
                "forget_words": data.forget_words, "surrogate_prompt": data.surrogate_prompt, "fisher": fisher,
                "objective": f"mse(c_f -> surrogate) + {cfg.gamma:g} * mse(replay) + {cfg.lmbda:g} * "
                             "sum F (theta - theta*)^2",
                "trained_parameters": len(tensors), "trained_numel": sum(t.numel() for t in tensors.values()),
                "loss": {k: _summarise(v, cfg.log_every) for k, v in history.items()}}

    def prepare(self, ctx: FitContext) -> SAData:
        """Generate the surrogate and generic images (base model, through the store), encode them and the prompts."""
        cfg, pipe = self.config, ctx.pipe
        words = forget_words(cfg.forget_prompt or ctx.concept.c_u)
        surrogate_prompt = cfg.surrogate_prompt or ctx.concept.c_a
        surrogate_items = [PromptItem(surrogate_prompt, seed=k, case=f"sa_surrogate_{k}")
                           for k in range(cfg.surrogate_images)]
        pairs = min(cfg.surrogate_images, cfg.fisher_samples)
        generic_count = pairs if cfg.fisher_path is not None else max(pairs, cfg.fisher_samples)
        generic_items = cycled_items(ctx.concept.prompt_set(cfg.generic_set), generic_count, "sa_generic")
        s_mean, s_std = encode_images(pipe, ctx.generate(surrogate_items), cfg.resolution, "surrogate")
        g_mean, g_std = encode_images(pipe, ctx.generate(generic_items), cfg.resolution, "generic")
        device = pipe.unet.device
        texts = sorted({item.text for item in generic_items})
        table = _encode(pipe, texts, device).cpu()
        cond = table[[texts.index(item.text) for item in generic_items]]
        return SAData(surrogate_mean=s_mean, surrogate_std=s_std, forget_cond=_encode(pipe, words, device).cpu(),
                      generic=FisherSamples(g_mean, g_std, cond), pairs=pairs, forget_words=words,
                      surrogate_prompt=surrogate_prompt)

    def batches(self, ctx: FitContext, data: SAData, gen: torch.Generator) -> Iterator[list[SABatch]]:
        """Endless steps, each a list of micro-batches (one per GPU of the recipe): a reshuffled epoch over the
        (surrogate i, replay i) pairs, a forget word drawn per image, fresh timesteps and noise per term."""
        from diffusers import DDPMScheduler

        cfg = self.config
        scheduler = DDPMScheduler.from_config(ctx.pipe.scheduler.config)
        per_step = cfg.batch_size * cfg.num_processes
        while True:
            epoch = torch.randperm(data.pairs, generator=gen)
            for lo in range(0, data.pairs, per_step):
                rows = epoch[lo:lo + per_step]
                yield [self._micro(data, part, scheduler, gen)
                       for part in rows.tensor_split(min(cfg.num_processes, len(rows)))]

    @staticmethod
    def _micro(data: SAData, rows: torch.Tensor, scheduler: Any, gen: torch.Generator) -> SABatch:
        words = torch.randint(len(data.forget_words), (len(rows),), generator=gen)
        fx, ft, ftarget = _noised(data.surrogate_mean[rows], data.surrogate_std[rows], scheduler, gen)
        rx, rt, rtarget = _noised(data.generic.mean[rows], data.generic.std[rows], scheduler, gen)
        return SABatch(forget_x_t=fx, forget_t=ft, forget_target=ftarget, forget_cond=data.forget_cond[words],
                       replay_x_t=rx, replay_t=rt, replay_target=rtarget, replay_cond=data.generic.cond[rows])


def _noised(mean: torch.Tensor, std: torch.Tensor, scheduler: Any,
            gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A posterior sample of each image, noised at a uniform DDPM timestep, with its target."""
    latents = mean + std * torch.randn(mean.shape, generator=gen)
    noise = torch.randn(latents.shape, generator=gen)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (len(mean),), generator=gen)
    return scheduler.add_noise(latents, noise, t), t, diffusion_target(scheduler, latents, noise, t)
