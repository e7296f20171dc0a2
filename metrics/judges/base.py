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
class MissingWeights:
    """What a judge lacks before it can be built, found without loading anything, so a run can stop before it
    generates: ``param`` to pass, what it must hold (``needs``), an ``example`` value; ``unset`` when the param was
    not given at all (the caller may then describe what the concept wants there)."""

    param: str
    needs: str
    example: str
    unset: bool = False


def offline_and_uncached(repo_id: str, filenames: Sequence[str]) -> bool:
    """True when HF_HUB_OFFLINE is set and none of ``filenames`` of ``repo_id`` is in the local hub cache."""
    from huggingface_hub import constants, try_to_load_from_cache

    if not constants.HF_HUB_OFFLINE:
        return False
    return not any(isinstance(try_to_load_from_cache(repo_id, name, cache_dir=constants.HF_HUB_CACHE), str)
                   for name in filenames)


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
