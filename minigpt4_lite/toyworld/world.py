"""ToyWorld's scenes: a tiny procedural world of coloured shapes that stands in for photos.

MiniGPT-4 (Sec. 3) aligns a vision encoder with a language model using image-text pairs. Real
photos and captions need big models and GPUs; ToyWorld gives the same story in miniature, on a
laptop CPU. This module holds the pictures: scenes, their splits and their rendering. What is said
about a scene (captions, descriptions, Q&A, poems, stories, instructions) is in `language`.

The world
---------
* A scene is a 3x3 grid of cells (``GRID``) on a pale background (``BACKGROUNDS``).
* 1 to 4 objects sit in distinct cells, drawn centred in their cell. Each object has a shape
  (``SHAPES``), a colour (``COLOURS``) and a size (``SIZES``: large ~80% of a cell, small ~45%).
* Within one scene no two objects share the same (colour, shape) pair, so "the red star" always
  names exactly one object and every sentence we generate is unambiguous.
* Cells are numbered row-major 0..8 and named by ``cell_phrase``: "top left" ... "center" ...
  "bottom right".
* Everything is a pure function of a seed: ``make_scene(seed)`` -> ``Scene`` -> ``render`` (a
  PIL image); the text registers (`language`) are generated from the same ground truth with
  varied wording chosen by a ``random.Random``.

Splits
------
Train scenes use even seeds (0, 2, 4, ...) and held-out scenes odd seeds (1, 3, 5, ...), so the
two never overlap. Train scenes never contain the ``HELDOUT_COMBOS`` (a purple star, an orange
heart), so a model can be tested on colour-shape combinations it has never seen.
"""
from __future__ import annotations

import math
import random
from collections.abc import Collection
from dataclasses import dataclass
from functools import cached_property

from PIL import Image, ImageDraw

from ..errors import ConfigError

SHAPES = ("circle", "square", "triangle", "star", "heart", "cross")
COLOURS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "black")
SIZES = ("small", "large")
GRID = 3
ROWS = ("top", "middle", "bottom")
COLS = ("left", "center", "right")
BACKGROUNDS = ("white", "grey", "beige", "sky")
NUMBER_WORDS = ("zero", "one", "two", "three", "four")
IMAGE_SIZE = 60  # default render size: 3x3 cells of 20 px
MAX_OBJECTS = 4

COLOUR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "orange": (245, 135, 0), "yellow": (240, 205, 0),
    "green": (30, 160, 50), "blue": (30, 70, 220), "purple": (130, 40, 180),
    "pink": (240, 100, 180), "black": (30, 30, 30),
}
# Pale backgrounds, far (in RGB) from every object colour.
BACKGROUND_RGB: dict[str, tuple[int, int, int]] = {
    "white": (255, 255, 255), "grey": (212, 212, 212),
    "beige": (245, 235, 212), "sky": (205, 230, 250),
}
# How a background is said in words ("sky" alone reads oddly: "a sky background").
BACKGROUND_WORDS = {"white": "white", "grey": "grey", "beige": "beige", "sky": "sky blue"}

# Words naming each cell, row-major. The middle row's centre cell is just "center".
CELL_WORDS: tuple[tuple[str, ...], ...] = tuple(
    ("center",) if (r, c) == (1, 1) else (ROWS[r], COLS[c])
    for r in range(GRID) for c in range(GRID)
)

HELDOUT_COMBOS = frozenset({("purple", "star"), ("orange", "heart")})
SPLITS = ("train", "heldout")


def cell_phrase(cell: int) -> str:
    """Name of a cell: 0 -> "top left", 4 -> "center", 7 -> "bottom center"."""
    return " ".join(CELL_WORDS[cell])


@dataclass(frozen=True)
class Obj:
    """One object: a shape of some colour and size sitting in one grid cell (0..8)."""

    shape: str
    colour: str
    size: str
    cell: int

    @property
    def name(self) -> str:
        """"<colour> <shape>", unique within a scene, e.g. "red star"."""
        return f"{self.colour} {self.shape}"

    @property
    def full_name(self) -> str:
        """"<size> <colour> <shape>", e.g. "large red star"."""
        return f"{self.size} {self.colour} {self.shape}"


@dataclass(frozen=True)
class Scene:
    """A whole scene: objects sorted by cell, a background name and the seed that made it."""

    objects: tuple[Obj, ...]
    background: str
    seed: int

    @cached_property
    def cells(self) -> dict[int, Obj]:
        """Map from occupied cell index to the object in it."""
        return {o.cell: o for o in self.objects}

    @property
    def combos(self) -> set[tuple[str, str]]:
        """The (colour, shape) pairs present in the scene."""
        return {(o.colour, o.shape) for o in self.objects}

    def render(self, size: int = IMAGE_SIZE) -> Image.Image:
        """The scene as an image (`render`): how the training data draws it at the model's size."""
        return render(self, size)


# --------------------------------------------------------------------------- scenes and splits


def make_scene(seed: int, *, exclude_combos: Collection[tuple[str, str]] = ()) -> Scene:
    """Build the scene for ``seed``: 1-4 objects in distinct cells, random attributes.

    (colour, shape) pairs in ``exclude_combos`` are never generated (we redraw the pair from the
    same RNG, so the result is still a pure function of the seed and the exclusions), and a pair
    is never repeated within one scene. The background is "white" half the time, otherwise one of
    the three other backgrounds.
    """
    allowed = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in set(exclude_combos)]
    if len(allowed) < MAX_OBJECTS:
        raise ConfigError(f"exclude_combos leaves only {len(allowed)} colour-shape pairs; "
                          f"at least {MAX_OBJECTS} are needed to build scenes.")
    rng = random.Random(seed)
    n = rng.randint(1, MAX_OBJECTS)
    cells = rng.sample(range(GRID * GRID), n)
    objects: list[Obj] = []
    for cell in cells:
        while True:  # redraw until the pair is allowed and new in this scene
            colour, shape = rng.choice(COLOURS), rng.choice(SHAPES)
            if (colour, shape) in allowed and all(o.name != f"{colour} {shape}" for o in objects):
                break
        objects.append(Obj(shape, colour, rng.choice(SIZES), cell))
    background = "white" if rng.random() < 0.5 else rng.choice(BACKGROUNDS[1:])
    return Scene(tuple(sorted(objects, key=lambda o: o.cell)), background, seed)


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ConfigError(f"Unknown ToyWorld split {split!r}; use one of {', '.join(SPLITS)}.")


def scene_seeds(split: str, n: int, start: int = 0) -> list[int]:
    """Seeds of scenes ``start..start+n-1`` of a split: train 2i (even), heldout 2i+1 (odd)."""
    _check_split(split)
    offset = 0 if split == "train" else 1
    return [2 * i + offset for i in range(start, start + n)]


def make_scenes(split: str, n: int, start: int = 0,
                exclude_heldout_combos: bool | None = None) -> list[Scene]:
    """``n`` scenes of a split. By default only the train split excludes ``HELDOUT_COMBOS``."""
    _check_split(split)
    if exclude_heldout_combos is None:
        exclude_heldout_combos = split == "train"
    exclude = HELDOUT_COMBOS if exclude_heldout_combos else frozenset()
    return [make_scene(s, exclude_combos=exclude) for s in scene_seeds(split, n, start)]


# --------------------------------------------------------------------------- rendering

_SCALE = 4  # draw at 4x, then downsample with LANCZOS for smooth (anti-aliased) edges
_SIZE_FRACTION = {"large": 0.80, "small": 0.45}


def _shape_polygons(shape: str, cx: float, cy: float, r: float) -> list[list[tuple[float, float]]]:
    """Polygons (lists of points) whose union is ``shape`` centred at (cx, cy), half-width r."""
    if shape == "square":
        s = 0.88 * r  # a full-size square looks heavier than the other shapes
        return [[(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]]
    if shape == "triangle":  # pointing up, bounding box centred on the cell
        return [[(cx, cy - r), (cx + r, cy + 0.8 * r), (cx - r, cy + 0.8 * r)]]
    if shape == "cross":  # plus sign with thick arms
        t = 0.34 * r
        return [[(cx - r, cy - t), (cx + r, cy - t), (cx + r, cy + t), (cx - r, cy + t)],
                [(cx - t, cy - r), (cx + t, cy - r), (cx + t, cy + r), (cx - t, cy + r)]]
    if shape == "star":  # 5 points, alternating outer/inner radius, nudged down to look centred
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else 0.46 * r
            a = -math.pi / 2 + k * math.pi / 5
            pts.append((cx + rad * math.cos(a), cy + 0.1 * r + rad * math.sin(a)))
        return [pts]
    raise ValueError(f"Unknown shape {shape!r}")


def _draw_object(draw: ImageDraw.ImageDraw, obj: Obj, cell_px: float) -> None:
    """Draw one object centred in its cell (all coordinates already at the 4x drawing scale)."""
    row, col = divmod(obj.cell, GRID)
    cx, cy = (col + 0.5) * cell_px, (row + 0.5) * cell_px
    r = _SIZE_FRACTION[obj.size] * cell_px / 2
    fill = COLOUR_RGB[obj.colour]
    if obj.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif obj.shape == "heart":  # two round lobes on top of a downward-pointing triangle
        q = 0.52 * r
        for lx in (cx - r + q, cx + r - q):
            draw.ellipse([lx - q, cy - 0.75 * r, lx + q, cy - 0.75 * r + 2 * q], fill=fill)
        draw.polygon([(cx - 0.98 * r, cy - 0.08 * r), (cx + 0.98 * r, cy - 0.08 * r),
                      (cx, cy + r)], fill=fill)
    else:
        for poly in _shape_polygons(obj.shape, cx, cy, r):
            draw.polygon(poly, fill=fill)


def render(scene: Scene, size: int = IMAGE_SIZE) -> Image.Image:
    """Render ``scene`` as an RGB ``size`` x ``size`` image (anti-aliased)."""
    big = size * _SCALE
    img = Image.new("RGB", (big, big), BACKGROUND_RGB[scene.background])
    draw = ImageDraw.Draw(img)
    for obj in scene.objects:
        _draw_object(draw, obj, big / GRID)
    return img.resize((size, size), Image.Resampling.LANCZOS)
