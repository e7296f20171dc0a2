import torch

from world import models
from world.train import TrainConfig, load_checkpoint, save_checkpoint, train_judge


def test_checkpoint_round_trip_restores_model_and_optimizer(tmp_path):
    torch.manual_seed(0)
    model = models.AttributeJudge(3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.rand(2, 3, 32, 32)).sum().backward()
    opt.step()
    save_checkpoint(tmp_path, {"m": model}, opt, {"step": 7})
    fresh = models.AttributeJudge(3)
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-3)
    assert load_checkpoint(tmp_path, {"m": fresh}, fresh_opt) == {"step": 7}
    for a, b in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(a, b)
    assert torch.equal(opt.state_dict()["state"][0]["exp_avg"], fresh_opt.state_dict()["state"][0]["exp_avg"])


def test_missing_checkpoint_means_a_fresh_start(tmp_path):
    assert load_checkpoint(tmp_path / "none", {"m": models.AttributeJudge(2)}, None) == {}


def test_judge_training_learns_and_is_deterministic(tmp_path):
    cfg = TrainConfig(out_dir=str(tmp_path / "a"), work_dir=str(tmp_path / "w"), judge_steps=60)
    train_judge(cfg, "blood", ("no", "yes"))
    cfg_b = TrainConfig(out_dir=str(tmp_path / "b"), work_dir=str(tmp_path / "w"), judge_steps=60)
    train_judge(cfg_b, "blood", ("no", "yes"))
    a = (tmp_path / "a" / "judges" / "blood.safetensors").read_bytes()
    assert a == (tmp_path / "b" / "judges" / "blood.safetensors").read_bytes()
