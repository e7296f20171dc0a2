"""P-ESD / P-CA (reconstruction): the straight-through mask and the sparsity term by hand, the masked UNet against a
copy with the weights zeroed by hand, and one short fit + apply per eraser on the SD-v1.4-shaped pipeline."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from crt.base import OPEN_WEIGHTS, FitContext
from crt.ca import ca_loss
from crt.esd import ESDBatch, esd_loss
from crt.pruning import (
    MaskedEraser,
    ScoreMask,
    attach_masks,
    masked_modules,
    sparsity_term,
    straight_through,
)
from runners.spec import Family
from tests.crt.conftest import changed_keys, crt_yaml, state_snapshot


def _sigmoid_grad(s: float, temperature: float) -> float:
    sig = 1 / (1 + math.exp(-s / temperature))
    return sig * (1 - sig) / temperature


def test_straight_through_forward_is_exactly_the_hard_mask_and_backward_the_sigmoid_gradient():
    scores = torch.tensor([-1.5, -0.2, 0.3, 2.0, 1e-4], requires_grad=True)
    mask = straight_through(scores, temperature=0.5)
    assert torch.equal(mask, torch.tensor([0.0, 0.0, 1.0, 1.0, 1.0]))
    weights = torch.tensor([3.0, -1.0, 2.0, 0.5, 7.0])
    (mask * weights).sum().backward()
    expected = [w * _sigmoid_grad(s, 0.5) for w, s in zip(weights.tolist(), scores.tolist())]
    torch.testing.assert_close(scores.grad, torch.tensor(expected))


def test_sparsity_term_value_and_gradient_by_hand():
    a, b = ScoreMask(torch.Size([2, 2]), 1.0, 2.0), ScoreMask(torch.Size([3]), 1.0, 2.0)
    with torch.no_grad():
        a.scores.copy_(torch.tensor([[0.5, -1.0], [2.0, -0.1]]))
        b.scores.copy_(torch.tensor([-3.0, 0.2, 1.0]))
    term = sparsity_term([a, b], weight=0.7)
    assert term.item() == pytest.approx(0.7 * 3 / 7)  # 3 of 7 weights pruned
    term.backward()
    for mask in (a, b):  # d/ds [0.7 * mean(1 - m)] = -0.7 / 7 * sigma'(s / T) / T
        expected = [-0.7 / 7 * _sigmoid_grad(s, 2.0) for s in mask.scores.detach().flatten().tolist()]
        torch.testing.assert_close(mask.scores.grad.flatten(), torch.tensor(expected))


def test_a_parametrised_linear_uses_exactly_the_hard_masked_weight():
    torch.manual_seed(0)
    linear = nn.Linear(5, 3)
    weight = linear.weight.detach().clone()
    masks = attach_masks(nn.Sequential(linear), ["0"], init_score=1.0, temperature=1.0)
    mask = masks["0.weight"]
    with torch.no_grad():
        mask.scores.copy_(torch.randn(3, 5))
    kept = mask.kept()
    assert 0 < kept.sum() < kept.numel()
    assert torch.equal(linear.weight, weight * kept)
    x = torch.randn(4, 5)
    torch.testing.assert_close(linear(x), x @ (weight * kept).T + linear.bias, rtol=0, atol=1e-6)
    assert not linear.parametrizations.weight.original.requires_grad and mask.scores.requires_grad


def test_masked_unet_equals_a_copy_with_the_pruned_weights_zeroed(sd14):
    """The ESD and CA losses on the masked UNet are those on a plain copy whose pruned weights are set to 0."""
    base = sd14.pipe.unet
    masked = copy.deepcopy(base).float()
    masks = attach_masks(masked, ["ff.net.2", "attn2.to_k", "attn2.to_v"], init_score=1.0, temperature=1.0)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for mask in masks.values():
            mask.scores.copy_(torch.randn(mask.scores.shape, generator=gen))
    zeroed = copy.deepcopy(base).float()
    with torch.no_grad():
        for name, mask in masks.items():
            zeroed.get_parameter(name)[~mask.kept()] = 0.0
    size = base.config.sample_size
    text = torch.randn(2, 77, base.config.cross_attention_dim, generator=gen)
    x_t = torch.randn(1, 4, size, size, generator=gen)
    esd_batch = ESDBatch(x_t=x_t, t=torch.tensor([400]), cond=text[:1], uncond=text[1:])
    torch.testing.assert_close(esd_loss(masked, base, esd_batch, 2.0), esd_loss(zeroed, base, esd_batch, 2.0))
    from crt.ca import CABatch

    ca_batch = CABatch(x_t=x_t, t=torch.tensor([400]), target=torch.randn(x_t.shape, generator=gen),
                       target_cond=text[:1], anchor_cond=text[1:])
    torch.testing.assert_close(ca_loss(masked, ca_batch), ca_loss(zeroed, ca_batch))
    assert ca_loss(masked, ca_batch) != ca_loss(base, ca_batch)


@pytest.mark.parametrize("eraser", ["esd", "ca"])
def test_fit_and_apply_only_zero_masked_weights(sd14, concept, eraser):
    pipe = sd14.pipe
    before = state_snapshot(pipe.unet)
    params = ({"iterations": 2, "ddim_steps": 4} if eraser == "esd"
              else {"num_anchor_images": 3, "max_train_steps": 2, "batch_size": 2})
    # scores start near 0 and one Adam step of 0.5 moves each by about 0.5: the mask must move
    crt = MaskedEraser(eraser=eraser, eraser_params=params, init_score=0.05, lr=0.5)
    assert crt.name == f"p_{eraser}" and crt.reconstruction
    ctx = FitContext(pipe=pipe, concept=concept, settings=sd14.settings, generate=sd14.generate)
    artifact = crt.fit(ctx)
    masked = {f"{n}.weight" for n in masked_modules(pipe.unet, ["ff.net.2", "attn2.to_k", "attn2.to_v"])}
    assert set(artifact.tensors) == masked and all(k.dtype == torch.bool for k in artifact.tensors.values())
    assert not changed_keys(before, pipe.unet), "fit modified the base UNet"
    pruned = sum(int((~k).sum()) for k in artifact.tensors.values())
    total = sum(k.numel() for k in artifact.tensors.values())
    assert 0 < pruned < total
    assert artifact.meta["pruned_total"] == pytest.approx(pruned / total)
    assert artifact.meta["loss"]["eraser"]["steps"] == 2
    for name, kept in artifact.tensors.items():
        assert artifact.meta["pruned_per_layer"][name] == pytest.approx(float((~kept).float().mean()))

    defended = crt.apply(pipe, artifact)
    after = defended.pipe.unet.state_dict()
    changed = changed_keys(before, defended.pipe.unet)
    assert changed and changed <= masked
    for name in masked:
        kept = artifact.tensors[name]
        assert torch.equal(after[name][kept], before[name][kept])
        assert torch.all(after[name][~kept] == 0)
    assert not changed_keys(before, pipe.unet), "apply modified the base UNet"
    assert defended.exposes == OPEN_WEIGHTS
    assert MaskedEraser.family is Family.WEIGHT_EDIT and defended.crt_name == f"p_{eraser}"
    image = sd14.generate([concept.prompt_set("target")[0]], pipe=defended.pipe)[0]
    assert image.size == (sd14.size, sd14.size)


def test_eraser_params_are_checked_when_built():
    with pytest.raises(TypeError):
        MaskedEraser(eraser="esd", eraser_params={"no_such_param": 1})
    with pytest.raises(TypeError):
        MaskedEraser(eraser="ca", eraser_params={"iterations": 1})  # ESD's name, not CA's
    with pytest.raises(ValueError):
        MaskedEraser(eraser="uce")
    from crt.ca import CA
    from crt.esd import ESD

    assert MaskedEraser(eraser="esd").identity()["eraser_version"] == ESD.version
    assert MaskedEraser(eraser="ca").identity()["eraser_version"] == CA.version


@pytest.mark.parametrize("name", ["p_esd", "p_ca"])
def test_yaml_builds_the_variant(name):
    cfg = crt_yaml(name)
    crt = MaskedEraser(**cfg["params"])
    assert cfg["name"] == crt.name == name
    assert set(cfg["mini"]) <= set(cfg["params"])
    mini = MaskedEraser(**{**cfg["params"], **cfg["mini"]})
    assert mini.config.eraser == crt.config.eraser
