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

:class:`ClassifierFreeGuidance` is plain CFG, the reference every guidance reduces to when it does nothing; with it
:class:`GuidedPipeline` reproduces ``StableDiffusionPipeline`` image for image.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from diffusers import StableDiffusionPipeline
from diffusers.pipelines.stable_diffusion import StableDiffusionPipelineOutput


@dataclass(frozen=True)
class Step:
    """Where in the sampling loop a prediction is made."""

    index: int  # the step's place in the loop, 0 = the first (noisiest) step
    timestep: torch.Tensor | int  # the scheduler's timestep value at that step
    total: int  # the number of steps of the loop


@dataclass
class Conditions:
    """The text conditions of one batch: the prompt's, the unconditional (empty or negative prompt) one, the CFG
    scale, and the prompt's token ids when it was text (None for a soft prompt); (B, 77, width) each."""

    cond: torch.Tensor
    uncond: torch.Tensor
    scale: float
    prompt_ids: torch.Tensor | None = None

    @property
    def guided(self) -> bool:
        """Classifier-free guidance is on (diffusers' ``guidance_scale > 1``)."""
        return self.scale > 1.0


class Guidance(ABC):
    """A sampling-loop defence (the value of ``DefendedModel.guidance``)."""

    name: ClassVar[str]
    unet_calls: ClassVar[int] = 2  # UNet predictions per step with CFG on (cost accounting of attacks)

    def begin(self, pipe: Any, conditions: Conditions) -> Any:
        """The state of one sampling run, made before its first step (None: the guidance keeps none)."""
        return None

    @abstractmethod
    def noise(self, unet: Any, latents: torch.Tensor, step: Step, conditions: Conditions, state: Any
              ) -> torch.Tensor:
        """The noise prediction the scheduler steps with at ``step``."""


def unet_noise(unet: Any, latents: torch.Tensor, timestep: torch.Tensor | int, cond: torch.Tensor) -> torch.Tensor:
    """One UNet call in the UNet's dtype (what diffusers' pipelines do)."""
    return unet(latents.to(unet.dtype), timestep, encoder_hidden_states=cond.to(unet.dtype), return_dict=False)[0]


def branches(unet: Any, latents: torch.Tensor, timestep: torch.Tensor | int, conds: list[torch.Tensor]
             ) -> tuple[torch.Tensor, ...]:
    """The UNet's predictions for each condition in ``conds``, in one batched call (latents repeated), the way
    diffusers' pipelines batch CFG: the same batch layout gives the same numbers."""
    preds = unet_noise(unet, torch.cat([latents] * len(conds)), timestep, torch.cat(conds))
    return preds.chunk(len(conds))


class ClassifierFreeGuidance(Guidance):
    """Plain CFG: ``eps_0 + s (eps_p - eps_0)``; only ``eps_p`` when ``s <= 1`` (as diffusers)."""

    name = "cfg"

    def noise(self, unet: Any, latents: torch.Tensor, step: Step, conditions: Conditions, state: Any
              ) -> torch.Tensor:
        if not conditions.guided:
            return unet_noise(unet, latents, step.timestep, conditions.cond)
        uncond, text = branches(unet, latents, step.timestep, [conditions.uncond, conditions.cond])
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


class GuidedPipeline(StableDiffusionPipeline):
    """A ``StableDiffusionPipeline`` whose denoising loop makes each step's noise with ``self.guidance``.

    Same call as the parent for what the harness uses (prompt or prompt_embeds, negative_prompt, steps, guidance
    scale, size, generators, latents, eta, output_type); SD's safety checker runs exactly when the base pipeline has
    one (the harness loads models without it). ``guidance`` is a plain attribute, not a pipeline component (it holds
    no weights), so a pipeline rebuilt from ``components`` has none and refuses to sample rather than silently
    sampling with plain CFG.
    """

    guidance: Guidance | None = None

    @classmethod
    def around(cls, pipe: Any, guidance: Guidance) -> GuidedPipeline:
        """A guided pipeline over ``pipe``'s own modules (shared, not copied; the base stays as it was)."""
        guided = cls(**pipe.components,
                     requires_safety_checker=bool(getattr(pipe.config, "requires_safety_checker", False)))
        guided.guidance = guidance
        guided.set_progress_bar_config(**getattr(pipe, "_progress_bar_config", {}))
        return guided

    def conditions(self, prompt: Any, prompt_embeds: torch.Tensor | None, negative_prompt: Any,
                   negative_prompt_embeds: torch.Tensor | None, num_images_per_prompt: int, scale: float
                   ) -> Conditions:
        """The batch's conditions, encoded as ``StableDiffusionPipeline`` encodes them."""
        device = self._execution_device
        cond, uncond = self.encode_prompt(prompt, device, num_images_per_prompt, True, negative_prompt,
                                          prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds)
        ids = None
        if prompt is not None:
            texts = [prompt] if isinstance(prompt, str) else list(prompt)
            ids = self.tokenizer(texts, padding="max_length", max_length=self.tokenizer.model_max_length,
                                 truncation=True, return_tensors="pt").input_ids.to(device)
            ids = ids.repeat_interleave(num_images_per_prompt, dim=0)
        return Conditions(cond=cond, uncond=uncond, scale=float(scale), prompt_ids=ids)

    @torch.no_grad()
    def __call__(self, prompt: str | list[str] | None = None, height: int | None = None, width: int | None = None,
                 num_inference_steps: int = 50, guidance_scale: float = 7.5,
                 negative_prompt: str | list[str] | None = None, num_images_per_prompt: int = 1, eta: float = 0.0,
                 generator: torch.Generator | list[torch.Generator] | None = None,
                 latents: torch.Tensor | None = None, prompt_embeds: torch.Tensor | None = None,
                 negative_prompt_embeds: torch.Tensor | None = None, output_type: str = "pil",
                 return_dict: bool = True, **unsupported: Any) -> Any:
        if unsupported:
            raise TypeError(f"GuidedPipeline does not support {sorted(unsupported)}")
        if self.guidance is None:
            raise ValueError("this GuidedPipeline has no guidance (build it with GuidedPipeline.around)")
        height = height or self.unet.config.sample_size * self.vae_scale_factor
        width = width or self.unet.config.sample_size * self.vae_scale_factor
        self.check_inputs(prompt, height, width, None, negative_prompt, prompt_embeds, negative_prompt_embeds)
        conditions = self.conditions(prompt, prompt_embeds, negative_prompt, negative_prompt_embeds,
                                     num_images_per_prompt, guidance_scale)
        device = self._execution_device
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps
        latents = self.prepare_latents(conditions.cond.shape[0], self.unet.config.in_channels, height, width,
                                       conditions.cond.dtype, device, generator, latents)
        extra = self.prepare_extra_step_kwargs(generator, eta)
        state = self.guidance.begin(self, conditions)
        with self.progress_bar(total=len(timesteps)) as bar:
            for i, t in enumerate(timesteps):
                model_input = self.scheduler.scale_model_input(latents, t)
                eps = self.guidance.noise(self.unet, model_input, Step(i, t, len(timesteps)), conditions, state)
                latents = self.scheduler.step(eps, t, latents, **extra, return_dict=False)[0]
                bar.update()
        nsfw = None
        if output_type == "latent":
            images = latents
        else:
            decoded = self.vae.decode(latents / self.vae.config.scaling_factor, return_dict=False,
                                      generator=generator)[0]
            decoded, nsfw = self.run_safety_checker(decoded, device, conditions.cond.dtype)
            keep = [True] * decoded.shape[0] if nsfw is None else [not flagged for flagged in nsfw]
            images = self.image_processor.postprocess(decoded, output_type=output_type, do_denormalize=keep)
        self.maybe_free_model_hooks()
        if not return_dict:
            return images, nsfw
        return StableDiffusionPipelineOutput(images=images, nsfw_content_detected=nsfw)
