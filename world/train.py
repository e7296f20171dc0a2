"""Train the miniature world as Stable Diffusion was trained, deterministically and resumably.

Stages, in order: tokenizer -> judges -> generator CLIP (contrastive, image and text towers) -> VAE ->
latent pool -> UNet on the frozen CLIP text encoder's hidden states with condition dropout -> evaluator CLIP.
Each stage checkpoints to ``work_dir`` (safetensors + JSON, never pickle) and resumes where it stopped; a
finished stage writes its product under ``out_dir`` and is skipped next time.

    python -m world.train [--stage unet] [--unet-steps 6000]
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from world import models
from world.captions import (
    PAIR_ATTRIBUTES,
    PAIR_FORMS,
    caption,
    contrast_caption,
    minimal_pair,
    pair_captions,
    short_caption,
)
from world.scene import Scene, render, sample_scene

log = logging.getLogger("world.train")
WEIGHTS = Path(__file__).parent / "weights"
# World captions are short; a causal text tower gives the same states for them padded to 32 or to 77 tokens.
CLIP_TRAIN_TOKENS = 32


@dataclass
class TrainConfig:
    out_dir: str = str(WEIGHTS)
    work_dir: str = ".world_work"
    seed: int = 1234
    threads: int = 2
    judge_steps: int = 700
    clip_steps: int = 1500
    clip_batch: int = 128
    eval_clip_steps: int = 1500
    vae_steps: int = 1500
    vae_batch: int = 32
    pool_size: int = 60000
    unet_steps: int = 6000
    unet_batch: int = 64
    unet_lr: float = 4e-4
    cond_dropout: float = 0.1
    ema_decay: float = 0.999
    checkpoint_every: int = 500


# ---------------------------------------------------------------- data


def batch_scenes(seed: int, step: int, n: int) -> list[Scene]:
    rng = np.random.default_rng([seed, step])
    return [sample_scene(rng) for _ in range(n)]


def to_tensor(images: list[np.ndarray]) -> torch.Tensor:
    """uint8 HWC images -> float (B, 3, H, W) in [0, 1]."""
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0


def render_batch(scenes: list[Scene], seed: int, step: int) -> torch.Tensor:
    return to_tensor([render(s, seed=hash((seed, step, i)) & 0xFFFFFFFF) for i, s in enumerate(scenes)])


def captions_for(scenes: list[Scene], seed: int, step: int, short_rate: float = 0.0) -> list[str]:
    rng = np.random.default_rng([seed, step, 7])
    return [short_caption(s, rng) if rng.random() < short_rate else caption(s, rng) for s in scenes]


def clip_batch(seed: int, step: int, n: int) -> tuple[torch.Tensor, list[str]]:
    """The generator CLIP's batch: ``n`` prior scenes in [0, 1], each with a caption (a quarter short ones)."""
    scenes = batch_scenes(seed, step, n)
    return render_batch(scenes, seed, step), captions_for(scenes, seed, step, short_rate=0.25)


# The evaluator CLIP's batch (stage eval_clip only): per 128, 32 minimal pairs + 64 prior scenes, of which 30% get
# short alt-text captions, 25% contrast captions and the rest full captions. Chosen on pilot runs scored at another
# image seed than world-check's; pairs captioned member-vs-hypernym (``cross`` / ``shape``) made `cross` worse.
EVAL_CLIP_PAIRS = 32
EVAL_CLIP_SHORT = 0.3
EVAL_CLIP_CONTRAST = 0.25
EVAL_CLIP_PAIR_WEIGHTS = (0.5, 0.25, 0.25)  # shape, colour, colour+shape (PAIR_ATTRIBUTES)
EVAL_CLIP_FORM_WEIGHTS = (0.55, 0.45)  # ordered, member (PAIR_FORMS)


def eval_clip_batch(seed: int, step: int, n: int, pairs: int = EVAL_CLIP_PAIRS, short_rate: float = EVAL_CLIP_SHORT,
                    contrast_rate: float = EVAL_CLIP_CONTRAST, pair_weights=EVAL_CLIP_PAIR_WEIGHTS,
                    form_weights=EVAL_CLIP_FORM_WEIGHTS, pair_blood: bool = False) -> tuple[torch.Tensor, list[str]]:
    """The evaluator CLIP's batch, which makes the contrastive loss tell members from their hypernym and bind a
    colour to its shape: ``n - 2 * pairs`` prior scenes captioned as the generator's are, or with a contrast
    caption (``a cross shape``, ``a shape: cross``, ``red cross``, ``cross``; :func:`contrast_caption`), then
    ``pairs`` minimal pairs (two scenes identical, render noise included, except the shape, the colour, or both;
    no blood, which their captions would leave unnamed), captioned by :func:`pair_captions` (``red cross`` /
    ``red square``, ``red cross`` / ``green cross``, ``cross`` / ``circle``). Deterministic in (seed, step)."""
    rng = np.random.default_rng([seed, step, 13])
    scenes = batch_scenes(seed, step, n - 2 * pairs)
    texts = []
    for scene in scenes:
        r = rng.random()
        if r < short_rate:
            texts.append(short_caption(scene, rng))
        elif r < short_rate + contrast_rate:
            texts.append(contrast_caption(scene, rng))
        else:
            texts.append(caption(scene, rng))
    render_seeds = [hash((seed, step, i)) & 0xFFFFFFFF for i in range(len(scenes))]
    for k in range(pairs):
        attribute = PAIR_ATTRIBUTES[int(rng.choice(len(PAIR_ATTRIBUTES), p=pair_weights))]
        form = PAIR_FORMS[int(rng.choice(len(PAIR_FORMS), p=form_weights))]
        base = sample_scene(rng) if pair_blood else sample_scene(rng, blood=False)
        pair = minimal_pair(base, rng, attribute)
        scenes.extend(pair)
        texts.extend(pair_captions(pair, rng, attribute, form))
        render_seeds.extend([hash((seed, step, n + k)) & 0xFFFFFFFF] * 2)
    return to_tensor([render(s, seed=r) for s, r in zip(scenes, render_seeds)]), texts


def tokenize(tokenizer, texts: list[str], length: int | None = None) -> torch.Tensor:
    """Token ids padded to ``length`` (77, SD's context, by default)."""
    return tokenizer(texts, padding="max_length", max_length=length or tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


# ---------------------------------------------------------------- checkpoints


def save_checkpoint(path: Path, modules: dict[str, torch.nn.Module], optimizer: torch.optim.Optimizer | None,
                    state: dict) -> None:
    """Model and optimizer tensors as safetensors, the rest as JSON; written atomically."""
    path.mkdir(parents=True, exist_ok=True)
    tensors = {f"{name}.{k}": v.detach().contiguous() for name, m in modules.items() for k, v in m.state_dict().items()}
    groups = None
    if optimizer is not None:
        sd = optimizer.state_dict()
        for pid, pstate in sd["state"].items():
            for k, v in pstate.items():
                tensors[f"optimizer.{pid}.{k}"] = torch.as_tensor(v).contiguous()
        groups = sd["param_groups"]
    tmp = path / "ckpt.safetensors.tmp"
    save_file(tensors, str(tmp))
    tmp.replace(path / "ckpt.safetensors")
    (path / "state.json.tmp").write_text(json.dumps({"state": state, "param_groups": groups}))
    (path / "state.json.tmp").replace(path / "state.json")


def load_checkpoint(path: Path, modules: dict[str, torch.nn.Module], optimizer: torch.optim.Optimizer | None) -> dict:
    """Restore what :func:`save_checkpoint` wrote; returns the saved state (empty when there is none)."""
    if not (path / "state.json").exists():
        return {}
    tensors = load_file(str(path / "ckpt.safetensors"))
    meta = json.loads((path / "state.json").read_text())
    for name, m in modules.items():
        prefix = f"{name}."
        m.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
    if optimizer is not None and meta["param_groups"] is not None:
        state: dict[int, dict] = {}
        for k, v in tensors.items():
            if k.startswith("optimizer."):
                _, pid, name = k.split(".", 2)
                state.setdefault(int(pid), {})[name] = v
        optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    return meta["state"]


def _done(out: Path) -> bool:
    return (out / "DONE").exists()


def _mark_done(out: Path, info: dict) -> None:
    (out / "DONE").write_text(json.dumps(info, indent=1))


# ---------------------------------------------------------------- stages


def stage_tokenizer(cfg: TrainConfig):
    from world.tokenizer import build_tokenizer

    out = Path(cfg.out_dir) / "pipeline" / "tokenizer"
    if (out / "vocab.json").exists():
        from transformers import CLIPTokenizer

        return CLIPTokenizer.from_pretrained(str(out))
    return build_tokenizer(out)


def train_judge(cfg: TrainConfig, family: str, labels: tuple[str, ...]) -> None:
    out = Path(cfg.out_dir) / "judges"
    target = out / f"{family}.safetensors"
    if target.exists():
        return
    torch.manual_seed(cfg.seed)
    judge = models.AttributeJudge(len(labels))
    opt = torch.optim.AdamW(judge.parameters(), lr=2e-3, weight_decay=1e-4)
    for step in range(cfg.judge_steps):
        scenes = batch_scenes(cfg.seed + 11, step, 128)
        x = render_batch(scenes, cfg.seed + 11, step)
        y = torch.tensor([labels.index(judge_label(s, family)) for s in scenes])
        loss = F.cross_entropy(judge(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0:
            log.info("judge %s step %d loss %.4f", family, step, loss.item())
    out.mkdir(parents=True, exist_ok=True)
    save_file(judge.state_dict(), str(target))


def judge_label(scene: Scene, family: str) -> str:
    value = getattr(scene, family)
    return ("yes" if value else "no") if isinstance(value, bool) else value


def stage_judges(cfg: TrainConfig) -> None:
    for family, labels in models.JUDGE_FAMILIES.items():
        train_judge(cfg, family, labels)


def train_clip(cfg: TrainConfig, tokenizer, name: str, steps: int, seed: int,
               batch: Callable[[int, int, int], tuple[torch.Tensor, list[str]]] = clip_batch,
               info: dict | None = None, **size) -> None:
    """Contrastive CLIP training; ``batch(seed, step, n)`` gives the step's images in [0, 1] and captions."""
    out = Path(cfg.out_dir) / name
    if _done(out):
        return
    torch.manual_seed(seed)
    config = models.clip_config(len(tokenizer), tokenizer.eos_token_id, tokenizer.bos_token_id, **size)
    from transformers import CLIPModel

    model = CLIPModel(config)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=0.1, betas=(0.9, 0.98))
    work = Path(cfg.work_dir) / name
    start = load_checkpoint(work, {"model": model}, opt).get("step", 0)
    t0 = time.time()
    for step in range(start, steps):
        lr = 5e-4 * min(1.0, (step + 1) / 200) * 0.5 * (1 + math.cos(math.pi * step / steps))
        for g in opt.param_groups:
            g["lr"] = lr
        pixels, texts = batch(seed, step, cfg.clip_batch)
        pixels = pixels * 2 - 1
        ids = tokenize(tokenizer, texts, CLIP_TRAIN_TOKENS)
        outputs = model(input_ids=ids, pixel_values=pixels, return_loss=True)
        opt.zero_grad()
        outputs.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        if (step + 1) % cfg.checkpoint_every == 0:
            save_checkpoint(work, {"model": model}, opt, {"step": step + 1})
        if step % 100 == 0:
            log.info("%s step %d loss %.4f (%.1fs)", name, step, outputs.loss.item(), time.time() - t0)
    model.save_pretrained(str(out))
    write_clip_processor(out, tokenizer)
    _mark_done(out, {"steps": steps, "seed": seed, **size, **(info or {})})


def write_clip_processor(folder: Path, tokenizer) -> None:
    """Save the tokenizer and image processor beside a world CLIP, so ``CLIPProcessor.from_pretrained`` loads it
    as it loads ``openai/clip-vit-large-patch14`` (32 px, pixels scaled to [-1, 1] as in training)."""
    from transformers import CLIPImageProcessor, CLIPProcessor

    if (folder / "preprocessor_config.json").exists() or (folder / "processor_config.json").exists():
        return
    images = CLIPImageProcessor(size={"shortest_edge": models.IMAGE_SIZE}, crop_size={"height": models.IMAGE_SIZE,
                                "width": models.IMAGE_SIZE}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(str(folder))


def train_vae(cfg: TrainConfig) -> None:
    out = Path(cfg.out_dir) / "pipeline" / "vae"
    if _done(out):
        return
    torch.manual_seed(cfg.seed + 3)
    vae = models.make_vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=3e-4, weight_decay=0.0)
    work = Path(cfg.work_dir) / "vae"
    start = load_checkpoint(work, {"vae": vae}, opt).get("step", 0)
    t0 = time.time()
    for step in range(start, cfg.vae_steps):
        scenes = batch_scenes(cfg.seed + 3, step, cfg.vae_batch)
        x = render_batch(scenes, cfg.seed + 3, step) * 2 - 1
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        loss = F.mse_loss(recon, x) + 0.5 * F.l1_loss(recon, x) + 1e-6 * posterior.kl().mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        if (step + 1) % cfg.checkpoint_every == 0:
            save_checkpoint(work, {"vae": vae}, opt, {"step": step + 1})
        if step % 100 == 0:
            log.info("vae step %d loss %.5f (%.1fs)", step, loss.item(), time.time() - t0)
    vae.save_pretrained(str(out))
    _mark_done(out, {"steps": cfg.vae_steps})


def build_latent_pool(cfg: TrainConfig) -> Path:
    """Encode a fixed pool of scenes once; the UNet then trains on posterior samples of it."""
    from diffusers import AutoencoderKL

    path = Path(cfg.work_dir) / "latent_pool"
    if (path / "pool.safetensors").exists():
        return path
    vae = AutoencoderKL.from_pretrained(str(Path(cfg.out_dir) / "pipeline" / "vae")).eval()
    rng = np.random.default_rng([cfg.seed, 99])
    scenes = [sample_scene(rng) for _ in range(cfg.pool_size)]
    means, stds = [], []
    with torch.no_grad():
        for i in range(0, len(scenes), 256):
            x = to_tensor([render(s, seed=cfg.seed * 7 + i + j) for j, s in enumerate(scenes[i:i + 256])]) * 2 - 1
            dist = vae.encode(x).latent_dist
            means.append(dist.mean)
            stds.append(dist.std)
    mean, std = torch.cat(means), torch.cat(stds)
    path.mkdir(parents=True, exist_ok=True)
    save_file({"mean": mean.contiguous(), "std": std.contiguous()}, str(path / "pool.safetensors"))
    (path / "scenes.json").write_text(json.dumps([s.to_dict() for s in scenes]))
    scaling = 1.0 / float((mean + std * torch.randn_like(std)).std())
    (path / "scaling.json").write_text(json.dumps({"scaling_factor": scaling}))
    log.info("latent pool of %d, scaling factor %.4f", len(scenes), scaling)
    return path


def train_unet(cfg: TrainConfig, tokenizer) -> None:
    from transformers import CLIPTextModel

    out = Path(cfg.out_dir) / "pipeline" / "unet"
    if _done(out):
        return
    pool = build_latent_pool(cfg)
    tensors = load_file(str(pool / "pool.safetensors"))
    scenes = [Scene(**{**d, "jitter": tuple(d["jitter"])}) for d in json.loads((pool / "scenes.json").read_text())]
    scaling = json.loads((pool / "scaling.json").read_text())["scaling_factor"]
    text_encoder = CLIPTextModel.from_pretrained(str(Path(cfg.out_dir) / "clip")).eval().requires_grad_(False)
    torch.manual_seed(cfg.seed + 5)
    unet = models.make_unet(text_encoder.config.hidden_size)
    ema = copy.deepcopy(unet).requires_grad_(False)
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.unet_lr, weight_decay=1e-2)
    scheduler = models.make_scheduler("ddpm")
    work = Path(cfg.work_dir) / "unet"
    start = load_checkpoint(work, {"unet": unet, "ema": ema}, opt).get("step", 0)
    with torch.no_grad():
        empty = text_encoder(tokenize(tokenizer, [""])).last_hidden_state
    t0 = time.time()
    for step in range(start, cfg.unet_steps):
        cosine = 0.5 * (1 + math.cos(math.pi * step / cfg.unet_steps))
        lr = cfg.unet_lr * min(1.0, (step + 1) / 500) * (0.1 + 0.9 * cosine)
        for g in opt.param_groups:
            g["lr"] = lr
        gen = torch.Generator().manual_seed(cfg.seed * 1000003 + step)
        idx = torch.randint(len(scenes), (cfg.unet_batch,), generator=gen)
        latents = (tensors["mean"][idx] + tensors["std"][idx] * torch.randn(tensors["std"][idx].shape, generator=gen))
        latents = latents * scaling
        texts = captions_for([scenes[i] for i in idx.tolist()], cfg.seed + 5, step, short_rate=0.05)
        with torch.no_grad():
            cond = text_encoder(tokenize(tokenizer, texts)).last_hidden_state
        drop = torch.rand(cfg.unet_batch, generator=gen) < cfg.cond_dropout
        cond = torch.where(drop[:, None, None], empty.expand_as(cond), cond)
        noise = torch.randn(latents.shape, generator=gen)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (cfg.unet_batch,), generator=gen)
        noisy = scheduler.add_noise(latents, noise, t)
        loss = F.mse_loss(unet(noisy, t, cond).sample, noise)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), unet.parameters()):
                pe.lerp_(p, 1 - decay)
        if (step + 1) % cfg.checkpoint_every == 0:
            save_checkpoint(work, {"unet": unet, "ema": ema}, opt, {"step": step + 1})
            export_pipeline(cfg, ema, scaling, partial_step=step + 1)
        if step % 100 == 0:
            log.info("unet step %d loss %.4f lr %.2e (%.1fs)", step, loss.item(), lr, time.time() - t0)
    ema.save_pretrained(str(out))
    export_pipeline(cfg, ema, scaling)
    _mark_done(out, {"steps": cfg.unet_steps, "scaling_factor": scaling})


def export_pipeline(cfg: TrainConfig, unet, scaling: float, partial_step: int | None = None) -> Path:
    """Write the diffusers-format pipeline folder (the same layout as SD v1.4 on the hub)."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline
    from transformers import CLIPTextModel, CLIPTokenizer

    root = Path(cfg.out_dir) / "pipeline"
    vae = AutoencoderKL.from_pretrained(str(root / "vae"))
    vae.register_to_config(scaling_factor=scaling)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=CLIPTextModel.from_pretrained(str(Path(cfg.out_dir) / "clip")),
        tokenizer=CLIPTokenizer.from_pretrained(str(root / "tokenizer")), unet=unet,
        scheduler=models.make_scheduler("ddim"), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    target = root if partial_step is None else Path(cfg.work_dir) / "pipeline_partial"
    pipe.save_pretrained(str(target), safe_serialization=True)
    if partial_step is not None:
        (target / "STEP").write_text(str(partial_step))
    return target


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", default="all",
                        choices=["all", "tokenizer", "judges", "clip", "vae", "unet", "eval_clip"])
    for field, value in asdict(TrainConfig()).items():
        parser.add_argument(f"--{field.replace('_', '-')}", type=type(value), default=value)
    args = parser.parse_args(argv)
    cfg = TrainConfig(**{k: v for k, v in vars(args).items() if k != "stage"})
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(cfg.threads)
    stage = args.stage
    tokenizer = stage_tokenizer(cfg)
    if stage in ("all", "judges"):
        stage_judges(cfg)
    if stage in ("all", "clip"):
        train_clip(cfg, tokenizer, "clip", cfg.clip_steps, cfg.seed + 1)
    if stage in ("all", "vae"):
        train_vae(cfg)
    if stage in ("all", "unet"):
        write_clip_processor(Path(cfg.out_dir) / "clip", tokenizer)
        train_unet(cfg, tokenizer)
    if stage in ("all", "eval_clip"):
        train_clip(cfg, tokenizer, "clip_eval", cfg.eval_clip_steps, cfg.seed + 2, batch=eval_clip_batch,
                   info={"captions": "eval_clip_batch"}, width=96, layers=3, vision_width=96, vision_layers=3,
                   projection_dim=96)


if __name__ == "__main__":
    main()
