"""Bad numbers on the command line fail up front with one line naming the key and the fix; a NaN fit stores nothing."""

from __future__ import annotations

import math

import pytest

from run import execute
from runners.models import HarnessError
from runners.registry import available
from runners.validate import validate_config
from tests.runners.conftest import assert_nothing_fitted, compose_config, plugin


@pytest.mark.parametrize("model", available("model"))
def test_every_shipped_model_config_is_valid(model: str):
    overrides = [f"model={model}"] + (["model.path=/some/folder"] if model == "local" else [])
    validate_config(compose_config(overrides))


@pytest.mark.parametrize(("override", "words"), [
    ("model.generation.steps=0", ["model.generation.steps=0", ">= 1"]),  # was a ZeroDivisionError
    ("model.generation.steps=2.5", ["model.generation.steps=2.5", "not an integer"]),
    ("model.generation.guidance=abc", ["model.generation.guidance='abc'", "not a number"]),
    ("model.generation.height=-32", ["model.generation.height=-32", ">= 8"]),
    ("model.generation.width=30", ["model.generation.width=30", "multiple of 8", "24"]),
    ("model.generation.images_per_prompt=0", ["images_per_prompt=0"]),
    ("threads=abc", ["threads='abc'", "not an integer"]),
    ("threads=0", ["threads=0", ">= 1"]),
    ("model.max_prompts_per_set=-1", ["model.max_prompts_per_set=-1", "null for no limit"]),  # dropped a prompt
    ("+model.max_attack_targets=0", ["model.max_attack_targets=0"]),
])
def test_a_bad_number_is_one_line_naming_the_key_and_the_fix(override: str, words: list[str]):
    with pytest.raises(HarnessError) as error:
        validate_config(compose_config([override]))
    message = str(error.value)
    assert "\n" not in message and all(word in message for word in words), message


def test_nan_guidance_is_refused():
    cfg = compose_config()
    cfg["model"]["generation"]["guidance"] = math.nan
    with pytest.raises(HarnessError, match="guidance=nan"):
        validate_config(cfg)


@pytest.mark.parametrize("shift", [math.nan, math.inf])
def test_a_fit_with_non_finite_weights_stores_nothing(tiny_config, shift: float):
    cfg = plugin(tiny_config(), "crt", "tests.runners.fakes.FakeEditCRT", "fake_edit", shift=shift)
    with pytest.raises(HarnessError, match="non-finite weights .*conv_out.bias.*nothing was stored"):
        execute(cfg)
    assert_nothing_fitted(cfg["store"]["root"])


def test_a_fit_whose_loss_turns_nan_is_one_line_and_stores_nothing(tiny_config):
    cfg = plugin(tiny_config(), "crt", "tests.runners.fakes.FakeEditCRT", "fake_edit", diverge=True)
    with pytest.raises(HarnessError, match="fit of fake_edit .* stopped: .*loss is nan.*nothing was stored"):
        execute(cfg)
    assert_nothing_fitted(cfg["store"]["root"])

