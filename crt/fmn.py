"""Forget-Me-Not (Zhang et al., arXiv 2303.17591; crts.md §15): attention re-steering. On images of the concept,
noised at a uniform DDPM timestep and paired with a prompt naming the concept, fine-tune the UNet to minimise how much
every cross-attention layer attends to the concept's tokens:

    ``L = || concat over attn2 layers of P[b, h, q, j] for j in the concept positions of prompt b ||_2``

with ``P = softmax(Q K^T / sqrt(d))`` the attention probabilities (batch x heads, image queries, 77 tokens): the
plain L2 norm (not squared, not averaged) of every selected probability of every ``attn2`` layer, heads and pixels
(official ``src/train_attn.py``, ``AttnController.loss``). The noise prediction itself is not in the loss.

Concept positions (the official dataset): every occurrence of the concept text's tokens in the prompt and, with
``use_pooler``, the pooler token ``<|endoftext|>``. Prompts: the official templates ``"a photo of {c}"`` (object) or
``"a photo in the style of {c}"`` (style). Images: the official code reads real images of the concept from
``data/<concept>/`` (10 per concept in its example); here the base model renders them from the concept's prompts
(``image_set``) through ``ctx.generate``, so they are the model's own images of the concept.

Defaults: ``configs/attn.yaml``: the whole UNet (``only_optimize_ca`` false; ``true`` = every ``attn2`` parameter),
35 steps, lr 2e-6, AdamW (0.9, 0.999, wd 0.01, eps 1e-8), constant lr, batch 1, shuffled epochs over the images,
grad-norm clip 1. Parameters outside the graph of the attention maps (the last ``attn2``'s value/output
projections and every layer after it) get no gradient, so AdamW never touches them; the artifact holds the
parameters that received one.

Parity switches (each default is the corrected behaviour):

- ``pooler_every_eos``: the code marks every token whose id is ``<|endoftext|>``. SD 2.1-base, the code's default
  model, pads with ``!``, so that is the one pooler token; SD v1.4's tokenizer pads with ``<|endoftext|>``, so the
  code also marks every padding position (~70 of 77). Default: the first ``<|endoftext|>`` only.
- ``clip_full_unet``: with the full UNet the code hands ``clip_grad_norm_`` the generator ``unet.parameters()``
  the optimiser already consumed, so no gradient is clipped (with ``only_optimize_ca`` it is a list and clips).
  Default: clip; false reproduces the code (no clipping when the full UNet trains).

Not implemented: the optional textual-inversion stage (``use_ti``, true in ``attn.yaml``): the concept is named by
its plain text, the code's ``use_ti: false`` path. With a batch > 1 the code's head/batch indexing of the mask is
wrong (it repeats the batch mask head-major while diffusers orders batch-major); here each example uses its own
mask (the default batch 1 is unaffected).
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from crt.base import Artifact, FitContext, TrainingState, UNetEdit, pil_to_pixels
from crt.ca import _posterior
from crt.esd import _autocast, _encode, _summarise
from crt_bench import progress
from crt_bench.spec import Family, PromptItem

TEMPLATES = {"object": "a photo of {}", "style": "a photo in the style of {}"}  # the official dataset's prompts


@dataclass(frozen=True)
class FMNConfig:
    """Hyper-parameters; defaults are the official ``configs/attn.yaml`` (crts.md §15), ``use_ti: false`` path."""

    concept: str | None = None  # the concept's plain text; None = the concept's c_u
    concept_type: Literal["object", "style"] = "object"  # which official prompt template
    image_set: str = "finetune_unacceptable"  # prompts the base model renders the concept's images from
    num_images: int = 10  # the official example's images per concept; image k from prompt k mod n
    only_optimize_ca: bool = False  # true = every attn2 parameter; false = the whole UNet
    use_pooler: bool = True
    pooler_every_eos: bool = False  # parity switch: every <|endoftext|>-id position (the code with SD v1.4)
    clip_full_unet: bool = True  # parity switch: false = the code's unclipped full-UNet training
    no_real_image: bool = False  # the code's option: noise a zero latent instead of the image's
    max_train_steps: int = 35
    batch_size: int = 1
    lr: float = 2.0e-6
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    weight_decay: float = 1.0e-2
    adam_epsilon: float = 1.0e-8
    max_grad_norm: float = 1.0
    resolution: int | None = None  # pixels; None = the generated images' size (the code: 512)
    seed: int = 0  # the code's seed is null (unseeded)
    mixed_precision: str | None = None  # None | "bf16" | "fp16" (autocast on the trained copy)
    gradient_checkpointing: bool = False
    log_every: int = 5


def concept_positions(tokenizer: Any, prompt: str, concept: str, use_pooler: bool = True,
                      every_eos: bool = False) -> torch.Tensor:
    """A bool mask over the prompt's ``model_max_length`` tokens: every occurrence of the concept's token sequence
    and, with ``use_pooler``, the pooler token (the first ``<|endoftext|>``; every one with ``every_eos``)."""
    ids = tokenizer(prompt, truncation=True, padding="max_length", max_length=tokenizer.model_max_length).input_ids
    concept_ids = tokenizer(concept, add_special_tokens=False).input_ids
    if not concept_ids:
        raise ValueError(f"the concept text {concept!r} has no tokens")
    mask = [False] * len(ids)
    n = len(concept_ids)
    for i in range(len(ids) - n + 1):
        if ids[i:i + n] == concept_ids:
            mask[i:i + n] = [True] * n
    if use_pooler:
        eos = [i for i, token in enumerate(ids) if token == tokenizer.eos_token_id]
        for i in eos if every_eos else eos[:1]:
            mask[i] = True
    return torch.tensor(mask)


def attention_sum_of_squares(probs: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Sum of the squared probabilities onto the marked tokens: ``probs`` (B*heads, queries, tokens) in diffusers'
    batch-major head order, ``positions`` (B, tokens) bool, one mask per example."""
    batch = positions.shape[0]
    per_example = probs.reshape(batch, probs.shape[0] // batch, probs.shape[1], probs.shape[2])
    return (per_example.pow(2) * positions[:, None, None, :].to(probs.dtype)).sum()


@dataclass
class AttentionMaps:
    """What the hooked cross-attention layers saw in one forward: per layer, the sum of squared probabilities onto
    the concept positions (and, with ``keep``, the probabilities themselves)."""

    positions: torch.Tensor | None = None  # (B, tokens) bool
    keep: bool = False
    sums: list[torch.Tensor] = field(default_factory=list)
    layers: list[str] = field(default_factory=list)
    probs: dict[str, torch.Tensor] = field(default_factory=dict)

    def record(self, layer: str, probs: torch.Tensor) -> None:
        if self.keep:
            self.probs[layer] = probs
        if self.positions is not None:
            self.sums.append(attention_sum_of_squares(probs, self.positions.to(probs.device)))
            self.layers.append(layer)

    def loss(self) -> torch.Tensor:
        """The official loss: the L2 norm of every recorded concept-position probability."""
        if not self.sums:
            raise RuntimeError("no cross-attention map was recorded; are the processors installed?")
        return torch.stack(self.sums).sum().sqrt()

    def clear(self) -> None:
        self.sums, self.layers, self.probs = [], [], {}


class RecordingCrossAttention:
    """An attention processor that computes ``softmax(Q K^T / sqrt(d))`` explicitly (diffusers' plain processor) and
    hands the probabilities to :class:`AttentionMaps` before using them, so they carry gradients."""

    def __init__(self, maps: AttentionMaps, layer: str):
        self.maps = maps
        self.layer = layer

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, *args: Any,
                 **kwargs: Any) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        spatial = hidden_states.shape if hidden_states.ndim == 4 else None
        if spatial is not None:
            hidden_states = hidden_states.flatten(2).transpose(1, 2)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        batch, tokens = context.shape[0], context.shape[1]
        attention_mask = attn.prepare_attention_mask(attention_mask, tokens, batch)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))
        key = attn.head_to_batch_dim(attn.to_k(context))
        value = attn.head_to_batch_dim(attn.to_v(context))
        probs = attn.get_attention_scores(query, key, attention_mask)
        self.maps.record(self.layer, probs)
        out = attn.batch_to_head_dim(torch.bmm(probs, value))
        out = attn.to_out[1](attn.to_out[0](out))
        if spatial is not None:
            out = out.transpose(1, 2).reshape(spatial)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def cross_attention_layers(unet: nn.Module) -> list[str]:
    """Names of the cross-attention modules (``attn2``), the layers the official loss reads."""
    return [name for name, _ in unet.named_modules() if name.endswith("attn2")]


def install_recorders(unet: nn.Module, maps: AttentionMaps) -> list[str]:
    """Put a :class:`RecordingCrossAttention` on every ``attn2`` of ``unet`` (a training copy); returns the layers."""
    layers = cross_attention_layers(unet)
    modules = dict(unet.named_modules())
    for name in layers:
        modules[name].set_processor(RecordingCrossAttention(maps, name))
    return layers


def trainable_names(unet: nn.Module, only_optimize_ca: bool) -> list[str]:
    """The parameters the optimiser holds: every ``attn2`` one (``only_optimize_ca``) or the whole UNet."""
    return [n for n, _ in unet.named_parameters() if not only_optimize_ca or "attn2" in n]


def image_items(prompts: list[PromptItem], count: int) -> list[PromptItem]:
    """Image ``k`` from prompt ``k mod n``; each later round over the prompts shifts the seeds by ``n``."""
    n = len(prompts)
    return [PromptItem(prompts[k % n].text, seed=prompts[k % n].seed + (k // n) * n, guidance=prompts[k % n].guidance,
                       case=f"fmn_image_{k}") for k in range(count)]


@dataclass
class FMNData:
    """The concept's images as scaled VAE posteriors, the training prompt, its embedding and concept mask."""

    mean: torch.Tensor  # (N, C, h, w)
    std: torch.Tensor
    prompt: str
    cond: torch.Tensor  # (1, 77, width)
    positions: torch.Tensor  # (1, 77) bool


@dataclass
class FMNBatch:
    x_t: torch.Tensor
    t: torch.Tensor
    cond: torch.Tensor
    positions: torch.Tensor


class FMN(UNetEdit):
    """Forget-Me-Not attention re-steering; see the module docstring."""

    name = "fmn"
    family = Family.WEIGHT_EDIT
    trains = "unet: every parameter upstream of a cross-attention map (full) or every attn2 parameter"
    reconstruction = ("the concept's images are rendered by the base model from the concept's prompts (the code "
                      "reads real photos); the concept is named by its plain text (no textual-inversion stage)")
    version = "1"
    config_class = FMNConfig

    def __init__(self, **params: Any):
        super().__init__(**params)
        if self.config.concept_type not in TEMPLATES:
            raise ValueError(f"FMN concept_type must be one of {sorted(TEMPLATES)}, got {self.config.concept_type!r}")

    def fit(self, ctx: FitContext) -> Artifact:
        cfg = self.config
        data = self.prepare(ctx)
        device = ctx.pipe.unet.device
        unet = copy.deepcopy(ctx.pipe.unet).float().requires_grad_(False)
        maps = AttentionMaps()
        layers = install_recorders(unet, maps)
        names = set(trainable_names(unet, cfg.only_optimize_ca))
        params = {n: p.requires_grad_(True) for n, p in unet.named_parameters() if n in names}
        if cfg.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        optimizer = torch.optim.AdamW(list(params.values()), lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                      weight_decay=cfg.weight_decay, eps=cfg.adam_epsilon)
        clip = cfg.max_grad_norm > 0 and (cfg.clip_full_unet or cfg.only_optimize_ca)
        scaler = torch.amp.GradScaler(device.type, enabled=cfg.mixed_precision == "fp16")
        gen = torch.Generator().manual_seed(cfg.seed + ctx.seed)
        history: list[float] = []
        state = TrainingState(params, optimizer, scaler=scaler, history=history)
        start = state.resume(ctx, cfg.max_train_steps)
        updated: set[str] = set()  # the parameters a gradient reached (the same graph every step)
        batches = itertools.islice(self.batches(ctx, data, gen), start, None)  # replayed: drawing them is cheap
        for step in range(start, cfg.max_train_steps):
            batch = next(batches)
            maps.positions = batch.positions
            with _autocast(device, cfg.mixed_precision):
                unet(batch.x_t, batch.t, encoder_hidden_states=batch.cond)  # only the attention maps matter
                loss = maps.loss()
            maps.clear()
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            if clip:
                torch.nn.utils.clip_grad_norm_(list(params.values()), cfg.max_grad_norm)
            scaler.step(optimizer)
            scaler.update()
            if not math.isfinite(loss.item()):
                raise FloatingPointError(f"FMN loss is {loss.item()} at step {step}")
            updated |= {n for n, p in params.items() if p.grad is not None}
            history.append(loss.item())
            progress.step(total=cfg.max_train_steps, loss=history[-1])
            ctx.checkpoint(step + 1, state.snapshot, cfg.max_train_steps)
        tensors = {n: p.detach().float().cpu().clone() for n, p in params.items() if n in updated}
        return Artifact(tensors=tensors, meta={
            "config": asdict(cfg), "prompt": data.prompt, "concept_positions": data.positions[0].nonzero().flatten()
            .tolist(), "images": int(data.mean.shape[0]), "attn2_layers": len(layers),
            "objective": "||concat_l P_l[:, :, concept positions]||_2 over every attn2 layer",
            "clipped": clip, "trained_parameters": len(tensors),
            "trained_numel": sum(t.numel() for t in tensors.values()), "loss": _summarise(history, cfg.log_every)})

    def prepare(self, ctx: FitContext) -> FMNData:
        """Render the concept's images with the base model, encode them and the training prompt once."""
        cfg, pipe = self.config, ctx.pipe
        concept = cfg.concept or ctx.concept.c_u
        images = ctx.generate(image_items(list(ctx.concept.prompt_set(cfg.image_set)), cfg.num_images))
        if any(image is None for image in images):
            raise ValueError("FMN needs every image of the concept; the base model delivered a blocked one")
        pixels = pil_to_pixels(images) * 2 - 1
        if cfg.resolution is not None and pixels.shape[-1] != cfg.resolution:
            pixels = F.interpolate(pixels, size=(cfg.resolution, cfg.resolution), mode="bilinear", antialias=True)
        mean, std = _posterior(pipe.vae, pixels)
        prompt = TEMPLATES[cfg.concept_type].format(concept)
        positions = concept_positions(pipe.tokenizer, prompt, concept, cfg.use_pooler, cfg.pooler_every_eos)
        return FMNData(mean=mean, std=std, prompt=prompt, cond=_encode(pipe, [prompt], pipe.unet.device).float(),
                       positions=positions[None])

    def batches(self, ctx: FitContext, data: FMNData, gen: torch.Generator) -> Iterator[FMNBatch]:
        """Endless batches as the official loader: reshuffled epochs over the images (the last batch of an epoch may
        be short), a posterior sample of each, noised at a uniform DDPM timestep."""
        from diffusers import DDPMScheduler

        cfg = self.config
        scheduler = DDPMScheduler.from_config(ctx.pipe.scheduler.config)
        device = ctx.pipe.unet.device
        count = data.mean.shape[0]
        while True:
            epoch = torch.randperm(count, generator=gen)
            for start in range(0, count, cfg.batch_size):
                rows = epoch[start:start + cfg.batch_size]
                latents = data.mean[rows] + data.std[rows] * torch.randn(data.mean[rows].shape, generator=gen)
                noise = torch.randn(latents.shape, generator=gen)
                t = torch.randint(0, scheduler.config.num_train_timesteps, (len(rows),), generator=gen)
                x_t = scheduler.add_noise(torch.zeros_like(latents) if cfg.no_real_image else latents, noise, t)
                n = len(rows)
                yield FMNBatch(x_t=x_t.to(device), t=t.to(device), cond=data.cond.expand(n, -1, -1),
                               positions=data.positions.expand(n, -1))
