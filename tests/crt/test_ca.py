"""Concept Ablation: the two targets by hand (stop-gradient included), the data the batches are made of, the
parameter groups, and one short fit + apply on the SD-v1.4-shaped pipeline."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from crt.base import FitContext
from crt.ca import (
    CA,
    AnchorData,
    CABatch,
    CAConfig,
    anchor_items,
    ca_loss,
    ca_target,
    effective_lr,
    instance_mse,
    target_variants,
    trainable_names,
)
from runners.spec import PromptItem
from tests.crt.conftest import (
    AffineUNet,
    changed_keys,
    clean_latent,
    crt_yaml,
    fit_and_apply_edit,
    nearest,
    state_snapshot,
    text_condition,
)


def _batch(**extra) -> CABatch:
    # x = 1, c* = 3, c = 1: eps(c*) = 0.5 + 6 = 6.5, eps(c) = 0.5 + 2 = 2.5; noise 0.5; C = 2 channels, 2 x 2 latents
    return CABatch(x_t=torch.ones(1, 2, 2, 2), t=torch.tensor([10]), target=torch.full((1, 2, 2, 2), 0.5),
                   target_cond=text_condition(3.0), anchor_cond=text_condition(1.0), **extra)


def _grads(loss: torch.Tensor, unet: AffineUNet) -> tuple[float, float]:
    a, b = torch.autograd.grad(loss, [unet.a, unet.b])
    return float(a), float(b)


def test_model_based_target_is_the_current_model_with_the_anchor_prompt_without_gradient():
    unet = AffineUNet()
    target = ca_target(unet, _batch(), "model-based")
    torch.testing.assert_close(target, torch.full((1, 2, 2, 2), 2.5))
    assert not target.requires_grad
    loss = ca_loss(unet, _batch(), "model-based")
    # per example: sum over 8 latents of (6.5 - 2.5)^2 = 128, over 4 positions = 32 (C x the per-element mean)
    assert loss.item() == pytest.approx(32.0)
    # stop-gradient: d/da = sum 2 * 4 * x / 4 = 16, d/db = sum 2 * 4 * c* / 4 = 48; a gradient through the target
    # would give d/da = 0 (a x cancels) and d/db = sum 2 * 4 * (c* - c) / 4 = 32
    assert _grads(loss, unet) == pytest.approx((16.0, 48.0))
    pred = unet(torch.ones(1, 2, 2, 2), None, text_condition(3.0)).sample
    through = (pred - unet(torch.ones(1, 2, 2, 2), None, text_condition(1.0)).sample).pow(2).sum() / 4
    assert _grads(through, unet) == pytest.approx((0.0, 32.0))


def test_noise_based_target_is_the_noise():
    unet = AffineUNet()
    assert torch.equal(ca_target(unet, _batch(), "noise-based"), _batch().target)
    loss = ca_loss(unet, _batch(), "noise-based")
    assert loss.item() == pytest.approx(2 * (6.5 - 0.5) ** 2)  # 8 x 36 / 4
    assert _grads(loss, unet) == pytest.approx((8 * 2 * 6 * 1 / 4, 8 * 2 * 6 * 3 / 4))
    with pytest.raises(ValueError):
        ca_target(unet, _batch(), "kl")


@pytest.mark.parametrize(("loss_type", "instance"), [("model-based", 32.0), ("noise-based", 72.0)])
def test_prior_preservation_adds_the_weighted_per_element_mse_to_the_noise(loss_type, instance):
    unet = AffineUNet()
    # prior: x' = 2, c' = 1 -> eps = 1 + 2 = 3 against noise 1: per-element mean 4, weight 0.5 -> 2
    batch = _batch(prior_x_t=torch.full((1, 2, 2, 2), 2.0), prior_t=torch.tensor([20]),
                   prior_target=torch.ones(1, 2, 2, 2), prior_cond=text_condition(1.0))
    assert ca_loss(unet, batch, loss_type, prior_loss_weight=0.5).item() == pytest.approx(instance + 2.0)


def test_instance_reduction_and_border_mask_follow_the_official_code():
    pred, target = torch.zeros(2, 4, 4, 4), torch.zeros(2, 4, 4, 4)
    target[0] = 1.0  # example 0: error 1 everywhere; example 1: error 0
    assert float(instance_mse(pred, target)) == pytest.approx((4 * 16 / 16 + 0) / 2)
    target[0, :, 0, :] = 5.0  # border errors are not counted under the official mask
    from crt.ca import border_mask

    mask = border_mask(pred.shape)
    assert mask.shape == (2, 1, 4, 4) and float(mask.sum()) == 2 * 4
    assert float(instance_mse(pred, target, mask)) == pytest.approx((4 * 4 / 4 + 0) / 2)


def test_effective_lr_makes_the_official_scale_lr_explicit():
    assert effective_lr(CAConfig()) == pytest.approx(2e-6 * 4)  # 1 GPU, batch 4
    assert effective_lr(CAConfig(with_prior_preservation=True, lr=4e-6)) == pytest.approx(4e-6 * 4 * 2)
    assert effective_lr(CAConfig(num_processes=2)) == pytest.approx(2e-6 * 4 * 2)
    assert effective_lr(CAConfig(scale_lr=False, lr=1e-5)) == 1e-5


def test_target_prompts_built_as_the_official_code():
    assert target_variants("a photo of a cat on a mat", "cat+grumpy cat", "object") == \
        [("a photo of a grumpy cat on a mat", 1.0)]
    style = target_variants("painting of a house", "van gogh", "style")
    assert [text for text, _ in style] == ["painting of a house, in the style of van gogh",
                                           "in van gogh's style, painting of a house"]
    assert sum(p for _, p in style) == pytest.approx(1.0) and style[0][1] == pytest.approx(1 / 3)
    with pytest.raises(ValueError):
        target_variants("a cat", "grumpy cat", "object")


def test_anchor_images_cycle_over_the_prompts_with_distinct_seeds():
    anchors = [PromptItem("a", seed=10), PromptItem("b", seed=11), PromptItem("c", seed=12)]
    items = anchor_items(anchors, 7)
    assert [i.text for i in items] == ["a", "b", "c", "a", "b", "c", "a"]
    assert [i.seed for i in items] == [10, 11, 12, 13, 14, 15, 16]


def test_pairs_by_index_and_their_length_check(sd14, concept):
    ctx = FitContext(pipe=sd14.pipe, concept=concept, settings=sd14.settings, generate=sd14.generate)
    from crt.ca import prompt_pairs

    anchors, variants = prompt_pairs(CAConfig(), ctx)
    assert [a.text for a in anchors] == [i.text for i in concept.prompt_set("finetune_acceptable")]
    assert [v[0][0] for v in variants] == [i.text for i in concept.prompt_set("finetune_unacceptable")]
    with pytest.raises(ValueError, match="by index"):
        prompt_pairs(CAConfig(target_set="target"), ctx)


def test_batches_noise_the_sampled_latents_and_pick_each_images_prompts(sd14):
    """With a zero posterior std and no flip, ``x_t = sqrt(abar_t) mean + sqrt(1 - abar_t) eps`` exactly, with the
    eps the batch names as its noise target; the conditions are those of the image's prompt pair."""
    crt = CA(batch_size=3, hflip=False, with_prior_preservation=True, num_anchor_images=5)
    mean = torch.randn(2, 5, 4, 2, 2)
    anchor_cond = torch.arange(2.0).view(2, 1, 1).expand(2, 77, 8).clone()
    data = AnchorData(mean=mean, std=torch.zeros_like(mean), anchor_cond=anchor_cond,
                      target_conds=[anchor_cond[i:i + 1] + 10 for i in range(2)],
                      target_probs=[torch.ones(1), torch.ones(1)], prompt_of_image=[0, 1, 0, 1, 0], pairs=[])
    ctx = SimpleNamespace(pipe=sd14.pipe)
    batches = crt.batches(ctx, data, torch.Generator().manual_seed(0))
    for _ in range(4):  # past one epoch of 5 images (batches of 3 and 2)
        batch = next(batches)
        x0 = clean_latent(sd14.pipe.scheduler.alphas_cumprod, batch.x_t, batch.t, batch.target)
        image = nearest(mean[0], x0)
        torch.testing.assert_close(x0, mean[0, image], atol=1e-4, rtol=1e-4)
        prompts = [data.prompt_of_image[i] for i in image]
        assert batch.anchor_cond[:, 0, 0].tolist() == prompts
        assert batch.target_cond[:, 0, 0].tolist() == [p + 10.0 for p in prompts]
        assert batch.prior_x_t.shape == batch.x_t.shape and batch.prior_cond.shape == batch.anchor_cond.shape
        assert batch.t.min() >= 0 and batch.t.max() < 1000


@pytest.mark.parametrize("group", ["cross-attn", "attn", "full-weight"])
def test_parameter_groups_follow_the_official_names(sd14, group):
    unet = sd14.pipe.unet
    names = [n for n, _ in unet.named_parameters()]
    chosen = trainable_names(unet, group)
    if group == "cross-attn":
        assert chosen and all(n.endswith(("attn2.to_k.weight", "attn2.to_v.weight")) for n in chosen)
        assert len(chosen) == 2 * sum(1 for n in names if n.endswith("attn2.to_q.weight"))
    elif group == "attn":
        parts = {n.split(".attn")[1].split(".", 1)[1] for n in chosen}
        assert parts == {"to_q.weight", "to_k.weight", "to_v.weight", "to_out.0.weight", "to_out.0.bias"}
        assert any(".attn1." in n for n in chosen) and any(".attn2." in n for n in chosen)
    else:
        assert chosen == names
    with pytest.raises(ValueError):
        CA(parameter_group="embedding")


@pytest.mark.parametrize("loss_type", ["model-based", "noise-based"])
def test_fit_and_apply_change_only_the_parameter_group(sd14, concept, loss_type):
    crt = CA(loss_type=loss_type, num_anchor_images=4, max_train_steps=2, batch_size=2, lr=1e-3, scale_lr=False,
             with_prior_preservation=loss_type == "model-based")
    assert crt.name == ("ca" if loss_type == "model-based" else "ca_noise")
    artifact, _ = fit_and_apply_edit(crt, sd14, concept, set(trainable_names(sd14.pipe.unet, "cross-attn")))
    assert artifact.meta["loss"]["steps"] == 2 and artifact.meta["anchor_images"] == 4
    assert artifact.meta["pairs_head"][0] == ["a clothed circle", "a nude circle"]


def test_yaml_defaults_build_both_variants():
    ca_cfg, noise_cfg = crt_yaml("ca"), crt_yaml("ca_noise")
    assert noise_cfg["defaults"] == ["ca", "_self_"]
    model_based = CA(**ca_cfg["params"])
    noise_based = CA(**{**ca_cfg["params"], **noise_cfg["params"]})
    assert (ca_cfg["name"], model_based.name, model_based.config) == ("ca", "ca", CAConfig())
    assert (noise_cfg["name"], noise_based.name, noise_based.config.loss_type) == ("ca_noise", "ca_noise",
                                                                                   "noise-based")
    assert set(ca_cfg["mini"]) <= set(ca_cfg["params"])


def test_fit_and_apply_on_sd21_and_sdxl(other_backbone, concept):
    """Batches of conditions keep SDXL's pooled embedding with its prompt (stacked, concatenated with the prior)."""
    pipe = other_backbone.pipe
    before = state_snapshot(pipe.unet)
    crt = CA(num_anchor_images=2, max_train_steps=1, batch_size=2, lr=1e-3, scale_lr=False,
             with_prior_preservation=True)
    artifact = crt.fit(FitContext(pipe=pipe, concept=concept, settings=other_backbone.settings,
                                  generate=other_backbone.generate))
    assert set(artifact.tensors) == set(trainable_names(pipe.unet, "cross-attn"))
    assert not changed_keys(before, pipe.unet)
    defended = crt.apply(pipe, artifact)
    assert other_backbone.generate([concept.prompt_set("target")[0]], pipe=defended.pipe)[0].size == (64, 64)
