"""Loading and reading the world's ground-truth attribute judges (one small CNN per attribute family)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors.torch import load_file

from world.models import JUDGE_FAMILIES, AttributeJudge

JUDGES_DIR = Path(__file__).parent / "weights" / "judges"


def load_attribute_judges(folder: str | Path = JUDGES_DIR,
                          families: Iterable[str] | None = None) -> dict[str, AttributeJudge]:
    """The judges of ``families`` (default: all) from ``<folder>/<family>.safetensors``, in eval mode."""
    folder = Path(folder)
    judges = {}
    for family in families or JUDGE_FAMILIES:
        path = folder / f"{family}.safetensors"
        if not path.exists():
            raise FileNotFoundError(f"world judge weights missing: {path} (run `make world`)")
        judge = AttributeJudge(len(JUDGE_FAMILIES[family]))
        judge.load_state_dict(load_file(str(path)))
        judges[family] = judge.eval()
    return judges


@torch.no_grad()
def read_attributes(judges: dict[str, AttributeJudge],
                    pixels: torch.Tensor) -> dict[str, tuple[list[str], torch.Tensor]]:
    """Per family, the predicted label of each image and the class probabilities; ``pixels`` in [0, 1]."""
    out = {}
    for family, judge in judges.items():
        probs = judge(pixels).softmax(-1)
        labels = JUDGE_FAMILIES[family]
        out[family] = ([labels[i] for i in probs.argmax(-1).tolist()], probs)
    return out

