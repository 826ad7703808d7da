"""Performance switches, kept apart from the teaching code: each one changes speed, never the math.

Every switch here is optional: turning it off gives the same results (up to float rounding) more
slowly. What each buys was measured (BENCHMARKS.md, section named in each docstring):

- `compile_llm` / `compile_with_fallback`: `torch.compile` of the frozen LLM's forward, used by
  `train` for long runs (`should_compile`) and by the ToyWorld asset build;
- `generate_with_cache`: a static KV cache for chat decoding on a GPU;
- `eager_fp32_attention`: the attention the ToyWorld LLM is pretrained with (asset build only);
- `bucketed` / `pool_tokens_per_batch`: length-bucketed batches (the asset build; `train` with
  `TrainConfig.bucket` > 1, opt-in: BENCHMARKS.md "Length-bucketed batches").
"""

from __future__ import annotations

import logging
import random

import torch

log = logging.getLogger(__name__)


# --- torch.compile --------------------------------------------------------------------------------
# BENCHMARKS.md "Compiling the LLM in the real training loop": on the tiny preset's stage 1 on a
# 2-core CPU, compiling costs about 50 s once and then saves 15-33 ms of a 110-125 ms step, so it
# pays after roughly 2,500-3,500 steps; the demo's 800-step stage 1 is faster eager. On a GPU it
# pays much sooner.
COMPILE_MIN_STEPS = {"cuda": 200, "cpu": 4000}


def should_compile(cfg, device: torch.device) -> bool:
    """`cfg.compile` (a `TrainConfig`'s) if set, else auto: runs of at least
    `COMPILE_MIN_STEPS[device]` steps."""
    if cfg.compile is not None:
        return cfg.compile
    return cfg.steps >= COMPILE_MIN_STEPS.get(device.type, COMPILE_MIN_STEPS["cuda"])


def compile_with_fallback(fn, dynamic: bool = True):
    """`torch.compile(fn)`, falling back to `fn` for good if compiling fails.

    Compiling needs a working C++ compiler (on a CPU) or Triton (on a GPU); where it fails, or
    meets an unsupported op, we warn once and go on eagerly: same math, just slower.
    """
    compiled = torch.compile(fn, dynamic=dynamic)

    def call(*args, **kwargs):
        nonlocal compiled
        if compiled is not None:
            try:
                return compiled(*args, **kwargs)
            except Exception as e:  # noqa: BLE001 - a real error re-raises from the eager call
                log.warning("torch.compile failed (%s: %s); continuing without it.",
                            type(e).__name__, str(e).splitlines()[0][:200])
                compiled = None
        return fn(*args, **kwargs)

    return call


def compile_llm(llm: torch.nn.Module):
    """Swap `llm.forward` for a `torch.compile`d one; returns a function that undoes it.

    The loop's time is almost all the frozen LLM's forward and backward (into its inputs only), and
    compiling fuses its small kernels: same math, results equal up to float rounding.
    `dynamic=True` because caption lengths vary from batch to batch.
    """
    llm.forward = compile_with_fallback(llm.forward)  # an instance attribute shadows the method...
    return lambda: delattr(llm, "forward")  # ...and deleting it restores the eager one


# --- the KV cache of chat decoding ----------------------------------------------------------------
# BENCHMARKS.md "Chat decoding": on a CPU the static cache measured no faster (0.91-1.03x), so
# "auto" uses it only on a GPU, where transformers then compiles the decoding step.
_STATIC_FAILED = False  # set once a static-cache generation failed here; later calls skip it


def use_static_cache(kv_cache: str, num_beams: int, device: str, quantized: bool = False) -> bool:
    """Whether `generate` uses a static KV cache on `device` ("cuda", "cpu"...).

    `kv_cache` "static" / "dynamic" decide; "auto" picks it only where it pays and is safe: a GPU,
    one beam (beam search reorders the cache), and an unquantized LLM (bitsandbytes layers do not
    compile).
    """
    if kv_cache != "auto":
        return kv_cache == "static"
    return not _STATIC_FAILED and num_beams == 1 and device == "cuda" and not quantized


def generate_with_cache(llm, kv_cache: str, **kwargs):
    """`llm.generate(**kwargs)`, with a static KV cache where `use_static_cache` says so.

    Under "auto", a static-cache failure (e.g. no compiler for the decoding step) is warned about
    once and decoding goes on with the dynamic cache, for this and every later call.
    """
    global _STATIC_FAILED
    device = kwargs["inputs_embeds"].device.type
    quantized = getattr(llm, "hf_quantizer", None) is not None
    if not use_static_cache(kv_cache, kwargs.get("num_beams", 1), device, quantized):
        return llm.generate(**kwargs)
    try:
        return llm.generate(cache_implementation="static", **kwargs)
    except Exception as e:  # noqa: BLE001 - the dynamic cache computes the same tokens
        if kv_cache == "static":
            raise
        _STATIC_FAILED = True
        log.warning("Static KV cache failed (%s: %s); using the dynamic cache from now on.",
                    type(e).__name__, str(e).splitlines()[0][:200] if str(e) else "")
        return llm.generate(**kwargs)


# --- the ToyWorld asset build ---------------------------------------------------------------------
def eager_fp32_attention(module, query, key, value, attention_mask, scaling, dropout=0.0,
                         **kwargs):
    """transformers' eager attention with its scores and softmax in float32.

    Under the build's bf16 autocast the plain eager form rounds the attention scores to bf16
    before the softmax (SDPA keeps them in float32); this one does not. Compiled, it fuses into the
    graph, which SDPA's separate CPU backward kernel does not: the LLM's pretraining step 0.273 ->
    0.225 s (BENCHMARKS.md "Asset build").
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


def register_eager_fp32() -> None:
    """Make "eager_fp32" an attention name transformers knows (its registry is process-global)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register("eager_fp32", eager_fp32_attention)
    AttentionMaskInterface.register("eager_fp32", eager_mask)


def bucketed(items: list, batch: int, rng: random.Random) -> list[list]:
    """Cut `items` (pairs whose first element is an `Example`) into batches of similar length.

    A random batch of ToyWorld dialogues is padded to its longest member: 48% of the computed
    positions were real tokens. Sorting a pool of 8 batches by length first raises that to 86%
    and makes the LLM's pretraining step 1.7x faster eager, 2.3x compiled (BENCHMARKS.md "Asset
    build"), with the same sequences seen per step. Batches come in random order.
    """
    if len(items) <= batch:  # nothing to bucket: keep the drawn order (`--plain`)
        return [items]
    items = sorted(items, key=lambda item: len(item[0].ids))
    chunks = [items[i:i + batch] for i in range(0, len(items), batch)]
    rng.shuffle(chunks)
    return chunks


def label_tokens(items: list) -> int:
    """Tokens that carry loss in a batch of (`Example`, ...) items (labels shift by one)."""
    return max(1, sum(sum(label != -100 for label in example.labels[1:])
                      for example, _ in items))


def pool_tokens_per_batch(batches: list[list]) -> float:
    """The mean loss-carrying tokens per batch of a bucketed pool.

    Dividing each batch's summed loss by this (instead of by the batch's own token count) gives
    every token the same weight, as in random batches: otherwise a bucket of short Q&A answers
    (few tokens) would weigh as much as a bucket of long descriptions.
    """
    return sum(label_tokens(b) for b in batches) / len(batches)
