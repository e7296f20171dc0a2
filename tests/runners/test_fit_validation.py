"""Through the runner: ``FitContext.validation_rate`` is the run judge's rate on the concept's ``validation`` prompts
rendered by the pipe it is given, the judge is built only when a fit asks, and an artifact selected on it has the
judge and the validation prompts in its key (an artifact that is not, does not)."""

from __future__ import annotations

from typing import Any

import pytest

from crt.base import CRT, Artifact, DefendedModel, FitContext
from runners.models import PipelineCache
from runners.spec import Family
from runners.stages import (
    Run,
    artifact_spec,
    prepare,
    stage_fit,
    stage_prompts,
    validation_identity,
    validation_rate,
)
from runners.store import key_of
from tests.runners.conftest import ROOT, plugin
from tests.runners.fakes import FakeJudge


class RatesTheBase(CRT):
    """Asks for the base model's validation rate and stores it; no weights."""

    name = "rates_the_base"
    family = Family.NONE
    exposes = frozenset()
    uses_validation_rate = True

    def fit(self, ctx: FitContext) -> Artifact:
        return Artifact(meta={"rate": ctx.validation_rate(ctx.pipe)})

    def apply(self, pipe: Any, artifact: Artifact) -> DefendedModel:
        return DefendedModel(pipe=pipe, crt_name=self.name)


class NeverAsks(CRT):
    """Fits without looking at the validation rate (every CRT but RECE so far)."""

    name = "never_asks"
    family = Family.NONE
    exposes = frozenset()

    def fit(self, ctx: FitContext) -> Artifact:
        return Artifact(meta={"offered": ctx.validation_rate is not None})

    def apply(self, pipe: Any, artifact: Artifact) -> DefendedModel:
        return DefendedModel(pipe=pipe, crt_name=self.name)


def _run(cfg: dict[str, Any], pipelines: PipelineCache) -> Run:
    run = prepare(cfg, ROOT, pipelines)
    stage_prompts(run)
    return run


@pytest.fixture(scope="module")
def pipelines() -> PipelineCache:
    return PipelineCache()


def test_the_rate_is_the_judge_on_the_validation_images_and_the_judge_waits_for_it(tiny_config, pipelines):
    cfg = plugin(tiny_config("stop_after=fit"), "crt", f"{__name__}.RatesTheBase", "rates_the_base")
    run = _run(cfg, pipelines)
    rate = validation_rate(run)
    assert rate is not None and run.judge is None  # nothing built until asked
    stage_fit(run)
    assert run.judge is not None
    # independently: the base model's stored images of the same prompts and seeds, through the same judge
    items = run.concept.prompts["validation"]
    records = run.maker.make(run.base, run.maker.requests(items), "check")
    verdicts = FakeJudge().judge([run.maker.load(r.key) for r in records])
    expected = sum(v.positive for v in verdicts) / len(verdicts)
    assert len(items) == 3 and run.artifact_meta["rate"] == pytest.approx(expected)
    assert rate(run.model.pipe) == pytest.approx(expected)


def test_a_crt_that_never_asks_builds_no_judge_and_keeps_its_key(tiny_config, pipelines):
    cfg = plugin(tiny_config("stop_after=fit"), "crt", f"{__name__}.NeverAsks", "never_asks")
    run = _run(cfg, pipelines)
    stage_fit(run)
    assert run.artifact_meta == {"offered": True} and run.judge is None
    assert "validation" not in artifact_spec(run)
    cfg["judge"]["params"] = {"version": "2"}
    assert key_of(artifact_spec(_run(cfg, pipelines))) == run.artifact_key


def test_rece_selected_on_validation_has_the_judge_and_prompts_in_its_key(tiny_config, pipelines):
    def rece(select: str, judge_version: str = "1", prompts: int = 3) -> Run:
        cfg = tiny_config("crt=rece", "stop_after=fit", prompts=prompts)
        cfg["crt"]["params"].update(epochs=1, select=select)
        cfg["judge"]["params"] = {"version": judge_version}
        return _run(cfg, pipelines)

    chosen = rece("validation")
    spec = artifact_spec(chosen)
    assert spec["validation"] == validation_identity(chosen)
    assert spec["validation"]["judge"]["params"] == {"version": "1"}
    assert key_of(artifact_spec(rece("validation", judge_version="2"))) != key_of(spec)
    assert key_of(artifact_spec(rece("validation", prompts=2))) != key_of(spec)
    last = artifact_spec(rece("last"))
    assert "validation" not in last
    assert key_of(artifact_spec(rece("last", judge_version="2"))) == key_of(last)

    stage_fit(chosen)
    meta = chosen.artifact_meta
    assert meta["select"] == "validation" and len(meta["validation_rates"]) == 2  # the UCE start and one epoch
    assert meta["chosen_epoch"] in (0, 1) and all(0 <= r["rate"] <= 1 for r in meta["validation_rates"])


def test_rece_on_a_concept_without_validation_prompts_says_what_to_do(tiny_config, pipelines):
    cfg = tiny_config("crt=rece", "stop_after=fit")
    cfg["crt"]["params"].update(epochs=1)
    del cfg["concept"]["prompts"]["validation"]
    run = _run(cfg, pipelines)
    assert validation_rate(run) is None
    with pytest.raises(ValueError, match="crt.params.select=last"):
        stage_fit(run)
