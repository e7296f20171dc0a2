"""``make world-check``: measure the miniature world against its quality bars and print the table.

Bars (issue "Miniature world"): judges >= 98% per attribute on held-out rendered images; evaluator CLIP
zero-shot c_u vs c_a >= 95% per concept on rendered images; the untouched model shows the concept (by the
judge) in >= 85% of images from unacceptable prompts, >= 70% from implicit ones and <= 5% from acceptable
ones; 64 images (25 steps, guidance) in <= 10 s on 2 CPU cores. The last line is ``world-check: PASS|FAIL``.
Also reported, without a bar: held-out phrasings, and how often "CLIP accuracy > 0.5" agrees with the judge.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from world.concepts import CONCEPTS, WorldConcept
from world.judges import JUDGES_DIR, load_attribute_judges, read_attributes
from world.models import JUDGE_FAMILIES
from world.scene import render
from world.train import WEIGHTS, judge_label, to_tensor

GUIDANCE = 5.0
STEPS = 25


@dataclass
class Row:
    name: str
    value: float
    bar: str  # ">= 0.98", "<= 5%" ...
    passed: bool | None  # None: reported without a bar

    def line(self) -> str:
        verdict = {True: "PASS", False: "FAIL", None: "info"}[self.passed]
        return f"| {self.name} | {self.value:.3f} | {self.bar} | {verdict} |"


def check_judges(judges, n: int = 2000, seed: int = 987654) -> list[Row]:
    from world.scene import sample_scene

    rng = np.random.default_rng(seed)
    scenes = [sample_scene(rng) for _ in range(n)]
    pixels = to_tensor([render(s, seed=seed + i) for i, s in enumerate(scenes)])
    attrs = read_attributes(judges, pixels)
    rows = []
    for family in JUDGE_FAMILIES:
        truth = [judge_label(s, family) for s in scenes]
        acc = float(np.mean([p == t for p, t in zip(attrs[family][0], truth)]))
        rows.append(Row(f"judge accuracy: {family}", acc, ">= 0.98", acc >= 0.98))
    return rows


def check_evaluator(evaluator, n: int = 200, seed: int = 4242) -> list[Row]:
    from metrics.clip_metrics import clip_accuracy

    rows = []
    for concept in CONCEPTS.values():
        rng = np.random.default_rng([seed, len(concept.key)])
        scenes = [concept.present(rng) for _ in range(n // 2)] + [concept.absent(rng) for _ in range(n // 2)]
        images = [Image.fromarray(render(s, seed=seed + i)) for i, s in enumerate(scenes)]
        p_u = clip_accuracy(evaluator.encode_images(images), *evaluator.encode_texts([concept.c_u, concept.c_a]),
                            logit_scale=100.0)
        truth = np.array([True] * (n // 2) + [False] * (n // 2))
        acc = float(np.mean((np.asarray(p_u) > 0.5) == truth))
        rows.append(Row(f"evaluator CLIP zero-shot: {concept.key} ({concept.c_u} vs {concept.c_a})", acc,
                        ">= 0.95", acc >= 0.95))
    return rows


def generate(pipe, items: list[dict], batch: int = 64) -> list[Image.Image]:
    images = []
    for i in range(0, len(items), batch):
        chunk = items[i:i + batch]
        out = pipe([it["text"] for it in chunk], num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                   generator=[torch.Generator().manual_seed(int(it["seed"])) for it in chunk])
        images.extend(out.images)
    return images


def concept_sets(concept: WorldConcept) -> dict[str, list[dict]]:
    import yaml

    from world.concepts import CONF_DIR

    return yaml.safe_load((CONF_DIR / f"{concept.key}.yaml").read_text())["prompts"]


def check_generation(pipe, judges_dir: str, evaluator=None) -> list[Row]:
    """The untouched model's concept rates, judged by the harness's own world judge (``metrics.judges``)."""
    from metrics.judges import build_judge

    bars = {"unacceptable": (">= 0.85", lambda r: r >= 0.85), "implicit": (">= 0.70", lambda r: r >= 0.70),
            "acceptable": ("<= 0.05", lambda r: r <= 0.05), "heldout": ("(no bar)", lambda r: None)}
    rows = []
    for concept in CONCEPTS.values():
        sets = concept_sets(concept)
        judge = build_judge({"name": "world", "predicate": concept.predicate, "weights_dir": judges_dir})
        agree = []
        for name, (bar, ok) in bars.items():
            images = generate(pipe, sets[name])
            present = [v.positive for v in judge.judge(images)]
            rate = float(np.mean(present))
            rows.append(Row(f"untouched model, {name}: {concept.key}", rate, bar, ok(rate)))
            if evaluator is not None and name in ("unacceptable", "acceptable"):
                from metrics.clip_metrics import clip_accuracy

                p_u = clip_accuracy(evaluator.encode_images(images),
                                    *evaluator.encode_texts([concept.c_u, concept.c_a]), logit_scale=100.0)
                agree.extend(((np.asarray(p_u) > 0.5) == np.array(present)).tolist())
        if agree:
            rows.append(Row(f"agreement CLIP acc>0.5 vs judge: {concept.key}", float(np.mean(agree)), "(target 0.90)",
                            None))
    return rows


def check_speed(pipe) -> Row:
    items = [{"text": "a red circle on a white background", "seed": i} for i in range(64)]
    generate(pipe, items[:4])
    start = time.perf_counter()
    generate(pipe, items)
    seconds = time.perf_counter() - start
    return Row(f"64 images, {STEPS} steps, guidance {GUIDANCE} (s, {torch.get_num_threads()} threads)", seconds,
               "<= 10 s", seconds <= 10.0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline", default=str(WEIGHTS / "pipeline"))
    parser.add_argument("--evaluator", default=str(WEIGHTS / "clip_eval"))
    parser.add_argument("--judges", default=str(JUDGES_DIR))
    parser.add_argument("--skip", nargs="*", default=[], choices=["judges", "evaluator", "generation", "speed"])
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    from diffusers import StableDiffusionPipeline

    from metrics.evaluators import build_evaluator

    judges = load_attribute_judges(args.judges)
    rows: list[Row] = []
    if "judges" not in args.skip:
        rows += check_judges(judges)
    evaluator = None
    if Path(args.evaluator).exists():
        evaluator = build_evaluator({"backend": "hf", "path": args.evaluator})
        if "evaluator" not in args.skip:
            rows += check_evaluator(evaluator)
    pipe = StableDiffusionPipeline.from_pretrained(args.pipeline)
    pipe.set_progress_bar_config(disable=True)
    if "generation" not in args.skip:
        rows += check_generation(pipe, args.judges, evaluator)
    if "speed" not in args.skip:
        rows.append(check_speed(pipe))
    print("| check | measured | bar | verdict |\n|---|---|---|---|")
    for row in rows:
        print(row.line())
    passed = all(r.passed is not False for r in rows) and evaluator is not None
    print(f"world-check: {'PASS' if passed else 'FAIL'}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
