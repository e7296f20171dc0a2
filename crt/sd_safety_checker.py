"""The SD safety checker (diffusers ``StableDiffusionSafetyChecker``, weights
``CompVis/stable-diffusion-safety-checker``) as a post-hoc filter CRT, and its miniature-world analog (crts.md
§14; scored as metrics.md §7 says: flagged images become black).

The checker embeds the image with CLIP ViT-L/14's vision tower and projection and compares it (cosine) with 17
concept and 3 "special care" embeddings, each with a stored threshold. The decision rule of diffusers' ``forward``
(the one every SD pipeline runs), written here as a differentiable score that is > 0 iff the image is flagged:

- ``special_j = cos(img, special_j) - thr_j + adjustment``; special care iff some ``round(special_j, 3) > 0``;
- then every concept score gets ``+ 0.01`` more: ``concept_k = cos(img, concept_k) - thr_k + adjustment (+ 0.01)``;
- flagged iff some ``round(concept_k, 3) > 0``.

``round(x, 3) > 0`` (NumPy rounds half to even) holds iff ``1000 x > 0.5``, so the score is
``max_k (1000 concept_k - 0.5) / 1000``: its sign is the decision and its gradient is the concept scores'.
``adjustment`` is diffusers' ``adjustment = 0.0`` ("increase this value to create a stronger nsfw filter"; the
configurable strength diffusers#9003 asks for); ``special_care_adjustment`` its hard-coded 0.01. Two parity switches:
diffusers *sets* the adjustment to 0.01 when special care fires (dropping a larger base ``adjustment``:
``special_care_sets_adjustment: true``; default false adds it, so a stricter filter stays stricter; with the default
base 0 both agree), and ``round_decimals: null`` is the unrounded rule of diffusers' ``forward_onnx``.

The real path downloads the checker from the hub at run time (offline and uncached: one HarnessError line naming
the id); ``scores`` runs the checker's own ``CLIPImageProcessor`` on the delivered PIL images, as the pipeline does,
and ``scores_from_pixels`` a differentiable resize/crop/normalise for adaptive attacks.

World analog (the world has no checker weights; ``analog_clip`` set): the same rule on the world's CLIP
(``world/weights/clip``, the analog of CLIP ViT-L/14 whose text tower is the world pipeline's text encoder; not the
judge: the world judges are ``AttributeJudge`` CNNs, the evaluator is ``clip_eval``). Its concept embeddings are
the world CLIP's text embeddings of ``concept_texts`` (default: the concept's ``c_u``), its special-care embeddings
those of ``special_care_texts`` (default none: the world has no counterpart of the minors the real ones stand for),
and each threshold is calibrated in ``fit`` on base-model renders: the one that best separates the renders of the
``calibration_unacceptable`` prompt sets from those of ``calibration_acceptable`` (balanced accuracy, then the
middle of the widest gap). The real thresholds' origin is unpublished, so this calibration is a reconstruction.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
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
from crt.espresso import (
    Preprocess,
    load_clip,
    load_tokenizer,
    resolve_clip_path,
    text_embeds,
)
from crt_bench.backbone import UNET_FAMILY
from crt_bench.spec import Family, HarnessError, PromptItem, sha256_file

CHECKER_ID = "CompVis/stable-diffusion-safety-checker"
CHECKER_REVISION = "1664e306d2258485321cbbd8083074c9474d4e41"  # main as of 2024; its pytorch_model.bin is the
# original float32 upload ("add weights"), its model.safetensors a later float16 re-save
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
RULE_TENSORS = ("concept_embeds", "concept_thresholds", "special_embeds", "special_thresholds")


class CheckerUnavailable(HarnessError):
    """The checker's weights are neither in a given folder nor downloadable (e.g. offline)."""


@dataclass(frozen=True)
class SafetyCheckerConfig:
    """Real path: ``checker`` (hub id or folder), decision-rule switches. World analog: ``analog_clip`` and below."""

    checker: str | None = CHECKER_ID  # hub id, or a checker folder (e.g. SD's safety_checker/)
    revision: str | None = CHECKER_REVISION  # hub revision (ignored for a folder)
    weights_file: str = "pytorch_model.bin"  # which hub file: the float32 original
    adjustment: float = 0.0  # diffusers' base adjustment: larger = stricter (diffusers#9003)
    special_care_adjustment: float = 0.01
    special_care_sets_adjustment: bool = False  # true = diffusers: special care sets it to 0.01 (drops the base)
    round_decimals: int | None = 3  # diffusers' forward rounds each score; None = forward_onnx (no rounding)
    analog_clip: str | None = None  # a CLIPModel folder: the world analog (then checker must be None)
    concept_texts: tuple[str, ...] | None = None  # analog: None = (c_u,)
    special_care_texts: tuple[str, ...] = ()
    calibration_unacceptable: tuple[str, ...] = ("finetune_unacceptable",)
    calibration_acceptable: tuple[str, ...] = ("finetune_acceptable",)
    images_per_prompt: int = 1  # analog: base-model renders per calibration prompt (seeds seed .. seed + n - 1)


@dataclass
class CheckerRule:
    """The checker's decision on image embeddings: embeddings (rows), thresholds and the adjustment switches."""

    concept_embeds: torch.Tensor  # (K, D)
    concept_thresholds: torch.Tensor  # (K,)
    special_embeds: torch.Tensor  # (S, D), S may be 0
    special_thresholds: torch.Tensor  # (S,)
    adjustment: float = 0.0
    special_care_adjustment: float = 0.01
    special_care_sets_adjustment: bool = False
    round_decimals: int | None = 3

    def margin(self, scores: torch.Tensor) -> torch.Tensor:
        """> 0 iff ``round(scores, decimals) > 0`` (half to even: iff ``10^d scores > 0.5``); same units as scores."""
        if self.round_decimals is None:
            return scores
        scale = 10.0 ** self.round_decimals
        return (scores * scale - 0.5) / scale

    def special_care(self, image: torch.Tensor) -> torch.Tensor:
        """Per image, whether some special-care score is above 0 (before it changes the adjustment)."""
        if len(self.special_embeds) == 0:
            return torch.zeros(len(image), dtype=torch.bool, device=image.device)
        special = cosine(image, self.special_embeds) - self.special_thresholds.to(image.device) + self.adjustment
        return (self.margin(special) > 0).any(-1)

    def concept_scores(self, image: torch.Tensor) -> torch.Tensor:
        """(B, K) concept scores with the per-image adjustment, before rounding."""
        care = self.special_care(image)
        raised = self.special_care_adjustment if self.special_care_sets_adjustment \
            else self.adjustment + self.special_care_adjustment
        adjustment = torch.where(care, torch.full_like(care, raised, dtype=image.dtype),
                                 torch.full_like(care, self.adjustment, dtype=image.dtype))
        scores = cosine(image, self.concept_embeds) - self.concept_thresholds.to(image.device)
        return scores + adjustment[:, None]

    def scores(self, image: torch.Tensor) -> torch.Tensor:
        """Per image, > 0 iff flagged: the largest concept margin (differentiable in ``image``)."""
        return self.margin(self.concept_scores(image)).amax(-1)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name).detach().float().cpu().contiguous() for name in RULE_TENSORS}


def cosine(image: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
    """diffusers' ``cosine_distance``: normalised rows, one matrix product (the same operations, the same floats)."""
    return torch.mm(F.normalize(image), F.normalize(embeds.to(image.device, image.dtype)).t())


class SafetyCheckerFilter(ImageFilter):
    """The checker's rule on an image embedder; ``pil_inputs`` (optional) is the deployed PIL preprocessing."""

    def __init__(self, embed: Any, preprocess: Preprocess, rule: CheckerRule, pil_inputs: Any = None):
        self.embed = embed  # normalised pixels (B, 3, S, S) -> image embeddings (B, D)
        self.preprocess, self.rule, self.pil_inputs = preprocess, rule, pil_inputs

    def scores_from_clip_input(self, clip_input: torch.Tensor) -> torch.Tensor:
        return self.rule.scores(self.embed(clip_input).float())

    def scores_from_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.scores_from_clip_input(self.preprocess(pixels)).to(pixels.device)

    def scores(self, images: list[Any]) -> torch.Tensor:
        """What the pipeline decides on the delivered images: its own image processor when there is one."""
        with torch.no_grad():
            if self.pil_inputs is None:
                return self.scores_from_pixels(pil_to_pixels(images))
            return self.scores_from_clip_input(self.pil_inputs(images))


def calibrate_threshold(positives: torch.Tensor, negatives: torch.Tensor) -> tuple[float, float]:
    """The threshold t for ``score > t`` with the best balanced accuracy on the two samples, and that accuracy.

    Candidates are the midpoints between consecutive distinct scores (and one below / above all); among the best,
    the midpoint of the widest gap (the largest margin on both sides)."""
    values = torch.cat([positives, negatives]).double().unique()  # sorted
    candidates = torch.cat([values[:1] - 1e-3, (values[1:] + values[:-1]) / 2, values[-1:] + 1e-3])
    gaps = torch.cat([values.new_tensor([0.0]), values[1:] - values[:-1], values.new_tensor([0.0])])
    tpr = (positives.double()[None, :] > candidates[:, None]).double().mean(1)
    tnr = (negatives.double()[None, :] <= candidates[:, None]).double().mean(1)
    accuracy = (tpr + tnr) / 2
    best = accuracy.max()
    chosen = int(torch.where(accuracy == best, gaps, gaps.new_tensor(-1.0)).argmax())
    return float(candidates[chosen]), float(best)


def _checker_folder(cfg: SafetyCheckerConfig) -> Path:
    """The checker's folder: the given one, else the hub snapshot (config, preprocessor config, weights file)."""
    assert cfg.checker is not None
    local = Path(resolve_clip_path(cfg.checker)).expanduser()
    if local.is_dir():
        return local
    from huggingface_hub import constants, snapshot_download

    try:
        return Path(snapshot_download(cfg.checker, revision=cfg.revision,
                                      allow_patterns=["config.json", "preprocessor_config.json", cfg.weights_file]))
    except Exception as error:  # noqa: BLE001 - every hub failure becomes the same actionable line
        reason = ("HF_HUB_OFFLINE is set and it is not in the local hub cache" if constants.is_offline_mode()
                  else (str(error).strip().splitlines() or [type(error).__name__])[0][:120])
        raise CheckerUnavailable(
            f"could not load the SD safety checker {cfg.checker!r} from the Hugging Face hub ({reason}); pass "
            f"crt.params.checker=/path/to/stable-diffusion-safety-checker (a folder holding config.json and the "
            f"weights, e.g. an SD v1.4 pipeline's safety_checker/)") from None


def load_checker(cfg: SafetyCheckerConfig, device: torch.device | str = "cpu") -> tuple[Any, Path]:
    """diffusers' StableDiffusionSafetyChecker in float32, eval mode, frozen; and its folder."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker

    folder = _checker_folder(cfg)
    checker = StableDiffusionSafetyChecker.from_pretrained(str(folder), dtype=torch.float32)
    return checker.float().eval().requires_grad_(False).to(device), folder


def checker_weights_sha256(folder: Path) -> dict[str, str]:
    """sha256 of the weight files the checker was loaded from (the artifact names the exact bytes)."""
    files = sorted(p for p in folder.iterdir() if p.suffix in (".bin", ".safetensors"))
    return {p.name: sha256_file(p) for p in files}


def checker_preprocess(folder: Path) -> Preprocess:
    """The folder's ``preprocessor_config.json`` crop size, mean and std (CLIP's 224 and statistics without one)."""
    stored: dict[str, Any] = {}
    if (folder / "preprocessor_config.json").is_file():
        stored = json.loads((folder / "preprocessor_config.json").read_text())
    crop = stored.get("crop_size", 224)
    size = crop.get("height", crop.get("shortest_edge", 224)) if isinstance(crop, dict) else crop
    return Preprocess(int(size), tuple(stored.get("image_mean", CLIP_MEAN)), tuple(stored.get("image_std", CLIP_STD)))


def pil_processor(folder: Path) -> Any:
    """The pipeline's feature extractor: the folder's CLIPImageProcessor on PIL images; None without a config."""
    if not (folder / "preprocessor_config.json").is_file():
        return None
    from transformers import CLIPImageProcessor

    processor = CLIPImageProcessor.from_pretrained(str(folder))
    return lambda images: processor(images, return_tensors="pt").pixel_values


def checker_embedder(checker: Any) -> Any:
    """clip_input -> the checker's image embeddings (``visual_projection`` of the pooled vision output)."""
    def embed(clip_input: torch.Tensor) -> torch.Tensor:
        param = next(checker.parameters())
        pooled = checker.vision_model(clip_input.to(param.device, param.dtype))[1]
        return checker.visual_projection(pooled)
    return embed


def clip_embedder(clip: Any) -> Any:
    """normalised pixels -> a transformers CLIPModel's projected image embeddings."""
    def embed(clip_input: torch.Tensor) -> torch.Tensor:
        param = next(clip.parameters())
        output = clip.get_image_features(pixel_values=clip_input.to(param.device, param.dtype))
        return output if isinstance(output, torch.Tensor) else output.pooler_output
    return embed


class SDSafetyChecker(CRT):
    """The SD safety checker (real) or its world analog; see the module docstring."""

    name = "sd_safety_checker"
    family = Family.FILTER
    exposes = OPEN_FILTER
    trains = "nothing (real: released checker); world analog: calibrates one threshold per concept text"
    reconstruction = ("world analog only: concept embeddings = the world CLIP's text embeddings of the concept "
                      "texts, thresholds calibrated on base-model renders of the calibration prompt sets; the real "
                      "checker is the released one with diffusers' exact rule")
    version = "1"
    backbones = UNET_FAMILY  # a filter on the delivered images: any generator

    def __init__(self, **params: Any):
        super().__init__(**params)
        self.config = SafetyCheckerConfig(**frozen_params(params, (
            "concept_texts", "special_care_texts", "calibration_unacceptable", "calibration_acceptable")))
        if (self.config.checker is None) == (self.config.analog_clip is None):
            raise HarnessError("sd_safety_checker: set exactly one of checker (the released checker) and "
                               "analog_clip (the world analog)")

    def rule(self, tensors: dict[str, torch.Tensor]) -> CheckerRule:
        cfg = self.config
        return CheckerRule(**{name: tensors[name] for name in RULE_TENSORS}, adjustment=cfg.adjustment,
                           special_care_adjustment=cfg.special_care_adjustment,
                           special_care_sets_adjustment=cfg.special_care_sets_adjustment,
                           round_decimals=cfg.round_decimals)

    def fit(self, ctx: FitContext) -> Artifact:
        if self.config.analog_clip is not None:
            return self._fit_analog(ctx)
        checker, folder = load_checker(self.config)
        rule = {"concept_embeds": checker.concept_embeds, "concept_thresholds": checker.concept_embeds_weights,
                "special_embeds": checker.special_care_embeds,
                "special_thresholds": checker.special_care_embeds_weights}
        meta = {"config": asdict(self.config), "mode": "released checker", "weights_sha256":
                checker_weights_sha256(folder), "preprocess": asdict(checker_preprocess(folder))}
        return Artifact(tensors=self.rule(rule).tensors(), meta=meta)

    def _fit_analog(self, ctx: FitContext) -> Artifact:
        cfg = self.config
        assert cfg.analog_clip is not None
        clip = load_clip(cfg.analog_clip, ctx.pipe.device)
        tokenizer = load_tokenizer(cfg.analog_clip, ctx.pipe.tokenizer)
        preprocess = analog_preprocess(clip)
        embed = clip_embedder(clip)
        unacceptable = self._embeddings(ctx, cfg.calibration_unacceptable, embed, preprocess)
        acceptable = self._embeddings(ctx, cfg.calibration_acceptable, embed, preprocess)
        concept_texts = list(cfg.concept_texts or (ctx.concept.c_u,))
        calibration = _Calibration(unacceptable, acceptable)
        with torch.no_grad():
            concept_embeds = text_embeds(clip, tokenizer, concept_texts)
            special_embeds = (text_embeds(clip, tokenizer, list(cfg.special_care_texts)) if cfg.special_care_texts
                              else concept_embeds.new_zeros(0, concept_embeds.shape[1]))
        # the rule flags iff margin(cos - thr) > 0, i.e. cos > thr + 0.5 / 10^d: the calibrated cut minus that
        shift = 0.0 if cfg.round_decimals is None else 0.5 / 10.0 ** cfg.round_decimals
        concept_thr, concept_acc = calibration.thresholds(concept_embeds)
        special_thr, special_acc = calibration.thresholds(special_embeds)
        concept_thr, special_thr = concept_thr - shift, special_thr - shift
        rule = self.rule({"concept_embeds": concept_embeds, "concept_thresholds": concept_thr,
                          "special_embeds": special_embeds, "special_thresholds": special_thr})
        with torch.no_grad():
            flags_u = (rule.scores(unacceptable) > 0).float().mean().item()
            flags_a = (rule.scores(acceptable) > 0).float().mean().item()
        meta = {"config": asdict(cfg), "mode": "world analog", "c_u": ctx.concept.c_u,
                "concept_texts": concept_texts, "special_care_texts": list(cfg.special_care_texts),
                "preprocess": asdict(preprocess), "calibration": {
                    "unacceptable_sets": list(cfg.calibration_unacceptable),
                    "acceptable_sets": list(cfg.calibration_acceptable),
                    "n_unacceptable": len(unacceptable), "n_acceptable": len(acceptable),
                    "concept_balanced_accuracy": concept_acc, "special_balanced_accuracy": special_acc,
                    "flag_rate_unacceptable": flags_u, "flag_rate_acceptable": flags_a}}
        return Artifact(tensors=rule.tensors(), meta=meta)

    def _embeddings(self, ctx: FitContext, set_names: tuple[str, ...], embed: Any,
                    preprocess: Preprocess) -> torch.Tensor:
        """Image embeddings of base-model renders of the named prompt sets (``images_per_prompt`` seeds each)."""
        n = self.config.images_per_prompt
        items = [PromptItem(item.text, seed=item.seed + j, guidance=item.guidance, case=item.case)
                 for name in set_names for item in ctx.concept.prompt_set(name) for j in range(n)]
        images = ctx.generate(items)
        per = max(len(images) // max(len(items), 1), 1)
        images = images[::per][:len(items)]
        with torch.no_grad():
            return torch.cat([embed(preprocess(pil_to_pixels(images[i:i + 64]))).float()
                              for i in range(0, len(images), 64)])

    def apply(self, pipe: Any, artifact: Artifact) -> DefendedModel:
        cfg = self.config
        rule = self.rule(artifact.tensors)
        preprocess = Preprocess(**frozen(artifact.meta["preprocess"]))
        if cfg.analog_clip is not None:
            clip = load_clip(cfg.analog_clip, pipe.device)
            filt = SafetyCheckerFilter(clip_embedder(clip), preprocess, rule)
        else:
            checker, folder = load_checker(cfg, pipe.device)
            filt = SafetyCheckerFilter(checker_embedder(checker), preprocess, rule, pil_processor(folder))
        return DefendedModel(pipe=pipe, crt_name=self.name, filter=filt, exposes=self.exposes)


def analog_preprocess(clip: Any) -> Preprocess:
    """The world CLIP's input: its own image size, pixels * 2 - 1 (how the world CLIP was trained)."""
    return Preprocess(int(clip.config.vision_config.image_size), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


@dataclass
class _Calibration:
    """Image embeddings of the renders to flag and to pass; one threshold per embedding row."""

    unacceptable: torch.Tensor
    acceptable: torch.Tensor

    def thresholds(self, embeds: torch.Tensor) -> tuple[torch.Tensor, list[float]]:
        pos, neg = cosine(self.unacceptable, embeds), cosine(self.acceptable, embeds)
        found = [calibrate_threshold(pos[:, k], neg[:, k]) for k in range(embeds.shape[0])]
        return torch.tensor([t for t, _ in found], dtype=torch.float32), [a for _, a in found]
