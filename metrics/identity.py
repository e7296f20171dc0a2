"""Stable, JSON-able identities for evaluators, judges and metrics.

Scores are cached per (image key, identity): an identity must change whenever the number could change (weights,
label set, threshold, preprocessing) and must not change across machines, so it never holds absolute paths.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch


def state_dict_sha256(module: torch.nn.Module) -> str:
    """sha256 over a module's tensors (sorted names, dtype, shape, raw bytes).

    Independent of the file format the weights came from (pickle, safetensors, hub cache), so two copies of the
    same weights get the same identity whichever backend loaded them.
    """
    digest = hashlib.sha256()
    state = module.state_dict()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def combined_sha256(parts: dict[str, str]) -> str:
    """One hash for several weight files (e.g. one judge per attribute family)."""
    digest = hashlib.sha256()
    for name in sorted(parts):
        digest.update(f"{name}={parts[name]};".encode())
    return digest.hexdigest()


def source_name(path: str | Path) -> str:
    """A machine-independent name for a model source: the hub id as given, or a local folder's last component."""
    text = str(path)
    local = Path(text).expanduser()
    if local.exists():
        return f"local:{local.resolve().name}"
    return text


def short(sha: str, length: int = 12) -> str:
    return sha[:length]


def metric_identity(metric: str, version: str, evaluator: Any | None = None, **params: Any) -> dict[str, Any]:
    """Identity of a per-image metric value (e.g. p_u of one image under one evaluator and one text pair)."""
    ident: dict[str, Any] = {"kind": "metric", "name": metric, "version": version, "params": params}
    parts = [f"{metric}-{version}"]
    if evaluator is not None:
        ident["evaluator"] = evaluator.identity
        parts.append(evaluator.identity["id"])
    parts.extend(f"{key}={params[key]}" for key in sorted(params))
    ident["id"] = "/".join(parts)
    return ident
