"""AdvUnlearn (Zhang et al., NeurIPS 2024, "Defensive Unlearning with Adversarial Training for Robust Concept Erasure
in Diffusion Models"; crts.md §11): adversarial training of the text encoder against soft prompt attacks, on ESD's
objective, with a retain term that keeps other prompts where they were. The UNet is never trained; the defended
model is SD with its ``text_encoder`` swapped for the trained one.

Bi-level (official ``train-scripts/AdvUnlearn.py``, ``utils/get_loss.py``, ``utils/attack_util.py``):

- inner (every ``adv_prompt_update_step`` iterations once ``warmup_iterations`` are done): k word embeddings
  ``delta`` prefixed to the concept's tokens, ``[SOT, delta, c, EOT...]``, are fitted by ``attack_steps`` Adam steps
  (the paper's "PGD": no projection) on ``||eps(x_t, TE_phi(c + delta), t) - eps_0(x_t, c, t)||^2``, each step on a
  fresh ``x_t``; the text encoder is held fixed, ``delta`` starts from the previous round's (``attack_init:
  latest``) or a random vocabulary word (``random``, and always the first round);
- outer: one Adam step of the text encoder on the old ESD loss for the adversarial prompt (the clean prompt during
  warm-up), ``||eps(x_t, TE_phi(c + delta*), t) - [eps_0(x_t, '', t) - eta (eps_0(x_t, c, t) - eps_0(x_t, '', t))]||^2``
  plus ``gamma ||eps(x_r, TE_phi(c_r), t) - eps_0(x_r, c_r, t)||^2`` on ``retain_batch`` retain prompts c_r (the
  official ``retain_train: reg``, the paper's form; its ``iter`` variant, a separate retain step, is not built).

``eps`` is the frozen UNet throughout; ``eps_0`` is it with the base text encoder. ``x_t`` / ``x_r`` are sampled as
old ESD samples them: partial DDIM at ``start_guidance`` from noise, conditioned on the base text encoder's
embedding of the prompt (old ESD samples with the model being trained, but here that is the untouched UNet and the
CompVis conditioning model, i.e. the base pipeline). The retain latents share the concept's step count and ``t``,
and are drawn in the same batch. Trained: every parameter of the text encoder's transformer layers and its final
layer norm (``text_encoder_full``); the token and position embeddings stay (so the attack's vocabulary is fixed).

Parity switches (default: the corrected behaviour; ``true``/``official`` replicates the official code):

- ``timestep_pairing``: ``matched`` pairs the latent after k DDIM steps with a DDPM ``t`` of its own noise level
  (crt.esd.ddpm_bin); ``official`` runs the CompVis sampler's ``till_T`` loop (50 steps for index 0 or 1, else
  51 - index) and draws ``t`` in ``[1000 index / 50, 1000 (index + 1) / 50)``, about two bins noisier than x_t;
- ``attack_grad_accumulation``: the official attack never zeroes the gradient of ``delta``, so Adam sees the running
  sum of all earlier steps' gradients;
- ``prompt_length``: where delta goes is counted in ``tokens``; the official code counts ``words``
  (``len(prompt.split())``), the same for its one-token concepts, but it splits a multi-token word and drops its
  tail otherwise.

Retain prompts: the official set is coco_object (243 "a photo of <object>" prompts, a CSV of its repository). A
plug-in cannot fetch files through the harness's checksummed downloads, so the first of ``retain_sets`` the concept
has stands in for it (``reconstruction``): on real concepts ``validation_acceptable``, the COCO val2014 captions
Espresso's repository ships (COCO, like coco_object, and no reported test set); on the world its
``finetune_acceptable`` captions. Drawn ``retain_batch`` at a time without replacement, the order reshuffled each
pass, as the official PromptDataset does.

Access: the released text encoder is public (HF OPTML-Group/AdvUnlearn) and the UNet it runs with is SD v1.4's, so
a white-box attacker has the defended system's weights and gradients (the attacks read ``defended.pipe
.text_encoder``, the swapped one) and the unerased model too: :data:`crt.base.OPEN_WEIGHTS`. An attack that only
uses the base model's public text encoder (Ring-A-Bell, ``Access.TEXT_ENCODER``) never sees the swapped encoder:
against AdvUnlearn it is a transfer attack, crts.md §0, and its prompts are reused as for every other CRT.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from crt.base import (
    CRT,
    OPEN_WEIGHTS,
    Artifact,
    DefendedModel,
    FitContext,
    TrainingState,
    edited_copy,
    replace_module,
)
from crt.esd import _autocast, _eps, _summarise, ddpm_bin, esd_target, partial_ddim
from crt_bench import progress
from crt_bench.spec import Family, PromptItem

TRAIN_METHODS = ("text_encoder_full",)
ATTACK_METHODS = ("pgd", "fast_at")
ATTACK_INITS = ("latest", "random")
TIMESTEP_PAIRINGS = ("matched", "official")
PROMPT_LENGTHS = ("tokens", "words")
PREFIX_KEY = "adversarial_prefix"  # the live delta in the fit's checkpoint (never in the artifact)


@dataclass(frozen=True)
class AdvUnlearnConfig:
    """Hyper-parameters; defaults are the official code's argparse defaults (crts.md §11) with ``retain_train: reg``
    (the paper's objective and the README's commands) and the corrected parity switches."""

    concept: str | None = None  # text to erase; None = the concept's c_u
    iterations: int = 1000
    lr: float = 1.0e-5
    train_method: Literal["text_encoder_full"] = "text_encoder_full"
    eta: float = 1.0  # negative guidance of the old ESD target eps_0('') - eta * (eps_0(c) - eps_0(''))
    start_guidance: float = 3.0
    ddim_steps: int = 50
    warmup_iterations: int = 200  # plain ESD on the clean prompt before the first attack
    adv_prompt_update_step: int = 1  # an attack round every this many iterations after warm-up
    adv_prompt_num: int = 1  # k, the prefix word embeddings
    attack_steps: int = 30
    attack_lr: float = 1.0e-3
    attack_method: Literal["pgd", "fast_at"] = "pgd"  # fast_at: the step takes the gradient's sign (README b)
    attack_init: Literal["latest", "random"] = "latest"
    attack_grad_accumulation: bool = False  # parity: true = the official attack's never-zeroed gradient
    retain_sets: tuple[str, ...] | str = ("validation_acceptable", "finetune_acceptable")  # the first the concept
    # has stands in for coco_object (real concepts: COCO val2014 captions; the world: its fine-tuning captions)
    retain_batch: int = 5
    retain_weight: float = 1.0  # gamma (0.3 in the README's nudity command)
    timestep_pairing: Literal["matched", "official"] = "matched"
    prompt_length: Literal["tokens", "words"] = "tokens"
    resolution: int | None = None  # pixels; None = the generation settings' height/width
    seed: int = 0
    mixed_precision: str | None = None  # None | "bf16" | "fp16" (autocast over the UNet and the text encoder)
    log_every: int = 10


def check_config(cfg: AdvUnlearnConfig) -> None:
    """Refuse a misspelt choice before any work."""
    for value, allowed, what in ((cfg.train_method, TRAIN_METHODS, "train_method"),
                                 (cfg.attack_method, ATTACK_METHODS, "attack_method"),
                                 (cfg.attack_init, ATTACK_INITS, "attack_init"),
                                 (cfg.timestep_pairing, TIMESTEP_PAIRINGS, "timestep_pairing"),
                                 (cfg.prompt_length, PROMPT_LENGTHS, "prompt_length")):
        if value not in allowed:
            raise ValueError(f"AdvUnlearn {what} must be one of {allowed}, got {value!r}")
    if cfg.adv_prompt_num < 1 or cfg.adv_prompt_update_step < 1 or cfg.retain_batch < 1:
        raise ValueError("AdvUnlearn adv_prompt_num, adv_prompt_update_step and retain_batch must be >= 1")


def retain_set_names(cfg: AdvUnlearnConfig) -> tuple[str, ...]:
    """``retain_sets`` as a tuple of prompt-set names, in order of preference."""
    return (cfg.retain_sets,) if isinstance(cfg.retain_sets, str) else tuple(cfg.retain_sets)


def trainable_names(text_encoder: nn.Module, train_method: str = "text_encoder_full") -> list[str]:
    """``text_encoder_full``: every parameter of the transformer layers and the final layer norm, in
    ``named_parameters`` order; not the token or position embeddings."""
    if train_method not in TRAIN_METHODS:
        raise ValueError(f"AdvUnlearn train_method must be one of {TRAIN_METHODS}, got {train_method!r}")
    names = []
    for name, _ in text_encoder.named_parameters():
        inner = name.removeprefix("text_model.")
        if inner.startswith(("encoder.", "final_layer_norm.")):
            names.append(name)
    return names


def encode_embeds(text_encoder: nn.Module, inputs_embeds: torch.Tensor) -> torch.Tensor:
    """The last hidden state of a CLIP text encoder fed word embeddings (B, 77, width) instead of token ids:
    position embeddings, the causal mask, the layers, the final layer norm, as ``CLIPTextModel.forward`` does."""
    from transformers.masking_utils import create_causal_mask

    model = getattr(text_encoder, "text_model", text_encoder)
    hidden = model.embeddings(inputs_embeds=inputs_embeds)
    mask = create_causal_mask(config=model.config, inputs_embeds=hidden, attention_mask=None, cache=None)
    out = model.encoder(inputs_embeds=hidden, attention_mask=mask, is_causal=True)
    return model.final_layer_norm(out.last_hidden_state)


def token_ids(tokenizer: Any, texts: list[str]) -> torch.Tensor:
    return tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def prompt_length(tokenizer: Any, text: str, mode: str = "tokens") -> int:
    """How many positions after SOT the prompt takes: its tokens, or (official) its whitespace-separated words."""
    if mode == "words":
        return len(text.split())
    if mode == "tokens":
        return len(tokenizer(text, add_special_tokens=False).input_ids)
    raise ValueError(f"AdvUnlearn prompt_length must be one of {PROMPT_LENGTHS}, got {mode!r}")


def prefix_embeddings(embeds: torch.Tensor, delta: torch.Tensor, length: int) -> torch.Tensor:
    """``[SOT, delta, the prompt's `length` positions, the rest]`` from the prompt's word embeddings (77, width) and
    delta (k, width): the k positions right after the prompt (its EOT, then padding) make room, so the sequence
    keeps 77 positions and still ends in EOT/padding (SD 1.x pads with EOT)."""
    k = delta.shape[0]
    total = embeds.shape[0]
    length = min(length, total - 2 - k)
    return torch.cat([embeds[:1], delta.to(embeds.dtype), embeds[1:1 + length], embeds[1 + length + k:]])


@dataclass(frozen=True)
class NoiseLevel:
    """A training example's noise level: DDIM steps from pure noise to x_t, and the DDPM ``t`` bin [lo, hi)."""

    steps: int
    lo: int
    hi: int


def noise_level(scheduler: Any, index: int, pairing: str = "matched") -> NoiseLevel:
    """The noise level of drawn index ``index`` in 0..S-1. ``matched``: k = index DDIM steps, the bin holding x_t's
    own timestep; ``official``: the CompVis ``till_T`` loop's step count (DDIM indices S-1 .. index-1, all S for
    index 0 or 1) and the bin ``[round(T index / S), round(T (index + 1) / S))``."""
    steps = scheduler.num_inference_steps
    if pairing == "matched":
        lo, hi = ddpm_bin(scheduler, index)
        return NoiseLevel(index, lo, hi)
    if pairing == "official":
        train_steps = scheduler.config.num_train_timesteps
        ran = steps if index <= 1 else steps + 1 - index
        return NoiseLevel(ran, round(index / steps * train_steps), round((index + 1) / steps * train_steps))
    raise ValueError(f"AdvUnlearn timestep_pairing must be one of {TIMESTEP_PAIRINGS}, got {pairing!r}")


def draw_noise_level(scheduler: Any, gen: torch.Generator, pairing: str = "matched") -> NoiseLevel:
    """:func:`noise_level` of an index drawn uniformly from ``gen``."""
    return noise_level(scheduler, int(torch.randint(scheduler.num_inference_steps, (), generator=gen)), pairing)


def retain_indices(iteration: int, count: int, batch: int, seed: int) -> list[int]:
    """The retain prompts of one iteration: each pass over the ``count`` prompts is a fresh permutation (seeded by
    ``seed`` and the pass), read ``batch`` at a time; a pass starts over when fewer than ``batch`` are unseen (the
    official PromptDataset's reset). A function of the iteration alone, so a resumed fit draws the same."""
    batch = min(batch, count)
    per_pass = count // batch
    pass_index, chunk = divmod(iteration, per_pass)
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed * 1_000_003 + pass_index))
    return order[chunk * batch:(chunk + 1) * batch].tolist()


def optimise_prefix(delta: torch.Tensor, loss_of: Callable[[torch.Tensor], torch.Tensor], steps: int, lr: float,
                    method: str = "pgd", accumulate: bool = False) -> tuple[torch.Tensor, list[float]]:
    """The inner attack: ``steps`` Adam steps on ``delta`` (each ``loss_of(delta)`` may draw a fresh example), the
    step direction the gradient (``pgd``) or its sign (``fast_at``); ``accumulate`` never zeroes the gradient (the
    official code). Returns the final delta (detached) and the loss of every step."""
    if method not in ATTACK_METHODS:
        raise ValueError(f"AdvUnlearn attack_method must be one of {ATTACK_METHODS}, got {method!r}")
    delta = delta.detach().clone().requires_grad_(True)
    optimizer = torch.optim.Adam([delta], lr=lr)
    losses = []
    for _ in range(steps):
        if not accumulate:
            optimizer.zero_grad(set_to_none=True)
        loss = loss_of(delta)
        loss.backward(inputs=[delta])
        if method == "fast_at":
            delta.grad.sign_()
        optimizer.step()
        losses.append(loss.item())
    return delta.detach(), losses


@dataclass
class OuterLoss:
    """The outer loss and its two terms (the retain term before its weight)."""

    total: torch.Tensor
    unlearn: float
    retain: float


def outer_loss(prediction: torch.Tensor, target: torch.Tensor, retain_prediction: torch.Tensor | None,
               retain_target: torch.Tensor | None, retain_weight: float) -> OuterLoss:
    """``mse(prediction, ESD target) + gamma * mse(retain prediction, eps_0 on the retain prompts)`` (means over
    all elements, as the official ``MSELoss``); no retain term without retain predictions."""
    unlearn = F.mse_loss(prediction, target)
    if retain_prediction is None or retain_target is None:
        return OuterLoss(unlearn, unlearn.item(), 0.0)
    retain = F.mse_loss(retain_prediction, retain_target)
    return OuterLoss(unlearn + retain_weight * retain, unlearn.item(), retain.item())


@dataclass
class Conditioning:
    """The base text encoder's embeddings the fit keeps: the concept, the empty prompt, and the concept's word
    embeddings and length (the attack's layout)."""

    concept: torch.Tensor  # (1, 77, width) eps_0's condition c
    empty: torch.Tensor  # (1, 77, width) ''
    concept_ids: torch.Tensor  # (77,)
    concept_embeds: torch.Tensor  # (77, width) word embeddings of the concept's tokens (fixed: not trained)
    length: int


class AdvUnlearn(CRT):
    """AdvUnlearn; see the module docstring."""

    name = "advunlearn"
    family = Family.TEXT_ENCODER_SWAP
    exposes = OPEN_WEIGHTS  # a released text encoder on public SD v1.4: its weights, gradients and the unerased base
    trains = "text_encoder: transformer layers + final layer norm (text_encoder_full)"
    reconstruction = ("retain prompts: the concept's validation_acceptable (COCO val2014 captions) or, without one, "
                      "finetune_acceptable stand in for the official coco_object CSV (243 'a photo of <object>' "
                      "prompts), which a plug-in cannot fetch")
    version = "1"

    def __init__(self, **params: Any):
        super().__init__(**params)
        self.config = AdvUnlearnConfig(**params)
        check_config(self.config)

    def fit(self, ctx: FitContext) -> Artifact:
        cfg, pipe = self.config, ctx.pipe
        frozen = pipe.unet
        device = frozen.device
        text = cfg.concept or ctx.concept.c_u
        retain_set, retain = self._retain_prompts(ctx)
        base = self._conditioning(pipe, text, device)
        encoder, names = _trainable_copy(pipe.text_encoder, cfg.train_method, device)
        params = [p for n, p in encoder.named_parameters() if n in names]
        optimizer = torch.optim.Adam(params, lr=cfg.lr)
        scheduler = self._scheduler(pipe)
        gen = torch.Generator().manual_seed(cfg.seed + ctx.seed)  # the run seed shifts the paper seed
        delta = torch.zeros(cfg.adv_prompt_num, base.concept_embeds.shape[-1], device=device)
        history: dict[str, list[float]] = {"loss": [], "unlearn": [], "retain": [], "attack": []}
        tensors = {**{n: p for n, p in encoder.named_parameters() if n in names}, PREFIX_KEY: delta}
        training = TrainingState(tensors, optimizer, gen, history=history)
        start = training.resume(ctx, cfg.iterations)
        shape = self._latent_shape(ctx)
        for step in range(start, cfg.iterations):
            attacked = step >= cfg.warmup_iterations
            if attacked and (step - cfg.warmup_iterations) % cfg.adv_prompt_update_step == 0:
                first = step == cfg.warmup_iterations
                found, losses = self._attack(encoder, frozen, scheduler, base, delta, first, shape, gen)
                delta.copy_(found)
                history["attack"].append(losses[-1] if losses else float("nan"))
            batch = [retain[i] for i in retain_indices(step, len(retain), cfg.retain_batch, cfg.seed + ctx.seed)]
            with _autocast(device, cfg.mixed_precision):
                loss = self._outer(encoder, frozen, scheduler, base, delta if attacked else None, batch, pipe, shape,
                                   gen)
            optimizer.zero_grad(set_to_none=True)
            loss.total.backward(inputs=params)
            optimizer.step()
            if not math.isfinite(loss.total.item()):
                raise FloatingPointError(f"AdvUnlearn loss is {loss.total.item()} at step {step}")
            history["loss"].append(loss.total.item())
            history["unlearn"].append(loss.unlearn)
            history["retain"].append(loss.retain)
            progress.step(total=cfg.iterations, loss=history["loss"][-1])
            ctx.checkpoint(step + 1, training.snapshot, cfg.iterations)
        artifact_tensors = {n: p.detach().float().cpu().clone() for n, p in encoder.named_parameters() if n in names}
        meta = {"config": asdict(cfg), "concept_text": text, "trained_parameters": len(artifact_tensors),
                "trained_numel": sum(t.numel() for t in artifact_tensors.values()),
                "retain": {"set": retain_set, "prompts": len(retain), "stands_in_for": "coco_object (243)"},
                "loss": _summarise(history["loss"], cfg.log_every),
                "unlearn_loss": _summarise(history["unlearn"], cfg.log_every),
                "retain_loss": _summarise(history["retain"], cfg.log_every),
                "attack_rounds": len(history["attack"]), "attack_final_loss": history["attack"][-cfg.log_every:],
                "adversarial_prefix_norm": float(delta.norm()) if history["attack"] else None,
                "target": f"eps_0(x_t, '', t) - {cfg.eta:g} * (eps_0(x_t, c, t) - eps_0(x_t, '', t))",
                "sampling": f"partial DDIM ({cfg.ddim_steps} steps, guidance {cfg.start_guidance:g}) with the base "
                            f"UNet and text encoder; timestep pairing {cfg.timestep_pairing}"}
        return Artifact(tensors=artifact_tensors, meta=meta)

    def apply(self, pipe: Any, artifact: Artifact) -> DefendedModel:
        encoder = edited_copy(pipe.text_encoder, artifact.tensors)
        return DefendedModel(pipe=replace_module(pipe, "text_encoder", encoder), crt_name=self.name,
                             exposes=self.exposes)

    # --- pieces of the fit ---

    def _retain_prompts(self, ctx: FitContext) -> tuple[str, list[PromptItem]]:
        """The first of ``retain_sets`` the concept has: its name and prompts."""
        names = retain_set_names(self.config)
        for name in names:
            if name in ctx.concept.prompts:
                return name, list(ctx.concept.prompt_set(name))
        raise ValueError(f"AdvUnlearn retains one of the concept's prompt sets {list(names)}, none of which concept "
                         f"{ctx.concept.key!r} has (it has {sorted(ctx.concept.prompts)}); set advunlearn's "
                         f"retain_sets to a set that is not a reported test set")

    def _conditioning(self, pipe: Any, text: str, device: torch.device) -> Conditioning:
        ids = token_ids(pipe.tokenizer, [text]).to(device)
        with torch.no_grad():
            concept = pipe.text_encoder(ids)[0].float()
            empty = pipe.text_encoder(token_ids(pipe.tokenizer, [""]).to(device))[0].float()
            embeds = pipe.text_encoder.get_input_embeddings()(ids)[0].float()
        return Conditioning(concept, empty, ids[0], embeds,
                            prompt_length(pipe.tokenizer, text, self.config.prompt_length))

    def _scheduler(self, pipe: Any) -> Any:
        from diffusers import DDIMScheduler

        scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        scheduler.set_timesteps(self.config.ddim_steps)
        return scheduler

    def _latent_shape(self, ctx: FitContext) -> tuple[int, int, int]:
        cfg, pipe = self.config, ctx.pipe
        height = cfg.resolution or ctx.settings.height
        width = cfg.resolution or ctx.settings.width
        return pipe.unet.config.in_channels, height // pipe.vae_scale_factor, width // pipe.vae_scale_factor

    def _sample(self, frozen: nn.Module, scheduler: Any, gen: torch.Generator, cond: torch.Tensor,
                uncond: torch.Tensor, shape: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """x_t for each condition (one batch) at one drawn noise level, and its DDPM t per example."""
        level = draw_noise_level(scheduler, gen, self.config.timestep_pairing)
        noise = torch.randn((cond.shape[0], *shape), generator=gen).to(cond.device) * scheduler.init_noise_sigma
        x_t = partial_ddim(frozen, scheduler, noise, level.steps, cond, uncond.expand_as(cond),
                           self.config.start_guidance)
        t = int(torch.randint(level.lo, level.hi, (), generator=gen))
        return x_t, torch.full((cond.shape[0],), t, device=cond.device)

    def _attack(self, encoder: nn.Module, frozen: nn.Module, scheduler: Any, base: Conditioning,
                delta: torch.Tensor, first: bool, shape: tuple[int, int, int],
                gen: torch.Generator) -> tuple[torch.Tensor, list[float]]:
        """One attack round against the current text encoder (held fixed)."""
        cfg = self.config
        if first or cfg.attack_init == "random":
            table = encoder.get_input_embeddings().weight
            ids = torch.randint(table.shape[0], (cfg.adv_prompt_num,), generator=gen).to(table.device)
            delta = table[ids].detach().float()

        def loss_of(candidate: torch.Tensor) -> torch.Tensor:
            x_t, t = self._sample(frozen, scheduler, gen, base.concept, base.empty, shape)
            with torch.no_grad():
                goal = _eps(frozen, x_t, t, base.concept)
            with _autocast(x_t.device, cfg.mixed_precision):
                cond = encode_embeds(encoder, prefix_embeddings(base.concept_embeds, candidate, base.length)[None])
                return F.mse_loss(_eps(frozen, x_t, t, cond), goal)

        return optimise_prefix(delta, loss_of, cfg.attack_steps, cfg.attack_lr, cfg.attack_method,
                               cfg.attack_grad_accumulation)

    def _outer(self, encoder: nn.Module, frozen: nn.Module, scheduler: Any, base: Conditioning,
               delta: torch.Tensor | None, retain: list[PromptItem], pipe: Any, shape: tuple[int, int, int],
               gen: torch.Generator) -> OuterLoss:
        """The outer loss on one example of the concept (with ``delta`` when given) and the retain batch."""
        cfg = self.config
        device = base.concept.device
        retain_ids = token_ids(pipe.tokenizer, [item.text for item in retain]).to(device)
        with torch.no_grad():
            retain_base = pipe.text_encoder(retain_ids)[0].float()
        x, t = self._sample(frozen, scheduler, gen, torch.cat([base.concept, retain_base]), base.empty, shape)
        x_t, x_r = x[:1], x[1:]
        target = esd_target(frozen, x_t, t[:1], base.concept, base.empty, cfg.eta, target="old")
        with torch.no_grad():
            retain_target = _eps(frozen, x_r, t[1:], retain_base)
        if delta is None:
            concept = encoder(base.concept_ids[None])[0]
        else:
            concept = encode_embeds(encoder, prefix_embeddings(base.concept_embeds, delta, base.length)[None])
        retained = encoder(retain_ids)[0]
        prediction = _eps(frozen, x, t, torch.cat([concept, retained]))
        return outer_loss(prediction[:1], target, prediction[1:], retain_target, cfg.retain_weight)


def _trainable_copy(text_encoder: nn.Module, train_method: str,
                    device: torch.device) -> tuple[nn.Module, set[str]]:
    """A float32 copy of the text encoder with only the trained parameters requiring gradients."""
    encoder = copy.deepcopy(text_encoder).float().to(device).requires_grad_(False)
    names = set(trainable_names(encoder, train_method))
    for name, param in encoder.named_parameters():
        param.requires_grad_(name in names)
    return encoder, names
