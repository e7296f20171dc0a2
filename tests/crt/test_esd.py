"""ESD-x / ESD-u: noise levels of x_t and t agree, only the declared parameters change, the loss goes down."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from crt.base import OPEN_WEIGHTS, FitContext
from crt.esd import ESD, ESDBatch, ddpm_bin, esd_loss, esd_target, partial_ddim, target_formula, trainable_names
from runners.spec import Family
from tests.crt.conftest import OracleUNet, changed_keys, crt_yaml, ddim_scheduler, state_snapshot


@pytest.mark.parametrize("steps", [50, 25, 10, 7])
def test_ddpm_bin_contains_the_ddim_timestep_of_x_t(steps):
    scheduler = ddim_scheduler(steps)
    for k, t in enumerate(scheduler.timesteps.tolist()):
        lo, hi = ddpm_bin(scheduler, k)
        assert lo <= t < hi, (k, t, lo, hi)
        assert 0 <= lo < hi <= 1000
        if 1000 % steps == 0:  # the official bin
            assert (lo, hi) == (1000 * (steps - k - 1) // steps, 1000 * (steps - k) // steps)


@pytest.mark.parametrize("steps", [50, 10])
def test_x_t_after_k_ddim_steps_has_the_noise_level_of_its_ddpm_bin(steps):
    torch.manual_seed(0)
    scheduler = ddim_scheduler(steps)
    x0, eps = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    abar = scheduler.alphas_cumprod
    t0 = int(scheduler.timesteps[0])
    x_start = abar[t0].sqrt() * x0 + (1 - abar[t0]).sqrt() * eps
    text = torch.zeros(1, 77, 8)
    for k in [0, 1, steps // 2, steps - 1]:
        x_t = partial_ddim(OracleUNet(eps), scheduler, x_start, k, text, text, guidance=3.0)
        coef = torch.linalg.lstsq(torch.stack([x0.flatten(), eps.flatten()], 1), x_t.flatten()[:, None]).solution
        implied_abar = float(coef[0]) ** 2
        assert float(coef[0]) ** 2 + float(coef[1]) ** 2 == pytest.approx(1.0, abs=1e-4)
        lo, hi = ddpm_bin(scheduler, k)
        assert float(abar[hi - 1]) - 1e-5 <= implied_abar <= float(abar[lo]) + 1e-5, (k, implied_abar)


class AffineTextUNet(nn.Module):
    """``eps_0(x, c) = a(c) x + b(c)``, with a, b read from the text condition, so the test knows every eps_0."""

    def __init__(self):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, sample, t, encoder_hidden_states):
        a, b = (encoder_hidden_states[:, 0, i].view(-1, 1, 1, 1) for i in (0, 1))
        return SimpleNamespace(sample=a * sample + b)


def _text(a: float, b: float) -> torch.Tensor:
    text = torch.zeros(1, 77, 8)
    text[0, 0, :2] = torch.tensor([a, b])
    return text


def test_target_hand_values_push_by_one_delta_in_both_official_versions():
    # x = 2: eps_0(c) = 3 * 2 + 0.5 = 6.5, eps_0('') = 1 * 2 - 0.5 = 1.5, delta = 5
    x_t, t = torch.full((1, 4, 2, 2), 2.0), torch.tensor([500])
    cond, uncond = _text(3.0, 0.5), _text(1.0, -0.5)
    unet = AffineTextUNet()
    new = esd_target(unet, x_t, t, cond, uncond, eta=2.0)  # default: the new code, 6.5 - 2 * 5
    torch.testing.assert_close(new, torch.full_like(x_t, -3.5))  # not 1.5 - 2 * 5, a push of 2 delta
    old = esd_target(unet, x_t, t, cond, uncond, eta=1.0, target="old")  # the old code, 1.5 - 1 * 5
    torch.testing.assert_close(old, torch.full_like(x_t, -3.5))
    # each version's own eta is the default; an explicit eta is kept as given
    assert ESD(method="x").eta == 2.0 and ESD(method="u", target="old").eta == 1.0
    assert ESD(method="x", target="old", eta=3.0).eta == 3.0
    assert target_formula("new", 2.0)["push"] == target_formula("old", 1.0)["push"] == 1.0
    with pytest.raises(ValueError):
        ESD(method="x", target="paper")


@pytest.mark.parametrize("name", ["esd_x", "esd_u"])
def test_yaml_defaults_are_the_new_official_target(name):
    params = crt_yaml(name)["params"]
    crt = ESD(**params)
    assert (crt.config.target, crt.eta) == ("new", 2.0)


def test_trainable_names_follow_the_variant_definitions(world):
    unet = world.pipe.unet
    all_names = [n for n, _ in unet.named_parameters()]
    x = trainable_names(unet, "x")
    assert x and set(x) == {n for n in all_names if ".attn2." in n}
    u = set(trainable_names(unet, "u"))
    assert not any(".attn2." in n for n in u)
    assert {"conv_in.weight", "conv_out.weight", "time_embedding.linear_1.weight"} <= u
    assert any(".attn1.to_q." in n for n in u) and any(".ff." in n for n in u)
    assert not any("norm" in n for n in u)
    with pytest.raises(ValueError):
        ESD(method="xattn")


@torch.no_grad()
def _fixed_batch(pipe, seed: int = 0) -> ESDBatch:
    gen = torch.Generator().manual_seed(seed)
    size = pipe.unet.config.sample_size
    cond = pipe.encode_prompt(["a nude circle"], "cpu", 1, False)[0]
    uncond = pipe.encode_prompt([""], "cpu", 1, False)[0]
    return ESDBatch(x_t=torch.randn(1, 4, size, size, generator=gen), t=torch.tensor([500]), cond=cond, uncond=uncond)


@pytest.mark.parametrize(("method", "lr"), [("x", 1e-3), ("u", 1e-4)])
def test_loss_decreases_on_a_fixed_batch(world, method, lr):
    from crt.esd import ESDConfig, _trainable_copy

    frozen = world.pipe.unet
    unet, names = _trainable_copy(frozen, ESDConfig(method=method))
    optimizer = torch.optim.Adam([p for n, p in unet.named_parameters() if n in names], lr=lr)
    batch = _fixed_batch(world.pipe)
    losses = []
    for _ in range(6):
        loss = esd_loss(unet, frozen, batch, eta=2.0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0] and min(losses[1:]) < losses[0], losses
    assert all(p.grad is None for n, p in unet.named_parameters() if n not in names)


@pytest.mark.parametrize("method", ["x", "u"])
def test_fit_and_apply_change_only_the_declared_parameters(tiny, concept, method):
    pipe = tiny.pipe
    before = state_snapshot(pipe.unet)
    crt = ESD(method=method, iterations=2, ddim_steps=4, lr=1e-3)
    ctx = FitContext(pipe=pipe, concept=concept, settings=tiny.settings, generate=tiny.generate)
    artifact = crt.fit(ctx)
    declared = set(trainable_names(pipe.unet, method))
    assert set(artifact.tensors) == declared
    assert not changed_keys(before, pipe.unet), "fit modified the base UNet"
    assert artifact.meta["loss"]["steps"] == 2 and artifact.meta["concept_text"] == "nude"
    assert artifact.meta["target"] == {"target": "new", "eta": 2.0, "push": 1.0,
                                       "formula": "eps_0(x_t, c, t) - 2 * (eps_0(x_t, c, t) - eps_0(x_t, '', t))"}

    defended = crt.apply(pipe, artifact)
    assert defended.pipe is not pipe and defended.pipe.unet is not pipe.unet
    assert defended.pipe.text_encoder is pipe.text_encoder and defended.pipe.vae is pipe.vae
    changed = changed_keys(before, defended.pipe.unet)
    assert changed and changed <= declared
    assert not changed_keys(before, pipe.unet), "apply modified the base UNet"
    assert defended.exposes == OPEN_WEIGHTS
    assert defended.filter is None
    assert defended.crt_name == f"esd_{method}" and ESD.family is Family.WEIGHT_EDIT
    image = tiny.generate([concept.prompt_set("target")[0]], pipe=defended.pipe)[0]
    assert image.size == (tiny.size, tiny.size)


@pytest.mark.parametrize("method", ["x", "u"])
def test_fit_and_apply_on_sd21_and_sdxl(other_backbone, concept, method):
    """SDXL's UNet refuses a call without the pooled embedding and time ids: the fit must pass them."""
    pipe = other_backbone.pipe
    before = state_snapshot(pipe.unet)
    crt = ESD(method=method, iterations=1, ddim_steps=2, lr=1e-3)
    artifact = crt.fit(FitContext(pipe=pipe, concept=concept, settings=other_backbone.settings,
                                  generate=other_backbone.generate))
    assert set(artifact.tensors) == set(trainable_names(pipe.unet, method))
    assert not changed_keys(before, pipe.unet)
    defended = crt.apply(pipe, artifact)
    assert changed_keys(before, defended.pipe.unet) <= set(artifact.tensors)
    assert other_backbone.generate([concept.prompt_set("target")[0]], pipe=defended.pipe)[0].size == (64, 64)
    assert "sdxl" in ESD.backbones and "sd2" in ESD.backbones
