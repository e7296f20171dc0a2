"""MMA-Diffusion, text modality (Yang et al., CVPR 2024): a GCG-style token search for a prompt whose pooled text
embedding matches the target prompt's, with the concept's sensitive words banned (attacks.md §7).

The adversarial prompt is ``control_length`` tokens alone (the target's words are not in it), initialised as random
letters. Loss ``1 - cos(p(adv), p(target))`` with ``p`` the base text encoder's pooled output (the final-layer-norm
state at the first EOT). Each step: the gradient of the loss with respect to the one-hot control tokens; per
position the ``topk`` tokens of most negative gradient, banned tokens excluded; ``candidates`` copies of the control,
copy b with position ``floor(b * L / candidates)`` set to a random one of that position's top-k; candidates that are
unchanged, that do not re-tokenise to exactly their ids, or whose text contains a banned string are dropped; the rest
are encoded in batches from their text and the control moves to the lowest loss, even when it is higher than the
current one (as released); the best control over all steps is the result. Defaults: the released
``textual_attack.py`` (20 tokens, top-k 256, 512 candidates) and the README's 1000 iterations.

Banned: every token whose decoded text contains a banned string (the released rule, ``word in token``), the banned
strings being the sensitive words (param ``sensitive_words``; default the concept's c_u and its synonyms,
:func:`attacks.sneakyprompt.concept_sensitive_words`) and ``banned_substrings`` (the released nudity run adds the
fragments ak, na, ke, nud so that "naked" and "nude" cannot be spelt from pieces).

DEVIATIONS (what is stored is what was scored): a candidate must re-tokenise to exactly its ids (the release checks
only the token count), so the stored text's ids are the ids whose loss was computed; its text must not contain a
banned string across token boundaries either. The gradient of control token i is taken at its own position 1 + i
(the release takes row i of the first 20 positions, SOT included, i.e. one position early). The sequence is encoded
up to its EOT only, which under CLIP's causal mask gives the same pooled output as all 77 positions. RECONSTRUCTION:
the default sensitive words come from the concept (the release hard-codes an NSFW list for nudity).

Transfer: only the base model's public text encoder is used (``Access.TEXT_ENCODER``), so the prompts are searched
once per concept and reused against every CRT. No oracle, no queries.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F

from attacks.base import AdversarialPrompt, Attack, AttackContext, AttackCost, search_each
from attacks.sneakyprompt import concept_sensitive_words
from attacks.tokens import tokenize, trim
from attacks.unlearndiffatk import encode_embeds
from crt_bench import progress
from crt_bench.backbone import UNET_FAMILY, encoder_parts
from crt_bench.spec import Access, PromptItem

LETTERS = "abcdefghijklmnopqrstuvwxyz"


@dataclass(frozen=True)
class MMAConfig:
    """Defaults: the released ``textual_attack.py`` and README (attacks.md §7)."""

    control_length: int = 20  # adversarial tokens
    iterations: int = 1000  # GCG steps
    topk: int = 256  # tokens kept per position from the gradient
    candidates: int = 512  # single-token substitutions evaluated per step
    sensitive_words: tuple[str, ...] | None = None  # banned words; None = the concept's c_u and synonyms
    banned_substrings: tuple[str, ...] = ()  # further banned strings (the release: ak, na, ke, nud for nudity)
    seed: int = 0
    encode_batch: int = 512  # candidate prompts per text-encoder forward
    history_points: int = 100  # loss values kept in the log
    target_set: str = "unacceptable"  # the concept's prompt set that is attacked (the runner reads it)


def token_texts(tokenizer: Any) -> list[str]:
    """Every id decoded on its own, lower-cased (special tokens give their own strings)."""
    return [t.lower() for t in tokenizer.batch_decode([[i] for i in range(len(tokenizer))],
                                                      clean_up_tokenization_spaces=False)]


def banned_mask(tokenizer: Any, banned: tuple[str, ...]) -> torch.Tensor:
    """(len(tokenizer),) True for the special tokens and every token whose decoded text contains a banned string."""
    words = [b.lower() for b in banned if b]
    mask = torch.tensor([any(w in text for w in words) for text in token_texts(tokenizer)])
    mask[list(tokenizer.all_special_ids)] = True
    return mask


def eot_positions(ids: torch.Tensor, eot: int) -> torch.Tensor:
    """The first EOT after SOT of every row of ``ids`` (N, 77); the last position when a row has none."""
    hit = ids[:, 1:] == eot
    first = hit.float().argmax(1) + 1
    return torch.where(hit.any(1), first, torch.full_like(first, ids.shape[1] - 1))


@torch.no_grad()
def pooled(text_encoder: Any, ids: torch.Tensor, eot: int) -> torch.Tensor:
    """CLIP's pooled output (final-layer-norm state at the first EOT) in float32, encoding only up to the last
    row's EOT: positions after it cannot change it under the causal mask."""
    ends = eot_positions(ids, eot)
    length = int(ends.max()) + 1
    device = text_encoder.device
    hidden = text_encoder(ids[:, :length].to(device)).last_hidden_state.float()
    return hidden[torch.arange(len(ids), device=device), ends.to(device)]


def cosine_loss(embeddings: torch.Tensor, goal: torch.Tensor) -> torch.Tensor:
    """``1 - cos`` of each row with ``goal``."""
    return 1 - F.cosine_similarity(embeddings, goal[None].to(embeddings.device), dim=-1, eps=1e-6)


def token_gradients(text_encoder: Any, ids: torch.Tensor, length: int, goal: torch.Tensor, eot: int) -> torch.Tensor:
    """(length, V): gradient of ``1 - cos(p(ids), goal)`` with respect to the one-hot tokens at positions
    1 .. length. Only the one-hot receives gradients (the encoder is shared with the rest of the harness)."""
    table = text_encoder.get_input_embeddings().weight
    end = int(eot_positions(ids[None], eot)[0])
    ids = ids[:end + 1].to(table.device)
    one_hot = F.one_hot(ids[1:1 + length], table.shape[0]).to(table.dtype).requires_grad_(True)
    embeds = torch.cat([table[ids[:1]].detach(), one_hot @ table.detach(), table[ids[1 + length:]].detach()])
    hidden = encode_embeds(text_encoder, embeds[None])
    loss = cosine_loss(hidden[:, end].float(), goal)[0]
    (grad,) = torch.autograd.grad(loss, [one_hot])
    return grad.float()


def sample_candidates(control: torch.Tensor, grad: torch.Tensor, banned: torch.Tensor, topk: int, n: int,
                      gen: torch.Generator) -> torch.Tensor:
    """(n, L) single-token substitutions of ``control``: copy b changes position ``b * L // n`` to a random one of
    that position's ``topk`` lowest-gradient tokens that are not banned."""
    length, size = len(control), grad.shape[1]
    blocked = torch.ones(size, dtype=torch.bool)
    blocked[:min(size, len(banned))] = banned[:size]
    scores = grad.cpu().masked_fill(blocked[None], float("inf"))
    top = (-scores).topk(min(topk, int((~blocked).sum())), dim=1).indices
    positions = torch.arange(n) * length // n
    picks = torch.randint(top.shape[1], (n,), generator=gen)
    cands = control.repeat(n, 1)
    cands[torch.arange(n), positions] = top[positions, picks]
    return cands


def decode(tokenizer: Any, ids: list[int]) -> str:
    return tokenizer.decode(ids, clean_up_tokenization_spaces=False).strip()


def valid_candidates(tokenizer: Any, cands: torch.Tensor, current: str, banned: tuple[str, ...]
                     ) -> tuple[list[int], list[str]]:
    """The rows whose text differs from ``current``, re-tokenises to exactly the row and holds no banned string
    (first occurrence of each text kept), and those texts."""
    words = [b.lower() for b in banned if b]
    rows, texts, seen = [], [], {current}
    for i, row in enumerate(cands.tolist()):
        text = decode(tokenizer, row)
        if text in seen or any(w in text.lower() for w in words):
            continue
        if tokenizer(text, add_special_tokens=False).input_ids == row:
            seen.add(text)
            rows.append(i)
            texts.append(text)
    return rows, texts


def gcg_step(control: torch.Tensor, text: str, grad: torch.Tensor, banned: torch.Tensor, cfg: MMAConfig,
             gen: torch.Generator, check: Callable[[torch.Tensor, str], tuple[list[int], list[str]]],
             losses_of: Callable[[list[str]], torch.Tensor]) -> tuple[torch.Tensor, str, float | None, int]:
    """One step: sample candidates from the gradient, keep the valid ones (``check``), score them
    (``losses_of(texts)``) and return the best (ids, text, loss) with the number of valid candidates; the current
    control and ``None`` when no candidate is valid."""
    cands = sample_candidates(control, grad, banned, cfg.topk, cfg.candidates, gen)
    rows, texts = check(cands, text)
    if not rows:
        return control, text, None, 0
    losses = losses_of(texts)
    best = int(losses.argmin())
    return cands[rows[best]].clone(), texts[best], float(losses[best]), len(rows)


class MMADiffusion(Attack):
    """MMA-Diffusion's text attack; see the module docstring."""

    name = "mma"
    requires = frozenset({Access.TEXT_ENCODER})
    reconstruction = "our own code (the release's licence forbids derivatives); sensitive words from the concept"
    output = "text"
    version = "1"
    backbones = UNET_FAMILY  # transfer through the model's text encoders: both of SDXL's (pooled states averaged)
    no_adaptive = "MMA-Diffusion's text attack has no adaptive variant in this harness (attacks.md §8)"

    def __init__(self, adaptive: bool = False, **params: Any):
        super().__init__(adaptive=adaptive, **params)
        for key in ("sensitive_words", "banned_substrings"):
            if params.get(key) is not None:
                params = {**params, key: tuple(str(w) for w in params[key])}
        self.config = MMAConfig(**params)
        if self.config.control_length < 1 or self.config.candidates < 1 or self.config.topk < 1:
            raise ValueError("MMA needs control_length, candidates and topk of at least 1")
        self._banned_cache: tuple[int, tuple[str, ...], torch.Tensor] | None = None

    def banned(self, ctx: AttackContext) -> tuple[str, ...]:
        words = self.config.sensitive_words or concept_sensitive_words(ctx.concept)
        return tuple(dict.fromkeys((*words, *self.config.banned_substrings)))

    def run(self, ctx: AttackContext, targets: list[PromptItem]) -> list[AdversarialPrompt]:
        if ctx.text_encoder is not None:
            pipe, source = SimpleNamespace(text_encoder=ctx.text_encoder, tokenizer=ctx.tokenizer), "base_text_encoder"
        elif ctx.base_pipe is not None:
            pipe, source = ctx.base_pipe, "base_pipe"
        else:
            pipe, source = ctx.defended.pipe, "pipe"
        banned = self.banned(ctx)
        tok = pipe.tokenizer
        if self._banned_cache is None or self._banned_cache[:2] != (id(tok), banned):
            self._banned_cache = (id(tok), banned, banned_mask(tok, banned))
        mask = self._banned_cache[2]
        results = search_each(targets, lambda target, cost: self._search(ctx, pipe.text_encoder, tok, target, banned,
                                                                         mask, cost))
        for result in results:
            result.log.update(encoder=source)
        return results

    def initial_control(self, tokenizer: Any, banned: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Random letters, each its own allowed token (the release: random ASCII letters joined by spaces)."""
        letters = []
        for c in LETTERS:
            ids = tokenizer(c, add_special_tokens=False).input_ids
            if len(ids) == 1 and not banned[ids[0]]:
                letters.append(ids[0])
        if not letters:
            raise ValueError("MMA: no single-letter token is allowed by the banned list")
        picks = torch.randint(len(letters), (self.config.control_length,), generator=gen)
        return torch.tensor([letters[int(i)] for i in picks])

    def _search(self, ctx: AttackContext, encoder: Any, tok: Any, target: PromptItem, banned: tuple[str, ...],
                mask: torch.Tensor, cost: AttackCost) -> AdversarialPrompt:
        cfg = self.config
        eot = tok.eos_token_id
        length = min(cfg.control_length, tok.model_max_length - 2)
        gen = torch.Generator().manual_seed(cfg.seed + ctx.seed)
        parts = encoder_parts(encoder)  # SDXL: both encoders, the loss averaged over them
        goals = [pooled(part, tokenize(tok, [target.text]), eot)[0] for part in parts]
        cost.forward += 1
        control = self.initial_control(tok, mask, gen)[:length]
        text = decode(tok, control.tolist())

        def losses_of(texts: list[str]) -> torch.Tensor:
            ids = tokenize(tok, texts)
            out = torch.cat([torch.stack([cosine_loss(pooled(part, ids[i:i + cfg.encode_batch], eot), goal).cpu()
                                          for part, goal in zip(parts, goals)]).mean(0)
                             for i in range(0, len(ids), cfg.encode_batch)])
            cost.forward += len(texts)
            return out

        def check(cands: torch.Tensor, current: str) -> tuple[list[int], list[str]]:
            return valid_candidates(tok, cands, current, banned)

        start_loss = float(losses_of([text])[0])
        best_ids, best_text, best_loss, best_step = control.clone(), text, float("inf"), 0
        history, valid = [], []
        for step in range(1, cfg.iterations + 1):
            ids = tokenize(tok, [text])[0]
            grad = torch.stack([token_gradients(part, ids, length, goal, eot)
                                for part, goal in zip(parts, goals)]).mean(0)
            cost.forward += 1
            cost.backward += 1
            control, text, loss, n_valid = gcg_step(control, text, grad, mask, cfg, gen, check, losses_of)
            valid.append(n_valid)
            if loss is not None and loss < best_loss:
                best_ids, best_text, best_loss, best_step = control.clone(), text, loss, step
            history.append(best_loss if best_step else start_loss)
            progress.show(loss=history[-1])
        if best_step == 0:
            best_loss = start_loss
        scored = [tok.bos_token_id, *best_ids.tolist(), eot]
        stored = trim(tokenize(tok, [best_text])[0], eot)
        if stored != scored:
            raise RuntimeError(f"MMA: the stored text {best_text!r} does not re-encode to the ids it was scored on")
        log = {"config": asdict(cfg), "mode": self.mode, "oracle_used": False, "loss": best_loss,
               "cosine": 1 - best_loss, "start_loss": start_loss, "best_step": best_step,
               "steps_run": cfg.iterations, "loss_history": thin(history, cfg.history_points),
               "valid_candidates_mean": sum(valid) / max(len(valid), 1), "banned": list(banned),
               "banned_tokens": int(mask.sum()), "round_trip": True, "scored_ids": scored, "text_ids": stored}
        return AdversarialPrompt(target=target, text=best_text, cost=cost, log=log)


def thin(values: list[float], points: int) -> list[float]:
    """At most ``points`` evenly spaced values, the first and the last kept."""
    if len(values) <= points or points < 2:
        return values
    step = (len(values) - 1) / (points - 1)
    return [values[round(i * step)] for i in range(points)]
