"""MACE stage 2: one rank-``r`` LoRA per concept on every ``attn2.to_k`` / ``attn2.to_v``, trained to erase the
concept's attention (official ``src/cfr_lora_training.py``, ``src/mace_lora_atten_processor.py``, ``AttnController``
in ``src/cfr_utils.py``).

Per step: one training image (VAE posterior sample), noised at ``t ~ U[0, 1000)``, one of the concept's augmented
prompts; the loss is, summed over every cross-attention layer, the Frobenius norm of the attention probabilities
at the concept's token positions (with ``use_pooler`` also every [EoT] position, the padding included, as CLIP pads
with [EoT]) inside the concept's segmentation mask (nearest-resized to the layer's resolution, > 0.5). Only the LoRA
trains (AdamW, grad-norm clip 1, constant lr); the UNet underneath is the stage-1 (CFR) UNet, and each concept starts
a fresh LoRA (diffusers' ``LoRALinearLayer`` init: down ~ N(0, 1/r^2), up = 0; scale 1). The denoising output is
not in the loss (no prior preservation in the official configs).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from crt_bench import progress


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a trainable rank-``r`` update: ``base(x) + up(down(x))``."""

    def __init__(self, base: nn.Linear, rank: int):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.rank = rank
        self.down = nn.Parameter(torch.zeros(rank, base.in_features, device=base.weight.device))
        self.up = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))

    def reset(self, generator: torch.Generator) -> None:
        """A fresh LoRA, as diffusers' ``LoRALinearLayer``: ``down`` normal with std 1/r, ``up`` zeros (no change)."""
        with torch.no_grad():
            self.down.copy_(torch.randn(self.down.shape, generator=generator) / self.rank)
            self.up.zero_()

    def delta(self) -> torch.Tensor:
        """The weight update ``up @ down`` (rank <= r)."""
        return self.up @ self.down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + F.linear(F.linear(x, self.down), self.up)


@dataclass
class AttentionRecorder:
    """The cross-attention probabilities of one forward pass, (B * heads, pixels, tokens) per layer, with gradients."""

    maps: list[torch.Tensor] = field(default_factory=list)


class RecordingCrossAttention:
    """diffusers' ``AttnProcessor`` (explicit softmax) that hands each cross-attention map to a recorder."""

    def __init__(self, recorder: AttentionRecorder):
        self.recorder = recorder

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        attention_mask = attn.prepare_attention_mask(attention_mask, context.shape[1], context.shape[0])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        key = attn.head_to_batch_dim(attn.to_k(context))
        value = attn.head_to_batch_dim(attn.to_v(context))
        probs = attn.get_attention_scores(query, key, attention_mask)
        if encoder_hidden_states is not None:
            self.recorder.maps.append(probs)
        hidden_states = attn.batch_to_head_dim(torch.bmm(probs, value))
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def attach_loras(unet: nn.Module, rank: int) -> tuple[dict[str, LoRALinear], AttentionRecorder]:
    """Wrap every ``attn2.to_k`` / ``attn2.to_v`` of ``unet`` (a training copy) in a :class:`LoRALinear` and record
    every cross-attention map. Returns the LoRAs by the weight name they update, and the recorder."""
    recorder = AttentionRecorder()
    loras: dict[str, LoRALinear] = {}
    for name, module in list(unet.named_modules()):
        if not name.endswith("attn2"):
            continue
        for proj in ("to_k", "to_v"):
            lora = LoRALinear(getattr(module, proj), rank)
            setattr(module, proj, lora)
            loras[f"{name}.{proj}.weight"] = lora
        module.set_processor(RecordingCrossAttention(recorder))
    return loras, recorder


def concept_positions(tokenizer: Any, prompt: str, concept: str, use_pooler: bool) -> torch.Tensor:
    """(77,) bool: every occurrence of the concept's tokens in ``prompt`` and, with ``use_pooler``, every [EoT]
    (CLIP pads with [EoT], so the padding too), as the official ``MACEDataset``."""
    ids = tokenizer(prompt, truncation=True, padding="max_length", max_length=tokenizer.model_max_length).input_ids
    word = tokenizer(concept, add_special_tokens=False).input_ids
    eot = tokenizer.convert_tokens_to_ids(tokenizer.eos_token)
    marked = torch.zeros(len(ids), dtype=torch.bool)
    for i in range(len(ids)):
        if word and ids[i:i + len(word)] == word:
            marked[i:i + len(word)] = True
        if use_pooler and ids[i] == eot:
            marked[i] = True
    return marked


def attention_map_loss(maps: Sequence[torch.Tensor], positions: torch.Tensor,
                       masks: torch.Tensor | None = None) -> torch.Tensor:
    """``sum_layers ||A[heads, masked pixels, concept positions]||_F`` over the batch.

    ``maps``: per layer (B * heads, pixels, tokens), batch-major as diffusers' ``head_to_batch_dim``; ``positions``
    (B, tokens) bool; ``masks`` (B, 1, H, W) or None (every pixel). With one image (the official batch) this is the
    official ``AttnController.loss``."""
    batch = positions.shape[0]
    total = maps[0].new_zeros(())
    for probs in maps:
        heads, pixels = probs.shape[0] // batch, probs.shape[1]
        side = math.isqrt(pixels)
        if side * side != pixels:
            raise ValueError(f"MACE's attention masks need square maps, got {pixels} pixels")
        per_image = probs.view(batch, heads, pixels, -1)
        picked = []
        for b in range(batch):
            chosen = per_image[b][:, :, positions[b].to(probs.device)]
            if masks is not None:
                keep = F.interpolate(masks[b:b + 1].float(), size=(side, side), mode="nearest").view(-1) > 0.5
                chosen = chosen[:, keep.to(probs.device)]
            picked.append(chosen.reshape(-1))
        total = total + torch.cat(picked).norm()
    return total


@dataclass
class ConceptBatchData:
    """What one concept's LoRA is trained on, computed once."""

    mean: torch.Tensor  # (N, C, h, w) scaled VAE posterior means of the training images
    std: torch.Tensor  # same shape, posterior standard deviations
    masks: torch.Tensor | None  # (N, 1, H, W) segmentation masks, or None (whole image)
    conds: torch.Tensor  # (P, 77, width) the concept's augmented prompts' states
    positions: torch.Tensor  # (P, 77) bool, the loss's token positions per prompt


@dataclass(frozen=True)
class LoRATraining:
    """The optimiser settings of stage 2 (official explicit-content config)."""

    lr: float = 1e-5
    steps: int = 120
    batch_size: int = 1
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 1e-2
    eps: float = 1e-8
    max_grad_norm: float = 1.0


def train_lora(unet: nn.Module, loras: dict[str, LoRALinear], recorder: AttentionRecorder, data: ConceptBatchData,
               scheduler: Any, settings: LoRATraining, gen: torch.Generator, total: int | None = None) -> list[float]:
    """Reset the LoRAs and train them on one concept; returns the loss per step. The epochs reshuffle the images
    (the official data loader), each example draws its prompt uniformly (the official ``__getitem__``)."""
    for lora in loras.values():
        lora.reset(gen)
    params = [p for lora in loras.values() for p in (lora.down, lora.up)]
    optimizer = torch.optim.AdamW(params, lr=settings.lr, betas=settings.betas, weight_decay=settings.weight_decay,
                                  eps=settings.eps)
    device = next(unet.parameters()).device
    history: list[float] = []
    order = torch.zeros(0, dtype=torch.long)
    while len(history) < settings.steps:
        if len(order) < settings.batch_size:
            order = torch.cat([order, torch.randperm(data.mean.shape[0], generator=gen)])
        images, order = order[:settings.batch_size], order[settings.batch_size:]
        prompts = torch.randint(data.conds.shape[0], (len(images),), generator=gen)
        latents = data.mean[images] + data.std[images] * torch.randn(data.mean[images].shape, generator=gen)
        noise = torch.randn(latents.shape, generator=gen)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(images),), generator=gen)
        x_t = scheduler.add_noise(latents, noise, t)
        recorder.maps.clear()
        unet(x_t.to(device), t.to(device), encoder_hidden_states=data.conds[prompts].to(device))
        masks = None if data.masks is None else data.masks[images]
        loss = attention_map_loss(recorder.maps, data.positions[prompts], masks)
        recorder.maps.clear()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
        optimizer.step()
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"MACE attention loss is {loss.item()} at step {len(history)}")
        history.append(loss.item())
        progress.step(total=total, loss=history[-1])
    return history
