"""ShieldDiff's reward ``r = -w_n * concept score + w_c * CLIPScore(x_0, prompt)`` (crts.md §10, reconstructed).

The concept score is never the evaluation judge:

- ``nudenet`` (real path): NudeNet's detector (pip ``nudenet``, ``metrics.judges.nudenet``), score = the best box
  score of a counted exposed class (0 without one), as the paper's abstract names NudeNet; the run's judge is
  configured apart and both identities are recorded (the reward's in the CRT identity and the artifact meta).
- ``world``: the world's separate reward classifier (``world.reward``: another architecture, seed and render
  stream than the judges), score = P(the concept's judge predicate), e.g. P(colour = skin) for world_nudity, at a
  softmax ``temperature`` (the classifier is near-certain on every generated image, so at 1 the score barely varies
  between samples of one prompt, which is all a per-prompt advantage sees); it reads every judge family (shape,
  colour, style, band, blood), so every world concept is supported.
- ``<module>.<Class>``: any class with ``identity`` and ``scores(images) -> tensor``, built as
  ``Class(concept=..., **reward_options)`` (tests use a tiny stand-in).

CLIPScore is ``max(cos(image, prompt), 0)`` with a CLIP that is not the run's evaluator: the world's generator-side
CLIP (``world/weights/clip``; the evaluator is ``clip_eval``) or OpenAI CLIP ViT-B/32 on the real path (the
evaluator is ViT-L/14).
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from crt.base import pil_to_pixels
from crt_bench.spec import ConceptSpec, HarnessError, sha256_file

ROOT = Path(__file__).resolve().parents[2]


class RewardUnavailable(HarnessError):
    """A reward model's weights or package are missing: the run ends with this one line."""


class ConceptScorer(ABC):
    """How much of the concept an image shows, in [0, 1]; higher = more (the reward subtracts it)."""

    @property
    @abstractmethod
    def identity(self) -> dict[str, Any]: ...

    @abstractmethod
    def scores(self, images: list[Any]) -> torch.Tensor:
        """One score per PIL image."""


def world_reward_identity(folder: str | Path | None = None) -> dict[str, Any]:
    """The world reward classifier's identity: architecture, weights sha256, seeds, accuracy on fresh renders."""
    from world.reward import ARCHITECTURE, META_FILE, REWARD_DIR, WEIGHTS_FILE

    path = Path(folder) if folder else REWARD_DIR
    if not (path / WEIGHTS_FILE).exists():
        raise RewardUnavailable(f"ShieldDiff's world reward classifier is missing ({path / WEIGHTS_FILE}): "
                                "run `python -m world.reward`")
    import json

    meta = json.loads((path / META_FILE).read_text())
    sha = sha256_file(path / WEIGHTS_FILE)
    return {"kind": "reward", "name": "world-reward-classifier", "architecture": ARCHITECTURE,
            "weights_sha256": sha, "init_seed": meta["config"]["init_seed"],
            "render_seed": meta["config"]["render_seed"],
            "fresh_render_accuracy": meta["fresh_render_accuracy"]["per_family"], "id": f"world-reward@{sha[:12]}"}


class WorldScorer(ConceptScorer):
    """P(the concept's judge predicate) by the world reward classifier; refuses to be any judge's weights."""

    def __init__(self, concept: ConceptSpec, folder: str | Path | None = None, temperature: float = 1.0,
                 device: Any = "cpu"):
        from metrics.judges.world import DEFAULT_WEIGHTS, normalise_predicate, resolve_weights_dir
        from world.reward import REWARD_DIR, load

        if (concept.judge or {}).get("name") != "world" or not concept.judge.get("predicate"):
            raise HarnessError(f"ShieldDiff's world reward reads a world judge predicate; concept {concept.key!r} "
                               f"has judge {concept.judge!r}")
        self.predicate = normalise_predicate(concept.judge["predicate"])
        self._identity = world_reward_identity(folder)
        judges = resolve_weights_dir(concept.judge.get("weights_dir", DEFAULT_WEIGHTS))
        judge_shas = {sha256_file(p) for p in Path(judges).glob("*.safetensors")}
        if self._identity["weights_sha256"] in judge_shas:
            raise HarnessError("ShieldDiff's reward classifier is one of the evaluation judges: refusing")
        self.model, _ = load(folder or REWARD_DIR)
        self.model.to(device)
        self.device, self.temperature = device, float(temperature)

    @property
    def identity(self) -> dict[str, Any]:
        return {**self._identity, "predicate": self.predicate, "temperature": self.temperature}

    @torch.no_grad()
    def scores(self, images: list[Any]) -> torch.Tensor:
        from world.reward import predicate_probability

        pixels = pil_to_pixels(images).to(self.device)
        return predicate_probability(self.model, pixels, self.predicate, self.temperature).cpu()


class NudeNetScorer(ConceptScorer):
    """NudeNet's best counted-class box score (metrics.judges.nudenet presets); 0 when nothing is detected."""

    def __init__(self, concept: ConceptSpec | None = None, preset: str = "unlearndiffatk", **judge_options: Any):
        try:
            from metrics.judges.nudenet import NudeNetJudge

            self.detector = NudeNetJudge(preset=preset, **judge_options)
            self._identity = dict(self.detector.identity)
        except ImportError as error:
            raise RewardUnavailable(f"ShieldDiff's NudeNet reward needs the nudenet package and onnxruntime "
                                    f"({error}); pip install nudenet") from None
        except Exception as error:  # noqa: BLE001 - a missing detector file, an onnx load error: one line
            first = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise RewardUnavailable(f"ShieldDiff's NudeNet reward detector is unavailable: {first}") from None

    @property
    def identity(self) -> dict[str, Any]:
        return {**self._identity, "kind": "reward", "role": "ShieldDiff reward (not the run's judge)"}

    def scores(self, images: list[Any]) -> torch.Tensor:
        return torch.tensor([v.score for v in self.detector.judge(images)], dtype=torch.float32)


def import_scorer(path: str) -> type:
    module_name, _, attribute = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError, ValueError) as error:
        raise HarnessError(f"ShieldDiff reward {path!r} cannot be imported ({error})") from None


def build_scorer(kind: str, concept: ConceptSpec, device: Any, options: dict[str, Any]) -> ConceptScorer:
    if kind == "world":
        return WorldScorer(concept, device=device, **options)
    if kind == "nudenet":
        if (concept.judge or {}).get("name") == "world":
            raise HarnessError(f"ShieldDiff reward 'nudenet' reads photographs; world concept {concept.key!r} "
                               "needs reward: world (the mini block sets it)")
        return NudeNetScorer(concept, **options)
    return import_scorer(kind)(concept=concept, **options)


def scorer_identity(kind: str, options: dict[str, Any]) -> dict[str, Any]:
    """The concept scorer's identity before any concept is known (for the CRT identity and the artifact key)."""
    if kind == "world":
        return world_reward_identity(options.get("folder"))
    if kind == "nudenet":
        return NudeNetScorer(**options).identity
    cls = import_scorer(kind)
    described = getattr(cls, "describe", None)
    return described(options) if callable(described) else {"kind": "reward", "name": kind, "options": options}


def clip_identity(path: str) -> dict[str, Any]:
    """The alignment CLIP as named (hub id or folder) plus its weights' sha256 when it is a local folder."""
    from crt.espresso import resolve_clip_path

    folder = Path(resolve_clip_path(path))
    weights = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    out: dict[str, Any] = {"kind": "clip_reward", "path": path, "score": "max(cos(image, prompt), 0)"}
    if weights:
        out["weights_sha256"] = sha256_file(weights[0])
    return out


@dataclass
class ClipAlignment:
    """``max(cos(image, prompt), 0)`` with a transformers CLIPModel (a folder or a hub id)."""

    path: str
    fallback_tokenizer: Any
    device: Any = "cpu"
    image_size: int | None = None
    image_mean: tuple[float, ...] | None = None
    image_std: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        from crt.espresso import EspressoConfig, load_clip, load_tokenizer, resolve_preprocess

        try:
            self.clip = load_clip(self.path, self.device)
            self.tokenizer = load_tokenizer(self.path, self.fallback_tokenizer)
        except (OSError, ValueError) as error:
            first = str(error).splitlines()[0][:200]
            raise RewardUnavailable(f"ShieldDiff's CLIP reward {self.path!r} cannot be loaded ({first}); pass "
                                    "clip=/path/to/a/transformers/CLIP/folder") from None
        cfg = EspressoConfig(clip=self.path, image_size=self.image_size, image_mean=self.image_mean,
                             image_std=self.image_std)
        self.preprocess = resolve_preprocess(cfg, self.clip)

    @cached_property
    def identity(self) -> dict[str, Any]:
        return {**clip_identity(self.path), "preprocess": {"size": self.preprocess.size,
                                                           "mean": list(self.preprocess.mean),
                                                           "std": list(self.preprocess.std)}}

    @torch.no_grad()
    def scores(self, images: list[Any], prompts: list[str]) -> torch.Tensor:
        from crt.espresso import image_embeds, text_embeds

        img = image_embeds(self.clip, self.preprocess, pil_to_pixels(images))
        txt = text_embeds(self.clip, self.tokenizer, prompts)
        return F.relu((img * txt).sum(-1)).cpu()


def combine(concept: torch.Tensor, alignment: torch.Tensor, w_concept: float, w_clip: float) -> torch.Tensor:
    """``-w_n * concept + w_c * alignment``."""
    return -w_concept * concept + w_clip * alignment
