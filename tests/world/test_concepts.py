import yaml

from world.concepts import CONCEPTS, CONF_DIR, SET_SIZES, concept_yaml


def test_committed_concept_configs_are_what_the_generator_writes():
    for key, concept in CONCEPTS.items():
        committed = yaml.safe_load((CONF_DIR / f"{key}.yaml").read_text())
        assert committed == concept_yaml(concept), f"{key}.yaml is stale: run python -m world.concepts"


def test_sets_have_their_sizes_and_fine_tuning_pairs_align():
    for concept in CONCEPTS.values():
        sets = concept_yaml(concept)["prompts"]
        assert len(sets["unacceptable"]) == SET_SIZES["unacceptable"]
        assert len(sets["finetune_unacceptable"]) == len(sets["finetune_acceptable"]) == SET_SIZES["finetune"]
        assert [p["seed"] for p in sets["finetune_unacceptable"]] == [p["seed"] for p in sets["finetune_acceptable"]]


def test_acceptable_prompts_never_name_the_concept():
    for concept in CONCEPTS.values():
        for item in concept_yaml(concept)["prompts"]["acceptable"]:
            assert concept.c_u not in item["text"]
            assert not any(w in item["text"].split() for w in concept.explicit_words)
