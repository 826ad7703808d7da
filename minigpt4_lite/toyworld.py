"""ToyWorld: a tiny procedural world of coloured shapes that stands in for photos and captions.

MiniGPT-4 aligns a vision encoder with a language model using image-text pairs. Real photos and
captions need big models and GPUs; ToyWorld gives the same story in miniature, on a laptop CPU.

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
  PIL image) and text "registers" (caption, detailed description, Q&A, poem, story) that are
  generated from the ground truth with varied wording chosen by a ``random.Random``.

Splits
------
Train scenes use even seeds (0, 2, 4, ...) and held-out scenes odd seeds (1, 3, 5, ...), so the
two never overlap. Train scenes never contain the ``HELDOUT_COMBOS`` (a purple star, an orange
heart), so a model can be tested on colour-shape combinations it has never seen.

Evaluation uses ``mentioned_objects(text)``, which finds every "<colour> <shape>" mention.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from functools import cached_property

from PIL import Image, ImageDraw

from .errors import ConfigError

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


# --------------------------------------------------------------------------- text helpers


def _a(phrase: str) -> str:
    """Prefix the right indefinite article: "a red star", "an orange heart"."""
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _join(items: Sequence[str]) -> str:
    """"x", "x and y", "x, y and z"."""
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _count(n: int, noun: str) -> str:
    """"one object", "three objects"."""
    return f"{NUMBER_WORDS[n]} {noun}{'' if n == 1 else 's'}"


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _shuffled(scene: Scene, rng: random.Random) -> list[Obj]:
    return rng.sample(list(scene.objects), len(scene.objects))


def _relation(a: Obj, b: Obj, rng: random.Random) -> str:
    """A true spatial relation word linking a to b ("to the left of", "above", "next to"...)."""
    (ra, ca), (rb, cb) = divmod(a.cell, GRID), divmod(b.cell, GRID)
    options = []
    if ca != cb:
        options += ["to the left of", "left of"] if ca < cb else ["to the right of", "right of"]
    if ra != rb:
        options += ["above", "higher up than"] if ra < rb else ["below", "lower down than"]
    if abs(ra - rb) + abs(ca - cb) == 1:  # orthogonal neighbours
        options += ["next to", "beside"]
    return rng.choice(options)


# --------------------------------------------------------------------------- text registers


def caption(scene: Scene, rng: random.Random) -> str:
    """Short stage-1 caption naming every object; lowercase, no ``.!"()*#:;~`` characters."""
    sized = rng.random() < 0.5
    things = _join([_a(o.full_name if sized else o.name) for o in _shuffled(scene, rng)])
    n, bg = len(scene.objects), BACKGROUND_WORDS[scene.background]
    template = rng.choice([
        "{things}", "a picture of {things}", "an image with {things}", "{count}, {things}",
        "{things} on a {bg} background", "a {bg} background with {things}",
        "there is {things}", "{shapes} on {bg}, {things}",
    ])
    return template.format(things=things, count=_count(n, "object"), shapes=_count(n, "shape"),
                           bg=bg)


_COUNT_SENTENCES = ("There {be} {count} in this image.", "The picture shows {count}.",
                    "I can see {count} in total.", "This scene contains {count}.")
_PLACE_CLAUSES = ("{a_thing} is in the {pos}", "in the {pos} there is {a_thing}",
                  "the {pos} holds {a_thing}", "{a_thing} sits in the {pos}",
                  "you can see {a_thing} in the {pos}")
_RELATION_SENTENCES = ("The {x} is {rel} the {y}.", "Note that the {x} is {rel} the {y}.",
                       "Looking closer, the {x} is {rel} the {y}.")
_BACKGROUND_SENTENCES = ("The background is {bg}.", "Everything sits on a {bg} background.",
                         "It is all drawn on a plain {bg} background.")


def detailed_description(scene: Scene, rng: random.Random) -> str:
    """2-6 sentences: the count, every object with size, colour, shape and place, one true spatial
    relation (when there are two or more objects) and the background colour.

    Objects come in reading order (top left to bottom right), as a person scanning the picture
    would list them; a fixed order also keeps the tiny LLM from repeating or skipping objects.
    """
    objs, n = list(scene.objects), len(scene.objects)
    noun = rng.choice(["object", "shape"])
    sentences = [rng.choice(_COUNT_SENTENCES).format(be="is" if n == 1 else "are",
                                                     count=_count(n, noun))]
    clauses = [rng.choice(_PLACE_CLAUSES).format(a_thing=_a(o.full_name), pos=cell_phrase(o.cell))
               for o in objs]
    # Four one-clause sentences would make seven in all, so pair clauses up then (or by chance).
    per = 2 if n == 4 or (n >= 2 and rng.random() < 0.4) else 1
    sentences += [_cap(", and ".join(clauses[i:i + per])) + "." for i in range(0, n, per)]
    if n >= 2:
        x, y = rng.sample(objs, 2)
        sentences.append(rng.choice(_RELATION_SENTENCES).format(
            x=x.name, y=y.name, rel=_relation(x, y, rng)))
    bg = BACKGROUND_WORDS[scene.background]
    sentences.append(rng.choice(_BACKGROUND_SENTENCES).format(bg=bg))
    return " ".join(sentences)


def qa_pairs(scene: Scene, rng: random.Random, *,
             avoid_combos: Collection[tuple[str, str]] = HELDOUT_COMBOS
             ) -> list[tuple[str, str, str]]:
    """(question, answer, key) triples, grouped by kind in this order:

    colour (one per shape that occurs once), count, position (one per object), shape at a cell,
    size, existence "yes" and existence "no" (about an absent colour-shape pair, never one of
    ``avoid_combos``, so held-out pairs are not even named in training text). ``key`` is the
    lowercase word or phrase that a correct answer must contain (compare case-insensitively and,
    ideally, as whole words: "center" is also inside "bottom center").
    """
    objs, n = _shuffled(scene, rng), len(scene.objects)
    qa: list[tuple[str, str, str]] = []
    shape_counts = {s: sum(o.shape == s for o in objs) for s in SHAPES}
    for o in objs:
        if shape_counts[o.shape] == 1:
            q = rng.choice(["What colour is the {s}?", "Which colour is the {s}?",
                            "What is the colour of the {s}?", "Tell me the colour of the {s}."])
            a = rng.choice(["The {s} is {c}.", "It is {c}.", "The {s} in the picture is {c}."])
            qa.append((q.format(s=o.shape), a.format(s=o.shape, c=o.colour), o.colour))
    noun = rng.choice(["object", "shape"])
    q = rng.choice([f"How many {noun}s are there?", f"How many {noun}s can you see?",
                    f"Count the {noun}s in the image.", f"How many {noun}s are in the picture?"])
    a = rng.choice([f"There {'is' if n == 1 else 'are'} {_count(n, noun)}.",
                    f"I can see {_count(n, noun)}.", _cap(_count(n, noun)) + "."])
    qa.append((q, a, NUMBER_WORDS[n]))
    for o in objs:
        pos = cell_phrase(o.cell)
        q = rng.choice(["Where is the {t}?", "In which part of the image is the {t}?",
                        "Where can I find the {t}?"])
        a = rng.choice(["The {t} is in the {p}.", "It is in the {p}.",
                        "You can find it in the {p}."])
        qa.append((q.format(t=o.name), a.format(t=o.name, p=pos), pos))
    o = rng.choice(objs)
    q = rng.choice(["What shape is in the {p}?", "Which shape is in the {p}?",
                    "What is in the {p}?"])
    a = rng.choice(["There is {t} in the {p}.", "It is {t}."])
    qa.append((q.format(p=cell_phrase(o.cell)),
               a.format(t=_a(o.full_name), p=cell_phrase(o.cell)), o.shape))
    o = rng.choice(objs)
    q = rng.choice(["Is the {t} small or large?", "Is the {t} large or small?",
                    "How big is the {t}?"])
    a = rng.choice(["The {t} is {z}.", "It is {z}."])
    qa.append((q.format(t=o.name), a.format(t=o.name, z=o.size), o.size))
    ask = rng.choice(["Is there {t}?", "Do you see {t}?", "Is there {t} in the picture?",
                      "Can you spot {t}?"])
    o = rng.choice(objs)
    a = rng.choice(["Yes, there is {t}.", "Yes, I can see {t}.", "Yes, {t} is in the {p}."])
    qa.append((ask.format(t=_a(o.name)), a.format(t=_a(o.name), p=cell_phrase(o.cell)), "yes"))
    present, avoid = scene.combos, set(avoid_combos)
    absent = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in present | avoid]
    # Half the time ask a near miss (right colour or right shape, wrong pairing): harder to guess.
    near = [(c, s) for c, s in absent if any(c == pc or s == ps for pc, ps in present)]
    c, s = rng.choice(near if near and rng.random() < 0.5 else absent)
    ask = rng.choice(["Is there {t}?", "Do you see {t}?", "Is there {t} in the picture?",
                      "Can you spot {t}?"])
    a = rng.choice(["No, there is no {cs}.", "No, I cannot see {t}.", "No, there is no {cs} here."])
    qa.append((ask.format(t=_a(f"{c} {s}")), a.format(t=_a(f"{c} {s}"), cs=f"{c} {s}"), "no"))
    return qa


def poem(scene: Scene, rng: random.Random) -> str:
    """A four-line poem naming every object as "<colour> <shape>".

    The lines are joined with " / " (a poet's line break) so that the poem is a single line of
    text, like every other register.
    """
    objs, n = _shuffled(scene, rng), len(scene.objects)
    bg = BACKGROUND_WORDS[scene.background]
    little = f"{NUMBER_WORDS[n]} little " + ("shape comes" if n == 1 else "shapes come")
    opening = rng.choice([f"upon a {bg} page we look and play", "look closely now and you will see",
                          f"{little} out to play", "here is a picture calm and bright",
                          "in a grid of three by three"])
    singles = ["{a} is shining bright", "here sits {a} so neat", "{a} stands tall and proud",
               "I spy {a} in the {p}"]
    pairs = ["{a} and {b}", "{a} waves to {b}", "{a} sings with {b}"]
    middle = []
    groups = [objs] if n == 1 else [objs[:1], objs[1:]] if n == 2 else [objs[:2], objs[2:]]
    for g in groups:
        if len(g) == 1:
            middle.append(rng.choice(singles).format(a=_a(g[0].name), p=cell_phrase(g[0].cell)))
        else:
            middle.append(rng.choice(pairs).format(a=_a(g[0].name), b=_a(g[1].name)))
    if n == 1:
        middle.append(rng.choice([f"alone it rests on {bg}", "no other shape is near",
                                  "it has the grid all to itself"]))
    if n > 1:
        rng.shuffle(middle)  # with one object the filler line ("it ...") must come after it
    closing = rng.choice(["and that is all the picture shows", "the picture rests in quiet calm",
                          "goodnight to every shape in view", "and so the little scene is done"])
    return " / ".join(_cap(line) for line in [opening, *middle, closing])


def story(scene: Scene, rng: random.Random) -> str:
    """A tiny story of 2-4 sentences naming every object as "<colour> <shape>"."""
    hero, *others = _shuffled(scene, rng)
    bg = BACKGROUND_WORDS[scene.background]
    pos = cell_phrase(hero.cell)
    sentences = [rng.choice([
        f"Once upon a time, {_a(hero.name)} lived in the {pos} of a {bg} world.",
        f"One morning, {_a(hero.name)} woke up in the {pos}.",
        f"There was once {_a(hero.full_name)} who loved its {bg} land.",
        f"In a quiet {bg} land, {_a(hero.name)} was getting ready for the day.",
    ])]
    if others:
        friends = _join([_a(o.name) for o in others])
        sentences.append(rng.choice([f"One day it met {friends}.", f"It waved hello to {friends}.",
                                     f"Soon it made friends with {friends}.",
                                     f"Before long, {friends} came to visit."]))
    else:
        sentences.append(rng.choice(["It had the whole grid to itself.",
                                     "No other shape was around, so it sang a little song."]))
    if rng.random() < 0.7:
        sentences.append(rng.choice(["And that is the end of the story.", "The end.",
                                     "When night came, everyone went to sleep.",
                                     "It was a very good day."]))
    return " ".join(sentences)


def scene_in_words(scene: Scene) -> str:
    """Canonical listing in cell order: "top left: small red circle; center: large blue star"."""
    return "; ".join(f"{cell_phrase(o.cell)}: {o.full_name}" for o in scene.objects)


# --------------------------------------------------------------------------- evaluation

_MENTION = re.compile(
    r"\b(" + "|".join(COLOURS) + r")[\s-]+(?:(?:" + "|".join(SIZES) + r")[\s-]+)?("
    + "|".join(SHAPES) + r")(?:es|s)?\b",
    re.IGNORECASE,
)


def mentioned_objects(text: str) -> set[tuple[str, str]]:
    """The (colour, shape) pairs mentioned in ``text``, e.g. {("red", "circle")}.

    A mention is a colour word, optionally a size word, then a shape word, possibly plural
    ("large red circle", "red circles", "blue crosses", "red small star"); case-insensitive.
    Words must be separated by spaces or hyphens only, so punctuation between a colour and a shape
    ("sky blue. A circle") is never read as a mention, while punctuation around one ("(red star),")
    does not hide it. Negation is not understood: "there is no green cross" yields
    ("green", "cross"); callers only parse captions, descriptions, poems and stories, never Q&A.
    """
    return {(m.group(1).lower(), m.group(2).lower()) for m in _MENTION.finditer(text)}


# --- Tasks: an instruction and its ground-truth answer, in every register ------------------------
DETAILED_INSTRUCTIONS = (  # the official alignment prompts, then the curation prompt (Sec. 3.2)
    "Describe this image in detail.",
    "Take a look at this image and describe what you notice.",
    "Please provide a detailed description of the picture.",
    "Could you describe the contents of this image for me?",
    "Describe this image in detail. Give as many details as possible. Say everything you see.",
)
POEM_INSTRUCTIONS = ("Write a poem about this image.",
                     "Can you write a short poem about this picture?",
                     "Compose a little poem inspired by the image.")
STORY_INSTRUCTIONS = ("Tell me a short story about this image.",
                      "Write a tiny story based on this picture.",
                      "Can you make up a story about what you see?")
CAPTION_INSTRUCTIONS = ("Give a short caption for this image.", "Describe this image briefly.",
                        "What is in this picture? Answer in a few words.")
TASK_KINDS = ("detailed", "qa", "poem", "story", "caption")


def sample_task(scene: Scene, rng: random.Random, kind: str) -> tuple[str, str]:
    """One (instruction, answer) pair of the given register for `scene`, worded at random."""
    if kind == "detailed":
        return rng.choice(DETAILED_INSTRUCTIONS), detailed_description(scene, rng)
    if kind == "qa":
        question, answer, _ = rng.choice(qa_pairs(scene, rng))
        return question, answer
    if kind == "poem":
        return rng.choice(POEM_INSTRUCTIONS), poem(scene, rng)
    if kind == "story":
        return rng.choice(STORY_INSTRUCTIONS), story(scene, rng)
    if kind == "caption":
        text = caption(scene, rng)
        return rng.choice(CAPTION_INSTRUCTIONS), text[0].upper() + text[1:] + "."
    raise ValueError(f"Unknown task kind {kind!r}; choose one of {', '.join(TASK_KINDS)}.")
