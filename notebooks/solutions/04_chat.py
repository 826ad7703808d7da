# ruff: noqa: E402
# Solutions of chapter 4's exercises: one block per exercise cell of the notebook.
# tests/test_solutions.py puts each block into its cell and runs the chapter's checks.

# %% EXERCISE: stop_rule
import torch


def my_rows_done(input_ids: torch.Tensor, stop_variants: list[list[int]]) -> torch.Tensor:
    """One bool per row: do the row's last tokens spell one of the stop variants?"""
    done = torch.zeros(input_ids.shape[0], dtype=torch.bool)
    for stop in stop_variants:
        n = len(stop)
        if input_ids.shape[1] >= n:
            done |= (input_ids[:, -n:] == torch.tensor(stop)).all(dim=1)
    return done

# %% EXERCISE: left_pad
import torch


def my_left_pad(examples, pad_id: int) -> dict:
    """Pad on the left: every prompt ends at the last column, where generation continues."""
    T = max(len(e.ids) for e in examples)
    ids = torch.full((len(examples), T), pad_id)
    attention_mask = torch.zeros((len(examples), T), dtype=torch.long)
    for i, e in enumerate(examples):
        ids[i, T - len(e.ids):] = torch.tensor(e.ids)
        attention_mask[i, T - len(e.ids):] = 1
    image_mask = ids == -1
    ids[image_mask] = pad_id
    return {"input_ids": ids, "attention_mask": attention_mask, "image_mask": image_mask}

# %% EXERCISE: named_value
import re

from minigpt4_lite.evaluate import ANSWER_VALUES


def my_named_value(answer: str, kind: str):
    """The first value of `kind` the answer names, as whole words (longest phrase first)."""
    values = sorted(ANSWER_VALUES[kind], key=len, reverse=True)
    match = re.search(r"\b(" + "|".join(values) + r")\b", answer.lower())
    return match.group(1) if match else None
