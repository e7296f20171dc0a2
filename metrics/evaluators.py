"""CLIP evaluators: one interface (encode images, encode texts, logit scale) over open_clip, transformers'
``CLIPModel`` and the miniature world's evaluator CLIP (a ``CLIPModel`` folder).

Weights are loaded once; a missing or unreachable checkpoint raises ``EvaluatorUnavailable`` naming the model and
how to pass a local copy, never a half-working evaluator.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from metrics.identity import short, source_name, state_dict_sha256


class EvaluatorUnavailable(RuntimeError):
    """The evaluator's weights could not be loaded (offline, wrong name, missing folder)."""


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _unit(x: torch.Tensor) -> torch.Tensor:
    return (x / x.norm(dim=-1, keepdim=True)).float().cpu()


def _features(out: Any) -> torch.Tensor:
    """transformers 5 returns model outputs from ``get_*_features`` (projection in ``pooler_output``); older
    versions and open_clip return the tensor itself."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class ClipEvaluator(ABC):
    """Encodes images and texts into one L2-normalised space; ``logit_scale`` is exp of the learnt temperature.

    ``logit_scale`` is recorded with results, never used to compute Espresso's CLIP accuracy: that definition fixes
    s = 100 (metrics.clip_metrics.ESPRESSO_LOGIT_SCALE) whatever the evaluator learnt (the world's has 17.07)."""

    logit_scale: float
    batch_size: int = 32

    @property
    @abstractmethod
    def identity(self) -> dict[str, Any]:
        """JSON-able, machine-independent; includes ``id`` and ``weights_sha256``."""

    @abstractmethod
    def _encode_image_batch(self, images: Sequence[Image.Image]) -> torch.Tensor: ...

    @abstractmethod
    def _encode_text_batch(self, texts: Sequence[str]) -> torch.Tensor: ...

    def encode_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return self._batched(list(images), self._encode_image_batch)

    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        return self._batched(list(texts), self._encode_text_batch)

    def _batched(self, items: list, encode: Callable[[Sequence], torch.Tensor]) -> torch.Tensor:
        if not items:
            raise ValueError("nothing to encode")
        with torch.no_grad():
            chunks = [encode(items[i:i + self.batch_size]) for i in range(0, len(items), self.batch_size)]
        return _unit(torch.cat(chunks))


class OpenClipEvaluator(ClipEvaluator):
    """open_clip model by name and pretrained tag (or a local checkpoint path as ``pretrained``)."""

    def __init__(self, model: str = "ViT-L-14", pretrained: str = "openai", device: str | None = None,
                 batch_size: int = 32, cache_dir: str | None = None):
        import open_clip

        self.model_name, self.pretrained = model, pretrained
        self.device, self.batch_size = device or default_device(), batch_size
        try:
            self.model, _, self.preprocess = open_clip.create_model_and_transforms(
                model, pretrained=pretrained, device=self.device, cache_dir=cache_dir)
        except Exception as err:  # open_clip raises RuntimeError, OSError or hub errors depending on the cause
            raise EvaluatorUnavailable(
                f"open_clip model {model!r} with pretrained {pretrained!r} could not be loaded: {err}. Without network,"
                f" pass a local checkpoint file as pretrained='/path/to/open_clip_model.safetensors' (or .bin/.pt), or"
                f" point HF_HOME at a cache that already holds it.") from err
        self.model.eval()
        self.tokenizer = open_clip.get_tokenizer(model)
        self.logit_scale = float(self.model.logit_scale.exp().item())

    @cached_property
    def identity(self) -> dict[str, Any]:
        sha = state_dict_sha256(self.model)
        pretrained = source_name(self.pretrained) if self.pretrained else "none"
        return {"kind": "clip_evaluator", "backend": "open_clip", "model": self.model_name, "pretrained": pretrained,
                "weights_sha256": sha, "logit_scale": round(self.logit_scale, 6),
                "preprocess": "open_clip default transform",
                "id": f"open_clip/{self.model_name}/{pretrained}@{short(sha)}"}

    def _encode_image_batch(self, images: Sequence[Image.Image]) -> torch.Tensor:
        pixels = torch.stack([self.preprocess(img.convert("RGB")) for img in images]).to(self.device)
        return self.model.encode_image(pixels)

    def _encode_text_batch(self, texts: Sequence[str]) -> torch.Tensor:
        return self.model.encode_text(self.tokenizer(list(texts)).to(self.device))


def _tokenizer_source(path: str, tokenizer: str | None) -> str:
    """Where the tokenizer lives: given explicitly, inside the model folder, or (world layout) the pipeline's."""
    if tokenizer:
        return tokenizer
    local = Path(path)
    if not local.exists():
        return path
    for candidate in (local, local / "tokenizer", local.parent / "pipeline" / "tokenizer"):
        if (candidate / "vocab.json").exists() or (candidate / "tokenizer.json").exists():
            return str(candidate)
    raise EvaluatorUnavailable(f"no tokenizer found for CLIP folder {path!r}; pass tokenizer='/path/to/tokenizer'")


def _image_processor(path: str, model: Any) -> Any:
    """The folder's own preprocessing if it has one; otherwise CLIP's processor at the model's image size with
    mean = std = 0.5, i.e. (x/255)*2-1, which is how the world's CLIPs were trained."""
    from transformers import CLIPImageProcessor

    local = Path(path)
    if not local.exists() or (local / "preprocessor_config.json").exists():
        return CLIPImageProcessor.from_pretrained(path)
    size = int(model.config.vision_config.image_size)
    return CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                              image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])


class HFClipEvaluator(ClipEvaluator):
    """transformers ``CLIPModel`` from a hub id (e.g. ``openai/clip-vit-large-patch14``) or a local folder
    (e.g. ``world/weights/clip_eval``)."""

    def __init__(self, path: str | Path, tokenizer: str | None = None, device: str | None = None,
                 batch_size: int = 32):
        from transformers import AutoTokenizer, CLIPModel

        self.path = str(path)
        self.device, self.batch_size = device or default_device(), batch_size
        try:
            self.model = CLIPModel.from_pretrained(self.path).to(self.device).eval()
            self.processor = _image_processor(self.path, self.model)
            self.tokenizer = AutoTokenizer.from_pretrained(_tokenizer_source(self.path, tokenizer))
        except EvaluatorUnavailable:
            raise
        except Exception as err:
            raise EvaluatorUnavailable(
                f"transformers CLIPModel {self.path!r} could not be loaded: {err}. Without network, download it"
                f" elsewhere and pass the local folder (backend: hf, path: /path/to/folder).") from err
        self.logit_scale = float(self.model.logit_scale.exp().item())
        self.max_length = int(self.model.config.text_config.max_position_embeddings)

    @cached_property
    def identity(self) -> dict[str, Any]:
        sha = state_dict_sha256(self.model)
        name = source_name(self.path)
        size = int(self.model.config.vision_config.image_size)
        return {"kind": "clip_evaluator", "backend": "hf", "model": name, "weights_sha256": sha,
                "logit_scale": round(self.logit_scale, 6),
                "preprocess": {"image_size": size, "mean": list(self.processor.image_mean),
                               "std": list(self.processor.image_std)},
                "id": f"hf/{name}@{short(sha)}"}

    def _encode_image_batch(self, images: Sequence[Image.Image]) -> torch.Tensor:
        pixels = self.processor(images=[img.convert("RGB") for img in images], return_tensors="pt")["pixel_values"]
        return _features(self.model.get_image_features(pixel_values=pixels.to(self.device)))

    def _encode_text_batch(self, texts: Sequence[str]) -> torch.Tensor:
        tokens = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                                return_tensors="pt").to(self.device)
        return _features(self.model.get_text_features(input_ids=tokens["input_ids"],
                                                      attention_mask=tokens["attention_mask"]))


def build_evaluator(cfg: dict[str, Any]) -> ClipEvaluator:
    """From config: ``{backend: open_clip, model: ViT-L-14, pretrained: openai}`` or ``{backend: hf, path: ...}``
    (``model`` is accepted for ``path`` with the hf backend)."""
    cfg = dict(cfg)
    backend = cfg.pop("backend", "open_clip")
    if backend == "open_clip":
        return OpenClipEvaluator(model=cfg.pop("model", "ViT-L-14"), pretrained=cfg.pop("pretrained", "openai"), **cfg)
    if backend == "hf":
        path = cfg.pop("path", None) or cfg.pop("model", None)
        cfg.pop("model", None)
        cfg.pop("pretrained", None)
        if not path:
            raise ValueError("hf evaluator needs 'path' (hub id or local CLIPModel folder)")
        return HFClipEvaluator(path, **cfg)
    raise ValueError(f"unknown evaluator backend {backend!r}; use 'open_clip' or 'hf'")
