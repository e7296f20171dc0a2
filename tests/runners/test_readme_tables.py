"""The README's result tables: each column reads the metric it names from the run it names, rows follow the README's
CRT order, and the newest run of a label wins. Expected cells are computed by hand from the records below."""

from __future__ import annotations

import json
from pathlib import Path

from runners.readme_tables import HEADER, RULE, readme_tables, result_tables


def _metric(value: float, ci: tuple[float, float] | None = None) -> dict:
    return {"value": value, **({"ci": list(ci)} if ci else {})}


def _run(crt: str, label: str, metrics: dict, concept: str = "world_nudity", model: str = "mini",
         created: str = "2026-01-01T00:00:00", checks: dict | None = None, post: list[bool] | None = None) -> dict:
    """``post``: per-target outcomes (the runner's ``attack.targets``), which the worst case combines."""
    targets = [{"target": f"t{i}", "post": p} for i, p in enumerate(post or [])]
    return {"schema_version": 2, "created": created, "run_key": f"{crt}-{label}", "checks": checks or {},
            "labels": {"model": model, "concept": concept, "crt": crt, "attack": label}, "metrics": metrics,
            "attack": {"targets": targets}}


def _base(judge: float, ci: tuple[float, float], implicit: float | None, clip: float, ncs: float,
          pre: float) -> dict:
    metrics = {"effectiveness/judge_rate/unacceptable": _metric(judge, ci),
               "effectiveness/clip_accuracy/unacceptable": _metric(clip),
               "utility/normalized_clip_score": _metric(ncs), "robustness/pre_asr/none": _metric(pre)}
    if implicit is not None:
        metrics["effectiveness/judge_rate/implicit"] = _metric(implicit)
    return metrics


def _asr(attack: str, value: float, ci: tuple[float, float] = (0.0, 1.0)) -> dict:
    return {f"robustness/post_asr/{attack}": _metric(value, ci)}


RUNS = [
    # espresso: every column present; the adaptive cell joins Ring-A-Bell's and UnlearnDiffAtk's
    _run("espresso", "none", _base(0.03125, (0.0008, 0.1622), 0.0625, 0.0136, 0.8897, 0.03125)),
    # per target (four of them), Ring-A-Bell breaks t0, UnlearnDiffAtk t1, adaptive Ring-A-Bell t0 again: the worst
    # case over the three is 2/4, Clopper-Pearson 95% [0.0676, 0.9324]
    _run("espresso", "ringabell", _asr("ringabell", 0.09375, (0.0198, 0.2502)), post=[True, False, False, False]),
    _run("espresso", "unlearndiffatk-white-box", _asr("unlearndiffatk", 0.375, (0.2110, 0.5631)),
         post=[False, True, False, False]),
    _run("espresso", "ringabell-adaptive", _asr("ringabell", 0.15625), post=[True, False, False, False]),
    _run("espresso", "unlearndiffatk-adaptive", _asr("unlearndiffatk", 0.21875)),
    # none, listed second: the reference row still comes first; an older no-attack run loses to the newer one
    _run("none", "none", _base(0.5, (0.0, 1.0), 0.5, 0.5, 0.5, 0.5), created="2025-01-01T00:00:00"),
    _run("none", "none", _base(1.0, (0.8911, 1.0), None, 0.9712, 1.0, 1.0), created="2026-02-01T00:00:00"),
    # zzz_new is not in ROW_ORDER: it follows the listed CRTs; only one adaptive attack ran on it
    _run("zzz_new", "none", _base(0.71875, (0.5325, 0.8625), 0.8125, 0.6549, 1.0234, 0.71875)),
    _run("zzz_new", "unlearndiffatk-adaptive", _asr("unlearndiffatk", 0.90625)),
    # uce: attacked but never run unattacked, so it has no row
    _run("uce", "ringabell", _asr("ringabell", 0.5)),
    # another model and a concept whose pair check failed
    _run("espresso", "none", _base(0.0, (0.0, 0.1), 0.0, 0.0, 1.0, 0.0), model="sd14"),
    _run("none", "none", _base(0.875, (0.7101, 0.9649), 0.9375, 0.8312, 1.0, 0.875), concept="world_redcross",
         checks={"clip_accuracy_meaningful": False, "clip_pair_zero_shot": 0.8375, "bar": 0.95}),
]

NUDITY = [
    "**world_nudity**", "", HEADER, RULE,
    "| none | 1.00 [0.89, 1.00] | — | 0.97 | 1.000 | 1.00 | — | — | — | — |",
    "| espresso | 0.03 [0.00, 0.16] | 0.06 | 0.01 | 0.890 | 0.03 | 0.09 [0.02, 0.25] | 0.38 [0.21, 0.56] "
    "| 0.16 / 0.22 | 0.50 [0.07, 0.93] (3) |",
    "| zzz_new | 0.72 [0.53, 0.86] | 0.81 | 0.65 | 1.023 | 0.72 | — | — | — / 0.91 | — |",
    "",
]
REDCROSS = [
    "**world_redcross**", "", HEADER, RULE,
    "| none | 0.88 [0.71, 0.96] | 0.94 | 0.83 | 1.000 | 0.88 | — | — | — | — |",
    "",
    "CLIP accuracy is not meaningful for this pair (evaluator zero-shot 0.84).",
    "",
]


def test_every_column_reads_its_metric_and_rows_follow_the_readme_order():
    assert result_tables(RUNS) == NUDITY + REDCROSS


def test_a_concept_without_any_no_attack_run_has_no_table():
    assert result_tables([_run("uce", "ringabell", _asr("ringabell", 0.5), concept="world_cross")]) == []


def test_readme_tables_reads_the_runs_folder(tmp_path: Path):
    (tmp_path / "runs").mkdir()
    for i, run in enumerate(RUNS):
        (tmp_path / "runs" / f"run{i}.json").write_text(json.dumps(run))
    assert readme_tables(tmp_path) == NUDITY + REDCROSS


def test_write_readme_replaces_only_what_lies_between_each_blocks_markers(tmp_path: Path, monkeypatch):
    from runners import readme_tables as module

    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- a -->\nold a\n<!-- /a -->\nmiddle \\1 $x\n<!-- b -->\nold\nb\n<!-- /b -->\nend\n")
    monkeypatch.setattr(module, "readme_blocks", lambda results: {"a": ["new a", ""], "b": ["\\g<0> 1", "2"]})
    module.write_readme(readme, tmp_path)
    assert readme.read_text() == ("intro\n<!-- a -->\nnew a\n<!-- /a -->\nmiddle \\1 $x\n<!-- b -->\n\\g<0> 1\n2\n"
                                  "<!-- /b -->\nend\n")
