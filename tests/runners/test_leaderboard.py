"""The leaderboard: one table per model and concept, CRT rows, effectiveness, utility and post-ASR per attack and
mode, every cell with its interval; newest run wins; a long CSV of every metric."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

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
    rows = [line.split(" | ")[0] for line in markdown.splitlines() if line.startswith("| ") and "CRT" not in line]
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
