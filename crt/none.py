"""The identity CRT: the undefended model, the reference row of every leaderboard."""

from __future__ import annotations

from typing import Any, ClassVar

from crt.base import CRT, Artifact, DefendedModel, FitContext
from crt_bench.backbone import UNET_FAMILY
from crt_bench.spec import Access, Family


class NoCRT(CRT):
    """Removes nothing; exposes everything an undefended open model exposes (there is no filter to query)."""

    name: ClassVar[str] = "none"
    family: ClassVar[Family] = Family.NONE
    exposes: ClassVar[frozenset[Access]] = frozenset(
        {Access.TEXT_ENCODER, Access.UNET_GRADIENTS, Access.UNERASED_MODEL})
    trains: ClassVar[str] = "nothing"
    backbones: ClassVar[frozenset[str]] = UNET_FAMILY

    def fit(self, ctx: FitContext) -> Artifact:
        return Artifact(meta={"note": "identity: nothing fitted"})

    def apply(self, pipe: Any, artifact: Artifact) -> DefendedModel:
        return DefendedModel(pipe=pipe, crt_name=self.name, exposes=self.exposes)
