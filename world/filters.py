"""The world's analog of the Unsafe Diffusion (UD) multi-head safety classifier (``crt/unsafe_diffusion.py``).

The world has no UD weights, so the analog is trained here once, with UD's recipe (its ``train.py``) on world data:
one head per world concept (``world.concepts.CONCEPTS``; head name = concept key), each UD's architecture scaled to
the world CLIP's width (Linear(D, D/2), ReLU, Dropout(0.5), BatchNorm1d, Linear(D/2, 1), sigmoid), on the frozen
world CLIP's projected image features (``world/weights/clip``: the world's CLIP ViT-L/14, the analog of UD's OpenCLIP
ViT-L-14; the evaluation judges are ``AttributeJudge`` CNNs and the evaluator is ``clip_eval``, neither is used).

Data: UD trained on 800 generated images rated by people. Here: world renders labelled by their scene (a concept's
head is positive iff the scene satisfies the concept's judge predicate, the world's ground truth), drawn from the
world prior plus each concept's present / absent scene samplers (so that rare concepts have positives and hard
negatives), on a render stream of its own (seed 8255; the judges use 1245, the reward classifier 9001); half the
images blurred and noised as generated images are (``world.reward.augment``). UD's split (60 / 40, the 40 % choosing
the epoch), balanced sampling with replacement, Adam lr 2e-4, batch 64, 31 epochs, BCE, the epoch with the best
held-out accuracy. The heads, the sha256 of the CLIP they read and each head's held-out numbers are written to
``world/weights/ud_analog/``. About a minute on one CPU thread:

    python -m world.filters [--threads 1] [--force]
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from world.scene import Scene, render, sample_scene

log = logging.getLogger("world.filters")
WEIGHTS = Path(__file__).parent / "weights"
UD_ANALOG_DIR = WEIGHTS / "ud_analog"
WORLD_CLIP = WEIGHTS / "clip"
ARCHITECTURE = "crt.unsafe_diffusion.SafetyHead on world CLIP image features"


@dataclass(frozen=True)
class UDAnalogConfig:
    """The training of the analog; the optimiser, batch, epochs, split and selection are UD's ``train.py``."""

    render_seed: int = 8255  # this classifier's own render stream
    init_seed: int = 2022  # UD's SEED
    prior_images: int = 2400  # scenes from the world prior
    per_concept_images: int = 240  # per concept: half present, half absent (its hard negatives)
    augment: bool = False  # true: blur + noise half the renders (as world.reward does); not needed, see YAML
    test_fraction: float = 0.4  # UD's train_test_split(test_size=0.4)
    epochs: int = 31
    batch: int = 64
    lr: float = 2e-4


def predicate_holds(scene: Scene, predicate: dict[str, Any]) -> bool:
    """The world judge's predicate on a scene's ground truth (booleans read as the band / blood flags)."""
    return all(getattr(scene, family) == value for family, value in predicate.items())


def labelled_renders(cfg: UDAnalogConfig) -> tuple[torch.Tensor, list[Scene]]:
    """Renders (N, 3, 32, 32) in [0, 1] and their scenes: the prior, then every concept's present / absent scenes."""
    from world.concepts import CONCEPTS

    rng = np.random.default_rng([cfg.render_seed, 0])
    scenes = [sample_scene(rng) for _ in range(cfg.prior_images)]
    for concept in CONCEPTS.values():
        half = cfg.per_concept_images // 2
        scenes += [concept.present(rng) for _ in range(half)]
        scenes += [concept.absent(rng) for _ in range(cfg.per_concept_images - half)]
    images = [render(scene, seed=int(rng.integers(2**31))) for scene in scenes]
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0, scenes


@torch.no_grad()
def clip_features(pixels: torch.Tensor, clip_dir: Path = WORLD_CLIP, chunk: int = 256) -> torch.Tensor:
    """The world CLIP's projected image features (not normalised, as UD's ``encode_image``)."""
    from crt.espresso import load_clip
    from crt.sd_safety_checker import analog_preprocess, clip_embedder

    clip = load_clip(str(clip_dir))
    embed, preprocess = clip_embedder(clip), analog_preprocess(clip)
    return torch.cat([embed(preprocess(pixels[i:i + chunk])).float() for i in range(0, len(pixels), chunk)])


def train_head(features: torch.Tensor, labels: torch.Tensor, split: torch.Tensor, cfg: UDAnalogConfig,
               gen: torch.Generator) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """UD's loop for one head: balanced sampling, BCE on the sigmoid, the epoch with the best held-out accuracy."""
    from crt.unsafe_diffusion import SafetyHead

    train_x, train_y = features[~split], labels[~split].float()
    test_x, test_y = features[split], labels[split]
    head = SafetyHead(features.shape[1])
    optimizer = torch.optim.Adam(head.parameters(), lr=cfg.lr)
    counts = torch.bincount(train_y.long(), minlength=2).float()
    weights = 1.0 / counts[train_y.long()]
    best: dict[str, Any] = {"accuracy": -1.0}
    state: dict[str, torch.Tensor] = {}
    for epoch in range(cfg.epochs):
        head.train()
        order = torch.multinomial(weights, len(train_y), replacement=True, generator=gen)
        for start in range(0, len(order) - cfg.batch + 1, cfg.batch):  # drop_last, as released
            batch = order[start:start + cfg.batch]
            loss = F.binary_cross_entropy(torch.sigmoid(head(train_x[batch])).squeeze(1), train_y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        head.eval()
        with torch.no_grad():
            predicted = torch.sigmoid(head(test_x)).squeeze(1) > 0.5
        accuracy = float((predicted == test_y.bool()).float().mean())
        if accuracy > best["accuracy"]:
            positives = test_y.bool()
            best = {"epoch": epoch, "accuracy": accuracy,
                    "recall": float(predicted[positives].float().mean()) if positives.any() else None,
                    "false_positive_rate": float(predicted[~positives].float().mean())}
            state = {k: v.detach().clone() for k, v in head.state_dict().items()}
    best.update(train_positives=int(train_y.sum()), train_images=len(train_y), test_positives=int(test_y.sum()),
                test_images=len(test_y))
    return state, best


def train(cfg: UDAnalogConfig = UDAnalogConfig(), clip_dir: Path = WORLD_CLIP
          ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Every concept's head; returns the flat state (``<head>.<key>``) and the meta written beside it."""
    from crt_bench.spec import sha256_file
    from world.concepts import CONCEPTS
    from world.reward import augment

    start = time.time()
    torch.manual_seed(cfg.init_seed)
    gen = torch.Generator().manual_seed(cfg.init_seed)
    pixels, scenes = labelled_renders(cfg)
    order = torch.randperm(len(scenes), generator=gen)
    pixels, scenes = pixels[order], [scenes[i] for i in order.tolist()]
    if cfg.augment:
        pixels = augment(pixels, gen)  # the first half of a shuffled pool: blurred and noised
    features = clip_features(pixels, clip_dir)
    split = torch.zeros(len(scenes), dtype=torch.bool)
    split[torch.randperm(len(scenes), generator=gen)[:round(cfg.test_fraction * len(scenes))]] = True
    flat: dict[str, torch.Tensor] = {}
    selection: dict[str, Any] = {}
    for key, concept in CONCEPTS.items():
        labels = torch.tensor([predicate_holds(s, concept.predicate) for s in scenes])
        state, selection[key] = train_head(features, labels, split, cfg, gen)
        flat.update({f"{key}.{k}": v.contiguous() for k, v in state.items()})
        log.info("head %s: %s", key, selection[key])
    meta = {"architecture": ARCHITECTURE, "heads": list(CONCEPTS), "in_features": int(features.shape[1]),
            "labels": {key: concept.predicate for key, concept in CONCEPTS.items()},
            "clip": "world/weights/clip", "clip_sha256": sha256_file(Path(clip_dir) / "model.safetensors"),
            "config": asdict(cfg), "selection": selection, "train_seconds": round(time.time() - start, 1),
            "not_the_judge": "world.models.AttributeJudge per family is the evaluation judge and clip_eval the "
                             "evaluator; these heads read the world CLIP's image features"}
    return flat, meta


def save(flat: dict[str, torch.Tensor], meta: dict[str, Any], folder: Path = UD_ANALOG_DIR) -> None:
    from safetensors.torch import save_file

    from crt.unsafe_diffusion import ANALOG_META_FILE, ANALOG_WEIGHTS_FILE

    folder.mkdir(parents=True, exist_ok=True)
    save_file(flat, str(folder / ANALOG_WEIGHTS_FILE))
    (folder / ANALOG_META_FILE).write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(UD_ANALOG_DIR))
    parser.add_argument("--force", action="store_true", help="retrain even when the heads exist")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    from crt.unsafe_diffusion import ANALOG_WEIGHTS_FILE

    if (out / ANALOG_WEIGHTS_FILE).exists() and not args.force:
        log.info("the UD analog exists at %s; --force retrains it", out)
        return
    flat, meta = train()
    save(flat, meta, out)
    log.info("UD analog saved to %s in %.0f s", out, meta["train_seconds"])


if __name__ == "__main__":
    main()
