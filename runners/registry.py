"""Plug-ins from config: ``handler: package.module.Class`` plus ``params:`` builds a CRT, an attack or a judge.

Why: adding a CRT must be a module and a YAML file, nothing else; there is no list of names to keep in sync.
Judges and evaluators without a ``handler`` go through the metrics package's builders.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from attacks.base import Attack
from crt.base import CRT
from runners.models import HarnessError

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def available(group: str, conf_dir: Path = CONF_DIR) -> list[str]:
    """The options of a config group, as Hydra sees them (file names without .yaml)."""
    return sorted(p.stem for p in (conf_dir / group).glob("*.yaml"))


def import_handler(path: str, what: str) -> Any:
    module_name, _, attribute = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError, ValueError) as error:
        raise HarnessError(f"{what}: handler {path!r} cannot be imported ({error})") from None


def _params(cfg: dict[str, Any], model: str | None = None, concept: dict[str, Any] | None = None) -> dict[str, Any]:
    """``params``, updated by the block named after the model when there is one (e.g. ``mini:`` scales a CRT's
    iterations to the miniature world), then by the concept's ``plugin_params`` entry named after the plug-in (a
    paper's per-concept protocol, e.g. UnlearnDiffAtk's k = 3 for objects, the text ESD erases for nudity); the
    merged values are what the plug-in's identity records."""
    params = dict(cfg.get("params") or {})
    name = cfg.get("name")
    per_concept = ((concept or {}).get("plugin_params") or {}).get(name) if name else None
    for block, label in ((cfg.get(model) if model else None, f"the {model!r} block"),
                         (per_concept, f"concept {(concept or {}).get('key')!r}")):
        if isinstance(block, dict):
            unknown = set(block) - set(params)
            if unknown:
                raise HarnessError(f"{name!r}: {label} sets unknown params {sorted(unknown)}")
            params.update(block)
    return params


def build_crt(cfg: dict[str, Any], model: str | None = None, concept: dict[str, Any] | None = None) -> CRT:
    cls = import_handler(cfg["handler"], f"crt {cfg.get('name')!r}")
    if not (isinstance(cls, type) and issubclass(cls, CRT)):
        raise HarnessError(f"crt handler {cfg['handler']!r} is not a crt.base.CRT subclass")
    return cls(**_params(cfg, model, concept))


def build_attack(cfg: dict[str, Any], model: str | None = None, concept: dict[str, Any] | None = None) -> Attack:
    cls = import_handler(cfg["handler"], f"attack {cfg.get('name')!r}")
    if not (isinstance(cls, type) and issubclass(cls, Attack)):
        raise HarnessError(f"attack handler {cfg['handler']!r} is not an attacks.base.Attack subclass")
    return cls(adaptive=bool(cfg.get("adaptive", False)), **_params(cfg, model, concept))


def build_judge(cfg: dict[str, Any]) -> Any:
    """A judge object with ``identity`` and ``judge(images) -> list[JudgeVerdict]``."""
    if cfg.get("handler"):
        return import_handler(cfg["handler"], "judge")(**_params(cfg))
    from metrics.judges import build_judge as metrics_build_judge

    return metrics_build_judge(dict(cfg))


def build_evaluator(cfg: dict[str, Any]) -> Any:
    """A CLIP evaluator with ``identity``, ``logit_scale``, ``encode_images`` and ``encode_texts``."""
    if cfg.get("handler"):
        return import_handler(cfg["handler"], "evaluator")(**_params(cfg))
    from metrics.evaluators import build_evaluator as metrics_build_evaluator

    return metrics_build_evaluator(dict(cfg))
