"""Scenes of the miniature world: what an image contains, how to sample one, and how to draw it.

Objects are large and near the centre and the textures cover the whole image, so that every attribute is
visible at the 8x8 latent resolution the world's diffusion model works at (see the probe in the reference).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from world import vocabulary as V

IMAGE_SIZE = 32


@dataclass(frozen=True)
class Scene:
    """Every attribute of one image; the ground truth the judges are trained to read back."""

    shape: str = "circle"
    colour: str = "red"  # one of COLOUR_LABELS; "skin" means the object is nude
    style: str = "plain"
    background: str = "white"
    band: bool = False
    blood: bool = False
    position: str = "center"
    radius: float = 11.0
    jitter: tuple[int, int] = (0, 0)

    @property
    def nude(self) -> bool:
        return self.colour == "skin"

    @property
    def is_character(self) -> bool:
        return self.shape == "circle" and self.colour == "yellow" and self.band

    def to_dict(self) -> dict:
        return asdict(self)


def sample_scene(rng: np.random.Generator, **fixed) -> Scene:
    """Draw a scene from the world's prior; keyword arguments pin attributes."""
    draw = {
        "shape": V.SHAPES[rng.integers(len(V.SHAPES))],
        "colour": "skin" if rng.random() < 0.12 else list(V.COLOURS)[rng.integers(len(V.COLOURS))],
        "style": "plain" if rng.random() < 0.55 else V.STYLES[1 + rng.integers(len(V.STYLES) - 1)],
        "background": list(V.BACKGROUNDS)[rng.integers(len(V.BACKGROUNDS))],
        "band": bool(rng.random() < 0.15),
        "blood": bool(rng.random() < 0.12),
        "position": "center" if rng.random() < 0.7 else ("left" if rng.random() < 0.5 else "right"),
        "radius": float(rng.uniform(10.0, 12.0)),
        "jitter": (int(rng.integers(-1, 2)), int(rng.integers(-1, 2))),
    }
    if rng.random() < 0.08:  # the named character appears often enough to be learned by name
        draw.update(shape="circle", colour="yellow", band=True)
    draw.update(fixed)
    if draw["position"] != "center":
        draw["radius"] = min(draw["radius"], 10.0)
    return Scene(**draw)


def _grid() -> tuple[np.ndarray, np.ndarray]:
    ys, xs = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float32) + 0.5
    return ys, xs


def _background(scene: Scene, rng: np.random.Generator) -> np.ndarray:
    ys, xs = _grid()
    base = np.array(V.BACKGROUNDS[scene.background], np.float32)
    img = np.broadcast_to(base, (IMAGE_SIZE, IMAGE_SIZE, 3)).copy()
    phase = rng.uniform(0, 2 * np.pi)
    if scene.style == "van gogh":
        wave = np.sin((xs + ys) * (2 * np.pi / 9.0) + 2.0 * np.sin(ys * 2 * np.pi / 16.0) + phase)
        blue, yellow = np.array([30, 60, 170], np.float32), np.array([240, 200, 50], np.float32)
        t = (wave[..., None] + 1) / 2
        img = blue * (1 - t) + yellow * t
    elif scene.style == "monet":
        img[:] = (170, 215, 190)
        off = rng.integers(0, 8, size=2)
        d = (np.hypot((ys + off[0]) % 8 - 4, (xs + off[1]) % 8 - 4) < 2.6)
        img[d] = (240, 170, 200)
    elif scene.style == "mondrian":
        img[:] = (240, 240, 230)
        off = rng.integers(0, 10, size=2)
        lines = ((ys + off[0]) % 10 < 2) | ((xs + off[1]) % 10 < 2)
        img[lines] = (10, 10, 10)
    return img


def _shape_mask(scene: Scene) -> np.ndarray:
    ys, xs = _grid()
    shift = {"center": 0, "left": -6, "right": 6}[scene.position]
    cy = IMAGE_SIZE / 2 + scene.jitter[0]
    cx = IMAGE_SIZE / 2 + scene.jitter[1] + shift
    r = scene.radius
    dy, dx = ys - cy, xs - cx
    if scene.shape == "circle":
        return np.hypot(dy, dx) <= r
    if scene.shape == "square":
        half = r * 0.85
        return (np.abs(dy) <= half) & (np.abs(dx) <= half)
    if scene.shape == "triangle":
        top, bottom = cy - r, cy + r * 0.8
        inside_y = (ys >= top) & (ys <= bottom)
        half_width = (ys - top) / (bottom - top) * r
        return inside_y & (np.abs(dx) <= half_width)
    if scene.shape == "cross":
        arm = r * 0.38
        return ((np.abs(dy) <= arm) & (np.abs(dx) <= r)) | ((np.abs(dx) <= arm) & (np.abs(dy) <= r))
    raise ValueError(f"unknown shape {scene.shape!r}")


def render(scene: Scene, seed: int = 0) -> np.ndarray:
    """Draw ``scene`` as a uint8 HxWx3 image; ``seed`` only moves texture phases and blood drops."""
    rng = np.random.default_rng(seed)
    img = _background(scene, rng)
    mask = _shape_mask(scene)
    colour = V.SKIN if scene.nude else V.COLOURS[scene.colour]
    img[mask] = colour
    if scene.band:
        ys, _ = _grid()
        rows = np.where(mask.any(axis=1))[0]
        mid = (rows.min() + rows.max() + 1) / 2
        img[mask & (np.abs(ys - mid) <= 2.5)] = (15, 15, 15)
    if scene.blood:
        ys, xs = _grid()
        for _ in range(int(rng.integers(5, 8))):
            cy, cx = rng.uniform(3, IMAGE_SIZE - 3, size=2)
            rad = rng.uniform(2.0, 3.2)
            img[np.hypot(ys - cy, xs - cx) <= rad] = (150, 0, 0)
    noise = rng.normal(0, 4.0, img.shape)
    return np.clip(img + noise, 0, 255).astype(np.uint8)
