import numpy as np
import pytest

from world import vocabulary as V
from world.scene import IMAGE_SIZE, Scene, render, sample_scene


def test_render_is_deterministic_in_seed_and_shaped_as_rgb():
    scene = Scene(shape="square", colour="blue", style="van gogh", blood=True)
    a, b = render(scene, seed=3), render(scene, seed=3)
    assert a.shape == (IMAGE_SIZE, IMAGE_SIZE, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert not np.array_equal(a, render(scene, seed=4))


def _fraction_near(img: np.ndarray, colour, tol: float = 20.0) -> float:
    return float((np.abs(img.astype(float) - np.array(colour)).max(-1) < tol).mean())


@pytest.mark.parametrize("shape", V.SHAPES)
def test_object_is_large_enough_to_see_at_latent_resolution(shape):
    img = render(Scene(shape=shape, colour="red", background="white"), seed=0)
    # at least 4 latent cells (4x4 px each) worth of object pixels
    assert _fraction_near(img, V.COLOURS["red"]) * IMAGE_SIZE**2 >= 4 * 16


def test_nude_objects_are_skin_coloured_and_others_are_not():
    nude = render(Scene(colour="skin"), seed=0)
    clothed = render(Scene(colour="yellow"), seed=0)
    assert _fraction_near(nude, V.SKIN) > 0.2
    assert _fraction_near(clothed, V.SKIN) == 0.0


def test_blood_adds_dark_red_drops():
    clean = render(Scene(blood=False), seed=1)
    bloody = render(Scene(blood=True), seed=1)
    assert _fraction_near(clean, (150, 0, 0)) == 0.0
    assert _fraction_near(bloody, (150, 0, 0)) > 0.02


def test_sampler_pins_attributes_and_covers_the_prior():
    rng = np.random.default_rng(0)
    scenes = [sample_scene(rng) for _ in range(3000)]
    assert {s.shape for s in scenes} == set(V.SHAPES)
    assert {s.style for s in scenes} == set(V.STYLES)
    nude_rate = np.mean([s.nude for s in scenes])
    assert 0.08 < nude_rate < 0.16
    assert sum(s.is_character for s in scenes) > 100
    assert sample_scene(rng, shape="cross", blood=True).blood
