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


def _assert_same(resumed: Artifact, whole: Artifact) -> None:
    assert resumed.tensors.keys() == whole.tensors.keys()
    for name, tensor in whole.tensors.items():
        assert torch.equal(resumed.tensors[name], tensor), name
    assert resumed.meta == whole.meta  # the loss history is restored too


def kill_and_resume(make: Callable[[], CRT], tiny, concept, folder: Path, every: int, kill_at: int,
                    loss: tuple[Any, str], monkeypatch) -> tuple[Artifact, Artifact, int]:
    """(uninterrupted artifact, resumed artifact, steps the resumed fit computed)."""
    whole = make().fit(_context(tiny, concept))
    with pytest.raises(Killed):
        make().fit(_context(tiny, concept, KillAfter(folder, every, kill_at=kill_at)))
    assert (folder / CHECKPOINT_FILE).is_file()
    torch.manual_seed(12345)  # another process: its global RNG is not where the killed one left it
    counter = Counted()
    module, name = loss
    monkeypatch.setattr(module, name, counter.wrap(getattr(module, name)))
    resumed = make().fit(_context(tiny, concept, FitCheckpoints(folder, every)))
    return whole, resumed, counter.calls


def test_a_killed_esd_fit_resumes_to_the_same_artifact(sd14, concept, tmp_path, monkeypatch):
    import crt.esd
    from crt.esd import ESD

    def make() -> CRT:
        return ESD(method="x", iterations=7, ddim_steps=4, lr=1e-3)

    whole, resumed, steps = kill_and_resume(make, sd14, concept, tmp_path / "ckpt", every=2, kill_at=4,
                                            loss=(crt.esd, "esd_loss"), monkeypatch=monkeypatch)
    _assert_same(resumed, whole)
    assert steps == 3  # steps 5, 6, 7 only
    assert whole.meta["loss"]["steps"] == 7


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
