"""How much would length-bucketed batches save in the real training loop? (tiny preset, CPU)

`train` draws each batch at random and pads it to its longest member: on ToyWorld about 28% of
the positions the frozen LLM computes in stage 1 (and 32% in stage 2) are padding. Sorting a pool
of `--pool` random batches by length and training on its batches in random order (what
`speed.bucketed` does for the asset build) computes fewer positions for the same samples. This
times the library's own step (`make_batch`, the loss forward, backward, AdamW) both ways on the
demo recipes' batches, interleaved (plain, bucketed, plain, bucketed, ...), and reports the
saving per step and over the demo's steps (800 + 800).

    python benchmarks/train_bucketing.py            # stage 1: 100 steps, stage 2: 60, 3 rounds

It measures speed only. The tiny recipes train this way (`TrainConfig.bucket` 8) since the demo's
quality targets were measured with pools over three seeds (`benchmarks/demo_seeds.py`); the time
saved bought stage 2 twice the steps (docs/asset_history.md, "Stage 2 twice as long").
Writes the `train_bucketing` section of BENCHMARKS.md (between its markers only).
"""

from __future__ import annotations

import argparse
import datetime
import random
import statistics
import time
from pathlib import Path

import harness
import torch

from minigpt4_lite.checkpoints import load_model
from minigpt4_lite.config import preset
from minigpt4_lite.prompts import build_example, stage_end_sym
from minigpt4_lite.speed import bucketed
from minigpt4_lite.toyworld import ToyWorldDataset
from minigpt4_lite.train import build_feature_cache, make_batch, make_optimizer, recipe

NAME = "train_bucketing"
DEMO_STEPS = {stage: recipe(f"tiny-stage{stage}").steps for stage in (1, 2)}


def batches(model, dataset, cfg, pool: int, seed: int):
    """Endless lists of samples: random batches (`pool` 1) or length-bucketed pools of them."""
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    while True:
        idx = torch.randint(len(dataset), (cfg.batch_size * pool,), generator=gen).tolist()
        samples = [dataset[i] for i in idx]
        items = [(build_example(model.tokenizer, s.prompt, s.answer,
                                n_image_tokens=model.cfg.num_visual_tokens,
                                end_sym=stage_end_sym(cfg.stage), max_txt_len=cfg.max_txt_len), s)
                 for s in samples]
        yield from ([s for _, s in chunk] for chunk in bucketed(items, cfg.batch_size, rng))


def time_steps(model, cache, cfg, source, steps: int) -> tuple[float, float]:
    """Seconds per step and padded positions per step over `steps` library steps."""
    opt = make_optimizer(model, cfg)
    positions, t = 0, time.perf_counter()
    for _ in range(steps):
        batch = make_batch(model, next(source), cfg, cache, False, torch.Generator())
        positions += batch["input_ids"].numel()
        model(batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return (time.perf_counter() - t) / steps, positions / steps


def run_stage(stage: int, steps: int, rounds: int, pool: int) -> dict:
    torch.manual_seed(0)
    model = load_model(preset("tiny"), projection="")
    dataset = ToyWorldDataset(stage, 5000, seed=0)
    cfg = recipe(f"tiny-stage{stage}", seed=0)
    cache = build_feature_cache(model, dataset)
    model.train()
    sources = {"random batches": batches(model, dataset, cfg, 1, seed=1),
               f"bucketed (pool of {pool})": batches(model, dataset, cfg, pool, seed=1)}
    step_s = {k: [] for k in sources}
    positions = {}
    time_steps(model, cache, cfg, sources["random batches"], 5)  # warm-up
    for _ in range(rounds):
        for name, source in sources.items():
            s, p = time_steps(model, cache, cfg, source, steps)
            step_s[name].append(s)
            positions[name] = p
    out = {}
    for name in sources:
        out[name] = {"step_ms": 1000 * statistics.median(step_s[name]),
                     "spread": (max(step_s[name]) - min(step_s[name])) / statistics.median(
                         step_s[name]),
                     "positions": positions[name]}
    plain, bucket = (out[k]["step_ms"] for k in sources)
    out["batch_size"], out["speedup"] = cfg.batch_size, plain / bucket
    out["demo_saving_s"] = (plain - bucket) * DEMO_STEPS[stage] / 1000
    return out


def render(results: dict, pool: int, command: str, machine: str) -> str:
    rows = ["| stage (batch) | batches | positions per step | step (ms) | spread | speed-up | "
            "saved over the demo's steps |", "|---|---|---|---|---|---|---|"]
    for stage, r in results.items():
        names = [k for k in r if isinstance(r[k], dict)]
        for name in names:
            first = name == names[0]
            rows.append(f"| {stage} ({r['batch_size']}) | {name} | {r[name]['positions']:.0f} | "
                        f"{r[name]['step_ms']:.0f} | {100 * r[name]['spread']:.0f}% | "
                        + ("1.00x | |" if first else f"{r['speedup']:.2f}x | "
                           f"{r['demo_saving_s']:.0f} s of {DEMO_STEPS[int(stage)]} steps |"))
    return f"""## Length-bucketed batches in the training loop (`benchmarks/train_bucketing.py`)

The library's training step (`make_batch`, loss forward, backward, AdamW on the projection;
frozen-feature cache on, eager) on the demo recipes' ToyWorld batches: random batches as `train`
draws them (padded to their longest member) vs the same kind of draw in pools of {pool} batches
sorted by length (`speed.bucketed`), interleaved, median of the rounds. The tiny recipes use
pools of 8 (`TrainConfig.bucket`; `train --bucket 1` draws random batches again): measured over
the demo's three seeds (with the assets of 2026-12-01 morning), every quality target held with
them, and the time they save pays for stage 2's 800 steps ("The demo over 3 seeds";
docs/asset_history.md, "Stage 2 twice as long").

{chr(10).join(rows)}

- machine: {machine}
- command: `{command}`; date {datetime.date.today().isoformat()}
"""


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, nargs=2, default=[100, 60],
                        help="steps per round for stage 1 and stage 2")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--pool", type=int, default=8)
    harness.add_output_args(parser)
    args = parser.parse_args(argv)
    results = {}
    for stage, steps in zip((1, 2), args.steps):
        results[str(stage)] = r = run_stage(stage, steps, args.rounds, args.pool)
        print(f"stage {stage}:", {k: v for k, v in r.items()}, flush=True)
    md = render(results, args.pool, harness.command_line("train_bucketing.py", argv),
                harness.machine_line(harness.machine_info("cpu")))
    print(md)
    if not args.no_write:
        harness.write_section(Path(args.output), NAME, md, results)
        print(f"updated {args.output}")


if __name__ == "__main__":
    main()
