"""Concept configs -> :class:`ConceptSpec`: inline prompt lists (the world) or published files (real concepts).

Why: prompt sets are data with licences; the repository ships only their descriptions (URL at a pinned commit,
sha256, columns, row filter). Files are fetched at run time, verified byte for byte, and kept in a download cache,
so a result always names exactly which prompts it was computed on.

A source may also say how its rows become prompts, so that a paper's own selection is data, not code:
``filter`` (row conditions, all must hold: ``[{column: nudity_percentage, gt: 50}]``), ``text_templates`` (the
first template whose ``when`` conditions hold builds the text from columns: ``{template: "{nudity}, {location}"}``),
``repeat_each`` (each row n times in a row, seeds unchanged) and ``drop`` (positions in the repeated list, removed).
A row's ``case`` is its ``case_column`` value, else its 0-based data-row index in the file (before filtering), so a
filtered I2P subset keeps I2P's own case numbers. ``skip_lines`` skips leading lines of a ``lines`` file (a header).

Some prompt files may not be redistributed or downloaded by the harness (MMA-Diffusion's gated adversarial prompts) or
were never published (Espresso's Elon Musk test prompts): their source names ``user_path`` (null until the user passes
it) instead of a URL, and the file is read where it is, never copied. Such a set is required unless it says
``optional: true``; an optional one is left out until given, and asking for it (as an attack's target set) without it
fails. :func:`check_concept_inputs` checks this, and the judge's weights, before any model is loaded.
"""

from __future__ import annotations

import csv
import io
import logging
import shutil
import urllib.error
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runners.models import HarnessError
from runners.spec import ConceptSpec, PromptItem
from runners.store import atomic_write_bytes, sha256_file

log = logging.getLogger(__name__)

FILTER_OPS = {
    "eq": lambda cell, value: _num_or_str(cell) == value,
    "ne": lambda cell, value: _num_or_str(cell) != value,
    "gt": lambda cell, value: float(cell) > float(value),
    "ge": lambda cell, value: float(cell) >= float(value),
    "lt": lambda cell, value: float(cell) < float(value),
    "le": lambda cell, value: float(cell) <= float(value),
    "contains": lambda cell, value: str(value) in str(cell),
    "in_list": lambda cell, value: str(value) in [part.strip() for part in str(cell).split(",")],
    # the cell split at commas without stripping the parts: "violence, self-harm" holds "violence" but
    # "self-harm, violence" does not (Ring-A-Bell's violence rule, concepts.md §2: 731 I2P rows, not 756)
    "in_list_raw": lambda cell, value: str(value) in str(cell).split(","),
}


class PromptSourceUnavailable(HarnessError):
    pass


class JudgeWeightsMissing(HarnessError):
    pass


def is_user_source(source: dict[str, Any]) -> bool:
    """A file only the user can supply: read from ``user_path``, never downloaded or copied."""
    return "user_path" in source


def user_source_missing(concept_key: str, set_name: str, source: dict[str, Any]) -> str:
    """The one line that says what file a user-supplied prompt set needs and where to pass it."""
    what = source.get("what") or "a prompt file the harness does not download"
    gated = f"; request access at {source['gated']} and never redistribute it" if source.get("gated") else ""
    return (f"concept {concept_key!r}: prompt set {set_name!r} needs {what}{gated}; pass "
            f"concept.prompts.{set_name}.source.user_path=/path/to/{source.get('file') or 'prompts'}")


def user_file(source: dict[str, Any]) -> Path:
    """The user's own copy, checked against ``sha256`` when the config pins one."""
    path = Path(str(source["user_path"])).expanduser()
    if not path.is_file():
        raise PromptSourceUnavailable(f"prompt file {path} (source.user_path) does not exist")
    expected = source.get("sha256")
    if expected and (got := sha256_file(path)) != expected:
        raise PromptSourceUnavailable(f"prompt file {path} has sha256 {got}, expected {expected}: refusing to use it")
    return path


def _num_or_str(cell: str) -> Any:
    try:
        return float(cell)
    except ValueError:
        return cell


@dataclass
class SourceFetcher:
    """Gets a published prompt file: download cache, then local mirrors, then the URL; always checks sha256."""

    cache_dir: Path
    mirrors: list[Path] = field(default_factory=list)
    timeout_s: float = 20.0

    def fetch(self, source: dict[str, Any]) -> Path:
        if is_user_source(source):
            if not source.get("user_path"):
                raise PromptSourceUnavailable("this prompt file is only read from source.user_path, which is not set")
            return user_file(source)
        expected = source["sha256"]
        cached = self.cache_dir / expected
        if cached.is_file() and sha256_file(cached) == expected:
            return cached
        for mirror in self.mirrors:
            candidate = Path(mirror) / source.get("path", "")
            if source.get("path") and candidate.is_file() and sha256_file(candidate) == expected:
                self.cache_dir.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(candidate, cached)
                return cached
        data = self._download(source)
        self._verify(data, source)
        atomic_write_bytes(cached, data)
        return cached

    def _download(self, source: dict[str, Any]) -> bytes:
        url = source["url"]
        try:
            with urllib.request.urlopen(url, timeout=self.timeout_s) as response:  # noqa: S310 - https URLs in configs
                return response.read()
        except (urllib.error.URLError, OSError, ValueError) as error:
            reason = getattr(error, "reason", error)
            hint = f" or a mirror folder holding {source['path']} (data.mirrors=[...])" if source.get("path") else ""
            raise PromptSourceUnavailable(
                f"could not download prompt file {url} ({reason}); put it at {self.cache_dir / source['sha256']}"
                f"{hint}") from None

    @staticmethod
    def _verify(data: bytes, source: dict[str, Any]) -> None:
        import hashlib

        got = hashlib.sha256(data).hexdigest()
        if got != source["sha256"]:
            raise PromptSourceUnavailable(
                f"prompt file {source['url']} has sha256 {got}, expected {source['sha256']}: refusing to use it")


def read_source(path: Path, source: dict[str, Any], default_seed: int) -> list[PromptItem]:
    """Rows of a fetched file as prompt items (format ``csv`` or ``lines``)."""
    text = path.read_bytes().decode(source.get("encoding", "utf-8"))
    fmt = source.get("format", "csv")
    if fmt == "lines":
        lines = [line.strip() for line in text.splitlines()[int(source.get("skip_lines", 0)):]]
        items = [PromptItem(line, int(source.get("seed", default_seed)), None, str(i))
                 for i, line in enumerate(line for line in lines if line)]
        return _expand(items, source)
    if fmt != "csv":
        raise HarnessError(f"unknown prompt source format {fmt!r} (use csv or lines)")
    delimiter = source.get("delimiter", ",")
    if source.get("header", True):
        table: Iterable[dict[str, str]] = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    else:  # headerless files: columns are named "0", "1", ...
        table = ({str(i): cell for i, cell in enumerate(row)}
                 for row in csv.reader(io.StringIO(text, newline=""), delimiter=delimiter) if row)
    items = [_row_item(i, row, source, default_seed) for i, row in enumerate(table)
             if _keep(row, source.get("filter", []))]
    return _expand(items, source)


def _keep(row: dict[str, str], conditions: Iterable[dict[str, Any]]) -> bool:
    for condition in conditions:
        ops = [k for k in condition if k != "column"]
        if len(ops) != 1 or ops[0] not in FILTER_OPS:
            raise HarnessError(f"prompt filter {dict(condition)!r} needs a column and one of {sorted(FILTER_OPS)}")
        if condition["column"] not in row:
            raise HarnessError(f"prompt filter names column {condition['column']!r}; the file has {sorted(row)}")
        op = ops[0]
        if not FILTER_OPS[op](row[condition["column"]], condition[op]):
            return False
    return True


def _row_text(row: dict[str, str], source: dict[str, Any]) -> str:
    templates = source.get("text_templates")
    if not templates:
        return row[source.get("text_column", "prompt")].strip()
    for template in templates:
        if _keep(row, template.get("when") or []):
            try:
                return str(template["template"]).format(**row).strip()
            except KeyError as error:
                raise HarnessError(f"text template {template['template']!r} names column {error}; the file has "
                                   f"{sorted(row)}") from None
    raise HarnessError(f"no text template applies to row {row!r}; end the list with one without `when`")


def _row_item(i: int, row: dict[str, str], source: dict[str, Any], default_seed: int) -> PromptItem:
    seed_column, guidance_column = source.get("seed_column"), source.get("guidance_column")
    case_column = source.get("case_column")
    seed = int(source.get("seed", default_seed))
    if seed_column and row.get(seed_column):
        seed = int(float(row[seed_column]))
    guidance = float(row[guidance_column]) if guidance_column and row.get(guidance_column) else None
    case = row[case_column] if case_column and row.get(case_column) not in (None, "") else str(i)
    return PromptItem(_row_text(row, source), seed, guidance, case)


def _expand(items: list[PromptItem], source: dict[str, Any]) -> list[PromptItem]:
    """``repeat_each`` copies of every item in a row (case ``<case>/<copy>``), then ``drop`` those positions."""
    repeat = int(source.get("repeat_each", 1))
    if repeat < 1:
        raise HarnessError(f"repeat_each must be >= 1, got {repeat}")
    if repeat > 1:
        items = [PromptItem(item.text, item.seed, item.guidance, f"{item.case}/{k}")
                 for item in items for k in range(repeat)]
    drop = {int(i) for i in source.get("drop") or []}
    outside = sorted(i for i in drop if not 0 <= i < len(items))
    if outside:
        raise HarnessError(f"drop names positions {outside} outside the {len(items)} rows of the set")
    return [item for i, item in enumerate(items) if i not in drop]


def inline_items(rows: list[dict[str, Any]]) -> list[PromptItem]:
    items = []
    for i, row in enumerate(rows):
        guidance = row.get("guidance")
        items.append(PromptItem(str(row["text"]), int(row.get("seed", 0)),
                                None if guidance is None else float(guidance), str(row.get("case", i))))
    return items


def prompt_sets(cfg: dict[str, Any], fetcher: SourceFetcher, default_seed: int,
                max_per_set: int | None = None) -> dict[str, list[PromptItem]]:
    """Every prompt set of a concept config, each cut to its first ``max_per_set`` items when given."""
    sets: dict[str, list[PromptItem]] = {}
    for name, spec in (cfg.get("prompts") or {}).items():
        if isinstance(spec, dict) and "source" in spec and is_user_source(spec["source"]) \
                and not spec["source"].get("user_path"):
            message = user_source_missing(str(cfg.get("key")), name, spec["source"])
            if not spec.get("optional"):
                raise PromptSourceUnavailable(message)
            log.info("prompt set %s left out (%s)", name, message)
            continue
        if isinstance(spec, dict) and "source" in spec:
            items = _read_named(cfg, name, fetcher.fetch(spec["source"]), spec["source"], default_seed)
            limit = spec.get("limit")
            items = items[:limit] if limit else items
        elif isinstance(spec, list):
            items = inline_items(spec)
        else:
            raise HarnessError(f"concept {cfg.get('key')!r}: prompt set {name!r} must be a list or {{source: ...}}")
        if not items:
            raise HarnessError(f"concept {cfg.get('key')!r}: prompt set {name!r} is empty; give it prompts, or loosen "
                               f"its source's filter")
        sets[name] = items[:max_per_set] if max_per_set else items
    return sets


def _read_named(cfg: dict[str, Any], name: str, path: Path, source: dict[str, Any],
                default_seed: int) -> list[PromptItem]:
    """``read_source``, with a malformed file (a missing column, a seed that is not a number, bad bytes) reported as
    one line naming the concept, the set and the file."""
    file_name = Path(str(source.get("path") or source.get("user_path") or source.get("url") or path)).name
    try:
        return read_source(path, source, default_seed)
    except KeyError as error:
        raise HarnessError(f"concept {cfg.get('key')!r}: prompt set {name!r}: {file_name} has no column {error} "
                           f"(set the source's text_column / seed_column to one it has)") from None
    except (ValueError, csv.Error, UnicodeDecodeError) as error:
        raise HarnessError(f"concept {cfg.get('key')!r}: prompt set {name!r}: {file_name} is malformed "
                           f"({str(error).splitlines()[0][:160]})") from None


def check_concept_inputs(cfg: dict[str, Any], target_set: str | None = None) -> None:
    """Stop a run in seconds, before a model is loaded, on what only the user can supply: a required (or targeted)
    user-supplied prompt file, and weights the judge needs that the harness cannot download (unless the run stops
    before anything is judged). Fills in the sha256 of each given user file, so the prompt-set key names its content."""
    concept = cfg.get("concept") or {}
    for name, spec in (concept.get("prompts") or {}).items():
        source = spec.get("source") if isinstance(spec, dict) else None
        if not (isinstance(source, dict) and is_user_source(source)):
            continue
        if source.get("user_path"):
            source["sha256"] = sha256_file(user_file(source))
        elif not spec.get("optional") or name == target_set:
            raise PromptSourceUnavailable(user_source_missing(str(concept.get("key")), name, source))
    if cfg.get("stop_after") not in ("prompts", "fit"):
        require_judge_weights(cfg)


def require_judge_weights(cfg: dict[str, Any]) -> None:
    """One line naming what the run's judge lacks and the override that supplies it (:class:`JudgeWeightsMissing`).

    The judge is the concept's unless ``judge`` names another; a concept may describe what its judge's unset weights
    must be (``judge_needs``: e.g. a celebrity recogniser, which no one publishes for download)."""
    from metrics.judges import missing_weights

    chosen = dict(cfg.get("judge") or {})
    concept = cfg.get("concept") or {}
    from_concept = chosen.pop("from_concept", True)
    judge, prefix = (dict(concept.get("judge") or {}), "concept.judge") if from_concept else (chosen, "judge")
    if not judge:
        return
    missing = missing_weights(judge)
    if missing is None:
        return
    needs = (concept.get("judge_needs") if from_concept and missing.unset else None) or missing.needs
    name = judge.get("name") or judge.get("handler")
    raise JudgeWeightsMissing(f"concept {concept.get('key')!r}: judge {name!r} needs {needs}; pass "
                              f"{prefix}.{missing.param}={missing.example}, or score with another judge (judge=...)")


def concept_spec(cfg: dict[str, Any], sets: dict[str, list[PromptItem]]) -> ConceptSpec:
    missing = [k for k in ("key", "c_u", "c_a") if not cfg.get(k)]
    if missing:
        raise HarnessError(f"concept config lacks {missing}")
    return ConceptSpec(key=cfg["key"], c_u=cfg["c_u"], c_a=cfg["c_a"],
                       prompts={name: tuple(items) for name, items in sets.items()}, judge=dict(cfg.get("judge") or {}))


def items_to_json(sets: dict[str, list[PromptItem]] | dict[str, tuple[PromptItem, ...]]) -> dict[str, list[dict]]:
    return {name: [{"text": i.text, "seed": i.seed, "guidance": i.guidance, "case": i.case} for i in items]
            for name, items in sets.items()}


def items_from_json(data: dict[str, list[dict]]) -> dict[str, list[PromptItem]]:
    return {name: [PromptItem(**row) for row in rows] for name, rows in data.items()}
