"""UCE: the closed form is the least-squares solution, erased tokens land on the guide's outputs, nothing else moves."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from crt.base import OPEN_WEIGHTS, FitContext
from crt.uce import UCE, UCEConfig, erase_pairs, kv_projections, preserved_prompts, token_states, uce_closed_form
from runners.spec import Family
from tests.crt.conftest import changed_keys, crt_yaml, state_snapshot


@pytest.mark.parametrize(("n_erase", "n_keep"), [(1, 0), (3, 5), (4, 40)])
def test_closed_form_equals_the_stacked_least_squares_solution(n_erase, n_keep):
    gen = torch.Generator().manual_seed(n_erase + n_keep)
    d_in, d_out = 24, 16
    weight = torch.randn(d_out, d_in, generator=gen, dtype=torch.float64)
    c_e = torch.randn(n_erase, d_in, generator=gen, dtype=torch.float64)
    v_e = torch.randn(n_erase, d_out, generator=gen, dtype=torch.float64)
    c_p = torch.randn(n_keep, d_in, generator=gen, dtype=torch.float64)
    lamb, s_e, s_p = 0.5, 1.7, 0.3
    closed = uce_closed_form(weight, c_e, v_e, c_p, lamb, s_e, s_p)
    # min_W' lamb||W' - W||^2 + s_e||W' C_e^T - V_e^T||^2 + s_p||W' C_p^T - W C_p^T||^2, as rows of X W'^T = Y
    x = torch.cat([lamb ** 0.5 * torch.eye(d_in, dtype=torch.float64), s_e ** 0.5 * c_e, s_p ** 0.5 * c_p])
    y = torch.cat([lamb ** 0.5 * weight.T, s_e ** 0.5 * v_e, s_p ** 0.5 * c_p @ weight.T])
    direct = torch.linalg.lstsq(x, y).solution.T
    torch.testing.assert_close(closed, direct, rtol=1e-9, atol=1e-9)


def test_token_states_pick_the_last_word(world):
    _, idx = token_states(world.pipe, ["", "nude", "a nude circle"])
    assert idx == [0, 1, 3]
    keys, values = erase_pairs(world.pipe, ["a nude circle"], [""], "all")
    assert keys.shape == values.shape and keys.shape[0] == 77 - 3


def test_fit_maps_erased_keys_to_the_guide_outputs(tiny, concept):
    pipe = tiny.pipe
    before = state_snapshot(pipe.unet)
    crt = UCE(lamb=0.5)
    artifact = crt.fit(FitContext(pipe=pipe, concept=concept, settings=tiny.settings, generate=tiny.generate))
    layers = kv_projections(pipe.unet)
    assert len(layers) == 2 * sum(".attn2" in n and n.endswith("attn2") for n, _ in pipe.unet.named_modules())
    assert set(artifact.tensors) == {f"{n}.weight" for n in layers}
    assert not changed_keys(before, pipe.unet)

    defended = crt.apply(pipe, artifact)
    assert defended.exposes == OPEN_WEIGHTS
    assert UCE.family is Family.CLOSED_FORM_EDIT
    assert changed_keys(before, defended.pipe.unet) == set(artifact.tensors)
    key, guide = (t.double() for t in erase_pairs(pipe, ["nude"], [""], "last_word"))
    shrink = 0.5 / (0.5 + float(key.norm()) ** 2)  # Sherman-Morrison: the residual shrinks by lamb / (lamb + |c|^2)
    new_layers = kv_projections(defended.pipe.unet)
    for name, old in layers.items():
        w_old, w_new = old.weight.detach().double(), new_layers[name].weight.detach().double()
        before_res = (key @ w_old.T - guide @ w_old.T).norm()
        after_res = (key @ w_new.T - guide @ w_old.T).norm()
        assert float(after_res) == pytest.approx(shrink * float(before_res), rel=1e-3, abs=1e-5)
        assert float(after_res) < 0.05 * float(before_res)


def test_preserved_prompts_keep_their_outputs(world, concept):
    ctx = FitContext(pipe=world.pipe, concept=concept, settings=world.settings, generate=world.generate)
    preserve = ["circle", "square", "triangle"]
    plain = UCE().fit(ctx)
    kept = UCE(preserve=preserve, preserve_scale=10.0).fit(ctx)
    keys, _ = erase_pairs(world.pipe, preserve, preserve, "last_word")
    for name, layer in kv_projections(world.pipe.unet).items():
        w = layer.weight.detach()
        drift_plain = (keys @ plain.tensors[f"{name}.weight"].T - keys @ w.T).norm()
        drift_kept = (keys @ kept.tensors[f"{name}.weight"].T - keys @ w.T).norm()
        assert drift_kept < drift_plain
    assert kept.meta["preserve_tokens"] == 3 and UCE(tokens="all", preserve=preserve).fit(ctx).meta[
        "preserve_tokens"] == 3 * 77


def test_each_token_choice_has_its_own_name():
    assert UCE().name == "uce" and UCE(tokens="all").name == "uce_eot"


def _yaml_params(name: str) -> dict:
    """A UCE YAML's params, merged over its ``defaults`` (uce_eot extends uce) as Hydra composes them."""
    cfg = crt_yaml(name)
    params = {}
    for parent in cfg.get("defaults") or []:
        if parent != "_self_":
            params.update(_yaml_params(parent))
    return params | cfg["params"]


@torch.no_grad()
def _states(pipe, text: str) -> torch.Tensor:
    ids = pipe.tokenizer(text, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    return pipe.text_encoder(ids)[0][0].double()


@pytest.mark.parametrize("preserve", [[], ["circle", "square"]])
def test_uce_eot_is_the_old_code_least_squares_with_the_empty_prompt_preserved(world, concept, preserve):
    """Independent of crt.uce's token helpers: 'nude' is token 1, '' ends at 0, so the old code pairs nude[1:77] with
    ''[0:76]; it preserves '' and the list over all 77 tokens at max(0.1, 1 / (1 + len(list)))."""
    params = _yaml_params("uce_eot") | {"preserve": preserve}
    ctx = FitContext(pipe=world.pipe, concept=concept, settings=world.settings, generate=world.generate)
    artifact = UCE(**params).fit(ctx)
    assert concept.c_u == "nude" and world.pipe.tokenizer("nude").input_ids[1:-1] == [
        world.pipe.tokenizer.convert_tokens_to_ids("nude</w>")]
    c_e, c_g = _states(world.pipe, "nude")[1:77], _states(world.pipe, "")[0:76]
    c_p = torch.cat([_states(world.pipe, text) for text in ["", *preserve]])
    lamb, s_e, s_p = 0.5, 1.0, max(0.1, 1 / (1 + len(preserve)))
    assert artifact.meta["preserve"] == ["", *preserve] and artifact.meta["preserve_scale"] == pytest.approx(s_p)
    eye = torch.eye(c_e.shape[1], dtype=torch.float64)
    drift = {True: [], False: []}
    for name, layer in kv_projections(world.pipe.unet).items():
        w = layer.weight.detach().double()
        x = torch.cat([lamb ** 0.5 * eye, s_e ** 0.5 * c_e, s_p ** 0.5 * c_p])
        y = torch.cat([lamb ** 0.5 * w.T, s_e ** 0.5 * c_g @ w.T, s_p ** 0.5 * c_p @ w.T])
        direct = torch.linalg.lstsq(x, y).solution.T
        edited = artifact.tensors[f"{name}.weight"].double()
        torch.testing.assert_close(edited, direct, rtol=1e-4, atol=1e-5 * float(w.abs().max()))
        # the K/V of '' (the unconditional branch) barely move with the preservation, and more without it
        kv_empty = c_p[:77] @ w.T
        unpreserved = uce_closed_form(w, c_e, c_g @ w.T, c_p[77:], lamb, s_e, s_p)
        drift[True].append(float((c_p[:77] @ edited.T - kv_empty).norm() / kv_empty.norm()))
        drift[False].append(float((c_p[:77] @ unpreserved.T - kv_empty).norm() / kv_empty.norm()))
    assert sum(drift[True]) < 0.5 * sum(drift[False]), drift


def test_preserve_defaults_per_yaml():
    new, old = UCEConfig(**_yaml_params("uce")), UCEConfig(**_yaml_params("uce_eot"))
    assert preserved_prompts(new) == ([], 1.0)
    assert old.tokens == "all" and preserved_prompts(old) == ([""], 1.0)
    assert preserved_prompts(replace(old, preserve=["a", "b", "c"])) == (["", "a", "b", "c"], 0.25)
    assert preserved_prompts(replace(old, preserve=[str(i) for i in range(20)]))[1] == 0.1
    assert preserved_prompts(replace(new, preserve=["a"], preserve_scale=10.0)) == (["a"], 10.0)


def test_fit_and_apply_on_sd21_and_sdxl(other_backbone, concept):
    """The keys are the states cross-attention reads: 1024 wide on SD 2.1, both encoders (2048) on SDXL."""
    pipe = other_backbone.pipe
    before = state_snapshot(pipe.unet)
    artifact = UCE().fit(FitContext(pipe=pipe, concept=concept, settings=other_backbone.settings,
                                    generate=other_backbone.generate))
    assert set(artifact.tensors) == {f"{n}.weight" for n in kv_projections(pipe.unet)}
    assert artifact.meta["erase_residual_sum"]["after"] < artifact.meta["erase_residual_sum"]["before"]
    assert not changed_keys(before, pipe.unet)
    defended = UCE().apply(pipe, artifact)
    assert other_backbone.generate([concept.prompt_set("target")[0]], pipe=defended.pipe)[0].size == (64, 64)
