"""RECE: the adversarial embedding solves its stated least-squares objective, an epoch sends it where the guide goes,
the validation rule keeps the lowest-rate epoch, and fit / apply touch only the K/V matrices."""

from __future__ import annotations

import pytest
import torch

from crt.base import OPEN_WEIGHTS, FitContext
from crt.rece import RECE, adversarial_embedding, select_epoch
from crt.uce import UCE, kv_projections, token_states
from runners.spec import Family
from tests.crt.conftest import changed_keys, crt_yaml, state_snapshot

D_IN = 12
SHAPES = (16, 20, 8)  # d_out of three K/V matrices; together taller than d_in, one alone is not


def _random(seed: int) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    current = [torch.randn(d, D_IN, generator=gen, dtype=torch.float64) for d in SHAPES]
    original = [w + 0.3 * torch.randn(w.shape, generator=gen, dtype=torch.float64) for w in current]
    target = torch.randn(5, D_IN, generator=gen, dtype=torch.float64)
    anchor = torch.randn(5, D_IN, generator=gen, dtype=torch.float64)
    return current, original, target, anchor


def _stacked_solution(blocks: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """argmin_c sum_b ||A_b c - y_b||^2 for every target row at once: lstsq of the stacked system (rows of c)."""
    a = torch.cat([block for block, _ in blocks])
    y = torch.cat([rhs for _, rhs in blocks])
    return torch.linalg.lstsq(a, y).solution.T


@pytest.mark.parametrize("r", [0.1, 1e-3])
def test_regzero_embedding_is_the_regularised_least_squares_solution(r):
    current, original, target, _ = _random(1)
    got = adversarial_embedding(current, original, target, r)
    # min_c sum_l ||W'_l c - W_l c_tgt||^2 + r ||c - 0||^2
    blocks = [(w_new, w_old @ target.T) for w_new, w_old in zip(current, original)]
    blocks.append((r ** 0.5 * torch.eye(D_IN, dtype=torch.float64), torch.zeros(D_IN, target.shape[0],
                                                                               dtype=torch.float64)))
    torch.testing.assert_close(got, _stacked_solution(blocks), rtol=1e-9, atol=1e-9)
    # and the normal equations of the stated closed form, solved directly
    gram = sum(w.T @ w for w in current) + r * torch.eye(D_IN, dtype=torch.float64)
    cross = sum(w_new.T @ w_old for w_new, w_old in zip(current, original))
    torch.testing.assert_close(got.T, torch.linalg.solve(gram, cross @ target.T), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize(("mode", "item"), [("close_standardreg", "1st"), ("close_surrogatereg", "1st"),
                                            ("close_surrogatereg", "2nd"), ("close_surrogatereg", "both")])
def test_the_other_modes_solve_their_objectives(mode, item):
    current, original, target, anchor = _random(2)
    r = 0.2
    blocks = [(w_new, w_old @ target.T) for w_new, w_old in zip(current, original)]
    eye = torch.eye(D_IN, dtype=torch.float64)
    if mode == "close_standardreg":  # + r ||c - a||^2
        blocks.append((r ** 0.5 * eye, r ** 0.5 * anchor.T))
    if mode == "close_surrogatereg" and item in ("1st", "both"):  # + r sum_l ||W'_l c - W'_l c_tgt||^2
        blocks += [(r ** 0.5 * w, r ** 0.5 * w @ target.T) for w in current]
    if mode == "close_surrogatereg" and item in ("2nd", "both"):  # + r ||c - c_tgt||^2
        blocks.append((r ** 0.5 * eye, r ** 0.5 * target.T))
    got = adversarial_embedding(current, original, target, r, mode, item, anchor=anchor)
    torch.testing.assert_close(got, _stacked_solution(blocks), rtol=1e-8, atol=1e-9)


def test_select_epoch_keeps_an_epoch_only_when_the_rate_drops():
    assert select_epoch([0.5, 0.3, 0.4, 0.2]) == 3
    assert select_epoch([0.5, 0.3, 0.3, 0.4]) == 1  # a tie is no drop
    assert select_epoch([0.2, 0.3, 0.5]) == 0  # nothing beats the start
    assert select_epoch([0.4]) == 0


def _ctx(tiny, concept, rate=None) -> FitContext:
    return FitContext(pipe=tiny.pipe, concept=concept, settings=tiny.settings, generate=tiny.generate,
                      validation_rate=rate)


@torch.no_grad()
def test_an_epoch_sends_the_adversarial_embedding_where_the_guide_goes(world, concept):
    """Independent of crt.rece's solver: the adversarial embedding of the UCE start by torch.linalg.solve, then the
    epoch's matrices by lstsq of the UCE step's stacked objective; afterwards c' lands on the guide's K/V."""
    pipe, lamb, s_e, s_p, r = world.pipe, 0.1, 1.0, 0.1, 0.1
    layers = kv_projections(pipe.unet)
    start = UCE(erase=["nude"], guide="", tokens="all", preserve_empty=True, preserve_scale=None).fit(
        _ctx(world, concept))
    w_start = [start.tensors[f"{n}.weight"].double() for n in layers]
    w_base = [layer.weight.double() for layer in layers.values()]
    nude, empty = (token_states(pipe, [t])[0][0].double() for t in ("nude", ""))
    gram = r * torch.eye(nude.shape[1], dtype=torch.float64) + sum(w.T @ w for w in w_start)
    adv = torch.linalg.solve(gram, sum(a.T @ b for a, b in zip(w_start, w_base)) @ nude.T).T  # (77, d)

    artifact = RECE(epochs=1, select="last").fit(_ctx(world, concept))
    assert artifact.meta["chosen_epoch"] == 1 and artifact.meta["select"] == "last"
    eye = torch.eye(nude.shape[1], dtype=torch.float64)
    gaps = [0.0, 0.0]
    for name, w, w_old in zip(layers, w_start, w_base):
        x = torch.cat([lamb ** 0.5 * eye, s_e ** 0.5 * adv, s_p ** 0.5 * empty])
        y = torch.cat([lamb ** 0.5 * w.T, s_e ** 0.5 * empty @ w.T, s_p ** 0.5 * empty @ w.T])
        direct = torch.linalg.lstsq(x, y).solution.T
        edited = artifact.tensors[f"{name}.weight"].double()
        torch.testing.assert_close(edited, direct, rtol=1e-4, atol=1e-5 * float(w.abs().max()))
        guide_kv = empty @ w.T
        before = (adv @ w.T - guide_kv).norm()
        after = (adv @ edited.T - guide_kv).norm()
        assert float(after) < 0.05 * float(before)
        gaps[0] += float((adv @ w.T - nude @ w_old.T).norm())
        gaps[1] += float((adv @ edited.T - nude @ w_old.T).norm())
    assert gaps[0] < gaps[1]  # over all matrices, c' made more of what the original made of "nude" before the edit
    epoch = artifact.meta["epochs"][0]
    assert epoch["adversarial_gap_before"] < epoch["adversarial_gap_after"] and epoch["guide_residual"] < 0.05


class HandRates:
    """A ``validation_rate`` that answers a hand-made sequence and records each candidate's K/V weights."""

    def __init__(self, rates: list[float], names: list[str]):
        self.rates, self.names, self.seen = list(rates), names, []

    def __call__(self, pipe) -> float:
        state = pipe.unet.state_dict()
        self.seen.append({n: state[n].detach().clone() for n in self.names})
        return self.rates[len(self.seen) - 1]


@pytest.mark.parametrize(("rates", "chosen"), [([0.5, 0.3, 0.4, 0.2], 3), ([0.5, 0.2, 0.3, 0.4], 1),
                                               ([0.1, 0.3, 0.2, 0.4], 0)])
def test_validation_selection_returns_the_lowest_rate_epoch(world, concept, rates, chosen):
    names = [f"{n}.weight" for n in kv_projections(world.pipe.unet)]
    before = state_snapshot(world.pipe.unet)
    oracle = HandRates(rates, names)
    artifact = RECE(epochs=3).fit(_ctx(world, concept, oracle))
    assert not changed_keys(before, world.pipe.unet)
    assert len(oracle.seen) == 4  # the start and three epochs
    assert artifact.meta["chosen_epoch"] == chosen and artifact.meta["select"] == "validation"
    assert [r["rate"] for r in artifact.meta["validation_rates"]] == rates
    for name in names:  # the artifact is the model that was rated at the chosen epoch
        torch.testing.assert_close(artifact.tensors[name], oracle.seen[chosen][name])
    last = RECE(epochs=chosen, select="last").fit(_ctx(world, concept))  # the same epoch, reached without rates
    for name in names:
        torch.testing.assert_close(artifact.tensors[name], last.tensors[name])


def test_validation_selection_without_a_rate_is_refused(world, concept):
    with pytest.raises(ValueError, match="select=last"):
        RECE().fit(_ctx(world, concept))
    assert RECE().uses_validation_rate and not RECE(select="last").uses_validation_rate
    with pytest.raises(ValueError, match="select"):
        RECE(select="best")
    with pytest.raises(ValueError, match="emb_computing"):
        RECE(emb_computing="gradient")


def test_fit_and_apply_edit_only_the_kv_matrices(tiny, concept):
    pipe = tiny.pipe
    before = state_snapshot(pipe.unet)
    crt = RECE(epochs=2, select="last")
    artifact = crt.fit(_ctx(tiny, concept))
    layers = kv_projections(pipe.unet)
    assert set(artifact.tensors) == {f"{n}.weight" for n in layers}
    assert not changed_keys(before, pipe.unet)
    defended = crt.apply(pipe, artifact)
    assert defended.exposes == OPEN_WEIGHTS and RECE.family is Family.CLOSED_FORM_EDIT
    assert changed_keys(before, defended.pipe.unet) == set(artifact.tensors)
    assert defended.pipe.text_encoder is pipe.text_encoder and defended.pipe.vae is pipe.vae
    assert [e["epoch"] for e in artifact.meta["epochs"]] == [1, 2]
    assert artifact.meta["start"]["uce"]["name"] == "uce_eot"
    # RECE goes beyond its UCE start: the epochs moved the matrices further
    start = UCE(**{"erase": ["nude"], "guide": [""], **RECE().config.start}).fit(_ctx(tiny, concept))
    assert any(not torch.allclose(artifact.tensors[n], start.tensors[n]) for n in artifact.tensors)
    image = tiny.generate(list(concept.prompts["target"]), defended.pipe)[0]
    assert image.size == (tiny.size, tiny.size)


def test_yaml_defaults_are_the_official_nudity_recipe():

    cfg = crt_yaml("rece")
    crt = RECE(**cfg["params"])
    c = crt.config
    assert (c.emb_computing, c.regular_scale, c.lamb, c.erase_scale, c.preserve_scale, c.epochs, c.select) == (
        "close_regzero", 0.1, 0.1, 1.0, 0.1, 3, "validation")
    assert c.start == {"tokens": "all", "preserve_empty": True, "preserve_scale": None, "lamb": 0.5,
                       "erase_scale": 1.0}
    assert set(cfg["mini"] or {}) <= set(cfg["params"])


def test_fit_and_apply_on_sd21_and_sdxl(other_backbone, concept):
    pipe = other_backbone.pipe
    before = state_snapshot(pipe.unet)
    crt = RECE(epochs=1, select="last")
    artifact = crt.fit(_ctx(other_backbone, concept))
    assert set(artifact.tensors) == {f"{n}.weight" for n in kv_projections(pipe.unet)}
    assert not changed_keys(before, pipe.unet)
    defended = crt.apply(pipe, artifact)
    assert other_backbone.generate(list(concept.prompts["target"])[:1], defended.pipe)[0].size == (64, 64)
