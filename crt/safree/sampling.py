"""SAFREE as a sampling-loop defence (:class:`crt.guidance.Guidance`): one implementation for generation and attacks.

``begin`` analyses each prompt of the batch (its trigger tokens, input subspace and self-validating step count,
:mod:`crt.safree.projection`) from its token ids and builds the safe condition from ``conditions.cond`` without
detaching it, so a white-box attack differentiates through the projection (the trigger mask, ``P_I`` and ``t'`` are
discrete or id-determined and held fixed). ``noise`` conditions the steps ``i <= t'`` of a prompt with trigger
tokens on the safe condition and the others on the original one, the unconditional branch being the negative
prompt's (the joined keywords, set by the runner from ``DefendedModel.negative_prompt``); at a safe step the UNet
also runs the original condition so the decoder's skip features can be re-weighted (:mod:`crt.safree.reweight`).

A soft prompt (``prompt_ids`` None: an embedding, not text) cannot be masked token by token, so SAFREE's text side
cannot analyse it: such a batch is sampled with the negative prompt only, and the state says so. The detection needs
the text encoder's *input* (each token replaced by id 0 and the prompt re-encoded); the states in ``cond`` cannot be
masked that way. White-box attacks that call the guidance with a condition but no ids therefore meet SAFREE's
negative prompt only; with the ids of the prompt they forward (P4D's and UnlearnDiffAtk's projected tokens) they
would differentiate through the projection.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from crt.guidance import Conditions, Guidance, Step, branches, unet_noise
from crt.safree.projection import PromptAnalysis, SelfValidation, analyse_prompt, safe_states, span_projector
from crt.safree.reweight import BranchLayout, LatentReweighting


@dataclass
class SafreeState:
    """One batch's decisions: per row the analysis (None for a soft prompt), the safe condition and ``t'``."""

    safe_cond: torch.Tensor
    projected: torch.Tensor  # (B,) bool: the row has trigger tokens, so its safe condition differs
    last_step: list[int]  # t' per row; -1 = never (soft prompt or nothing detected)
    analyses: list[PromptAnalysis | None] = field(default_factory=list)
    soft_prompt: bool = False

    def active(self, step: Step, self_validation: bool) -> torch.Tensor:
        """(B,) bool: the rows conditioned on their safe condition at ``step``."""
        if not self_validation:
            return self.projected.clone()
        within = torch.tensor([step.index <= last for last in self.last_step], dtype=torch.bool)
        return self.projected & within


class SafreeGuidance(Guidance):
    """Token projection + self-validating filter + latent re-weighting over classifier-free guidance."""

    name = "safree"

    def __init__(self, toxic_embeddings: torch.Tensor, alpha: float = 0.01,
                 validation: SelfValidation | None = None, self_validation: bool = True,
                 reweighting: LatentReweighting | None = None):
        self.toxic_embeddings = toxic_embeddings
        self.toxic_projector = span_projector(toxic_embeddings.float())
        self.alpha = float(alpha)
        self.validation = validation or SelfValidation()
        self.self_validation = bool(self_validation)
        self.reweighting = reweighting
        self.unet_calls = 3 if reweighting is not None else 2  # at a safe step (else 2): attacks' cost accounting

    def begin(self, pipe: Any, conditions: Conditions) -> SafreeState:
        cond = conditions.cond
        rows = cond.shape[0]
        if conditions.prompt_ids is None:
            return SafreeState(cond, torch.zeros(rows, dtype=torch.bool), [-1] * rows, [None] * rows, True)
        eos = int(pipe.tokenizer.eos_token_id)
        projector = self.toxic_projector.to(cond.device)
        cache: dict[tuple[int, ...], PromptAnalysis] = {}
        analyses, safe_rows = [], []
        for b in range(rows):
            ids = conditions.prompt_ids[b].to(cond.device)
            key = tuple(ids.tolist())
            if key not in cache:
                cache[key] = analyse_prompt(pipe.text_encoder, ids, cond[b].detach().float(), eos, projector,
                                            self.alpha, self.validation)
            analysis = cache[key]
            analyses.append(analysis)
            if analysis.triggers.any():
                safe_rows.append(safe_states(cond[b], analysis.triggers, analysis.input_projector.to(cond.dtype),
                                             projector.to(cond.dtype)))
            else:
                safe_rows.append(cond[b])
        projected = torch.tensor([bool(a.triggers.any()) for a in analyses], dtype=torch.bool)
        return SafreeState(torch.stack(safe_rows), projected, [a.last_step for a in analyses], analyses)

    def noise(self, unet: Any, latents: torch.Tensor, step: Step, conditions: Conditions, state: SafreeState
              ) -> torch.Tensor:
        active = state.active(step, self.self_validation)
        if not active.any():
            return self._cfg(unet, latents, step, conditions, conditions.cond)
        where = active.to(conditions.cond.device)[:, None, None]
        cond = torch.where(where, state.safe_cond, conditions.cond)
        if self.reweighting is None:
            return self._cfg(unet, latents, step, conditions, cond)
        rows = cond.shape[0]
        conds = ([conditions.uncond] if conditions.guided else []) + [cond, conditions.cond]
        safe_at = rows if conditions.guided else 0
        layout = BranchLayout(safe=safe_at, original=safe_at + rows, active=active)
        with self.reweighting.applied(unet, layout):
            preds = branches(unet, latents, step.timestep, conds)
        if not conditions.guided:
            return preds[0]
        uncond, text = preds[0], preds[1]
        return uncond + conditions.scale * (text - uncond)

    @staticmethod
    def _cfg(unet: Any, latents: torch.Tensor, step: Step, conditions: Conditions, cond: torch.Tensor
             ) -> torch.Tensor:
        """Classifier-free guidance of ``cond`` against the (negative-prompt) unconditional branch."""
        if not conditions.guided:
            return unet_noise(unet, latents, step.timestep, cond)
        uncond, text = branches(unet, latents, step.timestep, [conditions.uncond, cond])
        return uncond + conditions.scale * (text - uncond)
