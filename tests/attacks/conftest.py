"""The attack tests share the CRT tests' pipelines and concept (see tests/crt/conftest.py), plus tokenizers to check
that adversarial text round-trips: the world's CLIPTokenizer and, offline, SD's CLIP BPE built from open_clip's copy
of OpenAI's merges (the same 49408-token vocabulary as SD v1.4's tokenizer)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from tests.crt.conftest import (  # noqa: F401
    concept,
    other_backbone,
    sd14,
    sd21,
    sdxl,
    shared_pipelines_keep_no_gradients,
    tiny,
    world,
)
from world.tokenizer import bytes_to_unicode

WORLD_TOKENIZER = Path(__file__).resolve().parents[2] / "world" / "weights" / "pipeline" / "tokenizer"


def clip_bpe_folder(folder: Path) -> Path | None:
    """vocab.json + merges.txt of OpenAI's CLIP BPE in the Hugging Face layout, from the merges open_clip ships
    (CLIP's vocabulary order: 256 byte symbols, the same with ``</w>``, one token per merge, SOT, EOT)."""
    try:
        import open_clip
    except ImportError:
        return None
    source = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    if not source.exists():
        return None
    lines = gzip.open(source).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    merges = [tuple(line.split()) for line in lines]
    alphabet = list(bytes_to_unicode().values())
    tokens = alphabet + [c + "</w>" for c in alphabet] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    return folder


@pytest.fixture(scope="session")
def clip_bpe_tokenizer(tmp_path_factory):
    from transformers import CLIPTokenizer

    folder = clip_bpe_folder(tmp_path_factory.mktemp("clip_bpe"))
    if folder is None:
        pytest.skip("no CLIP BPE vocabulary available offline (open_clip's bpe_simple_vocab_16e6.txt.gz)")
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77,
                        pad_token="<|endoftext|>")  # SD v1.4's tokenizer_config
    assert len(tok) == 49408 and tok("a photo of a woman").input_ids == [49406, 320, 1125, 539, 320, 2308, 49407]
    return tok


@pytest.fixture(scope="session")
def world_tokenizer(world):  # noqa: F811
    """The shipped world tokenizer when present, else the test pipeline's (the same files, built)."""
    from transformers import CLIPTokenizer

    if (WORLD_TOKENIZER / "vocab.json").exists():
        return CLIPTokenizer.from_pretrained(str(WORLD_TOKENIZER))
    return world.pipe.tokenizer


@pytest.fixture(params=["world", "clip_bpe"])
def any_tokenizer(request):
    """Each round-trip test runs on the world's tokenizer and on SD's BPE."""
    return request.getfixturevalue(f"{request.param}_tokenizer")
