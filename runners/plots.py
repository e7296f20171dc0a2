"""Figures next to the leaderboard (``results/plots/``), one pair per model and concept.

- ``<model>__<concept>__tradeoff.png``: utility (NCS, up is better) against effectiveness (the judge's concept rate
  on unacceptable prompts, left is better), one point per CRT with both intervals as error bars, its colour the
  worst-case post-ASR over every attack (a square when only single attacks' post-ASR are known: their highest, a
  lower bound of the worst case; a grey cross when no attack ran), and the Pareto front of the two axes drawn.
- ``<model>__<concept>__asr.png``: one panel per robustness column of the leaderboard (no attack, each attack and
  mode, the worst case, P4D-UNION), a bar per CRT with its interval, a grey cross where the CRT was not run.

Why the Agg canvas and no pyplot: figures are built off-screen without touching matplotlib's global state, so this
runs on headless machines and inside a sweep.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from runners.leaderboard import Column, Table
from runners.store import atomic_write_bytes

RATE = Column("judge")
NCS = Column("utility")
WORST_CASE = Column("robustness", "any", "worst case")
COLORMAP = "RdYlGn_r"  # post-ASR 0 green, 1 red
DPI = 120


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point dominates when a lower x (concept rate) and a higher y (NCS) are better:
    q dominates p when q is no worse on both axes and differs from p. Equal points are all kept. Ordered by x."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front: list[int] = []
    best: tuple[float, float] | None = None  # the first point (lowest x) with the highest y seen so far
    for i in order:
        x, y = points[i]
        if best is None or y > best[1] or (y == best[1] and x == best[0]):
            front.append(i)
            if best is None or y > best[1]:
                best = (x, y)
    return front


@dataclass(frozen=True)
class TradeoffPoint:
    """One CRT on the trade-off plot; ``robustness_source`` says what its colour is."""

    crt: str
    rate: float
    rate_ci: tuple[float, float] | None
    ncs: float
    ncs_ci: tuple[float, float] | None
    robustness: float | None
    robustness_source: str  # "worst case" | "highest single attack" | "not attacked"


def _value(metric: dict[str, Any] | None) -> float | None:
    value = (metric or {}).get("value")
    return None if value is None or math.isnan(float(value)) else float(value)


def _ci(metric: dict[str, Any]) -> tuple[float, float] | None:
    lo, hi = metric.get("ci") or (None, None)
    return None if lo is None or hi is None else (float(lo), float(hi))


def _single_attack_columns(columns: list[Column]) -> list[Column]:
    """Post-ASR columns of real attacks on the concept's targets (not the unattacked rate, combinations or an
    attack's own target set)."""
    return [c for c in columns if c.kind == "robustness" and c.attack not in ("none", "any", "p4d_union")
            and not c.target_set]


def robustness_of(cells: dict[Column, dict[str, Any]], columns: list[Column]) -> tuple[float | None, str]:
    """The worst-case post-ASR when the leaderboard has it, else the highest single attack's post-ASR."""
    worst = _value(cells.get(WORST_CASE))
    if worst is not None:
        return worst, "worst case"
    singles = [v for c in _single_attack_columns(columns) if (v := _value(cells.get(c))) is not None]
    return (max(singles), "highest single attack") if singles else (None, "not attacked")


def tradeoff_points(table: Table) -> list[TradeoffPoint]:
    """Every CRT of one concept's table with both a judge rate and an NCS."""
    columns, rows = table
    points = []
    for crt, cells in sorted(rows.items()):
        rate, ncs = _value(cells.get(RATE)), _value(cells.get(NCS))
        if rate is None or ncs is None:
            continue
        robustness, source = robustness_of(cells, columns)
        points.append(TradeoffPoint(crt, rate, _ci(cells[RATE]), ncs, _ci(cells[NCS]), robustness, source))
    return points


def _errors(values: Sequence[float], cis: Sequence[tuple[float, float] | None]) -> list[list[float]]:
    """matplotlib's asymmetric error bars (below, above), zero where no interval is known."""
    below = [max(v - ci[0], 0.0) if ci else 0.0 for v, ci in zip(values, cis)]
    above = [max(ci[1] - v, 0.0) if ci else 0.0 for v, ci in zip(values, cis)]
    return [below, above]


def tradeoff_figure(model: str, concept: str, points: list[TradeoffPoint]) -> Figure:
    fig = Figure(figsize=(7.0, 5.0), layout="constrained")
    ax = fig.add_subplot()
    ax.errorbar([p.rate for p in points], [p.ncs for p in points],
                xerr=_errors([p.rate for p in points], [p.rate_ci for p in points]),
                yerr=_errors([p.ncs for p in points], [p.ncs_ci for p in points]),
                fmt="none", ecolor="0.75", elinewidth=0.8, zorder=1)
    mappable = None
    for source, marker in (("worst case", "o"), ("highest single attack", "s")):
        chosen = [p for p in points if p.robustness_source == source]
        if chosen:
            mappable = ax.scatter([p.rate for p in chosen], [p.ncs for p in chosen],
                                  c=[p.robustness for p in chosen], cmap=COLORMAP, vmin=0.0, vmax=1.0, s=60,
                                  marker=marker, edgecolors="black", linewidths=0.6, zorder=3,
                                  label=f"post-ASR: {source}")
    unattacked = [p for p in points if p.robustness_source == "not attacked"]
    if unattacked:
        ax.scatter([p.rate for p in unattacked], [p.ncs for p in unattacked], c="0.5", marker="x", s=50, zorder=3,
                   label="not attacked")
    front = [points[i] for i in pareto_front([(p.rate, p.ncs) for p in points])]
    ax.plot([p.rate for p in front], [p.ncs for p in front], drawstyle="steps-post", color="black",
            linestyle="--", linewidth=1.0, zorder=2, label="Pareto front")
    for p in points:
        ax.annotate(p.crt, (p.rate, p.ncs), textcoords="offset points", xytext=(5, 4), fontsize=8)
    if mappable is not None:
        fig.colorbar(mappable, ax=ax, label="post-ASR (lower is more robust)")
    ax.set_xlabel("judge concept rate, unacceptable prompts (lower erases more)")
    ax.set_ylabel("NCS, acceptable prompts (higher keeps more)")
    ax.set_title(f"{model} / {concept}: erasing vs utility", fontsize=10)
    ax.set_xlim(-0.05, 1.05)
    ax.grid(alpha=0.3)
    legend = ax.legend(fontsize=7, loc="lower right")
    for handle, text in zip(legend.legend_handles, legend.get_texts()):  # shapes only: the colour bar gives colours
        if text.get_text().startswith("post-ASR"):
            handle.set_array(None)
            handle.set_facecolor("white")
    return fig


def asr_figure(model: str, concept: str, table: Table) -> Figure | None:
    """Small multiples: a panel per robustness column, the same CRTs in the same order on every panel."""
    columns, rows = table
    panels = [c for c in columns if c.kind == "robustness"]
    if not panels:
        return None
    crts = sorted(rows, key=lambda crt: (crt != "none", crt))
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig = Figure(figsize=(4.2 * ncols, 0.25 * len(crts) + 2.6 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False, sharey=True)
    for ax, column in zip(axes.flat, panels):
        present = [(i, rows[crt][column]) for i, crt in enumerate(crts) if _value(rows[crt].get(column)) is not None]
        values = [float(m["value"]) for _, m in present]
        ax.bar([i for i, _ in present], values, yerr=_errors(values, [_ci(m) for _, m in present]),
               color="tab:red", alpha=0.75, capsize=2, error_kw={"elinewidth": 0.8})
        missing = sorted(set(range(len(crts))) - {i for i, _ in present})
        ax.scatter(missing, [0.0] * len(missing), marker="x", color="0.5", s=18, clip_on=False, zorder=3)
        ax.set_title(column.title(), fontsize=8)
        ax.set_xticks(range(len(crts)), crts, rotation=60, ha="right", fontsize=7)
        ax.set_ylim(0.0, 1.05)
        ax.grid(axis="y", alpha=0.3)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax in axes[:, 0]:
        ax.set_ylabel("rate (95% interval)")
    fig.suptitle(f"{model} / {concept}: attack success per attack (lower is more robust; x: not run)", fontsize=10)
    return fig


def save_png(fig: Figure, path: Path) -> None:
    """Render with Agg and write atomically (a reader never sees half a file)."""
    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    atomic_write_bytes(path, buffer.getvalue())


def write_plots(tables: dict[tuple[str, str], Table], out_dir: Path) -> list[Path]:
    """Both figures of every (model, concept) table that has data for them; returns the files written."""
    written = []
    for (model, concept), table in sorted(tables.items()):
        points = tradeoff_points(table)
        if points:
            path = out_dir / f"{model}__{concept}__tradeoff.png"
            save_png(tradeoff_figure(model, concept, points), path)
            written.append(path)
        figure = asr_figure(model, concept, table)
        if figure is not None:
            path = out_dir / f"{model}__{concept}__asr.png"
            save_png(figure, path)
            written.append(path)
    return written
