"""The prompt wrap: every text that goes around an image, and how it becomes tokens (Sec. 3.1-3.2).

MiniGPT-4 never changes the LLM: it only decides what the LLM reads. This module holds all of it:

- the image placeholder `<ImageHere>`, where the visual tokens go (one slot per visual token);
- the stage-2 template `###Human: <Img><ImageHere></Img> {instruction} ###Assistant: ` and the
  official alignment instructions (stage 1 has no prompt at all: `[BOS] [image] caption`);
- the chat template `CONV_VISION` (system prompt, `Human`/`Assistant` turns, `###` separator);
- `TEMPLATES`: these per LLM family, Vicuna's and Llama-2-chat's (`[INST] {} [/INST] `,
  `CONV_LLAMA2`), named by `MiniGPT4Config.template`;
- `build_example`: a prompt and an answer -> token ids with image slots and the loss mask
  (labels are -100 everywhere except on the answer: the official `prompt_wrap` + target);
- `collate`: padding a batch of examples into tensors;
- `sanitize` / `protect`: text made safe to put inside the template.

Nothing here needs the model: only a tokenizer and the number of visual tokens per image.
"""

from __future__ import annotations

import copy
import random
import re
import unicodedata
from dataclasses import dataclass, field

import torch

IMAGE_PLACEHOLDER = "<ImageHere>"
IMAGE_MESSAGE = f"<Img>{IMAGE_PLACEHOLDER}</Img>"  # how an image enters a prompt
PROMPT_TEMPLATE = "###Human: {} ###Assistant: "  # stage 2 (docs/official.md)
INSTRUCTIONS = (  # prompts/alignment.txt of the official code
    "<Img><ImageHere></Img> Describe this image in detail.",
    "<Img><ImageHere></Img> Take a look at this image and describe what you notice.",
    "<Img><ImageHere></Img> Please provide a detailed description of the picture.",
    "<Img><ImageHere></Img> Could you describe the contents of this image for me?",
)
# The data-curation prompt of Sec. 3.2 (the stage-1 model describes the images of stage 2's data)
CURATION_INSTRUCTION = ("Describe this image in detail. Give as many details as possible. "
                        "Say everything you see.")
CURATION_PROMPT = PROMPT_TEMPLATE.format(f"{IMAGE_MESSAGE} {CURATION_INSTRUCTION}").rstrip()
CONTINUE_PROMPT = "###Human: Continue ###Assistant:"  # asked when a curated draft is too short
IGNORE_INDEX = -100  # the label of tokens that carry no loss (PyTorch's cross-entropy default)
# How an answer ends and how many of its tokens are kept, per training stage (the official stage-1
# and stage-2 configs): a stage-1 caption ends with a newline, a stage-2 answer with the "###"
# separator of the template (Vicuna's; `stage_end_sym` gives Llama-2's). `TrainConfig` reads these.
END_SYM = {1: "\n", 2: "###"}
MAX_TXT_LEN = {1: 32, 2: 160}
LLAMA2_PROMPT_TEMPLATE = "[INST] {} [/INST] "  # stage 2 of the Llama-2 variant, end symbol </s>


def stage2_prompt(instruction: str, image: str = IMAGE_PLACEHOLDER,
                  template: str = "vicuna") -> str:
    """The stage-2 template of `TEMPLATES[template]` around one instruction; `image` is what
    stands between `<Img>` tags (the placeholder; the ToyWorld LLM's pretraining also puts the
    scene there in words)."""
    return TEMPLATES[template].prompt.format(f"<Img>{image}</Img> {instruction}")


def stage_end_sym(stage: int, template: str = "vicuna") -> str:
    """What ends an answer: stage 1's newline, or stage 2's end symbol of `TEMPLATES[template]`
    (`###` for Vicuna, `</s>` for Llama-2: the official configs)."""
    return END_SYM[1] if stage == 1 else TEMPLATES[template].end_sym


def pick_instruction(key: str, seed: int) -> str:
    """One of the official instructions, drawn per sample (the official code draws per batch)."""
    return random.Random(f"{seed}:{key}").choice(INSTRUCTIONS).split("</Img> ", 1)[1]


# --- the chat template ----------------------------------------------------------------------------
SYSTEM = ("Give the following image: <Img>ImageContent</Img>. You will be able to see the image "
          "once I provide it to you. Please answer my questions.")


@dataclass
class Conversation:
    """A dialogue in the official single-separator style (`SeparatorStyle.SINGLE`).

    Its prompt is the system text, `sep`, then `role + role_sep + text + sep` for each message and
    `role + role_sep.rstrip()` for the open turn: for Vicuna (`CONV_VISION`)
    `system###Human: msg###Assistant: msg###...Assistant:`, for Llama-2 (`CONV_LLAMA2`)
    `system<s>[INST] msg [/INST] msg<s>[INST] msg [/INST] `.
    """

    system: str = SYSTEM
    roles: tuple[str, str] = ("Human", "Assistant")
    messages: list[list] = field(default_factory=list)  # [role, text or None]
    sep: str = "###"
    role_sep: str = ": "  # between a role and its text

    def append(self, role: str, text: str | None) -> None:
        self.messages.append([role, text])

    def prompt(self) -> str:
        """The prompt string (Vicuna: `system###Role: text###...Assistant:`); a `None` turn ends it.

        Answers (`roles[1]`) go in through `protect`: an answer that happens to contain `#`,
        `<ImageHere>`, `Human:` or `[INST]` cannot change the separator, the slots or the turns.
        """
        out = self.system + self.sep
        for role, text in self.messages:
            if text is None:
                out += role + self.role_sep.rstrip()
            else:
                text = protect(text) if role == self.roles[1] else text
                out += f"{role}{self.role_sep}{text}{self.sep}"
        return out

    def image_slots(self, i: int) -> int:
        """How many `<ImageHere>` slots message `i` puts into the prompt (answers put none)."""
        role, text = self.messages[i]
        return text.count(IMAGE_PLACEHOLDER) if role == self.roles[0] and text else 0

    def copy(self) -> "Conversation":
        return copy.deepcopy(self)


CONV_VISION = Conversation()
# The Llama-2 variant's chat (the official `CONV_VISION_LLama2`): the same system text, Llama-2's
# `<s>[INST] ... [/INST] ` turns and no separator.
CONV_LLAMA2 = Conversation(roles=("<s>[INST] ", " [/INST] "), sep="", role_sep="")


@dataclass(frozen=True)
class Template:
    """How one LLM family is prompted: its stage-2 template and end symbol (the official train
    config) and its chat; `stop` ends a chat answer (the official demo stops both families at
    `###`; generation also ends at the LLM's EOS, which is how a Llama-2 answer really ends)."""

    prompt: str
    end_sym: str
    conversation: Conversation
    stop: str = "###"


TEMPLATES = {"vicuna": Template(PROMPT_TEMPLATE, END_SYM[2], CONV_VISION),
             "llama2": Template(LLAMA2_PROMPT_TEMPLATE, "</s>", CONV_LLAMA2)}


# --- prompt + answer -> tokens and loss mask ------------------------------------------------------
@dataclass
class Example:
    """One tokenised sequence: `ids[i] == -1` marks an image-embedding slot."""

    ids: list[int]
    labels: list[int]

    def __add__(self, other: "Example") -> "Example":
        """Two sequences one after the other (a dialogue's later turns after its first)."""
        return Example(self.ids + other.ids, self.labels + other.labels)


def text_ids(tokenizer, text: str) -> list[int]:
    """Token ids of a text segment, without BOS/EOS (segments are tokenised separately)."""
    return tokenizer(text, add_special_tokens=False).input_ids if text else []


def build_example(tokenizer, prompt: str | None, answer: str | None = None, *,
                  n_image_tokens: int, end_sym: str = END_SYM[1],
                  max_txt_len: int = MAX_TXT_LEN[1], bos: bool = True) -> Example:
    """Token layout of one sample (paper Sec. 3.1 and 3.2; the official sequence layout).

    - stage 1, `prompt=None`: `[BOS] [image] [answer + end_sym]`;
    - stage 2, `prompt="###Human: <Img><ImageHere></Img> ... ###Assistant: "`:
      `[BOS] [before] [image] [after] [answer + end_sym]`;
    - chat, `answer=None`: the prompt only, with one image slot per `<ImageHere>`.
    Each `<ImageHere>` becomes `n_image_tokens` slots (-1) for the visual tokens. The answer is
    truncated to `max_txt_len` tokens (after adding `end_sym`, as official); both default to
    stage 1's: pass stage 2's for stage 2. Labels are -100 everywhere except on the answer
    tokens. `bos=False` builds a continuation (a later turn of a dialogue).
    """
    segments = (prompt if prompt is not None else IMAGE_PLACEHOLDER).split(IMAGE_PLACEHOLDER)
    ids = [tokenizer.bos_token_id] if bos else []
    for i, segment in enumerate(segments):
        if i > 0:
            ids += [-1] * n_image_tokens
        ids += text_ids(tokenizer, segment)
    labels = [IGNORE_INDEX] * len(ids)
    if answer is not None:
        target = text_ids(tokenizer, answer + end_sym)[:max_txt_len]
        ids += target
        labels += target
    return Example(ids, labels)


def collate(examples: list[Example], pad_id: int, padding_side: str = "right") -> dict:
    """Pad examples into tensors: `input_ids`, `image_mask`, `attention_mask`, `labels`.

    Right padding for training (as official); left padding for batched generation.
    """
    T = max(len(e.ids) for e in examples)
    ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), T), IGNORE_INDEX, dtype=torch.long)
    attn = torch.zeros((len(examples), T), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.ids)
        sl = slice(0, n) if padding_side == "right" else slice(T - n, T)
        ids[i, sl] = torch.tensor(e.ids)
        labels[i, sl] = torch.tensor(e.labels)
        attn[i, sl] = 1
    image_mask = ids == -1
    ids[image_mask] = pad_id
    return {"input_ids": ids, "image_mask": image_mask, "attention_mask": attn,
            "labels": labels}


# --- text made safe for the template --------------------------------------------------------------
_TAG = re.compile(r"<\s*/?\s*[A-Za-z_|][\w|.-]*\s*>")  # <Img>, </Img>, <ImageHere>, <s>, </s>
_ROLE = re.compile(r"(human|assistant)\s*:|\[\s*/?\s*inst\s*\]", re.IGNORECASE)  # and [/INST]
_SPACE = {"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"}  # control, format, ..., line breaks


def sanitize(text: str) -> str:
    """User (or generated) text made safe to put inside a turn of the template. Strip, not escape:

    - control and format characters (newlines, tabs, NUL, zero-width...) become spaces;
    - every `#` becomes a space: the separator is `###`, and a `#` next to it would change it;
    - tag-like tokens (`<Img>`, `</Img>`, `<ImageHere>`, `<s>`, `</s>`, ...) become spaces, so text
      never adds an image slot (`build_example` splits at `<ImageHere>`) or a special token;
    - role markers lose their colon (`Human:` -> `Human`) and `[INST]` / `[/INST]` (Llama-2's
      turns) are removed, so text cannot open a new turn;
    - whitespace is collapsed. Repeated until nothing changes.
    Escaping would keep these characters for the LLM to read, but a tiny LLM never saw them.
    (For the model's own answers see `protect`, which keeps their newlines.)
    """
    previous = None
    while text != previous:
        previous = text
        text = "".join(" " if unicodedata.category(c) in _SPACE else c for c in text)
        text = " ".join(protect(text).split())
    return text


def protect(text: str) -> str:
    """A generated answer made safe to put back into the prompt, with nothing else changed.

    The template's markers are defused as in `sanitize`: every `#` becomes a space (an answer
    ending in `#` would otherwise merge with the `###` after it), tag-like tokens (`<ImageHere>`,
    `<Img>`, `</s>`...) become spaces, `Human:` / `Assistant:` lose their colon and `[INST]` /
    `[/INST]` go. Newlines, list markers and all other characters stay, as the official demo keeps
    the raw answer. Repeated until nothing changes.
    """
    previous = None
    while text != previous:
        previous = text
        text = _ROLE.sub(r"\1", _TAG.sub(" ", text.replace("#", " ")))
    return text
