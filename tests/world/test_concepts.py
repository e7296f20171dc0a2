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


def test_generator_writes_the_committed_files_byte_for_byte(tmp_path):
    from world.concepts import write_concept_configs

    for path in write_concept_configs(tmp_path):
        assert path.read_bytes() == (CONF_DIR / path.name).read_bytes(), f"{path.name} is stale"


def test_concepts_cover_every_attribute_family_and_a_compositional_one():
    predicates = [c.predicate for c in CONCEPTS.values()]
    single = {family for p in predicates if len(p) == 1 for family in p}
    assert {"shape", "colour", "style", "blood"} <= single
    for family, values in (("shape", 2), ("style", 2)):
        assert len({p[family] for p in predicates if list(p) == [family]}) >= values, family
    assert sum(len(p) > 1 for p in predicates) >= 2  # bobo and at least one more composition


def _mentions(text, words):
    import re

    return any(re.search(rf"\b{re.escape(w)}\b", text) for w in words)


def test_acceptable_prompts_of_a_composition_name_both_parts():
    from world import vocabulary as V

    colours = [w for ws in V.COLOUR_SYNONYMS.values() for w in ws]
    shapes = [w for ws in V.SHAPE_SYNONYMS.values() for w in ws]
    sets = concept_yaml(CONCEPTS["world_redcross"])["prompts"]
    for item in sets["acceptable"] + sets["finetune_acceptable"]:
        assert _mentions(item["text"], colours) and _mentions(item["text"], shapes), item["text"]
        assert "red cross" not in item["text"]


def test_swapped_heldout_prompts_use_only_words_no_training_caption_has():
    import re

    import numpy as np

    from world.captions import caption, short_caption
    from world.scene import sample_scene

    swapped = [c for c in CONCEPTS.values() if c.heldout_words]
    assert swapped
    for concept in swapped:
        for item in concept_yaml(concept)["prompts"]["heldout"]:
            assert _mentions(item["text"], concept.heldout_words), item["text"]
            assert not _mentions(item["text"], (*concept.explicit_words, *concept.implicit_words)), item["text"]
            assert not re.search(r"\ba [aeiou]", item["text"]), item["text"]  # "an ruby" after the swap
    words = [w for c in swapped for w in c.heldout_words]
    rng = np.random.default_rng(3)
    for _ in range(3000):
        scene = sample_scene(rng)
        text = caption(scene, rng) if rng.random() < 0.8 else short_caption(scene, rng)
        assert not _mentions(text, words), text


def test_every_set_of_a_concept_is_judged_as_intended_by_its_scenes():
    """present() scenes satisfy the judge predicate, absent() and remove() scenes do not."""
    import numpy as np

    from world.train import judge_label

    def holds(scene, predicate):
        return all(judge_label(scene, f) == (("yes" if v else "no") if isinstance(v, bool) else v)
                   for f, v in predicate.items())

    for concept in CONCEPTS.values():
        rng = np.random.default_rng(5)
        for _ in range(100):
            scene = concept.present(rng)
            assert holds(scene, concept.predicate), (concept.key, scene)
            assert not holds(concept.absent(rng), concept.predicate), concept.key
            assert not holds(concept.remove(scene, rng), concept.predicate), concept.key
