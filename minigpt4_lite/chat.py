"""Conversations and chatting with MiniGPT-4 (paper Sec. 4; REFERENCE.md "Chat").

`Conversation` reproduces the official `CONV_VISION` template: a system prompt, roles `Human` and
`Assistant`, separator `###`. Its prompt is `system###Human: msg###Assistant: msg###...Assistant:`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch

SYSTEM = ("Give the following image: <Img>ImageContent</Img>. You will be able to see the image "
          "once I provide it to you. Please answer my questions.")
IMAGE_MESSAGE = "<Img><ImageHere></Img>"


@dataclass
class Conversation:
    """A dialogue in the official single-separator style (`SeparatorStyle.SINGLE`)."""

    system: str = SYSTEM
    roles: tuple[str, str] = ("Human", "Assistant")
    messages: list[list] = field(default_factory=list)  # [role, text or None]
    sep: str = "###"

    def append(self, role: str, text: str | None) -> None:
        self.messages.append([role, text])

    def prompt(self) -> str:
        """The prompt string: `system###Role: text###...Assistant:` (an empty turn ends it)."""
        out = self.system + self.sep
        for role, text in self.messages:
            out += f"{role}: {text}{self.sep}" if text else f"{role}:"
        return out

    def copy(self) -> "Conversation":
        return copy.deepcopy(self)


CONV_VISION = Conversation()


# --- generation: shared by chat, evaluation and curation -----------------------------------------
@dataclass
class GenerationSettings:
    """Generation options; defaults are the official demo's (REFERENCE.md "Chat")."""

    max_new_tokens: int = 300
    num_beams: int = 1
    do_sample: bool = True
    temperature: float = 1.0
    top_p: float = 0.9
    repetition_penalty: float = 1.0
    max_length: int = 2000  # context + new tokens; the oldest context is cut beyond it

    def generate_kwargs(self) -> dict:
        kw = dict(max_new_tokens=self.max_new_tokens, num_beams=self.num_beams,
                  repetition_penalty=self.repetition_penalty, do_sample=self.do_sample)
        if self.do_sample:
            kw.update(temperature=self.temperature, top_p=self.top_p)
        return kw


GREEDY = GenerationSettings(do_sample=False)


class StopOnSequences:
    """A transformers `StoppingCriteria`: each row stops on its own when it ends with a stop.

    The official code checked only row 0 of a batch (REFERENCE.md); this returns one bool per row.
    """

    def __init__(self, stop_ids: list[list[int]]):
        self.stop_ids = [torch.tensor(s) for s in stop_ids if s]

    def __call__(self, input_ids: torch.Tensor, scores=None, **kwargs) -> torch.Tensor:
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for stop in self.stop_ids:
            n = len(stop)
            if input_ids.shape[1] >= n:
                done |= (input_ids[:, -n:] == stop.to(input_ids.device)).all(dim=1)
        return done


def stop_token_variants(tokenizer, stop: str) -> list[list[int]]:
    """Token sequences that spell `stop` alone or after text (LLaMA: [835], [2277, 29937])."""
    variants = {tuple(tokenizer(stop, add_special_tokens=False).input_ids)}
    for prefix in ("a", "a.", "a "):
        base = tokenizer(prefix, add_special_tokens=False).input_ids
        ids = tokenizer(prefix + stop, add_special_tokens=False).input_ids
        if ids[:len(base)] == base:
            variants.add(tuple(ids[len(base):]))
    return [list(v) for v in variants if v]


@dataclass
class Generation:
    """A generated answer: `text` (cut at the stop), whether it `stopped`, and token count."""

    text: str
    stopped: bool
    n_tokens: int


@torch.no_grad()
def generate(model, prompts: list[str | None], image_embeds: torch.Tensor,
             settings: GenerationSettings = GREEDY, stop: str = "###",
             streamer=None) -> list[Generation]:
    """Answer a batch of prompts (each with its images' visual tokens) with the frozen LLM.

    `prompts[i]` holds `<ImageHere>` where `image_embeds` rows go (`None` = stage-1 layout).
    Left padding, so that every row continues right after its own prompt (transformers derives
    the position ids from the attention mask, so padded rows see the same positions as alone).
    """
    tok = model.tokenizer
    batch = model.collate([model.build_example(p) for p in prompts], padding_side="left")
    embeds = model.embed(batch["input_ids"], batch["image_mask"], image_embeds)
    attention_mask = batch["attention_mask"].to(embeds.device)
    criteria = StopOnSequences(stop_token_variants(tok, stop))
    out = model.llm.generate(inputs_embeds=embeds, attention_mask=attention_mask,
                             stopping_criteria=[criteria],
                             pad_token_id=tok.pad_token_id, streamer=streamer,
                             **settings.generate_kwargs())
    results = []
    for row in out:
        text = tok.decode(row, skip_special_tokens=True)
        stopped = stop in text or (tok.eos_token_id in row.tolist())
        text = text.split(stop)[0]
        n = int((row != tok.pad_token_id).sum())
        results.append(Generation(text.split("Assistant:")[-1].strip(), stopped, n))
    return results
