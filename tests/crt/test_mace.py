"""MACE: both closed forms are the least-squares solutions of their objectives, the token pairing and the loss
positions follow the official code, the attention-map loss equals a hand-written loop, only the rank-1 LoRA trains
in stage 2, and a short fit + apply on both pipeline shapes changes only the attn2 K/V weights."""

from __future__ import annotations

import copy

import pytest
import torch

from crt.base import OPEN_WEIGHTS, FitContext
from crt.mace import MACE, MACEConfig, prior_captions, quirks
from crt.mace.closed_form import (
    COCO_CAPTIONS,
    Grams,
    System,
    aligned_positions,
    all_token_gram,
    fusion,
    mapping_grams,
    prior_scale,
    refinement,
    residual,
)
from crt.mace.data import (
    OBJECT_TEMPLATES,
    chosen_templates,
    colour_masks,
    concept_masks,
    concept_texts,
    to_model_pixels,
)
from crt.mace.lora import (
    ConceptBatchData,
    LoRATraining,
    attach_loras,
    attention_map_loss,
    concept_positions,
    train_lora,
)
from crt.uce import kv_projections
from runners.spec import ConceptSpec, Family
from tests.crt.conftest import changed_keys, crt_yaml, state_snapshot

D64 = torch.float64


def _stacked_lstsq(rows: list[tuple[torch.Tensor, torch.Tensor, float]], d_in: int,
                   anchor: torch.Tensor | None = None, rcond: float | None = None) -> torch.Tensor:
    """``argmin_W sum_j s_j ||X_j W^T - Y_j||^2`` by stacking ``sqrt(s_j) X_j`` over ``sqrt(s_j) Y_j`` (SVD solve).
    With ``anchor`` and ``rcond``: the minimum-norm change from ``anchor``, singular values below ``rcond`` x the
    largest cut (the anchor kept in those directions)."""
    x = torch.cat([s ** 0.5 * a for a, _, s in rows])
    y = torch.cat([s ** 0.5 * b for _, b, s in rows])
    assert x.shape[1] == d_in
    if anchor is None:
        return torch.linalg.lstsq(x, y, driver="gelsd").solution.T
    change = torch.linalg.lstsq(x, y - x @ anchor.T, rcond=rcond, driver="gelsd").solution.T
    return anchor + change


@pytest.mark.parametrize("lamb", [0.0, 0.3])
def test_refinement_equals_the_stacked_least_squares_solution(lamb):
    gen = torch.Generator().manual_seed(1)
    d_in, d_out = 12, 7
    w0 = torch.randn(d_out, d_in, generator=gen, dtype=D64)
    keys = torch.randn(20, d_in, generator=gen, dtype=D64)  # erased prompts' states
    mapped = torch.randn(20, d_in, generator=gen, dtype=D64)  # the paired anchor states
    prior = torch.randn(30, d_in, generator=gen, dtype=D64)
    s = 0.05
    mapping, prior_gram = Grams.of(keys, mapped), Grams.of(prior).scaled(s)
    new = refinement(w0, mapping, prior_gram, lamb, System.of([mapping, prior_gram], lamb))
    rows = [(keys, mapped @ w0.T, 1.0), (prior, prior @ w0.T, s)]
    if lamb:
        rows.append((torch.eye(d_in, dtype=D64), w0.T, lamb))
    torch.testing.assert_close(new, _stacked_lstsq(rows, d_in), rtol=1e-9, atol=1e-9)
    # the residual from the grams is the direct one
    direct = float((keys @ new.T - mapped @ w0.T).norm())
    assert residual(new, w0, mapping) == pytest.approx(direct, rel=1e-9)


def test_a_singular_system_keeps_the_entering_weight_off_its_span():
    """lamb 0 with keys in a 3-dim subspace: the lamb -> 0+ limit, W_in on the orthogonal complement."""
    gen = torch.Generator().manual_seed(2)
    d_in, d_out = 8, 5
    basis = torch.linalg.qr(torch.randn(d_in, d_in, generator=gen, dtype=D64))[0]
    span, rest = basis[:, :3], basis[:, 3:]
    keys = torch.randn(10, 3, generator=gen, dtype=D64) @ span.T
    mapped = torch.randn(10, d_in, generator=gen, dtype=D64)
    w0 = torch.randn(d_out, d_in, generator=gen, dtype=D64)
    grams = Grams.of(keys, mapped)
    zero = grams.scaled(0.0)  # no prior
    system = System.of([grams, zero], 0.0)
    new = refinement(w0, grams, zero, 0.0, system)
    assert system.unconstrained() == d_in - 3
    torch.testing.assert_close(new @ rest, w0 @ rest, rtol=1e-9, atol=1e-9)
    tiny = 1e-9
    limit = _stacked_lstsq([(keys, mapped @ w0.T, 1.0), (torch.eye(d_in, dtype=D64), w0.T, tiny)], d_in)
    torch.testing.assert_close(new, limit, rtol=1e-5, atol=1e-5)


def test_fusion_of_two_loras_equals_a_direct_solve():
    gen = torch.Generator().manual_seed(3)
    d_in, d_out = 10, 6
    w0 = torch.randn(d_out, d_in, generator=gen, dtype=D64)
    w_cfr = w0 + 0.1 * torch.randn(d_out, d_in, generator=gen, dtype=D64)
    deltas = [torch.randn(d_out, 1, generator=gen, dtype=D64) @ torch.randn(1, d_in, generator=gen, dtype=D64)
              for _ in range(2)]
    contexts = [torch.randn(15, d_in, generator=gen, dtype=D64) for _ in range(2)]
    prior = torch.randn(25, d_in, generator=gen, dtype=D64)
    s, lamb = 0.2, 0.1
    grams = [Grams.of(c) for c in contexts]
    prior_gram = Grams.of(prior).scaled(s)
    fused = fusion(w_cfr, deltas, grams, w0, prior_gram, lamb, System.of([*grams, prior_gram], lamb))
    # the normal equations solved directly: W* (sum C_i^T C_i + s P^T P + lamb I) = sum W_i C_i^T C_i + ...
    lhs = sum(c.T @ c for c in contexts) + s * prior.T @ prior + lamb * torch.eye(d_in, dtype=D64)
    rhs = sum((w_cfr + d) @ c.T @ c for d, c in zip(deltas, contexts)) + s * w0 @ prior.T @ prior + lamb * w_cfr
    torch.testing.assert_close(fused, torch.linalg.solve(lhs, rhs.T).T, rtol=1e-9, atol=1e-9)
    rows = [(c, c @ (w_cfr + d).T, 1.0) for d, c in zip(deltas, contexts)]
    rows += [(prior, prior @ w0.T, s), (torch.eye(d_in, dtype=D64), w_cfr.T, lamb)]
    torch.testing.assert_close(fused, _stacked_lstsq(rows, d_in), rtol=1e-8, atol=1e-8)


def test_aligned_positions_follow_the_official_pairing():
    # [SoT] a b X [EoT] vs [SoT] a b Y Z [EoT]: prefix 0-2, suffix [EoT] (4 vs 5), padding cut from the longer one
    old, new = aligned_positions([1, 5, 6, 9, 2], [1, 5, 6, 7, 8, 2])
    assert old == [0, 1, 2, 4, *range(5, 76)] and new == [0, 1, 2, 5, *range(6, 77)]
    assert len(old) == len(new)
    # concept first: [SoT] X c d [EoT] vs [SoT] Y Z c d [EoT]
    old, new = aligned_positions([1, 9, 3, 4, 2], [1, 7, 8, 3, 4, 2])
    assert old[:4] == [0, 2, 3, 4] and new[:4] == [0, 3, 4, 5] and old[-1] == 75 and new[-1] == 76
    # the mapped prompt shorter: the erased prompt's padding is the longer one
    old, new = aligned_positions([1, 7, 8, 3, 2], [1, 9, 3, 2])
    assert old[:3] == [0, 3, 4] and new[:3] == [0, 2, 3] and old[-1] == 76 and new[-1] == 75


@torch.no_grad()
def test_stage1_fit_is_the_least_squares_solve_over_independently_built_rows(world, concept):
    """The refined weight of one layer against lstsq over rows built here by hand: 'an image of nude' and 'an image
    of clothed' share [SoT] an image of (0-3) and [EoT] (5), then the padding 6-76; all 77 states of each caption."""
    pipe = world.pipe
    tok = pipe.tokenizer
    assert len(tok("an image of nude").input_ids) == 6 and len(tok("an image of clothed").input_ids) == 6

    def states(text: str) -> torch.Tensor:
        ids = tok(text, padding="max_length", max_length=77, return_tensors="pt").input_ids
        return pipe.text_encoder(ids)[0][0].double()

    pairs = [("an image of nude", "an image of clothed"), ("a photo of nude", "a photo of clothed")]
    keep = [0, 1, 2, 3, *range(5, 77)]
    keys = torch.cat([states(o)[keep] for o, _ in pairs])
    mapped = torch.cat([states(n)[keep] for _, n in pairs])
    captions = ["a red circle", "a blue square on white"]
    prior = torch.cat([states(c) for c in captions])
    s = prior_scale(7e-7, len(captions), COCO_CAPTIONS)
    assert s == pytest.approx(7e-7 * COCO_CAPTIONS / 2)
    grams = mapping_grams(pipe, [o for o, _ in pairs], [n for _, n in pairs], D64)
    torch.testing.assert_close(grams.key, keys.T @ keys, rtol=1e-9, atol=1e-6)
    prior_gram = all_token_gram(pipe, captions, D64).scaled(s)
    name, layer = next(iter(kv_projections(pipe.unet).items()))
    w0 = layer.weight.double()
    system = System.of([grams, prior_gram], 0.0)
    new = refinement(w0, grams, prior_gram, 0.0, system)
    # the text states' layer norm leaves near-null directions (condition number ~1e14): both solves cut them, the
    # pseudo-inverse at eigenvalues < 1e-12 x the largest, the SVD at singular values < 1e-6 x the largest
    assert system.unconstrained() >= 1
    rows = [(keys, mapped @ w0.T, 1.0), (prior, prior @ w0.T, s)]
    direct = _stacked_lstsq(rows, w0.shape[1], anchor=w0, rcond=1e-6)
    torch.testing.assert_close(new, direct, rtol=1e-6, atol=1e-6 * float(w0.abs().max()))


def test_prior_scale_rescales_to_the_coco_sum_and_is_squared_only_under_parity():
    assert prior_scale(7e-7, COCO_CAPTIONS, COCO_CAPTIONS) == pytest.approx(7e-7)
    assert prior_scale(7e-7, 24, COCO_CAPTIONS) == pytest.approx(7e-7 * COCO_CAPTIONS / 24)
    assert prior_scale(7e-7, 24, COCO_CAPTIONS, twice=True) == pytest.approx(4.9e-13 * COCO_CAPTIONS / 24)
    assert prior_scale(0.5, 10, None) == 0.5 and prior_scale(0.5, 0, COCO_CAPTIONS) == 0.0
    assert "twice" in quirks(True)["stage1_prior"] and "once" in quirks(False)["stage1_prior"]


def test_loss_positions_are_the_concept_tokens_and_every_eot(world):
    tok = world.pipe.tokenizer
    positions = concept_positions(tok, "a photo of nude", "nude", use_pooler=True)
    ids = tok("a photo of nude", padding="max_length", max_length=77).input_ids
    assert ids[4] == tok.convert_tokens_to_ids("nude</w>")
    assert positions.nonzero().flatten().tolist() == [4, *range(5, 77)]  # nude, then [EoT] and its padding
    only_word = concept_positions(tok, "nude square and nude circle", "nude", use_pooler=False)
    assert only_word.nonzero().flatten().tolist() == [1, 4]
    two_tokens = concept_positions(tok, "a van gogh circle", "van gogh", use_pooler=False)
    assert two_tokens.sum() == len(tok("van gogh", add_special_tokens=False).input_ids)


def test_attention_map_loss_equals_a_hand_written_loop():
    gen = torch.Generator().manual_seed(4)
    batch, heads, side, tokens = 2, 3, 4, 77
    maps = [torch.rand(batch * heads, side * side, tokens, generator=gen),
            torch.rand(batch * heads, 4, tokens, generator=gen)]
    positions = torch.zeros(batch, tokens, dtype=torch.bool)
    positions[0, [2, 5, 6]] = True
    positions[1, [1, 7]] = True
    masks = torch.zeros(batch, 1, 8, 8)
    masks[0, :, :4, :] = 1  # top half
    masks[1, :, :, 4:] = 1  # right half
    expected_free, expected_masked = 0.0, 0.0
    for probs in maps:
        s = int(probs.shape[1] ** 0.5)
        square_free, square_masked = 0.0, 0.0
        for b in range(batch):
            for h in range(heads):
                for p in range(probs.shape[1]):
                    y, x = divmod(p, s)
                    inside = masks[b, 0, y * 8 // s, x * 8 // s] > 0.5
                    for k in positions[b].nonzero().flatten().tolist():
                        v = float(probs[b * heads + h, p, k]) ** 2
                        square_free += v
                        square_masked += v if inside else 0.0
        expected_free += square_free ** 0.5
        expected_masked += square_masked ** 0.5
    assert float(attention_map_loss(maps, positions)) == pytest.approx(expected_free, rel=1e-5)
    assert float(attention_map_loss(maps, positions, masks)) == pytest.approx(expected_masked, rel=1e-5)
    # one image and no mask: the official masked_select over the head-repeated positions
    one = [m[:heads] for m in maps]
    official = sum(m.masked_select(positions[:1, None, :].repeat(heads, 1, 1)).norm() for m in one)
    assert float(attention_map_loss(one, positions[:1])) == pytest.approx(float(official), rel=1e-6)


@torch.no_grad()
def test_recording_processor_keeps_the_unet_output_and_records_every_cross_attention(world):
    unet = world.pipe.unet
    copy_ = copy.deepcopy(unet).float()
    loras, recorder = attach_loras(copy_, rank=1)
    gen = torch.Generator().manual_seed(5)
    x, cond = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 77, 128, generator=gen)
    for lora in loras.values():
        lora.reset(gen)  # up = 0: no change yet
    t = torch.tensor([10, 500])
    torch.testing.assert_close(copy_(x, t, encoder_hidden_states=cond).sample,
                               unet(x, t, encoder_hidden_states=cond).sample, rtol=1e-4, atol=1e-5)
    n_attn2 = sum(name.endswith("attn2") for name, _ in unet.named_modules())
    assert len(recorder.maps) == n_attn2 and len(loras) == 2 * n_attn2
    assert all(m.shape[-1] == 77 and torch.allclose(m.sum(-1), torch.ones(())) for m in recorder.maps)


def test_only_the_rank_one_lora_trains(world):
    pipe = world.pipe
    unet = copy.deepcopy(pipe.unet).float().requires_grad_(False)
    loras, recorder = attach_loras(unet, rank=1)
    base_before = {n: v.clone() for n, v in unet.state_dict().items() if ".down" not in n and ".up" not in n}
    from diffusers import DDPMScheduler

    texts = ["a photo of nude", "an image of nude"]
    from crt.mace.closed_form import encode

    data = ConceptBatchData(mean=torch.randn(2, 4, 8, 8), std=torch.full((2, 4, 8, 8), 0.1), masks=None,
                            conds=encode(pipe, texts).float(),
                            positions=torch.stack([concept_positions(pipe.tokenizer, t, "nude", True) for t in texts]))
    history = train_lora(unet, loras, recorder, data, DDPMScheduler.from_config(pipe.scheduler.config),
                         LoRATraining(lr=1e-3, steps=3), torch.Generator().manual_seed(0))
    assert len(history) == 3 and all(h > 0 for h in history)
    after = unet.state_dict()
    assert all(torch.equal(v, after[n]) for n, v in base_before.items())  # the UNet under the LoRAs is frozen
    trained = [n for n, p in unet.named_parameters() if p.requires_grad]
    assert trained and all(n.endswith((".down", ".up")) for n in trained)
    moved = [lora for lora in loras.values() if lora.up.abs().sum() > 0]
    assert moved, "no LoRA moved"
    for lora in loras.values():
        assert lora.down.shape[0] == 1 and lora.up.shape[1] == 1
        assert int(torch.linalg.matrix_rank(lora.delta().detach())) <= 1


def test_world_masks_pick_the_predicate_colour():
    pixels = torch.zeros(1, 3, 4, 4)
    pixels[0, :, :2, :] = torch.tensor([250, 185, 150]).view(3, 1, 1) / 255  # skin on the top half
    pixels[0, :, 2:, :] = torch.tensor([220, 40, 40]).view(3, 1, 1) / 255  # red below
    masks = colour_masks(pixels, (250, 185, 150), 40.0)
    assert masks[0, 0, :2].eq(1).all() and masks[0, 0, 2:].eq(0).all()
    nude = ConceptSpec("n", "nude", "clothed", judge={"name": "world", "predicate": {"colour": "skin"}})
    got, source = concept_masks(pixels, "world", nude, 40.0, "object")
    assert torch.equal(got, masks) and "colour" in source
    shape = ConceptSpec("t", "triangle", "shape", judge={"name": "world", "predicate": {"shape": "triangle"}})
    assert concept_masks(pixels, "world", shape, 40.0, "object")[0] is None
    assert concept_masks(pixels, "world", nude, 40.0, "style")[0] is None
    assert concept_masks(pixels, "none", nude, 40.0, "object")[0] is None
    with pytest.raises(ValueError):
        concept_masks(pixels, "gsam", nude, 40.0, "object")


def test_data_choices_follow_the_official_code(concept):
    import random

    chosen = chosen_templates(None, "object", 30, 30, random.Random(0))
    assert sorted(chosen) == sorted(OBJECT_TEMPLATES[:30]) and OBJECT_TEMPLATES[30] not in chosen
    assert len(chosen_templates(None, "style", 30, 5, random.Random(0))) == 5
    assert concept_texts(None, None, concept) == [("nude", "clothed")]
    assert concept_texts(["nudity", "naked"], "a person wearing clothes", concept) == [
        ("nudity", "a person wearing clothes"), ("naked", "a person wearing clothes")]
    with pytest.raises(ValueError):
        concept_texts(["a", "b"], ["x"], concept)
    pixels = torch.ones(1, 3, 2, 2)
    assert to_model_pixels(pixels, False).eq(1).all()
    torch.testing.assert_close(to_model_pixels(pixels, True)[0, :, 0, 0],
                               (1 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225]))
    cfg = MACEConfig(prior_sets=["validation_acceptable", "finetune_acceptable"])
    captions, source = prior_captions(cfg, concept)
    assert source == "prompt set finetune_acceptable" and len(captions) == 3
    assert prior_captions(MACEConfig(prior_sets=["nothing"]), concept)[0] == []


FAST = {"max_train_steps": 2, "images_per_concept": 2, "aug_length": 3, "lr": 1e-3,
        "prior_sets": ["finetune_acceptable"]}


def test_fit_and_apply_change_only_the_attn2_kv_weights(tiny, concept):
    pipe = tiny.pipe
    before = state_snapshot(pipe.unet)
    text_before = state_snapshot(pipe.text_encoder)
    crt = MACE(**FAST, masks="world" if tiny.kind == "world" else "none")
    artifact = crt.fit(FitContext(pipe=pipe, concept=concept, settings=tiny.settings, generate=tiny.generate))
    assert not changed_keys(before, pipe.unet) and not changed_keys(text_before, pipe.text_encoder)
    layers = kv_projections(pipe.unet)
    assert set(artifact.tensors) == {f"{n}.weight" for n in layers}
    meta = artifact.meta
    assert meta["stage2"][0]["loss"]["steps"] == 2 and meta["stage2"][0]["max_delta_rank"] == 1
    assert meta["stage1"]["mapping_residual_sum"]["after"] < meta["stage1"]["mapping_residual_sum"]["before"]
    assert meta["prior"] == {"source": "prompt set finetune_acceptable", "captions": 3}

    defended = crt.apply(pipe, artifact)
    assert defended.exposes == OPEN_WEIGHTS and MACE.family is Family.WEIGHT_EDIT
    assert changed_keys(before, defended.pipe.unet) == set(artifact.tensors)
    assert defended.pipe.text_encoder is pipe.text_encoder
    images = tiny.generate([concept.prompt_set("target")[0]], pipe=defended.pipe)
    assert images[0].size == (tiny.size, tiny.size)


def test_yaml_defaults_are_the_official_explicit_config_and_parity_names_results():
    cfg = crt_yaml("mace")
    assert cfg["handler"] == "crt.mace.MACE"
    params = MACEConfig(**cfg["params"])
    assert (params.rank, params.lr, params.max_train_steps, params.batch_size, params.lamb) == (1, 1e-5, 120, 1, 0.0)
    assert params.train_preserve_scale == params.fuse_preserve_scale == 7e-7 and params.use_pooler
    assert (params.prompt_len, params.aug_length, params.seed, params.images_per_concept) == (30, 30, 2024, 8)
    assert params.prior_count == COCO_CAPTIONS and not params.parity
    MACEConfig(**(cfg["params"] | cfg["mini"]))  # every mini key is a param
    assert MACE(**cfg["params"]).name == "mace" and MACE(parity=True).name == "mace_parity"
    assert MACE.reconstruction and "Grounded-SAM" in MACE.reconstruction
