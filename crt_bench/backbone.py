"""What differs between the UNet backbones (SD 1.x, SD 2.x, SDXL), as plain functions over a diffusers pipeline.

Why: every CRT and attack written against SD v1.4 assumes one 768-wide text encoder read at its last layer, a
UNet called with ``encoder_hidden_states`` only, epsilon prediction and 0.18215 latents. SD 2.x keeps the calls but
changes the widths (1024), the padding token ('!') and, for the 768 model, predicts v; SDXL has two text encoders
read at their penultimate layers and concatenated (2048 wide), a pooled embedding and six "time ids" the UNet takes
as extra conditioning, and 0.13025 latents. A plug-in that goes through these functions runs on all three; one that
does not declares ``backbones = {"sd1"}`` and is refused elsewhere. No wrapper classes: each function reads what
it needs from the pipeline diffusers built. Transformer backbones (SD 3, FLUX) are not UNet families: refused.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch

from crt_bench.spec import HarnessError

SD1, SD2, SDXL = "sd1", "sd2", "sdxl"
BACKBONES: tuple[str, ...] = (SD1, SD2, SDXL)
TRANSFORMER_BACKBONES: tuple[str, ...] = ("sd3", "flux")
ONLY_SD1: frozenset[str] = frozenset({SD1})
UNET_FAMILY: frozenset[str] = frozenset(BACKBONES)


def backbone_of(pipe: Any) -> str:
    """The backbone a loaded pipeline is, from its structure (not its name): a second text encoder and added
    conditioning = SDXL; a 1024-wide text encoder = SD 2.x; otherwise SD 1.x (and the miniature world, which has
    SD v1.4's classes)."""
    if getattr(pipe, "transformer", None) is not None:
        return "transformer"
    if getattr(pipe, "text_encoder_2", None) is not None:
        return SDXL
    return SD2 if pipe.text_encoder.config.hidden_size == 1024 else SD1


def check_backbone(backbone: str, plugins: Iterable[Any], model_name: str = "") -> None:
    """Refuse, in one line and before any work, a run whose model backbone a plug-in does not declare."""
    label = f"model={model_name} " if model_name else ""
    if backbone in TRANSFORMER_BACKBONES:
        raise HarnessError(f"{label}is a transformer backbone ({backbone}); only the UNet families "
                           f"{', '.join(BACKBONES)} are supported so far")
    if backbone not in BACKBONES:
        raise HarnessError(f"{label}declares backbone {backbone!r}; give one of {', '.join(BACKBONES)}")
    for plugin in plugins:
        supported = getattr(plugin, "backbones", ONLY_SD1)
        if backbone not in supported:
            raise HarnessError(f"{plugin.name} does not support the {backbone} backbone ({label.strip() or 'this run'}"
                               f"); it supports {', '.join(sorted(supported))}")


@dataclass
class TextConditioning:
    """What the UNet is conditioned on by a prompt: the token states cross-attention reads, and SDXL's pooled
    embedding (None on SD 1.x / 2.x)."""

    hidden: Any  # (B, 77, width)
    pooled: Any = None  # (B, 1280) on SDXL

    def __getitem__(self, index: Any) -> TextConditioning:
        return TextConditioning(self.hidden[index], None if self.pooled is None else self.pooled[index])

    def repeat(self, n: int) -> TextConditioning:
        pooled = None if self.pooled is None else self.pooled.repeat(n, 1)
        return TextConditioning(self.hidden.repeat(n, 1, 1), pooled)


def text_stack(pipe: Any) -> list[tuple[Any, Any]]:
    """The (tokenizer, text encoder) pairs whose outputs are concatenated, in order."""
    pairs = [(pipe.tokenizer, pipe.text_encoder)]
    if getattr(pipe, "text_encoder_2", None) is not None:
        pairs.append((pipe.tokenizer_2, pipe.text_encoder_2))
    return pairs


def text_width(pipe: Any) -> int:
    """The width of the token states cross-attention reads (768, 1024, 2048)."""
    return sum(encoder.config.hidden_size for _, encoder in text_stack(pipe))


def token_ids(tokenizer: Any, texts: list[str]) -> Any:
    return tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def encode_text(pipe: Any, texts: list[str]) -> TextConditioning:
    """The conditioning diffusers' own pipeline computes for ``texts`` (no classifier-free duplication): SD 1.x /
    2.x the last hidden state; SDXL both encoders' penultimate states concatenated and the second's pooled output.
    Differentiable with respect to the text encoders' weights (CRTs that train them, attacks through them)."""
    device = pipe.text_encoder.device
    if getattr(pipe, "text_encoder_2", None) is None:
        ids = token_ids(pipe.tokenizer, texts).to(device)
        return TextConditioning(pipe.text_encoder(ids)[0])
    states, pooled = [], None
    for tokenizer, encoder in text_stack(pipe):
        out = encoder(token_ids(tokenizer, texts).to(device), output_hidden_states=True)
        states.append(out.hidden_states[-2])
        pooled = out[0] if out[0].ndim == 2 else pooled  # CLIPTextModelWithProjection: text_embeds first
    return TextConditioning(torch.cat(states, dim=-1), pooled)


def time_ids(height: int, width: int, batch: int, like: Any) -> Any:
    """SDXL's added time ids: original size, top-left crop (0, 0), target size, as its pipeline sets them."""
    ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=like.dtype, device=like.device)
    return ids.repeat(batch, 1)


Condition = Any  # a (B, 77, width) tensor of token states (SD 1.x / 2.x), or a TextConditioning (any backbone)


def hidden_of(cond: Condition) -> torch.Tensor:
    return cond.hidden if isinstance(cond, TextConditioning) else cond


def concat(conds: list[Condition]) -> Condition:
    """Conditions stacked along the batch (classifier-free guidance's [uncond, cond]); tensors stay tensors."""
    if not any(isinstance(c, TextConditioning) for c in conds):
        return torch.cat(conds)
    parts = [c if isinstance(c, TextConditioning) else TextConditioning(c) for c in conds]
    pooled = [c.pooled for c in parts]
    if any(p is None for p in pooled) and any(p is not None for p in pooled):
        raise ValueError("cannot stack conditions with and without a pooled embedding")
    return TextConditioning(torch.cat([c.hidden for c in parts]),
                            None if pooled[0] is None else torch.cat(pooled))


def stack(conds: list[Condition]) -> Condition:
    """Single conditions (no batch axis) stacked into a batch; tensors stay tensors."""
    if not any(isinstance(c, TextConditioning) for c in conds):
        return torch.stack(conds)
    pooled = [c.pooled for c in conds]
    return TextConditioning(torch.stack([c.hidden for c in conds]),
                            None if pooled[0] is None else torch.stack(pooled))


def unet_output(unet: Any, latents: torch.Tensor, timestep: Any, cond: Condition, vae_factor: int = 8) -> Any:
    """``unet``'s raw prediction (epsilon, or v on a v-prediction model) with whatever extra conditioning the
    backbone needs: with a pooled embedding (SDXL) the added time ids of an image ``vae_factor`` times the latents'
    size. On SD 1.x / 2.x this is exactly ``unet(latents, t, encoder_hidden_states=cond).sample``."""
    kwargs: dict[str, Any] = {}
    if isinstance(cond, TextConditioning) and cond.pooled is not None:
        h, w = latents.shape[-2] * vae_factor, latents.shape[-1] * vae_factor
        kwargs["added_cond_kwargs"] = {"text_embeds": cond.pooled.to(latents.dtype),
                                       "time_ids": time_ids(h, w, latents.shape[0], latents)}
    return unet(latents, timestep, encoder_hidden_states=hidden_of(cond).to(latents.dtype), **kwargs).sample


def vae_factor(pipe: Any) -> int:
    return 2 ** (len(pipe.vae.config.block_out_channels) - 1)


def latent_scale(pipe: Any) -> float:
    """The factor latents are multiplied by after encoding (0.18215 on SD 1.x / 2.x, 0.13025 on SDXL)."""
    return float(pipe.vae.config.scaling_factor)


def prediction_type(pipe: Any) -> str:
    return str(getattr(pipe.scheduler.config, "prediction_type", "epsilon"))


def epsilon(pipe: Any, output: Any, latents: Any, timestep: Any) -> Any:
    """The noise a model output stands for: itself on epsilon models; eps = sqrt(abar) v + sqrt(1 - abar) x_t on
    v-prediction models (SD 2.1 768). Objectives written on epsilon stay correct on both."""
    kind = prediction_type(pipe)
    if kind == "epsilon":
        return output
    if kind != "v_prediction":
        raise HarnessError(f"prediction type {kind!r} is not supported; epsilon or v_prediction")
    abar = pipe.scheduler.alphas_cumprod.to(latents.device)[timestep].to(latents.dtype)
    abar = abar.reshape(-1, *([1] * (latents.ndim - 1)))
    return abar.sqrt() * output + (1 - abar).sqrt() * latents


def cross_attention_layers(unet: Any) -> dict[str, Any]:
    """The UNet's cross-attention modules (``attn2``) by name; each one's ``to_k`` / ``to_v`` read the text width
    (768 / 1024 / 2048) and write its own inner width, which differs by level on SD 2.x and SDXL."""
    return {name: module for name, module in unet.named_modules() if name.endswith("attn2")}


def key_value_widths(unet: Any) -> dict[str, tuple[int, int]]:
    """Per cross-attention layer: (input width = text width, output width) of its key projection."""
    return {name: (m.to_k.in_features, m.to_k.out_features) for name, m in cross_attention_layers(unet).items()}


def conditioning_encoder(pipe: Any) -> Any:
    """The text encoder as plug-ins written for SD 1.x call it, ``encoder(ids).last_hidden_state`` = the states
    cross-attention reads: the pipeline's own on SD 1.x / 2.x, a :class:`StackedTextEncoder` on SDXL."""
    if getattr(pipe, "text_encoder_2", None) is None:
        return pipe.text_encoder
    return StackedTextEncoder(pipe.text_encoder, pipe.text_encoder_2, pipe.tokenizer_2.pad_token_id)


class StackedTextEncoder(torch.nn.Module):
    """SDXL's two text encoders behind one call on the first tokenizer's ids: the second reads the same ids with its
    own padding ('!' after the end token, where the first repeats the end token), both at their penultimate layer,
    concatenated (2048 wide); ``pooler_output`` is the second's projected pooled embedding. Both CLIP tokenizers
    share one BPE vocabulary, so the ids carry over (tests check this equals :func:`encode_text`)."""

    def __init__(self, first: Any, second: Any, second_pad_id: int):
        super().__init__()
        self.first, self.second, self.second_pad_id = first, second, int(second_pad_id)
        self.config = SimpleNamespace(**{**first.config.to_dict(),
                                         "hidden_size": first.config.hidden_size + second.config.hidden_size})

    @property
    def device(self) -> torch.device:
        return self.first.device

    @property
    def dtype(self) -> torch.dtype:
        return self.first.dtype

    def forward(self, input_ids: torch.Tensor, **_: Any) -> SimpleNamespace:
        is_end = (input_ids == self.first.config.eos_token_id).int()
        after_end = is_end.cumsum(1) - is_end > 0
        a = self.first(input_ids, output_hidden_states=True)
        b = self.second(input_ids.masked_fill(after_end, self.second_pad_id), output_hidden_states=True)
        return SimpleNamespace(last_hidden_state=torch.cat([a.hidden_states[-2], b.hidden_states[-2]], dim=-1),
                               pooler_output=b[0])


def encoder_parts(encoder: Any) -> list[Any]:
    """The text encoders behind a conditioning encoder: SDXL's two (each read on its own, e.g. its pooled output),
    otherwise the one."""
    return [encoder.first, encoder.second] if isinstance(encoder, StackedTextEncoder) else [encoder]


def token_embedding_table(encoder: Any) -> torch.Tensor:
    """(V, width) token embeddings, detached: what a prompt's ids are looked up in before the text encoder runs.
    On SDXL (a :class:`StackedTextEncoder`) both encoders' rows side by side (768 + 1280 wide): the two CLIP
    tokenizers share one BPE vocabulary, so one id picks one row of each, and an attack that optimises token
    embeddings optimises both of a token's embeddings at once (:func:`encode_embeddings` splits them again)."""
    tables = [part.get_input_embeddings().weight.detach() for part in encoder_parts(encoder)]
    if len(tables) == 1:
        return tables[0]
    if len({table.shape[0] for table in tables}) != 1:
        raise HarnessError(f"SDXL's text encoders have vocabularies of {[t.shape[0] for t in tables]} tokens; "
                           "embedding-level attacks need the shared CLIP vocabulary")
    return torch.cat([table.to(tables[0].dtype) for table in tables], dim=-1)


def token_embedding_widths(encoder: Any) -> tuple[int, ...]:
    """The width of each encoder's part of a :func:`token_embedding_table` row, in order (SDXL: (768, 1280))."""
    return tuple(int(part.get_input_embeddings().weight.shape[1]) for part in encoder_parts(encoder))


def end_positions(ids: torch.Tensor, eos: int) -> torch.Tensor:
    """(B,) the position of each row's first end token after its start token: where CLIP pools a prompt."""
    return (ids[:, 1:] == eos).int().argmax(-1) + 1


def encode_embeddings(encoder: Any, inputs_embeds: torch.Tensor, end: Any = None) -> TextConditioning:
    """What :func:`encode_text` computes, from token embeddings (B, 77, width) instead of ids, differentiable in
    them (attacks that optimise soft or straight-through tokens; transformers' CLIP forward takes ids only).

    SD 1.x / 2.x (a plain CLIP text model): its final-layer-normed last states, no pooled embedding; the same
    operations as the model's own forward. SDXL (a :class:`StackedTextEncoder`, rows from
    :func:`token_embedding_table`): each encoder reads its part of the width; the second's positions after ``end``
    are its own padding token's embedding, as :class:`StackedTextEncoder` pads its ids; both are read at their
    penultimate layer and concatenated, and the pooled embedding is the second's projected final state at ``end``
    ((B,) or one int, required on SDXL: the placeholders a layout holds may be end tokens, so the end cannot be
    read from ids)."""
    if not isinstance(encoder, StackedTextEncoder):
        return TextConditioning(last_states_from_embeddings(encoder, inputs_embeds))
    if end is None:
        raise ValueError("SDXL's pooled embedding is read at the end token: give encode_embeddings its position")
    rows, length = inputs_embeds.shape[:2]
    end = torch.as_tensor(end, device=inputs_embeds.device).reshape(-1).expand(rows)
    first_part, second_part = inputs_embeds.split(list(token_embedding_widths(encoder)), dim=-1)
    padding = encoder.second.get_input_embeddings().weight[encoder.second_pad_id].detach()
    after_end = (torch.arange(length, device=inputs_embeds.device)[None] > end[:, None])[..., None]
    second_part = torch.where(after_end, padding.to(second_part.dtype), second_part)
    first_states = _penultimate_states(encoder.first, first_part.to(encoder.first.dtype))
    second_states = _penultimate_states(encoder.second, second_part.to(encoder.second.dtype))
    second_model = _text_transformer(encoder.second)
    final = second_model.encoder.layers[-1](second_states, _causal_mask(second_model, second_states), is_causal=True)
    final = second_model.final_layer_norm(final)
    pooled = encoder.second.text_projection(final[torch.arange(rows, device=final.device), end])
    return TextConditioning(torch.cat([first_states, second_states], dim=-1), pooled)


def last_states_from_embeddings(text_encoder: Any, inputs_embeds: torch.Tensor) -> torch.Tensor:
    """A CLIP text model's ``last_hidden_state`` from token embeddings: its forward's operations in its order
    (position embeddings, the causal mask, the encoder, the final layer norm)."""
    model = _text_transformer(text_encoder)
    hidden = model.embeddings(inputs_embeds=inputs_embeds)
    out = model.encoder(inputs_embeds=hidden, attention_mask=_causal_mask(model, hidden), is_causal=True)
    return model.final_layer_norm(out.last_hidden_state)


def _penultimate_states(text_encoder: Any, inputs_embeds: torch.Tensor) -> torch.Tensor:
    """``hidden_states[-2]`` of a CLIP text model from token embeddings: the output of all layers but the last
    (what SDXL's pipeline reads), no final layer norm."""
    model = _text_transformer(text_encoder)
    hidden = model.embeddings(inputs_embeds=inputs_embeds)
    mask = _causal_mask(model, hidden)
    for layer in model.encoder.layers[:-1]:
        hidden = layer(hidden, mask, is_causal=True)
    return hidden


def _text_transformer(text_encoder: Any) -> Any:
    """The module holding embeddings, encoder and final layer norm (``text_model`` of a projection model)."""
    return getattr(text_encoder, "text_model", text_encoder)


def _causal_mask(model: Any, hidden: torch.Tensor) -> Any:
    from transformers.masking_utils import create_causal_mask

    return create_causal_mask(config=model.config, inputs_embeds=hidden, attention_mask=None, cache=None)
