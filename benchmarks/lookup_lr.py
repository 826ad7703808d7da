"""Does a fresh tiny LLM learn to find an object among slot vectors? Its learning rate decides.

The shipped LLM answers "What colour is the star?" from exact slot vectors about half the time: it
spreads its attention evenly over the objects (`lookup_probe.py`). This script trains fresh LLMs
of the shipped shape (`BuildConfig`: 4 layers, width 256, 4 heads) on one thing only, colour
questions about slot vectors in the stage-2 template, answered in the training texts' sentences
("The star in the picture is red.", every answer token supervised), and measures after every
`--every` steps whether they find the object: the next token after "###Assistant: It is" on 400
held-out scenes with 3-4 objects (teacher-forced, so only the lookup is scored; the section also
gives what naming a random object's colour would score).

Each learning rate runs the build's schedule (`train.warmup_cosine`, warmup 1/12 of the steps,
then a cosine to 1/20 of the peak) for `--steps` steps, batch 32, slot noise 0.5 as in the build.

    python benchmarks/lookup_lr.py   # lrs 2e-3 and 5e-4, seeds 0 and 1, ~25 min

(2e-3 was the build's peak learning rate until 2026-11-30, 5e-4 is since.)

Prints a table and writes it into BENCHMARKS.md between the `lookup_lr` markers.
"""

from __future__ import annotations

import argparse
import random
import time
from dataclasses import replace

import harness
import torch
from harness import ROOT
from transformers import AutoTokenizer

from minigpt4_lite import toyworld as tw
from minigpt4_lite.model import insert_image_embeds
from minigpt4_lite.prompts import END_SYM, MAX_TXT_LEN, build_example, collate, stage2_prompt
from minigpt4_lite.toyworld.build_llm import collate_with_slots, fresh_llm
from minigpt4_lite.toyworld.recipe import BuildConfig
from minigpt4_lite.toyworld.slots import N_SLOTS, SlotEncoder
from minigpt4_lite.train import warmup_cosine

NAME = "lookup_lr"


def colour_questions(scenes: list[tw.Scene], rng: random.Random) -> list[tuple]:
    """(scene, question, answer, colour): the first colour question of `qa_pairs`, where any."""
    out = []
    for scene in scenes:
        qa = [(q, a, k) for q, a, k in tw.qa_pairs(scene, rng) if k in tw.COLOURS]
        if qa:
            out.append((scene, *qa[0]))
    return out


@torch.no_grad()
def lookup_accuracy(llm, tok, slots: SlotEncoder, held: list[tuple]) -> float:
    """Share of held-out questions whose next token after "It is" is the asked object's colour."""
    llm.eval()
    examples = [build_example(tok, stage2_prompt(q), " It is", n_image_tokens=N_SLOTS,
                              end_sym="", max_txt_len=99) for _, q, _, _ in held]
    batch = collate(examples, tok.pad_token_id, padding_side="left")
    embeds = insert_image_embeds(llm, batch["input_ids"], batch["image_mask"],
                                 slots([s for s, *_ in held], llm.get_input_embeddings(), 0.0))
    logits = llm(inputs_embeds=embeds, attention_mask=batch["attention_mask"]).logits[:, -1]
    want = torch.tensor([tok(" " + k, add_special_tokens=False).input_ids[0]
                         for *_, k in held])
    llm.train()
    return (logits.argmax(-1) == want).float().mean().item()


def train_curve(tok, lr: float, seed: int, steps: int, every: int, train: list[tw.Scene],
                held: list[tuple]) -> list:
    """Lookup accuracy after every `every` steps of colour-question training at peak `lr`."""
    cfg = BuildConfig()
    llm, slots = fresh_llm(replace(cfg, seed=seed), tok), SlotEncoder(tok)
    opt = torch.optim.AdamW(llm.parameters(), lr=lr, weight_decay=0.01)
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    curve = []
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = warmup_cosine(step, steps, max(1, steps // 12), lr, lr / 20)
        items = [(build_example(tok, stage2_prompt(q), " " + a, n_image_tokens=N_SLOTS,
                                end_sym=END_SYM[2], max_txt_len=MAX_TXT_LEN[2]), scene)
                 for scene, q, a, _ in colour_questions(rng.sample(train, cfg.llm_batch), rng)]
        batch = collate_with_slots(llm, tok, slots, items, gen, cfg.slot_noise)
        loss = llm(inputs_embeds=batch["inputs_embeds"], attention_mask=batch["attention_mask"],
                   labels=batch["labels"]).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(llm.parameters(), 1.0)
        opt.step()
        if (step + 1) % every == 0:
            curve.append(lookup_accuracy(llm, tok, slots, held))
            print(f"lr {lr:g} seed {seed} step {step + 1}: {curve[-1]:.1%}", flush=True)
    return curve


def chance(held: list[tuple]) -> float:
    """Accuracy of naming the colour of a random object of the scene (no lookup at all)."""
    return sum(sum(o.colour == k for o in s.objects) / len(s.objects)
               for s, *_, k in held) / len(held)


def table(results: dict, every: int) -> str:
    """Rows: learning rate and seed; columns: lookup accuracy after each `every` steps."""
    n = len(next(iter(results.values())))
    head = "| peak lr | seed | " + " | ".join(f"{every * (i + 1)} steps" for i in range(n)) + " |"
    rows = [head, "|---" * (n + 2) + "|"]
    for (lr, seed), curve in results.items():
        rows.append(f"| {lr:g} | {seed} | " + " | ".join(f"{a:.1%}" for a in curve) + " |")
    return "\n".join(rows)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lrs", type=float, nargs="+", default=[2e-3, 5e-4])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--every", type=int, default=250)
    parser.add_argument("--llm", default=str(ROOT / "assets" / "llm"), help="its tokenizer")
    harness.add_output_args(parser)
    args = parser.parse_args(argv)
    tok = AutoTokenizer.from_pretrained(args.llm)
    held_scenes = [s for s in tw.make_scenes("heldout", 1500) if len(s.objects) >= 3]
    held = colour_questions(held_scenes, random.Random(1))[:400]
    train = tw.make_scenes("train", BuildConfig().n_train_scenes)  # the build's training scenes
    t0, results = time.time(), {}
    for lr in args.lrs:
        for seed in args.seeds:
            results[(lr, seed)] = train_curve(tok, lr, seed, args.steps, args.every, train,
                                           held)
    seconds = time.time() - t0
    body = f"""## Learning the object lookup: the learning rate (`benchmarks/lookup_lr.py`)

Fresh LLMs of the shipped shape trained on colour questions about slot vectors only (full
sentence answers, the build's schedule and slot noise); the share of {len(held)} held-out questions
(3-4 objects) whose next token after "It is" is the asked object's colour. Naming a random
object's colour would score {chance(held):.1%}.

{table(results, args.every)}

{harness.footer("lookup_lr.py", argv, seconds)}"""
    harness.publish(args, NAME, body)


if __name__ == "__main__":
    main()
