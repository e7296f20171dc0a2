"""The CRT contract: ``fit`` a base pipeline and a concept to an artifact, ``apply`` it to get a defended model.

A CRT declares its family, the parameters it trains and what it exposes to a white-box attacker. ``fit`` is
pure with respect to the base pipeline (it must leave it unchanged) and returns an :class:`Artifact`
(tensors + JSON meta) that the runner stores by content hash; ``apply`` never trains, so a stored
artifact turns a base pipeline into the defended one in seconds.
"""

from __future__ import annotations

import copy
import logging
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from crt_bench import progress
from crt_bench.backbone import ONLY_SD1
from crt_bench.spec import Access, ConceptSpec, Family, GenerationSettings, PromptItem

# What a CRT that edits a public model exposes: its own weights (so gradients) and, because the base it was edited
# from is public (SD v1.4), the unerased model too; P4D's attacker compares the two.
OPEN_WEIGHTS: frozenset[Access] = frozenset({Access.TEXT_ENCODER, Access.UNET_GRADIENTS, Access.UNERASED_MODEL})
# A post-hoc filter on an open model: the model's weights as above, plus the filter's score and its gradients
# (a filter's own weights ship with it, so an adaptive attacker can differentiate through it).
OPEN_FILTER: frozenset[Access] = OPEN_WEIGHTS | {Access.FILTER_SCORE, Access.FILTER_GRADIENTS}
CHECKPOINT_FILE = "checkpoint.pt"

log = logging.getLogger(__name__)


def frozen(value: Any) -> Any:
    """``value`` with every list (a Hydra ``ListConfig``, a JSON list, a tuple) a tuple and every mapping a dict, at
    any depth: frozen config dataclasses hold tuples, which compare equal whatever the YAML or JSON gave and cannot
    be mutated. Strings and other scalars come back as they are."""
    if isinstance(value, Mapping):
        return {key: frozen(item) for key, item in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        return tuple(frozen(item) for item in value)
    return value


def frozen_params(params: Mapping[str, Any], keys: Collection[str]) -> dict[str, Any]:
    """A copy of ``params`` with the values of ``keys`` frozen, for a config dataclass; ``params`` itself stays as
    configured, since a plug-in's identity records it so."""
    return {key: frozen(value) if key in keys else value for key, value in params.items()}


@dataclass
class Artifact:
    """What a fitted CRT consists of: named tensors (saved as safetensors) and JSON-serialisable meta."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class FitCheckpoints:
    """Where a fit keeps its last saved state, and after how many steps it saves it (0: never).

    Why: an hour of ESD killed by a Slurm preemption should cost minutes, not the hour. The runner points ``folder``
    at a place named by the artifact's key, so only the very same fit resumes from it, and deletes it once the
    artifact is stored. ``every`` is not part of the CRT identity: where a fit saves never changes what it computes.
    """

    folder: Path | None = None
    every: int = 0

    @property
    def path(self) -> Path | None:
        return None if self.folder is None or self.every <= 0 else Path(self.folder) / CHECKPOINT_FILE

    def save(self, state: dict[str, Any]) -> None:
        """Write ``state`` whole or not at all (a new file renamed over the old); a failure only costs the save."""
        path = self.path
        if path is None:
            return
        partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(state, partial)
            os.replace(partial, path)
        except OSError as error:
            log.warning("could not save the fit's checkpoint to %s (%s); the fit goes on", path, error)
            partial.unlink(missing_ok=True)

    def load(self) -> dict[str, Any] | None:
        path = self.path
        if path is None or not path.is_file():
            return None
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # a damaged checkpoint means starting over, never a failed fit
            log.warning("ignoring the unreadable checkpoint %s (%s); the fit starts over", path, error)
            return None


@dataclass
class FitContext:
    """What ``fit`` may use. ``generate`` returns base-model images through the store (cached by key).

    A fit loop that can be resumed calls :meth:`resume` once before its first step and :meth:`checkpoint` after
    each; both do nothing unless the runner enabled checkpoints (``fit.checkpoint_every``).
    """

    pipe: Any  # diffusers StableDiffusionPipeline, the unerased base model; do not modify
    concept: ConceptSpec
    settings: GenerationSettings
    generate: Callable[[list[PromptItem]], list[Any]]  # -> list of PIL images from the base model
    device: torch.device = torch.device("cpu")
    seed: int = 0
    checkpoints: FitCheckpoints = field(default_factory=FitCheckpoints)
    validation_rate: Callable[[Any], float] | None = None  # pipe -> the concept judge's rate on the concept's
    # `validation` prompts rendered by that pipe (checkpoint selection, e.g. RECE's); None where the runner has none

    def checkpoint(self, done: int, state: Callable[[], dict[str, Any]], total: int | None = None) -> None:
        """After ``done`` steps, save ``state()`` (trained tensors, optimiser, generators, history) when ``done`` is
        a multiple of the interval and not the last step (the artifact follows at once). Global torch RNG states
        are saved with it, so a loop that also draws from them resumes exactly."""
        every = self.checkpoints.every
        if self.checkpoints.path is None or done % every or (total is not None and done >= total):
            return
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        self.checkpoints.save({"step": done, "state": state(), "rng": rng})

    def resume(self) -> tuple[int, dict[str, Any]] | None:
        """``(steps done, the saved state)`` of the last checkpoint, the global RNG put back as it was then; None
        when the fit starts from step 0."""
        saved = self.checkpoints.load()
        if saved is None:
            return None
        torch.set_rng_state(saved["rng"]["torch"])
        if "cuda" in saved["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(saved["rng"]["cuda"])
        log.info("resuming the fit after step %d from %s", saved["step"], self.checkpoints.path)
        return int(saved["step"]), saved["state"]


@dataclass
class TrainingState:
    """What a gradient loop needs to go on exactly where it stopped: the trained tensors (by name), the optimiser,
    the loop's own generator, the AMP scaler and the loss history (a list, or a dict of lists, updated in place);
    with ``grads``, the tensors' gradients too (a loop that accumulates them across steps).

    A loop builds one, calls :meth:`resume` before its first step (the steps already done) and
    ``ctx.checkpoint(step + 1, state.snapshot, total)`` after each step."""

    tensors: dict[str, torch.Tensor]
    optimizer: torch.optim.Optimizer
    generator: torch.Generator | None = None
    scaler: Any = None  # torch.amp.GradScaler
    history: list[Any] | dict[str, list[Any]] = field(default_factory=list)
    grads: bool = False

    def snapshot(self) -> dict[str, Any]:
        return {"tensors": {n: t.detach() for n, t in self.tensors.items()},
                "optimizer": self.optimizer.state_dict(),
                "generator": None if self.generator is None else self.generator.get_state(),
                "scaler": None if self.scaler is None else self.scaler.state_dict(),
                "history": self.history,
                "grads": {n: t.grad for n, t in self.tensors.items() if t.grad is not None} if self.grads else {}}

    def restore(self, saved: dict[str, Any]) -> None:
        load_tensors(self.tensors, saved["tensors"])
        for name, grad in saved["grads"].items():
            self.tensors[name].grad = grad.to(self.tensors[name].device)
        self.optimizer.load_state_dict(saved["optimizer"])
        if self.generator is not None:
            self.generator.set_state(saved["generator"])
        if self.scaler is not None and saved["scaler"]:
            self.scaler.load_state_dict(saved["scaler"])
        if isinstance(self.history, dict):
            self.history.clear()
            self.history.update(saved["history"])
        else:
            self.history[:] = saved["history"]

    def resume(self, ctx: FitContext, total: int) -> int:
        """Restore the last checkpoint, if any, and count its steps on the progress bar; returns the steps done."""
        resumed = ctx.resume()
        if resumed is None:
            return 0
        done, saved = resumed
        self.restore(saved)
        progress.step(done, total=total)
        return done


def load_tensors(named: dict[str, torch.Tensor], saved: dict[str, torch.Tensor]) -> None:
    """Copy a checkpoint's tensors into the live ones of the same names (parameters, mask scores)."""
    if set(named) != set(saved):
        differ = sorted(set(named) ^ set(saved))[:5]
        raise KeyError(f"the checkpoint holds other tensors than this fit trains: {differ}")
    with torch.no_grad():
        for name, tensor in named.items():
            tensor.copy_(saved[name])


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
    guidance: Any = None  # a sampling-loop defence (SLD, SAFREE): how the step's noise is made from the UNet's
    # predictions; white-box attacks differentiate through it; None = plain classifier-free guidance


class CRT(ABC):
    """Base class of every concept removal technique. Subclasses set the class attributes and implement both methods."""

    name: ClassVar[str]
    family: ClassVar[Family]
    exposes: ClassVar[frozenset[Access]]
    trains: ClassVar[str] = "nothing"
    reconstruction: ClassVar[str | None] = None  # what is not from the paper or its code, when the method is rebuilt
    version: ClassVar[str] = "1"
    backbones: ClassVar[frozenset[str]] = ONLY_SD1  # the model backbones it runs on (crt_bench.backbone); a run
    # on another is refused up front

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
