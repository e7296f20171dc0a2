"""TRCE: stage 1 is the weighted least-squares solution at the right [EoT] positions, the margin loss and the
official quirks behave as written, and a short fit of either variant changes only its declared parameters."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from crt.base import OPEN_WEIGHTS, FitContext
from crt.trce import TRCE, TRCEStage1, quirks
from crt.trce.stage1 import (
    Stage1Config,
    effective_preserve_weight,
    expand,
    first_eot_index,
    fit_stage1,
    keyword_indices,
    mapping_rows,
)
from crt.trce.stage2 import (
    Sample,
    Stage2Config,
    ddim_trajectory,
    make_plan,
    margin_loss,
    stage2_names,
    steer,
    stored_index,
)
from crt.uce import kv_projections
from runners.spec import Family
from tests.crt.conftest import OracleUNet, changed_keys, crt_yaml, ddim_scheduler, state_snapshot

SPLIT = "a snapshot of a nude circle"  # 'snapshot' is 5 BPE tokens of the world tokenizer (s n ap s hot)


@torch.no_grad()
def _states(pipe, text: str) -> tuple[torch.Tensor, list[int]]:
    ids = pipe.tokenizer(text, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    return pipe.text_encoder(ids)[0][0].double(), ids[0].tolist()


def test_first_eot_index_counts_bpe_tokens_and_words_under_parity(world):
    tok = world.pipe.tokenizer
    _, ids = _states(world.pipe, SPLIT)
    eot = ids.index(tok.eos_token_id)
    assert eot == 11 and len(SPLIT.split()) + 1 == 7  # 10 BPE tokens, 6 words
    assert first_eot_index(tok, SPLIT, parity=False) == eot
    assert first_eot_index(tok, SPLIT, parity=True) == 7 and ids[7] != tok.eos_token_id  # the official mis-index
    assert first_eot_index(tok, "a nude circle", parity=True) == first_eot_index(tok, "a nude circle", parity=False)
    assert keyword_indices(tok, SPLIT, "nude circle", parity=False) == [9, 10]
    assert tok.convert_ids_to_tokens([ids[9], ids[10]]) == ["nude</w>", "circle</w>"]
    assert keyword_indices(tok, SPLIT, "nude circle", parity=True) == [5, 6]
    # the keys stage 1 builds are the states at those positions
    states, _ = _states(world.pipe, SPLIT)
    safe, safe_ids = _states(world.pipe, "a snapshot of a clothed circle")
    items = expand([("a nude circle", "a clothed circle")], ["a snapshot of {}"])
    for parity, index in ((False, 11), (True, 7)):
        keys, inputs, weights, info = mapping_rows(world.pipe, items, [0, 1, 0, 0], parity)
        torch.testing.assert_close(keys.double(), states[index:index + 1], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(inputs.double(), safe[index:index + 1], rtol=1e-5, atol=1e-5)
        assert weights.tolist() == [1.0] and info["eot_index_differs_from_other_count"] == 1


def _direct_solution(pipe, cfg: Stage1Config, pairs, captions, w: torch.Tensor) -> torch.Tensor:
    """min (1/N) sum_rows wt ||W c - W_old g||^2 + q sum_caption_tokens ||W c - W_old c||^2 + lamb ||W - W_old||^2,
    rows built by hand from the EOS token ids ([SoT], first [EoT] and the last position) and solved by lstsq."""
    tok = pipe.tokenizer
    rows_x, rows_y = [], []
    n = len(pairs) * len(cfg.templates)
    for old, new in pairs:
        for template in cfg.templates:
            c, c_ids = _states(pipe, template.format(old))
            g, g_ids = _states(pipe, template.format(new))
            n_old = c_ids.index(tok.eos_token_id) - 1
            positions = [(0, 0, cfg.token_weights[0]),
                         (c_ids.index(tok.eos_token_id), g_ids.index(tok.eos_token_id), cfg.token_weights[1]),
                         (76, 76, cfg.token_weights[2] * (77 - n_old - 2))]
            for i, j, weight in positions:
                if weight:
                    rows_x.append((weight / n) ** 0.5 * c[i])
                    rows_y.append((weight / n) ** 0.5 * (g[j] @ w.T))
    q = effective_preserve_weight(cfg)
    kept = torch.cat([_states(pipe, text)[0] for text in captions])
    eye = torch.eye(w.shape[1], dtype=torch.float64)
    x = torch.cat([torch.stack(rows_x), q ** 0.5 * kept, cfg.lamb ** 0.5 * eye])
    y = torch.cat([torch.stack(rows_y), q ** 0.5 * kept @ w.T, cfg.lamb ** 0.5 * w.T])
    # solved for the change D = W - W_old, minimum-norm where the rows leave a direction free (the world encoder's
    # final layer norm leaves one): the limit lamb -> 0+ of the closed form
    change = torch.linalg.lstsq(x, y - x @ w.T, rcond=1e-6, driver="gelsd").solution.T
    return w + change


@pytest.mark.parametrize(("parity", "weights", "lamb"), [(False, [0, 1, 0, 0], 0.0), (True, [0, 1, 0, 0], 0.0),
                                                         (False, [0.5, 1, 0.2, 0], 0.3)])
def test_stage1_equals_a_direct_least_squares_solve(world, concept, parity, weights, lamb):
    cfg = Stage1Config(templates=["{}", "a photo of {}"], token_weights=weights, preserve_set="finetune_acceptable",
                       preserve_scale=30.0, lamb=lamb, parity=parity)
    tensors, meta = fit_stage1(world.pipe, concept, cfg)
    pairs = [(u.text, s.text) for u, s in zip(concept.prompts["finetune_unacceptable"],
                                              concept.prompts["finetune_acceptable"])]
    captions = [p.text for p in concept.prompts["finetune_acceptable"]]
    assert meta["expanded_pairs"] == 6 and meta["preserve_tokens"] == 3 * 77
    assert meta["preserve_weight"] == pytest.approx((30.0 ** 2 if parity else 30.0) / 3e4)
    layers = kv_projections(world.pipe.unet)
    assert set(tensors) == {f"{name}.weight" for name in layers}
    for name in list(layers)[:3]:
        w = layers[name].weight.detach().double()
        direct = _direct_solution(world.pipe, cfg, pairs, captions, w)
        torch.testing.assert_close(tensors[f"{name}.weight"].double(), direct, rtol=1e-4,
                                   atol=1e-4 * float(w.abs().max()))


def test_preservation_weight_is_scaled_twice_only_under_parity():
    cfg = Stage1Config(preserve_scale=0.01)
    assert effective_preserve_weight(cfg) == pytest.approx(0.01 / 3e4)
    assert effective_preserve_weight(replace(cfg, parity=True)) == pytest.approx(0.01 ** 2 / 3e4)


def test_margin_loss_hand_values():
    pred = torch.zeros(2, 1, 2, 2)
    prefer = torch.stack([torch.full((1, 2, 2), 1.0), torch.full((1, 2, 2), 2.0)])
    reject = torch.stack([torch.full((1, 2, 2), 2.0), torch.full((1, 2, 2), 1.0)])
    # sample 0: MSE to prefer 1, to reject 4 -> max(0, 1 - 4 + m) = 0; sample 1: 4 - 1 + 0.01 = 3.01, x beta 2
    loss = margin_loss(pred, prefer, reject, beta=2.0, margin=0.01)
    torch.testing.assert_close(loss, torch.tensor([0.0, 6.02]))
    # the margin alone is the loss when both targets are equally far
    torch.testing.assert_close(margin_loss(pred, prefer, prefer, beta=1.0, margin=0.01), torch.tensor([0.01, 0.01]))


class ToyUNet(nn.Module):
    """``eps(x, c) = a x + b c[:, 0, 0]`` with trainable a, b: enough for the loop's losses to have gradients."""

    def __init__(self, a: float = 1.0, b: float = 0.5):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(a))
        self.b = nn.Parameter(torch.tensor(b))

    def forward(self, sample, t, encoder_hidden_states):
        return SimpleNamespace(sample=self.a * sample + self.b * encoder_hidden_states[:, :1, :1, None])


def _toy_run(n_steps: int, parity: bool) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    x, text = torch.randn(1, 1, 2, 2, generator=gen), torch.randn(3, 4, 1, generator=gen)
    ft, ref, reg = ToyUNet(), ToyUNet(0.8, -0.3), ToyUNet(0.9, 0.1)
    sample = Sample(x, torch.tensor(10), text[0:1], text[1:2])
    optimizer = torch.optim.SGD(ft.parameters(), lr=0.0)  # lr 0: every step sees the same loss
    cfg = Stage2Config(margin=10.0, reg_scale=3.0)  # a margin that keeps the hinge active
    steer(ft, ref, reg, optimizer, text[2:3], [sample] * n_steps, [[Sample(x * 0.5, torch.tensor(5))]] * n_steps,
          cfg, parity)
    return {n: p.grad.clone() for n, p in ft.named_parameters()}


def test_gradients_accumulate_across_steps_only_under_parity():
    one = _toy_run(1, parity=False)
    assert all(float(g.abs()) > 0 for g in one.values())
    for n, g in _toy_run(3, parity=False).items():
        torch.testing.assert_close(g, one[n])
    for n, g in _toy_run(3, parity=True).items():
        torch.testing.assert_close(g, 3 * one[n])


def test_plan_follows_the_official_schedule():
    cfg = Stage2Config(ddim_steps=4, max_early_step=1, epochs=2, reg_batch=3, uncond_trajectories=5)
    for parity in (False, True):
        plan = make_plan(3, cfg, parity, torch.Generator().manual_seed(1))
        assert [i for i, _ in plan.neg] == [0, 1, 2, 0, 1, 2]
        assert all(0 <= s <= 1 for _, s in plan.neg)
        for k, batch in enumerate(plan.reg):
            i = k % 3
            kept = [(j, e) for j, e in enumerate(batch) if e is not None]
            assert all(e[0] == (i * 3 + j) % 5 and 0 <= e[1] < 4 for j, e in kept)
        if not parity:
            assert all(e is not None for batch in plan.reg for e in batch)
    plans = [make_plan(50, cfg, True, torch.Generator().manual_seed(2)) for _ in range(1)]
    assert any(e is None for batch in plans[0].reg for e in batch)  # randint(0, S): the step S is skipped


def test_default_pairs_each_latent_with_its_own_timestep():
    scheduler = ddim_scheduler(10)
    abar = scheduler.alphas_cumprod
    gen = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(1, 4, 4, 4, generator=gen), torch.randn(1, 4, 4, 4, generator=gen)
    t0 = int(scheduler.timesteps[0])
    start = abar[t0].sqrt() * x0 + (1 - abar[t0]).sqrt() * eps
    path = ddim_trajectory(OracleUNet(eps), scheduler, start, 5, torch.zeros(1, 77, 8), None, 0.0)
    for step in range(4):
        t = int(scheduler.timesteps[step])
        for parity, expected in ((False, t), (True, int(scheduler.timesteps[step + 1]))):
            x = path[stored_index(step, parity)]
            implied = float(torch.linalg.lstsq(torch.stack([x0.flatten(), eps.flatten()], 1),
                                               x.flatten()[:, None]).solution[0]) ** 2
            assert implied == pytest.approx(float(abar[expected]), abs=1e-4), (step, parity)


def _yaml(name: str) -> dict:
    """A CRT YAML merged over its ``defaults`` as Hydra composes it (trce extends trce_stage1)."""

    cfg = crt_yaml(name)
    merged: dict = {"params": {}, "mini": {}}
    for parent in cfg.get("defaults") or []:
        if parent != "_self_":
            parent_cfg = _yaml(parent)
            merged["params"] |= parent_cfg["params"]
            merged["mini"] |= parent_cfg["mini"]
    merged["params"] |= cfg.get("params") or {}
    merged["mini"] |= cfg.get("mini") or {}
    return merged | {k: v for k, v in cfg.items() if k not in ("params", "mini", "defaults")}


def test_yaml_defaults_are_the_official_settings_and_parity_labels_results():
    from runners.registry import build_crt

    stage1, both = _yaml("trce_stage1"), _yaml("trce")
    for cfg, cls, name in ((stage1, TRCEStage1, "trce_stage1"), (both, TRCE, "trce")):
        crt = build_crt(cfg)
        assert isinstance(crt, cls) and crt.name == name and crt.reconstruction
        assert crt.stage1.token_weights == [0.0, 1.0, 0.0, 0.0] and crt.stage1.preserve_scale == 0.01
        assert len(crt.stage1.templates) == 15 and crt.stage1.lamb == 0.0 and not crt.stage1.parity
        assert set(cfg["mini"]) <= set(cfg["params"])
        mini = build_crt(cfg, model="mini")  # the world budget, one for every world concept
        assert len(mini.stage1.templates) == 4 and mini.stage1.preserve_set == "finetune_acceptable"
        parity = build_crt(cfg | {"params": cfg["params"] | {"parity": True}})
        assert parity.name == f"{name}_parity" and parity.reconstruction is None
        assert parity.identity()["params"]["parity"] is True
    s2 = build_crt(both).stage2
    assert (s2.lr, s2.epochs, s2.guidance, s2.reg_scale, s2.beta, s2.margin, s2.max_early_step,
            s2.reg_batch) == (1e-6, 3, 15.0, 100.0, 1.0, 0.01, 25, 4)
    assert build_crt(both, model="mini").stage2.ddim_steps == 25
    assert quirks(True, True)["zero_grad"].endswith("(official)")
    with pytest.raises(TypeError):
        TRCE(epoch=3)


def test_stage1_keeps_the_old_weights_where_no_key_or_caption_reaches(sd14, concept):
    # 3 captions x 77 tokens and 3 keys cannot span SD's 768-wide text space: with lamb 0 (official) the system is
    # singular, and directions outside every key and caption state keep W_old
    tensors, meta = fit_stage1(sd14.pipe, concept, Stage1Config(templates=["{}"],
                                                                  preserve_set="finetune_acceptable"))
    assert meta["unconstrained_directions"] > 0
    states = torch.cat([_states(sd14.pipe, p.text)[0] for name in ("finetune_unacceptable", "finetune_acceptable")
                        for p in concept.prompts[name]])
    _, _, vh = torch.linalg.svd(states, full_matrices=True)
    free = vh[-5:]  # orthogonal to every state (rank <= 3 x 77 < 768)
    assert float((states @ free.T).abs().max()) < 1e-8
    for name, layer in list(kv_projections(sd14.pipe.unet).items())[:4]:
        w = layer.weight.detach().double()
        torch.testing.assert_close(free @ tensors[f"{name}.weight"].double().T, free @ w.T, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(tensors[f"{name}.weight"].double(), w)


def test_stage1_fit_and_apply_change_only_attn2_kv(sd14, concept):
    pipe = sd14.pipe
    before = state_snapshot(pipe.unet)
    crt = TRCEStage1(templates=["{}", "a photo of {}"], preserve_set="finetune_acceptable")
    artifact = crt.fit(FitContext(pipe=pipe, concept=concept, settings=sd14.settings, generate=sd14.generate))
    declared = {f"{name}.weight" for name in kv_projections(pipe.unet)}
    n_attn2 = sum(name.endswith(".attn2") for name, _ in pipe.unet.named_modules())
    assert set(artifact.tensors) == declared and len(declared) == 2 * n_attn2 > 0
    assert not changed_keys(before, pipe.unet), "fit modified the base UNet"
    assert artifact.meta["parity"] is False and artifact.meta["stage1"]["expanded_pairs"] == 6
    defended = crt.apply(pipe, artifact)
    assert changed_keys(before, defended.pipe.unet) == declared
    assert not changed_keys(before, pipe.unet), "apply modified the base UNet"
    assert defended.pipe.text_encoder is pipe.text_encoder and defended.exposes == OPEN_WEIGHTS
    assert TRCEStage1.family is Family.CLOSED_FORM_EDIT and defended.crt_name == "trce_stage1"


@pytest.mark.parametrize("parity", [False, True])
def test_trce_fit_and_apply_change_only_the_declared_parameters(sd14, concept, parity):
    pipe = sd14.pipe
    before = state_snapshot(pipe.unet)
    crt = TRCE(templates=["{}"], preserve_set="finetune_acceptable", trajectory_template="{}", seeds_per_prompt=1,
               uncond_trajectories=2, ddim_steps=4, max_early_step=1, epochs=1, reg_batch=2, lr=1e-3, parity=parity)
    artifact = crt.fit(FitContext(pipe=pipe, concept=concept, settings=sd14.settings, generate=sd14.generate))
    kv = {f"{name}.weight" for name in kv_projections(pipe.unet)}
    steered = set(stage2_names(pipe.unet))
    assert any(".attn1." in n for n in steered) and any(".attn2.to_q." in n for n in steered)
    assert set(artifact.tensors) == kv | steered
    assert not changed_keys(before, pipe.unet), "fit modified the base UNet"
    meta = artifact.meta
    assert meta["stage2"]["iterations"] == 3 and meta["parity"] is parity
    assert meta["stage1"]["edited_matrices"] == len(kv)
    assert meta["quirks"]["zero_grad"] == ("never, gradients accumulate (official)" if parity
                                           else "every step (corrected)")
    defended = crt.apply(pipe, artifact)
    changed = changed_keys(before, defended.pipe.unet)
    assert kv <= changed and changed <= kv | steered and changed & steered
    assert not changed_keys(before, pipe.unet), "apply modified the base UNet"
    assert defended.crt_name == ("trce_parity" if parity else "trce") and TRCE.family is Family.WEIGHT_EDIT
    image = sd14.generate([concept.prompt_set("target")[0]], pipe=defended.pipe)[0]
    assert image.size == (sd14.size, sd14.size)


def test_stage1_fit_and_apply_on_sd21_and_sdxl(other_backbone, concept):
    """The preservation cache and the keys have the width cross-attention reads (2048 on SDXL's two encoders)."""
    pipe = other_backbone.pipe
    before = state_snapshot(pipe.unet)
    crt = TRCEStage1(templates=["{}"], preserve_set="finetune_acceptable")
    artifact = crt.fit(FitContext(pipe=pipe, concept=concept, settings=other_backbone.settings,
                                  generate=other_backbone.generate))
    assert set(artifact.tensors) == {f"{name}.weight" for name in kv_projections(pipe.unet)}
    assert not changed_keys(before, pipe.unet)
    defended = crt.apply(pipe, artifact)
    assert other_backbone.generate([concept.prompt_set("target")[0]], pipe=defended.pipe)[0].size == (64, 64)
    assert "sdxl" not in TRCE.backbones
