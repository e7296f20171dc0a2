"""AdvUnlearn: the soft prefix layout, the inner attack, the outer ESD target and retain term, the noise-level pairing,
the retain draws, that only the text encoder changes, resuming, and the YAML."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import crt.advunlearn as advunlearn
from crt.advunlearn import (
    AdvUnlearn,
    encode_embeds,
    noise_level,
    optimise_prefix,
    outer_loss,
    prefix_embeddings,
    prompt_length,
    retain_indices,
    token_ids,
    trainable_names,
)
from crt.base import OPEN_WEIGHTS, FitCheckpoints, FitContext
from crt.esd import ddpm_bin
from runners.spec import ConceptSpec, Family
from tests.crt.conftest import changed_keys, crt_yaml, ddim_scheduler, items, state_snapshot

TINY = dict(iterations=4, warmup_iterations=1, adv_prompt_update_step=2, attack_steps=2, ddim_steps=4,
            retain_batch=2, lr=1e-3, attack_lr=1e-2)


def _context(tiny, concept, checkpoints: FitCheckpoints | None = None) -> FitContext:
    return FitContext(pipe=tiny.pipe, concept=concept, settings=tiny.settings, generate=tiny.generate,
                      checkpoints=checkpoints or FitCheckpoints())


# --- the soft prefix ---


def test_encode_embeds_is_the_text_encoders_own_forward(tiny):
    te, tok = tiny.pipe.text_encoder, tiny.pipe.tokenizer
    ids = token_ids(tok, ["a nude circle", "a red square on a white background"])
    with torch.no_grad():
        torch.testing.assert_close(encode_embeds(te, te.get_input_embeddings()(ids)), te(ids)[0])


def test_a_prefix_of_a_words_embedding_is_that_word_written_before_the_prompt(tiny):
    te, tok = tiny.pipe.text_encoder, tiny.pipe.tokenizer
    table = te.get_input_embeddings().weight
    prompt, word = "a nude circle", "red"
    (word_id,) = tok(word, add_special_tokens=False).input_ids
    embeds = table[token_ids(tok, [prompt])[0]]
    layout = prefix_embeddings(embeds, table[[word_id]], prompt_length(tok, prompt))
    assert layout.shape == embeds.shape
    with torch.no_grad():
        torch.testing.assert_close(encode_embeds(te, layout[None]), te(token_ids(tok, [f"{word} {prompt}"]))[0])


def test_word_counted_layout_splits_a_multi_token_word(world):
    """The official code counts words: a word of several tokens loses its tail to delta's room."""
    tok = world.pipe.tokenizer
    prompt = "a qzxvbnk circle"
    tokens = prompt_length(tok, prompt, "tokens")
    assert prompt_length(tok, prompt, "words") == 3 < tokens
    embeds = torch.arange(77.0)[:, None]  # position i holds i, so the layout shows which positions it keeps
    delta = torch.full((1, 1), -1.0)
    by_tokens = prefix_embeddings(embeds, delta, tokens).flatten().tolist()
    by_words = prefix_embeddings(embeds, delta, 3).flatten().tolist()
    assert by_tokens[:tokens + 3] == [0, -1, *range(1, tokens + 1), tokens + 2]  # position tokens + 1 (EOT) makes room
    assert by_words[:5] == [0, -1, 1, 2, 3] and 4 not in by_words  # the 4th token (inside the word) is dropped
    with pytest.raises(ValueError):
        prompt_length(tok, prompt, "characters")


# --- the inner attack ---


def _hand_adam(delta: torch.Tensor, grad_of, steps: int, lr: float, accumulate: bool, sign: bool) -> torch.Tensor:
    """Adam written out (betas 0.9 / 0.999, eps 1e-8); ``accumulate`` feeds it the running sum of gradients."""
    m = torch.zeros_like(delta)
    v = torch.zeros_like(delta)
    total = torch.zeros_like(delta)
    for n in range(1, steps + 1):
        g = grad_of(delta)
        total = total + g if accumulate else g
        if sign:
            total = total.sign()
        m = 0.9 * m + 0.1 * total
        v = 0.999 * v + 0.001 * total ** 2
        delta = delta - lr * (m / (1 - 0.9 ** n)) / ((v / (1 - 0.999 ** n)).sqrt() + 1e-8)
    return delta


@pytest.mark.parametrize(("accumulate", "method"), [(False, "pgd"), (True, "pgd"), (False, "fast_at"),
                                                   (True, "fast_at")])
def test_inner_attack_is_adam_on_the_prefix_and_lowers_a_toy_loss(accumulate, method):
    torch.manual_seed(0)
    a, b = torch.randn(6, 4), torch.randn(6, 3)
    start = torch.randn(4, 3)

    def loss_of(delta):
        return (a @ delta - b).pow(2).mean()

    def grad_of(delta):  # d/d delta of mean((A delta - b)^2), by hand
        return 2 * a.T @ (a @ delta - b) / b.numel()

    found, losses = optimise_prefix(start, loss_of, steps=40, lr=0.05, method=method, accumulate=accumulate)
    torch.testing.assert_close(found, _hand_adam(start, grad_of, 40, 0.05, accumulate, method == "fast_at"))
    assert losses[-1] < 0.5 * losses[0]
    assert not found.requires_grad and torch.equal(start, start.clone())


def test_inner_attack_lowers_its_loss_through_the_world_models(world):
    """delta is the only thing that moves; the attack's loss on one fixed x_t goes down."""
    pipe = world.pipe
    te, tok, unet = pipe.text_encoder, pipe.tokenizer, pipe.unet
    table = te.get_input_embeddings().weight.detach()
    ids = token_ids(tok, ["a nude circle"])
    gen = torch.Generator().manual_seed(0)
    x_t, t = torch.randn(1, 4, 8, 8, generator=gen), torch.tensor([400])
    with torch.no_grad():
        goal = unet(x_t, t, encoder_hidden_states=te(ids)[0]).sample
    before = state_snapshot(te)

    def loss_of(delta):
        cond = encode_embeds(te, prefix_embeddings(table[ids[0]], delta, 3)[None])
        return torch.nn.functional.mse_loss(unet(x_t, t, encoder_hidden_states=cond).sample, goal)

    start = table[tok("blue", add_special_tokens=False).input_ids]
    _, losses = optimise_prefix(start, loss_of, steps=10, lr=1e-2)
    assert losses[-1] < 0.7 * losses[0], losses
    assert not changed_keys(before, te)
    assert all(p.grad is None for p in te.parameters()) and all(p.grad is None for p in unet.parameters())


# --- the outer loss ---


def test_outer_loss_is_the_esd_term_plus_the_weighted_retain_term_by_hand():
    torch.manual_seed(0)
    pred, target = torch.randn(1, 4, 2, 2), torch.randn(1, 4, 2, 2)
    retain_pred, retain_target = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    unlearn = sum((p - q) ** 2 for p, q in zip(pred.flatten().tolist(), target.flatten().tolist())) / 16
    retain = sum((p - q) ** 2 for p, q in zip(retain_pred.flatten().tolist(), retain_target.flatten().tolist())) / 48
    loss = outer_loss(pred, target, retain_pred, retain_target, retain_weight=0.3)
    assert loss.total.item() == pytest.approx(unlearn + 0.3 * retain, rel=1e-5)
    assert (loss.unlearn, loss.retain) == (pytest.approx(unlearn, rel=1e-5), pytest.approx(retain, rel=1e-5))
    assert outer_loss(pred, target, None, None, 1.0).total.item() == pytest.approx(unlearn, rel=1e-5)


def test_outer_target_is_old_esds_target_of_the_base_model(world, concept, monkeypatch):
    """The target the fit trains towards is eps_0('') - eta (eps_0(c) - eps_0('')), recomputed here with the base
    UNet and text encoder on the x_t and t the fit drew."""
    pipe = world.pipe
    seen = []
    original = advunlearn.esd_target

    def recording(frozen, x_t, t, cond, uncond, eta, target="new"):
        goal = original(frozen, x_t, t, cond, uncond, eta, target)
        seen.append(SimpleNamespace(frozen=frozen, x_t=x_t, t=t, goal=goal))
        return goal

    monkeypatch.setattr(advunlearn, "esd_target", recording)
    AdvUnlearn(**{**TINY, "iterations": 2, "eta": 1.5}).fit(_context(world, concept))
    assert len(seen) == 2
    with torch.no_grad():
        cond = pipe.text_encoder(token_ids(pipe.tokenizer, ["nude"]))[0]
        uncond = pipe.text_encoder(token_ids(pipe.tokenizer, [""]))[0]
        for call in seen:
            assert call.frozen is pipe.unet
            eps_c = pipe.unet(call.x_t, call.t, encoder_hidden_states=cond).sample
            eps_u = pipe.unet(call.x_t, call.t, encoder_hidden_states=uncond).sample
            torch.testing.assert_close(call.goal, eps_u - 1.5 * (eps_c - eps_u), atol=1e-5, rtol=1e-4)


def test_retain_term_starts_at_zero_and_only_it_reads_the_retain_prompts(world, concept):
    """At step 0 the trained encoder is the base one, so the retain term is exactly 0 (then not); with gamma = 0
    other retain prompts give the very same encoder, with gamma = 1 they do not."""
    params = {**TINY, "iterations": 2, "warmup_iterations": 2, "log_every": 1}
    other = ConceptSpec(key=concept.key, c_u=concept.c_u, c_a=concept.c_a,
                        prompts={**concept.prompts,
                                 "finetune_acceptable": items("a green ring", "a black box", "a white disc")})
    for gamma, same in ((0.0, True), (1.0, False)):
        a = AdvUnlearn(**{**params, "retain_weight": gamma}).fit(_context(world, concept))
        b = AdvUnlearn(**{**params, "retain_weight": gamma}).fit(_context(world, other))
        first, second = a.meta["retain_loss"]["mean_per_window"]
        assert first < 1e-10 < second
        equal = all(torch.equal(a.tensors[n], b.tensors[n]) for n in a.tensors)
        assert equal == same, gamma
    assert a.meta["retain"] == {"set": "finetune_acceptable", "prompts": 3, "stands_in_for": "coco_object (243)"}


def test_retain_sets_take_the_first_the_concept_has(world, concept):
    with_validation = ConceptSpec(key="c", c_u="nude", c_a="clothed",
                                  prompts={**concept.prompts, "validation_acceptable": items("a cyan ring")})
    crt = AdvUnlearn(**{**TINY, "iterations": 1, "warmup_iterations": 1})
    assert crt.fit(_context(world, with_validation)).meta["retain"]["set"] == "validation_acceptable"
    bare = ConceptSpec(key="church", c_u="church", c_a="building", prompts={"acceptable": items("a building")})
    with pytest.raises(ValueError, match="retain"):
        crt.fit(_context(world, bare))


# --- noise levels and retain draws ---


def test_matched_noise_levels_are_esds_bins():
    scheduler = ddim_scheduler(50)
    for index in (0, 7, 49):
        level = noise_level(scheduler, index, "matched")
        assert (level.steps, (level.lo, level.hi)) == (index, ddpm_bin(scheduler, index))


@pytest.mark.parametrize(("index", "steps", "lo", "hi"), [(0, 50, 0, 20), (1, 50, 20, 40), (2, 49, 40, 60),
                                                          (25, 26, 500, 520), (49, 2, 980, 1000)])
def test_official_noise_levels_follow_the_compvis_till_t_loop(index, steps, lo, hi):
    level = noise_level(ddim_scheduler(50), index, "official")
    assert (level.steps, level.lo, level.hi) == (steps, lo, hi)


def test_official_pairing_labels_x_t_two_bins_noisier_than_it_is():
    """After the official step count the latent sits at DDIM timestep 20 (index - 2) + 1, below its t bin."""
    scheduler = ddim_scheduler(50)
    for index in (5, 25, 40):
        level = noise_level(scheduler, index, "official")
        x_t_timestep = int(scheduler.timesteps[level.steps])
        assert x_t_timestep == 20 * (index - 2) + 1 and level.lo - x_t_timestep == 39


def test_retain_draws_cover_a_pass_without_repeats_and_depend_on_the_iteration_only():
    draws = [retain_indices(i, 7, 3, seed=1) for i in range(4)]
    assert all(len(d) == 3 for d in draws)
    assert len(set(draws[0] + draws[1])) == 6 and len(set(draws[2] + draws[3])) == 6  # passes of 2 draws
    assert draws[:2] != draws[2:4]  # a new order each pass
    assert retain_indices(3, 7, 3, seed=1) == draws[3] and retain_indices(0, 7, 3, seed=2) != draws[0]
    assert retain_indices(0, 2, 5, seed=0) in ([0, 1], [1, 0])  # fewer prompts than the batch: all of them


# --- fit and apply ---


def test_trainable_names_are_the_transformer_layers_and_final_norm(tiny):
    te = tiny.pipe.text_encoder
    names = trainable_names(te)
    everything = [n for n, _ in te.named_parameters()]
    assert names == [n for n in everything if not n.removeprefix("text_model.").startswith("embeddings.")]
    assert any("final_layer_norm" in n for n in names) and any(".mlp." in n for n in names)
    with pytest.raises(ValueError):
        trainable_names(te, "text_encoder_layer0")


def test_fit_and_apply_change_only_the_text_encoder(tiny, concept):
    pipe = tiny.pipe
    unet_before, te_before = state_snapshot(pipe.unet), state_snapshot(pipe.text_encoder)
    crt = AdvUnlearn(**TINY)
    artifact = crt.fit(_context(tiny, concept))
    assert not changed_keys(unet_before, pipe.unet) and not changed_keys(te_before, pipe.text_encoder)
    assert all(p.grad is None for p in pipe.unet.parameters()) and all(p.grad is None for p in
                                                                       pipe.text_encoder.parameters())
    assert set(artifact.tensors) == set(trainable_names(pipe.text_encoder))
    meta = artifact.meta
    assert meta["concept_text"] == "nude" and meta["loss"]["steps"] == 4 and meta["attack_rounds"] == 2
    assert meta["target"] == "eps_0(x_t, '', t) - 1 * (eps_0(x_t, c, t) - eps_0(x_t, '', t))"

    defended = crt.apply(pipe, artifact)
    assert defended.pipe.unet is pipe.unet and defended.pipe.vae is pipe.vae
    assert defended.pipe.text_encoder is not pipe.text_encoder
    assert (defended.crt_name, defended.exposes, crt.family) == ("advunlearn", OPEN_WEIGHTS, Family.TEXT_ENCODER_SWAP)
    changed = changed_keys(te_before, defended.pipe.text_encoder)
    assert changed and changed <= set(artifact.tensors)
    assert not any(k.removeprefix("text_model.").startswith("embeddings.") for k in changed)
    assert not changed_keys(te_before, pipe.text_encoder)
    ids = token_ids(pipe.tokenizer, ["a nude circle"])
    with torch.no_grad():
        assert not torch.allclose(defended.pipe.text_encoder(ids)[0], pipe.text_encoder(ids)[0])


def test_a_killed_fit_resumes_to_the_same_artifact(world, concept, tmp_path, monkeypatch):
    """Killed after step 2 (attack rounds at steps 1 and 3): the resumed fit restores delta for the round at 3."""
    from tests.crt.test_resume import _assert_same, kill_and_resume

    params = {**TINY, "iterations": 5}
    whole, resumed, steps = kill_and_resume(lambda tiny: AdvUnlearn(**params), world, concept, tmp_path / "ckpt", 2,
                                            2, (advunlearn, "outer_loss"), monkeypatch)
    _assert_same(resumed, whole)
    assert steps == 3 and whole.meta["attack_rounds"] == 2


# --- configuration ---


def _yaml() -> dict:

    return crt_yaml("advunlearn")


def test_yaml_params_are_the_official_defaults_and_build():
    cfg = _yaml()
    crt = AdvUnlearn(**cfg["params"])
    c = crt.config
    assert (c.iterations, c.lr, c.eta, c.start_guidance, c.ddim_steps, c.warmup_iterations) == (1000, 1e-5, 1.0, 3.0,
                                                                                               50, 200)
    assert (c.adv_prompt_update_step, c.adv_prompt_num, c.attack_steps, c.attack_lr, c.attack_init) == (
        1, 1, 30, 1e-3, "latest")
    assert (c.retain_batch, c.retain_weight, c.train_method) == (5, 1.0, "text_encoder_full")
    assert (c.timestep_pairing, c.attack_grad_accumulation, c.prompt_length) == ("matched", False, "tokens")
    assert set(cfg["mini"]) <= set(cfg["params"])
    AdvUnlearn(**{**cfg["params"], **cfg["mini"]})


@pytest.mark.parametrize("bad", [{"attack_method": "multi_pgd"}, {"attack_init": "zeros"},
                                 {"timestep_pairing": "new"}, {"prompt_length": "chars"}, {"adv_prompt_num": 0},
                                 {"train_method": "xattn"}])
def test_misspelt_choices_are_refused(bad):
    with pytest.raises(ValueError):
        AdvUnlearn(**bad)
