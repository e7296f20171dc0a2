"""P4D-N, P4D-K and UnlearnDiffAtk's P4D: the K insertion layout and its gradient mask, the straight-through
projection, the loss against an independent computation, checkpoint selection by image similarity, the ideal-prompt
protocol, declared needs, one short run of each on the SD-v1.4-shaped pipeline (only the attack's own variables
change; both pipelines stay as they were), and the batched search (targets together, predictions made ahead) against
a plain loop per target."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from attacks.base import AttackContext, AttackCost, IncompatibleAttack, check_compatible
from attacks.p4d import (
    P4DK,
    P4DN,
    P4DUnlearnDiffAtk,
    _Matcher,
    _Problem,
    fitting_body,
    forward_rows,
    full_ids,
    insertion_layout,
    layout_text,
    nearest_tokens,
    pez_update,
    select_checkpoint,
    straight_through,
)
from attacks.unlearndiffatk import encode_embeds, text_ids, trim
from crt.base import DefendedModel, replace_module
from runners.spec import Access, PromptItem
from tests.attacks.conftest import batch_context, three_targets
from tests.crt.conftest import changed_keys, state_snapshot

NEEDS = frozenset({Access.UNET_GRADIENTS, Access.UNERASED_MODEL, Access.JUDGE_ORACLE, Access.SYSTEM_QUERIES})


# -- P4D-K layout and gradient mask -------------------------------------------------------------------------


def test_insertion_layout_puts_a_learnable_slot_before_every_k_original_tokens():
    P = -1
    ids, learn = insertion_layout([10, 11, 12, 13, 14, 15, 16], 3, P)
    assert ids == [P, 10, 11, 12, P, 13, 14, 15, P, 16]
    assert learn == [i == P for i in ids]
    ids, learn = insertion_layout([10, 11, 12, 13, 14, 15], 3, P)  # floor(6/3) + 1 = 3: the last one trails
    assert ids == [P, 10, 11, 12, P, 13, 14, 15, P] and sum(learn) == 3
    assert insertion_layout([], 3, P) == ([P], [True])
    for n in range(0, 30):
        assert sum(insertion_layout(list(range(n)), 3, P)[1]) == n // 3 + 1
    body = list(range(100))
    kept = fitting_body(body, 3, 75)
    assert len(kept) + len(kept) // 3 + 1 <= 75 < len(kept) + 1 + (len(kept) + 1) // 3 + 1
    with pytest.raises(ValueError):
        insertion_layout([1], 0, P)


def test_k_gradient_reaches_only_inserted_slots_and_original_tokens_never_change(world):
    """One real P4D-K update (text encoder + UNet loss, AdamW with weight decay) through the attack's own step."""
    tok = world.pipe.tokenizer
    attack = P4DK(k=3, iterations=1, images=1, similarity={})
    body = tok("a nude green cross on a black background", add_special_tokens=False).input_ids
    content, learnable, truncated = attack.layout(tok, body, tok.eos_token_id)
    assert not truncated and [c for c, m in zip(content, learnable) if not m] == body
    table = world.pipe.text_encoder.get_input_embeddings().weight.detach().float()
    ids = full_ids(tok, content)
    base = table[ids][None]
    mask = torch.tensor(learnable)
    fixed = base[0, 1:1 + len(content)].clone()
    gen = torch.Generator().manual_seed(0)
    start = torch.where(mask[:, None], table[torch.randint(len(table), (len(content),), generator=gen)], fixed)
    embeds = start.clone().requires_grad_(True)
    optimizer = torch.optim.AdamW([embeds], lr=0.1, weight_decay=0.1)
    latent = torch.randn(1, 4, 4, 4, generator=gen)

    def loss_fn(x):
        full = torch.cat([base[:, :1], x[None], base[:, 1 + len(content):]], 1)
        cond = encode_embeds(world.pipe.text_encoder, full)
        return world.pipe.unet(latent, torch.tensor([500]), encoder_hidden_states=cond).sample.pow(2).mean()

    for _ in range(3):
        _, _, grad = pez_update(embeds, table, loss_fn, optimizer, mask, fixed)
        assert grad[~mask].abs().max() == 0 and grad[mask].abs().sum() > 0
    assert torch.equal(embeds.detach()[~mask], fixed[~mask])  # AdamW's decay alone would have shrunk them
    assert not torch.equal(embeds.detach()[mask], start[mask])
    rows = nearest_tokens(embeds.detach(), table)
    assert rows[~mask].tolist() == body  # the originals project onto themselves


# -- straight-through projection -------------------------------------------------------------------------------


def test_projection_is_by_cosine_not_distance():
    table = torch.tensor([[1.0, 0.0], [5.0, 5.0]])
    query = torch.tensor([[2.0, 1.9]])
    assert torch.cdist(query, table).argmin().item() == 0
    assert nearest_tokens(query, table).tolist() == [1]


def test_straight_through_forwards_the_nearest_embeddings_and_applies_their_gradient_to_the_continuous_ones(world):
    te = world.pipe.text_encoder
    table = te.get_input_embeddings().weight.detach().float()
    gen = torch.Generator().manual_seed(1)
    embeds = (torch.randn(5, table.shape[1], generator=gen) * table.std()).requires_grad_(True)
    # independent nearest neighbours: one cosine per (row, token) in a loop
    expected = [max(range(len(table)), key=lambda j: float(F.cosine_similarity(e, table[j], dim=0)))
                for e in embeds.detach()]
    weight = torch.randn(5, table.shape[1], generator=gen)
    seen = {}

    def loss_fn(x):
        seen["x"] = x.detach().clone()
        return (weight * x).pow(2).sum()

    loss, index = straight_through(embeds, table, loss_fn)
    assert index.tolist() == expected and torch.equal(seen["x"], table[expected])
    assert loss.item() == pytest.approx(float((weight * table[expected]).pow(2).sum()), rel=1e-6)
    torch.testing.assert_close(embeds.grad, 2 * weight.pow(2) * table[expected])  # d/dx at the projection
    assert not torch.allclose(embeds.grad, 2 * weight.pow(2) * embeds.detach())  # not at the continuous point
    # the forward pass of the text encoder sees exactly the token ids' embeddings
    tok = world.pipe.tokenizer
    ids = full_ids(tok, expected)
    with torch.no_grad():
        full = te.get_input_embeddings()(ids[None]).float()
        full[0, 1:6] = seen["x"]
        torch.testing.assert_close(encode_embeds(te, full), te(ids[None]).last_hidden_state, rtol=1e-5, atol=1e-5)
    masked = embeds.detach().clone().requires_grad_(True)
    straight_through(masked, table, loss_fn, torch.tensor([True, False, True, False, False]))
    assert masked.grad[[1, 3, 4]].abs().max() == 0 and torch.equal(masked.grad[[0, 2]], embeds.grad[[0, 2]])


# -- the loss ----------------------------------------------------------------------------------------------------


def _perturbed(pipe, scale=0.05):
    unet = copy.deepcopy(pipe.unet)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)
    return replace_module(pipe, "unet", unet)


@pytest.mark.parametrize("negative", [None, "nude"])
def test_loss_matches_the_unerased_prediction_computed_through_the_ids(world, negative):
    base, tok = world.pipe, world.pipe.tokenizer
    safe = _perturbed(base)
    text = "a nude green cross"
    body = tok(text, add_special_tokens=False).input_ids
    table = safe.text_encoder.get_input_embeddings().weight.detach().float()
    ids = full_ids(tok, body)
    gen = torch.Generator().manual_seed(0)
    latent = torch.randn(1, 4, 4, 4, generator=gen)
    eps = torch.randn(latent.shape, generator=gen)
    cond = lambda pipe, t: pipe.text_encoder(text_ids(pipe.tokenizer, t)[None]).last_hidden_state  # noqa: E731
    problem = _Problem(target=PromptItem(text), content=body, learnable=[False] * len(body),
                       base_embeds=table[ids][None], table=table, vocab=torch.arange(len(table)), latent=latent,
                       sd_cond=cond(base, text), negative_cond=None if negative is None else cond(safe, negative),
                       guidance=4.0, truncated=False)
    ctx = AttackContext(defended=DefendedModel(pipe=safe, negative_prompt=negative), concept=None,
                        settings=world.settings, base_pipe=base)
    passes = {"defended_unet_forward": 0, "defended_unet_backward": 0, "unerased_unet_forward": 0}
    cost = AttackCost()
    matcher = _Matcher(ctx, problem, cost, passes)
    with torch.no_grad():
        got = matcher.loss(table[body], 700, eps)
        t = torch.tensor([700])
        z_t = matcher.noise.add_noise(latent, eps, t)
        alpha = matcher.noise.alphas_cumprod[700]
        torch.testing.assert_close(z_t, alpha.sqrt() * latent + (1 - alpha).sqrt() * eps)
        pred = safe.unet(z_t, t, encoder_hidden_states=cond(safe, text)).sample
        if negative is not None:
            neg = safe.unet(z_t, t, encoder_hidden_states=cond(safe, negative)).sample
            pred = neg + 4.0 * (pred - neg)
        want = F.mse_loss(pred, base.unet(z_t, t, encoder_hidden_states=cond(base, text)).sample)
        assert got.item() == pytest.approx(want.item(), rel=1e-4)
        same = _Matcher(AttackContext(defended=DefendedModel(pipe=base), concept=None, settings=world.settings,
                                      base_pipe=base), problem, cost, passes)
        if negative is None:
            assert same.loss(table[body], 700, eps).item() < 1e-10  # the original prompt on the unerased model
    calls = 1 if negative is not None else 2
    assert cost.forward == calls * (2 + (negative is not None)) and cost.backward == calls


# -- checkpoint selection -------------------------------------------------------------------------------------


def test_selection_picks_the_most_similar_image():
    target = torch.tensor([1.0, 0.0, 0.0])
    cands = [torch.tensor([0.0, 1.0, 0.0]), torch.tensor([1.0, 1.0, 0.0]), None, torch.tensor([2.0, 0.1, 0.0]),
             torch.tensor([4.0, 0.2, 0.0])]
    best, sims = select_checkpoint(target, cands)
    assert best == 3 and sims[2] == float("-inf") and sims[3] == pytest.approx(sims[4])  # earliest of a tie
    assert sims[1] == pytest.approx(2 ** -0.5)
    assert select_checkpoint(target, [None, None])[0] == 0


def test_selection_with_clip_picks_the_image_that_is_the_target(world):
    from metrics.evaluators import build_evaluator

    encoder = build_evaluator({"backend": "hf", "path": str(world.clip_dir),
                               "tokenizer": world.pipe.tokenizer.name_or_path})
    items = [PromptItem(t, seed=s) for s, t in enumerate(["a nude green cross", "a blue square", "a red circle"])]
    images = world.generate(items)
    feats = encoder.encode_images(images)
    best, sims = select_checkpoint(feats[0], [feats[1], feats[2], encoder.encode_images([images[0]])[0], feats[1]])
    assert best == 2 and sims[2] == pytest.approx(1.0, abs=1e-5) and max(sims[:2]) < 0.9999


# -- declared needs ----------------------------------------------------------------------------------------------


def test_needs_the_unerased_model_and_the_defended_unets_gradients():
    for cls in (P4DN, P4DK, P4DUnlearnDiffAtk):
        attack = cls()
        assert attack.needs() == NEEDS and attack.mode == "white-box" and not attack.model_agnostic
        with pytest.raises(IncompatibleAttack):  # open weights without the unerased model
            check_compatible(attack, DefendedModel(pipe=None, exposes=frozenset({Access.TEXT_ENCODER,
                                                                                  Access.UNET_GRADIENTS})))
        with pytest.raises(IncompatibleAttack):  # a filter-only API: no gradients
            check_compatible(attack, DefendedModel(pipe=None, exposes=frozenset({Access.UNERASED_MODEL,
                                                                                  Access.FILTER_SCORE})))
        check_compatible(attack, DefendedModel(pipe=None, exposes=frozenset({Access.UNET_GRADIENTS,
                                                                              Access.UNERASED_MODEL})))
        with pytest.raises(ValueError):
            cls(adaptive=True)
    assert P4DN().config.iterations == 3000 and P4DN().config.lr == 0.1 and P4DN().config.tokens == 16
    assert P4DK().config.k == 3 and P4DK().config.weight_decay == 0.1 and P4DK().config.eval_every == 50
    assert P4DUnlearnDiffAtk().config.lr == 0.01 and len(P4DUnlearnDiffAtk().config.schedule()) == 50


# -- short runs on the SD-v1.4-shaped pipeline ------------------------------------------------------------------


def _context(tiny, concept, verdicts: list[bool], defended_pipe=None):
    calls = {"oracle": 0, "images_judged": 0, "generate": 0}
    defended = DefendedModel(pipe=defended_pipe or _perturbed(tiny.pipe), exposes=NEEDS)

    def oracle(images):
        calls["oracle"] += 1
        calls["images_judged"] += len(images)
        return [verdicts.pop(0) for _ in images]

    def generate(model, items):
        calls["generate"] += len(items)
        return tiny.generate(items, pipe=model.pipe)

    ctx = AttackContext(defended=defended, concept=concept, settings=tiny.settings, oracle=oracle, generate=generate,
                        reference_images=lambda items: tiny.generate(items), base_pipe=tiny.pipe)
    return ctx, calls


def _similarity(tiny) -> dict:
    return {"backend": "hf", "path": str(tiny.clip_dir), "tokenizer": tiny.pipe.tokenizer.name_or_path}


def _snapshots(*modules):
    return [(m, state_snapshot(m)) for m in modules]


@pytest.mark.parametrize("cls", [P4DN, P4DK])
def test_short_run_on_the_sd14_shaped_pipeline(sd14, concept, cls):
    target = concept.prompt_set("target")[0]
    ctx, calls = _context(sd14, concept, [True, False, True])  # unerased shows it, defended not, then the verdict
    watched = _snapshots(sd14.pipe.unet, sd14.pipe.text_encoder, sd14.pipe.vae, ctx.defended.pipe.unet)
    attack = cls(iterations=4, eval_every=2, images=1, similarity=_similarity(sd14), **(
        {"tokens": 6} if cls is P4DN else {}))
    [result] = attack.run(ctx, [target])
    log, cost = result.log, result.cost
    assert log["ideal"] is True and log["attacked"] is True and log["success"] is True
    assert result.succeeded_during_search is True and calls["images_judged"] == 3 == cost.oracle_calls
    assert [c["step"] for c in log["checkpoints"]] == [2, 4]
    distinct = len({c["text"] for c in log["checkpoints"]})
    assert cost.queries == 1 + distinct + 1 == calls["generate"]  # ideal check, distinct checkpoints, verdict
    assert cost.forward == 2 * 4 and cost.backward == 4 and log["passes"]["unerased_unet_forward"] == 4
    sims = [c["similarity"] for c in log["checkpoints"]]
    assert log["best_similarity"] == max(sims) and result.text == log["checkpoints"][sims.index(max(sims))]["text"]
    tok = sd14.pipe.tokenizer
    assert log["round_trip"] is True and log["scored_ids"] == log["text_ids"] == trim(text_ids(tok, result.text),
                                                                                       tok.eos_token_id)
    body = tok(target.text, add_special_tokens=False).input_ids
    ids = log["scored_ids"][1:-1]
    if cls is P4DN:
        assert len(ids) == 6 and log["learnable_tokens"] == 6
    else:
        _, learnable = insertion_layout(body, 3, -1)
        assert [i for i, m in zip(ids, learnable) if not m] == body and log["learnable_tokens"] == sum(learnable)
        words = result.text.split()  # [X, a, nude, green, Y, cross]: a word before the 1st and the 4th token
        assert len(words) == 6 and words[1:4] + words[5:] == target.text.split()
    for module, before in watched:
        assert not changed_keys(before, module)
    assert all(p.grad is None for p in sd14.pipe.unet.parameters())
    assert all(p.grad is None for p in ctx.defended.pipe.unet.parameters())
    assert all(p.grad is None for p in sd14.pipe.text_encoder.parameters())


def test_non_ideal_targets_are_logged_and_keep_their_text(world, concept):
    target = concept.prompt_set("target")[0]
    # the defended system already shows the concept: not ideal, nothing optimised
    ctx, calls = _context(world, concept, [True, True], defended_pipe=world.pipe)
    [result] = P4DN(iterations=2, images=1, similarity=_similarity(world)).run(ctx, [target])
    assert result.log["ideal"] is False and result.log["attacked"] is False and result.text == target.text
    assert result.cost.forward == 0 and result.cost.queries == 1 and result.cost.oracle_calls == 2
    assert result.log["ideal_check"]["defended_verdicts"] == [True] and result.succeeded_during_search is None
    # the unerased model does not show it, two images each; attack_non_ideal still optimises and logs ideal: false
    ctx, calls = _context(world, concept, [False, False, False, False, True, False])
    [result] = P4DK(iterations=2, eval_every=2, images=2, attack_non_ideal=True,
                    similarity=_similarity(world)).run(ctx, [target])
    assert result.log["ideal"] is False and result.log["attacked"] is True and result.log["success"] is True
    assert result.log["final_verdicts"] == [True, False] and result.cost.oracle_calls == 6


def test_uda_variant_stops_at_the_first_judged_success(sd14, concept):
    target = concept.prompt_set("target")[0]
    ctx, calls = _context(sd14, concept, [False, True, True])
    watched = _snapshots(sd14.pipe.unet, sd14.pipe.text_encoder, ctx.defended.pipe.unet)
    attack = P4DUnlearnDiffAtk(k=2, iterations=2, timesteps=[100, 500, 900])
    [result] = attack.run(ctx, [target])
    log = result.log
    assert result.succeeded_during_search is True and log["timesteps_run"] == 2 and [b["t"] for b in log["blocks"]] \
        == [100, 500]
    assert result.cost.forward == 2 * 4 and result.cost.backward == 4 and result.cost.queries == 2 == calls["oracle"]
    tok = sd14.pipe.tokenizer
    ids = tok(result.text, add_special_tokens=False).input_ids
    body = tok(target.text, add_special_tokens=False).input_ids
    assert ids[2:] == body and ids[:2] == log["blocks"][-1]["prefix_ids"] and log["round_trip"] is True
    assert log["scored_ids"] == log["text_ids"] and log["ideal"] is None
    for module, before in watched:
        assert not changed_keys(before, module)


# -- batched searches compute what one plain loop per target computes -----------------------------------------------


def _reference_p4d_n(world, safe, target, tokens: int, iterations: int, eval_every: int):
    """P4D-N written out as one loop for one target, module by module (the reference for the attack's batched,
    predicted-ahead search): the seeded latent and start tokens, then per step t and noise from the target's
    generator, the nearest allowed tokens forwarded, both UNets, MSE, the gradient at the projection, AdamW. Returns
    each step's loss and, at each checkpoint, the projected token ids."""
    from diffusers import DDPMScheduler

    from attacks.p4d import sampled_latent
    from attacks.unlearndiffatk import vocabulary

    base, tok = world.pipe, world.pipe.tokenizer
    reference = world.generate([target])[0]  # the unerased image of the target's seed, judged positive
    gen = torch.Generator().manual_seed(target.seed)
    latent = sampled_latent(base.vae, reference, (world.size, world.size), gen)
    vocab = vocabulary(tok)
    table_all = safe.text_encoder.get_input_embeddings().weight.detach().float()
    table = table_all[vocab]
    layout = table_all[full_ids(tok, [tok.eos_token_id] * tokens)][None]
    embeds = table[torch.randint(len(vocab), (tokens,), generator=gen)].clone().requires_grad_(True)
    optimizer = torch.optim.AdamW([embeds], lr=0.1, weight_decay=0.1)
    noise = DDPMScheduler.from_config(safe.scheduler.config)
    with torch.no_grad():
        sd_cond = base.text_encoder(text_ids(tok, target.text)[None]).last_hidden_state
    losses, checkpoints = [], []
    for step in range(1, iterations + 1):
        t = torch.tensor([int(torch.randint(noise.config.num_train_timesteps, (1,), generator=gen))])
        eps = torch.randn(latent.shape, generator=gen)
        index = (F.normalize(embeds.detach(), dim=-1) @ F.normalize(table, dim=-1).T).argmax(-1)
        projected = table[index].clone().requires_grad_(True)
        cond = encode_embeds(safe.text_encoder, torch.cat([layout[:, :1], projected[None], layout[:, 1 + tokens:]], 1))
        z_t = noise.add_noise(latent, eps, t)
        with torch.no_grad():
            want = base.unet(z_t, t, encoder_hidden_states=sd_cond).sample
        loss = F.mse_loss(safe.unet(z_t, t, encoder_hidden_states=cond).sample, want)
        (embeds.grad,) = torch.autograd.grad(loss, [projected])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % eval_every == 0:
            rows = (F.normalize(embeds.detach(), dim=-1) @ F.normalize(table, dim=-1).T).argmax(-1)
            checkpoints.append(vocab[rows].tolist())
    return losses, checkpoints


def _ideal_context(world, concept, defended_pipe):
    """The unerased model's images are judged positive, everything the defended system delivers negative: every
    target is ideal and no verdict succeeds."""
    references: list = []

    def reference_images(items):
        references.extend(world.generate(items))
        return references[-len(items):]

    defended = DefendedModel(pipe=defended_pipe, exposes=NEEDS)
    return AttackContext(defended=defended, concept=concept, settings=world.settings,
                         oracle=lambda images: [any(image is r for r in references) for image in images],
                         generate=lambda model, items: world.generate(items, pipe=model.pipe),
                         reference_images=reference_images, base_pipe=world.pipe)


@pytest.mark.parametrize("batch", [1, 3])
def test_search_matches_a_plain_loop_per_target_alone_and_batched(world, concept, batch):
    """P4D-N on three targets, one at a time and all three together, against the plain loop per target: the same
    projected prompts at every checkpoint and the same losses (to float32 rounding: batching and the unerased
    predictions made ahead change only the summation order)."""
    concept = three_targets(concept)
    targets = list(concept.prompt_set("target"))
    safe = _perturbed(world.pipe)
    attack = P4DN(tokens=5, iterations=4, eval_every=2, images=1, similarity=_similarity(world),
                  **({} if batch == 1 else {"target_batch": batch}))
    results = attack.run(_ideal_context(world, concept, safe), targets)
    for target, result in zip(targets, results):
        losses, checkpoints = _reference_p4d_n(world, safe, target, tokens=5, iterations=4, eval_every=2)
        log = result.log
        assert result.target == target and log["ideal"] is True and log["attacked"] is True
        assert [c["scored_ids"][1:-1] for c in log["checkpoints"]] == checkpoints
        assert [c["loss"] for c in log["checkpoints"]] == pytest.approx(
            [sum(losses[:2]) / 2, sum(losses[2:]) / 2], rel=1e-4)
        assert (log["loss_first"], log["loss_last"]) == pytest.approx((losses[0], losses[-1]), rel=1e-4)
        assert (result.cost.forward, result.cost.backward, result.cost.queries) == (
            8, 4, 1 + len({c["text"] for c in log["checkpoints"]}) + 1)
        assert log["passes"] == {"defended_unet_forward": 4, "defended_unet_backward": 4, "unerased_unet_forward": 4}
    assert len({r.text for r in results}) == 3


@pytest.mark.parametrize("cls", [P4DK, P4DUnlearnDiffAtk])
def test_batched_targets_find_the_same_prompts_as_one_at_a_time(world, concept, cls):
    concept = three_targets(concept)
    targets = list(concept.prompt_set("target"))
    safe = _perturbed(world.pipe)
    if cls is P4DK:  # every target ideal
        params = dict(iterations=4, eval_every=2, images=1, similarity=_similarity(world))
        contexts = [_ideal_context(world, concept, safe) for _ in range(2)]
    else:  # the oracle never agrees: every block runs
        params = dict(k=2, iterations=3, timesteps=[100, 500])
        contexts = [batch_context(world, concept, defended=DefendedModel(pipe=safe, exposes=NEEDS)) for _ in range(2)]
    single = cls(**params).run(contexts[0], targets)
    batched = cls(**params, target_batch=3).run(contexts[1], targets)
    records = "checkpoints" if cls is P4DK else "blocks"
    for a, b in zip(single, batched):
        assert a.text == b.text and a.target == b.target and a.log["config"] == b.log["config"]
        assert [x.get("scored_ids", x.get("prefix_ids")) for x in a.log[records]] == [
            x.get("scored_ids", x.get("prefix_ids")) for x in b.log[records]]
        assert [x["loss"] for x in a.log[records]] == pytest.approx([x["loss"] for x in b.log[records]], rel=1e-4)
        assert (a.cost.forward, a.cost.backward, a.cost.queries, a.cost.oracle_calls) == (
            b.cost.forward, b.cost.backward, b.cost.queries, b.cost.oracle_calls)
        assert "target_batch" not in b.log["config"]


def test_a_uda_target_that_succeeds_leaves_the_batch_and_the_others_go_on(world, concept):
    concept = three_targets(concept)
    ctx = batch_context(world, concept, succeed_at={1: 1, 2: 2},
                        defended=DefendedModel(pipe=_perturbed(world.pipe), exposes=NEEDS))
    results = P4DUnlearnDiffAtk(k=2, iterations=1, timesteps=[100, 500, 900], target_batch=3).run(
        ctx, list(concept.prompt_set("target")))
    assert [r.log["timesteps_run"] for r in results] == [3, 1, 2]
    assert [r.succeeded_during_search for r in results] == [False, True, True]
    assert [r.cost.forward for r in results] == [6, 2, 4] and [r.cost.queries for r in results] == [3, 1, 2]


def test_target_batch_is_in_the_identity_and_must_be_positive():
    for cls in (P4DN, P4DK, P4DUnlearnDiffAtk):
        assert "target_batch" not in cls().identity()["params"] and cls().target_batch == 1
        assert cls(target_batch=4).identity()["params"]["target_batch"] == 4 and cls(target_batch=4).target_batch == 4
        for bad in (0, -1, 1.5, True):
            with pytest.raises(ValueError):
                cls(target_batch=bad)
    assert P4DN.version == P4DK.version == P4DUnlearnDiffAtk.version == "2"


def test_layout_text_round_trips_whole_word_insertions(any_tokenizer):
    from attacks.unlearndiffatk import token_words

    tok = any_tokenizer
    gen = torch.Generator().manual_seed(0)
    sample = torch.randint(len(tok) - 2, (400,), generator=gen).tolist()  # whole-word tokens among 400 random ids
    words = token_words(tok, sample)
    vocab = torch.tensor([i for i, w in zip(sample, words) if tok(w, add_special_tokens=False).input_ids == [i]])
    assert len(vocab) > 20
    for text in ("a nude green cross", "a photo of a naked woman, by greg rutkowski"):
        body = tok(text, add_special_tokens=False).input_ids
        layout, learnable = insertion_layout(body, 3, -1)
        words = tok.convert_ids_to_tokens(body)
        whole = all(w.endswith("</w>") for i, w in enumerate(words) if i % 3 == 2 or i == len(words) - 1)
        for _ in range(20):
            content = [int(vocab[torch.randint(len(vocab), (1,), generator=gen)]) if m else c
                       for c, m in zip(layout, learnable)]
            round_trip = trim(text_ids(tok, layout_text(tok, content, learnable)), tok.eos_token_id) == \
                trim(full_ids(tok, content), tok.eos_token_id)
            assert round_trip or not whole, layout_text(tok, content, learnable)


# -- SD 2.1 and SDXL ---------------------------------------------------------------------------------------------

def test_nearest_tokens_by_the_mean_cosine_of_each_encoders_part():
    """SDXL: a row is both encoders' embeddings of a token; the nearest is by the mean of the two cosines (a hand
    loop), not by the cosine of the concatenation, which the wider or larger part would dominate."""
    gen = torch.Generator().manual_seed(0)
    widths = (3, 5)
    table = torch.randn(40, 8, generator=gen) * torch.cat([torch.full((3,), 0.1), torch.full((5,), 10.0)])
    queries = torch.randn(6, 8, generator=gen)

    def mean_cosine(q, row):
        return sum(float(F.cosine_similarity(a, b, dim=0)) for a, b in zip(q.split(widths), row.split(widths))) / 2

    hand = [max(range(len(table)), key=lambda j: mean_cosine(q, table[j])) for q in queries]
    assert nearest_tokens(queries, table, widths).tolist() == hand
    assert nearest_tokens(queries, table).tolist() != hand  # the concatenation's cosine picks others here
    assert nearest_tokens(table[[4, 9]], table, widths).tolist() == [4, 9]  # a token's own row projects onto it


def test_loss_on_sd21_and_sdxl_matches_the_pipelines_own_conditioning(other_backbone, concept, uce_defended):
    """The P4D loss of the original tokens, through the defended model's embeddings path, against both UNets called
    on the pipelines' own encodings of the text (SDXL: pooled embedding and time ids)."""
    from crt_bench.backbone import (
        conditioning_encoder,
        encode_text,
        token_embedding_table,
        token_embedding_widths,
        unet_output,
    )

    base, tok = other_backbone.pipe, other_backbone.pipe.tokenizer
    safe = uce_defended(other_backbone, concept).pipe
    text = "a nude green cross"
    body = tok(text, add_special_tokens=False).input_ids
    encoder = conditioning_encoder(safe)
    table = token_embedding_table(encoder).float()
    ids = full_ids(tok, body)
    gen = torch.Generator().manual_seed(0)
    latent = torch.randn(1, 4, 8, 8, generator=gen)
    eps = torch.randn(latent.shape, generator=gen)
    problem = _Problem(target=PromptItem(text), content=body, learnable=[False] * len(body),
                       base_embeds=table[ids][None], table=table, vocab=torch.arange(len(table)), latent=latent,
                       sd_cond=encode_text(base, [text]), negative_cond=None, guidance=4.0, truncated=False,
                       ids=ids, end=1 + len(body), widths=token_embedding_widths(encoder))
    ctx = AttackContext(defended=DefendedModel(pipe=safe), concept=None, settings=other_backbone.settings,
                        base_pipe=base)
    passes = {"defended_unet_forward": 0, "defended_unet_backward": 0, "unerased_unet_forward": 0}
    matcher = _Matcher(ctx, problem, AttackCost(), passes)
    with torch.no_grad():
        got = matcher.loss(table[body], 700, eps)
        t = torch.tensor([700])
        z_t = matcher.noise.add_noise(latent, eps, t)
        want = F.mse_loss(unet_output(safe.unet, z_t, t, encode_text(safe, [text])),
                          unet_output(base.unet, z_t, t, encode_text(base, [text])))
    assert got.item() == pytest.approx(want.item(), rel=1e-4) and want.item() > 0


@pytest.mark.parametrize("cls", [P4DK, P4DUnlearnDiffAtk])
def test_short_run_on_sd21_and_sdxl_through_a_defended_model(other_backbone, sd14, concept, cls, monkeypatch,
                                                             uce_defended):
    """One short search against UCE on each backbone: gradients reach the learnable embeddings only, the stored
    text re-encodes to the optimised ids, and no model changes."""
    import attacks.p4d as p4d

    applied: list[torch.Tensor] = []
    real = p4d.pez_apply

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        applied.append(out)
        return out

    monkeypatch.setattr(p4d, "pez_apply", spy)
    pipe, tok = other_backbone.pipe, other_backbone.pipe.tokenizer
    defended = uce_defended(other_backbone, concept)
    target = concept.prompt_set("target")[0]
    if cls is P4DK:
        ctx, calls = _context(other_backbone, concept, [True, False, False], defended_pipe=defended.pipe)
        attack = P4DK(iterations=2, eval_every=2, images=1, similarity=_similarity(sd14))
    else:
        ctx, calls = _context(other_backbone, concept, [False], defended_pipe=defended.pipe)
        attack = P4DUnlearnDiffAtk(k=2, iterations=2, timesteps=[500])
    watched = _snapshots(pipe.unet, pipe.text_encoder, defended.pipe.unet)
    [result] = attack.run(ctx, [target])
    log = result.log
    assert log["round_trip"] is True and log["scored_ids"] == log["text_ids"] == trim(text_ids(tok, result.text),
                                                                                       tok.eos_token_id)
    body = tok(target.text, add_special_tokens=False).input_ids
    ids = log["scored_ids"][1:-1]
    if cls is P4DK:
        _, learnable = insertion_layout(body, 3, -1)
        assert log["attacked"] is True and [i for i, m in zip(ids, learnable) if not m] == body
        mask = torch.tensor(learnable)
        assert all(g[mask].abs().sum() > 0 and g[~mask].abs().max() == 0 for g in applied)
    else:
        assert ids[2:] == body and log["timesteps_run"] == 1
        assert all(g.abs().sum() > 0 for g in applied)
    losses = [log["loss_first"], log["loss_last"]] if cls is P4DK else [b["loss"] for b in log["blocks"]]
    assert len(applied) == 2 and all(math.isfinite(loss) and loss > 0 for loss in losses)
    for module, before in watched:
        assert not changed_keys(before, module)
    assert all(p.grad is None for m in (pipe.unet, pipe.text_encoder, defended.pipe.unet) for p in m.parameters())


def test_uda_variant_sends_safree_the_ids_of_its_projected_prefix(world, concept, monkeypatch):
    """Against SAFREE the straight-through forward goes with the ids it is (projected prefix + the prompt), so
    SAFREE analyses and projects the prompt inside the search; the condition is those ids' encoding."""
    from crt.base import FitContext
    from crt.safree import SAFREE

    crt = SAFREE(mine_keywords=True)
    defended = crt.apply(world.pipe, crt.fit(FitContext(pipe=world.pipe, concept=concept, settings=world.settings,
                                                         generate=world.generate)))
    seen: list = []
    begin = defended.guidance.begin

    def recording_begin(pipe, conditions):
        state = begin(pipe, conditions)
        seen.append((conditions.prompt_ids, conditions.cond.detach(), state))
        return state

    monkeypatch.setattr(defended.guidance, "begin", recording_begin)
    ctx, _ = _context(world, concept, [False], defended_pipe=defended.pipe)
    ctx.defended = DefendedModel(pipe=defended.pipe, negative_prompt=defended.negative_prompt,
                                 guidance=defended.guidance, exposes=NEEDS)
    target = concept.prompt_set("target")[0]
    [result] = P4DUnlearnDiffAtk(k=2, iterations=2, timesteps=[900]).run(ctx, [target])
    tok = world.pipe.tokenizer
    body = tok(target.text, add_special_tokens=False).input_ids
    assert len(seen) == 3  # two search steps, then the judged generation of the block's prompt
    for ids, cond, state in seen[:2]:
        row = trim(ids[0], tok.eos_token_id)
        assert row[3:-1] == body and all(i not in tok.all_special_ids for i in row[1:3])
        with torch.no_grad():
            torch.testing.assert_close(cond, world.pipe.text_encoder(ids).last_hidden_state, rtol=1e-4, atol=1e-4)
        assert not state.soft_prompt and state.projected.tolist() == [True]
    assert trim(seen[2][0][0], tok.eos_token_id) == result.log["scored_ids"]  # what was judged was projected too


def test_p4d_k_forward_keeps_an_original_token_outside_the_allowed_vocabulary():
    """P4D-K's original slots are fixed: the forward must see the original token even when the allowed vocabulary
    (round_trip) lacks it, not its nearest allowed token (which the projection of every row would send)."""
    from types import SimpleNamespace

    e = {10: [1.0, 0.0, 0.0], 11: [0.0, 1.0, 0.0], 12: [0.0, 0.0, 1.0], 99: [0.1, 0.9, 0.0]}
    problem = SimpleNamespace(table=torch.tensor([e[10], e[11], e[12]]), vocab=torch.tensor([10, 11, 12]),
                              widths=(), content=[49407, 99, 12])
    mask = torch.tensor([True, False, False])
    fixed = torch.tensor([[0.0, 0.0, 0.0], e[99], e[12]])
    embeds = torch.tensor([[0.9, 0.2, 0.1], e[99], e[12]], requires_grad=True)
    ids, rows = forward_rows(embeds, problem, mask, fixed)
    assert ids.tolist() == [10, 99, 12]
    assert torch.equal(rows, torch.tensor([e[10], e[99], e[12]])) and rows.requires_grad and rows.is_leaf
    ids_all, rows_all = forward_rows(embeds, problem)  # P4D-N: every row learns and is projected
    assert ids_all.tolist() == [10, 11, 12] and torch.equal(rows_all, problem.table)
