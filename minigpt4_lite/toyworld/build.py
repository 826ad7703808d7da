"""Rebuild `assets/`: the tiny pretrained, frozen backbones of ToyWorld (the "BLIP-2" and "Vicuna").

MiniGPT-4 (Sec. 3) aligns two models that were pretrained separately. Here both are pretrained
from scratch on ToyWorld, deterministically from a seed, on a laptop CPU
(`python -m minigpt4_lite build-assets`; every setting in `recipe.BuildConfig`):

1. a byte-level BPE tokenizer trained on the ToyWorld corpus (`build_llm.build_tokenizer`);
2. the LLM, a small `LlamaForCausalLM`, trained on *text only* (`build_llm.pretrain_llm`):
   captions, and `###Human: ... ###Assistant: ...` dialogues in every register where the scene is
   given in words, or as "slot vectors" (`slots`: one input vector per grid cell = the sum of that
   cell's word embeddings, plus one for the background, plus noise). A model this small cannot
   learn to read arbitrary soft tokens from one linear layer (a prototype here got object recall
   0.02-0.07 that way); Vicuna-13B can, and BLIP-2's Q-Former had already been trained to talk to
   a frozen LLM. The slot vectors give our tiny LLM the equivalent skill: reading a scene from
   input vectors, without ever seeing a pixel.
3. the ViT + Q-Former (ours, tiny), trained on rendered images with a grounded representation
   objective in the spirit of BLIP-2's first stage (`build_vision.pretrain_vision`): query i must
   predict the content of grid cell i (shape, colour, size or "empty"), query 9 the background,
   through per-query linear heads; and, by least squares through one linear layer, the bag of
   words of its cell (the position words and the content). The second objective is our miniature
   of BLIP-2's second stage, which trained the Q-Former until one fully-connected layer could hand
   its outputs to a frozen LLM: it makes the words linearly readable from the queries, so that the
   linear projection that MiniGPT-4 trains can hand our LLM nearly the exact slot vectors it
   learned to read.

The heads and the slot vectors are thrown away; what is shipped is the frozen LLM and the frozen
ViT + Q-Former, in the HF folder layouts that the real-checkpoint loaders read, with a model card
(`card`). Both pretrainings follow the project's one learning-rate schedule
(`train.warmup_cosine`, MiniGPT-4's: warmup, then a cosine over the whole run); the assets shipped
before 2026-11-29 were built with the build's own earlier schedule (docs/asset_history.md), so a
rebuild now gives slightly different weights.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import random
import time
from dataclasses import asdict
from pathlib import Path

import torch

from ..checkpoints import load_model
from ..config import preset
from .build_llm import build_tokenizer, corpus, llm_heldout_metrics, pretrain_llm
from .build_vision import linear_readout_r2, pretrain_vision, probe_accuracy, save_vision_qformer
from .card import sha256, write_model_card
from .language import scene_in_words
from .recipe import (
    LLM_ATTENTIONS,
    PLAIN,
    PREVIOUS,
    VISION_ATTENTIONS,
    BuildConfig,
    build_precision,
)
from .world import make_scenes, render

__all__ = ["PLAIN", "PREVIOUS", "BuildConfig", "build", "save_samples"]

log = logging.getLogger(__name__)


def save_samples(folder: Path, n: int = 8) -> None:
    """A few held-out scenes as PNG files (with their ground truth) for notebooks and the chat."""
    folder.mkdir(parents=True, exist_ok=True)
    truth = {}
    for scene in make_scenes("heldout", n, start=100000):
        name = f"scene_{scene.seed}.png"
        render(scene, 240).save(folder / name)  # 4x the model's size: nicer to look at
        truth[name] = scene_in_words(scene)
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
    precision = build_precision(cfg)  # refuses an unknown one before anything is written
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    n_scenes = max(64, int(cfg.n_train_scenes * min(1.0, cfg.steps_scale * 4)))
    train = make_scenes("train", n_scenes)
    heldout = make_scenes("heldout", 300 if cfg.steps_scale >= 0.5 else 40)
    old = out / "build_report.json"
    report: dict = json.loads(old.read_text()) if old.exists() and set(parts) != {
        "llm", "vision"} else {}
    report["build_config"] = asdict(cfg)
    report["precision"] = precision  # "auto" resolved on this machine
    for part in parts:  # per part, as a build of one part keeps the other's from an earlier run
        report[f"{part}_precision"] = precision
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
        tokenizer = build_tokenizer(corpus(train[:4000], random.Random(cfg.seed_of_llm())),
                                    cfg.vocab_size)
        tokenizer.save_pretrained(out / "llm")
        llm = pretrain_llm(cfg, tokenizer, train)
        llm.save_pretrained(out / "llm")
        seconds["llm"] = round(time.time() - t1, 1)
        # how the language this LLM read answers existence questions (`language.existence_answer`;
        # reports without it: a direct "Yes, ..." / "No, ...")
        report["existence_answers"] = "look first"
    else:
        tokenizer = AutoTokenizer.from_pretrained(out / "llm")
        llm = LlamaForCausalLM.from_pretrained(out / "llm").eval()
    if "llm" in parts or "llm" not in report:
        report["llm"] = {"params": sum(p.numel() for p in llm.parameters()),
                         **llm_heldout_metrics(llm, tokenizer, heldout, cfg.seed_of_llm())}
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
    report["lr_schedule"] = "train.warmup_cosine"  # reports without it: the build's earlier one
    report["sha256"] = {str(p.relative_to(out)): sha256(p) for p in sorted(out.rglob("*"))
                        if p.is_file() and p.name not in ("README.md", "build_report.json")
                        and "projections" not in p.parts}
    (out / "build_report.json").write_text(json.dumps(report, indent=2) + "\n")
    write_model_card(out, report)
    log.info("assets built in %.0f s", seconds["total"])
    return report
