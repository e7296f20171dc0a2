"""``python -m runners.catalog``: what can be run, read from conf/ and the plug-in classes, and which CRT x attack
pairs the runner accepts.

Why: a user should see which attacks can run against which CRT before a run is refused, and what each plug-in's
family, declared access, paper and defaults are, without reading every YAML file.

- CRTs and attacks are composed as Hydra composes them (a YAML's ``defaults`` list included) and built through
  :mod:`runners.registry` with their default params, as a run builds them; constructors only parse params, so no
  model is loaded. Adaptive variants are built with ``adaptive: true``; an attack whose constructor refuses that
  (``Attack.no_adaptive``) has none, and its reason is listed.
- Judges are resolved to their class and never built: a judge's constructor loads its weights.
- Concepts and models are read from their composed config.
- The compatibility matrix asks :func:`attacks.base.check_compatible` (the runner's own check, before any work) for
  every CRT x attack variant, with the CRT's ``exposes``; a refused cell names the access the CRT withholds.
- A plug-in's paper is the first parenthetical with a year or an arXiv id in its YAML's header comment (pointers to
  this repository's notes are dropped); a variant without one takes that of an option with the same handler.
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from attacks.base import ALWAYS_AVAILABLE, Attack, IncompatibleAttack, check_compatible
from crt.base import CRT, DefendedModel
from crt_bench.backbone import BACKBONES
from runners import registry
from runners.registry import CONF_DIR, available

GROUPS = ("crt", "attack", "concept", "judge", "model")
TITLES = {"crt": "CRTs", "attack": "Attacks", "concept": "Concepts", "judge": "Judges", "model": "Models"}
ADAPTIVE_SUFFIX = "-adaptive"  # the results' label of an adaptive run, e.g. ringabell-adaptive
_CITATION = re.compile(r"\b(19|20)\d\d\b|arXiv")
_LOCAL_NOTE = re.compile(r"\.md\b|§|\bcode\b|\bcommit\b")


@dataclass(frozen=True)
class Entry:
    """One option of a config group. ``access``: what a CRT exposes or an attack needs (nothing for the others)."""

    group: str
    name: str
    family: str
    access: tuple[str, ...]
    paper: str
    defaults: dict[str, Any]
    world: dict[str, Any] = field(default_factory=dict)  # the `mini:` block: the world's overrides of the defaults
    notes: str = ""
    handler: str = ""


@dataclass(frozen=True)
class Cell:
    """One CRT x attack variant: whether the runner accepts the pair and, when not, what the CRT withholds."""

    crt: str
    attack: str
    runs: bool
    missing: tuple[str, ...] = ()
    reason: str = ""


@dataclass
class Catalog:
    entries: dict[str, list[Entry]]
    matrix: list[Cell]
    attack_labels: list[str]
    no_adaptive: dict[str, str]  # attack -> why it has no adaptive variant
    backbones: dict[str, dict[str, tuple[str, ...]]] = field(default_factory=dict)  # group -> option -> backbones
    reconstruction: dict[str, str | None] = field(default_factory=dict)  # CRT -> what its class says is rebuilt


# -- reading conf/ -------------------------------------------------------------------------------------------------


def compose_option(group: str, name: str, conf_dir: Path = CONF_DIR) -> dict[str, Any]:
    """The option's config as Hydra composes it (its own ``defaults`` list applied). Concepts are composed with a
    model, which a real concept overrides (to sd14)."""
    overrides = (["+model=mini"] if group == "concept" else []) + [f"+{group}={name}"]
    with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
        cfg = compose(overrides=overrides)
    return OmegaConf.to_container(cfg, resolve=False)


def header_comment(path: Path) -> str:
    """The YAML's leading comment block as one line (Hydra's ``@package`` directive left out)."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        text = line.lstrip("#").strip()
        if not text.startswith("@package"):
            lines.append(text)
    return " ".join(lines)


def citation(comment: str) -> str:
    """The first parenthetical that cites a paper (a year or an arXiv id), without pointers to local notes."""
    for inner in re.findall(r"\(([^()]*)\)", comment):
        if _CITATION.search(inner):
            parts = [p.strip() for p in inner.split(";") if p.strip() and not _LOCAL_NOTE.search(p)]
            if parts:
                return "; ".join(parts)
    return ""


def first_sentence(comment: str) -> str:
    return re.split(r"(?<=\.)\s", comment, maxsplit=1)[0] if comment else ""


def _access(values: Iterable[Any]) -> tuple[str, ...]:
    return tuple(sorted(getattr(a, "value", str(a)) for a in values))


# -- entries -------------------------------------------------------------------------------------------------------


def build_plugins(conf_dir: Path = CONF_DIR) -> tuple[dict[str, tuple[dict[str, Any], CRT]],
                                                      dict[str, tuple[dict[str, Any], Attack]]]:
    """Every CRT and attack option built with its default params, with its composed config."""
    crts = {}
    for name in available("crt", conf_dir):
        cfg = compose_option("crt", name, conf_dir)["crt"]
        crts[name] = (cfg, registry.build_crt(cfg))
    attacks = {}
    for name in available("attack", conf_dir):
        cfg = compose_option("attack", name, conf_dir)["attack"]
        attacks[name] = (cfg, registry.build_attack({**cfg, "adaptive": False}))
    return crts, attacks


def attack_variants(attacks: dict[str, tuple[dict[str, Any], Attack]]) -> tuple[dict[str, Attack], dict[str, str]]:
    """Every attack and, where its constructor accepts ``adaptive: true`` as a run would build it, its adaptive
    variant (label ``<name>-adaptive``); the others with the reason their constructor gives."""
    variants: dict[str, Attack] = {}
    refused: dict[str, str] = {}
    for name, (cfg, attack) in attacks.items():
        variants[name] = attack
        try:
            variants[name + ADAPTIVE_SUFFIX] = registry.build_attack({**cfg, "adaptive": True})
        except ValueError as error:
            refused[name] = str(error)
    return variants, refused


def compatibility(crts: dict[str, CRT], attacks: dict[str, Attack]) -> list[Cell]:
    """The runner's check for every pair, on a defended model that exposes what the CRT declares."""
    cells = []
    for crt_name, crt in crts.items():
        defended = DefendedModel(pipe=None, crt_name=crt.name, exposes=frozenset(crt.exposes))
        for label, attack in attacks.items():
            try:
                check_compatible(attack, defended)
            except IncompatibleAttack as error:
                missing = _access(attack.needs() - defended.exposes - ALWAYS_AVAILABLE)
                cells.append(Cell(crt_name, label, False, missing, str(error)))
            else:
                cells.append(Cell(crt_name, label, True))
    return cells


def _papers_by_handler(configs: dict[str, dict[str, Any]], group: str, conf_dir: Path) -> dict[str, str]:
    found: dict[str, str] = {}
    for name, cfg in configs.items():
        paper = citation(header_comment(registry.option_file(group, name, conf_dir)))
        if paper:
            found.setdefault(str(cfg.get("handler")), paper)
    return found


def _paper(group: str, name: str, cfg: dict[str, Any], by_handler: dict[str, str], conf_dir: Path) -> str:
    comment = header_comment(registry.option_file(group, name, conf_dir))
    return citation(comment) or by_handler.get(str(cfg.get("handler")), "")


def crt_entries(crts: dict[str, tuple[dict[str, Any], CRT]], conf_dir: Path) -> list[Entry]:
    by_handler = _papers_by_handler({n: c for n, (c, _) in crts.items()}, "crt", conf_dir)
    entries = []
    for name, (cfg, crt) in crts.items():
        notes = f"trains: {crt.trains}; version {crt.version}"
        if crt.reconstruction:
            notes += "; reconstructed"
        entries.append(Entry("crt", name, crt.family.value, _access(crt.exposes),
                             _paper("crt", name, cfg, by_handler, conf_dir), dict(crt.params),
                             dict(cfg.get("mini") or {}), notes, cfg["handler"]))
    return entries


def attack_entries(attacks: dict[str, tuple[dict[str, Any], Attack]], variants: dict[str, Attack],
                   no_adaptive: dict[str, str], conf_dir: Path) -> list[Entry]:
    by_handler = _papers_by_handler({n: c for n, (c, _) in attacks.items()}, "attack", conf_dir)
    entries = []
    for name, (cfg, attack) in attacks.items():
        adaptive = variants.get(name + ADAPTIVE_SUFFIX)
        notes = (f"adaptive variant needs {', '.join(_access(adaptive.needs()))}" if adaptive
                 else f"no adaptive variant: {no_adaptive.get(name, '')}")
        notes += f"; output: {attack.output}; target set: {attack.target_set}"
        if attack.reconstruction:
            notes += "; reconstructed"
        entries.append(Entry("attack", name, attack.mode, _access(attack.needs()),
                             _paper("attack", name, cfg, by_handler, conf_dir), dict(attack.params),
                             dict(cfg.get("mini") or {}), notes, cfg["handler"]))
    return entries


def judge_entries(conf_dir: Path) -> list[Entry]:
    """Judges by class, never built (their constructors load weights)."""
    from metrics.judges import JUDGES

    entries = []
    for name in available("judge", conf_dir):
        cfg = compose_option("judge", name, conf_dir)["judge"]
        comment = header_comment(registry.option_file("judge", name, conf_dir))
        settings = {k: v for k, v in cfg.items() if k not in ("from_concept", "handler", "name")}
        if cfg.get("from_concept"):
            entries.append(Entry("judge", name, "the concept's own judge", (), "", settings,
                                 notes=first_sentence(comment)))
            continue
        handler = cfg.get("handler") or f"{JUDGES[cfg['name']].__module__}.{JUDGES[cfg['name']].__qualname__}"
        entries.append(Entry("judge", name, str(cfg.get("name") or handler.rpartition(".")[2]), (),
                             citation(comment), settings, notes=first_sentence(comment), handler=handler))
    return entries


def _sources(prompts: dict[str, Any]) -> list[str]:
    """The GitHub repositories a concept's prompt files come from."""
    repos = []
    for spec in prompts.values():
        url = str(((spec or {}).get("source") or {}).get("url", "")) if isinstance(spec, dict) else ""
        match = re.match(r"https://raw\.githubusercontent\.com/([^/]+/[^/]+)/", url)
        if match and match.group(1) not in repos:
            repos.append(match.group(1))
    return repos


def concept_entries(conf_dir: Path) -> list[Entry]:
    entries = []
    for name in available("concept", conf_dir):
        cfg = compose_option("concept", name, conf_dir)
        concept, model = cfg["concept"], cfg["model"]["name"]
        prompts = concept.get("prompts") or {}
        sets = {s: (len(v) if isinstance(v, list) else "downloaded") for s, v in prompts.items()}
        world = bool(concept.get("analog"))
        family = f"world analog of {concept['analog']}" if world else "real"
        paper = "generated by world.concepts" if world else "prompts from " + ", ".join(_sources(prompts))
        defaults = {"c_u": concept["c_u"], "c_a": concept["c_a"], "judge": concept.get("judge"), "model": model,
                    "prompt sets": sets}
        protocol = sorted(concept.get("plugin_params") or {})
        notes = f"per-plug-in protocol: {', '.join(protocol)}" if protocol else ""
        entries.append(Entry("concept", name, family, (), paper, defaults, notes=notes))
    return entries


def model_entries(conf_dir: Path) -> list[Entry]:
    entries = []
    for name in available("model", conf_dir):
        cfg = compose_option("model", name, conf_dir)["model"]
        gen = cfg.get("generation") or {}
        family = f"{cfg.get('backbone', 'sd1')}: {cfg.get('pipeline_class')} {gen.get('height')}x{gen.get('width')}"
        defaults = {"path": cfg.get("path"), "dtype": cfg.get("dtype"), "scheduler": gen.get("scheduler"),
                    "steps": gen.get("steps"), "guidance": gen.get("guidance"), "seed": gen.get("seed"),
                    "evaluator": cfg.get("evaluator")}
        entries.append(Entry("model", name, family, (), "", defaults,
                             notes=first_sentence(header_comment(registry.option_file("model", name, conf_dir)))))
    return entries


def build_catalog(conf_dir: Path = CONF_DIR) -> Catalog:
    crts, attacks = build_plugins(conf_dir)
    variants, no_adaptive = attack_variants(attacks)
    entries = {"crt": crt_entries(crts, conf_dir), "attack": attack_entries(attacks, variants, no_adaptive, conf_dir),
               "concept": concept_entries(conf_dir), "judge": judge_entries(conf_dir),
               "model": model_entries(conf_dir)}
    matrix = compatibility({name: crt for name, (_, crt) in crts.items()}, variants)
    backbones = {"crt": {name: tuple(sorted(crt.backbones)) for name, (_, crt) in crts.items()},
                 "attack": {name: tuple(sorted(attack.backbones)) for name, (_, attack) in attacks.items()}}
    reconstruction = {name: crt.reconstruction for name, (_, crt) in crts.items()}
    return Catalog(entries, matrix, list(variants), no_adaptive, backbones, reconstruction)


# -- rendering -----------------------------------------------------------------------------------------------------


def _compact(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), default=str) if isinstance(value, (dict, list)) else str(value)


def _settings(values: dict[str, Any]) -> str:
    return ", ".join(f"{k}={_compact(v)}" for k, v in values.items()) or "—"


def _escape(text: str) -> str:
    return text.replace("|", "\\|")


def entries_markdown(group: str, entries: list[Entry]) -> list[str]:
    access = {"crt": "exposes", "attack": "needs"}.get(group)
    head = ["name", "family" if group != "attack" else "mode", *([access] if access else []), "paper", "defaults",
            *(["world (`mini:`)"] if group in ("crt", "attack") else []), "notes"]
    lines = [f"## {TITLES[group]} ({len(entries)})", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for e in entries:
        cells = [e.name, e.family, *([", ".join(e.access) or "—"] if access else []), e.paper or "—",
                 _settings(e.defaults), *([_settings(e.world)] if group in ("crt", "attack") else []), e.notes or "—"]
        lines.append("| " + " | ".join(_escape(c) for c in cells) + " |")
    return lines + [""]


def matrix_markdown(catalog: Catalog) -> list[str]:
    crts = [e.name for e in catalog.entries["crt"]]
    cells = {(c.crt, c.attack): c for c in catalog.matrix}
    lines = ["## Compatibility: CRT x attack", "",
             "\"runs\": the runner accepts the pair; \"refused\": it stops before any work, because the attack needs "
             "access the CRT does not expose (named in the cell). Always available: "
             f"{', '.join(_access(ALWAYS_AVAILABLE))}. `<attack>-adaptive` is `attack=<attack> attack.adaptive=true`.",
             "", "| CRT | " + " | ".join(catalog.attack_labels) + " |", "|---|" + "---|" * len(catalog.attack_labels)]
    for crt in crts:
        row = [cells[(crt, a)] for a in catalog.attack_labels]
        lines.append(f"| {crt} | " + " | ".join(
            "runs" if c.runs else f"refused: {', '.join(c.missing)}" for c in row) + " |")
    lines += ["", "No adaptive variant:"] + [f"- {name}: {why}" for name, why in catalog.no_adaptive.items()]
    return lines + [""]


def support_markdown(catalog: Catalog) -> list[str]:
    """Plug-in x backbone: what each CRT and attack declares (``backbones``); the runner refuses the rest up front."""
    lines = ["## Support: plug-in x backbone", "",
             "Declared by each plug-in (`backbones`) and checked before any work; `model=sd14`/`sd15`/`mini` are sd1, "
             "`model=sd21`/`sd21_768` sd2, `model=sdxl` sdxl. Transformer backbones (SD 3, FLUX) are refused.", "",
             "| plug-in | kind | " + " | ".join(BACKBONES) + " |", "|---|---|" + "---|" * len(BACKBONES)]
    for group in ("crt", "attack"):
        for name, supported in catalog.backbones.get(group, {}).items():
            marks = ["yes" if b in supported else "—" for b in BACKBONES]
            lines.append(f"| {name} | {group} | " + " | ".join(marks) + " |")
    return lines + [""]


def crt_table_markdown(catalog: Catalog) -> list[str]:
    """The README's CRT table: family, paper, backbones and, in the class's own words, what is reconstructed."""
    lines = ["| CRT | family | paper | backbones | reconstructed |", "|---|---|---|---|---|"]
    for e in catalog.entries["crt"]:
        rebuilt = catalog.reconstruction.get(e.name)
        cells = [f"`{e.name}`", e.family, e.paper or "—", ", ".join(catalog.backbones.get("crt", {}).get(e.name, ())),
                 f"yes: {rebuilt}" if rebuilt else "no (the paper and its official code)"]
        lines.append("| " + " | ".join(_escape(c) for c in cells) + " |")
    return lines


def render(catalog: Catalog) -> str:
    lines = ["# Catalogue", "", "From conf/ and the plug-in classes (`python -m runners.catalog`). Defaults are the "
             "`params` of each YAML; on the miniature world (`model=mini`) the `mini:` block overrides them, and a "
             "concept's `plugin_params` set its papers' protocol for a plug-in.", ""]
    for group in GROUPS:
        lines += entries_markdown(group, catalog.entries[group])
    lines += matrix_markdown(catalog)
    lines += support_markdown(catalog)
    return "\n".join(lines)


def names(catalog: Catalog, group: str, family: str | None = None) -> list[str]:
    """The option names of one group, optionally of one family, so sweeps follow the plug-ins' own declarations."""
    return [e.name for e in catalog.entries[group] if family is None or e.family == family]


def main(argv: list[str] | None = None) -> None:
    """``python -m runners.catalog [--json]``: list the plug-ins and print the compatibility matrix."""
    parser = argparse.ArgumentParser(prog="python -m runners.catalog", description=main.__doc__)
    parser.add_argument("--json", action="store_true", help="print the catalogue as JSON instead of Markdown")
    parser.add_argument("--backbones", action="store_true", help="print only the plug-in x backbone support matrix "
                        "(the README's table)")
    parser.add_argument("--crts", action="store_true", help="print only the CRT table (family, paper, backbones, "
                        "what is reconstructed; the README's table)")
    parser.add_argument("--names", choices=GROUPS, help="print only the option names of one group, comma-separated "
                        "(what `make leaderboard` sweeps)")
    parser.add_argument("--family", help="with --names: only the options of this family (CRTs) or mode (attacks), "
                        "e.g. `--names crt --family filter`")
    args = parser.parse_args(argv)
    catalog = build_catalog()
    if args.names:
        print(",".join(names(catalog, args.names, args.family)))
        return
    if args.backbones:
        print("\n".join(support_markdown(catalog)[2:]).strip())
        return
    if args.crts:
        print("\n".join(crt_table_markdown(catalog)))
        return
    print(json.dumps(asdict(catalog), indent=1, default=str) if args.json else render(catalog))


if __name__ == "__main__":
    main()
