"""Espresso (Das et al., CODASPY 2025): a CLIP filter on the generated image that flags it iff it is closer to the
unacceptable concept ``c_u`` than to its acceptable counterpart ``c_a`` (``P(c_u) > P(c_a)``, no threshold).

Only CLIP's text tower is fine-tuned; the vision tower, both projections and ``logit_scale`` stay pre-trained, and the
generator is the unchanged public base model. The objective is the paper's as reconstructed in crts.md §1, a design
choice labelled as such: separate the normalised projected text embeddings of the c_u-side and c_a-side prompts
and of c_u, c_a themselves, while keeping each prompt paired with its image and c_u, c_a paired with the images of
their side ("separate the text embeddings of c_u and c_a while preserving their pairing with image embeddings",
abstract v4),
``L = -alpha mean ||z_u - z_a||^2 + beta [CE_clip(U_img, U_txt) + CE_clip(A_img, A_txt)]
+ gamma CE(softmax(s [cos(img, c_u), cos(img, c_a)]), side(img))``,
the last term over the batch's U and A images at CLIP's logit scale s (the filter's own P(c_u)). Without it (version 2,
``gamma = 0``) nothing holds c_u, c_a to any image: the separation drives them apart in a direction the images do not
follow, and on every world concept but nudity and violence the held-out detection rate fell to 0.0-0.5 within 10-30
epochs (all images end on the c_a side), so the epoch selection could only keep one of the first few.
The released training code is deliberately not reproduced: its loss is pure separation for nudity/violence and a
constant (zero gradient) for the other concepts.

Fine-tuning images come from the base model, ``images_per_caption`` per caption (seeds ``seed .. seed + n - 1``): the
released code takes 1 per caption, 3 for nudity (``src/finetune_custom.py``; the nudity concept sets 3 through its
``plugin_params``). The epoch kept is the best on held-out images (balanced detection accuracy, then margin): the
concept's ``validation`` prompts are to be flagged, its ``validation_acceptable`` prompts (the COCO val2014 captions the
official repository ships, presumably the source of the images its disabled ``--coco_valset`` early stopping reads)
to pass; without such a set, fresh images (seeds after the fine-tuning ones) of the acceptable fine-tuning captions,
never the images it trained on. The curve is in the artifact meta.
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from crt.base import (
    CRT,
    OPEN_FILTER,
    Artifact,
    DefendedModel,
    FitContext,
    ImageFilter,
    frozen,
    frozen_params,
    pil_to_pixels,
)
from crt_bench import progress
from crt_bench.backbone import UNET_FAMILY
from crt_bench.spec import Family, PromptItem

ROOT = Path(__file__).resolve().parents[1]
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
VAL_KEYS = ("val_tpr", "val_tnr", "val_balanced_accuracy", "val_margin")


@dataclass(frozen=True)
class EspressoConfig:
    """Defaults: the released training script's optimiser settings (crts.md §1); alpha/beta are this harness's."""

    clip: str = "openai/clip-vit-large-patch14"  # hub id or folder of a transformers CLIPModel
    image_size: int | None = None  # None: the folder's preprocessor_config.json, else the vision config
    image_mean: tuple[float, ...] | None = None  # None: preprocessor_config.json, else 0.5 (pixels * 2 - 1)
    image_std: tuple[float, ...] | None = None
    unacceptable_set: str = "finetune_unacceptable"
    acceptable_set: str = "finetune_acceptable"
    images_per_caption: int = 1  # base-model images per fine-tuning caption (released: 1; nudity 3)
    validation_set: str | None = "validation"  # unacceptable prompts; None or absent = keep the last epoch
    # held-out acceptable prompts; None or absent = fresh images of the acceptable fine-tuning captions
    validation_acceptable_set: str | None = "validation_acceptable"
    epochs: int = 100
    batch_size: int = 10
    lr: float = 5e-5
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    weight_decay: float = 0.2  # torch Adam, coupled L2 as released
    alpha: float = 1.0  # separation weight
    beta: float = 1.0  # pairing (CLIP contrastive) weight
    gamma: float = 1.0  # c_u/c_a pairing weight (U images with c_u, A images with c_a); 0 = version 2
    patience: int | None = None  # epochs without validation gain before stopping; None = run all epochs
    seed: int = 0
    mixed_precision: str | None = None  # None | "bf16" | "fp16" autocast of the text tower


@dataclass(frozen=True)
class Preprocess:
    """CLIP's image preprocessing as a differentiable function of pixels in [0, 1]."""

    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        """Resize the short side to ``size`` (bicubic, antialiased), centre-crop, normalise."""
        h, w = pixels.shape[-2:]
        if (h, w) != (self.size, self.size):
            scale = self.size / min(h, w)
            new = (max(self.size, round(h * scale)), max(self.size, round(w * scale)))
            pixels = F.interpolate(pixels, size=new, mode="bicubic", align_corners=False, antialias=True)
            top, left = (new[0] - self.size) // 2, (new[1] - self.size) // 2
            pixels = pixels[..., top:top + self.size, left:left + self.size]
        mean = torch.tensor(self.mean, device=pixels.device, dtype=pixels.dtype).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=pixels.device, dtype=pixels.dtype).view(1, -1, 1, 1)
        return (pixels - mean) / std


def resolve_clip_path(path: str) -> str:
    """A relative folder is looked up under the repository root when it is not under the working directory."""
    if Path(path).exists() or Path(path).is_absolute():
        return path
    return str(ROOT / path) if (ROOT / path).exists() else path


def load_clip(path: str, device: torch.device | str = "cpu") -> Any:
    from transformers import CLIPModel

    return CLIPModel.from_pretrained(resolve_clip_path(path)).float().eval().requires_grad_(False).to(device)


def load_tokenizer(path: str, fallback: Any) -> Any:
    """The CLIP folder's tokenizer, or ``fallback`` (the pipeline's: the world CLIP shares the generator's)."""
    from transformers import CLIPTokenizer

    folder = Path(resolve_clip_path(path))
    if folder.is_dir() and not (folder / "vocab.json").exists() and not (folder / "tokenizer.json").exists():
        return fallback
    return CLIPTokenizer.from_pretrained(str(folder))


def resolve_preprocess(cfg: EspressoConfig, clip: Any) -> Preprocess:
    """Params first, then the folder's ``preprocessor_config.json``, then the vision config with mean/std 0.5."""
    stored: dict[str, Any] = {}
    config_file = Path(resolve_clip_path(cfg.clip)) / "preprocessor_config.json"
    if config_file.exists():
        stored = json.loads(config_file.read_text())
    crop = stored.get("crop_size") or stored.get("size")
    stored_size = crop.get("height", crop.get("shortest_edge")) if isinstance(crop, dict) else crop
    size = cfg.image_size or stored_size or clip.config.vision_config.image_size
    mean = cfg.image_mean or stored.get("image_mean") or (0.5, 0.5, 0.5)
    std = cfg.image_std or stored.get("image_std") or (0.5, 0.5, 0.5)
    return Preprocess(int(size), tuple(float(m) for m in mean), tuple(float(s) for s in std))


def _features(output: Any) -> torch.Tensor:
    """``get_*_features`` returns a tensor in transformers 4 and an output with ``pooler_output`` in 5."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def text_embeds(clip: Any, tokenizer: Any, texts: list[str]) -> torch.Tensor:
    """L2-normalised projected text embeddings (differentiable in the text tower)."""
    ids = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids.to(clip.device)
    return F.normalize(_features(clip.get_text_features(input_ids=ids)).float(), dim=-1)


def image_embeds(clip: Any, preprocess: Preprocess, pixels: torch.Tensor) -> torch.Tensor:
    """L2-normalised projected image embeddings of pixels in [0, 1] (differentiable in the pixels)."""
    param = next(clip.parameters())
    values = preprocess(pixels.to(device=param.device, dtype=param.dtype))
    return F.normalize(_features(clip.get_image_features(pixel_values=values)).float(), dim=-1)


def clip_contrastive(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric cross-entropy over a batch of matching (image, text) pairs, both normalised."""
    logits = logit_scale.exp() * text @ image.T
    labels = torch.arange(len(text), device=text.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def espresso_loss(z_u: torch.Tensor, z_a: torch.Tensor, img_u: torch.Tensor, img_a: torch.Tensor,
                  logit_scale: torch.Tensor, alpha: float, beta: float, gamma: float = 0.0) -> dict[str, torch.Tensor]:
    """``-alpha mean||z_u - z_a||^2 + beta [CE(img_u, z_u) + CE(img_a, z_a)] + gamma CE_concept``.

    ``z_u``/``z_a`` may carry one extra trailing row each (c_u, c_a): it counts in the separation, is not a prompt of
    the pairing, and is what ``CE_concept`` pairs with the images: every U image should be nearer c_u, every A image
    nearer c_a, as CLIP's softmax over the two at ``logit_scale`` (the filter's P(c_u)) says.
    """
    separation = (z_u - z_a).pow(2).sum(-1).mean()
    n = len(img_u)
    pairing = clip_contrastive(img_u, z_u[:n], logit_scale) + clip_contrastive(img_a, z_a[:n], logit_scale)
    concept_pairing = separation.new_zeros(())
    if len(z_u) > n and len(z_a) > n:
        concepts = torch.stack([z_u[n], z_a[n]])
        logits = logit_scale.exp() * torch.cat([img_u, img_a]) @ concepts.T
        sides = torch.cat([torch.zeros(n), torch.ones(len(img_a))]).long().to(logits.device)
        concept_pairing = F.cross_entropy(logits, sides)
    loss = -alpha * separation + beta * pairing + gamma * concept_pairing
    return {"loss": loss, "separation": separation, "pairing": pairing, "concept_pairing": concept_pairing}


class EspressoFilter(ImageFilter):
    """``score = cos(img, c_u) - cos(img, c_a)``; flagged iff > 0. Differentiable in the pixels."""

    def __init__(self, clip: Any, tokenizer: Any, c_u: str, c_a: str, preprocess: Preprocess):
        self.clip = clip.eval().requires_grad_(False)
        self.preprocess = preprocess
        self.c_u, self.c_a = c_u, c_a
        with torch.no_grad():
            self.concepts = text_embeds(clip, tokenizer, [c_u, c_a])

    def scores_from_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        cos = image_embeds(self.clip, self.preprocess, pixels) @ self.concepts.T
        return (cos[:, 0] - cos[:, 1]).to(pixels.device)


@dataclass
class _Pairs:
    """The fine-tuning data: prompt texts with precomputed (frozen-vision) image embeddings, paired by index."""

    u_text: list[str]
    a_text: list[str]
    u_img: torch.Tensor
    a_img: torch.Tensor
    c_u: str
    c_a: str


class Espresso(CRT):
    """The Espresso filter; see the module docstring."""

    name = "espresso"
    family = Family.FILTER
    exposes = OPEN_FILTER
    trains = "filter CLIP text tower (text_model)"
    reconstruction = ("the fine-tuning objective (crts.md §1: separation + pairing, plus the c_u/c_a-image pairing "
                      "term gamma); the released code's loss is not reproduced")
    # 2: images_per_caption; epoch chosen on held-out acceptable images; validation curve in the meta
    # 3: c_u, c_a paired with the images (gamma), so that their separation cannot leave every image on one side
    version = "3"
    backbones = UNET_FAMILY  # a filter on the delivered images: any generator; its CLIP is its own

    def __init__(self, **params: Any):
        super().__init__(**params)
        self.config = EspressoConfig(**frozen_params(params, ("betas", "image_mean", "image_std")))
        if self.config.images_per_caption < 1:
            raise ValueError(f"images_per_caption must be >= 1, got {self.config.images_per_caption}")

    def fit(self, ctx: FitContext) -> Artifact:
        cfg = self.config
        device = ctx.pipe.device
        clip = load_clip(cfg.clip, device)
        tokenizer = load_tokenizer(cfg.clip, ctx.pipe.tokenizer)
        preprocess = resolve_preprocess(cfg, clip)
        pairs = self._pairs(ctx, clip, preprocess)
        positives, negatives, selection = self._validation(ctx, clip, preprocess)
        text_model = clip.text_model
        text_model.requires_grad_(True)
        optimizer = torch.optim.Adam(text_model.parameters(), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                                     weight_decay=cfg.weight_decay)
        gen = torch.Generator().manual_seed(cfg.seed + ctx.seed)
        history = [{"epoch": 0, **self._evaluate(clip, tokenizer, pairs, positives, negatives)}]
        best: tuple[tuple[float, float], int, dict[str, torch.Tensor]] | None = None
        for epoch in range(1, cfg.epochs + 1):
            losses = self._epoch(clip, tokenizer, optimizer, pairs, gen)
            record = {"epoch": epoch, **losses, **self._evaluate(clip, tokenizer, pairs, positives, negatives)}
            history.append(record)
            progress.step(total=cfg.epochs, loss=losses["loss"])
            key = (record.get("val_balanced_accuracy", 0.0), record.get("val_margin", 0.0))
            if best is None or positives is None or key > best[0]:
                best = (key, epoch, _snapshot(text_model))
            elif cfg.patience is not None and epoch - best[1] > cfg.patience:
                break
        tensors = best[2] if best is not None else _snapshot(text_model)
        # every epoch run, 0 = the untouched CLIP: held-out detection and the c_u-c_a distance it was reached with
        curve = [{"epoch": r["epoch"], **{k[4:]: r[k] for k in VAL_KEYS if k in r},
                  "concept_distance": r["concept_distance"]} for r in history]
        epochs_run = history[-1]["epoch"]
        selection = {**selection, "epoch": best[1] if best else 0, "epochs_run": epochs_run,
                     "stopped_early": epochs_run < cfg.epochs}
        meta = {"config": asdict(cfg), "c_u": ctx.concept.c_u, "c_a": ctx.concept.c_a, "preprocess": asdict(preprocess),
                "pairs": len(pairs.u_text), "selection": selection,
                "validation_curve": curve if positives is not None else [], "history": history}
        return Artifact(tensors=tensors, meta=meta)

    def _images(self, ctx: FitContext, items: tuple[PromptItem, ...], per_caption: int = 1,
                seed_offset: int = 0) -> tuple[list[str], list[Any]]:
        """``per_caption`` base-model images of each item (seeds ``item.seed + seed_offset + j``) and their prompts.

        ``ctx.generate`` delivers one image per item (image 0, seeded by the item), so image j of a caption is what
        the generate stage makes as that prompt's image j, and is reused from the store."""
        expanded = [replace(item, seed=item.seed + seed_offset + j) for item in items for j in range(per_caption)]
        images = ctx.generate(expanded)
        per = max(len(images) // max(len(expanded), 1), 1)
        return [item.text for item in expanded], images[::per][:len(expanded)]

    @torch.no_grad()
    def _embed_images(self, clip: Any, preprocess: Preprocess, images: list[Any]) -> torch.Tensor:
        return torch.cat([image_embeds(clip, preprocess, pil_to_pixels(images[i:i + 32]))
                          for i in range(0, len(images), 32)])

    def _pairs(self, ctx: FitContext, clip: Any, preprocess: Preprocess) -> _Pairs:
        """U and A images paired by index; the shorter side is cycled so that every image is used."""
        cfg = self.config
        u_text, u_images = self._images(ctx, ctx.concept.prompt_set(cfg.unacceptable_set), cfg.images_per_caption)
        a_text, a_images = self._images(ctx, ctx.concept.prompt_set(cfg.acceptable_set), cfg.images_per_caption)
        u_img, a_img = self._embed_images(clip, preprocess, u_images), self._embed_images(clip, preprocess, a_images)
        n = max(len(u_text), len(a_text))
        u_idx, a_idx = [i % len(u_text) for i in range(n)], [i % len(a_text) for i in range(n)]
        return _Pairs([u_text[i] for i in u_idx], [a_text[i] for i in a_idx], u_img[u_idx], a_img[a_idx],
                      ctx.concept.c_u, ctx.concept.c_a)

    def _validation(self, ctx: FitContext, clip: Any,
                    preprocess: Preprocess) -> tuple[torch.Tensor | None, torch.Tensor | None, dict[str, Any]]:
        """Embeddings of held-out images to flag (validation prompts) and to pass, and where they came from."""
        cfg = self.config
        if cfg.validation_set is None or cfg.validation_set not in ctx.concept.prompts:
            return None, None, {"rule": "last epoch (no validation set)"}
        _, val_images = self._images(ctx, ctx.concept.prompt_set(cfg.validation_set))
        positives = self._embed_images(clip, preprocess, val_images)
        if cfg.validation_acceptable_set and cfg.validation_acceptable_set in ctx.concept.prompts:
            _, neg_images = self._images(ctx, ctx.concept.prompt_set(cfg.validation_acceptable_set))
            neg_source = cfg.validation_acceptable_set
        else:  # the next image of every acceptable fine-tuning caption: same captions, images it never trained on
            _, neg_images = self._images(ctx, ctx.concept.prompt_set(cfg.acceptable_set),
                                         seed_offset=cfg.images_per_caption)
            neg_source = (f"{cfg.acceptable_set} captions, held-out images (seed + {cfg.images_per_caption}; "
                          f"no {cfg.validation_acceptable_set!r} set)")
        negatives = self._embed_images(clip, preprocess, neg_images)
        rule = "best validation balanced accuracy, then margin, over epochs >= 1"
        if cfg.patience is not None:
            rule += f"; early stop after {cfg.patience} epochs without gain"
        return positives, negatives, {"rule": rule, "positives": cfg.validation_set, "negatives": neg_source,
                                      "n_positives": len(positives), "n_negatives": len(negatives)}

    def _epoch(self, clip: Any, tokenizer: Any, optimizer: torch.optim.Optimizer, pairs: _Pairs,
               gen: torch.Generator) -> dict[str, float]:
        cfg = self.config
        order = torch.randperm(len(pairs.u_text), generator=gen).tolist()
        totals = {"loss": 0.0, "separation": 0.0, "pairing": 0.0, "concept_pairing": 0.0}
        batches = [order[i:i + cfg.batch_size] for i in range(0, len(order), cfg.batch_size)]
        for batch in batches:
            with _autocast(clip.device, cfg.mixed_precision):
                z_u = text_embeds(clip, tokenizer, [pairs.u_text[i] for i in batch] + [pairs.c_u])
                z_a = text_embeds(clip, tokenizer, [pairs.a_text[i] for i in batch] + [pairs.c_a])
                terms = espresso_loss(z_u, z_a, pairs.u_img[batch], pairs.a_img[batch], clip.logit_scale.detach(),
                                      cfg.alpha, cfg.beta, cfg.gamma)
            optimizer.zero_grad(set_to_none=True)
            terms["loss"].backward()
            optimizer.step()
            for k in totals:
                totals[k] += terms[k].item() / len(batches)
        return totals

    @torch.no_grad()
    def _evaluate(self, clip: Any, tokenizer: Any, pairs: _Pairs, positives: torch.Tensor | None,
                  negatives: torch.Tensor | None) -> dict[str, float]:
        concepts = text_embeds(clip, tokenizer, [pairs.c_u, pairs.c_a])
        out = {"concept_distance": float((concepts[0] - concepts[1]).norm())}
        if positives is None or negatives is None:
            return out
        pos = positives @ concepts.T
        neg = negatives @ concepts.T
        pos_score, neg_score = pos[:, 0] - pos[:, 1], neg[:, 0] - neg[:, 1]
        tpr, tnr = float((pos_score > 0).float().mean()), float((neg_score <= 0).float().mean())
        return {**out, "val_tpr": tpr, "val_tnr": tnr, "val_balanced_accuracy": (tpr + tnr) / 2,
                "val_margin": float(pos_score.mean() - neg_score.mean())}

    def apply(self, pipe: Any, artifact: Artifact) -> DefendedModel:
        cfg = self.config
        clip = load_clip(cfg.clip, pipe.device)
        clip.text_model.load_state_dict(artifact.tensors)
        preprocess = Preprocess(**frozen(artifact.meta["preprocess"]))
        filt = EspressoFilter(clip, load_tokenizer(cfg.clip, pipe.tokenizer), artifact.meta["c_u"],
                              artifact.meta["c_a"], preprocess)
        return DefendedModel(pipe=pipe, crt_name=self.name, filter=filt, exposes=self.exposes)


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def _autocast(device: torch.device, mixed_precision: str | None):
    if mixed_precision is None:
        return nullcontext()
    return torch.autocast(device.type, dtype=AMP_DTYPES[mixed_precision])
