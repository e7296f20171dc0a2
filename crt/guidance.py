"""Sampling-loop defences: how one denoising step's noise is made from the UNet's predictions.

Why one protocol: a defence such as SLD or SAFREE changes no weight; it changes how the sampler combines UNet
predictions. The same object must serve two callers, so that what is attacked is what is deployed (no second copy):

- the sampling loop (:class:`GuidedPipeline`, what ``runners/generate.py`` calls through ``DefendedModel.pipe``),
  which calls :meth:`Guidance.begin` once per batch and :meth:`Guidance.noise` at every step;
- white-box attacks (``attacks.base.defended_noise``), which have one noised latent, one timestep and a text
  condition they differentiate: they call ``begin`` and then ``noise`` once, with the step index the timestep maps
  to in the deployed schedule (:func:`step_of_timestep`). A loop state (e.g. SLD's momentum) is therefore fresh in
  an attack: the attacked prediction is the deployed one at that step as if no earlier step had run.

The protocol:

- ``begin(pipe, conditions) -> state``: once per sampling run (a batch), before the first step; encodes what the
  defence needs besides the prompt (SLD's safety concept) and holds its loop state. It must not detach
  ``conditions.cond`` (attacks differentiate through it).
- ``noise(unet, latents, step, conditions, state) -> eps``: the noise the scheduler steps with; ``latents`` are
  already scaled by ``scheduler.scale_model_input``; may update ``state`` in place (momentum).

Backbones: a condition is SD 1.x / 2.x's (B, 77, width) token states, or a
:class:`crt_bench.backbone.TextConditioning` carrying SDXL's pooled embedding; every UNet call goes through
:func:`unet_noise` / :func:`branches`, which add SDXL's pooled embedding and time ids and leave SD 1.x / 2.x's call
exactly as it was. A guidance that handles pooled conditions says so (``pooled_conditions``); the others (SAFREE,
whose token projection reads one text encoder) are SD 1.x / 2.x only. :meth:`GuidedPipeline.around` builds the loop
that fits the pipeline: :class:`GuidedPipeline` over ``StableDiffusionPipeline``, :class:`GuidedXLPipeline` over
``StableDiffusionXLPipeline``.

:class:`ClassifierFreeGuidance` is plain CFG, the reference every guidance reduces to when it does nothing; with it
both loops reproduce their diffusers pipeline image for image.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from diffusers.pipelines.stable_diffusion import StableDiffusionPipelineOutput
from diffusers.pipelines.stable_diffusion_xl import StableDiffusionXLPipelineOutput

from crt_bench.backbone import SDXL, Condition, TextConditioning, backbone_of, concat, hidden_of, unet_output


@dataclass(frozen=True)
class Step:
    """Where in the sampling loop a prediction is made."""

    index: int  # the step's place in the loop, 0 = the first (noisiest) step
    timestep: torch.Tensor | int  # the scheduler's timestep value at that step
    total: int  # the number of steps of the loop


@dataclass
class Conditions:
    """The text conditions of one batch: the prompt's, the unconditional (empty or negative prompt) one, the CFG
    scale, and the prompt's token ids when it was text (None for a soft prompt; the first tokenizer's on SDXL).
    ``cond`` / ``uncond``: (B, 77, width) token states, or :class:`TextConditioning` with SDXL's pooled embedding;
    ``vae_factor``: pixels per latent cell, which SDXL's time ids (the image size) are computed from."""

    cond: Condition
    uncond: Condition
    scale: float
    prompt_ids: torch.Tensor | None = None
    vae_factor: int = 8

    @property
    def rows(self) -> int:
        return int(hidden_of(self.cond).shape[0])

    @property
    def guided(self) -> bool:
        """Classifier-free guidance is on (diffusers' ``guidance_scale > 1``)."""
        return self.scale > 1.0


class Guidance(ABC):
    """A sampling-loop defence (the value of ``DefendedModel.guidance``)."""

    name: ClassVar[str]
    unet_calls: ClassVar[int] = 2  # UNet predictions per step with CFG on (cost accounting of attacks)
    pooled_conditions: ClassVar[bool] = False  # handles TextConditioning with a pooled embedding (SDXL)

    def begin(self, pipe: Any, conditions: Conditions) -> Any:
        """The state of one sampling run, made before its first step (None: the guidance keeps none)."""
        return None

    @abstractmethod
    def noise(self, unet: Any, latents: torch.Tensor, step: Step, conditions: Conditions, state: Any
              ) -> torch.Tensor:
        """The noise prediction the scheduler steps with at ``step``."""


def unet_noise(unet: Any, latents: torch.Tensor, timestep: torch.Tensor | int, cond: Condition,
               vae_factor: int = 8) -> torch.Tensor:
    """One UNet call in the UNet's dtype (what diffusers' pipelines do). With a pooled condition (SDXL) the call
    :func:`crt_bench.backbone.unet_output` makes (pooled embedding and the time ids of an image ``vae_factor`` times
    the latents' size, as ``StableDiffusionXLPipeline`` sets them); otherwise SD 1.x / 2.x's plain call."""
    if isinstance(cond, TextConditioning) and cond.pooled is not None:
        return unet_output(unet, latents.to(unet.dtype), timestep, cond, vae_factor)
    return unet(latents.to(unet.dtype), timestep, encoder_hidden_states=hidden_of(cond).to(unet.dtype),
                return_dict=False)[0]


def branches(unet: Any, latents: torch.Tensor, timestep: torch.Tensor | int, conds: list[Condition],
             vae_factor: int = 8) -> tuple[torch.Tensor, ...]:
    """The UNet's predictions for each condition in ``conds``, in one batched call (latents repeated), the way
    diffusers' pipelines batch CFG: the same batch layout gives the same numbers."""
    preds = unet_noise(unet, torch.cat([latents] * len(conds)), timestep, concat(conds), vae_factor)
    return preds.chunk(len(conds))


def condition_like(cond: Condition, like: Condition) -> Condition:
    """``cond`` on ``like``'s device and in its dtype (both parts of a TextConditioning)."""
    reference = hidden_of(like)
    if isinstance(cond, TextConditioning):
        pooled = None if cond.pooled is None else cond.pooled.to(reference.device, reference.dtype)
        return TextConditioning(cond.hidden.to(reference.device, reference.dtype), pooled)
    return cond.to(reference.device, reference.dtype)


def repeat_rows(cond: Condition, rows: int) -> Condition:
    """A one-row condition repeated to ``rows`` rows."""
    return cond.repeat(rows) if isinstance(cond, TextConditioning) else cond.repeat(rows, 1, 1)


class ClassifierFreeGuidance(Guidance):
    """Plain CFG: ``eps_0 + s (eps_p - eps_0)``; only ``eps_p`` when ``s <= 1`` (as diffusers)."""

    name = "cfg"
    pooled_conditions = True

    def noise(self, unet: Any, latents: torch.Tensor, step: Step, conditions: Conditions, state: Any
              ) -> torch.Tensor:
        if not conditions.guided:
            return unet_noise(unet, latents, step.timestep, conditions.cond, conditions.vae_factor)
        uncond, text = branches(unet, latents, step.timestep, [conditions.uncond, conditions.cond],
                                conditions.vae_factor)
        return uncond + conditions.scale * (text - uncond)


def step_of_timestep(scheduler: Any, steps: int, timestep: int | torch.Tensor) -> Step:
    """The step of a ``steps``-step sampling loop of ``scheduler`` whose timestep is nearest ``timestep`` (the first
    of equals). Why: an attack draws t from the training range 0..999; a guidance that depends on the step (SLD's
    warm-up) is judged at the deployed step that denoises that noise level."""
    import copy

    schedule = copy.deepcopy(scheduler)
    schedule.set_timesteps(steps)
    timesteps = schedule.timesteps.to(torch.float64)
    value = float(torch.as_tensor(timestep).flatten()[0])
    index = int(torch.argmin((timesteps - value).abs()))
    return Step(index=index, timestep=timestep, total=len(timesteps))


class GuidedLoop:
    """What both guided pipelines share: the ``guidance`` attribute, :meth:`around` and the denoising loop.

    ``guidance`` is a plain attribute, not a pipeline component (it holds no weights), so a pipeline rebuilt from
    ``components`` has none and refuses to sample rather than silently sampling with plain CFG.
    """

    guidance: Guidance | None = None

    @classmethod
    def around(cls, pipe: Any, guidance: Guidance) -> GuidedPipeline | GuidedXLPipeline:
        """A guided pipeline over ``pipe``'s own modules (shared, not copied; the base stays as it was): a
        :class:`GuidedXLPipeline` for an SDXL pipeline, else a :class:`GuidedPipeline`, whichever class it is
        called on, so CRTs need not care about the backbone."""
        if backbone_of(pipe) == SDXL:
            if not guidance.pooled_conditions:
                raise ValueError(f"guidance {guidance.name!r} does not handle SDXL's pooled conditions")
            guided: Any = GuidedXLPipeline(
                **pipe.components, force_zeros_for_empty_prompt=bool(pipe.config.force_zeros_for_empty_prompt),
                add_watermarker=getattr(pipe, "watermark", None) is not None)
        else:
            guided = GuidedPipeline(**pipe.components,
                                    requires_safety_checker=bool(getattr(pipe.config, "requires_safety_checker",
                                                                         False)))
        guided.guidance = guidance
        guided.set_progress_bar_config(**getattr(pipe, "_progress_bar_config", {}))
        return guided

    def _check_guidance(self, unsupported: dict[str, Any]) -> Guidance:
        if unsupported:
            raise TypeError(f"{type(self).__name__} does not support {sorted(unsupported)}")
        if self.guidance is None:
            raise ValueError(f"this {type(self).__name__} has no guidance (build it with GuidedPipeline.around)")
        return self.guidance

    def _prompt_ids(self, prompt: Any, num_images_per_prompt: int, device: Any) -> torch.Tensor | None:
        """The (first) tokenizer's ids of a text prompt, one row per image; None for a soft prompt."""
        if prompt is None:
            return None
        texts = [prompt] if isinstance(prompt, str) else list(prompt)
        tokenizer = self.tokenizer  # type: ignore[attr-defined]
        ids = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids.to(device)
        return ids.repeat_interleave(num_images_per_prompt, dim=0)

    def _denoise(self, conditions: Conditions, height: int, width: int, num_inference_steps: int,
                 generator: Any, latents: torch.Tensor | None, eta: float, begin_index: bool = False
                 ) -> torch.Tensor:
        """The loop: initial latents, then per step the guidance's noise and one scheduler step. ``begin_index``:
        set the scheduler's begin index to 0 first, as ``StableDiffusionXLPipeline`` does."""
        pipe: Any = self
        guidance = pipe.guidance
        device = pipe._execution_device
        pipe.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = pipe.scheduler.timesteps
        dtype = hidden_of(conditions.cond).dtype
        latents = pipe.prepare_latents(conditions.rows, pipe.unet.config.in_channels, height, width, dtype, device,
                                       generator, latents)
        extra = pipe.prepare_extra_step_kwargs(generator, eta)
        if begin_index and hasattr(pipe.scheduler, "set_begin_index"):
            pipe.scheduler.set_begin_index(0)
        state = guidance.begin(pipe, conditions)
        with pipe.progress_bar(total=len(timesteps)) as bar:
            for i, t in enumerate(timesteps):
                model_input = pipe.scheduler.scale_model_input(latents, t)
                eps = guidance.noise(pipe.unet, model_input, Step(i, t, len(timesteps)), conditions, state)
                latents = pipe.scheduler.step(eps, t, latents, **extra, return_dict=False)[0]
                bar.update()
        return latents


class GuidedPipeline(GuidedLoop, StableDiffusionPipeline):
    """A ``StableDiffusionPipeline`` (SD 1.x / 2.x) whose denoising loop makes each step's noise with
    ``self.guidance``.

    Same call as the parent for what the harness uses (prompt or prompt_embeds, negative_prompt, steps, guidance
    scale, size, generators, latents, eta, output_type); SD's safety checker runs exactly when the base pipeline has
    one (the harness loads models without it).
    """

    def conditions(self, prompt: Any, prompt_embeds: torch.Tensor | None, negative_prompt: Any,
                   negative_prompt_embeds: torch.Tensor | None, num_images_per_prompt: int, scale: float
                   ) -> Conditions:
        """The batch's conditions, encoded as ``StableDiffusionPipeline`` encodes them."""
        device = self._execution_device
        cond, uncond = self.encode_prompt(prompt, device, num_images_per_prompt, True, negative_prompt,
                                          prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds)
        return Conditions(cond=cond, uncond=uncond, scale=float(scale),
                          prompt_ids=self._prompt_ids(prompt, num_images_per_prompt, device),
                          vae_factor=self.vae_scale_factor)

    @torch.no_grad()
    def __call__(self, prompt: str | list[str] | None = None, height: int | None = None, width: int | None = None,
                 num_inference_steps: int = 50, guidance_scale: float = 7.5,
                 negative_prompt: str | list[str] | None = None, num_images_per_prompt: int = 1, eta: float = 0.0,
                 generator: torch.Generator | list[torch.Generator] | None = None,
                 latents: torch.Tensor | None = None, prompt_embeds: torch.Tensor | None = None,
                 negative_prompt_embeds: torch.Tensor | None = None, output_type: str = "pil",
                 return_dict: bool = True, **unsupported: Any) -> Any:
        self._check_guidance(unsupported)
        height = height or self.unet.config.sample_size * self.vae_scale_factor
        width = width or self.unet.config.sample_size * self.vae_scale_factor
        self.check_inputs(prompt, height, width, None, negative_prompt, prompt_embeds, negative_prompt_embeds)
        conditions = self.conditions(prompt, prompt_embeds, negative_prompt, negative_prompt_embeds,
                                     num_images_per_prompt, guidance_scale)
        latents = self._denoise(conditions, height, width, num_inference_steps, generator, latents, eta)
        nsfw = None
        if output_type == "latent":
            images = latents
        else:
            decoded = self.vae.decode(latents / self.vae.config.scaling_factor, return_dict=False,
                                      generator=generator)[0]
            decoded, nsfw = self.run_safety_checker(decoded, self._execution_device, conditions.cond.dtype)
            keep = [True] * decoded.shape[0] if nsfw is None else [not flagged for flagged in nsfw]
            images = self.image_processor.postprocess(decoded, output_type=output_type, do_denormalize=keep)
        self.maybe_free_model_hooks()
        if not return_dict:
            return images, nsfw
        return StableDiffusionPipelineOutput(images=images, nsfw_content_detected=nsfw)


class GuidedXLPipeline(GuidedLoop, StableDiffusionXLPipeline):
    """A ``StableDiffusionXLPipeline`` whose denoising loop makes each step's noise with ``self.guidance``.

    Conditions are :class:`TextConditioning` (token states + pooled embedding, encoded by the parent's
    ``encode_prompt``, so ``force_zeros_for_empty_prompt`` gives the zero unconditional branch it gives there); the
    UNet gets the time ids of the requested size with no crop, which is the parent's default (``original_size`` =
    ``target_size`` = (height, width), crop (0, 0)). Same call as the parent for what the harness uses (prompt or
    prompt_embeds + pooled_prompt_embeds, negative prompt, steps, guidance scale, size, generators, latents, eta,
    output_type); no refiner hand-off (``denoising_end``), guidance rescale, IP-adapter or micro-conditioning.
    """

    def conditions(self, prompt: Any, prompt_embeds: torch.Tensor | None, pooled_prompt_embeds: torch.Tensor | None,
                   negative_prompt: Any, negative_prompt_embeds: torch.Tensor | None,
                   negative_pooled_prompt_embeds: torch.Tensor | None, num_images_per_prompt: int, scale: float
                   ) -> Conditions:
        """The batch's conditions, encoded as ``StableDiffusionXLPipeline`` encodes them."""
        device = self._execution_device
        cond, uncond, pooled, uncond_pooled = self.encode_prompt(
            prompt=prompt, device=device, num_images_per_prompt=num_images_per_prompt,
            do_classifier_free_guidance=True, negative_prompt=negative_prompt, prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds, pooled_prompt_embeds=pooled_prompt_embeds,
            negative_pooled_prompt_embeds=negative_pooled_prompt_embeds)
        return Conditions(cond=TextConditioning(cond, pooled), uncond=TextConditioning(uncond, uncond_pooled),
                          scale=float(scale), prompt_ids=self._prompt_ids(prompt, num_images_per_prompt, device),
                          vae_factor=self.vae_scale_factor)

    @torch.no_grad()
    def __call__(self, prompt: str | list[str] | None = None, height: int | None = None, width: int | None = None,
                 num_inference_steps: int = 50, guidance_scale: float = 5.0,
                 negative_prompt: str | list[str] | None = None, num_images_per_prompt: int = 1, eta: float = 0.0,
                 generator: torch.Generator | list[torch.Generator] | None = None,
                 latents: torch.Tensor | None = None, prompt_embeds: torch.Tensor | None = None,
                 negative_prompt_embeds: torch.Tensor | None = None,
                 pooled_prompt_embeds: torch.Tensor | None = None,
                 negative_pooled_prompt_embeds: torch.Tensor | None = None, output_type: str = "pil",
                 return_dict: bool = True, **unsupported: Any) -> Any:
        self._check_guidance(unsupported)
        height = height or self.default_sample_size * self.vae_scale_factor
        width = width or self.default_sample_size * self.vae_scale_factor
        self.check_inputs(prompt, None, height, width, None, negative_prompt, None, prompt_embeds,
                          negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds)
        conditions = self.conditions(prompt, prompt_embeds, pooled_prompt_embeds, negative_prompt,
                                     negative_prompt_embeds, negative_pooled_prompt_embeds, num_images_per_prompt,
                                     guidance_scale)
        latents = self._denoise(conditions, height, width, num_inference_steps, generator, latents, eta,
                                begin_index=True)
        images = latents if output_type == "latent" else self._decode(latents, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return StableDiffusionXLPipelineOutput(images=images)

    def _decode(self, latents: torch.Tensor, output_type: str) -> Any:
        """Latents to images as ``StableDiffusionXLPipeline`` decodes them (fp16 VAE upcast, latent mean / std
        when the VAE has them, the watermark when the pipeline has one)."""
        upcast = self.vae.dtype == torch.float16 and self.vae.config.force_upcast
        if upcast:
            self.upcast_vae()
            latents = latents.to(next(iter(self.vae.post_quant_conv.parameters())).dtype)
        mean, std = getattr(self.vae.config, "latents_mean", None), getattr(self.vae.config, "latents_std", None)
        if mean is not None and std is not None:
            mean = torch.tensor(mean).view(1, 4, 1, 1).to(latents.device, latents.dtype)
            std = torch.tensor(std).view(1, 4, 1, 1).to(latents.device, latents.dtype)
            latents = latents * std / self.vae.config.scaling_factor + mean
        else:
            latents = latents / self.vae.config.scaling_factor
        decoded = self.vae.decode(latents, return_dict=False)[0]
        if upcast:
            self.vae.to(dtype=torch.float16)
        if self.watermark is not None:
            decoded = self.watermark.apply_watermark(decoded)
        return self.image_processor.postprocess(decoded, output_type=output_type)
