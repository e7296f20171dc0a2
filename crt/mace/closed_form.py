"""MACE's two closed forms over every ``attn2.to_k`` / ``attn2.to_v`` weight (official ``src/cfr_utils.py``
``prepare_k_v`` + ``closed_form_refinement``, ``src/fuse_lora_close_form.py``).

Both minimise ``sum_j s_j sum_r ||W' k_r - T_j m_r||^2 + lamb ||W' - W_in||^2`` over token states ``k_r`` (keys) and
``m_r`` (the states whose outputs under the target matrix ``T_j`` they should produce). With the grams
``G_j = sum k k^T`` and ``X_j = sum m k^T`` the solution is

``W' = (sum_j s_j T_j X_j + lamb W_in) (sum_j s_j G_j + lamb I)^-1``.

- Stage 1, closed-form refinement (CFR): keys are the erased prompts' token states at the positions they share with
  the mapped prompts (common prefix, common suffix with [EoT], then the padding aligned from the end: the concept
  words themselves are left to the LoRA), ``m`` the mapped prompts' states at the paired positions, ``T = W_0``;
  plus the prior, all 77 token states of every prior caption with ``m = k`` and ``T = W_0``, at ``s`` =
  ``train_preserve_scale``.
- Stage 3, fusion: per concept ``i``, all 77 token states of its erased prompts with ``m = k`` and
  ``T = W_cfr + dW_i`` (its LoRA), plus the same prior at ``fuse_preserve_scale``.

The official prior is a cache over the 616,767 COCO 2014 captions; the scales were set for that sum, so a prior
over ``n`` other captions is multiplied by ``prior_count / n`` (its total weight stays the official one). The
official code multiplies stage 1's prior by ``train_preserve_scale`` twice (its in-memory branch; the cached
branch and the paper scale once): ``parity``. Official ``lamb`` is 0; the inverse is applied as a pseudo-inverse
with ``W_in`` kept on directions no key or caption reaches (the limit lamb -> 0+), where ``torch.inverse`` would
amplify rounding noise; with a full-rank system (SD with the COCO prior) the two agree.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from crt.uce import token_states

MAX_LENGTH = 77
COCO_CAPTIONS = 616_767  # COCO 2014 train (414,113) + val (202,654) captions: the official cache_coco.py's sum
PINV_RTOL = 1e-12  # relative eigenvalue below which a direction counts as unconstrained (float64 solve)


def aligned_positions(old_ids: Sequence[int], new_ids: Sequence[int],
                      length: int = MAX_LENGTH) -> tuple[list[int], list[int]]:
    """Token positions of the erased prompt paired with the mapped prompt's (official ``find_matching_indices`` and
    its extension): the common prefix, the common suffix (ending in [EoT]), then the padding to ``length``, aligned
    from the end (the longer prompt's padding is cut). ``*_ids`` are unpadded ids with [SoT] and [EoT]."""
    start = 0
    for a, b in zip(old_ids, new_ids):
        if a != b:
            break
        start += 1
    end_old, end_new = len(old_ids) - 1, len(new_ids) - 1
    while end_old >= start and end_new >= start and old_ids[end_old] == new_ids[end_new]:
        end_old, end_new = end_old - 1, end_new - 1
    old_idx = list(range(start)) + list(range(end_old + 1, len(old_ids)))
    new_idx = list(range(start)) + list(range(end_new + 1, len(new_ids)))
    shift = old_idx[-1] - new_idx[-1]
    old_idx += range(old_idx[-1] + 1, length - max(-shift, 0))
    new_idx += range(new_idx[-1] + 1, length - max(shift, 0))
    return old_idx, new_idx


def unpadded_ids(tokenizer: Any, text: str) -> list[int]:
    return tokenizer(text, truncation=True, max_length=MAX_LENGTH).input_ids


@torch.no_grad()
def encode(pipe: Any, texts: Sequence[str], batch: int = 64) -> torch.Tensor:
    """Last hidden states (n, 77, width) of ``texts``, the UNet's conditioning, in batches."""
    return torch.cat([token_states(pipe, list(texts[i:i + batch]))[0] for i in range(0, len(texts), batch)])


@dataclass
class Grams:
    """``key = sum k k^T``, ``cross = sum m k^T`` and ``value = sum m m^T`` over (key, input) state pairs: all a
    closed form and its residual need, whatever the number of pairs."""

    key: torch.Tensor
    cross: torch.Tensor
    value: torch.Tensor
    rows: int

    @classmethod
    def of(cls, keys: torch.Tensor, inputs: torch.Tensor | None = None) -> Grams:
        if inputs is None:
            gram = keys.T @ keys
            return cls(gram, gram, gram, int(keys.shape[0]))
        return cls(keys.T @ keys, inputs.T @ keys, inputs.T @ inputs, int(keys.shape[0]))

    def scaled(self, scale: float) -> Grams:
        return Grams(self.key * scale, self.cross * scale, self.value * scale, self.rows)

    def to_cpu(self) -> Grams:
        return Grams(self.key.cpu(), self.cross.cpu(), self.value.cpu(), self.rows)


@torch.no_grad()
def mapping_grams(pipe: Any, erased: Sequence[str], mapped: Sequence[str], dtype: torch.dtype) -> Grams:
    """Stage 1's grams: erased prompts' states (keys) paired with mapped prompts' states (:func:`aligned_positions`)."""
    old_states, new_states = encode(pipe, erased).to(dtype), encode(pipe, mapped).to(dtype)
    keys, inputs = [], []
    for text_old, text_new, old, new in zip(erased, mapped, old_states, new_states):
        old_idx, new_idx = aligned_positions(unpadded_ids(pipe.tokenizer, text_old),
                                             unpadded_ids(pipe.tokenizer, text_new))
        keys.append(old[old_idx])
        inputs.append(new[new_idx])
    return Grams.of(torch.cat(keys), torch.cat(inputs))


@torch.no_grad()
def all_token_gram(pipe: Any, texts: Sequence[str], dtype: torch.dtype, batch: int = 64) -> Grams:
    """``sum c c^T`` over all 77 token states of every text (the prior cache, the fusion's per-concept contexts)."""
    width = pipe.text_encoder.config.hidden_size
    gram = torch.zeros(width, width, dtype=dtype, device=pipe.text_encoder.device)
    for i in range(0, len(texts), batch):
        states = encode(pipe, texts[i:i + batch]).flatten(0, 1).to(dtype)
        gram += states.T @ states
    return Grams(gram, gram, gram, MAX_LENGTH * len(texts))


def prior_scale(scale: float, captions: int, prior_count: int | None, twice: bool = False) -> float:
    """The weight of a prior gram over ``captions`` captions: ``scale`` (``scale^2`` under the official stage-1
    quirk), times ``prior_count / captions`` so that its total weight is that of the official COCO sum."""
    if captions == 0:
        return 0.0
    weight = scale * scale if twice else scale
    return weight * (prior_count / captions if prior_count else 1.0)


@dataclass
class System:
    """The right factor ``A = sum_j s_j G_j + lamb I`` (the same for every layer) and its pseudo-inverse."""

    matrix: torch.Tensor
    pinv: torch.Tensor

    @classmethod
    def of(cls, grams: Sequence[Grams], lamb: float) -> System:
        matrix = sum(g.key for g in grams)
        matrix = matrix + lamb * torch.eye(matrix.shape[0], dtype=matrix.dtype, device=matrix.device)
        return cls(matrix, torch.linalg.pinv(matrix, rtol=PINV_RTOL, hermitian=True))

    def unconstrained(self) -> int:
        eig = torch.linalg.eigvalsh(self.matrix)
        return int((eig <= PINV_RTOL * eig[-1].clamp_min(0)).sum())

    def solve(self, rhs: torch.Tensor, w_in: torch.Tensor) -> torch.Tensor:
        """``rhs A^-1``, keeping ``w_in`` on A's null space: ``w_in + (rhs - w_in A) A^+``."""
        return w_in + (rhs - w_in @ self.matrix) @ self.pinv


def closed_form(targets: Sequence[torch.Tensor], grams: Sequence[Grams], w_in: torch.Tensor, lamb: float,
                system: System) -> torch.Tensor:
    """``(sum_j T_j X_j + lamb W_in) A^-1``; each gram already carries its scale ``s_j``."""
    rhs = lamb * w_in
    for target, gram in zip(targets, grams):
        rhs = rhs + target @ gram.cross
    return system.solve(rhs, w_in)


def refinement(w0: torch.Tensor, mapping: Grams, prior: Grams, lamb: float, system: System) -> torch.Tensor:
    """Stage 1: ``min sum ||W' k - W_0 m||^2 + s sum_p ||W' c_p - W_0 c_p||^2 + lamb ||W' - W_0||^2`` (``prior``
    scaled by s)."""
    return closed_form([w0, w0], [mapping, prior], w0, lamb, system)


def fusion(w_cfr: torch.Tensor, deltas: Sequence[torch.Tensor], contexts: Sequence[Grams], w0: torch.Tensor,
           prior: Grams, lamb: float, system: System) -> torch.Tensor:
    """Stage 3: ``min sum_i sum_c ||W* c - (W_cfr + dW_i) c||^2 + s sum_p ||W* c_p - W_0 c_p||^2
    + lamb ||W* - W_cfr||^2`` (``prior`` scaled by s)."""
    targets = [w_cfr + delta for delta in deltas] + [w0]
    return closed_form(targets, [*contexts, prior], w_cfr, lamb, system)


def residual(weight: torch.Tensor, target: torch.Tensor, grams: Grams) -> float:
    """``sqrt(sum_r ||W k_r - T m_r||^2)`` from the grams: ``tr(W G W^T) - 2 tr(T X W^T) + tr(T V T^T)``."""
    total = (torch.trace(weight @ grams.key @ weight.T) - 2 * torch.trace(target @ grams.cross @ weight.T)
             + torch.trace(target @ grams.value @ target.T))
    return float(total.clamp_min(0).sqrt())
