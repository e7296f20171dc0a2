"""Pruning for robust concept erasing (Yang, Cao, Xu; arXiv 2405.16534), P-ESD and P-CA: a RECONSTRUCTION.

Only the abstract is public (crts.md §8): a parameter-level mask is learned jointly with an existing erasing
objective (ESD or Concept Ablation), because fine-tuning only deactivates concept neurons that adversarial prompts
re-activate, while pruning removes them; only the mask is stored. Everything below is this harness's choice:

- learnable scores ``s`` over the weights of the selected layers (``targets``: module-name suffixes, by default the
  FFN output ``ff.net.2`` and the cross-attention ``attn2.to_k`` / ``attn2.to_v``); the weights W stay frozen;
- mask ``m = sigma(s / T)`` binarised straight-through: the forward uses the hard mask ``1[s > 0]``, the backward
  the sigmoid's gradient;
- loss = the eraser's loss on the UNet with ``W * m`` + ``lambda_s * mean(1 - m)`` (mean over every masked weight),
  which keeps the pruning sparse; the eraser's loss and batches are ``crt.esd.esd_loss`` with ESD's sampler and
  ``crt.ca.ca_loss`` with CA's (its target is the current, masked, model); Adam on the scores;
- the artifact is the binary mask (bool tensors, True = kept); ``apply`` zeroes the pruned weights.

The eraser's own optimiser settings (ESD ``lr``/``method``, CA ``lr``/``parameter_group``...) are unused: only the
scores train. Its step count (ESD ``iterations``, CA ``max_train_steps``) is the default ``iterations``.
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
from torch import nn
from torch.nn.utils import parametrize

from crt.base import Artifact, FitContext, TrainingState, UNetEdit
from crt.ca import CA, ca_loss
from crt.esd import ESD, _encode, _summarise, esd_loss, target_formula
from crt_bench import progress
from crt_bench.spec import Family

ERASERS = ("esd", "ca")


@dataclass(frozen=True)
class PruningConfig:
    """Hyper-parameters of the reconstruction; none comes from the paper (its details are not public)."""

    eraser: Literal["esd", "ca"] = "esd"
    eraser_params: dict[str, Any] = field(default_factory=dict)  # the eraser's config (crt.esd.ESDConfig, CAConfig)
    targets: list[str] = field(default_factory=lambda: ["ff.net.2", "attn2.to_k", "attn2.to_v"])
    iterations: int | None = None  # None = the eraser's own step count
    lr: float = 1.0e-2  # Adam on the scores
    temperature: float = 1.0  # T in sigma(s / T)
    init_score: float = 1.0  # every weight starts kept, sigma(1) = 0.73
    sparsity_weight: float = 1.0  # lambda_s
    seed: int = 0
    log_every: int = 10


def straight_through(scores: torch.Tensor, temperature: float) -> torch.Tensor:
    """The hard mask ``1[s > 0]`` in the forward pass with the gradient of ``sigma(s / T)``.

    ``soft - soft.detach()`` is exactly zero, so the value is exactly the hard mask."""
    soft = torch.sigmoid(scores / temperature)
    return (scores > 0).to(soft.dtype) + (soft - soft.detach())


class ScoreMask(nn.Module):
    """A parametrisation ``W -> W * m(s)`` of a frozen weight with one learnable score per entry."""

    def __init__(self, shape: torch.Size, init_score: float, temperature: float):
        super().__init__()
        self.scores = nn.Parameter(torch.full(shape, float(init_score)))
        self.temperature = temperature

    def mask(self) -> torch.Tensor:
        return straight_through(self.scores, self.temperature)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.mask()

    def kept(self) -> torch.Tensor:
        """The binarised mask, True = kept."""
        return self.scores.detach() > 0


def masked_modules(unet: nn.Module, targets: list[str]) -> dict[str, nn.Linear]:
    """The Linear modules whose name ends with one of ``targets``, by module name."""
    chosen = {name: module for name, module in unet.named_modules()
              if name.endswith(tuple(targets)) and isinstance(module, nn.Linear)}
    if not chosen:
        raise ValueError(f"pruning targets {targets} match no Linear module of the UNet")
    return chosen


def attach_masks(unet: nn.Module, targets: list[str], init_score: float,
                 temperature: float) -> dict[str, ScoreMask]:
    """Freeze ``unet`` and parametrise every target weight as ``W * m``; returns the masks by weight name."""
    unet.requires_grad_(False)
    masks = {}
    for name, module in masked_modules(unet, targets).items():
        mask = ScoreMask(module.weight.shape, init_score, temperature).to(module.weight.device)
        parametrize.register_parametrization(module, "weight", mask)
        masks[f"{name}.weight"] = mask
    return masks


def sparsity_term(masks: list[ScoreMask], weight: float) -> torch.Tensor:
    """``lambda_s * mean(1 - m)`` over every masked weight: its value is lambda_s x the pruned fraction."""
    pruned = sum((1 - m.mask()).sum() for m in masks)
    return weight * pruned / sum(m.scores.numel() for m in masks)


@dataclass
class Eraser:
    """What the masked training needs from an eraser: endless batches, the loss on a model, a step count, meta."""

    batches: Iterator[Any]
    loss: Callable[[nn.Module, Any], torch.Tensor]
    steps: int
    meta: dict[str, Any]
    replay: bool = False  # a resumed fit redraws its batches (cheap), else restores the generator they draw from


def esd_eraser(ctx: FitContext, params: dict[str, Any], gen: torch.Generator) -> Eraser:
    """ESD's sampler (partial DDIM with the frozen base UNet) and loss (its frozen target), as ``crt.esd.ESD``."""
    esd = ESD(**params)
    cfg = esd.config
    text = cfg.concept or ctx.concept.c_u
    cond = _encode(ctx.pipe, [text] * cfg.batch_size, ctx.pipe.unet.device)
    uncond = _encode(ctx.pipe, [""] * cfg.batch_size, ctx.pipe.unet.device)
    frozen = ctx.pipe.unet
    return Eraser(batches=esd._batches(ctx, cond, uncond, gen),
                  loss=lambda unet, batch: esd_loss(unet, frozen, batch, esd.eta, cfg.target),
                  steps=cfg.iterations,
                  meta={"eraser": {"crt": "esd", "version": esd.version}, "concept_text": text,
                        "target": target_formula(cfg.target, esd.eta)})


def ca_eraser(ctx: FitContext, params: dict[str, Any], gen: torch.Generator) -> Eraser:
    """CA's anchor data and batches, and its loss with the current (masked) model as the model-based target."""
    ca = CA(**params)
    cfg = ca.config
    data = ca.prepare(ctx)
    described = ca.describe(data, lr=0.0)
    return Eraser(batches=ca.batches(ctx, data, gen),
                  loss=lambda unet, batch: ca_loss(unet, batch, cfg.loss_type, cfg.prior_loss_weight),
                  steps=cfg.max_train_steps,
                  meta={"eraser": {"crt": "ca", "version": ca.version},
                        **{k: described[k] for k in ("objective", "anchor_images", "anchor_prompts", "pairs_head")}},
                  replay=True)


ERASER_BUILDERS: dict[str, Callable[[FitContext, dict[str, Any], torch.Generator], Eraser]] = {
    "esd": esd_eraser, "ca": ca_eraser}


class MaskedEraser(UNetEdit):
    """P-ESD / P-CA: a learned binary mask over selected UNet weights; see the module docstring."""

    name = "p_esd"
    family = Family.WEIGHT_EDIT
    trains = "a binary mask over unet ff.net.2, attn2.to_k, attn2.to_v weights (pruned weights are zeroed)"
    reconstruction = ("Yang et al. 2024 (arXiv 2405.16534) publish only the abstract: the masked layers, the "
                      "straight-through sigmoid mask, the sparsity term lambda_s * mean(1 - m), the optimiser and "
                      "every hyper-parameter are this harness's choices (crts.md §8)")
    version = "1"
    config_class = PruningConfig

    def __init__(self, **params: Any):
        super().__init__(**params)
        if self.config.eraser not in ERASERS:
            raise ValueError(f"pruning eraser must be one of {ERASERS}, got {self.config.eraser!r}")
        self.eraser_version = (ESD if self.config.eraser == "esd" else CA)(**self.config.eraser_params).version
        self.name = f"p_{self.config.eraser}"  # the eraser's params fail above, not in fit

    def identity(self) -> dict[str, Any]:
        """The eraser's code version changes the artifact too."""
        return {**super().identity(), "eraser_version": self.eraser_version}

    def fit(self, ctx: FitContext) -> Artifact:
        cfg = self.config
        gen = torch.Generator().manual_seed(cfg.seed + ctx.seed)
        eraser = ERASER_BUILDERS[cfg.eraser](ctx, dict(cfg.eraser_params), gen)
        unet = copy.deepcopy(ctx.pipe.unet).float()
        masks = attach_masks(unet, cfg.targets, cfg.init_score, cfg.temperature)
        optimizer = torch.optim.Adam([m.scores for m in masks.values()], lr=cfg.lr)
        steps = eraser.steps if cfg.iterations is None else cfg.iterations
        history: dict[str, list[float]] = {"eraser": [], "sparsity": []}
        training = TrainingState({name: m.scores for name, m in masks.items()}, optimizer,
                                 None if eraser.replay else gen, history=history)
        start = training.resume(ctx, steps)
        batches = itertools.islice(eraser.batches, start, None) if eraser.replay else eraser.batches
        for step, batch in zip(range(start, steps), batches):
            erase = eraser.loss(unet, batch)
            sparse = sparsity_term(list(masks.values()), cfg.sparsity_weight)
            optimizer.zero_grad(set_to_none=True)
            (erase + sparse).backward()
            optimizer.step()
            if not math.isfinite(erase.item()):
                raise FloatingPointError(f"{self.name} eraser loss is {erase.item()} at step {step}")
            history["eraser"].append(erase.item())
            history["sparsity"].append(sparse.item())
            progress.step(total=steps, loss=history["eraser"][-1], sparsity=history["sparsity"][-1])
            ctx.checkpoint(step + 1, training.snapshot, steps)
        tensors = {name: m.kept().cpu() for name, m in masks.items()}
        return Artifact(tensors=tensors, meta={**eraser.meta, "config": asdict(cfg), **pruning_stats(tensors),
                                               "loss": {k: _summarise(v, cfg.log_every) for k, v in history.items()}})

    def unet_parameters(self, pipe: Any, artifact: Artifact) -> dict[str, torch.Tensor]:
        """The masked weights with their pruned entries zeroed."""
        state = pipe.unet.state_dict()
        return {name: torch.where(kept.to(state[name].device), state[name], torch.zeros_like(state[name]))
                for name, kept in artifact.tensors.items()}


def pruning_stats(kept: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Fraction pruned per masked weight and overall."""
    total = sum(k.numel() for k in kept.values())
    pruned = sum(int((~k).sum()) for k in kept.values())
    return {"pruned_per_layer": {name: float((~k).float().mean()) for name, k in kept.items()},
            "pruned_total": pruned / total, "pruned_count": pruned, "masked_numel": total}
