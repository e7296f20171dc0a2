"""Encoding from token embeddings (what the white-box attacks differentiate) equals the pipelines' own encoding of
the same ids on SD 1.x, 2.x and SDXL: SDXL's two encoders at their penultimate layers, the second's own padding
and its projected pooled embedding at the end token."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

from attacks.unlearndiffatk import encode_embeds
from crt_bench.backbone import (
    StackedTextEncoder,
    conditioning_encoder,
    encode_embeddings,
    encode_text,
    end_positions,
    text_width,
    token_embedding_table,
    token_embedding_widths,
    token_ids,
)
from crt_bench.spec import HarnessError

TEXTS = ["a nude square", "one red cross on the left", ""]


def _load(folder) -> Any:
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(folder))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipes(sd14_shaped_folder, sd21_shaped_folder, sdxl_shaped_folder) -> dict[str, Any]:
    return {"sd1": _load(sd14_shaped_folder), "sd2": _load(sd21_shaped_folder), "sdxl": _load(sdxl_shaped_folder)}


def test_end_positions_are_the_first_end_token_after_the_start():
    eos = 9
    ids = torch.tensor([[8, 1, 2, 9, 9, 9], [8, 9, 9, 9, 9, 9], [8, 1, 2, 3, 4, 9], [9, 5, 9, 0, 0, 0]])
    assert end_positions(ids, eos).tolist() == [3, 1, 5, 2]


@pytest.mark.parametrize("name", ["sd1", "sd2", "sdxl"])
def test_encoding_token_embeddings_equals_encoding_the_ids(pipes, name):
    """The embeddings of real ids, looked up in the (concatenated) table, encode as the pipeline encodes the text:
    on SDXL the table row at a padding position is the first tokenizer's end token for both encoders, so the
    second encoder's own padding ('!') must be put back after the end."""
    pipe = pipes[name]
    encoder = conditioning_encoder(pipe)
    ids = token_ids(pipe.tokenizer, TEXTS)
    table = token_embedding_table(encoder)
    assert table.shape == (len(pipe.tokenizer), text_width(pipe))
    assert sum(token_embedding_widths(encoder)) == text_width(pipe)
    with torch.no_grad():
        got = encode_embeddings(encoder, table[ids], end_positions(ids, pipe.tokenizer.eos_token_id))
        expected = encode_text(pipe, TEXTS)
    torch.testing.assert_close(got.hidden, expected.hidden, rtol=1e-5, atol=1e-5)
    if name == "sdxl":
        assert len(token_embedding_widths(encoder)) == 2 and got.pooled.shape == expected.pooled.shape
        torch.testing.assert_close(got.pooled, expected.pooled, rtol=1e-5, atol=1e-5)
        with pytest.raises(ValueError, match="end token"):
            encode_embeddings(encoder, table[ids])
    else:
        assert got.pooled is None and torch.equal(table, pipe.text_encoder.get_input_embeddings().weight)
        with torch.no_grad():  # the SD 1.x / 2.x path is the attacks' original one, bit for bit
            assert torch.equal(got.hidden, encode_embeds(pipe.text_encoder, table[ids]))


def test_sdxl_pooled_embedding_reads_the_end_token_and_gradients_stop_there(pipes):
    """Placeholders in a layout may be end tokens: the pooled embedding is read at the given end, and (causal
    attention) nothing after it reaches it; the token states before it do."""
    pipe = pipes["sdxl"]
    encoder = conditioning_encoder(pipe)
    assert isinstance(encoder, StackedTextEncoder)
    ids = token_ids(pipe.tokenizer, TEXTS[:1])
    end = int(end_positions(ids, pipe.tokenizer.eos_token_id))
    embeds = token_embedding_table(encoder)[ids].clone().requires_grad_(True)
    out = encode_embeddings(encoder, embeds, end)
    (grad,) = torch.autograd.grad(out.pooled.pow(2).sum(), [embeds])
    width = token_embedding_widths(encoder)[0]
    assert grad[0, end + 1:].abs().max() == 0 and grad[0, 1:end, width:].abs().sum() > 0
    assert grad[..., :width].abs().max() == 0  # the pooled embedding is the second encoder's alone
    with torch.no_grad():
        earlier = encode_embeddings(encoder, embeds, end - 1).pooled
    assert not torch.allclose(earlier, out.pooled.detach())


def test_sdxl_tables_of_different_vocabularies_are_refused(pipes):
    pipe = pipes["sdxl"]
    second = copy.deepcopy(pipe.text_encoder_2)
    second.resize_token_embeddings(len(pipe.tokenizer) + 1)
    with pytest.raises(HarnessError, match="vocabular"):
        token_embedding_table(StackedTextEncoder(pipe.text_encoder, second, pipe.tokenizer_2.pad_token_id))
