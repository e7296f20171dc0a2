"""``make bench``: how fast the harness is against what its users would do instead, on the miniature world.

Why: "the harness is fast" means nothing without the alternative it replaces. Each ratio below pairs the harness
with that alternative in the same process run, back to back (same machine state), at equal settings, and says what
it measured; results/bench.md keeps the table with the machine it ran on.

- generation: ``ImageMaker`` (seeded batches written to the store) against one raw diffusers pipeline call per batch;
- evaluation: one ``python run.py`` process evaluating N prompts (generation, judge, CLIP, metrics, results) against
  one Python process per prompt that loads the pipeline and generates one image (UnlearnDiffAtk's scripts);
- warm rerun: the default run again from a full store against the same run on an empty one;
- Ring-A-Bell: each generation's new candidates scored in one forward (memoised) against one candidate per forward;
- UnlearnDiffAtk: ``target_batch`` targets optimised together against one at a time;
- the full world leaderboard's wall time, summed from the committed results (not measured here).

Everything runs in a temporary store; ``--quick`` checks the bench itself in seconds (tiny sizes, 2 sampling steps).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from attacks.base import AttackContext
from attacks.ringabell import Fitness, RingABell
from crt.base import DefendedModel
from runners import registry
from runners.generate import ImageMaker, ImageRequest, base_system
from runners.models import PipelineCache
from runners.spec import Access, PromptItem
from runners.stages import EVALUATED_SETS, Run, ensure_judge, prepare, stage_prompts
from runners.store import Store, key_of

ROOT = Path(__file__).resolve().parents[1]

# What UnlearnDiffAtk's generation scripts do for every prompt, in a process of its own.
ONE_PROMPT_SCRIPT = """
import sys
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
folder, text, seed, steps, guidance, height, width, out = sys.argv[1:9]
pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
pipe.set_progress_bar_config(disable=True)
image = pipe(text, num_inference_steps=int(steps), guidance_scale=float(guidance), height=int(height),
             width=int(width), generator=torch.Generator("cpu").manual_seed(int(seed))).images[0]
image.save(out)
"""


@dataclass(frozen=True)
class Sizes:
    """How much each measurement does; every field is a command-line option."""

    prompts: int = 64  # generation: images per measurement (one batch of the world's 64)
    repeats: int = 3  # generation: paired repeats, the fastest of each side is kept
    per_set: int = 8  # evaluation: prompts per evaluated set (3 sets, so 3x as many processes in the baseline)
    targets: int = 4  # warm rerun: attack targets of the default run (32 in `make run`)
    generations: int = 50  # Ring-A-Bell: generations of one target's search (100 in the default run)
    uda_targets: int = 4  # UnlearnDiffAtk: targets, searched with the default run's world schedule
    threads: int = 1  # torch threads here and in every process started
    quick: bool = False  # 2 sampling steps, tiny fits and searches: checks the bench, not the speed


QUICK = Sizes(prompts=4, repeats=1, per_set=1, targets=1, generations=2, uda_targets=2, quick=True)
QUICK_OVERRIDES = ("model.generation.steps=2", "metric.bootstrap.n_boot=20")
QUICK_DEFAULT_RUN = ("crt.mini.epochs=1", "crt.mini.patience=null", "attack.mini.population=8",
                     "attack.mini.generations=2")


@dataclass
class Ratio:
    """One paired measurement: the alternative's time over the harness's (above 1: the harness is faster)."""

    name: str
    setting: str
    baseline: str
    baseline_s: float
    harness_s: float
    target: float | None = None
    note: str = ""

    @property
    def value(self) -> float:
        return self.baseline_s / self.harness_s if self.harness_s > 0 else math.inf

    @property
    def verdict(self) -> str:
        if self.target is None:
            return "no target"
        return "meets" if self.value >= self.target else "misses"


@dataclass
class Machine:
    """Where the numbers were taken: what a reader needs to compare them with their own."""

    cpu: str
    cores: int
    threads: int
    torch: str
    diffusers: str
    python: str
    load_average: tuple[float, float, float]
    note: str = ""

    @classmethod
    def describe(cls, threads: int, note: str = "") -> Machine:
        import diffusers

        return cls(cpu=cpu_model(), cores=os.cpu_count() or 1, threads=threads, torch=torch.__version__,
                   diffusers=diffusers.__version__, python=platform.python_version(),
                   load_average=tuple(round(x, 2) for x in os.getloadavg()), note=note)


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, else what ``platform`` knows."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def say(what: str) -> None:
    """Where a bench of minutes is: on stderr, so that stdout is the table."""
    print(f"bench: {what}", file=sys.stderr, flush=True)


def timed(work: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    result = work()
    return time.perf_counter() - start, result


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """A run's summary and logs are not the bench's output."""
    with contextlib.redirect_stdout(io.StringIO()):
        yield


# -- configs -------------------------------------------------------------------------------------------------------


def overrides_for(sizes: Sizes, folder: Path, *extra: str) -> list[str]:
    """Hydra overrides that put a run's store, results and downloads under ``folder`` (never the project's store)."""
    return [*extra, f"store.root={folder / 'store'}", f"results.dir={folder / 'results'}",
            f"data.downloads={folder / 'downloads'}", "progress=false", "skip_committed=false",
            f"threads={sizes.threads}", *(QUICK_OVERRIDES if sizes.quick else ())]


def world_config(overrides: list[str]) -> dict[str, Any]:
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    return OmegaConf.to_container(cfg, resolve=True)


def world_run(sizes: Sizes, folder: Path, pipelines: PipelineCache, *extra: str) -> Run:
    """A prepared run of the world (its prompts made), for the measurements that call plug-ins directly."""
    run = prepare(world_config(overrides_for(sizes, folder, *extra)), ROOT, pipelines)
    stage_prompts(run)
    return run


def evaluated_items(run: Run) -> list[PromptItem]:
    """The prompts a run evaluates: its unacceptable, implicit and acceptable sets."""
    return [item for name in EVALUATED_SETS for item in run.concept.prompts.get(name, ())]


# -- generation ----------------------------------------------------------------------------------------------------


def raw_generate(pipe: Any, items: list[PromptItem], maker: ImageMaker) -> list[Any]:
    """What a user writes with diffusers alone: one pipeline call per batch, one seeded generator per image."""
    s = maker.settings
    images: list[Any] = []
    for start in range(0, len(items), s.batch_size):
        chunk = items[start:start + s.batch_size]
        kwargs: dict[str, Any] = dict(prompt=[i.text for i in chunk], num_inference_steps=s.steps,
                                      guidance_scale=s.guidance, height=s.height, width=s.width, output_type="pil",
                                      generator=[torch.Generator("cpu").manual_seed(i.seed) for i in chunk])
        if s.negative_prompt:
            kwargs["negative_prompt"] = [s.negative_prompt] * len(chunk)
        with torch.no_grad():
            images += pipe(**kwargs).images
    return images


def measure_generation(run: Run, sizes: Sizes, folder: Path) -> Ratio:
    """``repeats`` paired timings, the fastest of each side kept (the least disturbed by other work on the machine);
    each harness repeat writes into an empty store of its own."""
    texts = [item.text for item in evaluated_items(run)]
    items = [PromptItem(texts[i % len(texts)], seed=i) for i in range(sizes.prompts)]
    pipe = run.model.pipe
    pipe.set_progress_bar_config(disable=True)
    raw_generate(pipe, items[:2], run.maker)  # first-call costs are neither side's
    raw_times, harness_times, same = [], [], True
    for repeat in range(sizes.repeats):  # alternating which side goes first; the fastest of each is kept
        maker = ImageMaker(Store(folder / f"generation{repeat}"), run.model, run.settings, progress=False)
        sides = [lambda: raw_generate(pipe, items, run.maker),
                 lambda maker=maker: maker.make(base_system(run.model), [ImageRequest(i) for i in items])]
        first, second = (0, 1) if repeat % 2 == 0 else (1, 0)
        timings = {first: timed(sides[first]), second: timed(sides[second])}
        (raw_s, raw_images), (harness_s, records) = timings[0], timings[1]
        same &= all(np.array_equal(np.asarray(image), np.asarray(maker.load(record.key)))
                    for image, record in zip(raw_images, records))
        raw_times.append(raw_s)
        harness_times.append(harness_s)
    s = run.settings
    return Ratio("generation", f"{sizes.prompts} images, batch {s.batch_size}, DDIM {s.steps} steps, CFG {s.guidance}, "
                 f"{s.height}x{s.width}; fastest of {sizes.repeats}, alternating",
                 "raw diffusers pipeline call", min(raw_times), min(harness_times), 0.95,
                 f"harness writes every PNG to the store; same pixels as the raw call: {'yes' if same else 'NO'}")


# -- evaluation ----------------------------------------------------------------------------------------------------


def one_process_per_prompt(run: Run, items: list[PromptItem], sizes: Sizes, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    s, env = run.settings, {**os.environ, "OMP_NUM_THREADS": str(sizes.threads)}
    for i, item in enumerate(items):
        guidance = run.maker.guidance(ImageRequest(item))
        args = [str(run.model.location.folder), item.text, str(item.seed), str(s.steps), str(guidance),
                str(s.height), str(s.width), str(folder / f"{i}.png")]
        subprocess.run([sys.executable, "-c", ONE_PROMPT_SCRIPT, *args], cwd=ROOT, env=env, check=True,
                       capture_output=True)


def pixel_differences(run: Run, items: list[PromptItem], folder: Path, store: Store) -> list[int]:
    """Per prompt, the largest difference (of 255) between the per-prompt process's PNG and the harness's stored
    image: 0 everywhere when the settings were equal, but a batch of one and the harness's batches can round the
    UNet's convolutions differently, so an image may differ by a level in a few pixels."""
    from PIL import Image

    maker = ImageMaker(store, run.model, run.settings, progress=False)
    system = base_system(run.model)
    differences = []
    for i, item in enumerate(items):
        with Image.open(folder / f"{i}.png") as image:
            theirs = np.asarray(image.convert("RGB"), dtype=np.int16)
        ours = np.asarray(maker.load(key_of(maker.image_spec(system, ImageRequest(item)))), dtype=np.int16)
        differences.append(int(np.abs(theirs - ours).max()))
    return differences


def pixels_note(differences: list[int]) -> str:
    differing = sum(d > 0 for d in differences)
    if not differing:
        return "same pixels: yes"
    return (f"same pixels but in {differing} of {len(differences)} images, by at most {max(differences)}/255 (a batch "
            f"of one rounds the UNet's convolutions differently from the harness's batch)")


def harness_process(sizes: Sizes, folder: Path, extra: list[str]) -> dict[str, Any]:
    """``python run.py`` as a user starts it; returns its results document."""
    overrides = overrides_for(sizes, folder, *extra, f"hydra.run.dir={folder / 'outputs'}")
    env = {**os.environ, "OMP_NUM_THREADS": str(sizes.threads)}
    done = subprocess.run([sys.executable, "run.py", *overrides], cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"run.py failed ({done.returncode}): {done.stderr[-2000:]}")
    [results] = (folder / "results" / "runs").glob("*.json")
    return json.loads(results.read_text())


def measure_evaluation(sizes: Sizes, folder: Path, pipelines: PipelineCache) -> Ratio:
    extra = ["crt=none", "attack=none", f"model.max_prompts_per_set={sizes.per_set}"]
    run = world_run(sizes, folder / "prompts", pipelines, *extra)
    items = evaluated_items(run)
    baseline_s, _ = timed(lambda: one_process_per_prompt(run, items, sizes, folder / "per_prompt"))
    harness_s, doc = timed(lambda: harness_process(sizes, folder / "harness", extra))
    made = doc["counters"]["images_generated"]
    differences = pixel_differences(run, items, folder / "per_prompt", Store(folder / "harness" / "store"))
    return Ratio("evaluation", f"{len(items)} prompts ({sizes.per_set} a set x {len(EVALUATED_SETS)} sets), crt=none "
                 f"attack=none, {sizes.threads} thread(s)", f"{len(items)} processes, one per prompt",
                 baseline_s, harness_s, 10.0,
                 f"harness: one `python run.py` process ({made} images generated, judged and embedded, metrics with "
                 f"intervals, results written); baseline: load + generate only, so the ratio is a lower bound; "
                 f"{pixels_note(differences)}")


# -- warm rerun ----------------------------------------------------------------------------------------------------


def measure_warm_rerun(sizes: Sizes, folder: Path) -> tuple[Ratio, dict[str, float]]:
    """The default run (Espresso x Ring-A-Bell on world_nudity) cold, then again; both in this process, each with
    a fresh pipeline cache, so the cold one loads the model and the warm one needs none."""
    from run import execute

    quick = QUICK_DEFAULT_RUN if sizes.quick else ()
    cfg = world_config(overrides_for(sizes, folder, f"model.max_attack_targets={sizes.targets}", *quick))
    with quiet():
        cold_s, cold = timed(lambda: execute(json.loads(json.dumps(cfg)), ROOT, PipelineCache()))
        warm_s, warm = timed(lambda: execute(json.loads(json.dumps(cfg)), ROOT, PipelineCache()))
    counters = warm["counters"]
    if counters.images_generated or counters.scores_computed:
        raise RuntimeError(f"the warm rerun computed something: {counters.line()}")
    ratio = Ratio("warm rerun", f"default run (espresso x ringabell, world_nudity) with {sizes.targets} attack "
                  f"target(s), {sizes.threads} thread(s); cold = empty store", "cold run", cold_s, warm_s, 50.0,
                  f"warm: {counters.line()}; in-process, Python start-up (a few seconds) excluded from both")
    return ratio, dict(cold["timings"])


def default_run_estimate(timings: dict[str, float], targets: int, full_targets: int) -> float:
    """The cold default run with ``full_targets`` attacked, from one with ``targets``: the attack stage scaled per
    target, every other stage as measured (generation of the extra adversarial images is left out: seconds)."""
    attack = timings.get("attack", 0.0)
    return sum(timings.values()) + attack / max(targets, 1) * (full_targets - targets)


# -- attacks -------------------------------------------------------------------------------------------------------


class OneCandidateRingABell(RingABell):
    """Ring-A-Bell as the official notebooks score it: one candidate per text-encoder forward, none remembered."""

    def scorer(self, text_encoder: Any, goal: torch.Tensor) -> Fitness:
        return Fitness(text_encoder, goal, batch=1, memo=False)


class UnmemoisedRingABell(RingABell):
    """The whole population in one forward every generation, scored again even when seen before."""

    def scorer(self, text_encoder: Any, goal: torch.Tensor) -> Fitness:
        return Fitness(text_encoder, goal, memo=False)


def measure_ringabell(run: Run, sizes: Sizes) -> list[Ratio]:
    attack = registry.build_attack(run.cfg["attack"], "mini", run.cfg["concept"])
    params = {**attack.params, "generations": sizes.generations}
    pipe = run.model.pipe
    ctx = AttackContext(defended=DefendedModel(pipe=pipe), concept=run.concept, settings=run.settings,
                        text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, seed=run.seed)
    target = run.concept.prompt_set(attack.target_set)[:1]
    searched = {}
    for kind in (RingABell, OneCandidateRingABell, UnmemoisedRingABell):
        searched[kind] = timed(lambda kind=kind: kind(**params).run(ctx, target)[0])
    (harness_s, found), (single_s, single), (batch_s, batched) = searched.values()
    same = found.text == single.text == batched.text
    setting = f"1 target, population {params['population']}, {sizes.generations} generations, {sizes.threads} thread(s)"
    return [Ratio("ringabell", setting, "one candidate per forward", single_s, harness_s, 20.0,
                  f"as the harness runs it (each generation's new candidates in one forward, memoised); same prompt: "
                  f"{'yes' if same else 'NO'}"),
            Ratio("ringabell, batching alone", setting, "one candidate per forward", single_s, batch_s, None,
                  "the whole population in one forward, nothing memoised")]


def measure_unlearndiffatk(run: Run, sizes: Sizes, folder: Path) -> Ratio:
    cfg = world_config(overrides_for(sizes, folder, "crt=none", "attack=unlearndiffatk"))
    if sizes.quick:
        cfg["attack"]["mini"].update(iterations=1, t_step=500)
    attack = registry.build_attack(cfg["attack"], "mini", cfg["concept"])
    attack_cls, params = type(attack), attack.params
    targets = list(run.concept.prompt_set("unacceptable")[:sizes.uda_targets])
    pipe, judge = run.model.pipe, ensure_judge(run)
    references = run.maker.sample_unstored(pipe, [ImageRequest(t) for t in targets], "")

    def generate(model: DefendedModel, items: list[PromptItem]) -> list[Any]:
        return run.maker.sample_unstored(model.pipe, [ImageRequest(item) for item in items], "")

    def never_yet(images: list[Any]) -> list[bool]:
        """The judge is asked, its verdict ignored: every target runs the whole schedule, as against a CRT that
        holds (the undefended model would stop most searches at the first block)."""
        return [False for _ in judge.judge(images)]

    ctx = AttackContext(defended=DefendedModel(pipe=pipe, exposes=frozenset(Access)), concept=run.concept,
                        settings=run.settings, oracle=never_yet, generate=generate,
                        reference_images=lambda items: references[:len(items)], seed=run.seed)
    single_s, single = timed(lambda: attack_cls(**params).run(ctx, targets))
    batched_s, batched = timed(lambda: attack_cls(**params, target_batch=len(targets)).run(ctx, targets))
    same = sum(a.text == b.text for a, b in zip(single, batched))
    blocks = sum(a.log["timesteps_run"] for a in single)
    schedule = f"t {params['t_start']}..{params['t_stop']} step {params['t_step']}"
    return Ratio("unlearndiffatk", f"{len(targets)} targets, k {params['k']}, {params['iterations']} steps per "
                 f"timestep, {schedule}, no early stop, {sizes.threads} thread(s)", "one target at a time",
                 single_s, batched_s, None,
                 f"target_batch={len(targets)}, {blocks} judged blocks (the world judge is asked, its verdict "
                 f"ignored); same prompts: {same} of {len(targets)} (batching changes the UNet's last bits)")


# -- the committed leaderboard -------------------------------------------------------------------------------------


@dataclass
class LeaderboardTime:
    runs: int
    seconds: float
    by_stage: dict[str, float] = field(default_factory=dict)


def leaderboard_time(results: Path) -> LeaderboardTime:
    """The stage timings (``timings_s``) of every committed run, summed: the leaderboard's compute as it was made."""
    total = LeaderboardTime(0, 0.0)
    for path in sorted((results / "runs").glob("*.json")):
        timings = json.loads(path.read_text()).get("timings_s") or {}
        total.runs += 1
        for stage, seconds in timings.items():
            total.by_stage[stage] = total.by_stage.get(stage, 0.0) + float(seconds)
            total.seconds += float(seconds)
    return total


# -- the report ----------------------------------------------------------------------------------------------------


def duration(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.1f} min" if seconds >= 120 else f"{seconds:.2f} s"


def render(ratios: list[Ratio], machine: Machine, board: LeaderboardTime, estimate: float | None,
           sizes: Sizes, wall_s: float) -> str:
    lines = ["# `make bench`", "",
             f"Written by `python -m runners.bench` on {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC in "
             f"{duration(wall_s)}; "
             "every ratio is the alternative's time over the harness's, both measured back to back in that one "
             "process run on the miniature world, in a temporary store.", "",
             "| measurement | setting | compared with | alternative | harness | ratio | target | verdict |",
             "|---|---|---|---|---|---|---|---|"]
    for r in ratios:
        target = "-" if r.target is None else f">= {r.target:g}"
        lines.append(f"| {r.name} | {r.setting} | {r.baseline} | {duration(r.baseline_s)} | {duration(r.harness_s)} "
                     f"| {r.value:.2f}x | {target} | {r.verdict} |")
    lines += ["", "Notes:", ""] + [f"- {r.name}: {r.note}" for r in ratios if r.note]
    stages = ", ".join(f"{k} {duration(v)}" for k, v in sorted(board.by_stage.items(), key=lambda kv: -kv[1]))
    lines += ["", f"Full world leaderboard: {duration(board.seconds)} of stage time over {board.runs} committed runs "
              f"(results/runs/*.json `timings_s`, summed; not measured in this run: {stages})."]
    if estimate is not None:
        lines += ["", f"The default run (`make run`, 32 targets) cold, estimated from this run's cold stage timings "
                  f"with {sizes.targets} target(s), the attack stage scaled per target: {duration(estimate)} on "
                  f"{sizes.threads} thread(s), Python start-up excluded."]
    lines += ["", "Machine:", "",
              f"- CPU: {machine.cpu}, {machine.cores} cores (os.cpu_count), torch threads {machine.threads}",
              f"- torch {machine.torch}, diffusers {machine.diffusers}, Python {machine.python}",
              f"- load average at start (1, 5, 15 min): {', '.join(map(str, machine.load_average))}"]
    if machine.note:
        lines.append(f"- {machine.note}")
    lines += ["", f"Sizes: {json.dumps(asdict(sizes))}", ""]
    return "\n".join(lines)


def run_bench(sizes: Sizes, out: Path | None, note: str = "", results: Path = ROOT / "results") -> str:
    torch.set_num_threads(sizes.threads)
    machine = Machine.describe(sizes.threads, note)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="crt-bench-") as tmp:
        folder = Path(tmp)
        pipelines = PipelineCache()
        run = world_run(sizes, folder / "shared", pipelines)
        say("generation: harness against a raw pipeline call")
        ratios = [measure_generation(run, sizes, folder)]
        say("evaluation: one run.py process against one process per prompt")
        ratios.append(measure_evaluation(sizes, folder / "evaluation", pipelines))
        say("warm rerun: the default run cold, then again")
        warm, timings = measure_warm_rerun(sizes, folder / "default_run")
        ratios.append(warm)
        say("ringabell: batched and memoised, one candidate at a time, batched alone")
        ratios += measure_ringabell(run, sizes)
        say("unlearndiffatk: one target at a time, then batched")
        ratios.append(measure_unlearndiffatk(run, sizes, folder / "uda"))
    estimate = None if sizes.quick else default_run_estimate(timings, sizes.targets, 32)
    text = render(ratios, machine, leaderboard_time(results), estimate, sizes, time.perf_counter() - started)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
    return text


def parse(argv: list[str] | None = None) -> tuple[Sizes, Path | None, str]:
    parser = argparse.ArgumentParser(prog="python -m runners.bench", description=__doc__.split("\n\n")[0])
    defaults = Sizes()
    for name, value in asdict(defaults).items():
        if name != "quick":
            parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=None,
                                help=f"default {value} ({getattr(QUICK, name)} with --quick)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks the bench in seconds, not the speed")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "bench.md", help="the Markdown table")
    parser.add_argument("--no-out", action="store_true", help="print only")
    parser.add_argument("--note", default="", help="a line about the machine's state (e.g. other jobs running)")
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else defaults
    given = {name: getattr(args, name) for name in asdict(defaults) if name != "quick"}
    sizes = replace(sizes, **{k: v for k, v in given.items() if v is not None})
    return sizes, None if args.no_out else args.out, args.note


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    sizes, out, note = parse(argv)
    print(run_bench(sizes, out, note), flush=True)


if __name__ == "__main__":
    main()
