"""The recipe of the ToyWorld asset build: every setting in one place, and the named variants.

MiniGPT-4 starts from two models pretrained elsewhere (Sec. 3: BLIP-2's ViT + Q-Former and
Vicuna); `build` pretrains our tiny stand-ins. This module holds what every part of that build
shares, so that `build_llm`, `build_vision` and `card` can all read it without importing `build`:

- `BuildConfig`, every number of the build (written into the model card), and the recipes of the
  assets shipped earlier (`PLAIN`, `PREVIOUS`);
- the LLM's pretraining mix (`FORMS`, `FORM_WEIGHTS`, `KIND_WEIGHTS`);
- the autocast both pretrainings run under (bf16 where it is native), and the check that stops
  a diverging one.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch

from ..errors import TrainingError

# What the LLM reads during pretraining: shares of each form and of each register (TASK_KINDS:
# detailed, qa, poem, story, caption); see `llm_example` and `qa_dialogue`. Measured over eight
# LLM builds (docs/asset_history.md): 10% `slot_caption` sequences (stage
# 1's own layout) make stage 1's alignment reliable, and detailed descriptions as 45% of the
# registers (instead of 30%) gave the LLM that describes scenes best from exact slot vectors.
FORMS = ("caption", "words", "slots", "chat", "qa_chat", "slot_caption", "drill", "colour_chat",
         "facts", "cell_drill", "shape_chat")
FORM_WEIGHTS = (5, 15, 40, 15, 15, 10, 0)
KIND_WEIGHTS = (45, 20, 10, 10, 15)


PRECISIONS = ("auto", "bf16", "fp32")  # see `BuildConfig.precision`
LLM_ATTENTIONS = ("sdpa", "eager_fp32", "eager")  # see `BuildConfig.llm_attention`
VISION_ATTENTIONS = ("sdpa", "explicit")


@dataclass
class BuildConfig:
    """Every number of the asset build, in one place (written into the model card)."""

    seed: int = 0  # the scenes, the ViT + Q-Former, and the LLM where `llm_seed` is None
    # The LLM's own seed (its tokenizer's corpus, its initial weights, its batches). Why apart:
    # with the lookup phase, whether the LLM learns to find an object by its shape alone and
    # to compare colours (the look-first existence answers) depends on the run: seed 1 learned
    # both, seed 0 lost one or the other in every build tried (docs/asset_history.md,
    # "Existence answers that look first"). The shipped LLM is seed 1's.
    llm_seed: int | None = 1
    steps_scale: float = 1.0
    device: str = "cpu"
    n_train_scenes: int = 20000
    vocab_size: int = 1024
    llm_hidden: int = 256
    llm_layers: int = 4
    llm_heads: int = 4
    llm_mlp: int = 688
    # 4,000 steps at a peak lr of 5e-4 (until 2026-11-30: 5,000 at 2e-3). At 2e-3 a fresh LLM never
    # learned to find an object among the slots from the varied question wordings; at 5e-4 it
    # does (benchmarks/lookup_lr.py), and the whole build's LLM answered 86% of the questions
    # from exact slots instead of 69% (docs/asset_history.md). 4,000 steps: about 48 minutes at
    # the 0.72 s per step measured on a 2-core AVX2 CPU, where the build runs in float32.
    llm_steps: int = 4000
    llm_batch: int = 32
    llm_lr: float = 5e-4
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
    # bf16 autocast or float32; "auto": bf16 only where the hardware computes it natively
    # (`native_bf16`). The shipped files record which one built them (`build_report.json`).
    precision: str = "auto"
    # length of the fixed, orthogonal input embeddings of the slot words (`slots.pin_slot_words`);
    # 0 = trained with the rest (the shipped assets)
    slot_word_norm: float = 0.0
    slot_noise: float = 0.5  # std of the noise added to slot vectors, relative to embedding std
    # shares of the pretraining forms, in the order of `FORMS` (caption, words, slots, chat,
    # qa_chat, slot_caption, drill); a list in JSON reports
    form_weights: tuple[int, ...] = FORM_WEIGHTS
    # The first `lookup_steps` LLM steps draw their forms from `lookup_form_weights` instead: by
    # default half terse lookups (`drill`) and half chats of colour questions (`colour_chat`),
    # the two layouts in which a fresh LLM learned to find an object by its shape alone within a
    # few hundred steps, where the whole mix never taught it. Measured (docs/asset_history.md, "A
    # lookup phase first"): 800 such steps teach it, and the whole mix after them took it away
    # again on seed 0 (kept on seed 1, at the cost of existence questions). With the existence
    # answers that look first, seed 1 kept it and answered existence too (97% from exact slots,
    # "Existence answers that look first"): 800 steps, the shipped recipe.
    lookup_steps: int = 800
    lookup_form_weights: tuple[int, ...] = (0, 0, 0, 0, 0, 0, 50, 50)
    # The final phase (`build_llm.pretrain_llm`): `final_steps` more steps with a fresh AdamW at a
    # peak lr of `final_lr`, drawing from `final_form_weights` and asking in every trained
    # wording, `questions.LATER_WORDINGS` included (the first phase never reads those). Its first
    # version (600 steps at 3e-4, the whole mix) lifted held-out wordings from exact slots 75.5% ->
    # 88.5% (docs/asset_history.md, "Four more wordings"). The shipped one is longer (1,500 steps
    # at 6e-4) and adds the last two forms, `cell_drill` and `shape_chat` (what is in a cell,
    # asked alone), 5 each: from exact slots the shape at a cell 79.5% -> 84.5%, Q&A 92.6% ->
    # 95.2%, held-out wordings 88.5% -> 92.3% (docs/asset_history.md, "The shape at a cell";
    # benchmarks/final_phase.py). Descriptions that state facts in the held-out wordings' words
    # (the `facts` form) lifted position but not the held-out wordings: weight 0.
    final_steps: int = 1500
    final_lr: float = 6e-4
    final_form_weights: tuple[int, ...] = (5, 15, 40, 15, 15, 10, 0, 0, 0, 5, 5)
    # The std of the noise on the slot vectors in the final phase (`slot_noise` in the first).
    # Through a trained projection the visual tokens are near a slot vector, never on it; an LLM
    # that finished on noisier slots (1.0) looked up the next object of a description more
    # robustly on some seeds, but no noisier recipe met every target on every demo seed, so the
    # shipped one keeps the first phase's (docs/asset_history.md, "Noisier slot vectors in the
    # final phase").
    final_slot_noise: float = 0.5
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

    def seed_of_llm(self) -> int:
        """The seed of the LLM's part of the build (`llm_seed`, or `seed` where it is None)."""
        return self.seed if self.llm_seed is None else self.llm_seed

    def lookup_phase(self) -> int:
        """How many of the LLM's first steps are the lookup phase (scaled like every step count)."""
        return self.steps(self.lookup_steps) if self.lookup_steps else 0

    def form_weights_at(self, step: int) -> tuple[int, ...]:
        """The form weights the LLM's pretraining draws from at `step` (the lookup phase first)."""
        return self.lookup_form_weights if step < self.lookup_phase() else self.form_weights


# The recipe of the assets shipped before 2026-11-26 evening (`build-assets --plain`): random
# batches, eager, no multi-turn Q&A dialogues, 5,000 LLM steps at 2e-3. Its LLM part took
# 3,369 s here; see the model card for how the two LLMs compare.
PLAIN = {"llm_steps": 5000, "llm_lr": 2e-3, "llm_bucket_pool": 1, "compile": False,
         "llm_attention": "sdpa", "vision_attention": "sdpa",
         "form_weights": (15, 20, 45, 20, 0, 0, 0), "kind_weights": (30, 30, 15, 10, 15),
         "vision_words_weight": 0.0, "lookup_steps": 0, "llm_seed": None, "final_steps": 0}

# The recipe of the assets shipped from 2026-11-26 evening to 2026-11-27 (`build-assets
# --previous`, 2,303 s here): fused attention, no slot-caption sequences, the registers 30/30/15/
# 10/15, 5,000 LLM steps at 2e-3, and the ViT + Q-Former without the words objective. Its LLM
# read exact slot vectors well (5.5% failed descriptions) but its build took 38 minutes, and
# through the projection the demo failed 11.5% of descriptions, with stage-1 caption recall 0.881
# and position answers 24% (docs/asset_history.md).
PREVIOUS = {"llm_steps": 5000, "llm_lr": 2e-3, "llm_attention": "sdpa", "vision_attention": "sdpa",
            "form_weights": (15, 15, 40, 15, 15, 0, 0), "kind_weights": (30, 30, 15, 10, 15),
            "vision_words_weight": 0.0, "lookup_steps": 0, "llm_seed": None, "final_steps": 0}


def native_bf16(device: str) -> bool:
    """Whether `device` computes in bf16 natively (a recent GPU; a CPU with AVX-512 BF16 or AMX).

    Elsewhere bf16 is emulated: on an AVX2-only AMD EPYC a [1024, 256] x [256, 688] matmul took
    133 ms in bf16 against 2.5 ms in float32, and the LLM's pretraining step went from 0.3 s to
    about 15 s. oneDNN's own answer (`_is_mkldnn_bf16_supported`) is not enough: it says yes on
    any AVX-512 CPU, and on an Intel Xeon with AVX-512 but neither AVX-512 BF16 nor AMX the same
    matmul took 21.5 ms in bf16 against 6.0 ms in float32. So on x86 the CPU's own flags decide.
    """
    if device.startswith("cuda"):
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    flags = cpu_flags()
    if flags is not None:
        return bool(flags & {"avx512_bf16", "amx_bf16"})
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())  # not x86 Linux: oneDNN's word


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> set[str] | None:
    """The instruction-set flags of an x86 CPU as Linux lists them; None where there is no list
    (another OS, or an ARM CPU, whose `/proc/cpuinfo` names them "Features")."""
    try:
        with open(cpuinfo) as f:
            line = next((ln for ln in f if ln.startswith("flags")), None)
    except OSError:
        return None
    return set(line.split(":", 1)[1].split()) if line else None


def build_precision(cfg: "BuildConfig") -> str:
    """The precision the pretrainings run in: `cfg.precision`, with "auto" resolved."""
    if cfg.precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, "
                         f"not {cfg.precision!r}")
    if cfg.precision != "auto":
        return cfg.precision
    return "bf16" if native_bf16(cfg.device) else "fp32"


def build_autocast(cfg: "BuildConfig"):
    """The autocast both pretrainings run under: bf16 where it is native, else none (float32)."""
    # bf16 autocast was 1.2-1.4x faster than float32 on an Intel Xeon with AMX (prototype)
    if build_precision(cfg) == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type="cuda" if cfg.device.startswith("cuda") else "cpu",
                          dtype=torch.bfloat16)


def finite_loss(loss: torch.Tensor, step: int, part: str) -> float:
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
