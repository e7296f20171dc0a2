"""ConceptPrune (Chavhan, Li, Hospedales; ICLR 2025): training-free erasure by zeroing the few "skilled" weights of
the UNet's feed-forward output layers that a concept's prompts use more than neutral prompts do (crts.md §7).

Every UNet FFN's second linear (``ff.net.2``, input = the GEGLU output) is hooked while the pipeline samples the
target prompts and the base prompts. Per UNet call ``t`` (one denoising step; the classifier-free-guidance batch is
one call) and layer, the official code's WANDA statistic is accumulated: the hooked input ``X`` (batch x tokens,
d_in) is flattened to rows, every row (one token of one batch element) is scaled to unit L2 norm ("to avoid inf
values" in fp16), and ``||X_j||`` is the L2 norm of column j over all rows of all prompts of the set
(``sqrt(sum of squares)``, not a mean). The official hook sees the whole CFG batch, the unconditional half included
(``count_uncond``). Then ``S = |W| * ||X_j||`` for target (S^T) and base (S^B); per output row the top
``k = int(skill_ratio * d_in)`` columns of S^T whose S^T > S^B are skilled; a weight is pruned when it is skilled
at more than ``select_ratio * tau`` of the first ``tau`` calls (official scripts: select_ratio 0, the union), and
``W <- W * (1 - mask)``.

Sampling stops after the first ``tau`` UNet calls: the later calls cannot change those statistics (the official
code samples all 50 steps and reads only the first tau). The artifact holds the boolean masks; ``apply`` zeroes them
in a copy of the UNet. Only ``ff.net.2`` weights change (biases stay, as in the official code).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from crt.base import Artifact, FitContext, UNetEdit, replace_module
from crt_bench.backbone import UNET_FAMILY
from crt_bench.spec import Family

FFN_OUT = "ff.net.2"


@dataclass(frozen=True)
class ConceptPruneConfig:
    """Defaults: the official code and scripts (crts.md §7); see conf/crt/conceptprune.yaml for each one's source."""

    target_set: str = "finetune_unacceptable"  # the concept's prompt set for the target prompts
    base_set: str = "finetune_acceptable"  # ... and for the base prompts
    target_prompts: list[str] | None = None  # explicit texts; override target_set (a real concept's plugin_params)
    base_prompts: list[str] | None = None
    skill_ratio: float = 0.01  # k = int(skill_ratio * d_in) columns per output row
    tau: int = 10  # the first tau UNet calls of the sampling loop
    select_ratio: float = 0.0  # pruned iff skilled at > select_ratio * tau calls; 0 = union (official scripts)
    steps: int | None = 50  # sampling steps; None = the generation settings'
    guidance: float | None = 7.5  # CFG scale; None = the generation settings'
    scheduler: str | None = "pndm"  # sampler (crt_bench.spec.SCHEDULERS); None = the generation settings'
    count_uncond: bool = True  # the unconditional half of the CFG batch counts (official: whole batch hooked)
    normalize_tokens: bool = True  # unit-norm token rows before the column norms (official)
    seed: int = 0  # every prompt starts from the same noise, as the official code (manual_seed before each prompt)
    batch_size: int = 8  # prompts per pipeline call; the sums do not depend on it


def ffn_out_layers(unet: nn.Module) -> dict[str, nn.Linear]:
    """Every FFN's second linear, sorted by name as the official code does (down, mid, up)."""
    layers = {name: module for name, module in unet.named_modules()
              if name.endswith(FFN_OUT) and isinstance(module, nn.Linear)}
    return dict(sorted(layers.items()))


class ActivationNorms:
    """Per (UNet call, layer) sums of squares of the hooked layers' input columns, over every row seen.

    ``step`` is advanced by a pre-hook on the UNet (one call = one denoising step); calls from ``tau`` on are not
    recorded. ``cfg_doubled`` says that the batch is [uncond, cond] (the pipeline's order), so that
    ``count_uncond=False`` keeps only the conditional half.
    """

    def __init__(self, widths: dict[str, int], tau: int, count_uncond: bool = True, normalize_tokens: bool = True):
        self.tau, self.count_uncond, self.normalize_tokens = tau, count_uncond, normalize_tokens
        self.sq = {name: torch.zeros(tau, width, dtype=torch.float64) for name, width in widths.items()}
        self.rows = {name: [0] * tau for name in widths}
        self.step = -1
        self.cfg_doubled = False

    def start_prompts(self, cfg_doubled: bool) -> None:
        """Before each pipeline call: its first UNet call is step 0."""
        self.step, self.cfg_doubled = -1, cfg_doubled

    def next_step(self, module: nn.Module, args: Any) -> None:
        self.step += 1

    def record(self, name: str, module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        if not 0 <= self.step < self.tau:
            return
        x = args[0].detach()
        if self.cfg_doubled and not self.count_uncond:
            x = x[x.shape[0] // 2:]
        rows = x.reshape(-1, x.shape[-1]).float()
        if self.normalize_tokens:
            rows = F.normalize(rows, p=2, dim=1)
        acc = self.sq[name]
        if acc.device != rows.device:
            self.sq[name] = acc = acc.to(rows.device)
        acc[self.step] += rows.square().sum(0, dtype=torch.float64)
        self.rows[name][self.step] += rows.shape[0]

    def norms(self) -> dict[str, torch.Tensor]:
        """||X_j||_2 per layer, shape (tau, d_in), on the CPU."""
        return {name: sq.sqrt().float().cpu() for name, sq in self.sq.items()}

    def steps_seen(self) -> int:
        return min((sum(1 for r in rows if r) for rows in self.rows.values()), default=0)


@contextmanager
def recording(unet: nn.Module, layers: dict[str, nn.Linear], norms: ActivationNorms) -> Iterator[ActivationNorms]:
    """Forward pre-hooks: one on the UNet (step counter), one on each layer (its input); removed on exit."""
    handles = [unet.register_forward_pre_hook(norms.next_step)]
    handles += [module.register_forward_pre_hook(partial(norms.record, name)) for name, module in layers.items()]
    try:
        yield norms
    finally:
        for handle in handles:
            handle.remove()


def skilled_weights(abs_weight: torch.Tensor, norm_target: torch.Tensor, norm_base: torch.Tensor,
                    skill_ratio: float) -> torch.Tensor:
    """(d_out, d_in) bool: per row, among the top ``int(skill_ratio * d_in)`` columns of S^T, those with S^T > S^B."""
    s_target = abs_weight * norm_target[None, :]
    s_base = abs_weight * norm_base[None, :]
    k = int(skill_ratio * abs_weight.shape[1])  # int() as the official code: floor, 0 for tiny ratios
    top = torch.zeros_like(s_target, dtype=torch.bool)
    if k > 0:
        top.scatter_(1, s_target.topk(k, dim=1).indices, True)
    return top & (s_target > s_base)


def union_over_time(abs_weight: torch.Tensor, norms_target: torch.Tensor, norms_base: torch.Tensor,
                    skill_ratio: float, tau: int, select_ratio: float = 0.0) -> tuple[torch.Tensor, list[int]]:
    """The pruning mask from per-call norms (T, d_in), T >= tau, and the number of skilled weights at each call."""
    counts = torch.zeros_like(abs_weight, dtype=torch.int32)
    per_step = []
    for t in range(tau):
        skilled = skilled_weights(abs_weight, norms_target[t], norms_base[t], skill_ratio)
        counts += skilled.int()
        per_step.append(int(skilled.sum()))
    return counts > select_ratio * tau, per_step


def prune(weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``W * (1 - mask)``, exact zeros where masked."""
    return weight.masked_fill(mask.to(weight.device), 0)


class ConceptPrune(UNetEdit):
    """Skilled-neuron pruning of the UNet FFN output weights; see the module docstring."""

    name = "conceptprune"
    family = Family.WEIGHT_EDIT
    trains = "nothing (training-free): zeroes entries of unet ff.net.2 weights"
    version = "1"
    backbones = UNET_FAMILY  # it samples through the backbone's own pipeline and hooks its FFNs
    config_class = ConceptPruneConfig

    def __init__(self, **params: Any):
        super().__init__(**params)
        cfg = self.config
        if cfg.tau < 1 or not 0 <= cfg.skill_ratio <= 1 or cfg.select_ratio < 0 or cfg.batch_size < 1:
            raise ValueError(f"ConceptPrune needs tau >= 1, 0 <= skill_ratio <= 1, select_ratio >= 0, batch_size >= 1;"
                             f" got {cfg}")

    def prompts(self, ctx: FitContext) -> tuple[list[str], list[str]]:
        """Target and base texts: the explicit lists when given, else the concept's named sets."""
        cfg = self.config
        target = list(cfg.target_prompts) if cfg.target_prompts is not None else [
            p.text for p in ctx.concept.prompt_set(cfg.target_set)]
        base = list(cfg.base_prompts) if cfg.base_prompts is not None else [
            p.text for p in ctx.concept.prompt_set(cfg.base_set)]
        if not target or not base:
            raise ValueError("ConceptPrune needs at least one target and one base prompt")
        return target, base

    def sampling(self, ctx: FitContext) -> dict[str, Any]:
        cfg, s = self.config, ctx.settings
        return {"scheduler": cfg.scheduler or s.scheduler, "steps": cfg.steps or s.steps,
                "guidance": s.guidance if cfg.guidance is None else cfg.guidance, "height": s.height,
                "width": s.width, "seed": cfg.seed + ctx.seed, "negative_prompt": ""}

    def activation_norms(self, ctx: FitContext, texts: list[str], sampling: dict[str, Any]) -> ActivationNorms:
        """The statistics of sampling ``texts`` with the base pipeline's modules; hooks removed afterwards."""
        cfg = self.config
        pipe = sampler_pipe(ctx.pipe, sampling["scheduler"])
        layers = ffn_out_layers(pipe.unet)
        norms = ActivationNorms({n: m.in_features for n, m in layers.items()}, cfg.tau, cfg.count_uncond,
                                cfg.normalize_tokens)
        doubled = sampling["guidance"] > 1.0 and pipe.unet.config.time_cond_proj_dim is None

        def stop_after_tau(p: Any, i: int, t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
            if i + 1 >= cfg.tau:
                p._interrupt = True  # diffusers' documented way to end the loop early
            return kwargs

        with recording(pipe.unet, layers, norms), torch.no_grad():
            for start in range(0, len(texts), cfg.batch_size):
                chunk = texts[start:start + cfg.batch_size]
                norms.start_prompts(doubled)
                pipe(prompt=chunk, num_inference_steps=sampling["steps"], guidance_scale=sampling["guidance"],
                     height=sampling["height"], width=sampling["width"], output_type="latent",
                     generator=[torch.Generator("cpu").manual_seed(sampling["seed"]) for _ in chunk],
                     callback_on_step_end=stop_after_tau)
        if norms.steps_seen() < cfg.tau:
            raise ValueError(f"tau = {cfg.tau} but the sampler made only {norms.steps_seen()} UNet calls")
        return norms

    def fit(self, ctx: FitContext) -> Artifact:
        cfg = self.config
        target, base = self.prompts(ctx)
        sampling = self.sampling(ctx)
        norms_target = self.activation_norms(ctx, target, sampling)
        norms_base = self.activation_norms(ctx, base, sampling)
        tensors, layers_meta = {}, {}
        nt, nb = norms_target.norms(), norms_base.norms()
        for name, module in ffn_out_layers(ctx.pipe.unet).items():
            abs_weight = module.weight.detach().float().abs().cpu()
            mask, per_step = union_over_time(abs_weight, nt[name], nb[name], cfg.skill_ratio, cfg.tau,
                                             cfg.select_ratio)
            tensors[f"{name}.weight"] = mask
            layers_meta[name] = {"shape": list(mask.shape), "k": int(cfg.skill_ratio * mask.shape[1]),
                                 "pruned": int(mask.sum()), "skilled_per_step": per_step,
                                 "rows_target_step0": norms_target.rows[name][0],
                                 "rows_base_step0": norms_base.rows[name][0]}
        pruned = sum(int(m.sum()) for m in tensors.values())
        ffn_numel = sum(m.numel() for m in tensors.values())
        unet_numel = sum(p.numel() for p in ctx.pipe.unet.parameters())
        meta = {"config": asdict(cfg), "target_prompts": target, "base_prompts": base, "sampling": sampling,
                "unet_calls_recorded": cfg.tau, "pruned_weights": pruned,
                "pruned_fraction_ffn_out": pruned / ffn_numel, "pruned_fraction_unet": pruned / unet_numel,
                "ffn_out_numel": ffn_numel, "unet_numel": unet_numel, "layers": layers_meta,
                "tensors": "bool masks over the named ff.net.2 weights; apply sets the masked entries to 0"}
        return Artifact(tensors=tensors, meta=meta)

    def unet_parameters(self, pipe: Any, artifact: Artifact) -> dict[str, torch.Tensor]:
        """The masked ``ff.net.2`` weights with their masked entries zeroed."""
        state = pipe.unet.state_dict()
        return {name: prune(state[name], mask.bool()) for name, mask in artifact.tensors.items()}


def sampler_pipe(pipe: Any, scheduler: str) -> Any:
    """A shallow copy of ``pipe`` with a fresh scheduler of the given kind (same noise schedule); modules shared."""
    import diffusers

    from crt_bench.spec import SCHEDULERS

    if scheduler not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {scheduler!r}; choose one of {sorted(SCHEDULERS)}")
    fresh = getattr(diffusers, SCHEDULERS[scheduler]).from_config(pipe.scheduler.config)
    copy = replace_module(pipe, "scheduler", fresh)
    copy.set_progress_bar_config(disable=True)
    return copy
