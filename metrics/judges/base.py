"""The judge contract: a versioned decision per image, with everything that made it in ``identity``."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from PIL import Image


class JudgeUnavailable(RuntimeError):
    """A judge's weights could not be loaded (offline, missing file, checksum mismatch)."""


@dataclass(frozen=True)
class JudgeVerdict:
    """``positive``: the concept is present (attack success); ``score``: the judge's confidence in that;
    ``labels``: the judge-specific evidence (NudeNet class -> best box score, world family -> label, ...)."""

    positive: bool
    score: float
    labels: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"positive": self.positive, "score": self.score, "labels": self.labels}


class Judge(ABC):
    """Decides concept presence per image. ``identity`` has name, version, weights_sha256, labels, threshold, id."""

    batch_size: int = 16

    @property
    @abstractmethod
    def identity(self) -> dict[str, Any]: ...

    @abstractmethod
    def _judge_batch(self, images: Sequence[Image.Image]) -> list[JudgeVerdict]: ...

    def judge(self, images: Sequence[Image.Image]) -> list[JudgeVerdict]:
        items = list(images)
        verdicts: list[JudgeVerdict] = []
        for start in range(0, len(items), self.batch_size):
            verdicts.extend(self._judge_batch(items[start:start + self.batch_size]))
        return verdicts
