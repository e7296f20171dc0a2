"""SDD: the EMA teacher by hand (and through a fit), the timestep interval of each k, the stop-gradient target, the
parameters each finetuning_method trains, the k = 0 parity switch, resume, and fit + apply on SD-shaped and world."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from crt.base import OPEN_WEIGHTS, FitContext
from crt.sdd import (
    SDD,
    SDDConfig,
    ddpm_interval,
    ema_update,
    removal_concept,
    sampled_steps,
    sdd_loss,
    trainable_names,
)
from runners.spec import Family
from tests.crt.conftest import OracleUNet, changed_keys, crt_yaml, ddim_scheduler, state_snapshot


def test_ema_update_matches_a_hand_computation():
    teacher = {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([-4.0])}
    student = {"w": torch.tensor([3.0, 6.0]), "b": torch.tensor([4.0])}
    ema_update(teacher, student, decay=0.9)
    torch.testing.assert_close(teacher["w"], torch.tensor([1.2, 2.4]))  # 0.9 * 1 + 0.1 * 3, 0.9 * 2 + 0.1 * 6
    torch.testing.assert_close(teacher["b"], torch.tensor([-3.2]))
    ema_update(teacher, student, decay=0.5)
    torch.testing.assert_close(teacher["w"], torch.tensor([2.1, 4.2]))  # 0.5 * 1.2 + 0.5 * 3
    torch.testing.assert_close(student["w"], torch.tensor([3.0, 6.0]))  # the student is read, never written


@pytest.mark.parametrize(("k", "steps", "interval"), [
    (0, 50, (980, 1000)), (1, 50, (960, 980)), (49, 50, (0, 20)), (24, 50, (500, 520)),
    (0, 25, (960, 1000)), (24, 25, (0, 40)),
    (0, 30, (967, 1000)), (1, 30, (933, 967)), (29, 30, (0, 33)),  # the code's rounding of 1000 (1 - k/30)
])
def test_ddpm_interval_by_hand(k, steps, interval):
    assert ddpm_interval(k, steps) == interval


@pytest.mark.parametrize("steps", [50, 25])
def test_ddpm_interval_holds_the_ddim_timestep_the_latent_was_left_at(steps):
    scheduler = ddim_scheduler(steps)  # SD's scheduler config: steps_offset 1, so 981, 961, ... for 50 steps
    intervals = [ddpm_interval(k, steps) for k in range(steps)]
    for k, t in enumerate(scheduler.timesteps.tolist()):
        lo, hi = intervals[k]
        assert lo <= t < hi
    assert intervals[0][1] == 1000 and intervals[-1][0] == 0
    assert all(a[0] == b[1] for a, b in zip(intervals, intervals[1:]))  # they tile [0, 1000)
    with pytest.raises(ValueError):
        ddpm_interval(steps, steps)


class AffineTextUNet(nn.Module):
    """``eps(x, c) = w a(c) x + b(c)``, a, b read from the text condition, one trainable scalar ``w``."""

    def __init__(self, w: float = 1.5):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(w))

    def forward(self, sample, t, encoder_hidden_states):
        a, b = (encoder_hidden_states[:, 0, i].view(-1, 1, 1, 1) for i in (0, 1))
        return SimpleNamespace(sample=self.w * a * sample + b)


def _text(a: float, b: float) -> torch.Tensor:
    text = torch.zeros(1, 77, 4)
    text[0, 0, :2] = torch.tensor([a, b])
    return text


def test_loss_target_is_the_students_own_unconditional_prediction_without_gradient():
    unet = AffineTextUNet(w=1.5)
    x, t = torch.full((1, 2, 2, 2), 2.0), torch.tensor([500])
    uncond, removal = _text(1.0, 0.5), _text(2.0, -1.0)
    # eps('') = 1.5 * 1 * 2 + 0.5 = 3.5; eps(c_s) = 1.5 * 2 * 2 - 1 = 5; loss = (5 - 3.5)^2 = 2.25
    loss = sdd_loss(unet, x, t, uncond, removal)
    assert loss.item() == pytest.approx(2.25)
    (grad,) = torch.autograd.grad(loss, [unet.w])
    # only through eps(c_s): d/dw (w a_s x + b_s - sg)^2 = 2 * 1.5 * a_s x = 2 * 1.5 * 4 = 12 (with the target's
    # gradient it would be 2 * 1.5 * (a_s - a_0) x = 6)
    assert grad.item() == pytest.approx(12.0)
    unet.w.data.fill_(2.0)  # the target follows the student: eps('') = 4.5, eps(c_s) = 7
    assert sdd_loss(unet, x, t, uncond, removal).item() == pytest.approx(6.25)


def _modules_params(unet: nn.Module, keep) -> set[str]:
    """Parameter names of the modules ``keep(module name)`` selects, from the module tree (not name substrings)."""
    names = set()
    for module_name, module in unet.named_modules():
        if keep(module_name):
            names |= {f"{module_name}.{p}" for p, _ in module.named_parameters()}
    return names


def test_each_finetuning_method_trains_its_parameters(world):
    unet = world.pipe.unet
    every = {n for n, _ in unet.named_parameters()}
    xattn = _modules_params(unet, lambda m: m.endswith(".attn2"))
    selfattn = _modules_params(unet, lambda m: m.endswith(".attn1"))
    left_alone = _modules_params(unet, lambda m: m in ("conv_out", "time_embedding"))
    assert xattn and selfattn and left_alone
    assert set(trainable_names(unet, "xattn")) == xattn
    assert set(trainable_names(unet, "selfattn")) == selfattn
    assert set(trainable_names(unet, "full")) == every
    assert set(trainable_names(unet, "notime")) == every - left_alone
    assert set(trainable_names(unet, "noxattn")) == every - left_alone - xattn
    assert "conv_in.weight" in set(trainable_names(unet, "noxattn"))
    with pytest.raises(ValueError):
        SDD(finetuning_method="attn")
    with pytest.raises(ValueError):
        SDD(concept_method="sequential")


def test_removal_concept_per_step():
    gen = torch.Generator().manual_seed(0)
    concepts = ("nudity", "violence", "gore")
    assert [removal_concept(concepts, "iterative", s, gen) for s in range(1, 6)] == \
        ["nudity", "violence", "gore", "nudity", "violence"]
    assert removal_concept(concepts, "composite", 3, gen) == "nudity, violence, gore"
    assert {removal_concept(concepts, "random", 1, gen) for _ in range(30)} == set(concepts)


class CountingOracle(OracleUNet):
    """The true-noise UNet, counting its forward calls (one per guided DDIM step)."""

    def __init__(self, eps: torch.Tensor):
        super().__init__(eps)
        self.calls = 0

    def forward(self, sample, t, encoder_hidden_states):
        self.calls += 1
        return super().forward(sample, t, encoder_hidden_states)


@pytest.mark.parametrize("quirk", [False, True])
def test_k0_parity_switch(world, concept, quirk):
    steps = 5
    crt = SDD(num_ddim_steps=steps, k0_full_denoise=quirk)
    assert sampled_steps(0, crt.config) == (steps if quirk else 0)
    assert sampled_steps(3, crt.config) == 3
    ctx = FitContext(pipe=world.pipe, concept=concept, settings=world.settings, generate=world.generate)
    teacher = CountingOracle(torch.zeros(1, 4, 8, 8))
    text = torch.zeros(1, 77, 128)
    examples = crt.examples(ctx, teacher, text, text, torch.Generator().manual_seed(0))
    seen = set()
    while len(seen) < steps:
        before = teacher.calls
        example = next(examples)
        lo, hi = ddpm_interval(example.k, steps)
        assert lo <= int(example.t) < hi
        expected = steps if quirk and example.k == 0 else example.k
        assert teacher.calls - before == expected
        if example.k == 0 and not quirk:
            assert example.z_t.abs().max() > 0  # z_T itself: unit noise, untouched
        seen.add(example.k)


def test_the_artifact_is_the_ema_teacher(world, concept):
    """With decay d and one step, the released weights are d * base + (1 - d) * the student after that step (the
    student of a decay-0 fit: same seed, same example, since the first z_t comes from the base-valued teacher)."""
    ctx = FitContext(pipe=world.pipe, concept=concept, settings=world.settings, generate=world.generate)
    base = dict(world.pipe.unet.named_parameters())
    common = dict(num_train_steps=1, num_ddim_steps=4, lr=1e-3)
    student = SDD(ema_decay=0.0, **common).fit(ctx).tensors
    released = SDD(ema_decay=0.75, **common).fit(ctx).tensors
    frozen = SDD(ema_decay=1.0, **common).fit(ctx).tensors
    assert any(not torch.equal(student[n], base[n].detach()) for n in student)
    for name, value in released.items():
        torch.testing.assert_close(value, 0.75 * base[name].detach() + 0.25 * student[name])
        assert torch.equal(frozen[name], base[name].detach())


@pytest.mark.parametrize("method", ["xattn", "noxattn"])
def test_fit_and_apply_change_only_the_trained_parameters(tiny, concept, method):
    pipe = tiny.pipe
    before = state_snapshot(pipe.unet)
    crt = SDD(finetuning_method=method, num_train_steps=2, num_ddim_steps=4, lr=1e-3, ema_decay=0.5)
    artifact = crt.fit(FitContext(pipe=pipe, concept=concept, settings=tiny.settings, generate=tiny.generate))
    declared = set(trainable_names(pipe.unet, method))
    assert set(artifact.tensors) == declared
    assert not changed_keys(before, pipe.unet), "fit modified the base UNet"
    assert artifact.meta["concepts"] == ["nude"] and artifact.meta["released"] == "EMA teacher"
    assert artifact.meta["loss"]["steps"] == 2

    defended = crt.apply(pipe, artifact)
    assert defended.pipe.unet is not pipe.unet and defended.pipe.text_encoder is pipe.text_encoder
    changed = changed_keys(before, defended.pipe.unet)
    assert changed and changed <= declared
    assert not changed_keys(before, pipe.unet), "apply modified the base UNet"
    assert defended.exposes == OPEN_WEIGHTS and defended.filter is None and defended.crt_name == "sdd"
    assert SDD.family is Family.WEIGHT_EDIT
    image = tiny.generate([concept.prompt_set("target")[0]], pipe=defended.pipe)[0]
    assert image.size == (tiny.size, tiny.size)


def test_loss_decreases_on_world(world, concept):
    crt = SDD(num_train_steps=24, num_ddim_steps=4, lr=3e-3, log_every=8)
    artifact = crt.fit(FitContext(pipe=world.pipe, concept=concept, settings=world.settings,
                                  generate=world.generate))
    windows = artifact.meta["loss"]["mean_per_window"]
    assert windows[-1] < windows[0], windows


def test_a_killed_fit_resumes_to_the_same_artifact(world, concept, tmp_path, monkeypatch):
    import crt.sdd as module
    from tests.crt.test_resume import _assert_same, kill_and_resume

    def make(tiny):
        return SDD(num_train_steps=6, num_ddim_steps=4, lr=1e-3, ema_decay=0.5, concept_method="random",
                   concepts=["nude", "naked"])

    whole, resumed, steps = kill_and_resume(make, world, concept, tmp_path / "ckpt", 2, 4,
                                            (module, "sdd_loss"), monkeypatch)
    _assert_same(resumed, whole)
    assert steps == 2


def test_yaml_builds_the_official_defaults():
    cfg = crt_yaml("sdd")
    assert cfg["handler"] == "crt.sdd.SDD"
    official = SDD(**cfg["params"]).config
    assert (official.finetuning_method, official.num_train_steps, official.lr, official.ema_decay,
            official.guidance_scale, official.num_ddim_steps, official.weight_decay, official.k0_full_denoise) == \
        ("xattn", 1500, 1e-5, 0.999, 3.0, 50, 1e-4, False)
    assert official == SDDConfig(**{**cfg["params"], "concepts": None})
    SDD(**{**cfg["params"], **cfg["mini"]})  # the world budget builds
