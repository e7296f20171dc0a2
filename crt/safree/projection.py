"""SAFREE's text side: the toxic subspace, trigger-token detection, the projection and the self-validating step count.

All in the text encoder's output space (width D, 768 on SD v1.4):

- the toxic subspace C is spanned by the pooled ([EOT]) embeddings of the concept's keywords, ``P_C`` its orthogonal
  projector ``E (E^T E)^+ E^T`` (E = the embeddings as columns);
- the input space I is spanned by the pooled embeddings of the prompt with one token masked at a time (token i
  replaced by id 0, CLIP's "!", as the official code does), ``P_I`` its projector;
- token i is a trigger when masking it moves the prompt away from C: the distance ``d_i = ||(I - P_C) p_{\\i}||`` of
  its masked embedding is at least ``(1 + alpha)`` times the mean distance of the other masked embeddings;
- a trigger token's state ``x`` becomes ``(I - P_C) P_I x`` (orthogonal to C, inside I); every other position
  (SOT, safe tokens, EOT, padding) keeps its state;
- self-validation: ``beta = 1 - mean cos(x, (I - P_C) P_I x)`` over the prompt's attended positions (SOT, tokens,
  EOT), every token projected; the projected embeddings condition the steps ``i <= t'`` with
  ``t' = round(upper * sigmoid(2 k (10 beta - m)))`` (the official code's ``f_beta``: m = 5.333, k = 2.5; artists
  m = 5.5, k = 3.5).

Functions take plain tensors so that tests can check them against a direct computation; the projection of the
prompt's states is differentiable (white-box attacks go through it), the detection is not (it is discrete).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

MASK_TOKEN_ID = 0  # the official code masks a token by writing id 0 (CLIP's "!") in its place


@dataclass(frozen=True)
class SelfValidation:
    """The official ``f_beta`` (sigmoid branch): ``t' = round(upper * sigmoid(sharpness * slope * (10 beta - m)))``."""

    upper: int = 10  # up_t: at most this step index uses the projected embeddings
    midpoint: float = 5.333  # t in f_beta (5.5 for artists)
    slope: float = 2.5  # k in f_beta (3.5 for artists)
    sharpness: float = 2.0  # the code's sigmoid_scale

    def last_step(self, beta: float) -> int:
        """t': the last step index (0-based) whose condition is the projected one. Python's round, as the code."""
        value = self.sharpness * self.slope * (10.0 * beta - self.midpoint)
        return round(self.upper * _sigmoid(value))


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def span_projector(rows: torch.Tensor) -> torch.Tensor:
    """The orthogonal projector (D, D) onto the span of ``rows`` (K, D): ``E (E^T E)^+ E^T`` with E = rows^T.

    Computed in float64 (the pseudo-inverse of a near-singular Gram matrix) and returned in ``rows``' dtype."""
    e = rows.detach().to(torch.float64).T
    return (e @ torch.linalg.pinv(e.T @ e) @ e.T).to(rows.dtype)


def complement(projector: torch.Tensor) -> torch.Tensor:
    """``I - P``: the projector onto the orthogonal complement."""
    return torch.eye(projector.shape[0], dtype=projector.dtype, device=projector.device) - projector


def distances_to_subspace(vectors: torch.Tensor, toxic_projector: torch.Tensor) -> torch.Tensor:
    """``||(I - P_C) v||`` per row of ``vectors`` (n, D)."""
    return (vectors @ complement(toxic_projector).T).norm(dim=-1)


def trigger_tokens(masked_pooled: torch.Tensor, toxic_projector: torch.Tensor, alpha: float) -> torch.Tensor:
    """(n,) bool, True where token i is a trigger: ``d_i >= (1 + alpha) * mean_{j != i} d_j``.

    ``masked_pooled`` (n, D): the pooled embedding of the prompt with token i masked, row i. One token alone has no
    other token to compare with; the official code's mean over nothing is NaN and its ``d < NaN`` test fails, so the
    token counts as a trigger: kept here."""
    with torch.no_grad():
        dist = distances_to_subspace(masked_pooled.to(toxic_projector.dtype), toxic_projector)
        n = dist.shape[0]
        if n == 1:
            return torch.ones(1, dtype=torch.bool, device=dist.device)
        others_mean = (dist.sum() - dist) / (n - 1)
        return ~(dist < (1.0 + alpha) * others_mean)


def project_states(states: torch.Tensor, input_projector: torch.Tensor, toxic_projector: torch.Tensor) -> torch.Tensor:
    """``(I - P_C) P_I x`` for every row x of ``states`` (..., D); differentiable in ``states``."""
    operator = complement(toxic_projector) @ input_projector
    return states @ operator.T.to(states.dtype)


def safe_states(states: torch.Tensor, triggers: torch.Tensor, input_projector: torch.Tensor,
                toxic_projector: torch.Tensor) -> torch.Tensor:
    """One prompt's (L, D) token states with the triggers (token i sits at position i + 1, after SOT) projected."""
    where = torch.zeros(states.shape[0], dtype=torch.bool, device=states.device)
    where[1:1 + triggers.shape[0]] = triggers.to(states.device)
    return torch.where(where[:, None], project_states(states, input_projector, toxic_projector), states)


def self_validation_beta(states: torch.Tensor, attended: torch.Tensor, input_projector: torch.Tensor,
                         toxic_projector: torch.Tensor) -> float:
    """``1 - mean cos(x, (I - P_C) P_I x)`` over the attended positions (SOT, tokens, EOT) of one prompt."""
    with torch.no_grad():
        projected = project_states(states, input_projector, toxic_projector)
        cos = torch.nn.functional.cosine_similarity(projected[attended], states[attended], dim=-1)
        return float(1.0 - cos.mean())


@dataclass
class PromptAnalysis:
    """What SAFREE decides about one prompt before sampling."""

    tokens: int  # n, the prompt's tokens between SOT and EOT
    triggers: torch.Tensor  # (n,) bool
    input_projector: torch.Tensor  # P_I (D, D)
    beta: float
    last_step: int  # t'


def end_position(ids: torch.Tensor, eos_token_id: int) -> int:
    """The position of the first end token after SOT (the last position when the prompt has none)."""
    found = (ids[1:] == eos_token_id).nonzero()
    return int(found[0]) + 1 if len(found) else ids.shape[0] - 1


def masked_prompt_ids(ids: torch.Tensor, end: int, mask_id: int = MASK_TOKEN_ID) -> torch.Tensor:
    """(n, end + 1): the prompt [SOT, t_1..t_n, EOT] with token i replaced by ``mask_id`` in row i - 1."""
    prompt = ids[:end + 1]
    n = end - 1
    masked = prompt.repeat(n, 1)
    masked[torch.arange(n), torch.arange(1, n + 1)] = mask_id
    return masked


@torch.no_grad()
def pooled_embeddings(text_encoder: Any, ids: torch.Tensor) -> torch.Tensor:
    """The text encoder's pooled ([EOT]) output for each row of ``ids``; no attention mask (causal: the padding
    after EOT cannot change it), as the official code encodes its masked prompts."""
    return text_encoder(ids.to(text_encoder.device)).pooler_output


@torch.no_grad()
def analyse_prompt(text_encoder: Any, ids: torch.Tensor, states: torch.Tensor, eos_token_id: int,
                   toxic_projector: torch.Tensor, alpha: float, validation: SelfValidation) -> PromptAnalysis:
    """Detect one prompt's triggers and its self-validating step count from its ids (77,) and states (77, D)."""
    end = end_position(ids, eos_token_id)
    n = end - 1
    p_c = toxic_projector.to(states.device, states.dtype)
    if n <= 0:  # the empty prompt: nothing to mask, nothing to project
        eye = torch.eye(states.shape[-1], dtype=states.dtype, device=states.device)
        return PromptAnalysis(0, torch.zeros(0, dtype=torch.bool), eye, 0.0, -1)
    masked = pooled_embeddings(text_encoder, masked_prompt_ids(ids, end)).to(states.dtype)
    p_i = span_projector(masked)
    triggers = trigger_tokens(masked, p_c, alpha)
    attended = torch.zeros(states.shape[0], dtype=torch.bool, device=states.device)
    attended[:end + 1] = True
    beta = self_validation_beta(states.detach(), attended, p_i, p_c)
    return PromptAnalysis(n, triggers.cpu(), p_i, beta, validation.last_step(beta))
