"""CCE: the template layout puts the new token where ``{}`` stands, the single trainable row gets the gradient that
row gets in the official full-table training (checked on a text encoder with the token really added), a short run
on the SD-v1.4-shaped pipeline changes nothing of it and returns an embedding, never text, equal to the extended
text encoder's output, the token is learned once and shared, CCE+ adds the filter's score, and the needs are the
defended UNet's gradients (plus the filter's for CCE+)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from attacks.base import AttackContext, IncompatibleAttack, check_compatible
from attacks.cce import CCE, OBJECT_TEMPLATES, denoising_loss, initial_row, template_ids, token_embeds
from attacks.unlearndiffatk import encode_embeds
from crt.base import DefendedModel, ImageFilter
from crt.esd import ESD
from runners.spec import Access
from tests.crt.conftest import changed_keys, state_snapshot


def _extended(text_encoder, row: torch.Tensor):
    """An independent copy of the text encoder with the new token really added (the official route)."""
    te = copy.deepcopy(text_encoder)
    te.resize_token_embeddings(te.get_input_embeddings().weight.shape[0] + 1)
    with torch.no_grad():
        te.get_input_embeddings().weight[-1] = row
    return te


def test_template_ids_put_the_new_token_where_the_braces_are(world):
    tok = world.pipe.tokenizer
    new = len(tok)
    ids = template_ids(tok, "a photo of a {}", new)
    words = tok("a photo of a", add_special_tokens=False).input_ids
    assert ids[:len(words) + 3].tolist() == [tok.bos_token_id, *words, new, tok.eos_token_id]
    assert len(ids) == tok.model_max_length and (ids == new).sum() == 1
    assert template_ids(tok, "{} style", new)[:2].tolist() == [tok.bos_token_id, new]
    assert len(OBJECT_TEMPLATES) == 27 and all(t.count("{}") == 1 for t in OBJECT_TEMPLATES)
    with pytest.raises(ValueError):
        CCE(templates=["no placeholder"])


def test_the_single_row_gets_the_gradient_of_official_full_table_training(tiny):
    """Textual inversion on a text encoder extended by the token (the official route, every row trainable) and on
    the single row must agree: same output, same loss, and the new row's gradient is the single row's. The other
    rows of the template get gradients too, which is why the official code has to restore them after each step."""
    pipe = tiny.pipe
    from diffusers import DDPMScheduler

    schedule = DDPMScheduler.from_config(pipe.scheduler.config)
    table = pipe.text_encoder.get_input_embeddings().weight.detach()
    new_id = len(table)
    row = initial_row(pipe.text_encoder, pipe.tokenizer, "nude")[0].clone().requires_grad_(True)
    ids = torch.stack([template_ids(pipe.tokenizer, t, new_id) for t in ("a photo of a {}", "a good photo of the {}")])
    gen = torch.Generator().manual_seed(0)
    latent_size = pipe.unet.config.sample_size
    latents = torch.randn(2, 4, latent_size, latent_size, generator=gen)
    noise = torch.randn(latents.shape, generator=gen)
    t = torch.tensor([10, 700])
    loss, _, _ = denoising_loss(pipe, schedule, row, table, ids, new_id, latents, noise, t)
    (grad,) = torch.autograd.grad(loss, [row])

    te = _extended(pipe.text_encoder, row.detach())
    full = te.get_input_embeddings().weight
    full.requires_grad_(True)
    hidden = te(ids).last_hidden_state
    with torch.no_grad():
        torch.testing.assert_close(encode_embeds(pipe.text_encoder, token_embeds(table, row, ids, new_id)), hidden,
                                   rtol=1e-5, atol=1e-5)
    pred = pipe.unet(schedule.add_noise(latents, noise, t), t, encoder_hidden_states=hidden).sample
    reference = F.mse_loss(pred, noise)
    (full_grad,) = torch.autograd.grad(reference, [full])
    assert float(loss.detach()) == pytest.approx(float(reference.detach()), rel=1e-5)
    torch.testing.assert_close(grad, full_grad[new_id], rtol=1e-4, atol=1e-7)
    assert grad.abs().sum() > 0 and full_grad[ids[0, 1]].abs().sum() > 0
    assert all(p.grad is None for p in pipe.unet.parameters())


def _context(tiny, concept, defended: DefendedModel | None = None):
    generated = []

    def reference(items):
        generated.extend(items)
        return tiny.generate(items)

    ctx = AttackContext(defended=defended or DefendedModel(pipe=tiny.pipe, exposes=frozenset({Access.UNET_GRADIENTS})),
                        concept=concept, settings=tiny.settings, text_encoder=tiny.pipe.text_encoder,
                        tokenizer=tiny.pipe.tokenizer, reference_images=reference)
    return ctx, generated


SHORT = dict(steps=3, batch_size=2, grad_accum=2, num_train_images=3, train_set="finetune_unacceptable")


def test_short_run_on_the_sd14_shaped_pipeline_returns_embeddings_and_changes_nothing(sd14, concept):
    pipe = sd14.pipe
    before = {name: state_snapshot(getattr(pipe, name)) for name in ("unet", "text_encoder", "vae")}
    attack = CCE(**SHORT, templates=["a photo of a {}", "the photo of a {}"])
    ctx, generated = _context(sd14, concept)
    targets = list(concept.prompt_set("validation"))
    results = attack.run(ctx, targets)
    assert all(not changed_keys(before[name], getattr(pipe, name)) for name in before)
    assert all(p.grad is None for m in (pipe.unet, pipe.text_encoder) for p in m.parameters())
    assert [item.text for item in generated] == [p.text for p in concept.prompt_set("finetune_unacceptable")]
    width = pipe.text_encoder.config.hidden_size
    for result in results:
        assert result.text is None and result.embedding.shape == (77, width)  # an embedding, never text
        assert result.log["output"] == "embedding" and result.log["mode"] == "white-box"
    training = results[0].log["token_training"]
    assert training["row_moved"] > 0 and training["steps"] == 3 and len(training["loss_history"]) == 3
    assert results[0].log["training_charged_here"] and not results[1].log["training_charged_here"]
    assert results[0].cost.forward == 1 + 3 * 2 + 1 and results[0].cost.backward == 3 * 2
    assert results[1].cost.forward == 1 and results[1].cost.backward == 0 and results[1].cost.queries == 0

    # the output is the text encoder with the token added, run on the target's template
    learned = attack._tokens[next(iter(attack._tokens))].row
    te = _extended(pipe.text_encoder, learned)
    ids = template_ids(pipe.tokenizer, results[0].log["template"], len(pipe.tokenizer))
    with torch.no_grad():
        torch.testing.assert_close(results[0].embedding, te(ids[None]).last_hidden_state[0], rtol=1e-5, atol=1e-5)

    again = attack.run(ctx, targets[:1])  # a later chunk: the token is shared, not learned again
    assert len(generated) == 3 and not again[0].log["training_charged_here"]
    torch.testing.assert_close(again[0].embedding, results[0].embedding)


def test_a_multi_token_initializer_starts_from_the_mean(world):
    tok, te = world.pipe.tokenizer, world.pipe.text_encoder
    row, ids = initial_row(te, tok, "van gogh")
    table = te.get_input_embeddings().weight.detach()
    assert len(ids) == 2 and torch.allclose(row, table[ids].mean(0))


class _Brightness(ImageFilter):
    """A differentiable stand-in for a filter: flags bright images."""

    def scores_from_pixels(self, pixels):
        return pixels.mean((1, 2, 3)) + 0.5  # flags everything; positive, so the hinge passes it on


def test_cce_plus_adds_the_filter_score_of_the_predicted_image(world, concept):
    defended = DefendedModel(pipe=world.pipe, filter=_Brightness(),
                             exposes=frozenset({Access.UNET_GRADIENTS, Access.FILTER_SCORE, Access.FILTER_GRADIENTS}))
    params = dict(SHORT, steps=1, grad_accum=1, adaptive_lambda=100.0)
    targets = list(concept.prompt_set("target"))
    [plus] = CCE(adaptive=True, **params).run(_context(world, concept, defended)[0], targets)
    [plain] = CCE(**params).run(_context(world, concept, defended)[0], targets)
    term = plus.log["token_training"]["filter_term_history"][0]
    assert term > 0 and plus.log["mode"] == "adaptive" and "filter_term_history" not in plain.log["token_training"]
    gap = plus.log["token_training"]["loss_history"][0] - plain.log["token_training"]["loss_history"][0]
    assert gap == pytest.approx(100.0 * term, rel=1e-4)
    with pytest.raises(ValueError):
        CCE(adaptive=True, **params).run(_context(world, concept)[0], targets)  # no filter


def test_needs_are_the_defended_unets_gradients_and_the_filters_for_cce_plus():
    cce = CCE()
    assert cce.needs() == frozenset({Access.UNET_GRADIENTS}) and cce.mode == "white-box" and not cce.model_agnostic
    assert cce.output == "embedding"
    check_compatible(cce, DefendedModel(pipe=None, exposes=ESD.exposes))  # an open-weights eraser
    with pytest.raises(IncompatibleAttack):
        check_compatible(cce, DefendedModel(pipe=None, exposes=frozenset({Access.TEXT_ENCODER})))  # a closed one
    plus = CCE(adaptive=True)
    assert plus.needs() == frozenset({Access.UNET_GRADIENTS, Access.FILTER_SCORE, Access.FILTER_GRADIENTS})
    assert plus.mode == "adaptive"
    with pytest.raises(IncompatibleAttack):
        check_compatible(plus, DefendedModel(pipe=None, exposes=frozenset({Access.UNET_GRADIENTS,
                                                                           Access.FILTER_SCORE})))


# -- SD 2.1 and SDXL ---------------------------------------------------------------------------------------------


def _extended_encoder(pipe, row: torch.Tensor):
    """The pipeline's conditioning encoder with the token really added to every text encoder (SDXL: each gets its
    part of the row), the official route, independent of the embeddings path."""
    from crt_bench.backbone import StackedTextEncoder, conditioning_encoder, encoder_parts, token_embedding_widths

    widths = list(token_embedding_widths(conditioning_encoder(pipe)))
    parts = [_extended(encoder, piece) for encoder, piece in zip(encoder_parts(conditioning_encoder(pipe)),
                                                                  row.split(widths))]
    if len(parts) == 1:
        return parts[0]
    return StackedTextEncoder(parts[0], parts[1], pipe.tokenizer_2.pad_token_id)


def test_short_run_on_sd21_and_sdxl_returns_the_backbones_conditioning(other_backbone, concept):
    """Against UCE on each backbone: the row moves by its gradient alone (no weight decay), the output is the
    (77, width) states and on SDXL the pooled embedding of the encoders with the token added, nothing changes."""
    from crt.base import FitContext
    from crt.uce import UCE
    from crt_bench.backbone import text_width

    pipe = other_backbone.pipe
    uce = UCE()
    defended = uce.apply(pipe, uce.fit(FitContext(pipe=pipe, concept=concept, settings=other_backbone.settings,
                                                  generate=other_backbone.generate)))
    watched = [(m, state_snapshot(m)) for m in (pipe.unet, pipe.text_encoder, defended.pipe.unet)]
    attack = CCE(**dict(SHORT, steps=1, grad_accum=1, weight_decay=0.0), templates=["a photo of a {}"])
    [result] = attack.run(_context(other_backbone, concept, defended)[0], list(concept.prompt_set("target")))
    training = result.log["token_training"]
    assert training["row_moved"] > 0 and training["new_token_id"] == len(pipe.tokenizer)
    assert result.text is None and result.embedding.shape == (77, text_width(pipe))
    token = attack._tokens[next(iter(attack._tokens))]
    encoder = _extended_encoder(pipe, token.row)
    ids = template_ids(pipe.tokenizer, "a photo of a {}", token.new_id)[None]
    with torch.no_grad():
        out = encoder(ids, output_hidden_states=True)
    torch.testing.assert_close(result.embedding, out.last_hidden_state[0], rtol=1e-4, atol=1e-4)
    if other_backbone.kind == "sdxl":
        assert result.pooled.shape == (pipe.text_encoder_2.config.projection_dim,)
        torch.testing.assert_close(result.pooled, out.pooler_output[0], rtol=1e-4, atol=1e-4)
    else:
        assert result.pooled is None
    for module, before in watched:
        assert not changed_keys(before, module)
    assert all(p.grad is None for m in (pipe.unet, pipe.text_encoder, defended.pipe.unet) for p in m.parameters())
