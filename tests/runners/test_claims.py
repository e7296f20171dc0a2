"""The claims report: each comparison's verdict follows from the two intervals, and a claim combines them."""

from __future__ import annotations

import pytest

from runners import claims
from runners.claims import FAILS, HOLDS, OPEN, combine, judge_comparison


def _m(value: float, lo: float, hi: float, count: int | None = None, n: int = 32) -> dict:
    return {"value": value, "ci": [lo, hi], "count": count, "n": n}


@pytest.mark.parametrize("a, b, relation, expected", [
    (_m(0.1, 0.0, 0.2), _m(0.6, 0.4, 0.8), "lower", HOLDS),
    (_m(0.6, 0.4, 0.8), _m(0.1, 0.0, 0.2), "lower", FAILS),
    (_m(0.3, 0.1, 0.5), _m(0.5, 0.3, 0.7), "lower", OPEN),
    (_m(1.0, 0.89, 1.0), _m(1.0, 0.89, 1.0), "lower", FAILS),  # no effect at all
    (_m(0.55, 0.4, 0.7), _m(0.5, 0.3, 0.7), "lower", FAILS),
    (_m(0.0, 0.0, 0.11), _m(0.0, 0.0, 0.11), "lower", OPEN),  # both at the floor: nothing to lower
    (_m(0.95, 0.9, 1.0), _m(1.0, 0.98, 1.02), "similar", HOLDS),
    (_m(0.7, 0.6, 0.8), _m(1.0, 0.98, 1.02), "similar", FAILS),
    (None, _m(1.0, 0.98, 1.02), "similar", "missing"),
])
def test_a_comparison_is_judged_from_the_intervals(a, b, relation, expected):
    assert judge_comparison(a, b, relation) == expected


def test_a_claim_holds_only_when_every_comparison_holds():
    assert combine([HOLDS, HOLDS]) == HOLDS
    assert combine([HOLDS, OPEN]) == OPEN
    assert combine([OPEN, FAILS, HOLDS]) == FAILS
    assert combine([HOLDS, "missing"]) == "missing runs"


def _run(crt: str, attack: str, metrics: dict, meta: dict | None = None) -> dict:
    return {"created": "2026-01-01", "labels": {"model": "mini", "concept": "world_nudity", "crt": crt,
                                                "attack": attack, "attack_name": attack.split("-")[0]},
            "metrics": metrics, "attack": {}, "crt": {"meta": meta or {}}}


def test_render_reads_the_runs_and_reports_the_pruned_fraction():
    runs = [_run("none", "none", {claims.JUDGE.name: _m(1.0, 0.89, 1.0, 32)}),
            _run("conceptprune", "none", {claims.JUDGE.name: _m(0.25, 0.11, 0.43, 8)},
                 meta={"pruned_fraction_unet": 0.0012})]
    text = claims.render(runs)
    section = text.split("## ConceptPrune")[1].split("## ShieldDiff")[0]
    assert "| conceptprune | none | judge rate, unacceptable | 0.250 [0.110, 0.430] (8/32) |" in section
    assert "Verdict on world_nudity: **holds**" in section
    assert "pruned fraction unet: 0.1200%" in section
    assert "Verdict on world_violence: **missing runs**" in section
