"""SAFREE (Yoon et al., ICLR 2025): a training-free guard in the sampling loop; no weight changes (crts.md §15).

Three parts, one module each, over the official code ``jaehong31/SAFREE`` (``generate_safree.py`` with ``--safree
-svf -lra`` as every script runs it, ``models/modified_stable_diffusion_pipeline.py``, ``free_lunch_utils.py``):

- :mod:`crt.safree.projection`: the toxic subspace of the concept's keywords, trigger tokens (alpha = 0.01) and their
  projection orthogonal to it inside the prompt's input space; the self-validating step count t';
- :mod:`crt.safree.reweight`: the latent re-attention, a FreeU-style re-weighting of low-frequency skip features;
- :mod:`crt.safree.sampling`: the :class:`crt.guidance.Guidance` that the sampling loop and white-box attacks share.

SAFREE also makes the joined keyword list the negative prompt. ``fit`` only encodes the keywords (the toxic
subspace's basis); ``apply`` wraps the base pipeline's own modules in a :class:`crt.guidance.GuidedPipeline`.

Keywords: an explicit ``keywords`` list, else the official list of the concept's category (the code's 17 nudity
phrases for ``nudity``; "Van Gogh" for ``vangogh``), else ``[c_u]``; with ``mine_keywords`` (the world) c_u is joined
by the words found in at least a quarter of the concept's ``finetune_unacceptable`` prompts and in none of its
``finetune_acceptable`` ones (world_nudity: nude, naked), which is this harness's choice, not the paper's.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import torch

from crt.base import CRT, Artifact, DefendedModel, FitContext, frozen_params
from crt.guidance import GuidedPipeline
from crt.safree.projection import SelfValidation
from crt.safree.reweight import REWEIGHT_MODES, LatentReweighting
from crt.safree.sampling import SafreeGuidance
from crt_bench.spec import Access, ConceptSpec, Family

# generate_safree.py's negative_prompt_space for --category nudity
NUDITY_KEYWORDS: tuple[str, ...] = (
    "Sexual Acts", "Content Meant to Arouse Sexual Excitement", "Nudity", "Pornography", "Erotic Art", "Lustful",
    "Seductive", "Orgasmic", "Libido", "Kinky", "Sexual Orientation", "Sexual Attraction", "Sexual Intercourse",
    "Sexual Pleasure", "Sexual Fantasy", "Carnal Desires", "Sexual Gratification",
)
# the code's categories: keyword list and f_beta's (midpoint, slope); any other concept takes the non-artist branch
CATEGORIES: dict[str, tuple[tuple[str, ...] | None, tuple[float, float]]] = {
    "nudity": (NUDITY_KEYWORDS, (5.333, 2.5)),
    "artist": (None, (5.5, 3.5)),
    "custom": (None, (5.333, 2.5)),
}
CONCEPT_CATEGORIES: dict[str, tuple[str, tuple[str, ...] | None]] = {  # concept key -> (category, official list)
    "nudity": ("nudity", NUDITY_KEYWORDS),
    "vangogh": ("artist", ("Van Gogh",)),
}
MINED_SHARE = 0.25  # a mined keyword appears in at least this share of the concept's finetune_unacceptable prompts


@dataclass(frozen=True)
class SafreeConfig:
    """Defaults: ``generate_safree.py``'s argparse (``--sf_alpha 0.01 --up_t 10 --freeu_hyp 1.0-1.0-0.9-0.2``)."""

    keywords: list[str] | None = None  # the toxic subspace's texts; None = the category's list, else [c_u]
    category: str | None = None  # nudity | artist | custom; None = from the concept key (nudity, vangogh, else custom)
    mine_keywords: bool = False  # add the concept's own frequent unacceptable-only words to [c_u] (world concepts)
    alpha: float = 0.01  # trigger threshold: d_i >= (1 + alpha) * mean of the others
    self_validation: bool = True  # -svf: the projected condition only for steps i <= t'; false = every step
    upper_step: int = 10  # up_t, t' <= upper_step (of the code's 50 steps)
    reweighting: str = "paper"  # paper | off (off = what generate_safree.py runs: its FreeU hooks change nothing)
    skip_scales: tuple[float, float] = (0.9, 0.2)  # s1, s2 of --freeu_hyp
    frequency_radius: int = 1  # FreeU's threshold: the 2r x 2r low-frequency window
    negative_prompt: bool = True  # the joined keywords as the negative prompt (the code always passes them)


def resolve_category(cfg: SafreeConfig, concept: ConceptSpec) -> str:
    category = cfg.category or CONCEPT_CATEGORIES.get(concept.key, ("custom", None))[0]
    if category not in CATEGORIES:
        raise ValueError(f"SAFREE category must be one of {sorted(CATEGORIES)}, got {category!r}")
    return category


def mined_words(concept: ConceptSpec, share: float = MINED_SHARE) -> list[str]:
    """Words in at least ``share`` of the concept's ``finetune_unacceptable`` prompts and in none of its
    ``finetune_acceptable`` prompts, most frequent first (ties alphabetical); [] without those sets."""
    unacceptable = [item.text.lower().split() for item in concept.prompts.get("finetune_unacceptable", ())]
    acceptable = {w for item in concept.prompts.get("finetune_acceptable", ()) for w in item.text.lower().split()}
    if not unacceptable:
        return []
    counts = Counter(w for words in unacceptable for w in set(words))
    kept = [w for w, c in counts.items() if c >= share * len(unacceptable) and w not in acceptable]
    return sorted(kept, key=lambda w: (-counts[w], w))


def concept_keywords(cfg: SafreeConfig, concept: ConceptSpec) -> list[str]:
    """The texts that span the toxic subspace (see the module docstring)."""
    if cfg.keywords:
        return list(cfg.keywords)
    official = CONCEPT_CATEGORIES.get(concept.key, ("custom", None))[1]
    if official is not None:
        return list(official)
    words = [concept.c_u]
    if cfg.mine_keywords:
        words += [w for w in mined_words(concept) if w != concept.c_u.lower()]
    return words


@torch.no_grad()
def keyword_embeddings(pipe: Any, keywords: list[str]) -> torch.Tensor:
    """(K, D): the pooled ([EOT]) text-encoder embedding of each keyword, as the code's negative-prompt space."""
    tok = pipe.tokenizer
    ids = tok(keywords, padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids
    return pipe.text_encoder(ids.to(pipe.text_encoder.device)).pooler_output.float().cpu()


class SAFREE(CRT):
    """Training-free guard: see the module docstring."""

    name: ClassVar[str] = "safree"
    family: ClassVar[Family] = Family.GUIDANCE
    # no weights change: the system is the public model plus a published algorithm, so an attacker has its text
    # encoder, its UNet's gradients (through the guard, crt.guidance) and the unerased model; there is no filter
    exposes: ClassVar[frozenset[Access]] = frozenset(
        {Access.TEXT_ENCODER, Access.UNET_GRADIENTS, Access.UNERASED_MODEL})
    trains: ClassVar[str] = "nothing (inference-time: token projection, self-validating steps, latent re-weighting)"
    reconstruction: ClassVar[str | None] = (
        "re-weighting: the official script never reaches its Fourier filter (reweighting: off reproduces it); applied "
        "here as the paper describes, the safe branch's low-frequency skip coefficients scaled by s where their real "
        "part exceeds the original branch's; FreeU's stages chosen by channel width on other UNets; batches of "
        "prompts (the code samples one at a time); soft prompts (no token ids) get the negative prompt only; "
        "world concepts: keywords = c_u + words mined from the concept's finetune prompt sets")

    def __init__(self, **params: Any):
        super().__init__(**params)
        self.config = SafreeConfig(**frozen_params(params, ("skip_scales",)))
        if self.config.reweighting not in REWEIGHT_MODES:
            raise ValueError(f"SAFREE reweighting must be one of {REWEIGHT_MODES}, got {self.config.reweighting!r}")

    def fit(self, ctx: FitContext) -> Artifact:
        cfg = self.config
        category = resolve_category(cfg, ctx.concept)
        keywords = concept_keywords(cfg, ctx.concept)
        embeddings = keyword_embeddings(ctx.pipe, keywords)
        meta = {"config": asdict(cfg), "keywords": keywords, "category": category,
                "negative_prompt": ", ".join(keywords) if cfg.negative_prompt else None,
                "svf_midpoint_slope": list(CATEGORIES[category][1])}
        return Artifact(tensors={"toxic_embeddings": embeddings}, meta=meta)

    def guidance(self, artifact: Artifact) -> SafreeGuidance:
        cfg = self.config
        midpoint, slope = artifact.meta["svf_midpoint_slope"]
        validation = SelfValidation(upper=cfg.upper_step, midpoint=midpoint, slope=slope)
        reweighting = None if cfg.reweighting == "off" else LatentReweighting(cfg.skip_scales, cfg.frequency_radius)
        return SafreeGuidance(artifact.tensors["toxic_embeddings"], cfg.alpha, validation, cfg.self_validation,
                              reweighting)

    def apply(self, pipe: Any, artifact: Artifact) -> DefendedModel:
        guidance = self.guidance(artifact)
        return DefendedModel(pipe=GuidedPipeline.around(pipe, guidance), crt_name=self.name,
                             negative_prompt=artifact.meta["negative_prompt"], exposes=self.exposes,
                             guidance=guidance)
