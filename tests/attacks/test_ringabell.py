"""Ring-A-Bell: the concept vector is the mean difference, the operators keep the layout, the search improves fitness
with one batched forward per generation, and the adaptive variant queries the defended system's filter."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from attacks.base import AttackContext, IncompatibleAttack, check_compatible
from attacks.ringabell import (
    RingABell,
    concept_vector,
    crossover,
    init_population,
    mutate,
    tokenize,
    vocabulary,
)
from crt.base import DefendedModel, ImageFilter
from runners.spec import Access


class ToyEncoder(nn.Module):
    """Position j's state is the sum of the embeddings of tokens 0..j (causal, like CLIP's text tower)."""

    def __init__(self, vocab: int, width: int = 6):
        super().__init__()
        self.emb = nn.Embedding(vocab, width)

    @property
    def device(self) -> torch.device:
        return self.emb.weight.device

    def forward(self, ids):
        return SimpleNamespace(last_hidden_state=self.emb(ids).cumsum(1))


def test_concept_vector_is_the_mean_difference_on_a_toy_encoder(world):
    tok = world.pipe.tokenizer
    torch.manual_seed(0)
    encoder = ToyEncoder(len(tok))
    concept, neutral = ["a nude circle", "a naked red square", "nude"], ["a clothed circle", "a red square", "clean"]
    got = concept_vector(encoder, tok, concept, neutral, batch=2)
    table = encoder.emb.weight.detach()
    by_hand = torch.zeros(77, table.shape[1])
    for a, b in zip(concept, neutral):
        for text, sign in ((a, 1.0), (b, -1.0)):
            ids = tok(text, padding="max_length", max_length=77).input_ids
            for j in range(77):
                by_hand[j] += sign * sum(table[i] for i in ids[:j + 1]) / len(concept)
    torch.testing.assert_close(got, by_hand, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError):
        concept_vector(encoder, tok, concept, neutral[:2])


def test_operators_keep_the_sot_tokens_eot_layout(world):
    tok = world.pipe.tokenizer
    vocab = vocabulary(tok)
    assert not set(tok.all_special_ids) & set(vocab.tolist()) and len(vocab) == len(tok) - 2
    gen = torch.Generator().manual_seed(0)
    k = 5
    pop = init_population(40, k, vocab, tok.bos_token_id, tok.eos_token_id, 77, gen)
    children = crossover(pop, 0.5, k, gen)
    assert (len(children) - len(pop)) % 2 == 0 and len(children) > len(pop)
    assert torch.equal(children[:len(pop)], pop)
    mutated = mutate(children, 0.25, k, vocab, gen)
    assert ((mutated != children).sum(1) <= 1).all() and (mutated != children).any()
    for batch in (pop, children, mutated):
        assert (batch[:, 0] == tok.bos_token_id).all() and (batch[:, k + 1:] == tok.eos_token_id).all()
        assert torch.isin(batch[:, 1:k + 1], vocab).all()
    cut_child = children[len(pop)]
    assert any(torch.equal(cut_child[:2], p[:2]) for p in pop)


class _Counter:
    def __init__(self, module: nn.Module):
        self.calls = 0
        self.handle = module.register_forward_pre_hook(self)

    def __call__(self, module, args):
        self.calls += 1


def test_search_improves_fitness_with_one_forward_per_generation(tiny, concept):
    pipe = tiny.pipe
    attack = RingABell(population=16, generations=10, length=4, eta=3.0, seed=0)
    ctx = AttackContext(defended=DefendedModel(pipe=pipe), concept=concept, settings=tiny.settings)
    counter = _Counter(pipe.text_encoder)
    try:
        [result] = attack.run(ctx, list(concept.prompt_set("target")))
    finally:
        counter.handle.remove()
    history = result.log["best_fitness_history"]
    assert history[-1] < history[0] and all(b <= a for a, b in zip(history, history[1:]))
    assert counter.calls == 2 + 1 + 10 + 1  # concept vector (both sides), target, one per generation, final
    pairs = len(concept.prompt_set("finetune_unacceptable"))
    assert result.cost.forward > 2 * pairs + 1 + 16 * 10 and result.cost.queries == 0
    assert result.log["concept_vector_forward"] == 2 * pairs and result.log["oracle_used"] is False
    assert isinstance(result.text, str) and result.text and result.embedding is None
    assert len(tokenize(pipe.tokenizer, [result.text])[0].ne(pipe.tokenizer.eos_token_id).nonzero()) >= 2


class AlwaysFlags(ImageFilter):
    """Catches every image: the search must then return a candidate it never showed the filter."""

    def scores_from_pixels(self, pixels):
        return torch.ones(len(pixels)) + 0 * pixels.mean((1, 2, 3))


def test_adaptive_variant_queries_the_filter_and_is_gated_by_access(world, concept):
    attack = RingABell(adaptive=True, population=8, generations=4, length=3, adaptive_every=2, adaptive_top=2,
                       adaptive_lambda=1e9)
    assert attack.mode == "adaptive" and Access.FILTER_SCORE in attack.needs()
    with pytest.raises(IncompatibleAttack):
        check_compatible(attack, DefendedModel(pipe=world.pipe, exposes=frozenset({Access.TEXT_ENCODER})))
    defended = DefendedModel(pipe=world.pipe, filter=AlwaysFlags(),
                             exposes=frozenset({Access.TEXT_ENCODER, Access.FILTER_SCORE}))
    check_compatible(attack, defended)
    generated = []

    def generate(model, items):
        assert model is defended
        generated.extend(items)
        return world.generate(items, pipe=model.pipe)

    ctx = AttackContext(defended=defended, concept=concept, settings=world.settings, generate=generate)
    [result] = attack.run(ctx, list(concept.prompt_set("target")))
    assert result.cost.queries == len(generated) == 2 * 2 + 2  # generations 2 and 4, then the final check
    assert all(item.seed == concept.prompt_set("target")[0].seed for item in generated)
    assert result.log["mode"] == "adaptive" and result.log["flagged_candidates_penalised"] == len(generated)
    assert result.log["fitness"] < 1e9, "the winner must be a candidate the filter did not catch"
    assert result.text not in {item.text for item in generated[-2:]}
    with pytest.raises(ValueError):
        attack.run(AttackContext(defended=DefendedModel(pipe=world.pipe), concept=concept, settings=world.settings),
                   list(concept.prompt_set("target")))
