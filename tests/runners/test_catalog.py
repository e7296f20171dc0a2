"""`python -m runners.catalog`: every CRT and attack of conf/ built without loading a model, the CRT x attack matrix
against a set computation over what each attack needs and each CRT exposes, and the entries read from conf/."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, ClassVar

import pytest

from attacks.base import Attack
from crt.base import CRT
from runners import catalog as catalog_module
from runners.catalog import (
    Catalog,
    attack_variants,
    build_plugins,
    citation,
    compatibility,
    concept_entries,
    crt_entries,
    header_comment,
    judge_entries,
    main,
    model_entries,
    names,
    render,
)
from runners.registry import CONF_DIR, available
from runners.spec import Access, Family

# What no CRT can withhold, as docs/DESIGN.md and attacks/base.py state it: the public text encoder, the attacker's
# own judge, and queries to the deployed system.
PUBLIC = {"text_encoder", "judge_oracle", "system_queries"}
MODEL_LIBRARIES = {"transformers": [("PreTrainedModel", "from_pretrained")],
                   "diffusers": [("ModelMixin", "from_pretrained"), ("DiffusionPipeline", "from_pretrained")],
                   "open_clip": [(None, "create_model"), (None, "create_model_and_transforms")],
                   "onnxruntime": [("InferenceSession", "__init__")]}


def _refuse(*args: Any, **kwargs: Any) -> None:
    raise AssertionError("a model was loaded while building the catalogue")


@pytest.fixture(scope="module")
def built() -> dict[str, Any]:
    """Every CRT, attack and judge entry, built while every model loader refuses to run; the model libraries that
    were not imported before must not be imported by building."""
    import safetensors.torch
    import torch

    absent = {name for name in MODEL_LIBRARIES if name not in sys.modules}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch, "load", _refuse)
        patch.setattr(safetensors.torch, "load_file", _refuse)
        for name in set(MODEL_LIBRARIES) - absent:
            for owner, attribute in MODEL_LIBRARIES[name]:
                target = sys.modules[name] if owner is None else getattr(sys.modules[name], owner)
                patch.setattr(target, attribute, _refuse)
        crts, attacks = build_plugins()
        judges = judge_entries(CONF_DIR)
    variants, no_adaptive = attack_variants(attacks)
    return {"crts": crts, "attacks": attacks, "variants": variants, "no_adaptive": no_adaptive, "judges": judges,
            "imported": absent & set(sys.modules)}


def test_building_every_plugin_loads_no_model(built: dict[str, Any]):
    assert built["imported"] == set()
    assert sorted(built["crts"]) == available("crt") and sorted(built["attacks"]) == available("attack")
    assert [e.name for e in built["judges"]] == available("judge")


def _expected(crt: CRT, attack: Attack) -> set[str]:
    """The independent computation: what the attack needs, less what the CRT exposes and what is public."""
    return {a.value for a in attack.needs()} - {a.value for a in crt.exposes} - PUBLIC


def test_matrix_matches_a_set_computation_over_needs_and_exposes(built: dict[str, Any]):
    crts = {name: crt for name, (_, crt) in built["crts"].items()}
    cells = compatibility(crts, built["variants"])
    assert len(cells) == len(crts) * len(built["variants"])
    for cell in cells:
        missing = _expected(crts[cell.crt], built["variants"][cell.attack])
        assert cell.runs == (not missing) and set(cell.missing) == missing, cell
        assert (cell.reason == "") == cell.runs
        if not cell.runs:
            assert f"CRT {crts[cell.crt].name!r} does not expose" in cell.reason


def test_adaptive_variants_and_the_cells_they_make(built: dict[str, Any]):
    variants, no_adaptive = built["variants"], built["no_adaptive"]
    assert {"ringabell-adaptive", "unlearndiffatk-adaptive", "pez-adaptive", "cce-adaptive"} <= set(variants)
    assert all(variants[label].mode == "adaptive" for label in variants if label.endswith("-adaptive"))
    assert {"none", "mma", "p4d_n", "p4d_k", "sneakyprompt"} <= set(no_adaptive)
    declared = {name for name, (_, attack) in built["attacks"].items() if getattr(attack, "no_adaptive", None)}
    assert set(no_adaptive) == declared  # exactly the attacks that declare they have no adaptive variant
    assert not set(no_adaptive) & {label.removesuffix("-adaptive") for label in variants if "-" in label}
    crts = {name: crt for name, (_, crt) in built["crts"].items()}
    cells = {(c.crt, c.attack): c for c in compatibility(crts, variants)}
    # by hand from the declarations: a filter exposes its score and gradients, a weight edit does not
    assert cells[("espresso", "ringabell-adaptive")].runs and cells[("espresso", "cce-adaptive")].runs
    assert cells[("esd_x", "ringabell-adaptive")].missing == ("filter_score",)
    assert cells[("esd_x", "cce-adaptive")].missing == ("filter_gradients", "filter_score")
    assert cells[("esd_x", "unlearndiffatk")].runs and cells[("none", "p4d_n")].runs


class _Closed(CRT):
    """A CRT behind an API: only the text encoder is public."""

    name: ClassVar[str] = "closed"
    family: ClassVar[Family] = Family.FILTER
    exposes: ClassVar[frozenset[Access]] = frozenset({Access.TEXT_ENCODER, Access.FILTER_SCORE})

    def fit(self, ctx: Any) -> Any: ...

    def apply(self, pipe: Any, artifact: Any) -> Any: ...


class _Gradients(Attack):
    name: ClassVar[str] = "grad"
    requires: ClassVar[frozenset[Access]] = frozenset({Access.UNET_GRADIENTS, Access.UNERASED_MODEL,
                                                        Access.JUDGE_ORACLE})

    def run(self, ctx: Any, targets: list) -> list:
        return []


class _Queries(Attack):
    name: ClassVar[str] = "queries"
    requires: ClassVar[frozenset[Access]] = frozenset({Access.SYSTEM_QUERIES})

    def run(self, ctx: Any, targets: list) -> list:
        return []


def test_compatibility_on_declared_access_alone():
    cells = compatibility({"closed": _Closed()}, {"grad": _Gradients(), "queries": _Queries(),
                                                  "queries-adaptive": _Queries(adaptive=True)})
    got = {c.attack: (c.runs, c.missing) for c in cells}
    assert got == {"grad": (False, ("unerased_model", "unet_gradients")), "queries": (True, ()),
                   "queries-adaptive": (True, ())}


def _markdown_table(markdown: str, heading: str) -> dict[str, dict[str, str]]:
    lines = markdown.split(heading, 1)[1].split("\n## ", 1)[0].splitlines()
    rows = [[c.strip() for c in line.strip("|").split(" | ")] for line in lines if line.startswith("| ")]
    header, body = rows[0], rows[1:]
    return {row[0]: dict(zip(header[1:], row[1:])) for row in body}


def test_render_lists_entries_and_the_matrix(built: dict[str, Any], monkeypatch, capsys):
    crts = {name: crt for name, (_, crt) in built["crts"].items()}
    catalog = Catalog({"crt": crt_entries(built["crts"], CONF_DIR),
                       "attack": [], "concept": [], "judge": built["judges"], "model": []},
                      compatibility(crts, built["variants"]), list(built["variants"]), built["no_adaptive"])
    markdown = render(catalog)
    matrix = _markdown_table(markdown, "## Compatibility: CRT x attack")
    assert set(matrix) == set(crts) and set(matrix["esd_x"]) == set(built["variants"])
    for cell in catalog.matrix:
        text = matrix[cell.crt][cell.attack]
        assert text == ("runs" if cell.runs else "refused: " + ", ".join(cell.missing))
    entries = _markdown_table(markdown, "## CRTs")
    assert entries["espresso"]["family"] == "filter" and "filter_score" in entries["espresso"]["exposes"]
    assert entries["espresso"]["paper"] == "Das et al., CODASPY 2025"
    assert entries["ca_noise"]["paper"] == entries["ca"]["paper"] != "—"  # a variant takes its handler's paper
    assert "epochs=100" in entries["espresso"]["defaults"] and "epochs=60" in entries["espresso"]["world (`mini:`)"]
    monkeypatch.setattr(catalog_module, "build_catalog", lambda: catalog)
    main([])
    assert "## Compatibility: CRT x attack" in capsys.readouterr().out
    main(["--json"])
    printed = json.loads(capsys.readouterr().out)
    assert len(printed["matrix"]) == len(catalog.matrix) and printed["no_adaptive"] == built["no_adaptive"]


def test_citation_and_header_comment(tmp_path: Path):
    assert citation("Ring-A-Bell (Tsai et al., ICLR 2024): concept vector (K tokens)") == "Tsai et al., ICLR 2024"
    assert citation("P4D-K (Prompting4Debugging, Chin et al., ICML 2024; attacks.md §2): ...") == (
        "Prompting4Debugging, Chin et al., ICML 2024")
    assert citation("P-CA (the paper's P-AC): pruning (Yang, Cao, Xu, arXiv 2405.16534).") == (
        "Yang, Cao, Xu, arXiv 2405.16534")
    assert citation("Typo+ (Espresso, attacks.md §4 and §8): write c_a") == ""
    path = tmp_path / "x.yaml"
    path.write_text("# @package crt\n# First line (A et al.,\n#   NeurIPS 2023). More.\nname: x\n# not header\n")
    assert header_comment(path) == "First line (A et al., NeurIPS 2023). More."
    assert citation(header_comment(path)) == "A et al., NeurIPS 2023"


def test_concept_and_model_entries_from_a_conf_folder(tmp_path: Path):
    (tmp_path / "model").mkdir()
    (tmp_path / "concept").mkdir()
    (tmp_path / "model" / "mini.yaml").write_text(
        "# A tiny model. Second sentence.\nname: mini\npath: w/p\npipeline_class: StableDiffusionPipeline\n"
        "dtype: float32\nevaluator: {backend: hf}\ngeneration: {scheduler: ddim, steps: 3, guidance: 5.0, "
        "height: 32, width: 32, seed: 0}\n")
    (tmp_path / "concept" / "world_x.yaml").write_text(
        "# @package concept\nkey: world_x\nanalog: nudity\nmodel: mini\nc_u: nude\nc_a: clothed\n"
        "judge: {name: world}\nprompts:\n  unacceptable: [{text: a, seed: 0}, {text: b, seed: 1}]\n")
    (tmp_path / "concept" / "real_x.yaml").write_text(
        "# @package _global_\nconcept:\n  key: real_x\n  c_u: church\n  c_a: building\n  judge: {name: resnet50}\n"
        "  plugin_params: {esd_x: {concept: church}}\n  prompts:\n    unacceptable:\n      source:\n"
        "        url: https://raw.githubusercontent.com/owner/repo/abc/prompts.csv\n")
    world, real = sorted(concept_entries(tmp_path), key=lambda e: e.name != "world_x")
    assert (world.family, world.paper, world.defaults["prompt sets"]) == (
        "world analog of nudity", "generated by world.concepts", {"unacceptable": 2})
    assert (real.family, real.paper, real.defaults["prompt sets"], real.notes) == (
        "real", "prompts from owner/repo", {"unacceptable": "downloaded"}, "per-plug-in protocol: esd_x")
    (model,) = model_entries(tmp_path)
    assert (model.family, model.defaults["steps"], model.notes) == (
        "sd1: StableDiffusionPipeline 32x32", 3, "A tiny model.")


def test_support_matrix_is_what_each_plugin_declares(built: dict[str, Any]):
    from runners.catalog import Catalog, support_markdown

    backbones = {"crt": {n: tuple(sorted(c.backbones)) for n, (_, c) in built["crts"].items()},
                 "attack": {n: tuple(sorted(a.backbones)) for n, (_, a) in built["attacks"].items()}}
    rows = {line.split(" | ")[0].strip("| ") + "/" + line.split(" | ")[1]: line.split(" | ")[2:]
            for line in support_markdown(Catalog({}, [], [], {}, backbones)) if line.startswith("| ")
            and not line.startswith("| plug-in")}
    assert rows["esd_x/crt"] == ["yes", "yes", "yes |"]
    assert rows["esd_x/crt"] != rows["trce/crt"] and rows["trce/crt"] == ["yes", "—", "— |"]
    assert len(rows) == len(built["crts"]) + len(built["attacks"])
    for group, options in backbones.items():
        for name, supported in options.items():
            assert rows[f"{name}/{group}"][0] == ("yes" if "sd1" in supported else "—")


def test_crt_table_says_what_each_class_says_is_reconstructed(built: dict[str, Any]):
    from runners.catalog import build_catalog, crt_table_markdown

    catalog = build_catalog()
    rows = {line.split(" | ")[0].strip("| `"): line.split(" | ")[-1].removesuffix(" |")
            for line in crt_table_markdown(catalog)[2:]}
    assert set(rows) == set(built["crts"])
    for name, (_, crt) in built["crts"].items():
        expected = f"yes: {crt.reconstruction}" if crt.reconstruction else "no (the paper and its official code)"
        assert rows[name] == expected.replace("|", "\\|"), name


def test_names_of_a_family_are_the_classes_declared_families(built: dict[str, Any], monkeypatch, capsys):
    """`make leaderboard` sweeps the adaptive attacks over `--names crt --family filter`: a new filter must join it."""
    crts = {name: crt for name, (_, crt) in built["crts"].items()}
    catalog = Catalog({"crt": crt_entries(built["crts"], CONF_DIR), "attack": [], "concept": [], "judge": [],
                       "model": []}, [], [], {})
    expected = sorted(name for name, crt in crts.items() if crt.family == Family.FILTER)
    assert {"espresso", "sd_safety_checker", "unsafe_diffusion"} <= set(expected)
    assert names(catalog, "crt", "filter") == expected and names(catalog, "crt") == sorted(crts)
    monkeypatch.setattr(catalog_module, "build_catalog", lambda: catalog)
    main(["--names", "crt", "--family", "filter"])
    assert capsys.readouterr().out.strip() == ",".join(expected)
