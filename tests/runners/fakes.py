"""Small stand-ins for the judge, the evaluator, CRTs and attacks, so the runner is tested on its own contracts.

Each is deterministic and cheap; none imitates a real technique.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np
import torch

from attacks.base import AdversarialPrompt, Attack, AttackContext, AttackCost
from crt.base import CRT, Artifact, DefendedModel, FitContext, ImageFilter, edited_copy, replace_module
from runners.spec import Access, Family, PromptItem

EMBED_DIM = 12


@dataclass
class Verdict:
    positive: bool
    score: float
    labels: dict[str, Any] = field(default_factory=dict)


class FakeJudge:
    """Concept present iff the image's mean red exceeds its mean blue; counts the images it has seen."""

    seen = 0

    def __init__(self, version: str = "1"):
        self.identity = {"name": "fake_judge", "version": version}

    def judge(self, images: list[Any]) -> list[Verdict]:
        FakeJudge.seen += len(images)
        out = []
        for image in images:
            pixels = np.asarray(image.convert("RGB"), dtype=float)
            score = float(pixels[..., 0].mean() - pixels[..., 2].mean())
            out.append(Verdict(score > 0, score, {"red_minus_blue": score}))
        return out


class FakeEvaluator:
    """Images -> pooled 2x2 colour grid; texts -> a seeded random direction; both unit-norm."""

    logit_scale = 100.0

    def __init__(self) -> None:
        self.identity = {"name": "fake_evaluator", "version": "1"}

    def encode_images(self, images: list[Any]) -> torch.Tensor:
        rows = []
        for image in images:
            pixels = torch.from_numpy(np.asarray(image.convert("RGB").resize((2, 2)), dtype=np.float32)) / 255
            rows.append(pixels.flatten() - 0.5)
        emb = torch.stack(rows)
        return emb / emb.norm(dim=-1, keepdim=True).clamp_min(1e-6)

    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        rows = []
        for text in texts:
            seed = int(hashlib.sha256(text.encode()).hexdigest()[:8], 16)
            rows.append(torch.randn(EMBED_DIM, generator=torch.Generator().manual_seed(seed)))
        emb = torch.stack(rows)
        return emb / emb.norm(dim=-1, keepdim=True)


class BrightFilter(ImageFilter):
    """Flags images brighter than a threshold."""

    def __init__(self, threshold: float):
        self.threshold = threshold

    def scores_from_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        return pixels.mean(dim=(1, 2, 3)) - self.threshold


class FakeFilterCRT(CRT):
    name: ClassVar[str] = "fake_filter"
    family: ClassVar[Family] = Family.FILTER
    exposes: ClassVar[frozenset[Access]] = frozenset({Access.FILTER_SCORE})

    def fit(self, ctx: FitContext) -> Artifact:
        images = ctx.generate(list(ctx.concept.prompt_set("unacceptable"))[:2])
        brightness = float(np.mean([np.asarray(im, dtype=float).mean() / 255 for im in images]))
        return Artifact(tensors={"threshold": torch.tensor([brightness])}, meta={"fitted_on": len(images)})

    def apply(self, pipe: Any, artifact: Artifact) -> DefendedModel:
        threshold = float(artifact.tensors["threshold"][0]) + float(self.params.get("offset", 0.0))
        if self.params.get("threshold") is not None:  # an absolute threshold: e.g. flag everything but black
            threshold = float(self.params["threshold"])
        return DefendedModel(pipe=pipe, crt_name=self.name, filter=BrightFilter(threshold), exposes=self.exposes)


class FakeOpenFilterCRT(FakeFilterCRT):
    """A filter CRT that also exposes the generator's and the filter's gradients (white-box and adaptive attacks)."""

    name: ClassVar[str] = "fake_open_filter"
    exposes: ClassVar[frozenset[Access]] = frozenset({Access.FILTER_SCORE, Access.FILTER_GRADIENTS,
                                                      Access.UNET_GRADIENTS})


class FakeEditCRT(CRT):
    """Scales one UNet output bias: a weight edit whose artifact is a single tensor."""

    name: ClassVar[str] = "fake_edit"
    family: ClassVar[Family] = Family.WEIGHT_EDIT
    exposes: ClassVar[frozenset[Access]] = frozenset({Access.UNET_GRADIENTS, Access.UNERASED_MODEL})
    fits = 0

    def fit(self, ctx: FitContext) -> Artifact:
        FakeEditCRT.fits += 1
        if self.params.get("diverge"):
            raise FloatingPointError("fake loss is nan at step 3")
        bias = ctx.pipe.unet.conv_out.bias.detach().clone()
        return Artifact(tensors={"conv_out.bias": bias + float(self.params.get("shift", 0.5))})

    def apply(self, pipe: Any, artifact: Artifact) -> DefendedModel:
        unet = edited_copy(pipe.unet, artifact.tensors)
        return DefendedModel(pipe=replace_module(pipe, "unet", unet), crt_name=self.name, exposes=self.exposes)


class SuffixAttack(Attack):
    """Appends a word to every target; queries the system and uses the oracle once per target."""

    name: ClassVar[str] = "suffix"
    requires: ClassVar[frozenset[Access]] = frozenset({Access.SYSTEM_QUERIES, Access.JUDGE_ORACLE})
    output: ClassVar[Literal["text", "embedding"]] = "text"
    calls: ClassVar[list[int]] = []
    die_after_targets: ClassVar[int | None] = None  # simulates a killed process (not a parameter: same identity)

    def run(self, ctx: AttackContext, targets: list[PromptItem]) -> list[AdversarialPrompt]:
        SuffixAttack.calls.append(len(targets))
        if SuffixAttack.die_after_targets is not None and sum(SuffixAttack.calls) > SuffixAttack.die_after_targets:
            raise RuntimeError("attack killed")
        images = ctx.generate(ctx.defended, targets)
        verdicts = ctx.oracle(images)
        return [AdversarialPrompt(t, text=f"{t.text} {self.params.get('suffix', 'red')}",
                                  cost=AttackCost(queries=1, oracle_calls=1), succeeded_during_search=v)
                for t, v in zip(targets, verdicts)]


class EmbeddingAttack(Attack):
    """Returns the base text encoder's embedding of each target, perturbed: a soft prompt."""

    name: ClassVar[str] = "soft"
    requires: ClassVar[frozenset[Access]] = frozenset({Access.TEXT_ENCODER})
    output: ClassVar[Literal["text", "embedding"]] = "embedding"

    def run(self, ctx: AttackContext, targets: list[PromptItem]) -> list[AdversarialPrompt]:
        pipe = ctx.defended.pipe
        out = []
        for t in targets:
            ids = pipe.tokenizer(t.text, padding="max_length", max_length=77, truncation=True,
                                 return_tensors="pt").input_ids
            with torch.no_grad():
                emb = pipe.text_encoder(ids)[0][0]
            out.append(AdversarialPrompt(t, embedding=emb + 0.01))
        return out


class NeedsFilterGradients(Attack):
    name: ClassVar[str] = "needs_filter_gradients"
    requires: ClassVar[frozenset[Access]] = frozenset({Access.FILTER_GRADIENTS})

    def run(self, ctx: AttackContext, targets: list[PromptItem]) -> list[AdversarialPrompt]:
        raise AssertionError("must be refused before running")


class TextOnlyAttack(Attack):
    """Needs only the public base text encoder: a transfer attack whose prompts do not depend on the CRT."""

    name: ClassVar[str] = "text_only"
    requires: ClassVar[frozenset[Access]] = frozenset({Access.TEXT_ENCODER})
    output: ClassVar[Literal["text", "embedding"]] = "text"
    targets_seen: ClassVar[int] = 0

    def run(self, ctx: AttackContext, targets: list[PromptItem]) -> list[AdversarialPrompt]:
        assert ctx.text_encoder is not None and ctx.tokenizer is not None and ctx.base_pipe is None
        assert ctx.generate_raw is None  # raw (unfiltered) generations only with access to the filter
        TextOnlyAttack.targets_seen += len(targets)
        return [AdversarialPrompt(target=t, text=f"{t.text} please") for t in targets]
