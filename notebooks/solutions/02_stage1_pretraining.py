"""Solutions of chapter 2's exercises (tests/test_solutions.py fills them into the notebook)."""

# %% EXERCISE: projection
from torch import nn


def my_projection(model):
    """MiniGPT-4's one trained layer: the Q-Former's width -> the LLM's input width."""
    q_hidden = model.cfg.qformer.hidden  # 128 here, 768 in the paper
    d_llm = model.llm.config.hidden_size  # 256 here, 4096 for Vicuna 7B
    return nn.Linear(q_hidden, d_llm)

# %% EXERCISE: stage1_step
def my_stage1_step(model, batch, optimizer):
    """Cached features -> projection -> into the image slots -> the LLM's loss -> one step."""
    optimizer.zero_grad()
    image_embeds = model.project(batch["features"])  # the only trained layer
    inputs_embeds = model.embed(batch["input_ids"], batch["image_mask"], image_embeds)
    out = model.llm(inputs_embeds=inputs_embeds, attention_mask=batch["attention_mask"],
                    labels=batch["labels"])  # the LLM's cross-entropy over the answer tokens
    out.loss.backward()  # gradients reach llama_proj only: everything else is frozen
    optimizer.step()
    return out.loss.item()

# %% EXERCISE: clean_caption
def my_clean_caption(text):
    """Lower case, each of .!"()*#:;~ -> a space, whitespace collapsed, at most 50 words."""
    import re

    text = re.sub(r'[.!"()*#:;~]', " ", text.lower())
    return " ".join(text.split()[:50])

# %% EXERCISE: learning_rate
def my_learning_rate(step, cfg):
    """Linear warm-up warmup_lr -> lr, then a cosine lr -> min_lr over the whole run."""
    import math

    if step < cfg.warmup_steps:
        return cfg.warmup_lr + (cfg.lr - cfg.warmup_lr) * step / cfg.warmup_steps
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * step / cfg.steps))
