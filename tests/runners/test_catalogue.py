"""The real concept catalogue: every concept composes, every published set loads its documented row count from a
mirror of the published files, and what only a user can supply (a gated prompt file, judge weights nobody may ship)
stops a run up front with one line that says what to pass."""

from __future__ import annotations

import csv
import hashlib
import re
from pathlib import Path

import pandas as pd
import pytest
from omegaconf import OmegaConf

from runners.concepts import (
    JudgeWeightsMissing,
    PromptSourceUnavailable,
    SourceFetcher,
    check_concept_inputs,
    prompt_sets,
)
from tests.conftest import SHARED_DATA
from tests.runners.conftest import CONF, compose_config

REAL = sorted(p.stem for p in (CONF / "concept").glob("*.yaml") if not p.stem.startswith("world_"))
ESPRESSO_13 = ("nudity", "violence", "disturbing", "hateful", "grumpy_cat", "nemo", "captain_marvel", "snoopy", "r2d2",
               "taylor_swift", "angelina_jolie", "brad_pitt", "elon_musk")
UNLEARNDIFFATK_8 = ("nudity", "violence", "illegal", "vangogh", "church", "garbage_truck", "parachute", "tench")
ESPRESSO_FILES = {"validation_acceptable": 198, "utility_coco": 200}  # the COCO val2014 / test2014 subsets
TEN = {"unacceptable": 10, "acceptable": 10, "validation": 10}

# Documented row counts (../shared/reference/concepts.md §1-4, ../shared/data/README.md; "lines" = non-empty lines).
# I2P category counts with no entry in concepts.md (harassment 824, self-harm 801) are recomputed independently below.
EXPECTED_COUNTS: dict[str, dict[str, int]] = {
    "nudity": {"unacceptable": 142, "implicit": 300, "heldout": 10, "acceptable": 9, "finetune_unacceptable": 6,
               "finetune_acceptable": 6, "validation": 10, "ringabell_concept": 231, "ringabell_neutral": 231,
               "ringabell_targets": 95, "i2p_sexual": 931, "p4d_ideal_esd": 361, "p4d_ideal_sld_max": 204,
               "p4d_ideal_sld_strong": 112, "p4d_ideal_sd_negp": 209, **ESPRESSO_FILES},
    "violence": {"unacceptable": 756, "implicit": 757, "acceptable": 200, "finetune_unacceptable": 10,
                 "finetune_acceptable": 10, "validation": 10, "ringabell_concept": 150, "ringabell_neutral": 150,
                 "ringabell_targets": 250, "ringabell_inverted_k38_eta5_5": 250, "ringabell_inverted_k77_eta5_5": 250,
                 "ringabell_inverted_k77_eta5": 250, **ESPRESSO_FILES},
    "disturbing": {"unacceptable": 856, "implicit": 857, "heldout": 10, "acceptable": 10, "finetune_unacceptable": 10,
                   "finetune_acceptable": 10, "validation": 10, **ESPRESSO_FILES},
    "hateful": {"unacceptable": 231, "implicit": 234, "heldout": 10, "acceptable": 10, "finetune_unacceptable": 10,
                "finetune_acceptable": 10, "validation": 10, **ESPRESSO_FILES},
    "grumpy_cat": {**TEN, "finetune_unacceptable": 200, "finetune_acceptable": 200, **ESPRESSO_FILES},
    "nemo": {**TEN, "finetune_unacceptable": 200, "finetune_acceptable": 200, **ESPRESSO_FILES},
    "captain_marvel": {**TEN, "finetune_unacceptable": 30, "finetune_acceptable": 30, **ESPRESSO_FILES},
    "snoopy": {**TEN, "finetune_unacceptable": 10, "finetune_acceptable": 10, **ESPRESSO_FILES},
    "r2d2": {**TEN, "finetune_unacceptable": 200, "finetune_acceptable": 200, **ESPRESSO_FILES},
    "taylor_swift": {**TEN, "finetune_unacceptable": 10, "finetune_acceptable": 10, **ESPRESSO_FILES},
    "angelina_jolie": {**TEN, "finetune_unacceptable": 10, "finetune_acceptable": 10, **ESPRESSO_FILES},
    "brad_pitt": {**TEN, "finetune_unacceptable": 10, "finetune_acceptable": 10, **ESPRESSO_FILES},
    "elon_musk": {"acceptable": 10, "finetune_unacceptable": 10, "finetune_acceptable": 10, "validation": 10,
                  **ESPRESSO_FILES},  # its unacceptable set is the user's (Espresso ships no musk_eval.txt)
    "illegal": {"unacceptable": 727},
    "vangogh": {"unacceptable": 50, "heldout": 10, "acceptable": 10, "finetune_unacceptable": 10,
                "finetune_acceptable": 197, "validation": 10, "validation_acceptable": 198},
    "church": {"unacceptable": 50, "acceptable": 90, "heldout": 10},
    "garbage_truck": {"unacceptable": 50, "acceptable": 90, "heldout": 10},
    "parachute": {"unacceptable": 50, "acceptable": 90, "heldout": 10},
    "tench": {"unacceptable": 50, "acceptable": 90, "heldout": 10},
    "i2p": {"unacceptable": 4703, "p4d_ideal_sld_max": 1667, "p4d_ideal_sld_strong": 1189},
    "i2p_harassment": {"unacceptable": 824},
    "i2p_self_harm": {"unacceptable": 801},
    "french_horn": {"unacceptable": 10, "acceptable": 90, "p4d_ideal_esd": 200, "p4d_ideal_esd_8": 8},
    "car": {"unacceptable": 91, "acceptable": 90},
}
needs_mirror = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="no local copy of the published prompt files")


def concept_cfg(name: str) -> dict:
    return OmegaConf.to_container(OmegaConf.load(CONF / "concept" / f"{name}.yaml"))["concept"]


def mirror_fetcher(tmp_path: Path) -> SourceFetcher:
    return SourceFetcher(tmp_path / "cache", [SHARED_DATA], timeout_s=1)


def test_the_catalogue_holds_espressos_13_and_unlearndiffatks_8():
    assert set(ESPRESSO_13) | set(UNLEARNDIFFATK_8) <= set(REAL)
    assert set(EXPECTED_COUNTS) == set(REAL)  # every concept's counts are listed below


@pytest.mark.parametrize("name", REAL)
def test_every_real_concept_composes(name):
    cfg = compose_config([f"concept={name}"])
    concept = cfg["concept"]
    assert concept["key"] == name and cfg["model"]["name"] == "sd14"
    assert concept["c_u"] and concept["c_a"] and concept["c_u"] != concept["c_a"]
    assert concept["judge"]["name"] in ("nudenet", "q16", "resnet50", "vangogh_style", "style_classifier")


@pytest.mark.parametrize("name", REAL)
def test_each_concept_names_pinned_checksummed_licensed_sources(name):
    """A URL at a 40-hex commit with a sha256 and a mirror path, or a user-supplied file (never a committed path);
    the file header names the licences."""
    assert "Licences:" in (CONF / "concept" / f"{name}.yaml").read_text()
    for set_name, spec in concept_cfg(name)["prompts"].items():
        source = spec["source"]
        if "user_path" in source:
            assert source["user_path"] is None and source["what"] and source["file"], set_name
            continue
        assert re.match(r"https://raw\.githubusercontent\.com/[^/]+/[^/]+/[0-9a-f]{40}/", source["url"]), set_name
        assert re.fullmatch(r"[0-9a-f]{64}", source["sha256"]) and source["path"], set_name


@needs_mirror
def test_every_set_loads_its_documented_row_count(tmp_path):
    fetcher = mirror_fetcher(tmp_path)
    got = {name: {s: len(items) for s, items in prompt_sets(concept_cfg(name), fetcher, 42).items()}
           for name in REAL if name != "elon_musk"}
    musk = concept_cfg("elon_musk")
    del musk["prompts"]["unacceptable"]
    got["elon_musk"] = {s: len(items) for s, items in prompt_sets(musk, fetcher, 42).items()}
    assert got == EXPECTED_COUNTS


@needs_mirror
def test_i2p_derived_sets_match_an_independent_count(tmp_path):
    """Each I2P selection against pandas on the same CSV (stripped category lists; Ring-A-Bell's raw split)."""
    i2p = pd.read_csv(SHARED_DATA / "i2p" / "i2p_benchmark.csv")
    stripped = i2p["categories"].fillna("").str.split(",").apply(lambda parts: [p.strip() for p in parts])
    raw = i2p["categories"].fillna("").str.split(",")
    fetcher = mirror_fetcher(tmp_path)

    def cases(name: str, set_name: str) -> list[int]:
        return [int(item.case) for item in prompt_sets(concept_cfg(name), fetcher, 42)[set_name]]

    for name, category in [("disturbing", "shocking"), ("hateful", "hate"), ("i2p_harassment", "harassment"),
                           ("i2p_self_harm", "self-harm")]:
        assert cases(name, "unacceptable") == list(i2p.index[stripped.apply(lambda c, k=category: k in c)]), name
    assert cases("nudity", "i2p_sexual") == list(i2p.index[stripped.apply(lambda c: "sexual" in c)])
    violence = raw.apply(lambda c: "violence" in c) & (i2p.nudity_percentage < 50) & \
        (i2p.inappropriate_percentage > 50) & (i2p.hard == 1)
    assert cases("violence", "ringabell_targets") == list(i2p.index[violence])
    assert cases("nudity", "ringabell_targets") == list(i2p.index[i2p.nudity_percentage > 50])
    for name, category in [("violence", "violence"), ("illegal", "illegal activity")]:  # UnlearnDiffAtk's own files
        assert sorted(cases(name, "unacceptable")) == list(i2p.index[stripped.apply(lambda c, k=category: k in c)])


@needs_mirror
def test_p4d_ideal_sets_keep_i2p_seeds_guidance_and_case_numbers(tmp_path):
    items = prompt_sets(concept_cfg("nudity"), mirror_fetcher(tmp_path), 42)["p4d_ideal_esd"]
    with open(SHARED_DATA / "p4d" / "unsafe-prompts-nudity_esd.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [(i.text, i.seed, i.guidance, i.case) for i in items] == [
        (r["prompt"].strip(), int(r["evaluation_seed"]), float(r["evaluation_guidance"]), r["case_number"])
        for r in rows]


# -- what only the user can supply -------------------------------------------------------------------------------

MMA_COLUMNS = ["target_prompt", "adv_prompt", "sanitized_adv_prompt", "success_against_sanitization_defense",
               "clean_prompt"]


def mma_file(tmp_path: Path) -> Path:
    """A stand-in with the benchmark's columns (the real file is gated and never in this repository)."""
    path = tmp_path / "user" / "mma-diffusion-nsfw-adv-prompts.csv"
    path.parent.mkdir(parents=True)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(MMA_COLUMNS)
        writer.writerows([["t1", "adv one", "san one", "True", "c1"], ["t2", "adv, two", "san two", "False", "c2"]])
    return path


def run_cfg(concept: str, *overrides: str) -> dict:
    return compose_config([f"concept={concept}", "crt=none", "attack=none", *overrides])


def test_mma_set_is_left_out_until_given_and_asking_for_it_fails_in_one_line(tmp_path):
    cfg = concept_cfg("nudity")
    cfg["prompts"] = {"mma_adversarial": cfg["prompts"]["mma_adversarial"]}
    assert prompt_sets(cfg, SourceFetcher(tmp_path), 42) == {}  # optional: absent, nothing downloaded
    check_concept_inputs(run_cfg("nudity", "stop_after=prompts"))  # not asked for: no error
    with pytest.raises(PromptSourceUnavailable) as error:
        check_concept_inputs(run_cfg("nudity", "stop_after=prompts"), target_set="mma_adversarial")
    assert str(error.value) == (
        "concept 'nudity': prompt set 'mma_adversarial' needs MMA-Diffusion's adversarial prompt benchmark (the CSV "
        "of the gated dataset YijunYang280/MMA-Diffusion-NSFW-adv-prompts-benchmark); request access at "
        "https://huggingface.co/datasets/YijunYang280/MMA-Diffusion-NSFW-adv-prompts-benchmark and never "
        "redistribute it; pass concept.prompts.mma_adversarial.source.user_path=/path/to/"
        "mma-diffusion-nsfw-adv-prompts.csv")


def test_mma_set_reads_the_users_copy_in_place_and_pins_its_content(tmp_path):
    path = mma_file(tmp_path)
    cfg = run_cfg("nudity", "stop_after=prompts", f"concept.prompts.mma_adversarial.source.user_path={path}")
    check_concept_inputs(cfg, target_set="mma_adversarial")
    source = cfg["concept"]["prompts"]["mma_adversarial"]["source"]
    assert source["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()  # the prompt-set key names the content
    only = {**cfg["concept"], "prompts": {"mma_adversarial": cfg["concept"]["prompts"]["mma_adversarial"]}}
    items = prompt_sets(only, SourceFetcher(tmp_path / "cache"), 42)["mma_adversarial"]
    assert [(i.text, i.seed, i.case) for i in items] == [("adv one", 42, "0"), ("adv, two", 42, "1")]
    assert not (tmp_path / "cache").exists()  # read where it is, never copied
    source["sha256"] = "0" * 64
    with pytest.raises(PromptSourceUnavailable, match="refusing"):
        prompt_sets(only, SourceFetcher(tmp_path / "cache"), 42)


def test_a_required_user_set_stops_every_run_in_one_line(tmp_path):
    """Espresso publishes no Elon Musk test prompts: the concept runs only on the user's."""
    line = ("concept 'elon_musk': prompt set 'unacceptable' needs Elon Musk test prompts, which Espresso does not "
            "publish (no musk_eval.txt); pass concept.prompts.unacceptable.source.user_path=/path/to/musk_eval.txt")
    with pytest.raises(PromptSourceUnavailable) as error:
        check_concept_inputs(run_cfg("elon_musk", "stop_after=prompts"))
    assert str(error.value) == line
    with pytest.raises(PromptSourceUnavailable) as error:
        prompt_sets(concept_cfg("elon_musk"), SourceFetcher(tmp_path), 42)
    assert str(error.value) == line


@pytest.mark.parametrize(("concept", "line"), [
    ("vangogh", "concept 'vangogh': judge 'vangogh_style' needs UnlearnDiffAtk's artist classifier "
                "(results/checkpoint-2800, distributed only through the Google Drive link in the "
                "OPTML-Group/Diffusion-MU-Attack README); pass concept.judge.path=/path/to/classifier/folder, or score "
                "with another judge (judge=...)"),
    ("taylor_swift", "concept 'taylor_swift': judge 'style_classifier' needs a celebrity recogniser: a transformers "
                     "image-classification folder with the label 'Taylor Swift' (none ships with the papers reproduced "
                     "here); pass concept.judge.path=/path/to/classifier/folder, or score with another judge "
                     "(judge=...)"),
    ("r2d2", "concept 'r2d2': judge 'style_classifier' needs an R2-D2 recogniser: a transformers image-classification "
             "folder with the label 'r2d2' (none ships with the papers reproduced here); pass "
             "concept.judge.path=/path/to/classifier/folder, or score with another judge (judge=...)"),
])
def test_a_judge_without_shippable_weights_stops_the_run_in_one_line(concept, line, tmp_path):
    with pytest.raises(JudgeWeightsMissing) as error:
        check_concept_inputs(run_cfg(concept))
    assert str(error.value) == line
    check_concept_inputs(run_cfg(concept, "stop_after=fit"))  # nothing judged before then
    check_concept_inputs(run_cfg(concept, "judge=nudenet"))  # another judge
    check_concept_inputs(run_cfg(concept, f"concept.judge.path={tmp_path}"))  # the folder given


def test_q16s_clip_missing_offline_stops_the_run_in_one_line(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    with pytest.raises(JudgeWeightsMissing) as error:
        check_concept_inputs(run_cfg("violence"))
    assert str(error.value) == (
        "concept 'violence': judge 'q16' needs Q16's CLIP, open_clip ViT-L-14 'openai' "
        "(timm/vit_large_patch14_clip_224.openai on the hub), which is not in the hub cache (HF_HUB_OFFLINE is set); "
        "pass concept.judge.evaluator.pretrained=/path/to/ViT-L-14.pt, or score with another judge (judge=...)")
    checkpoint = tmp_path / "ViT-L-14.pt"
    checkpoint.write_bytes(b"weights")
    check_concept_inputs(run_cfg("violence", f"concept.judge.evaluator.pretrained={checkpoint}"))
    with pytest.raises(JudgeWeightsMissing, match="there is no file at /nowhere/ViT-L-14.pt"):
        check_concept_inputs(run_cfg("violence", "concept.judge.evaluator.pretrained=/nowhere/ViT-L-14.pt"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    check_concept_inputs(run_cfg("violence"))  # online: the hub download happens when the judge is built


def test_an_object_judge_missing_offline_stops_the_run_in_one_line(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    with pytest.raises(JudgeWeightsMissing) as error:
        check_concept_inputs(run_cfg("tench"))
    assert str(error.value) == (
        "concept 'tench': judge 'resnet50' needs the image classifier 'microsoft/resnet-50', which is not in the hub "
        "cache (HF_HUB_OFFLINE is set); pass concept.judge.path=/path/to/resnet-50, or score with another judge "
        "(judge=...)")
    check_concept_inputs(run_cfg("tench", f"concept.judge.path={tmp_path}"))


def test_the_check_runs_before_the_model_is_looked_for(tmp_path):
    """prepare() stops on the judge's weights before it looks for SD v1.4 (which is not here either)."""
    from runners.stages import prepare

    cfg = run_cfg("vangogh", f"store.root={tmp_path / 'store'}", "model.path=/nonexistent/sd14")
    with pytest.raises(JudgeWeightsMissing, match="concept.judge.path="):
        prepare(cfg, tmp_path)
