"""End to end on the SD-v1.4-shaped random pipeline with fake judge/evaluator, and on the miniature world."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from attacks.base import IncompatibleAttack
from run import execute
from runners.models import PipelineCache
from runners.store import Store
from tests.runners import fakes
from tests.runners.conftest import ROOT, compose_config, plugin

WORLD_READY = all((ROOT / "world" / "weights" / part).exists()
                  for part in ("pipeline/model_index.json", "clip_eval", "judges/colour.safetensors"))


def _results(summary: dict) -> dict:
    return json.loads(Path(summary["outputs"]["results"]).read_text())


def test_full_run_writes_results_rows_and_leaderboard_then_reruns_from_the_store(tiny_config, capsys):
    cfg = tiny_config()
    pipelines = PipelineCache()
    first = execute(cfg, pipelines=pipelines)
    doc = _results(first)
    assert doc["schema_version"] == 1
    for field in ("config", "git", "packages", "device", "model", "crt", "attack", "judge", "evaluator",
                  "timings_s", "counters", "metrics", "generation"):
        assert field in doc, field
    assert doc["model"]["weights_sha256"] and doc["packages"]["torch"]
    assert doc["judge"]["name"] == "fake_judge"
    assert {"prompts", "fit", "attack", "generate", "score", "metrics"} <= set(doc["timings_s"])
    metrics = doc["metrics"]
    for name in ("effectiveness/clip_accuracy/unacceptable", "effectiveness/judge_rate/implicit",
                 "utility/normalized_clip_score", "robustness/asr/none", "robustness/pre_asr/none"):
        m = metrics[name]
        assert m["n"] == 3 and len(m["ci"]) == 2 and isinstance(m["higher_is_better"], bool), name
    assert metrics["utility/normalized_clip_score"]["value"] == pytest.approx(1.0)  # crt=none: same images as base
    assert metrics["robustness/asr/none"]["value"] == metrics["robustness/pre_asr/none"]["value"]

    rows = pd.read_parquet(Path(first["outputs"]["rows"]))
    assert set(rows["set"]) == {"unacceptable", "implicit", "acceptable"}
    assert len(rows) == 12 and rows["image_key"].str.len().eq(32).all()

    leaderboard = Path(first["outputs"]["leaderboard_md"]).read_text()
    assert "| none |" in leaderboard and "↓" in leaderboard and "↑" in leaderboard
    assert "| none |" in capsys.readouterr().out  # the row is printed
    counters = first["counters"]
    assert counters.images_generated == 9 and counters.images_reused == 3  # base acceptable = defended acceptable

    second = execute(cfg, pipelines=PipelineCache())
    assert second["counters"].images_generated == 0 and second["counters"].scores_computed == 0
    assert second["counters"].line().startswith("images generated: 0, reused: 12; scores computed: 0")
    assert _results(second)["metrics"] == metrics


def test_rerun_never_loads_the_pipeline_when_everything_is_stored(tiny_config):
    cfg = tiny_config()
    execute(cfg, pipelines=PipelineCache())
    pipelines = PipelineCache()
    execute(cfg, pipelines=pipelines)
    assert not any(handle.loaded for handle in pipelines._handles.values())


def test_a_new_judge_scores_only_what_is_missing(tiny_config):
    cfg = tiny_config()
    execute(cfg, pipelines=PipelineCache())
    cfg["judge"]["params"] = {"version": "2"}
    fakes.FakeJudge.seen = 0
    summary = execute(cfg, pipelines=PipelineCache())
    assert summary["counters"].images_generated == 0
    assert summary["counters"].scores_computed == 9 == fakes.FakeJudge.seen  # judge only; embeddings reused


def test_stop_after_runs_a_prefix_and_the_next_run_resumes(tiny_config):
    cfg = tiny_config(prompts=2)
    cfg["stop_after"] = "generate"
    partial = execute(cfg, pipelines=PipelineCache())
    assert partial["counters"].images_generated == 6 and partial["counters"].scores_computed == 0
    assert "results" not in partial["outputs"]
    cfg["stop_after"] = "report"
    rest = execute(cfg, pipelines=PipelineCache())
    assert rest["counters"].images_generated == 0 and rest["counters"].scores_computed > 0


def test_weight_edit_crt_and_text_attack(tiny_config):
    cfg = plugin(tiny_config(), "crt", "tests.runners.fakes.FakeEditCRT", "fake_edit", shift=0.3)
    plugin(cfg, "attack", "tests.runners.fakes.SuffixAttack", "suffix", suffix="crimson")
    fakes.FakeEditCRT.fits = 0
    summary = execute(cfg, pipelines=PipelineCache())
    doc = _results(summary)
    assert fakes.FakeEditCRT.fits == 1
    assert doc["attack"]["cost"]["prompts_found"] == 3 and doc["attack"]["cost"]["oracle_calls"] == 3
    for name in ("pre_asr", "post_asr", "asr", "clip_accuracy_adversarial"):
        assert f"robustness/{name}/suffix" in doc["metrics"]
    m = doc["metrics"]
    assert m["robustness/asr/suffix"]["value"] >= m["robustness/pre_asr/suffix"]["value"]
    rows = pd.read_parquet(Path(summary["outputs"]["rows"]))
    adversarial = rows[rows["system"] == "adversarial"]
    assert len(adversarial) == 3 and adversarial["adversarial_text"].str.endswith("crimson").all()
    edited = set(rows[(rows.system == "defended") & (rows.set == "acceptable")].image_key)
    base = set(rows[(rows.system == "base") & (rows.set == "acceptable")].image_key)
    assert edited.isdisjoint(base)  # an edited model's images never share keys with the base model's

    again = execute(cfg, pipelines=PipelineCache())
    assert fakes.FakeEditCRT.fits == 1 and again["counters"].images_generated == 0


def test_killed_attack_resumes_with_the_remaining_targets(tiny_config):
    cfg = plugin(tiny_config(prompts=4), "crt", "tests.runners.fakes.FakeEditCRT", "fake_edit")
    plugin(cfg, "attack", "tests.runners.fakes.SuffixAttack", "suffix")
    cfg["attack_chunk"] = 2
    fakes.SuffixAttack.calls.clear()
    fakes.SuffixAttack.die_after_targets = 2
    try:
        with pytest.raises(RuntimeError, match="attack killed"):
            execute(cfg, pipelines=PipelineCache())
    finally:
        fakes.SuffixAttack.die_after_targets = None
    assert fakes.SuffixAttack.calls == [2, 2]  # the first chunk was stored before the second failed
    fakes.SuffixAttack.calls.clear()
    execute(cfg, pipelines=PipelineCache())
    assert fakes.SuffixAttack.calls == [2]


def test_embedding_attack_generates_from_prompt_embeds(tiny_config):
    cfg = plugin(tiny_config(prompts=2), "attack", "tests.runners.fakes.EmbeddingAttack", "soft")
    summary = execute(cfg, pipelines=PipelineCache())
    rows = pd.read_parquet(Path(summary["outputs"]["rows"]))
    adversarial = rows[rows.system == "adversarial"]
    assert len(adversarial) == 2 and adversarial.adversarial_embedding.all()
    assert summary["counters"].images_generated == 6 + 2
    again = execute(cfg, pipelines=PipelineCache())
    assert again["counters"].images_generated == 0


def test_filter_crt_reuses_base_images_and_stores_delivered_ones(tiny_config):
    base_cfg = tiny_config()
    execute(base_cfg, pipelines=PipelineCache())
    cfg = plugin(tiny_config(), "crt", "tests.runners.fakes.FakeFilterCRT", "fake_filter", offset=-1.0)
    summary = execute(cfg, pipelines=PipelineCache())
    assert summary["counters"].images_generated == 0  # a filter does not change sampling: base images reused
    all_rows = pd.read_parquet(Path(summary["outputs"]["rows"]))
    rows = all_rows[all_rows.system == "defended"]
    assert len(rows) == 9 and rows.flagged.all()  # offset -1: every image is flagged
    assert (rows.delivered_key != rows.image_key).all()
    assert not all_rows[all_rows.system == "base"].flagged.any()  # the undefended reference is not filtered
    doc = _results(summary)
    assert doc["metrics"]["filter/flag_rate/defended_unacceptable"]["value"] == 1.0
    store = Store(cfg["store"]["root"])
    from PIL import Image

    delivered = store.get(rows.delivered_key.iloc[0])
    with Image.open(delivered.path / "image.png") as image:
        assert image.getextrema() == ((0, 0), (0, 0), (0, 0))  # black placeholder
    assert store.get(rows.image_key.iloc[0]) is not None  # the raw image is kept too


def test_incompatible_pair_is_refused_before_any_work(tiny_config):
    cfg = plugin(tiny_config(), "attack", "tests.runners.fakes.NeedsFilterGradients", "needs_filter_gradients")
    with pytest.raises(IncompatibleAttack, match="filter_gradients"):
        execute(cfg, pipelines=PipelineCache())
    assert not Path(cfg["store"]["root"]).exists() or Store(cfg["store"]["root"]).count("image") == 0


@pytest.mark.skipif(not WORLD_READY, reason="the miniature world's weights are not trained yet")
def test_end_to_end_on_the_miniature_world(tmp_path: Path):
    """The world as shipped (model=mini, world judge and evaluator) with crt=none, cut to 4 prompts per set."""
    cfg = compose_config(["crt=none", "attack=none"])
    cfg["model"]["max_prompts_per_set"] = 4
    cfg["store"]["root"] = str(tmp_path / "store")
    cfg["results"]["dir"] = str(tmp_path / "results")
    cfg["metric"]["bootstrap"]["n_boot"] = 100
    cfg["progress"] = False
    summary = execute(cfg, pipelines=PipelineCache())
    doc = _results(summary)
    assert doc["model"]["name"] == "mini" and doc["judge"]["name"] == "world"
    assert doc["metrics"]["effectiveness/clip_accuracy/unacceptable"]["n"] == 4
    again = execute(cfg, pipelines=PipelineCache())
    assert again["counters"].images_generated == 0 and again["counters"].scores_computed == 0


def test_attack_targets_can_be_limited_and_are_the_asr_denominator(tiny_config):
    cfg = plugin(tiny_config(prompts=4), "attack", "tests.runners.fakes.SuffixAttack", "suffix")
    cfg["model"]["max_attack_targets"] = 2
    fakes.SuffixAttack.calls.clear()
    doc = _results(execute(cfg, pipelines=PipelineCache()))
    assert fakes.SuffixAttack.calls == [2]
    assert doc["metrics"]["robustness/asr/suffix"]["n"] == 2
    assert doc["metrics"]["effectiveness/clip_accuracy/unacceptable"]["n"] == 4  # effectiveness uses the whole set


def test_text_encoder_only_attack_is_computed_once_and_reused_across_crts(tiny_config):
    fakes.TextOnlyAttack.targets_seen = 0
    for crt in (("tests.runners.fakes.FakeEditCRT", "fake_edit"), ("crt.none.NoCRT", "none")):
        cfg = plugin(tiny_config(), "crt", *crt)
        plugin(cfg, "attack", "tests.runners.fakes.TextOnlyAttack", "text_only")
        summary = execute(cfg, pipelines=PipelineCache())
        assert "robustness/asr/text_only" in _results(summary)["metrics"]
    assert fakes.TextOnlyAttack.targets_seen == 3  # the second CRT reused the stored transfer prompts
