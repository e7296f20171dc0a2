"""Each paper preset (conf/experiment/<paper>_paper.yaml) fixes that paper's protocol, checked against a table written
from the reference notes (metrics.md §5, §6, §9; attacks.md §1-§8; crts.md §1-§10; concepts.md §3, §4)."""

from __future__ import annotations

import copy
import functools
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest

from runners import registry
from runners.card import build_card
from runners.compare import generation_differences
from runners.paper_reference import PROTOCOLS
from runners.stages import generation_settings
from tests.runners.conftest import CONF, compose_config

ROW = "row"  # each prompt's own seed / guidance (an I2P-style CSV column)
ESD_PAPER = {"iterations": 1000, "lr": 1.0e-5, "target": "old", "start_guidance": 3.0, "ddim_steps": 50}  # crts §2
UDA_SCHEDULE = {"iterations": 40, "t_start": 10, "t_stop": 990, "t_step": 20, "lr": 0.01, "weight_decay": 0.1}
ESPRESSO_CONCEPTS = ("nudity", "violence", "disturbing", "hateful", "grumpy_cat", "nemo", "captain_marvel", "snoopy",
                     "r2d2", "taylor_swift", "angelina_jolie", "brad_pitt", "elon_musk")  # concepts.md §1
UDA_TASKS = {  # concepts.md §3, metrics.md §6, attacks.md §3: judge (name, preset) and k per task
    "nudity": ("nudenet", "unlearndiffatk", 5), "violence": ("q16", None, 5), "illegal": ("q16", None, 5),
    "vangogh": ("vangogh_style", None, 3), "church": ("resnet50", "church", 3),
    "garbage_truck": ("resnet50", "garbage_truck", 3), "parachute": ("resnet50", "parachute", 3),
    "tench": ("resnet50", "tench", 3)}

# preset -> what the references say: model, sampler (scheduler, steps, guidance, seed, images per prompt), dtype,
# judge (None = the concept's), default CRT / attack / concept, the attack's target set, budgets per plug-in, the
# protocol key, and the set the protocol's generation rules are read on.
EXPECTED: dict[str, dict[str, Any]] = {
    "espresso_paper": dict(model="sd14", sampler=("ddim", 50, 7.5, 42, 6), row_guidance=False, judge=None,
                           crt="espresso", attack="ringabell", target_set="ringabell_targets", protocol="espresso_v4",
                           protocol_set="implicit", concepts=ESPRESSO_CONCEPTS,
                           budgets={"ringabell": {"population": 200, "generations": 3000, "mutation_rate": 0.25,
                                                  "crossover_rate": 0.5, "length": 16, "eta": 3.0, "seed": 42},
                                    "pez": {"prompt_len": 16, "iterations": 3000, "lr": 0.1, "weight_decay": 0.1,
                                            "seed": 42},
                                    "cce": {"num_train_images": 25, "steps": 5000, "lr": 5.0e-3, "batch_size": 4,
                                            "grad_accum": 4},
                                    "sneakyprompt": {"num_subword": 1, "len_subword": 10, "q_limit": 60,
                                                     "threshold": 0.26}}),
    "unlearndiffatk_paper": dict(model="sd14", sampler=("lms", 50, ROW, ROW, 1), row_guidance=True, judge=None,
                                 crt="esd_x", attack="unlearndiffatk", target_set="unacceptable", protocol="uda",
                                 protocol_set="unacceptable", concepts=tuple(UDA_TASKS),
                                 budgets={"unlearndiffatk": UDA_SCHEDULE, "p4d_uda": UDA_SCHEDULE, "esd_x": ESD_PAPER}),
    "ringabell_paper": dict(model="sd14", sampler=("ddim", 50, 7.5, None, 1), row_guidance=True, judge=None,
                            crt="esd_u", attack="ringabell", target_set="ringabell_targets", protocol="ringabell",
                            protocol_set="ringabell_targets", concepts=("nudity", "violence"),
                            budgets={"ringabell": {"population": 200, "generations": 3000, "mutation_rate": 0.25,
                                                   "crossover_rate": 0.5, "length": 16, "eta": 3.0,
                                                   "score_text": False}}),
    "p4d_paper": dict(model="sd14", sampler=("dpm", 25, ROW, ROW, 3), row_guidance=True, dtype="float32", judge=None,
                      crt="esd_u", attack="p4d_n", target_set="p4d_ideal_esd", protocol="p4d",
                      protocol_set="p4d_ideal_esd", concepts=("nudity",),
                      budgets={"p4d_n": {"tokens": 16, "iterations": 3000, "lr": 0.1, "weight_decay": 0.1,
                                         "eval_every": 50, "images": 3, "target_set": "p4d_ideal_esd"},
                               "p4d_k": {"k": 3, "iterations": 3000, "lr": 0.1, "weight_decay": 0.1,
                                         "eval_every": 50, "images": 3, "target_set": "p4d_ideal_esd"},
                               "esd_u": ESD_PAPER}),
    "trce_paper": dict(model="sd14", sampler=("pndm", 30, 7.5, 42, 1), row_guidance=True, dtype="float16",
                       judge=("nudenet", "trce"), crt="trce_parity", attack="none", target_set="unacceptable",
                       protocol="trce", protocol_set="unacceptable", concepts=("nudity",),
                       budgets={"trce": {"parity": True}, "trce_stage1": {"parity": True}}),
    "esd_paper": dict(model="sd14", sampler=("lms", 100, 7.5, ROW, 1), row_guidance=False, judge=None, crt="esd_u",
                      attack="none", target_set="unacceptable", protocol="esd", protocol_set="unacceptable",
                      concepts=("nudity", "vangogh"), budgets={"esd_u": ESD_PAPER, "esd_x": ESD_PAPER}),
    "uce_paper": dict(model="sd14", sampler=("lms", 100, 7.5, ROW, 1), row_guidance=False, judge=None,
                      crt="uce_eot", attack="none", target_set="unacceptable", protocol="uce",
                      protocol_set="unacceptable", concepts=("nudity", "vangogh"),
                      budgets={"uce_eot": {"lamb": 0.5, "erase_scale": 1.0, "preserve_scale": None, "tokens": "all",
                                           "preserve_empty": True, "erase": ["nudity"], "guide": ""}}),
    "ca_paper": dict(model="sd14", sampler=("ddim", 50, 7.5, None, 1), row_guidance=True, judge=None, crt="ca",
                     attack="none", target_set="unacceptable", protocol="ca_readme", protocol_set="unacceptable",
                     concepts=("nudity",),
                     budgets={"ca": {"parameter_group": "attn", "with_prior_preservation": True, "lr": 4.0e-6,
                                     "batch_size": 4, "max_train_steps": 800, "num_anchor_images": 1000,
                                     "hflip": False}}),
    "rece_paper": dict(model="sd14", sampler=("lms", 50, ROW, ROW, 1), row_guidance=True, judge=("nudenet", "rece"),
                       crt="rece", attack="none", target_set="unacceptable", protocol="rece",
                       protocol_set="unacceptable", concepts=("nudity",),
                       budgets={"unlearndiffatk": UDA_SCHEDULE, "p4d_uda": UDA_SCHEDULE,
                                "rece": {"erase": ["nudity"], "epochs": 3, "regular_scale": 0.1, "lamb": 0.1,
                                         "select": "validation"}}),
    "conceptprune_paper": dict(model="sd15", sampler=("pndm", 50, 7.5, None, 1), row_guidance=True,
                               judge=("nudenet", "conceptprune"), crt="conceptprune", attack="none",
                               target_set="unacceptable", protocol="conceptprune", protocol_set="unacceptable",
                               concepts=("nudity",), budgets={"conceptprune": {"skill_ratio": 0.01, "tau": 10}}),
    "pruning_paper": dict(model="sd14", sampler=("lms", 50, ROW, ROW, 1), row_guidance=True, judge=None, crt="p_esd",
                          attack="unlearndiffatk", target_set="unacceptable", protocol="pruning",
                          protocol_set="unacceptable", concepts=("nudity",),
                          budgets={"unlearndiffatk": UDA_SCHEDULE}),
    "shielddiff_paper": dict(model="sd14", sampler=("ddim", 50, 7.5, None, 1), row_guidance=True, judge=None,
                             crt="shielddiff", attack="none", target_set="unacceptable", protocol="shielddiff",
                             protocol_set="unacceptable", concepts=("nudity",), budgets={}),
}
CRT_GROUP = {name.stem for name in (CONF / "crt").glob("*.yaml")}


def _concept_missing(concept: str) -> str | None:
    if not (CONF / "concept" / f"{concept}.yaml").is_file():
        return f"concept {concept!r} is not in conf/concept yet (issue 11, deliverable 1)"
    return None


def _plugin(cfg: dict[str, Any], name: str) -> Any:
    """The plug-in ``name`` built as a run of this config would build it (CRT or attack group)."""
    group = "crt" if name in CRT_GROUP else "attack"
    option = {"trce_parity": "trce"}.get(name, name)
    overridden = _compose(*cfg["_overrides"], f"{group}={option}")
    build = registry.build_crt if group == "crt" else registry.build_attack
    return build(overridden[group], overridden["model"]["name"], overridden["concept"])


@functools.cache
def _composed(overrides: tuple[str, ...]) -> dict[str, Any]:
    return compose_config(list(overrides))


def _compose(*overrides: str) -> dict[str, Any]:
    cfg = copy.deepcopy(_composed(overrides))
    cfg["_overrides"] = list(overrides)
    return cfg


def test_every_paper_has_a_preset_citing_its_sources():
    presets = {p.stem for p in (CONF / "experiment").glob("*_paper.yaml")}
    assert presets == set(EXPECTED)
    for name in presets:
        text = (CONF / "experiment" / f"{name}.yaml").read_text()
        assert "§" in text and "Sources:" in text, name  # each value says where it comes from


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_preset_fixes_the_papers_protocol(name: str):
    want = EXPECTED[name]
    cfg = _compose(f"experiment={name}")
    gen = cfg["model"]["generation"]
    settings = generation_settings(cfg)
    scheduler, steps, guidance, seed, images = want["sampler"]
    assert cfg["model"]["name"] == want["model"]
    assert (settings.scheduler, settings.steps, settings.images_per_prompt) == (scheduler, steps, images)
    assert settings.height == settings.width == 512
    assert gen["row_guidance"] is want["row_guidance"]
    if guidance != ROW:
        assert settings.guidance == guidance
    if isinstance(seed, int):
        assert gen["seed"] == seed
    if "dtype" in want:
        assert cfg["model"]["dtype"] == want["dtype"]
    assert cfg["model"]["max_attack_targets"] is None and cfg["model"]["max_prompts_per_set"] is None
    judge = cfg["judge"]
    if want["judge"] is None:
        assert judge["from_concept"] is True
    else:
        assert judge["from_concept"] is False and (judge["name"], judge["preset"]) == want["judge"]
    crt = registry.build_crt(cfg["crt"], cfg["model"]["name"], cfg["concept"])
    attack = registry.build_attack(cfg["attack"], cfg["model"]["name"], cfg["concept"])
    assert (crt.name, attack.name) == (want["crt"], want["attack"])
    assert cfg["concept"]["key"] == "nudity" and cfg["preset"]["name"] == name
    assert cfg["preset"]["protocol"] == want["protocol"]
    if want["target_set"] not in cfg["concept"]["prompts"]:
        pytest.skip(f"prompt set {want['target_set']!r} is not in conf/concept/nudity.yaml yet (issue 11, "
                    "deliverable 2)")
    assert attack.target_set == want["target_set"]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_preset_fixes_the_papers_budgets(name: str):
    cfg = _compose(f"experiment={name}")
    for plugin, budget in EXPECTED[name]["budgets"].items():
        params = _plugin(cfg, plugin).params
        assert {k: params.get(k) for k in budget} == budget, plugin


@pytest.mark.parametrize(("name", "concept"), [(n, c) for n in sorted(EXPECTED) for c in EXPECTED[n]["concepts"]])
def test_preset_composes_on_each_of_the_papers_concepts(name: str, concept: str):
    """The paper's own concepts keep the preset's protocol; UnlearnDiffAtk's tasks keep their judge and k."""
    if reason := _concept_missing(concept):
        pytest.skip(reason)
    cfg = _compose(f"experiment={name}", f"concept={concept}")
    scheduler, steps, _, _, images = EXPECTED[name]["sampler"]
    settings = generation_settings(cfg)
    assert (cfg["model"]["name"], settings.scheduler, settings.steps, settings.images_per_prompt) == (
        EXPECTED[name]["model"], scheduler, steps, images)
    attack = registry.build_attack(cfg["attack"], cfg["model"]["name"], cfg["concept"])
    registry.build_crt(cfg["crt"], cfg["model"]["name"], cfg["concept"])
    if name == "unlearndiffatk_paper":
        judge_name, preset, k = UDA_TASKS[concept]
        judge = cfg["concept"]["judge"]
        assert judge["name"] == judge_name and (preset is None or judge.get("preset") == preset)
        assert attack.params["k"] == k and {key: attack.params[key] for key in UDA_SCHEDULE} == UDA_SCHEDULE
        assert _plugin(cfg, "p4d_uda").params["k"] == k


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_preset_satisfies_its_protocol_in_runners_compare(name: str):
    """A run made with the preset passes the generation part of the protocol its published numbers are compared
    under (so `runners.compare` calls it comparable when the rest matches), and the protocol names the preset."""
    protocol = PROTOCOLS[EXPECTED[name]["protocol"]]
    assert protocol.preset == name
    cfg = _compose(f"experiment={name}")
    set_name = EXPECTED[name]["protocol_set"]
    if set_name not in cfg["concept"]["prompts"]:
        pytest.skip(f"prompt set {set_name!r} is not in conf/concept/nudity.yaml yet (issue 11, deliverable 2)")
    document = {"labels": {"model": cfg["model"]["name"], "concept": "nudity", "crt": cfg["crt"]["name"],
                           "attack": cfg["attack"]["name"]},
                "config": cfg, "generation": asdict(generation_settings(cfg)),
                "concept": {"key": "nudity", "sets": {}}}
    card = build_card(document)
    assert generation_differences(protocol, card, card["prompt_sets"]["sets"][set_name]) == []


def test_a_protocol_difference_is_named():
    """The same check fails, naming the field, when the preset is overridden away from the paper."""
    cfg = _compose("experiment=unlearndiffatk_paper", "model.generation.steps=25",
                   "model.generation.row_guidance=false")
    document = {"labels": {}, "config": cfg, "generation": asdict(generation_settings(cfg)), "concept": {}}
    card = build_card(document)
    reasons = generation_differences(PROTOCOLS["uda"], card, card["prompt_sets"]["sets"]["unacceptable"])
    assert any(r.startswith("steps 25 (the paper: 50)") for r in reasons)
    assert any("each prompt's CSV guidance" in r for r in reasons) and len(reasons) == 2


def test_every_protocol_names_an_existing_preset():
    for protocol in PROTOCOLS.values():
        assert protocol.preset is None or Path(CONF / "experiment" / f"{protocol.preset}.yaml").is_file(), protocol
