"""The no-attack: the baseline column of robustness, where total ASR equals the unattacked (pre-attack) ASR."""

from __future__ import annotations

from typing import ClassVar, Literal

from attacks.base import AdversarialPrompt, Attack, AttackContext
from crt_bench.backbone import UNET_FAMILY
from crt_bench.spec import Access, PromptItem


class NoAttack(Attack):
    """Searches nothing and returns no adversarial prompt, so only the unattacked images are judged."""

    name: ClassVar[str] = "none"
    requires: ClassVar[frozenset[Access]] = frozenset()
    output: ClassVar[Literal["text", "embedding"]] = "text"
    no_adaptive: ClassVar[str | None] = "attack=none searches nothing, so it has no adaptive variant"
    backbones: ClassVar[frozenset[str]] = UNET_FAMILY

    def run(self, ctx: AttackContext, targets: list[PromptItem]) -> list[AdversarialPrompt]:
        return []
