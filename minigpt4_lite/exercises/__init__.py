"""Checkers for the workbook's exercises: the student writes a piece of MiniGPT-4, we check it.

Each chapter's checkers live in their own module (`exercises.ch01` ... `exercises.ch05`). A checker
takes the student's function or value, runs it on a few cases, and compares with the library:

- not written yet (the blank still raises `NotImplementedError`, or holds `...`): it says so
  politely and returns False, so a student notebook with blanks runs top to bottom;
- wrong: it raises `ExerciseError` with what differs and where (which case, which token), not a
  bare assert;
- right: it prints a check mark and what was compared, and returns True.

With the environment variable `MINIGPT4_LITE_SOLUTIONS=1` (how the tests run the solutions in
`notebooks/solutions/`), an exercise that is not done is an error too.
"""

from __future__ import annotations

import functools
import math
import os

import torch


class ExerciseError(AssertionError):
    """The student's answer differs from the library's; the message says where and how."""


class NotDone(Exception):
    """The blank has not been filled in yet."""


def attempt(fn, *args, **kwargs):
    """Call the student's `fn`; a blank (`NotImplementedError`, or `...` returned) is `NotDone`."""
    try:
        out = fn(*args, **kwargs)
    except NotImplementedError:
        raise NotDone from None
    if out is Ellipsis or out is None:
        raise NotDone
    return out


def checker(title: str):
    """Turn `check(...) -> str` (a summary of what matched) into a polite notebook checker."""
    def wrap(check):
        @functools.wraps(check)
        def run(*args, **kwargs) -> bool:
            try:
                summary = check(*args, **kwargs)
            except NotDone:
                if os.environ.get("MINIGPT4_LITE_SOLUTIONS") == "1":
                    raise ExerciseError(f"{title}: the exercise is not done.") from None
                print(f"{title}: not done yet. Fill in the blank above, run it, then run this "
                      "cell again.")
                return False
            print(f"\N{CHECK MARK} {title}: {summary}")
            return True
        return run
    return wrap


def describe_token(tokenizer, token_id: int) -> str:
    """A token for a message: image slots and ignored labels by name, text tokens quoted."""
    if token_id == -1:
        return "an image slot (-1)"
    if token_id == -100:
        return "-100 (no loss)"
    return f"{token_id} ({tokenizer.decode([token_id])!r})" if tokenizer is not None else str(
        token_id)


def compare_ids(mine, reference, what: str, case: str, tokenizer=None) -> None:
    """Equal id lists, or an `ExerciseError` naming the first position that differs."""
    mine = list(mine.tolist() if isinstance(mine, torch.Tensor) else mine)
    reference = list(reference)
    if mine == reference:
        return
    for i, (a, b) in enumerate(zip(mine, reference)):
        if a != b:
            raise ExerciseError(
                f"{case}: {what} differ at position {i}: yours is {describe_token(tokenizer, a)}, "
                f"the library's is {describe_token(tokenizer, b)}.")
    raise ExerciseError(f"{case}: your {what} have {len(mine)} positions, the library's "
                        f"{len(reference)} (the first {min(len(mine), len(reference))} agree).")


def compare_close(mine, reference, what: str, atol: float = 1e-6) -> float:
    """Two tensors (or numbers) must agree within `atol`; returns the largest difference."""
    mine, reference = torch.as_tensor(mine).detach().float(), torch.as_tensor(reference).float()
    if mine.shape != reference.shape:
        raise ExerciseError(f"{what}: yours has shape {list(mine.shape)}, the library's "
                            f"{list(reference.shape)}.")
    diff = float((mine - reference).abs().max()) if mine.numel() else 0.0
    if not math.isfinite(diff) or diff > atol:
        raise ExerciseError(f"{what}: yours differs from the library's by up to {diff:.3g} "
                            f"(allowed {atol:g}).")
    return diff
