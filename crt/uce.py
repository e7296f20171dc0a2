"""UCE (Gandikota et al., WACV 2024): a closed-form edit of every cross-attention key/value projection.

For each ``attn2.to_k`` / ``attn2.to_v`` weight ``W`` (text width -> d) the edit solves
``min_W' lambda ||W' - W||^2 + s_e sum_i ||W' c_i - W c_i^guide||^2 + s_p sum_j ||W' c_j - W c_j||^2``:
erased concept tokens ``c_i`` are sent where the guide's tokens go, preserved tokens keep their outputs
(crts.md §4). No gradient steps; fitting takes seconds on SD v1.4.

The old official code (``uce_eot``) always adds the empty prompt to the preserved prompts (all 77 tokens with its
keys) at ``s_p = max(0.1, 1 / #preserved)``: ``preserve_empty`` and ``preserve_scale`` null. Its guide ' ' for
"towards uncond" tokenizes as '' with CLIP's tokenizer, so ``guide`` '' covers it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from crt.base import CRT, OPEN_WEIGHTS, Artifact, DefendedModel, FitContext, edited_copy, replace_module
from crt_bench.backbone import UNET_FAMILY, conditioning_encoder
from crt_bench.spec import Family


@dataclass(frozen=True)
class UCEConfig:
    """Defaults of the new official code (crts.md §4); ``guide`` '' is its object/unsafe guide."""

    erase: list[str] | None = None  # None = [the concept's c_u]
    guide: str | list[str] = ""  # one guide for all erased concepts, or one per concept
    preserve: list[str] = field(default_factory=list)
    preserve_empty: bool = False  # also preserve '' (old code, always); its tokens follow ``tokens``
    lamb: float = 0.5  # lambda, the weight of staying close to W
    erase_scale: float = 1.0
    preserve_scale: float | None = 1.0  # None = the old code's max(0.1, 1 / number of preserved prompts)
    tokens: Literal["last_word", "all"] = "last_word"
    solve_dtype: str = "float64"


def uce_closed_form(weight: torch.Tensor, erase_keys: torch.Tensor, erase_values: torch.Tensor,
                    preserve_keys: torch.Tensor, lamb: float, erase_scale: float,
                    preserve_scale: float) -> torch.Tensor:
    """``(lamb W + s_e V^T C_e + s_p W C_p^T C_p) (lamb I + s_e C_e^T C_e + s_p C_p^T C_p)^-1``.

    ``weight`` (d_out, d_in); keys are rows (n, d_in), ``erase_values`` rows (n, d_out). Solved rather than inverted.
    """
    eye = torch.eye(weight.shape[1], dtype=weight.dtype, device=weight.device)
    lhs = lamb * weight + erase_scale * erase_values.T @ erase_keys
    lhs = lhs + preserve_scale * (weight @ preserve_keys.T) @ preserve_keys
    gram = lamb * eye + erase_scale * erase_keys.T @ erase_keys + preserve_scale * preserve_keys.T @ preserve_keys
    return torch.linalg.solve(gram, lhs.T).T


def preserved_prompts(cfg: UCEConfig) -> tuple[list[str], float]:
    """The preserved prompts (``''`` first when ``preserve_empty``, as the old code) and their scale."""
    texts = ([""] if cfg.preserve_empty else []) + list(cfg.preserve)
    if cfg.preserve_scale is not None:
        return texts, float(cfg.preserve_scale)
    return texts, max(0.1, 1 / max(len(texts), 1))


def kv_projections(unet: nn.Module) -> dict[str, nn.Linear]:
    """Every cross-attention key and value projection, by module name."""
    return {name: module for name, module in unet.named_modules()
            if name.endswith(("attn2.to_k", "attn2.to_v")) and isinstance(module, nn.Linear)}


@torch.no_grad()
def token_states(pipe: Any, texts: list[str]) -> tuple[torch.Tensor, list[int]]:
    """The token states cross-attention reads (n, 77, width; both encoders on SDXL) of ``texts`` and, per text, the
    index of its last word token."""
    tok = pipe.tokenizer
    ids = tok(texts, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt")
    states = conditioning_encoder(pipe)(ids.input_ids.to(pipe.text_encoder.device)).last_hidden_state
    last_word = [int(mask.sum()) - 2 for mask in ids.attention_mask]  # SOT for the empty prompt
    return states, last_word


def erase_pairs(pipe: Any, concepts: list[str], guides: list[str], tokens: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Concept and guide token states, aligned row by row.

    ``last_word``: one token each (new code). ``all``: from the last word token to the end of the sequence,
    both sides cut to the same length (old code).
    """
    c_states, c_idx = token_states(pipe, concepts)
    g_states, g_idx = token_states(pipe, guides)
    keys, values = [], []
    for cs, ci, gs, gi in zip(c_states, c_idx, g_states, g_idx):
        n = 1 if tokens == "last_word" else cs.shape[0] - max(ci, gi)
        keys.append(cs[ci:ci + n])
        values.append(gs[gi:gi + n])
    return torch.cat(keys), torch.cat(values)


def preserve_keys(pipe: Any, texts: list[str], tokens: str, width: int) -> torch.Tensor:
    """Preserved token states: the last word token (``last_word``) or all 77 tokens (``all``)."""
    if not texts:
        return torch.zeros(0, width, device=pipe.text_encoder.device)
    states, idx = token_states(pipe, texts)
    if tokens == "all":
        return states.flatten(0, 1)
    return torch.stack([s[i] for s, i in zip(states, idx)])


class UCE(CRT):
    """Unified Concept Editing; see the module docstring."""

    name = "uce"
    family = Family.CLOSED_FORM_EDIT
    exposes = OPEN_WEIGHTS  # an edit of a public model: its weights and the unerased base
    trains = "unet: attn2.to_k, attn2.to_v (closed form)"
    version = "2"  # 2: uce_eot preserves '' as the old code does
    backbones = UNET_FAMILY

    def __init__(self, **params: Any):
        super().__init__(**params)
        self.config = UCEConfig(**params)
        if self.config.tokens not in ("last_word", "all"):
            raise ValueError(f"UCE tokens must be 'last_word' or 'all', got {self.config.tokens!r}")
        # two official key choices, two names in results: new code (last word token) and old code (to the end)
        self.name = "uce" if self.config.tokens == "last_word" else "uce_eot"

    def fit(self, ctx: FitContext) -> Artifact:
        cfg, pipe = self.config, ctx.pipe
        concepts = list(cfg.erase or [ctx.concept.c_u])
        guides = [cfg.guide] * len(concepts) if isinstance(cfg.guide, str) else list(cfg.guide)
        if len(guides) != len(concepts):
            raise ValueError(f"UCE needs one guide or one per erased concept; got {len(guides)} for {len(concepts)}")
        dtype = getattr(torch, cfg.solve_dtype)
        keys, guide_states = (t.to(dtype) for t in erase_pairs(pipe, concepts, guides, cfg.tokens))
        preserve, preserve_scale = preserved_prompts(cfg)
        kept = preserve_keys(pipe, preserve, cfg.tokens, keys.shape[1]).to(dtype)
        tensors, residual = {}, {"before": 0.0, "after": 0.0}
        for name, module in kv_projections(pipe.unet).items():
            weight = module.weight.detach().to(dtype)
            erase_keys = keys.to(weight.device)
            values = guide_states.to(weight.device) @ weight.T
            new = uce_closed_form(weight, erase_keys, values, kept.to(weight.device), cfg.lamb, cfg.erase_scale,
                                  preserve_scale)
            tensors[f"{name}.weight"] = new.float().cpu()
            residual["before"] += float((erase_keys @ weight.T - values).norm())
            residual["after"] += float((erase_keys @ new.T - values).norm())
        meta = {"config": asdict(cfg), "erase": concepts, "guides": guides, "erase_tokens": int(keys.shape[0]),
                "preserve": preserve, "preserve_scale": preserve_scale, "preserve_tokens": int(kept.shape[0]),
                "edited_matrices": len(tensors),
                "erase_residual_sum": residual}
        return Artifact(tensors=tensors, meta=meta)

    def apply(self, pipe: Any, artifact: Artifact) -> DefendedModel:
        unet = edited_copy(pipe.unet, artifact.tensors)
        return DefendedModel(pipe=replace_module(pipe, "unet", unet), crt_name=self.name, exposes=self.exposes)
