"""Forget-Me-Not: the attention re-steering loss on hand-built probabilities, the concept positions, the hooked maps
against a direct softmax(QK^T / sqrt d), the parity switches, and fit + apply on SD-shaped and world."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from crt.base import OPEN_WEIGHTS, FitContext
from crt.fmn import (
    FMN,
    AttentionMaps,
    FMNConfig,
    attention_sum_of_squares,
    concept_positions,
    cross_attention_layers,
    install_recorders,
    trainable_names,
)
from runners.spec import Family
from tests.crt.conftest import changed_keys, crt_yaml, state_snapshot


def test_loss_on_hand_built_attention_probabilities():
    # one example, 2 heads, 2 queries, 4 tokens; tokens 1 and 3 are the concept's
    probs = torch.tensor([[[0.1, 0.2, 0.3, 0.4], [0.5, 0.0, 0.5, 0.0]],
                          [[0.25, 0.25, 0.25, 0.25], [0.0, 0.6, 0.0, 0.4]]])
    positions = torch.tensor([[False, True, False, True]])
    selected = [0.2, 0.4, 0.0, 0.0, 0.25, 0.25, 0.6, 0.4]
    assert attention_sum_of_squares(probs, positions).item() == pytest.approx(sum(p * p for p in selected))
    maps = AttentionMaps(positions=positions)
    maps.record("layer_a", probs)
    maps.record("layer_b", probs[:, :1])  # a second layer: its first query only
    second = [0.2, 0.4, 0.25, 0.25]
    # the L2 norm (not squared, not averaged) of every selected probability of every layer
    assert maps.loss().item() == pytest.approx(math.sqrt(sum(p * p for p in selected + second)))
    # the official computation (masked_select over the batch-1 mask repeated per head, concatenated, .norm())
    official = torch.cat([p.masked_select(positions[:, None, :].repeat(2, 1, 1)).reshape(-1, 2)
                          for p in (probs, probs[:, :1])]).norm()
    assert maps.loss().item() == pytest.approx(official.item())


def test_each_example_of_a_batch_uses_its_own_mask():
    # batch 2 x 1 head (diffusers orders batch-major: row b * heads + h), 1 query, 3 tokens
    probs = torch.tensor([[[0.5, 0.3, 0.2]], [[0.1, 0.1, 0.8]]])
    positions = torch.tensor([[True, False, False], [False, False, True]])
    assert attention_sum_of_squares(probs, positions).item() == pytest.approx(0.5 ** 2 + 0.8 ** 2)
    heads = torch.tensor([[[0.5, 0.5]], [[0.9, 0.1]], [[0.3, 0.7]], [[0.2, 0.8]]])  # 2 examples x 2 heads
    masks = torch.tensor([[True, False], [False, True]])
    assert attention_sum_of_squares(heads, masks).item() == pytest.approx(0.5 ** 2 + 0.9 ** 2 + 0.7 ** 2 + 0.8 ** 2)


def test_concept_positions_on_the_world_tokenizer(world):
    tok = world.pipe.tokenizer
    prompt = "a photo of nude"
    ids = tok(prompt, padding="max_length", max_length=77).input_ids
    nude = tok("nude", add_special_tokens=False).input_ids
    first_eos = ids.index(tok.eos_token_id)
    concept_at = list(range(first_eos - len(nude), first_eos))
    assert ids[concept_at[0]:first_eos] == nude
    mask = concept_positions(tok, prompt, "nude")
    assert mask.shape == (77,) and mask.nonzero().flatten().tolist() == concept_at + [first_eos]
    assert concept_positions(tok, prompt, "nude", use_pooler=False).nonzero().flatten().tolist() == concept_at
    # the code's marking on an <|endoftext|>-padded tokenizer (SD v1.4's): the pooler and every padding position
    every = concept_positions(tok, prompt, "nude", every_eos=True)
    assert every.nonzero().flatten().tolist() == concept_at + list(range(first_eos, 77))
    # every occurrence of a (multi-token) concept
    twice = concept_positions(tok, "a nude circle and a nude square", "a nude", use_pooler=False)
    span = len(tok("a nude", add_special_tokens=False).input_ids)
    assert int(twice.sum()) == 2 * span


def _attn2_inputs(unet, layer: str, latents, t, cond):
    """The hidden states entering ``layer`` and the text states it attends to, caught by a forward pre-hook."""
    caught = {}

    def hook(module, args, kwargs):
        caught["hidden"] = args[0] if args else kwargs["hidden_states"]
        caught["context"] = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)

    handle = dict(unet.named_modules())[layer].register_forward_pre_hook(hook, with_kwargs=True)
    with torch.no_grad():
        unet(latents, t, encoder_hidden_states=cond)
    handle.remove()
    return caught["hidden"], caught["context"]


@pytest.mark.parametrize("which", [0, -1])
def test_hooked_maps_equal_a_direct_softmax_and_the_forward_is_unchanged(world, which):
    base = world.pipe.unet
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 8, 8, generator=gen)
    t = torch.tensor([300, 700])
    cond = world.pipe.encode_prompt(["a photo of nude", "a red circle"], "cpu", 1, False)[0]
    layer = cross_attention_layers(base)[which]
    hidden, context = _attn2_inputs(base, layer, latents, t, cond)
    module = dict(base.named_modules())[layer]
    heads = module.heads
    q, k = module.to_q(hidden), module.to_k(context)
    b, n, inner = q.shape
    d = inner // heads
    q = q.view(b, n, heads, d).transpose(1, 2)
    k = k.view(b, -1, heads, d).transpose(1, 2)
    direct = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)  # (b, heads, n, 77)

    hooked = copy.deepcopy(base)
    maps = AttentionMaps(keep=True)
    assert install_recorders(hooked, maps) == cross_attention_layers(base)
    with torch.no_grad():
        out = hooked(latents, t, encoder_hidden_states=cond).sample
        reference = base(latents, t, encoder_hidden_states=cond).sample
    recorded = maps.probs[layer].view(b, heads, n, -1)
    torch.testing.assert_close(recorded, direct, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out, reference, atol=1e-4, rtol=1e-4)
    assert len(maps.probs) == len(cross_attention_layers(base))


def _context(tiny, concept) -> FitContext:
    return FitContext(pipe=tiny.pipe, concept=concept, settings=tiny.settings, generate=tiny.generate)


@pytest.mark.parametrize("only_optimize_ca", [False, True])
def test_fit_and_apply_change_only_what_the_attention_maps_reach(tiny, concept, only_optimize_ca):
    pipe = tiny.pipe
    before = state_snapshot(pipe.unet)
    crt = FMN(max_train_steps=3, num_images=2, lr=1e-4, only_optimize_ca=only_optimize_ca)
    artifact = crt.fit(_context(tiny, concept))
    assert not changed_keys(before, pipe.unet), "fit modified the base UNet"
    declared = set(trainable_names(pipe.unet, only_optimize_ca))
    assert set(artifact.tensors) <= declared
    last = [n for n in cross_attention_layers(pipe.unet) if n.startswith("up_blocks.")][-1]  # the last one run
    # the last attn2's values/outputs and the output convolution are past every attention map: never trained
    assert not {f"{last}.to_v.weight", f"{last}.to_out.0.weight", "conv_out.weight"} & set(artifact.tensors)
    assert f"{last}.to_k.weight" in artifact.tensors and f"{last}.to_q.weight" in artifact.tensors
    if not only_optimize_ca:
        assert "conv_in.weight" in artifact.tensors and "time_embedding.linear_1.weight" in artifact.tensors
    assert artifact.meta["prompt"] == "a photo of nude" and artifact.meta["images"] == 2
    assert artifact.meta["loss"]["steps"] == 3

    defended = crt.apply(pipe, artifact)
    assert defended.pipe.unet is not pipe.unet and defended.pipe.vae is pipe.vae
    changed = changed_keys(before, defended.pipe.unet)
    assert changed and changed <= set(artifact.tensors)
    assert not changed_keys(before, pipe.unet), "apply modified the base UNet"
    kinds = {name: type(p) for name, p in pipe.unet.attn_processors.items()}
    assert {name: type(p) for name, p in defended.pipe.unet.attn_processors.items()} == kinds  # no recorder left
    assert defended.exposes == OPEN_WEIGHTS and defended.crt_name == "fmn" and FMN.family is Family.WEIGHT_EDIT
    image = tiny.generate([concept.prompt_set("target")[0]], pipe=defended.pipe)[0]
    assert image.size == (tiny.size, tiny.size)


def test_attention_onto_the_concept_goes_down_on_world(world, concept):
    """Trained, the world UNet attends less to "nude" on the training prompt (fresh noised images, fixed seed)."""
    crt = FMN(max_train_steps=20, num_images=4, lr=3e-4)
    ctx = _context(world, concept)
    artifact = crt.fit(ctx)
    defended = crt.apply(world.pipe, artifact).pipe
    data = crt.prepare(ctx)

    def attention(unet) -> float:
        hooked = copy.deepcopy(unet)
        maps = AttentionMaps(positions=data.positions.expand(4, -1))
        install_recorders(hooked, maps)
        gen = torch.Generator().manual_seed(1)
        x = data.mean + torch.randn(data.mean.shape, generator=gen)
        with torch.no_grad():
            hooked(x, torch.tensor([100, 300, 500, 800]), encoder_hidden_states=data.cond.expand(4, -1, -1))
        return maps.loss().item()

    assert attention(defended.unet) < 0.8 * attention(world.pipe.unet)


def test_gradient_clipping_parity_switch(world, concept, monkeypatch):
    calls = []
    real = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda *a, **k: calls.append(1) or real(*a, **k))
    FMN(max_train_steps=2, num_images=1).fit(_context(world, concept))
    assert len(calls) == 2
    calls.clear()
    artifact = FMN(max_train_steps=2, num_images=1, clip_full_unet=False).fit(_context(world, concept))
    assert not calls and artifact.meta["clipped"] is False  # the code: the full UNet trains unclipped
    FMN(max_train_steps=2, num_images=1, clip_full_unet=False, only_optimize_ca=True).fit(_context(world, concept))
    assert len(calls) == 2  # with only_optimize_ca the code clips


def test_a_killed_fit_resumes_to_the_same_artifact(world, concept, tmp_path, monkeypatch):
    import crt.fmn as module
    from tests.crt.test_resume import _assert_same, kill_and_resume

    def make(tiny):
        return FMN(max_train_steps=5, num_images=2, lr=1e-4)  # killed in the middle of the second epoch

    whole, resumed, steps = kill_and_resume(make, world, concept, tmp_path / "ckpt", 3, 3,
                                            (module.AttentionMaps, "loss"), monkeypatch)
    _assert_same(resumed, whole)
    assert steps == 2


def test_yaml_builds_the_official_defaults():
    cfg = crt_yaml("fmn")
    assert cfg["handler"] == "crt.fmn.FMN"
    official = FMN(**cfg["params"]).config
    assert official == FMNConfig(**cfg["params"])
    assert (official.max_train_steps, official.lr, official.only_optimize_ca, official.use_pooler,
            official.weight_decay, official.pooler_every_eos, official.clip_full_unet) == \
        (35, 2e-6, False, True, 1e-2, False, True)
    FMN(**{**cfg["params"], **cfg["mini"]})
    with pytest.raises(ValueError):
        FMN(concept_type="identity")
