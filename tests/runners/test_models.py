"""The real-path loader: local folders, hub ids that cannot be reached, weight hashing, scheduler swaps, and the
hardware knobs (dtype, attention, compile, VAE slicing) with which of them enter the keys."""

from __future__ import annotations

import copy
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0
from PIL import Image

from crt_bench.spec import HarnessError
from runners.generate import ImageMaker, ImageRequest, base_system
from runners.models import (
    ModelUnavailable,
    PipelineCache,
    PipelineOptions,
    locate_model,
    pipeline_files,
    resolve_dtype,
    set_scheduler,
    weights_sha256,
)
from runners.spec import GenerationSettings, PromptItem
from runners.store import Store, key_of
from tests.runners.conftest import compose_config

BATCH_EFFECT_LEVELS = 2  # the bound tests/runners/test_generate.py sets on pixels across batch sizes


def _model_cfg(folder: Path, **knobs) -> dict:
    cfg = compose_config(["model=sd14"])["model"]
    cfg.update(path=str(folder), **knobs)
    return cfg


def test_sd14_shaped_pipeline_loads_from_a_local_folder_and_generates_one_image(sd14_shaped_folder, tmp_path):
    store = Store(tmp_path / "store")
    handle = PipelineCache().open(_model_cfg(sd14_shaped_folder), tmp_path, store, "ddim")
    assert handle.location.source == "local" and handle.dtype == torch.float32  # dtype auto on a CPU -> fp32
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


def test_dtype_auto_is_half_on_cuda_only_and_fp16_on_a_cpu_is_refused_in_one_line(caplog):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_dtype("auto", cpu) == torch.float32 and resolve_dtype("auto", cuda) == torch.float16
    assert resolve_dtype("float16", cuda) == torch.float16 and resolve_dtype("float32", cuda) == torch.float32
    with pytest.raises(HarnessError, match="model.dtype=auto") as error:
        resolve_dtype("float16", cpu)
    assert "\n" not in str(error.value) and "model.dtype=float16" in str(error.value)
    with caplog.at_level("WARNING", logger="runners.models"):
        assert resolve_dtype("bfloat16", cpu) == torch.bfloat16
    assert "slow" in caplog.text
    with pytest.raises(HarnessError, match="float64"):
        resolve_dtype("float64", cpu)


@pytest.mark.parametrize(("knob", "value"), [("attention", "flash"), ("compile", "yes"), ("vae_slicing", 2),
                                             ("dtype", "float16")])
def test_a_bad_knob_fails_in_one_line_before_the_model_is_looked_for(knob, value, tmp_path):
    cfg = {"name": "sd14", "path": str(tmp_path / "absent"), "device": "cpu", knob: value}
    with pytest.raises(HarnessError, match=f"model.{knob}=") as error:
        PipelineCache().open(cfg, tmp_path, Store(tmp_path / "s"), "ddim")
    assert "\n" not in str(error.value) and not isinstance(error.value, ModelUnavailable)


def _processors(module: torch.nn.Module) -> set[type]:
    return {type(p) for p in module.attn_processors.values()}


def test_defaults_keep_sdpa_no_slicing_no_compile(sd14_shaped_folder, tmp_path):
    handle = PipelineCache().open(_model_cfg(sd14_shaped_folder), tmp_path, Store(tmp_path / "s"), "ddim")
    assert handle.options == PipelineOptions()
    pipe = handle.pipe
    assert _processors(pipe.unet) == {AttnProcessor2_0} and _processors(pipe.vae) == {AttnProcessor2_0}
    assert pipe.vae.use_slicing is False and pipe.unet._compiled_call_impl is None
    assert pipe.unet.dtype == torch.float32


def test_each_knob_is_applied_through_diffusers_and_torch(sd14_shaped_folder, tmp_path):
    reference = PipelineCache().open(_model_cfg(sd14_shaped_folder), tmp_path, Store(tmp_path / "s"), "ddim").pipe
    cfg = _model_cfg(sd14_shaped_folder, dtype="bfloat16", attention="eager", compile=True, vae_slicing=True)
    pipe = PipelineCache().open(cfg, tmp_path, Store(tmp_path / "s"), "ddim").pipe
    assert _processors(pipe.unet) == {AttnProcessor} and _processors(pipe.vae) == {AttnProcessor}
    assert pipe.vae.use_slicing is True
    assert pipe.unet.dtype == torch.bfloat16 and pipe.text_encoder.dtype == torch.bfloat16
    # compiled in place (compiles on its first call, never made here): the module, its names and keys are unchanged
    assert pipe.unet._compiled_call_impl is not None and type(pipe.unet).__name__ == "UNet2DConditionModel"
    assert list(pipe.unet.state_dict()) == list(reference.unet.state_dict())


def _keys_and_pixels(folder: Path, tmp_path: Path, **knobs) -> tuple[list[str], list[np.ndarray], dict]:
    store = Store(tmp_path / "store")
    cfg = {"name": "sd14-shaped", "path": str(folder), "dtype": "float32", "device": "cpu", **knobs}
    handle = PipelineCache().open(cfg, tmp_path, store, "ddim")
    settings = GenerationSettings(steps=2, guidance=7.5, height=64, width=64, scheduler="ddim", batch_size=2)
    maker = ImageMaker(store, handle, settings, progress=False)
    requests = [ImageRequest(PromptItem("a red circle", 1)), ImageRequest(PromptItem("a blue square", 2))]
    system = base_system(handle)
    keys = [key_of(maker.image_spec(system, r)) for r in requests]
    images = maker.sample(system.defended.pipe, requests, 7.5, "")
    return keys, [np.asarray(image, dtype=int) for image in images], handle.description


def test_keys_change_exactly_when_pixels_can_change(sd14_shaped_folder, tmp_path):
    keys, pixels, _ = _keys_and_pixels(sd14_shaped_folder, tmp_path)
    for knobs in ({"attention": "eager"}, {"vae_slicing": True}):
        other_keys, other_pixels, description = _keys_and_pixels(sd14_shaped_folder, tmp_path, **knobs)
        assert other_keys == keys  # not keyed: the same function in another order of operations ...
        worst = max(int(np.abs(a - b).max()) for a, b in zip(pixels, other_pixels))
        assert worst <= BATCH_EFFECT_LEVELS  # ... moving pixels no more than the (unkeyed) batch size does
        assert all(description[k] == v for k, v in knobs.items())  # but recorded in the results' provenance
    bf16_keys, bf16_pixels, description = _keys_and_pixels(sd14_shaped_folder, tmp_path, dtype="bfloat16")
    assert description["dtype"] == "bfloat16" and not set(bf16_keys) & set(keys)
    assert max(int(np.abs(a - b).max()) for a, b in zip(pixels, bf16_pixels)) > BATCH_EFFECT_LEVELS
    compiled = PipelineCache().open({"name": "x", "path": str(sd14_shaped_folder), "device": "cpu", "compile": True},
                                    tmp_path, Store(tmp_path / "store"), "ddim")
    plain = PipelineCache().open({"name": "x", "path": str(sd14_shaped_folder), "device": "cpu"},
                                 tmp_path, Store(tmp_path / "store"), "ddim")
    assert compiled.identity == plain.identity and compiled.description["compile"] is True


def test_one_process_keeps_one_pipeline_per_set_of_knobs(sd14_shaped_folder, tmp_path):
    cache, store = PipelineCache(), Store(tmp_path / "s")
    plain = cache.open(_model_cfg(sd14_shaped_folder), tmp_path, store, "ddim")
    assert cache.open(_model_cfg(sd14_shaped_folder), tmp_path, store, "ddim") is plain
    sliced = cache.open(_model_cfg(sd14_shaped_folder, vae_slicing=True), tmp_path, store, "ddim")
    assert sliced is not plain and sliced.options.vae_slicing and not plain.options.vae_slicing


def test_a_deep_copy_of_a_compiled_module_runs_its_own_weights():
    """Every weight-editing CRT deep-copies the pipeline's UNet and edits the copy (crt.base.edited_copy)."""
    module = torch.nn.Linear(4, 4)
    module.compile(backend="eager")  # what model.compile does to the UNet, with the cheapest backend
    x = torch.ones(2, 4)
    before = module(x).detach()
    edited = copy.deepcopy(module)
    with torch.no_grad():
        edited.weight.zero_()
        edited.bias.fill_(3.0)
    assert torch.equal(edited(x), torch.full((2, 4), 3.0)) and torch.equal(module(x), before)


def test_a_folder_of_another_backbone_than_declared_is_one_line(sd21_shaped_folder, tmp_path):
    cfg = {**_model_cfg(sd21_shaped_folder), "name": "sd14", "backbone": "sd1"}
    with pytest.raises(HarnessError, match=r"holds an sd2 pipeline but model 'sd14' declares backbone sd1; pass "
                                           r"model.backbone=sd2"):
        _ = PipelineCache().open(cfg, tmp_path, Store(tmp_path / "s"), "ddim").pipe
    handle = PipelineCache().open({**cfg, "backbone": "sd2"}, tmp_path, Store(tmp_path / "s2"), "ddim")
    assert handle.pipe.text_encoder.config.hidden_size == 1024
