"""Judge verdicts and evaluator embeddings, cached per (delivered image key, scorer identity).

Why: re-scoring must never regenerate, and adding a judge or swapping the evaluator computes only what is missing.
The evaluator's image embedding is what is cached (not p_u or a CLIP score), so any text pair or prompt is
scored from it in microseconds.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from runners.generate import Counters
from runners.store import Store, key_of

CHUNK = 64


@dataclass
class Verdict:
    positive: bool
    score: float
    labels: dict[str, Any]


def encode_vector(vector: torch.Tensor) -> str:
    return base64.b64encode(vector.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()).decode()


def decode_vector(text: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), dtype=np.float32).copy()


@dataclass
class Scorer:
    """Looks scores up, computes the missing ones in chunks, and counts both."""

    store: Store
    load_image: Callable[[str], Any]
    counters: Counters
    progress: bool = True

    def _cached(self, product: str, identity: dict[str, Any], keys: list[str],
                compute: Callable[[list[Any]], list[Any]], desc: str) -> dict[str, Any]:
        unique = list(dict.fromkeys(k for k in keys if k is not None))
        specs = {k: {"product": product, "image": k, "scorer": identity} for k in unique}
        found = self.store.get_many([key_of(s) for s in specs.values()])
        values = {k: found[key_of(s)].value for k, s in specs.items() if key_of(s) in found}
        todo = [k for k in unique if k not in values]
        self.counters.scores_reused += len(values)
        bar = tqdm(total=len(todo), desc=desc, unit="img", disable=not self.progress or not todo)
        for start in range(0, len(todo), CHUNK):
            chunk = todo[start:start + CHUNK]
            new = dict(zip(chunk, compute([self.load_image(k) for k in chunk])))
            self.store.put_values(product, [(specs[k], v) for k, v in new.items()])
            values.update(new)
            self.counters.scores_computed += len(chunk)
            bar.update(len(chunk))
        bar.close()
        return values

    def verdicts(self, judge: Any, keys: list[str | None], desc: str = "judge") -> dict[str, Verdict]:
        def compute(images: list[Any]) -> list[dict[str, Any]]:
            return [{"positive": bool(v.positive), "score": float(v.score), "labels": _jsonable(v.labels)}
                    for v in judge.judge(images)]

        raw = self._cached("judgement", dict(judge.identity), keys, compute, desc)
        return {k: Verdict(v["positive"], v["score"], v["labels"]) for k, v in raw.items()}

    def embeddings(self, evaluator: Any, keys: list[str | None], desc: str = "embed") -> dict[str, np.ndarray]:
        def compute(images: list[Any]) -> list[str]:
            with torch.no_grad():
                return [encode_vector(row) for row in evaluator.encode_images(images)]

        raw = self._cached("embedding", dict(evaluator.identity), keys, compute, desc)
        return {k: decode_vector(v) for k, v in raw.items()}


def _jsonable(labels: Any) -> Any:
    if isinstance(labels, dict):
        return {str(k): _jsonable(v) for k, v in labels.items()}
    if isinstance(labels, (list, tuple)):
        return [_jsonable(v) for v in labels]
    if isinstance(labels, (torch.Tensor, np.generic, np.ndarray)):
        return np.asarray(labels.detach().cpu() if isinstance(labels, torch.Tensor) else labels).tolist()
    return labels
