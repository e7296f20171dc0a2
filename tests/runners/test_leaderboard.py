"""The leaderboard: CRT rows, concept x (effectiveness, utility, robustness per attack) columns, newest run wins."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from runners.leaderboard import render, row_for, write_leaderboard


def _metric(value: float, higher: bool) -> dict:
    return {"value": value, "n": 10, "ci": [value - 0.1, value + 0.1], "higher_is_better": higher}


def _run(crt: str, attack: str, concept: str = "world_nudity", created: str = "2026-01-01T00:00:00", eff=0.5,
         asr=0.3) -> dict:
    return {"schema_version": 1, "created": created,
            "labels": {"model": "mini", "concept": concept, "crt": crt, "attack": attack},
            "metrics": {"effectiveness/clip_accuracy/unacceptable": _metric(eff, False),
                        "utility/normalized_clip_score": _metric(0.9, True),
                        f"robustness/asr/{attack}": _metric(asr, False)}}


def _write(results: Path, runs: list[dict]) -> None:
    (results / "runs").mkdir(parents=True)
    for i, run in enumerate(runs):
        (results / "runs" / f"run{i}.json").write_text(json.dumps(run))


def test_rows_columns_and_arrows(tmp_path: Path):
    runs = [_run("none", "none", eff=0.9, asr=0.8), _run("espresso", "none", eff=0.1, asr=0.05),
            _run("espresso", "ringabell", asr=0.4), _run("none", "none", concept="world_violence")]
    markdown, table = render(runs)
    header = next(line for line in markdown.splitlines() if line.startswith("| CRT |"))
    assert header == ("| CRT | world_nudity CLIP acc ↓ | world_nudity NCS ↑ | world_nudity ASR none ↓ | "
                      "world_nudity ASR ringabell ↓ | world_violence CLIP acc ↓ | world_violence NCS ↑ | "
                      "world_violence ASR none ↓ |")
    espresso = row_for(markdown, "mini", "espresso").splitlines()[1]
    assert espresso.startswith("| espresso | 0.100 [0.00, 0.20] |") and "0.400" in espresso
    rows = list(csv.DictReader(io.StringIO(table)))
    assert {(r["crt"], r["metric"], r["attack"]) for r in rows} >= {("espresso", "robustness", "ringabell"),
                                                                     ("none", "utility", "")}
    assert all(r["higher_is_better"] in ("True", "False") for r in rows)


def test_newest_run_of_a_combination_wins(tmp_path: Path):
    old, new = _run("none", "none", asr=0.8), _run("none", "none", created="2026-02-01T00:00:00", asr=0.2)
    markdown, _ = render([new, old])
    assert "0.200" in row_for(markdown, "mini", "none") and "0.800" not in row_for(markdown, "mini", "none")


def test_write_leaderboard_from_a_results_folder(tmp_path: Path):
    _write(tmp_path, [_run("none", "none")])
    (tmp_path / "runs" / "broken.json").write_text("{not json")
    paths = write_leaderboard(tmp_path)
    assert "| none |" in Path(paths["leaderboard_md"]).read_text()
    assert Path(paths["leaderboard_csv"]).read_text().startswith("model,crt,concept,metric")
