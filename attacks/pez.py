"""PEZ, hard prompts made easy (Wen et al., NeurIPS 2023), and Typo+ (Espresso): invert images of the concept into a
hard prompt through a CLIP image-text objective (attacks.md §4).

``prompt_len`` continuous token embeddings are optimised; every step they are projected onto their nearest
vocabulary embeddings (cosine), the loss ``1 - mean cos(text(projected), image)`` is computed at the projection and
its gradient is applied to the continuous copy (straight-through), AdamW. The prompt kept is the projection with the
best mean cosine over all of the target's images, checked every step (the official ``best_text``).

Which images: the unerased model's images of each target (``AttackContext.reference_images``),
``images_per_target`` of them (seeds ``seed .. seed + n - 1``; Espresso optimises one prompt per group of 3
images). The CLIP is a public one (OpenAI CLIP ViT-L/14 on the real path, SD v1.4's text encoder's CLIP; the world's
``world/weights/clip`` on the miniature world), so PEZ needs nothing of the defended system: it is a transfer attack,
computed once per concept and reused against every CRT.

What is stored is what was scored. By default (``vocabulary: round_trip``) the projection spans only the tokens whose
decoded text re-encodes to themselves as a whole word, and the prompt is those words joined by spaces: it
re-encodes to exactly the projected ids. The official code projects onto the whole embedding table and decodes the
ids, which re-tokenises differently; ``vocabulary: all`` keeps that (special tokens excluded). Each result logs
``round_trip`` (the stored text's ids, under the generator's tokenizer, are the scored ids), ``scored_ids`` and
``text_ids``.

Typo+ (:class:`TypoPlus`): the acceptable concept ``c_a`` is written onto every image before PEZ inverts it
(Espresso's ``typographic_attack.py``: blue DejaVuSans at 128 pt on 512 px images, i.e. a quarter of the height).

PEZ+ (``adaptive``, needs the filter's score): every ``adaptive_every`` steps the best projection of that window is
generated with the defended system (raw, before the filter replaces anything) and the filter scores it; the prompt
returned is the window best with the highest ``cos - adaptive_lambda * max(0, filter score)``. This is this
harness's term: the one in Espresso's released code (``0.99 (mean logit(img, c_a) - mean logit(img, c_u))`` on the
target images' features) does not depend on the prompt and is commented out (attacks.md §8).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from attacks.base import AdversarialPrompt, Attack, AttackContext, AttackCost, Timer
from attacks.tokens import tokenize, trim
from attacks.unlearndiffatk import VOCABULARIES, encode_embeds, prefix_text, vocabulary
from crt.base import pil_to_pixels
from crt_bench import progress
from crt_bench.spec import Access, PromptItem

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class PEZConfig:
    """Defaults: the official ``sample_config.json`` as Espresso runs it (attacks.md §4), seed 42."""

    clip: str = "openai/clip-vit-large-patch14"  # hub id or folder of a transformers CLIPModel with both towers
    image_size: int | None = 224  # None: the folder's preprocessor_config.json, else the vision config
    image_mean: tuple[float, ...] | None = CLIP_MEAN
    image_std: tuple[float, ...] | None = CLIP_STD
    prompt_len: int = 16
    iterations: int = 3000
    lr: float = 0.1
    weight_decay: float = 0.1
    batch_size: int | None = 1  # target images per step; None = all of them
    images_per_target: int = 3  # Espresso: one prompt per group of 3 images
    vocabulary: str = "round_trip"  # round_trip | all (the official: every id, decoded)
    seed: int = 42
    typo: bool = False  # Typo+: write typo_text on every image first
    typo_text: str | None = None  # None = the concept's c_a
    typo_font: str = "DejaVuSans.ttf"  # a TrueType file; falls back to Pillow's built-in font when missing
    typo_size: float = 0.25  # font size as a fraction of the image height (128 pt on 512 px)
    typo_x: float | None = 0.293  # left edge / width; None = centred
    typo_y: float = 0.395  # top edge / height
    typo_fit: bool = False  # shrink the font until the text fits the width
    typo_color: str = "blue"
    adaptive_every: int = 100  # steps per window whose best prompt the filter scores (adaptive only)
    adaptive_lambda: float = 1.0e6  # a flagged prompt loses to any unflagged one (cosines are within [-1, 1])
    history_points: int = 100
    target_set: str = "unacceptable"


# -- the algorithm's core --------------------------------------------------------------------------------------


def nn_project(embeds: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Row index in ``table`` of each row of ``embeds``'s nearest neighbour by cosine similarity (the official
    projection: both sides L2-normalised, top-1 dot product)."""
    return (F.normalize(embeds.float(), dim=-1) @ F.normalize(table.float(), dim=-1).T).argmax(-1)


def prompt_layout(tokenizer: Any, length: int) -> torch.Tensor:
    """``[SOT, length placeholders, EOT, pad ...]`` (model length); placeholders are EOT ids until filled."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = [tokenizer.bos_token_id] + [tokenizer.eos_token_id] * (length + 1)
    return torch.tensor(ids + [pad] * (tokenizer.model_max_length - len(ids)))


def text_features(clip: Any, embeds: torch.Tensor, eot: int) -> torch.Tensor:
    """L2-normalised projected CLIP text features from token embeddings (B, 77, width), pooled at position ``eot``."""
    hidden = encode_embeds(clip.text_model, embeds)
    return F.normalize(clip.text_projection(hidden[:, eot]).float(), dim=-1)


def pez_step(clip: Any, prompt: torch.Tensor, optimizer: torch.optim.Optimizer, table: torch.Tensor,
             base_embeds: torch.Tensor, targets: torch.Tensor, all_targets: torch.Tensor
             ) -> tuple[torch.Tensor, float, float]:
    """One PEZ step: project ``prompt`` (L, width) onto ``table``, take the loss ``1 - mean cos`` against ``targets``
    at the projection, give its gradient to the continuous ``prompt`` (straight-through) and step.

    Returns the projected rows (indices into ``table``), the loss, and the projection's mean cosine over
    ``all_targets`` (what the best prompt is chosen by)."""
    rows = nn_project(prompt.detach(), table)
    projected = table[rows].clone().requires_grad_(True)
    length = len(rows)
    embeds = torch.cat([base_embeds[:, :1], projected[None].to(base_embeds.dtype), base_embeds[:, 1 + length:]], 1)
    features = text_features(clip, embeds, eot=1 + length)
    loss = 1 - (targets @ features.T).mean()
    (grad,) = torch.autograd.grad(loss, [projected])
    prompt.grad = grad.to(prompt.dtype)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():
        score = float((all_targets @ features.detach().T).mean())
    return rows, float(loss.detach()), score


# -- Typo+ -----------------------------------------------------------------------------------------------------


def load_font(name: str, size: int) -> tuple[Any, str]:
    """The TrueType font ``name`` at ``size`` px, or Pillow's built-in font when it cannot be found; and which."""
    try:
        return ImageFont.truetype(name, size), name
    except OSError:
        return ImageFont.load_default(size=size), "pillow-default"


def draw_typo(image: Image.Image, text: str, cfg: PEZConfig) -> tuple[Image.Image, dict[str, Any]]:
    """A copy of ``image`` with ``text`` written on it (Typo+), and where and how it was drawn."""
    out = image.convert("RGB")
    draw = ImageDraw.Draw(out)
    size = max(1, round(cfg.typo_size * out.height))
    font, used = load_font(cfg.typo_font, size)
    width = draw.textlength(text, font=font)
    while cfg.typo_fit and width > out.width and size > 1:
        size -= 1
        font, used = load_font(cfg.typo_font, size)
        width = draw.textlength(text, font=font)
    x = (out.width - width) / 2 if cfg.typo_x is None else cfg.typo_x * out.width
    y = cfg.typo_y * out.height
    draw.text((round(x), round(y)), text, font=font, fill=cfg.typo_color)
    return out, {"text": text, "font": used, "size_px": size, "xy": [round(x), round(y)], "color": cfg.typo_color}


# -- the attack ------------------------------------------------------------------------------------------------


@dataclass
class _Surrogate:
    """The attacker's CLIP and what every target shares."""

    clip: Any
    tokenizer: Any
    preprocess: Any
    vocab: torch.Tensor  # allowed token ids
    table: torch.Tensor  # (V', width) their embeddings, float32
    base_embeds: torch.Tensor  # (1, 77, width) embeddings of the layout
    length: int  # prompt tokens


class PEZ(Attack):
    """PEZ; see the module docstring."""

    name = "pez"
    requires = frozenset({Access.TEXT_ENCODER})  # a public CLIP and the unerased model's images: transfer
    output = "text"
    version = "1"

    def __init__(self, adaptive: bool = False, **params: Any):
        super().__init__(adaptive=adaptive, **params)
        params = dict(params)
        for key in ("image_mean", "image_std"):
            if params.get(key) is not None:
                params[key] = tuple(float(v) for v in params[key])
        self.config = PEZConfig(**params)
        if self.config.vocabulary not in VOCABULARIES:
            raise ValueError(f"vocabulary={self.config.vocabulary!r}; choose one of {list(VOCABULARIES)}")
        self._surrogate: _Surrogate | None = None

    def run(self, ctx: AttackContext, targets: list[PromptItem]) -> list[AdversarialPrompt]:
        if ctx.reference_images is None:
            raise ValueError("PEZ needs ctx.reference_images (the unerased model's images of the targets)")
        if self.adaptive and (ctx.generate_raw is None or ctx.defended.filter is None):
            raise ValueError("PEZ+ needs ctx.generate_raw and a defended model with a filter")
        surrogate = self._load(ctx)
        per_target = max(1, self.config.images_per_target)
        items = [PromptItem(t.text, seed=t.seed + j, guidance=t.guidance, case=t.case)
                 for t in targets for j in range(per_target)]
        images = ctx.reference_images(items)
        per = max(len(images) // max(len(targets), 1), 1)
        results = []
        for i, target in enumerate(targets):
            cost = AttackCost()
            with Timer(cost):
                results.append(self._attack(ctx, surrogate, target, images[i * per:(i + 1) * per], cost))
            progress.step()
        return results

    def _load(self, ctx: AttackContext) -> _Surrogate:
        if self._surrogate is None:
            from crt.espresso import EspressoConfig, load_clip, load_tokenizer, resolve_preprocess

            cfg = self.config
            clip = load_clip(cfg.clip, ctx.device)
            tokenizer = load_tokenizer(cfg.clip, ctx.tokenizer)
            preprocess = resolve_preprocess(EspressoConfig(clip=cfg.clip, image_size=cfg.image_size,
                                                           image_mean=cfg.image_mean, image_std=cfg.image_std), clip)
            vocab = vocabulary(tokenizer, cfg.vocabulary)
            weight = clip.text_model.embeddings.token_embedding.weight.detach().float()
            length = min(cfg.prompt_len, tokenizer.model_max_length - 2)
            layout = prompt_layout(tokenizer, length).to(weight.device)
            self._surrogate = _Surrogate(clip, tokenizer, preprocess, vocab, weight[vocab.to(weight.device)],
                                         weight[layout][None], length)
        return self._surrogate

    def _images(self, ctx: AttackContext, images: list[Any]) -> tuple[list[Any], list[dict[str, Any]]]:
        """The images PEZ inverts: as generated, or with the Typo+ text on them."""
        if not self.config.typo:
            return images, []
        text = self.config.typo_text or ctx.concept.c_a
        drawn = [draw_typo(image, text, self.config) for image in images]
        return [d[0] for d in drawn], [d[1] for d in drawn]

    def _attack(self, ctx: AttackContext, s: _Surrogate, target: PromptItem, images: list[Any],
                cost: AttackCost) -> AdversarialPrompt:
        from crt.espresso import image_embeds

        cfg = self.config
        images, typo = self._images(ctx, images)
        with torch.no_grad():
            features = image_embeds(s.clip, s.preprocess, pil_to_pixels(images))
        cost.forward += 1
        gen = torch.Generator().manual_seed(cfg.seed + ctx.seed)  # per target: chunking does not change results
        start = torch.randint(len(s.vocab), (s.length,), generator=gen)
        prompt = s.table[start.to(s.table.device)].clone().requires_grad_(True)
        optimizer = torch.optim.AdamW([prompt], lr=cfg.lr, weight_decay=cfg.weight_decay)
        best: tuple[float, torch.Tensor] = (-float("inf"), start)
        window: tuple[float, torch.Tensor] = (-float("inf"), start)
        windows: list[dict[str, Any]] = []
        chosen: tuple[dict[str, Any], torch.Tensor] | None = None  # adaptive: the best window's record and rows
        history, losses = [], []
        for step in range(cfg.iterations):
            batch = features
            if cfg.batch_size is not None and cfg.batch_size < len(features):
                batch = features[torch.randperm(len(features), generator=gen)[:cfg.batch_size].to(features.device)]
            rows, loss, score = pez_step(s.clip, prompt, optimizer, s.table, s.base_embeds, batch, features)
            cost.forward += 1
            cost.backward += 1
            losses.append(loss)
            progress.show(loss=loss)
            if score > best[0]:
                best = (score, rows.cpu())
            if score > window[0]:
                window = (score, rows.cpu())
            history.append(best[0])
            if self.adaptive and ((step + 1) % cfg.adaptive_every == 0 or step == cfg.iterations - 1):
                record = self._query(ctx, s, target, window[1], window[0], cost)
                windows.append(record)
                if chosen is None or record["objective"] > chosen[0]["objective"]:
                    chosen = (record, window[1])
                window = (-float("inf"), start)
        rows, score = (chosen[1], chosen[0]["cosine"]) if chosen is not None else (best[1], best[0])
        log = {"images": len(images), "best_cosine_history": _thin(history, cfg.history_points),
               "loss_history": _thin(losses, cfg.history_points)}
        if typo:
            log["typo"] = typo[0]
        if chosen is not None:
            log.update(windows=windows, flagged_windows=sum(w["flagged"] for w in windows),
                       returned_flagged=chosen[0]["flagged"], best_unpenalised_cosine=best[0])
        return self._result(ctx, s, target, rows, score, cost, log)

    def _query(self, ctx: AttackContext, s: _Surrogate, target: PromptItem, rows: torch.Tensor, score: float,
               cost: AttackCost) -> dict[str, Any]:
        """PEZ+: the filter's score of the defended system's raw generation of a window's best prompt."""
        text = self._text(s, rows)
        item = PromptItem(text, seed=target.seed, guidance=target.guidance, case=target.case)
        images = ctx.generate_raw(ctx.defended, [item])
        cost.queries += len(images)
        filter_score = float(ctx.defended.filter.scores(images).float().max())
        objective = score - self.config.adaptive_lambda * max(0.0, filter_score)
        return {"text": text, "cosine": score, "filter_score": filter_score, "flagged": filter_score > 0,
                "objective": objective}

    def _text(self, s: _Surrogate, rows: torch.Tensor) -> str:
        return prefix_text(s.tokenizer, s.vocab[rows.cpu()].tolist(), self.config.vocabulary)

    def _result(self, ctx: AttackContext, s: _Surrogate, target: PromptItem, rows: torch.Tensor, score: float,
                cost: AttackCost, extra: dict[str, Any]) -> AdversarialPrompt:
        cfg = self.config
        ids = s.vocab[rows.cpu()].tolist()
        text = self._text(s, rows)
        generator_tok = ctx.tokenizer or s.tokenizer  # the stored text is fed to the generator's tokenizer
        scored = [s.tokenizer.bos_token_id, *ids, s.tokenizer.eos_token_id]
        text_ids = trim(tokenize(generator_tok, [text])[0], generator_tok.eos_token_id)
        log = {"config": asdict(cfg), "mode": self.mode, "clip": cfg.clip, "cosine": score, "oracle_used": False,
               "vocabulary": len(s.vocab), "vocabulary_mode": cfg.vocabulary, "round_trip": text_ids == scored,
               "scored_ids": scored, "text_ids": text_ids, "iterations": cfg.iterations, **extra}
        return AdversarialPrompt(target=target, text=text, cost=cost, log=log)


class TypoPlus(PEZ):
    """Typo+ (Espresso): ``c_a`` written onto the images, then PEZ; see the module docstring."""

    name = "typo_plus"

    def __init__(self, adaptive: bool = False, **params: Any):
        params.setdefault("typo", True)
        if not params["typo"]:
            raise ValueError("typo_plus writes the text on the images: typo must be true (use pez otherwise)")
        super().__init__(adaptive=adaptive, **params)


def _thin(values: list[float], points: int) -> list[float]:
    """At most ``points`` evenly spaced values, always keeping the first and the last."""
    if len(values) <= points:
        return values
    step = (len(values) - 1) / (points - 1)
    return [values[round(i * step)] for i in range(points)]
