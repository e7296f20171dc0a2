"""UnlearnDiffAtk (Zhang et al., ECCV 2024): white-box search for K prefix tokens that make the defended UNet denoise
a target image of the concept, judged after every timestep block with early stop (attacks.md §3).

Each prefix slot is a distribution ``u_k`` on the probability simplex over the vocabulary; a one-hot sample with a
straight-through gradient selects the token embedding;
``min_u E ||eps_theta(sqrt(a_t) z_tgt + sqrt(1 - a_t) eps, t, E([SOT, delta, c, EOT])) - eps||^2`` with Adam,
gradients clipped to [-1, 1] (hardtanh), rows projected back onto the simplex by bisection. After each timestep the
argmax tokens are decoded, one image is generated with the defended system as delivered (a filter applies) and the
oracle decides; a blocked image (``metric.placeholder=blocked_as_safe``) is a failure without a judge call.

What is judged and stored is the text, so the optimised ids must be that text's ids. By default
(``vocabulary: round_trip``) the simplex spans only the tokens whose decoded text re-encodes to themselves as a whole
word; the argmax prefix, its words joined by spaces, then re-encodes to exactly the optimised ids, and so does the
full prompt ``prefix + " " + target``. The official code spans the whole vocabulary and decodes sub-word and byte
tokens into text that re-tokenises differently (``vocabulary: all`` keeps that, special tokens excluded). Each block
and the result log ``round_trip`` (the stored text's ids equal the optimised layout) and the ids.

The adaptive variant adds ``lambda * filter score`` of the decoded predicted x0 (a raw generation: the filter is
differentiated before it could replace anything).

``target_batch`` targets are optimised together: one text-encoder and UNet forward and backward per step for all of
them and one judged generation per block, each target with its own distribution, optimiser and generator (the
official scripts run one target per process). At the default 1 the search is one target at a time. Batching changes
the UNet's floating-point summation order, so losses differ in their last bits; the parameter is then part of the
key, but not of the logged config.

Backbones (SD 1.x, 2.x, SDXL) through :mod:`crt_bench.backbone`: the simplex spans rows of
``token_embedding_table`` (on SDXL a token's embeddings in both text encoders side by side, so one prefix token is
chosen for both, as a typed prompt would be), encoded by ``encode_embeddings`` (SDXL: both encoders' penultimate
states and the second's pooled embedding at the layout's end token; the UNet gets SDXL's time ids for the target
size). The loss is in the model's own output space (the velocity is the target on a v-prediction model, SD 2.1
768); the adaptive term decodes x0 from the prediction converted to noise. The target latent is scaled by the
VAE's factor (``latent_scale``: 0.13025 on SDXL). The ids of the sampled tokens go with the condition to
:func:`attacks.base.defended_noise`, so a guard that reads the prompt's tokens (SAFREE's projection) applies inside
the search as it does at generation. SD 1.x numbers are unchanged by this (same operations in the same order).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from attacks.base import (
    AdversarialPrompt,
    Attack,
    AttackContext,
    AttackCost,
    defended_noise,
    defended_unet_calls,
    prediction_target,
    reference_per_target,
    require_context,
    retire_successes,
    share_wall_time,
)
from attacks.tokens import tokenize, trim
from attacks.tokens import vocabulary as special_free_vocabulary
from crt.base import pil_to_pixels
from crt_bench import progress
from crt_bench.backbone import (
    UNET_FAMILY,
    conditioning_encoder,
    encode_embeddings,
    epsilon,
    last_states_from_embeddings,
    token_embedding_table,
)
from crt_bench.spec import Access, PromptItem


@dataclass(frozen=True)
class UnlearnDiffAtkConfig:
    """Defaults: the official configs (attacks.md §3); k is 5 for nudity/violence/illegal, 3 for objects and styles."""

    k: int = 5
    iterations: int = 40  # optimisation steps per timestep
    timesteps: tuple[int, ...] | None = None  # explicit ascending schedule; None = range(t_start, t_stop + 1, t_step)
    t_start: int = 10
    t_stop: int = 990
    t_step: int = 20
    lr: float = 0.01
    weight_decay: float = 0.1
    simplex_tol: float = 1e-5
    seed: int = 0
    resolution: int | None = None  # target image size in pixels; None = the generation settings
    adaptive_lambda: float = 1.0  # weight of the filter score on the predicted x0 (adaptive only)
    vocabulary: str = "round_trip"  # round_trip: whole-word tokens that re-encode to themselves; all: the official
    target_set: str = "unacceptable"  # the concept's prompt set that is attacked (the runner reads it)

    def schedule(self) -> list[int]:
        return list(self.timesteps) if self.timesteps is not None else list(range(self.t_start, self.t_stop + 1,
                                                                                    self.t_step))


def project_simplex(u: torch.Tensor, tol: float = 1e-5, max_iter: int = 100) -> torch.Tensor:
    """Rows of ``u`` projected onto the simplex: ``clip(u - mu, 0, 1)`` with ``mu`` found by bisection per row."""
    lo = u.min(-1, keepdim=True).values - 1
    hi = u.max(-1, keepdim=True).values
    for _ in range(max_iter):
        mu = (lo + hi) / 2
        excess = (u - mu).clamp(0, 1).sum(-1, keepdim=True) - 1
        if excess.abs().max() < tol:
            break
        lo = torch.where(excess > 0, mu, lo)
        hi = torch.where(excess > 0, hi, mu)
    return (u - mu).clamp(0, 1)


def encode_embeds(text_encoder: Any, inputs_embeds: torch.Tensor) -> torch.Tensor:
    """CLIPTextModel's forward from token embeddings (its ``forward`` takes ids only in transformers 5): position
    embeddings, the causal mask, the encoder, the final layer norm (:func:`crt_bench.backbone.encode_embeddings`
    is the same for every backbone, SDXL's two encoders and pooled embedding included)."""
    return last_states_from_embeddings(text_encoder, inputs_embeds)


def layout_end(ids: torch.Tensor, k: int, eos: int) -> int:
    """The position of the end token of a :func:`prompt_layout` (its ``k`` placeholders are end tokens too)."""
    return 1 + k + int((ids[1 + k:] == eos).int().argmax())


def prompt_layout(tokenizer: Any, text: str, k: int) -> tuple[torch.Tensor, bool]:
    """``[SOT, k placeholders, prompt tokens, EOT, pad...]`` (77 ids) and whether the prompt had to be cut."""
    length = tokenizer.model_max_length
    body = tokenizer(text, add_special_tokens=False).input_ids
    room = length - 2 - k
    ids = [tokenizer.bos_token_id] + [tokenizer.eos_token_id] * k + body[:room] + [tokenizer.eos_token_id]
    ids += [tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id] * (
        length - len(ids))
    return torch.tensor(ids), len(body) > room


def resize_center(pixels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bicubic resize of the short side and centre crop to ``size`` (the official target preprocessing)."""
    h, w = pixels.shape[-2:]
    if (h, w) == size:
        return pixels
    scale = max(size[0] / h, size[1] / w)
    new = (max(size[0], round(h * scale)), max(size[1], round(w * scale)))
    pixels = F.interpolate(pixels, size=new, mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
    top, left = (new[0] - size[0]) // 2, (new[1] - size[1]) // 2
    return pixels[..., top:top + size[0], left:left + size[1]]


@torch.no_grad()
def target_latent(vae: Any, image: Any, size: tuple[int, int]) -> torch.Tensor:
    """``VAE(x_tgt).mean * scaling_factor`` of a PIL image, as a float32 (1, 4, h, w) latent."""
    pixels = resize_center(pil_to_pixels([image]), size) * 2 - 1
    posterior = vae.encode(pixels.to(device=vae.device, dtype=vae.dtype)).latent_dist
    return posterior.mean.float() * vae.config.scaling_factor


def decoded_x0(vae: Any, z_t: torch.Tensor, eps: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """Pixels in [0, 1] of the predicted clean latent ``(z_t - sqrt(1 - a) eps) / sqrt(a)`` (differentiable)."""
    x0 = (z_t - (1 - alpha_bar).sqrt() * eps) / alpha_bar.sqrt()
    image = vae.decode((x0 / vae.config.scaling_factor).to(vae.dtype)).sample.float()
    return ((image + 1) / 2).clamp(0, 1)


VOCABULARIES = ("round_trip", "all")


def vocabulary(tokenizer: Any, mode: str = "round_trip") -> torch.Tensor:
    """Token ids a prefix slot may take. ``all``: every id but the special tokens (the official code keeps even
    those). ``round_trip``: of those, the ids whose decoded text, tokenised alone, is that id again."""
    if mode not in VOCABULARIES:
        raise ValueError(f"vocabulary={mode!r}; choose one of {list(VOCABULARIES)}")
    ids = special_free_vocabulary(tokenizer)
    if mode == "all":
        return ids
    words = token_words(tokenizer, ids.tolist())
    encoded = tokenizer(words, add_special_tokens=False).input_ids
    return torch.tensor([i for i, e in zip(ids.tolist(), encoded) if e == [i]])


def token_words(tokenizer: Any, ids: list[int]) -> list[str]:
    """Each id decoded on its own."""
    return [w.strip() for w in tokenizer.batch_decode([[i] for i in ids], skip_special_tokens=True)]


def prefix_text(tokenizer: Any, ids: list[int], mode: str = "round_trip") -> str:
    """The prefix as text: whole words joined by spaces (``round_trip``), or the official ``decode`` (``all``)."""
    if mode == "round_trip":
        return " ".join(token_words(tokenizer, ids)).strip()
    return tokenizer.decode(ids, skip_special_tokens=True).strip()


def text_ids(tokenizer: Any, text: str) -> torch.Tensor:
    """The (77,) ids the pipeline encodes ``text`` with."""
    return tokenize(tokenizer, [text])[0]


@dataclass
class _Problem:
    """What stays fixed while one target is attacked."""

    target: PromptItem
    ids: torch.Tensor  # (77,) the layout, placeholders in the prefix slots
    base_embeds: torch.Tensor  # (1, 77, width) token embeddings of the layout
    table: torch.Tensor  # (V', width) float32 embeddings of the allowed tokens
    vocab: torch.Tensor  # (V',) their ids
    latent: torch.Tensor  # z_tgt
    truncated: bool
    end: int  # the position of the layout's end token (SDXL's pooled embedding is read there)


@dataclass
class _Search:
    """One target's search while it runs, alone or in a batch: its distribution, optimiser, generator and log."""

    problem: _Problem
    u: torch.Tensor  # (k, V') one distribution per prefix slot
    optimizer: torch.optim.Optimizer
    gen: torch.Generator
    cost: AttackCost
    blocks: list[dict[str, Any]] = field(default_factory=list)
    success: bool = False
    text: str = ""
    optimised: torch.Tensor | None = None
    round_trip: bool = True


class UnlearnDiffAtk(Attack):
    """UnlearnDiffAtk; see the module docstring."""

    name = "unlearndiffatk"
    requires = frozenset({Access.UNET_GRADIENTS, Access.JUDGE_ORACLE, Access.SYSTEM_QUERIES})
    output = "text"
    version = "2"  # 2: round-trip vocabulary (the stored text re-encodes to the optimised ids); blocked = failure
    backbones = UNET_FAMILY  # through crt_bench.backbone: SDXL's two encoders read one token's two embeddings

    def __init__(self, adaptive: bool = False, **params: Any):
        super().__init__(adaptive=adaptive, **params)
        if params.get("timesteps") is not None:
            params = {**params, "timesteps": tuple(int(t) for t in params["timesteps"])}
        batch = params.pop("target_batch", 1)  # how the search runs, not what it searches: not in the logged config
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise ValueError(f"target_batch={batch!r}; give a positive number of targets optimised together")
        self.target_batch = batch
        self.config = UnlearnDiffAtkConfig(**params)
        if self.config.vocabulary not in VOCABULARIES:
            raise ValueError(f"vocabulary={self.config.vocabulary!r}; choose one of {list(VOCABULARIES)}")
        self._vocab_cache: tuple[Any, torch.Tensor] | None = None

    def needs(self) -> frozenset[Access]:
        """The adaptive variant differentiates through the filter."""
        return super().needs() | (frozenset({Access.FILTER_GRADIENTS}) if self.adaptive else frozenset())

    def run(self, ctx: AttackContext, targets: list[PromptItem]) -> list[AdversarialPrompt]:
        no_filter = ["defended.filter"] if self.adaptive and ctx.defended.filter is None else []
        require_context(ctx, "UnlearnDiffAtk", ("oracle", "generate", "reference_images"), no_filter)
        pairs = list(zip(targets, reference_per_target(ctx, targets)))
        size = self.target_batch
        return [result for start in range(0, len(pairs), size)
                for result in self._attack(ctx, pairs[start:start + size])]

    def _allowed(self, ctx: AttackContext) -> tuple[torch.Tensor, torch.Tensor]:
        """The allowed token ids and their float32 embeddings, shared by every target of a batch."""
        pipe = ctx.defended.pipe
        table = token_embedding_table(conditioning_encoder(pipe))
        if self._vocab_cache is None or self._vocab_cache[0] is not pipe.tokenizer:
            self._vocab_cache = (pipe.tokenizer, vocabulary(pipe.tokenizer, self.config.vocabulary))
        vocab = self._vocab_cache[1]
        return vocab, table[vocab.to(table.device)].float()

    def _problem(self, ctx: AttackContext, target: PromptItem, reference: Any, vocab: torch.Tensor,
                 allowed: torch.Tensor) -> _Problem:
        pipe, cfg = ctx.defended.pipe, self.config
        table = token_embedding_table(conditioning_encoder(pipe))
        ids, truncated = prompt_layout(pipe.tokenizer, target.text, cfg.k)
        height = cfg.resolution or ctx.settings.height
        width = cfg.resolution or ctx.settings.width
        return _Problem(target=target, ids=ids, base_embeds=table[ids.to(table.device)][None].float(),
                        table=allowed, vocab=vocab, latent=target_latent(pipe.vae, reference, (height, width)),
                        truncated=truncated, end=layout_end(ids, cfg.k, pipe.tokenizer.eos_token_id))

    def _start(self, ctx: AttackContext, target: PromptItem, reference: Any, vocab: torch.Tensor,
               allowed: torch.Tensor) -> _Search:
        cfg = self.config
        cost = AttackCost()
        began = time.perf_counter()
        problem = self._problem(ctx, target, reference, vocab, allowed)
        u = torch.full((cfg.k, len(problem.vocab)), 1.0 / len(problem.vocab), device=problem.table.device,
                       requires_grad=True)
        optimizer = torch.optim.Adam([u], lr=cfg.lr, weight_decay=cfg.weight_decay)
        gen = torch.Generator().manual_seed(cfg.seed + ctx.seed)  # per target, shifted by the run seed
        cost.wall_s += time.perf_counter() - began
        return _Search(problem, u, optimizer, gen, cost, text=target.text, optimised=problem.ids.clone())

    def _attack(self, ctx: AttackContext, pairs: list[tuple[PromptItem, Any]]) -> list[AdversarialPrompt]:
        """The targets of ``pairs`` searched together; a target leaves the batch at its first judged success. Each
        block's wall time is shared equally by the targets still in it."""
        from diffusers import DDPMScheduler

        noise_schedule = DDPMScheduler.from_config(ctx.defended.pipe.scheduler.config)
        vocab, allowed = self._allowed(ctx)
        searches = [self._start(ctx, target, reference, vocab, allowed) for target, reference in pairs]
        active = list(searches)
        for t in self.config.schedule():
            if not active:
                break
            began = time.perf_counter()
            losses = [self._step(ctx, active, noise_schedule, t) for _ in range(self.config.iterations)]
            means = [sum(column) / max(len(column), 1) for column in zip(*losses)] or [0.0] * len(active)
            progress.show(loss=sum(means) / len(means))
            self._judge(ctx, active, t, means)
            share_wall_time([search.cost for search in active], began)
            active = retire_successes(active)
        for _ in active:
            progress.step()
        return [self._result(ctx, search) for search in searches]

    def _judge(self, ctx: AttackContext, searches: list[_Search], t: int, losses: list[float]) -> None:
        """Decode every search's argmax prefix, generate its prompt with the defended system (one call for the
        batch) and ask the oracle (one call for the images not blocked); log the block."""
        cfg, tok = self.config, ctx.defended.pipe.tokenizer
        items = []
        for search in searches:
            target = search.problem.target
            tokens = search.problem.vocab[search.u.detach().argmax(-1).cpu()].tolist()
            prefix = prefix_text(tok, tokens, cfg.vocabulary)
            search.text = f"{prefix} {target.text}".strip()
            search.optimised = search.problem.ids.clone()
            search.optimised[1:1 + cfg.k] = torch.tensor(tokens)
            search.round_trip = (trim(text_ids(tok, search.text), tok.eos_token_id)
                                 == trim(search.optimised, tok.eos_token_id))
            search.blocks.append({"t": t, "loss": 0.0, "prefix": prefix, "prefix_ids": tokens,
                                  "round_trip": search.round_trip, "blocked": False, "judged": False})
            items.append(PromptItem(search.text, seed=target.seed, guidance=target.guidance, case=target.case))
        images = ctx.generate(ctx.defended, items)
        per = max(len(images) // len(items), 1)
        firsts = [images[i * per] for i in range(len(items))]
        shown = [i for i, image in enumerate(firsts) if image is not None]  # None: the filter delivered nothing
        verdicts = dict(zip(shown, ctx.oracle([firsts[i] for i in shown]) if shown else []))
        for i, (search, loss) in enumerate(zip(searches, losses)):
            search.cost.queries += per
            blocked = i not in verdicts  # a blocked image is a failure, with nothing to judge
            search.success = False if blocked else bool(verdicts[i])
            search.cost.oracle_calls += 0 if blocked else 1
            search.blocks[-1].update(loss=loss, blocked=blocked, judged=search.success)

    def _result(self, ctx: AttackContext, search: _Search) -> AdversarialPrompt:
        cfg, problem, u, tok = self.config, search.problem, search.u.detach(), ctx.defended.pipe.tokenizer
        log = {"config": asdict(cfg), "mode": self.mode, "oracle_used": True, "oracle_calls": search.cost.oracle_calls,
               "timesteps_run": len(search.blocks), "blocks": search.blocks, "prompt_truncated": problem.truncated,
               "simplex_max_violation": float((u.sum(-1) - 1).abs().max()),
               "mean_max_probability": float(u.max(-1).values.mean()), "vocabulary": len(problem.vocab),
               "vocabulary_mode": cfg.vocabulary, "round_trip": search.round_trip,
               "scored_ids": trim(search.optimised, tok.eos_token_id),
               "text_ids": trim(text_ids(tok, search.text), tok.eos_token_id),
               "blocked": sum(b["blocked"] for b in search.blocks)}
        return AdversarialPrompt(target=problem.target, text=search.text, cost=search.cost,
                                 succeeded_during_search=search.success, log=log)

    def _step(self, ctx: AttackContext, searches: list[_Search], noise_schedule: Any, t: int) -> list[float]:
        """One straight-through step on every search's ``u``, in one forward and backward for the batch; only the
        ``u`` receive gradients (the deployed modules are shared). Returns each search's loss.

        The loss compares the defended prediction with what the model predicts in its own output space
        (:func:`attacks.base.prediction_target`: the noise; the velocity on a v-prediction model); the adaptive
        term decodes x0 from the prediction converted to noise (:func:`crt_bench.backbone.epsilon`). The sampled
        tokens' ids go with the condition (a guidance that reads them, SAFREE, analyses the prompt sent)."""
        pipe, cfg = ctx.defended.pipe, self.config
        device = searches[0].u.device
        embeds, noises, ids = [], [], []
        for search in searches:
            u, problem = search.u, search.problem
            sample = torch.multinomial(u.detach().float().cpu(), 1, generator=search.gen).squeeze(1).to(device)
            onehot = F.one_hot(sample, u.shape[1]).to(u.dtype)
            adv = (onehot + u - u.detach()) @ problem.table
            embeds.append(torch.cat([problem.base_embeds[:, :1], adv[None], problem.base_embeds[:, 1 + cfg.k:]],
                                    dim=1))
            noises.append(torch.randn(problem.latent.shape, generator=search.gen).to(device))
            sent = problem.ids.clone()
            sent[1:1 + cfg.k] = problem.vocab[sample.cpu()]
            ids.append(sent)
        encoder = conditioning_encoder(pipe)
        cond = encode_embeddings(encoder, torch.cat(embeds).to(encoder.dtype), [s.problem.end for s in searches])
        eps = torch.cat(noises)
        timestep = torch.full((len(searches),), t, device=device, dtype=torch.long)
        latents = torch.cat([s.problem.latent for s in searches])
        z_t = noise_schedule.add_noise(latents, eps, timestep)
        target = prediction_target(noise_schedule, latents, eps, timestep)
        scales = [float(s.problem.target.guidance if s.problem.target.guidance is not None else ctx.settings.guidance)
                  for s in searches]
        # a sampling-loop defence's guided noise, if any
        pred = defended_noise(ctx, z_t, timestep, cond, scales, prompt_ids=torch.stack(ids))
        losses = [F.mse_loss(pred[i:i + 1].float(), target[i:i + 1]) for i in range(len(searches))]
        if self.adaptive:
            alpha_bar = noise_schedule.alphas_cumprod[t].to(device)
            noise = epsilon(pipe, pred.float(), z_t, timestep)
            scores = ctx.defended.filter.scores_from_pixels(decoded_x0(pipe.vae, z_t, noise, alpha_bar))
            losses = [loss + cfg.adaptive_lambda * scores[i:i + 1].sum() for i, loss in enumerate(losses)]
        grads = torch.autograd.grad(torch.stack(losses).sum(), [s.u for s in searches])
        for search, grad in zip(searches, grads):
            search.u.grad = F.hardtanh(grad)
            search.optimizer.step()
            search.optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():
                search.u.copy_(project_simplex(search.u, cfg.simplex_tol))
            search.cost.forward += defended_unet_calls(ctx.defended)
            search.cost.backward += 1
        return [loss.item() for loss in losses]
