"""SAFREE's latent re-attention: a FreeU-style re-weighting of the UNet decoder's skip features in the Fourier domain.

At a step that uses the projected (safe) condition, the UNet also runs the original condition on the same latent.
In every decoder stage FreeU touches, the skip features of the safe branch are compared with the original branch's
in a small low-frequency window around the centre of the shifted 2-D spectrum (FreeU's ``threshold`` 1: a 2 x 2
window holding the DC term): where the safe branch's coefficient is the larger, it is scaled by ``s`` (s1 = 0.9 on
the deepest stage, s2 = 0.2 on the next, the official ``--freeu_hyp 1.0-1.0-0.9-0.2``), which damps the low-frequency
(global) features the projection made *more* prominent. The original branch only serves as the reference: its
prediction is discarded.

Sources: the paper's re-attention (scale the safe branch's low frequencies where they exceed the original's) and the
official ``free_lunch_utils.py`` for what the paper leaves open: which features (the skip features ``res_hidden_states``
entering each up-block resnet), which stages (hidden states of the deepest and second-deepest channel width, the
code's ``== 1280`` / ``== 640`` tests on SD v1.4), the window and how complex coefficients compare (their real parts).
The official function that does this is never reached by ``generate_safree.py`` (it registers the blocks without its
``safree`` argument, so the forward falls through to an un-raised ``NotImplementedError`` and changes nothing);
``mode: off`` reproduces that. Where the paper scales by ``s``, the dormant function writes the constant ``s``; the
scaling is used here. The backbone factors b1 = b2 = 1.0 leave the backbone features unchanged and are not applied.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

REWEIGHT_MODES = ("paper", "off")


def reweight_low_frequencies(safe: torch.Tensor, original: torch.Tensor, scale: float, radius: int = 1
                             ) -> torch.Tensor:
    """The safe branch's features (B, C, H, W) with the low-frequency coefficients that exceed the original's
    (real parts, in the ``2 radius`` square around the centre of the shifted spectrum) multiplied by ``scale``."""
    dtype = safe.dtype
    work = torch.promote_types(dtype, torch.float32)  # half precision is transformed in float32, as the code does
    spectrum = torch.fft.fftshift(torch.fft.fft2(safe.to(work)), dim=(-2, -1))
    reference = torch.fft.fftshift(torch.fft.fft2(original.to(work)), dim=(-2, -1))
    height, width = spectrum.shape[-2:]
    window = torch.zeros(height, width, dtype=torch.bool, device=safe.device)
    window[max(height // 2 - radius, 0):height // 2 + radius, max(width // 2 - radius, 0):width // 2 + radius] = True
    louder = window & (spectrum.real > reference.real)
    spectrum = torch.where(louder, spectrum * scale, spectrum)
    return torch.fft.ifft2(torch.fft.ifftshift(spectrum, dim=(-2, -1))).real.to(dtype)


@dataclass(frozen=True)
class SkipSite:
    """One decoder resnet whose input is ``cat([hidden, skip])``: where the skip part starts and its scale."""

    hidden_channels: int
    scale: float


def skip_sites(unet: nn.Module, scales: tuple[float, ...]) -> dict[nn.Module, SkipSite]:
    """The up-block resnets FreeU re-weights: those whose incoming hidden states have the deepest channel width
    (``scales[0]``) or the next distinct one (``scales[1]``), as the official code's channel tests select them."""
    widths = sorted(set(unet.config.block_out_channels), reverse=True)
    by_width = dict(zip(widths, scales))
    sites: dict[nn.Module, SkipSite] = {}
    incoming = unet.config.block_out_channels[-1]  # the mid block's width
    for block in unet.up_blocks:
        for i, resnet in enumerate(block.resnets):
            hidden = incoming if i == 0 else block.resnets[i - 1].out_channels
            if hidden in by_width:
                sites[resnet] = SkipSite(hidden, float(by_width[hidden]))
        incoming = block.resnets[-1].out_channels
    return sites


@dataclass(frozen=True)
class BranchLayout:
    """Where the branches sit in the UNet batch: rows ``[safe, safe + B)`` are the safe condition's, the ``B`` rows
    from ``original`` the original condition's; ``active`` (B,) says which safe rows are re-weighted."""

    safe: int
    original: int
    active: torch.Tensor


class LatentReweighting:
    """Installs the re-weighting on a UNet for the duration of one call (forward pre-hooks on the chosen resnets,
    removed afterwards: the UNet is shared with the base pipeline, which must stay as it was)."""

    def __init__(self, scales: tuple[float, ...] = (0.9, 0.2), radius: int = 1):
        self.scales = tuple(float(s) for s in scales)
        self.radius = int(radius)
        self._sites: dict[int, tuple[nn.Module, dict[nn.Module, SkipSite]]] = {}

    def sites(self, unet: nn.Module) -> dict[nn.Module, SkipSite]:
        cached = self._sites.get(id(unet))
        if cached is None or cached[0] is not unet:
            self._sites[id(unet)] = (unet, skip_sites(unet, self.scales))
        return self._sites[id(unet)][1]

    def reweight_input(self, x: torch.Tensor, site: SkipSite, layout: BranchLayout) -> torch.Tensor:
        """The resnet input ``cat([hidden, skip])`` with the active safe rows' skip features re-weighted."""
        n = layout.active.shape[0]
        skip = x[:, site.hidden_channels:]
        safe = skip[layout.safe:layout.safe + n]
        original = skip[layout.original:layout.original + n]
        reweighted = reweight_low_frequencies(safe, original, site.scale, self.radius)
        safe = torch.where(layout.active.to(x.device)[:, None, None, None], reweighted, safe)
        skip = torch.cat([skip[:layout.safe], safe, skip[layout.safe + n:]])
        return torch.cat([x[:, :site.hidden_channels], skip], dim=1)

    @contextmanager
    def applied(self, unet: nn.Module, layout: BranchLayout) -> Iterator[None]:
        handles = []
        for module, site in self.sites(unet).items():
            def hook(_module: nn.Module, args: tuple[Any, ...], site: SkipSite = site) -> tuple[Any, ...]:
                return (self.reweight_input(args[0], site, layout), *args[1:])

            handles.append(module.register_forward_pre_hook(hook))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
