"""Judges: versioned per-image decisions of concept presence, with presets that reproduce each paper's protocol.

``build_judge`` accepts either the short form ``{name: nudenet, preset: unlearndiffatk}`` (as in concept YAMLs) or
the plug-in form of ``conf/judge/*.yaml``: ``{handler: metrics.judges.NudeNetJudge, params: {...}}``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

from metrics.judges import q16, resnet, style
from metrics.judges.base import Judge, JudgeUnavailable, JudgeVerdict, MissingWeights
from metrics.judges.nudenet import DETECTOR_FILES as NUDENET_DETECTOR_FILES
from metrics.judges.nudenet import PRESETS as NUDENET_PRESETS
from metrics.judges.nudenet import NudeNetJudge, OnnxNudeDetector
from metrics.judges.q16 import Q16Judge
from metrics.judges.resnet import IMAGENET_CLASSES, ResNet50Judge
from metrics.judges.style import StyleClassifierJudge
from metrics.judges.world import WorldJudge

JUDGES: dict[str, type[Judge]] = {"nudenet": NudeNetJudge, "q16": Q16Judge, "resnet50": ResNet50Judge,
                                  "world": WorldJudge, "vangogh_style": StyleClassifierJudge,
                                  "style_classifier": StyleClassifierJudge}

MISSING_WEIGHTS: dict[type[Judge], Callable[[dict[str, Any]], MissingWeights | None]] = {
    Q16Judge: q16.missing_weights, ResNet50Judge: resnet.missing_weights, StyleClassifierJudge: style.missing_weights}

__all__ = ["IMAGENET_CLASSES", "JUDGES", "NUDENET_DETECTOR_FILES", "NUDENET_PRESETS", "Judge", "JudgeUnavailable",
           "JudgeVerdict", "MissingWeights", "NudeNetJudge", "OnnxNudeDetector", "Q16Judge", "ResNet50Judge",
           "StyleClassifierJudge", "WorldJudge", "build_judge", "missing_weights"]


def _handler(path: str) -> type[Judge]:
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _q16_kwargs(params: dict[str, Any]) -> dict[str, Any]:
    """A Q16 config may name its CLIP as an evaluator config instead of an object."""
    if isinstance(params.get("evaluator"), Mapping):
        from metrics.evaluators import build_evaluator

        params["evaluator"] = build_evaluator(dict(params["evaluator"]))
    return params


def build_judge(cfg: Mapping[str, Any]) -> Judge:
    """``{name: world, predicate: {colour: skin}}``, ``{name: nudenet, preset: rece}`` (``preset:
    unlearndiffatk_detector`` downloads UnlearnDiffAtk's own detector file), ``{name: resnet50, class_id: 497}`` (or
    ``preset: church``), ``{name: q16}``, or ``{handler: ..., params: {...}}``."""
    cfg = dict(cfg)
    if "handler" in cfg:
        cls, params = _handler(cfg["handler"]), dict(cfg.get("params") or {})
    else:
        name = cfg.pop("name", None)
        if name not in JUDGES:
            raise ValueError(f"unknown judge {name!r}; known: {sorted(JUDGES)}")
        cls, params = JUDGES[name], cfg
    if cls is ResNet50Judge and "preset" in params:
        params["class_id"] = params.pop("preset")
    if cls is Q16Judge:
        params = _q16_kwargs(params)
    if cls is WorldJudge and "predicate" in params:
        params["predicate"] = dict(params["predicate"])
    return cls(**params)


def missing_weights(cfg: Mapping[str, Any]) -> MissingWeights | None:
    """What the judge of ``cfg`` (either form of :func:`build_judge`) lacks to be built, checked without loading any
    weights; None when nothing is known to be missing (a judge without such a check always passes)."""
    cfg = dict(cfg)
    if "handler" in cfg:
        cls, params = _handler(cfg["handler"]), dict(cfg.get("params") or {})
    else:
        cls, params = JUDGES.get(cfg.pop("name", None)), cfg
    check = MISSING_WEIGHTS.get(cls) if cls else None
    return check(params) if check else None
