"""Seeded generator of captioned 64x64 "shapes" scenes: the reference world's data.

A scene holds one or two objects (shape, color, size, position) on a plain background.
Each scene belongs to exactly one split ('train' | 'calib' | 'eval') through a stable hash
of its canonical attribute tuple, so captions of different splits never coincide.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "star")
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 225),
    "yellow": (240, 210, 40),
    "purple": (150, 60, 200),
    "orange": (245, 140, 30),
}
BACKGROUNDS = {"gray": (128, 128, 128), "white": (245, 245, 245), "black": (15, 15, 15)}
SIZES = {"small": 0.13, "large": 0.22}  # radius as a fraction of the image side
POSITIONS = {
    "top left": (0.27, 0.27),
    "top right": (0.73, 0.27),
    "center": (0.5, 0.5),
    "bottom left": (0.27, 0.73),
    "bottom right": (0.73, 0.73),
}
SPLITS = ("train", "calib", "eval")
_SPLIT_BUCKETS = {"train": range(80), "calib": range(80, 90), "eval": range(90, 100)}
_SUPERSAMPLE = 4

# Object phrasing {o} and whole-caption phrasing; every template names every attribute.
_OBJECT_TEMPLATES = (
    "a {size} {color} {shape} at the {position}",
    "a {size} {color} {shape} in the {position}",
    "{article} {color} {shape}, {size}, at the {position}",
)
_SCENE_TEMPLATES = (
    "{objects} on a {background} background",
    "{background} background with {objects}",
    "{objects}, {background} background",
)
N_TEMPLATES = len(_SCENE_TEMPLATES)


@dataclass(frozen=True)
class ShapeObject:
    """One object of a scene, named by its attributes."""

    shape: str
    color: str
    size: str
    position: str


@dataclass(frozen=True)
class Scene:
    """A background and one or two objects at distinct positions, in canonical order."""

    background: str
    objects: tuple[ShapeObject, ...]

    def key(self) -> tuple:
        """Canonical attribute tuple identifying the scene."""
        return (self.background,) + tuple(
            (o.shape, o.color, o.size, o.position) for o in self.objects
        )


def _canonical(objects: list[ShapeObject]) -> tuple[ShapeObject, ...]:
    order = list(POSITIONS)
    return tuple(sorted(objects, key=lambda o: order.index(o.position)))


def sample_scene(rng: np.random.Generator) -> Scene:
    """Draw one scene uniformly over attributes; half the scenes hold two objects."""
    n_objects = 1 + int(rng.integers(2))
    positions = rng.choice(len(POSITIONS), size=n_objects, replace=False)
    objects = [
        ShapeObject(
            shape=SHAPES[rng.integers(len(SHAPES))],
            color=list(COLORS)[rng.integers(len(COLORS))],
            size=list(SIZES)[rng.integers(len(SIZES))],
            position=list(POSITIONS)[p],
        )
        for p in positions
    ]
    background = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    return Scene(background=background, objects=_canonical(objects))


def split_of(scene: Scene) -> str:
    """Split ('train' | 'calib' | 'eval') the scene belongs to, from a stable hash of its key."""
    digest = hashlib.sha256(repr(scene.key()).encode()).digest()
    bucket = int.from_bytes(digest[:8], "little") % 100
    return next(s for s, r in _SPLIT_BUCKETS.items() if bucket in r)


def caption(scene: Scene, template: int = 0) -> str:
    """Caption naming every attribute of the scene, phrased by template index."""
    t = template % N_TEMPLATES
    parts = [
        _OBJECT_TEMPLATES[t].format(
            article="an" if o.color[0] in "aeiou" else "a",
            shape=o.shape, color=o.color, size=o.size, position=o.position,
        )
        for o in scene.objects
    ]
    return _SCENE_TEMPLATES[t].format(objects=" and ".join(parts), background=scene.background)


def _star(cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    pts = []
    for i in range(10):
        rad = r if i % 2 == 0 else r * 0.45
        a = -math.pi / 2 + i * math.pi / 5
        pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
    return pts


def _draw_object(draw: ImageDraw.ImageDraw, obj: ShapeObject, side: int) -> None:
    fx, fy = POSITIONS[obj.position]
    cx, cy, r = fx * side, fy * side, SIZES[obj.size] * side
    fill = COLORS[obj.color]
    if obj.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif obj.shape == "square":
        s = r * 0.85  # equal visual area with the circle, roughly
        draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=fill)
    elif obj.shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r * 0.95, cy + r * 0.75), (cx - r * 0.95, cy + r * 0.75)],
                     fill=fill)
    elif obj.shape == "star":
        draw.polygon(_star(cx, cy, r * 1.1), fill=fill)
    else:
        raise ValueError(f"unknown shape {obj.shape!r}; expected one of {SHAPES}")


def render(scene: Scene, size: int = 64) -> Image.Image:
    """Render the scene as an anti-aliased RGB image of size x size (supersampled, box-filtered)."""
    side = size * _SUPERSAMPLE
    img = Image.new("RGB", (side, side), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(img)
    for obj in scene.objects:
        _draw_object(draw, obj, side)
    return img.resize((size, size), Image.BOX)


def sample_scenes(split: str, n: int, seed: int, unique: bool = True) -> list[Scene]:
    """n scenes of the split, drawn from a seeded stream; distinct scenes when unique."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    rng = np.random.default_rng(seed)
    scenes: list[Scene] = []
    seen: set[Scene] = set()
    for _ in range(200 * n + 1000):
        if len(scenes) == n:
            return scenes
        s = sample_scene(rng)
        if split_of(s) != split or (unique and s in seen):
            continue
        seen.add(s)
        scenes.append(s)
    raise RuntimeError(f"could not draw {n} scenes of split {split!r}; ask for fewer")


def split_prompts(split: str, n: int, seed: int) -> list[str]:
    """Captions of n distinct scenes of the split; templates cycle so all phrasings appear."""
    return [caption(s, i) for i, s in enumerate(sample_scenes(split, n, seed))]


def to_tensor(images: list[Image.Image]) -> torch.Tensor:
    """Stack PIL images into a uint8 tensor [B, 3, H, W]."""
    arr = np.stack([np.asarray(im, dtype=np.uint8) for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def make_dataset(
    split: str, n: int, seed: int, size: int = 64, unique: bool = False
) -> tuple[torch.Tensor, list[str], list[Scene]]:
    """n (image, caption, scene) samples of the split; images uint8 [n, 3, size, size].

    Templates are drawn at random per sample, so each scene is seen under several phrasings.
    """
    scenes = sample_scenes(split, n, seed, unique=unique)
    rng = np.random.default_rng(seed + 1)
    captions = [caption(s, int(rng.integers(N_TEMPLATES))) for s in scenes]
    return to_tensor([render(s, size) for s in scenes]), captions, scenes
