"""When does compiling the LLM pay in the real training loop? (tiny preset, stage 1)

`torch.compile` makes a fixed-shape step much faster (`stage1_step.py`), but in real training
every batch has another caption length (dynamic shapes) and compiling costs tens of seconds once.
This runs the library's `train` for stage 1 of the demo recipe with `compile=False` and
`compile=True`, for a short and a longer run, from the same seed, and reports the wall time,
the median step and the first 50 steps (which hold the compilation). `train`'s default
(`speed.should_compile`, `speed.COMPILE_MIN_STEPS`) is set from these figures.

    python benchmarks/train_compile.py                # 800 and 1,600 steps

Clears torch's compile cache first, so the first compiled run pays what a fresh machine pays.
Writes the `train_compile` section of BENCHMARKS.md (between its markers only).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import harness
import torch

from minigpt4_lite.checkpoints import load_model
from minigpt4_lite.config import preset
from minigpt4_lite.speed import COMPILE_MIN_STEPS
from minigpt4_lite.toyworld import ToyWorldDataset
from minigpt4_lite.train import recipe, train

NAME = "train_compile"


def run(steps: int, compile_: bool) -> dict:
    torch.manual_seed(0)
    model = load_model(preset("tiny"), projection="")
    cfg = dataclasses.replace(recipe("tiny-stage1", seed=0), steps=steps, compile=compile_)
    t0 = time.perf_counter()
    history = train(model, ToyWorldDataset(1, 5000, seed=0), cfg, resume=False)
    total = time.perf_counter() - t0
    step_s = [cfg.batch_size / r["samples_per_s"] for r in history]
    return {"total_s": total, "median_step_ms": 1000 * statistics.median(step_s[50:]),
            "first_50_s": sum(step_s[:50]), "final_loss": history[-1]["loss"]}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[800, 1600])
    harness.add_output_args(parser)
    args = parser.parse_args(argv)
    cache = Path(tempfile.gettempdir()) / f"torchinductor_{os.environ.get('USER', 'root')}"
    shutil.rmtree(cache, ignore_errors=True)  # pay for compiling as a fresh machine does
    results = {}
    for steps in args.steps:
        for compile_ in (False, True):
            results[f"{steps}|{compile_}"] = r = run(steps, compile_)
            print(steps, "compiled" if compile_ else "eager",
                  {k: round(v, 3) for k, v in r.items()}, flush=True)
    rows = ["| steps | eager: total | median step | compiled: total | median step | "
            "first 50 steps (eager / compiled) | final loss (eager / compiled) |",
            "|---|---|---|---|---|---|---|"]
    for steps in args.steps:
        e, c = results[f"{steps}|False"], results[f"{steps}|True"]
        rows.append(f"| {steps:,} | {e['total_s']:.0f} s | {e['median_step_ms']:.0f} ms | "
                    f"{c['total_s']:.0f} s | {c['median_step_ms']:.0f} ms | "
                    f"{e['first_50_s']:.0f} s / {c['first_50_s']:.0f} s | "
                    f"{e['final_loss']:.3f} / {c['final_loss']:.3f} |")
    md = "\n".join(rows)
    print(md)
    if args.no_write:
        return
    command = harness.command_line("train_compile.py", argv)
    body = f"""## Compiling the LLM in the real training loop (`benchmarks/train_compile.py`)

`train` for stage 1 of the demo recipe (batch 32, feature cache on), eager vs
`compile=True`, same seed; the first 50 steps hold the one-time compilation (the compile cache
was emptied before the first compiled run; later compiled runs reuse part of it).

{md}

Compiling pays on this CPU only for long runs (compare the one-time cost in the first 50
steps with the saving per step), so `train`'s default (`compile=None`) compiles runs of
>= {COMPILE_MIN_STEPS['cpu']:,} steps on a CPU and >= {COMPILE_MIN_STEPS['cuda']:,} on a GPU; the
demo's 800-step stage 1 runs eagerly. Final losses differ in the third digit: compiled
kernels round differently and the runs diverge slowly, as two GPUs would.

- machine: {harness.machine_line(harness.machine_info('cpu'))}
- command: `{command}`; date {datetime.date.today().isoformat()}
"""
    harness.write_section(Path(args.output), NAME, body, results)
    print(f"updated {args.output}")


if __name__ == "__main__":
    main()
