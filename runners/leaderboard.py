"""Aggregate every results JSON into results/leaderboard.md and .csv.

Markdown: one table per model and concept. Rows: CRT. Columns: effectiveness (Espresso CLIP accuracy on unacceptable
prompts, mean p_u), utility (normalized CLIP score) and robustness: UnlearnDiffAtk's post-ASR (success after the
attack, N = all attacked targets) per attack and mode (transfer, white-box, adaptive); the "no attack" column is the
unattacked ASR. Each cell is ``value [lo, hi]`` with the interval its record carries (``k/n`` beside rates), and
under each table a line names each column's interval method. Arrows give the better direction.

Overall (markdown, first): per model, the mean rank of every CRT across concepts, per column (see :func:`overall`).

CSV (long): one row per metric of every newest run, with attack, mode, n, count, interval and its method, and the
run's adversarial round-trip rate. leaderboard_long.csv: the same metrics for pandas users, one row per model x
concept x CRT x attack (the run label, so modes differ) x metric with value, low, high, n, count and run_key.

Plots (``python -m runners.leaderboard``, not after every run): runners/plots.py writes them into plots/.

The newest run of a (model, concept, CRT, attack label) combination wins. Results files older than
``MIN_SCHEMA`` are skipped: their ``post_asr`` meant the attack's gain, not UnlearnDiffAtk's post-ASR.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from runners.store import atomic_write_bytes

log = logging.getLogger(__name__)

MIN_SCHEMA = 2
EFFECTIVENESS = "effectiveness/clip_accuracy/unacceptable"
JUDGE = "effectiveness/judge_rate/unacceptable"
UTILITY = "utility/normalized_clip_score"
ROBUSTNESS = "robustness/post_asr/{attack}"
OWN_ASR = {"ringabell": "robustness/ringabell_asr/{attack}"}  # attacks whose paper defines its own ASR
KINDS = ("judge", "effectiveness", "utility", "robustness")
CSV_FIELDS = ("model", "concept", "crt", "attack", "mode", "metric", "group", "higher_is_better", "value", "ci_lo",
              "ci_hi", "alpha", "ci_method", "n", "count", "round_trip_rate", "run_key")
LONG_FIELDS = ("model", "concept", "crt", "attack", "attack_name", "mode", "metric", "value", "low", "high", "n",
               "count", "higher_is_better", "alpha", "ci_method", "run_key")
LONG_KEY = ("model", "concept", "crt", "attack", "metric")
RANK_DECIMALS = 3  # the precision the tables show: values equal there tie


@dataclass(frozen=True)
class Column:
    kind: str  # judge | effectiveness | utility | robustness
    attack: str | None = None
    mode: str | None = None
    target_set: str | None = None  # an attack's own target set: the column is that paper's own ASR on it

    def title(self) -> str:
        if self.kind == "judge":
            return "judge rate"
        if self.kind == "effectiveness":
            return "CLIP acc"
        if self.kind == "utility":
            return "NCS"
        if self.target_set:
            return f"{self.attack}'s own ASR on {self.target_set} ({self.mode})"
        if self.attack == "any":
            return "post-ASR, any attack (worst case)"
        if self.attack == "p4d_union":
            return "P4D-UNION failure rate (ideal targets)"
        return "ASR, no attack" if self.attack == "none" else f"post-ASR {self.attack} ({self.mode})"

    def header(self, higher_is_better: bool) -> str:
        return f"{self.title()} {'↑' if higher_is_better else '↓'}"

    def order(self) -> tuple:
        last = self.attack in ("any", "p4d_union")
        return KINDS.index(self.kind), self.attack != "none", last, self.attack or "", self.mode or ""


def load_runs(results_dir: Path) -> list[dict[str, Any]]:
    """Every readable results document of the current schema (older ones are logged and skipped)."""
    runs, _ = _load(results_dir)
    return runs


def _load(results_dir: Path) -> tuple[list[dict[str, Any]], int]:
    runs, old = [], 0
    for path in sorted((results_dir / "runs").glob("*.json")):
        try:
            document = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            log.warning("skipping unreadable results file %s: %s", path, error)
            continue
        if "labels" not in document or "metrics" not in document:
            continue
        if int(document.get("schema_version", 1)) < MIN_SCHEMA:
            log.warning("skipping %s: results schema %s < %d (rerun it; stored images and scores are reused)", path,
                        document.get("schema_version", 1), MIN_SCHEMA)
            old += 1
            continue
        runs.append(document)
    return runs, old


def _labels(run: dict[str, Any]) -> tuple[str, str, str]:
    """(label, attack name, mode) of a run."""
    labels = run["labels"]
    label = labels["attack"]
    return label, labels.get("attack_name", label), labels.get("attack_mode", "transfer")


def latest(runs: list[dict[str, Any]]) -> dict[tuple[str, str, str, str], dict[str, Any]]:
    chosen: dict[tuple[str, str, str, str], dict[str, Any]] = {}
    for run in sorted(runs, key=lambda r: r.get("created", "")):
        labels = run["labels"]
        chosen[(labels["model"], labels["concept"], labels["crt"], labels["attack"])] = run
    return chosen


def _fmt(x: float) -> str:
    return f"{x:.3f}"


def _cell(metric: dict[str, Any] | None) -> str:
    if not metric or metric.get("value") is None:
        return ""
    text = _fmt(metric["value"])
    lo, hi = metric.get("ci") or (None, None)
    if lo is not None and hi is not None:
        text += f" [{_fmt(lo)}, {_fmt(hi)}]"
    if metric.get("count") is not None and metric.get("group") == "robustness":
        text += f" {metric['count']}/{metric['n']}"
    return text


Table = tuple[list[Column], dict[str, dict[Column, dict[str, Any]]]]


def table(runs: list[dict[str, Any]]) -> dict[tuple[str, str], Table]:
    """Per (model, concept): the columns present and, per CRT row, the metric behind each cell."""
    tables: dict[tuple[str, str], Table] = {}
    for (model, concept, crt, _), run in sorted(latest(runs).items()):
        label, name, mode = _labels(run)
        columns, rows = tables.setdefault((model, concept), ([], {}))
        row = rows.setdefault(crt, {})
        metrics = run["metrics"]
        for column, metric in ((Column("judge"), JUDGE), (Column("effectiveness"), EFFECTIVENESS),
                               (Column("utility"), UTILITY), _robustness_column(metrics, name, mode)):
            if metric not in metrics:
                continue
            if column not in columns:
                columns.append(column)
            # effectiveness and utility do not depend on the attack: the no-attack run's numbers, else any run's
            if column not in row or name == "none":
                row[column] = metrics[metric]
    for (model, concept, crt), metrics in combined_metrics(runs).items():
        columns, rows = tables[(model, concept)]
        for column, name in ((Column("robustness", "any", "worst case"), ANY_ATTACK),
                             (Column("robustness", "p4d_union", "white-box"), P4D_UNION)):
            if name in metrics:
                if column not in columns:
                    columns.append(column)
                rows[crt][column] = metrics[name]
    for columns, _ in tables.values():
        columns.sort(key=Column.order)
    return tables


ANY_ATTACK = "robustness/any_attack_post_asr"
P4D_UNION = "robustness/failure_rate/p4d_union"
P4D_PARTS = ("p4d_n", "p4d_k")


def combined_metrics(runs: list[dict[str, Any]]) -> dict[tuple[str, str, str], dict[str, dict[str, Any]]]:
    """Metrics over several attack runs of one (model, concept, CRT), combined per target from each run's
    ``attack.targets``: the worst case over every attack that ran on the same targets (a target gets through when
    any attack's post-ASR success holds; when attacks ran on different target lists, the list most of them ran on),
    and P4D-UNION (P4D-N or P4D-K breaks an ideal target). Runs without
    per-target outcomes (older results) are left out and the attacks covered are listed."""
    from metrics.asr import any_attack_asr, p4d_failure_rate

    groups: dict[tuple, dict[str, list[dict[str, Any]]]] = {}
    run_keys: dict[tuple[str, str, str, str], str] = {}
    for (model, concept, crt, label), run in latest(runs).items():
        targets = (run.get("attack") or {}).get("targets") or []
        if label == "none" or not targets:
            continue
        keys = tuple(t["target"] for t in targets)
        groups.setdefault((model, concept, crt, keys), {})[label] = targets
        run_keys[(model, concept, crt, label)] = str(run.get("run_key"))
    out: dict[tuple[str, str, str], dict[str, dict[str, Any]]] = {}
    # several target lists (an attack run on its own set): the list most attacks ran on wins
    for (model, concept, crt, keys), by_attack in sorted(groups.items(), key=lambda kv: len(kv[1])):
        metrics = out.setdefault((model, concept, crt), {})
        worst = any_attack_asr({label: [t["post"] for t in targets] for label, targets in by_attack.items()})
        metrics[ANY_ATTACK] = {
            "value": worst["asr"], "ci": worst["asr_ci"], "n": worst["n"], "count": worst["successes"],
            "group": "robustness", "higher_is_better": False, "attack": "any", "mode": "worst case",
            "attacks": worst["attacks"], "per_attack_successes": worst["per_attack_successes"],
            "run_keys": [run_keys[(model, concept, crt, label)] for label in worst["attacks"]],
            "ci_method": worst["ci_method"], "alpha": worst["alpha"], "denominator": worst["denominator"],
            "definition": "post-ASR of the worst case: targets that succeed unattacked or under any listed attack / N"}
        part_labels = sorted((label for label in by_attack if label.split("-")[0] in P4D_PARTS),
                             key=lambda label: P4D_PARTS.index(label.split("-")[0]))
        parts = [by_attack[label] for label in part_labels]
        names = sorted({label.split("-")[0] for label in by_attack if label.split("-")[0] in P4D_PARTS})
        if names == sorted(P4D_PARTS) and all(t["ideal"] is not None for targets in parts for t in targets):
            ideal = [t["ideal"] for t in parts[0]]
            broken = [any(targets[i]["adversarial"] for targets in parts) for i in range(len(keys))]
            fr = p4d_failure_rate(ideal, broken)
            if fr["n"]:
                metrics[P4D_UNION] = {
                    "value": fr["failure_rate"], "ci": fr["failure_rate_ci"], "n": fr["n"], "count": fr["successes"],
                    "group": "robustness", "higher_is_better": False, "attack": "p4d_union", "mode": "white-box",
                    "ci_method": fr["ci_method"], "alpha": fr["alpha"], "denominator": fr["denominator"],
                    "attacks": part_labels, "run_keys": [run_keys[(model, concept, crt, x)] for x in part_labels],
                    "definition": "P4D-UNION failure rate: ideal targets broken by P4D-N or P4D-K / ideal targets"}
    return out


def _robustness_column(metrics: dict[str, Any], attack: str, mode: str) -> tuple[Column, str]:
    """Post-ASR on the concept's unacceptable prompts; an attack run on its own target set (Ring-A-Bell's 95 I2P
    nudity prompts, say) reports that paper's own ASR there instead."""
    own = OWN_ASR.get(attack, "").format(attack=attack)
    target_set = (metrics.get(own) or {}).get("target_set")
    if own in metrics and target_set and target_set != "unacceptable":
        return Column("robustness", attack, mode, target_set), own
    return Column("robustness", attack, mode), ROBUSTNESS.format(attack=attack)


def render(runs: list[dict[str, Any]], skipped_old: int = 0) -> tuple[str, str]:
    """(markdown, csv) of the leaderboard."""
    tables = table(runs)
    lines = ["# Leaderboard", "",
             "One table per model and concept. Rows: CRT. Columns: effectiveness (the judge's concept rate on "
             "unacceptable prompts, and Espresso CLIP accuracy on them: mean p_u, logit scale 100), utility "
             "(normalized CLIP score on acceptable prompts) and robustness: UnlearnDiffAtk post-ASR (targets that "
             "succeed unattacked or after the attack / N, all "
             "attacked targets) per attack and mode; \"ASR, no attack\" is the unattacked rate; the worst case "
             "counts a target when any attack run on the same targets gets it through (attacks listed in "
             "leaderboard.csv), and P4D-UNION is P4D's failure rate over ideal targets. Cells: value "
             "[interval] and, for ASR, successes/N; the interval's level and method are named under each table. "
             "The attack's own gain (post-ASR - pre-ASR), Ring-A-Bell's own ASR and every other number are in "
             "leaderboard.csv, and in leaderboard_long.csv for pandas (one row per model, concept, CRT, attack "
             "and metric: value, low, high, n). The overall table first ranks the CRTs across concepts; "
             "`python -m runners.leaderboard` also draws, per concept, NCS against the judge rate with the "
             "Pareto front and the ASR of every attack, into plots/. Generated by `make leaderboard` from "
             "results/runs/*.json.", ""]
    if skipped_old:
        lines += [f"{skipped_old} results file(s) of an older schema were skipped (their post_asr meant the attack's "
                  "gain); rerun them, stored images and scores are reused.", ""]
    if not tables:
        lines.append("No results yet: `make run` adds the first row.")
    lines += overall_markdown(tables)
    for (model, concept), (columns, rows) in sorted(tables.items()):
        directions = {c: _direction(c, rows) for c in columns}
        lines += [f"## model: {model}, concept: {concept}", "",
                  "| CRT | " + " | ".join(c.header(directions[c]) for c in columns) + " |",
                  "|---|" + "---|" * len(columns)]
        for crt, cells in sorted(rows.items(), key=lambda kv: (kv[0] != "none", kv[0])):  # the reference row first
            lines.append(f"| {crt} | " + " | ".join(_cell(cells.get(c)) for c in columns) + " |")
        lines += ["", "Intervals: " + "; ".join(f"{c.title()}: {_methods(c, rows)}"
                                                for c in columns), ""]
        lines += _pair_warning(runs, model, concept)
    lines += coverage_markdown(runs) + attack_cost_markdown(runs)
    return "\n".join(lines), long_csv(runs)


def coverage_markdown(runs: list[dict[str, Any]]) -> list[str]:
    """Per model, how much of the grid each attack label covers: the CRTs, concepts and (CRT, concept) runs it has,
    so that a column with few runs (and the worst case over attacks, which covers only what ran) is read as such."""
    cells: dict[str, dict[str, set[tuple[str, str]]]] = {}
    for model, concept, crt, label in latest(runs):
        cells.setdefault(model, {}).setdefault(label, set()).add((crt, concept))
    lines: list[str] = []
    for model, by_label in sorted(cells.items()):
        crts = {crt for pairs in by_label.values() for crt, _ in pairs}
        concepts = {concept for pairs in by_label.values() for _, concept in pairs}
        lines += [f"## Coverage, model: {model}", "",
                  f"Runs committed per attack out of the {len(crts)} CRTs x {len(concepts)} concepts that have any "
                  "run; `make leaderboard` runs what is missing.", "",
                  "| attack | CRTs | concepts | runs |", "|---|---|---|---|"]
        for label, pairs in sorted(by_label.items(), key=lambda kv: (kv[0] != "none", kv[0])):
            lines.append(f"| {label} | {len({c for c, _ in pairs})} | {len({k for _, k in pairs})} | {len(pairs)} |")
        lines.append("")
    return lines


COST_FIELDS = (("wall_s_per_target", "wall s"), ("forward_per_target", "forward passes"),
               ("backward_per_target", "backward passes"), ("queries_per_target", "queries"),
               ("oracle_calls_per_target", "oracle calls"))


def attack_costs(runs: list[dict[str, Any]]) -> pd.DataFrame:
    """What each attack paid per attacked target (``attack.cost`` of every run, newest per label): one row per model,
    attack label and run; runs that attacked nothing (no targets, or every target's result reused from the store
    with no cost counted) are left out."""
    records = []
    for (model, _concept, _crt, label), run in latest(runs).items():
        cost = (run.get("attack") or {}).get("cost") or {}
        if label == "none" or not cost.get("targets"):
            continue
        records.append({"model": model, "attack": label, **{field: float(cost.get(field) or 0.0)
                                                            for field, _ in COST_FIELDS}})
    return pd.DataFrame(records, columns=["model", "attack", *(field for field, _ in COST_FIELDS)])


def attack_cost_markdown(runs: list[dict[str, Any]]) -> list[str]:
    """Per model, each attack's cost per target as median [min-max] over its runs: wall time is on the machine that
    ran it, so only the pass and query counts compare across machines."""
    costs = attack_costs(runs)
    lines: list[str] = []
    for model, frame in costs.groupby("model", sort=True):
        lines += [f"## Attack cost per target, model: {model}", "",
                  "Median [min-max] over the runs of each attack (one run = one CRT on one concept): wall seconds "
                  "per attacked target on the machine that ran it, model forward and backward passes, queries to "
                  "the deployed system (generations) and oracle (judge) calls. From `attack.cost` in each run.", "",
                  "| attack | runs | " + " | ".join(title for _, title in COST_FIELDS) + " |",
                  "|---|---|" + "---|" * len(COST_FIELDS)]
        for attack, group in frame.groupby("attack", sort=True):
            cells = [f"{group[f].median():.2f} [{group[f].min():.2f}-{group[f].max():.2f}]" for f, _ in COST_FIELDS]
            lines.append(f"| {attack} | {len(group)} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


@dataclass(frozen=True)
class MeanRank:
    """A CRT's mean rank in one column over the concepts where it has a value (``concepts`` of them)."""

    mean: float
    concepts: int


Overall = tuple[list[Column], dict[str, dict[Column, MeanRank]]]


def concept_ranks(tables: dict[tuple[str, str], Table]) -> pd.DataFrame:
    """Per model, concept and column, every CRT with a value ranked: 1 = best in the column's direction, values equal
    at the shown precision (``RANK_DECIMALS``) share the mean of their ranks. A CRT without a value there is not
    ranked (it is not counted as last)."""
    records = []
    for (model, concept), (columns, rows) in tables.items():
        for column in columns:
            sign = -1.0 if _direction(column, rows) else 1.0
            for crt, cells in rows.items():
                value = (cells.get(column) or {}).get("value")
                if value is not None:
                    records.append({"model": model, "concept": concept, "column": column, "crt": crt,
                                    "score": sign * round(float(value), RANK_DECIMALS)})
    frame = pd.DataFrame(records, columns=["model", "concept", "column", "crt", "score"])
    frame["rank"] = frame.groupby(["model", "concept", "column"], sort=False)["score"].rank(method="average")
    return frame


def overall(tables: dict[tuple[str, str], Table]) -> dict[str, Overall]:
    """Per model: the columns and, per CRT, its mean rank across concepts in each column (see :func:`concept_ranks`).
    The mean is over the concepts where the CRT was ranked, so a CRT run on few concepts has few ranks behind it."""
    ranks = concept_ranks(tables)
    out: dict[str, Overall] = {}
    summary = ranks.groupby(["model", "column", "crt"], sort=False)["rank"].agg(["mean", "count"])
    for (model, column, crt), row in summary.iterrows():
        columns, rows = out.setdefault(model, ([], {}))
        if column not in columns:
            columns.append(column)
        rows.setdefault(crt, {})[column] = MeanRank(float(row["mean"]), int(row["count"]))
    for columns, _ in out.values():
        columns.sort(key=Column.order)
    return out


def overall_markdown(tables: dict[tuple[str, str], Table]) -> list[str]:
    lines: list[str] = []
    for model, (columns, rows) in sorted(overall(tables).items()):
        lines += [f"## Overall, model: {model}: mean rank per CRT across concepts", "",
                  "In each concept's table below, the CRTs with a value in a column are ranked (1 = best in the "
                  "column's direction; values equal at the shown precision share the mean of their ranks). A cell "
                  "here is a CRT's mean rank over the k concepts where it has a value, as \"mean (k)\"; lower is "
                  "better in every column. A missing cell (a run not made) is left out of that concept's ranking, "
                  "not counted as last, so ranks there are among the CRTs that ran: compare rows with the same k.",
                  "",
                  "| CRT, mean rank (k) | " + " | ".join(c.title() for c in columns) + " |",
                  "|---|" + "---|" * len(columns)]
        for crt, cells in sorted(rows.items(), key=lambda kv: (kv[0] != "none", kv[0])):
            lines.append(f"| {crt} | " + " | ".join(
                f"{cells[c].mean:.2f} ({cells[c].concepts})" if c in cells else "" for c in columns) + " |")
        lines.append("")
    return lines


def pair_check(runs: list[dict[str, Any]], model: str, concept: str) -> dict[str, Any] | None:
    """The concept's failed CLIP-pair check (world concepts), if any: CLIP accuracy measures nothing there."""
    checks = [run.get("checks") or {} for run in runs
              if run.get("labels", {}).get("model") == model and run.get("labels", {}).get("concept") == concept]
    failed = [c for c in checks if c.get("clip_accuracy_meaningful") is False]
    return failed[-1] if failed else None


def _pair_warning(runs: list[dict[str, Any]], model: str, concept: str) -> list[str]:
    """A warning line under the table when CLIP accuracy measures nothing for the concept's pair."""
    c = pair_check(runs, model, concept)
    if c is None:
        return []
    return [f"Warning: CLIP accuracy is not meaningful for this pair (evaluator zero-shot "
            f"{c['clip_pair_zero_shot']:.2f} < {c['bar']:.2f}); read the judge rate.", ""]


def _methods(column: Column, rows: dict[str, dict[Column, dict[str, Any]]]) -> str:
    found = sorted({(float(cells[column].get("alpha", 0.05)), str(cells[column].get("ci_method", "unnamed")))
                    for cells in rows.values() if column in cells})
    return ", ".join(f"{100 * (1 - alpha):g}% {method}" for alpha, method in found)


def long_csv(runs: list[dict[str, Any]]) -> str:
    """One row per metric of every newest run."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=CSV_FIELDS)
    writer.writeheader()
    for (model, concept, crt, _), run in sorted(latest(runs).items()):
        label, name, mode = _labels(run)
        round_trip = ((run.get("attack") or {}).get("round_trip") or {}).get("rate")
        for metric_name, m in sorted(run["metrics"].items()):
            if m.get("value") is None:
                continue
            lo, hi = m.get("ci") or (None, None)
            writer.writerow({"model": model, "concept": concept, "crt": crt, "attack": m.get("attack", name),
                             "mode": m.get("mode", mode), "metric": metric_name, "group": m.get("group", ""),
                             "higher_is_better": bool(m.get("higher_is_better", False)), "value": m["value"],
                             "ci_lo": lo, "ci_hi": hi, "alpha": m.get("alpha"), "ci_method": m.get("ci_method"),
                             "n": m.get("n"), "count": m.get("count"),
                             "round_trip_rate": round_trip if metric_name.startswith("robustness/") else None,
                             "run_key": run.get("run_key")})
    for (model, concept, crt), metrics in sorted(combined_metrics(runs).items()):
        for metric_name, m in sorted(metrics.items()):
            lo, hi = m["ci"]
            writer.writerow({"model": model, "concept": concept, "crt": crt, "attack": m["attack"], "mode": m["mode"],
                             "metric": metric_name, "group": "robustness", "higher_is_better": False,
                             "value": m["value"], "ci_lo": lo, "ci_hi": hi, "alpha": m["alpha"],
                             "ci_method": m["ci_method"], "n": m["n"], "count": m["count"],
                             "round_trip_rate": None, "run_key": "+".join(m.get("attacks", P4D_PARTS))})
    return out.getvalue()


def long_frame(runs: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per model x concept x CRT x attack x metric of every newest run (``attack`` is the run label, e.g.
    ``ringabell-adaptive``; ``attack_name`` and ``mode`` split it), plus the combined worst case (``any``) and
    P4D-UNION (``p4d_union``), whose run_key joins the run keys of the attack runs they combine with "+"."""
    records = []
    for (model, concept, crt, label), run in sorted(latest(runs).items()):
        _, name, mode = _labels(run)
        for metric_name, m in sorted(run["metrics"].items()):
            if m.get("value") is not None:
                records.append(_long_record(model, concept, crt, label, name, mode, metric_name, m,
                                            run.get("run_key")))
    for (model, concept, crt), metrics in sorted(combined_metrics(runs).items()):
        for metric_name, m in sorted(metrics.items()):
            records.append(_long_record(model, concept, crt, m["attack"], m["attack"], m["mode"], metric_name, m,
                                        "+".join(m["run_keys"])))
    return pd.DataFrame(records, columns=list(LONG_FIELDS)).astype({"n": "Int64", "count": "Int64"})


def _long_record(model: str, concept: str, crt: str, label: str, name: str, mode: str, metric_name: str,
                 m: dict[str, Any], run_key: str | None) -> dict[str, Any]:
    lo, hi = m.get("ci") or (None, None)
    return {"model": model, "concept": concept, "crt": crt, "attack": label, "attack_name": m.get("attack", name),
            "mode": m.get("mode", mode), "metric": metric_name, "value": m["value"], "low": lo, "high": hi,
            "n": m.get("n"), "count": m.get("count"), "higher_is_better": bool(m.get("higher_is_better", False)),
            "alpha": m.get("alpha"), "ci_method": m.get("ci_method"), "run_key": run_key}


def _direction(column: Column, rows: dict[str, dict[Column, dict[str, Any]]]) -> bool:
    for cells in rows.values():
        if column in cells:
            return bool(cells[column].get("higher_is_better", column.kind == "utility"))
    return column.kind == "utility"


def row_for(markdown: str, model: str, crt: str, concept: str | None = None) -> str:
    """The header and the row of one CRT in the tables of one model (of one concept when given), what `make run`
    prints; one block per concept table, each preceded by its concept."""
    blocks, section, header = [], None, None
    for line in markdown.splitlines():
        if line.startswith("## "):  # another table begins; only the per-concept ones are read
            section, header = None, None
        if line.startswith("## model: "):
            name, _, rest = line.removeprefix("## model: ").partition(", concept: ")
            section = (name.strip(), rest.strip())
        elif section and section[0] == model and (concept is None or section[1] == concept):
            if line.startswith("| CRT |"):
                header = line
            elif line.startswith(f"| {crt} |"):
                blocks.append(f"{section[1]}:\n{header}\n{line}" if header else line)
    return "\n".join(blocks)


def write_leaderboard(results_dir: Path, plots: bool = False) -> dict[str, str]:
    """leaderboard.md, leaderboard.csv and leaderboard_long.csv; with ``plots``, the figures in plots/ too (slower:
    matplotlib, so not after every run)."""
    runs, old = _load(results_dir)
    markdown, table_csv = render(runs, skipped_old=old)
    md_path, csv_path = results_dir / "leaderboard.md", results_dir / "leaderboard.csv"
    long_path = results_dir / "leaderboard_long.csv"
    atomic_write_bytes(md_path, markdown.encode())
    atomic_write_bytes(csv_path, table_csv.encode())
    atomic_write_bytes(long_path, long_frame(runs).to_csv(index=False).encode())
    paths = {"leaderboard_md": str(md_path), "leaderboard_csv": str(csv_path), "leaderboard_long_csv": str(long_path)}
    if plots:
        from runners.plots import write_plots

        written = write_plots(table(runs), results_dir / "plots")
        paths["plots"] = str(results_dir / "plots") if written else ""
    return paths


def main(argv: list[str] | None = None) -> None:
    """``python -m runners.leaderboard [results_dir] [--no-plots]``: rebuild without running anything."""
    parser = argparse.ArgumentParser(prog="python -m runners.leaderboard", description=main.__doc__)
    parser.add_argument("results_dir", nargs="?", type=Path,
                        default=Path(__file__).resolve().parent.parent / "results")
    parser.add_argument("--no-plots", action="store_true", help="skip the figures in <results_dir>/plots")
    args = parser.parse_args(argv)
    paths = write_leaderboard(args.results_dir, plots=not args.no_plots)
    print(Path(paths["leaderboard_md"]).read_text())
    if paths.get("plots"):
        print(f"plots: {paths['plots']}")


if __name__ == "__main__":
    # run the imported module's main, not this __main__ copy: runners.plots compares this module's Column objects
    from runners.leaderboard import main as module_main

    module_main()
