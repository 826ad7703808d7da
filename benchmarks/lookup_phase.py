"""A lookup phase first: does the LLM learn to find an object by its shape alone, and keep it?

Every LLM the build has shipped answers "What colour is the star?" about two times in three from
exact slot vectors: it finds an object by its colour *and* shape, not by its shape alone
(docs/asset_history.md). `BuildConfig.lookup_steps` starts the pretraining with a phase of terse
lookups and colour chats only (`lookup_form_weights`), the layouts in which a fresh LLM learned
that lookup within a few hundred steps. This script runs the build's own pretraining
(`build_llm.pretrain_llm`, the build's schedule over `--steps`) for each seed and configuration,
stops after `--stop` steps, and every `--every` steps asks greedy questions of four kinds in the
chat's layout (one fresh chat per question) on held-out scenes with 3-4 objects, scored strictly
(`evaluate.answer_correct`): colour (object named by its shape alone), existence (half absent,
near misses included), position (exact cell) and size.

    python benchmarks/lookup_phase.py   # lookup phase of 800 steps, seeds 0 and 1, ~20 min

Prints a table and writes it into BENCHMARKS.md between the `lookup_phase` markers.
"""

from __future__ import annotations

import argparse
import json
import time

import harness
import torch
from harness import ROOT
from transformers import AutoTokenizer

from minigpt4_lite import toyworld as tw
from minigpt4_lite.evaluate import answer_correct, qa_items
from minigpt4_lite.prompts import CONV_VISION, IMAGE_MESSAGE
from minigpt4_lite.toyworld.build_llm import _greedy, pretrain_llm
from minigpt4_lite.toyworld.recipe import BuildConfig
from minigpt4_lite.toyworld.slots import SlotEncoder

NAME = "lookup_phase"
KINDS = ("colour", "existence", "position", "size")


def questions(n: int = 150) -> dict[str, list]:
    """Up to `n` (scene, question, key) per kind, on held-out scenes with 3-4 objects."""
    scenes = [s for s in tw.make_scenes("heldout", 1200) if len(s.objects) >= 3]
    out: dict[str, list] = {kind: [] for kind in KINDS}
    for first in range(7):  # `qa_items` asks one kind per scene, cycling from `first`
        for scene, (q, key, kind, _) in zip(scenes, qa_items(scenes, first_kind=first)):
            if kind in out and len(out[kind]) < n:
                out[kind].append((scene, q, key))
    return out


def chat_prompt(question: str) -> str:
    """The first turn of a chat about the image: the layout of the `chat` and `qa_chat` forms."""
    conv = CONV_VISION.copy()
    conv.append("Human", f"{IMAGE_MESSAGE} {question}")
    conv.append("Assistant", None)
    return conv.prompt()


@torch.no_grad()
def accuracy(llm, tok, slots: SlotEncoder, items: list) -> float:
    """Share of greedy answers right (strict scoring), exact slot vectors for the scenes."""
    llm.eval()
    answers = []
    for i in range(0, len(items), 75):
        chunk = items[i:i + 75]
        answers += _greedy(llm, tok, slots, [chat_prompt(q) for _, q, _ in chunk],
                           [s for s, _, _ in chunk])
    llm.train()
    return sum(answer_correct(a, key) for a, (_, _, key) in zip(answers, items)) / len(items)


def curve(cfg: BuildConfig, tok, train: list[tw.Scene], asked: dict, stop: int, every: int
          ) -> dict[str, list[float]]:
    """Accuracy per kind after every `every` of the first `stop` steps of `pretrain_llm`."""
    slots, out = SlotEncoder(tok), {kind: [] for kind in KINDS}

    def on_step(done: int, llm) -> bool:
        if done % every == 0:
            for kind, items in asked.items():
                out[kind].append(accuracy(llm, tok, slots, items))
            print(f"seed {cfg.seed} step {done}:",
                  {k: f"{v[-1]:.0%}" for k, v in out.items()}, flush=True)
        return done >= stop

    pretrain_llm(cfg, tok, train, on_step=on_step)
    return out


def table(results: dict, every: int) -> str:
    """One row per configuration, seed and measurement; one column per kind of question."""
    rows = ["| configuration | seed | steps | " + " | ".join(KINDS) + " |",
            "|---" * (3 + len(KINDS)) + "|"]
    for (config, seed), by_kind in results.items():
        for i in range(len(by_kind[KINDS[0]])):
            rows.append(f"| `{config}` | {seed} | {every * (i + 1)} | "
                        + " | ".join(f"{by_kind[k][i]:.0%}" for k in KINDS) + " |")
    return "\n".join(rows)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", nargs="+", default=['{"lookup_steps": 800}'],
                        help="BuildConfig overrides, one JSON object per configuration")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--stop", type=int, default=1200, help="steps run of each schedule")
    parser.add_argument("--every", type=int, default=200)
    parser.add_argument("--llm", default=str(ROOT / "assets" / "llm"), help="its tokenizer")
    harness.add_output_args(parser)
    args = parser.parse_args(argv)
    tok = AutoTokenizer.from_pretrained(args.llm)
    asked = questions()
    t0, results = time.time(), {}
    for config in args.configs:
        overrides = {k: tuple(v) if isinstance(v, list) else v
                     for k, v in json.loads(config).items()}
        for seed in args.seeds:
            # eager: the measurements generate text between steps, which a compiled LLM would
            # recompile for
            cfg = BuildConfig(seed=seed, compile=False, **overrides)
            train = tw.make_scenes("train", cfg.n_train_scenes)  # the build's training scenes
            results[(config, seed)] = curve(cfg, tok, train, asked, args.stop, args.every)
    seconds = time.time() - t0
    n = {kind: len(items) for kind, items in asked.items()}
    body = f"""## A lookup phase first (`benchmarks/lookup_phase.py`)

The first steps of the build's LLM pretraining (its schedule over {BuildConfig().llm_steps}
steps) with the given `BuildConfig` overrides; greedy answers in the chat's layout, one fresh
chat per question, exact slot vectors, strict scoring, on held-out scenes with 3-4 objects
({', '.join(f'{k} {v}' for k, v in n.items())} questions); columns: steps done.

{table(results, args.every)}

{harness.footer("lookup_phase.py", argv, seconds)}"""
    harness.publish(args, NAME, body)


if __name__ == "__main__":
    main()
