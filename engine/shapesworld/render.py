"""ShapesWorld: a synthetic world of rendered shapes with captions.

It is what earkit's embedded default model and judge are trained on (no image model or data
set can be downloaded here): a 64 x 64 image holds one shape (circle, square, triangle, star,
cross) in one of six colours, three sizes, at one of up to 25 positions (on the tokenizer's
8-pixel grid) on one of three backgrounds, drawn anti-aliased; each image has captions from varied templates ("a red circle",
"a photo of a small blue star on a white background", ...). Everything is deterministic from a
seed.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "star", "cross")
COLOURS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
    "yellow": (235, 210, 40), "purple": (150, 60, 190), "orange": (245, 140, 30),
}
BACKGROUNDS = {"white": (245, 245, 245), "black": (20, 20, 20), "gray": (128, 128, 128)}
SIZES = {"small": 0.20, "medium": 0.28, "large": 0.36}  # radius as a fraction of the image side

CAPTION_TEMPLATES = (
    "a {colour} {shape}",
    "a {size} {colour} {shape}",
    "a {colour} {shape} on a {background} background",
    "a photo of a {colour} {shape}",
    "a photo of a {size} {colour} {shape} on a {background} background",
    "a picture of a {size} {colour} {shape}",
    "an image of a {colour} {shape}",
    "a drawing of a {colour} {shape} on {background}",
    "{colour} {shape}",
    "a {shape} that is {colour}",
)
SUPERSAMPLE = 4  # drawn at 4x and downsampled: anti-aliased edges


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    size: str
    background: str
    x: float  # centre, as a fraction of the side
    y: float
    rotation: float  # degrees

    @property
    def label(self) -> str:
        return f"{self.colour} {self.shape}"


# Shapes sit upright with their centre on the corner of an 8 x 8 pixel cell: the patch grid of the
# VQ tokenizer (patch 8). Then a shape drawn somewhere else is the same token pattern shifted by
# whole patches, which a tiny generator can learn in minutes; with centres anywhere and a +-15 degree
# tilt, every edge falls on a new sub-patch offset and angle, and the generator trained on the same
# budget drew the requested shape in only 64% of its images.
POSITION_STEP = 8 / 64  # as a fraction of the side


def random_scene(rng: random.Random, shape: str | None = None, colour: str | None = None) -> Scene:
    size = rng.choice(list(SIZES))
    margin = SIZES[size] + 0.04
    steps = [k * POSITION_STEP for k in range(1, round(1 / POSITION_STEP))]
    centres = [c for c in steps if margin <= c <= 1 - margin]  # large: the middle only; small: 5 per axis
    return Scene(
        shape=shape or rng.choice(SHAPES), colour=colour or rng.choice(list(COLOURS)), size=size,
        background=rng.choice(list(BACKGROUNDS)), x=rng.choice(centres), y=rng.choice(centres), rotation=0.0,
    )


def _polygon(scene: Scene, side: float) -> list[tuple[float, float]]:
    cx, cy, r = scene.x * side, scene.y * side, SIZES[scene.size] * side
    if scene.shape == "square":
        corners = [(-1, -1), (1, -1), (1, 1), (-1, 1)]
        points = [(0.8 * r * dx, 0.8 * r * dy) for dx, dy in corners]
    elif scene.shape == "triangle":
        points = [(r * math.cos(math.radians(a)), r * math.sin(math.radians(a))) for a in (-90, 30, 150)]
    elif scene.shape == "star":
        points = []
        for k in range(10):
            radius = r if k % 2 == 0 else 0.42 * r
            angle = math.radians(-90 + 36 * k)
            points.append((radius * math.cos(angle), radius * math.sin(angle)))
    elif scene.shape == "cross":
        a, b = 0.3 * r, r
        points = [(-a, -b), (a, -b), (a, -a), (b, -a), (b, a), (a, a), (a, b), (-a, b), (-a, a), (-b, a), (-b, -a),
                  (-a, -a)]
    else:
        raise ValueError(f"no polygon for shape {scene.shape!r}")
    turn = math.radians(scene.rotation)
    cos, sin = math.cos(turn), math.sin(turn)
    return [(cx + px * cos - py * sin, cy + px * sin + py * cos) for px, py in points]


def render(scene: Scene, image_size: int = 64) -> Image.Image:
    """The scene as an RGB PIL image of image_size x image_size."""
    side = image_size * SUPERSAMPLE
    image = Image.new("RGB", (side, side), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(image)
    fill = COLOURS[scene.colour]
    if scene.shape == "circle":
        cx, cy, r = scene.x * side, scene.y * side, 0.9 * SIZES[scene.size] * side
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        draw.polygon(_polygon(scene, side), fill=fill)
    return image.resize((image_size, image_size), Image.Resampling.LANCZOS)


def caption(scene: Scene, rng: random.Random) -> str:
    template = rng.choice(CAPTION_TEMPLATES)
    return template.format(shape=scene.shape, colour=scene.colour, size=scene.size, background=scene.background)


def vocabulary() -> list[str]:
    """Every word a ShapesWorld caption (or an erasure prompt) can use."""
    from ..tiny import words_of

    import re

    templates = [re.sub(r"\{\w+\}", " ", template) for template in CAPTION_TEMPLATES]  # placeholders out
    return sorted(set(words_of(templates + list(SHAPES) + list(COLOURS) + list(BACKGROUNDS) + list(SIZES))))


PROMPT_VOCABULARY = "prompt_vocabulary.json"  # in the generator folder: what the template pair backend reads


def prompt_vocabulary() -> dict:
    """The caption templates and the words for their slots, as prompt_vocabulary.json holds them in
    the generator folder: prompts built from them use only words the generator's tokenizer knows."""
    return {
        "format": "earkit-prompt-vocabulary",
        "version": 1,
        "templates": list(CAPTION_TEMPLATES),
        "slots": {"shape": list(SHAPES), "colour": list(COLOURS), "size": list(SIZES),
                  "background": list(BACKGROUNDS)},
    }


def make_dataset(n: int, seed: int, image_size: int = 64) -> tuple[np.ndarray, list[str], list[Scene]]:
    """n images (uint8, N x S x S x 3), one caption each, and their scenes; shapes and colours balanced."""
    rng = random.Random(seed)
    scenes = [random_scene(rng, shape=SHAPES[i % len(SHAPES)]) for i in range(n)]
    rng.shuffle(scenes)
    images = np.stack([np.asarray(render(scene, image_size)) for scene in scenes])
    captions = [caption(scene, rng) for scene in scenes]
    return images, captions, scenes


def image_tensor(images: np.ndarray):
    """uint8 N x S x S x 3 -> float N x 3 x S x S in [-1, 1] (the VQ model's pixel range)."""
    import torch

    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
