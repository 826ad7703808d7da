"""Chapter 3's checkers: right answers pass, blanks are 'not done', typical mistakes are named."""

from pathlib import Path

import pytest

from minigpt4_lite.exercises import ExerciseError, ch03
from minigpt4_lite.prompts import build_example, stage2_prompt, text_ids

SOLUTIONS = Path(__file__).resolve().parent.parent / "notebooks" / "solutions"


@pytest.fixture(scope="module")
def solved():
    namespace = {}
    exec((SOLUTIONS / "03_stage2_finetuning.py").read_text(), namespace)
    return namespace


@pytest.fixture(scope="module")
def model():
    from minigpt4_lite.checkpoints import load_model
    from minigpt4_lite.config import preset

    return load_model(preset("tiny"), projection="")


def blank(*args, **kwargs):
    raise NotImplementedError  # your code here


def test_the_template(solved, capsys):
    assert ch03.check_stage2_template(solved["my_stage2_prompt"])
    assert "\N{CHECK MARK}" in capsys.readouterr().out
    assert ch03.check_stage2_template(blank) is False
    assert "not done yet" in capsys.readouterr().out
    with pytest.raises(ExerciseError, match="space after 'Assistant:'"):
        ch03.check_stage2_template(lambda i: f"###Human: <Img><ImageHere></Img> {i} ###Assistant:")
    with pytest.raises(ExerciseError, match="differ at character 9"):
        ch03.check_stage2_template(lambda i: f"###Human:<Img><ImageHere></Img> {i} ###Assistant: ")


def test_a_blank_is_an_error_when_the_solutions_run(monkeypatch):
    monkeypatch.setenv("MINIGPT4_LITE_SOLUTIONS", "1")
    with pytest.raises(ExerciseError, match="not done"):
        ch03.check_stage2_template(blank)


def test_the_sample_and_its_mask(solved, model, capsys):
    tok, q = model.tokenizer, model.cfg.num_visual_tokens
    right = solved["my_stage2_example"]
    assert ch03.check_stage2_example(right, tok, q)
    assert "supervised positions" in capsys.readouterr().out
    assert ch03.check_stage2_example(blank, tok, q) is False

    def stage1_defaults(tokenizer, instruction, answer, n):  # "\n" and 32 tokens: stage 1's
        ex = build_example(tokenizer, stage2_prompt(instruction), answer, n_image_tokens=n)
        return ex.ids, ex.labels

    with pytest.raises(ExerciseError, match=r"case 0 .*token ids differ at position \d+: yours "
                                            r"is \d+ \('\\n'\), the library's is \d+ \('###'\)"):
        ch03.check_stage2_example(stage1_defaults, tok, q)

    def no_truncation(tokenizer, instruction, answer, n):
        ids, labels = right(tokenizer, instruction, "", n)
        prompt = len(ids) - len(text_ids(tokenizer, "###"))
        target = text_ids(tokenizer, answer + "###")
        return ids[:prompt] + target, labels[:prompt] + target

    with pytest.raises(ExerciseError, match=r"case 2 .*cut to 160.*have \d+ positions"):
        ch03.check_stage2_example(no_truncation, tok, q)

    def loss_on_prompt(tokenizer, instruction, answer, n):
        ids, labels = right(tokenizer, instruction, answer, n)
        return ids, [i if i != -1 else -100 for i in ids]

    with pytest.raises(ExerciseError, match=r"labels differ at position 0: yours is 1"):
        ch03.check_stage2_example(loss_on_prompt, tok, q)


def test_the_rule_fixer(solved, capsys):
    assert ch03.check_rule_fixer(solved["my_rule_fixer"], ["A red star. A red star. Blue"])
    assert ch03.check_rule_fixer(blank) is False
    with pytest.raises(ExerciseError, match="draft 1"):  # keeps the stray ###
        ch03.check_rule_fixer(lambda t: " ".join(t.split()))

    def keeps_repeats(text):
        import re
        text = re.sub(r"\s+", " ", re.sub(r"[^A-Za-z0-9 ,.'!?-]+", " ", text)).strip()
        return " ".join(s.strip() for s in re.findall(r"[^.!?]+[.!?]", text))

    with pytest.raises(ExerciseError, match="draft 2"):
        ch03.check_rule_fixer(keeps_repeats)


def test_counting_positions(solved, model):
    from minigpt4_lite.toyworld import ToyWorldDataset

    tok, q = model.tokenizer, model.cfg.num_visual_tokens
    samples = [ToyWorldDataset(2, 50, seed=42)[i] for i in range(5)]
    assert ch03.check_count_positions(solved["my_count_positions"], tok, q, samples)
    assert ch03.check_count_positions(blank, tok, q, samples) is False

    def pad_by_id(batch):
        out = solved["my_count_positions"](batch)
        out["padding"] = int((batch["input_ids"] == tok.pad_token_id).sum())
        return out

    with pytest.raises(ExerciseError, match="padding is .*image slots hold the pad id"):
        ch03.check_count_positions(pad_by_id, tok, q, samples)
