"""What a person reads: the end-of-run summary, and the HTML report (``python -m runners.report``, ``make report``).

The summary is what a run prints last: this run's concept, CRT and attack with effectiveness (judge rate, CLIP
accuracy), utility (NCS) and robustness (pre/post-ASR of this attack, the any-attack worst case when other attack runs
of the same CRT are committed), each with its interval and n, then where the results went.

The report is one HTML page per concept under ``results/report/`` (``report.dir``), with relative links only, so the
folder can be copied or served as it is:

- the leaderboard table of each model on the concept (:func:`runners.leaderboard.table`) and, on the index page, the
  overall mean-rank table;
- the trade-off and ASR figures of :mod:`runners.plots`, linked from ``results/plots/`` when
  ``python -m runners.leaderboard`` drew them, else drawn into the report's own ``plots/``;
- image grids, rows the CRTs, columns the same prompts and seeds: the unattacked images of the unacceptable prompts,
  the adversarial images of every attack on the same targets, and the acceptable prompts. Images come from the
  store by the keys the run's per-image rows (``results/runs/<stem>.parquet``) name; without that file (it is not
  committed) the keys are recomputed from the results JSON as :mod:`runners.generate` keys them, which finds the
  images a store made with the same library versions. A cell says why it has no image: run not made, no rows, no
  adversarial prompt, or not in the store (the committed JSONs outlive any store).

Thumbnails are small PNG files copied next to the pages. Those of unsafe concepts (judged by NudeNet or Q16, or
marked ``unsafe: true`` in the concept config; world concepts are safe) are blurred in the file itself by default:
``report.unsafe_images=blur|hide|show``.
"""

from __future__ import annotations

import argparse
import html
import logging
import os
import sys
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pandas as pd
from PIL import Image, ImageFilter

from runners.leaderboard import (
    ANY_ATTACK,
    EFFECTIVENESS,
    JUDGE,
    UTILITY,
    Table,
    _cell,
    _direction,
    _methods,
    _pair_warning,
    combined_metrics,
    latest,
    load_runs,
    overall,
    table,
)
from runners.store import Store, atomic_write_bytes, key_of

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
POLICIES = ("blur", "hide", "show")
UNSAFE_JUDGES = frozenset({"nudenet", "q16"})  # NSFW classifiers: a concept they judge shows unsafe images
ROW_COLUMNS = ("system", "set", "prompt", "seed", "image_index", "adversarial_text", "image_key", "delivered_key",
               "flagged", "judge_positive")


# -- the end-of-run summary -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SummaryLine:
    group: str  # effectiveness | utility | robustness
    label: str
    metric: dict[str, Any]


def format_estimate(metric: dict[str, Any]) -> str:
    """``value [lo, hi]`` and ``k/n`` for a count (a rate), ``n=N`` otherwise."""
    value = metric.get("value")
    if value is None:
        return f"n/a  n={metric.get('n', 0)}"
    text = f"{value:.3f}"
    lo, hi = metric.get("ci") or (None, None)
    if lo is not None and hi is not None:
        text += f" [{lo:.3f}, {hi:.3f}]"
    count = metric.get("count")
    return text + (f"  {count}/{metric['n']}" if count is not None else f"  n={metric.get('n')}")


def _arrow(metric: dict[str, Any]) -> str:
    return "↑" if metric.get("higher_is_better") else "↓"


def summary_lines(document: dict[str, Any], worst_case: dict[str, Any] | None = None) -> list[SummaryLine]:
    """The numbers the summary shows, in order; a metric the run did not compute is left out."""
    metrics, labels = document["metrics"], document["labels"]
    attack = labels.get("attack_name", labels["attack"])
    wanted = [("effectiveness", "judge rate, unacceptable", JUDGE),
              ("effectiveness", "CLIP accuracy, unacceptable", EFFECTIVENESS),
              ("utility", "NCS, acceptable", UTILITY)]
    if attack == "none":
        wanted.append(("robustness", "ASR, no attack", f"robustness/pre_asr/{attack}"))
    else:
        wanted += [("robustness", f"pre-ASR, {attack}", f"robustness/pre_asr/{attack}"),
                   ("robustness", f"post-ASR, {attack}", f"robustness/post_asr/{attack}")]
    lines = [SummaryLine(group, label, metrics[name]) for group, label, name in wanted if name in metrics]
    if worst_case is not None:
        lines.append(SummaryLine("robustness", "post-ASR, any attack (worst case)", worst_case))
    return lines


def run_summary(document: dict[str, Any], worst_case: dict[str, Any] | None = None,
                places: dict[str, str] | None = None) -> str:
    """The compact summary of one results document; ``places``: where things went, in the order to show."""
    labels = document["labels"]
    mode = labels.get("attack_mode", "transfer")
    head = (f"{labels['concept']} · {labels['crt']} · {labels.get('attack_name', labels['attack'])} ({mode}) · "
            f"model {labels['model']}")
    lines = summary_lines(document, worst_case)
    width = max((len(f"{line.label} {_arrow(line.metric)}") for line in lines), default=0)
    out, previous = [head], None
    for line in lines:
        group = line.group if line.group != previous else ""
        previous = line.group
        out.append(f"  {group:<15}{line.label + ' ' + _arrow(line.metric):<{width}}  {format_estimate(line.metric)}")
    if worst_case is not None:
        out.append(f"  {'':<15}worst case over: {', '.join(worst_case['attacks'])}")
    if lines:
        out.append(_intervals_line(lines))
    checks = document.get("checks") or {}
    if checks.get("clip_accuracy_meaningful") is False:
        out.append(f"  warning: CLIP accuracy is not meaningful for this pair (evaluator zero-shot "
                   f"{checks['clip_pair_zero_shot']:.2f} < {checks['bar']:.2f}); read the judge rate")
    for name, where in (places or {}).items():
        out.append(f"{name + ':':<13}{where}")
    return "\n".join(out)


def _intervals_line(lines: list[SummaryLine]) -> str:
    """Each interval method with the numbers that use it; the level once when all share it."""
    methods: dict[tuple[float, str], list[str]] = {}
    for line in lines:
        method = (float(line.metric.get("alpha", 0.05)), str(line.metric.get("ci_method", "unnamed")))
        methods.setdefault(method, []).append(line.label.split(",")[0])
    levels = {f"{100 * (1 - alpha):g}%" for alpha, _ in methods}
    uniform = len(levels) == 1
    parts = [("" if uniform else f"{100 * (1 - alpha):g}% ") + f"{method} ({', '.join(dict.fromkeys(names))})"
             for (alpha, method), names in sorted(methods.items())]
    return f"  {levels.pop() + ' ' if uniform else ''}intervals: " + "; ".join(parts)


def _shown(path: str | Path) -> str:
    """A path relative to the working directory when it is under it."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def summarize_results(results_json: Path, store_root: str | Path | None = None, leaderboard: Path | None = None,
                      counters: str | None = None) -> str:
    """The summary of a written results JSON: its numbers, the worst case over every committed attack run of the
    same model, concept and CRT, and where the JSON, its rows, the leaderboard and the store are."""
    import json

    document = json.loads(Path(results_json).read_text())
    labels = document["labels"]
    combined = combined_metrics(load_runs(Path(results_json).parent.parent))
    worst = combined.get((labels["model"], labels["concept"], labels["crt"]), {}).get(ANY_ATTACK)
    places = {"results": _shown(results_json)}
    rows = Path(results_json).parent.parent / document.get("rows", "")
    if document.get("rows") and rows.is_file():
        places["rows"] = _shown(rows) + " (one row per image)"
    if leaderboard is not None and Path(leaderboard).is_file():
        places["leaderboard"] = _shown(leaderboard)
    else:
        places["leaderboard"] = "not rebuilt by this run (python -m runners.leaderboard rebuilds it)"
    if store_root is not None:
        places["store"] = _shown(store_root) + (f" ({counters})" if counters else "")
    return run_summary(document, worst, places)


# -- which images are unsafe to show ------------------------------------------------------------------------------


def is_unsafe(concept_cfg: dict[str, Any]) -> bool:
    """A concept's images are unsafe to show when its config says ``unsafe: true``, or, when it does not say, when an
    NSFW classifier (NudeNet, Q16) judges it. The world's analogs are coloured shapes: safe."""
    explicit = concept_cfg.get("unsafe")
    if explicit is not None:
        return bool(explicit)
    return str((concept_cfg.get("judge") or {}).get("name", "")) in UNSAFE_JUDGES


# -- per-image rows of a run ------------------------------------------------------------------------------------


def image_rows(document: dict[str, Any], results_dir: Path, store: Store | None, per_set: int | None = None
               ) -> tuple[pd.DataFrame | None, str]:
    """(rows, where they came from): the run's rows file, else keys recomputed from the JSON (needs the store)."""
    path = results_dir / document["rows"] if document.get("rows") else None
    if path is not None and path.is_file():
        rows = pd.read_parquet(path)
        return rows[[c for c in ROW_COLUMNS if c in rows.columns]], "rows file"
    if store is None:
        return None, "no rows file and no store"
    rows = recomputed_rows(document, store, per_set)
    return (rows, "keys recomputed from the results JSON") if rows is not None else (None, "no rows file")


def _model_identity(description: dict[str, Any]) -> dict[str, Any]:
    """ModelHandle.identity from the recorded description (which is the identity plus name and location)."""
    keys = ("weights_sha256", "pipeline_class", "dtype", "device_type", "safety_checker")
    return {k: description[k] for k in keys}


def _systems(document: dict[str, Any]) -> tuple[Any, Any]:
    """The base and defended :class:`runners.generate.System` of a run, as runners.stages builds them."""
    from runners.generate import System
    from runners.spec import Family

    model = {"model": _model_identity(document["model"])}
    crt = document["crt"]
    crt_id = {"crt": crt["identity"], "artifact": crt["artifact"]}
    family = Family(crt["family"])
    shares_base = family in (Family.NONE, Family.FILTER)  # runners.stages.shares_base_generator
    defended = System(crt["identity"]["name"], model if shares_base else {**model, **crt_id}, lambda: None,
                      crt_id if family == Family.FILTER else None)
    return System("base", model, lambda: None), defended


class _RecordedAttack:
    """What runners.stages.adversarial_spec reads of an attack, from its record in a results JSON."""

    def __init__(self, record: dict[str, Any]):
        from attacks.base import PUBLIC
        from runners.spec import Access

        self.record = record
        self._needs = frozenset(Access(v) for v in record.get("needs", []))
        self.model_agnostic = self._needs <= PUBLIC
        self.target_set = str(record.get("target_set") or record["identity"]["params"].get("target_set")
                              or "unacceptable")

    def needs(self) -> frozenset:
        return self._needs

    def identity(self) -> dict[str, Any]:
        return self.record["identity"]


def recomputed_rows(document: dict[str, Any], store: Store, per_set: int | None = None) -> pd.DataFrame | None:
    """Rows like the rows file's for the defended images of the evaluated sets and the adversarial images, their keys
    recomputed from the results JSON with :meth:`runners.generate.ImageMaker.image_spec` (and, for adversarial
    images, the stored prompt found by :func:`runners.stages.adversarial_spec`). The first ``per_set`` prompts of each
    set; None when the run's prompt sets are not in the store."""
    from runners.concepts import items_from_json
    from runners.generate import ImageMaker
    from runners.spec import ConceptSpec, GenerationSettings
    from runners.stages import EVALUATED_SETS, adversarial_spec

    concept = document["concept"]
    stored = store.get(concept["prompt_sets"])
    if stored is None:
        return None
    sets = items_from_json(stored.value)
    settings = GenerationSettings(**document["generation"])
    generation = ((document.get("config") or {}).get("model") or {}).get("generation") or {}
    maker = ImageMaker(store, None, settings, row_guidance=bool(generation.get("row_guidance", True)))
    base, defended = _systems(document)
    attack = _RecordedAttack(document["attack"])
    verdicts = {t["target"]: t for t in document["attack"].get("targets") or []}
    rows: list[dict[str, Any]] = []

    def add(system: str, set_name: str, request: Any, key: str | None, positive: bool | None) -> None:
        verdict = None
        if key is not None and defended.filter_identity is not None:  # a filter's stored verdict on the raw image
            verdict = store.get(key_of(maker._flag_spec(defended, key)))
        rows.append({"system": system, "set": set_name, "prompt": request.item.text, "seed": request.seed,
                     "image_index": request.index, "adversarial_text": request.text, "image_key": key,
                     "delivered_key": None, "flagged": None if verdict is None else verdict.value["flagged"],
                     "judge_positive": positive})

    for name in EVALUATED_SETS:
        for request in maker.requests(sets.get(name, [])[:per_set]):
            verdict = verdicts.get(key_of(asdict(request.item)), {}).get("pre") if name == attack.target_set else None
            add("defended", name, request, key_of(maker.image_spec(defended, request)), verdict)
    if attack.identity().get("name") != "none":
        view = SimpleNamespace(attack=attack, base=base, defended=defended, settings=settings,
                               seed=int(document["config"].get("seed", 0)), prompts_key=concept["prompt_sets"],
                               concept=ConceptSpec(concept["key"], concept["c_u"], concept["c_a"], {}),
                               judge=SimpleNamespace(identity=document.get("judge") or {}))
        for request in maker.requests(sets.get(attack.target_set, [])[:per_set]):
            found = store.get(key_of(adversarial_spec(view, request.item)))
            verdict = verdicts.get(key_of(asdict(request.item)), {}).get("adversarial")
            if found is None:  # made by older code under another key, or in another store
                add("adversarial", "unacceptable", request, None, verdict)
            elif (found.value or {}).get("found"):
                adversarial = _adversarial_request(request, found)
                add("adversarial", "unacceptable", adversarial, key_of(maker.image_spec(defended, adversarial)),
                    verdict)
    return pd.DataFrame(rows, columns=list(ROW_COLUMNS))


def _adversarial_request(request: Any, found: Any) -> Any:
    from safetensors.torch import load_file

    from runners.generate import ImageRequest

    value = found.value
    tensors = load_file(str(found.path / "embedding.safetensors")) if value.get("embedding") else {}
    return ImageRequest(request.item, request.index, text=value.get("text"), embedding=tensors.get("embedding"),
                        pooled=tensors.get("pooled"))


# -- thumbnails -------------------------------------------------------------------------------------------------


@dataclass
class Thumbnails:
    """Copies images from the store into ``folder`` as small PNG files, blurred or left out for unsafe concepts."""

    store: Store | None
    folder: Path
    policy: str = "blur"
    size: int = 128
    written: dict[str, str] = field(default_factory=dict)

    def clear(self) -> None:
        """Remove thumbnails of an earlier report (one written under ``show`` must not survive a ``hide``)."""
        if self.folder.is_dir():
            for old in self.folder.glob("*.png"):
                old.unlink()

    def get(self, key: str, unsafe: bool) -> tuple[str | None, str]:
        """(file name in ``folder``, note): no file when hidden or not in the store, and the note says which."""
        if unsafe and self.policy == "hide":
            return None, "hidden: unsafe concept (report.unsafe_images=blur or show)"
        if self.store is None:
            return None, "not in the store (no store here)"
        blur = unsafe and self.policy == "blur"
        name = f"{key}{'-blur' if blur else ''}.png"
        if name in self.written:
            return name, self.written[name]
        from runners.generate import IMAGE_FILE

        entry = self.store.get(key)
        if entry is None or entry.path is None or not (entry.path / IMAGE_FILE).is_file():
            return None, "not in the store"
        with Image.open(entry.path / IMAGE_FILE) as source:
            image = thumbnail(source.convert("RGB"), self.size, blur)
        from runners.generate import png_bytes

        atomic_write_bytes(self.folder / name, png_bytes(image))
        self.written[name] = "blurred: unsafe concept" if blur else ""
        return name, self.written[name]


def thumbnail(image: Image.Image, size: int, blur: bool) -> Image.Image:
    """At most ``size`` pixels a side; blurred so that no detail survives (radius a tenth of the side)."""
    image = image.copy()
    image.thumbnail((size, size))
    if blur:
        image = image.filter(ImageFilter.GaussianBlur(radius=max(2.0, max(image.size) / 10)))
    return image


# -- image grids ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GridCell:
    image: str | None  # file name under img/, or None: ``note`` says why
    note: str
    positive: bool | None = None  # the judge's verdict on this image (None: not recorded)
    flagged: bool = False  # a filter replaced it (the raw image is shown)
    text: str | None = None  # the adversarial prompt


@dataclass(frozen=True)
class Grid:
    title: str
    prompts: list[tuple[str, int]]  # columns: (prompt, seed)
    rows: dict[str, list[GridCell]]  # CRT -> one cell per column


def _crt_order(crts: Iterable[str]) -> list[str]:
    return sorted(crts, key=lambda crt: (crt != "none", crt))


def _label_order(labels: Iterable[str]) -> list[str]:
    return sorted(labels, key=lambda label: (label != "none", label))


def _first_prompts(frames: Iterable[pd.DataFrame], set_name: str, count: int) -> list[tuple[str, int]]:
    """The first ``count`` (prompt, seed) of a set's unattacked images, in prompt-set order."""
    for rows in frames:
        chosen = rows[(rows["system"] == "defended") & (rows["set"] == set_name) & (rows["image_index"] == 0)]
        if len(chosen):
            return list(dict.fromkeys(zip(chosen["prompt"], chosen["seed"].astype(int))))[:count]
    return []


def grid_cell(rows: pd.DataFrame | None, source: str, system: str, set_name: str, prompt: tuple[str, int],
          thumbs: Thumbnails, unsafe: bool) -> GridCell:
    if rows is None:
        return GridCell(None, f"no image keys: {source}")
    match = rows[(rows["system"] == system) & (rows["set"] == set_name) & (rows["prompt"] == prompt[0])
                 & (rows["seed"] == prompt[1]) & (rows["image_index"] == 0)]
    if not len(match):
        return GridCell(None, "no adversarial prompt" if system == "adversarial" else "no image")
    row = match.iloc[0]
    positive = row.get("judge_positive")
    if not isinstance(row["image_key"], str):
        return GridCell(None, "adversarial prompt not in the store", _flag(positive))
    image, note = thumbs.get(row["image_key"], unsafe)
    flagged = row.get("flagged")
    text = row.get("adversarial_text")
    return GridCell(image, note, _flag(positive), bool(_flag(flagged)), text if isinstance(text, str) else None)


def _flag(value: Any) -> bool | None:
    """A recorded yes/no, or None where the rows have none (a missing value in a parquet column)."""
    return None if value is None or pd.isna(value) else bool(value)


@dataclass
class ConceptImages:
    """The runs of one model and concept with their per-image rows."""

    runs: dict[tuple[str, str], dict[str, Any]]  # (crt, attack label) -> results document
    rows: dict[tuple[str, str], tuple[pd.DataFrame | None, str]]

    def frames(self) -> list[pd.DataFrame]:
        return [rows for rows, _ in self.rows.values() if rows is not None]

    def for_crt(self, crt: str) -> tuple[pd.DataFrame | None, str]:
        """The rows of a CRT's unattacked images: its no-attack run's, else any of its runs' (they share them)."""
        labels = _label_order(label for c, label in self.rows if c == crt)
        for label in labels:
            if self.rows[(crt, label)][0] is not None:
                return self.rows[(crt, label)]
        return self.rows[(crt, labels[0])] if labels else (None, "not run")


def concept_grids(images: ConceptImages, thumbs: Thumbnails, unsafe: bool, count: int) -> list[Grid]:
    """Unattacked unacceptable prompts, each attack's adversarial images of the same targets, acceptable prompts."""
    crts = _crt_order({crt for crt, _ in images.runs})
    labels = _label_order({label for _, label in images.runs})
    grids = []
    targets = _first_prompts(images.frames(), "unacceptable", count)
    if targets:
        grids.append(Grid("unacceptable prompts, no attack", targets, {
            crt: [grid_cell(*images.for_crt(crt), "defended", "unacceptable", p, thumbs, unsafe) for p in targets]
            for crt in crts}))
    for label in labels:
        if label == "none":
            continue
        target_set = (images.runs[next(k for k in images.runs if k[1] == label)].get("attack") or {}).get(
            "target_set") or "unacceptable"
        prompts = _first_prompts(images.frames(), target_set, count)
        rows = {}
        for crt in crts:
            if (crt, label) not in images.runs:
                rows[crt] = [GridCell(None, "not run") for _ in prompts]
            else:
                found = images.rows[(crt, label)]
                rows[crt] = [grid_cell(*found, "adversarial", "unacceptable", p, thumbs, unsafe) for p in prompts]
        if prompts:
            grids.append(Grid(f"{target_set} prompts under {label}", prompts, rows))
    acceptable = _first_prompts(images.frames(), "acceptable", count)
    if acceptable:
        grids.append(Grid("acceptable prompts (utility), no attack", acceptable, {
            crt: [grid_cell(*images.for_crt(crt), "defended", "acceptable", p, thumbs, unsafe) for p in acceptable]
            for crt in crts}))
    return grids


# -- HTML -------------------------------------------------------------------------------------------------------

STYLE = """
body { font-family: system-ui, sans-serif; margin: 24px; color: #222; background: #fff; }
h1 { font-size: 22px; } h2 { font-size: 18px; margin-top: 32px; } h3 { font-size: 15px; margin-top: 24px; }
table { border-collapse: collapse; margin: 8px 0 4px; font-size: 12px; }
th, td { border: 1px solid #bbb; padding: 3px 6px; text-align: left; vertical-align: top; }
table.leaderboard th { background: #1f4e79; color: #fff; }
table.leaderboard td:first-child, table.grid th.crt { font-weight: 600; }
table.grid th { background: #eee; max-width: 110px; font-weight: 400; font-size: 11px; }
table.grid td.cell { background: #f2c14e; padding: 3px; width: 96px; }
table.grid td.missing { background: #d9d9d9; color: #444; font-size: 10px; width: 96px; height: 96px; }
table.grid img { width: 96px; height: 96px; image-rendering: pixelated; display: block; }
.verdict { font-size: 10px; display: block; }
.positive { color: #a00; } .negative { color: #060; }
.note { color: #555; font-size: 12px; }
figure { display: inline-block; margin: 8px 16px 8px 0; } figure img { max-width: 720px; }
"""


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _page(title: str, body: list[str]) -> str:
    return "\n".join(["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
                      f"<title>{_e(title)}</title><style>{STYLE}</style></head><body>", *body, "</body></html>", ""])


def leaderboard_html(concept_table: Table) -> list[str]:
    """One model's table on one concept, as in leaderboard.md, and the interval methods under it."""
    columns, rows = concept_table
    out = ['<table class="leaderboard"><thead><tr><th>CRT</th>'
           + "".join(f"<th>{_e(c.header(_direction(c, rows)))}</th>" for c in columns) + "</tr></thead><tbody>"]
    for crt, cells in sorted(rows.items(), key=lambda kv: (kv[0] != "none", kv[0])):
        out.append(f"<tr><td>{_e(crt)}</td>" + "".join(f"<td>{_e(_cell(cells.get(c)))}</td>" for c in columns)
                   + "</tr>")
    out.append("</tbody></table>")
    out.append('<p class="note">Intervals: ' + _e("; ".join(f"{c.title()}: {_methods(c, rows)}" for c in columns))
               + "</p>")
    return out


def grid_html(grid: Grid) -> list[str]:
    out = [f"<h3>{_e(grid.title)}</h3>", '<table class="grid"><thead><tr><th class="crt">CRT</th>']
    out += [f'<th title="{_e(prompt)}">{_e(_short(prompt))}<br>seed {seed}</th>' for prompt, seed in grid.prompts]
    out.append("</tr></thead><tbody>")
    for crt, cells in grid.rows.items():
        out.append(f'<tr><th class="crt">{_e(crt)}</th>' + "".join(_cell_html(cell) for cell in cells) + "</tr>")
    out.append("</tbody></table>")
    return out


def _short(text: str, limit: int = 48) -> str:
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _cell_html(cell: GridCell) -> str:
    verdict = ("" if cell.positive is None else
               '<span class="verdict positive">judge: concept</span>' if cell.positive else
               '<span class="verdict negative">judge: no concept</span>')
    if cell.image is None:
        return f'<td class="missing">{_e(cell.note)}{verdict}</td>'
    flagged = '<span class="verdict">filtered (raw image shown)</span>' if cell.flagged else ""
    note = f'<span class="verdict">{_e(cell.note)}</span>' if cell.note else ""
    title = f' title="{_e(cell.text)}"' if cell.text else ""
    return (f'<td class="cell"{title}><img src="img/{_e(cell.image)}" alt="{_e(cell.text or cell.note or "image")}">'
            f"{verdict}{flagged}{note}</td>")


def _plot_links(model: str, concept: str, concept_table: Table, results_dir: Path, out_dir: Path) -> list[str]:
    """The concept's figures: those ``python -m runners.leaderboard`` drew in results/plots, else drawn here."""
    from runners.plots import write_plots

    names = [f"{model}__{concept}__tradeoff.png", f"{model}__{concept}__asr.png"]
    shared = results_dir / "plots"
    if not all((shared / name).is_file() for name in names):
        shared = out_dir / "plots"
        write_plots({(model, concept): concept_table}, shared)
    return [f'<figure><img src="{_e(os.path.relpath(shared / name, out_dir))}" alt="{_e(name)}"></figure>'
            for name in names if (shared / name).is_file()]


# -- the report -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReportSettings:
    unsafe_images: str = "blur"
    prompts: int = 6  # columns per grid
    thumbnail: int = 128  # pixels a side, at most


def _concept_config(documents: Iterable[dict[str, Any]]) -> dict[str, Any]:
    for document in documents:
        concept = (document.get("config") or {}).get("concept")
        if concept:
            return concept
    return {}


def concept_page(concept: str, tables: dict[tuple[str, str], Table], runs: list[dict[str, Any]], results_dir: Path,
                 out_dir: Path, thumbs: Thumbnails, settings: ReportSettings) -> str:
    models = sorted(model for model, c in tables if c == concept)
    chosen = latest(runs)
    documents = [doc for (_, c, _, _), doc in chosen.items() if c == concept]
    unsafe = is_unsafe(_concept_config(documents))
    body = [f"<h1>Concept {_e(concept)}</h1>", '<p class="note"><a href="index.html">all concepts</a></p>']
    if unsafe:
        body.append(f'<p class="note">Unsafe concept: thumbnails are {_e(settings.unsafe_images)} '
                    "(report.unsafe_images=blur|hide|show).</p>")
    for model in models:
        concept_table = tables[(model, concept)]
        body += [f"<h2>model {_e(model)}: leaderboard</h2>", *leaderboard_html(concept_table)]
        body += [f'<p class="note">{_e(line)}</p>' for line in _pair_warning(runs, model, concept) if line]
        body += ["<h2>trade-off and attack success</h2>",
                 *_plot_links(model, concept, concept_table, results_dir, out_dir)]
        mine = {(crt, label): doc for (m, c, crt, label), doc in chosen.items() if m == model and c == concept}
        images = ConceptImages(mine, {k: image_rows(doc, results_dir, thumbs.store, settings.prompts)
                                      for k, doc in mine.items()})
        body += [f"<h2>model {_e(model)}: images (same prompts and seeds in every row; hover for the prompt)</h2>",
                 f'<p class="note">{_e(_sources(images))}</p>']
        for grid in concept_grids(images, thumbs, unsafe, settings.prompts):
            body += grid_html(grid)
    return _page(f"crt-bench report: {concept}", body)


def _sources(images: ConceptImages) -> str:
    counts: dict[str, int] = {}
    for _, source in images.rows.values():
        counts[source] = counts.get(source, 0) + 1
    return "Image keys per run: " + ", ".join(f"{source}: {n}" for source, n in sorted(counts.items()))


def index_page(tables: dict[tuple[str, str], Table]) -> str:
    concepts = sorted({concept for _, concept in tables})
    body = ["<h1>crt-bench report</h1>", "<ul>"]
    body += [f'<li><a href="{_e(_page_name(c))}">{_e(c)}</a></li>' for c in concepts]
    body.append("</ul>")
    for model, (columns, rows) in sorted(overall(tables).items()):
        body += [f"<h2>Overall, model {_e(model)}: mean rank per CRT across concepts "
                 "(k concepts; lower is better)</h2>",
                 '<table class="leaderboard"><thead><tr><th>CRT, mean rank (k)</th>'
                 + "".join(f"<th>{_e(c.title())}</th>" for c in columns) + "</tr></thead><tbody>"]
        for crt, cells in sorted(rows.items(), key=lambda kv: (kv[0] != "none", kv[0])):
            body.append(f"<tr><td>{_e(crt)}</td>" + "".join(
                f"<td>{cells[c].mean:.2f} ({cells[c].concepts})</td>" if c in cells else "<td></td>"
                for c in columns) + "</tr>")
        body.append("</tbody></table>")
    if not tables:
        body.append("<p>No results yet: `make run` adds the first row.</p>")
    return _page("crt-bench report", body)


def _page_name(concept: str) -> str:
    return f"{concept.replace('/', '-')}.html"


def write_report(results_dir: Path, out_dir: Path, store_root: Path | None,
                 settings: ReportSettings = ReportSettings()) -> list[Path]:
    """index.html and one page per concept; returns the pages written."""
    if settings.unsafe_images not in POLICIES:
        from runners.models import HarnessError

        raise HarnessError(f"report.unsafe_images={settings.unsafe_images!r}; choose one of {', '.join(POLICIES)}")
    runs = load_runs(results_dir)
    tables = table(runs)
    store = Store(store_root) if store_root is not None and Path(store_root).is_dir() else None
    if store is None:
        log.warning("no store at %s: every image cell will say so", store_root)
    thumbs = Thumbnails(store, out_dir / "img", settings.unsafe_images, settings.thumbnail)
    thumbs.clear()
    pages = []
    for concept in sorted({concept for _, concept in tables}):
        path = out_dir / _page_name(concept)
        atomic_write_bytes(path, concept_page(concept, tables, runs, results_dir, out_dir, thumbs, settings).encode())
        pages.append(path)
    atomic_write_bytes(out_dir / "index.html", index_page(tables).encode())
    return [out_dir / "index.html", *pages]


def report_config(overrides: list[str], conf: Path = ROOT / "conf" / "config.yaml") -> dict[str, Any]:
    """``report`` and ``store`` from conf/config.yaml with ``key=value`` overrides (as run.py takes them)."""
    from omegaconf import OmegaConf

    base = OmegaConf.load(conf)
    cfg = OmegaConf.merge({"report": base.get("report") or {}, "store": base.get("store") or {}},
                          OmegaConf.from_dotlist(overrides))
    return OmegaConf.to_container(cfg, resolve=True)


def main(argv: list[str] | None = None) -> int:
    """``python -m runners.report [results_dir] [--out DIR] [--unsafe-images blur|hide|show] [report.key=value ...]``"""
    parser = argparse.ArgumentParser(prog="python -m runners.report", description=main.__doc__)
    parser.add_argument("args", nargs="*", help="the results folder (default results/), then key=value overrides "
                        "of the report: block (report.unsafe_images=show, report.prompts=8, store.root=...)")
    parser.add_argument("--out", type=Path, help="where the pages go (default: report.dir, results/report)")
    parser.add_argument("--unsafe-images", choices=POLICIES, help="thumbnails of unsafe concepts")
    parser.add_argument("--store", type=Path, help="the store the images come from (default: store.root)")
    args = parser.parse_args(argv)
    overrides = [a for a in args.args if "=" in a]
    positional = [a for a in args.args if "=" not in a]
    if len(positional) > 1:
        parser.error(f"one results folder, got {positional}")
    cfg = report_config(overrides)
    report = cfg.get("report") or {}
    results_dir = Path(positional[0]) if positional else ROOT / "results"
    out = args.out or _under_root(report.get("dir", "results/report"))
    store = args.store or _under_root((cfg.get("store") or {}).get("root", "store"))
    settings = ReportSettings(unsafe_images=args.unsafe_images or str(report.get("unsafe_images", "blur")),
                              prompts=int(report.get("prompts", 6)), thumbnail=int(report.get("thumbnail", 128)))
    from runners.models import HarnessError

    try:
        pages = write_report(results_dir, out, store, settings)
    except HarnessError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"report: {_shown(pages[0])} ({len(pages) - 1} concept pages)")
    return 0


def _under_root(path: str | Path) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else ROOT / p


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    sys.exit(main())
