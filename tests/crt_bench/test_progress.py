"""crt_bench.progress: the bar a runner opens counts what the loop inside reports, with a rate and the last values;
nothing is drawn when the bar is disabled (``progress=false``) or when no runner opened one."""

from __future__ import annotations

import re

from attacks.base import AdversarialPrompt, search_each
from crt_bench import progress
from crt_bench.spec import PromptItem


def _final(err: str) -> str:
    """The last state tqdm drew (it redraws a line with carriage returns)."""
    return re.split(r"[\r\n]+", err.strip())[-1]


def test_a_loop_reports_steps_with_a_rate_and_its_loss(capsys):
    with progress.bar("fit demo") as opened:
        for loss in (0.5, 0.25, 0.125):
            progress.step(total=3, loss=loss)
    assert opened.n == 3
    line = _final(capsys.readouterr().err)
    assert line.startswith("fit demo: 100%") and "3/3" in line and "step/s" in line and "loss=0.125" in line


def test_shown_values_stay_beside_the_count(capsys):
    with progress.bar("attack demo", total=2, unit="target"):
        progress.show(fitness=4.5)
        progress.step()
        progress.step()
    line = _final(capsys.readouterr().err)
    assert "2/2" in line and "target/s" in line and "fitness=4.5" in line


def test_reach_counts_only_what_the_loop_did_not(capsys):
    with progress.bar("attack demo", total=4, unit="target") as opened:
        progress.step()
        opened.reach(2)
        assert opened.n == 2
        opened.reach(1)  # never backwards
        assert opened.n == 2
        progress.step(2)
        opened.reach(4)
    assert opened.n == 4


def test_disabled_or_absent_bars_draw_nothing(capsys):
    progress.step(loss=1.0)  # no runner opened a bar: a plug-in's report is a no-op
    progress.show(loss=1.0)
    with progress.bar("fit quiet", total=3, enabled=False) as opened:
        progress.step(total=3, loss=0.5)
        progress.show(loss=0.5)
        opened.reach(3)
    assert opened.n == 0 and capsys.readouterr().err == ""
    with progress.bar("fit closed form"):  # a fit that reports nothing shows no empty bar
        pass
    assert capsys.readouterr().err == ""
    progress.step()  # the bar is gone with its block
    assert capsys.readouterr().err == ""


def test_search_each_counts_one_target_per_search(capsys):
    seen = []

    def search(target: PromptItem, cost) -> AdversarialPrompt:
        seen.append(target.text)
        return AdversarialPrompt(target, text=target.text + " x")

    targets = [PromptItem(f"t{i}", seed=i) for i in range(3)]
    with progress.bar("attack demo", total=3, unit="target") as opened:
        results = search_each(targets, search)
    assert opened.n == 3 and seen == ["t0", "t1", "t2"] and [r.text for r in results] == ["t0 x", "t1 x", "t2 x"]
