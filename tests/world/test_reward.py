"""The world reward classifier (ShieldDiff's reward on the world) is not the evaluation judge, and reads fresh
renders correctly."""

from __future__ import annotations

import pytest
import torch

from world.reward import META_FILE, REWARD_DIR, WEIGHTS_FILE, RewardClassifier, accuracy, load, predicate_probability

SHIPPED = (REWARD_DIR / WEIGHTS_FILE).exists()
needs_weights = pytest.mark.skipif(not SHIPPED, reason="world reward classifier not trained (python -m world.reward)")
FRESH_SEED = 31337  # neither its training stream (9001), its meta's test stream (777), nor the judges' (1245)


@needs_weights
def test_reward_classifier_is_not_the_judge():
    from runners.spec import sha256_file
    from world.judges import JUDGES_DIR, load_attribute_judges
    from world.models import JUDGE_FAMILIES, AttributeJudge
    from world.train import TrainConfig

    model, meta = load()
    judges = load_attribute_judges()
    assert not isinstance(model, AttributeJudge) and set(meta["families"]) == set(JUDGE_FAMILIES)
    judge_numel = {f: sum(p.numel() for p in j.parameters()) for f, j in judges.items()}
    assert sum(p.numel() for p in model.parameters()) not in set(judge_numel.values()) | {sum(judge_numel.values())}
    judge_shas = {sha256_file(p) for p in JUDGES_DIR.glob("*.safetensors")}
    assert sha256_file(REWARD_DIR / WEIGHTS_FILE) not in judge_shas
    judge_seed = TrainConfig().seed
    config = meta["config"]
    assert config["init_seed"] != judge_seed and config["render_seed"] not in (judge_seed, judge_seed + 11)
    # and it is a different function: on the same images its colour probabilities differ from the judge's
    from world.reward import renders

    x, _ = renders(FRESH_SEED, 1, 64)
    with torch.no_grad():
        ours = model(x)["colour"].softmax(-1)
        theirs = judges["colour"](x).softmax(-1)
    assert (ours - theirs).abs().max() > 1e-3


@needs_weights
def test_reward_classifier_accuracy_on_fresh_renders():
    model, meta = load()
    recorded = meta["fresh_render_accuracy"]
    assert recorded["seed"] != meta["config"]["render_seed"] and recorded["images"] >= 1000
    assert min(recorded["per_family"].values()) >= 0.97, recorded
    fresh = accuracy(model, FRESH_SEED, 600)
    assert min(fresh.values()) >= 0.97, fresh


@needs_weights
def test_meta_names_the_architecture_and_the_files_exist():
    _, meta = load()
    assert meta["architecture"] == "world.reward.RewardClassifier"
    assert (REWARD_DIR / META_FILE).exists()


def test_predicate_probability_is_the_product_of_the_required_labels():
    torch.manual_seed(0)
    model = RewardClassifier(width=16).eval()
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        logits = model(x)
        got = predicate_probability(model, x, {"shape": "circle", "colour": "yellow"})
    shape = logits["shape"].softmax(-1)[:, model.families["shape"].index("circle")]
    colour = logits["colour"].softmax(-1)[:, model.families["colour"].index("yellow")]
    torch.testing.assert_close(got, shape * colour)
    with pytest.raises(ValueError):
        predicate_probability(model, x, {"colour": "orange"})
