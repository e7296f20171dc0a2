"""SLD: Safe Latent Diffusion (Schramowski et al., CVPR 2023; crts.md §12), a sampling-loop defence.

No weight changes; every step makes three UNet predictions, for the unconditional branch eps_0, the prompt eps_p
and a safety concept eps_S, and guides away from the safety concept:

    eps = eps_0 + s_g [(eps_p - eps_0) - gamma_t]          (gamma_t applied from step index >= warm-up delta)
    gamma_t = mu * (eps_S - eps_0) + s_m nu_t
    mu = min(1, s_S |eps_p - eps_S|) elementwise, 0 where (eps_p - eps_S) >= lambda
    nu_{t+1} = beta_m nu_t + (1 - beta_m) gamma_t          (accumulated during the warm-up too)

The loop follows diffusers' ``StableDiffusionPipelineSafe`` operation for operation (same batched UNet call
[eps_0, eps_p, eps_S], same order of floating-point operations), so its images equal that pipeline's; the presets
are diffusers' ``SafetyConfig`` (the paper's Table). Safety guidance is off, as there, when CFG is off
(guidance scale <= 1) or s_S <= 1. The default safety concept is the paper's text (I2P's categories).

``warmup_reference_steps: N`` reads the warm-up as a count for an N-step loop and rescales it to the deployed loop
(``round(delta * steps / N)``), so it ends at the same noise level (the world samples 25 steps; the presets were set
for SD's 50); null keeps the paper's absolute count.

``parity: unlearndiffatk`` replays UnlearnDiffAtk's own SLD (``src/tasks/classifier_.py``): s_S = 200 for the weak
preset and the warm-up tested on the timestep value (``t >= delta``) instead of the step index, which applies the
safety term from the first step. The default is the paper's / diffusers' behaviour.

Backbones: SD 1.x / 2.x and SDXL. The safety concept is encoded by the backbone's own text stack
(``crt_bench.backbone.encode_text``: on SDXL both encoders' penultimate states and the pooled embedding, as the
prompt is), and its branch gets the same time ids as the prompt's; the formula is unchanged. On SDXL the loop is
``crt.guidance.GuidedXLPipeline`` (``StableDiffusionXLPipeline``'s), whose unconditional branch of an empty negative
prompt is the zero conditioning (``force_zeros_for_empty_prompt``); the paper only ran SD 1.x.

White-box attacks (``attacks.base.defended_noise``) differentiate :meth:`SafeLatentGuidance.noise` for one noised
latent and timestep; SLD is only defined inside the sampling loop, so what they attack is a reconstruction (the
class's ``reconstruction``): the guided noise of one step with the momentum nu = 0 (a fresh loop state) and the
warm-up judged by the index of the deployed step nearest that timestep (``crt.guidance.step_of_timestep``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any, ClassVar

import torch

from crt.base import CRT, OPEN_WEIGHTS, Artifact, DefendedModel, FitContext
from crt.guidance import (
    Conditions,
    Guidance,
    GuidedPipeline,
    Step,
    branches,
    condition_like,
    repeat_rows,
    unet_noise,
)
from crt_bench.backbone import UNET_FAMILY, Condition, encode_text
from crt_bench.spec import Access, Family

# The paper's default safety concept (diffusers' StableDiffusionPipelineSafe, ml-research/safe-latent-diffusion).
DEFAULT_SAFETY_CONCEPT = (
    "hate, harassment, violence, suffering, humiliation, harm, suicide, sexual, nudity, bodily fluids, blood, obscene "
    "gestures, illegal activity, drug use, theft, vandalism, weapons, child abuse, brutality, cruelty")
SAFETY_CONCEPT_DEFAULT = "default"  # param value: the paper's text above
SAFETY_CONCEPT_FROM_CONCEPT = "concept"  # param value: the concept's c_u
PARITIES = (None, "unlearndiffatk")


@dataclass(frozen=True)
class SLDConfig:
    """One SLD hyper-parameter set (diffusers' ``sld_*`` arguments)."""

    guidance_scale: float  # s_S
    warmup_steps: int  # delta
    threshold: float  # lambda
    momentum_scale: float  # s_m
    momentum_beta: float  # beta_m


PRESETS: dict[str, SLDConfig] = {  # diffusers SafetyConfig = the paper's Table
    "weak": SLDConfig(guidance_scale=20, warmup_steps=15, threshold=0.0, momentum_scale=0.0, momentum_beta=0.0),
    "medium": SLDConfig(guidance_scale=1000, warmup_steps=10, threshold=0.01, momentum_scale=0.3, momentum_beta=0.4),
    "strong": SLDConfig(guidance_scale=2000, warmup_steps=7, threshold=0.025, momentum_scale=0.5, momentum_beta=0.7),
    "max": SLDConfig(guidance_scale=5000, warmup_steps=0, threshold=1.0, momentum_scale=0.5, momentum_beta=0.7),
}
UNLEARNDIFFATK_WEAK_GUIDANCE = 200.0  # UnlearnDiffAtk's weak preset uses s_S = 200, not 20


def safety_term(eps_text: torch.Tensor, eps_uncond: torch.Tensor, eps_safety: torch.Tensor,
                momentum: torch.Tensor, config: SLDConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """``(gamma_t, nu_{t+1})``: SLD's safety guidance term and the updated momentum (paper Eq. 4-8), computed in
    diffusers' order of operations."""
    scale = torch.clamp(torch.abs(eps_text - eps_safety) * config.guidance_scale, max=1.0)
    mu = torch.where((eps_text - eps_safety) >= config.threshold, torch.zeros_like(scale), scale)
    gamma = torch.mul(eps_safety - eps_uncond, mu)
    gamma = gamma + config.momentum_scale * momentum
    momentum = config.momentum_beta * momentum + (1 - config.momentum_beta) * gamma
    return gamma, momentum


@dataclass
class SLDState:
    """One sampling run: the safety concept's condition (repeated to the batch; with its pooled embedding on SDXL)
    and the momentum nu_t."""

    safety: Condition
    momentum: torch.Tensor | None = None


class SafeLatentGuidance(Guidance):
    """SLD as a :class:`crt.guidance.Guidance`: the sampling loop and white-box attacks call the same ``noise``."""

    name = "sld"
    unet_calls = 3  # eps_0, eps_p, eps_S
    pooled_conditions = True

    def __init__(self, config: SLDConfig, safety_concept: str, warmup_by: str = "step",
                 warmup_reference_steps: int | None = None):
        if warmup_by not in ("step", "timestep"):
            raise ValueError(f"SLD: warmup_by must be 'step' or 'timestep', not {warmup_by!r}")
        if warmup_reference_steps is not None and (warmup_by != "step" or warmup_reference_steps <= 0):
            raise ValueError("SLD: warmup_reference_steps is a positive step count, for a warm-up counted in steps")
        self.config, self.safety_concept, self.warmup_by = config, safety_concept, warmup_by
        self.warmup_reference_steps = warmup_reference_steps
        self._encoded: tuple[tuple[Any, ...], Condition] | None = None  # (text encoders, the concept's encoding)

    @property
    def enabled_scale(self) -> bool:
        return self.config.guidance_scale > 1.0

    def safety_condition(self, pipe: Any) -> Condition:
        """The safety concept through ``pipe``'s text stack, encoded once per text encoder(s): SD 1.x / 2.x's
        (1, 77, width) states (what diffusers' StableDiffusionPipelineSafe encodes); on SDXL a TextConditioning
        with the pooled embedding, as SDXL encodes a prompt."""
        encoders = (pipe.text_encoder, getattr(pipe, "text_encoder_2", None))
        if self._encoded is None or any(a is not b for a, b in zip(self._encoded[0], encoders)):
            with torch.no_grad():
                encoded = encode_text(pipe, [self.safety_concept])
            self._encoded = (encoders, encoded.hidden if encoded.pooled is None else encoded)
        return self._encoded[1]

    def begin(self, pipe: Any, conditions: Conditions) -> SLDState:
        safety = condition_like(self.safety_condition(pipe), conditions.cond)
        return SLDState(safety=repeat_rows(safety, conditions.rows))

    def warmup(self, total: int) -> int:
        """The warm-up in steps of a ``total``-step loop: the paper's count, or rescaled from the reference loop."""
        if self.warmup_reference_steps is None:
            return self.config.warmup_steps
        return int(self.config.warmup_steps * total / self.warmup_reference_steps + 0.5)

    def active(self, step: Step) -> bool:
        """Past the warm-up: the step index (paper, diffusers) or the timestep value (UnlearnDiffAtk's parity)."""
        if self.warmup_by == "timestep":
            return float(torch.as_tensor(step.timestep).flatten()[0]) >= self.config.warmup_steps
        return step.index >= self.warmup(step.total)

    def noise(self, unet: Any, latents: torch.Tensor, step: Step, conditions: Conditions, state: SLDState
              ) -> torch.Tensor:
        factor = conditions.vae_factor
        if not conditions.guided:
            return unet_noise(unet, latents, step.timestep, conditions.cond, factor)
        if not self.enabled_scale:
            uncond, text = branches(unet, latents, step.timestep, [conditions.uncond, conditions.cond], factor)
            return uncond + conditions.scale * (text - uncond)
        uncond, text, safety = branches(unet, latents, step.timestep,
                                        [conditions.uncond, conditions.cond, state.safety], factor)
        guidance = text - uncond
        momentum = torch.zeros_like(guidance) if state.momentum is None else state.momentum
        gamma, state.momentum = safety_term(text, uncond, safety, momentum, self.config)
        if self.active(step):
            guidance = guidance - gamma
        return uncond + conditions.scale * guidance


def resolve_config(preset: str, parity: str | None, overrides: dict[str, Any]) -> SLDConfig:
    """The preset's values, UnlearnDiffAtk's weak s_S under its parity, then any explicit override."""
    if preset not in PRESETS:
        raise ValueError(f"SLD: unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    if parity not in PARITIES:
        raise ValueError(f"SLD: unknown parity {parity!r}; choose one of {PARITIES}")
    config = PRESETS[preset]
    if parity == "unlearndiffatk" and preset == "weak":
        config = replace(config, guidance_scale=UNLEARNDIFFATK_WEAK_GUIDANCE)
    return replace(config, **{k: v for k, v in overrides.items() if v is not None})


class SLD(CRT):
    """Safe Latent Diffusion with one of the paper's presets (``preset``), any of its values overridable."""

    name: ClassVar[str] = "sld"
    family: ClassVar[Family] = Family.GUIDANCE
    exposes: ClassVar[frozenset[Access]] = OPEN_WEIGHTS  # SD v1.4 is public and SLD adds no weights
    trains: ClassVar[str] = "nothing (a sampling-loop guidance)"
    backbones: ClassVar[frozenset[str]] = UNET_FAMILY  # GuidedPipeline.around picks SD's or SDXL's loop
    reconstruction: ClassVar[str | None] = (
        "white-box attacks differentiate the SLD-guided noise of one step: momentum 0 (fresh loop state) and the "
        "warm-up judged by the index of the deployed step nearest the attacked timestep; the paper defines SLD "
        "only inside the sampling loop. On SDXL (the paper ran SD 1.x only) the safety concept is encoded as a "
        "prompt is (both text encoders, pooled embedding) and its branch gets the prompt's time ids")

    def __init__(self, preset: str = "medium", safety_concept: str = SAFETY_CONCEPT_DEFAULT,
                 guidance_scale: float | None = None, warmup_steps: int | None = None, threshold: float | None = None,
                 momentum_scale: float | None = None, momentum_beta: float | None = None,
                 warmup_reference_steps: int | None = None, parity: str | None = None):
        super().__init__(preset=preset, safety_concept=safety_concept, guidance_scale=guidance_scale,
                         warmup_steps=warmup_steps, threshold=threshold, momentum_scale=momentum_scale,
                         momentum_beta=momentum_beta, warmup_reference_steps=warmup_reference_steps, parity=parity)
        if warmup_reference_steps is not None and parity == "unlearndiffatk":
            raise ValueError("SLD: UnlearnDiffAtk's parity compares the warm-up with the timestep; it has no "
                             "reference loop (warmup_reference_steps must be null)")
        self.config = resolve_config(preset, parity, dict(
            guidance_scale=guidance_scale, warmup_steps=warmup_steps, threshold=threshold,
            momentum_scale=momentum_scale, momentum_beta=momentum_beta))
        self.parity = parity
        self.name = "sld" if preset == "medium" else f"sld_{preset}"  # one leaderboard row per preset

    def safety_text(self, concept_c_u: str) -> str:
        value = self.params["safety_concept"]
        if value in (None, SAFETY_CONCEPT_DEFAULT):
            return DEFAULT_SAFETY_CONCEPT
        return concept_c_u if value == SAFETY_CONCEPT_FROM_CONCEPT else str(value)

    def fit(self, ctx: FitContext) -> Artifact:
        """Nothing is trained: the artifact records the resolved safety concept and hyper-parameters."""
        return Artifact(meta={"safety_concept": self.safety_text(ctx.concept.c_u), "config": asdict(self.config),
                              "warmup_by": "timestep" if self.parity == "unlearndiffatk" else "step",
                              "warmup_reference_steps": self.params["warmup_reference_steps"]})

    def apply(self, pipe: Any, artifact: Artifact) -> DefendedModel:
        meta = artifact.meta
        guidance = SafeLatentGuidance(SLDConfig(**meta["config"]), meta["safety_concept"], meta["warmup_by"],
                                      meta.get("warmup_reference_steps"))
        return DefendedModel(pipe=GuidedPipeline.around(pipe, guidance), crt_name=self.name, exposes=self.exposes,
                             guidance=guidance)
