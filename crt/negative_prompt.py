"""Negative prompt (SD-NP / SD-NEGP; crts.md §13): the concept text replaces the unconditional branch of CFG.

``eps = eps(x_t, n) + s (eps(x_t, p) - eps(x_t, n))`` with n the negative prompt: diffusers' ``negative_prompt``
argument, which the runner passes from ``DefendedModel.negative_prompt`` (``runners/generate.py``) and P4D guides
its defended prediction with. No weights change, nothing is fitted; the pipeline is the base one.

``text: null`` uses the concept's c_u, as CCE's NP baseline does (``np/generate_images.py``: the negative prompt is
the erased concept); any string can be given instead, e.g. P4D's long SD-NEGP nudity string
(``configs/sdneg_nudity_optmz_config.json``), which P4D applies on SD 2-base, a backbone this CRT does not choose.
"""

from __future__ import annotations

from typing import Any, ClassVar

from crt.base import CRT, OPEN_WEIGHTS, Artifact, DefendedModel, FitContext
from crt_bench.backbone import UNET_FAMILY
from crt_bench.spec import Access, Family


class NegativePrompt(CRT):
    """Samples the unchanged model with the concept (or a given text) as CFG's negative prompt."""

    name: ClassVar[str] = "negative_prompt"
    family: ClassVar[Family] = Family.GUIDANCE
    exposes: ClassVar[frozenset[Access]] = OPEN_WEIGHTS  # the public SD weights, unchanged
    trains: ClassVar[str] = "nothing (a negative prompt)"
    backbones: ClassVar[frozenset[str]] = UNET_FAMILY  # every pipeline takes negative_prompt

    def __init__(self, text: str | None = None):
        super().__init__(text=text)
        if text is not None and not str(text).strip():
            raise ValueError("negative_prompt: `text` must be null (the concept's c_u) or a non-empty string")

    def fit(self, ctx: FitContext) -> Artifact:
        """Nothing is trained: the artifact records the negative prompt the defended model samples with."""
        text = self.params["text"]
        return Artifact(meta={"negative_prompt": ctx.concept.c_u if text is None else str(text)})

    def apply(self, pipe: Any, artifact: Artifact) -> DefendedModel:
        return DefendedModel(pipe=pipe, crt_name=self.name, exposes=self.exposes,
                             negative_prompt=artifact.meta["negative_prompt"])
