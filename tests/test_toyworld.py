"""Tests for ToyWorld: determinism, splits, rendering and ground-truth-correct text registers."""

import random
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minigpt4_lite.errors import ConfigError
from minigpt4_lite.toyworld import (
    BACKGROUND_RGB,
    BACKGROUND_WORDS,
    BACKGROUNDS,
    CELL_WORDS,
    COLOUR_RGB,
    COLOURS,
    GRID,
    HELDOUT_COMBOS,
    IMAGE_SIZE,
    NUMBER_WORDS,
    SHAPES,
    SIZES,
    Obj,
    Scene,
    caption,
    cell_phrase,
    detailed_description,
    fact_sentences,
    make_scene,
    make_scenes,
    mentioned_objects,
    poem,
    qa_pairs,
    render,
    scene_in_words,
    scene_seeds,
    story,
)

SCENES = make_scenes("train", 300)
REGISTERS = {"caption": caption, "detailed": detailed_description, "poem": poem, "story": story}


def truth(scene: Scene) -> set[tuple[str, str]]:
    return {(o.colour, o.shape) for o in scene.objects}


def has_word(text: str, key: str) -> bool:
    return re.search(rf"\b{re.escape(key)}\b", text.lower()) is not None


# ------------------------------------------------------------------ constants and scenes

def test_constants():
    assert len(SHAPES) == 6 and len(COLOURS) == 8 and GRID == 3 and IMAGE_SIZE == 60
    assert set(BACKGROUND_RGB) == set(BACKGROUNDS) and set(COLOUR_RGB) == set(COLOURS)
    assert [cell_phrase(c) for c in (0, 1, 4, 5, 7)] == [
        "top left", "top center", "center", "middle right", "bottom center"]
    assert CELL_WORDS[4] == ("center",) and CELL_WORDS[8] == ("bottom", "right")
    for bg in BACKGROUND_RGB.values():  # pale backgrounds are far from every object colour
        assert min(np.linalg.norm(np.subtract(bg, c)) for c in COLOUR_RGB.values()) > 100


def test_make_scene_deterministic_and_well_formed():
    assert make_scene(7) == make_scene(7)
    assert make_scene(7) != make_scene(8)
    for scene in SCENES:
        cells = [o.cell for o in scene.objects]
        assert 1 <= len(cells) <= 4 and len(set(cells)) == len(cells) and cells == sorted(cells)
        assert len(truth(scene)) == len(scene.objects)  # no repeated colour-shape pair
        assert scene.cells == {o.cell: o for o in scene.objects}
        assert scene.background in BACKGROUNDS
    assert {len(s.objects) for s in SCENES} == {1, 2, 3, 4}
    white = sum(s.background == "white" for s in SCENES) / len(SCENES)
    assert 0.4 < white < 0.6


def test_exclude_combos_honoured():
    exclude = {(c, s) for c in COLOURS for s in SHAPES if c == "red" or s == "circle"}
    for seed in range(200):
        scene = make_scene(seed, exclude_combos=exclude)
        assert not truth(scene) & exclude
        assert scene == make_scene(seed, exclude_combos=exclude)
    with pytest.raises(ConfigError):
        make_scene(0, exclude_combos={(c, s) for c in COLOURS for s in SHAPES})


def test_splits():
    train, held = scene_seeds("train", 500), scene_seeds("heldout", 500)
    assert not set(train) & set(held)
    assert scene_seeds("train", 3, start=2) == train[2:5]
    assert all(not truth(s) & HELDOUT_COMBOS for s in make_scenes("train", 1000))
    assert any(truth(s) & HELDOUT_COMBOS for s in make_scenes("heldout", 300))
    assert [s.seed for s in make_scenes("heldout", 4, start=1)] == held[1:5]
    with pytest.raises(ValueError, match="split"):
        scene_seeds("test", 3)
    with pytest.raises(ValueError, match="split"):
        make_scenes("valid", 3)


# ------------------------------------------------------------------ rendering

def test_render_deterministic():
    a, b = render(make_scene(3)), render(make_scene(3))
    assert a.size == (IMAGE_SIZE, IMAGE_SIZE) and a.mode == "RGB"
    assert a.tobytes() == b.tobytes()
    assert len({render(make_scene(s)).tobytes() for s in range(20)}) == 20
    assert render(make_scene(3), size=96).size == (96, 96)


def nearest_colour(rgb: np.ndarray) -> str:
    return min(COLOURS, key=lambda c: np.linalg.norm(rgb - np.array(COLOUR_RGB[c])))


def test_render_colours_in_cells():
    cell = IMAGE_SIZE // GRID
    checked = 0
    for scene in SCENES[:60]:
        px = np.asarray(render(scene), dtype=float)
        for c in range(GRID * GRID):
            r0, c0 = (c // GRID) * cell + cell // 2, (c % GRID) * cell + cell // 2
            centre = px[r0 - 2:r0 + 2, c0 - 2:c0 + 2].reshape(-1, 3)
            obj = scene.cells.get(c)
            if obj is None:  # empty cells are plain background
                assert np.abs(centre - BACKGROUND_RGB[scene.background]).max() <= 2
            elif obj.size == "large":
                assert nearest_colour(centre.mean(0)) == obj.colour, (scene, obj)
                checked += 1
    assert checked > 20


def test_every_shape_renders_its_colour_at_the_centre():
    for shape in SHAPES:
        for size in ("small", "large"):
            scene = Scene((Obj(shape, "blue", size, 4),), "white", 0)
            px = np.asarray(render(scene), dtype=float)
            assert nearest_colour(px[29:31, 29:31].reshape(-1, 3).mean(0)) == "blue", shape


# ------------------------------------------------------------------ text registers

@pytest.mark.parametrize("name", list(REGISTERS))
def test_registers_mention_exactly_the_objects(name):
    rng = random.Random(0)
    for scene in SCENES:
        text = REGISTERS[name](scene, rng)
        assert mentioned_objects(text) == truth(scene), (name, text, scene_in_words(scene))
        assert "\n" not in text


def test_caption_style():
    rng = random.Random(1)
    for scene in SCENES:
        text = caption(scene, rng)
        assert text == text.lower() and text == text.strip()
        assert not set(text) & set('.!"()*#:;~'), text


# Each relation phrase, and when it is true given (row difference, column difference) of x - y.
RELATIONS = {
    "to the left of": lambda dr, dc: dc < 0, "left of": lambda dr, dc: dc < 0,
    "to the right of": lambda dr, dc: dc > 0, "right of": lambda dr, dc: dc > 0,
    "above": lambda dr, dc: dr < 0, "higher up than": lambda dr, dc: dr < 0,
    "below": lambda dr, dc: dr > 0, "lower down than": lambda dr, dc: dr > 0,
    "next to": lambda dr, dc: abs(dr) + abs(dc) == 1,
    "beside": lambda dr, dc: abs(dr) + abs(dc) == 1,
}


def test_detailed_description_facts():
    rng = random.Random(2)
    relation = re.compile(rf"the (\w+ \w+) is ({'|'.join(RELATIONS)}) the (\w+ \w+)")
    for scene in SCENES:
        text = detailed_description(scene, rng)
        sentences = [s for s in text.split(". ") if s]
        assert text.endswith(".") and 2 <= len(sentences) <= 6, text
        n = len(scene.objects)
        assert has_word(sentences[0], NUMBER_WORDS[n]), text
        assert not any(has_word(sentences[0], w) for w in NUMBER_WORDS if w != NUMBER_WORDS[n])
        for o in scene.objects:
            assert has_word(text, o.full_name) and has_word(text, cell_phrase(o.cell)), text
        assert BACKGROUND_WORDS[scene.background] in text
        matches = relation.findall(text.lower())
        assert len(matches) == (1 if n >= 2 else 0), text
        cells = {o.name: divmod(o.cell, GRID) for o in scene.objects}
        for x, rel, y in matches:
            (rx, cx), (ry, cy) = cells[x], cells[y]
            assert RELATIONS[rel](rx - ry, cx - cy), text


def _named_object(question: str, scene: Scene) -> Obj:
    """The object a question names: by colour and shape, or by a shape that occurs once."""
    words = re.findall(r"\w+", question)
    pairs = mentioned_objects(question)
    if pairs:
        (pair,) = pairs
        return next(o for o in scene.objects if (o.colour, o.shape) == pair)
    (shape,) = {w for w in words if w in SHAPES}
    (obj,) = [o for o in scene.objects if o.shape == shape]  # asked only where it is unique
    return obj


def test_qa_pairs_correct():
    """Every answer is true of the scene, whatever the wording of its question."""
    rng = random.Random(3)
    cells = {cell_phrase(c): c for c in range(GRID * GRID)}
    for scene in SCENES:
        qa = qa_pairs(scene, rng)
        shapes = [o.shape for o in scene.objects]
        kinds = set()
        for q, a, key in qa:
            assert has_word(a, key), (q, a, key)
            assert q.endswith(("?", ".")) and a.endswith(".")
            if key in ("yes", "no"):
                (pair,) = mentioned_objects(q)
                assert (pair in truth(scene)) == (key == "yes")
                assert pair not in HELDOUT_COMBOS
                kinds.add(key)
            elif key in COLOURS:
                assert key == _named_object(q, scene).colour, q
                kinds.add("colour")
            elif key in NUMBER_WORDS:
                assert key == NUMBER_WORDS[len(scene.objects)]
                kinds.add("count")
            elif key in cells:
                assert cells[key] == _named_object(q, scene).cell, q
                kinds.add("position")
            elif key in SIZES:
                assert key == _named_object(q, scene).size, q
            else:  # a shape: of the object at a cell, or of the only small / large object
                cell = next((c for p, c in sorted(cells.items(), key=lambda i: -len(i[0]))
                             if f"the {p}" in q), None)
                obj = (scene.cells[cell] if cell is not None else
                       next(o for o in scene.objects if f" {o.size} " in f" {q[:-1]} "))
                assert key == obj.shape, q
        assert {"count", "position", "yes", "no"} <= kinds
        if any(shapes.count(s) == 1 for s in shapes):
            assert "colour" in kinds


def test_existence_answers_say_what_the_picture_holds_then_yes_or_no():
    """The colours an existence answer names are those of the asked shape in the scene, and its
    verdict, the last word, is the key; strict scoring reads the same verdict."""
    from minigpt4_lite.evaluate import answer_correct

    rng = random.Random(8)
    seen = set()
    for scene in SCENES[:200]:
        for q, a, key in qa_pairs(scene, rng):
            if key not in ("yes", "no"):
                continue
            (colour, shape), = mentioned_objects(q)
            truth_colours = sorted(o.colour for o in scene.objects if o.shape == shape)
            named = [w for w in a.rstrip(".").replace(",", "").split() if w in COLOURS]
            assert sorted(named) == truth_colours, (q, a)
            assert a.rstrip(".").split()[-1] == key and answer_correct(a, key), (q, a)
            seen.add((key, len(truth_colours) if truth_colours else 0))
    assert {("yes", 1), ("no", 1), ("no", 0)} <= seen  # near misses and absent shapes both asked


def test_fact_sentences_state_true_facts_in_everyday_words_never_as_questions():
    """`fact_sentences`: two statements, each one true fact of the scene (an object's colour, size
    or cell, or the count), worded with words of the held-out question wordings."""
    rng = random.Random(4)
    kinds = set()
    for scene in SCENES[:200]:
        text = fact_sentences(scene, rng)
        sentences = re.findall(r"[^.?]+[.?]", text)
        assert len(sentences) == 2 and "?" not in text, text
        for sentence in sentences:
            words = set(re.findall(r"\w+", sentence.lower()))
            assert words & {"color", "size", "located", "would", "number", "contains"}, sentence
            pairs = mentioned_objects(sentence)
            if words & {"number", "contains"}:  # the count
                kinds.add("count")
                assert NUMBER_WORDS[len(scene.objects)] in words, (sentence, scene)
            elif pairs:  # an object named by colour and shape: its size or its cell
                (pair,) = pairs
                (obj,) = [o for o in scene.objects if (o.colour, o.shape) == pair]
                kinds.add("size" if "size" in words else "cell")
                assert (obj.size in words if "size" in words
                        else has_word(sentence, cell_phrase(obj.cell))), (sentence, scene)
            else:  # a colour, of an object named by its shape alone (the only one of its shape)
                (shape,) = words & set(SHAPES)
                (obj,) = [o for o in scene.objects if o.shape == shape]
                (colour,) = words & set(COLOURS)
                kinds.add("colour")
                assert colour == obj.colour, (sentence, scene)
    assert kinds == {"colour", "size", "cell", "count"}


def test_poem_and_story_shape():
    rng = random.Random(4)
    for scene in SCENES[:100]:
        assert len(poem(scene, rng).split(" / ")) == 4
        assert 2 <= story(scene, rng).count(".") <= 4


def test_scene_in_words():
    scene = Scene((Obj("circle", "red", "small", 0), Obj("star", "blue", "large", 4)), "white", 0)
    assert scene_in_words(scene) == "top left: small red circle; center: large blue star"
    assert scene_in_words(make_scene(5)) == scene_in_words(make_scene(5))


def test_text_deterministic_given_rng():
    for fn in REGISTERS.values():
        assert fn(SCENES[9], random.Random(5)) == fn(SCENES[9], random.Random(5))
    assert qa_pairs(SCENES[9], random.Random(5)) == qa_pairs(SCENES[9], random.Random(5))


def test_varied_wording():
    rng = random.Random(6)
    scenes = SCENES[:50]
    for name, fn in REGISTERS.items():
        openings = {" ".join(fn(s, rng).split()[:2]) for s in scenes}
        assert len(openings) >= 3, (name, openings)
    questions = {" ".join(q.split()[:2]) for s in scenes for q, _, _ in qa_pairs(s, rng)}
    answers = {" ".join(a.split()[:2]) for s in scenes for _, a, _ in qa_pairs(s, rng)}
    assert len(questions) >= 3 and len(answers) >= 3


def test_mentioned_objects_parser():
    text = "A LARGE Red circle, (blue stars) and green-small cross; black crosses! white square"
    assert mentioned_objects(text) == {("red", "circle"), ("blue", "star"),
                                       ("green", "cross"), ("black", "cross")}
    assert mentioned_objects("The background is sky blue. A circle sits here.") == set()
    assert mentioned_objects("red, circle; starry blue heartless") == set()


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 10**6), st.integers(0, 1000))
def test_property_mentions_match_ground_truth(seed, rng_seed):
    scene = make_scene(seed)
    rng = random.Random(rng_seed)
    assert mentioned_objects(caption(scene, rng)) == truth(scene)
    assert mentioned_objects(detailed_description(scene, rng)) == truth(scene)


def test_package_gives_every_name_of_the_world_and_its_language():
    """`from minigpt4_lite import toyworld as tw` keeps working for both halves: `tw.render`,
    `tw.make_scenes` (the scenes) as well as `tw.caption`, `tw.sample_task` (their texts)."""
    from minigpt4_lite import toyworld as tw
    from minigpt4_lite.toyworld import language, world

    for module in (world, language):
        public = [name for name in vars(module) if not name.startswith("_")]
        assert all(getattr(tw, name) is getattr(module, name) for name in public), module
    assert {"render", "make_scenes", "Scene"} <= set(vars(world))
    assert {"caption", "qa_pairs", "sample_task", "TASK_KINDS"} <= set(vars(language))
