"""A fit killed mid-way resumes from its last checkpoint and ends with the very artifact of an uninterrupted fit.

The kill is an exception raised right after the checkpoint of step ``k`` is written (what a preemption leaves
behind); the resumed fit gets a fresh context, a fresh CRT object and a disturbed global RNG, as a new process would.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from crt.base import CHECKPOINT_FILE, CRT, Artifact, FitCheckpoints, FitContext


class Killed(Exception):
    pass


@dataclass
class KillAfter(FitCheckpoints):
    """Checkpoints that stop the fit right after writing the one of step ``kill_at``."""

    kill_at: int = 0

    def save(self, state: dict[str, Any]) -> None:
        super().save(state)
        if state["step"] == self.kill_at:
            raise Killed(f"killed after step {self.kill_at}")


@dataclass
class Counted:
    """Counts the calls of one function of a CRT module (its loss), to see how many steps a fit computed."""

    calls: int = 0

    def wrap(self, function: Callable[..., Any]) -> Callable[..., Any]:
        def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            return function(*args, **kwargs)

        return counted


def _context(tiny, concept, checkpoints: FitCheckpoints | None = None) -> FitContext:
    return FitContext(pipe=tiny.pipe, concept=concept, settings=tiny.settings, generate=tiny.generate,
                      checkpoints=checkpoints or FitCheckpoints())


WALL_CLOCK = ("fit_seconds", "fit_cpu_seconds")  # meta that no two fits share


def _assert_same(resumed: Artifact, whole: Artifact) -> None:
    assert resumed.tensors.keys() == whole.tensors.keys()
    for name, tensor in whole.tensors.items():
        assert torch.equal(resumed.tensors[name], tensor), name
    timeless = [{k: v for k, v in a.meta.items() if k not in WALL_CLOCK} for a in (resumed, whole)]
    assert timeless[0] == timeless[1]  # the loss history is restored too


def kill_and_resume(make: Callable[[Any], CRT], tiny, concept, folder: Path, every: int, kill_at: int,
                    loss: tuple[Any, str], monkeypatch) -> tuple[Artifact, Artifact, int]:
    """(uninterrupted artifact, resumed artifact, steps the resumed fit computed)."""
    whole = make(tiny).fit(_context(tiny, concept))
    with pytest.raises(Killed):
        make(tiny).fit(_context(tiny, concept, KillAfter(folder, every, kill_at=kill_at)))
    assert (folder / CHECKPOINT_FILE).is_file()
    torch.manual_seed(12345)  # another process: its global RNG is not where the killed one left it
    counter = Counted()
    module, name = loss
    monkeypatch.setattr(module, name, counter.wrap(getattr(module, name)))
    resumed = make(tiny).fit(_context(tiny, concept, FitCheckpoints(folder, every)))
    return whole, resumed, counter.calls


def _esd(tiny: Any) -> CRT:
    from crt.esd import ESD

    return ESD(method="x", iterations=7, ddim_steps=4, lr=1e-3)


def _ca(tiny: Any) -> CRT:
    from crt.ca import CA

    # 2 batches an epoch: killed after step 3, in the middle of the second epoch; prior preservation and flips on
    return CA(num_anchor_images=4, max_train_steps=5, batch_size=2, lr=1e-3, scale_lr=False)


def _p_esd(tiny: Any) -> CRT:
    from crt.pruning import MaskedEraser

    return MaskedEraser(eraser="esd", eraser_params={"iterations": 5, "ddim_steps": 4}, init_score=0.05, lr=0.5)


def _p_ca(tiny: Any) -> CRT:
    from crt.pruning import MaskedEraser

    return MaskedEraser(eraser="ca", eraser_params={"num_anchor_images": 3, "max_train_steps": 5, "batch_size": 2},
                        init_score=0.05, lr=0.5)


def _trce(parity: bool) -> Callable[[Any], CRT]:
    def make(tiny: Any) -> CRT:
        from crt.trce import TRCE

        # 3 malicious trajectories x 2 epochs = 6 iterations; parity accumulates gradients across steps
        return TRCE(templates=["{}"], preserve_set="finetune_acceptable", trajectory_template="{}",
                    seeds_per_prompt=1, uncond_trajectories=2, ddim_steps=4, max_early_step=1, epochs=2,
                    reg_batch=2, lr=1e-3, parity=parity)

    return make


def _shielddiff(tiny: Any) -> CRT:
    from crt.shielddiff import ShieldDiff

    # one checkpoint an epoch; 6 prompts, 2 an epoch: epoch 4 reuses the reward buffers of earlier epochs
    return ShieldDiff(reward="tests.crt.test_shielddiff.StandInScorer", clip=str(tiny.clip_dir), epochs=4,
                      prompts_per_epoch=2, samples_per_prompt=2, sample_steps=2, sample_batch_size=4,
                      train_batch_size=2, gradient_accumulation_steps=1, timestep_chunk=2, min_count=2, lr=1e-2,
                      clip_range=0.2, resolution=64)


# (CRT, checkpoint interval, killed after step, the module function called once a step, steps in all)
CASES = {
    "esd": (_esd, 2, 4, ("crt.esd", "esd_loss"), 7),
    "ca": (_ca, 3, 3, ("crt.ca", "ca_loss"), 5),
    "p_esd": (_p_esd, 2, 2, ("crt.pruning", "esd_loss"), 5),
    "p_ca": (_p_ca, 3, 3, ("crt.pruning", "ca_loss"), 5),
    "trce": (_trce(False), 2, 2, ("crt.trce.stage2", "margin_loss"), 6),
    "trce_parity": (_trce(True), 2, 4, ("crt.trce.stage2", "margin_loss"), 6),
    "shielddiff": (_shielddiff, 1, 1, ("crt.shielddiff", "combine"), 4),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_killed_fit_resumes_to_the_same_artifact(case, sd14, concept, tmp_path, monkeypatch):
    import importlib

    make, every, kill_at, (module, name), total = CASES[case]
    whole, resumed, steps = kill_and_resume(make, sd14, concept, tmp_path / "ckpt", every, kill_at,
                                            (importlib.import_module(module), name), monkeypatch)
    _assert_same(resumed, whole)
    assert steps == total - kill_at  # only the steps after the checkpoint were computed again


def test_a_checkpoint_holds_the_step_and_is_not_written_after_the_last_step(sd14, concept, tmp_path):
    from crt.esd import ESD

    folder = tmp_path / "ckpt"
    ESD(method="x", iterations=5, ddim_steps=4, lr=1e-3).fit(_context(sd14, concept, FitCheckpoints(folder, 2)))
    saved = torch.load(folder / CHECKPOINT_FILE, weights_only=True)
    assert saved["step"] == 4  # every 2 steps, the 5th (last) not saved: the artifact follows
    assert len(saved["state"]["history"]) == 4
    assert not list(folder.glob(".*partial"))


def test_no_checkpoint_is_written_without_a_folder_or_an_interval(sd14, concept, tmp_path):
    from crt.esd import ESD

    ESD(method="x", iterations=3, ddim_steps=4, lr=1e-3).fit(
        _context(sd14, concept, FitCheckpoints(tmp_path / "off", 0)))
    assert not (tmp_path / "off").exists()


def test_an_unreadable_checkpoint_starts_the_fit_over(sd14, concept, tmp_path):
    from crt.esd import ESD

    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / CHECKPOINT_FILE).write_bytes(b"not a checkpoint")
    whole = ESD(method="x", iterations=3, ddim_steps=4, lr=1e-3).fit(_context(sd14, concept))
    again = ESD(method="x", iterations=3, ddim_steps=4, lr=1e-3).fit(
        _context(sd14, concept, FitCheckpoints(folder, 2)))
    _assert_same(again, whole)
