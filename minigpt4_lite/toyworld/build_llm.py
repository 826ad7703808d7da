"""The tiny "Vicuna": a byte-level BPE tokenizer and a small Llama, pretrained on ToyWorld text.

MiniGPT-4 (Sec. 3) keeps its LLM frozen and relies on what it learned elsewhere: Vicuna can read
soft tokens and answer in the `###Human: ... ###Assistant: ...` template. Our tiny LLM is
pretrained here, on *text only*, deterministically from a seed:

1. `build_tokenizer`: a byte-level BPE tokenizer trained on the ToyWorld `corpus`, with the
   template markers (`###`, `<Img>`, `</Img>`, `Human:`, `Assistant:`) as single tokens;
2. `pretrain_llm`: a `LlamaForCausalLM` trained on captions and on dialogues in every register
   (`llm_examples`), with the scene given in words or as slot vectors (`slots`): the skill of
   reading a scene from input vectors, without ever seeing a pixel (on one CPU thread; then a
   final phase with a fresh optimizer, `BuildConfig.final_steps`, whose questions also take the
   later wordings, `questions.LATER_WORDINGS`, and which adds lookups of a cell);
3. `llm_heldout_metrics`: its held-out perplexity and greedy Q&A accuracy (model card).

Every sequence is laid out by `prompts.build_example` / `prompts.collate`, the very code that
builds MiniGPT-4's training sequences, and slot vectors go into the image slots through
`model.insert_image_embeds`.
"""

from __future__ import annotations

import math
import random

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..evaluate import answer_correct, qa_items, qa_kind
from ..model import insert_image_embeds
from ..processing import clean_caption
from ..prompts import (
    CONV_VISION,
    END_SYM,
    IMAGE_MESSAGE,
    IMAGE_PLACEHOLDER,
    MAX_TXT_LEN,
    Example,
    build_example,
    collate,
    stage2_prompt,
)
from ..speed import (
    bucketed,
    compile_llm,
    label_tokens,
    pool_tokens_per_batch,
    register_eager_fp32,
)
from ..train import warmup_cosine
from .language import (
    FIRST_PHASE_QUESTIONS,
    QUESTIONS,
    TASK_KINDS,
    caption,
    cell_drill,
    fact_sentences,
    lookup_drill,
    qa_pairs,
    sample_task,
    scene_in_words,
)
from .recipe import (
    FORM_WEIGHTS,
    FORMS,
    KIND_WEIGHTS,
    PLAIN,
    BuildConfig,
    build_autocast,
    finite_loss,
)
from .slots import N_SLOTS, SlotEncoder, pin_slot_words, slot_vocabulary
from .world import Scene

ADDED_TOKENS = ("###", "<Img>", "</Img>", "Human:", "Assistant:")
QA_TURNS = (3, 6)  # questions per `qa_chat` dialogue
LOOKUP_KINDS = ("colour",)  # the questions of a `colour_chat` dialogue
CHAT_KINDS = {"colour_chat": LOOKUP_KINDS, "shape_chat": ("shape",)}  # form -> its questions


# --- 1. tokenizer -------------------------------------------------------------------------------
def corpus(scenes: list[Scene], rng: random.Random):
    """Every register of the ToyWorld language (the questions in the first phase's wordings),
    plus the prompt templates."""
    for scene in scenes:
        yield caption(scene, rng)
        for kind in TASK_KINDS:
            instruction, answer = sample_task(scene, rng, kind, FIRST_PHASE_QUESTIONS)
            yield stage2_prompt(instruction, image=scene_in_words(scene))
            yield answer + END_SYM[2]
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


# --- 2. the LLM's text-only pretraining ---------------------------------------------------------
def llm_example(scene: Scene, rng: random.Random, form: str, kind_weights=KIND_WEIGHTS,
                questions=QUESTIONS) -> tuple[str | None, str, str, bool]:
    """One pretraining sample of `form`: (prompt or None, answer, end_sym, uses slot vectors);
    a question in one of `questions`' wordings."""
    kind = rng.choices(TASK_KINDS, weights=kind_weights)[0]
    instruction, answer = sample_task(scene, rng, kind, questions)
    if form == "caption":  # plain caption text, the language of stage 1 (no image)
        return "", caption(scene, rng), END_SYM[1], False
    if form == "slot_caption":  # stage 1's layout, `[BOS] [slots] caption\n`, as in its data
        return None, clean_caption(caption(scene, rng)), END_SYM[1], True
    if form in ("drill", "cell_drill"):  # a terse lookup, `[BOS] <Img>[slots]</Img> star: red\n`
        key, value = (lookup_drill if form == "drill" else cell_drill)(scene, rng)
        return f"{IMAGE_MESSAGE} {key}:", " " + value, END_SYM[1], True
    if form == "facts":  # a detailed description, then two facts in everyday words (the chat)
        instruction, answer = sample_task(scene, rng, "detailed")
        answer = f"{answer} {fact_sentences(scene, rng)}"
    if form == "words":
        return stage2_prompt(instruction, image=scene_in_words(scene)), answer, END_SYM[2], False
    if form == "slots":
        return stage2_prompt(instruction), answer, END_SYM[2], True
    conv = CONV_VISION.copy()  # the chat template, sometimes with an earlier turn
    if rng.random() < 0.4:
        q0, a0 = sample_task(scene, rng, "qa", questions)
        conv.append("Human", f"{IMAGE_MESSAGE} {q0}")
        conv.append("Assistant", a0)
        conv.append("Human", instruction)
    else:
        conv.append("Human", f"{IMAGE_MESSAGE} {instruction}")
    conv.append("Assistant", None)
    return conv.prompt(), " " + answer, END_SYM[2], True


def qa_dialogue(tokenizer, scene: Scene, rng: random.Random, kinds: tuple[str, ...] = (),
                questions=QUESTIONS) -> Example:
    """A chat about one scene (as slot vectors): several questions, *every* answer supervised.

    One question per sequence gives the LLM a single answer word to learn from; a dialogue of
    3-6 questions about the same slots teaches it to look things up (which object is red, where
    the star is) several times per sequence, at little extra length. The later turns continue the
    chat's layout (`...###Human: q###Assistant: a###`): each is one more `build_example`, without
    BOS, whose answer carries the loss, appended to the first. `kinds`: only questions of these
    kinds (`evaluate.qa_kind`), where the scene has any (the chat forms: `CHAT_KINDS`).
    """
    pairs = qa_pairs(scene, rng, questions=questions)
    if kinds and any(qa_kind(key) in kinds for _, _, key in pairs):
        pairs = [pair for pair in pairs if qa_kind(pair[2]) in kinds]
    rng.shuffle(pairs)
    pairs = pairs[:rng.randint(*QA_TURNS)]
    conv = CONV_VISION.copy()
    conv.append("Human", f"{IMAGE_MESSAGE} {pairs[0][0]}")
    conv.append("Assistant", None)
    example = build_example(tokenizer, conv.prompt(), " " + pairs[0][1], n_image_tokens=N_SLOTS,
                            end_sym=END_SYM[2], max_txt_len=MAX_TXT_LEN[2])
    for question, answer, _ in pairs[1:]:
        example = example + build_example(
            tokenizer, f"Human: {question}###Assistant:", f" {answer}", n_image_tokens=N_SLOTS,
            end_sym=END_SYM[2], max_txt_len=MAX_TXT_LEN[2], bos=False)
    return example


def llm_examples(tokenizer, scenes: list[Scene], rng: random.Random, form_weights=FORM_WEIGHTS,
                 kind_weights=KIND_WEIGHTS, questions=QUESTIONS
                 ) -> list[tuple[Example, Scene | None]]:
    """(token layout, scene or None) per scene; the scene is kept where slot vectors are used.
    Questions in `questions`' wordings (the first phase: `FIRST_PHASE_QUESTIONS`).

    Forms are only ever added at the end of `FORMS`, so the weights of an older recipe (fewer of
    them) mean weight 0 for the later forms, and draw exactly what they drew before.
    """
    if len(form_weights) > len(FORMS):
        raise ValueError(f"{len(form_weights)} form weights for {len(FORMS)} forms {FORMS}")
    form_weights = tuple(form_weights) + (0,) * (len(FORMS) - len(form_weights))
    items = []
    for scene in scenes:
        form = rng.choices(FORMS, weights=form_weights)[0]
        if form in ("qa_chat", *CHAT_KINDS):
            kinds = CHAT_KINDS.get(form, ())
            items.append((qa_dialogue(tokenizer, scene, rng, kinds, questions), scene))
            continue
        prompt, answer, end_sym, uses_slots = llm_example(scene, rng, form, kind_weights,
                                                          questions)
        example = build_example(tokenizer, prompt, answer, n_image_tokens=N_SLOTS,
                                end_sym=end_sym, max_txt_len=MAX_TXT_LEN[2])
        items.append((example, scene if uses_slots else None))
    return items


def collate_with_slots(llm: nn.Module, tokenizer, slots: SlotEncoder, items: list, gen, noise
                       ) -> dict:
    """Pad a list of `llm_examples` items and put slot vectors into their image slots.

    The slot vectors are computed here, at the step that uses them, because they are built from
    the embeddings being trained (gradients flow into the word embeddings through them).
    """
    batch = collate([example for example, _ in items], tokenizer.pad_token_id)
    slot_scenes = [scene for _, scene in items if scene is not None]
    emb = llm.get_input_embeddings()
    # no slot scenes: an empty [0, N_SLOTS, d] on the LLM's device, as `insert_image_embeds` needs
    image_embeds = slots(slot_scenes, emb, noise, gen)
    batch["inputs_embeds"] = insert_image_embeds(llm, batch["input_ids"], batch["image_mask"],
                                                 image_embeds)
    return batch


def llm_batch(llm: nn.Module, tokenizer, slots: SlotEncoder, scenes: list[Scene], rng, gen,
              noise, form_weights=FORM_WEIGHTS, kind_weights=KIND_WEIGHTS) -> dict:
    """A training batch for the LLM: token sequences, with slot vectors in the image slots."""
    items = llm_examples(tokenizer, scenes, rng, form_weights, kind_weights)
    return collate_with_slots(llm, tokenizer, slots, items, gen, noise)


def fresh_llm(cfg: BuildConfig, tokenizer):
    """A randomly initialised Llama of the build's shape, seeded by `cfg.seed_of_llm()` (on CPU)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(cfg.seed_of_llm())
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.llm_hidden, intermediate_size=cfg.llm_mlp,
        num_hidden_layers=cfg.llm_layers, num_attention_heads=cfg.llm_heads,
        max_position_embeddings=512, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False))


# The LLM's pretraining runs on one CPU thread, whatever the machine has. Why: whether a fresh LLM
# learns its lookups (an object by its shape alone) is a lottery over rounding, and a matmul split
# over two threads adds in another order. The shipped recipe with a final phase, built on two
# threads here, learned colour questions 63% right from exact slots instead of 100%
# (docs/asset_history.md, "A final phase"); on one thread a build repeats bit for bit on one kind
# of CPU. Its price here is small: per step one thread measured no slower (BENCHMARKS.md "Asset
# build"); that build's LLM part took 1,953 s on one thread beside test runs, 1,284 s on two.


def pretrain_llm(cfg: BuildConfig, tokenizer, scenes: list[Scene], on_step=None):
    """Pretrain the tiny LLM on `llm_examples` drawn from `scenes`; returns it in eval mode.

    Two phases, each with its own AdamW and its own warmup + cosine: the pretraining proper
    (`llm_steps` at `llm_lr`, the lookup phase first; questions in `FIRST_PHASE_QUESTIONS`),
    then, where `cfg.final_steps`, a final phase with a fresh AdamW (`final_lr`) on
    `final_form_weights` and every trained wording (`QUESTIONS`), which adds what the LLM should
    also know (the later wordings' words; what is in a cell) without unlearning what the first
    phase taught.
    `on_step(steps_done, llm)`, if given, runs after every step of the first phase (the
    benchmarks measure the LLM while it learns); it returns True to stop there.
    """
    threads = torch.get_num_threads()
    if cfg.device == "cpu":  # one thread: see the comment above
        torch.set_num_threads(1)
    try:
        return _pretrain(cfg, tokenizer, scenes, on_step)
    finally:
        torch.set_num_threads(threads)


def _pretrain(cfg: BuildConfig, tokenizer, scenes: list[Scene], on_step=None):
    llm = fresh_llm(cfg, tokenizer).to(cfg.device)
    seed = cfg.seed_of_llm()
    stopped = train_llm(llm, cfg, tokenizer, scenes, cfg.steps(cfg.llm_steps), cfg.llm_lr,
                        cfg.form_weights_at, seed, "LLM (text only)", on_step,
                        FIRST_PHASE_QUESTIONS)
    if cfg.final_steps and not stopped:  # own seed: the first phase draws as it did without it
        train_llm(llm, cfg, tokenizer, scenes, cfg.steps(cfg.final_steps), cfg.final_lr,
                  lambda step: cfg.final_form_weights, seed + 1, "LLM (final phase)",
                  slot_noise=cfg.final_slot_noise)
    return llm.eval()


def train_llm(llm, cfg: BuildConfig, tokenizer, scenes: list[Scene], total: int, lr: float,
              weights_at, seed: int, desc: str, on_step=None, questions=QUESTIONS,
              slot_noise: float | None = None) -> bool:
    """`total` steps of AdamW on batches of `llm_examples`, forms drawn from `weights_at(step)`,
    questions in `questions`' wordings, slot vectors with noise of std `slot_noise` (default
    `cfg.slot_noise`); True where `on_step` stopped it early."""
    noise = cfg.slot_noise if slot_noise is None else slot_noise
    slots = SlotEncoder(tokenizer)
    emb = llm.get_input_embeddings()
    pinned = None  # (token ids, rows) of slot words held fixed: `BuildConfig.slot_word_norm`
    if cfg.slot_word_norm:
        pinned = pin_slot_words(emb, slots, cfg.slot_word_norm, cfg.seed_of_llm())
    opt = torch.optim.AdamW(llm.parameters(), lr=lr, weight_decay=0.01)
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    llm.train()
    if cfg.llm_attention == "eager_fp32":  # ours: transformers must know it before it is set
        register_eager_fp32()
    llm.set_attn_implementation(cfg.llm_attention)  # see `BuildConfig.llm_attention`
    undo = compile_llm(llm) if cfg.compile else None
    bar = tqdm(range(total), desc=desc)
    queue: list[list] = []
    stopped = False
    for step in bar:
        if step and weights_at(step) != weights_at(step - 1):  # e.g. the lookup phase is over
            queue = []
        # the project's one schedule, MiniGPT-4's (`train.warmup_cosine`); builds before
        # 2026-11-29 ran their cosine over the steps after warmup (docs/asset_history.md)
        for group in opt.param_groups:
            group["lr"] = warmup_cosine(step, total, max(1, total // 12), lr, lr / 20)
        if not queue:  # draw the next `llm_bucket_pool` batches at once, bucketed by length
            pool = [scene for _ in range(cfg.llm_bucket_pool)
                    for scene in rng.sample(scenes, cfg.llm_batch)]
            drawn = llm_examples(tokenizer, pool, rng, weights_at(step), cfg.kind_weights,
                                 questions)
            queue = bucketed(drawn, cfg.llm_batch, rng)
            per_batch = pool_tokens_per_batch(queue)
        items = queue.pop()
        batch = collate_with_slots(llm, tokenizer, slots, items, gen, noise)
        with build_autocast(cfg):
            loss = llm(inputs_embeds=batch["inputs_embeds"],
                       attention_mask=batch["attention_mask"].to(cfg.device),
                       labels=batch["labels"].to(cfg.device)).loss
        value = finite_loss(loss, step, "LLM")
        # the batch's summed loss over the pool's mean tokens per batch (1 without bucketing);
        # scaled here, outside the compiled forward, which would recompile for each new factor
        weight = label_tokens(items) / per_batch if cfg.llm_bucket_pool > 1 else 1.0
        opt.zero_grad(set_to_none=True)
        (loss * weight).backward()
        torch.nn.utils.clip_grad_norm_(llm.parameters(), 1.0)
        opt.step()
        if pinned is not None:  # the slot words' rows stay where `pin_slot_words` put them
            with torch.no_grad():
                emb.weight[pinned[0]] = pinned[1]
        bar.set_postfix(loss=f"{value:.3f}")
        stopped = on_step is not None and bool(on_step(step + 1, llm))
        if stopped:
            break
    if undo is not None:
        undo()
    llm.set_attn_implementation("sdpa")  # the default for everyone who loads it later
    return stopped


# --- 3. what the LLM learned ----------------------------------------------------------------------
@torch.no_grad()
def llm_heldout_metrics(llm, tokenizer, scenes: list[Scene], seed: int) -> dict:
    """Held-out perplexity, and colour-question accuracy with the scene in words or as slots."""
    slots = SlotEncoder(tokenizer)
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    losses = []
    for i in range(0, len(scenes), 50):
        # always the single-turn mix of `--plain`, so that perplexities of all builds compare
        batch = llm_batch(llm, tokenizer, slots, scenes[i:i + 50], rng, gen, 0.0,
                          PLAIN["form_weights"], PLAIN["kind_weights"])
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
            colour_qs = [(q, k) for q, _, k in qa_pairs(scene, rng) if q.startswith("What col")]
            if not colour_qs:
                continue
            q, k = colour_qs[0]
            content = scene_in_words(scene) if form == "words" else IMAGE_PLACEHOLDER
            prompts.append(stage2_prompt(q, image=content))
            keys.append(k)
            slot_scenes.append(scene)
        answers = _greedy(llm, tokenizer, slots, prompts,
                          slot_scenes if form == "slots" else None)
        correct = [answer_correct(a, k) for a, k in zip(answers, keys)]
        result[f"colour_qa_accuracy_{form}"] = float(np.mean(correct))
        result[f"qa_accuracy_{form}"] = qa_by_kind(llm, tokenizer, slots, scenes, form, seed)
    return result


def qa_by_kind(llm, tokenizer, slots: SlotEncoder, scenes: list[Scene], form: str, seed: int
               ) -> dict:
    """Greedy Q&A accuracy per kind (colour, count, position, existence), the demo's questions."""
    items = qa_items(scenes, seed)
    prompts = [stage2_prompt(q, image=scene_in_words(s) if form == "words" else IMAGE_PLACEHOLDER)
               for s, (q, *_) in zip(scenes, items)]
    answers = _greedy(llm, tokenizer, slots, prompts,
                      scenes[:len(items)] if form == "slots" else None)
    by_kind: dict[str, list[bool]] = {}
    for answer, (_, key, kind, _) in zip(answers, items):
        by_kind.setdefault(kind, []).append(answer_correct(answer, key))
    return {kind: round(float(np.mean(hits)), 4) for kind, hits in sorted(by_kind.items())}


def _greedy(llm, tokenizer, slots: SlotEncoder, prompts: list[str], scenes: list[Scene] | None,
            max_new_tokens: int = 24) -> list[str]:
    """Greedy answers to prompts (with slot vectors for `scenes`), cut at `###`."""
    batch = collate([build_example(tokenizer, p, n_image_tokens=N_SLOTS) for p in prompts],
                    tokenizer.pad_token_id, padding_side="left")
    emb = llm.get_input_embeddings()
    image_embeds = slots(scenes or [], emb, 0.0)  # empty for prompts without slots
    embeds = insert_image_embeds(llm, batch["input_ids"], batch["image_mask"], image_embeds)
    out = llm.generate(inputs_embeds=embeds,
                       attention_mask=batch["attention_mask"].to(embeds.device),
                       max_new_tokens=max_new_tokens, do_sample=False,
                       pad_token_id=tokenizer.pad_token_id)
    texts = tokenizer.batch_decode(out, skip_special_tokens=True)
    return [t.split("###")[0].strip() for t in texts]
