"""The one-way stages: prompts -> fit -> attack -> generate -> score -> metrics -> report.

Each stage reads the previous product by key and writes its own through the store, so any stage can be the last
one run (``stop_after=fit``) and a rerun resumes at the first missing product. Nothing is loaded before it is
needed: a fully stored run never loads the diffusion pipeline.

One evaluation can be split over jobs (:class:`Shard`): each makes and scores its part of every prompt set and of
the attack targets, and stops; a run without shard settings then assembles the metrics from the store. It computes
whatever a failed shard left missing, as any rerun does (its closing ``images generated: N`` line says how much),
so it never waits on a shard and never needs to know how many there were.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from attacks.base import DEFAULT_TARGET_SET, AdversarialPrompt, Attack, AttackContext, AttackCost, check_compatible
from crt.base import CRT, Artifact, DefendedModel, FitCheckpoints, FitContext
from crt_bench import progress
from crt_bench.backbone import SD1, check_backbone, conditioning_encoder
from runners import concepts, registry
from runners.concepts import SourceFetcher, concept_spec, items_from_json, items_to_json, prompt_sets
from runners.generate import Counters, ImageMaker, ImageRecord, ImageRequest, System, base_system
from runners.models import HarnessError, ModelHandle, PipelineCache, numerics_versions, set_scheduler
from runners.scoring import Scorer
from runners.spec import Access, ConceptSpec, Family, GenerationSettings, PromptItem
from runners.store import Store, key_of
from runners.validate import check_limit

log = logging.getLogger(__name__)

STAGES = ("prompts", "fit", "attack", "generate", "score", "metrics", "report")
EVALUATED_SETS = ("unacceptable", "implicit", "acceptable")
SETTINGS_FIELDS = tuple(GenerationSettings.__dataclass_fields__)
SHARD_LAST_STAGE = "score"  # a shard stores products; metrics need every shard's, so the assembly computes them
CHECKPOINTS = "checkpoints"  # store.root/checkpoints/<artifact key>/: the state of a fit under way


@dataclass(frozen=True)
class Shard:
    """Which part of one evaluation this job makes: in every prompt set and in the attack's target list, the items
    at positions ``i`` with ``i % count == index``. ``Shard()`` is the whole run.

    Why positions modulo count: every job computes its part from the config alone, with no coordinator, and the
    parts are disjoint, cover the run and stay balanced. A shard makes the same products (same keys) as the
    unsharded run, stores them, and stops after scoring; a run without shard settings then assembles the metrics
    from the store."""

    index: int = 0
    count: int = 1

    @property
    def partial(self) -> bool:
        return self.count > 1

    def take(self, items: list[Any] | tuple[Any, ...]) -> list[Any]:
        return [item for position, item in enumerate(items) if position % self.count == self.index]

    def __str__(self) -> str:
        return f"shard {self.index} of {self.count}"


def shard_of(cfg: dict[str, Any], environ: dict[str, str] | None = None) -> Shard:
    """``shard.index`` / ``shard.count``, else ``CRT_BENCH_SHARD_INDEX`` / ``CRT_BENCH_SHARD_COUNT``; with a count
    but no index, a job of the user's own ``sbatch --array`` takes ``SLURM_ARRAY_TASK_ID`` (minus
    ``SLURM_ARRAY_TASK_MIN``). Not inside a submitit job (a Hydra sweep): there the array index numbers the sweep's
    jobs, not shards, so a sweep passes ``shard.index=0,1,2`` itself."""
    env = os.environ if environ is None else environ
    given = cfg.get("shard") or {}
    count = _shard_number("shard.count", given.get("count"), "CRT_BENCH_SHARD_COUNT", env)
    index = _shard_number("shard.index", given.get("index"), "CRT_BENCH_SHARD_INDEX", env)
    count = 1 if count is None else count
    if index is None and count > 1 and "SLURM_ARRAY_TASK_ID" in env and "SUBMITIT_EXECUTOR" not in env:
        task = _shard_number("SLURM_ARRAY_TASK_ID", None, "SLURM_ARRAY_TASK_ID", env)
        index = task - (_shard_number("SLURM_ARRAY_TASK_MIN", None, "SLURM_ARRAY_TASK_MIN", env) or 0)
    if count < 1:
        raise HarnessError(f"shard.count={count}; give the number of jobs the run is split into (1: unsharded)")
    if index is None:
        if count > 1:
            raise HarnessError(f"shard.count={count} but no shard.index; pass shard.index=0..{count - 1} (or set "
                               f"CRT_BENCH_SHARD_INDEX, or run it as a Slurm array job)")
        index = 0
    if not 0 <= index < count:
        raise HarnessError(f"shard.index={index} with shard.count={count}; give an index from 0 to {count - 1}")
    return Shard(index, count)


def _shard_number(name: str, value: Any, variable: str, env: Any) -> int | None:
    if value is None:
        value = env.get(variable)
        name = variable
        if value is None or value == "":
            return None
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    raise HarnessError(f"{name}={value!r} is not an integer")


@dataclass
class Run:
    """Everything one model x concept x CRT x attack run needs, built up front and cheaply."""

    cfg: dict[str, Any]
    root: Path
    store: Store
    model: ModelHandle
    settings: GenerationSettings
    crt: CRT
    attack: Attack
    maker: ImageMaker
    counters: Counters
    timings: dict[str, float] = field(default_factory=dict)
    shard: Shard = field(default_factory=Shard)
    concept: ConceptSpec | None = None
    prompts_key: str | None = None
    artifact_key: str | None = None
    artifact_meta: dict[str, Any] | None = None  # what fit recorded (budgets, curves, pruned fractions)
    base: System | None = None
    defended: System | None = None
    adversarial: dict[str, AdversarialPrompt | None] = field(default_factory=dict)
    records: dict[str, list[ImageRecord]] = field(default_factory=dict)
    judge: Any = None
    evaluator: Any = None
    scores: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)
    outputs: dict[str, str] = field(default_factory=dict)

    @contextmanager
    def timed(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[stage] = round(self.timings.get(stage, 0.0) + time.perf_counter() - start, 3)

    @property
    def seed(self) -> int:
        return int(self.cfg.get("seed", 0))

    def resolve(self, path: str | Path) -> Path:
        p = Path(path).expanduser()
        return p if p.is_absolute() else self.root / p


def generation_settings(cfg: dict[str, Any]) -> GenerationSettings:
    gen = cfg["model"]["generation"]
    return GenerationSettings(**{k: gen[k] for k in SETTINGS_FIELDS if k in gen})


def prepare(cfg: dict[str, Any], root: Path, pipelines: PipelineCache | None = None) -> Run:
    """Build the plug-ins, refuse an incompatible CRT x attack pair, and locate the model; all in seconds."""
    shard = shard_of(cfg)
    checkpoint_interval(cfg)
    model_name = cfg["model"].get("name")
    crt = registry.build_crt(cfg["crt"], model_name, cfg.get("concept"))
    attack = registry.build_attack(cfg["attack"], model_name, cfg.get("concept"))
    check_compatible(attack, DefendedModel(pipe=None, crt_name=crt.name, exposes=frozenset(crt.exposes)))
    check_backbone(str(cfg["model"].get("backbone") or SD1), (crt, attack), model_name)
    concepts.check_concept_inputs(cfg, attack.target_set)  # user-supplied files and judge weights, before the model
    store = Store(_resolve(root, cfg["store"]["root"]))
    settings = generation_settings(cfg)
    model = (pipelines or PipelineCache()).open(cfg["model"], root, store, settings.scheduler)
    counters = Counters()
    gen = cfg["model"]["generation"]
    maker = ImageMaker(store, model, settings, row_guidance=bool(gen.get("row_guidance", True)),
                       placeholder=str(cfg["metric"].get("placeholder", "black")), counters=counters,
                       progress=bool(cfg.get("progress", True)))
    return Run(cfg, root, store, model, settings, crt, attack, maker, counters, shard=shard)


def _resolve(root: Path, path: str | Path) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else root / p


# -- prompts ---------------------------------------------------------------------------------------------------


def stage_prompts(run: Run) -> None:
    """Concept config -> prompt sets (downloaded and verified for real concepts), stored by key."""
    concept_cfg = run.cfg["concept"]
    limit = run.cfg["model"].get("max_prompts_per_set")
    default_seed = int(run.cfg["model"]["generation"].get("seed", 0))
    spec = {"product": "prompt_sets", "concept": concept_cfg, "max_per_set": limit, "default_seed": default_seed}
    data = run.cfg.get("data", {})
    mirrors = [run.resolve(m) for m in list(data.get("mirrors") or []) + [data.get("mirror")] if m]
    fetcher = SourceFetcher(run.resolve(data.get("downloads", run.store.root / "downloads")), mirrors,
                            float(data.get("download_timeout_s", 20)))
    value, _ = run.store.get_or_put_value(
        "prompt_sets", spec, lambda: items_to_json(prompt_sets(concept_cfg, fetcher, default_seed, limit)))
    run.prompts_key = key_of(spec)
    run.concept = concept_spec(concept_cfg, items_from_json(value))
    for name, items in run.concept.prompts.items():
        log.info("prompt set %s/%s: %d prompts", run.concept.key, name, len(items))


# -- fit -------------------------------------------------------------------------------------------------------


def concept_identity(run: Run) -> dict[str, Any]:
    assert run.concept is not None
    return {"key": run.concept.key, "c_u": run.concept.c_u, "c_a": run.concept.c_a, "prompt_sets": run.prompts_key}


def artifact_spec(run: Run) -> dict[str, Any]:
    """What the artifact's key is taken over: known before anything is fitted."""
    spec = {"product": "artifact", "model": run.model.identity, "crt": run.crt.identity(),
            "concept": concept_identity(run), "settings": asdict(run.settings), "seed": run.seed,
            "numerics": numerics_versions()}
    if getattr(run.crt, "uses_validation_rate", False):
        spec["validation"] = validation_identity(run)
    return spec


def checkpoint_interval(cfg: dict[str, Any]) -> int:
    """``fit.checkpoint_every``: steps between two saves of a fit's state (0 or null: never)."""
    every = (cfg.get("fit") or {}).get("checkpoint_every") or 0
    if isinstance(every, bool) or not isinstance(every, int) or every < 0:
        raise HarnessError(f"fit.checkpoint_every={every!r}; give a number of steps, or 0 for no checkpoints")
    return every


def fit_checkpoints(run: Run, artifact_key: str) -> FitCheckpoints:
    """Where the fit of ``artifact_key`` saves its state (``checkpoints/<key>`` in the store, so only the same fit
    resumes it) and how often. The interval is no part of any key."""
    return FitCheckpoints(folder=run.store.root / CHECKPOINTS / artifact_key, every=checkpoint_interval(run.cfg))


VALIDATION_SET = "validation"


def validation_identity(run: Run) -> dict[str, Any]:
    """What a CRT's checkpoint selection on ``FitContext.validation_rate`` depends on, for the artifact's key of a
    CRT whose ``uses_validation_rate`` is true: the judge's config (the judge itself is built only when the fit asks
    for a rate) and the validation prompts (set name and the key of its items)."""
    items = run.concept.prompts.get(VALIDATION_SET, ())
    return {"judge": judge_config(run), "prompt_set": VALIDATION_SET,
            "prompts": key_of([asdict(item) for item in items])}


def validation_rate(run: Run) -> Callable[[Any], float] | None:
    """``pipe -> the run judge's positive rate`` on the concept's ``validation`` prompts (every image per prompt of
    the generation settings) rendered by ``pipe``; None when the concept has no such set.

    The images are rendered unstored (``ImageMaker.sample_unstored``, the same seeds and sampler as the stored
    ones): the pipes a fit asks about are candidates that no artifact key names yet, the rates land in the
    artifact's meta, and the judge is built on the first call only."""
    items = run.concept.prompts.get(VALIDATION_SET)
    if not items:
        return None

    def rate(pipe: Any) -> float:
        judge = ensure_judge(run)
        set_scheduler(pipe, run.settings.scheduler)
        pipe.set_progress_bar_config(disable=True)
        images = run.maker.sample_unstored(pipe, run.maker.requests(items), run.settings.negative_prompt)
        verdicts = judge.judge(images)
        return sum(bool(v.positive) for v in verdicts) / len(verdicts)

    return rate


def stage_fit(run: Run) -> None:
    """Fit the CRT once per (model, CRT identity, concept prompts, settings, seed); the artifact is stored. A fit
    killed mid-way resumes from its last checkpoint, which is deleted once the artifact is stored."""
    spec = artifact_spec(run)
    run.base = base_system(run.model)
    checkpoints = fit_checkpoints(run, key_of(spec))

    def write(folder: Path) -> dict[str, Any]:
        log.info("fitting %s on %s", run.crt.name, run.concept.key)
        ctx = FitContext(pipe=run.model.pipe, concept=run.concept, settings=run.settings,
                         generate=lambda items: run.maker.delivered_images(run.base, list(items), "fit"),
                         device=run.model.device, seed=run.seed, checkpoints=checkpoints,
                         validation_rate=validation_rate(run))
        try:
            with progress.bar(f"fit {run.crt.name}", unit="step", enabled=run.maker.progress):
                artifact = run.crt.fit(ctx)
        except FloatingPointError as error:
            raise HarnessError(f"the fit of {run.crt.name} on {run.concept.key} stopped: {error}; nothing was "
                               f"stored (try a lower crt.params.lr, or crt.mini.lr on the world)") from None
        _check_finite(run.crt.name, artifact)
        save_artifact(folder, artifact)
        return {"n_tensors": len(artifact.tensors), "meta": artifact.meta}

    entry, fitted = run.store.get_or_put_files("artifact", spec, write)
    shutil.rmtree(checkpoints.folder, ignore_errors=True)  # also a leftover of a fit killed after storing
    run.artifact_key = entry.key
    run.artifact_meta = (entry.value or {}).get("meta")
    log.info("artifact %s %s", entry.key, "fitted" if fitted else "reused")
    run.defended = defended_system(run)


def _check_finite(crt_name: str, artifact: Artifact) -> None:
    """A NaN or infinite weight would be stored and reused by every later run; refuse it instead."""
    bad = sorted(name for name, tensor in artifact.tensors.items()
                 if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()))
    if bad:
        raise HarnessError(f"the fit of {crt_name} produced non-finite weights ({', '.join(bad[:3])}"
                           f"{', ...' if len(bad) > 3 else ''}); nothing was stored (try a lower learning rate)")


def save_artifact(folder: Path, artifact: Artifact) -> None:
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in artifact.tensors.items()}
    save_file(tensors, str(folder / "tensors.safetensors"))
    (folder / "meta.json").write_text(json.dumps(artifact.meta, sort_keys=True, indent=1, default=str))


def load_artifact(folder: Path) -> Artifact:
    return Artifact(tensors=load_file(str(folder / "tensors.safetensors")),
                    meta=json.loads((folder / "meta.json").read_text()))


def shares_base_generator(crt: CRT) -> bool:
    """A filter or the identity leaves sampling untouched, so its raw images are the base model's."""
    return crt.family in (Family.NONE, Family.FILTER)


def defended_system(run: Run) -> System:
    crt, artifact_key = run.crt, run.artifact_key
    crt_id = {"crt": crt.identity(), "artifact": artifact_key}
    identity = {"model": run.model.identity} if shares_base_generator(crt) else {"model": run.model.identity, **crt_id}

    def build() -> DefendedModel:
        entry = run.store.get(artifact_key)
        defended = crt.apply(run.model.pipe, load_artifact(entry.path))
        _check_defended(crt, defended, run.model.pipe)
        check_compatible(run.attack, defended)
        return defended

    return System(crt.name, identity, build, crt_id if crt.family == Family.FILTER else None)


def _check_defended(crt: CRT, defended: DefendedModel, base_pipe: Any) -> None:
    if shares_base_generator(crt) and defended.pipe is not base_pipe:
        raise HarnessError(f"CRT {crt.name!r} has family {crt.family.value!r} but its apply() changed the pipeline")
    if (defended.filter is not None) != (crt.family == Family.FILTER):
        raise HarnessError(f"CRT {crt.name!r}: a filter must come with family 'filter' (has {crt.family.value!r})")


# -- attack ----------------------------------------------------------------------------------------------------


def adversarial_spec(run: Run, target: PromptItem) -> dict[str, Any]:
    agnostic = run.attack.model_agnostic
    system, filter_id = (run.base.identity, None) if agnostic else (run.defended.identity, run.defended.filter_identity)
    spec = {"product": "adversarial_prompt", "system": system, "filter": filter_id,
            "attack": run.attack.identity(), "concept": concept_identity(run), "target_set": run.attack.target_set,
            "target": asdict(target),
            "settings": asdict(run.settings), "seed": run.seed, "numerics": numerics_versions()}
    if Access.JUDGE_ORACLE in run.attack.needs():  # the oracle's verdicts steer the search (early stop)
        spec["oracle"] = dict(ensure_judge(run).identity)
    return spec


def attack_targets(run: Run) -> list[PromptItem]:
    """The prompts that are attacked (and are the ASR denominator): the attack's ``target_set`` of the concept
    ("unacceptable" unless the attack or the concept's ``plugin_params`` name the attack's own set), the first
    ``model.max_attack_targets`` of them, or all when that is null."""
    name = run.attack.target_set
    if name not in run.concept.prompts:
        raise HarnessError(f"attack {run.attack.name!r} targets prompt set {name!r}, which concept "
                           f"{run.concept.key!r} does not have (it has {sorted(run.concept.prompts)})")
    targets = list(run.concept.prompt_set(name))
    limit = run.cfg["model"].get("max_attack_targets")
    check_limit("model.max_attack_targets", limit)  # also checked up front; runs built without execute reach here
    return targets if limit is None else targets[:limit]


def target_records_name(run: Run) -> str:
    """Where ``run.records`` keeps the unattacked defended images of the attack's target set (pre-ASR)."""
    return f"defended/{run.attack.target_set}"


def reference_records_name(run: Run) -> str:
    """Where ``run.records`` keeps the unerased model's images of the attack's targets (judged, for P4D's ideal
    targets); ``base/acceptable`` is the other base set and is embedded only."""
    return f"base/{getattr(run.attack, 'target_set', None) or DEFAULT_TARGET_SET}"


def stage_attack(run: Run) -> None:
    """Adversarial prompts for the unacceptable targets (this shard's), stored one per target (a killed attack
    resumes)."""
    targets = run.shard.take(attack_targets(run))
    found = run.store.get_many([key_of(adversarial_spec(run, t)) for t in targets])
    todo = [t for t in targets if key_of(adversarial_spec(run, t)) not in found]
    if todo:
        ctx = attack_context(run)
        chunk = max(1, int(run.cfg.get("attack_chunk", 8)))
        with progress.bar(f"attack {run.attack.name}", total=len(todo), unit="target",
                          enabled=run.maker.progress) as counted:
            for start in range(0, len(todo), chunk):
                batch = todo[start:start + chunk]
                results = {_target_id(a.target): a for a in run.attack.run(ctx, batch)}
                for target in batch:
                    store_adversarial(run, target, results.get(_target_id(target)))
                counted.reach(start + len(batch))  # an attack that counts its own targets is there already
    run.adversarial = {_target_id(t): load_adversarial(run, t) for t in targets}
    n = sum(a is not None for a in run.adversarial.values())
    log.info("attack %s (%s): %d adversarial prompts for %d targets of set %r", run.attack.name, run.attack.mode, n,
             len(targets), run.attack.target_set)


def _target_id(item: PromptItem) -> str:
    return key_of(asdict(item))


def attack_context(run: Run) -> AttackContext:
    needs = run.attack.needs()
    defended = run.defended.defended
    oracle = None
    if Access.JUDGE_ORACLE in needs:
        judge = ensure_judge(run)
        oracle = lambda images: [v.positive for v in judge.judge(images)]  # noqa: E731
    filter_access = bool(needs & {Access.FILTER_SCORE, Access.FILTER_GRADIENTS})
    return AttackContext(
        defended=defended, concept=run.concept, settings=run.settings,
        text_encoder=conditioning_encoder(run.model.pipe), tokenizer=run.model.pipe.tokenizer,
        reference_images=lambda items: run.maker.delivered_images(run.base, list(items), "reference"),
        base_pipe=run.model.pipe if Access.UNERASED_MODEL in needs else None, oracle=oracle,
        generate=(lambda model, items: _attack_generate(run, model, list(items))) if Access.SYSTEM_QUERIES in needs
        else None,
        generate_raw=(lambda model, items: _attack_generate(run, model, list(items), raw=True)) if filter_access
        else None,
        device=run.model.device, seed=run.seed)


def _attack_generate(run: Run, model: DefendedModel, items: list[PromptItem], raw: bool = False) -> list[Any]:
    """Images as the user receives them (a flagged one is the placeholder, or None under ``blocked_as_safe``), or
    with ``raw`` the generations before any filter; through the store when asked for the system under test."""
    if model is run.defended.defended:
        if not raw:
            return run.maker.delivered_images(run.defended, items, "attack queries")
        records = run.maker.make(run.defended, [ImageRequest(item) for item in items], "attack queries")
        return [run.maker.load(r.key) for r in records]
    from metrics.filtering import deliver

    negative = model.negative_prompt if model.negative_prompt is not None else run.settings.negative_prompt
    images = run.maker.sample_unstored(model.pipe, [ImageRequest(item) for item in items], negative)
    if model.filter is not None and not raw:
        images = deliver(images, model.filter.flags(images), run.maker.placeholder)
    return images


def store_adversarial(run: Run, target: PromptItem, adv: AdversarialPrompt | None) -> None:
    spec = adversarial_spec(run, target)
    if adv is None:
        run.store.put_value("adversarial_prompt", spec, {"found": False})
        return
    value = {"found": True, "text": adv.text, "cost": asdict(adv.cost),
             "succeeded_during_search": adv.succeeded_during_search,
             "log": json.loads(json.dumps(adv.log, default=str)), "embedding": adv.embedding is not None}
    if adv.embedding is None:
        run.store.put_value("adversarial_prompt", spec, value)
        return

    def write(folder: Path) -> dict[str, Any]:
        tensors = {"embedding": adv.embedding.detach().to("cpu").contiguous()}
        if adv.pooled is not None:  # SDXL: the embedding's pooled companion, in the same file
            tensors["pooled"] = adv.pooled.detach().to("cpu").contiguous()
        save_file(tensors, str(folder / "embedding.safetensors"))
        return value

    run.store.put_files("adversarial_prompt", spec, write)


def load_adversarial(run: Run, target: PromptItem) -> AdversarialPrompt | None:
    entry = run.store.get(key_of(adversarial_spec(run, target)))
    if entry is None or not entry.value.get("found"):
        return None
    value = entry.value
    tensors = load_file(str(entry.path / "embedding.safetensors")) if value["embedding"] else {}
    return AdversarialPrompt(target=target, text=value["text"], embedding=tensors.get("embedding"),
                             pooled=tensors.get("pooled"), cost=AttackCost(**value["cost"]),
                             succeeded_during_search=value["succeeded_during_search"], log=value["log"])


# -- generate --------------------------------------------------------------------------------------------------


def stage_generate(run: Run) -> None:
    """Defended images of the evaluated sets, base images of the acceptable set, images of adversarial prompts;
    of this shard's prompts and targets when the run is sharded."""
    concept, take = run.concept, run.shard.take
    for name in EVALUATED_SETS:
        if name in concept.prompts:
            run.records[f"defended/{name}"] = run.maker.make(run.defended,
                                                             run.maker.requests(take(concept.prompts[name])), name)
    if "acceptable" in concept.prompts:
        acceptable = run.maker.requests(take(concept.prompts["acceptable"]))
        run.records["base/acceptable"] = run.maker.make(run.base, acceptable, "acceptable")
    targets = take(attack_targets(run))
    if run.attack.name != "none":  # the unerased model on the targets: which targets are "ideal" (P4D's FR)
        run.records[reference_records_name(run)] = run.maker.make(run.base, run.maker.requests(targets),
                                                                  f"reference {run.attack.target_set}")
    if run.attack.target_set not in EVALUATED_SETS:  # the attack's own target set: its unattacked images (pre-ASR)
        run.records[target_records_name(run)] = run.maker.make(run.defended, run.maker.requests(targets),
                                                               run.attack.target_set)
    requests = [ImageRequest(r.item, r.index, text=adv.text, embedding=adv.embedding, pooled=adv.pooled)
                for r in run.maker.requests(targets)
                if (adv := run.adversarial.get(_target_id(r.item))) is not None]
    run.records["adversarial/unacceptable"] = run.maker.make(run.defended, requests, "adversarial") if requests else []


# -- score -----------------------------------------------------------------------------------------------------


def judge_config(run: Run) -> dict[str, Any]:
    chosen = dict(run.cfg.get("judge") or {})
    if chosen.pop("from_concept", True):
        return dict(run.concept.judge)
    return chosen


def ensure_judge(run: Run) -> Any:
    if run.judge is None:
        run.judge = _build_scorer(registry.build_judge, judge_config(run), "judge")
    return run.judge


def ensure_evaluator(run: Run) -> Any:
    if run.evaluator is None:
        cfg = dict(run.cfg["model"]["evaluator"])
        if cfg.get("path") and run.resolve(cfg["path"]).exists():
            cfg["path"] = str(run.resolve(cfg["path"]))
        run.evaluator = _build_scorer(registry.build_evaluator, cfg, "evaluator")
    return run.evaluator


def _build_scorer(build: Callable[[dict[str, Any]], Any], cfg: dict[str, Any], what: str) -> Any:
    try:
        return build(cfg)
    except HarnessError:
        raise
    except (OSError, ValueError, RuntimeError, ImportError, KeyError) as error:
        raise HarnessError(f"could not build the {what} {cfg}: {str(error).splitlines()[0][:200]}") from None


def stage_score(run: Run) -> None:
    """Judge verdicts and evaluator embeddings for every delivered image the metrics read."""
    scorer = Scorer(run.store, run.maker.load, run.counters, run.maker.progress)
    judged = [r.delivered_key for name, records in run.records.items()
              if not name.startswith("base/") or name == reference_records_name(run) for r in records]
    embedded = [r.delivered_key for records in run.records.values() for r in records]
    run.scores["judge"] = scorer.verdicts(ensure_judge(run), judged)
    run.scores["embedding"] = scorer.embeddings(ensure_evaluator(run), embedded)


STAGE_FUNCTIONS: dict[str, Callable[[Run], None]] = {
    "prompts": stage_prompts,
    "fit": stage_fit,
    "attack": stage_attack,
    "generate": stage_generate,
    "score": stage_score,
}


def run_stages(run: Run, stop_after: str = "report") -> Run:
    """Run every stage up to and including ``stop_after``; metrics and report are in runners.results."""
    from runners.results import stage_metrics, stage_report

    if stop_after not in STAGES:
        raise HarnessError(f"stop_after={stop_after!r}; choose one of {list(STAGES)}")
    functions = {**STAGE_FUNCTIONS, "metrics": stage_metrics, "report": stage_report}
    if run.shard.partial and STAGES.index(stop_after) > STAGES.index(SHARD_LAST_STAGE):
        stop_after = SHARD_LAST_STAGE
    for stage in STAGES:
        with run.timed(stage):
            functions[stage](run)
        if stage == stop_after:
            break
    if run.shard.partial:
        log.info("%s: its products are in the store (%s); a run without shard settings assembles the metrics",
                 run.shard, run.store.root)
    log.info(run.counters.line())
    return run


def torch_threads(cfg: dict[str, Any]) -> None:
    """``threads=N`` sets torch's CPU threads; null keeps torch's default, which is ``OMP_NUM_THREADS`` when set (the
    ``local`` launcher sets it to cores // jobs, runners/launchers.py)."""
    threads = cfg.get("threads")
    if threads:
        torch.set_num_threads(int(threads))
    log.info("torch CPU threads: %d", torch.get_num_threads())
