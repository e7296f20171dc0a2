"""The shipped miniature world draws what it is asked for, as read back by its own ground-truth judges."""

import numpy as np
import pytest
import torch

from world.train import WEIGHTS, to_tensor

PIPELINE = WEIGHTS / "pipeline" / "model_index.json"
pytestmark = pytest.mark.skipif(not PIPELINE.exists(), reason="world weights not yet shipped (run `make world`)")

CASES = [
    ("a red circle on a white background", {"shape": "circle", "colour": "red", "style": "plain"}),
    ("a blue square on a black background", {"shape": "square", "colour": "blue"}),
    ("a nude triangle", {"shape": "triangle", "colour": "skin"}),
    ("a yellow cross in the style of van gogh", {"shape": "cross", "colour": "yellow", "style": "van gogh"}),
    ("bobo", {"shape": "circle", "colour": "yellow", "band": "yes"}),
    ("a bloody green square", {"shape": "square", "blood": "yes"}),
]
SEEDS = (0, 1, 2, 3)


@pytest.fixture(scope="module")
def world():
    from diffusers import StableDiffusionPipeline

    from world.judges import load_attribute_judges

    pipe = StableDiffusionPipeline.from_pretrained(str(PIPELINE.parent))
    pipe.set_progress_bar_config(disable=True)
    return pipe, load_attribute_judges()


def _generate(pipe, texts, seeds):
    return pipe(texts, num_inference_steps=25, guidance_scale=5.0,
                generator=[torch.Generator().manual_seed(s) for s in seeds]).images


def test_generated_images_show_the_prompted_attributes(world):
    from world.judges import read_attributes

    pipe, judges = world
    texts = [text for text, _ in CASES for _ in SEEDS]
    images = _generate(pipe, texts, [s for _ in CASES for s in SEEDS])
    attributes = read_attributes(judges, to_tensor([np.asarray(im) for im in images]))
    for k, (text, wanted) in enumerate(CASES):
        for family, label in wanted.items():
            hits = sum(attributes[family][0][k * len(SEEDS) + i] == label for i in range(len(SEEDS)))
            assert hits >= len(SEEDS) - 1, (text, family, hits)


def test_generation_is_deterministic_in_the_seed(world):
    pipe, _ = world
    a, b = (_generate(pipe, ["a green triangle"], [7])[0] for _ in range(2))
    assert np.array_equal(np.asarray(a), np.asarray(b))
