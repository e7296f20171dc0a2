"""The attack contract: declared access, a budget with accounting, adversarial prompts as output.

An attack states what it needs (:class:`crt_bench.spec.Access`); the runner refuses a CRT x attack pair whose
needs the CRT does not expose, before anything runs. Its output is a hard prompt (text) or a soft
embedding with the cost of finding it, labelled with one of three modes (:data:`MODES`), derived from what it needs:

- ``transfer``: built on the public base model only (its text encoder), so one search serves every CRT;
- ``white-box``: uses the defended system itself (its weights, gradients, or queries of its outputs judged by the
  oracle), e.g. UnlearnDiffAtk against the deployed UNet;
- ``adaptive``: also targets the defence's own mechanism (a filter's score or gradients).
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, Literal, TypeVar

import torch

from crt.base import DefendedModel
from crt.guidance import Conditions, condition_like, repeat_rows, step_of_timestep
from crt_bench import progress
from crt_bench.backbone import ONLY_SD1, Condition, TextConditioning, unet_output, vae_factor
from crt_bench.spec import (
    SCHEDULERS,
    Access,
    ConceptSpec,
    GenerationSettings,
    HarnessError,
    PromptItem,
)

# What no CRT can withhold: the base model's text encoder is public (SD v1.4's is OpenAI's CLIP), a judge is the
# attacker's own tool (a public classifier such as NudeNet), and a deployed system answers the prompts sent to it.
# Oracle use and queries are still declared by the attack and recorded with every prompt.
ALWAYS_AVAILABLE: frozenset[Access] = frozenset({Access.TEXT_ENCODER, Access.JUDGE_ORACLE, Access.SYSTEM_QUERIES})
# What a transfer attack may use: queries and the oracle see generations of the defended system, so using them is
# white-box (searched per CRT).
PUBLIC: frozenset[Access] = ALWAYS_AVAILABLE - {Access.JUDGE_ORACLE, Access.SYSTEM_QUERIES}
Mode = Literal["transfer", "white-box", "adaptive"]
MODES: tuple[str, ...] = ("transfer", "white-box", "adaptive")
DEFAULT_TARGET_SET = "unacceptable"
Target = TypeVar("Target")
Search = TypeVar("Search")  # a batched search with ``success`` and ``cost``


@dataclass
class AttackCost:
    """Accounting for one target: wall time, model passes and oracle queries."""

    wall_s: float = 0.0
    forward: int = 0
    backward: int = 0
    queries: int = 0  # generations of the defended model requested by the attack
    oracle_calls: int = 0  # judge verdicts used during the search


@dataclass
class AdversarialPrompt:
    """The result for one target prompt. Exactly one of ``text`` / ``embedding`` is set."""

    target: PromptItem
    text: str | None = None
    embedding: torch.Tensor | None = None  # (77, width) prompt embedding when the output is soft
    pooled: torch.Tensor | None = None  # the pooled embedding that goes with ``embedding`` on SDXL (its UNet reads
    # both; (1280,)); None on SD 1.x / 2.x and for text
    cost: AttackCost = field(default_factory=AttackCost)
    succeeded_during_search: bool | None = None  # what the oracle said, when one was used
    log: dict[str, Any] = field(default_factory=dict)


@dataclass
class AttackContext:
    """What ``run`` may use; fields the attack did not declare access to are ``None``."""

    defended: DefendedModel
    concept: ConceptSpec
    settings: GenerationSettings
    text_encoder: Any | None = None  # Access.TEXT_ENCODER: the base model's public text encoder, always given
    tokenizer: Any | None = None
    reference_images: Callable[[list[PromptItem]], list[Any]] | None = None  # the unerased model's images of
    # the targets, made offline through the store (UnlearnDiffAtk's and P4D's target images); always provided
    base_pipe: Any | None = None  # Access.UNERASED_MODEL
    oracle: Callable[[list[Any]], list[bool]] | None = None  # Access.JUDGE_ORACLE: images -> concept present
    generate: Callable[[DefendedModel, list[PromptItem]], list[Any]] | None = None  # Access.SYSTEM_QUERIES: images
    # as the user receives them: a filter's flagged image is its placeholder, or None when blocked
    # (``metric.placeholder=blocked_as_safe``)
    generate_raw: Callable[[DefendedModel, list[PromptItem]], list[Any]] | None = None  # the generations before any
    # filter replaces them, what an adaptive attack scores the filter on; given with Access.FILTER_SCORE or
    # FILTER_GRADIENTS only
    device: torch.device = torch.device("cpu")
    seed: int = 0


class Attack(ABC):
    """Base class of every attack. Subclasses set the class attributes and implement ``run``."""

    name: ClassVar[str]
    requires: ClassVar[frozenset[Access]]
    output: ClassVar[Literal["text", "embedding"]] = "text"
    version: ClassVar[str] = "1"
    backbones: ClassVar[frozenset[str]] = ONLY_SD1  # the model backbones it runs on (crt_bench.backbone); a run
    # on another is refused up front
    reconstruction: ClassVar[str | None] = None  # what is not from the paper or its code, when the attack is rebuilt
    no_adaptive: ClassVar[str | None] = None  # why an attack without an adaptive variant refuses adaptive=True;
    # ``{name}`` is replaced by the attack's name

    def __init__(self, adaptive: bool = False, **params: Any):
        if adaptive and self.no_adaptive is not None:
            raise IncompatibleAttack(self.no_adaptive.format(name=self.name))
        self.adaptive = adaptive
        self.params = params

    @property
    def model_agnostic(self) -> bool:
        """True when the search uses nothing of the defended system (a transfer attack computed once per concept)."""
        return self.needs() <= PUBLIC

    @property
    def mode(self) -> Mode:
        """``adaptive`` when configured so; else ``transfer`` when the needs are public, ``white-box`` otherwise."""
        if self.adaptive:
            return "adaptive"
        return "transfer" if self.model_agnostic else "white-box"

    @property
    def target_set(self) -> str:
        """The concept's prompt set this attack is run on (param ``target_set``; the attack's own set, e.g.
        Ring-A-Bell's 95 I2P nudity prompts, is chosen per concept through ``plugin_params``)."""
        return str(self.params.get("target_set") or DEFAULT_TARGET_SET)

    def needs(self) -> frozenset[Access]:
        """The access this configured attack requires; adaptive variants add the filter's."""
        return self.requires | (frozenset({Access.FILTER_SCORE}) if self.adaptive else frozenset())

    def identity(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "mode": self.mode, "params": self.params}

    @abstractmethod
    def run(self, ctx: AttackContext, targets: list[PromptItem]) -> list[AdversarialPrompt]:
        """Search an adversarial prompt for every target."""


def require_context(ctx: AttackContext, who: str, fields: Sequence[str], also: Sequence[str] = ()) -> None:
    """Refuse, before any search, a context without the ``fields`` the attack uses (``also``: further missing
    things the caller found), naming them all at once."""
    missing = [name for name in fields if getattr(ctx, name) is None] + list(also)
    if missing:
        raise ValueError(f"{who} needs {missing} in its AttackContext")


def search_each(targets: Sequence[Target], search: Callable[[Target, AttackCost], AdversarialPrompt]
                ) -> list[AdversarialPrompt]:
    """``search(target, cost)`` for every target in order (a prompt, or a prompt with what its search starts from),
    each with its own cost, whose wall time is that search's alone."""
    results = []
    for target in targets:
        cost = AttackCost()
        with Timer(cost):
            results.append(search(target, cost))
        progress.step()
    return results


def share_wall_time(costs: Sequence[AttackCost], began: float) -> None:
    """The wall time since ``began``, spent on a batch of targets searched together, shared equally by their costs."""
    elapsed = time.perf_counter() - began
    for cost in costs:
        cost.wall_s += elapsed / len(costs)


def retire_successes(searches: Sequence[Search]) -> list[Search]:
    """After a judged block of a batched search with early stop: one progress step per search that succeeded, and
    the searches that go on (each has ``success``)."""
    going_on = []
    for search in searches:
        if search.success:
            progress.step()
        else:
            going_on.append(search)
    return going_on


def reference_per_target(ctx: AttackContext, targets: Sequence[PromptItem]) -> list[Any]:
    """The unerased model's first image of each target (``reference_images`` gives images_per_prompt a target)."""
    references = ctx.reference_images(list(targets))
    per = max(len(references) // max(len(targets), 1), 1)
    return [references[i * per] for i in range(len(targets))]


def defended_noise(ctx: AttackContext, latents: torch.Tensor, timestep: torch.Tensor, cond: Condition,
                   guidance_scale: float | Sequence[float] | None = None,
                   prompt_ids: torch.Tensor | None = None) -> torch.Tensor:
    """The defended system's prediction for noised ``latents`` (B, 4, h, w) at ``timestep`` (B,) under the text
    condition ``cond``, differentiable in ``cond``: (B, 77, width) token states, or a
    :class:`crt_bench.backbone.TextConditioning` (SDXL's carries its pooled embedding, and the UNet gets SDXL's time
    ids for an image of the latents' size). It is in the model's own output space: the noise, or v on a
    v-prediction model (compare it with :func:`prediction_target`, or convert it with
    :func:`crt_bench.backbone.epsilon`).

    Without a sampling-loop defence (``defended.guidance`` None) it is the deployed UNet's conditional prediction,
    exactly what the white-box attacks always differentiated. With one (SLD, SAFREE) it is that defence's noise for
    the step, made by the very object the sampling loop uses (:mod:`crt.guidance`): the unconditional branch is the
    deployed one (the defence's negative prompt, else the run's, else ""), the CFG scale the target's
    (``guidance_scale``, one or one per row; default the run's), and the loop state fresh, at the deployed step
    whose timestep is nearest each row's (``crt.guidance.step_of_timestep``). Rows are grouped by timestep and
    scale, so a batch of mixed noise levels gets each row's own step, and a group of several rows one timestep.

    ``prompt_ids`` (B, 77): the token ids ``cond`` encodes, when the attack forwards real tokens (P4D's and
    UnlearnDiffAtk's projected or sampled ones); a guidance that reads the prompt's tokens (SAFREE's projection)
    then analyses them as it does at generation, else it meets a soft prompt (:class:`crt.guidance.Conditions`).
    A pooled (SDXL) condition goes to a guidance that handles one (``Guidance.pooled_conditions``: CFG, SLD) with
    SDXL's deployed unconditional branch (``encode_prompt``'s, the zero conditioning for an empty negative prompt);
    a guidance that reads SD 1.x / 2.x token states only (SAFREE) refuses it."""
    defended, pipe = ctx.defended, ctx.defended.pipe
    if isinstance(cond, TextConditioning) and cond.pooled is None:
        cond = cond.hidden
    if defended.guidance is None:
        return unet_output(pipe.unet, latents.to(pipe.unet.dtype), timestep, cond, vae_factor(pipe))
    pooled = isinstance(cond, TextConditioning)
    if pooled and not getattr(defended.guidance, "pooled_conditions", False):
        raise HarnessError(f"{defended.crt_name}: this sampling-loop defence takes SD 1.x / 2.x token states, not a "
                           "pooled (SDXL) condition")
    rows = latents.shape[0]
    timesteps = torch.as_tensor(timestep, device=latents.device).reshape(-1).expand(rows)
    default = float(ctx.settings.guidance)
    scales = ([default if guidance_scale is None else float(guidance_scale)] * rows
              if guidance_scale is None or isinstance(guidance_scale, (int, float)) else
              [float(s) for s in guidance_scale])
    negative = defended.negative_prompt if defended.negative_prompt is not None else ctx.settings.negative_prompt
    uncond = condition_like(_sdxl_unconditional(pipe, negative) if pooled else _encoded_text(pipe, negative or ""),
                            cond)
    factor = vae_factor(pipe)
    sampler = _deployed_sampler(pipe, ctx.settings.scheduler)
    groups: dict[tuple[float, float], list[int]] = {}
    for i in range(rows):
        groups.setdefault((float(timesteps[i]), scales[i]), []).append(i)
    out: list[torch.Tensor | None] = [None] * rows
    for (_, scale), index in groups.items():
        at = torch.tensor(index, device=latents.device)
        t = timesteps[at]
        ids = None if prompt_ids is None else prompt_ids.to(latents.device)[at]
        uncond_rows = repeat_rows(uncond, len(index)) if pooled else uncond.expand(len(index), -1, -1)
        conditions = Conditions(cond=cond[at], uncond=uncond_rows, scale=scale, prompt_ids=ids, vae_factor=factor)
        state = defended.guidance.begin(pipe, conditions)
        # the group's one timestep as a 0-d tensor: it broadcasts over the CFG branches a guidance batches
        step = replace(step_of_timestep(sampler, ctx.settings.steps, t[0]), timestep=t[0])
        pred = defended.guidance.noise(pipe.unet, latents[at], step, conditions, state)
        for j, i in enumerate(index):
            out[i] = pred[j:j + 1]
    return torch.cat(out)  # type: ignore[arg-type]


def prediction_target(noise_schedule: Any, latents: torch.Tensor, noise: torch.Tensor,
                      timesteps: torch.Tensor) -> torch.Tensor:
    """What the model predicts for ``latents`` noised with ``noise`` at ``timesteps``: the noise itself on an epsilon
    model (the very tensor), the velocity ``sqrt(abar) noise - sqrt(1 - abar) x0`` on a v-prediction model (SD 2.1
    768), as diffusers' training scripts set their target. Denoising losses compare in the model's own output
    space."""
    kind = noise_schedule.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return noise_schedule.get_velocity(latents, noise, timesteps)
    raise HarnessError(f"prediction type {kind!r} is not supported; epsilon or v_prediction")


def defended_unet_calls(defended: DefendedModel) -> int:
    """UNet forward passes one :func:`defended_noise` row costs (cost accounting)."""
    return 1 if defended.guidance is None else int(getattr(defended.guidance, "unet_calls", 1))


def _encoded_text(pipe: Any, text: str) -> torch.Tensor:
    """(1, 77, width): ``text`` through ``pipe``'s text encoder, padded as the pipelines pad; no gradient."""
    ids = pipe.tokenizer([text], padding="max_length", max_length=pipe.tokenizer.model_max_length, truncation=True,
                         return_tensors="pt").input_ids
    with torch.no_grad():
        return pipe.text_encoder(ids.to(pipe.text_encoder.device))[0]


def _sdxl_unconditional(pipe: Any, negative: str | None) -> TextConditioning:
    """SDXL's unconditional branch as its pipeline makes it for a run with this negative prompt (the runner passes
    none when it is empty): ``encode_prompt``'s, i.e. the zero conditioning under ``force_zeros_for_empty_prompt``;
    no gradient."""
    with torch.no_grad():
        _, hidden, _, pooled = pipe.encode_prompt(prompt="", device=pipe.text_encoder.device,
                                                  num_images_per_prompt=1, do_classifier_free_guidance=True,
                                                  negative_prompt=negative or None)
    return TextConditioning(hidden, pooled)


def _deployed_sampler(pipe: Any, name: str) -> Any:
    """The sampler the runner generates with (``settings.scheduler`` over the model's noise schedule)."""
    import diffusers

    return getattr(diffusers, SCHEDULERS[name]).from_config(pipe.scheduler.config)


class IncompatibleAttack(ValueError):
    """Raised before any work when a CRT does not expose what an attack needs."""


def check_compatible(attack: Attack, defended: DefendedModel) -> None:
    missing = attack.needs() - defended.exposes - ALWAYS_AVAILABLE
    if missing:
        raise IncompatibleAttack(
            f"attack {attack.name!r} ({attack.mode}) needs {sorted(a.value for a in missing)}, which CRT "
            f"{defended.crt_name!r} does not expose (it exposes {sorted(a.value for a in defended.exposes)})")


class Timer:
    """Adds the elapsed wall time to an :class:`AttackCost`."""

    def __init__(self, cost: AttackCost):
        self.cost = cost

    def __enter__(self) -> Timer:
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.cost.wall_s += time.perf_counter() - self.start
