"""ToyWorld's language: every text about a scene, generated from its ground truth (Sec. 3.1-3.2).

MiniGPT-4's two stages read two kinds of text: short captions (stage 1, the image-text pairs) and
detailed descriptions under an instruction (stage 2, Sec. 3.2); the paper's Table 3 also asks for
poems. Here each register is a pure function of a scene and a ``random.Random`` (varied wording,
always true of the scene):

- ``caption``, ``detailed_description``, ``qa_pairs``, ``poem``, ``story``, ``scene_in_words``;
- the instructions of each register (``DETAILED_INSTRUCTIONS`` are the official alignment ones)
  and ``sample_task``, one (instruction, answer) pair of a register (``TASK_KINDS``);
- ``mentioned_objects``, which finds every "<colour> <shape>" mention: how the evaluation reads
  a generated text.

The scenes themselves (grid, objects, rendering, splits) are in `world`.
"""

from __future__ import annotations

import random
import re
from collections.abc import Collection, Sequence

from ..prompts import CURATION_INSTRUCTION, INSTRUCTIONS
from .questions import FIRST_PHASE_QUESTIONS, HELDOUT_QUESTIONS, QUESTIONS  # noqa: F401
from .world import (
    BACKGROUND_WORDS,
    COLOURS,
    GRID,
    HELDOUT_COMBOS,
    NUMBER_WORDS,
    SHAPES,
    SIZES,
    Obj,
    Scene,
    cell_phrase,
)

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


def _pick(options: Sequence[str], rng: random.Random) -> str:
    """One of `options`, drawing one number from `rng` however many there are, so that the
    trained and the held-out wordings (of different counts) ask about the same objects."""
    return options[int(rng.random() * len(options))]


def _pick_naming(options: Sequence[str], rng: random.Random, shape_is_unique: bool) -> str:
    """`_pick`, but a wording that names the object by its shape alone (`{s}`) only where that
    shape is one object; elsewhere the kind's last wording, which names colour and shape."""
    q = _pick(options, rng)
    return q if "{s}" not in q or shape_is_unique else options[-1]


def qa_pairs(scene: Scene, rng: random.Random, *,
             avoid_combos: Collection[tuple[str, str]] = HELDOUT_COMBOS,
             questions: dict[str, tuple[str, ...]] = QUESTIONS) -> list[tuple[str, str, str]]:
    """(question, answer, key) triples, grouped by kind in this order:

    colour (one per shape that occurs once), count, position (one per object), shape at a cell,
    size, existence "yes" and existence "no" (about an absent colour-shape pair, never one of
    ``avoid_combos``, so held-out pairs are not even named in training text), and the shape of
    the only small or only large object where there is one. ``key`` is the lowercase word or
    phrase that a correct answer must contain (compare case-insensitively and, ideally, as whole
    words: "center" is also inside "bottom center"). ``questions`` holds the wordings
    (`QUESTIONS`, or `HELDOUT_QUESTIONS` for the phrasings no training text contains).
    """
    Q = questions
    objs, n = _shuffled(scene, rng), len(scene.objects)
    qa: list[tuple[str, str, str]] = []
    shape_counts = {s: sum(o.shape == s for o in objs) for s in SHAPES}
    unique = lambda o: shape_counts[o.shape] == 1  # noqa: E731 - "the star" names one object
    for o in objs:
        if unique(o):
            q = _pick(Q["colour"], rng)
            a = rng.choice(["The {s} is {c}.", "It is {c}.", "The {s} in the picture is {c}."])
            qa.append((q.format(s=o.shape), a.format(s=o.shape, c=o.colour), o.colour))
    noun = rng.choice(["object", "shape"])
    q = _pick(Q["count"], rng).format(n=noun)
    a = rng.choice([f"There {'is' if n == 1 else 'are'} {_count(n, noun)}.",
                    f"I can see {_count(n, noun)}.", _cap(_count(n, noun)) + "."])
    qa.append((q, a, NUMBER_WORDS[n]))
    for o in objs:
        pos = cell_phrase(o.cell)
        q = _pick_naming(Q["position"], rng, unique(o))
        a = rng.choice(["The {t} is in the {p}.", "It is in the {p}.",
                        "You can find it in the {p}."])
        qa.append((q.format(t=o.name, s=o.shape), a.format(t=o.name, p=pos), pos))
    o = rng.choice(objs)
    q = _pick(Q["shape"], rng)
    a = rng.choice(["There is {t} in the {p}.", "It is {t}."])
    qa.append((q.format(p=cell_phrase(o.cell)),
               a.format(t=_a(o.full_name), p=cell_phrase(o.cell)), o.shape))
    o = rng.choice(objs)
    q = _pick_naming(Q["size"], rng, unique(o))
    a = rng.choice(["The {t} is {z}.", "It is {z}."])
    qa.append((q.format(t=o.name, s=o.shape), a.format(t=o.name, z=o.size), o.size))
    o = rng.choice(objs)
    qa.append((_pick(Q["existence"], rng).format(t=_a(o.name)),
               existence_answer(scene, o.colour, o.shape, rng), "yes"))
    present, avoid = scene.combos, set(avoid_combos)
    absent = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in present | avoid]
    # Half the time ask a near miss (right colour or right shape, wrong pairing): harder to guess.
    near = [(c, s) for c, s in absent if any(c == pc or s == ps for pc, ps in present)]
    c, s = rng.choice(near if near and rng.random() < 0.5 else absent)
    qa.append((_pick(Q["existence"], rng).format(t=_a(f"{c} {s}")),
               existence_answer(scene, c, s, rng), "no"))
    # the object found by its size: asked only where exactly one object has that size
    for size in SIZES:
        sized = [o for o in objs if o.size == size]
        if len(sized) == 1 and n > 1:
            q = _pick(Q["by_size"], rng).format(z=size)
            a = rng.choice(["It is {t}.", "The {z} object is {t}."])
            qa.append((q, a.format(t=_a(sized[0].name), z=size), sized[0].shape))
    return qa


def existence_answer(scene: Scene, colour: str, shape: str, rng: random.Random) -> str:
    """The answer to "Is there a <colour> <shape>?": first what the picture holds, then yes or no.

    "The star is blue, so no." / "The stars are red and blue, so yes." / "There is no star, so
    no." Why the look first: a yes or no said at once has to find the shape *and* compare its
    colour in one step, and a tiny LLM learned to find the shape and answer "yes" to a near miss
    (a blue star asked as a red one). Said first, the colour is the colour question's own lookup
    ("The star is blue."), and the yes or no compares two words already written.
    """
    colours = [o.colour for o in _shuffled(scene, rng) if o.shape == shape]
    verdict = "yes" if colour in colours else "no"
    if not colours:
        return rng.choice([f"There is no {shape}, so no.",
                           f"There is no {shape} in the picture, so no."])
    if len(colours) == 1:
        return rng.choice([f"The {shape} is {colours[0]}, so {verdict}.",
                           f"The {shape} in the picture is {colours[0]}, so {verdict}."])
    return f"The {shape}s are {_join(colours)}, so {verdict}."


# Everyday words of the held-out wordings (the US "color", "located", "contain", and "size",
# "number", "would"), in *statements* of one fact each, never in a question: the kind of sentence
# a web-pretrained LLM like Vicuna has read millions of times. Only the `facts` form of the LLM's
# final phase reads them (`BuildConfig.final_form_weights`; no share in the shipped recipe).
_FACT_SENTENCES = {
    "colour": ("The color of the {s} is {c}.", "The {s} is {c} in color.",
               "The {s} has {ac} color."),
    "size": ("The {x} is {z} in size.", "The size of the {x} is {z}.",
             "In size, the {x} is {z}."),
    "cell": ("The {x} is located in the {p}.", "You would see the {x} in the {p}."),
    "count": ("The number of {n}s is {k}.", "The picture contains {count}."),
}


def fact_sentences(scene: Scene, rng: random.Random, k: int = 2) -> str:
    """`k` sentences, each one fact of `scene` in the words of `_FACT_SENTENCES`.

    "The color of the star is red. The number of shapes is three." A colour fact names its object
    by shape alone, so only an object whose shape occurs once gets one.
    """
    objs = _shuffled(scene, rng)
    n, noun = len(objs), rng.choice(["object", "shape"])
    unique = [o for o in objs if sum(p.shape == o.shape for p in objs) == 1]
    sentences = []
    for kind in rng.sample([*_FACT_SENTENCES] if unique else ["size", "cell", "count"], k):
        o = unique[0] if kind == "colour" else rng.choice(objs)
        sentences.append(rng.choice(_FACT_SENTENCES[kind]).format(
            s=o.shape, c=o.colour, ac=_a(o.colour), x=o.name, z=o.size, p=cell_phrase(o.cell),
            n=noun, k=NUMBER_WORDS[n], count=_count(n, noun)))
    return " ".join(sentences)


def lookup_drill(scene: Scene, rng: random.Random) -> tuple[str, str]:
    """A terse lookup (key, value) about one object: "star" -> "red", "red star" -> "top left".

    Half of them ask the colour of an object named by its shape (where that shape occurs once),
    a quarter its cell and a quarter its size, named by colour and shape. The LLM's pretraining
    lays them out as `<Img>[slots]</Img> star: red`, the same place in every sequence: a fresh
    tiny LLM learns to find an object among the slot vectors in that fixed layout within a few
    hundred steps, where varied question wordings alone stall (docs/asset_history.md).
    """
    objs = _shuffled(scene, rng)
    unique = [o for o in objs if sum(p.shape == o.shape for p in objs) == 1]
    roll = rng.random()
    if unique and roll < 0.5:
        return unique[0].shape, unique[0].colour
    o = objs[0]
    return (o.name, cell_phrase(o.cell)) if roll < 0.75 else (o.name, o.size)


def cell_drill(scene: Scene, rng: random.Random) -> tuple[str, str]:
    """A terse lookup the other way round: a cell -> its object ("middle right" -> "small green
    circle"), about a random occupied cell.

    Asked "What is in the middle right?", the LLM must find the one slot that holds both cell
    words; from exact slots it most often answered with the object of another cell in the same
    row. Laid out like `lookup_drill` (`<Img>[slots]</Img> middle right: small green circle`),
    the cell is the whole question and the object the whole answer (docs/asset_history.md).
    """
    o = _shuffled(scene, rng)[0]
    return cell_phrase(o.cell), f"{o.size} {o.colour} {o.shape}"


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
# the official alignment instructions (without their image tag), then the curation one (Sec. 3.2)
DETAILED_INSTRUCTIONS = (*(i.split("</Img> ", 1)[1] for i in INSTRUCTIONS), CURATION_INSTRUCTION)
POEM_INSTRUCTIONS = ("Write a poem about this image.",
                     "Can you write a short poem about this picture?",
                     "Compose a little poem inspired by the image.")
STORY_INSTRUCTIONS = ("Tell me a short story about this image.",
                      "Write a tiny story based on this picture.",
                      "Can you make up a story about what you see?")
CAPTION_INSTRUCTIONS = ("Give a short caption for this image.", "Describe this image briefly.",
                        "What is in this picture? Answer in a few words.")
TASK_KINDS = ("detailed", "qa", "poem", "story", "caption")


def sample_task(scene: Scene, rng: random.Random, kind: str,
                questions: dict[str, tuple[str, ...]] = QUESTIONS) -> tuple[str, str]:
    """One (instruction, answer) pair of the given register for `scene`, worded at random (a
    question in one of `questions`' wordings)."""
    if kind == "detailed":
        return rng.choice(DETAILED_INSTRUCTIONS), detailed_description(scene, rng)
    if kind == "qa":
        question, answer, _ = rng.choice(qa_pairs(scene, rng, questions=questions))
        return question, answer
    if kind == "poem":
        return rng.choice(POEM_INSTRUCTIONS), poem(scene, rng)
    if kind == "story":
        return rng.choice(STORY_INSTRUCTIONS), story(scene, rng)
    if kind == "caption":
        text = caption(scene, rng)
        return rng.choice(CAPTION_INSTRUCTIONS), text[0].upper() + text[1:] + "."
    raise ValueError(f"Unknown task kind {kind!r}; choose one of {', '.join(TASK_KINDS)}.")
