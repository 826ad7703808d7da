"""Rebuild `assets/`: the tiny pretrained, frozen backbones of ToyWorld (the "BLIP-2" and "Vicuna").

MiniGPT-4 aligns two models that were pretrained separately. Here both are pretrained from scratch
on ToyWorld, deterministically from a seed, on a laptop CPU:

1. a byte-level BPE tokenizer trained on the ToyWorld corpus (`tokenizers`);
2. the LLM, a small `LlamaForCausalLM`, trained on *text only*: captions, and `###Human: ...
   ###Assistant: ...` dialogues in every register where the scene is given in words, or as
   "slot vectors" (one input vector per grid cell = the sum of that cell's word embeddings, plus
   one for the background, plus noise). A model this small cannot learn to read arbitrary soft
   tokens from one linear layer (a prototype here got object recall 0.02-0.07 that way);
   Vicuna-13B can, and BLIP-2's Q-Former had already been trained to talk to a frozen LLM. The
   slot vectors give our tiny LLM the equivalent skill: reading a scene from input vectors,
   without ever seeing a pixel.
3. the ViT + Q-Former (ours, tiny), trained on rendered images with a grounded representation
   objective in the spirit of BLIP-2's first stage: query i must predict the content of grid cell i
   (shape, colour, size or "empty"), query 9 the background, through per-query linear heads;
   and, by least squares through one linear layer, the bag of words of its cell (the position
   words and the content). The second objective is our miniature of BLIP-2's second stage, which
   trained the Q-Former until one fully-connected layer could hand its outputs to a frozen LLM:
   it makes the words linearly readable from the queries, so that the linear projection that
   MiniGPT-4 trains can hand our LLM nearly the exact slot vectors it learned to read.

The heads and the slot vectors are thrown away; what is shipped is the frozen LLM and the frozen
ViT + Q-Former, in the HF folder layouts that the real-checkpoint loaders read.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import platform
import random
import textwrap
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from . import toyworld as tw
from .chat import CONV_VISION
from .checkpoints import atomic_save_file, load_model
from .config import TINY_QFORMER, TINY_VISION, MiniGPT4Config, preset
from .errors import TrainingError
from .model import (
    END_SYM,
    IGNORE_INDEX,
    IMAGE_PLACEHOLDER,
    MAX_TXT_LEN,
    PROMPT_TEMPLATE,
    Example,
    MiniGPT4,
)
from .processing import CLIP_MEAN, CLIP_STD, clean_caption
from .qformer import QFormer, hf_qformer_keys
from .train import compile_llm, compile_with_fallback
from .vision import VisionTransformer, hf_vision_keys

log = logging.getLogger(__name__)

ADDED_TOKENS = ("###", "<Img>", "</Img>", "Human:", "Assistant:")
N_SLOTS = TINY_QFORMER.num_query_tokens  # 9 grid cells + the background


# What the LLM reads during pretraining: shares of each form and of each register (TASK_KINDS:
# detailed, qa, poem, story, caption); see `llm_example` and `qa_dialogue`. Measured over eight
# LLM builds (README, "How the targets were reached"): 10% `slot_caption` sequences (stage
# 1's own layout) make stage 1's alignment reliable, and detailed descriptions as 45% of the
# registers (instead of 30%) gave the LLM that describes scenes best from exact slot vectors.
FORMS = ("caption", "words", "slots", "chat", "qa_chat", "slot_caption")
FORM_WEIGHTS = (5, 15, 40, 15, 15, 10)
KIND_WEIGHTS = (45, 20, 10, 10, 15)
QA_TURNS = (3, 6)  # questions per `qa_chat` dialogue


LLM_ATTENTIONS = ("sdpa", "eager_fp32", "eager")  # see `BuildConfig.llm_attention`
VISION_ATTENTIONS = ("sdpa", "explicit")


@dataclass
class BuildConfig:
    """Every number of the asset build, in one place (written into the model card)."""

    seed: int = 0
    steps_scale: float = 1.0
    device: str = "cpu"
    n_train_scenes: int = 20000
    vocab_size: int = 1024
    llm_hidden: int = 256
    llm_layers: int = 4
    llm_heads: int = 4
    llm_mlp: int = 688
    llm_steps: int = 5000
    llm_batch: int = 32
    llm_lr: float = 2e-3
    # Length-bucketed batches (each batch's loss weighed by its share of the pool's tokens, see
    # `pool_tokens_per_batch`) and torch.compile of the LLM's forward: 2.3x faster per LLM step
    # (BENCHMARKS.md "Asset build"). `--plain` turns both off.
    llm_bucket_pool: int = 8  # batches drawn at once and bucketed by length (1 = no bucketing)
    compile: bool = True  # torch.compile the LLM for its pretraining
    vision_compile: bool = False  # the ViT + Q-Former pretraining (not measured faster; eager)
    # The attention of each pretraining. Explicit attention (softmax(QK^T)V written out) is faster
    # on this CPU than the fused "sdpa", whose backward is a slow separate kernel for these short
    # sequences: the ViT + Q-Former 2.0-2.4x per step ("explicit": 203-242 s instead of 487 s),
    # the compiled LLM 0.27 -> 0.23 s per step ("eager_fp32" = transformers' eager attention with
    # float32 scores, `eager_fp32_attention`). The LLM loads with "sdpa" afterwards.
    llm_attention: str = "eager_fp32"
    vision_attention: str = "explicit"  # or "sdpa"
    slot_noise: float = 0.5  # std of the noise added to slot vectors, relative to embedding std
    # shares of the pretraining forms, in the order of `FORMS` (caption, words, slots, chat,
    # qa_chat, slot_caption); a list in JSON reports
    form_weights: tuple[int, ...] = FORM_WEIGHTS
    # shares of the registers where a form draws one (`TASK_KINDS`: detailed, qa, poem, story,
    # caption; the `qa_chat` dialogues are all Q&A)
    kind_weights: tuple[int, ...] = KIND_WEIGHTS
    # weight of the linear words objective of the ViT + Q-Former (`GroundedHeads`); 0 = without
    vision_words_weight: float = 1.0
    vision_steps: int = 1500
    vision_batch: int = 64
    vision_lr: float = 1e-3

    def steps(self, n: int) -> int:
        return max(2, int(round(n * self.steps_scale)))


# The recipe of the assets shipped before 2026-11-26 evening (`build-assets --plain`): random
# batches, eager, no multi-turn Q&A dialogues. Its LLM part took 3,369 s here; see the model card
# for how the two LLMs compare.
PLAIN = {"llm_bucket_pool": 1, "compile": False, "llm_attention": "sdpa",
         "vision_attention": "sdpa", "form_weights": (15, 20, 45, 20, 0, 0),
         "kind_weights": (30, 30, 15, 10, 15), "vision_words_weight": 0.0}

# The recipe of the assets shipped from 2026-11-26 evening to 2026-11-27 (`build-assets
# --previous`, 2,303 s here): fused attention, no slot-caption sequences, the registers 30/30/15/
# 10/15, and the ViT + Q-Former without the words objective. Its LLM read exact slot vectors well
# (5.5% failed descriptions) but its build took 38 minutes, and through the projection the demo
# failed 11.5% of descriptions, with stage-1 caption recall 0.881 and position answers 24%
# (README, "How the targets were reached").
PREVIOUS = {"llm_attention": "sdpa", "vision_attention": "sdpa",
            "form_weights": (15, 15, 40, 15, 15, 0), "kind_weights": (30, 30, 15, 10, 15),
            "vision_words_weight": 0.0}


def cosine_lr(step: int, total: int, peak: float, warmup: int, floor: float) -> float:
    """Linear warmup to `peak`, then cosine decay to `floor` over the steps after the warmup.

    The backbones' pretraining schedule, not MiniGPT-4's: the official one (docs/official.md,
    `train.learning_rate`) runs its cosine over the whole run, warmup included.
    """
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * min(1.0, t)))


# --- 1. tokenizer -------------------------------------------------------------------------------
def corpus(scenes: list[tw.Scene], rng: random.Random):
    """Every register of the ToyWorld language, plus the prompt templates."""
    for scene in scenes:
        yield tw.caption(scene, rng)
        for kind in tw.TASK_KINDS:
            instruction, answer = tw.sample_task(scene, rng, kind)
            yield PROMPT_TEMPLATE.format(f"<Img>{tw.scene_in_words(scene)}</Img> {instruction}")
            yield answer + "###"
    yield CONV_VISION.prompt()
    yield " ".join(slot_vocabulary()) + " empty background"


def build_tokenizer(texts, vocab_size: int):
    """A byte-level BPE tokenizer as a transformers fast tokenizer (reloads offline)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size,
                                  special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>")
    # The template markers are single tokens, so that `###` (the stop) tokenises one way only.
    fast.add_tokens(list(ADDED_TOKENS))
    return fast


# --- 2. slot vectors: a scene as input vectors built from word embeddings -----------------------
def slot_vocabulary() -> list[str]:
    words = {w for cell in tw.CELL_WORDS for w in cell}
    words |= set(tw.SIZES) | set(tw.COLOURS) | set(tw.SHAPES) | {"empty", "background"}
    words |= {w for phrase in tw.BACKGROUND_WORDS.values() for w in phrase.split()}
    return sorted(words)


def slot_words(scene: tw.Scene) -> list[list[str]]:
    """The words summed into each of the 10 slots: 9 cells (row-major) and the background.

    A cell's slot holds its position words and its content (size, colour, shape, or "empty").
    (A build whose slots held the content only, leaving the position to the slot's order, read
    positions worse: 27% of position questions right from exact slots instead of 52%.)
    """
    slots = []
    for cell in range(tw.GRID * tw.GRID):
        obj = scene.cells.get(cell)
        attrs = [obj.size, obj.colour, obj.shape] if obj else ["empty"]
        slots.append(list(tw.CELL_WORDS[cell]) + attrs)
    slots.append(["background"] + tw.BACKGROUND_WORDS[scene.background].split())
    return slots


def slot_word_counts(scenes: list[tw.Scene], index: dict[str, int] | None = None
                     ) -> torch.Tensor:
    """[B, 10, n_words]: how often each word of `slot_vocabulary` is in each slot of each scene."""
    index = index or {w: i for i, w in enumerate(slot_vocabulary())}
    counts = torch.zeros(len(scenes), N_SLOTS, len(index))
    for b, scene in enumerate(scenes):
        for s, words in enumerate(slot_words(scene)):
            for w in words:
                counts[b, s, index[w]] += 1
    return counts


class SlotEncoder:
    """Turns scenes into slot vectors with the LLM's (trainable) input embeddings."""

    def __init__(self, tokenizer, scenes_vocab: list[str] | None = None):
        self.words = scenes_vocab or slot_vocabulary()
        self.index = {w: i for i, w in enumerate(self.words)}
        self.token_ids = [tokenizer(" " + w, add_special_tokens=False).input_ids
                          for w in self.words]

    def word_matrix(self, embedding: nn.Embedding) -> torch.Tensor:
        """[n_words, d]: each word's embedding (mean over its tokens)."""
        return torch.stack([embedding.weight[ids].mean(0) for ids in self.token_ids])

    def __call__(self, scenes: list[tw.Scene], embedding: nn.Embedding, noise: float,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        counts = slot_word_counts(scenes, self.index)
        W = self.word_matrix(embedding)
        slots = counts.to(W.device, W.dtype) @ W
        if noise > 0:
            eps = torch.randn(slots.shape, generator=generator).to(W.device, W.dtype)
            slots = slots + noise * embedding.weight.detach().std() * eps
        return slots


# --- 3. the LLM's text-only pretraining -----------------------------------------------------------
def llm_example(scene: tw.Scene, rng: random.Random, form: str, kind_weights=KIND_WEIGHTS
                ) -> tuple[str | None, str, str, bool]:
    """One pretraining sample of `form`: (prompt or None, answer, end_sym, uses slot vectors)."""
    kind = rng.choices(tw.TASK_KINDS, weights=kind_weights)[0]
    instruction, answer = tw.sample_task(scene, rng, kind)
    if form == "caption":  # plain caption text, the language of stage 1 (no image)
        return "", tw.caption(scene, rng), "\n", False
    if form == "slot_caption":  # stage 1's layout, `[BOS] [slots] caption\n`, as in its data
        return None, clean_caption(tw.caption(scene, rng)), "\n", True
    if form == "words":
        prompt = PROMPT_TEMPLATE.format(f"<Img>{tw.scene_in_words(scene)}</Img> {instruction}")
        return prompt, answer, "###", False
    if form == "slots":
        return PROMPT_TEMPLATE.format(f"<Img>{IMAGE_PLACEHOLDER}</Img> {instruction}"), answer, \
            "###", True
    conv = CONV_VISION.copy()  # the chat template, sometimes with an earlier turn
    first = f"<Img>{IMAGE_PLACEHOLDER}</Img>"
    if rng.random() < 0.4:
        q0, a0 = tw.sample_task(scene, rng, "qa")
        conv.append("Human", f"{first} {q0}")
        conv.append("Assistant", a0)
        conv.append("Human", instruction)
    else:
        conv.append("Human", f"{first} {instruction}")
    conv.append("Assistant", None)
    return conv.prompt(), " " + answer, "###", True


def qa_dialogue(wrapper: MiniGPT4, scene: tw.Scene, rng: random.Random) -> Example:
    """A chat about one scene (as slot vectors): several questions, *every* answer supervised.

    One question per sequence gives the LLM a single answer word to learn from; a dialogue of
    3-6 questions about the same slots teaches it to look things up (which object is red, where
    the star is) several times per sequence, at little extra length.
    """
    pairs = tw.qa_pairs(scene, rng)
    rng.shuffle(pairs)
    pairs = pairs[:rng.randint(*QA_TURNS)]
    conv = CONV_VISION.copy()
    conv.append("Human", f"<Img>{IMAGE_PLACEHOLDER}</Img> {pairs[0][0]}")
    conv.append("Assistant", None)
    example = wrapper.build_example(conv.prompt(), " " + pairs[0][1], end_sym=END_SYM[2],
                                    max_txt_len=MAX_TXT_LEN[2])
    for question, answer, _ in pairs[1:]:  # the chat's layout: "...###Human: q###Assistant: a###"
        ask = wrapper.text_ids(f"Human: {question}###Assistant:")
        say = wrapper.text_ids(f" {answer}###")
        example.ids += ask + say
        example.labels += [IGNORE_INDEX] * len(ask) + say
    return example


def llm_examples(wrapper: MiniGPT4, scenes, rng, form_weights=FORM_WEIGHTS,
                 kind_weights=KIND_WEIGHTS) -> list[tuple]:
    """(token layout, scene or None) per scene; the scene is kept where slot vectors are used."""
    items = []
    for scene in scenes:
        form = rng.choices(FORMS, weights=form_weights)[0]
        if form == "qa_chat":
            items.append((qa_dialogue(wrapper, scene, rng), scene))
            continue
        prompt, answer, end_sym, uses_slots = llm_example(scene, rng, form, kind_weights)
        example = wrapper.build_example(prompt, answer, end_sym=end_sym,
                                        max_txt_len=MAX_TXT_LEN[2])
        items.append((example, scene if uses_slots else None))
    return items


def collate_with_slots(wrapper: MiniGPT4, slots: SlotEncoder, items, gen, noise) -> dict:
    """Pad a list of `llm_examples` items and put slot vectors into their image slots.

    The slot vectors are computed here, at the step that uses them, because they are built from
    the embeddings being trained (gradients flow into the word embeddings through them).
    """
    batch = wrapper.collate([example for example, _ in items])
    slot_scenes = [scene for _, scene in items if scene is not None]
    emb = wrapper.llm.get_input_embeddings()
    # no slot scenes: an empty [0, N_SLOTS, d] on the LLM's device, as `embed` needs
    image_embeds = slots(slot_scenes, emb, noise, gen)
    batch["inputs_embeds"] = wrapper.embed(batch["input_ids"], batch["image_mask"], image_embeds)
    return batch


def llm_batch(wrapper: MiniGPT4, slots: SlotEncoder, scenes, rng, gen, noise,
              form_weights=FORM_WEIGHTS, kind_weights=KIND_WEIGHTS):
    """A training batch for the LLM: token sequences, with slot vectors in the image slots."""
    items = llm_examples(wrapper, scenes, rng, form_weights, kind_weights)
    return collate_with_slots(wrapper, slots, items, gen, noise)


def bucketed(items: list, batch: int, rng: random.Random) -> list[list]:
    """Cut `items` into batches of similar length, in random order (length bucketing).

    A random batch of ToyWorld dialogues is padded to its longest member: 48% of the computed
    positions were real tokens. Sorting a pool of 8 batches by length first raises that to 86%
    and halves the cost of a step, with the same sequences seen per step (the default build).
    """
    if len(items) <= batch:  # nothing to bucket: keep the drawn order (`--plain`)
        return [items]
    items = sorted(items, key=lambda item: len(item[0].ids))
    chunks = [items[i:i + batch] for i in range(0, len(items), batch)]
    rng.shuffle(chunks)
    return chunks


def label_tokens(items: list) -> int:
    """Tokens that carry loss in a batch of `llm_examples` items (labels shift by one)."""
    return max(1, sum(sum(label != -100 for label in example.labels[1:])
                      for example, _ in items))


def pool_tokens_per_batch(batches: list[list]) -> float:
    """The mean loss-carrying tokens per batch of a bucketed pool.

    Dividing each batch's summed loss by this (instead of by the batch's own token count) gives
    every token the same weight, as in random batches: otherwise a bucket of short Q&A answers
    (few tokens) would weigh as much as a bucket of long descriptions.
    """
    return sum(label_tokens(b) for b in batches) / len(batches)


def pretrain_llm(cfg: BuildConfig, tokenizer, scenes: list[tw.Scene]):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(cfg.seed)
    llm_cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=cfg.llm_hidden,
                          intermediate_size=cfg.llm_mlp, num_hidden_layers=cfg.llm_layers,
                          num_attention_heads=cfg.llm_heads, max_position_embeddings=512,
                          bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    llm = LlamaForCausalLM(llm_cfg).to(cfg.device)
    wrapper = _wrapper(llm, tokenizer)
    llm.requires_grad_(True)  # the wrapper freezes its LLM; here we are pretraining it
    slots = SlotEncoder(tokenizer)
    opt = torch.optim.AdamW(llm.parameters(), lr=cfg.llm_lr, weight_decay=0.01)
    rng, gen = random.Random(cfg.seed), torch.Generator().manual_seed(cfg.seed)
    total = cfg.steps(cfg.llm_steps)
    llm.train()
    if cfg.llm_attention == "eager_fp32":  # ours: transformers must know it before it is set
        _register_eager_fp32()
    llm.set_attn_implementation(cfg.llm_attention)  # see `BuildConfig.llm_attention`
    undo = compile_llm(llm) if cfg.compile else None
    bar = tqdm(range(total), desc="LLM (text only)")
    queue: list[list] = []
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, total, cfg.llm_lr, max(1, total // 12), cfg.llm_lr / 20)
        if not queue:  # draw the next `llm_bucket_pool` batches at once, bucketed by length
            pool = [scene for _ in range(cfg.llm_bucket_pool)
                    for scene in rng.sample(scenes, cfg.llm_batch)]
            queue = bucketed(llm_examples(wrapper, pool, rng, cfg.form_weights,
                                          cfg.kind_weights), cfg.llm_batch, rng)
            per_batch = pool_tokens_per_batch(queue)
        items = queue.pop()
        batch = collate_with_slots(wrapper, slots, items, gen, cfg.slot_noise)
        with _autocast(cfg.device):
            loss = llm(inputs_embeds=batch["inputs_embeds"],
                       attention_mask=batch["attention_mask"].to(cfg.device),
                       labels=batch["labels"].to(cfg.device)).loss
        value = _finite(loss, step, "LLM")
        # the batch's summed loss over the pool's mean tokens per batch (1 without bucketing);
        # scaled here, outside the compiled forward, which would recompile for each new factor
        weight = label_tokens(items) / per_batch if cfg.llm_bucket_pool > 1 else 1.0
        opt.zero_grad(set_to_none=True)
        (loss * weight).backward()
        torch.nn.utils.clip_grad_norm_(llm.parameters(), 1.0)
        opt.step()
        bar.set_postfix(loss=f"{value:.3f}")
    if undo is not None:
        undo()
    llm.set_attn_implementation("sdpa")  # the default for everyone who loads it later
    return llm.eval()


def _finite(loss: torch.Tensor, step: int, part: str) -> float:
    """The loss as a float; a NaN/inf one stops the build before that part is saved.

    Seen once on a GPU (bf16 autocast, the LLM of seed 1): the loss became NaN and, unchecked, the
    build saved a NaN model whose every answer was empty.
    """
    value = loss.item()
    if not math.isfinite(value):
        raise TrainingError(f"The {part} pretraining loss became {value} at step {step}; the "
                            "build stopped and did not save this part. Try another --seed, or "
                            "--device cpu (the recipe the shipped assets were built with).")
    return value


def eager_fp32_attention(module, query, key, value, attention_mask, scaling, dropout=0.0,
                         **kwargs):
    """transformers' eager attention with its scores and softmax in float32.

    Under the build's bf16 autocast the plain eager form rounds the attention scores to bf16
    before the softmax (SDPA keeps them in float32); this one does not. Compiled, it still fuses
    into the graph, which is what makes it faster than SDPA here (see `BuildConfig.llm_attention`).
    """
    from transformers.models.llama.modeling_llama import repeat_kv

    with torch.autocast(query.device.type, enabled=False):
        k = repeat_kv(key, module.num_key_value_groups).float()
        v = repeat_kv(value, module.num_key_value_groups).float()
        scores = torch.matmul(query.float(), k.transpose(2, 3)) * scaling
        if attention_mask is not None:
            scores = scores + attention_mask
        weights = scores.softmax(dim=-1)
        out = torch.matmul(weights, v)
    return out.transpose(1, 2).contiguous().to(query.dtype), weights


def _register_eager_fp32() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register("eager_fp32", eager_fp32_attention)
    AttentionMaskInterface.register("eager_fp32", eager_mask)


def _wrapper(llm, tokenizer) -> MiniGPT4:
    """A MiniGPT4 around the LLM, used only for its sequence builder (visual parts unused)."""
    cfg = MiniGPT4Config(vision=TINY_VISION, qformer=TINY_QFORMER)
    return MiniGPT4(cfg, llm, tokenizer)


def _autocast(device: str):
    # bf16 autocast was 1.2-1.4x faster than float32 on this kind of CPU (prototype measurement)
    return torch.autocast(device_type="cuda" if device.startswith("cuda") else "cpu",
                          dtype=torch.bfloat16)


@torch.no_grad()
def llm_heldout_metrics(llm, tokenizer, scenes: list[tw.Scene], seed: int) -> dict:
    """Held-out perplexity, and colour-question accuracy with the scene in words or as slots."""
    from .evaluate import answer_correct  # evaluate imports this module's SlotEncoder

    wrapper = _wrapper(llm, tokenizer)
    slots = SlotEncoder(tokenizer)
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    losses = []
    for i in range(0, len(scenes), 50):
        # always the single-turn mix of `--plain`, so that perplexities of all builds compare
        batch = llm_batch(wrapper, slots, scenes[i:i + 50], rng, gen, 0.0, PLAIN["form_weights"],
                          PLAIN["kind_weights"])
        out = llm(inputs_embeds=batch["inputs_embeds"].float(),
                  attention_mask=batch["attention_mask"].to(llm.device),
                  labels=batch["labels"].to(llm.device))
        losses.append(out.loss.item())
    # "strict": `evaluate.answer_correct` (the first value named; the exact cell); reports of builds
    # before 2026-11-29 lack this key: their Q&A figures counted the key anywhere in the answer
    result = {"heldout_perplexity": math.exp(float(np.mean(losses))), "qa_scoring": "strict"}
    for form in ("words", "slots"):
        prompts, keys, slot_scenes = [], [], []
        for scene in scenes:
            colour_qs = [(q, k) for q, _, k in tw.qa_pairs(scene, rng) if q.startswith("What col")]
            if not colour_qs:
                continue
            q, k = colour_qs[0]
            content = tw.scene_in_words(scene) if form == "words" else IMAGE_PLACEHOLDER
            prompts.append(PROMPT_TEMPLATE.format(f"<Img>{content}</Img> {q}"))
            keys.append(k)
            slot_scenes.append(scene)
        answers = _greedy(wrapper, slots, prompts, slot_scenes if form == "slots" else None)
        correct = [answer_correct(a, k) for a, k in zip(answers, keys)]
        result[f"colour_qa_accuracy_{form}"] = float(np.mean(correct))
        result[f"qa_accuracy_{form}"] = qa_by_kind(wrapper, slots, scenes, form, seed)
    return result


def qa_by_kind(wrapper: MiniGPT4, slots: SlotEncoder, scenes, form: str, seed: int) -> dict:
    """Greedy Q&A accuracy per kind (colour, count, position, existence), the demo's questions."""
    from .evaluate import answer_correct, qa_items

    items = qa_items(scenes, seed)
    prompts = [PROMPT_TEMPLATE.format(
        f"<Img>{tw.scene_in_words(s) if form == 'words' else IMAGE_PLACEHOLDER}</Img> {q}")
        for s, (q, _, _) in zip(scenes, items)]
    answers = _greedy(wrapper, slots, prompts, scenes[:len(items)] if form == "slots" else None)
    by_kind: dict[str, list[bool]] = {}
    for answer, (_, key, kind) in zip(answers, items):
        by_kind.setdefault(kind, []).append(answer_correct(answer, key))
    return {kind: round(float(np.mean(hits)), 4) for kind, hits in sorted(by_kind.items())}


def _greedy(wrapper: MiniGPT4, slots: SlotEncoder, prompts, scenes, max_new_tokens=24):
    """Greedy answers to prompts (with slot vectors for `scenes`), cut at `###`."""
    batch = wrapper.collate([wrapper.build_example(p) for p in prompts], padding_side="left")
    emb = wrapper.llm.get_input_embeddings()
    image_embeds = slots(scenes or [], emb, 0.0)  # empty for prompts without slots
    embeds = wrapper.embed(batch["input_ids"], batch["image_mask"], image_embeds)
    out = wrapper.llm.generate(inputs_embeds=embeds,
                               attention_mask=batch["attention_mask"].to(embeds.device),
                               max_new_tokens=max_new_tokens, do_sample=False,
                               pad_token_id=wrapper.tokenizer.pad_token_id)
    texts = wrapper.tokenizer.batch_decode(out, skip_special_tokens=True)
    return [t.split("###")[0].strip() for t in texts]


# --- 4. the ViT + Q-Former ---------------------------------------------------------------------
def render_batch(scenes: list[tw.Scene]) -> torch.Tensor:
    """Rendered, CLIP-normalised images [B, 3, S, S] (the eval transform at the native size)."""
    arr = np.stack([np.asarray(tw.render(s, TINY_VISION.image_size)) for s in scenes])
    x = torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 255.0
    return (x - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(CLIP_STD)[:, None, None]


def cell_targets(scenes: list[tw.Scene]) -> dict[str, torch.Tensor]:
    """Per-cell class targets: 0 = empty, else 1 + index of the shape / colour / size."""
    n_cells = tw.GRID * tw.GRID
    t = {k: torch.zeros(len(scenes), n_cells, dtype=torch.long)
         for k in ("shape", "colour", "size")}
    for b, scene in enumerate(scenes):
        for obj in scene.objects:
            t["shape"][b, obj.cell] = 1 + tw.SHAPES.index(obj.shape)
            t["colour"][b, obj.cell] = 1 + tw.COLOURS.index(obj.colour)
            t["size"][b, obj.cell] = 1 + tw.SIZES.index(obj.size)
    t["background"] = torch.tensor([tw.BACKGROUNDS.index(s.background) for s in scenes])
    t["words"] = slot_word_counts(scenes)  # what each query's slot says in words (10 slots)
    return t


class GroundedHeads(nn.Module):
    """The pretraining heads (thrown away after the build).

    Query i (i < 9) predicts grid cell i's shape, colour and size (0 = empty), query 9 the
    background. An auxiliary dense objective on the ViT's patch tokens (each patch predicts its own
    cell's content and which cell it lies in) gives the ViT local, position-aware features first,
    as CLIP pretraining does for BLIP-2's ViT; without it the queries take far longer to find
    their cells.

    With `words_weight > 0`, every query's output must also give, through one shared linear
    layer, the bag of words of its slot (`slot_word_counts`: the cell's position words and its
    size, colour and shape, or "empty"; the background's words for query 9), by least squares.
    The cross-entropy heads make the attributes linearly *separable*; this makes the words
    linearly *readable*, so that some linear projection maps the query outputs onto any LLM's slot
    vectors (sums of word embeddings) almost exactly: R^2 0.93 -> 0.999 for the shipped LLM. It is
    our miniature of BLIP-2's second stage, which trained the Q-Former until one fully-connected
    layer could hand its outputs to a frozen LLM (Li et al. 2023, Sec. 3.3; MiniGPT-4 Sec. 3).
    The words are words, not any LLM's embeddings: the ViT + Q-Former never see the LLM.
    """

    def __init__(self, hidden: int, vit_width: int, words_weight: float = 0.0):
        super().__init__()
        self.words_weight = words_weight
        self.heads = nn.ModuleDict({k: nn.Linear(hidden, 1 + n) for k, n in self.SIZES.items()})
        self.background = nn.Linear(hidden, len(tw.BACKGROUNDS))
        self.patch = nn.ModuleDict({k: nn.Linear(vit_width, 1 + n) for k, n in self.SIZES.items()})
        self.patch_cell = nn.Linear(vit_width, tw.GRID * tw.GRID)
        grid = TINY_VISION.image_size // TINY_VISION.patch_size  # patches per side
        cell_of_patch = [(r * tw.GRID // grid) * tw.GRID + c * tw.GRID // grid
                         for r in range(grid) for c in range(grid)]
        self.register_buffer("cell_of_patch", torch.tensor(cell_of_patch), persistent=False)
        if words_weight > 0:  # created last: the other heads start as in builds without it
            self.words = nn.Linear(hidden, len(slot_vocabulary()))

    SIZES = {"shape": len(tw.SHAPES), "colour": len(tw.COLOURS), "size": len(tw.SIZES)}

    def loss(self, patches: torch.Tensor, queries: torch.Tensor, t: dict) -> torch.Tensor:
        cells = queries[:, :9]
        loss = F.cross_entropy(self.background(queries[:, 9]), t["background"])
        for k in self.SIZES:
            loss = loss + F.cross_entropy(self.heads[k](cells).flatten(0, 1), t[k].flatten())
            patch_target = t[k][:, self.cell_of_patch]  # each patch: its cell's attribute
            loss = loss + F.cross_entropy(self.patch[k](patches).flatten(0, 1),
                                          patch_target.flatten())
        where = self.cell_of_patch.expand(patches.shape[0], -1)
        loss = loss + F.cross_entropy(self.patch_cell(patches).flatten(0, 1), where.flatten())
        if self.words_weight > 0:  # squared error summed over the words, averaged over queries
            error = self.words(queries) - t["words"]
            loss = loss + self.words_weight * error.pow(2).sum(-1).mean()
        return loss


def pretrain_vision(cfg: BuildConfig, scenes: list[tw.Scene]):
    torch.manual_seed(cfg.seed + 1)
    vit, qformer = VisionTransformer(TINY_VISION), QFormer(TINY_QFORMER, TINY_VISION.width)
    for module in (vit, qformer):  # BERT/ViT-style init (the zeros of __init__ are placeholders)
        for name, p in module.named_parameters():
            if p.dim() > 1 or name in ("cls_token", "pos_embed", "query_tokens"):
                nn.init.trunc_normal_(p, std=0.02)
    heads = GroundedHeads(TINY_QFORMER.hidden, TINY_VISION.width, cfg.vision_words_weight)
    params = [*vit.parameters(), *qformer.parameters(), *heads.parameters()]
    for m in (vit, qformer, heads):
        m.to(cfg.device).train()
    opt = torch.optim.AdamW(params, lr=cfg.vision_lr, weight_decay=0.05)
    images = render_batch(scenes)  # rendered once: the vision pretraining reuses them
    targets = cell_targets(scenes)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    total = cfg.steps(cfg.vision_steps)

    def step_loss(x, t):
        if cfg.vision_attention == "explicit":  # the maps' code path, maps unused: see BuildConfig
            tokens = vit(x, return_attentions=True)[0]
            queries = qformer(tokens, return_attentions=True)[0]
        else:
            tokens = vit(x)
            queries = qformer(tokens)
        return heads.loss(tokens[:, 1:].float(), queries.float(), t)

    if cfg.vision_compile:  # fixed shapes: one static graph for the whole run
        step_loss = compile_with_fallback(step_loss, dynamic=False)
    bar = tqdm(range(total), desc="ViT + Q-Former (grounded)")
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, total, cfg.vision_lr, max(1, total // 15),
                                    cfg.vision_lr / 20)
        idx = torch.randint(len(scenes), (cfg.vision_batch,), generator=gen)
        with _autocast(cfg.device):
            loss = step_loss(images[idx].to(cfg.device),
                             {k: v[idx].to(cfg.device) for k, v in targets.items()})
        value = _finite(loss, step, "ViT + Q-Former")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{value:.3f}")
    return vit.eval(), qformer.eval()


@torch.no_grad()
def query_features(vit, qformer, scenes, batch: int = 256) -> torch.Tensor:
    device = vit.patch_embed.weight.device
    return torch.cat([qformer(vit(render_batch(scenes[i:i + batch]).to(device))).float().cpu()
                      for i in range(0, len(scenes), batch)])


def probe_accuracy(vit, qformer, train: list[tw.Scene], heldout: list[tw.Scene],
                   steps: int = 300) -> dict:
    """Linear probes on the frozen query outputs: each object's shape, colour and position.

    One linear classifier per attribute, shared by the 9 cell queries, trained on `train` scenes
    and measured on `heldout` ones: shape/colour accuracy over held-out objects (read from the
    query of the object's cell), position accuracy = occupied-vs-empty right for every cell;
    cell accuracy = which cell a query stands for, read from that one query's output (what a
    shared linear projection needs to put the position words into each visual token).
    """
    f_tr, f_ho = query_features(vit, qformer, train), query_features(vit, qformer, heldout)
    t_tr, t_ho = cell_targets(train), cell_targets(heldout)
    for t in (t_tr, t_ho):  # class c + 1 for cell c: 0 stays "no class"
        t["cell"] = torch.arange(1, 10).expand(len(t["background"]), -1)
    result = {}
    for attr, n_cls in (("shape", 1 + len(tw.SHAPES)), ("colour", 1 + len(tw.COLOURS)),
                        ("cell", 10)):
        probe = nn.Linear(f_tr.shape[-1], n_cls)
        opt = torch.optim.Adam(probe.parameters(), lr=1e-2)
        x, y = f_tr[:, :9].flatten(0, 1), t_tr[attr].flatten()
        for _ in range(steps):
            opt.zero_grad()
            F.cross_entropy(probe(x), y).backward()
            opt.step()
        pred, gold = probe(f_ho[:, :9]).argmax(-1), t_ho[attr]
        occupied = gold > 0
        result[f"{attr}_accuracy"] = float((pred[occupied] == gold[occupied]).float().mean())
        if attr == "shape":  # position: the probe finds an object exactly where there is one
            result["position_accuracy"] = float(((pred > 0) == occupied).float().mean())
    return {k: round(v, 4) for k, v in result.items()}


@torch.no_grad()
def linear_readout_r2(model, train: list[tw.Scene], heldout: list[tw.Scene]) -> float:
    """How well *some* linear projection can turn query outputs into the LLM's slot vectors.

    Fits the least-squares linear map (with bias, shared by the 10 queries) from the frozen
    query outputs of `train` scenes to their exact slot vectors (`SlotEncoder`, no noise), and
    returns its R^2 on `heldout` scenes: 1.0 means the projection that stage 1 looks for exists
    and hands the LLM exactly what it read in pretraining.
    """
    from .evaluate import scene_features

    slots, emb = SlotEncoder(model.tokenizer), model.llm.get_input_embeddings()

    def design(scenes):  # rows: one query output (+ a 1 for the bias) -> its exact slot vector
        f = scene_features(model, scenes).float().flatten(0, 1).cpu()
        target = slots(scenes, emb, 0.0).float().flatten(0, 1).cpu()
        return torch.cat([f, torch.ones(len(f), 1)], 1), target

    (x, y), (x_ho, y_ho) = design(train), design(heldout)
    w = torch.linalg.solve(x.T @ x + 1e-3 * torch.eye(x.shape[1]), x.T @ y)
    residual = (x_ho @ w - y_ho).pow(2).sum()
    return round(float(1 - residual / (y_ho - y_ho.mean(0)).pow(2).sum()), 4)


# --- saving -----------------------------------------------------------------------------------
def save_vision_qformer(vit, qformer, folder: Path) -> None:
    """Save in the HF BLIP-2 layout (`vision_model.*`, `qformer.*`, `query_tokens`)."""
    state = {}
    for module, key_map in ((vit, hf_vision_keys(TINY_VISION)), (qformer,
                                                                 hf_qformer_keys(TINY_QFORMER))):
        own = module.state_dict()
        state.update({theirs: own[ours].float() for ours, theirs in key_map.items()})
    atomic_save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    v, q = TINY_VISION, TINY_QFORMER
    config = {
        "model_type": "blip-2", "architectures": ["Blip2ForConditionalGeneration"],
        "num_query_tokens": q.num_query_tokens,
        "vision_config": {"hidden_size": v.width, "intermediate_size": v.mlp,
                          "num_hidden_layers": v.layers, "num_attention_heads": v.heads,
                          "image_size": v.image_size, "patch_size": v.patch_size,
                          "layer_norm_eps": v.layer_norm_eps, "qkv_bias": True},
        "qformer_config": {"hidden_size": q.hidden, "num_hidden_layers": q.layers,
                           "num_attention_heads": q.heads, "intermediate_size": q.mlp,
                           "cross_attention_frequency": q.cross_attention_every,
                           "encoder_hidden_size": v.width, "layer_norm_eps": q.layer_norm_eps},
        "note": "ToyWorld ViT + Q-Former of minigpt4-lite; no language model is included.",
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def save_samples(folder: Path, n: int = 8) -> None:
    """A few held-out scenes as PNG files (with their ground truth) for notebooks and the chat."""
    folder.mkdir(parents=True, exist_ok=True)
    truth = {}
    for scene in tw.make_scenes("heldout", n, start=100000):
        name = f"scene_{scene.seed}.png"
        tw.render(scene, 240).save(folder / name)  # 4x the model's size: nicer to look at
        truth[name] = tw.scene_in_words(scene)
    (folder / "ground_truth.json").write_text(json.dumps(truth, indent=2) + "\n")


def build(out: str | Path, cfg: BuildConfig | None = None,
          parts: tuple[str, ...] = ("llm", "vision")) -> dict:
    """Build the assets into `out`; returns the measured figures (also in `build_report.json`).

    `parts` rebuilds only some of them (the others are read from `out`, e.g. to retrain the
    ViT + Q-Former alone); the figures of the parts not rebuilt are kept from the last report.
    """
    from transformers import AutoTokenizer, LlamaForCausalLM

    if not parts or set(parts) - {"llm", "vision"}:
        raise ValueError(f"parts must be 'llm', 'vision' or both, not {parts!r}")
    cfg = cfg or BuildConfig()
    for name, allowed in (("llm_attention", LLM_ATTENTIONS), ("vision_attention",
                                                               VISION_ATTENTIONS)):
        if getattr(cfg, name) not in allowed:
            raise ValueError(f"{name} must be one of {', '.join(allowed)}, "
                             f"not {getattr(cfg, name)!r}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    n_scenes = max(64, int(cfg.n_train_scenes * min(1.0, cfg.steps_scale * 4)))
    train = tw.make_scenes("train", n_scenes)
    heldout = tw.make_scenes("heldout", 300 if cfg.steps_scale >= 0.5 else 40)
    old = out / "build_report.json"
    report: dict = json.loads(old.read_text()) if old.exists() and set(parts) != {
        "llm", "vision"} else {}
    report["build_config"] = asdict(cfg)
    seconds = report.setdefault("seconds", {})
    # the ViT + Q-Former first: run after the compiled LLM, its explicit-attention variant trained
    # 1.7x slower per step here (0.20 s instead of 0.12 s; why is not understood). The two parts
    # are seeded separately, so the order changes no weight.
    if "vision" in parts:
        t2 = time.time()
        vit, qformer = pretrain_vision(cfg, train)
        (out / "vision_qformer").mkdir(exist_ok=True)
        save_vision_qformer(vit.float(), qformer.float(), out / "vision_qformer")
        seconds["vision_qformer"] = round(time.time() - t2, 1)
        report["vision_qformer"] = {
            "params": sum(p.numel() for m in (vit, qformer) for p in m.parameters()),
            **probe_accuracy(vit, qformer, train[:2000], heldout)}
        save_samples(out / "samples")
    if "llm" in parts:
        t1 = time.time()
        tokenizer = build_tokenizer(corpus(train[:4000], random.Random(cfg.seed)),
                                    cfg.vocab_size)
        tokenizer.save_pretrained(out / "llm")
        llm = pretrain_llm(cfg, tokenizer, train)
        llm.save_pretrained(out / "llm")
        seconds["llm"] = round(time.time() - t1, 1)
    else:
        tokenizer = AutoTokenizer.from_pretrained(out / "llm")
        llm = LlamaForCausalLM.from_pretrained(out / "llm").eval()
    if "llm" in parts or "llm" not in report:
        report["llm"] = {"params": sum(p.numel() for p in llm.parameters()),
                         **llm_heldout_metrics(llm, tokenizer, heldout, cfg.seed)}
    both = load_model(preset("tiny", llm=str(out / "llm"),
                             vision_qformer=str(out / "vision_qformer")), projection="")
    report["linear_readout_r2"] = linear_readout_r2(both, train[:2000], heldout)
    seconds["total"] = round(sum(v for k, v in seconds.items() if k != "total"), 1)
    report["seconds_total"] = seconds["total"]
    # the parts above exclude the quality checks (perplexity, Q&A, probes) and the samples; the
    # whole command's time only means something when it built everything
    report.pop("seconds_wall", None)
    if set(parts) == {"llm", "vision"}:
        report["seconds_wall"] = round(time.time() - t0, 1)
    report["machine"] = (f"{platform.machine()} CPU, {os.cpu_count()} cores, "
                         f"torch {torch.__version__}")
    report["vocab"] = len(tokenizer)
    report["sha256"] = {str(p.relative_to(out)): sha256(p) for p in sorted(out.rglob("*"))
                        if p.is_file() and p.name not in ("README.md", "build_report.json")
                        and "projections" not in p.parts}
    (out / "build_report.json").write_text(json.dumps(report, indent=2) + "\n")
    write_model_card(out, report)
    log.info("assets built in %.0f s", seconds["total"])
    return report


# --- the model card (assets/README.md) -----------------------------------------------------------
# Every figure the card states is read from `build_report.json` (what the build measured), from
# the shipped files themselves (parameter counts, sizes, hashes, `projections/metrics.json`) or
# from the configs next to the weights. Sentences that are not measured by the build are printed
# under a label that says so. `write_model_card(folder)` re-renders the card from the files in
# `folder` without rebuilding anything; a test checks that the shipped card is up to date.
CARD_EXCLUDED = ("README.md",)  # the card does not list itself

# Figures of builds shipped before the current recipe, measured when they were current
# (2026-11-27) and recorded here by hand: a rebuild does not re-measure them.
EARLIER_WORDS_FIGURES = (
    "Without the words objective (the assets shipped before 2026-11-27) the same least-squares "
    "fit reached R^2 0.93; with the LLM shipped then, the demo's stage 2 failed 11.5% of "
    "detailed descriptions without the objective and 8.0% with it, and answered 24% and 72% of "
    "position questions, scored leniently as then (docs/asset_history.md).")
PROTOTYPE_NOTE = (
    "a prototype found that an LLM this small, pretrained on words only, could not be taught to "
    "read arbitrary soft tokens through one linear layer (object recall 0.02-0.07, although the "
    "visual features held the scene). Vicuna-13B can read such tokens, and BLIP-2's Q-Former had "
    "already been trained to talk to a frozen LLM; our tiny LLM gets the equivalent skill from "
    "the slot vectors. It never saw a pixel: the projection must still learn to map what the "
    "Q-Former sees onto what the LLM can read.")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def safetensors_params(path: Path) -> int:
    """The number of values stored in a safetensors file (read from its header, no tensors)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())


def shipped_files(folder: Path) -> list[Path]:
    """Every file of the assets folder that the card lists, in a stable order."""
    return sorted(p for p in folder.rglob("*")
                  if p.is_file() and p.name not in CARD_EXCLUDED and "__pycache__" not in p.parts)


def _seconds(report: dict) -> str:
    parts = {k: v for k, v in report.get("seconds", {}).items() if k != "total"}
    return ", ".join(f"{k}: {v:.0f} s" for k, v in parts.items()) or "one run"


def _build_time(report: dict) -> str:
    """The whole command's time where one run built everything, else the sum of the parts."""
    wall = report.get("seconds_wall")
    if wall:
        return (f"{wall:,.0f} s for the whole command, quality checks included "
                f"({report['seconds_total']:,.0f} s of training)")
    return f"{report['seconds_total']:,.0f} s"


def _recorded(text: str | None, label: str) -> str:
    return f"\n- *{label}:* {text}" if text else ""


def _fast_note(b: dict) -> str:
    pool = b.get("llm_bucket_pool", 1)
    return ((f", length-bucketed batches (pools of {pool})" if pool > 1 else "")
            + (", torch.compile" if b.get("compile") else "")
            + (f", {b['llm_attention']} attention" if b.get("llm_attention", "sdpa") != "sdpa"
               else ""))


def _slot_caption_note(b: dict) -> str:
    weights = b.get("form_weights", FORM_WEIGHTS)
    i = FORMS.index("slot_caption")  # reports from before it existed have fewer weights
    if len(weights) <= i or not weights[i]:
        return ""
    return ("\n  The last form is stage 1's own layout (`[BOS] [slots] caption\\n`, no prompt),"
            " like BLIP-2's\n  second stage, which trained its Q-Former's outputs to be"
            " captioned by a frozen LLM.")


def _scoring_note(llm: dict) -> str:
    """Q&A figures of builds before strict scoring counted the key anywhere in the answer."""
    if llm.get("qa_scoring") == "strict":
        return ""
    return ("- *The Q&A figures below were scored leniently when this LLM was built (the answer "
            "key anywhere in the answer as whole words, so \"bottom center\" counted for "
            "\"center\"); the strict figures of the same LLM (`evaluate.slot_ceiling`) are in "
            "BENCHMARKS.md, section \"The demo over N seeds\".*\n")


def _by_kind(acc: dict) -> str:
    return ", ".join(f"{kind} {value:.0%}" for kind, value in acc.items()) or "not measured"


def _words_note(b: dict, report: dict) -> str:
    if not b.get("vision_words_weight", 0):
        return ""
    r2 = report.get("linear_readout_r2")
    fit = (f" The least-squares linear map from the query outputs to the LLM's exact slot vectors "
           f"reaches R^2 **{r2:.4f}** on held-out scenes (`linear_readout_r2`).") if r2 else ""
    return f"""
- A second objective (weight {b['vision_words_weight']}): through one shared linear layer, each
  query's output must give, by least squares, the bag of *words* of its slot (the cell's position
  words and size, colour, shape or "empty"; the background's words for the last query). The
  Q-Former never sees the LLM; the objective makes its outputs linearly *readable* as words, as
  BLIP-2's second stage made its Q-Former readable by a frozen LLM through one fully-connected
  layer.{fit}{_recorded(EARLIER_WORDS_FIGURES, "Recorded from earlier builds, not re-measured")}"""


def _vision_architecture(cfg: dict) -> str:
    v, q = cfg["vision_config"], cfg["qformer_config"]
    side = v["image_size"] // v["patch_size"]
    cross = [str(i) for i in range(0, q["num_hidden_layers"], q["cross_attention_frequency"])]
    return (f"ViT: {v['image_size']}x{v['image_size']} images, patch {v['patch_size']} "
            f"({side * side} patches + CLS), width {v['hidden_size']},\n  "
            f"{v['num_hidden_layers']} layers, {v['num_attention_heads']} heads; then "
            f"`ln_vision`. Q-Former: width {q['hidden_size']}, {q['num_hidden_layers']} layers, "
            f"cross-attention in layers\n  {' and '.join(cross)}, "
            f"{cfg['num_query_tokens']} learned queries")


def _samples_section(folder: Path) -> str:
    truth_file = folder / "samples" / "ground_truth.json"
    if not truth_file.exists():
        return "Not built."
    from PIL import Image

    names = list(json.loads(truth_file.read_text()))
    sizes = set()
    for name in names:
        with Image.open(folder / "samples" / name) as im:
            sizes.add(f"{im.width}x{im.height}")
    return (f"{len(names)} held-out ToyWorld scenes rendered at {', '.join(sorted(sizes))} px "
            "(the model reads them resized to its own image size), with their ground truth in\n"
            "`ground_truth.json`.")


def _projections_section(folder: Path) -> str:
    proj = folder / "projections"
    metrics_file = proj / "metrics.json"
    if not metrics_file.exists():
        return "Not trained yet: `python -m minigpt4_lite demo --out assets/projections`."
    m = json.loads(metrics_file.read_text())
    params = {stage: safetensors_params(proj / stage / "projection.safetensors")
              for stage in ("stage1", "stage2") if (proj / stage / "projection.safetensors")
              .exists()}
    s = m["seconds"]

    def figures(r: dict) -> str:
        d = r["detailed"]
        qa = f", Q&A accuracy {r['qa']['accuracy']:.1%}" if "qa" in r else ""
        return (f"detailed descriptions fail {d['failure_rate']:.1%} (object recall "
                f"{d['object_recall']:.3f}, hallucination {d['hallucination_rate']:.3f}), "
                f"caption recall {r['caption']['object_recall']:.3f}{qa}")

    counts = ", ".join(f"{stage}: {n:,}" for stage, n in params.items())
    return f"""The reference projections trained by `python -m minigpt4_lite demo --out
assets/projections`, so that any notebook can start from any chapter. Each `stageN/` holds
`projection.safetensors` (the trained `llama_proj`, values per stage: {counts}),
`checkpoint.safetensors` (the same tensors with the AdamW state, the random states and the
training history, for resuming) and `config.json`. From `metrics.json` ({m['n_eval']}
held-out scenes, seed {m['seed']}, {m.get('device', 'cpu')}; trained in {s['stage1']:.0f} s +
{s['stage2']:.0f} s, {s['total']:.0f} s with the evaluation):
- stage 1 only: {figures(m['stage1'])};
- stage 1 + stage 2: {figures(m['stage2'])}."""


def render_model_card(folder: str | Path, report: dict | None = None) -> str:
    """The text of `folder/README.md`: how each asset was built, its measured figures, and every
    shipped file with its size and sha256. Reads `folder/build_report.json` unless `report` is
    given, and the shipped files themselves; nothing is rebuilt or re-measured."""
    folder = Path(folder)
    if report is None:
        report = json.loads((folder / "build_report.json").read_text())
    b, llm, vq = report["build_config"], report["llm"], report["vision_qformer"]
    llm_cfg = json.loads((folder / "llm" / "config.json").read_text())
    vq_cfg = json.loads((folder / "vision_qformer" / "config.json").read_text())
    llm_params = safetensors_params(folder / "llm" / "model.safetensors")
    vq_params = safetensors_params(folder / "vision_qformer" / "model.safetensors")
    n_queries = vq_cfg["num_query_tokens"]
    time_note = _recorded(report.get("time_note"), "Note recorded with this build")
    plain_note = _recorded(report.get("plain_note"), "Recorded by hand when this LLM replaced "
                           "the previous one, not re-measured by a rebuild")
    files = "\n".join(f"| `{p.relative_to(folder).as_posix()}` | {p.stat().st_size:,} | "
                      f"`{sha256(p)}` |" for p in shipped_files(folder))
    return _reflow(f"""# assets/: the tiny pretrained, frozen backbones of ToyWorld

Built by `python -m minigpt4_lite build-assets --out assets` (`minigpt4_lite/build_assets.py`),
deterministic for seed {b['seed']}; measured build time {_build_time(report)} on
{report.get('machine', 'this machine')} ({_seconds(report)}).{time_note}

Everything here is loaded by `preset("tiny")` offline. This card is rendered from
`build_report.json`, the configs and the files themselves (`build_assets.write_model_card`).

## `llm/`: the tiny "Vicuna" (a `LlamaForCausalLM` + a byte-level BPE fast tokenizer)
- {llm_params:,} parameters (counted in `llm/model.safetensors`): {llm_cfg['num_hidden_layers']}
  layers x {llm_cfg['hidden_size']} wide, {llm_cfg['num_attention_heads']} heads, MLP
  {llm_cfg['intermediate_size']}, vocabulary {llm_cfg['vocab_size']}, context
  {llm_cfg['max_position_embeddings']} (`llm/config.json`).
- Pretrained on text only, {b['llm_steps']} steps x {b['llm_batch']} sequences, AdamW
  (peak lr {b['llm_lr']}, warmup + cosine), bf16 autocast{_fast_note(b)}: ToyWorld captions, and
  `###Human: ... ###Assistant: ...` dialogues (stage-2 template and the chat template) in every
  register (detailed descriptions, Q&A, poems, stories, captions), with the scene given in words,
  or as *slot vectors*: one input vector per grid cell, the sum of that cell's word embeddings
  (position, size, colour, shape or "empty") plus one for the background, plus Gaussian noise
  ({b['slot_noise']} x the embedding std). Shares of the forms (caption text, scene in words, slot
  vectors in the stage-2 template, in the chat template, multi-turn Q&A chats with every answer
  supervised, slot vectors followed directly by a caption):
  {', '.join(map(str, b.get('form_weights', FORM_WEIGHTS)))}. Shares of the registers (detailed
  description, Q&A, poem, story, caption) where a form draws one:
  {', '.join(map(str, b.get('kind_weights', PLAIN['kind_weights'])))}.{_slot_caption_note(b)}
- *Why the slot vectors (commentary; the prototype's figure is recorded, not re-measured):*
  {PROTOTYPE_NOTE} Scale buys this skill for free; at {llm_params / 1e6:.1f} M parameters it
  must be taught.
- Held-out perplexity (ToyWorld text, the single-turn forms): **{llm['heldout_perplexity']:.3f}**.
{_scoring_note(llm)}- Colour questions on held-out scenes, greedy:
  **{llm['colour_qa_accuracy_words']:.1%}** correct
  with the scene in words, **{llm['colour_qa_accuracy_slots']:.1%}** with exact slot vectors.
- The demo's questions (one per held-out scene, cycling colour / count / position / existence),
  greedy, with exact slot vectors: {_by_kind(llm.get('qa_accuracy_slots', {}))}; with the scene
  in words: {_by_kind(llm.get('qa_accuracy_words', {}))}.{plain_note}

## `vision_qformer/`: the tiny "BLIP-2" ViT + Q-Former (HF BLIP-2 layout)
- {vq_params:,} parameters (counted in `vision_qformer/model.safetensors`).
  {_vision_architecture(vq_cfg)} (`vision_qformer/config.json`).
- Pretrained for {b['vision_steps']} steps x {b['vision_batch']} rendered scenes (bf16 autocast,
  {b.get('vision_attention', 'sdpa')} attention) with a grounded
  representation objective in the spirit of BLIP-2's first stage: query i (i < {n_queries - 1})
  must predict grid cell i's shape, colour and size (or "empty") and query {n_queries - 1} the
  background, through linear heads shared by the queries and then discarded.{_words_note(b, report)}
- Linear probes on the frozen query outputs, held-out scenes: shape accuracy
  **{vq['shape_accuracy']:.4f}**, colour accuracy **{vq['colour_accuracy']:.4f}**, position
  (object present exactly where it is) **{vq['position_accuracy']:.4f}**{_cell_probe(vq)}.

## `samples/`
{_samples_section(folder)}

## `projections/`
{_projections_section(folder)}

## Files
Every shipped file (this card aside) with its size in bytes and its sha256, computed from the
files when the card was rendered.

| file | bytes | sha256 |
|---|---|---|
{files}
""")


def _cell_probe(vq: dict) -> str:
    return (f", the cell a query stands for (from that query alone) **{vq['cell_accuracy']:.4f}**"
            if "cell_accuracy" in vq else "")


def _reflow(text: str, width: int = 100) -> str:
    """Re-wrap the card's paragraphs and bullets to `width` columns (tables and headings kept)."""
    out, item, indent = [], [], ""

    def flush() -> None:
        if item:
            out.append(textwrap.fill(" ".join(item), width, initial_indent=indent[:-2] + (
                "- " if indent else ""), subsequent_indent=indent, break_long_words=False,
                break_on_hyphens=False))
            item.clear()

    for line in text.split("\n"):
        if not line.strip() or line.startswith(("|", "#")):
            flush()
            out.append(line)
        elif line.startswith("- "):
            flush()
            indent = "  "
            item.append(line[2:].strip())
        else:
            if not item:
                indent = ""
            item.append(line.strip())
    flush()
    return "\n".join(out)


def write_model_card(folder: str | Path, report: dict | None = None) -> Path:
    """(Re-)write `folder/README.md` from `folder/build_report.json` (or `report`) and the files.

    The build calls it at its end; after retraining `projections/` (or any change to the files),
    re-render the card without rebuilding: `python -m minigpt4_lite build-assets --out assets
    --card-only`.
    """
    path = Path(folder) / "README.md"
    path.write_text(render_model_card(folder, report))
    return path
