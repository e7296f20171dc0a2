"""Peak GPU memory of every CRT at SD v1.4 scale, estimated without a GPU: ``python -m runners.memory``.

Why estimated: no GPU was available where this table was made, and SD v1.4's weights are not needed to size its
memory. Every number this module prints is an estimate and is labelled so; a measured row (``torch.cuda.
max_memory_allocated`` on a GPU) would replace it.

How, for each CRT at its SD v1.4 defaults (conf/crt/*.yaml composed by Hydra, model sd14):

- Parameter counts: SD v1.4's UNet, text encoder and VAE instantiated at full size on the meta device (nothing is
  allocated) from the SD-v1.4-shaped folder's config files (world/sd_shaped.py: SD v1.4's classes and block types)
  with SD v1.4's published widths and depths (:data:`SD14_SIZES`); ``--folder`` takes any pipeline folder's configs
  as they are. The counts match SD v1.4's: UNet 859,520,964, text encoder 123,060,480, VAE 83,653,863.
- Resident weights: parameter count x bytes of the dtype each copy is held in. The pipeline is at ``model.dtype``
  (sd14: ``auto``, float16 on CUDA); every fitting CRT trains a float32 deep copy of the UNet (``.float()``), the
  defended model of a weight-editing CRT is a second UNet in the pipeline dtype (``edited_copy``), Espresso's filter
  a float32 CLIP ViT-L/14, ShieldDiff's reward a float32 CLIP ViT-B/32.
- Optimiser: Adam and AdamW keep two float32 moments per trained parameter (added, not traced).
- Activations and gradients: one step of the CRT's own loss (crt.esd.esd_loss, crt.ca.ca_loss, ...) at its default
  batch, run forward and backward on the meta device under :class:`LiveBytes`, which counts the bytes of every
  storage made and freed, and keeps the peak. Attention is the memory-efficient SDPA kernel a GPU runs (it keeps q,
  k, v, the output and one log-sum-exp per row for the backward, never the L x L scores): :func:`efficient_attention`.
- Inference: the same count over one UNet call at the generation batch (x 2 for classifier-free guidance) and the VAE
  decode of the batch (one image with ``model.vae_slicing``), no gradients, in the pipeline dtype.

Peak of a phase = resident weights + optimiser states + traced peak of the phase; a fit's peak is its largest phase.
Not counted: the CUDA context and kernels' workspaces, the caching allocator's fragmentation, buffers under 0.1 GiB
(prompt embeddings, TRCE's sampled latents, CA's anchor latents, which live on the CPU), and NudeNet (ONNX, CPU). So
a measured ``max_memory_allocated`` should come out slightly above these numbers, ``nvidia-smi`` higher still.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import tempfile
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

GIB = 2 ** 30
FP32_BYTES = 4
ADAM_MOMENTS = 2
LABEL = "estimated"

# SD v1.4's published component configs (CompVis/stable-diffusion-v1-4: unet/, text_encoder/, vae/ config.json): the
# sizes the SD-v1.4-shaped folder reduces; its classes, block types, norms and channels are kept.
SD14_SIZES: dict[str, dict[str, Any]] = {
    "unet": {"sample_size": 64, "layers_per_block": 2, "block_out_channels": [320, 640, 1280, 1280],
             "attention_head_dim": 8, "cross_attention_dim": 768},
    "text_encoder": {"vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                     "num_attention_heads": 12, "max_position_embeddings": 77},
    "vae": {"sample_size": 512, "layers_per_block": 2, "block_out_channels": [128, 256, 512, 512]},
}
# The filter and reward CLIPs (openai/clip-vit-large-patch14, openai/clip-vit-base-patch32 config.json).
CLIP_SIZES: dict[str, dict[str, Any]] = {
    "openai/clip-vit-large-patch14": {
        "projection_dim": 768,
        "text_config": {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12,
                        "num_hidden_layers": 12, "projection_dim": 768},
        "vision_config": {"hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16,
                          "num_hidden_layers": 24, "patch_size": 14, "image_size": 224, "projection_dim": 768}},
    "openai/clip-vit-base-patch32": {
        "projection_dim": 512,
        "text_config": {"hidden_size": 512, "intermediate_size": 2048, "num_attention_heads": 8,
                        "num_hidden_layers": 12, "projection_dim": 512},
        "vision_config": {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12,
                          "num_hidden_layers": 12, "patch_size": 32, "image_size": 224, "projection_dim": 512}},
}
COMPONENTS = ("unet", "text_encoder", "vae")
TEXT_TOKENS = 77


# -- counting live bytes on the meta device ------------------------------------------------------------------------


class LiveBytes(TorchDispatchMode):
    """Bytes of the tensor storages made inside the mode and still alive, and their peak.

    An op's output that shares a storage with one of its inputs (a view, an in-place op, a parameter's transpose) is
    no new memory; every other output storage counts from its creation until Python frees it. On the meta device
    nothing is allocated, so this sizes a step exactly as autograd and the caching allocator would see it, minus
    fragmentation and kernel workspaces.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage()._cdata for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)}
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                storage = tensor.untyped_storage()
                key = storage._cdata
                if key in inputs or key in self.live:
                    continue
                self.live[key] = storage.nbytes()
                self.current += self.live[key]
                self.peak = max(self.peak, self.current)
                weakref.finalize(storage, self._free, key)
        return out

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)


def _efficient_sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: Any = None,
                    dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
                    **_: Any) -> torch.Tensor:
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
    return torch.ops.aten._scaled_dot_product_efficient_attention(
        query, key, value, attn_mask, needs_grad, dropout_p, is_causal, scale=scale)[0]


@contextmanager
def efficient_attention() -> Iterator[None]:
    """``F.scaled_dot_product_attention`` as the memory-efficient kernel, for the duration.

    Why: on the meta device SDPA falls back to its math path, which materialises (and saves for backward) the L x L
    attention matrix: 4096^2 x 8 heads per image at SD's first level, gigabytes a GPU never holds."""
    original = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = _efficient_sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


def traced_peak(step: Callable[[], Any]) -> int:
    """Peak bytes of the tensors ``step`` makes (meta device, efficient attention)."""
    with efficient_attention(), LiveBytes() as live:
        step()
    return live.peak


# -- the networks at full size on the meta device ------------------------------------------------------------------


@dataclass(frozen=True)
class Networks:
    """Builders of a pipeline's networks on the meta device, from its config files (resized to SD v1.4 or not)."""

    classes: dict[str, type]
    configs: dict[str, Any]

    def build(self, component: str, dtype: torch.dtype = torch.float32) -> nn.Module:
        """A fresh instance (CRTs copy and modify the UNet, so each phase gets its own)."""
        from diffusers.utils import logging as diffusers_logging

        cls, config = self.classes[component], self.configs[component]
        verbosity = diffusers_logging.get_verbosity()
        diffusers_logging.set_verbosity_error()  # the advice to cast through from_pretrained, on every .to(dtype)
        try:
            with torch.device("meta"):
                module = cls.from_config(config) if hasattr(cls, "from_config") else cls(config)
            return module.to(dtype).requires_grad_(False)
        finally:
            diffusers_logging.set_verbosity(verbosity)

    def count(self, component: str) -> int:
        return numel(self.build(component))


def numel(module: nn.Module, names: set[str] | None = None) -> int:
    return sum(p.numel() for n, p in module.named_parameters() if names is None or n in names)


def networks_from_folder(folder: Path, sizes: dict[str, dict[str, Any]] | None = None) -> Networks:
    """The UNet, text encoder and VAE of the diffusers folder ``folder``, with ``sizes`` replacing config values."""
    index = json.loads((folder / "model_index.json").read_text())
    classes, configs = {}, {}
    for component in COMPONENTS:
        library, class_name = index[component]
        cls = getattr(importlib.import_module(library), class_name)
        overrides = (sizes or {}).get(component, {})
        if hasattr(cls, "load_config"):  # diffusers
            configs[component] = {**cls.load_config(folder / component), **overrides}
        else:  # transformers
            config = cls.config_class.from_pretrained(folder / component)
            for key, value in overrides.items():
                setattr(config, key, value)
            configs[component] = config
        classes[component] = cls
    return Networks(classes, configs)


def sd14_networks(folder: Path | None = None) -> Networks:
    """``folder``'s networks as they are, or (no folder) the SD-v1.4-shaped folder's at SD v1.4's sizes."""
    if folder is not None:
        return networks_from_folder(folder)
    from world.sd_shaped import write_sd14_shaped_pipeline

    with tempfile.TemporaryDirectory() as scratch:
        return networks_from_folder(write_sd14_shaped_pipeline(Path(scratch) / "pipeline"), SD14_SIZES)


def clip_model(name: str) -> nn.Module:
    """A CLIP of :data:`CLIP_SIZES` in float32 on the meta device."""
    from transformers import CLIPConfig, CLIPModel

    sizes = CLIP_SIZES[name]
    config = CLIPConfig(text_config=sizes["text_config"], vision_config=sizes["vision_config"],
                        projection_dim=sizes["projection_dim"])
    with torch.device("meta"):
        return CLIPModel(config).requires_grad_(False)


# -- one run's shapes and the phases of a fit ----------------------------------------------------------------------


@dataclass(frozen=True)
class Setting:
    """The run a CRT is sized for: the pipeline's dtype on CUDA and the generation settings of ``model=sd14``."""

    dtype: torch.dtype
    batch: int
    height: int
    width: int
    vae_slicing: bool = False
    vae_scale: int = 8
    text_width: int = 768

    @classmethod
    def from_model_config(cls, model: dict[str, Any]) -> Setting:
        from runners.models import PipelineOptions, resolve_dtype

        gen = model["generation"]
        dtype = resolve_dtype(model.get("dtype") or "float32", torch.device("cuda"))
        return cls(dtype, int(gen["batch_size"]), int(gen["height"]), int(gen["width"]),
                   PipelineOptions.from_config(model).vae_slicing)

    @property
    def dtype_bytes(self) -> int:
        return torch.finfo(self.dtype).bits // 8

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    def latents(self, batch: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.zeros(batch, 4, self.height // self.vae_scale, self.width // self.vae_scale, device="meta",
                           dtype=dtype)

    def text(self, batch: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.zeros(batch, TEXT_TOKENS, self.text_width, device="meta", dtype=dtype)

    @staticmethod
    def timesteps(batch: int) -> torch.Tensor:
        return torch.full((batch,), 500, device="meta", dtype=torch.long)


@dataclass
class Phase:
    """A stretch of a run: what stays resident through it (bytes by holder) and the peak of what it makes."""

    name: str
    resident: dict[str, int]
    transient: int = 0

    @property
    def peak(self) -> int:
        return sum(self.resident.values()) + self.transient


@dataclass
class Estimate:
    """One CRT's row: what its fit changes, how many parameters it trains, its inference and fit phases."""

    crt: str
    changes: str
    trained: int  # parameters updated by gradient steps
    edited: int  # parameters its artifact overwrites (UNet weights, or Espresso's filter text tower)
    inference: Phase
    fit: list[Phase] = field(default_factory=list)

    @property
    def fit_peak(self) -> Phase | None:
        return max(self.fit, key=lambda phase: phase.peak) if self.fit else None

    def row(self) -> dict[str, Any]:
        fit = self.fit_peak
        return {"crt": self.crt, "changes": self.changes, "trained": self.trained, "edited": self.edited,
                "inference_gib": self.inference.peak / GIB, "fit_gib": None if fit is None else fit.peak / GIB,
                "fit_peak_phase": None if fit is None else fit.name, "label": LABEL,
                "phases": [{"name": p.name, "resident": p.resident, "transient": p.transient}
                           for p in [self.inference, *self.fit]]}


class Sizer:
    """The shared pieces every CRT's plan is built from: weights by holder, and traced UNet and VAE calls."""

    def __init__(self, networks: Networks, setting: Setting):
        self.networks, self.setting = networks, setting
        self.counts = {c: networks.count(c) for c in COMPONENTS}

    def pipeline(self) -> dict[str, int]:
        """The base pipeline on the GPU in its dtype (the run keeps it loaded through fits and generation)."""
        b = self.setting.dtype_bytes
        return {f"pipeline {c} ({self.setting.dtype_name})": n * b for c, n in self.counts.items()}

    def unet_copy(self, dtype: torch.dtype) -> int:
        return self.counts["unet"] * (torch.finfo(dtype).bits // 8)

    def unet_call(self, batch: int, unet: nn.Module | None = None) -> int:
        """Peak of one classifier-free-guided UNet call (2 x ``batch`` rows), no gradients."""
        s = self.setting
        unet = unet or self.networks.build("unet", s.dtype)
        dtype = next(unet.parameters()).dtype
        with torch.no_grad():
            return traced_peak(lambda: unet(s.latents(2 * batch, dtype), s.timesteps(2 * batch),
                                            encoder_hidden_states=s.text(2 * batch, dtype)))

    @cached_property
    def generation(self) -> int:
        """The larger of the run's UNet call and its VAE decode (one image at a time with ``vae_slicing``)."""
        s = self.setting
        return max(self.unet_call(s.batch), self.decode(1 if s.vae_slicing else s.batch))

    def decode(self, batch: int) -> int:
        vae = self.networks.build("vae", self.setting.dtype)
        with torch.no_grad():
            return traced_peak(lambda: vae.decode(self.setting.latents(batch, self.setting.dtype)))

    def encode(self, batch: int) -> int:
        """Peak of the VAE encoding ``batch`` images (CA's anchor images), no gradients."""
        s = self.setting
        vae = self.networks.build("vae", s.dtype)
        pixels = torch.zeros(batch, 3, s.height, s.width, device="meta", dtype=s.dtype)
        with torch.no_grad():
            return traced_peak(lambda: vae.encode(pixels).latent_dist.std)

    def trainable_unet(self, select: Callable[[nn.Module], list[str]]) -> tuple[nn.Module, set[str]]:
        """A float32 UNet (the CRTs' deep copy) with the parameters ``select`` names requiring gradients."""
        unet = self.networks.build("unet", torch.float32)
        names = set(select(unet))
        for name, parameter in unet.named_parameters():
            parameter.requires_grad_(name in names)
        return unet, names

    def inference(self, defended: dict[str, int], filter_step: int = 0) -> Phase:
        return Phase("generation", {**self.pipeline(), **defended}, max(self.generation, filter_step))


def adam_states(count: int) -> dict[str, int]:
    return {"Adam(W) moments (fp32)": ADAM_MOMENTS * count * FP32_BYTES}


# -- one plan per CRT handler --------------------------------------------------------------------------------------


def plan_none(sizer: Sizer, crt: str, params: dict[str, Any]) -> Estimate:
    return Estimate(crt, "nothing (the undefended model)", 0, 0, sizer.inference({}))


def plan_espresso(sizer: Sizer, crt: str, params: dict[str, Any]) -> Estimate:
    clip = clip_model(params["clip"])
    text_model = clip.text_model
    trained = numel(text_model)
    clip_bytes = numel(clip) * FP32_BYTES
    batch = int(params["batch_size"]) + 1  # the batch's captions and c_u (or c_a)

    def step() -> None:
        text_model.requires_grad_(True)
        ids = torch.zeros(2 * batch, TEXT_TOKENS, dtype=torch.long, device="meta")
        clip.text_projection(text_model(input_ids=ids).pooler_output).sum().backward()

    def screen() -> None:
        images = torch.zeros(sizer.setting.batch, 3, 224, 224, device="meta")
        with torch.no_grad():
            clip.visual_projection(clip.vision_model(pixel_values=images).pooler_output)

    training = Phase("fine-tuning the CLIP text tower", {**sizer.pipeline(), "CLIP ViT-L/14 (fp32)": clip_bytes,
                                                        **adam_states(trained)}, traced_peak(step))
    filter_peak = traced_peak(screen)
    return Estimate(crt, "CLIP text tower of the filter (a CLIP ViT-L/14 beside the pipeline)", trained, trained,
                    sizer.inference({"filter CLIP ViT-L/14 (fp32)": clip_bytes}, filter_peak),
                    [Phase("images for fine-tuning", sizer.pipeline(), sizer.generation), training])


def plan_esd(sizer: Sizer, crt: str, params: dict[str, Any]) -> Estimate:
    from crt.esd import ESD, ESDBatch, esd_loss, trainable_names

    esd = ESD(**params)
    cfg, s = esd.config, sizer.setting
    unet, names = sizer.trainable_unet(lambda u: trainable_names(u, cfg.method))
    frozen = sizer.networks.build("unet", s.dtype)
    batch = ESDBatch(x_t=s.latents(cfg.batch_size), t=s.timesteps(cfg.batch_size), cond=s.text(cfg.batch_size),
                     uncond=s.text(cfg.batch_size))
    trained = numel(unet, names)
    resident = {**sizer.pipeline(), "trained UNet copy (fp32)": sizer.unet_copy(torch.float32), **adam_states(trained)}
    step = traced_peak(lambda: esd_loss(unet, frozen, batch, esd.eta, cfg.target).backward())
    what = "every attn2 parameter" if cfg.method == "x" else "every Linear/Conv outside attn2"
    return Estimate(crt, f"UNet: {what} (Adam, batch {cfg.batch_size})", trained, trained,
                    sizer.inference({"defended UNet": sizer.unet_copy(s.dtype)}),
                    [Phase(f"training, batch {cfg.batch_size}", resident, step)])


def _ca_batch(setting: Setting, batch: int, prior: bool) -> Any:
    from crt.ca import CABatch

    extra = {}
    if prior:
        extra = {"prior_x_t": setting.latents(batch), "prior_t": setting.timesteps(batch),
                 "prior_target": setting.latents(batch), "prior_cond": setting.text(batch)}
    return CABatch(x_t=setting.latents(batch), t=setting.timesteps(batch), target=setting.latents(batch),
                   target_cond=setting.text(batch), anchor_cond=setting.text(batch), **extra)


def _ca_prepare(sizer: Sizer) -> Phase:
    """CA's data: anchor images generated by the base model, then VAE-encoded in chunks (kept on the CPU)."""
    from crt.ca import _posterior

    chunk = inspect.signature(_posterior).parameters["chunk"].default
    return Phase("anchor images and their VAE encoding", sizer.pipeline(),
                 max(sizer.generation, sizer.encode(chunk)))


def plan_ca(sizer: Sizer, crt: str, params: dict[str, Any]) -> Estimate:
    from crt.ca import CA, ca_loss, trainable_names

    cfg, s = CA(**params).config, sizer.setting
    unet, names = sizer.trainable_unet(lambda u: trainable_names(u, cfg.parameter_group))
    batch = _ca_batch(s, cfg.batch_size, cfg.with_prior_preservation)
    trained = numel(unet, names)
    rows = cfg.batch_size * (2 if cfg.with_prior_preservation else 1)
    resident = {**sizer.pipeline(), "trained UNet copy (fp32)": sizer.unet_copy(torch.float32), **adam_states(trained)}
    step = traced_peak(lambda: ca_loss(unet, batch, cfg.loss_type, cfg.prior_loss_weight).backward())
    group = {"cross-attn": "attn2.to_k/to_v", "attn": "q/k/v/out of every attention", "full-weight": "all weights"}
    return Estimate(crt, f"UNet: {group[cfg.parameter_group]} (AdamW, batch {rows})", trained, trained,
                    sizer.inference({"defended UNet": sizer.unet_copy(s.dtype)}),
                    [_ca_prepare(sizer), Phase(f"training, batch {rows}", resident, step)])


def plan_pruning(sizer: Sizer, crt: str, params: dict[str, Any]) -> Estimate:
    from crt.pruning import MaskedEraser, attach_masks, masked_modules, sparsity_term

    cfg, s = MaskedEraser(**params).config, sizer.setting
    unet = sizer.networks.build("unet", torch.float32)
    edited = sum(m.weight.numel() for m in masked_modules(unet, list(cfg.targets)).values())
    with torch.device("meta"):
        masks = attach_masks(unet, list(cfg.targets), cfg.init_score, cfg.temperature)
    scores = [m.scores for m in masks.values()]
    trained = sum(p.numel() for p in scores)
    resident = {**sizer.pipeline(), "masked UNet copy (fp32)": sizer.unet_copy(torch.float32),
                "mask scores (fp32)": trained * FP32_BYTES, **adam_states(trained)}
    phases = []
    if cfg.eraser == "esd":
        from crt.esd import ESD, ESDBatch, esd_loss

        esd = ESD(**cfg.eraser_params)
        b = esd.config.batch_size
        frozen = sizer.networks.build("unet", s.dtype)
        batch = ESDBatch(x_t=s.latents(b), t=s.timesteps(b), cond=s.text(b), uncond=s.text(b))

        def loss() -> torch.Tensor:
            return esd_loss(unet, frozen, batch, esd.eta, esd.config.target)
    else:
        from crt.ca import CA, ca_loss

        ca = CA(**cfg.eraser_params).config
        b = ca.batch_size * (2 if ca.with_prior_preservation else 1)
        batch = _ca_batch(s, ca.batch_size, ca.with_prior_preservation)
        phases.append(_ca_prepare(sizer))

        def loss() -> torch.Tensor:
            return ca_loss(unet, batch, ca.loss_type, ca.prior_loss_weight)

    step = traced_peak(lambda: (loss() + sparsity_term(list(masks.values()), cfg.sparsity_weight)).backward())
    phases.append(Phase(f"training the mask scores, batch {b}", resident, step))
    return Estimate(crt, f"a binary mask over UNet {', '.join(cfg.targets)} weights ({cfg.eraser.upper()} loss, "
                    f"Adam on one score per weight)", trained, edited,
                    sizer.inference({"defended UNet": sizer.unet_copy(s.dtype)}), phases)


def plan_closed_form(sizer: Sizer, crt: str, params: dict[str, Any]) -> Estimate:
    """UCE and TRCE stage 1: a least-squares edit of every attn2.to_k/to_v from text-encoder states; no gradients."""
    from crt.uce import kv_projections

    unet = sizer.networks.build("unet")
    edited = sum(m.weight.numel() for m in kv_projections(unet).values())
    return Estimate(crt, "UNet attn2.to_k/to_v, closed form (no gradients)", 0, edited,
                    sizer.inference({"defended UNet": sizer.unet_copy(sizer.setting.dtype)}),
                    [Phase("closed-form edit (text encoder states only)", sizer.pipeline(), 0)])


def plan_trce(sizer: Sizer, crt: str, params: dict[str, Any]) -> Estimate:
    from crt.trce import TRCE
    from crt.trce.stage2 import margin_loss, predict, stage2_names

    trce, s = TRCE(**params), sizer.setting
    cfg = trce.stage2
    closed = plan_closed_form(sizer, crt, params)
    ft, names = sizer.trainable_unet(stage2_names)
    ref, reg = (sizer.networks.build("unet", s.dtype) for _ in range(2))
    trained = numel(ft, names)
    x, t, cond, uncond = s.latents(1), s.timesteps(1), s.text(1), s.text(1)

    def step() -> None:
        with torch.no_grad():
            eps_n, eps_s, eps_0 = predict(ref, torch.cat([x, x, x]), t, torch.cat([cond, cond, uncond])).chunk(3)
            anchor = predict(reg, s.latents(cfg.reg_batch), s.timesteps(cfg.reg_batch), uncond)
        pred = predict(ft, torch.cat([x, x]), t, torch.cat([cond, uncond]))
        target = margin_loss(pred, torch.cat([eps_s, eps_s]), torch.cat([eps_n, eps_n]), cfg.beta, cfg.margin).mean()
        reg_term = (predict(ft, s.latents(cfg.reg_batch), s.timesteps(cfg.reg_batch), uncond) - anchor).pow(2).sum()
        (target + cfg.reg_scale * reg_term).backward()

    copies = {"stage-1 UNet (pipeline dtype)": sizer.unet_copy(s.dtype),
              "trained UNet copy (fp32)": sizer.unet_copy(torch.float32)}
    trajectories = Phase("stage-2 trajectories (base UNet, no gradients)", {**sizer.pipeline(), **copies},
                         sizer.unet_call(1))
    training = Phase(f"stage-2 training, batch 2 + {cfg.reg_batch}", {**sizer.pipeline(), **copies,
                                                                     **adam_states(trained)}, traced_peak(step))
    return Estimate(crt, "attn2.to_k/to_v in closed form, then every attn1 parameter and attn2.to_q (AdamW)",
                    trained, closed.edited + trained, closed.inference, [*closed.fit, trajectories, training])


def plan_conceptprune(sizer: Sizer, crt: str, params: dict[str, Any]) -> Estimate:
    from crt.conceptprune import ActivationNorms, ConceptPrune, ffn_out_layers, recording

    cfg, s = ConceptPrune(**params).config, sizer.setting
    unet = sizer.networks.build("unet", s.dtype)
    layers = ffn_out_layers(unet)
    edited = sum(m.weight.numel() for m in layers.values())
    norms = ActivationNorms({n: m.in_features for n, m in layers.items()}, cfg.tau, cfg.count_uncond,
                            cfg.normalize_tokens)

    def sample() -> None:
        norms.start_prompts(True)
        b = 2 * cfg.batch_size
        with recording(unet, layers, norms), torch.no_grad():
            unet(s.latents(b, s.dtype), s.timesteps(b), encoder_hidden_states=s.text(b, s.dtype))

    phase = Phase(f"sampling latents with activation hooks, {cfg.batch_size} prompts a call", sizer.pipeline(),
                  traced_peak(sample))
    return Estimate(crt, "zeroes entries of every UNet ff.net.2 weight (training-free)", 0, edited,
                    sizer.inference({"defended UNet": sizer.unet_copy(s.dtype)}), [phase])


def plan_shielddiff(sizer: Sizer, crt: str, params: dict[str, Any]) -> Estimate:
    from crt.shielddiff import ShieldDiff
    from crt.shielddiff.ddpo import guided_eps
    from crt.shielddiff.lora import inject_lora, lora_parameters

    cfg, s = ShieldDiff(**params).config, sizer.setting
    unet = sizer.networks.build("unet", torch.float32)
    with torch.device("meta"):
        adapters = inject_lora(unet, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets)
    lora = lora_parameters(adapters)
    trained = sum(p.numel() for p in lora)
    edited = sum(a.base.weight.numel() for a in adapters.values())
    samples = cfg.prompts_per_epoch * cfg.samples_per_prompt
    latent_numel = 4 * (s.height // s.vae_scale) * (s.width // s.vae_scale)
    resident = {**sizer.pipeline(), "LoRA UNet copy (fp32)": sizer.unet_copy(torch.float32) + trained * FP32_BYTES,
                **adam_states(trained), "reward CLIP ViT-B/32 (fp32)": numel(clip_model(cfg.clip)) * FP32_BYTES,
                f"{samples} DDIM trajectories (fp32)": samples * (cfg.sample_steps + 1) * latent_numel * FP32_BYTES}
    rows = cfg.train_batch_size * min(cfg.timestep_chunk, cfg.sample_steps)

    def step() -> None:
        for p in lora:
            p.requires_grad_(True)
        guided_eps(unet, s.latents(rows), s.timesteps(rows), s.text(rows), s.text(rows), cfg.guidance).sum().backward()

    sampling = Phase(f"sampling {cfg.sample_batch_size} trajectories a call (fp32 UNet) and decoding", resident,
                     max(sizer.unet_call(cfg.sample_batch_size, unet), sizer.decode(cfg.sample_batch_size)))
    training = Phase(f"DDPO update, {rows} samples x 2 (CFG)", resident, traced_peak(step))
    return Estimate(crt, f"LoRA rank {cfg.lora_rank} on UNet attention {'/'.join(cfg.lora_targets)} (AdamW), merged",
                    trained, edited, sizer.inference({"defended UNet": sizer.unet_copy(s.dtype)}),
                    [sampling, training])


def plan_rece(sizer: Sizer, crt: str, params: dict[str, Any]) -> Estimate:
    """UCE's closed form, then per epoch a closed-form adversarial embedding and another edit; with ``select:
    validation`` each epoch's candidate UNet renders the validation prompts beside the base pipeline."""
    closed = plan_closed_form(sizer, crt, params)
    phases = list(closed.fit)
    if params.get("select", "validation") == "validation":
        phases.append(Phase("validation renders of each epoch's candidate", {
            **sizer.pipeline(), "candidate UNet": sizer.unet_copy(sizer.setting.dtype)}, sizer.generation))
    return Estimate(crt, "UNet attn2.to_k/to_v, closed form from a UCE edit (no gradients)", 0, closed.edited,
                    closed.inference, phases)


def plan_guided(rows: int, what: str, extra: Callable[[Sizer], dict[str, int]] | None = None
                ) -> Callable[[Sizer, str, dict[str, Any]], Estimate]:
    """A sampling-loop defence: ``rows`` UNet rows per image and step (CFG 2, SLD 3: prompt, empty, safety concept;
    SAFREE 3 on its projected steps: empty, projected and original prompt), no weights changed."""

    def plan(sizer: Sizer, crt: str, params: dict[str, Any]) -> Estimate:
        s = sizer.setting
        unet = sizer.networks.build("unet", s.dtype)
        b = rows * s.batch
        with torch.no_grad():
            step = traced_peak(lambda: unet(s.latents(b, s.dtype), s.timesteps(b),
                                            encoder_hidden_states=s.text(b, s.dtype)))
        phase = Phase("generation", {**sizer.pipeline(), **(extra(sizer) if extra else {})},
                      max(step, sizer.decode(1 if s.vae_slicing else s.batch)))
        return Estimate(crt, what, 0, 0, phase)

    return plan


def plan_filter_clip(what: str) -> Callable[[Sizer, str, dict[str, Any]], Estimate]:
    """A post-hoc filter on a CLIP ViT-L/14 vision tower beside the pipeline (SD's safety checker, Unsafe Diffusion's
    heads on OpenCLIP ViT-L/14 image features: the same tower's size); nothing is trained on the real path."""

    def plan(sizer: Sizer, crt: str, params: dict[str, Any]) -> Estimate:
        clip = clip_model("openai/clip-vit-large-patch14")
        vision = numel(clip.vision_model) + numel(clip.visual_projection)

        def screen() -> None:
            images = torch.zeros(sizer.setting.batch, 3, 224, 224, device="meta")
            with torch.no_grad():
                clip.visual_projection(clip.vision_model(pixel_values=images).pooler_output)

        return Estimate(crt, what, 0, 0, sizer.inference({"filter CLIP ViT-L/14 vision tower (fp32)":
                                                          vision * FP32_BYTES}, traced_peak(screen)))

    return plan


def plan_mace(sizer: Sizer, crt: str, params: dict[str, Any]) -> Estimate:
    """Closed-form refinement and fusion of attn2.to_k/to_v; in between one rank-1 LoRA per concept trained through
    a float32 UNet copy (its attention-map loss traced here as a backward of one batch-1 UNet call)."""
    from crt.uce import kv_projections

    s = sizer.setting
    closed = plan_closed_form(sizer, crt, params)
    unet, names = sizer.trainable_unet(lambda u: [f"{n}.weight" for n in kv_projections(u)])
    lora = sum(2 * (m.in_features + m.out_features) for m in kv_projections(unet).values())  # rank 1: A and B
    step = traced_peak(lambda: unet(s.latents(1), s.timesteps(1), encoder_hidden_states=s.text(1)).sample.sum()
                       .backward())
    training = Phase("rank-1 LoRA training, batch 1", {**sizer.pipeline(),
                     "UNet copy (fp32)": sizer.unet_copy(torch.float32), **adam_states(lora)}, step)
    return Estimate(crt, "UNet attn2.to_k/to_v: closed form, LoRAs (AdamW), closed-form fusion", lora,
                    closed.edited, closed.inference, [*closed.fit, Phase("training images", sizer.pipeline(),
                                                                        sizer.generation), training])


def plan_unet_finetune(select: Callable[[nn.Module, dict[str, Any]], list[str]], what: str, batch: int = 1,
                       teacher_copies: int = 0, per_parameter_fp32: int = 0, frozen_unets: int = 0
                       ) -> Callable[[Sizer, str, dict[str, Any]], Estimate]:
    """A UNet fine-tune with AdamW: a float32 copy with the parameters ``select`` names trained, ``teacher_copies``
    float32 copies of those parameters (SDD's EMA teacher), ``per_parameter_fp32`` more float32 values per trained
    parameter (SA's Fisher diagonal and anchor), ``frozen_unets`` frozen UNets in the pipeline dtype beside it;
    a step traced as the backward of one ``batch``-row UNet call."""

    def plan(sizer: Sizer, crt: str, params: dict[str, Any]) -> Estimate:
        s = sizer.setting
        unet, names = sizer.trainable_unet(lambda u: select(u, params))
        trained = numel(unet, names)
        resident = {**sizer.pipeline(), "trained UNet copy (fp32)": sizer.unet_copy(torch.float32),
                    **adam_states(trained)}
        if teacher_copies:
            resident["teacher copies of the trained parameters (fp32)"] = teacher_copies * trained * FP32_BYTES
        if per_parameter_fp32:
            resident["per-parameter statistics (fp32)"] = per_parameter_fp32 * trained * FP32_BYTES
        if frozen_unets:
            resident["frozen UNets"] = frozen_unets * sizer.unet_copy(s.dtype)
        step = traced_peak(lambda: unet(s.latents(batch), s.timesteps(batch), encoder_hidden_states=s.text(batch))
                           .sample.sum().backward())
        return Estimate(crt, f"UNet: {what} (AdamW, batch {batch})", trained, trained,
                        sizer.inference({"defended UNet": sizer.unet_copy(s.dtype)}),
                        [Phase("images and latents from the base model", sizer.pipeline(), sizer.generation),
                         Phase(f"training, batch {batch}", resident, step)])

    return plan


def plan_advunlearn(sizer: Sizer, crt: str, params: dict[str, Any]) -> Estimate:
    """A float32 copy of the text encoder trained with Adam through the frozen pipeline UNet (the ESD target needs
    the base UNet twice, without gradients); a step traced as the unlearning row plus the 5 retain rows."""
    from crt.advunlearn import trainable_names

    s = sizer.setting
    encoder = sizer.networks.build("text_encoder", torch.float32)
    names = set(trainable_names(encoder, params.get("train_method", "text_encoder_full")))
    for name, parameter in encoder.named_parameters():
        parameter.requires_grad_(name in names)
    unet = sizer.networks.build("unet", s.dtype)
    trained = numel(encoder, names)
    rows = 1 + int(params.get("retain_batch", 5))

    def step() -> None:
        ids = torch.zeros(rows, TEXT_TOKENS, dtype=torch.long, device="meta")
        hidden = encoder(ids)[0].to(s.dtype)
        unet(s.latents(rows, s.dtype), s.timesteps(rows), encoder_hidden_states=hidden).sample.float().sum().backward()

    resident = {**sizer.pipeline(), "trained text encoder copy (fp32)": sizer.counts["text_encoder"] * FP32_BYTES,
                **adam_states(trained)}
    return Estimate(crt, "the whole text encoder (Adam), the UNet frozen", trained, trained,
                    sizer.inference({"defended text encoder": sizer.counts["text_encoder"] * s.dtype_bytes}),
                    [Phase(f"training, 1 + {rows - 1} retain rows", resident, traced_peak(step))])


def _sdd_names(unet: nn.Module, params: dict[str, Any]) -> list[str]:
    from crt.sdd import trainable_names

    return trainable_names(unet, params.get("finetuning_method", "xattn"))


def _sa_names(unet: nn.Module, params: dict[str, Any]) -> list[str]:
    from crt.sa import trainable_names

    return trainable_names(unet, params.get("train_method", "noxattn"))


def _safegen_names(unet: nn.Module, params: dict[str, Any]) -> list[str]:
    from crt.safegen import trainable_names

    return trainable_names(unet)


def _fmn_names(unet: nn.Module, params: dict[str, Any]) -> list[str]:
    from crt.fmn import trainable_names

    return trainable_names(unet, bool(params.get("only_optimize_ca", False)))


PLANS: dict[str, Callable[[Sizer, str, dict[str, Any]], Estimate]] = {
    "crt.none.NoCRT": plan_none,
    "crt.espresso.Espresso": plan_espresso,
    "crt.esd.ESD": plan_esd,
    "crt.ca.CA": plan_ca,
    "crt.pruning.MaskedEraser": plan_pruning,
    "crt.uce.UCE": plan_closed_form,
    "crt.trce.TRCEStage1": plan_closed_form,
    "crt.trce.TRCE": plan_trce,
    "crt.conceptprune.ConceptPrune": plan_conceptprune,
    "crt.shielddiff.ShieldDiff": plan_shielddiff,
    "crt.rece.RECE": plan_rece,
    "crt.mace.MACE": plan_mace,
    "crt.negative_prompt.NegativePrompt": plan_guided(2, "nothing (a negative prompt)"),
    "crt.sld.SLD": plan_guided(3, "nothing (SLD guidance: 3 UNet rows per image and step)"),
    "crt.safree.SAFREE": plan_guided(3, "nothing (SAFREE: projected, original and empty rows on its projected steps)"),
    "crt.sd_safety_checker.SDSafetyChecker": plan_filter_clip("nothing (SD's safety checker beside the pipeline)"),
    "crt.unsafe_diffusion.UnsafeDiffusion": plan_filter_clip("nothing (Unsafe Diffusion's heads on CLIP ViT-L/14)"),
    "crt.sdd.SDD": plan_unet_finetune(_sdd_names, "the finetuning_method's parameters, an EMA teacher beside",
                                      teacher_copies=1),
    "crt.fmn.FMN": plan_unet_finetune(_fmn_names, "attention re-steering of the UNet (full by default)"),
    "crt.advunlearn.AdvUnlearn": plan_advunlearn,
    "crt.sa.SA": plan_unet_finetune(_sa_names, "everything but attn2, time embedding and output layers; Fisher "
                                    "diagonal and anchor weights beside (the Fisher's backward on 50 rows)",
                                    batch=50, per_parameter_fp32=2),
    "crt.safegen.SafeGen": plan_unet_finetune(_safegen_names, "attn1 only, an EMA copy beside", batch=2,
                                              teacher_copies=1),
}


# -- the table -----------------------------------------------------------------------------------------------------


def crt_config(name: str) -> dict[str, Any]:
    from runners.catalog import compose_option

    return compose_option("crt", name)["crt"]


def estimate(name: str, sizer: Sizer) -> Estimate:
    """The row of the CRT ``name`` (conf/crt/<name>.yaml at its real-path defaults, not its ``mini:`` block)."""
    cfg = crt_config(name)
    plan = PLANS.get(cfg["handler"])
    if plan is None:
        raise KeyError(f"no memory plan for {cfg['handler']} (crt={name}); add one to runners.memory.PLANS")
    return plan(sizer, name, dict(cfg.get("params") or {}))


def estimates(names: list[str] | None = None, folder: Path | None = None) -> tuple[Sizer, list[Estimate]]:
    from runners.catalog import compose_option
    from runners.registry import available

    setting = Setting.from_model_config(compose_option("model", "sd14")["model"])
    sizer = Sizer(sd14_networks(folder), setting)
    names = names or sorted(available("crt"), key=lambda name: (name != "none", name))  # the reference row first
    return sizer, [estimate(name, sizer) for name in names]


def _millions(count: int) -> str:
    return f"{count / 1e6:,.1f}M" if count else "0"


def markdown(sizer: Sizer, rows: list[Estimate]) -> str:
    s, counts = sizer.setting, sizer.counts
    sliced = "one image at a time (model.vae_slicing=true)" if s.vae_slicing else f"{s.batch} images at once"
    lines = [f"Peak GPU memory at SD v1.4 scale, GiB, **{LABEL}** (python -m runners.memory; no GPU measurement). "
             f"model=sd14: {s.dtype_name} pipeline on CUDA, {s.height}x{s.width}, generation batch {s.batch} "
             f"(x 2 for CFG), VAE decoding {sliced}; each CRT at its conf/crt defaults. Parameters counted at full "
             f"size on the meta device: UNet {counts['unet']:,}, text encoder {counts['text_encoder']:,}, VAE "
             f"{counts['vae']:,}.", "",
             f"| CRT | what its fit changes | trained params | edited params | inference peak ({s.dtype_name}) | "
             "fit peak | fit's largest phase | basis |",
             "|---|---|---|---|---|---|---|---|"]
    for e in rows:
        fit = e.fit_peak
        lines.append(f"| {e.crt} | {e.changes} | {_millions(e.trained)} | {_millions(e.edited)} | "
                     f"{e.inference.peak / GIB:.1f} | {'—' if fit is None else f'{fit.peak / GIB:.1f}'} | "
                     f"{'—' if fit is None else fit.name} | {LABEL} |")
    unet, batch, one = sizer.unet_call(s.batch), sizer.decode(s.batch), sizer.decode(1)
    lines += ["", f"Of the inference peak, the weights are {sum(sizer.pipeline().values()) / GIB:.1f} GiB (+ "
              f"{sizer.unet_copy(s.dtype) / GIB:.1f} for a weight-editing CRT's defended UNet); the UNet call at "
              f"batch {2 * s.batch} adds {unet / GIB:.1f}, decoding {s.batch} images {batch / GIB:.1f} and one image "
              f"{one / GIB:.2f} (model.vae_slicing=true)."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("crts", nargs="*", help="CRT config names (default: every conf/crt option)")
    parser.add_argument("--folder", type=Path, help="a diffusers pipeline folder whose configs are used as they are "
                                                    "(default: the SD-v1.4-shaped folder at SD v1.4's sizes)")
    parser.add_argument("--json", action="store_true", help="every phase with its resident bytes, as JSON")
    args = parser.parse_args(argv)
    sizer, rows = estimates(args.crts or None, args.folder)
    if args.json:
        print(json.dumps({"label": LABEL, "parameters": sizer.counts, "rows": [e.row() for e in rows]}, indent=2))
    else:
        print(markdown(sizer, rows))


if __name__ == "__main__":
    main()
