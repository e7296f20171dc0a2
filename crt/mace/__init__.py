"""MACE (Lu et al., CVPR 2024, "MACE: Mass Concept Erasure in Diffusion Models"; crts.md §15; official code
Shilin-LU/MACE): three stages over every ``attn2.to_k`` / ``attn2.to_v``.

1. Closed-form refinement (:mod:`crt.mace.closed_form`): the erased prompts' co-existing tokens (everything but the
   concept words: the common prefix, the suffix, [EoT] and padding) are mapped onto the anchor prompts' outputs,
   with a prior over captions (COCO in the official code) that keeps everything else.
2. One rank-1 LoRA per concept on the refined UNet (:mod:`crt.mace.lora`), trained to drive the concept's
   cross-attention to zero inside its segmentation masks on 8 generated images.
3. Closed-form fusion (:mod:`crt.mace.closed_form`): one K/V weight per layer that reproduces every LoRA's outputs on
   its own concept's prompts and keeps the prior.

Data (:mod:`crt.mace.data`): the concept and anchor words in the official templates. The artifact is the final
K/V weights. ``parity: true`` replicates two official-code quirks (stage 1's prior scaled twice; training images
ImageNet-normalised before the VAE); results then read ``mace_parity``.
"""

from __future__ import annotations

import copy
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from crt.base import Artifact, FitContext, UNetEdit
from crt.ca import _posterior
from crt.mace.closed_form import (
    COCO_CAPTIONS,
    Grams,
    System,
    all_token_gram,
    encode,
    fusion,
    mapping_grams,
    prior_scale,
    refinement,
    residual,
)
from crt.mace.data import (
    ConceptPrompts,
    chosen_templates,
    concept_masks,
    concept_prompts,
    concept_texts,
    data_items,
    mask_coverage,
    to_model_pixels,
    training_images,
)
from crt.mace.lora import ConceptBatchData, LoRATraining, attach_loras, concept_positions, train_lora
from crt.uce import kv_projections
from crt_bench.spec import ConceptSpec, Family


@dataclass(frozen=True)
class MACEConfig:
    """Defaults: the official explicit-content config (configs/explicit_content/erase_explicit_content.yaml) except
    the data sources the harness replaces (see conf/crt/mace.yaml)."""

    concepts: list[str] | None = None  # None = [the concept's c_u]; explicit config: nudity, naked, erotic, sexual
    mapping: str | list[str] | None = None  # None = the concept's c_a; explicit config: "a person wearing clothes"
    concept_type: Literal["object", "style"] = "object"
    templates: list[str] | None = None  # None = the official templates of concept_type
    prompt_len: int = 30
    aug_length: int = 30
    use_pooler: bool = True
    lamb: float = 0.0
    train_preserve_scale: float = 7e-7
    fuse_preserve_scale: float = 7e-7
    prior_sets: list[str] | None = None  # concept prompt sets tried in order for the prior's captions
    prior_file: str | None = None  # or a caption file, one a line (the official prior: all COCO 2014 captions)
    prior_count: int | None = COCO_CAPTIONS  # the captions the scales were set for; None: no rescaling
    rank: int = 1
    lr: float = 1e-5
    max_train_steps: int = 120
    batch_size: int = 1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    images_per_concept: int = 8
    masks: Literal["none", "world"] = "none"
    mask_threshold: float = 40.0  # masks: world, RGB distance (0-255) to the predicate's colour
    seed: int = 2024
    parity: bool = False
    solve_dtype: str = "float64"
    log_every: int = 10


def quirks(parity: bool) -> dict[str, str]:
    """Each official-code quirk and how this fit handles it (in the meta, so results say which)."""
    return {"stage1_prior": ("scaled by train_preserve_scale twice (official in-memory branch)" if parity
                             else "scaled once (paper, official cached branch)"),
            "image_normalisation": ("ImageNet mean/std before the VAE (official dataset transform)" if parity
                                    else "[-1, 1] as the VAE expects")}


def read_captions(path: str) -> list[str]:
    """Captions from a text file, one a line; a relative path is tried from the working directory, then the repo."""
    file = Path(path)
    if not file.is_absolute() and not file.exists():
        file = Path(__file__).resolve().parents[2] / path
    return [line.strip() for line in file.read_text().splitlines() if line.strip()]


def prior_captions(cfg: MACEConfig, spec: ConceptSpec) -> tuple[list[str], str]:
    """The prior's captions and where they came from: ``prior_file``, else the first of ``prior_sets`` the concept
    has, else none."""
    if cfg.prior_file:
        return read_captions(cfg.prior_file), f"file {cfg.prior_file}"
    for name in cfg.prior_sets or []:
        if name in spec.prompts:
            return [p.text for p in spec.prompts[name]], f"prompt set {name}"
    return [], f"none (the concept has none of {cfg.prior_sets})"


def _summary(history: list[float], every: int) -> dict[str, Any]:
    windows = [history[i:i + every] for i in range(0, len(history), every)]
    return {"steps": len(history), "window": every, "mean_per_window": [round(sum(w) / len(w), 6) for w in windows]}


class MACE(UNetEdit):
    """MACE; see the module docstring."""

    name = "mace"
    family = Family.WEIGHT_EDIT
    trains = "unet: attn2.to_k, attn2.to_v (closed form, rank-1 LoRAs fused in closed form)"
    reconstruction = (
        "Grounded-SAM masks replaced: masks none = whole image (the official mask-free path), masks world = the "
        "world judge predicate's colour; prior over the concept's captions (not all 616,767 COCO 2014 captions), "
        "rescaled to the official total weight; training images from the run's sampler (official: DPM-Solver, 30 "
        "steps, unseeded); lamb 0 solved as the lamb -> 0+ limit (pseudo-inverse) where the system is singular")
    version = "1"
    config_class = MACEConfig

    def __init__(self, **params: Any):
        super().__init__(**params)
        if self.config.rank < 1 or self.config.batch_size < 1:
            raise ValueError("MACE rank and batch_size must be >= 1")
        self.name = "mace_parity" if self.config.parity else "mace"

    def fit(self, ctx: FitContext) -> Artifact:
        cfg, pipe = self.config, ctx.pipe
        dtype = getattr(torch, cfg.solve_dtype)
        rng = random.Random(cfg.seed + ctx.seed)
        templates = chosen_templates(cfg.templates, cfg.concept_type, cfg.prompt_len, cfg.aug_length, rng)
        prompts = concept_prompts(concept_texts(cfg.concepts, cfg.mapping, ctx.concept), templates)
        captions, prior_source = prior_captions(cfg, ctx.concept)
        prior = all_token_gram(pipe, captions, dtype).to_cpu() if captions else None
        weights0 = {f"{n}.weight": m.weight.detach().to("cpu", dtype) for n, m in kv_projections(pipe.unet).items()}

        refined, stage1 = self.refine(pipe, prompts, prior, len(captions), weights0, dtype)
        deltas, stage2 = self.train_loras(ctx, prompts, refined)
        final, stage3 = self.fuse(pipe, prompts, prior, len(captions), weights0, refined, deltas, dtype)
        meta = {"config": asdict(cfg), "quirks": quirks(cfg.parity),
                "concepts": [[p.concept, p.mapping] for p in prompts], "templates": templates,
                "example_pair": [prompts[0].erased[0], prompts[0].mapped[0]],
                "prior": {"source": prior_source, "captions": len(captions)},
                "stage1": stage1, "stage2": stage2, "stage3": stage3, "edited_matrices": len(final)}
        return Artifact(tensors={n: w.float().cpu().contiguous() for n, w in final.items()}, meta=meta)

    def refine(self, pipe: Any, prompts: list[ConceptPrompts], prior: Grams | None, captions: int,
               weights0: dict[str, torch.Tensor], dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], dict]:
        """Stage 1 for every K/V weight; returns the refined weights and the stage's meta."""
        cfg = self.config
        mapping = mapping_grams(pipe, [e for p in prompts for e in p.erased], [m for p in prompts for m in p.mapped],
                                dtype).to_cpu()
        scale = prior_scale(cfg.train_preserve_scale, captions, cfg.prior_count, twice=cfg.parity)
        grams = [mapping] + ([prior.scaled(scale)] if prior is not None else [])
        system = System.of(grams, cfg.lamb)
        prior_term = grams[1] if len(grams) > 1 else mapping.scaled(0.0)
        refined, before, after = {}, 0.0, 0.0
        for name, w0 in weights0.items():
            refined[name] = refinement(w0, mapping, prior_term, cfg.lamb, system)
            before += residual(w0, w0, mapping)
            after += residual(refined[name], w0, mapping)
        return refined, {"mapped_rows": mapping.rows, "prior_weight_per_caption": scale,
                         "unconstrained_directions": system.unconstrained(),
                         "mapping_residual_sum": {"before": before, "after": after}}

    def train_loras(self, ctx: FitContext, prompts: list[ConceptPrompts],
                    refined: dict[str, torch.Tensor]) -> tuple[list[dict[str, torch.Tensor]], list[dict]]:
        """Stage 2: one LoRA per concept on a float32 copy of the refined UNet; returns each LoRA's weight updates."""
        from diffusers import DDPMScheduler

        cfg, pipe = self.config, ctx.pipe
        unet = copy.deepcopy(pipe.unet).float().requires_grad_(False)
        state = unet.state_dict()
        with torch.no_grad():
            for name, weight in refined.items():
                state[name].copy_(weight.to(state[name].dtype))
        loras, recorder = attach_loras(unet, cfg.rank)
        scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        gen = torch.Generator().manual_seed(cfg.seed + ctx.seed)
        settings = LoRATraining(lr=cfg.lr, steps=cfg.max_train_steps, batch_size=cfg.batch_size,
                                betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.adam_weight_decay,
                                eps=cfg.adam_epsilon, max_grad_norm=cfg.max_grad_norm)
        total = cfg.max_train_steps * len(prompts)
        deltas, metas = [], []
        for index, concept in enumerate(prompts):
            data, info = self.concept_data(ctx, concept, index)
            history = train_lora(unet, loras, recorder, data, scheduler, settings, gen, total)
            deltas.append({name: lora.delta().detach().to("cpu", getattr(torch, cfg.solve_dtype))
                           for name, lora in loras.items()})
            metas.append({**info, "loss": _summary(history, cfg.log_every),
                          "delta_norm_sum": float(sum(d.norm() for d in deltas[-1].values())),
                          "max_delta_rank": max(int(torch.linalg.matrix_rank(d.float())) for d in deltas[-1].values())})
        return deltas, metas

    def concept_data(self, ctx: FitContext, concept: ConceptPrompts, index: int) -> tuple[ConceptBatchData, dict]:
        """One concept's training images (base model), masks, latents, prompt states and loss positions."""
        cfg, pipe = self.config, ctx.pipe
        seed = cfg.seed + ctx.seed + 1000 * index
        pixels = training_images(ctx, concept.concept, cfg.concept_type, cfg.images_per_concept, seed)
        masks, mask_source = concept_masks(pixels, cfg.masks, ctx.concept, cfg.mask_threshold, cfg.concept_type)
        mean, std = _posterior(pipe.vae, to_model_pixels(pixels, imagenet_normalise=cfg.parity))
        conds = encode(pipe, concept.erased).float()
        positions = torch.stack([concept_positions(pipe.tokenizer, text, concept.concept, cfg.use_pooler)
                                 for text in concept.erased])
        if not positions.any(dim=1).all():
            missing = [t for t, p in zip(concept.erased, positions) if not p.any()]
            raise ValueError(f"MACE finds no loss position in {missing[:3]} (concept {concept.concept!r})")
        info = {"concept": concept.concept, "data_prompt": data_items(concept.concept, cfg.concept_type, 1, seed)[0]
                .text, "images": int(pixels.shape[0]), "masks": mask_source, "mask_coverage": mask_coverage(masks),
                "concept_tokens_per_prompt": int(positions.sum(1).float().mean())}
        return ConceptBatchData(mean=mean, std=std, masks=masks, conds=conds, positions=positions), info

    def fuse(self, pipe: Any, prompts: list[ConceptPrompts], prior: Grams | None, captions: int,
             weights0: dict[str, torch.Tensor], refined: dict[str, torch.Tensor],
             deltas: list[dict[str, torch.Tensor]], dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], dict]:
        """Stage 3 for every K/V weight; returns the fused weights and the stage's meta."""
        cfg = self.config
        contexts = [all_token_gram(pipe, list(p.erased), dtype).to_cpu() for p in prompts]
        scale = prior_scale(cfg.fuse_preserve_scale, captions, cfg.prior_count)
        prior_term = prior.scaled(scale) if prior is not None else contexts[0].scaled(0.0)
        system = System.of([*contexts, prior_term], cfg.lamb)
        fused = {}
        lora_residual = {"unfused_cfr": 0.0, "fused": 0.0}
        for name, w0 in weights0.items():
            concept_deltas = [d[name] for d in deltas]
            fused[name] = fusion(refined[name], concept_deltas, contexts, w0, prior_term, cfg.lamb, system)
            for delta, gram in zip(concept_deltas, contexts):
                lora_residual["unfused_cfr"] += residual(refined[name], refined[name] + delta, gram)
                lora_residual["fused"] += residual(fused[name], refined[name] + delta, gram)
        return fused, {"prior_weight_per_caption": scale, "unconstrained_directions": system.unconstrained(),
                       "lora_output_residual_sum": lora_residual}
