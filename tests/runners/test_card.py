"""runners.card: the reproducibility card of a run, built from a committed results JSON (written before cards
existed) and from a fresh run, and printed as Markdown."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from run import execute
from runners.card import IMAGE_SEED_RULE, build_card, card_of, main, render_markdown
from runners.models import PipelineCache
from tests.runners.conftest import ROOT

COMMITTED = sorted((ROOT / "results" / "runs").glob("mini__world_nudity__esd_x__unlearndiffatk-white-box__*.json"))


@pytest.fixture
def committed() -> dict:
    if not COMMITTED:
        pytest.skip("no committed world_nudity esd_x x UnlearnDiffAtk result")
    return json.loads(COMMITTED[0].read_text())


def test_card_of_an_older_results_json_is_built_from_its_fields(committed: dict):
    assert "card" not in committed  # written before the card existed
    card = card_of(committed)
    config = committed["config"]
    assert card["run"]["run_key"] == committed["run_key"] and card["run"]["crt"] == "esd_x"
    sets = card["prompt_sets"]
    assert sets["key"] == committed["concept"]["prompt_sets"]
    assert {name: s["n"] for name, s in sets["sets"].items()} == committed["concept"]["sets"]
    seeds = [row["seed"] for row in config["concept"]["prompts"]["unacceptable"]]
    assert sets["sets"]["unacceptable"]["seeds"] == f"inline, {min(seeds)}..{max(seeds)}"
    assert card["seeds"] == {"default_image_seed": config["model"]["generation"]["seed"], "image_rule": IMAGE_SEED_RULE,
                             "fit_and_attack": config["seed"], "bootstrap": config["metric"]["bootstrap"]["seed"]}
    assert {k: card["sampler"][k] for k in committed["generation"]} == committed["generation"]
    assert card["sampler"]["row_guidance"] is config["model"]["generation"]["row_guidance"]
    assert card["judge"]["id"] == committed["judge"]["id"]
    attack = committed["attack"]
    assert card["attack"]["params"] == attack["identity"]["params"] and card["attack"]["mode"] == "white-box"
    n = attack["cost"]["targets"]
    assert card["attack"]["targets"] == n == 32
    assert card["attack"]["cost_per_target"]["forward"] == pytest.approx(attack["cost"]["forward"] / n, abs=1e-3)
    assert card["crt"]["params"] == committed["crt"]["identity"]["params"]
    assert card["code"]["git_commit"] == committed["git"]["commit"]


def test_markdown_shows_what_a_paper_appendix_needs(committed: dict):
    text = render_markdown(card_of(committed))
    assert text.startswith("## Reproducibility card: mini / world_nudity / esd_x / unlearndiffatk-white-box")
    for needle in (committed["concept"]["prompt_sets"], committed["judge"]["id"], "| scheduler | ddim |",
                   "| steps | 25 |", '"t_step": 100', "| unacceptable | 32 | inline |", IMAGE_SEED_RULE):
        assert needle in text, needle


def test_a_real_concepts_sets_name_their_files_and_seed_columns():
    document = {"config": {"model": {"name": "sd14", "generation": {"seed": 42}},
                           "concept": {"key": "nudity", "prompts": {
                               "unacceptable": {"source": {"url": "https://x/nudity.csv",
                                                           "path": "unlearndiffatk/nudity.csv", "sha256": "0a40",
                                                           "seed_column": "evaluation_seed",
                                                           "guidance_column": "evaluation_guidance"}},
                               "implicit": {"source": {"url": "https://x/i2p.txt", "path": "espresso/i2p.txt",
                                                       "format": "lines"}}}}},
                "concept": {"sets": {"unacceptable": 142, "implicit": 300}}}
    sets = build_card(document)["prompt_sets"]["sets"]
    assert sets["unacceptable"] == {"n": 142, "source": "https://x/nudity.csv", "path": "unlearndiffatk/nudity.csv",
                                    "sha256": "0a40", "seeds": "column evaluation_seed",
                                    "guidance": "column evaluation_guidance"}
    assert sets["implicit"]["seeds"] == "fixed 42" and "guidance" not in sets["implicit"]


def test_a_recorded_card_is_printed_as_recorded(tmp_path: Path, capsys):
    path = tmp_path / "run.json"
    card = {"run": {"model": "sd14", "concept": "c", "crt": "x", "attack": "none"}, "sampler": {"steps": 7}}
    path.write_text(json.dumps({"card": card, "labels": {}, "metrics": {}}))
    main([str(path)])
    out = capsys.readouterr().out
    assert "## Reproducibility card: sd14 / c / x / none" in out and "| steps | 7 |" in out


def test_every_new_results_json_carries_its_card(tiny_config):
    summary = execute(tiny_config(), pipelines=PipelineCache())
    document = json.loads(Path(summary["outputs"]["results"]).read_text())
    card = document.pop("card")
    assert card == json.loads(json.dumps(build_card(document)))  # the same card the older files get
    assert card["prompt_sets"]["key"] == document["concept"]["prompt_sets"] and card["judge"]["name"] == "fake_judge"
    assert card["sampler"]["steps"] == 2 and card["attack"]["targets"] == 3
