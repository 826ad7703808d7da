"""Chapter 4's checkers: when a chat answer is done, batched prompts, strict Q&A (paper Sec. 4).

- `check_stop_rule`: which rows of a generated batch are done, given the token sequences that
  spell the stop `###` (LLaMA: `[835]` alone, `[2277, 29937]` after text); compared with
  `chat.StopOnSequences`, which stops each row on its own (the official code looked at row 0);
- `check_left_pad`: a batch of chat prompts padded on the left, compared with
  `prompts.collate(..., padding_side="left")`;
- `check_named_value`: the first value of a kind an answer names, compared with
  `evaluate.named_value` (the strict Q&A scoring).
"""

from __future__ import annotations

import torch

from ..chat import StopOnSequences, stop_token_variants
from ..evaluate import named_value
from ..prompts import CONV_VISION, IMAGE_MESSAGE, build_example, collate
from . import ExerciseError, NotDone, attempt, checker, compare_ids

LLAMA_STOPS = [[835], [2277, 29937]]  # how LLaMA spells "###": alone, and after text


def _stop_cases(tokenizer=None) -> list[tuple[str, list[list[int]], list[list[int]], list[str]]]:
    """(name, stop variants, rows of ids, what each row shows): all rows of a case equally long."""
    cases = [
        ("LLaMA's two spellings of '###'", LLAMA_STOPS,
         [[5, 6, 7, 835], [5, 835, 7, 8], [6, 7, 2277, 29937], [7, 8, 9, 29937], [7, 8, 9, 2277],
          [2277, 29937, 9, 10]],
         ["ends with [835]", "has [835] only in the middle",
          "ends with the two-token [2277, 29937]", "ends with 29937 alone (half of a variant)",
          "ends with 2277 alone (half a variant)",
          "has [2277, 29937] only at the start"]),
        ("one generated token so far", LLAMA_STOPS, [[835], [29937], [17]],
         ["is the one-token stop", "is shorter than the two-token variant", "is no stop"]),
    ]
    if tokenizer is not None:
        stops = stop_token_variants(tokenizer, "###")
        texts = ["The star is black.###", "The star is black.### It is", "The star is black. It"]
        rows = [tokenizer(t, add_special_tokens=False).input_ids for t in texts]
        width = max(map(len, rows))
        rows = [[tokenizer.pad_token_id] * (width - len(r)) + r for r in rows]  # as generate pads
        cases.append(("this tokenizer's stop variants", stops, rows,
                      ["ends with '###'", "has '###' in the middle", "has no '###'"]))
    return cases


@checker("the per-row stopping rule")
def check_stop_rule(fn, tokenizer=None) -> str:
    """`fn(input_ids [B, T], stop_variants) -> [B] bools` must equal `StopOnSequences`."""
    rows_checked = 0
    for name, stops, rows, shows in _stop_cases(tokenizer):
        input_ids = torch.tensor(rows)
        out = attempt(fn, input_ids.clone(), [list(s) for s in stops])
        mine = torch.as_tensor(out).flatten().bool().tolist()
        reference = StopOnSequences(stops)(input_ids).tolist()
        if len(mine) != len(reference):
            raise ExerciseError(f"{name}: {len(mine)} answers for a batch of {len(reference)} "
                                "rows: return one bool per row.")
        for r, (a, b) in enumerate(zip(mine, reference)):
            if a != b:
                raise ExerciseError(
                    f"{name} (stop variants {stops}): row {r} {rows[r]} {shows[r]}; yours says "
                    f"{'done' if a else 'not done'}, the library's says "
                    f"{'done' if b else 'not done'}. A row is done when its last tokens equal "
                    "one of the variants, whatever came before.")
        rows_checked += len(rows)
    return f"{rows_checked} rows in crafted batches decided as `StopOnSequences` decides them."


def _chat_prompts() -> list[str]:
    prompts = []
    for questions in (["What colour is the star?"], ["How many objects are there?"],
                      ["Is there a blue heart?", "Where is it?"]):
        conv = CONV_VISION.copy()
        conv.append("Human", f"{IMAGE_MESSAGE} {questions[0]}")
        for q in questions[1:]:
            conv.append("Assistant", "Yes.")
            conv.append("Human", q)
        conv.append("Assistant", None)
        prompts.append(conv.prompt())
    return prompts


@checker("left padding a batch of prompts")
def check_left_pad(fn, tokenizer, n_image_tokens: int) -> str:
    """`fn(examples, pad_id) -> {"input_ids", "attention_mask", "image_mask"}` must equal
    `collate(examples, pad_id, padding_side="left")` on chat prompts of different lengths."""
    examples = [build_example(tokenizer, p, n_image_tokens=n_image_tokens)
                for p in _chat_prompts()]
    pad = tokenizer.pad_token_id
    mine = attempt(fn, examples, pad)
    reference = collate(examples, pad, padding_side="left")
    if not isinstance(mine, dict):
        raise ExerciseError(f"return a dict of tensors, not {type(mine).__name__}.")
    for key in ("input_ids", "attention_mask", "image_mask"):
        if key not in mine:
            raise ExerciseError(f"your dict has no {key!r}.")
        got, want = torch.as_tensor(mine[key]), reference[key]
        if got.shape != want.shape:
            raise ExerciseError(f"{key}: yours has shape {list(got.shape)}, the library's "
                                f"{list(want.shape)} ({len(examples)} rows, as long as the "
                                "longest prompt).")
        for r in range(len(examples)):
            compare_ids(got[r].long(), want[r].long().tolist(), key,
                        f"row {r} ({len(examples[r].ids)} positions before padding)",
                        tokenizer if key == "input_ids" else None)
    return (f"{len(examples)} prompts of {sorted(len(e.ids) for e in examples)} positions "
            f"padded on the left to {reference['input_ids'].shape[1]}, as `collate` does.")


NAMED_CASES = [
    ("It is in the bottom center.", "position"),
    ("The star is red or blue.", "colour"),
    ("It is blue, not red.", "colour"),
    ("No, there is no red star.", "existence"),
    ("There are three objects.", "count"),
    ("The top left holds a small black triangle, the center a red star.", "position"),
    ("Yes, I can see a red square.", "existence"),
    ("I cannot see it.", "existence"),
    ("It is reddish.", "colour"),
    ("The circle is in the center.", "position"),
]


@checker("the strict Q&A reading")
def check_named_value(fn) -> str:
    """`fn(answer, kind) -> str | None` must equal `evaluate.named_value(answer, kind)`."""
    results = []
    for answer, kind in NAMED_CASES:
        try:
            results.append(fn(answer, kind))
        except NotImplementedError:
            raise NotDone from None
    if all(r is None or r is Ellipsis for r in results):
        raise NotDone
    for (answer, kind), mine in zip(NAMED_CASES, results):
        reference = named_value(answer, kind)
        if mine != reference:
            raise ExerciseError(f"{answer!r} ({kind}): yours reads {mine!r}, the library's "
                                f"{reference!r}: the {kind} named first in the answer, as whole "
                                "words, is the one that counts.")
    return f"{len(NAMED_CASES)} answers read as `evaluate.named_value` reads them."
