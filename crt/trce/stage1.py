"""TRCE stage 1: a closed-form edit of every ``attn2.to_k`` / ``attn2.to_v`` (crts.md §9, official
``run_trce_stage1.py`` + ``src/cfr_utils.py``).

Each [malicious, safe] pair is expanded with templates; the malicious prompt's token states at chosen positions
(keys) are sent where the safe prompt's states at the matching positions go through the original weights (values).
The positions are [SoT], the first [EoT], the last token (76) and the keyword tokens, weighted by
``token_weights`` x ``[1, 1, 77 - n - 2, 1]``; the official weights ``[0, 1, 0, 0]`` keep only the first [EoT],
the paper's critical mapping. A preservation cache over captions (C2 = sum c c^T over all 77 token states of each
caption, C1 = W_old C2) keeps the outputs of everything else. Per matrix, with N expanded pairs:

``W = ( (1/N) sum w v c^T + p C1 / div + lamb W_old ) ( (1/N) sum w c c^T + p C2 / div + lamb I )^-1``

``p`` = ``preserve_scale``, ``div`` = ``cache_divisor`` (3e4), lamb 0 (official). The right factor is applied as a
pseudo-inverse, so that a direction no key or caption state reaches keeps ``W_old`` (the limit lamb -> 0+) where the
official ``torch.inverse`` would amplify rounding noise; otherwise the two are the same.

The official code has two quirks that ``parity`` replicates: the first-[EoT] index (and the keyword positions, and
``n``) counts whitespace words instead of BPE tokens, and the cache is multiplied by ``preserve_scale`` twice
(``p^2``). The default counts tokens and scales once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from crt.uce import kv_projections, token_states
from crt_bench.backbone import text_width
from crt_bench.spec import ConceptSpec

# The first 15 of the official 'object' augmentation templates (augment_num 15 in stage1_sexual_default.yaml).
OFFICIAL_TEMPLATES: tuple[str, ...] = (
    "{} in a photo", "A snapshot of {}", "A photograph showcasing {}", "An illustration of {}",
    "A digital rendering of {}", "A visual representation of {}", "A black and white image of {}",
    "A scene depicting {} during a public gathering", "A depiction created with oil paints capturing {}",
    "An official photograph featuring {}", "A detailed sketch of {}", "{} during sunset/sunrise",
    "Magazine cover capturing {}", "An oil portrait of {}", "{} in a sketch painting",
)
POSITIONS = ("sot", "first_eot", "last", "keyword")
MAX_LENGTH = 77
PINV_RTOL = 1e-12  # relative eigenvalue below which a direction counts as unconstrained (float64 solve)


@dataclass(frozen=True)
class Stage1Config:
    """Defaults of the official sexual configuration (crts.md §9), data from the concept's own prompt pairs."""

    pairs: list[list[str]] | None = None  # inline [malicious, safe] pairs; None = unsafe_set[i] <-> safe_set[i]
    unsafe_set: str = "finetune_unacceptable"
    safe_set: str = "finetune_acceptable"
    pair_limit: int | None = None  # the official concept_num (20 of sexual.json); None = every pair
    templates: list[str] = field(default_factory=lambda: list(OFFICIAL_TEMPLATES))
    token_weights: list[float] = field(default_factory=lambda: [0.0, 1.0, 0.0, 0.0])  # SoT, 1st EoT, last, keyword
    preserve_set: str | None = "validation_acceptable"  # captions of the preservation cache (a concept prompt set)
    preserve_file: str | None = None  # or a text file, one caption a line (the official cache is over COCO)
    preserve_scale: float = 0.01
    cache_divisor: float = 3.0e4
    lamb: float = 0.0
    solve_dtype: str = "float64"
    parity: bool = False  # True: the official code's word-count [EoT] index and twice-scaled cache


@dataclass(frozen=True)
class MappingPair:
    """One expanded pair: the malicious prompt (keys), the safe prompt (values) and the keyword inside the former."""

    old: str
    new: str
    keyword: str


def prompt_pairs(cfg: Any, concept: ConceptSpec) -> list[tuple[str, str]]:
    """The [malicious, safe] pairs: inline, or the concept's ``unsafe_set[i] <-> safe_set[i]`` (same length)."""
    if cfg.pairs is not None:
        pairs = [(str(p[0]), str(p[1])) for p in cfg.pairs]
    else:
        unsafe, safe = concept.prompt_set(cfg.unsafe_set), concept.prompt_set(cfg.safe_set)
        if len(unsafe) != len(safe):
            raise ValueError(f"TRCE pairs {cfg.unsafe_set}[i] with {cfg.safe_set}[i], but they have {len(unsafe)} "
                             f"and {len(safe)} prompts; set `pairs` (or sets of equal length)")
        pairs = [(u.text, s.text) for u, s in zip(unsafe, safe)]
    pairs = pairs[:cfg.pair_limit] if cfg.pair_limit else pairs
    if not pairs:
        raise ValueError("TRCE needs at least one [malicious, safe] pair")
    return pairs


def expand(pairs: Sequence[tuple[str, str]], templates: Sequence[str]) -> list[MappingPair]:
    """Every pair under every template, the same template on both sides; the keyword is the malicious content."""
    return [MappingPair(t.format(old), t.format(new), old) for old, new in pairs for t in templates]


def token_count(tokenizer: Any, text: str) -> int:
    """BPE tokens of ``text`` without [SoT]/[EoT], as the 77-token encoding keeps them (truncated to 75)."""
    ids = tokenizer(text, truncation=True, max_length=MAX_LENGTH).input_ids
    return len(ids) - 2


def first_eot_index(tokenizer: Any, text: str, parity: bool) -> int:
    """Position of the first [EoT]: after the BPE tokens, or (official code, ``parity``) after the whitespace words."""
    n = len(text.split()) if parity else token_count(tokenizer, text)
    return min(n + 1, MAX_LENGTH - 1)


def keyword_indices(tokenizer: Any, text: str, keyword: str, parity: bool) -> list[int]:
    """Positions of ``keyword`` in ``text``'s encoding (first occurrence), by BPE tokens or (``parity``) by words."""
    if parity:
        words, sub = text.split(), keyword.split()
        seq = words
    else:
        seq = tokenizer(text, truncation=True, max_length=MAX_LENGTH).input_ids[1:-1]
        sub = tokenizer(keyword, add_special_tokens=False).input_ids
    for i in range(len(seq) - len(sub) + 1):
        if sub and seq[i:i + len(sub)] == sub:
            return [min(i + 1 + k, MAX_LENGTH - 1) for k in range(len(sub))]
    return []


@torch.no_grad()
def encode_states(pipe: Any, texts: Sequence[str], batch: int = 64) -> torch.Tensor:
    """Last hidden states (n, 77, width) of ``texts``, in batches (caption sets can be large)."""
    chunks = [token_states(pipe, list(texts[i:i + batch]))[0] for i in range(0, len(texts), batch)]
    return torch.cat(chunks)


@torch.no_grad()
def mapping_rows(pipe: Any, items: Sequence[MappingPair], token_weights: Sequence[float],
                 parity: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Keys (malicious states), value inputs (safe states) and weights, one row per mapped position of nonzero weight.

    Official alignment: [SoT] 0 <-> 0, first [EoT] <-> first [EoT], 76 <-> 76, keyword tokens <-> the safe prompt's
    position 76; weights ``token_weights`` x ``[1, 1, 77 - n - 2, 1]`` with ``n`` the malicious prompt's length.
    """
    tok = pipe.tokenizer
    old_states = encode_states(pipe, [p.old for p in items])
    new_states = encode_states(pipe, [p.new for p in items])
    scale = dict(zip(POSITIONS, token_weights))
    keys, inputs, weights = [], [], []
    moved = 0
    for item, old, new in zip(items, old_states, new_states):
        n_old = len(item.old.split()) if parity else token_count(tok, item.old)
        eot_old, eot_new = first_eot_index(tok, item.old, parity), first_eot_index(tok, item.new, parity)
        moved += eot_old != first_eot_index(tok, item.old, not parity)
        kw = keyword_indices(tok, item.old, item.keyword, parity) if scale["keyword"] else []
        rows = [(0, 0, scale["sot"]), (eot_old, eot_new, scale["first_eot"]),
                (MAX_LENGTH - 1, MAX_LENGTH - 1, scale["last"] * max(MAX_LENGTH - n_old - 2, 0))]
        rows += [(k, MAX_LENGTH - 1, scale["keyword"]) for k in kw]
        for i_old, i_new, w in rows:
            if w:
                keys.append(old[i_old])
                inputs.append(new[i_new])
                weights.append(float(w))
    if not keys:
        raise ValueError("TRCE stage 1: every token weight is 0, nothing to map")
    info = {"rows": len(keys), "pairs": len(items), "eot_index_differs_from_other_count": moved}
    return torch.stack(keys), torch.stack(inputs), torch.tensor(weights), info


def read_captions(path: str) -> list[str]:
    """Captions from a text file, one a line; a relative path is tried from the working directory, then the repo."""
    file = Path(path)
    if not file.is_absolute() and not file.exists():
        file = Path(__file__).resolve().parents[2] / path
    return [line.strip() for line in file.read_text().splitlines() if line.strip()]


def preserve_captions(cfg: Stage1Config, concept: ConceptSpec) -> tuple[list[str], str]:
    """The captions of the preservation cache and where they came from."""
    if cfg.preserve_file:
        return read_captions(cfg.preserve_file), f"file {cfg.preserve_file}"
    if cfg.preserve_set:
        return [p.text for p in concept.prompt_set(cfg.preserve_set)], f"prompt set {cfg.preserve_set}"
    return [], "none"


@torch.no_grad()
def preservation_gram(pipe: Any, captions: Sequence[str], dtype: torch.dtype, batch: int = 64) -> torch.Tensor:
    """C2 = sum of c c^T over all 77 token states of every caption (MACE-style cache; C1 = W_old C2)."""
    width = text_width(pipe)
    gram = torch.zeros(width, width, dtype=dtype, device=pipe.text_encoder.device)
    for i in range(0, len(captions), batch):
        states = token_states(pipe, list(captions[i:i + batch]))[0].flatten(0, 1).to(dtype)
        gram += states.T @ states
    return gram


def effective_preserve_weight(cfg: Stage1Config) -> float:
    """The cache's weight in the closed form: p / div, or (official code, ``parity``) p^2 / div."""
    p = cfg.preserve_scale ** 2 if cfg.parity else cfg.preserve_scale
    return p / cfg.cache_divisor


def system_matrix(keys: torch.Tensor, row_weights: torch.Tensor, n_pairs: int, gram: torch.Tensor,
                  preserve_weight: float, lamb: float) -> torch.Tensor:
    """``(1/N) sum w c c^T + q C2 + lamb I``: the right factor of the closed form, the same for every layer."""
    weighted = keys * (row_weights / n_pairs).to(keys.dtype)[:, None]
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    return weighted.T @ keys + preserve_weight * gram + lamb * eye


def trce_closed_form(weight: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, row_weights: torch.Tensor,
                     n_pairs: int, system_pinv: torch.Tensor) -> torch.Tensor:
    """``W_old + (1/N) sum w (v - W_old c) c^T M^+``, which is ``M1 M^-1`` of the official formula when ``M`` (the
    system matrix) is invertible, since ``M1 = W_old M + (1/N) sum w (v - W_old c) c^T``; where ``M`` is singular
    (lamb 0 and a direction no key or caption state reaches, e.g. a layer norm's null direction) the pseudo-inverse
    keeps ``W_old`` there, the limit lamb -> 0+, instead of amplifying rounding noise."""
    scale = (row_weights / n_pairs).to(keys.dtype)[:, None]
    residual = ((values - keys @ weight.T) * scale).T @ keys
    return weight + residual @ system_pinv


def fit_stage1(pipe: Any, concept: ConceptSpec, cfg: Stage1Config) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The stage-1 K/V weights (float32, CPU) by parameter name, and the meta that documents them."""
    dtype = getattr(torch, cfg.solve_dtype)
    if len(cfg.token_weights) != len(POSITIONS):
        raise ValueError(f"token_weights needs {len(POSITIONS)} entries {POSITIONS}, got {cfg.token_weights}")
    pairs = prompt_pairs(cfg, concept)
    items = expand(pairs, cfg.templates)
    keys, inputs, weights, info = mapping_rows(pipe, items, cfg.token_weights, cfg.parity)
    keys, inputs = keys.to(dtype), inputs.to(dtype)
    captions, source = preserve_captions(cfg, concept)
    gram = preservation_gram(pipe, captions, dtype)
    q = effective_preserve_weight(cfg)
    weights = weights.to(keys.device)
    system = system_matrix(keys, weights, len(items), gram, q, cfg.lamb)
    eig = torch.linalg.eigvalsh(system)
    system_pinv = torch.linalg.pinv(system, rtol=PINV_RTOL, hermitian=True)
    tensors, residual = {}, {"before": 0.0, "after": 0.0}
    for name, module in kv_projections(pipe.unet).items():
        w = module.weight.detach().to(dtype)
        k, values = keys.to(w.device), inputs.to(w.device) @ w.T
        new = trce_closed_form(w, k, values, weights.to(w.device), len(items), system_pinv.to(w.device))
        tensors[f"{name}.weight"] = new.float().cpu()
        residual["before"] += float((k @ w.T - values).norm())
        residual["after"] += float((k @ new.T - values).norm())
    meta = {"pairs": len(pairs), "templates": len(cfg.templates), "expanded_pairs": len(items),
            "example_pair": list(pairs[0]), "mapping": info, "preserve_source": source,
            "preserve_captions": len(captions), "preserve_tokens": MAX_LENGTH * len(captions),
            "preserve_weight": q,
            "system_eigenvalues": [float(eig[0]), float(eig[-1])],
            "unconstrained_directions": int((eig <= PINV_RTOL * eig[-1]).sum()), "edited_matrices": len(tensors),
            "mapping_residual_sum": residual}
    return tensors, meta
