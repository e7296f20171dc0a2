"""The shared vocabulary: prompts, generation settings, concepts, access rights, families, content hashing.

Plain data with no heavy imports (no torch), so that CRTs, attacks, metrics, the runners and third-party plug-ins
can all depend on it without depending on each other. :mod:`crt_bench` re-exports it with the rest of the contract.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

# Sampler names a config may give (``model.generation.scheduler``) -> their diffusers class names.
SCHEDULERS: dict[str, str] = {
    "ddim": "DDIMScheduler",
    "pndm": "PNDMScheduler",
    "lms": "LMSDiscreteScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "dpm": "DPMSolverMultistepScheduler",
    "ddpm": "DDPMScheduler",
}


class HarnessError(RuntimeError):
    """An error the user can fix; run.py prints its message as one line, without a traceback."""


class Access(str, Enum):
    """What an attacker may touch; CRTs declare what they expose, attacks what they require."""

    TEXT_ENCODER = "text_encoder"  # the public text encoder of the base model (always available)
    UNET_GRADIENTS = "unet_gradients"  # white-box gradients through the deployed generator
    UNERASED_MODEL = "unerased_model"  # the original, undefended pipeline
    JUDGE_ORACLE = "judge_oracle"  # the judge queried during the search
    SYSTEM_QUERIES = "system_queries"  # prompts sent to the deployed system, its delivered images seen (black-box)
    FILTER_SCORE = "filter_score"  # the post-hoc filter's score (black-box)
    FILTER_GRADIENTS = "filter_gradients"  # gradients of the post-hoc filter's score


class Family(str, Enum):
    """How a CRT changes the system; decides what it exposes and how it is scored."""

    NONE = "none"
    WEIGHT_EDIT = "weight_edit"
    CLOSED_FORM_EDIT = "closed_form_edit"
    TEXT_ENCODER_SWAP = "text_encoder_swap"
    GUIDANCE = "guidance"
    FILTER = "filter"


def canonical_json(obj: Any) -> str:
    """The one serialisation every content hash is taken over (sorted keys, no whitespace)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=_jsonable)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, Enum):
        return obj.value
    if hasattr(obj, "__dataclass_fields__"):
        return asdict(obj)
    if isinstance(obj, (set, frozenset, tuple)):
        return sorted(obj) if isinstance(obj, (set, frozenset)) else list(obj)
    raise TypeError(f"not JSON-serialisable: {type(obj).__name__}")


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """sha256 of a file's bytes, streamed so multi-gigabyte checkpoints need not fit in memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def content_hash(obj: Any, length: int = 16) -> str:
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()[:length]


@dataclass(frozen=True)
class PromptItem:
    """One prompt to generate from: its text, seed and (optionally) its own guidance scale, as I2P rows carry."""

    text: str
    seed: int = 0
    guidance: float | None = None
    case: str = ""  # stable id inside its prompt set (row number, case_number)


@dataclass(frozen=True)
class GenerationSettings:
    """Everything about sampling that changes the pixels."""

    steps: int = 25
    guidance: float = 7.5
    height: int = 512
    width: int = 512
    scheduler: str = "ddim"
    negative_prompt: str = ""
    images_per_prompt: int = 1
    batch_size: int = 8


@dataclass(frozen=True)
class ConceptSpec:
    """A concept to remove: the Espresso pair (c_u, c_a), its prompt sets and the judge that decides presence."""

    key: str
    c_u: str
    c_a: str
    prompts: dict[str, tuple[PromptItem, ...]] = field(default_factory=dict)
    judge: dict[str, Any] = field(default_factory=dict)

    def prompt_set(self, name: str) -> tuple[PromptItem, ...]:
        if name not in self.prompts:
            raise KeyError(f"concept {self.key!r} has no prompt set {name!r}; it has {sorted(self.prompts)}")
        return self.prompts[name]
