"""Ring-A-Bell (Tsai et al., ICLR 2024): a model-agnostic hard-prompt search that needs only the text encoder.

A concept vector ``c = mean_i [f(P_i^concept) - f(P_i^neutral)]`` (``f`` = last hidden state, 77 tokens) steers a
target prompt, ``T = f(P) + eta c``; a genetic search over K token ids minimises ``||f(P_hat) - T||_F^2``
(attacks.md §1: keep the best half, single-point crossover, one-position mutation, SOT/EOT layout). The candidates
of a generation not scored before are encoded in one batched forward (:class:`Fitness`).

What is scored is what is stored: the output is the decoded text of the winner, and decoding K random ids rarely
gives a text that re-encodes to them (0 of 200 candidates on the world's tokenizer, 39 of 200 on SD's BPE at K = 16;
U+FFFD and control characters appear where byte tokens are split). By default (``score_text: true``) every candidate
is therefore scored on the ids its decoded text re-encodes to, the same tokenisation the pipeline applies at
generation time; the genetic operators still act on the ids over the whole vocabulary, as in the paper. The
notebooks score the ids themselves (``score_text: false``). Each result logs ``round_trip`` (the stored text
re-encodes to the ids its fitness was computed on: always with ``score_text``), ``scored_ids`` (those ids, up to the
first EOT), ``genome_ids`` (the evolved K ids) and ``genome_round_trip`` (they survive decode -> re-encode).

The adaptive variant ("+") queries the defended system every ``adaptive_every`` generations and adds
``lambda * max(0, filter score)`` of the generated images to the fitness of the best candidates, so that the search
avoids prompts the filter catches. The filter is scored on the raw generations (``AttackContext.generate_raw``), not
on what is delivered: a flagged image is delivered as a placeholder (or not at all), whose score says nothing.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from types import SimpleNamespace
from typing import Any

import torch

from attacks.base import AdversarialPrompt, Attack, AttackContext, AttackCost, Timer
from attacks.tokens import tokenize, trim, vocabulary
from crt.base import frozen_params
from crt_bench import progress
from crt_bench.backbone import UNET_FAMILY
from crt_bench.spec import Access, PromptItem


@dataclass(frozen=True)
class RingABellConfig:
    """Defaults: the official notebooks (attacks.md §1) and Espresso's RingBell+ (seed 42)."""

    population: int = 200
    generations: int = 3000
    mutation_rate: float = 0.25
    crossover_rate: float = 0.5
    length: int = 16  # K adversarial tokens (at most 75)
    eta: float = 3.0
    concept_set: str = "finetune_unacceptable"  # concept prompts, zipped with ...
    neutral_set: str = "finetune_acceptable"  # ... their concept-free counterparts
    concept_pairs: tuple[tuple[str, str], ...] | None = None  # explicit (concept, neutral) pairs instead of the sets
    seed: int = 42
    encode_batch: int = 256  # prompts per forward when building the concept vector
    adaptive_every: int = 100  # generations between filter queries (adaptive only)
    adaptive_top: int = 4  # candidates generated and scored per query
    adaptive_lambda: float = 1.0e6  # scores are cosine gaps (~0.01): a caught prompt loses to any uncaught one
    history_points: int = 100  # best-fitness values kept in the log
    score_text: bool = True  # score each candidate on its decoded text's re-encoded ids; False = the notebooks
    target_set: str = "unacceptable"  # the concept's prompt set that is attacked (the runner reads it)


@torch.no_grad()
def encode(text_encoder: Any, ids: torch.Tensor) -> torch.Tensor:
    """``f``: last hidden states (N, 77, width) in float32."""
    return text_encoder(ids.to(text_encoder.device)).last_hidden_state.float()


def concept_vector(text_encoder: Any, tokenizer: Any, concept: list[str], neutral: list[str],
                   batch: int = 256) -> torch.Tensor:
    """``mean_i [f(concept_i) - f(neutral_i)]`` over zipped pairs, shape (77, width)."""
    if len(concept) != len(neutral) or not concept:
        raise ValueError(f"Ring-A-Bell needs equally many concept and neutral prompts, got {len(concept)}, "
                         f"{len(neutral)}")
    total = None
    for i in range(0, len(concept), batch):
        diff = (encode(text_encoder, tokenize(tokenizer, concept[i:i + batch]))
                - encode(text_encoder, tokenize(tokenizer, neutral[i:i + batch]))).sum(0)
        total = diff if total is None else total + diff
    return total / len(concept)


def _random_tokens(vocab: torch.Tensor, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    return vocab[torch.randint(len(vocab), shape, generator=gen)]


def init_population(n: int, length: int, vocab: torch.Tensor, sot: int, eot: int, max_length: int,
                    gen: torch.Generator) -> torch.Tensor:
    """``[SOT, K random ids, EOT ... EOT]`` per individual, shape (n, max_length)."""
    pop = torch.full((n, max_length), eot, dtype=torch.long)
    pop[:, 0] = sot
    pop[:, 1:length + 1] = _random_tokens(vocab, (n, length), gen)
    return pop


def crossover(parents: torch.Tensor, rate: float, length: int, gen: torch.Generator) -> torch.Tensor:
    """Every parent is kept; with probability ``rate`` it mates with a random parent at a cut u in [1, K],
    adding both single-point children."""
    n = len(parents)
    mates = torch.rand(n, generator=gen) < rate
    partners = torch.randint(n, (n,), generator=gen)[mates]
    cuts = torch.randint(1, length + 1, (n,), generator=gen)[mates]
    first, second = parents[mates], parents[partners]
    left = torch.arange(parents.shape[1])[None, :] < cuts[:, None]
    child_a = torch.where(left, first, second)
    child_b = torch.where(left, second, first)
    return torch.cat([parents, child_a, child_b])


def mutate(pop: torch.Tensor, rate: float, length: int, vocab: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """With probability ``rate`` an individual gets one random position in [1, K] replaced by a random id."""
    pop = pop.clone()
    hit = torch.nonzero(torch.rand(len(pop), generator=gen) < rate).flatten()
    positions = torch.randint(1, length + 1, (len(hit),), generator=gen)
    pop[hit, positions] = _random_tokens(vocab, (len(hit),), gen)
    return pop


def fitness(text_encoder: Any, pop: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``||f(individual) - T||_F^2`` for the whole population in one forward."""
    return (encode(text_encoder, pop) - target).pow(2).sum((1, 2)).cpu()


@dataclass
class Fitness:
    """``||f(ids) - T||_F^2`` of id rows for one target, each distinct row encoded once per search.

    Why: selection keeps the best half unchanged and populations fill with copies of good candidates, so most rows a
    search scores were scored before (2,249 new of 6,464 in a world search of 100 generations of 64). Rows are
    independent in the text encoder (attention stays within a sequence) and on CPU a row's value does not depend
    on the batch it is computed in (tested bit for bit), so the search returns what scoring every row returns.
    ``batch`` caps the rows per forward (None: all new rows of a call at once); ``memo=False, batch=1`` is the
    official notebooks' loop, one candidate per forward."""

    text_encoder: Any
    goal: torch.Tensor
    batch: int | None = None
    memo: bool = True
    known: dict[tuple[int, ...], float] = field(default_factory=dict)
    rows_encoded: int = 0
    forwards: int = 0

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        if not self.memo:
            return torch.cat([self._encode(chunk) for chunk in self._chunks(ids)])
        rows = [tuple(row) for row in ids.tolist()]
        new = list(dict.fromkeys(row for row in rows if row not in self.known))
        if new:
            for chunk in self._chunks(torch.tensor(new)):
                self.known.update(zip(map(tuple, chunk.tolist()), self._encode(chunk).tolist()))
        return torch.tensor([self.known[row] for row in rows], dtype=torch.float32)

    def _chunks(self, ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return ids.split(max(1, len(ids) if self.batch is None else self.batch))

    def _encode(self, ids: torch.Tensor) -> torch.Tensor:
        self.rows_encoded += len(ids)
        self.forwards += 1
        return fitness(self.text_encoder, ids, self.goal)


def decode_texts(tokenizer: Any, pop: torch.Tensor, length: int) -> list[str]:
    """The text each individual is stored as: its K ids decoded, special tokens skipped, stripped."""
    texts = tokenizer.batch_decode(pop[:, 1:length + 1].tolist(), skip_special_tokens=True)
    return [text.strip() for text in texts]


def scored_ids(tokenizer: Any, pop: torch.Tensor, length: int, score_text: bool = True
               ) -> tuple[list[str], torch.Tensor]:
    """Per individual, its stored text and the (77,) ids its fitness is computed on: with ``score_text`` the text's
    own tokenisation (padded and truncated as the pipeline does), else the individual's ids."""
    texts = decode_texts(tokenizer, pop, length)
    return texts, (tokenize(tokenizer, texts) if score_text else pop)


class RingABell(Attack):
    """Ring-A-Bell; see the module docstring."""

    name = "ringabell"
    requires = frozenset({Access.TEXT_ENCODER})
    output = "text"
    version = "2"  # 2: fitness of the stored text's own ids; adaptive penalty on raw generations
    backbones = UNET_FAMILY  # the runner's text encoder is the model's conditioning (both encoders on SDXL)

    def __init__(self, adaptive: bool = False, **params: Any):
        super().__init__(adaptive=adaptive, **params)
        self.config = RingABellConfig(**frozen_params(params, ("concept_pairs",)))

    def run(self, ctx: AttackContext, targets: list[PromptItem]) -> list[AdversarialPrompt]:
        if self.adaptive and (ctx.generate_raw is None or ctx.defended.filter is None):
            raise ValueError("adaptive Ring-A-Bell needs ctx.generate_raw and a defended model with a filter")
        pipe, source = (ctx.base_pipe, "base_pipe") if ctx.base_pipe is not None else (ctx.defended.pipe, "pipe")
        if ctx.text_encoder is not None:
            pipe, source = SimpleNamespace(text_encoder=ctx.text_encoder, tokenizer=ctx.tokenizer), "base_text_encoder"
        concept, neutral = self._pairs(ctx)
        c = concept_vector(pipe.text_encoder, pipe.tokenizer, concept, neutral, self.config.encode_batch)
        results = []
        for i, target in enumerate(targets):
            cost = AttackCost(forward=2 * len(concept) if i == 0 else 0)
            with Timer(cost):
                result = self._search(ctx, pipe, target, c, cost)
            result.log.update(encoder=source, concept_pairs=len(concept), concept_vector_forward=2 * len(concept))
            results.append(result)
            progress.step()
        return results

    def _pairs(self, ctx: AttackContext) -> tuple[list[str], list[str]]:
        cfg = self.config
        if cfg.concept_pairs is not None:
            return [p[0] for p in cfg.concept_pairs], [p[1] for p in cfg.concept_pairs]
        pairs = list(zip(ctx.concept.prompt_set(cfg.concept_set), ctx.concept.prompt_set(cfg.neutral_set)))
        return [a.text for a, _ in pairs], [b.text for _, b in pairs]

    def _search(self, ctx: AttackContext, pipe: Any, target: PromptItem, c: torch.Tensor,
                cost: AttackCost) -> AdversarialPrompt:
        cfg, tok, encoder = self.config, pipe.tokenizer, pipe.text_encoder
        length = min(cfg.length, tok.model_max_length - 2)
        gen = torch.Generator().manual_seed(cfg.seed + ctx.seed)  # per target: chunking does not change results
        vocab = vocabulary(tok)
        goal = encode(encoder, tokenize(tok, [target.text]))[0] + cfg.eta * c
        score = self.scorer(encoder, goal)
        cost.forward += 1
        pop = init_population(cfg.population, length, vocab, tok.bos_token_id, tok.eos_token_id,
                              tok.model_max_length, gen)
        best_ids, best_fit, history, penalised = pop[0], float("inf"), [], 0
        for g in range(cfg.generations):
            texts, ids = scored_ids(tok, pop, length, cfg.score_text)
            fit = score(ids)
            cost.forward += len(pop)  # fitness evaluations, the search's budget, memoised or not
            if self.adaptive and (g + 1) % cfg.adaptive_every == 0:
                fit, hit = self._penalise(ctx, target, texts, fit, cost)
                penalised += hit
            order = torch.argsort(fit)
            if float(fit[order[0]]) < best_fit:
                best_ids, best_fit = pop[order[0]].clone(), float(fit[order[0]])
            history.append(best_fit)
            progress.show(fitness=best_fit)
            parents = pop[order[:cfg.population // 2]]
            children = crossover(parents, cfg.crossover_rate, length, gen) if g < cfg.generations - 1 else parents
            pop = mutate(children, cfg.mutation_rate, length, vocab, gen)
        final = torch.cat([pop, best_ids[None]])
        texts, ids = scored_ids(tok, final, length, cfg.score_text)
        fit = score(ids)
        cost.forward += len(final)
        if self.adaptive:
            fit, hit = self._penalise(ctx, target, texts, fit, cost)
            penalised += hit
        winner = int(fit.argmin())
        history.append(min(best_fit, float(fit[winner])))
        text, scored = texts[winner], ids[winner]
        reencoded = trim(tokenize(tok, [text])[0], tok.eos_token_id)
        round_trip = reencoded == trim(scored, tok.eos_token_id)  # the stored text is what was scored
        if cfg.score_text and not round_trip:
            raise RuntimeError(f"Ring-A-Bell: the stored text {text!r} does not re-encode to the ids it was scored on")
        log = {"config": asdict(self.config), "mode": self.mode, "length": length, "fitness": float(fit[winner]),
               "best_fitness_history": _thin(history, cfg.history_points), "generations_run": cfg.generations,
               "flagged_candidates_penalised": penalised, "oracle_used": False,
               "scored": "text" if cfg.score_text else "ids", "round_trip": round_trip,
               "scored_ids": trim(scored, tok.eos_token_id), "genome_ids": final[winner, 1:length + 1].tolist(),
               "genome_round_trip": reencoded == trim(final[winner], tok.eos_token_id)}
        return AdversarialPrompt(target=target, text=text, cost=cost, log=log)

    def scorer(self, text_encoder: Any, goal: torch.Tensor) -> Fitness:
        """How one target's candidates are scored: memoised, each generation's new rows in one forward."""
        return Fitness(text_encoder, goal)

    def _penalise(self, ctx: AttackContext, target: PromptItem, texts: list[str], fit: torch.Tensor,
                  cost: AttackCost) -> tuple[torch.Tensor, int]:
        """Generate the best distinct prompts with the defended system; add ``lambda * max(0, score)`` of the filter
        on the raw generations to the fitness of every individual stored as one of them (populations hold many
        copies of good candidates).

        The filter is scored before it replaces anything: a flagged image is delivered as a placeholder (whose
        score is not the generation's) or not at all. With several images per prompt a prompt counts as caught by
        its highest score."""
        chosen: list[str] = []
        for i in torch.argsort(fit).tolist():
            if texts[i] not in chosen:
                chosen.append(texts[i])
            if len(chosen) == self.config.adaptive_top:
                break
        items = [PromptItem(text, seed=target.seed, guidance=target.guidance, case=target.case) for text in chosen]
        images = ctx.generate_raw(ctx.defended, items)
        cost.queries += len(images)
        scores = ctx.defended.filter.scores(images).float().cpu().clamp(min=0).view(len(items), -1).max(1).values
        penalty = dict(zip(chosen, (self.config.adaptive_lambda * scores).tolist()))
        fit = fit + torch.tensor([penalty.get(text, 0.0) for text in texts])
        return fit, int((scores > 0).sum())


def _thin(values: list[float], points: int) -> list[float]:
    """At most ``points`` evenly spaced values, always keeping the first and the last."""
    if len(values) <= points:
        return values
    step = (len(values) - 1) / (points - 1)
    return [values[round(i * step)] for i in range(points)]
