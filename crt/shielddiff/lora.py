"""A minimal LoRA (Hu et al. 2021) for the UNet's attention projections, written here because peft is not a
dependency: ``y = W x + b + (alpha / r) B A x`` with ``A`` Gaussian (std ``1 / r``, as diffusers' LoRA layers) and
``B`` zero, so the adapted UNet equals the base one until the first update. Only ``A`` and ``B`` train; the
artifact stores the merged weights ``W + (alpha / r) B A`` under the base parameter names, so ``apply`` is a plain
weight overwrite (``crt.base.edited_copy``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

# DDPO's LoRA (diffusers LoRAAttnProcessor in Black et al.'s code; TRL's DDPO example: target_modules below, r 4)
DEFAULT_TARGETS: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a trainable rank-``r`` update."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, generator: torch.Generator | None = None):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.base = base.requires_grad_(False)
        self.rank, self.alpha = rank, float(alpha)
        down = torch.randn(rank, base.in_features, generator=generator) / rank
        self.down = nn.Parameter(down.to(base.weight.device, base.weight.dtype))
        self.up = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device, dtype=base.weight.dtype))

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.scale * F.linear(F.linear(x, self.down), self.up)

    def delta(self) -> torch.Tensor:
        """``(alpha / r) B A``, the change of the base weight."""
        return self.scale * self.up @ self.down

    def merged_weight(self) -> torch.Tensor:
        return self.base.weight + self.delta()


def target_names(unet: nn.Module, targets: Sequence[str] = DEFAULT_TARGETS) -> list[str]:
    """Module names of the attention projections to adapt (``...attn1.to_q``, ``...attn2.to_out.0``, ...)."""
    names = []
    for name, module in unet.named_modules():
        parts = name.split(".")
        in_attention = any(p.startswith("attn") for p in parts[:-1])
        if isinstance(module, nn.Linear) and in_attention and any(name.endswith(f".{t}") for t in targets):
            names.append(name)
    return names


def inject_lora(unet: nn.Module, rank: int, alpha: float, targets: Sequence[str] = DEFAULT_TARGETS,
                generator: torch.Generator | None = None) -> dict[str, LoRALinear]:
    """Replace each target Linear of ``unet`` (in place) by a :class:`LoRALinear` around it; returns them by name."""
    adapters = {}
    for name in target_names(unet, targets):
        adapter = LoRALinear(unet.get_submodule(name), rank, alpha, generator)
        unet.set_submodule(name, adapter)
        adapters[name] = adapter
    if not adapters:
        raise ValueError(f"no attention Linear matches the LoRA targets {list(targets)}")
    return adapters


def lora_parameters(adapters: dict[str, LoRALinear]) -> list[nn.Parameter]:
    return [p for adapter in adapters.values() for p in (adapter.down, adapter.up)]


@torch.no_grad()
def merged_state(adapters: dict[str, LoRALinear]) -> dict[str, torch.Tensor]:
    """``{"<module>.weight": W + (alpha / r) B A}`` in float32 on the CPU, the base UNet's parameter names."""
    return {f"{name}.weight": adapter.merged_weight().detach().float().cpu().clone()
            for name, adapter in adapters.items()}
