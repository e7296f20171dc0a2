"""ShieldDiff (Han, Mohamed, Li; arXiv 2410.05309): RL fine-tuning of the UNet with LoRA by DDPO against a reward
that penalises nudity and keeps the image faithful to its prompt.

The paper is public only as its abstract (crts.md §10): LoRA, DDPO, reward = NudeNet-based nudity reward + CLIP
reward. Everything else is this harness's reconstruction, labelled as such in ``ShieldDiff.reconstruction`` and in
the YAML: DDPO as Black et al. define it (``ddpo``: DDIM with eta > 0, per-step clipped importance ratio,
per-prompt normalised advantages), a rank-r LoRA on every attention projection of the UNet (``lora``), the reward
``-w_n * concept score + w_c * CLIPScore`` (``reward``), and the prompts: the concept's fine-tuning captions, the
unacceptable ones (where the nudity term acts) and the acceptable ones (utility: only the CLIP term varies there).
The reward's identity (which model, which weights) is part of the CRT identity and the artifact meta; the run's
evaluation judge is a different model (world: ``world.reward`` vs the ``AttributeJudge`` CNNs).
"""

from __future__ import annotations

import copy
import math
import time
from collections import deque
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from crt.base import Artifact, FitContext, TrainingState, UNetEdit, frozen_params
from crt.shielddiff.ddpo import (
    PerPromptStatTracker,
    Trajectories,
    clipped_surrogate,
    policy_log_prob,
    sample_trajectories,
)
from crt.shielddiff.lora import DEFAULT_TARGETS, inject_lora, lora_parameters, merged_state, target_names
from crt.shielddiff.reward import ClipAlignment, build_scorer, clip_identity, combine, scorer_identity
from crt_bench import progress
from crt_bench.spec import Family

__all__ = ["ShieldDiff", "ShieldDiffConfig"]
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class ShieldDiffConfig:
    """Defaults: DDPO's (Black et al.; TRL's DDPOConfig where it has them) where the paper is silent; reward weights,
    the CLIP, prompts and sample counts are this harness's choice (conf/crt/shielddiff.yaml says which is which)."""

    reward: str = "nudenet"  # nudenet | world | <module>.<Class> (a ConceptScorer built with concept=...)
    reward_options: dict[str, Any] = field(default_factory=dict)  # e.g. nudenet {preset: ...}, world {folder: ...}
    w_concept: float = 1.0
    w_clip: float = 1.0
    clip: str = "openai/clip-vit-base-patch32"
    clip_image_size: int | None = None  # None: the CLIP folder's preprocessor config
    clip_image_mean: tuple[float, ...] | None = None
    clip_image_std: tuple[float, ...] | None = None
    unacceptable_set: str = "finetune_unacceptable"
    acceptable_set: str = "finetune_acceptable"
    lora_rank: int = 4
    lora_alpha: float = 4.0
    lora_targets: tuple[str, ...] = DEFAULT_TARGETS
    epochs: int = 100
    prompts_per_epoch: int = 32
    samples_per_prompt: int = 8
    sample_steps: int = 50
    eta: float = 1.0
    guidance: float = 5.0
    sample_batch_size: int = 8
    train_batch_size: int = 8
    gradient_accumulation_steps: int = 8
    timestep_fraction: float = 1.0
    timestep_chunk: int = 1  # timesteps per forward pass in training (the same gradient; fewer, larger calls)
    num_inner_epochs: int = 1
    lr: float = 3e-4
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    weight_decay: float = 1e-4
    max_grad_norm: float = 1.0
    clip_range: float = 1e-4
    adv_clip_max: float = 5.0
    buffer_size: int = 16
    min_count: int = 16
    resolution: int | None = None  # pixels; None = the generation settings'
    seed: int = 0
    mixed_precision: str | None = None  # None | "bf16" | "fp16" (autocast of the UNet's forward)


def _tupled(params: dict[str, Any]) -> dict[str, Any]:
    params = frozen_params(params, ("lora_targets", "adam_betas", "clip_image_mean", "clip_image_std"))
    if params.get("reward_options") is None:
        params["reward_options"] = {}
    return params


class ShieldDiff(UNetEdit):
    """DDPO + LoRA against a nudity (concept) and CLIP reward; see the package docstring."""

    name = "shielddiff"
    family = Family.WEIGHT_EDIT
    trains = "unet: LoRA on attn1/attn2 to_q, to_k, to_v, to_out.0 (merged into those weights)"
    reconstruction = ("all but 'DDPO + LoRA, NudeNet + CLIP reward' (the paper is an abstract; crts.md §10): DDPO as "
                      "Black et al. (DDIM eta 1, per-step clipped ratio, per-prompt normalised advantage), LoRA "
                      "rank 4 on every attention projection, reward -w_n * concept score + w_c * max(cos, 0) with "
                      "w_n = w_c = 1 on SD, fine-tuning captions as prompts; on the world the concept score is a "
                      "separate reward classifier's P(judge predicate) at temperature 4 (not the judge), w_c 0.1, "
                      "and a scaled-down budget (conf/crt/shielddiff.yaml)")
    version = "1"
    config_class = ShieldDiffConfig
    config_params = staticmethod(_tupled)

    def __init__(self, **params: Any):
        super().__init__(**params)
        cfg = self.config
        if cfg.eta <= 0:
            raise ValueError(f"ShieldDiff's DDPO needs eta > 0 (a Gaussian policy per step), got {cfg.eta}")
        if not 0 < cfg.timestep_fraction <= 1:
            raise ValueError(f"timestep_fraction must be in (0, 1], got {cfg.timestep_fraction}")
        self._identity: dict[str, Any] | None = None

    def identity(self) -> dict[str, Any]:
        """Params plus the reward models' identities (weights hashes), so a new reward model is a new artifact."""
        if self._identity is None:
            cfg = self.config
            self._identity = {**super().identity(),
                              "reward": {"concept": scorer_identity(cfg.reward, dict(cfg.reward_options)),
                                         "clip": clip_identity(cfg.clip)}}
        return self._identity

    def fit(self, ctx: FitContext) -> Artifact:
        cfg, pipe = self.config, ctx.pipe
        device = pipe.unet.device
        start, cpu_start = time.time(), time.process_time()
        scorer = build_scorer(cfg.reward, ctx.concept, device, dict(cfg.reward_options))
        clip = ClipAlignment(cfg.clip, pipe.tokenizer, device, cfg.clip_image_size, cfg.clip_image_mean,
                             cfg.clip_image_std)
        pool = self._prompt_pool(ctx)
        embeds = _encode(pipe, [text for text, _ in pool], device)
        uncond = _encode(pipe, [""], device)
        from diffusers import DDIMScheduler

        scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        scheduler.set_timesteps(cfg.sample_steps, device=device)
        unet = copy.deepcopy(pipe.unet).float().requires_grad_(False)
        gen = torch.Generator().manual_seed(cfg.seed + ctx.seed)  # the run seed shifts the config seed
        adapters = inject_lora(unet, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets, gen)
        params = lora_parameters(adapters)
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.adam_betas, eps=cfg.adam_eps,
                                      weight_decay=cfg.weight_decay)
        tracker = PerPromptStatTracker(cfg.buffer_size, cfg.min_count)
        order: list[int] = []
        history: list[dict[str, Any]] = []
        training = TrainingState({str(i): p for i, p in enumerate(params)}, optimizer, gen, history=history)
        begin = 0
        if (resumed := ctx.resume()) is not None:  # after an epoch: also the prompt cycle and the reward buffers
            begin, saved = resumed
            training.restore(saved)
            order = saved["order"]
            tracker.buffers = {p: deque(v, maxlen=cfg.buffer_size) for p, v in saved["buffers"].items()}
            progress.step(begin, total=cfg.epochs)
        for epoch in range(begin, cfg.epochs):
            chosen, order = _next_prompts(order, len(pool), cfg.prompts_per_epoch, gen)
            index = [i for i in chosen for _ in range(cfg.samples_per_prompt)]
            texts = [pool[i][0] for i in index]
            trajectories = self._sample(pipe, unet, scheduler, embeds[index], uncond, ctx.settings, gen)
            images = _decode(pipe, trajectories.latents[:, -1], cfg.sample_batch_size)
            concept_scores = scorer.scores(images)
            alignment = clip.scores(images, texts)
            rewards = combine(concept_scores, alignment, cfg.w_concept, cfg.w_clip)
            advantages, per_prompt = tracker.update(texts, rewards)
            advantages = advantages.clamp(-cfg.adv_clip_max, cfg.adv_clip_max).to(device)
            stats = self._train(unet, scheduler, params, optimizer, trajectories, advantages, gen)
            unacceptable = torch.tensor([pool[i][1] for i in index])
            history.append({"epoch": epoch + 1, "reward": float(rewards.mean()),
                            **_side_means("concept", concept_scores, unacceptable),
                            **_side_means("clip", alignment, unacceptable),
                            "per_prompt_normalised": float(per_prompt.float().mean()), **stats})
            if not math.isfinite(stats["loss"]):
                raise FloatingPointError(f"ShieldDiff loss is {stats['loss']} at epoch {epoch + 1}")
            progress.step(total=cfg.epochs, loss=stats["loss"], reward=history[-1]["reward"])
            ctx.checkpoint(epoch + 1, lambda order=order: {
                **training.snapshot(), "order": order, "buffers": {p: list(b) for p, b in tracker.buffers.items()}},
                cfg.epochs)
        tensors = merged_state(adapters)
        meta = {"config": asdict(cfg), "reward": {"concept": scorer.identity, "clip": clip.identity,
                                                  "formula": f"-{cfg.w_concept:g} * concept + {cfg.w_clip:g} * clip"},
                "prompts": {"unacceptable": sum(u for _, u in pool), "acceptable": sum(not u for _, u in pool)},
                "lora": {"rank": cfg.lora_rank, "alpha": cfg.lora_alpha, "modules": len(adapters),
                         "trained_numel": sum(p.numel() for p in params),
                         "delta_norm": float(sum((tensors[f"{n}.weight"] - a.base.weight.detach().float().cpu())
                                                 .norm() ** 2 for n, a in adapters.items()) ** 0.5)},
                "samples": cfg.epochs * cfg.prompts_per_epoch * cfg.samples_per_prompt,
                "history": history, "fit_seconds": round(time.time() - start, 1),
                "fit_cpu_seconds": round(time.process_time() - cpu_start, 1)}
        return Artifact(tensors=tensors, meta=meta)

    def _prompt_pool(self, ctx: FitContext) -> list[tuple[str, bool]]:
        """(caption, is unacceptable) of the concept's two fine-tuning sets, each caption once."""
        cfg = self.config
        pool: dict[str, bool] = {}
        for name, unacceptable in ((cfg.unacceptable_set, True), (cfg.acceptable_set, False)):
            for item in ctx.concept.prompt_set(name):
                pool.setdefault(item.text, unacceptable)
        return list(pool.items())

    def _sample(self, pipe: Any, unet: torch.nn.Module, scheduler: Any, cond: torch.Tensor, uncond: torch.Tensor,
                settings: Any, gen: torch.Generator) -> Trajectories:
        """Trajectories for every row of ``cond``, ``sample_batch_size`` at a time, at the settings' size."""
        cfg = self.config
        height, width = cfg.resolution or settings.height, cfg.resolution or settings.width
        shape = (pipe.unet.config.in_channels, height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)
        parts = []
        for start in range(0, len(cond), cfg.sample_batch_size):
            c = cond[start:start + cfg.sample_batch_size]
            noise = torch.randn((len(c), *shape), generator=gen).to(c.device)
            with _autocast(c.device, cfg.mixed_precision):
                parts.append(sample_trajectories(unet, scheduler, noise, c, uncond.expand(len(c), -1, -1),
                                                 cfg.guidance, cfg.eta, gen))
        return Trajectories(torch.cat([p.latents for p in parts]), torch.cat([p.log_probs for p in parts]),
                            parts[0].timesteps, cond, uncond.expand(len(cond), -1, -1))

    def _train(self, unet: torch.nn.Module, scheduler: Any, params: list[torch.nn.Parameter],
               optimizer: torch.optim.Optimizer, traj: Trajectories, advantages: torch.Tensor,
               gen: torch.Generator) -> dict[str, float]:
        """DDPO's inner loop: shuffled samples, a random timestep order per sample, one optimizer step per
        ``gradient_accumulation_steps`` batches (every timestep of them accumulated), gradient norm clipped."""
        cfg = self.config
        n, steps = traj.log_probs.shape
        n_train = max(1, int(steps * cfg.timestep_fraction))
        chunk = max(1, min(cfg.timestep_chunk, n_train))
        device = traj.latents.device
        losses, infos, updates = [], [], 0
        for _ in range(cfg.num_inner_epochs):
            samples = torch.randperm(n, generator=gen)
            timesteps = torch.stack([torch.randperm(steps, generator=gen) for _ in range(n)])
            batches = [samples[i:i + cfg.train_batch_size] for i in range(0, n, cfg.train_batch_size)]
            optimizer.zero_grad(set_to_none=True)
            for b, batch in enumerate(batches):
                for j in range(0, n_train, chunk):
                    cols = timesteps[batch, j:min(j + chunk, n_train)]  # (batch, k) trajectory step indices
                    rows = batch[:, None].expand_as(cols)
                    rows, cols = rows.reshape(-1).to(device), cols.reshape(-1).to(device)
                    with _autocast(device, cfg.mixed_precision):
                        log_prob = policy_log_prob(unet, scheduler, traj.latents[rows, cols],
                                                   traj.timesteps.to(device)[cols], traj.latents[rows, cols + 1],
                                                   traj.cond[rows], traj.uncond[rows], cfg.guidance, cfg.eta)
                    loss, info = clipped_surrogate(log_prob.float(), traj.log_probs[rows, cols], advantages[rows],
                                                   cfg.clip_range)
                    weight = len(cols) / (len(batch) * n_train * cfg.gradient_accumulation_steps)
                    (loss * weight).backward()
                    losses.append(loss.item())
                    infos.append(info)
                if (b + 1) % cfg.gradient_accumulation_steps == 0 or b == len(batches) - 1:
                    torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    updates += 1
        return {"loss": sum(losses) / len(losses), "updates": updates,
                "clipfrac": sum(i["clipfrac"] for i in infos) / len(infos),
                "approx_kl": sum(i["approx_kl"] for i in infos) / len(infos)}

    def declared_parameters(self, unet: torch.nn.Module) -> set[str]:
        """The base UNet parameters the artifact overwrites: the weights of the LoRA-adapted projections."""
        return {f"{name}.weight" for name in target_names(unet, self.config.lora_targets)}


def _next_prompts(order: list[int], pool: int, count: int, gen: torch.Generator) -> tuple[list[int], list[int]]:
    """The next ``count`` prompt indices of a reshuffled cycle over the pool (every prompt before any repeats)."""
    chosen: list[int] = []
    while len(chosen) < count:
        if not order:
            order = torch.randperm(pool, generator=gen).tolist()
        chosen.append(order.pop(0))
    return chosen, order


def _side_means(name: str, values: torch.Tensor, unacceptable: torch.Tensor) -> dict[str, float]:
    out = {}
    for side, mask in (("unacceptable", unacceptable), ("acceptable", ~unacceptable)):
        if mask.any():
            out[f"{name}_{side}"] = float(values[mask].mean())
    return out


def _encode(pipe: Any, texts: list[str], device: torch.device) -> torch.Tensor:
    with torch.no_grad():
        return pipe.encode_prompt(texts, device, 1, False)[0].float()


@torch.no_grad()
def _decode(pipe: Any, latents: torch.Tensor, batch: int) -> list[Any]:
    """Latents -> PIL images as the pipeline delivers them (VAE decode, [0, 1], 8-bit), ``batch`` at a time."""
    from PIL import Image

    vae, images = pipe.vae, []
    for start in range(0, len(latents), batch):
        chunk = latents[start:start + batch].to(vae.dtype) / vae.config.scaling_factor
        pixels = vae.decode(chunk).sample.float()
        array = ((pixels / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        images += [Image.fromarray(a) for a in array]
    return images


def _autocast(device: torch.device, mixed_precision: str | None):
    if mixed_precision is None:
        return nullcontext()
    return torch.autocast(device.type, dtype=AMP_DTYPES[mixed_precision])
