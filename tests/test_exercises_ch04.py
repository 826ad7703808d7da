"""Chapter 4's checkers: right answers pass, blanks are 'not done', typical mistakes are named."""

from pathlib import Path

import pytest
import torch

from minigpt4_lite.exercises import ExerciseError, ch04

SOLUTIONS = Path(__file__).resolve().parent.parent / "notebooks" / "solutions"


@pytest.fixture(scope="module")
def solved():
    namespace = {}
    exec((SOLUTIONS / "04_chat.py").read_text(), namespace)
    return namespace


@pytest.fixture(scope="module")
def tokenizer():
    from minigpt4_lite.checkpoints import load_model
    from minigpt4_lite.config import preset

    return load_model(preset("tiny"), projection="").tokenizer


def blank(*args, **kwargs):
    raise NotImplementedError  # your code here


def test_the_stop_rule(solved, tokenizer, capsys):
    assert ch04.check_stop_rule(solved["my_rows_done"], tokenizer)
    assert "\N{CHECK MARK}" in capsys.readouterr().out
    assert ch04.check_stop_rule(blank, tokenizer) is False
    assert "not done yet" in capsys.readouterr().out


def test_stopping_on_the_first_row_only_is_named(tokenizer):
    """The official rule: row 0 decides for the whole batch."""
    def row0(input_ids, stops):
        done = any(input_ids[0, -len(s):].tolist() == s
                   for s in stops if len(s) <= input_ids.shape[1])
        return torch.full((input_ids.shape[0],), done)

    with pytest.raises(ExerciseError, match=r"row 1 .* only in the middle; yours says done"):
        ch04.check_stop_rule(row0, tokenizer)


def test_a_stop_anywhere_in_the_row_is_named(tokenizer):
    def anywhere(input_ids, stops):
        return torch.tensor([any(s[0] in row for s in stops) for row in input_ids.tolist()])

    with pytest.raises(ExerciseError, match=r"row 1 \[5, 835, 7, 8\] has \[835\] only in the "
                                            "middle"):
        ch04.check_stop_rule(anywhere, tokenizer)


def test_the_multi_token_variant_is_named(tokenizer):
    def last_token_only(input_ids, stops):
        return torch.tensor([any(row[-1] == s[-1] for s in stops) for row in input_ids.tolist()])

    with pytest.raises(ExerciseError, match=r"row 3 .*29937 alone"):
        ch04.check_stop_rule(last_token_only, tokenizer)


def test_left_padding(solved, tokenizer):
    assert ch04.check_left_pad(solved["my_left_pad"], tokenizer, 10)
    assert ch04.check_left_pad(blank, tokenizer, 10) is False

    def right_pad(examples, pad_id):
        from minigpt4_lite.prompts import collate
        return collate(examples, pad_id, padding_side="right")

    with pytest.raises(ExerciseError, match=r"row 0 .*input_ids differ at position 0"):
        ch04.check_left_pad(right_pad, tokenizer, 10)

    def slots_kept(examples, pad_id):
        out = solved["my_left_pad"](examples, pad_id)
        out["input_ids"][out["image_mask"]] = -1
        return out

    with pytest.raises(ExerciseError, match=r"input_ids differ at position \d+: yours is an image"):
        ch04.check_left_pad(slots_kept, tokenizer, 10)


def test_the_strict_reading(solved):
    assert ch04.check_named_value(solved["my_named_value"])
    assert ch04.check_named_value(blank) is False

    def in_value_order(answer, kind):  # the first value of the list found, not the first named
        import re

        from minigpt4_lite.evaluate import ANSWER_VALUES
        found = [v for v in ANSWER_VALUES[kind] if re.search(rf"\b{v}\b", answer.lower())]
        return found[0] if found else None

    with pytest.raises(ExerciseError, match="'It is in the bottom center.' .*yours reads 'center'"):
        ch04.check_named_value(in_value_order)

    def substring(answer, kind):
        from minigpt4_lite.evaluate import ANSWER_VALUES
        found = [(answer.lower().find(v), v) for v in ANSWER_VALUES[kind] if v in answer.lower()]
        return min(found)[1] if found else None

    with pytest.raises(ExerciseError, match="'I cannot see it.' .*yours reads 'no'"):
        ch04.check_named_value(substring)
