"""Lens hit rate of the untrained, stage-1 and stage-2 projections on held-out ToyWorld scenes.

The lens hit rate (`interpret.lens_hits`) is the share of scenes where the top-k cosine-nearest
vocabulary tokens of the projected visual tokens, pooled over all of them, include the colour
word and the shape word of every object. It asks whether the trained linear layer put the
visual tokens next to the words that describe the image (paper Sec. 3.1), without generating.

    python benchmarks/lens_hit_rate.py            # 200 held-out scenes, k = 5 and 10

Prints a table and writes it into BENCHMARKS.md between the `lens_hit_rate` markers (the rest of
the file is left as it is). Needs assets/ and assets/projections/stage1 and stage2 (demo run).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import harness
import torch
from harness import ROOT

from minigpt4_lite import toyworld as tw
from minigpt4_lite.checkpoints import load_model, load_projection
from minigpt4_lite.config import preset
from minigpt4_lite.interpret import lens_hits

NAME = "lens_hit_rate"


def measure(n: int, ks: list[int], projections: dict[str, Path | None]) -> dict:
    """{projection name: {k: lens_hits(...)}} on the first `n` held-out scenes."""
    torch.manual_seed(0)  # the untrained projection: the seeded random initialisation
    model = load_model(preset("tiny"), projection="")
    scenes = tw.make_scenes("heldout", n)
    results = {}
    for name, path in projections.items():
        if path is not None:
            load_projection(model, path)
        results[name] = {k: lens_hits(model, scenes, k) for k in ks}
    return results


def table(results: dict, ks: list[int]) -> str:
    head = "| projection | " + " | ".join(f"k={k}: scenes | objects | precision"
                                         for k in ks) + " |"
    rows = [head, "|---|" + "---|---|---|" * len(ks)]
    for name, by_k in results.items():
        cells = [f"{by_k[k]['scene_rate']:.1%} | {by_k[k]['object_rate']:.1%} | "
                 f"{by_k[k]['precision']:.1%}" for k in ks]
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=200, help="held-out scenes (default 200)")
    parser.add_argument("--k", type=int, nargs="+", default=[5, 10])
    harness.add_output_args(parser)
    args = parser.parse_args(argv)
    projections = {"untrained (seed 0)": None,
                   "stage 1": ROOT / "assets" / "projections" / "stage1",
                   "stage 1 + stage 2": ROOT / "assets" / "projections" / "stage2"}
    missing = [str(p) for p in projections.values() if p is not None and not p.exists()]
    if missing:
        sys.exit(f"Missing {', '.join(missing)}: run the demo first "
                 "(python -m minigpt4_lite demo).")
    t0 = time.perf_counter()
    results = measure(args.n, args.k, projections)
    seconds = time.perf_counter() - t0
    md = table(results, args.k)
    print(md)
    print(f"({seconds:.1f} s)")
    if args.no_write:
        return
    body = f"""## Lens hit rate (`benchmarks/lens_hit_rate.py`)

Share of {args.n} held-out ToyWorld scenes where the pooled top-k cosine-nearest vocabulary tokens
of all projected visual tokens include the colour word and the shape word of every object
("scenes"); "objects" is the same test per object; "precision" is the share of the colour and
shape words in those pooled sets that name something in the scene (`interpret.lens_hits`). No
generation: this reads the projected tokens directly against the LLM's input-embedding table.

{md}

{harness.footer("lens_hit_rate.py", argv, seconds)}"""
    harness.write_section(Path(args.output), NAME, body)
    print(f"updated {args.output}")


if __name__ == "__main__":
    main()
