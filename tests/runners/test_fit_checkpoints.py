"""Through the runner: a fit killed mid-way resumes from ``store/checkpoints/<artifact key>``, stores the artifact
of an uninterrupted fit, and the checkpoint is gone once the artifact is stored; the interval is in no key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from crt.base import CHECKPOINT_FILE, FitCheckpoints
from run import execute
from runners.models import HarnessError, PipelineCache
from runners.stages import CHECKPOINTS, artifact_spec, prepare, stage_prompts
from runners.store import Store, key_of
from tests.runners.conftest import ROOT


class Preempted(Exception):
    pass


def _esd_config(tiny_config, where: Path, every: int) -> dict[str, Any]:
    cfg = tiny_config("crt=esd_x", "stop_after=fit")
    cfg["crt"].pop("mini", None)
    cfg["crt"]["params"].update(iterations=5, ddim_steps=4, lr=1e-3)
    cfg["fit"] = {"checkpoint_every": every}
    cfg["store"]["root"] = str(where / "store")
    return cfg


def _artifact(cfg: dict[str, Any]) -> tuple[str, dict[str, torch.Tensor]]:
    run = prepare(cfg, ROOT, PipelineCache())
    stage_prompts(run)
    key = key_of(artifact_spec(run))
    entry = Store(cfg["store"]["root"]).get(key)
    assert entry is not None
    return key, load_file(str(entry.path / "tensors.safetensors"))


def test_a_preempted_fit_resumes_and_stores_the_uninterrupted_artifact(tiny_config, tmp_path, monkeypatch):
    whole_cfg = _esd_config(tiny_config, tmp_path / "whole", every=0)
    execute(whole_cfg, pipelines=PipelineCache())
    whole_key, whole = _artifact(whole_cfg)

    cfg = _esd_config(tiny_config, tmp_path / "killed", every=2)
    save = FitCheckpoints.save

    def preempted_after_step_2(self: FitCheckpoints, state: dict[str, Any]) -> None:
        save(self, state)
        if state["step"] == 2:
            raise Preempted

    monkeypatch.setattr(FitCheckpoints, "save", preempted_after_step_2)
    with pytest.raises(Preempted):
        execute(cfg, pipelines=PipelineCache())
    monkeypatch.setattr(FitCheckpoints, "save", save)
    checkpoints = tmp_path / "killed" / "store" / CHECKPOINTS
    (left,) = checkpoints.iterdir()
    assert torch.load(left / CHECKPOINT_FILE, weights_only=True)["step"] == 2
    assert left.name == whole_key  # keyed by the artifact, whose key the interval does not change

    import crt.esd

    loss, steps = crt.esd.esd_loss, []
    monkeypatch.setattr(crt.esd, "esd_loss", lambda *args, **kwargs: steps.append(1) or loss(*args, **kwargs))
    execute(cfg, pipelines=PipelineCache())
    assert len(steps) == 3  # steps 3 to 5 only
    key, resumed = _artifact(cfg)
    assert key == whole_key and resumed.keys() == whole.keys()
    assert all(torch.equal(resumed[name], whole[name]) for name in whole)
    assert not any(checkpoints.iterdir())  # deleted once the artifact was stored


def test_a_bad_interval_stops_the_run_with_one_line(tiny_config, tmp_path):
    cfg = _esd_config(tiny_config, tmp_path, every=2)
    cfg["fit"]["checkpoint_every"] = "often"
    with pytest.raises(HarnessError, match="fit.checkpoint_every='often'"):
        execute(cfg, pipelines=PipelineCache())
