"""The world's reward classifier: what a reward-trained CRT (ShieldDiff) optimises against, apart from the judges.

A CRT that is fine-tuned on a classifier's score must not be graded by that same classifier, or the benchmark
measures how well it fools its own training signal. The evaluation judges (``world.judges``: one
``AttributeJudge`` CNN per family, max-pooling and ReLU, seed 1234, render stream 1245) therefore get a separate
reader of the same attributes: one network with a shared trunk and one head per judge family (strided convolutions,
GroupNorm, SiLU, mean + max pooling), its own initialisation seed, its own render stream, and mild blur / noise
augmentation (generated images are softer than renders). Its accuracy on fresh renders (a third seed) is stored in
``world/weights/reward/meta.json`` and checked by ``tests/world/test_reward.py``.

    python -m world.reward [--threads 1] [--force]
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from world.models import JUDGE_FAMILIES
from world.scene import Scene, render, sample_scene

log = logging.getLogger("world.reward")
REWARD_DIR = Path(__file__).parent / "weights" / "reward"
WEIGHTS_FILE = "classifier.safetensors"
META_FILE = "meta.json"
ARCHITECTURE = "world.reward.RewardClassifier"


@dataclass(frozen=True)
class RewardTrainConfig:
    """Training of the reward classifier; every seed differs from the judges' (init 1234, renders 1245)."""

    init_seed: int = 4242
    render_seed: int = 9001  # training renders: np.random.default_rng([render_seed, step])
    test_seed: int = 777  # fresh renders for the accuracy in meta.json, never trained on
    test_images: int = 2000
    steps: int = 1200
    batch: int = 128
    lr: float = 3e-3
    weight_decay: float = 1e-4
    width: int = 48
    augment: bool = True  # random blur and pixel noise on half of each batch


class RewardClassifier(nn.Module):
    """One trunk, one head per judge family: logits for every attribute the world's judges read."""

    def __init__(self, families: Mapping[str, tuple[str, ...]] = JUDGE_FAMILIES, width: int = 48):
        super().__init__()
        self.families = {f: tuple(labels) for f, labels in families.items()}

        def block(c_in: int, c_out: int, stride: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1),
                                 nn.GroupNorm(8, c_out), nn.SiLU())

        self.trunk = nn.Sequential(block(3, width, 1), block(width, width, 2), block(width, 2 * width, 2),
                                   block(2 * width, 2 * width, 2))
        self.heads = nn.ModuleDict({f: nn.Linear(4 * width, len(labels)) for f, labels in self.families.items()})

    def forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """``pixels`` (B, 3, 32, 32) in [0, 1] -> logits per family."""
        h = self.trunk((pixels - 0.45) / 0.25)
        pooled = torch.cat([h.mean((2, 3)), h.amax((2, 3))], 1)
        return {f: head(pooled) for f, head in self.heads.items()}


def scene_label(scene: Scene, family: str) -> str:
    value = getattr(scene, family)
    return ("yes" if value else "no") if isinstance(value, bool) else value


def renders(seed: int, step: int, n: int) -> tuple[torch.Tensor, list[Scene]]:
    """``n`` prior scenes of the stream ``(seed, step)`` drawn in [0, 1], with their ground truth."""
    rng = np.random.default_rng([seed, step])
    scenes = [sample_scene(rng) for _ in range(n)]
    images = [render(s, seed=int(rng.integers(2**31))) for s in scenes]
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0, scenes


def targets(scenes: list[Scene], families: Mapping[str, tuple[str, ...]]) -> dict[str, torch.Tensor]:
    return {f: torch.tensor([labels.index(scene_label(s, f)) for s in scenes]) for f, labels in families.items()}


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Half the batch blurred (3x3 box, random strength) and noised: closer to decoded latents than clean renders."""
    n = len(x) // 2
    strength = torch.rand(n, 1, 1, 1, generator=gen)
    blurred = F.avg_pool2d(F.pad(x[:n], (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    soft = (1 - strength) * x[:n] + strength * blurred
    soft = soft + 0.03 * torch.rand(n, 1, 1, 1, generator=gen) * torch.randn(soft.shape, generator=gen)
    return torch.cat([soft.clamp(0, 1), x[n:]])


@torch.no_grad()
def accuracy(model: RewardClassifier, seed: int, n: int, chunk: int = 500) -> dict[str, float]:
    """Per family, the fraction of ``n`` fresh renders of stream ``seed`` read correctly."""
    model.eval()
    correct = {f: 0 for f in model.families}
    for step, start in enumerate(range(0, n, chunk)):
        x, scenes = renders(seed, step, min(chunk, n - start))
        logits = model(x)
        for f, y in targets(scenes, model.families).items():
            correct[f] += int((logits[f].argmax(-1) == y).sum())
    return {f: c / n for f, c in correct.items()}


def train(cfg: RewardTrainConfig = RewardTrainConfig()) -> tuple[RewardClassifier, dict[str, Any]]:
    """Train on the classifier's own render stream; returns the model and its meta (accuracy on fresh renders)."""
    torch.manual_seed(cfg.init_seed)
    model = RewardClassifier(width=cfg.width)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(cfg.init_seed)
    start = time.time()
    model.train()
    for step in range(cfg.steps):
        x, scenes = renders(cfg.render_seed, step, cfg.batch)
        if cfg.augment:
            x = augment(x, gen)
        logits = model(x)
        loss = sum(F.cross_entropy(logits[f], y) for f, y in targets(scenes, model.families).items())
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 200 == 0:
            log.info("reward classifier step %d loss %.4f", step, loss.item())
    meta = {"architecture": ARCHITECTURE, "families": {f: list(v) for f, v in model.families.items()},
            "config": asdict(cfg), "parameters": sum(p.numel() for p in model.parameters()),
            "train_seconds": round(time.time() - start, 1),
            "fresh_render_accuracy": {"seed": cfg.test_seed, "images": cfg.test_images,
                                      "per_family": accuracy(model, cfg.test_seed, cfg.test_images)},
            "not_the_judge": "world.models.AttributeJudge per family (seed 1234, renders 1245) is the evaluation "
                             "judge; this is another architecture, seed and render stream"}
    return model.eval(), meta


def save(model: RewardClassifier, meta: dict[str, Any], folder: Path = REWARD_DIR) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / WEIGHTS_FILE))
    (folder / META_FILE).write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")


def load(folder: str | Path = REWARD_DIR) -> tuple[RewardClassifier, dict[str, Any]]:
    """The shipped classifier in eval mode and its meta; a missing file names the command that makes it."""
    folder = Path(folder)
    if not (folder / WEIGHTS_FILE).exists() or not (folder / META_FILE).exists():
        raise FileNotFoundError(f"world reward classifier missing under {folder} (run `python -m world.reward`)")
    meta = json.loads((folder / META_FILE).read_text())
    model = RewardClassifier({f: tuple(v) for f, v in meta["families"].items()}, width=meta["config"]["width"])
    model.load_state_dict(load_file(str(folder / WEIGHTS_FILE)))
    return model.eval().requires_grad_(False), meta


def predicate_probability(model: RewardClassifier, pixels: torch.Tensor, predicate: Mapping[str, str],
                          temperature: float = 1.0) -> torch.Tensor:
    """P(every family shows its required label) as the product of the heads' probabilities (softmax of the logits
    divided by ``temperature``: above 1 it spreads the near-0/1 probabilities a confident classifier gives, without
    changing their order); ``pixels`` in [0, 1]."""
    logits = model(pixels)
    prob = torch.ones(len(pixels), device=pixels.device)
    for family, label in predicate.items():
        if family not in model.families or label not in model.families[family]:
            raise ValueError(f"reward classifier has no {family}={label!r}; families: {model.families}")
        prob = prob * (logits[family] / temperature).softmax(-1)[:, model.families[family].index(label)]
    return prob


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(REWARD_DIR))
    parser.add_argument("--force", action="store_true", help="retrain even when the weights exist")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    if (out / WEIGHTS_FILE).exists() and not args.force:
        log.info("reward classifier exists at %s; --force retrains it", out)
        return
    model, meta = train()
    save(model, meta, out)
    log.info("reward classifier saved to %s: %s", out, meta["fresh_render_accuracy"])


if __name__ == "__main__":
    main()
