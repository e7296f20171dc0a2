"""Selective Amnesia: the Fisher diagonal against a hand computation on a linear model, the EWC term and its gradient
by hand, the official parameter groups, the step's data (pairs, forget words, micro-batches), the Fisher file
loader, and one short fit + apply on the SD-v1.4-shaped and the world pipelines."""

from __future__ import annotations

import collections
import pickle
from types import SimpleNamespace

import pytest
import torch
from diffusers import DDPMScheduler
from torch import nn

from crt.base import FitContext
from crt.sa import (
    SA,
    FisherSamples,
    SAConfig,
    SAData,
    effective_lr,
    ewc_penalty,
    fisher_diagonal,
    fisher_timestep_grid,
    forget_words,
    load_fisher,
    lr_factor,
    sample_gradient,
    steps_per_epoch,
    total_steps,
    trainable_names,
)
from tests.crt.conftest import AffineUNet, clean_latent, crt_yaml, fit_and_apply_edit, nearest, text_condition
from tests.crt.test_resume import kill_and_resume


def _hand_fisher(model: AffineUNet, scheduler, samples: FisherSamples, grid: torch.Tensor, scale: float,
                 seed: int) -> tuple[float, float]:
    """The official loop written out: per image one posterior draw, then per timestep its own noise, the loss
    gradient by the chain rule of ``mean((a x_t + b c0 - eps)^2)``, summed over t, squared, averaged."""
    gen = torch.Generator().manual_seed(seed)
    a, b = float(model.a.detach()), float(model.b.detach())
    fa = fb = 0.0
    n = samples.mean.shape[0]
    for k in range(n):
        z = samples.mean[k] + samples.std[k] * torch.randn(samples.mean[k:k + 1].shape, generator=gen)[0]
        noise = torch.randn((len(grid), *z.shape), generator=gen)
        c0 = float(samples.cond[k, 0, 0])
        ga = gb = 0.0
        for i, t in enumerate(grid.tolist()):
            abar = float(scheduler.alphas_cumprod[t])
            x_t = abar ** 0.5 * z + (1 - abar) ** 0.5 * noise[i]
            r = a * x_t + b * c0 - noise[i]
            ga += float((2 * r * x_t).mean())
            gb += float((2 * r * c0).mean())
        fa += (scale * ga) ** 2 / n
        fb += (scale * gb) ** 2 / n
    return fa, fb


@pytest.mark.parametrize(("train_steps", "count"), [(4, 4), (8, 4)])
def test_fisher_diagonal_is_the_mean_squared_gradient_of_the_loss_summed_over_timesteps(train_steps, count):
    scheduler = DDPMScheduler(num_train_timesteps=train_steps)
    model = AffineUNet()
    params = dict(model.named_parameters())
    torch.manual_seed(0)
    samples = FisherSamples(mean=torch.randn(3, 2, 2, 2), std=torch.full((3, 2, 2, 2), 0.1),
                            cond=text_condition(1.0, -0.5, 2.0))
    fisher = fisher_diagonal(model, params, scheduler, samples, count, chunk=3, gen=torch.Generator().manual_seed(7))
    grid = fisher_timestep_grid(train_steps, count)
    hand = _hand_fisher(model, scheduler, samples, grid, train_steps / count, seed=7)
    assert (float(fisher["a"]), float(fisher["b"])) == pytest.approx(hand, rel=1e-5)
    assert all(p.grad is None for p in params.values())  # nothing left over for the optimiser


def test_the_timestep_grid_is_every_timestep_or_an_even_subset():
    assert torch.equal(fisher_timestep_grid(1000, 1000), torch.arange(1000))
    assert fisher_timestep_grid(1000, 4).tolist() == [0, 333, 666, 999]
    assert fisher_timestep_grid(8, 4).tolist() == [0, 2, 5, 7]


def test_chunking_the_timesteps_does_not_change_the_summed_gradient():
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    model = AffineUNet()
    params = dict(model.named_parameters())
    latent, cond = torch.randn(1, 2, 2, 2), text_condition(1.5)
    t, noise = torch.tensor([3, 400, 999, 50, 700]), torch.randn(5, 2, 2, 2)
    whole = sample_gradient(model, params, scheduler, latent, cond, t, noise, chunk=5)
    pieces = sample_gradient(model, params, scheduler, latent, cond, t, noise, chunk=2)
    for name in params:
        torch.testing.assert_close(whole[name], pieces[name])


def test_ewc_penalty_and_its_gradient_by_hand():
    theta = {"w": nn.Parameter(torch.tensor([1.0, 2.0]))}
    anchors = {"w": torch.tensor([0.5, 0.5])}
    fisher = {"w": torch.tensor([2.0, 3.0])}
    penalty = ewc_penalty(theta, anchors, fisher, lmbda=50.0)
    assert penalty.item() == pytest.approx(50 * (2 * 0.25 + 3 * 2.25))
    penalty.backward()
    # d/dtheta lambda F (theta - theta*)^2 = 2 lambda F (theta - theta*)
    assert theta["w"].grad.tolist() == pytest.approx([2 * 50 * 2 * 0.5, 2 * 50 * 3 * 1.5])
    assert ewc_penalty(theta, {"w": theta["w"].detach().clone()}, fisher, 50.0).item() == 0.0


def test_noxattn_leaves_out_cross_attention_time_embedding_and_output_layers(sd14):
    unet = sd14.pipe.unet
    names = [n for n, _ in unet.named_parameters()]
    chosen = set(trainable_names(unet, "noxattn"))
    left_out = set(names) - chosen
    assert left_out == {n for n in names if ".attn2." in n or n.startswith(("time_embedding.", "conv_norm_out.",
                                                                             "conv_out."))}
    assert any(".attn2." in n for n in left_out) and "conv_out.weight" in left_out
    assert "conv_in.weight" in chosen and any("time_emb_proj" in n for n in chosen)  # LDM emb_layers train
    assert any(".attn1." in n for n in chosen) and any(".ff." in n for n in chosen)
    assert set(trainable_names(unet, "xattn")) == {n for n in names if ".attn2." in n}
    assert trainable_names(unet, "full") == names
    with pytest.raises(ValueError):
        SA(train_method="attn")


def test_forget_words_schedule_and_step_counts_follow_the_official_config():
    assert forget_words("sexual, nudity, naked, erotic") == ["sexual", "nudity", "naked", "erotic"]
    assert forget_words("nude") == ["nude"]
    with pytest.raises(ValueError):
        forget_words(" , ")
    cfg = SAConfig()
    assert effective_lr(cfg) == pytest.approx(1e-5 * 4 * 4)
    assert effective_lr(SAConfig(scale_lr=False)) == 1e-5
    assert lr_factor(0, 1, 1e-6) == pytest.approx(1e-6) and lr_factor(1, 1, 1e-6) == 1.0
    assert lr_factor(2, 4, 0.0) == pytest.approx(0.5)
    # 1000 pairs on 4 GPUs: 250 each, batches of 4 -> 63 steps (the last of 2)
    assert steps_per_epoch(1000, 4, 4) == 63 and total_steps(cfg, 1000) == 500 * 63
    assert total_steps(SAConfig(max_train_steps=7), 1000) == 7


def _data(pairs: int = 5, words: int = 3) -> SAData:
    surrogate = torch.randn(pairs, 4, 2, 2)
    generic = FisherSamples(mean=torch.randn(pairs + 2, 4, 2, 2), std=torch.zeros(pairs + 2, 4, 2, 2),
                            cond=torch.arange(pairs + 2.0).view(-1, 1, 1).expand(-1, 77, 8).clone())
    forget_cond = (100 + torch.arange(float(words))).view(-1, 1, 1).expand(-1, 77, 8).clone()
    return SAData(surrogate_mean=surrogate, surrogate_std=torch.zeros_like(surrogate), forget_cond=forget_cond,
                  generic=generic, pairs=pairs, forget_words=[str(w) for w in range(words)], surrogate_prompt="s")


def test_steps_pair_surrogate_i_with_replay_i_and_split_into_one_micro_batch_per_gpu(sd14):
    crt = SA(batch_size=1, num_processes=2)
    data = _data()
    scheduler = DDPMScheduler.from_config(sd14.pipe.scheduler.config)
    steps = crt.batches(SimpleNamespace(pipe=sd14.pipe), data, torch.Generator().manual_seed(0))
    seen: list[int] = []
    for _ in range(3):  # one epoch of 5 pairs: steps of 2, 2 and 1 examples
        micro = next(steps)
        assert len(micro) == min(2, 5 - len(seen))
        for batch in micro:
            x0 = clean_latent(scheduler.alphas_cumprod, batch.forget_x_t, batch.forget_t, batch.forget_target)
            surrogate = nearest(data.surrogate_mean, x0)
            torch.testing.assert_close(x0, data.surrogate_mean[surrogate], atol=1e-4, rtol=1e-4)
            replay = nearest(data.generic.mean, clean_latent(scheduler.alphas_cumprod, batch.replay_x_t,
                                                             batch.replay_t, batch.replay_target))
            assert replay == surrogate  # the official ConcatDataset: pair i = (surrogate i, replay i)
            assert batch.replay_cond[:, 0, 0].tolist() == [float(i) for i in replay]
            assert set(batch.forget_cond[:, 0, 0].tolist()) <= {100.0, 101.0, 102.0}
            seen += surrogate
    assert sorted(seen) == list(range(5))


def test_the_fisher_file_loader_reads_the_official_pickle_and_safetensors(world, tmp_path):
    from safetensors.torch import save_file

    config = world.pipe.unet.config  # layers_per_block 1: LDM input_blocks.1 is down_blocks.0
    official = {"diffusion_model.input_blocks.0.0.weight": torch.full((2,), 1.0),
                "diffusion_model.time_embed.0.weight": torch.full((2,), 2.0),
                "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight": torch.full((2,), 3.0),
                "diffusion_model.input_blocks.1.0.emb_layers.1.weight": torch.full((2,), 4.0)}
    with (tmp_path / "full_fisher_dict.pkl").open("wb") as handle:
        pickle.dump(official, handle)
    names = ["conv_in.weight", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight",
             "down_blocks.0.resnets.0.time_emb_proj.weight"]
    loaded = load_fisher(tmp_path / "full_fisher_dict.pkl", config, names)
    assert {n: float(t[0]) for n, t in loaded.items()} == {names[0]: 1.0, names[1]: 3.0, names[2]: 4.0}
    with pytest.raises(KeyError, match="lacks"):
        load_fisher(tmp_path / "full_fisher_dict.pkl", config, [*names, "conv_out.weight"])
    save_file({"conv_in.weight": torch.ones(3)}, str(tmp_path / "fisher.safetensors"))
    assert torch.equal(load_fisher(tmp_path / "fisher.safetensors", config, ["conv_in.weight"])["conv_in.weight"],
                       torch.ones(3))
    with (tmp_path / "bad.pkl").open("wb") as handle:
        pickle.dump({"x": collections.Counter()}, handle)  # anything but tensors is refused, never constructed
    with pytest.raises(pickle.UnpicklingError):
        load_fisher(tmp_path / "bad.pkl", config, [])


def _small(**extra) -> SA:
    return SA(surrogate_images=4, fisher_samples=3, fisher_timesteps=8, fisher_chunk=4, max_train_steps=3,
              batch_size=1, num_processes=2, lr=1e-3, scale_lr=False, **extra)


def test_fit_and_apply_train_everything_but_attn2_and_leave_the_base_alone(tiny, concept):
    crt = _small()
    artifact, changed = fit_and_apply_edit(crt, tiny, concept, set(trainable_names(tiny.pipe.unet, "noxattn")))
    meta = artifact.meta
    assert meta["loss"]["ewc"]["steps"] == 3 and meta["pairs"] == 3 and meta["fisher"]["computed"]
    assert meta["forget_words"] == ["nude"] and meta["surrogate_prompt"] == "clothed"  # c_u / c_a by default
    assert meta["loss"]["ewc"]["mean_per_window"][0] > 0  # the weights moved where the Fisher is not zero
    assert not any(".attn2." in n for n in changed) and crt.reconstruction


def test_a_fisher_file_replaces_the_computation(sd14, concept, tmp_path, monkeypatch):
    from safetensors.torch import save_file

    import crt.sa as sa_module

    names = trainable_names(sd14.pipe.unet, "noxattn")
    state = sd14.pipe.unet.state_dict()
    save_file({n: torch.zeros_like(state[n]) for n in names}, str(tmp_path / "fisher.safetensors"))
    monkeypatch.setattr(sa_module, "fisher_diagonal", lambda *a, **k: pytest.fail("the Fisher was computed"))
    artifact = _small(fisher_path=str(tmp_path / "fisher.safetensors")).fit(
        FitContext(pipe=sd14.pipe, concept=concept, settings=sd14.settings, generate=sd14.generate))
    assert artifact.meta["fisher"]["computed"] is False and len(artifact.meta["fisher"]["sha256"]) == 64
    assert artifact.meta["loss"]["ewc"]["mean_per_window"] == [0.0]  # a zero Fisher: no penalty


def test_a_killed_fit_resumes_with_its_fisher_and_ends_where_the_whole_fit_ends(sd14, concept, tmp_path,
                                                                                 monkeypatch):
    import crt.sa as sa_module

    whole, resumed, fisher_calls = kill_and_resume(lambda tiny: _small(), sd14, concept, tmp_path / "ckpt", 1, 2,
                                                   (sa_module, "fisher_diagonal"), monkeypatch)
    assert fisher_calls == 0  # restored from the checkpoint, not recomputed
    for name, tensor in whole.tensors.items():
        assert torch.equal(resumed.tensors[name], tensor), name
    assert resumed.meta["loss"] == whole.meta["loss"]


def test_yaml_defaults_are_the_config_defaults():
    cfg = crt_yaml("sa")
    assert cfg["name"] == "sa" and cfg["handler"] == "crt.sa.SA"
    assert SA(**cfg["params"]).config == SAConfig()
    assert set(cfg["mini"]) <= set(cfg["params"])
    SA(**{**cfg["params"], **cfg["mini"]})
