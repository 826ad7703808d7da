"""Chapter 1's checkers: the solutions pass, a blank is "not done", and typical mistakes are
caught with a message that says where (which case, which position) and why."""

import runpy
from pathlib import Path

import pytest

from minigpt4_lite.checkpoints import load_model
from minigpt4_lite.config import preset
from minigpt4_lite.exercises import ExerciseError, ch01

SOLUTIONS = runpy.run_path(str(Path(__file__).resolve().parent.parent / "notebooks" / "solutions"
                               / "01_alignment.py"))


@pytest.fixture(scope="module")
def model():
    return load_model(preset("tiny"), projection="")


def blank(*args):
    raise NotImplementedError


def test_the_solutions_pass(model, capsys):
    Q = model.cfg.num_visual_tokens
    assert ch01.check_prompt_wrap(SOLUTIONS["my_prompt_ids"], model.tokenizer, Q) is True
    assert ch01.check_label_mask(SOLUTIONS["my_build_example"], model.tokenizer, Q) is True
    assert ch01.check_embed(SOLUTIONS["my_embed"], model) is True
    assert ch01.check_projection_params(SOLUTIONS["my_projection_params"]) is True
    assert capsys.readouterr().out.count("\N{CHECK MARK}") == 4


def test_a_blank_is_not_done_yet(model, capsys, monkeypatch):
    monkeypatch.delenv("MINIGPT4_LITE_SOLUTIONS", raising=False)
    assert ch01.check_prompt_wrap(blank, model.tokenizer, 10) is False
    assert ch01.check_label_mask(lambda *a: ..., model.tokenizer, 10) is False
    assert ch01.check_embed(blank, model) is False
    assert ch01.check_projection_params(blank) is False
    assert capsys.readouterr().out.count("not done yet") == 4
    monkeypatch.setenv("MINIGPT4_LITE_SOLUTIONS", "1")  # how CI runs the solutions
    with pytest.raises(ExerciseError, match="not done"):
        ch01.check_prompt_wrap(blank, model.tokenizer, 10)


def test_bos_on_every_segment_is_named(model):
    def bos_everywhere(tokenizer, prompt, n):
        ids = []
        for i, segment in enumerate(prompt.split("<ImageHere>")):
            ids += [-1] * n if i else []
            ids += [tokenizer.bos_token_id] + tokenizer(segment, add_special_tokens=False).input_ids
        return ids

    with pytest.raises(ExerciseError) as e:
        ch01.check_prompt_wrap(bos_everywhere, model.tokenizer, model.cfg.num_visual_tokens)
    message = str(e.value)
    assert message.startswith("stage 1 (no prompt: the image alone): your token ids have 12")
    assert "BOS goes before the first segment only" in message


def test_one_slot_per_image_is_named(model):
    def one_slot(tokenizer, prompt, n):
        return SOLUTIONS["my_prompt_ids"](tokenizer, prompt, 1)

    with pytest.raises(ExerciseError, match=r"stage 1 .*your token ids have 2 positions, the "
                                            r"library's 11.*10 slots of -1 \(you have 1"):
        ch01.check_prompt_wrap(one_slot, model.tokenizer, 10)


def test_a_loss_on_the_prompt_is_caught(model):
    def loss_everywhere(tokenizer, prompt, answer, n, end_sym, max_txt_len):
        ids, _ = SOLUTIONS["my_build_example"](tokenizer, prompt, answer, n, end_sym, max_txt_len)
        return ids, list(ids)

    with pytest.raises(ExerciseError, match=r"stage 1 \(caption\): labels differ at "
                                            r"position 0.*12 positions carry a loss"):
        ch01.check_label_mask(loss_everywhere, model.tokenizer, model.cfg.num_visual_tokens)


def test_a_missing_truncation_is_caught(model):
    def no_truncation(tokenizer, prompt, answer, n, end_sym, max_txt_len):
        return SOLUTIONS["my_build_example"](tokenizer, prompt, answer, n, end_sym, 10_000)

    with pytest.raises(ExerciseError, match="longer than max_txt_len: your token ids have 66 "
                                            "positions, the library's 43"):
        ch01.check_label_mask(no_truncation, model.tokenizer, model.cfg.num_visual_tokens)


def test_images_in_the_wrong_order_are_caught(model):
    def reversed_images(model, input_ids, image_mask, image_embeds):
        return SOLUTIONS["my_embed"](model, input_ids, image_mask, image_embeds.flip(0))

    with pytest.raises(ExerciseError, match=r"sequence 0, position 1 \(an image slot\)"):
        ch01.check_embed(reversed_images, model)


def test_a_forgotten_bias_is_caught():
    with pytest.raises(ExerciseError, match=r"minigpt4-7b with projection='linear'.*yours is "
                                            r"3145728, the model has 3,149,824"):
        ch01.check_projection_params(lambda q, d, kind: q * d)
