"""Every option of every config group composes, and real concepts pick SD v1.4 unless told otherwise."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir

from runners.registry import available
from runners.stages import generation_settings
from tests.runners.conftest import CONF, compose_config

GROUPS = ("model", "concept", "crt", "attack", "judge", "metric", "experiment")


def _options() -> list[tuple[str, str]]:
    return [(group, option) for group in GROUPS for option in available(group)]


@pytest.mark.parametrize(("group", "option"), _options())
def test_every_group_option_composes(group: str, option: str):
    overrides = [f"{group}={option}"]
    if option == "local":
        overrides.append("model.path=/some/folder")
    cfg = compose_config(overrides)
    assert {"model", "concept", "crt", "attack", "judge", "metric", "store", "results"} <= set(cfg)
    assert cfg["concept"]["key"] and cfg["concept"]["c_u"] and cfg["concept"]["c_a"]
    assert cfg["crt"]["handler"] and cfg["attack"]["handler"]
    settings = generation_settings(cfg)
    assert settings.steps > 0 and settings.height % 8 == 0


@pytest.mark.parametrize("launcher", ["basic", "slurm", "submitit_slurm", "submitit_local"])
def test_hydra_launchers_compose(launcher: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=[f"hydra/launcher={launcher}"], return_hydra_config=True)
    assert cfg.hydra.launcher._target_
    if launcher == "slurm":
        assert cfg.hydra.launcher.gpus_per_node == 1


def test_defaults_are_the_miniature_world():
    cfg = compose_config()
    assert cfg["model"]["name"] == "mini" and cfg["concept"]["key"] == "world_nudity"
    assert cfg["crt"]["name"] == "espresso" and cfg["attack"]["name"] == "ringabell"
    assert cfg["model"]["generation"]["height"] == 32 and cfg["model"]["generation"]["steps"] == 25
    assert cfg["model"]["generation"]["guidance"] == 5.0 and cfg["model"]["evaluator"]["backend"] == "hf"
    assert cfg["logging"]["wandb"] is False and cfg["logging"]["wandb_mode"] == "offline"


def test_real_concepts_select_sd14_unless_a_model_is_given():
    assert compose_config(["concept=nudity"])["model"]["name"] == "sd14"
    assert compose_config(["concept=nudity", "model=sd15"])["model"]["name"] == "sd15"
    assert compose_config(["model=sd15", "concept=violence"])["model"]["name"] == "sd15"
    sd14 = compose_config(["concept=nudity"])["model"]
    assert sd14["path"] == "CompVis/stable-diffusion-v1-4" and sd14["dtype"] == "auto"
    assert sd14["generation"] == {**sd14["generation"], "scheduler": "ddim", "steps": 50, "guidance": 7.5,
                                  "height": 512, "seed": 42}


def test_paper_presets_override_generation():
    espresso = compose_config(["concept=nudity", "experiment=espresso_paper"])["model"]["generation"]
    assert (espresso["scheduler"], espresso["steps"], espresso["guidance"], espresso["seed"],
            espresso["images_per_prompt"]) == ("ddim", 50, 7.5, 42, 6)
    unlearn = compose_config(["concept=nudity", "experiment=unlearndiffatk_paper"])["model"]["generation"]
    assert (unlearn["scheduler"], unlearn["steps"], unlearn["row_guidance"]) == ("lms", 50, True)


def test_local_model_keeps_sd_settings():
    cfg = compose_config(["model=local", "model.path=/x/y"])["model"]
    assert cfg["name"] == "local" and cfg["path"] == "/x/y" and cfg["generation"]["steps"] == 50


@pytest.mark.parametrize("group", ["crt", "attack"])
@pytest.mark.parametrize("model", ["mini", "sd14"])
def test_every_plugin_builds_from_its_config_with_per_model_params(group: str, model: str):
    from runners import registry
    from runners.spec import canonical_json

    build = registry.build_crt if group == "crt" else registry.build_attack
    for option in available(group):
        cfg = compose_config([f"{group}={option}", f"model={model}"])[group]
        plugin = build(cfg, model)
        expected = {**(cfg.get("params") or {}), **(cfg.get(model) or {})}
        assert plugin.params == expected, option
        assert canonical_json(plugin.identity())


def test_per_model_block_cannot_invent_params():
    from runners.models import HarnessError
    from runners.registry import build_crt

    cfg = {"name": "none", "handler": "crt.none.NoCRT", "params": {}, "mini": {"typo": 1}}
    with pytest.raises(HarnessError, match="unknown params"):
        build_crt(cfg, "mini")


def test_concept_plugin_params_override_model_block_and_cannot_invent_params():
    from runners.models import HarnessError
    from runners.registry import build_attack

    cfg = {"name": "unlearndiffatk", "handler": "attacks.unlearndiffatk.UnlearnDiffAtk",
           "params": {"k": 5, "t_step": 20}, "mini": {"t_step": 100, "k": 4}}
    concept = {"key": "vangogh", "plugin_params": {"unlearndiffatk": {"k": 3}, "esd_x": {"concept": "x"}}}
    attack = build_attack(cfg, "mini", concept)
    assert attack.params == {"k": 3, "t_step": 100}
    assert build_attack(cfg, "mini", {"key": "other"}).params == {"k": 4, "t_step": 100}
    with pytest.raises(HarnessError, match="unknown params"):
        build_attack(cfg, "mini", {"key": "bad", "plugin_params": {"unlearndiffatk": {"typo": 1}}})


def test_every_weight_edit_exposes_the_unerased_model():
    """An edit of a public model leaves the public base available: P4D's attacker needs both (a CRT that forgot
    it refused every P4D run)."""
    from runners import registry
    from runners.spec import Access, Family

    edits = 0
    for option in available("crt"):
        crt = registry.build_crt(compose_config([f"crt={option}"])["crt"], "mini")
        if crt.family in (Family.WEIGHT_EDIT, Family.CLOSED_FORM_EDIT):
            edits += 1
            assert Access.UNERASED_MODEL in crt.exposes, option
    assert edits >= 4
