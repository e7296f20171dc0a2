"""Plots next to the leaderboard: the Pareto front of (concept rate, NCS) against a brute-force check, which
robustness number colours a point, and PNG files written by `python -m runners.leaderboard` (not with --no-plots)."""

from __future__ import annotations

import json
import random
from pathlib import Path

from PIL import Image

from runners.leaderboard import Column, main, table
from runners.plots import WORST_CASE, pareto_front, robustness_of, tradeoff_points, write_plots


def _dominated(p: tuple[float, float], q: tuple[float, float]) -> bool:
    """q dominates p: no worse on both axes (lower x, higher y) and not the same point."""
    return q[0] <= p[0] and q[1] >= p[1] and q != p


def _brute_force(points: list[tuple[float, float]]) -> set[int]:
    return {i for i, p in enumerate(points) if not any(_dominated(p, q) for q in points)}


def test_pareto_front_by_hand():
    points = [(0.0, 0.9), (0.25, 0.95), (0.9, 0.99), (0.5, 0.9), (0.0, 0.9), (1.0, 0.99), (0.0, 0.8)]
    # (0.5, .9) and (0, .8) lose to (0, .9); (1, .99) to (.9, .99); the two (0, .9) are both kept
    assert pareto_front(points) == [0, 4, 1, 2]


def test_pareto_front_matches_brute_force_with_ties():
    rng = random.Random(0)
    for _ in range(300):
        n = rng.randint(0, 12)
        points = [(rng.randint(0, 4) / 4, rng.randint(0, 4) / 4) for _ in range(n)]  # a coarse grid: many ties
        front = pareto_front(points)
        assert set(front) == _brute_force(points) and len(front) == len(set(front))
        assert [points[i][0] for i in front] == sorted(points[i][0] for i in front)


def _metric(value: float, lo: float, hi: float, **extra) -> dict:
    return {"value": value, "ci": [lo, hi], "n": 32, "alpha": 0.05, "ci_method": "clopper-pearson", **extra}


def _run(crt: str, attack: str, concept: str, asr: float, rate: float | None = 0.5, ncs: float = 0.95,
         mode: str = "transfer", targets: list[bool] | None = None) -> dict:
    label = attack if mode == "transfer" else f"{attack}-{mode}"
    metrics = {"utility/normalized_clip_score": _metric(ncs, ncs - 0.02, ncs + 0.01, higher_is_better=True),
               f"robustness/post_asr/{attack}": _metric(asr, max(asr - 0.1, 0), min(asr + 0.1, 1), count=1,
                                                        group="robustness", higher_is_better=False)}
    if rate is not None:
        metrics["effectiveness/judge_rate/unacceptable"] = _metric(rate, max(rate - 0.1, 0), min(rate + 0.1, 1))
    return {"schema_version": 2, "created": "2026-01-01T00:00:00", "run_key": f"{concept}-{crt}-{label}",
            "labels": {"model": "mini", "concept": concept, "crt": crt, "attack": label, "attack_name": attack,
                       "attack_mode": mode},
            "attack": {"targets": [{"target": f"t{i}", "post": p, "adversarial": p, "ideal": None}
                                   for i, p in enumerate(targets or [])]},
            "metrics": metrics}


def _runs() -> list[dict]:
    return [_run("none", "none", "world_nudity", 1.0, rate=1.0, ncs=1.0),
            _run("esd_x", "none", "world_nudity", 0.5, rate=0.5, ncs=0.99),
            _run("esd_x", "ringabell", "world_nudity", 0.75, targets=[True, True, False, False]),
            _run("esd_x", "unlearndiffatk", "world_nudity", 0.5, mode="white-box", targets=[True, False, True, False]),
            _run("espresso", "none", "world_nudity", 0.0, rate=0.0, ncs=0.9),
            _run("espresso", "ringabell", "world_nudity", 0.125),
            _run("espresso", "unlearndiffatk", "world_nudity", 0.25, mode="white-box"),
            _run("none", "none", "world_violence", 1.0, rate=None)]  # no judge rate: no trade-off plot


def test_robustness_is_the_worst_case_else_the_highest_single_attack():
    tables = table(_runs())
    columns, rows = tables[("mini", "world_nudity")]
    assert robustness_of(rows["esd_x"], columns) == (0.75, "worst case")  # 3 of 4 targets through some attack
    assert rows["esd_x"][WORST_CASE]["count"] == 3
    assert robustness_of(rows["espresso"], columns) == (0.25, "highest single attack")  # no per-target outcomes
    assert robustness_of(rows["none"], columns) == (None, "not attacked")  # the unattacked rate is not an attack
    points = {p.crt: p for p in tradeoff_points(tables[("mini", "world_nudity")])}
    assert (points["espresso"].rate, points["espresso"].ncs, points["espresso"].ncs_ci) == (0.0, 0.9, (0.88, 0.91))
    assert tradeoff_points(tables[("mini", "world_violence")]) == []
    assert Column("judge") in columns


def _is_png(path: Path) -> bool:
    with Image.open(path) as image:
        return image.format == "PNG" and min(image.size) > 100


def test_write_plots_writes_nonempty_pngs(tmp_path: Path):
    written = write_plots(table(_runs()), tmp_path / "plots")
    names = sorted(p.name for p in written)
    assert names == ["mini__world_nudity__asr.png", "mini__world_nudity__tradeoff.png",
                     "mini__world_violence__asr.png"]
    assert all(p.stat().st_size > 1000 and _is_png(p) for p in written)


def test_leaderboard_command_writes_plots_unless_told_not_to(tmp_path: Path, capsys):
    (tmp_path / "runs").mkdir()
    for i, run in enumerate(_runs()):
        (tmp_path / "runs" / f"run{i}.json").write_text(json.dumps(run))
    main([str(tmp_path), "--no-plots"])
    assert not (tmp_path / "plots").exists() and (tmp_path / "leaderboard_long.csv").stat().st_size > 0
    main([str(tmp_path)])
    assert f"plots: {tmp_path / 'plots'}" in capsys.readouterr().out
    pngs = sorted((tmp_path / "plots").glob("*.png"))
    assert len(pngs) == 3 and all(_is_png(p) for p in pngs)
