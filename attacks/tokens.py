"""Token-id helpers the hard-prompt attacks share: the ids a pipeline encodes a text with, the plain-text
vocabulary, and a padded row cut at its end token (what is compared to check that a stored text is what was scored)."""

from __future__ import annotations

from typing import Any

import torch


def tokenize(tokenizer: Any, texts: list[str]) -> torch.Tensor:
    """The (N, 77) ids the pipeline encodes ``texts`` with: padded to the model length, truncated."""
    return tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def vocabulary(tokenizer: Any) -> torch.Tensor:
    """Every token id except the special tokens."""
    special = set(tokenizer.all_special_ids)
    return torch.tensor([i for i in range(len(tokenizer)) if i not in special])


def trim(ids: torch.Tensor, eot: int) -> list[int]:
    """A padded row up to and including its first EOT after SOT."""
    row = ids.tolist()
    end = row.index(eot, 1) if eot in row[1:] else len(row) - 1
    return row[:end + 1]
