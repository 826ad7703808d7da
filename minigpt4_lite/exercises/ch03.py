"""Chapter 3's checkers: the stage-2 template, its loss mask, the curation fixer (paper Sec. 3.2).

- `check_stage2_template`: `###Human: <Img><ImageHere></Img> {instruction} ###Assistant: `,
  compared with `prompts.stage2_prompt` character by character;
- `check_stage2_example`: a stage-2 sample as token ids and labels (answer + `###`, at most 160
  tokens, -100 on the prompt and the image slots), compared with `prompts.build_example`;
- `check_rule_fixer`: step 3 of the curation by rule, compared with `curate.rule_fixer`;
- `check_count_positions`: real, image, supervised and padding positions of a collated batch.
"""

from __future__ import annotations

import torch

from .. import curate
from ..prompts import (
    END_SYM,
    IGNORE_INDEX,
    INSTRUCTIONS,
    MAX_TXT_LEN,
    build_example,
    collate,
    stage2_prompt,
)
from . import ExerciseError, NotDone, attempt, checker, compare_ids

OFFICIAL = [i.split("</Img> ", 1)[1] for i in INSTRUCTIONS]  # the four instructions, bare
SHORT = "There is one shape in this image. A small red star is in the center."
LONG = " ".join(["A small blue heart sits in the top left, next to a big green circle."] * 14)


def first_difference(mine: str, reference: str) -> str:
    """Where two strings part, with a little context around the place."""
    i = next((k for k, (a, b) in enumerate(zip(mine, reference)) if a != b),
             min(len(mine), len(reference)))
    lo = max(0, i - 12)
    return (f"they differ at character {i}: yours ...{mine[lo:i + 12]!r}..., the library's "
            f"...{reference[lo:i + 12]!r}... (yours has {len(mine)} characters, the library's "
            f"{len(reference)})")


@checker("the stage-2 template")
def check_stage2_template(fn) -> str:
    """`fn(instruction) -> str` must equal `prompts.stage2_prompt(instruction)`."""
    cases = OFFICIAL + ["What colour is the star?"]
    for k, instruction in enumerate(cases):
        mine, reference = attempt(fn, instruction), stage2_prompt(instruction)
        if not isinstance(mine, str):
            raise ExerciseError(f"case {k} ({instruction!r}): return a str, not "
                                f"{type(mine).__name__}.")
        if mine != reference:
            hint = (" Mind the space after 'Assistant:': the answer follows it directly."
                    if mine == reference.rstrip() else "")
            raise ExerciseError(f"case {k} ({instruction!r}): "
                                f"{first_difference(mine, reference)}.{hint}")
    return f"{len(cases)} instructions wrapped exactly as `prompts.stage2_prompt` does."


def _ids_labels(out) -> tuple[list[int], list[int]]:
    if hasattr(out, "ids") and hasattr(out, "labels"):
        return list(out.ids), list(out.labels)
    if isinstance(out, (tuple, list)) and len(out) == 2:
        return [int(i) for i in out[0]], [int(i) for i in out[1]]
    raise ExerciseError(f"return (ids, labels), two lists of ints; got {type(out).__name__}.")


@checker("the stage-2 sample and its loss mask")
def check_stage2_example(fn, tokenizer, n_image_tokens: int) -> str:
    """`fn(tokenizer, instruction, answer, n_image_tokens) -> (ids, labels)` must equal
    `build_example(tokenizer, stage2_prompt(instruction), answer, end_sym="###",
    max_txt_len=160)`: -1 per image slot, labels -100 except on the answer's tokens."""
    cases = [("a short description", OFFICIAL[0], SHORT),
             ("a chat question", "What colour is the star?", "The star is black."),
             (f"an answer longer than {MAX_TXT_LEN[2]} tokens: answer + '###' is cut to "
              f"{MAX_TXT_LEN[2]} tokens", OFFICIAL[2], LONG)]
    supervised = 0
    for k, (what, instruction, answer) in enumerate(cases):
        ids, labels = _ids_labels(attempt(fn, tokenizer, instruction, answer, n_image_tokens))
        ref = build_example(tokenizer, stage2_prompt(instruction), answer,
                            n_image_tokens=n_image_tokens, end_sym=END_SYM[2],
                            max_txt_len=MAX_TXT_LEN[2])
        case = f"case {k} ({what})"
        compare_ids(ids, ref.ids, "token ids", case, tokenizer)
        if len(labels) != len(ids):
            raise ExerciseError(f"{case}: {len(labels)} labels for {len(ids)} token ids: one "
                                "label per position.")
        compare_ids(labels, ref.labels, "labels", case, tokenizer)
        supervised += sum(label != IGNORE_INDEX for label in ref.labels)
    return (f"{len(cases)} samples equal `build_example`'s, ids and labels ({supervised} "
            "supervised positions in all).")


FIXER_CASES = [
    "The picture shows one object. A small red star is in the center.",
    "There is one shape. ### A small red star is in the center.###",
    "A small blue cross is in the top left. A small blue cross is in the top left. "
    "The background is white.",
    "A small pink triangle is in the center. A small pink triangle is in the center. The pink",
    "Two objects! Is it a star? Yes. The big   green\ncircle is in the bottom right.",
    "There is one shape in this image. there is ONE shape in this image. Ok.",
]


@checker("curation step 3 by rule")
def check_rule_fixer(fn, texts: list[str] | None = None) -> str:
    """`fn(text) -> str` must equal `curate.rule_fixer(text)` on crafted drafts (and `texts`)."""
    cases = FIXER_CASES + list(texts or [])
    for k, text in enumerate(cases):
        try:
            mine = fn(text)
        except NotImplementedError:
            raise NotDone from None
        if mine is Ellipsis or (mine is None and k == 0):
            raise NotDone
        reference = curate.rule_fixer(text)
        if mine != reference:
            raise ExerciseError(f"draft {k} {text!r}: {first_difference(str(mine), reference)}.")
    return f"{len(cases)} drafts fixed exactly as `curate.rule_fixer` fixes them."


def _count(batch: dict) -> dict[str, int]:
    real = batch["attention_mask"].bool()
    return {"real": int(real.sum()), "image": int(batch["image_mask"].sum()),
            "supervised": int((batch["labels"] != IGNORE_INDEX).sum()),
            "padding": int((~real).sum())}


HINTS = {"padding": "padding is where attention_mask is 0 (image slots hold the pad id too)",
         "image": "image slots are marked by image_mask (their input_ids are the pad id)",
         "supervised": f"supervised positions have a label other than {IGNORE_INDEX}",
         "real": "real positions are where attention_mask is 1 (image slots included)"}


@checker("counting the positions of a batch")
def check_count_positions(fn, tokenizer, n_image_tokens: int, samples) -> str:
    """`fn(batch) -> {"real", "image", "supervised", "padding": int}` on collated stage-2 batches
    of `samples` (objects with `.prompt` and `.answer`), right- and left-padded."""
    examples = [build_example(tokenizer, s.prompt, s.answer, n_image_tokens=n_image_tokens,
                              end_sym=END_SYM[2], max_txt_len=MAX_TXT_LEN[2]) for s in samples]
    for side in ("right", "left"):
        batch = collate(examples, tokenizer.pad_token_id, padding_side=side)
        mine = attempt(fn, {k: v.clone() for k, v in batch.items()})
        if not isinstance(mine, dict):
            raise ExerciseError(f"return a dict with the keys {sorted(HINTS)}, not "
                                f"{type(mine).__name__}.")
        for key, want in _count(batch).items():
            got = mine.get(key)
            got = int(got) if isinstance(got, (int, torch.Tensor)) else got
            if got != want:
                raise ExerciseError(f"{side}-padded batch of {len(examples)}: {key} is {got}, "
                                    f"the batch holds {want} ({HINTS[key]}).")
    return (f"{len(examples)} samples, right- and left-padded: "
            + ", ".join(f"{k} {v}" for k, v in _count(batch).items()) + ".")
