"""The real-path loader: local folders, hub ids that cannot be reached, weight hashing, scheduler swaps."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from runners.generate import ImageMaker, base_system
from runners.models import (
    ModelUnavailable,
    PipelineCache,
    locate_model,
    pipeline_files,
    resolve_dtype,
    set_scheduler,
    weights_sha256,
)
from runners.spec import GenerationSettings, PromptItem
from runners.store import Store
from tests.runners.conftest import compose_config


def _model_cfg(folder: Path) -> dict:
    cfg = compose_config(["model=sd14"])["model"]
    cfg.update(path=str(folder), dtype="float16")
    return cfg


def test_sd14_shaped_pipeline_loads_from_a_local_folder_and_generates_one_image(sd14_shaped_folder, tmp_path):
    store = Store(tmp_path / "store")
    handle = PipelineCache().open(_model_cfg(sd14_shaped_folder), tmp_path, store, "ddim")
    assert handle.location.source == "local" and handle.dtype == torch.float32  # fp16 config on CPU -> fp32
    assert type(handle.pipe).__name__ == "StableDiffusionPipeline"
    assert handle.pipe.safety_checker is None
    assert type(handle.pipe.scheduler).__name__ == "DDIMScheduler"
    settings = GenerationSettings(steps=2, guidance=7.5, height=64, width=64, scheduler="ddim", batch_size=1)
    maker = ImageMaker(store, handle, settings, progress=False)
    base = base_system(handle)
    (record,) = maker.make(base, maker.requests([PromptItem("a red circle", seed=3)]))
    image = maker.load(record.key)
    assert isinstance(image, Image.Image) and image.size == (64, 64)


def test_missing_local_folder_fails_with_one_actionable_line(tmp_path):
    cfg = {"name": "mini", "path": "world/weights/nothing_here"}
    with pytest.raises(ModelUnavailable, match=r"model.path=/path/to/local/diffusers/folder") as error:
        locate_model(cfg, tmp_path)
    assert "\n" not in str(error.value) and "make world" in str(error.value)


def test_unreachable_hub_id_fails_within_seconds(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    start = time.perf_counter()
    with pytest.raises(ModelUnavailable) as error:
        locate_model({"name": "sd14", "path": "CompVis/stable-diffusion-v1-4"}, tmp_path)
    assert time.perf_counter() - start < 30
    message = str(error.value)
    assert "'CompVis/stable-diffusion-v1-4'" in message and "model.path=" in message and "\n" not in message


def test_fallback_folder_is_used_when_the_main_one_is_missing(sd14_shaped_folder, tmp_path):
    cfg = {"name": "mini", "path": str(tmp_path / "absent"), "fallback_path": str(sd14_shaped_folder)}
    location = locate_model(cfg, tmp_path)
    assert location.folder == sd14_shaped_folder.resolve()


def test_weights_hash_is_stable_and_follows_the_weights(sd14_shaped_folder, tmp_path):
    store = Store(tmp_path / "store")
    copy = tmp_path / "copy"
    shutil.copytree(sd14_shaped_folder, copy)
    first = weights_sha256(sd14_shaped_folder, store)
    assert weights_sha256(copy, store) == first  # where the folder lives is not part of the identity
    (copy / "unet" / "extra_notes.md").write_text("not a pipeline file?")  # non-weight files in components count
    assert weights_sha256(copy, store) != first
    (copy / "unet" / "extra_notes.md").unlink()
    weights = next((copy / "unet").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x00")
    assert weights_sha256(copy, store) != first


def test_pipeline_files_choose_one_weights_format(tmp_path):
    (tmp_path / "unet").mkdir()
    (tmp_path / "model_index.json").write_text('{"unet": ["diffusers", "UNet2DConditionModel"], "x": 1}')
    for name in ("config.json", "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin",
                 "diffusion_pytorch_model.fp16.safetensors"):
        (tmp_path / "unet" / name).write_bytes(b"0")
    names = [p.name for p in pipeline_files(tmp_path, None)]
    assert names == ["model_index.json", "config.json", "diffusion_pytorch_model.safetensors"]
    assert "diffusion_pytorch_model.fp16.safetensors" in [p.name for p in pipeline_files(tmp_path, "fp16")]


def test_scheduler_swap_keeps_the_noise_schedule(sd14_shaped_folder, tmp_path):
    handle = PipelineCache().open(_model_cfg(sd14_shaped_folder), tmp_path, Store(tmp_path / "s"), "lms")
    assert type(handle.pipe.scheduler).__name__ == "LMSDiscreteScheduler"
    assert handle.pipe.scheduler.config.beta_end == pytest.approx(0.012)
    set_scheduler(handle.pipe, "ddim")
    assert type(handle.pipe.scheduler).__name__ == "DDIMScheduler"


def test_cpu_never_computes_in_half_precision():
    assert resolve_dtype("float16", torch.device("cpu")) == torch.float32
    assert resolve_dtype("float16", torch.device("cuda")) == torch.float16
