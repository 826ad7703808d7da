"""Chapter 2's exercises: the projection, one stage-1 training step, caption cleaning, the schedule.

- `check_projection`: the student's `my_projection(model)` builds the one trained layer of
  MiniGPT-4 (paper Sec. 3.1: a linear layer from the Q-Former's width to the LLM's); given the
  library's weights it must give the same visual tokens as `model.project`;
- `check_stage1_step`: `my_stage1_step(model, batch, optimizer)` runs features -> project ->
  embed -> the LLM's loss -> backward -> step; its loss must equal `model(batch).loss` to 1e-6,
  only the projection may get a gradient (and the library's), and the step must move the
  projection as the library's would. The model is left as it was;
- `check_clean_caption`: `my_clean_caption(text)`, the official stage-1 caption cleaning;
- `check_learning_rate`: `my_learning_rate(step, cfg)`, the official warm-up + cosine schedule.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..data import image_tensor
from ..processing import clean_caption
from ..train import RECIPES, learning_rate, make_batch, make_optimizer, recipe
from . import ExerciseError, attempt, checker, compare_close

STEP_LR = 1e-3  # the learning rate of the checked step (large enough to see the step move)


def _features(model, samples) -> torch.Tensor:
    pixels = torch.stack([image_tensor(s, model.cfg.vision.image_size) for s in samples])
    with torch.no_grad():
        return model.visual_features(pixels)


@checker("the projection")
def check_projection(my_projection, model, samples) -> str:
    """`my_projection(model) -> nn.Module`, loaded with `model.llama_proj`'s weights, against
    `model.project` on the Q-Former outputs of `samples`' images."""
    layer = attempt(my_projection, model)
    if not isinstance(layer, nn.Module):
        raise ExerciseError(f"my_projection must return a torch module (an nn.Linear), got "
                            f"{type(layer).__name__}.")
    features = _features(model, samples)
    q_hidden = features.shape[-1]
    d_llm = model.llm.get_input_embeddings().weight.shape[1]
    weight = getattr(layer, "weight", None)
    if isinstance(layer, nn.Linear) and tuple(weight.shape) != (d_llm, q_hidden):
        raise ExerciseError(
            f"your layer maps {layer.in_features} -> {layer.out_features} numbers; it must map "
            f"the Q-Former's width ({q_hidden}) to the LLM's input width ({d_llm}).")
    try:
        layer.load_state_dict(copy.deepcopy(model.llama_proj.state_dict()))
    except RuntimeError as e:
        raise ExerciseError(f"the library's weights do not fit your layer ({e}). MiniGPT-4's "
                            "projection is a single nn.Linear with a bias.") from None
    with torch.no_grad():
        mine = attempt(layer, features)
        ref = model.project(features)
    compare_close(mine, ref, "the visual tokens")
    return (f"nn.Linear({q_hidden}, {d_llm}) gives the same {ref.shape[1]} visual tokens per "
            f"image as model.project ({len(samples)} images).")


def _snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@checker("one stage-1 training step")
def check_stage1_step(my_stage1_step, model, samples) -> str:
    """`my_stage1_step(model, batch, optimizer) -> loss` on a stage-1 batch of `samples` (with
    their cached features) against the library's `model(batch).loss`, backward and AdamW step."""
    cfg = recipe("tiny-stage1")
    batch = make_batch(model, list(samples), cfg, cache=None, augment=False,
                       generator=torch.Generator().manual_seed(0))
    batch["features"] = _features(model, samples)
    del batch["pixels"]
    was_training = model.training
    before = _snapshot(model.llama_proj)
    frozen = {k: v.detach().clone() for k, v in model.named_parameters()
              if not k.startswith("llama_proj.")}
    requires = {k: p.requires_grad for k, p in model.named_parameters()}

    def optimizer():
        opt = make_optimizer(model, cfg)
        for group in opt.param_groups:
            group["lr"] = STEP_LR
        return opt

    try:
        # the library's step: its loss, the projection's gradient and the weights after the step
        model.train()
        opt = optimizer()
        opt.zero_grad(set_to_none=True)
        loss = model(batch).loss
        loss.backward()
        ref_loss = loss.item()
        ref_grad = {k: p.grad.detach().clone() for k, p in model.llama_proj.named_parameters()}
        opt.step()
        ref_after = _snapshot(model.llama_proj)
        model.llama_proj.load_state_dict(before)

        # the student's step, from the same state; stale gradients are left in place on purpose
        opt = optimizer()
        for p in model.llama_proj.parameters():
            p.grad = torch.full_like(p, 0.5)
        loss = attempt(my_stage1_step, model, batch, opt)
        compare_close(float(torch.as_tensor(loss).detach()), ref_loss, "the loss", atol=1e-6)
        changed = [k for k, p in model.named_parameters() if p.requires_grad != requires[k]]
        if changed:
            raise ExerciseError(f"your step changed requires_grad of {changed[:3]}: the frozen "
                                "parts stay frozen and the projection stays trainable.")
        for name, p in model.named_parameters():
            if name.startswith("llama_proj."):
                continue
            if p.grad is not None and bool(p.grad.abs().max() > 0):
                raise ExerciseError(f"{name} got a gradient: in stage 1 only the projection "
                                    "(llama_proj) is trained.")
        for name, p in model.llama_proj.named_parameters():
            if p.grad is None or not bool(p.grad.abs().max() > 0):
                raise ExerciseError(
                    f"the projection's {name} has no gradient after your step: call "
                    "loss.backward() (outside torch.no_grad()), and zero the gradients at the "
                    "start of the step, not after optimizer.step().")
            if (p.grad - ref_grad[name]).abs().max() > 1e-5 * (1 + ref_grad[name].abs().max()):
                raise ExerciseError(
                    f"the projection's {name} gradient differs from the library's. Did you zero "
                    "the old gradients first (optimizer.zero_grad())? They were not zero.")
        after = _snapshot(model.llama_proj)
        if all(torch.equal(after[k], before[k]) for k in before):
            raise ExerciseError("the projection did not move: call optimizer.step() after "
                                "backward.")
        for k in before:
            compare_close(after[k], ref_after[k], f"the projection's {k} after the step",
                          atol=1e-6)
        for name, p in model.named_parameters():
            if name in frozen and not torch.equal(p.detach(), frozen[name]):
                raise ExerciseError(f"{name} changed: the frozen parts must not move.")
    finally:  # leave the model as it was: the chapter goes on training it
        model.llama_proj.load_state_dict(before)
        for name, p in model.named_parameters():
            p.grad = None
            p.requires_grad_(requires[name])
            if name in frozen:
                p.data.copy_(frozen[name])
        model.train(was_training)
    return (f"loss {ref_loss:.6f} equals model(batch).loss, only llama_proj got a "
            f"gradient (the library's), and the step moved it as the library's does "
            f"({len(samples)} samples).")


CAPTIONS = (
    "There is a small red square.",
    'A "large" BLUE circle: (top left); a star!',
    "two  objects\tin total ~ a heart * and a cross#",
    " ".join(f"word{i}" for i in range(60)),
    "",
)


@checker("cleaning a caption")
def check_clean_caption(my_clean_caption) -> str:
    """`my_clean_caption(text)` against `processing.clean_caption` on a few awkward captions."""
    for text in CAPTIONS:
        mine, ref = attempt(my_clean_caption, text), clean_caption(text)
        if mine != ref:
            at = next((i for i, (a, b) in enumerate(zip(mine, ref)) if a != b),
                      min(len(mine), len(ref)))
            raise ExerciseError(
                f"for {text[:60]!r}: yours is {mine[:80]!r}, the library's {ref[:80]!r} (they "
                f"differ from character {at}). Hint: lower case, each of .!\"()*#:;~ becomes a "
                "space, whitespace collapsed, at most 50 words.")
    return f"the same captions as processing.clean_caption ({len(CAPTIONS)} cases)."


@checker("the learning-rate schedule")
def check_learning_rate(my_learning_rate) -> str:
    """`my_learning_rate(step, cfg)` against `train.learning_rate` on every recipe, at the steps
    around the end of warm-up and along the cosine."""
    configs = {name: RECIPES[name] for name in ("tiny-stage1", "paper-stage1", "paper-stage2")}
    configs["tiny-stage1, 500 steps"] = recipe("tiny-stage1", steps=500)
    n = 0
    for name, cfg in configs.items():
        w, total = cfg.warmup_steps, cfg.steps
        for step in sorted({0, 1, w // 2, w - 1, w, w + 1, total // 2, total - 1}):
            mine, ref = attempt(my_learning_rate, step, cfg), learning_rate(step, cfg)
            if abs(float(mine) - ref) > 1e-12 + 1e-9 * abs(ref):
                where = "during warm-up" if step < w else "after warm-up (the cosine)"
                raise ExerciseError(
                    f"{name} at step {step} ({where}; warm-up {w} of {total} steps): yours is "
                    f"{float(mine):.6g}, the library's {ref:.6g}. Hint: the cosine runs over the "
                    "whole run, warm-up included: cos(pi * step / steps).")
            n += 1
    return f"the same rate as train.learning_rate at {n} steps of {len(configs)} recipes."
