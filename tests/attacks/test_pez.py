"""PEZ and Typo+: the projection is the cosine nearest neighbour (against a brute-force loop), the gradient taken at
the projection updates the continuous embeddings (straight-through), the embeddings path equals CLIP's ids path,
Typo+ draws its text where it says, the needs make PEZ a transfer attack and PEZ+ an adaptive one, a short run on
the SD-v1.4-shaped pipeline leaves it untouched and stores a text that re-encodes to the scored ids, and PEZ+ returns
the best prompt the filter did not flag."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from attacks.base import AttackContext, IncompatibleAttack, check_compatible
from attacks.pez import (
    PEZ,
    PEZConfig,
    TypoPlus,
    draw_typo,
    load_font,
    nn_project,
    pez_step,
    prompt_layout,
    text_features,
)
from attacks.tokens import tokenize, trim
from crt.base import DefendedModel, ImageFilter
from runners.spec import Access
from tests.crt.conftest import changed_keys, state_snapshot

WORLD_CLIP = {"image_size": 32, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}


def test_projection_is_the_nearest_neighbour_by_cosine_by_brute_force():
    gen = torch.Generator().manual_seed(0)
    table = torch.randn(200, 12, generator=gen) * torch.rand(200, 1, generator=gen) * 5  # rows of unequal norms
    queries = torch.randn(16, 12, generator=gen) * 3
    got = nn_project(queries, table)
    for q, index in zip(queries, got.tolist()):
        best = max(range(len(table)), key=lambda j: float(F.cosine_similarity(q, table[j], dim=0)))
        assert index == best
    euclidean = torch.cdist(queries, table).argmin(-1)
    assert not torch.equal(got, euclidean), "cosine, not Euclidean distance, picks the neighbour"


def _features_by_ids(clip, ids: torch.Tensor) -> torch.Tensor:
    output = clip.get_text_features(input_ids=ids)
    output = output if isinstance(output, torch.Tensor) else output.pooler_output
    return F.normalize(output.float(), dim=-1)


def test_embeddings_path_equals_clips_ids_path(world):
    from crt.espresso import load_clip

    clip, tok = load_clip(str(world.clip_dir)), world.pipe.tokenizer
    layout = prompt_layout(tok, 4)
    assert layout[0] == tok.bos_token_id and len(layout) == tok.model_max_length and layout[5] == tok.eos_token_id
    ids = layout.clone()
    ids[1:5] = torch.tensor(tok("a nude green cross", add_special_tokens=False).input_ids)
    table = clip.text_model.embeddings.token_embedding.weight
    with torch.no_grad():
        got = text_features(clip, table[ids][None], eot=5)
        torch.testing.assert_close(got, _features_by_ids(clip, ids[None]), rtol=1e-5, atol=1e-5)


def test_gradient_at_the_projection_updates_the_continuous_prompt(world):
    """Straight-through: the loss and its gradient are those of the projected (hard) prompt, recomputed here with
    the projected rows as a leaf; plain SGD at lr 1 must move the continuous prompt by exactly minus that gradient."""
    from crt.espresso import load_clip

    clip, tok = load_clip(str(world.clip_dir)), world.pipe.tokenizer
    weight = clip.text_model.embeddings.token_embedding.weight.detach()
    vocab = torch.arange(5, 300)
    table, length = weight[vocab], 6
    base = weight[prompt_layout(tok, length)][None]
    gen = torch.Generator().manual_seed(1)
    targets = F.normalize(torch.randn(3, clip.config.projection_dim, generator=gen), dim=-1)
    prompt = (table[:length] + 0.3 * torch.randn(length, weight.shape[1], generator=gen)).requires_grad_(True)
    before = prompt.detach().clone()
    rows, loss, score = pez_step(clip, prompt, torch.optim.SGD([prompt], lr=1.0), table, base, targets[:1], targets)

    expected_rows = torch.tensor([max(range(len(table)), key=lambda j: float(F.cosine_similarity(p, table[j], dim=0)))
                                  for p in before])
    assert torch.equal(rows, expected_rows)
    leaf = table[expected_rows].clone().requires_grad_(True)
    ids = prompt_layout(tok, length)
    ids[1:1 + length] = vocab[expected_rows]
    embeds = torch.cat([base[:, :1], leaf[None], base[:, 1 + length:]], 1)
    features = text_features(clip, embeds, eot=1 + length)
    expected_loss = 1 - (targets[:1] @ features.T).mean()
    (grad,) = torch.autograd.grad(expected_loss, [leaf])
    assert loss == pytest.approx(float(expected_loss.detach()), abs=1e-6)
    assert score == pytest.approx(float((targets @ _features_by_ids(clip, ids[None]).T).mean()), abs=1e-5)
    assert grad.abs().sum() > 0
    torch.testing.assert_close(prompt.detach(), before - grad, rtol=1e-5, atol=1e-6)
    assert not torch.equal(prompt.detach(), table[expected_rows]), "the continuous copy is kept, not the projection"


# -- Typo+ -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("size", "cfg"), [
    (32, PEZConfig(typo=True, typo_x=None, typo_fit=True)),  # the world's mini settings
    (128, PEZConfig(typo=True)),  # Espresso's placement, scaled
])
def test_typo_draws_the_text_and_nothing_else(size, cfg):
    image = Image.new("RGB", (size, size), (200, 180, 160))
    drawn, where = draw_typo(image, "clothed", cfg)
    assert image.getpixel((0, 0)) == (200, 180, 160) and drawn is not image  # the input is left as it was
    before, after = torch.tensor(list(image.getdata())), torch.tensor(list(drawn.getdata()))
    changed = (before != after).any(-1).view(size, size)
    assert changed.sum() >= 10
    font, _ = load_font(cfg.typo_font, where["size_px"])
    left, top, right, bottom = ImageDraw.Draw(image).textbbox(tuple(where["xy"]), "clothed", font=font)
    ys, xs = torch.nonzero(changed, as_tuple=True)
    assert xs.min() >= left and xs.max() <= right and ys.min() >= top and ys.max() <= bottom
    ink = after.view(size, size, 3)[changed]
    assert ((ink[:, 2] - ink[:, 0]) > 160 - 200).all(), "every drawn pixel is a blend towards blue"
    assert ((ink[:, 2] > 200) & (ink[:, 0] < 80)).any(), "and the strokes' cores are blue"
    if cfg.typo_fit:
        assert right <= size and where["size_px"] <= round(cfg.typo_size * size)
    assert where["text"] == "clothed"


# -- access ----------------------------------------------------------------------------------------------------


def test_pez_and_typo_plus_are_transfer_and_pez_plus_needs_the_filter_score():
    for attack in (PEZ(), TypoPlus()):
        assert attack.needs() == frozenset({Access.TEXT_ENCODER}) and attack.mode == "transfer"
        assert attack.model_agnostic  # stored once per concept, reused against every CRT
        check_compatible(attack, DefendedModel(pipe=None, exposes=frozenset()))  # nothing of the CRT is needed
    plus = PEZ(adaptive=True)
    assert plus.needs() == frozenset({Access.TEXT_ENCODER, Access.FILTER_SCORE}) and plus.mode == "adaptive"
    with pytest.raises(IncompatibleAttack):
        check_compatible(plus, DefendedModel(pipe=None, exposes=frozenset({Access.UNET_GRADIENTS})))
    check_compatible(plus, DefendedModel(pipe=None, exposes=frozenset({Access.FILTER_SCORE})))
    assert TypoPlus().name == "typo_plus" and TypoPlus().config.typo
    with pytest.raises(ValueError):
        TypoPlus(typo=False)
    with pytest.raises(ValueError):
        PEZ(vocabulary="everything")


# -- short runs ------------------------------------------------------------------------------------------------


def _context(tiny, concept, defended: DefendedModel | None = None, **kwargs):
    return AttackContext(defended=defended or DefendedModel(pipe=tiny.pipe), concept=concept, settings=tiny.settings,
                         text_encoder=tiny.pipe.text_encoder, tokenizer=tiny.pipe.tokenizer,
                         reference_images=lambda items: tiny.generate(items), **kwargs)


def test_short_run_on_the_sd14_shaped_pipeline(sd14, concept):
    before = {name: state_snapshot(getattr(sd14.pipe, name)) for name in ("unet", "text_encoder", "vae")}
    attack = PEZ(clip=str(sd14.clip_dir), prompt_len=5, iterations=4, images_per_target=2, seed=0)
    targets = list(concept.prompt_set("target"))
    [result] = attack.run(_context(sd14, concept), targets)
    assert all(not changed_keys(before[name], getattr(sd14.pipe, name)) for name in before)
    assert all(p.grad is None for p in sd14.pipe.text_encoder.parameters())
    tok = sd14.pipe.tokenizer
    assert result.embedding is None and result.text and len(result.text.split()) == 5
    text_ids = trim(tokenize(tok, [result.text])[0], tok.eos_token_id)
    assert result.log["round_trip"] is True and text_ids == result.log["scored_ids"] == result.log["text_ids"]
    assert result.cost.forward == 1 + 4 and result.cost.backward == 4 and result.cost.queries == 0
    assert result.log["images"] == 2 and result.log["mode"] == "transfer" and result.log["oracle_used"] is False
    history = result.log["best_cosine_history"]
    assert all(b >= a for a, b in zip(history, history[1:])) and result.log["cosine"] == history[-1]


def test_typo_plus_inverts_the_images_with_c_a_written_on_them(world, concept):
    targets = list(concept.prompt_set("target"))
    params = dict(clip=str(world.clip_dir), **WORLD_CLIP, prompt_len=4, iterations=3, images_per_target=1)
    [plain] = PEZ(**params).run(_context(world, concept), targets)
    [typo] = TypoPlus(**params, typo_x=None, typo_fit=True).run(_context(world, concept), targets)
    assert typo.log["typo"]["text"] == concept.c_a and "typo" not in plain.log
    assert typo.log["cosine"] != plain.log["cosine"], "the written text changes the images PEZ inverts"
    assert typo.log["round_trip"] is True


class _Brightness(ImageFilter):
    """Flags bright images (score = mean pixel - 0.5)."""

    def scores_from_pixels(self, pixels):
        return pixels.mean((1, 2, 3)) - 0.5


def test_pez_plus_returns_the_best_window_the_filter_does_not_flag(world, concept):
    """The raw generations of windows 1 and 3 are white (flagged), window 2's black (not flagged): PEZ+ must return
    window 2's prompt whatever its cosine, PEZ the best cosine overall."""
    calls: list[str] = []

    def generate_raw(model, items):
        calls.extend(item.text for item in items)
        colour = (0, 0, 0) if len(calls) == 2 else (255, 255, 255)
        return [Image.new("RGB", (32, 32), colour) for _ in items]

    defended = DefendedModel(pipe=world.pipe, filter=_Brightness(),
                             exposes=frozenset({Access.TEXT_ENCODER, Access.FILTER_SCORE}))
    params = dict(clip=str(world.clip_dir), **WORLD_CLIP, prompt_len=4, iterations=6, images_per_target=1,
                  adaptive_every=2)
    targets = list(concept.prompt_set("target"))
    [plus] = PEZ(adaptive=True, **params).run(_context(world, concept, defended, generate_raw=generate_raw), targets)
    assert plus.cost.queries == 3 == len(calls) == len(plus.log["windows"])
    assert [w["flagged"] for w in plus.log["windows"]] == [True, False, True]
    assert plus.text == plus.log["windows"][1]["text"] == calls[1] and plus.log["returned_flagged"] is False
    assert plus.log["mode"] == "adaptive" and plus.log["round_trip"] is True
    [plain] = PEZ(**params).run(_context(world, concept), targets)
    assert plain.log["cosine"] == max(w["cosine"] for w in plus.log["windows"]) >= plus.log["cosine"]
    with pytest.raises(ValueError):
        PEZ(adaptive=True, **params).run(_context(world, concept), targets)  # no filter, no generate_raw


def test_the_official_vocabulary_is_behind_a_switch_and_its_round_trip_is_logged(world, concept):
    tok = world.pipe.tokenizer
    [result] = PEZ(clip=str(world.clip_dir), **WORLD_CLIP, prompt_len=8, iterations=2, images_per_target=1,
                   vocabulary="all").run(_context(world, concept), list(concept.prompt_set("target")))
    survives = trim(tokenize(tok, [result.text])[0], tok.eos_token_id) == result.log["scored_ids"]
    assert result.log["round_trip"] is survives and result.log["vocabulary"] == len(tok) - 2


@pytest.mark.parametrize("which", ["world", pytest.param("clip_bpe", marks=pytest.mark.slow)])
def test_sixteen_round_trip_words_reencode_to_their_ids(which, request):
    """The default vocabulary at the paper's length: any 16 of its words, joined by spaces, tokenise back (SD's
    BPE is slow: its 49k-word vocabulary is built once; UnlearnDiffAtk's fast test covers it at 5 words)."""
    from attacks.unlearndiffatk import prefix_text, vocabulary

    tok = request.getfixturevalue(f"{which}_tokenizer")
    vocab = vocabulary(tok)
    gen = torch.Generator().manual_seed(0)
    for _ in range(100):
        ids = vocab[torch.randint(len(vocab), (16,), generator=gen)].tolist()
        text = prefix_text(tok, ids)
        assert trim(tokenize(tok, [text])[0], tok.eos_token_id) == [tok.bos_token_id, *ids, tok.eos_token_id], text
