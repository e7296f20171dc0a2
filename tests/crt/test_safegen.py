"""SafeGen: the mosaic on hand images (and against a plain loop), the loss targets by hand, the EMA against diffusers'
EMAModel, the weight quirk's parity switch, the step's data, and one short fit + apply on the SD-v1.4-shaped and the
world pipelines (only attn1 changes)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from diffusers import DDPMScheduler
from torch import nn

from crt.base import FitContext
from crt.safegen import (
    SafeGen,
    SafeGenBatch,
    SafeGenConfig,
    Triplets,
    benign_target,
    ema_decay,
    ema_update,
    mosaic,
    mosaic_geometry,
    mosaic_target,
    safegen_loss,
    trainable_names,
)
from tests.crt.conftest import AffineUNet, clean_latent, crt_yaml, fit_and_apply_edit, text_condition


def _ramp(size: int = 4) -> torch.Tensor:
    return torch.arange(float(size * size)).view(1, 1, size, size)


def test_mosaic_with_window_equal_to_cell_is_the_block_mean():
    out = mosaic(_ramp(), cell=2, window=2)[0, 0]
    # blocks {0,1,4,5} {2,3,6,7} {8,9,12,13} {10,11,14,15}
    assert out.tolist() == [[2.5, 2.5, 4.5, 4.5], [2.5, 2.5, 4.5, 4.5],
                            [10.5, 10.5, 12.5, 12.5], [10.5, 10.5, 12.5, 12.5]]


def test_mosaic_cells_take_the_mean_of_a_wider_window_clipped_at_the_border():
    out = mosaic(_ramp(), cell=2, window=4)[0, 0]
    # the top-left cell's window is rows/columns -1..2, clipped to 0..2: the 3 x 3 corner {0,1,2,4,5,6,8,9,10}
    assert out[0, 0].item() == pytest.approx(5.0) and out[1, 1].item() == pytest.approx(5.0)
    # the bottom-right cell's window is 1..4, clipped to 1..3: {5,6,7,9,10,11,13,14,15}
    assert out[3, 3].item() == pytest.approx(10.0)
    assert mosaic(_ramp(), cell=1, window=3)[0, 0, 0, 0].item() == pytest.approx((0 + 1 + 4 + 5) / 4)


def _loop_mosaic(image: torch.Tensor, cell: int, window: int) -> torch.Tensor:
    """The same operation as a plain loop over cells and pixels."""
    _, h, w = image.shape
    out = torch.empty_like(image)
    for top in range(0, h, cell):
        for left in range(0, w, cell):
            r0, c0 = max(top + (cell - window) // 2, 0), max(left + (cell - window) // 2, 0)
            r1, c1 = min(top + (cell - window) // 2 + window, h), min(left + (cell - window) // 2 + window, w)
            out[:, top:top + cell, left:left + cell] = image[:, r0:r1, c0:c1].mean((1, 2), keepdim=True)
    return out


@pytest.mark.parametrize(("cell", "window"), [(1, 4), (2, 3), (3, 7), (5, 5)])
def test_mosaic_matches_a_plain_loop_on_odd_sizes(cell, window):
    image = torch.rand(2, 3, 13, 11, generator=torch.Generator().manual_seed(cell))
    out = mosaic(image, cell, window)
    assert out.shape == image.shape
    for i in range(2):
        torch.testing.assert_close(out[i], _loop_mosaic(image[i], cell, window))
    with pytest.raises(ValueError):
        mosaic(image, 3, 2)


def test_the_mosaic_geometry_is_anti_deepnudes_scaled_to_the_image():
    assert mosaic_geometry(512) == (10, 60)  # a cell every 512/50 px, the mean over +-3 cells
    assert mosaic_geometry(32) == (1, 4) and mosaic_geometry(64) == (1, 8)
    assert mosaic_geometry(32, cell=2, window=None) == (2, 4) and mosaic_geometry(32, 4, 8) == (4, 8)


def test_the_nude_target_is_the_codes_latent_difference_plus_noise_and_benign_keeps_its_noise():
    eps_scheduler = DDPMScheduler(num_train_timesteps=1000)
    nude, mos, noise, t = torch.full((1, 4, 2, 2), 3.0), torch.full((1, 4, 2, 2), 1.0), torch.ones(1, 4, 2, 2), \
        torch.tensor([500])
    assert torch.equal(mosaic_target(eps_scheduler, nude, mos, noise, t), torch.full((1, 4, 2, 2), 3.0))
    assert torch.equal(benign_target(eps_scheduler, nude, noise, t), noise)
    v_scheduler = DDPMScheduler(num_train_timesteps=1000, prediction_type="v_prediction")
    a = v_scheduler.alphas_cumprod[500]
    torch.testing.assert_close(mosaic_target(v_scheduler, nude, mos, noise, t),
                               a.sqrt() * noise - (1 - a).sqrt() * (nude - mos))
    torch.testing.assert_close(benign_target(v_scheduler, nude, noise, t), a.sqrt() * noise - (1 - a).sqrt() * nude)


def test_the_loss_weights_both_terms_with_the_empty_prompt():
    unet = AffineUNet()
    cond = text_condition(0.0)  # the empty prompt's c0 = 0 here: eps = a x
    batch = SafeGenBatch(nude_x_t=torch.full((1, 4, 2, 2), 2.0), mosaic_target=torch.full((1, 4, 2, 2), 3.0),
                         benign_x_t=torch.full((1, 4, 2, 2), 4.0), benign_target=torch.full((1, 4, 2, 2), 1.0),
                         t=torch.tensor([10]), cond=cond)
    loss, to_mosaic, keep = safegen_loss(unet, batch, weight_mosaic=0.1, weight_preserve=0.9)
    assert to_mosaic.item() == pytest.approx((1.0 - 3.0) ** 2) and keep.item() == pytest.approx((2.0 - 1.0) ** 2)
    assert loss.item() == pytest.approx(0.1 * 4.0 + 0.9 * 1.0)
    grad_a, grad_b = torch.autograd.grad(loss, [unet.a, unet.b])
    assert grad_a.item() == pytest.approx(0.1 * 2 * (1 - 3) * 2 + 0.9 * 2 * (2 - 1) * 4) and grad_b.item() == 0.0


def test_the_weight_tune_quirk_has_a_parity_switch():
    assert SafeGen().weight_mosaic == 0.1  # the run script's --weight_tune
    assert SafeGen(weight_mosaic_parity=True).weight_mosaic == 0.5  # the code's --weight_mosaic default
    assert SafeGen(weight_mosaic=0.3).weight_mosaic == 0.3


def test_the_ema_follows_diffusers_ema_model():
    from diffusers.training_utils import EMAModel

    param = nn.Parameter(torch.zeros(3))
    reference = EMAModel([param])
    ours = {"w": param.detach().clone()}
    for update in range(1, 8):
        with torch.no_grad():
            param.add_(torch.tensor([1.0, -2.0, 0.5]) * update)
        reference.step([param])
        ema_update(ours, {"w": param}, ema_decay(update, 0.9999))
        torch.testing.assert_close(ours["w"], reference.shadow_params[0])
    assert ema_decay(1, 0.9999) == 0.0 and ema_decay(3, 0.9999) == pytest.approx(3 / 12)
    assert ema_decay(10 ** 6, 0.9999) == 0.9999


def test_steps_hold_the_accumulated_micro_batches_of_a_reshuffled_epoch(sd14):
    crt = SafeGen(gradient_accumulation_steps=3, train_batch_size=1)
    n = 4
    nude, mos, benign = torch.randn(n, 4, 2, 2), torch.randn(n, 4, 2, 2), torch.randn(n, 4, 2, 2)
    zeros = torch.zeros(n, 4, 2, 2)
    data = Triplets(nude=(nude, zeros), mosaic=(mos, zeros), benign=(benign, zeros), cond=torch.zeros(1, 77, 8),
                    geometry=(1, 4))
    scheduler = DDPMScheduler.from_config(sd14.pipe.scheduler.config)
    steps = crt.steps(SimpleNamespace(pipe=sd14.pipe), data, torch.Generator().manual_seed(0))
    seen = []
    for micro in (next(steps), next(steps)):
        assert len(micro) == 3
        for batch in micro:
            a = scheduler.alphas_cumprod[batch.t].view(-1, 1, 1, 1)
            i, residual = _triplet(nude, mos, batch, a)
            assert residual < 1e-4  # x_t = sqrt(a) z_nude + sqrt(1 - a) eps with eps = target - (z_nude - z_mosaic)
            benign_x0 = clean_latent(scheduler.alphas_cumprod, batch.benign_x_t, batch.t, batch.benign_target)
            torch.testing.assert_close(benign_x0, benign[i], atol=1e-4, rtol=1e-4)  # triplet i's benign, same t
            assert torch.equal(batch.cond, torch.zeros(1, 77, 8))
            seen += i
    assert sorted(seen[:4]) == list(range(4))  # the first epoch covers every triplet once


def _triplet(nude: torch.Tensor, mos: torch.Tensor, batch: SafeGenBatch, a: torch.Tensor) -> tuple[list[int], float]:
    """Which triplet each example is: the one whose nude and mosaic latents explain the noised latent exactly."""
    def residual(k: int) -> torch.Tensor:
        eps = batch.mosaic_target - (nude[k] - mos[k])
        return (batch.nude_x_t - a.sqrt() * nude[k] - (1 - a).sqrt() * eps).abs().flatten(1).amax(1)

    table = torch.stack([residual(k) for k in range(len(nude))])  # (triplets, batch)
    best = table.min(0)
    return best.indices.tolist(), float(best.values.max())


def _small(**extra) -> SafeGen:
    return SafeGen(**{"num_triplets": 3, "max_train_steps": 2, "gradient_accumulation_steps": 2, "lr": 1e-3, **extra})


def test_fit_and_apply_change_only_the_self_attention_and_leave_the_base_alone(tiny, concept):
    crt = _small()
    declared = set(trainable_names(tiny.pipe.unet))
    assert declared and all(".attn1." in n for n in declared)
    artifact, _ = fit_and_apply_edit(crt, tiny, concept, declared)
    assert artifact.meta["triplets"] == 3 and artifact.meta["loss"]["mosaic"]["steps"] == 2
    assert artifact.meta["mosaic_cell_window_px"] == list(mosaic_geometry(tiny.size))
    assert crt.reconstruction


def test_the_artifact_is_the_ema_which_after_one_step_is_the_trained_weights(sd14, concept):
    ctx = FitContext(pipe=sd14.pipe, concept=concept, settings=sd14.settings, generate=sd14.generate)
    once = [_small(max_train_steps=1, use_ema=ema).fit(ctx) for ema in (True, False)]
    for name in once[0].tensors:  # the first decay is 0: the EMA takes the weights (up to rounding)
        torch.testing.assert_close(once[0].tensors[name], once[1].tensors[name], atol=1e-6, rtol=0)
    twice = [_small(use_ema=ema).fit(ctx) for ema in (True, False)]
    assert max(float((twice[0].tensors[n] - twice[1].tensors[n]).abs().max()) for n in twice[0].tensors) > 1e-5


def test_yaml_defaults_are_the_config_defaults():
    cfg = crt_yaml("safegen")
    assert cfg["name"] == "safegen" and cfg["handler"] == "crt.safegen.SafeGen"
    assert SafeGen(**cfg["params"]).config == SafeGenConfig()
    assert set(cfg["mini"]) <= set(cfg["params"])
    SafeGen(**{**cfg["params"], **cfg["mini"]})
