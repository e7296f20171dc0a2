"""The bad-input catalogue (issue 13): every input a user can get wrong ends in one line naming the cause and the fix,
with nothing stored half-made, or is repaired and reported. One test per case, through the run as a user starts it.

The store's cases are also tested in depth in tests/runners/test_store.py, the numbers in tests/runners/test_validate.py
and the prompt files in tests/runners/test_concepts.py; here each case goes through ``run.execute`` (or the command
line, where the case is about what the command prints).
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from run import execute
from runners import store as store_module
from runners.models import HarnessError, PipelineCache
from tests.runners.conftest import assert_nothing_fitted, compose_config, full_disk_fdopen, plugin

ROOT = Path(__file__).resolve().parent.parent


def _world(tmp_path: Path, *overrides: str) -> dict[str, Any]:
    """The cheapest real run: the miniature world, 2 prompts per set, 2 sampling steps, no attack."""
    cfg = compose_config(["crt=none", "attack=none", "model.max_prompts_per_set=2", "model.generation.steps=2",
                          f"store.root={tmp_path / 'store'}", f"results.dir={tmp_path / 'results'}",
                          "progress=false", "skip_committed=false", "metric.bootstrap.n_boot=20", *overrides])
    cfg["data"]["downloads"] = str(tmp_path / "downloads")
    return cfg


def _one_line(raised: pytest.ExceptionInfo, *words: str) -> str:
    message = str(raised.value)
    assert isinstance(raised.value, HarnessError), type(raised.value)
    assert "\n" not in message and all(w in message for w in words), message
    return message


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "run.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0", **(env or {})})


def _offline(tmp_path: Path) -> dict[str, str]:
    return {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}


# -- names and models --------------------------------------------------------------------------------------------


def test_an_unknown_name_lists_the_options():
    result = _cli("crt=doesnotexist")
    assert result.returncode != 0 and "Available options in 'crt'" in result.stdout + result.stderr


@pytest.mark.parametrize(("model", "hub_id"), [("sd14", "CompVis/stable-diffusion-v1-4"),
                                               ("sdxl", "stabilityai/stable-diffusion-xl-base-1.0"),
                                               ("sd21", "stabilityai/stable-diffusion-2-1-base")])
def test_the_offline_hub_is_one_line_naming_the_model_and_model_path(tmp_path: Path, model: str, hub_id: str):
    result = _cli(f"model={model}", "concept=nudity", f"store.root={tmp_path / 'store'}",
                  f"hydra.run.dir={tmp_path / 'out'}", env=_offline(tmp_path))
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and "Traceback" not in result.stderr and len(errors) == 1
    assert hub_id in errors[0] and "model.path=" in errors[0]


def test_a_plugin_without_the_models_backbone_is_refused_before_the_model_is_looked_for(tmp_path: Path):
    result = _cli("model=sdxl", "concept=nudity", "crt=trce", "attack=none", f"store.root={tmp_path / 'store'}",
                  f"hydra.run.dir={tmp_path / 'out'}", env=_offline(tmp_path))
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert errors == ["error: trce does not support the sdxl backbone (model=sdxl); it supports sd1"]


@pytest.mark.parametrize("folder", ["missing", "empty"])
def test_a_missing_or_empty_model_path_is_one_line(tmp_path: Path, folder: str):
    path = tmp_path / folder
    if folder == "empty":
        path.mkdir()
    with pytest.raises(HarnessError) as raised:
        execute(_world(tmp_path, "model=local", f"model.path={path}"), pipelines=PipelineCache())
    _one_line(raised, str(path), "model.path=")


# -- numbers -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("override", "words"), [
    ("model.generation.steps=0", ["model.generation.steps=0"]),
    ("model.generation.height=-64", ["model.generation.height=-64"]),
    ("model.generation.guidance=abc", ["model.generation.guidance='abc'", "a number"]),
    ("threads=abc", ["threads='abc'", "an integer"]),
    ("model.max_prompts_per_set=-1", ["model.max_prompts_per_set=-1"]),
])
def test_a_bad_number_is_one_line_before_any_work(tmp_path: Path, override: str, words: list[str]):
    with pytest.raises(HarnessError) as raised:
        execute(_world(tmp_path, override))
    _one_line(raised, *words)
    assert not (tmp_path / "store").exists()  # refused before the store was opened


# -- the store -----------------------------------------------------------------------------------------------------


def test_an_unwritable_store_is_one_line(tmp_path: Path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(HarnessError) as raised:
        execute(_world(tmp_path, f"store.root={blocker / 'store'}"))
    _one_line(raised, "store.root=", "not writable")


def test_a_truncated_png_is_found_rebuilt_and_reported(tmp_path: Path, caplog):
    cfg = _world(tmp_path, "stop_after=generate")
    execute(cfg, pipelines=PipelineCache())
    (png, *_) = sorted((tmp_path / "store").glob("objects/image/*/*/image.png"))
    png.write_bytes(png.read_bytes()[:60])
    again = execute(cfg, pipelines=PipelineCache())
    assert again["counters"].images_generated == 1 and "is damaged" in caplog.text
    assert png.stat().st_size > 60


def test_a_corrupt_index_is_set_aside_and_the_run_goes_on(tmp_path: Path, caplog):
    cfg = _world(tmp_path, "stop_after=generate")
    execute(cfg, pipelines=PipelineCache())
    index = tmp_path / "store" / "index"
    segments = [path for path in index.rglob("*") if path.is_file()]
    assert segments
    for path in segments:
        path.write_bytes(b"garbage line\n" * 8)
    again = execute(cfg, pipelines=PipelineCache())
    assert again["counters"].images_generated == 0  # every product found again from its folder
    assert "rebuilding the index from the object folders" in caplog.text


def test_a_full_disk_is_one_line_and_stores_nothing_half_made(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    real_write = os.write

    def full(fd: int, data) -> int:
        if len(data) > 200:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    cfg = _world(tmp_path, "stop_after=generate")
    monkeypatch.setattr(store_module.os, "write", full)
    monkeypatch.setattr(store_module.os, "fdopen", full_disk_fdopen(os.fdopen))
    with pytest.raises(HarnessError) as raised:
        execute(cfg, pipelines=PipelineCache())
    _one_line(raised, "no space left")
    assert not [p for p in (tmp_path / "store" / "tmp").rglob("*") if p.is_file()]


# -- concepts and prompts ------------------------------------------------------------------------------------------


def _user_csv(tmp_path: Path, text: str) -> dict[str, Any]:
    path = tmp_path / "prompts.csv"
    path.write_text(text)
    return {"source": {"user_path": str(path), "format": "csv"}}


@pytest.mark.parametrize(("text", "words"), [
    ("caption\na red square\n", ["prompts.csv has no column 'prompt'", "text_column"]),
    ("prompt,seed\na red square,abc\n", ["prompts.csv is malformed"]),
])
def test_a_malformed_prompt_csv_is_one_line(tmp_path: Path, text: str, words: list[str]):
    cfg = _world(tmp_path)
    cfg["concept"]["prompts"]["acceptable"] = _user_csv(tmp_path, text)
    if "seed" in text:
        cfg["concept"]["prompts"]["acceptable"]["source"]["seed_column"] = "seed"
    with pytest.raises(HarnessError) as raised:
        execute(cfg)
    _one_line(raised, "set 'acceptable'", *words)


def test_an_empty_prompt_set_is_one_line(tmp_path: Path):
    cfg = _world(tmp_path)
    cfg["concept"]["prompts"]["acceptable"] = []
    with pytest.raises(HarnessError) as raised:
        execute(cfg)
    _one_line(raised, "prompt set 'acceptable' is empty")


def test_a_concept_without_c_u_is_one_line(tmp_path: Path):
    cfg = _world(tmp_path)
    del cfg["concept"]["c_u"]
    with pytest.raises(HarnessError) as raised:
        execute(cfg)
    _one_line(raised, "c_u")


def test_a_prompt_over_77_tokens_is_recorded(tmp_path: Path):
    import json

    cfg = _world(tmp_path)
    long_prompt = {"text": " ".join(["a red square on a gray background"] * 15), "seed": 0}
    cfg["concept"]["prompts"]["acceptable"] = [long_prompt, *cfg["concept"]["prompts"]["acceptable"]]
    summary = execute(cfg, pipelines=PipelineCache())
    checks = json.loads(Path(summary["outputs"]["results"]).read_text())["checks"]
    assert checks["truncated_prompts"] == {"acceptable": 1} and checks["token_window"] == 77


# -- fits and judges -----------------------------------------------------------------------------------------------


def test_nan_in_a_fit_stops_it_and_stores_no_artifact(tmp_path: Path):
    cfg = plugin(_world(tmp_path), "crt", "tests.runners.fakes.FakeEditCRT", "fake_edit", diverge=True)
    with pytest.raises(HarnessError) as raised:
        execute(cfg, pipelines=PipelineCache())
    _one_line(raised, "fit of fake_edit", "nothing was stored")
    assert_nothing_fitted(cfg["store"]["root"])


def test_judge_weights_missing_offline_stop_the_run_up_front(tmp_path: Path):
    cfg = compose_config(["concept=vangogh", f"store.root={tmp_path / 'store'}", f"results.dir={tmp_path / 'r'}"])
    with pytest.raises(HarnessError) as raised:
        execute(cfg)
    _one_line(raised, "concept.judge.path=")
