"""Small, real models built on the fly (no downloads): a world-shaped CLIPModel folder, world judge weights."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
WORLD_TOKENIZER = REPO / "world" / "weights" / "pipeline" / "tokenizer"


@pytest.fixture(scope="session")
def world_like_root(tmp_path_factory) -> Path:
    """``<root>/clip_eval`` (a CLIPModel folder without tokenizer or preprocessor config, like the world's) and
    ``<root>/pipeline/tokenizer`` (the world tokenizer), so the evaluator must find the tokenizer by layout."""
    from transformers import AutoTokenizer, CLIPModel

    from world.models import clip_config

    root = tmp_path_factory.mktemp("world_like")
    shutil.copytree(WORLD_TOKENIZER, root / "pipeline" / "tokenizer")
    tok = AutoTokenizer.from_pretrained(str(root / "pipeline" / "tokenizer"))
    torch.manual_seed(0)
    config = clip_config(len(tok), tok.eos_token_id, tok.bos_token_id, width=32, layers=1, vision_width=32,
                         vision_layers=1, projection_dim=16)
    CLIPModel(config).save_pretrained(str(root / "clip_eval"))
    return root


@pytest.fixture(scope="session")
def clip_dir(world_like_root) -> Path:
    return world_like_root / "clip_eval"

