"""Batched, seeded generation through the store: an image is made once, ever, for one full description.

Why: the expensive step of a benchmark is sampling. Every image is keyed by the model weights, the system that
made it (base, or CRT identity + artifact key), the prompt (text or embedding hash), the seed, every sampling
setting and the library versions; one seeded CPU generator per image makes an image independent of the batch it
was made in. A filter's verdict is a separate product keyed by (raw image, filter), so a filter CRT reuses the
base model's images, and both the raw and the delivered image are kept.
"""

from __future__ import annotations

import hashlib
import io
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from itertools import groupby
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tqdm.auto import tqdm

from crt.base import DefendedModel
from crt_bench.backbone import SDXL, backbone_of
from crt_bench.spec import HarnessError
from runners.models import ModelHandle, numerics_versions, set_scheduler
from runners.spec import GenerationSettings, PromptItem
from runners.store import Store, key_of

log = logging.getLogger(__name__)

IMAGE_FILE = "image.png"


@dataclass
class Counters:
    """What a run did versus what it found: printed at the end of every run."""

    images_generated: int = 0
    images_reused: int = 0
    scores_computed: int = 0
    scores_reused: int = 0

    def line(self) -> str:
        return (f"images generated: {self.images_generated}, reused: {self.images_reused}; "
                f"scores computed: {self.scores_computed}, reused: {self.scores_reused}")


@dataclass(eq=False)
class ImageRequest:
    """One image to make: the target prompt it answers, which image of that prompt, and what is encoded."""

    item: PromptItem
    index: int = 0
    text: str | None = None  # adversarial text; None means item.text
    embedding: torch.Tensor | None = None  # adversarial soft prompt (77, width)
    pooled: torch.Tensor | None = None  # its pooled companion on SDXL (1280,), which SDXL's UNet also reads

    @property
    def seed(self) -> int:
        return self.item.seed + self.index

    def prompt_identity(self) -> dict[str, Any]:
        """What is encoded: the text, or the embedding's hash and, only when there is one (SDXL), its pooled
        companion's (so an SD 1.x / 2.x embedding keeps the key it always had)."""
        if self.embedding is not None:
            identity = {"embedding_sha256": tensor_sha256(self.embedding)}
            if self.pooled is not None:
                identity["pooled_sha256"] = tensor_sha256(self.pooled)
            return identity
        return {"text": self.item.text if self.text is None else self.text}


@dataclass
class ImageRecord:
    """Where a request's images are: the raw one, the delivered one (None when a filter blocks it)."""

    request: ImageRequest
    key: str
    delivered_key: str | None
    flagged: bool | None = None
    filter_score: float | None = None


@dataclass
class System:
    """Something that turns prompts into images: the base model or a defended one; built only when needed."""

    name: str
    identity: dict[str, Any]  # what its raw pixels depend on
    build: Callable[[], DefendedModel]
    filter_identity: dict[str, Any] | None = None  # set iff it filters its outputs

    @cached_property
    def defended(self) -> DefendedModel:
        return self.build()


def base_system(model: ModelHandle) -> System:
    """The undefended model: the reference for normalized CLIP score and the source of attack target images."""
    from runners.spec import Access

    return System("base", {"model": model.identity},
                  lambda: DefendedModel(pipe=model.pipe, crt_name="base", exposes=frozenset(Access)))


def tensor_sha256(tensor: torch.Tensor) -> str:
    data = tensor.detach().to("cpu", torch.float32).contiguous()
    digest = hashlib.sha256(str(tuple(data.shape)).encode())
    digest.update(data.numpy().tobytes())
    return digest.hexdigest()


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@dataclass
class ImageMaker:
    """Makes and finds images for one model and one set of generation settings."""

    store: Store
    model: ModelHandle
    settings: GenerationSettings
    row_guidance: bool = True
    placeholder: str = "black"
    counters: Counters = field(default_factory=Counters)
    progress: bool = True

    def guidance(self, request: ImageRequest) -> float:
        """Per-row guidance (I2P / UnlearnDiffAtk CSVs) when present and enabled, else the setting."""
        if self.row_guidance and request.item.guidance is not None:
            return float(request.item.guidance)
        return float(self.settings.guidance)

    def image_spec(self, system: System, request: ImageRequest) -> dict[str, Any]:
        s = self.settings
        return {
            "product": "image",
            "system": system.identity,
            "prompt": request.prompt_identity(),
            "seed": request.seed,
            "sampling": {"scheduler": s.scheduler, "steps": s.steps, "guidance": self.guidance(request),
                         "height": s.height, "width": s.width, "negative_prompt": s.negative_prompt},
            "numerics": numerics_versions(),
        }

    def requests(self, items: list[PromptItem] | tuple[PromptItem, ...]) -> list[ImageRequest]:
        """``images_per_prompt`` requests per item, image j seeded with item.seed + j."""
        return [ImageRequest(item, j) for item in items for j in range(self.settings.images_per_prompt)]

    # -- making ----------------------------------------------------------------------------------------------

    def make(self, system: System, requests: list[ImageRequest], desc: str = "images") -> list[ImageRecord]:
        keys = [key_of(self.image_spec(system, r)) for r in requests]
        present = self.store.get_many(keys)
        missing = [(r, k) for r, k in zip(requests, keys) if k not in present]
        missing = list({k: (r, k) for r, k in missing}.values())
        self.counters.images_reused += len(set(keys)) - len(missing)
        if missing:
            self._generate(system, missing, desc)
        records = [ImageRecord(r, k, k) for r, k in zip(requests, keys)]
        if system.filter_identity is not None:
            self._apply_filter(system, records, desc)
        return records

    def _generate(self, system: System, missing: list[tuple[ImageRequest, str]], desc: str) -> None:
        defended = system.defended
        set_scheduler(defended.pipe, self.settings.scheduler)
        defended.pipe.set_progress_bar_config(disable=True)
        negative = defended.negative_prompt if defended.negative_prompt is not None else self.settings.negative_prompt
        by_guidance = sorted(missing, key=lambda rk: self.guidance(rk[0]))
        bar = tqdm(total=len(missing), desc=f"generate {desc} ({system.name})", unit="img", disable=not self.progress)
        for guidance, group in groupby(by_guidance, key=lambda rk: self.guidance(rk[0])):
            group = list(group)
            for start in range(0, len(group), self.settings.batch_size):
                batch = group[start:start + self.settings.batch_size]
                images = self.sample(defended.pipe, [r for r, _ in batch], guidance, negative)
                for (request, _), image in zip(batch, images):
                    self.store.put_files("image", self.image_spec(system, request),
                                         lambda folder, image=image: _write_png(folder, image))
                self.counters.images_generated += len(batch)
                bar.update(len(batch))
        bar.close()

    def sample_unstored(self, pipe: Any, requests: list[ImageRequest], negative: str) -> list[Image.Image]:
        """Images in request order, batched per guidance scale, not stored (for models outside the run's systems)."""
        images: dict[int, Image.Image] = {}
        order = sorted(range(len(requests)), key=lambda i: self.guidance(requests[i]))
        for guidance, group in groupby(order, key=lambda i: self.guidance(requests[i])):
            group = list(group)
            for start in range(0, len(group), self.settings.batch_size):
                chunk = group[start:start + self.settings.batch_size]
                images.update(zip(chunk, self.sample(pipe, [requests[i] for i in chunk], guidance, negative)))
        return [images[i] for i in range(len(requests))]

    def sample(self, pipe: Any, requests: list[ImageRequest], guidance: float, negative: str) -> list[Image.Image]:
        """One pipeline call for a batch; each image has its own CPU generator so batches do not change pixels."""
        s = self.settings
        generators = [torch.Generator("cpu").manual_seed(r.seed) for r in requests]
        kwargs: dict[str, Any] = dict(num_inference_steps=s.steps, guidance_scale=guidance, height=s.height,
                                      width=s.width, generator=generators, output_type="pil")
        embedded = [r.embedding is not None for r in requests]
        if any(embedded) and not all(embedded):
            raise ValueError("a batch mixes text and embedding prompts")
        if all(embedded):
            embeds = torch.stack([r.embedding for r in requests]).to(pipe.device, pipe.unet.dtype)
            kwargs["prompt_embeds"] = embeds
            kwargs.update(_pooled_embeds(pipe, requests))
        else:
            kwargs["prompt"] = [r.item.text if r.text is None else r.text for r in requests]
        if negative:
            kwargs["negative_prompt"] = [negative] * len(requests)
        with torch.no_grad():
            return list(pipe(**kwargs).images)

    # -- filtering -------------------------------------------------------------------------------------------

    def _flag_spec(self, system: System, key: str) -> dict[str, Any]:
        return {"product": "filter_verdict", "image": key, "filter": system.filter_identity}

    def _delivered_spec(self, system: System, key: str) -> dict[str, Any]:
        return {"product": "delivered", "image": key, "filter": system.filter_identity,
                "placeholder": self.placeholder}

    def _apply_filter(self, system: System, records: list[ImageRecord], desc: str) -> None:
        specs = {r.key: self._flag_spec(system, r.key) for r in records}
        found = self.store.get_many([key_of(s) for s in specs.values()])
        verdicts = {k: found[key_of(s)].value for k, s in specs.items() if key_of(s) in found}
        todo = [k for k in specs if k not in verdicts]
        self.counters.scores_reused += len(verdicts)
        if todo:
            flt = system.defended.filter
            bar = tqdm(total=len(todo), desc=f"filter {desc}", unit="img", disable=not self.progress)
            for start in range(0, len(todo), 64):
                chunk = todo[start:start + 64]
                scores = flt.scores([self.load(k) for k in chunk])
                new = {k: {"flagged": bool(float(s) > 0), "score": float(s)} for k, s in zip(chunk, scores)}
                self.store.put_values("filter_verdict", [(specs[k], v) for k, v in new.items()])
                verdicts.update(new)
                bar.update(len(chunk))
            bar.close()
            self.counters.scores_computed += len(todo)
        for record in records:
            verdict = verdicts[record.key]
            record.flagged, record.filter_score = verdict["flagged"], verdict["score"]
            record.delivered_key = self._delivered(system, record.key) if record.flagged else record.key

    def _delivered(self, system: System, key: str) -> str | None:
        from metrics.filtering import deliver

        spec = self._delivered_spec(system, key)
        if self.placeholder == "blocked_as_safe":
            return None
        delivered_key = key_of(spec)
        if not self.store.has(delivered_key):
            (image,) = deliver([self.load(key)], [True], self.placeholder)
            self.store.put_files("delivered", spec, lambda folder: _write_png(folder, image))
        return delivered_key

    # -- reading ---------------------------------------------------------------------------------------------

    def load(self, key: str) -> Image.Image:
        entry = self.store.get(key)
        if entry is None or entry.path is None:
            raise KeyError(f"image {key} is not in the store")
        with Image.open(entry.path / IMAGE_FILE) as image:
            return image.convert("RGB")

    def delivered_images(self, system: System, items: list[PromptItem], desc: str) -> list[Image.Image | None]:
        """One delivered image per item (image 0), through the store: what fit and attacks ask for."""
        records = self.make(system, [ImageRequest(item) for item in items], desc)
        return [None if r.delivered_key is None else self.load(r.delivered_key) for r in records]


def _pooled_embeds(pipe: Any, requests: list[ImageRequest]) -> dict[str, Any]:
    """``pooled_prompt_embeds`` for a batch of embedding prompts: SDXL's pipeline needs one per prompt (its UNet
    reads the pooled embedding too); SD 1.x / 2.x take none. Refused when they are missing or mixed."""
    pooled = [r.pooled is not None for r in requests]
    if backbone_of(pipe) != SDXL:
        if any(pooled):
            raise HarnessError("a pooled prompt embedding was given to a pipeline without one (only SDXL reads it)")
        return {}
    if not all(pooled):
        raise HarnessError("an SDXL embedding prompt needs its pooled embedding (ImageRequest.pooled, "
                           "AdversarialPrompt.pooled); this one came without it")
    return {"pooled_prompt_embeds": torch.stack([r.pooled for r in requests]).to(pipe.device, pipe.unet.dtype)}


def _write_png(folder: Path, image: Image.Image) -> dict[str, Any]:
    data = png_bytes(image)
    (folder / IMAGE_FILE).write_bytes(data)
    return {"sha256": hashlib.sha256(data).hexdigest(), "size": list(image.size)}
