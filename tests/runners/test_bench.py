"""`make bench`: ratios and verdicts against hand values, the leaderboard's summed timings, the CLI sizes, the table,
the in-process measurements pairing equal work on the world, and (slow) the whole `--quick` bench."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest

from runners import bench
from runners.bench import QUICK, LeaderboardTime, Machine, Ratio, Sizes
from tests.runners.conftest import ROOT

WORLD_READY = all((ROOT / "world" / "weights" / part).exists()
                  for part in ("pipeline/model_index.json", "clip", "clip_eval", "judges/colour.safetensors"))
needs_world = pytest.mark.skipif(not WORLD_READY, reason="the miniature world's weights are not here")


def test_a_ratio_is_the_alternatives_time_over_the_harness_and_is_judged_against_its_target():
    ratio = Ratio("evaluation", "24 prompts", "one process per prompt", baseline_s=30.0, harness_s=2.0, target=10.0)
    assert ratio.value == 15.0 and ratio.verdict == "meets"
    assert replace(ratio, target=20.0).verdict == "misses"
    assert replace(ratio, target=None).verdict == "no target"
    assert replace(ratio, baseline_s=0.9, harness_s=1.0, target=0.95).verdict == "misses"
    assert math.isinf(replace(ratio, harness_s=0.0).value)


def test_the_leaderboard_time_sums_every_committed_runs_stage_timings(tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / "a.json").write_text(json.dumps({"timings_s": {"fit": 10.5, "attack": 100.0, "generate": 4.0}}))
    (runs / "b.json").write_text(json.dumps({"timings_s": {"attack": 20.0, "score": 0.5}}))
    (runs / "c.parquet").write_text("not a result document")
    total = bench.leaderboard_time(tmp_path)
    assert total.runs == 2 and total.seconds == pytest.approx(135.0)
    assert total.by_stage == pytest.approx({"fit": 10.5, "attack": 120.0, "generate": 4.0, "score": 0.5})


def test_the_default_run_estimate_scales_only_the_attack_stage_per_target():
    timings = {"prompts": 0.5, "fit": 60.0, "attack": 40.0, "generate": 19.5}
    assert bench.default_run_estimate(timings, targets=4, full_targets=32) == pytest.approx(120.0 + 10.0 * 28)
    assert bench.default_run_estimate(timings, targets=32, full_targets=32) == pytest.approx(120.0)


def test_pixel_notes_say_how_many_images_differ_and_by_how_much():
    assert bench.pixels_note([0, 0, 0]) == "same pixels: yes"
    note = bench.pixels_note([0, 1, 0, 2])
    assert note.startswith("same pixels but in 2 of 4 images, by at most 2/255")


def test_cli_sizes_default_quick_and_options():
    sizes, out, note = bench.parse([])
    assert sizes == Sizes() and out == ROOT / "results" / "bench.md" and note == ""
    sizes, out, note = bench.parse(["--quick", "--targets", "3", "--no-out", "--note", "two sweeps running"])
    assert sizes == replace(QUICK, targets=3) and out is None and note == "two sweeps running"
    sizes, _, _ = bench.parse(["--per-set", "5", "--uda-targets", "2"])
    assert (sizes.per_set, sizes.uda_targets, sizes.quick) == (5, 2, False)


def test_the_table_has_every_ratio_with_its_setting_target_verdict_and_the_machine(tmp_path):
    ratios = [Ratio("generation", "64 images", "raw diffusers pipeline call", 9.7, 10.0, 0.95, "same pixels: yes"),
              Ratio("ringabell", "1 target", "one candidate per forward", 10.0, 4.0, 20.0),
              Ratio("unlearndiffatk", "4 targets", "one target at a time", 6.0, 4.0, None)]
    machine = Machine("Test CPU 9000", 2, 1, "2.0", "0.30", "3.11", (2.5, 2.0, 1.5), "two sweeps were running")
    text = bench.render(ratios, machine, LeaderboardTime(3, 7200.0, {"attack": 7000.0, "fit": 200.0}), 400.0,
                        Sizes(), wall_s=61.0)
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| measurement")]
    assert [row.split(" | ")[0] for row in rows] == ["| generation", "| ringabell", "| unlearndiffatk"]
    assert "| 0.97x | >= 0.95 | meets |" in rows[0] and "| 2.50x | >= 20 | misses |" in rows[1]
    assert "| 1.50x | - | no target |" in rows[2] and "64 images" in rows[0]
    assert "2.0 h of stage time over 3 committed runs" in text and "6.7 min" in text
    for fact in ("Test CPU 9000", "2 cores", "torch threads 1", "torch 2.0", "2.5, 2.0, 1.5", "two sweeps were running",
                 "- generation: same pixels: yes"):
        assert fact in text, fact


@needs_world
def test_in_process_measurements_pair_equal_work_on_the_world(tmp_path):
    import torch

    threads = torch.get_num_threads()
    sizes = replace(QUICK, prompts=3)
    try:
        run = bench.world_run(sizes, tmp_path / "shared", bench.PipelineCache())
        generation = bench.measure_generation(run, sizes, tmp_path)
        ringabell, batching = bench.measure_ringabell(run, sizes)
        unlearndiffatk = bench.measure_unlearndiffatk(run, sizes, tmp_path / "uda")
    finally:
        torch.set_num_threads(threads)
    for ratio in (generation, ringabell, batching, unlearndiffatk):
        assert ratio.baseline_s > 0 and ratio.harness_s > 0 and ratio.setting, ratio
    assert "3 images" in generation.setting and "same pixels as the raw call: yes" in generation.note
    assert "same prompt: yes" in ringabell.note and ringabell.target == 20.0 and batching.target is None
    assert "2 targets" in unlearndiffatk.setting and "target_batch=2" in unlearndiffatk.note
    assert run.store.root == tmp_path / "shared" / "store" and (tmp_path / "generation0").is_dir()  # never store/


@needs_world
@pytest.mark.slow
def test_the_quick_bench_measures_every_ratio_and_writes_the_table(tmp_path):
    """About a minute on 2 busy cores: four Python processes start (three per-prompt ones and `run.py`)."""
    out = tmp_path / "bench.md"
    text = bench.run_bench(QUICK, out, note="test")
    assert out.read_text() == text
    rows = {line.split(" | ")[0][2:]: line for line in text.splitlines()
            if line.startswith("| ") and not line.startswith("| measurement")}
    assert set(rows) == {"generation", "evaluation", "warm rerun", "ringabell", "ringabell, batching alone",
                         "unlearndiffatk"}
    for row in rows.values():
        value = float(row.split(" | ")[5].removesuffix("x"))
        assert value > 0 and math.isfinite(value)
    assert "same pixels as the raw call: yes" in text and "images generated: 0" in text and "committed runs" in text
    [evaluation] = [line for line in text.splitlines() if line.startswith("- evaluation:")]
    assert "same pixels" in evaluation
