"""Stage 2's learning rate: what the tiny recipe's peak rate does to the answers about cells.

Stage 1 trains the projection on captions, which never say where an object is; stage 2 is where
the projection must learn to hand the LLM each object's cell. This script starts stage 2 from the
same stage-1 projection at each peak learning rate (`--lrs`, the rest of `tiny-stage2` as it
is) and evaluates each result on the demo's 200 held-out scenes (`evaluate`: every kind of
question about every scene, strict scoring; the detailed descriptions per object).

    python benchmarks/stage2_lr.py --stage1-from runs/demo_seeds   # seeds 42 43 44, ~15 min

`--stage1-from DIR` takes `DIR/seed_<seed>/stage1` (the layout of `demo_seeds.py`); without it
each seed's stage 1 is trained first, as the demo trains it (about 2 minutes each).
Prints a table and writes it into BENCHMARKS.md between the `stage2_lr` markers.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import harness
import torch

from minigpt4_lite import toyworld as tw
from minigpt4_lite.checkpoints import load_model
from minigpt4_lite.config import preset
from minigpt4_lite.evaluate import QA_KINDS, evaluate
from minigpt4_lite.train import recipe, train

NAME = "stage2_lr"


def stage1_projection(seed: int, source: str | None, tmp: Path) -> str:
    """The directory of `seed`'s stage-1 projection: from `source`, or trained now."""
    if source:
        path = Path(source) / f"seed_{seed}" / "stage1"
        if not (path / "projection.safetensors").exists():
            raise SystemExit(f"No stage-1 projection in {path}; run demo_seeds.py first or "
                             "leave out --stage1-from.")
        return str(path)
    torch.manual_seed(seed)  # as `run_demo` does
    model = load_model(preset("tiny"), projection="")
    out = tmp / f"stage1_{seed}"
    train(model, tw.ToyWorldDataset(1, 5000, seed=seed),
          recipe("tiny-stage1", seed=seed, out_dir=str(out)), resume=False)
    return str(out)


def stage2_result(stage1: str, seed: int, lr: float, scenes, tmp: Path) -> dict:
    """Stage 2 at peak `lr` from the `stage1` projection, evaluated on `scenes`."""
    model = load_model(preset("tiny"), projection=stage1)
    train(model, tw.ToyWorldDataset(2, 5000, seed=seed),
          recipe("tiny-stage2", seed=seed, lr=lr, out_dir=str(tmp / f"stage2_{seed}_{lr}")),
          resume=False)
    return evaluate(model, scenes, registers=("detailed", "qa", "qa_heldout"))


def table(results: dict) -> str:
    rows = ["| peak lr | seed | Q&A | " + " | ".join(QA_KINDS) + " | held-out | described: "
            "cell | failure |", "|---|---|---|" + "---|" * len(QA_KINDS) + "---|---|---|"]
    for (lr, seed), r in results.items():
        q = r["qa"]
        rows.append(f"| {lr:g} | {seed} | {q['accuracy']:.1%} | " + " | ".join(
            f"{q[f'accuracy_{k}']:.1%}" for k in QA_KINDS) + f" | {r['qa_heldout']['accuracy']:.1%}"
            f" | {r['detailed']['attributes']['cell']:.1%} | {r['detailed']['failure_rate']:.1%} |")
    return "\n".join(rows)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lrs", type=float, nargs="+", default=[2e-3, 4e-3])
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44])
    parser.add_argument("--stage1-from", default=None, metavar="DIR")
    harness.add_output_args(parser)
    args = parser.parse_args(argv)
    scenes = tw.make_scenes("heldout", 200)
    t0, results = time.time(), {}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            stage1 = stage1_projection(seed, args.stage1_from, Path(tmp))
            for lr in args.lrs:
                results[(lr, seed)] = stage2_result(stage1, seed, lr, scenes, Path(tmp))
    n, s2 = results[next(iter(results))]["qa"]["n"], recipe("tiny-stage2")
    body = f"""## Stage 2's learning rate (`benchmarks/stage2_lr.py`)

Stage 2 (`tiny-stage2`, {s2.steps} steps, pools of {s2.bucket}) from the same stage-1 projection
at each peak learning rate;
{n} questions on 200 held-out scenes (every kind about every scene, strict), held-out wordings,
and the exact cell of each object the detailed descriptions name. The shipped recipe's peak is
4e-3 (2e-3 until 2026-11-30).

{table(results)}

{harness.footer("stage2_lr.py", argv, time.time() - t0)}"""
    harness.publish(args, NAME, body)


if __name__ == "__main__":
    main()
