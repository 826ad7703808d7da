"""Chapter 2's checkers: the solutions pass, a blank is "not done", typical mistakes are caught
with a message that says what differs, and the checked step leaves the model as it was."""

import math
import re
import runpy
from pathlib import Path

import pytest
import torch
from torch import nn

from minigpt4_lite.checkpoints import load_model
from minigpt4_lite.config import preset
from minigpt4_lite.exercises import ExerciseError, ch02
from minigpt4_lite.toyworld import ToyWorldDataset

SOLUTIONS = runpy.run_path(str(Path(__file__).resolve().parent.parent / "notebooks" / "solutions"
                               / "02_stage1_pretraining.py"))


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return load_model(preset("tiny"), projection="")


@pytest.fixture(scope="module")
def samples():
    dataset = ToyWorldDataset(1, 20, seed=42)
    return [dataset[i] for i in range(3)]


def blank(*args):
    raise NotImplementedError


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_the_solutions_pass_and_leave_the_model_as_it_was(model, samples, capsys):
    before = state(model)
    assert ch02.check_projection(SOLUTIONS["my_projection"], model, samples) is True
    assert ch02.check_stage1_step(SOLUTIONS["my_stage1_step"], model, samples) is True
    assert ch02.check_clean_caption(SOLUTIONS["my_clean_caption"]) is True
    assert ch02.check_learning_rate(SOLUTIONS["my_learning_rate"]) is True
    assert capsys.readouterr().out.count("\N{CHECK MARK}") == 4
    after = state(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in model.parameters())
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [
        "llama_proj.weight", "llama_proj.bias"]


def test_a_blank_is_not_done_yet(model, samples, capsys, monkeypatch):
    monkeypatch.delenv("MINIGPT4_LITE_SOLUTIONS", raising=False)
    assert ch02.check_projection(blank, model, samples) is False
    assert ch02.check_stage1_step(blank, model, samples) is False
    assert ch02.check_clean_caption(lambda text: ...) is False
    assert ch02.check_learning_rate(blank) is False
    assert capsys.readouterr().out.count("not done yet") == 4


def test_a_projection_the_wrong_way_round_is_named(model, samples):
    with pytest.raises(ExerciseError, match=r"maps 256 -> 128 numbers.*Q-Former's width \(128\) "
                                            r"to the LLM's input width \(256\)"):
        ch02.check_projection(lambda m: nn.Linear(256, 128), model, samples)
    with pytest.raises(ExerciseError, match="single nn.Linear with a bias"):
        ch02.check_projection(lambda m: nn.Linear(128, 256, bias=False), model, samples)


def wrong_step(mistake):
    """The solution's step with one typical mistake."""
    def step(model, batch, optimizer):
        if mistake != "no zero_grad":
            optimizer.zero_grad()
        if mistake == "unfreeze":
            model.llm.lm_head.weight.requires_grad_(True)
        embeds = model.embed(batch["input_ids"], batch["image_mask"],
                             model.project(batch["features"]))
        labels = batch["input_ids"] if mistake == "labels" else batch["labels"]
        out = model.llm(inputs_embeds=embeds, attention_mask=batch["attention_mask"],
                        labels=labels)
        out.loss.backward()
        if mistake != "no step":
            optimizer.step()
        return out.loss.item()
    return step


@pytest.mark.parametrize(("mistake", "message"), [
    ("labels", "the loss: yours differs from the library's"),
    ("no zero_grad", "Did you zero the old gradients first"),
    ("no step", "the projection did not move"),
    ("unfreeze", r"changed requires_grad of \['llm.lm_head.weight'\]"),
])
def test_a_wrong_step_is_caught_and_the_model_is_restored(model, samples, mistake, message):
    before = state(model)
    with pytest.raises(ExerciseError, match=message):
        ch02.check_stage1_step(wrong_step(mistake), model, samples)
    assert all(torch.equal(before[k], v) for k, v in state(model).items())
    assert not model.llm.lm_head.weight.requires_grad


def test_a_caption_not_cut_at_50_words_is_caught():
    def no_cut(text):
        return " ".join(re.sub(r'[.!"()*#:;~]', " ", text.lower()).split())

    with pytest.raises(ExerciseError, match=r"for 'word0 word1.*differ from character 339\)"
                                            r".*at most 50 words"):
        ch02.check_clean_caption(no_cut)
    with pytest.raises(ExerciseError, match=r"for 'There is a small red square\.'"):
        ch02.check_clean_caption(lambda text: " ".join(text.split()[:50]))


def test_a_cosine_that_starts_after_warmup_is_caught():
    def after_warmup(step, cfg):
        if step < cfg.warmup_steps:
            return SOLUTIONS["my_learning_rate"](step, cfg)
        t = (step - cfg.warmup_steps) / (cfg.steps - cfg.warmup_steps)
        return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * t))

    with pytest.raises(ExerciseError, match=r"tiny-stage1 at step 50 \(after warm-up.*warm-up 50 "
                                            r"of 800 steps\): yours is 0.003, the library's "
                                            r"0.00297406"):
        ch02.check_learning_rate(after_warmup)
