"""Chapter 1's exercises: the prompt wrap, the label mask, the image slots, the trainable size.

- `check_prompt_wrap`: the student's `my_prompt_ids(tokenizer, prompt, n_image_tokens)` splits a
  prompt at `<ImageHere>`, puts BOS before the first segment only and one slot (-1) per visual
  token (paper Sec. 3.1-3.2; the official `prompt_wrap`);
- `check_label_mask`: `my_build_example(tokenizer, prompt, answer, n_image_tokens, end_sym,
  max_txt_len) -> (ids, labels)`: labels are -100 except on `text_ids(answer + end_sym)`, cut to
  `max_txt_len` tokens;
- `check_embed`: `my_embed(model, input_ids, image_mask, image_embeds)` puts the visual tokens
  into the image slots, in order (`MiniGPT4.embed`);
- `check_projection_params`: `my_projection_params(q_hidden, d_llm, projection)`, the number of
  trained parameters of the linear layer and of Table 5's 3-layer MLP.
Each compares with the library (`prompts.build_example`, `model.embed`, `build_meta`).
"""

from __future__ import annotations

import torch

from ..checkpoints import build_meta
from ..config import preset
from ..prompts import (
    CONV_VISION,
    IGNORE_INDEX,
    IMAGE_MESSAGE,
    build_example,
    collate,
    stage2_prompt,
)
from . import ExerciseError, attempt, checker, compare_close, compare_ids

CAPTION = "there is a small red square and a large blue circle"
DETAILED = ("I can see two objects in total. A small red square is in the top left. A large blue "
            "circle is in the center.")
LONG_CAPTION = " ".join(["a small red square and a large blue circle"] * 6)  # > 32 tokens


def chat_prompt(*messages: str) -> str:
    """The chat template with one Human message per argument, ready for the Assistant's answer."""
    conv = CONV_VISION.copy()
    for message in messages:
        conv.append(conv.roles[0], message)
    conv.append(conv.roles[1], None)
    return conv.prompt()


def prompt_cases() -> dict[str, str]:
    """Prompts in every layout the library builds, by a name used in messages."""
    return {
        "stage 1 (no prompt: the image alone)": "<ImageHere>",
        "stage 2 (the template)": stage2_prompt("Describe this image in detail."),
        "chat (system prompt + one image)": chat_prompt(f"{IMAGE_MESSAGE} What is this?"),
        "two images in one prompt": f"{IMAGE_MESSAGE} and {IMAGE_MESSAGE} Which has more objects?",
    }


def _as_list(value, what: str, case: str) -> list[int]:
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, int) for v in value):
        raise ExerciseError(f"{case}: {what} must be a list of ints, got {type(value).__name__}.")
    return list(value)


def _wrap_hint(mine: list[int], ref: list[int], tokenizer, n_image_tokens: int) -> str:
    bos = tokenizer.bos_token_id
    if not mine or mine[0] != bos:
        return "Hint: the sequence starts with BOS (tokenizer.bos_token_id), added by hand."
    if mine.count(bos) > ref.count(bos):
        return ("Hint: BOS goes before the first segment only; tokenize each segment with "
                "add_special_tokens=False.")
    if mine.count(-1) != ref.count(-1):
        return (f"Hint: each <ImageHere> becomes n_image_tokens = {n_image_tokens} slots of -1 "
                f"(you have {mine.count(-1)}, the library {ref.count(-1)}).")
    return "Hint: split the prompt at <ImageHere> and tokenize each segment separately."


def _compare(mine, ref, what, case, tokenizer, hint: str = "") -> None:
    try:
        compare_ids(mine, ref, what, case, tokenizer)
    except ExerciseError as e:
        raise ExerciseError(f"{e} {hint}".strip()) from None


@checker("the prompt wrap")
def check_prompt_wrap(my_prompt_ids, tokenizer, n_image_tokens: int) -> str:
    """`my_prompt_ids(tokenizer, prompt, n_image_tokens)` against `build_example(prompt)`'s ids."""
    cases = prompt_cases()
    for case, prompt in cases.items():
        mine = _as_list(attempt(my_prompt_ids, tokenizer, prompt, n_image_tokens), "the ids", case)
        ref = build_example(tokenizer, prompt, n_image_tokens=n_image_tokens).ids
        _compare(mine, ref, "token ids", case, tokenizer,
                 _wrap_hint(mine, ref, tokenizer, n_image_tokens))
    return f"the same token ids as prompts.build_example in all {len(cases)} layouts."


def label_cases() -> dict[str, tuple]:
    """(prompt, answer, end_sym, max_txt_len) per case name."""
    describe = stage2_prompt("Describe this image in detail.")
    return {
        "stage 1 (caption)": (None, CAPTION, "\n", 32),
        "stage 2 (detailed description)": (describe, DETAILED, "###", 160),
        "stage 1, a caption longer than max_txt_len": (None, LONG_CAPTION, "\n", 32),
        "stage 2, max_txt_len=8": (describe, DETAILED, "###", 8),
        "chat (no answer yet)": (chat_prompt(f"{IMAGE_MESSAGE} What is this?"), None, "###", 160),
    }


def _pair(out, case: str) -> tuple[list[int], list[int]]:
    if hasattr(out, "ids") and hasattr(out, "labels"):
        out = (out.ids, out.labels)
    if not isinstance(out, (tuple, list)) or len(out) != 2:
        raise ExerciseError(f"{case}: return the pair (ids, labels), got {type(out).__name__}.")
    return _as_list(out[0], "ids", case), _as_list(out[1], "labels", case)


@checker("the label mask")
def check_label_mask(my_build_example, tokenizer, n_image_tokens: int) -> str:
    """`my_build_example(tokenizer, prompt, answer, n_image_tokens, end_sym, max_txt_len)` ->
    `(ids, labels)` against `prompts.build_example` on stage-1, stage-2 and chat cases."""
    cases = label_cases()
    for case, (prompt, answer, end_sym, max_txt_len) in cases.items():
        ids, labels = _pair(attempt(my_build_example, tokenizer, prompt, answer, n_image_tokens,
                                    end_sym, max_txt_len), case)
        ref = build_example(tokenizer, prompt, answer, n_image_tokens=n_image_tokens,
                            end_sym=end_sym, max_txt_len=max_txt_len)
        _compare(ids, ref.ids, "token ids", case, tokenizer,
                 "Hint: prompt=None means the image alone; the answer's tokens are "
                 "text_ids(answer + end_sym)[:max_txt_len], after the prompt.")
        n_mine = sum(label != IGNORE_INDEX for label in labels)
        n_ref = sum(label != IGNORE_INDEX for label in ref.labels)
        _compare(labels, ref.labels, "labels", case, tokenizer,
                 f"Hint: {n_ref} positions carry a loss here (yours: {n_mine}): the answer's "
                 "tokens, each its own label; every other position is -100.")
    return (f"the same ids and labels as prompts.build_example in all {len(cases)} cases "
            "(stage 1, stage 2, truncated, chat).")


@checker("putting the visual tokens into the image slots")
def check_embed(my_embed, model) -> str:
    """`my_embed(model, input_ids, image_mask, image_embeds)` against `model.embed`, on a padded
    batch of a stage-1 and a two-image sequence (visual tokens drawn at random)."""
    n = model.cfg.num_visual_tokens
    examples = [build_example(model.tokenizer, None, CAPTION, n_image_tokens=n),
                build_example(model.tokenizer, prompt_cases()["two images in one prompt"],
                              n_image_tokens=n)]
    batch = collate(examples, model.tokenizer.pad_token_id)
    d_llm = model.llm.get_input_embeddings().weight.shape[1]
    image_embeds = torch.randn(3, n, d_llm, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        mine = attempt(my_embed, model, batch["input_ids"], batch["image_mask"], image_embeds)
        ref = model.embed(batch["input_ids"], batch["image_mask"], image_embeds)
    mine = torch.as_tensor(mine).detach().cpu()
    if mine.shape == ref.shape:
        bad = ((mine - ref.cpu()).abs().amax(-1) > 1e-6).nonzero().tolist()
        if bad:
            row, pos = bad[0]
            kind = "an image slot" if bool(batch["image_mask"][row, pos]) else "a text token"
            raise ExerciseError(
                f"sequence {row}, position {pos} ({kind}) differs from the library's. Hint: text "
                "positions hold the LLM's word embeddings; the k-th image slot of the batch (in "
                "reading order) holds visual token k of image_embeds.reshape(-1, d).")
    compare_close(mine, ref, "the LLM's input embeddings")
    return "the same input embeddings as model.embed (2 sequences, 3 images, padded batch)."


@checker("the number of trained parameters")
def check_projection_params(my_projection_params) -> str:
    """`my_projection_params(q_hidden, d_llm, projection)` against the parameter count of the
    real 7B/13B models' `llama_proj` (built on the meta device), linear and 3-layer MLP."""
    for name in ("minigpt4-7b", "minigpt4-13b"):
        for kind in ("linear", "mlp"):
            cfg = preset(name, projection=kind)
            q_hidden, d_llm = cfg.qformer.hidden, cfg.llm_arch["hidden_size"]
            mine = attempt(my_projection_params, q_hidden, d_llm, kind)
            ref = build_meta(cfg).param_counts()["projection_params"]
            if mine != ref:
                raise ExerciseError(
                    f"{name} with projection={kind!r} (Q-Former width {q_hidden} -> LLM width "
                    f"{d_llm}): yours is {mine!r}, the model has {ref:,}. Hint: a Linear(a, b) "
                    "has a*b weights and b biases; the MLP is Linear(q, d), Linear(d, d), "
                    "Linear(d, d).")
    return "the 7B and 13B models' projection sizes, linear and 3-layer MLP, are right."
