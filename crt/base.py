"""The CRT contract: ``fit`` a base pipeline and a concept to an artifact, ``apply`` it to get a defended model.

A CRT declares its family, the parameters it trains and what it exposes to a white-box attacker. ``fit`` is
pure with respect to the base pipeline (it must leave it unchanged) and returns an :class:`Artifact`
(tensors + JSON meta) that the runner stores by content hash; ``apply`` never trains, so a stored
artifact turns a base pipeline into the defended one in seconds.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from crt_bench.spec import Access, ConceptSpec, Family, GenerationSettings, PromptItem

# What a CRT that edits a public model exposes: its own weights (so gradients) and, because the base it was edited
# from is public (SD v1.4), the unerased model too; P4D's attacker compares the two.
OPEN_WEIGHTS: frozenset[Access] = frozenset({Access.TEXT_ENCODER, Access.UNET_GRADIENTS, Access.UNERASED_MODEL})


@dataclass
class Artifact:
    """What a fitted CRT consists of: named tensors (saved as safetensors) and JSON-serialisable meta."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class FitContext:
    """What ``fit`` may use. ``generate`` returns base-model images through the store (cached by key)."""

    pipe: Any  # diffusers StableDiffusionPipeline, the unerased base model; do not modify
    concept: ConceptSpec
    settings: GenerationSettings
    generate: Callable[[list[PromptItem]], list[Any]]  # -> list of PIL images from the base model
    device: torch.device = torch.device("cpu")
    seed: int = 0


class ImageFilter(ABC):
    """A post-hoc filter: scores images, flags those whose score is above 0."""

    @abstractmethod
    def scores_from_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """Per image, a score > 0 iff flagged; ``pixels`` (B, 3, H, W) in [0, 1]; differentiable (adaptive attacks)."""

    def scores(self, images: list[Any]) -> torch.Tensor:
        with torch.no_grad():
            return self.scores_from_pixels(pil_to_pixels(images))

    def flags(self, images: list[Any]) -> list[bool]:
        return [bool(s > 0) for s in self.scores(images)]


def pil_to_pixels(images: list[Any]) -> torch.Tensor:
    """PIL images -> float (B, 3, H, W) in [0, 1]."""
    import numpy as np

    array = np.stack([np.asarray(im.convert("RGB")) for im in images])
    return torch.from_numpy(array).permute(0, 3, 1, 2).float() / 255


@dataclass
class DefendedModel:
    """The system under test: a (possibly edited) pipeline plus an optional post-hoc filter.

    ``pipe`` shares unchanged modules with the base pipeline; modules a CRT changes are copies.
    ``negative_prompt`` is set by guidance-type CRTs that defend through the sampling loop.
    """

    pipe: Any
    crt_name: str = "none"
    filter: ImageFilter | None = None
    negative_prompt: str | None = None
    exposes: frozenset[Access] = frozenset()


class CRT(ABC):
    """Base class of every concept removal technique. Subclasses set the class attributes and implement both methods."""

    name: ClassVar[str]
    family: ClassVar[Family]
    exposes: ClassVar[frozenset[Access]]
    trains: ClassVar[str] = "nothing"
    reconstruction: ClassVar[str | None] = None  # what is not from the paper or its code, when the method is rebuilt
    version: ClassVar[str] = "1"

    def __init__(self, **params: Any):
        self.params = params

    def identity(self) -> dict[str, Any]:
        """Everything about this CRT that changes its artifact; part of the artifact's content key."""
        return {"name": self.name, "version": self.version, "params": self.params}

    @abstractmethod
    def fit(self, ctx: FitContext) -> Artifact:
        """Learn the artifact. Must not modify ``ctx.pipe``."""

    @abstractmethod
    def apply(self, pipe: Any, artifact: Artifact) -> DefendedModel:
        """Build the defended model from the base ``pipe`` without modifying it."""


class UNetEdit(CRT):
    """A CRT that edits the UNet of a public model: its params build ``config_class`` (``self.config``), it exposes
    :data:`OPEN_WEIGHTS`, and ``apply`` writes the artifact's UNet parameters into a copy of the base UNet."""

    exposes = OPEN_WEIGHTS  # an edit of a public model: its weights and the unerased base
    config_class: ClassVar[type]

    def __init__(self, **params: Any):
        super().__init__(**params)
        self.config = self.config_class(**self.config_params(params))

    @staticmethod
    def config_params(params: dict[str, Any]) -> dict[str, Any]:
        """The params as ``config_class`` takes them (a subclass converts, e.g. YAML lists to tuples)."""
        return params

    def unet_parameters(self, pipe: Any, artifact: Artifact) -> dict[str, torch.Tensor]:
        """The new values of the UNet parameters the artifact changes (a mask artifact computes them here)."""
        return artifact.tensors

    def apply(self, pipe: Any, artifact: Artifact) -> DefendedModel:
        unet = edited_copy(pipe.unet, self.unet_parameters(pipe, artifact))
        return DefendedModel(pipe=replace_module(pipe, "unet", unet), crt_name=self.name, exposes=self.exposes)


def replace_module(pipe: Any, component: str, module: torch.nn.Module) -> Any:
    """A shallow copy of ``pipe`` whose ``component`` (e.g. "unet") is ``module``; the base stays as it was."""
    components = dict(pipe.components)
    components[component] = module
    return type(pipe)(**components)


def edited_copy(module: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A deep copy of ``module`` whose named parameters are overwritten by ``tensors``."""
    edited = copy.deepcopy(module)
    state = edited.state_dict()
    unknown = set(tensors) - set(state)
    if unknown:
        raise KeyError(f"artifact names parameters the module does not have: {sorted(unknown)[:5]}")
    with torch.no_grad():
        for name, value in tensors.items():
            state[name].copy_(value.to(state[name].dtype))
    return edited
