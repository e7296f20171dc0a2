"""FID and KID through torchmetrics: Inception-v3 (torch-fidelity's weights) on the real path, a world feature
network (the world evaluator CLIP's image tower) on the miniature world.

The reference protocols differ in implementation and reference set (docs/metrics.md §8); every result records the
feature network, n of each set and KID's subset size so the number is never read without them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from metrics.identity import short, source_name, state_dict_sha256

INCEPTION_HELP = ("FID/KID with Inception-v3 needs torch-fidelity (pip install torch-fidelity) and its weights"
                  " pt_inception-2015-12-05-6726825d.pth, downloaded from GitHub on first use. Offline, copy that file"
                  " here and pass inception_weights=/path/to/pt_inception-2015-12-05-6726825d.pth.")


class FeatureNetworkUnavailable(RuntimeError):
    """The FID feature network cannot be built (package missing, weights not downloadable)."""


def to_uint8_batch(images: Sequence[Image.Image]) -> torch.Tensor:
    """(B, 3, H, W) uint8; all images of one set must share a size (the feature network resizes them)."""
    sizes = {img.size for img in images}
    if len(sizes) != 1:
        raise ValueError(f"images of one set must share a size, got {sorted(sizes)}")
    return torch.from_numpy(np.stack([np.asarray(img.convert("RGB")) for img in images])).permute(0, 3, 1, 2)


class ClipImageFeatures(nn.Module):
    """A CLIPModel image tower as an FID feature network: float [0, 1] (or uint8) images in, projected image
    embeddings out (unnormalised, as FID needs the spread of the features)."""

    def __init__(self, path: str | Path):
        super().__init__()
        from transformers import CLIPModel

        model = CLIPModel.from_pretrained(str(path))
        self.vision, self.projection = model.vision_model.eval(), model.visual_projection.eval()
        self.size = int(model.config.vision_config.image_size)
        self.num_features = int(self.projection.out_features)
        sha = state_dict_sha256(self)
        self.identity = {"kind": "fid_features", "name": "clip_image_tower", "model": source_name(path),
                         "weights_sha256": sha, "id": f"clip-image/{source_name(path)}@{short(sha)}"}

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        if x.shape[-2:] != (self.size, self.size):
            x = nn.functional.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True)
        with torch.no_grad():
            return self.projection(self.vision(pixel_values=x * 2 - 1).pooler_output)


def world_feature_extractor(path: str | Path = "world/weights/clip_eval") -> ClipImageFeatures:
    """The miniature world's FID network: its evaluator CLIP's image tower (mean = std = 0.5 preprocessing)."""
    return ClipImageFeatures(path)


class _CallableFeatures(nn.Module):
    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__()
        self.fn = fn

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.fn(images)


def _metrics(feature: str | nn.Module | Callable, subset_size: int, subsets: int, inception_weights: str | None):
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    if feature == "inception":
        try:
            fid = FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=inception_weights)
        except (ModuleNotFoundError, OSError, RuntimeError) as err:
            raise FeatureNetworkUnavailable(f"{INCEPTION_HELP} ({err})") from err
        kid = KernelInceptionDistance(feature=fid.inception, subset_size=subset_size, subsets=subsets)
        return fid, kid, False, {"kind": "fid_features", "name": "inception-v3-compat (torch-fidelity)",
                                 "id": "inception-v3-compat/2048"}
    module = feature if isinstance(feature, nn.Module) else _CallableFeatures(feature)
    ident = getattr(module, "identity", {"kind": "fid_features", "name": type(module).__name__,
                                         "id": f"custom/{type(module).__name__}"})
    fid = FrechetInceptionDistance(feature=module, normalize=True)
    kid = KernelInceptionDistance(feature=module, subset_size=subset_size, subsets=subsets, normalize=True)
    return fid, kid, True, ident


def fid_kid(real_images: Sequence[Image.Image], fake_images: Sequence[Image.Image],
            feature: str | nn.Module | Callable = "inception", kid_subset_size: int | None = None,
            kid_subsets: int = 100, seed: int = 0, batch_size: int = 64,
            inception_weights: str | None = None) -> dict[str, Any]:
    """FID and KID (mean, std over subsets) of ``fake_images`` against ``real_images``. Lower is better."""
    if len(real_images) < 2 or len(fake_images) < 2:
        raise ValueError("FID/KID need at least two images in each set")
    subset = kid_subset_size or min(1000, len(real_images), len(fake_images))
    fid, kid, as_float, ident = _metrics(feature, subset, kid_subsets, inception_weights)
    for images, real in ((real_images, True), (fake_images, False)):
        for start in range(0, len(images), batch_size):
            batch = to_uint8_batch(images[start:start + batch_size])
            batch = batch.float() / 255.0 if as_float else batch
            fid.update(batch, real=real)
            kid.update(batch, real=real)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        kid_mean, kid_std = kid.compute()
    return {"fid": float(fid.compute()), "kid_mean": float(kid_mean), "kid_std": float(kid_std),
            "n_real": len(real_images), "n_fake": len(fake_images), "kid_subset_size": subset,
            "kid_subsets": kid_subsets, "seed": seed, "feature": ident, "higher_is_better": False}
