"""The LLM's final phase: what a phase with a fresh optimizer after the pretraining adds.

`BuildConfig.final_steps`: after its 4,000 steps the tiny LLM trains 1,500 more with a fresh
AdamW at a peak of 6e-4, on the whole mix, its questions now also in the four later wordings that
the first phase never reads (`questions.LATER_WORDINGS`), plus terse lookups of a cell and chats
of "shape" questions (the `cell_drill` and `shape_chat` forms, 5 shares each). The first version
of the phase (600 steps at 3e-4, the whole mix only) is a variant, and so is the shipped one
without the lookups of a cell. This script starts each variant from the same LLM of the first
phase (`--from`) and measures each result from exact slot vectors (`evaluate.slot_ceiling`:
every kind of question about each of 200 held-out scenes, strict scoring, in the trained
wordings, the held-out ones and as a follow-up), with the accuracy of each held-out wording.

    python benchmarks/final_phase.py --from runs/llm_first_phase   # 4 variants, ~30 min

`--from DIR`: an LLM folder after the first phase (the shipped build's first 4,000 steps, e.g.
`build_llm.pretrain_llm` with `final_steps=0`). Without it that LLM is built first (about 22
minutes on one thread). Prints a table and writes it into BENCHMARKS.md between the
`final_phase` markers.
"""

from __future__ import annotations

import argparse
import re
import tempfile
import time
from pathlib import Path

import harness
import torch

from minigpt4_lite import toyworld as tw
from minigpt4_lite.checkpoints import load_model
from minigpt4_lite.config import preset
from minigpt4_lite.evaluate import QA_KINDS, answer_correct, qa_items, slot_ceiling
from minigpt4_lite.toyworld.questions import wording_pattern
from minigpt4_lite.toyworld.recipe import FORMS, BuildConfig

NAME = "final_phase"
SHIPPED = BuildConfig()
# the shipped mix without the two lookups of a cell (`cell_drill`, `shape_chat`)
WHOLE_MIX = tuple(0 if f in ("cell_drill", "shape_chat") else w
                  for f, w in zip(FORMS, SHIPPED.final_form_weights))
VARIANTS = {  # name -> BuildConfig overrides of the final phase
    "none (the first phase alone)": {"final_steps": 0},
    "600 steps at 3e-4 (shipped until 2026-12-01)": {"final_steps": 600, "final_lr": 3e-4,
                                                     "final_form_weights": WHOLE_MIX},
    "1,500 steps at 6e-4, the whole mix": {"final_form_weights": WHOLE_MIX},
    "1,500 steps at 6e-4 + cell lookups (shipped)": {},
}


def first_phase_llm(source: str | None, tmp: Path) -> str:
    """The directory of the LLM after the first phase: `source`, or built now."""
    if source:
        if not (Path(source) / "config.json").exists():
            raise SystemExit(f"No LLM in {source} (a folder with config.json and the tokenizer).")
        return source
    import random

    from minigpt4_lite.toyworld.build_llm import build_tokenizer, corpus, pretrain_llm

    cfg = BuildConfig(final_steps=0)  # as `build.build` makes the LLM part, without its checks
    train = tw.make_scenes("train", cfg.n_train_scenes)
    tokenizer = build_tokenizer(corpus(train[:4000], random.Random(cfg.seed_of_llm())),
                                cfg.vocab_size)
    out = tmp / "first"
    pretrain_llm(cfg, tokenizer, train).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


def finish(first: str, overrides: dict, out: Path) -> str:
    """The LLM of `first` after the final phase of `BuildConfig(**overrides)`, saved in `out`."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    from minigpt4_lite.toyworld.build_llm import train_llm

    cfg = BuildConfig(**overrides)
    if not cfg.final_steps:
        return first
    tokenizer, llm = AutoTokenizer.from_pretrained(first), LlamaForCausalLM.from_pretrained(first)
    # the seed of the build's own final phase (`pretrain_llm`): the LLM's seed + 1
    train_llm(llm, cfg, tokenizer, tw.make_scenes("train", cfg.n_train_scenes),
              cfg.steps(cfg.final_steps), cfg.final_lr, lambda step: cfg.final_form_weights,
              cfg.seed_of_llm() + 1, "final phase", slot_noise=cfg.final_slot_noise)
    llm.eval().save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


def table(results: dict) -> str:
    rows = ["| final phase | Q&A | " + " | ".join(QA_KINDS) + " | held-out | follow-up | "
            "detailed failure | caption recall |",
            "|---|---|" + "---|" * len(QA_KINDS) + "---|---|---|---|"]
    for name, r in results.items():
        q = r["qa"]
        rows.append(f"| {name} | {q['accuracy']:.1%} | " + " | ".join(
            f"{q[f'accuracy_{k}']:.1%}" for k in QA_KINDS)
            + f" | {r['qa_heldout']['accuracy']:.1%} | {r['qa_followup']['accuracy']:.1%}"
            f" | {r['detailed']['failure_rate']:.1%} | {r['caption']['object_recall']:.3f} |")
    return "\n".join(rows)


def by_wording(scenes, answers: list[str]) -> dict[str, float]:
    """The share of right answers per held-out wording (`qa_items`' order of `qa_heldout`)."""
    items = qa_items(scenes, every_kind=True, questions=tw.HELDOUT_QUESTIONS)
    patterns = {w: wording_pattern(w) for ws in tw.HELDOUT_QUESTIONS.values() for w in ws}
    right: dict[str, list[bool]] = {}
    for item, answer in zip(items, answers, strict=True):
        wording = next(w for w, p in patterns.items() if re.fullmatch(p, item.question))
        right.setdefault(wording, []).append(answer_correct(answer, item.key))
    return {w: sum(r) / len(r) for w, r in right.items()}


def wording_table(wordings: dict[str, dict[str, float]]) -> str:
    names = list(wordings)
    rows = ["| held-out wording | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for w in wordings[names[0]]:
        rows.append(f"| {w} | " + " | ".join(f"{wordings[n].get(w, 0):.0%}" for n in names)
                    + " |")
    return "\n".join(rows)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--from", dest="source", default=None, metavar="DIR")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    harness.add_output_args(parser)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # as the build trains its LLM (`build_llm.pretrain_llm`)
    scenes = tw.make_scenes("heldout", 200)
    t0, results, wordings = time.time(), {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        first = first_phase_llm(args.source, Path(tmp))
        for i, name in enumerate(args.variants):
            llm = finish(first, VARIANTS[name], Path(tmp) / f"variant_{i}")
            results[name], texts = slot_ceiling(
                load_model(preset("tiny", llm=llm), projection=""), scenes, return_texts=True)
            wordings[name] = by_wording(scenes, texts["qa_heldout"])
    n = results[next(iter(results))]["qa"]["n"]
    body = f"""## The LLM's final phase (`benchmarks/final_phase.py`)

Each variant continues the same LLM (the shipped build's first phase: 4,000 steps) with a
fresh AdamW, warmup + cosine, whose questions also take the four later wordings
(`questions.LATER_WORDINGS`), and is measured from exact slot vectors (`slot_ceiling`): {n}
questions on 200 held-out scenes (every kind about every scene, strict), in the held-out wordings
and as a follow-up in the same chat; detailed descriptions and captions (stage-1 layout) on the
same scenes. "Cell lookups": 5 shares each of terse lookups of a cell (`<Img>[slots]</Img>
middle right: small green circle`) and of chats of "shape" questions ("What is in the middle
right?"), the question the LLM missed most. The shipped build is the last row.

{table(results)}

Each held-out wording (no training text contains it), right answers per variant:

{wording_table(wordings)}

{harness.footer("final_phase.py", argv, time.time() - t0)}"""
    harness.publish(args, NAME, body)


if __name__ == "__main__":
    main()
