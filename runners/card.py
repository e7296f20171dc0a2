"""A reproducibility card per run: the prompt sets (keys, files, sha256), seeds, sampler, judge, CRT and attack budget
behind its numbers; ``python -m runners.card RUN.json`` prints it as Markdown, to paste into a paper's appendix.

Why: "which prompts and seeds?" is the question papers leave open. Every part of the card is read from the results
document (the resolved config and the identities recorded beside the numbers), so a results JSON written before the
card existed gets the same card, built from the fields it has; a field it lacks is left out, never guessed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

CARD_VERSION = 1
CARD_PACKAGES = ("python", "torch", "diffusers", "transformers", "open_clip_torch", "nudenet", "crt-bench")
COST_FIELDS = ("wall_s", "forward", "backward", "queries", "oracle_calls")
IMAGE_SEED_RULE = "image j of a prompt is seeded with the prompt's seed + j (one CPU torch.Generator per image)"


def build_card(document: dict[str, Any]) -> dict[str, Any]:
    """The card of a results document (any schema): what a reader needs to regenerate the run's numbers."""
    config = document.get("config") or {}
    model_cfg = config.get("model") or {}
    return {
        "card_version": CARD_VERSION,
        "run": _run(document, config),
        "model": _model(document, model_cfg),
        "concept": _concept(document, config.get("concept") or {}),
        "prompt_sets": _prompt_sets(document, config, model_cfg),
        "seeds": _seeds(config, model_cfg),
        "sampler": _sampler(document, model_cfg),
        "judge": _drop_none(document.get("judge") or {}),
        "evaluator": _drop_none({k: (document.get("evaluator") or {}).get(k)
                                 for k in ("id", "backend", "model", "weights_sha256")}),
        "crt": _crt(document),
        "attack": _attack(document, model_cfg),
        "metric": config.get("metric") or {},
        "code": _code(document),
    }


def card_of(document: dict[str, Any]) -> dict[str, Any]:
    """The card the run recorded, or one built from its fields (results written before cards existed)."""
    return document.get("card") or build_card(document)


def _drop_none(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if v is not None}


def _run(document: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    labels = document.get("labels") or {}
    preset = config.get("preset") or {}
    return _drop_none({"model": labels.get("model"), "concept": labels.get("concept"), "crt": labels.get("crt"),
                       "attack": labels.get("attack"), "attack_name": labels.get("attack_name"),
                       "attack_mode": labels.get("attack_mode"), "run_key": document.get("run_key"),
                       "created": document.get("created"), "schema_version": document.get("schema_version"),
                       "preset": preset.get("name"), "preset_protocol": preset.get("protocol")})


def configured_dtype(document: dict[str, Any], model_cfg: dict[str, Any]) -> str | None:
    """The config's ``model.dtype``, or the dtype the run resolved it to when the config says ``auto``."""
    configured = model_cfg.get("dtype")
    return (document.get("model") or {}).get("dtype") if configured in (None, "auto") else configured


def _model(document: dict[str, Any], model_cfg: dict[str, Any]) -> dict[str, Any]:
    model = document.get("model") or {}
    return _drop_none({"name": model.get("name", model_cfg.get("name")),
                       "id": model.get("hub_id") or model_cfg.get("path"), "revision": model.get("revision"),
                       "weights_sha256": model.get("weights_sha256"),
                       "dtype": configured_dtype(document, model_cfg), "device_type": model.get("device_type"),
                       "safety_checker": model.get("safety_checker", model_cfg.get("safety_checker"))})


def _concept(document: dict[str, Any], concept_cfg: dict[str, Any]) -> dict[str, Any]:
    recorded = document.get("concept") or {}
    return _drop_none({"key": recorded.get("key", concept_cfg.get("key")),
                       "c_u": recorded.get("c_u", concept_cfg.get("c_u")),
                       "c_a": recorded.get("c_a", concept_cfg.get("c_a")), "analog": concept_cfg.get("analog"),
                       "judge": concept_cfg.get("judge")})


def _prompt_sets(document: dict[str, Any], config: dict[str, Any], model_cfg: dict[str, Any]) -> dict[str, Any]:
    recorded = document.get("concept") or {}
    counts = recorded.get("sets") or {}
    declared = (config.get("concept") or {}).get("prompts") or {}
    sets = {name: {"n": counts.get(name), **_set_source(spec, model_cfg)}
            for name, spec in sorted(declared.items())}
    for name in sorted(set(counts) - set(sets)):
        sets[name] = {"n": counts[name]}
    return _drop_none({"key": recorded.get("prompt_sets"), "max_per_set": model_cfg.get("max_prompts_per_set"),
                       "sets": sets})


def _set_source(spec: Any, model_cfg: dict[str, Any]) -> dict[str, Any]:
    """Where a prompt set comes from and where its seeds and guidance come from."""
    default_seed = (model_cfg.get("generation") or {}).get("seed")
    if isinstance(spec, list):  # inline prompts (the world)
        seeds = [row.get("seed") for row in spec if isinstance(row, dict) and row.get("seed") is not None]
        guided = any(isinstance(r, dict) and r.get("guidance") is not None for r in spec)
        return _drop_none({"source": "inline",
                           "seeds": f"inline, {min(seeds)}..{max(seeds)}" if seeds else f"default {default_seed}",
                           "guidance": "inline" if guided else None})
    source = (spec or {}).get("source") or {}
    seed_column, guidance_column = source.get("seed_column"), source.get("guidance_column")
    fixed = source.get("seed", default_seed)
    return _drop_none({
        "source": source.get("url") or source.get("gated"),
        "path": source.get("path") or source.get("user_path") or source.get("file"), "sha256": source.get("sha256"),
        "format": source.get("format"), "filter": source.get("filter"),
        "seeds": f"column {seed_column}" if seed_column else f"fixed {fixed}",
        "guidance": f"column {guidance_column}" if guidance_column else None,
        "expanded": {k: source[k] for k in ("text_templates", "repeat_each", "drop", "skip_lines") if k in source}
        or None})


def _seeds(config: dict[str, Any], model_cfg: dict[str, Any]) -> dict[str, Any]:
    bootstrap = ((config.get("metric") or {}).get("bootstrap") or {}).get("seed")
    return _drop_none({"default_image_seed": (model_cfg.get("generation") or {}).get("seed"),
                       "image_rule": IMAGE_SEED_RULE, "fit_and_attack": config.get("seed"), "bootstrap": bootstrap})


def _sampler(document: dict[str, Any], model_cfg: dict[str, Any]) -> dict[str, Any]:
    gen_cfg = model_cfg.get("generation") or {}
    settings = dict(document.get("generation") or {k: v for k, v in gen_cfg.items()
                                                   if k not in ("seed", "row_guidance")})
    settings["row_guidance"] = gen_cfg.get("row_guidance")
    settings["dtype"] = configured_dtype(document, model_cfg)
    return _drop_none(settings)


def _crt(document: dict[str, Any]) -> dict[str, Any]:
    crt = document.get("crt") or {}
    identity = crt.get("identity") or {}
    return _drop_none({"name": identity.get("name"), "version": identity.get("version"), "family": crt.get("family"),
                       "params": identity.get("params"), "artifact": crt.get("artifact"),
                       "reconstruction": crt.get("reconstruction")})


def _attack(document: dict[str, Any], model_cfg: dict[str, Any]) -> dict[str, Any]:
    attack = document.get("attack") or {}
    identity = attack.get("identity") or {}
    cost = attack.get("cost") or {}
    targets = cost.get("targets", len(attack.get("targets") or []) or None)
    per_target = {k: round(cost[k] / targets, 3) for k in COST_FIELDS if k in cost and targets}
    return _drop_none({"name": identity.get("name"), "version": identity.get("version"),
                       "mode": attack.get("mode", identity.get("mode")), "params": identity.get("params"),
                       "target_set": attack.get("target_set") or (identity.get("params") or {}).get("target_set"),
                       "targets": targets, "max_attack_targets": model_cfg.get("max_attack_targets"),
                       "prompts_found": cost.get("prompts_found"), "cost_per_target": per_target or None,
                       "needs": attack.get("needs"), "reconstruction": attack.get("reconstruction")})


def _code(document: dict[str, Any]) -> dict[str, Any]:
    git = document.get("git") or {}
    packages = document.get("packages") or {}
    return _drop_none({"git_commit": git.get("commit"), "dirty": git.get("dirty"),
                       "diff_sha256": git.get("diff_sha256"),
                       "packages": {k: packages[k] for k in CARD_PACKAGES if packages.get(k)} or None})


# -- Markdown --------------------------------------------------------------------------------------------------


def _text(value: Any) -> str:
    if isinstance(value, (dict, list)):
        value = json.dumps(value, sort_keys=True, separators=(", ", ": "))
    return str(value).replace("|", "\\|").replace("\n", " ")


def _table(title: str, fields: dict[str, Any]) -> list[str]:
    if not fields:
        return []
    return [f"### {title}", "", "| field | value |", "|---|---|",
            *(f"| {key} | {_text(value)} |" for key, value in fields.items()), ""]


def render_markdown(card: dict[str, Any]) -> str:
    run = card.get("run") or {}
    head = " / ".join(str(run.get(k, "?")) for k in ("model", "concept", "crt", "attack"))
    lines = [f"## Reproducibility card: {head}", ""]
    if run.get("run_key"):
        lines += [f"Run key `{run['run_key']}`" + (f", preset `experiment={run['preset']}`" if run.get("preset")
                                                    else "") + ".", ""]
    sets = (card.get("prompt_sets") or {}).get("sets") or {}
    lines += _table("Run", {k: v for k, v in run.items() if k != "run_key"})
    lines += _table("Model", card.get("model") or {})
    lines += _table("Concept", card.get("concept") or {})
    if sets:
        key = (card.get("prompt_sets") or {}).get("key")
        lines += [f"### Prompt sets (key `{key}`)" if key else "### Prompt sets", "",
                  "| set | n | source | sha256 | seeds | guidance | filter |", "|---|---|---|---|---|---|---|"]
        for name, s in sets.items():
            lines.append("| " + " | ".join(_text(x) for x in (
                name, s.get("n", ""), s.get("path") or s.get("source", ""), s.get("sha256", ""), s.get("seeds", ""),
                s.get("guidance", ""), s.get("filter", ""))) + " |")
        lines.append("")
    lines += _table("Seeds", card.get("seeds") or {})
    lines += _table("Sampler", card.get("sampler") or {})
    lines += _table("Judge", card.get("judge") or {})
    lines += _table("Evaluator (CLIP)", card.get("evaluator") or {})
    lines += _table("CRT", card.get("crt") or {})
    lines += _table("Attack and budget", card.get("attack") or {})
    lines += _table("Metric settings", card.get("metric") or {})
    lines += _table("Code", card.get("code") or {})
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print("usage: python -m runners.card RUN.json [RUN.json ...]  (a results/runs/*.json file)")
        return
    for i, path in enumerate(args):
        document = json.loads(Path(path).read_text())
        print(("\n" if i else "") + render_markdown(card_of(document)))


if __name__ == "__main__":
    main()
