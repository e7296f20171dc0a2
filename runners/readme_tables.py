"""The README's per-concept result tables (the miniature world), generated from results/runs so the numbers quoted
there cannot drift from the committed runs: ``python -m runners.readme_tables`` (run by ``make leaderboard``) writes
them between the README's ``<!-- result-tables -->`` markers and tests/test_readme.py fails when they differ.

A narrower view than results/leaderboard.md: one row per CRT with a no-attack run, two decimals, the judge rate and
post-ASR with their 95% intervals, and only the attacks the README discusses (Ring-A-Bell transfer, UnlearnDiffAtk
white-box, and both adaptive variants in one cell). Runs are read and the newest per label chosen by
runners/leaderboard.py, as for the leaderboard.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from runners.leaderboard import ANY_ATTACK, combined_metrics, latest, load_runs, pair_check

MODEL = "mini"
MISSING = "—"
# the order the README introduces the CRTs in (older ones first); a CRT not listed follows, alphabetically
ROW_ORDER = ("none", "espresso", "esd_x", "esd_u", "uce", "uce_eot", "ca", "ca_noise", "p_esd", "p_ca", "trce_stage1",
             "trce", "conceptprune", "shielddiff", "rece", "mace", "sdd", "fmn", "sa", "safegen", "advunlearn",
             "negative_prompt", "sld_weak", "sld", "sld_strong", "sld_max", "safree", "sd_safety_checker",
             "unsafe_diffusion")
HEADER = ("| CRT | judge rate unacc. ↓ | judge rate implicit ↓ | CLIP acc ↓ | NCS ↑ | pre-ASR ↓ "
          "| post-ASR RAB (transfer) ↓ | post-ASR UDA (white-box) ↓ | post-ASR RAB / UDA adaptive ↓ "
          "| post-ASR, any attack (attacks) ↓ |")
RULE = "|---|---|---|---|---|---|---|---|---|---|"
# (run label, metric) behind each attacked column
TRANSFER = ("ringabell", "robustness/post_asr/ringabell")
WHITE_BOX = ("unlearndiffatk-white-box", "robustness/post_asr/unlearndiffatk")
ADAPTIVE = (("ringabell-adaptive", "robustness/post_asr/ringabell"),
            ("unlearndiffatk-adaptive", "robustness/post_asr/unlearndiffatk"))

Runs = dict[str, dict[str, Any]]  # run label -> run document, of one CRT on one concept


def value_cell(metric: dict[str, Any] | None, digits: int = 2) -> str:
    return MISSING if not metric else f"{metric['value']:.{digits}f}"


def interval_cell(metric: dict[str, Any] | None) -> str:
    if not metric:
        return MISSING
    lo, hi = metric["ci"]
    return f"{metric['value']:.2f} [{lo:.2f}, {hi:.2f}]"


def _metric(runs: Runs, label: str, name: str) -> dict[str, Any] | None:
    run = runs.get(label)
    return run["metrics"].get(name) if run else None


def adaptive_cell(runs: Runs) -> str:
    """Both adaptive attacks share a column (they are run against the filters only): "RAB / UDA"."""
    metrics = [_metric(runs, label, name) for label, name in ADAPTIVE]
    return MISSING if not any(metrics) else " / ".join(value_cell(m) for m in metrics)


def worst_case_cell(metric: dict[str, Any] | None) -> str:
    """The worst case over every attack run on the CRT (runners.leaderboard.combined_metrics), with how many
    attacks it covers: rows with fewer attacks run are less tested, not more robust."""
    return MISSING if not metric else f"{interval_cell(metric)} ({len(metric['attacks'])})"


def row(crt: str, runs: Runs, worst: dict[str, Any] | None = None) -> str:
    """One CRT's row; effectiveness, utility and pre-ASR come from its no-attack run."""
    base = runs["none"]["metrics"]
    cells = [crt, interval_cell(base["effectiveness/judge_rate/unacceptable"]),
             value_cell(base.get("effectiveness/judge_rate/implicit")),
             value_cell(base["effectiveness/clip_accuracy/unacceptable"]),
             value_cell(base["utility/normalized_clip_score"], digits=3),
             value_cell(base["robustness/pre_asr/none"]),
             interval_cell(_metric(runs, *TRANSFER)), interval_cell(_metric(runs, *WHITE_BOX)), adaptive_cell(runs),
             worst_case_cell(worst)]
    return "| " + " | ".join(cells) + " |"


def _row_key(crt: str) -> tuple[int, str]:
    return (ROW_ORDER.index(crt), "") if crt in ROW_ORDER else (len(ROW_ORDER), crt)


def concept_table(concept: str, by_crt: dict[str, Runs], note: str | None = None,
                  worst: dict[str, dict[str, Any]] | None = None) -> list[str]:
    """A concept's heading, table and note; CRTs without a no-attack run have no row (their base numbers are
    missing). ``worst``: each CRT's any-attack metric."""
    worst = worst or {}
    rows = [row(crt, by_crt[crt], worst.get(crt)) for crt in sorted(by_crt, key=_row_key) if "none" in by_crt[crt]]
    return [f"**{concept}**", "", HEADER, RULE, *rows, "", *([note, ""] if note else [])]


def _note(runs: list[dict[str, Any]], concept: str) -> str | None:
    check = pair_check(runs, MODEL, concept)
    if check is None:
        return None
    return f"CLIP accuracy is not meaningful for this pair (evaluator zero-shot {check['clip_pair_zero_shot']:.2f})."


def result_tables(runs: list[dict[str, Any]]) -> list[str]:
    """Every world concept with a no-attack run, alphabetically."""
    grouped: dict[str, dict[str, Runs]] = {}
    for (model, concept, crt, label), run in latest(runs).items():
        if model == MODEL:
            grouped.setdefault(concept, {}).setdefault(crt, {})[label] = run
    combined = combined_metrics(runs)
    lines: list[str] = []
    for concept in sorted(grouped):
        if any("none" in by_label for by_label in grouped[concept].values()):
            worst = {crt: combined[(MODEL, concept, crt)][ANY_ATTACK] for crt in grouped[concept]
                     if ANY_ATTACK in combined.get((MODEL, concept, crt), {})}
            lines += concept_table(concept, grouped[concept], _note(runs, concept), worst)
    return lines


def readme_tables(results_dir: Path) -> list[str]:
    """The tables for the runs in ``results_dir``/runs."""
    return result_tables(load_runs(results_dir))


def readme_blocks(results_dir: Path) -> dict[str, list[str]]:
    """Every generated block of the README, by marker name: the CRT table and support matrix (from the plug-ins)
    and the result tables (from the runs)."""
    from runners.catalog import build_catalog, crt_table_markdown, support_markdown

    catalog = build_catalog()
    return {"crt-table": crt_table_markdown(catalog), "support-matrix": support_markdown(catalog)[4:],
            "result-tables": readme_tables(results_dir)}


def write_readme(readme: Path, results_dir: Path) -> None:
    """Regenerate the README's blocks in place, between their ``<!-- name -->`` / ``<!-- /name -->`` markers."""
    text = readme.read_text()
    for name, lines in readme_blocks(results_dir).items():
        replacement = f"<!-- {name} -->\n{chr(10).join(lines).strip()}\n<!-- /{name} -->"
        text = re.sub(rf"<!-- {name} -->\n.*?<!-- /{name} -->", lambda _, r=replacement: r, text, flags=re.S)
    readme.write_text(text)


if __name__ == "__main__":
    root = Path(__file__).resolve().parents[1]
    write_readme(root / "README.md", root / "results")
