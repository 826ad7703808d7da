"""The ground-truth measurements of `evaluate.py` (paper Table 3 as a measurement)."""

from collections import Counter

import pytest

from minigpt4_lite import toyworld as tw
from minigpt4_lite.evaluate import (
    answer_correct,
    judge,
    qa_items,
    repetition_rate,
    summarize,
    table3,
)

SCENE = tw.make_scenes("heldout", 1)[0]  # a large orange star (top centre), a large black cross


def test_scene_is_the_one_the_texts_describe():
    assert SCENE.combos == {("orange", "star"), ("black", "cross")}


def test_a_complete_description_passes():
    j = judge("A large orange star sits at the top. Below it is a black cross.", True, SCENE,
              "detailed")
    assert (j["found"], j["objects"], j["hallucinated"], j["failed"]) == (2, 2, 0, False)


@pytest.mark.parametrize("text, stopped, why", [
    ("A large orange star sits at the top.", True, "omits the cross"),
    ("An orange star, a black cross and a green circle.", True, "hallucinates a circle"),
    ("An orange star and a black cross.", False, "never reached the stop sequence"),
    ("an orange star and a black cross and a black cross and a black cross and a black cross",
     True, "repeats itself"),
])
def test_each_failure_mode_fails_a_description(text, stopped, why):
    assert judge(text, stopped, SCENE, "detailed")["failed"], why


def test_a_poem_needs_only_one_of_the_objects():
    poem = "Under grey skies an orange star\nshines alone, near and far."
    assert not judge(poem, True, SCENE, "poem")["failed"]
    assert judge("The sky is grey and nothing else is there.", True, SCENE, "poem")["failed"]


def test_repetition_rate_counts_repeated_four_grams():
    assert repetition_rate("a b c d e f g") == 0.0
    assert repetition_rate("a b c d a b c d") == pytest.approx(1 / 5)
    assert repetition_rate("too short") == 0.0


def test_summarize_is_micro_averaged_over_objects():
    good = judge("An orange star and a black cross.", True, SCENE, "detailed")
    bad = judge("A green circle.", True, SCENE, "detailed")
    s = summarize([good, bad])
    assert s["object_recall"] == 0.5 and s["hallucination_rate"] == 0.3333  # rounded to 4 places
    assert s["failure_rate"] == 0.5 and s["completion_rate"] == 1.0 and s["n"] == 2
    assert "| a |" in table3({"a": {"detailed": s}})


def test_answers_are_matched_as_whole_words():
    assert answer_correct("No, there is no red star.", "no")
    assert not answer_correct("I cannot see it.", "no")
    assert answer_correct("It is in the top left.", "top left")
    assert not answer_correct("It is blueish.", "blue")


@pytest.mark.parametrize("answer", ["The red square is in the top center.",
                                    "It is in the bottom center.",
                                    "You can find it in the middle left."])
def test_a_position_answer_names_the_exact_cell(answer):
    # "center" is inside "top center" and "bottom center": whole words alone would accept them
    assert not answer_correct(answer, "center")
    assert answer_correct("It is in the center.", "center")
    assert answer_correct("The star is in the bottom center.", "bottom center")
    assert not answer_correct("The star is in the bottom left.", "bottom center")


def test_a_short_answer_counts_by_the_first_value_it_names():
    assert answer_correct("The star is red, not blue.", "red")
    assert not answer_correct("It is blue or red.", "red")
    assert not answer_correct("Yes... no, there is no red star.", "no")
    assert answer_correct("There are two shapes: a red star and one circle.", "two")
    assert not answer_correct("It is in the top left or in the center.", "center")


def test_qa_items_cycle_kinds_and_ask_yes_and_no_equally():
    scenes = tw.make_scenes("heldout", 200)
    items = qa_items(scenes)
    assert len(items) == len(scenes)
    kinds = Counter(kind for _, _, kind in items)
    assert set(kinds) == {"colour", "count", "position", "existence"}
    assert min(kinds.values()) >= 30
    existence = Counter(key for _, key, kind in items if kind == "existence")
    assert abs(existence["yes"] - existence["no"]) <= 2  # "always yes" scores half, not all
    for scene, (question, key, kind) in zip(scenes, items):  # every key is the true answer
        if kind == "count":
            assert key == tw.NUMBER_WORDS[len(scene.objects)]
        elif kind == "colour":
            shape = question.rstrip("?.").split()[-1]
            assert (key, shape) in scene.combos
        elif kind == "position":
            assert key in {tw.cell_phrase(o.cell) for o in scene.objects}
    assert qa_items(scenes) == items  # deterministic
