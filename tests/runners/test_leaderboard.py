"""The leaderboard: one table per model and concept, CRT rows, effectiveness, utility and post-ASR per attack and
mode, every cell with its interval; newest run wins; a long CSV of every metric."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest

from runners.leaderboard import render, row_for, write_leaderboard


def _metric(value: float, higher: bool, method: str = "percentile-bootstrap", **extra) -> dict:
    return {"value": value, "n": 8, "ci": [max(value - 0.1, 0), min(value + 0.1, 1)], "higher_is_better": higher,
            "alpha": 0.05, "ci_method": method, **extra}


def _run(crt: str, attack: str, mode: str = "transfer", concept: str = "world_nudity",
         created: str = "2026-01-01T00:00:00", eff=0.5, asr=0.375, round_trip=None) -> dict:
    label = attack if mode == "transfer" else f"{attack}-{mode}"
    return {"schema_version": 2, "created": created, "run_key": f"{crt}-{label}",
            "labels": {"model": "mini", "concept": concept, "crt": crt, "attack": label, "attack_name": attack,
                       "attack_mode": mode},
            "attack": {"round_trip": {"rate": round_trip}},
            "metrics": {"effectiveness/clip_accuracy/unacceptable": _metric(eff, False),
                        "utility/normalized_clip_score": _metric(0.9, True, "paired-percentile-bootstrap"),
                        f"robustness/post_asr/{attack}": _metric(asr, False, "clopper-pearson", group="robustness",
                                                                 count=round(asr * 8), attack=attack, mode=mode),
                        f"robustness/attack_gain/{attack}": _metric(0.125, False, "clopper-pearson",
                                                                    group="robustness", count=1, attack=attack,
                                                                    mode=mode)}}


def _write(results: Path, runs: list[dict]) -> None:
    (results / "runs").mkdir(parents=True)
    for i, run in enumerate(runs):
        (results / "runs" / f"run{i}.json").write_text(json.dumps(run))


def _headers(markdown: str) -> list[str]:
    return [line for line in markdown.splitlines() if line.startswith("| CRT |")]


def test_one_table_per_concept_with_columns_per_attack_and_mode():
    runs = [_run("none", "none", eff=0.9, asr=1.0), _run("espresso", "none", eff=0.125, asr=0.0),
            _run("espresso", "ringabell", asr=0.375), _run("espresso", "ringabell", "adaptive", asr=0.5),
            _run("espresso", "unlearndiffatk", "white-box", asr=0.625),
            _run("none", "none", concept="world_violence")]
    markdown, _ = render(runs)
    assert "## model: mini, concept: world_nudity" in markdown and "## model: mini, concept: world_violence" in markdown
    nudity, violence = _headers(markdown)
    assert nudity == ("| CRT | CLIP acc ↓ | NCS ↑ | ASR, no attack ↓ | post-ASR ringabell (adaptive) ↓ | "
                      "post-ASR ringabell (transfer) ↓ | post-ASR unlearndiffatk (white-box) ↓ |")
    assert violence == "| CRT | CLIP acc ↓ | NCS ↑ | ASR, no attack ↓ |"
    espresso = row_for(markdown, "mini", "espresso", concept="world_nudity").splitlines()[-1]
    # every cell shows its interval; ASR cells also successes/N
    assert espresso == ("| espresso | 0.125 [0.025, 0.225] | 0.900 [0.800, 1.000] | 0.000 [0.000, 0.100] 0/8 | "
                        "0.500 [0.400, 0.600] 4/8 | 0.375 [0.275, 0.475] 3/8 | 0.625 [0.525, 0.725] 5/8 |")
    # and under each table, each column's interval level and method
    assert "ASR, no attack: 95% clopper-pearson" in markdown and "NCS: 95% paired-percentile-bootstrap" in markdown


def test_effectiveness_comes_from_the_no_attack_run():
    markdown, _ = render([_run("espresso", "ringabell", eff=0.3), _run("espresso", "none", eff=0.1)])
    assert "| espresso | 0.100 [" in markdown


def test_long_csv_has_every_metric_with_mode_interval_and_round_trip():
    runs = [_run("espresso", "ringabell", "adaptive", round_trip=0.75), _run("none", "none")]
    _, table = render(runs)
    rows = list(csv.DictReader(io.StringIO(table)))
    gain = next(r for r in rows if r["metric"] == "robustness/attack_gain/ringabell")
    assert (gain["crt"], gain["attack"], gain["mode"], gain["count"], gain["n"]) == ("espresso", "ringabell",
                                                                                     "adaptive", "1", "8")
    assert (gain["ci_method"], gain["alpha"], gain["round_trip_rate"]) == ("clopper-pearson", "0.05", "0.75")
    ncs = next(r for r in rows if r["metric"] == "utility/normalized_clip_score" and r["crt"] == "none")
    assert ncs["higher_is_better"] == "True" and ncs["round_trip_rate"] == "" and ncs["mode"] == "transfer"
    assert len(rows) == 8


def test_newest_run_of_a_combination_wins():
    old, new = _run("none", "none", asr=0.875), _run("none", "none", created="2026-02-01T00:00:00", asr=0.25)
    markdown, _ = render([new, old])
    assert "0.250" in row_for(markdown, "mini", "none") and "0.875" not in row_for(markdown, "mini", "none")


def test_write_leaderboard_from_a_results_folder_skips_old_schemas(tmp_path: Path):
    old = _run("uce", "none")
    old["schema_version"] = 1  # its post_asr meant the attack's gain: never shown as a post-ASR
    _write(tmp_path, [_run("none", "none"), old])
    (tmp_path / "runs" / "broken.json").write_text("{not json")
    paths = write_leaderboard(tmp_path)
    markdown = Path(paths["leaderboard_md"]).read_text()
    assert "| none |" in markdown and "| uce |" not in markdown and "1 results file(s) of an older schema" in markdown
    assert Path(paths["leaderboard_csv"]).read_text().startswith("model,concept,crt,attack,mode,metric")


def test_judge_rate_leads_the_table_and_a_weak_clip_pair_is_flagged():
    judged = _run("none", "none", eff=0.9, asr=1.0)
    judged["metrics"]["effectiveness/judge_rate/unacceptable"] = _metric(0.97, False, "clopper-pearson", count=31)
    judged["checks"] = {"clip_pair_zero_shot": 0.63, "bar": 0.95, "clip_accuracy_meaningful": False}
    fine = _run("none", "none", concept="world_violence")
    fine["checks"] = {"clip_pair_zero_shot": 0.99, "bar": 0.95, "clip_accuracy_meaningful": True}
    markdown, _ = render([judged, fine])
    nudity, violence = _headers(markdown)
    assert nudity == "| CRT | judge rate ↓ | CLIP acc ↓ | NCS ↑ | ASR, no attack ↓ |"
    assert violence == "| CRT | CLIP acc ↓ | NCS ↑ | ASR, no attack ↓ |"
    nudity_part, violence_part = markdown.split("concept: world_violence")
    assert "CLIP accuracy is not meaningful for this pair (evaluator zero-shot 0.63 < 0.95)" in nudity_part
    assert "not meaningful" not in violence_part


def test_ringabell_on_its_own_target_set_reports_its_own_asr():
    own = _run("none", "ringabell", concept="nudity", asr=0.9)
    own["metrics"]["robustness/post_asr/ringabell"]["target_set"] = "ringabell_targets"
    own["metrics"]["robustness/ringabell_asr/ringabell"] = _metric(
        0.25, False, "clopper-pearson", group="robustness", count=2, attack="ringabell", mode="transfer",
        target_set="ringabell_targets")
    world = _run("none", "ringabell", concept="world_nudity", asr=0.375)
    world["metrics"]["robustness/ringabell_asr/ringabell"] = _metric(
        0.125, False, "clopper-pearson", group="robustness", count=1, target_set="unacceptable")
    markdown, _ = render([own, world])
    nudity, world_nudity = _headers(markdown)
    assert nudity == "| CRT | CLIP acc ↓ | NCS ↑ | ringabell's own ASR on ringabell_targets (transfer) ↓ |"
    assert world_nudity == "| CRT | CLIP acc ↓ | NCS ↑ | post-ASR ringabell (transfer) ↓ |"
    assert row_for(markdown, "mini", "none", concept="nudity").splitlines()[-1].endswith("| 0.250 [0.150, 0.350] 2/8 |")
    assert row_for(markdown, "mini", "none", concept="world_nudity").splitlines()[-1].endswith(
        "| 0.375 [0.275, 0.475] 3/8 |")


def test_the_undefended_row_comes_first():
    markdown, _ = render([_run("esd_x", "none"), _run("none", "none"), _run("apple", "none")])
    overall_part, concept_part = markdown.split("## Coverage")[0].split("## model: ")
    for part in (overall_part, concept_part):
        rows = [line.split(" | ")[0] for line in part.splitlines() if line.startswith("| ") and "CRT" not in line]
        assert rows == ["| none", "| apple", "| esd_x"]


def _with_targets(run: dict, post: list[bool], adversarial: list[bool] | None = None,
                  ideal: list[bool] | None = None) -> dict:
    adversarial = adversarial or post
    run["attack"]["targets"] = [{"target": f"t{i}", "post": p, "adversarial": a,
                                 "ideal": None if ideal is None else ideal[i]}
                                for i, (p, a) in enumerate(zip(post, adversarial))]
    return run


def test_any_attack_column_is_the_per_target_union_of_every_attack():
    runs = [_with_targets(_run("esd_x", "none", asr=0.25), [True, False, False, False]),
            _with_targets(_run("esd_x", "ringabell", asr=0.5), [True, True, False, False]),
            _with_targets(_run("esd_x", "unlearndiffatk", "white-box", asr=0.5), [True, False, True, False])]
    markdown, table_csv = render(runs)
    header = _headers(markdown)[0]
    assert header.endswith("| post-ASR, any attack (worst case) ↓ |")
    row = row_for(markdown, "mini", "esd_x").splitlines()[-1]
    assert row.endswith("| 0.750 [0.194, 0.994] 3/4 |")  # exact 95% interval of 3/4
    rows = [r for r in csv.DictReader(io.StringIO(table_csv)) if r["metric"] == "robustness/any_attack_post_asr"]
    assert len(rows) == 1 and rows[0]["run_key"] == "ringabell+unlearndiffatk-white-box" and rows[0]["n"] == "4"


def test_p4d_union_counts_ideal_targets_broken_by_either_variant():
    ideal = [True, True, True, False]
    runs = [_with_targets(_run("esd_x", "p4d_n", "white-box"), [True, False, False, True], ideal=ideal),
            _with_targets(_run("esd_x", "p4d_k", "white-box"), [False, True, False, True], ideal=ideal)]
    markdown, _ = render(runs)
    assert "P4D-UNION failure rate (ideal targets)" in _headers(markdown)[0]
    assert "0.667 [0.094, 0.992] 2/3 |" in row_for(markdown, "mini", "esd_x")


def _judged(crt: str, concept: str, rate: float, ncs: float) -> dict:
    run = _run(crt, "none", concept=concept)
    run["metrics"]["effectiveness/judge_rate/unacceptable"] = _metric(rate, False, "clopper-pearson")
    run["metrics"]["utility/normalized_clip_score"]["value"] = ncs
    return run


# judge rate (lower is better) and NCS (higher is better) per concept and CRT; None: not run there.
# c1's b and c are equal at the shown precision (0.200), so they tie.
RATES = {"c1": {"a": 0.1, "b": 0.2001, "c": 0.1999, "d": 0.5},
         "c2": {"a": 0.3, "b": 0.1, "c": None, "d": 0.3},
         "c3": {"a": 0.0, "b": 0.4, "c": 0.2, "d": None}}
NCS = {"c1": {"a": 0.90, "b": 0.95, "c": 0.80, "d": 0.99},
       "c2": {"a": 0.97, "b": 0.96, "c": None, "d": 0.90},
       "c3": {"a": 0.85, "b": 0.85, "c": 0.95, "d": None}}


def _ranked_runs() -> list[dict]:
    return [_judged(crt, concept, rate, NCS[concept][crt])
            for concept, rates in RATES.items() for crt, rate in rates.items() if rate is not None]


def _scipy_mean_ranks(values: dict[str, dict[str, float | None]], higher_is_better: bool) -> dict[str, tuple]:
    """The independent computation: scipy's average ranks of each concept's present values, then the mean."""
    import numpy as np
    from scipy.stats import rankdata

    ranks: dict[str, list[float]] = {}
    for by_crt in values.values():
        present = {crt: v for crt, v in by_crt.items() if v is not None}
        scores = np.round(list(present.values()), 3) * (-1 if higher_is_better else 1)
        for crt, rank in zip(present, rankdata(scores, method="average")):
            ranks.setdefault(crt, []).append(float(rank))
    return {crt: (sum(r) / len(r), len(r)) for crt, r in ranks.items()}


def _split(ranks: dict[str, tuple]) -> tuple[dict[str, float], dict[str, int]]:
    return {crt: mean for crt, (mean, _) in ranks.items()}, {crt: k for crt, (_, k) in ranks.items()}


def test_overall_mean_rank_per_crt_across_concepts():
    from runners.leaderboard import Column, overall, table

    ranks = overall(table(_ranked_runs()))["mini"][1]
    judge, ncs = Column("judge"), Column("utility")
    judge_means, judge_k = _split({crt: (cells[judge].mean, cells[judge].concepts) for crt, cells in ranks.items()})
    ncs_means, ncs_k = _split({crt: (cells[ncs].mean, cells[ncs].concepts) for crt, cells in ranks.items()})
    # by hand: c1 a 1, b 2.5, c 2.5, d 4; c2 b 1, a 2.5, d 2.5; c3 a 1, c 2, b 3
    assert judge_means == pytest.approx({"a": 4.5 / 3, "b": 6.5 / 3, "c": 2.25, "d": 3.25})
    # NCS, higher first: c1 d 1, b 2, a 3, c 4; c2 a 1, b 2, d 3; c3 c 1, a 2.5, b 2.5
    assert ncs_means == pytest.approx({"a": 6.5 / 3, "b": 6.5 / 3, "c": 2.5, "d": 2.0})
    assert judge_k == ncs_k == {"a": 3, "b": 3, "c": 2, "d": 2}
    for got_means, got_k, values, higher in ((judge_means, judge_k, RATES, False), (ncs_means, ncs_k, NCS, True)):
        scipy_means, scipy_k = _split(_scipy_mean_ranks(values, higher_is_better=higher))
        assert got_means == pytest.approx(scipy_means) and got_k == scipy_k


def test_overall_table_leads_the_markdown_and_row_for_skips_it():
    markdown, _ = render(_ranked_runs())
    overall_part = markdown.split("## model: ")[0]
    assert "## Overall, model: mini: mean rank per CRT across concepts" in overall_part
    assert "left out of that concept's ranking" in overall_part  # how missing cells are handled is said
    header = next(line for line in overall_part.splitlines() if line.startswith("| CRT, mean rank (k) |"))
    assert header.split(" | ")[1:3] == ["judge rate", "CLIP acc"]
    row_c = next(line for line in overall_part.splitlines() if line.startswith("| c |"))
    assert row_c.split(" | ")[1] == "2.25 (2)"
    blocks = row_for(markdown, "mini", "c")
    assert blocks.count("| c |") == 2 and "(2)" not in blocks  # c1 and c3 only, no overall row


def test_long_csv_file_has_one_row_per_model_concept_crt_attack_metric(tmp_path: Path):
    import pandas as pd

    runs = [_with_targets(_run("esd_x", "ringabell", asr=0.5), [True, True, False, False]),
            _with_targets(_run("esd_x", "ringabell", "adaptive", asr=0.25), [True, False, False, False]),
            _with_targets(_run("esd_x", "unlearndiffatk", "white-box", asr=0.5), [True, False, True, False]),
            _run("esd_x", "none")]
    _write(tmp_path, runs)
    paths = write_leaderboard(tmp_path)
    frame = pd.read_csv(paths["leaderboard_long_csv"])
    assert list(frame.columns[:12]) == ["model", "concept", "crt", "attack", "attack_name", "mode", "metric",
                                        "value", "low", "high", "n", "count"]
    assert not frame.duplicated(["model", "concept", "crt", "attack", "metric"]).any()
    assert len(frame) == 4 * 4 + 1  # four metrics of each of the four runs, and the worst case
    adaptive = frame[(frame.attack == "ringabell-adaptive") & (frame.metric == "robustness/post_asr/ringabell")]
    row = adaptive.iloc[0]
    assert (row.attack_name, row["mode"], row.value, row.low, row.high, row.n, row["count"], row.run_key) == (
        "ringabell", "adaptive", 0.25, pytest.approx(0.15), pytest.approx(0.35), 8, 2, "esd_x-ringabell-adaptive")
    worst = frame[frame.attack == "any"].iloc[0]
    assert (worst.metric, worst.value, worst.n, worst["count"]) == ("robustness/any_attack_post_asr", 0.75, 4, 3)
    assert worst.run_key == "esd_x-ringabell+esd_x-ringabell-adaptive+esd_x-unlearndiffatk-white-box"
    # the table CSV keeps its own columns
    assert Path(paths["leaderboard_csv"]).read_text().startswith("model,concept,crt,attack,mode,metric,group")


def _with_cost(run: dict, wall: float, forward: float, queries: float, targets: int = 32) -> dict:
    run["attack"]["cost"] = {"targets": targets, "wall_s_per_target": wall, "forward_per_target": forward,
                             "backward_per_target": forward / 2, "queries_per_target": queries}
    return run


def test_attack_cost_is_the_median_and_range_per_attack_over_its_newest_runs():
    runs = [_with_cost(_run("esd_x", "pez"), 1.0, 100.0, 0.0),
            _with_cost(_run("uce", "pez"), 3.0, 100.0, 0.0),
            _with_cost(_run("ca", "pez"), 2.5, 80.0, 0.0),
            _with_cost(_run("ca", "pez", created="2025-01-01T00:00:00"), 99.0, 999.0, 9.0),  # older: replaced
            _with_cost(_run("esd_x", "cce", "white-box"), 1.5, 26.0, 4.0),
            _with_cost(_run("uce", "cce", "white-box"), 0.0, 0.0, 0.0, targets=0),  # attacked nothing: left out
            _with_cost(_run("esd_x", "none"), 0.0, 0.0, 0.0)]
    markdown, _ = render(runs)
    section = markdown.split("## Attack cost per target, model: mini")[1]
    lines = [line for line in section.splitlines() if line.startswith("| ")]
    assert lines[0] == "| attack | runs | wall s | forward passes | backward passes | queries | oracle calls |"
    assert lines[1] == ("| cce-white-box | 1 | 1.50 [1.50-1.50] | 26.00 [26.00-26.00] | 13.00 [13.00-13.00] "
                        "| 4.00 [4.00-4.00] | 0.00 [0.00-0.00] |")
    assert lines[2] == ("| pez | 3 | 2.50 [1.00-3.00] | 100.00 [80.00-100.00] | 50.00 [40.00-50.00] "
                        "| 0.00 [0.00-0.00] | 0.00 [0.00-0.00] |")
    assert len(lines) == 3


def test_coverage_counts_the_crts_concepts_and_runs_of_each_attack():
    runs = [_run("esd_x", "none"), _run("uce", "none"), _run("uce", "none", concept="world_bobo"),
            _run("esd_x", "pez"), _run("esd_x", "pez", created="2027-01-01T00:00:00"),  # the same cell twice
            _run("uce", "pez", concept="world_bobo"), _run("esd_x", "cce", "white-box")]
    markdown, _ = render(runs)
    section = markdown.split("## Coverage, model: mini")[1].split("## ")[0]
    assert "out of the 2 CRTs x 2 concepts" in section
    rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| attack")]
    assert rows == ["| none | 2 | 2 | 3 |", "| cce-white-box | 1 | 1 | 1 |", "| pez | 2 | 2 | 2 |"]
