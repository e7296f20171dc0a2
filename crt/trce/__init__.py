"""TRCE (Chen et al., ICCV 2025; crts.md §9): erase a malicious concept in two stages.

- Stage 1 (``trce_stage1``, :mod:`crt.trce.stage1`): a closed-form edit of ``attn2.to_k`` / ``attn2.to_v`` that maps
  the first-[EoT] state of malicious prompts onto that of contextually similar safe prompts, with a preservation
  cache over captions.
- Stage 2 (``trce``, :mod:`crt.trce.stage2`): from the stage-1 UNet, contrastive steering of the early denoising
  steps (every ``attn1`` parameter and ``attn2.to_q``), regularised on unconditional trajectories.

Both stages take their data from the concept's own prompt pairs (``unsafe_set[i] <-> safe_set[i]``, on the world
``finetune_unacceptable[i] <-> finetune_acceptable[i]``), or from inline ``pairs``. ``parity: true`` replicates the
official code's quirks (word-count [EoT] index, twice-scaled preservation cache, gradients never zeroed, and stage 2's
latent/timestep pairing); results then carry the name ``trce_parity`` / ``trce_stage1_parity`` and the meta lists
each quirk's state. The artifact holds the final UNet's changed parameters only.
"""

from __future__ import annotations

from dataclasses import asdict, fields
from typing import Any

import torch

from crt.base import CRT, Artifact, FitContext, TrainingState, UNetEdit, edited_copy
from crt.trce.stage1 import Stage1Config, fit_stage1, prompt_pairs
from crt.trce.stage2 import (
    Stage2Config,
    make_plan,
    prepare_samples,
    stage2_names,
    steer,
    summarise,
    trainable_copy,
)
from crt.uce import token_states
from crt_bench.backbone import ONLY_SD1, UNET_FAMILY
from crt_bench.spec import Family

STAGE1_FIELDS = {f.name for f in fields(Stage1Config)}
STAGE2_FIELDS = {f.name for f in fields(Stage2Config)}
SHARED_FIELDS = {"seed"}
CORRECTED = ("the official code's quirks corrected (parity: false): first-[EoT] index and keyword positions by BPE "
             "tokens, preservation cache scaled once")
CORRECTED_STAGE2 = ("; stage 2 zeroes gradients every step, pairs x_t with its own timestep and draws the "
                    "regulariser's step from the trajectory's steps")


def quirks(parity: bool, stage2: bool) -> dict[str, str]:
    """Each official-code quirk and how this fit handles it; goes into the meta so that results say which."""
    out = {"eot_index": "whitespace words + 1 (official)" if parity else "BPE tokens + 1 (corrected)",
           "preserve_cache": "scaled by preserve_scale twice (official)" if parity else "scaled once (corrected)"}
    if stage2:
        out |= {"zero_grad": "never, gradients accumulate (official)" if parity else "every step (corrected)",
                "latent_timestep": ("latent after DDIM step s with t_s (official)" if parity
                                    else "latent before DDIM step s with t_s (corrected)"),
                "regulariser_step": ("0..S, S skipped but counted, sum starts at 0.01 (official)" if parity
                                     else "0..S-1 (corrected)")}
    return out


class TRCEStage1(UNetEdit):
    """TRCE's closed-form stage alone; see the module docstring."""

    name = "trce_stage1"
    family = Family.CLOSED_FORM_EDIT
    trains = "unet: attn2.to_k, attn2.to_v (closed form)"
    version = "1"
    backbones = UNET_FAMILY  # on SD 2.x / SDXL position 76 is the '!' padding state, not an [EoT] copy
    config_class = Stage1Config

    def __init__(self, **params: Any):
        super().__init__(**params)
        self.stage1: Stage1Config = self.config
        self._label(self.stage1.parity, stage2=False)

    def _label(self, parity: bool, stage2: bool) -> None:
        """The name and reconstruction note follow ``parity``, so the two variants never share a results row."""
        self.name = f"{type(self).name}_parity" if parity else type(self).name
        self.reconstruction = None if parity else CORRECTED + (CORRECTED_STAGE2 if stage2 else "")

    def fit(self, ctx: FitContext) -> Artifact:
        tensors, meta = fit_stage1(ctx.pipe, ctx.concept, self.stage1)
        return Artifact(tensors=tensors, meta={"config": asdict(self.stage1), "parity": self.stage1.parity,
                                               "quirks": quirks(self.stage1.parity, False), "stage1": meta})


class TRCE(TRCEStage1):
    """Both stages: the stage-1 edit, then contrastive early-step steering; see the module docstring."""

    name = "trce"
    family = Family.WEIGHT_EDIT
    trains = "unet: attn2.to_k, attn2.to_v (closed form), then attn1 and attn2.to_q (fine-tuning)"
    version = "1"
    backbones = ONLY_SD1  # stage 2's sampling loop is SD 1.x's

    def __init__(self, **params: Any):
        CRT.__init__(self, **params)
        unknown = set(params) - STAGE1_FIELDS - STAGE2_FIELDS - SHARED_FIELDS
        if unknown:
            raise TypeError(f"TRCE has no params {sorted(unknown)}")
        self.stage1 = Stage1Config(**{k: v for k, v in params.items() if k in STAGE1_FIELDS})
        self.stage2 = Stage2Config(**{k: v for k, v in params.items() if k in STAGE2_FIELDS})
        self.seed = int(params.get("seed", 0))
        self._label(self.stage1.parity, stage2=True)

    def fit(self, ctx: FitContext) -> Artifact:
        s1, s2, parity, pipe = self.stage1, self.stage2, self.stage1.parity, ctx.pipe
        stage1_tensors, stage1_meta = fit_stage1(pipe, ctx.concept, s1)
        reg = edited_copy(pipe.unet, stage1_tensors).requires_grad_(False)  # the stage-1 UNet, frozen
        names = stage2_names(reg)
        ft = trainable_copy(reg, set(names))
        gen = torch.Generator().manual_seed(self.seed + ctx.seed)  # the run seed shifts the param seed
        pairs = prompt_pairs(s1, ctx.concept)
        plan = make_plan(len(pairs) * s2.seeds_per_prompt, s2, parity, gen)
        size = (s2.resolution or ctx.settings.height, s2.resolution or ctx.settings.width)

        def encode(texts: list[str]) -> torch.Tensor:
            return token_states(pipe, texts)[0]

        targets, regs, uncond, data = prepare_samples(pipe, pairs, s2, plan, parity, size, gen, encode)
        optimizer = torch.optim.AdamW([p for n, p in ft.named_parameters() if n in set(names)], lr=s2.lr,
                                      betas=(0.9, 0.999), weight_decay=s2.weight_decay, eps=1e-8)
        history: dict[str, list[float]] = {"target": [], "reg": [], "loss": []}
        training = TrainingState({n: p for n, p in ft.named_parameters() if n in set(names)}, optimizer,
                                 history=history, grads=parity)  # parity: gradients accumulate across steps
        start = training.resume(ctx, len(targets))  # the samples above are redrawn from the seed
        steer(ft, pipe.unet, reg, optimizer, uncond, targets, regs, s2, parity, history, start,
              lambda done: ctx.checkpoint(done, training.snapshot, len(targets)))
        trained = {n: p.detach().float().cpu().clone() for n, p in ft.named_parameters() if n in set(names)}
        tensors = stage1_tensors | trained
        stage2_meta = {"trained_parameters": len(trained), "trained_numel": sum(t.numel() for t in trained.values()),
                       "iterations": len(targets), "data": data,
                       "skipped_reg_samples": sum(e is None for b in plan.reg for e in b),
                       "target_per_epoch": summarise(history["target"], len(targets) // s2.epochs or 1),
                       "loss_window": s2.log_every,
                       **{f"{k}_per_window": summarise(v, s2.log_every) for k, v in history.items()}}
        meta = {"config": {**asdict(s1), **asdict(s2), "seed": self.seed}, "parity": parity,
                "quirks": quirks(parity, True), "stage1": stage1_meta, "stage2": stage2_meta}
        return Artifact(tensors=tensors, meta=meta)
