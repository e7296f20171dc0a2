"""The UNet-edit base: params build the config, and apply writes the artifact's parameters into a copy of the UNet."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from crt.base import OPEN_WEIGHTS, Artifact, UNetEdit, frozen, frozen_params
from runners import registry
from runners.registry import available
from runners.spec import Family
from tests.runners.conftest import compose_config


class Pipe:
    """The two things ``replace_module`` uses of a diffusers pipeline: ``components`` and the constructor."""

    def __init__(self, unet: nn.Module, text_encoder: nn.Module):
        self.unet, self.text_encoder = unet, text_encoder

    @property
    def components(self) -> dict[str, Any]:
        return {"unet": self.unet, "text_encoder": self.text_encoder}


@dataclass(frozen=True)
class ScaleConfig:
    factor: float = 2.0
    layers: tuple[str, ...] = ("weight",)


class Scale(UNetEdit):
    """Doubles the named weights; its artifact is the factor only, so ``unet_parameters`` computes them."""

    name = "scale"
    family = Family.WEIGHT_EDIT
    config_class = ScaleConfig
    config_params = staticmethod(lambda params: {**params, "layers": tuple(params.get("layers", ("weight",)))})

    def fit(self, ctx: Any) -> Artifact:
        return Artifact(meta={"factor": self.config.factor})

    def unet_parameters(self, pipe: Any, artifact: Artifact) -> dict[str, torch.Tensor]:
        state = pipe.unet.state_dict()
        return {name: state[name] * artifact.meta["factor"] for name in self.config.layers}


class Overwrite(UNetEdit):
    name = "overwrite"
    family = Family.WEIGHT_EDIT
    config_class = ScaleConfig

    def fit(self, ctx: Any) -> Artifact:
        raise NotImplementedError


def _pipe() -> Pipe:
    torch.manual_seed(0)
    return Pipe(nn.Linear(3, 2), nn.Linear(2, 2))


def test_params_build_the_config_through_the_conversion_hook_and_identity_keeps_them_as_given():
    crt = Scale(factor=3.0, layers=["weight", "bias"])
    assert crt.config == ScaleConfig(3.0, ("weight", "bias"))
    assert crt.identity() == {"name": "scale", "version": "1", "params": {"factor": 3.0, "layers": ["weight", "bias"]}}
    with pytest.raises(TypeError):
        Scale(typo=1)


def test_apply_edits_a_copy_of_the_unet_and_leaves_the_base_and_other_modules_alone():
    pipe = _pipe()
    weight, bias = pipe.unet.weight.detach().clone(), pipe.unet.bias.detach().clone()
    defended = Scale(factor=3.0).apply(pipe, Artifact(meta={"factor": 3.0}))
    assert torch.equal(defended.pipe.unet.weight, 3.0 * weight) and torch.equal(defended.pipe.unet.bias, bias)
    assert torch.equal(pipe.unet.weight, weight) and defended.pipe.unet is not pipe.unet
    assert defended.pipe.text_encoder is pipe.text_encoder
    assert defended.crt_name == "scale" and defended.exposes == OPEN_WEIGHTS and defended.filter is None


def test_apply_writes_the_artifact_tensors_by_default_and_refuses_unknown_names():
    pipe = _pipe()
    new = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    defended = Overwrite().apply(pipe, Artifact(tensors={"weight": new}))
    assert torch.equal(defended.pipe.unet.weight, new) and not torch.equal(pipe.unet.weight, new)
    with pytest.raises(KeyError):
        Overwrite().apply(pipe, Artifact(tensors={"missing.weight": new}))


@pytest.mark.parametrize("option", available("crt"))
def test_every_weight_edit_crt_of_the_new_seed_papers_is_a_unet_edit(option: str):
    """The edits written on this base expose the open weights and the unerased model; ESD and UCE keep their own."""
    crt = registry.build_crt(compose_config([f"crt={option}"])["crt"], "mini")
    if option in ("ca", "ca_noise", "trce_stage1", "trce", "p_esd", "p_ca", "conceptprune", "shielddiff"):
        assert isinstance(crt, UNetEdit), option
    if isinstance(crt, UNetEdit):
        assert crt.exposes == OPEN_WEIGHTS and crt.family in (Family.WEIGHT_EDIT, Family.CLOSED_FORM_EDIT)


def test_frozen_turns_lists_at_any_depth_into_tuples_and_leaves_scalars_alone():
    assert frozen([["nude", "clothed"], ["naked", ["dressed"]]]) == (("nude", "clothed"), ("naked", ("dressed",)))
    assert frozen((1, [2.5, None])) == (1, (2.5, None))
    for scalar in ("nudity", b"raw", 3, 0.5, True, None):
        assert frozen(scalar) is scalar  # a string is not split into characters


def test_frozen_reads_hydra_containers_as_plain_tuples_and_dicts():
    cfg = OmegaConf.create({"pairs": [["a", "b"]], "options": {"scales": [0.9, 0.2], "k": 3}})
    assert frozen(cfg.pairs) == (("a", "b"),) and type(frozen(cfg.pairs)[0]) is tuple
    options = frozen(cfg.options)
    assert options == {"scales": (0.9, 0.2), "k": 3} and type(options) is dict


def test_frozen_params_freezes_only_the_named_keys_and_leaves_the_given_params_as_they_were():
    params = {"betas": [0.9, 0.999], "texts": ["x"], "options": {"w": [1]}, "heads": None}
    assert frozen_params(params, ("betas", "options", "heads", "absent")) == {
        "betas": (0.9, 0.999), "texts": ["x"], "options": {"w": (1,)}, "heads": None}
    assert params == {"betas": [0.9, 0.999], "texts": ["x"], "options": {"w": [1]}, "heads": None}
