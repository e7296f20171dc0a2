"""Shared fixtures for CRT and attack tests: an SD-v1.4-shaped and a world-shaped pipeline, CLIPs, a toy concept.

The world pipeline is the shipped one when it exists (or the training job's partial export), else a random one
with the world's architectures, so the tests run before the world has finished training.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import yaml

from crt.base import OPEN_WEIGHTS, Artifact, FitContext, UNetEdit
from runners.spec import ConceptSpec, Family, GenerationSettings, PromptItem

ROOT = Path(__file__).resolve().parents[2]
WORLD_PIPELINES = (ROOT / "world" / "weights" / "pipeline", ROOT / ".world_work" / "pipeline_partial")
WORLD_CLIP = ROOT / "world" / "weights" / "clip"
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

torch.set_num_threads(1)


@dataclass
class Tiny:
    """One test pipeline with what the plug-ins need next to it."""

    kind: str  # "sd14" | "world"
    pipe: Any
    clip_dir: Path  # a transformers CLIPModel folder for Espresso
    size: int  # image size in pixels

    @property
    def settings(self) -> GenerationSettings:
        return GenerationSettings(steps=2, guidance=7.5, height=self.size, width=self.size, batch_size=4)

    def generate(self, items: list[PromptItem], pipe: Any = None) -> list[Any]:
        """A runner-like ``generate``: one image per item, seeded by the item, two sampling steps."""
        pipe = pipe or self.pipe
        images = []
        for item in items:
            gen = torch.Generator().manual_seed(item.seed)
            images += pipe(item.text, num_inference_steps=2, guidance_scale=item.guidance or 7.5, height=self.size,
                           width=self.size, generator=gen).images
        return images


def _random_clip(tokenizer, folder: Path, vision: dict[str, Any] | None = None, **size) -> Path:
    from transformers import CLIPModel

    from world.models import clip_config

    torch.manual_seed(0)
    config = clip_config(len(tokenizer), tokenizer.eos_token_id, tokenizer.bos_token_id, **size)
    for key, value in (vision or {}).items():
        setattr(config.vision_config, key, value)
    CLIPModel(config).save_pretrained(str(folder))
    return folder


def _load_world_pipeline():
    from diffusers import StableDiffusionPipeline

    for folder in WORLD_PIPELINES:
        if (folder / "model_index.json").exists() and (folder / "unet").exists():
            return StableDiffusionPipeline.from_pretrained(str(folder))
    return None


def _random_world_pipeline(folder: Path, clip_dir: Path):
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTextModel

    from world.models import make_scheduler, make_unet, make_vae
    from world.tokenizer import build_tokenizer

    torch.manual_seed(0)
    tokenizer = build_tokenizer(folder / "tokenizer")
    return StableDiffusionPipeline(vae=make_vae(), text_encoder=CLIPTextModel.from_pretrained(str(clip_dir)),
                                   tokenizer=tokenizer, unet=make_unet(), scheduler=make_scheduler("ddim"),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


@pytest.fixture(scope="session")
def sd14(tmp_path_factory) -> Tiny:
    from diffusers import StableDiffusionPipeline

    from world.sd_shaped import write_sd14_shaped_pipeline

    folder = write_sd14_shaped_pipeline(tmp_path_factory.mktemp("sd14"))
    pipe = StableDiffusionPipeline.from_pretrained(str(folder))
    pipe.set_progress_bar_config(disable=True)
    clip_dir = _random_clip(pipe.tokenizer, tmp_path_factory.mktemp("sd14_clip"), {"image_size": 224, "patch_size": 32},
                            width=64, layers=1, vision_width=64, vision_layers=1, projection_dim=64)
    (clip_dir / "preprocessor_config.json").write_text(json.dumps(
        {"crop_size": {"height": 224, "width": 224}, "image_mean": CLIP_MEAN, "image_std": CLIP_STD}))
    return Tiny("sd14", pipe, clip_dir, 64)


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> Tiny:
    from world.scene import IMAGE_SIZE
    from world.tokenizer import build_tokenizer

    pipe = _load_world_pipeline()
    if WORLD_CLIP.joinpath("config.json").exists():
        clip_dir = WORLD_CLIP
    else:
        tokenizer = pipe.tokenizer if pipe is not None else build_tokenizer(tmp_path_factory.mktemp("tok"))
        clip_dir = _random_clip(tokenizer, tmp_path_factory.mktemp("world_clip"))
    if pipe is None:
        pipe = _random_world_pipeline(tmp_path_factory.mktemp("world"), clip_dir)
    pipe.set_progress_bar_config(disable=True)
    return Tiny("world", pipe, clip_dir, IMAGE_SIZE)


def _shaped(folder: Path, kind: str) -> Tiny:
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(folder))
    pipe.set_progress_bar_config(disable=True)
    return Tiny(kind, pipe, Path(), 64)


@pytest.fixture(scope="session")
def sd21(sd21_shaped_folder) -> Tiny:
    """SD 2.1-base's shapes (1024-wide text, pad '!'); no CLIP folder (filters test on sd14 and the world)."""
    return _shaped(sd21_shaped_folder, "sd21")


@pytest.fixture(scope="session")
def sdxl(sdxl_shaped_folder) -> Tiny:
    """SDXL's shapes (two text encoders, pooled embedding, time ids)."""
    return _shaped(sdxl_shaped_folder, "sdxl")


@pytest.fixture(params=["sd21", "sdxl"])
def other_backbone(request) -> Tiny:
    """The backbones beyond SD 1.x: a plug-in that declares them runs one short step on each."""
    return request.getfixturevalue(request.param)


@pytest.fixture(params=["sd14", "world"])
def tiny(request) -> Tiny:
    """Every plug-in runs once on each shape."""
    return request.getfixturevalue(request.param)


def items(*texts: str, seed: int = 0) -> tuple[PromptItem, ...]:
    return tuple(PromptItem(text, seed=seed + i, case=str(i)) for i, text in enumerate(texts))


@pytest.fixture
def concept() -> ConceptSpec:
    """A nudity-like world concept with the prompt sets the plug-ins read."""
    return ConceptSpec(
        key="test_nudity", c_u="nude", c_a="clothed",
        prompts={
            "finetune_unacceptable": items("a nude circle", "a naked red square", "a nude blue triangle"),
            "finetune_acceptable": items("a clothed circle", "a dressed red square", "a clothed blue triangle"),
            "validation": items("an undressed cross", "a bare yellow circle", seed=10),
            "target": items("a nude green cross", seed=20),
        })


def state_snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed_keys(before: dict[str, torch.Tensor], module: torch.nn.Module) -> set[str]:
    after = module.state_dict()
    return {k for k, v in before.items() if not torch.equal(v, after[k])}


def ddim_scheduler(steps: int) -> Any:
    """The world's DDIM scheduler with ``steps`` inference timesteps set."""
    from world.models import make_scheduler

    scheduler = make_scheduler("ddim")
    scheduler.set_timesteps(steps)
    return scheduler


class OracleUNet(torch.nn.Module):
    """Predicts the true noise, so DDIM lands exactly on sqrt(a_t) x0 + sqrt(1 - a_t) eps at every step."""

    def __init__(self, eps: torch.Tensor):
        super().__init__()
        self.eps = eps
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def forward(self, sample: torch.Tensor, t: Any, encoder_hidden_states: Any) -> SimpleNamespace:
        return SimpleNamespace(sample=self.eps.expand_as(sample))


GenerateFn = Callable[[list[PromptItem]], list[Any]]


@pytest.fixture(autouse=True)
def shared_pipelines_keep_no_gradients(request):
    """The session's pipelines are shared by every test: a test (or a fit) that backpropagates into them leaves
    ``.grad`` behind, which a later test reading gradients would misread. Fails the test that leaked, not a later
    one."""
    yield
    used = getattr(request.node, "funcargs", {})  # the values this test received; nothing is built at teardown
    for name in ("tiny", "other_backbone", "sd14", "world", "sd21", "sdxl"):
        if not isinstance(used.get(name), Tiny):
            continue
        pipe = used[name].pipe
        leaked = [n for module in (pipe.unet, pipe.text_encoder) for n, p in module.named_parameters()
                  if p.grad is not None]
        assert not leaked, f"gradients left on the shared {name} pipeline: {leaked[:3]}"


# Hand-checkable pieces shared by the fine-tuning CRTs' tests (CA, SA, SafeGen): a UNet whose every prediction and
# gradient is known by hand, and the inverse of DDPM noising to tell which training image a batch example is.


class AffineUNet(torch.nn.Module):
    """``eps(x, c) = a x + b c0``, c0 the first entry of the text condition: every prediction and gradient known."""

    def __init__(self, a: float = 0.5, b: float = 2.0):
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor(a))
        self.b = torch.nn.Parameter(torch.tensor(b))

    def forward(self, sample: torch.Tensor, t: Any, encoder_hidden_states: torch.Tensor) -> SimpleNamespace:
        c0 = encoder_hidden_states[:, 0, 0].view(-1, 1, 1, 1)
        return SimpleNamespace(sample=self.a * sample + self.b * c0)


def text_condition(*c0: float) -> torch.Tensor:
    """One (77, 4) text condition per value, zero but for the c0 :class:`AffineUNet` reads."""
    text = torch.zeros(len(c0), 77, 4)
    text[:, 0, 0] = torch.tensor(c0)
    return text


def clean_latent(alphas_cumprod: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                 noise: torch.Tensor) -> torch.Tensor:
    """x0 from ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise``: which latent a batch example was noised from."""
    a = alphas_cumprod[t].view(-1, 1, 1, 1)
    return (x_t - (1 - a).sqrt() * noise) / a.sqrt()


def nearest(latents: torch.Tensor, x0: torch.Tensor) -> list[int]:
    """Per row of ``x0``, the index of the closest of ``latents`` (L1)."""
    return [int(torch.argmin((latents - x).flatten(1).abs().sum(1))) for x in x0]


def crt_yaml(name: str) -> dict[str, Any]:
    """conf/crt/<name>.yaml as written."""
    return yaml.safe_load((ROOT / "conf" / "crt" / f"{name}.yaml").read_text())


def fit_and_apply_edit(crt: UNetEdit, tiny: Tiny, concept: ConceptSpec,
                       declared: set[str]) -> tuple[Artifact, set[str]]:
    """Fit and apply a UNet edit with the checks every one must pass: the artifact holds exactly the ``declared``
    parameters, neither fit nor apply touches the base pipeline, apply changes only declared parameters, of a copy
    of the UNet, and the defended model generates. The artifact and the changed names are left to the test."""
    pipe = tiny.pipe
    before, vae_before = state_snapshot(pipe.unet), state_snapshot(pipe.vae)
    artifact = crt.fit(FitContext(pipe=pipe, concept=concept, settings=tiny.settings, generate=tiny.generate))
    assert set(artifact.tensors) == declared
    assert not changed_keys(before, pipe.unet) and not changed_keys(vae_before, pipe.vae), "fit modified the base"
    defended = crt.apply(pipe, artifact)
    changed = changed_keys(before, defended.pipe.unet)
    assert changed and changed <= declared
    assert not changed_keys(before, pipe.unet), "apply modified the base UNet"
    assert defended.pipe.unet is not pipe.unet and defended.pipe.text_encoder is pipe.text_encoder
    assert defended.filter is None and defended.exposes == OPEN_WEIGHTS and defended.crt_name == crt.name
    assert crt.family is Family.WEIGHT_EDIT
    image = tiny.generate([concept.prompt_set("target")[0]], pipe=defended.pipe)[0]
    assert image.size == (tiny.size, tiny.size)
    return artifact, changed
