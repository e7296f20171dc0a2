"""``world.check``: which concepts it covers, the ground truth it renders, and the zero-shot number a runner uses."""

import numpy as np
import pytest
import yaml

from world import check
from world.concepts import CONCEPTS, CONF_DIR

EVALUATOR_READY = (check.EVALUATOR_CLIP / "model.safetensors").exists()
needs_clip = pytest.mark.skipif(not EVALUATOR_READY, reason="world weights not yet shipped (run `make world`)")


def _custom(tmp_path, **overrides):
    cfg = {"key": "my_blue_square", "model": "mini", "c_u": "blue", "c_a": "shape",
           "judge": {"name": "world", "predicate": {"shape": "square", "colour": "blue"}}, **overrides}
    path = tmp_path / "my_blue_square.yaml"
    path.write_text("# @package concept\n" + yaml.safe_dump(cfg))
    return path


def test_every_shipped_world_concept_is_checked_in_the_generator_order():
    files = check.shipped_concept_files()
    assert {p.name for p in files} == {p.name for p in CONF_DIR.glob("world_*.yaml")}
    assert [p.stem for p in files][:len(CONCEPTS)] == list(CONCEPTS)


def test_concepts_are_named_or_given_as_files(tmp_path):
    assert check.resolve_concept_file("world_cross") == CONF_DIR / "world_cross.yaml"
    assert check.load_concept(_custom(tmp_path))["key"] == "my_blue_square"
    with pytest.raises(FileNotFoundError):
        check.resolve_concept_file("world_no_such_concept")


def test_concepts_the_world_cannot_judge_are_refused(tmp_path):
    with pytest.raises(ValueError, match="not a world concept"):
        check.load_concept(CONF_DIR / "nudity.yaml")
    with pytest.raises(ValueError, match="unknown judge family"):
        check.world_predicate({"key": "x", "judge": {"name": "world", "predicate": {"size": "big"}}})
    with pytest.raises(ValueError, match="no label"):
        check.world_predicate({"key": "x", "judge": {"name": "world", "predicate": {"shape": "star"}}})


@pytest.mark.parametrize("predicate", [{"shape": "square", "colour": "blue"}, {"band": True}, {"colour": "skin"},
                                       {"style": "mondrian", "blood": True}, {"shape": "circle", "band": "yes"}])
def test_predicate_samplers_draw_scenes_with_and_without_the_concept(predicate):
    present, absent = check.predicate_samplers(predicate)
    rng = np.random.default_rng(0)
    assert all(check.satisfies(present(rng), predicate) for _ in range(100))
    assert not any(check.satisfies(absent(rng), predicate) for _ in range(100))


def test_shipped_concepts_render_their_own_scenes_and_others_the_predicates():
    for key, concept in CONCEPTS.items():
        cfg = check.load_concept(key)
        assert check.scene_samplers(cfg) == (concept.present, concept.absent)
        images, truth = check.ground_truth_images(cfg, n=20)
        assert len(images) == 20 and truth.tolist() == [True] * 10 + [False] * 10
    renamed = {**check.load_concept("world_cross"), "key": "my_cross"}
    assert check.scene_samplers(renamed) != (CONCEPTS["world_cross"].present, CONCEPTS["world_cross"].absent)


@needs_clip
def test_pair_zero_shot_is_deterministic_and_separates_a_clear_pair(tmp_path):
    from omegaconf import OmegaConf

    triangle = check.load_concept("world_triangle")
    first = check.pair_zero_shot(triangle)
    assert first == check.pair_zero_shot(OmegaConf.create(triangle)) >= check.ZERO_SHOT_BAR
    custom = check.pair_zero_shot(check.load_concept(_custom(tmp_path)))
    assert 0.0 <= custom <= 1.0
    swapped = {**triangle, "c_u": triangle["c_a"], "c_a": triangle["c_u"]}
    assert check.pair_zero_shot(swapped) == pytest.approx(1 - first)


@needs_clip
def test_main_checks_a_concept_file_with_both_clips(tmp_path, capsys):
    code = check.main(["--concept", str(_custom(tmp_path)), "--concept", "world_triangle", "--threads", "1",
                       "--skip", "judges", "generation", "speed"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[:2] == ["| check | measured | bar | verdict |", "|---|---|---|---|"]
    names = [line.split(" | ")[0] for line in lines[2:-1]]
    assert names == ["| evaluator CLIP zero-shot: my_blue_square (blue vs shape)",
                     "| evaluator CLIP zero-shot: world_triangle (triangle vs shape)",
                     "| generator CLIP (Espresso's) zero-shot: my_blue_square (blue vs shape)",
                     "| generator CLIP (Espresso's) zero-shot: world_triangle (triangle vs shape)"]
    assert lines[-1] == f"world-check: {'PASS' if code == 0 else 'FAIL'}"
    verdicts = [line.strip("| ").rsplit(" | ", 1)[-1] for line in lines[2:-1]]
    assert verdicts[2:] == ["info", "info"]  # the generator CLIP is Espresso's starting point, not a gate
