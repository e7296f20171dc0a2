"""UCE: the closed form is the least-squares solution, erased tokens land on the guide's outputs, nothing else moves."""

from __future__ import annotations

import pytest
import torch

from crt.base import FitContext
from crt.uce import UCE, erase_pairs, kv_projections, token_states, uce_closed_form
from runners.spec import Access, Family
from tests.crt.conftest import changed_keys, state_snapshot


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
    assert defended.exposes == {Access.TEXT_ENCODER, Access.UNET_GRADIENTS}
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
