"""ConceptPrune: skilled-weight selection and activation norms against hand / brute-force computations; a fit on the
SD-v1.4-shaped pipeline zeroes exactly the masked ff.net.2 entries and nothing else."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from crt.base import OPEN_WEIGHTS, FitContext
from crt.conceptprune import (
    ActivationNorms,
    ConceptPrune,
    ConceptPruneConfig,
    ffn_out_layers,
    recording,
    skilled_weights,
    union_over_time,
)
from runners.spec import Family
from tests.crt.conftest import changed_keys, crt_yaml, state_snapshot


def test_skilled_weights_hand_values():
    abs_w = torch.tensor([[1.0, 2.0, 3.0, 0.5], [4.0, 1.0, 1.0, 1.0]])
    target, base = torch.tensor([1.0, 1.0, 1.0, 5.0]), torch.tensor([2.0, 0.5, 1.0, 1.0])
    # S^T = [[1, 2, 3, 2.5], [4, 1, 1, 5]], S^B = [[2, 1, 3, .5], [8, .5, 1, 1]]; k = int(0.5 * 4) = 2
    # row 0: top-2 {2, 3}; 3 > 3 fails, 2.5 > .5 holds. row 1: top-2 {3, 0}; 5 > 1 holds, 4 > 8 fails
    expected = torch.tensor([[False, False, False, True], [False, False, False, True]])
    assert torch.equal(skilled_weights(abs_w, target, base, 0.5), expected)
    # k = int(0.74 * 4) = 2 as the official int(); k = int(0.2 * 4) = 0 selects nothing
    assert torch.equal(skilled_weights(abs_w, target, base, 0.74), expected)
    assert not skilled_weights(abs_w, target, base, 0.2).any()
    # k = 4: every column with S^T > S^B
    all_cols = torch.tensor([[False, True, False, True], [False, True, False, True]])
    assert torch.equal(skilled_weights(abs_w, target, base, 1.0), all_cols)


def _brute_force(abs_w: np.ndarray, nt: np.ndarray, nb: np.ndarray, ratio: float, tau: int,
                 select_ratio: float) -> tuple[np.ndarray, list[int]]:
    """Row by row, column by column, with numpy's sort; the union as a count over timesteps."""
    d_out, d_in = abs_w.shape
    k = int(ratio * d_in)
    counts, per_step = np.zeros((d_out, d_in), dtype=int), []
    for t in range(tau):
        skilled = 0
        for i in range(d_out):
            s_t = [abs_w[i, j] * nt[t, j] for j in range(d_in)]
            s_b = [abs_w[i, j] * nb[t, j] for j in range(d_in)]
            for j in np.argsort(s_t)[::-1][:k]:
                if s_t[j] > s_b[j]:
                    counts[i, j] += 1
                    skilled += 1
        per_step.append(skilled)
    return counts > select_ratio * tau, per_step


@pytest.mark.parametrize(("ratio", "tau", "select_ratio"), [(0.1, 4, 0.0), (0.25, 3, 0.0), (0.3, 5, 0.5), (0.01, 2, 0)])
def test_union_over_time_matches_brute_force(ratio, tau, select_ratio):
    gen = torch.Generator().manual_seed(int(ratio * 100) + tau)
    abs_w = torch.randn(7, 40, generator=gen).abs()
    nt = torch.rand(tau + 2, 40, generator=gen) * 3  # more steps than tau: only the first tau count
    nb = torch.rand(tau + 2, 40, generator=gen) * 3
    mask, per_step = union_over_time(abs_w, nt, nb, ratio, tau, select_ratio)
    expected, expected_steps = _brute_force(abs_w.double().numpy(), nt.double().numpy(), nb.double().numpy(),
                                             ratio, tau, select_ratio)
    assert mask.dtype == torch.bool
    np.testing.assert_array_equal(mask.numpy(), expected)
    assert per_step == expected_steps
    if ratio == 0.01:
        assert not mask.any()  # k = int(0.4) = 0
    else:
        assert mask.any() and not mask.all()
        assert (mask.sum(1) <= int(ratio * 40) * tau).all()


class ToyUNet(nn.Module):
    """A 'UNet' with two hooked linears; one call = one step, inputs (batch, tokens, d_in)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(5, 3)
        self.b = nn.Linear(4, 2)

    def forward(self, xa: torch.Tensor, xb: torch.Tensor) -> None:
        self.a(xa)
        self.b(xb)


def _manual_norms(inputs: list[list[np.ndarray]], tau: int, normalize: bool, keep: slice) -> np.ndarray:
    """inputs[call batch][step] -> (tau, d_in): sqrt of the sum over all rows of the (normalised) squares."""
    d_in = inputs[0][0].shape[-1]
    out = np.zeros((tau, d_in))
    for steps in inputs:
        for t, x in enumerate(steps[:tau]):
            for row in x[keep].reshape(-1, d_in):
                r = row / np.sqrt((row ** 2).sum()) if normalize else row
                out[t] += r ** 2
    return np.sqrt(out)


@pytest.mark.parametrize(("count_uncond", "normalize"), [(True, True), (False, True), (True, False)])
def test_activation_norms_accumulate_as_a_manual_loop(count_uncond, normalize):
    gen = torch.Generator().manual_seed(0)
    unet, tau, steps = ToyUNet(), 3, 4  # two prompt batches of 4 calls each; the 4th call is past tau
    norms = ActivationNorms({"a": 5, "b": 4}, tau, count_uncond, normalize)
    seen: dict[str, list[list[np.ndarray]]] = {"a": [], "b": []}
    with recording(unet, {"a": unet.a, "b": unet.b}, norms), torch.no_grad():
        for batch in (2, 3):  # CFG batch = [uncond] * batch + [cond] * batch
            norms.start_prompts(cfg_doubled=True)
            seen["a"].append([])
            seen["b"].append([])
            for _ in range(steps):
                xa, xb = torch.randn(2 * batch, 6, 5, generator=gen), torch.randn(2 * batch, 2, 4, generator=gen)
                seen["a"][-1].append(xa.numpy())
                seen["b"][-1].append(xb.numpy())
                unet(xa, xb)
    assert not unet.a._forward_pre_hooks and not unet._forward_pre_hooks  # hooks removed
    got = norms.norms()
    for name, d_in in (("a", 5), ("b", 4)):
        keeps = [slice(None) if count_uncond else slice(len(s[0]) // 2, None) for s in seen[name]]
        manual = sum(_manual_norms([s], tau, normalize, keep) ** 2 for s, keep in zip(seen[name], keeps)) ** 0.5
        assert got[name].shape == (tau, d_in)
        np.testing.assert_allclose(got[name].numpy(), manual, rtol=1e-5)
    tokens = 6 * (2 + 3) * (2 if count_uncond else 1)
    assert norms.rows["a"] == [tokens] * tau
    if normalize:  # unit rows: the squared column norms sum to the number of rows
        np.testing.assert_allclose((got["a"] ** 2).sum(1).numpy(), [tokens] * tau, rtol=1e-5)


def test_fit_and_apply_zero_exactly_the_masked_ffn_weights(sd14, concept):
    pipe = sd14.pipe
    before = state_snapshot(pipe.unet)
    crt = ConceptPrune(skill_ratio=0.05, tau=2, steps=3, guidance=7.5, scheduler="pndm", batch_size=2)
    ctx = FitContext(pipe=pipe, concept=concept, settings=sd14.settings, generate=sd14.generate)
    artifact = crt.fit(ctx)
    layers = ffn_out_layers(pipe.unet)
    from diffusers.models.attention import BasicTransformerBlock

    blocks = [n for n, m in pipe.unet.named_modules() if isinstance(m, BasicTransformerBlock)]
    assert list(layers) == sorted(f"{n}.ff.net.2" for n in blocks) and len(layers) == 10
    assert set(artifact.tensors) == {f"{n}.weight" for n in layers}
    assert all(m.dtype == torch.bool and m.shape == layers[n[:-7]].weight.shape for n, m in artifact.tensors.items())
    assert not changed_keys(before, pipe.unet), "fit modified the base UNet"
    meta = artifact.meta
    pruned = sum(int(m.sum()) for m in artifact.tensors.values())
    assert 0 < pruned == meta["pruned_weights"]
    assert meta["pruned_fraction_unet"] == pytest.approx(pruned / sum(p.numel() for p in pipe.unet.parameters()))
    assert meta["pruned_fraction_ffn_out"] == pytest.approx(pruned / sum(m.weight.numel() for m in layers.values()))
    assert meta["target_prompts"] == [p.text for p in concept.prompt_set("finetune_unacceptable")]
    # the whole CFG batch is recorded: 3 prompts x 2 halves x 8x8 latent tokens at the first level
    first = meta["layers"]["down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2"]
    assert first["rows_target_step0"] == 3 * 2 * 64 and first["k"] == int(0.05 * 128)

    defended = crt.apply(pipe, artifact)
    assert defended.pipe is not pipe and defended.pipe.unet is not pipe.unet
    assert defended.pipe.text_encoder is pipe.text_encoder and defended.pipe.vae is pipe.vae
    masked = {n for n, m in artifact.tensors.items() if m.any()}
    assert changed_keys(before, defended.pipe.unet) == masked
    after = defended.pipe.unet.state_dict()
    for name, mask in artifact.tensors.items():
        assert (after[name][mask] == 0).all() and (before[name][mask] != 0).all()
        assert torch.equal(after[name][~mask], before[name][~mask])
    assert not changed_keys(before, pipe.unet), "apply modified the base UNet"
    assert defended.exposes == OPEN_WEIGHTS and defended.filter is None
    assert defended.crt_name == "conceptprune" and ConceptPrune.family is Family.WEIGHT_EDIT
    image = sd14.generate([concept.prompt_set("target")[0]], pipe=defended.pipe)[0]
    assert image.size == (sd14.size, sd14.size)


def test_stopping_after_tau_leaves_the_first_tau_norms_unchanged(world, concept):
    """The loop is cut after tau UNet calls; norms of those calls equal a longer run's, on the DDIM world sampler."""
    ctx = FitContext(pipe=world.pipe, concept=concept, settings=world.settings, generate=world.generate)
    texts = ["a nude circle", "a clothed blue triangle"]
    short = ConceptPrune(tau=2, steps=4, scheduler="ddim", count_uncond=False)
    longer = ConceptPrune(tau=4, steps=4, scheduler="ddim", count_uncond=False)
    a = short.activation_norms(ctx, texts, short.sampling(ctx))
    b = longer.activation_norms(ctx, texts, longer.sampling(ctx))
    for name, norms in a.norms().items():
        torch.testing.assert_close(norms, b.norms()[name][:2])
        assert not torch.equal(b.norms()[name][2], b.norms()[name][0])
    assert a.step == 1 and b.step == 3  # the last UNet call made: the loop stopped after tau = 2 calls
    assert a.rows[next(iter(a.rows))][0] == 2 * (world.size // 4) ** 2  # cond half only: 2 prompts x tokens
    with pytest.raises(ValueError, match="UNet calls"):
        too_long = ConceptPrune(tau=5, steps=4, scheduler="ddim")
        too_long.activation_norms(ctx, texts, too_long.sampling(ctx))


def test_yaml_params_are_the_config_and_mini_overrides_known_keys():

    cfg = crt_yaml("conceptprune")
    crt = ConceptPrune(**cfg["params"])
    assert (crt.config.skill_ratio, crt.config.tau, crt.config.select_ratio) == (0.01, 10, 0.0)
    assert (crt.config.steps, crt.config.guidance, crt.config.count_uncond) == (50, 7.5, True)
    assert set(cfg["mini"]) <= set(cfg["params"])
    ConceptPrune(**{**cfg["params"], **cfg["mini"]})
    assert ConceptPruneConfig().target_set == "finetune_unacceptable"
    with pytest.raises(ValueError):
        ConceptPrune(tau=0)


def test_fit_and_apply_on_sd21_and_sdxl(other_backbone, concept):
    """With the run's sampler (scheduler null): PNDM built from SDXL's Euler config takes PRK steps and fails."""
    pipe = other_backbone.pipe
    before = state_snapshot(pipe.unet)
    crt = ConceptPrune(skill_ratio=0.05, tau=2, steps=3, guidance=7.5, scheduler=None, batch_size=2)
    artifact = crt.fit(FitContext(pipe=pipe, concept=concept, settings=other_backbone.settings,
                                  generate=other_backbone.generate))
    assert set(artifact.tensors) == {f"{n}.weight" for n in ffn_out_layers(pipe.unet)}
    assert artifact.meta["pruned_weights"] > 0 and not changed_keys(before, pipe.unet)
    defended = crt.apply(pipe, artifact)
    assert changed_keys(before, defended.pipe.unet) == {n for n, m in artifact.tensors.items() if m.any()}
