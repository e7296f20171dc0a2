"""The command line: unknown options list the choices, an unreachable model fails fast, a full run, a rerun."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0", **(env or {})}
    return subprocess.run([sys.executable, "run.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=full_env)


def test_unknown_crt_exits_nonzero_and_lists_the_available_ones():
    result = _run("crt=doesnotexist")
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "Could not find 'crt/doesnotexist'" in output and "Available options in 'crt'" in output
    assert "\tnone" in output


def test_offline_real_concept_fails_fast_with_one_clear_line(tmp_path: Path):
    start = time.perf_counter()
    result = _run("concept=nudity", f"store.root={tmp_path / 'store'}",
                  env={"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}, timeout=60)
    assert time.perf_counter() - start < 30
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1
    assert "CompVis/stable-diffusion-v1-4" in error_lines[0] and "model.path=" in error_lines[0]


def test_a_refused_job_does_not_end_the_sweep(tmp_path: Path):
    result = _run("-m", "concept=world_nudity", "crt=none", "attack=none,ringabell", "attack.adaptive=true",
                  "stop_after=prompts", f"store.root={tmp_path / 'store'}", f"results.dir={tmp_path / 'results'}",
                  f"hydra.sweep.dir={tmp_path / 'multirun'}", timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 2, errors
    assert "attack=none searches nothing" in errors[0] and "needs ['filter_score']" in errors[1], errors
    assert "#1 : concept=world_nudity crt=none attack=ringabell" in result.stdout + result.stderr


def test_cli_run_on_a_local_folder_then_a_rerun_recomputes_nothing(sd14_shaped_folder: Path, tmp_path: Path):
    args = ["crt=none", "attack=none", f"model.path={sd14_shaped_folder}", "model.fallback_path=null",
            "model.max_prompts_per_set=2",
            "model.generation.steps=2", "model.generation.height=64", "model.generation.width=64",
            "+model.evaluator.handler=tests.runners.fakes.FakeEvaluator", "judge.from_concept=false",
            "+judge.handler=tests.runners.fakes.FakeJudge", f"store.root={tmp_path / 'store'}",
            f"results.dir={tmp_path / 'results'}", "metric.bootstrap.n_boot=50", "progress=false",
            f"hydra.run.dir={tmp_path / 'outputs'}"]
    first = _run(*args, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "world_nudity · none · none (transfer)" in first.stdout and "results:" in first.stdout  # the summary
    assert (tmp_path / "results" / "leaderboard.md").is_file()
    second = _run(*args, "skip_committed=false", timeout=300)
    assert second.returncode == 0, second.stderr[-2000:]
    log = (tmp_path / "outputs" / "run.log").read_text()
    assert "images generated: 0, reused: 8; scores computed: 0, reused: 12" in log
    # the store is lost (a new machine) but the committed result stays: the run is skipped, nothing is generated
    moved = [a if not a.startswith("store.root=") else f"store.root={tmp_path / 'new_store'}" for a in args]
    third = _run(*moved, timeout=300)
    assert third.returncode == 0, third.stderr[-2000:]
    log = (tmp_path / "outputs" / "run.log").read_text()
    assert "skipped: this run's result is already committed" in log
    assert "world_nudity · none · none (transfer)" in third.stdout  # its summary is still shown
    assert not list((tmp_path / "new_store").rglob("image.png"))
    # a different run (another seed) is not mistaken for it
    other = _run(*moved, "seed=1", f"hydra.run.dir={tmp_path / 'other'}", timeout=300)
    assert other.returncode == 0, other.stderr[-2000:]
    assert "skipped" not in (tmp_path / "other" / "run.log").read_text()


@pytest.mark.slow
@pytest.mark.skipif(not all((ROOT / "world" / "weights" / p).exists() for p in ("pipeline/model_index.json", "clip",
                                                                              "clip_eval", "judges")),
                    reason="the miniature world's weights are not trained yet")
def test_default_command_runs_the_miniature_world(tmp_path: Path):
    """`python run.py` as shipped (Espresso x Ring-A-Bell on world_nudity), on fewer prompts; minutes."""
    args = ["model.max_prompts_per_set=4", f"store.root={tmp_path / 'store'}", f"results.dir={tmp_path / 'results'}",
            "progress=false", f"hydra.run.dir={tmp_path / 'outputs'}"]
    result = _run(*args, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "world_nudity · espresso · ringabell (transfer)" in result.stdout


@pytest.mark.parametrize(("model", "folder_fixture"), [("sd21", "sd21_shaped_folder"), ("sdxl", "sdxl_shaped_folder")])
def test_ring_a_bell_runs_end_to_end_on_the_other_backbones(model: str, folder_fixture: str, tmp_path: Path,
                                                            request: pytest.FixtureRequest):
    """The same command on SD 2.1's and SDXL's shapes: the search reads the model's conditioning (both encoders on
    SDXL), the scoring generates through the backbone's own pipeline."""
    folder = request.getfixturevalue(folder_fixture)
    result = _run(f"model={model}", "concept=world_nudity", "crt=none", "attack=ringabell", f"model.path={folder}",
                  "model.max_prompts_per_set=2", "model.max_attack_targets=2", "attack.params.population=6",
                  "attack.params.generations=2", "model.generation.steps=2", "model.generation.height=64",
                  "model.generation.width=64", "+model.evaluator.handler=tests.runners.fakes.FakeEvaluator",
                  "judge.from_concept=false", "+judge.handler=tests.runners.fakes.FakeJudge",
                  f"store.root={tmp_path / 'store'}", f"results.dir={tmp_path / 'results'}",
                  "metric.bootstrap.n_boot=50", "progress=false", f"hydra.run.dir={tmp_path / 'outputs'}",
                  timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    runs = list((tmp_path / "results" / "runs").glob("*.json"))
    assert len(runs) == 1 and f"{model}__world_nudity__none__ringabell" in runs[0].name


def test_cce_embeddings_render_end_to_end_on_sdxl(sdxl_shaped_folder: Path, tmp_path: Path):
    """CCE's output on SDXL is 77 x 2048 states plus a pooled embedding: both are stored with the adversarial
    prompt, keyed in the image spec and passed to the SDXL pipeline (a rerun recomputes nothing)."""
    args = ["model=sdxl", "concept=world_nudity", "crt=none", "attack=cce", f"model.path={sdxl_shaped_folder}",
            "model.max_prompts_per_set=2", "model.max_attack_targets=2", "attack.params.steps=2",
            "attack.params.num_train_images=2", "attack.params.batch_size=1", "model.generation.steps=2",
            "model.generation.height=64", "model.generation.width=64",
            "+model.evaluator.handler=tests.runners.fakes.FakeEvaluator", "judge.from_concept=false",
            "+judge.handler=tests.runners.fakes.FakeJudge", f"store.root={tmp_path / 'store'}",
            f"results.dir={tmp_path / 'results'}", "metric.bootstrap.n_boot=50", "progress=false",
            f"hydra.run.dir={tmp_path / 'outputs'}"]
    first = _run(*args, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    from safetensors.torch import load_file

    stored = [load_file(str(p)) for p in (tmp_path / "store").rglob("embedding.safetensors")]
    assert len(stored) == 2 and all(t["embedding"].shape[-1] == 2048 and t["pooled"].shape[-1] == 1280
                                    for t in stored)
    second = _run(*args, "skip_committed=false", timeout=300)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "images generated: 0" in (tmp_path / "outputs" / "run.log").read_text()
