"""One evaluation split over jobs (``shard.index`` / ``shard.count``): the shards store the unsharded run's very
products, write no results, and a run without shard settings assembles the same metrics from the store alone."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from crt_bench.spec import canonical_json
from run import execute
from runners.models import HarnessError, PipelineCache
from runners.stages import Shard, shard_of
from runners.store import Store
from tests.runners.conftest import plugin

COUNT = 3


def _sharded_config(tiny_config, where: Path) -> dict:
    """A weight-edit CRT attacked by a text attack: 4 prompts a set (3 shards of 2, 1, 1), 2 images a prompt."""
    cfg = plugin(tiny_config(prompts=4), "crt", "tests.runners.fakes.FakeEditCRT", "fake_edit", shift=0.3)
    plugin(cfg, "attack", "tests.runners.fakes.SuffixAttack", "suffix", suffix="crimson")
    cfg["model"]["generation"]["images_per_prompt"] = 2
    cfg["store"]["root"] = str(where / "store")
    cfg["results"]["dir"] = str(where / "results")
    return cfg


def _with_shard(cfg: dict, index: int | None, count: int | None) -> dict:
    sharded = copy.deepcopy(cfg)
    sharded["shard"] = {"index": index, "count": count}
    return sharded


def _metrics(summary: dict) -> str:
    return canonical_json(json.loads(Path(summary["outputs"]["results"]).read_text())["metrics"])


def test_three_shards_and_the_assembly_give_the_unsharded_metrics_byte_for_byte(tiny_config, tmp_path):
    whole = execute(_sharded_config(tiny_config, tmp_path / "whole"), pipelines=PipelineCache())

    cfg = _sharded_config(tiny_config, tmp_path / "sharded")
    shards = [execute(_with_shard(cfg, index, COUNT), pipelines=PipelineCache()) for index in range(COUNT)]
    for shard in shards:
        assert "results" not in shard["outputs"] and shard["metrics"] == {}
        assert shard["counters"].images_generated > 0  # each made its own part
    assert not (tmp_path / "sharded" / "results" / "runs").exists()  # no shard wrote a result
    assert sum(s["counters"].images_generated for s in shards) == whole["counters"].images_generated

    pipelines = PipelineCache()
    assembled = execute(_with_shard(cfg, None, None), pipelines=pipelines)
    assert assembled["counters"].images_generated == 0 and assembled["counters"].scores_computed == 0
    assert not any(handle.loaded for handle in pipelines._handles.values())  # from stored products only
    assert _metrics(assembled) == _metrics(whole)
    assert json.loads(_metrics(whole))["robustness/post_asr/suffix"]["n"] == 4
    # the shard settings enter no key: the sharded store holds exactly the unsharded run's products
    assert Store(tmp_path / "sharded" / "store").keys() == Store(tmp_path / "whole" / "store").keys()


def test_the_assembly_computes_what_a_missing_shard_did_not_store(tiny_config, tmp_path):
    cfg = _sharded_config(tiny_config, tmp_path)
    cfg["model"]["generation"]["images_per_prompt"] = 1
    done = [execute(_with_shard(cfg, index, COUNT), pipelines=PipelineCache()) for index in (0, 1)]
    assembled = execute(cfg, pipelines=PipelineCache())
    # shard 2 holds position 2 of every set: 3 defended sets + base acceptable + base and adversarial images of the
    # targets, one image each
    assert assembled["counters"].images_generated == 6
    assert sum(d["counters"].images_generated for d in done) + 6 == 24
    assert json.loads(_metrics(assembled))["effectiveness/judge_rate/unacceptable"]["n"] == 4


def test_a_shard_takes_the_positions_congruent_to_its_index():
    items = list("abcdefg")
    parts = [Shard(index, COUNT).take(items) for index in range(COUNT)]
    assert parts == [["a", "d", "g"], ["b", "e"], ["c", "f"]]
    assert Shard().take(items) == items and not Shard().partial and Shard(1, 3).partial


@pytest.mark.parametrize(("shard", "env", "expected"), [
    ({}, {}, Shard(0, 1)),
    ({"index": None, "count": None}, {"SLURM_ARRAY_TASK_ID": "2"}, Shard(0, 1)),  # no count: not sharded
    ({"index": 1, "count": 4}, {"CRT_BENCH_SHARD_INDEX": "3"}, Shard(1, 4)),  # the config wins
    ({}, {"CRT_BENCH_SHARD_INDEX": "2", "CRT_BENCH_SHARD_COUNT": "3"}, Shard(2, 3)),
    ({"count": 3}, {"SLURM_ARRAY_TASK_ID": "2"}, Shard(2, 3)),  # the user's own sbatch --array=0-2
    ({"count": 3}, {"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_MIN": "1"}, Shard(2, 3)),  # --array=1-3
    ({"index": "1", "count": "2"}, {}, Shard(1, 2)),  # as an env-var interpolation yields it
])
def test_shard_settings_come_from_the_config_then_the_environment(shard, env, expected):
    assert shard_of({"shard": shard}, env) == expected


@pytest.mark.parametrize(("shard", "env", "says"), [
    ({"count": 3}, {}, "no shard.index"),
    ({"count": 3}, {"SLURM_ARRAY_TASK_ID": "1", "SUBMITIT_EXECUTOR": "slurm"}, "no shard.index"),  # a Hydra sweep
    ({"index": 3, "count": 3}, {}, "from 0 to 2"),
    ({"index": 1}, {}, "from 0 to 0"),
    ({"index": 0, "count": 0}, {}, "shard.count=0"),
    ({"index": 1.5, "count": 3}, {}, "not an integer"),
    ({"count": 3}, {"CRT_BENCH_SHARD_INDEX": "one"}, "CRT_BENCH_SHARD_INDEX='one' is not an integer"),
])
def test_bad_shard_settings_stop_with_one_line(shard, env, says):
    with pytest.raises(HarnessError, match=says):
        shard_of({"shard": shard}, env)
