"""The Unsafe Diffusion (UD) multi-head safety classifier (Qu et al., ACM CCS 2023) as a post-hoc filter CRT, as
Espresso vendors it for comparison (``unsafe-diffusion/`` of ``ssg-research/concept-filtering``; crts.md §15,
metrics.md §6.5 and §7), and its miniature-world analog.

Mechanism (the released ``train.py`` / ``inference.py``): frozen OpenCLIP ViT-L-14 ``openai`` image features
(``encode_image``, projected, not normalised) feed one small head per unsafe category: Linear(768, 384), ReLU,
Dropout(0.5), BatchNorm1d(384), Linear(384, 1), sigmoid, in eval mode. Each head votes ``p > 0.5``; the image is
unsafe iff any head votes (``inference.py``: every head but ``normal`` by default: sexual, violent, disturbing,
hateful, political). The score here is ``max_head (p - threshold)``: > 0 iff flagged, differentiable in the pixels.
``scores`` runs OpenCLIP's own preprocessing on the delivered PIL images, as ``inference.py`` does;
``scores_from_pixels`` a differentiable resize/crop/normalise (bicubic, antialiased) for adaptive attacks.

Weights: the five heads ``checkpoints/multi-headed/<head>.pt`` are in the authors' repository
(``YitingQu/unsafe-diffusion``, first commit); they are downloaded from a URL pinned to that repository's commit and
checked against sha256 values computed from its git objects (Zenodo record 8255664 holds the labelled images, on
request, not the heads). ``weights`` reads a local folder of the same files instead (still verified;
``weights_sha256`` pins other files, e.g. heads retrained with ``train.py``). Offline and uncached: one HarnessError
line naming the file and how to pass it.

World analog (the world has no UD weights; ``analog_clip`` set): the same head architecture, scaled to the world
CLIP's width (D -> D/2 -> 1), on the world CLIP's image features (``world/weights/clip``, the world's ViT-L/14; not the
judge), one head per world concept, trained once on labelled world renders by ``python -m world.filters`` with the
released recipe (balanced sampling, Adam 2e-4, batch 64, 31 epochs, the epoch with the best held-out accuracy);
``heads: [concept]`` uses the head named after the concept being erased.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from crt.base import (
    CRT,
    OPEN_FILTER,
    Artifact,
    DefendedModel,
    FitContext,
    ImageFilter,
    frozen_params,
    pil_to_pixels,
)
from crt.espresso import Preprocess, load_clip, resolve_clip_path
from crt.sd_safety_checker import analog_preprocess, clip_embedder
from crt_bench.backbone import UNET_FAMILY
from crt_bench.download import DownloadUnavailable, PinnedFile, default_cache_dir, fetch_pinned
from crt_bench.spec import Family, HarnessError, sha256_file

UD_REPO = "YitingQu/unsafe-diffusion"
UD_COMMIT = "5caffc7ce765329390fd6a4309fd3d757884317f"  # first commit: config.py, train.py and the five heads
UD_HEADS = ("sexual", "violent", "disturbing", "hateful", "political")
UD_SHA256 = {  # sha256 of the blobs at UD_COMMIT (unchanged at the repository's head, 9ad2616)
    "sexual": "5ad688fab802fedb7a565bfb98be1d4aa522ee9e98934796309738b046b33c80",
    "violent": "d98584df4cc8b7eee55d528993ae387933b19ccc790fe723ab0cedc473aa8c84",
    "disturbing": "f570f4d0c5db699c20d0d0a6944a9b783bea585e595f2997c1fe347aaab1fe0a",
    "hateful": "cd897b3b8081910d519510f17583a0e03e51a853f531daa605d4dfeec035f568",
    "political": "adae7fc1c794442f825bb5d9b2ce992a7108ebb433d102cc789922e4b31e14a1",
}
CONCEPT_HEAD = "concept"  # in ``heads``: the head named after the concept being erased (the world analog's)
ANALOG_WEIGHTS_FILE = "heads.safetensors"
ANALOG_META_FILE = "meta.json"
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


class SafetyHead(nn.Sequential):
    """One UD head: features (B, D) -> logit (B, 1); the released state dicts' keys (0., 3., 4.) fit it as is."""

    def __init__(self, in_features: int = 768, hidden: int | None = None):
        hidden = hidden or in_features // 2
        super().__init__(nn.Linear(in_features, hidden), nn.ReLU(), nn.Dropout(0.5), nn.BatchNorm1d(hidden),
                         nn.Linear(hidden, 1))


@dataclass(frozen=True)
class UnsafeDiffusionConfig:
    """Defaults: the released code (config.py: ViT-L-14 / openai; inference.py: threshold 0.5, all five heads)."""

    clip_model: str = "ViT-L-14"  # open_clip model name
    pretrained: str = "openai"  # open_clip tag, or a local checkpoint file
    heads: tuple[str, ...] = UD_HEADS  # which heads vote; "concept" = the head named after the concept (analog)
    threshold: float = 0.5
    weights: str | None = None  # a folder with <head>.pt; None = download the pinned files
    weights_sha256: dict[str, str] | None = None  # None = the released files' sha256
    analog_clip: str | None = None  # world analog: a transformers CLIPModel folder (then analog_weights too)
    analog_weights: str | None = None  # the analog heads' folder (heads.safetensors + meta.json)


def head_url(head: str) -> str:
    return f"https://raw.githubusercontent.com/{UD_REPO}/{UD_COMMIT}/checkpoints/multi-headed/{head}.pt"


def released_head_file(head: str, weights: str | None, sha256: str) -> Path:
    """The verified ``<head>.pt``: from ``weights`` when given, else the download cache or the pinned URL."""
    pinned = PinnedFile(f"Unsafe Diffusion head {head!r}", head_url(head), sha256, f"{head}-{sha256[:12]}.pt")
    local = None if weights is None else Path(weights).expanduser() / f"{head}.pt"
    return fetch_pinned(pinned, default_cache_dir("unsafe_diffusion"), local,
                        hint=f"pass crt.params.weights=/folder/holding/{head}.pt")


def load_head(state: dict[str, torch.Tensor]) -> SafetyHead:
    """A head in eval mode (BatchNorm's running statistics, no dropout) from its state dict."""
    in_features, hidden = state["0.weight"].shape[1], state["0.weight"].shape[0]
    head = SafetyHead(in_features, hidden)
    head.load_state_dict(state)
    return head.eval().requires_grad_(False)


def head_probabilities(heads: dict[str, SafetyHead], features: torch.Tensor) -> torch.Tensor:
    """(B, H) sigmoid outputs, one column per head, in ``heads`` order."""
    return torch.cat([torch.sigmoid(head(features.float())) for head in heads.values()], dim=1)


def ud_scores(probabilities: torch.Tensor, threshold: float) -> torch.Tensor:
    """> 0 iff some head's probability is above the threshold (``inference.py``: ``p > 0.5``, any head)."""
    return (probabilities - threshold).amax(-1)


class UnsafeDiffusionFilter(ImageFilter):
    """Image features -> heads -> ``max (p - threshold)``; ``pil_inputs`` is the deployed PIL preprocessing."""

    def __init__(self, embed: Any, preprocess: Preprocess, heads: dict[str, SafetyHead], threshold: float,
                 pil_inputs: Any = None):
        self.embed, self.preprocess, self.heads = embed, preprocess, heads
        self.threshold, self.pil_inputs = threshold, pil_inputs

    def probabilities_from_clip_input(self, clip_input: torch.Tensor) -> torch.Tensor:
        features = self.embed(clip_input).float()
        return head_probabilities({n: h.to(features.device) for n, h in self.heads.items()}, features)

    def scores_from_clip_input(self, clip_input: torch.Tensor) -> torch.Tensor:
        return ud_scores(self.probabilities_from_clip_input(clip_input), self.threshold)

    def scores_from_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.scores_from_clip_input(self.preprocess(pixels)).to(pixels.device)

    def scores(self, images: list[Any]) -> torch.Tensor:
        with torch.no_grad():
            if self.pil_inputs is None:
                return self.scores_from_pixels(pil_to_pixels(images))
            return self.scores_from_clip_input(self.pil_inputs(images))


def load_open_clip(model_name: str, pretrained: str, device: torch.device | str = "cpu") -> tuple[Any, Any]:
    """OpenCLIP's model (float32, eval, frozen) and its own PIL preprocessing; one line when it cannot be loaded."""
    import open_clip

    try:
        model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=pretrained, device=device)
    except Exception as error:  # noqa: BLE001 - open_clip raises RuntimeError, OSError or hub errors
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:120]
        raise HarnessError(f"could not load open_clip {model_name!r} pretrained {pretrained!r} ({reason}); pass "
                           f"crt.params.pretrained=/path/to/{model_name}.pt (a local checkpoint)") from None
    return model.float().eval().requires_grad_(False), preprocess


def open_clip_preprocess(preprocess: Any) -> Preprocess:
    """The differentiable counterpart of OpenCLIP's transform: its crop size, mean and std."""
    size, mean, std = 224, OPENAI_MEAN, OPENAI_STD
    for step in getattr(preprocess, "transforms", []):
        if type(step).__name__ == "CenterCrop":
            crop = step.size
            size = int(crop[0] if isinstance(crop, (tuple, list)) else crop)
        if type(step).__name__ == "Normalize":
            mean, std = tuple(float(m) for m in step.mean), tuple(float(s) for s in step.std)
    return Preprocess(size, mean, std)


def analog_heads(folder: str | Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
    """The world analog's head state dicts (by head name) and its meta; a missing file names the script."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / ANALOG_WEIGHTS_FILE).is_file() or not (folder / ANALOG_META_FILE).is_file():
        raise HarnessError(f"the world's Unsafe Diffusion analog is missing under {folder} (train it: "
                           f"python -m world.filters)")
    meta = json.loads((folder / ANALOG_META_FILE).read_text())
    flat = load_file(str(folder / ANALOG_WEIGHTS_FILE))
    return {head: head_state(flat, head) for head in meta["heads"]}, meta


def head_state(flat: dict[str, torch.Tensor], head: str) -> dict[str, torch.Tensor]:
    """One head's state dict out of ``{"<head>.<key>": tensor}``."""
    return {k[len(head) + 1:]: v for k, v in flat.items() if k.startswith(f"{head}.")}


class UnsafeDiffusion(CRT):
    """The UD multi-head filter (real) or its world analog; see the module docstring."""

    name = "unsafe_diffusion"
    family = Family.FILTER
    exposes = OPEN_FILTER
    trains = "nothing (released heads); world analog: heads trained once by world/filters.py"
    reconstruction = ("real: the released heads on the released backbone, nothing reconstructed; world analog: "
                      "its training data (labelled world renders instead of 800 rated generated images) and its "
                      "one-head-per-concept set")
    version = "1"
    backbones = UNET_FAMILY  # a filter on the delivered images: any generator

    def __init__(self, **params: Any):
        super().__init__(**params)
        self.config = UnsafeDiffusionConfig(**frozen_params(params, ("heads",)))
        cfg = self.config
        if (cfg.analog_clip is None) != (cfg.analog_weights is None):
            raise HarnessError("unsafe_diffusion: the world analog needs both analog_clip and analog_weights")
        if not cfg.heads:
            raise HarnessError("unsafe_diffusion: heads is empty; name at least one head")
        if cfg.analog_clip is None and CONCEPT_HEAD in cfg.heads:
            raise HarnessError("unsafe_diffusion: heads: [concept] is for the world analog; the released heads are "
                               f"{list(UD_HEADS)}")

    def _head_names(self, concept_key: str, available: tuple[str, ...]) -> list[str]:
        names = [concept_key if h == CONCEPT_HEAD else h for h in self.config.heads]
        unknown = [h for h in names if h not in available]
        if unknown:
            raise HarnessError(f"unsafe_diffusion has no head {unknown[0]!r}; its heads are {list(available)}")
        return names

    def fit(self, ctx: FitContext) -> Artifact:
        cfg = self.config
        if cfg.analog_weights is not None:
            states, analog_meta = analog_heads(cfg.analog_weights)
            names = self._head_names(ctx.concept.key, tuple(states))
            self._check_analog_clip(analog_meta)
            meta: dict[str, Any] = {"mode": "world analog", "analog": {k: analog_meta[k] for k in
                                    ("architecture", "clip_sha256", "selection") if k in analog_meta},
                                    "weights_sha256": sha256_file(Path(cfg.analog_weights) / ANALOG_WEIGHTS_FILE)}
        else:
            names = self._head_names(ctx.concept.key, UD_HEADS)
            pins = cfg.weights_sha256 or UD_SHA256
            missing = [h for h in names if h not in pins]
            if missing:
                raise DownloadUnavailable(f"unsafe_diffusion: no sha256 pinned for head {missing[0]!r}; pass "
                                          f"crt.params.weights_sha256={{{missing[0]}: <sha256>}}")
            files = {h: released_head_file(h, cfg.weights, pins[h]) for h in names}
            states = {h: torch.load(path, map_location="cpu", weights_only=True) for h, path in files.items()}
            meta = {"mode": "released heads", "weights_sha256": {h: pins[h] for h in names},
                    "source": f"github.com/{UD_REPO}@{UD_COMMIT}" if cfg.weights is None else "local folder"}
        tensors = {f"{h}.{k}": v.detach().cpu().contiguous() for h in names for k, v in states[h].items()}
        return Artifact(tensors=tensors, meta={"config": asdict(cfg), "heads": names, **meta})

    def _check_analog_clip(self, analog_meta: dict[str, Any]) -> None:
        """The analog's heads read one CLIP's features: refuse another CLIP than the one they were trained on."""
        expected = analog_meta.get("clip_sha256")
        weights = Path(resolve_clip_path(str(self.config.analog_clip))) / "model.safetensors"
        if expected and weights.is_file() and (got := sha256_file(weights)) != expected:
            raise HarnessError(f"the Unsafe Diffusion analog's heads were trained on a CLIP with sha256 {expected}; "
                               f"{weights} has {got} (retrain: python -m world.filters --force)")

    def apply(self, pipe: Any, artifact: Artifact) -> DefendedModel:
        cfg = self.config
        heads = {h: load_head(head_state(artifact.tensors, h)) for h in artifact.meta["heads"]}
        if cfg.analog_clip is not None:
            clip = load_clip(cfg.analog_clip, pipe.device)
            filt = UnsafeDiffusionFilter(clip_embedder(clip), analog_preprocess(clip), heads, cfg.threshold)
        else:
            model, transform = load_open_clip(cfg.clip_model, cfg.pretrained, pipe.device)
            filt = UnsafeDiffusionFilter(open_clip_embedder(model), open_clip_preprocess(transform), heads,
                                         cfg.threshold, pil_inputs=lambda images: torch.stack(
                                             [transform(image.convert("RGB")) for image in images]))
        return DefendedModel(pipe=pipe, crt_name=self.name, filter=filt, exposes=self.exposes)


def open_clip_embedder(model: Any) -> Any:
    """normalised pixels -> OpenCLIP's ``encode_image`` (projected, not normalised), as the released classifier."""
    def embed(clip_input: torch.Tensor) -> torch.Tensor:
        param = next(model.parameters())
        return model.encode_image(clip_input.to(param.device, param.dtype))
    return embed
