"""Chatting with MiniGPT-4 (paper Sec. 4; docs/official.md, "Chat"): generation, `Chat`, batches.

The template is the official one of the model's LLM family, `prompts.TEMPLATES[cfg.template]`:
for Vicuna `CONV_VISION` (a system prompt, roles `Human` and `Assistant`, separator `###`: the
prompt is `system###Human: msg###Assistant: msg###...Assistant:`), for Llama-2 `CONV_LLAMA2`
(`system<s>[INST] msg [/INST] `). Answers stop at `###` or the LLM's end-of-sequence token.

Two kinds of text enter that template. A user's question is `sanitize`d before it is stored (it
must not open a turn or add an image slot). The model's answer is returned and stored exactly as
generated, newlines and all, as the official demo does; only its copy *inside the prompt* of the
next turns passes through `prompts.protect`, which defuses the template's markers and changes
nothing else.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import re
import threading
from dataclasses import dataclass

import torch

from .errors import ConfigError, ImageLoadError, MiniGPT4Error
from .processing import ImageProcessor
from .prompts import (
    IMAGE_MESSAGE,
    IMAGE_PLACEHOLDER,
    TEMPLATES,
    build_example,
    collate,
    sanitize,
    text_ids,
)
from .speed import generate_with_cache

log = logging.getLogger(__name__)


# --- generation: shared by chat, evaluation and curation -----------------------------------------
@dataclass
class GenerationSettings:
    """Generation options; defaults are the official demo's (docs/official.md, "Chat")."""

    max_new_tokens: int = 300
    num_beams: int = 1
    do_sample: bool = True
    temperature: float = 1.0
    top_p: float = 0.9
    repetition_penalty: float = 1.0
    max_length: int = 2000  # context + new tokens; the oldest context is cut beyond it
    # The KV cache: "auto" = a static cache on a GPU (transformers then compiles the decoding
    # step, the usual lever for batch-1 decoding speed) and the dynamic one elsewhere (on a CPU
    # the static cache measured no faster, BENCHMARKS.md); or "static" / "dynamic" explicitly.
    kv_cache: str = "auto"

    def __post_init__(self) -> None:
        bad = [f"{k}={getattr(self, k)!r}" for k, ok in (
            ("max_new_tokens", self.max_new_tokens >= 1), ("num_beams", self.num_beams >= 1),
            ("temperature", self.temperature > 0), ("top_p", 0 < self.top_p <= 1),
            ("repetition_penalty", self.repetition_penalty > 0),
            ("kv_cache", self.kv_cache in ("auto", "static", "dynamic"))) if not ok]
        if bad:
            raise ConfigError(f"Invalid generation setting {', '.join(bad)}: max_new_tokens and "
                              "num_beams must be >= 1, temperature > 0, 0 < top_p <= 1, "
                              "kv_cache 'auto', 'static' or 'dynamic'.")

    def generate_kwargs(self) -> dict:
        kw = dict(max_new_tokens=self.max_new_tokens, num_beams=self.num_beams,
                  repetition_penalty=self.repetition_penalty, do_sample=self.do_sample)
        if self.do_sample:
            kw.update(temperature=self.temperature, top_p=self.top_p)
        return kw


GREEDY = GenerationSettings(do_sample=False)


class StopOnSequences:
    """A transformers `StoppingCriteria`: each row stops on its own when it ends with a stop.

    The official code checked only row 0 of a batch (docs/official.md); this gives one per row.
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
    """A generated answer: `text` (cut at the stop, as generated), whether it `stopped`, and
    token count."""

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
    tok, n_img = model.tokenizer, model.cfg.num_visual_tokens
    batch = collate([build_example(tok, p, n_image_tokens=n_img) for p in prompts],
                    tok.pad_token_id, padding_side="left")
    embeds = model.embed(batch["input_ids"], batch["image_mask"], image_embeds)
    out = generate_with_cache(  # the KV cache is a speed switch (speed.py); same tokens either way
        model.llm, settings.kv_cache, inputs_embeds=embeds,
        attention_mask=batch["attention_mask"].to(embeds.device), streamer=streamer,
        stopping_criteria=[StopOnSequences(stop_token_variants(tok, stop))],
        pad_token_id=tok.pad_token_id, **settings.generate_kwargs())
    results = []
    for row in out:  # as official: decode, cut at the stop, keep what follows "Assistant:", strip
        text = tok.decode(row, skip_special_tokens=True)
        stopped = stop in text or (tok.eos_token_id in row.tolist())
        text = text.split(stop)[0]
        n = int((row != tok.pad_token_id).sum())
        results.append(Generation(text.split("Assistant:")[-1].strip(), stopped, n))
    return results


# --- chatting: Chat, sanitising, context cut, streaming ------------------------------------------
class ChatInputError(MiniGPT4Error, ValueError):
    """A chat input that cannot be used: an empty question, nothing to answer, no images..."""


_HELD_BACK = re.compile(r"[\s#]+\Z")  # a streamed piece's end that may yet be the stop or stripped


class Chat:
    """A multi-turn, multi-image chat with MiniGPT-4, as the official demo's `Chat` (Sec. 4).

    The template is the model's (`TEMPLATES[model.cfg.template]`). `upload(image)` adds the
    user's message `<Img><ImageHere></Img>` and stores the image's visual tokens; `ask(text)` adds
    a question (after a space, in the same message, right after an upload); `answer()` generates
    from `conv.prompt()` with the assistant's turn open, cut at the stop (`###`), and returns and
    stores the answer as generated (see `protect` for its prompt copy).
    When the prompt + `max_new_tokens` would exceed `settings.max_length` or the LLM's
    `max_position_embeddings`, the oldest context is cut (see `_fit`) and a sentence is added to
    `notices` and logged as a warning: the chat never crashes on a long conversation.
    """

    def __init__(self, model, settings: GenerationSettings | None = None):
        self.model, self.settings = model, settings or GenerationSettings()
        self.template = TEMPLATES[model.cfg.template]
        self.processor = ImageProcessor(model.cfg.vision.image_size)
        self.reset()

    def reset(self) -> None:
        """Forget the conversation and the images (`notices` too)."""
        self.conv = self.template.conversation.copy()
        self.images: list[torch.Tensor] = []  # visual tokens [Q, d], one per `<ImageHere>`
        self.notices: list[str] = []

    @torch.no_grad()
    def upload(self, image) -> None:
        """Add an image: path, bytes, file, PIL image or tensor [3,S,S] (else `ImageLoadError`)."""
        try:
            pixels = self.processor(image)
        except TypeError as e:  # not an image type at all: a user error, said in one sentence
            raise ImageLoadError(f"Cannot use a {type(image).__name__} as an image; pass a path, "
                                 "bytes, a file, a PIL image or a [3, S, S] tensor.") from e
        self.images.append(self.model.encode_image(pixels[None])[0])
        self.conv.append(self.conv.roles[0], IMAGE_MESSAGE)

    def ask(self, text: str) -> None:
        """Add a question (sanitised, see `sanitize`); `ChatInputError` if it is empty."""
        if not isinstance(text, str) or not text.strip():
            raise ChatInputError("The question is empty: type a question about the image.")
        text, messages = sanitize(text), self.conv.messages
        if not text:
            raise ChatInputError("The question holds only template markers (###, <Img>, role "
                                 "names...), which are removed: ask in plain words.")
        if messages and messages[-1][0] == self.conv.roles[0] and messages[-1][1].endswith(
                "</Img>"):
            messages[-1][1] += " " + text  # as official: the question joins the image message
        else:
            self.conv.append(self.conv.roles[0], text)

    def answer(self, settings: GenerationSettings | None = None, streamer=None) -> str:
        """Generate the Assistant's reply to the conversation so far; it is stored in `conv`.

        The reply is returned as generated (cut at `###`, stripped): a list keeps its lines.
        """
        if not self.conv.messages or self.conv.messages[-1][0] != self.conv.roles[0]:
            raise ChatInputError("Nothing to answer: ask a question or upload an image first.")
        before = (copy.deepcopy(self.conv.messages), list(self.images), len(self.notices))
        self.conv.append(self.conv.roles[1], None)
        try:
            settings = self._fit(settings or self.settings)
            out = generate(self.model, [self.conv.prompt()], self._image_embeds(), settings,
                           stop=self.template.stop, streamer=streamer)[0]
        except BaseException:  # undo the open turn and any context cut: the chat stays usable
            self.conv.messages, self.images, n_notices = before
            del self.notices[n_notices:]
            raise
        self.conv.messages[-1][1] = out.text  # raw, as official; `prompt()` protects its copy
        return out.text

    def stream(self, text: str | None = None, settings: GenerationSettings | None = None):
        """Ask `text` (if given) and yield the answer in pieces as they are generated.

        transformers' `TextIteratorStreamer` is fed by `generate` in a thread; pieces end before
        the stop (`###`). Trailing spaces, newlines and `#` are held back until more text follows
        them, so that the pieces join to the answer that `answer()` returns (and stores). Beam
        search cannot stream: it yields the whole answer at once. Errors are re-raised.
        """
        from transformers import TextIteratorStreamer

        if text is not None:
            self.ask(text)
        settings = settings or self.settings
        if settings.num_beams > 1:
            yield self.answer(settings)
            return
        streamer = TextIteratorStreamer(self.model.tokenizer, skip_prompt=True,
                                        skip_special_tokens=True)
        errors = []

        def run():
            try:
                self.answer(settings, streamer)
            except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
                errors.append(e)
                streamer.end()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        so_far, shown = "", ""
        for piece in streamer:
            so_far += piece
            visible = _HELD_BACK.sub("", so_far.split(self.template.stop)[0]).lstrip()
            if len(visible) > len(shown):
                yield visible[len(shown):]
                shown = visible
        thread.join()
        if errors:
            raise errors[0]

    # --- the context limit ----------------------------------------------------------------------
    def _image_embeds(self) -> torch.Tensor:
        if self.images:
            return torch.stack(self.images)
        emb = self.model.llm.get_input_embeddings().weight
        return emb.new_zeros(0, self.model.cfg.num_visual_tokens, emb.shape[1])

    def _length(self) -> int:
        """Prompt length in LLM positions (BOS + text tokens + image slots)."""
        return len(build_example(self.model.tokenizer, self.conv.prompt(),
                                 n_image_tokens=self.model.cfg.num_visual_tokens).ids)

    def _drop(self, i: int) -> None:
        """Delete message `i` and the visual tokens of its images."""
        counts = [self.conv.image_slots(j) for j in range(i + 1)]
        start = sum(counts[:-1])
        del self.images[start:start + counts[-1]], self.conv.messages[i]

    def _notice(self, text: str) -> None:
        log.warning(text)
        self.notices.append(text)

    def _fit(self, settings: GenerationSettings) -> GenerationSettings:
        """Cut the oldest context until prompt + `max_new_tokens` fits (docs/official.md).

        Order: old exchanges (an old image message stays, bare); `max_new_tokens` down to half
        the context; the start of the current question (down to 64 tokens); old images; the rest
        of the question; `max_new_tokens`. Each cut adds a sentence to `notices`.
        """
        limit = min(settings.max_length,
                    getattr(self.model.llm.config, "max_position_embeddings", None) or 10**9)
        new = settings.max_new_tokens

        def room() -> int:
            return limit - new - self._length()

        self._cut_old(room, limit, images=False)
        if room() < 0 and new > limit // 2:
            new = max(limit // 2, new + room())
        self._shorten_question(room, floor=64)
        self._cut_old(room, limit, images=True)
        self._shorten_question(room, floor=0)
        new = min(new, new + room())
        if new < 1:
            raise ChatInputError(f"The prompt needs {self._length()} tokens (system prompt and "
                                 f"images) but the context holds {limit}: raise max_length.")
        if new != settings.max_new_tokens:
            self._notice(f"max_new_tokens was lowered from {settings.max_new_tokens} to {new} "
                         f"to fit the context ({limit} tokens).")
        return dataclasses.replace(settings, max_new_tokens=new)

    def _cut_old(self, room, limit: int, images: bool) -> None:
        """Drop old messages, oldest first, while `room() < 0`; the question itself stays."""
        msgs = self.conv.messages
        i, n_cut, current = 0, 0, len(msgs) - 2  # [..., question, open Assistant turn]
        while i < current and room() < 0:
            if self.conv.image_slots(i) and not images:  # keep the image, drop its text
                n_cut += msgs[i][1] != IMAGE_MESSAGE
                msgs[i][1], i = IMAGE_MESSAGE, i + 1
            else:
                n_cut += 1
                self._drop(i)
                current -= 1
        if n_cut and images:
            self._notice(f"Removed {n_cut} old image(s) from the context ({limit} tokens): the "
                         "model cannot see them any more; upload again to ask about them.")
        elif n_cut:
            self._notice(f"The conversation was too long for the context ({limit} tokens): "
                         f"removed {n_cut} of the oldest messages.")

    def _shorten_question(self, room, floor: int) -> None:
        """Keep only the end of the current question (at least `floor` tokens) while too long."""
        msg = self.conv.messages[-2]  # the question right before the open Assistant turn
        head = IMAGE_MESSAGE + " " if msg[1].startswith(IMAGE_MESSAGE + " ") else ""
        if room() >= 0 or (IMAGE_PLACEHOLDER in msg[1] and not head):  # no question to shorten
            return
        ids = text_ids(self.model.tokenizer, msg[1][len(head):])
        keep = len(ids)
        while keep > floor and room() < 0:
            keep = max(floor, min(keep - 1, keep + room()))
            tail = sanitize(self.model.tokenizer.decode(ids[len(ids) - keep:]))
            msg[1] = head + tail if tail else head.strip() or "?"
        if keep < len(ids):
            self._notice(f"The question was too long for the context: only its last {keep} "
                         "tokens were kept.")


@torch.no_grad()
def answer_batch(model, images: list, question: str,
                 settings: GenerationSettings | None = None) -> list[str]:
    """One question about many images, answered in one batched `generate` call (greedy default).

    Every row has the same prompt as `Chat` (upload, ask, answer), so with greedy decoding row i
    equals the answer of a `Chat` about image i alone.
    """
    if not images:
        raise ChatInputError("answer_batch needs at least one image.")
    chat = Chat(model, settings or GREEDY)
    embeds = model.encode_image(torch.stack([chat.processor(image) for image in images]))
    chat.images = [embeds[0]]
    chat.conv.append(chat.conv.roles[0], IMAGE_MESSAGE)
    chat.ask(question)
    chat.conv.append(chat.conv.roles[1], None)
    settings = chat._fit(chat.settings)
    outs = generate(model, [chat.conv.prompt()] * len(images), embeds, settings,
                    stop=chat.template.stop)
    return [o.text for o in outs]  # as generated, as `Chat.answer` returns them
