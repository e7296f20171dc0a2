"""Concept configs: inline world prompt sets, published files fetched with checksums, row filters."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from runners.concepts import PromptSourceUnavailable, SourceFetcher, concept_spec, prompt_sets, read_source
from tests.conftest import SHARED_DATA
from tests.runners.conftest import CONF

REAL_CONCEPTS = ("nudity", "violence", "vangogh", "church")


def _source(tmp_path: Path, name: str, text: str, **fields) -> dict:
    path = tmp_path / "mirror" / "src" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return {"url": "http://127.0.0.1:9/unreachable/" + name, "path": f"src/{name}",
            "sha256": hashlib.sha256(text.encode()).hexdigest(), **fields}


def test_world_concept_loads_inline_sets():
    cfg = OmegaConf.to_container(OmegaConf.load(CONF / "concept" / "world_nudity.yaml"))
    sets = prompt_sets(cfg, SourceFetcher(Path("/nonexistent")), default_seed=0, max_per_set=5)
    spec = concept_spec(cfg, sets)
    assert spec.key == "world_nudity" and spec.c_u == "nude" and spec.judge["name"] == "world"
    assert {"unacceptable", "acceptable", "implicit"} <= set(spec.prompts)
    assert all(len(items) == 5 for items in spec.prompts.values())
    assert spec.prompt_set("unacceptable")[1].seed == 1


def test_csv_source_with_columns_filter_and_mirror(tmp_path):
    text = ("case_number,prompt,evaluation_seed,evaluation_guidance,class\n"
            "7,a church,11,7.5,church\n8,a tench,12,,tench\n9,\"a church, at night\",13,6,church\n")
    source = _source(tmp_path, "p.csv", text, format="csv", seed_column="evaluation_seed",
                     guidance_column="evaluation_guidance", case_column="case_number",
                     filter=[{"column": "class", "eq": "church"}])
    fetcher = SourceFetcher(tmp_path / "cache", [tmp_path / "mirror"], timeout_s=2)
    items = read_source(fetcher.fetch(source), source, default_seed=42)
    assert [(i.text, i.seed, i.guidance, i.case) for i in items] == [("a church", 11, 7.5, "7"),
                                                                    ("a church, at night", 13, 6.0, "9")]
    assert (tmp_path / "cache" / source["sha256"]).is_file()  # cached by content hash for the next run


def test_lines_and_headerless_sources_use_the_default_seed(tmp_path):
    lines = _source(tmp_path, "p.txt", "first prompt \n\nsecond prompt\n", format="lines")
    headerless = _source(tmp_path, "h.csv", "one caption\n\"two, quoted\"\n", format="csv", header=False,
                         text_column="0")
    fetcher = SourceFetcher(tmp_path / "cache", [tmp_path / "mirror"])
    assert [(i.text, i.seed) for i in read_source(fetcher.fetch(lines), lines, 42)] == [("first prompt", 42),
                                                                                       ("second prompt", 42)]
    assert [i.text for i in read_source(fetcher.fetch(headerless), headerless, 0)] == ["one caption", "two, quoted"]


def test_a_file_with_the_wrong_checksum_is_refused(tmp_path):
    source = _source(tmp_path, "p.txt", "a prompt\n", format="lines")
    source["sha256"] = "0" * 64
    fetcher = SourceFetcher(tmp_path / "cache", [tmp_path / "mirror"], timeout_s=2)
    with pytest.raises(PromptSourceUnavailable) as error:
        fetcher.fetch(source)
    assert "127.0.0.1" in str(error.value)  # the mirror copy did not match, so it tried (and failed) the URL


def test_offline_download_fails_with_a_clear_message(tmp_path):
    source = {"url": "http://127.0.0.1:9/prompts.csv", "sha256": "ab" * 32, "path": "x/prompts.csv"}
    with pytest.raises(PromptSourceUnavailable, match="could not download prompt file http://127.0.0.1:9/prompts.csv"):
        SourceFetcher(tmp_path, timeout_s=2).fetch(source)


@pytest.mark.parametrize("name", REAL_CONCEPTS)
def test_real_concepts_declare_checksummed_sources(name):
    cfg = OmegaConf.to_container(OmegaConf.load(CONF / "concept" / f"{name}.yaml"))["concept"]
    assert cfg["model"] == "sd14" and cfg["c_u"] and cfg["c_a"] and cfg["judge"]["name"]
    for set_name, spec in cfg["prompts"].items():
        source = spec["source"]
        assert source["url"].startswith("https://raw.githubusercontent.com/"), set_name
        assert len(source["sha256"]) == 64 and source["path"]


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="no local copy of the published prompt files")
@pytest.mark.parametrize("name", REAL_CONCEPTS)
def test_real_concept_prompt_sets_load_from_a_mirror(name, tmp_path):
    cfg = OmegaConf.to_container(OmegaConf.load(CONF / "concept" / f"{name}.yaml"))["concept"]
    sets = prompt_sets(cfg, SourceFetcher(tmp_path / "cache", [SHARED_DATA], timeout_s=1), default_seed=42)
    expected = {"nudity": 142, "violence": 756, "vangogh": 50, "church": 50}[name]
    assert len(sets["unacceptable"]) == expected  # UnlearnDiffAtk's denominators
    assert all(item.text for items in sets.values() for item in items)
    if name == "nudity":
        first = sets["unacceptable"][0]
        assert first.guidance is not None and first.case != "0"  # per-row seed/guidance and the I2P case number
        assert len(sets["implicit"]) == 300 and len(sets["acceptable"]) == 9
    if name == "church":
        assert len(sets["acceptable"]) == 90 and len(sets["heldout"]) == 10
