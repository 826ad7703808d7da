"""The demo over several seeds: the spread of every figure, and every target checked per seed.

Training results are not bit-identical across CPUs (other BLAS kernels sum in another order), so
one run of `demo` is one draw. This runs the whole demo (stage 1, stage 2, evaluation on the same
200 held-out scenes) once per seed and reports each seed's figures, their range, and whether
each of `pipeline.DEMO_TARGETS` holds for every seed.

    python benchmarks/demo_seeds.py --seeds 42 43 44 --out runs/demo_seeds

Writes the table into BENCHMARKS.md between the `demo_seeds` markers (`--section NAME`: other
markers, e.g. for another kind of CPU, so that one machine's table does not replace another's).
Seed 42's run is the `demo` default; its projections are the reference ones in
assets/projections.
"""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

import harness

from minigpt4_lite import toyworld as tw
from minigpt4_lite.checkpoints import load_model
from minigpt4_lite.config import preset
from minigpt4_lite.evaluate import QA_KINDS, evaluate, slot_ceiling
from minigpt4_lite.pipeline import (
    DEMO_TARGETS,
    STAGE1_REGISTERS,
    STAGE2_REGISTERS,
    demo_table,
    demo_targets,
    run_demo,
)

NAME = "demo_seeds"
COLUMNS = {  # column -> how to read it from a demo's metrics.json
    "caption recall (s1)": lambda m: m["stage1"]["caption"]["object_recall"],
    "failure s1": lambda m: m["stage1"]["detailed"]["failure_rate"],
    "failure s2": lambda m: m["stage2"]["detailed"]["failure_rate"],
    "recall s2": lambda m: m["stage2"]["detailed"]["object_recall"],
    "halluc. s2": lambda m: m["stage2"]["detailed"]["hallucination_rate"],
    "Q&A s1": lambda m: m["stage1"]["qa"]["accuracy"],
    "Q&A s2": lambda m: m["stage2"]["qa"]["accuracy"],
    "seconds": lambda m: m["seconds"]["total"],
}
# stage 2's short answers by kind (trained wordings), the held-out wordings and the follow-up,
# and the attributes of each object in its detailed descriptions
QA_COLUMNS = {
    **{k: (lambda m, k=k: m["stage2"]["qa"][f"accuracy_{k}"]) for k in QA_KINDS},
    "held-out wordings": lambda m: m["stage2"]["qa_heldout"]["accuracy"],
    "trained wordings": lambda m: m["stage2"]["qa"]["accuracy"],
    "follow-up": lambda m: m["stage2"]["qa_followup"]["accuracy"],
    "described: size": lambda m: m["stage2"]["detailed"]["attributes"]["size"],
    "described: cell": lambda m: m["stage2"]["detailed"]["attributes"]["cell"],
}


def reevaluate(folder: Path) -> dict:
    """A finished demo run evaluated again with today's `evaluate` (the registers `run_demo` uses
    now, on the same held-out scenes); its trained projections and seconds are kept as they are.
    For evaluation changes that need no retraining: the projections of one seed on one machine do
    not change, so this gives what a new run would."""
    m = json.loads((folder / "metrics.json").read_text())
    scenes = tw.make_scenes("heldout", m["n_eval"])
    for stage, registers in (("stage1", STAGE1_REGISTERS), ("stage2", STAGE2_REGISTERS)):
        model = load_model(preset("tiny"), projection=str(folder / stage))
        m[stage] = evaluate(model, scenes, registers=registers)
    m["table"], m["targets"] = demo_table(m["stage1"], m["stage2"]), demo_targets(m)
    m["reevaluated"] = datetime.date.today().isoformat()
    (folder / "metrics.json").write_text(json.dumps(m, indent=2) + "\n")
    return m


def ceiling(n_eval: int = 200) -> dict:
    """The tiny LLM's own ceiling on the same scenes: exact slot vectors as the visual tokens."""
    model = load_model(preset("tiny"), projection="")
    return slot_ceiling(model, tw.make_scenes("heldout", n_eval))


def render(runs: dict[int, dict], machine: str, command: str, top: dict | None = None,
           title: str = "") -> str:
    """Markdown: one row per seed, the range over seeds, the targets per seed, the LLM ceiling."""
    head = "| seed | " + " | ".join(COLUMNS) + " | targets met |"
    title = title or f"The demo over {len(runs)} seed{'s' if len(runs) > 1 else ''}"
    lines = [f"## {title} (`benchmarks/demo_seeds.py`)", "",
             f"Machine: {machine}. Command: `{command}`. "
             f"Date: {datetime.date.today().isoformat()}. 200 held-out scenes, greedy; Q&A "
             "scored strictly (the first value of the asked kind that the answer names; a "
             "position is the exact cell).", "", head, "|" + "---|" * (len(COLUMNS) + 2)]
    for seed, m in runs.items():
        cells = " | ".join(_fmt(name, get(m)) for name, get in COLUMNS.items())
        lines.append(f"| {seed} | {cells} | {sum(m['targets'].values())}/{len(DEMO_TARGETS)} |")
    spread = [f"{_fmt(n, min(get(m) for m in runs.values()))}-"
              f"{_fmt(n, max(get(m) for m in runs.values()))}" for n, get in COLUMNS.items()]
    lines.append("| range | " + " | ".join(spread) + " | |")
    lines += ["", "| target | " + " | ".join(f"seed {s}" for s in runs) + " |",
              "|---|" + "---|" * len(runs)]
    for target in DEMO_TARGETS:
        marks = ["met" if m["targets"][target] else "**missed**" for m in runs.values()]
        lines.append(f"| {target} | " + " | ".join(marks) + " |")
    if all("qa_heldout" in m["stage2"] for m in runs.values()):
        n = next(iter(runs.values()))["stage2"]["qa"]["n"]
        lines += ["", f"Stage 2's short answers ({n} questions: every kind about every scene, "
                  "each a fresh chat), the same questions worded as no training text words them, a "
                  "second question in the same chat, and the size and exact cell of each object "
                  "that its detailed descriptions name:", "",
                  "| seed | " + " | ".join(QA_COLUMNS) + " |",
                  "|---|" + "---|" * len(QA_COLUMNS)]
        for seed, m in runs.items():
            lines.append(f"| {seed} | " + " | ".join(f"{get(m):.2f}" for get in
                                                      QA_COLUMNS.values()) + " |")
    if top:
        qa = top["qa"]
        kinds = ", ".join(f"{k} {qa[f'accuracy_{k}']:.0%}" for k in QA_KINDS)
        if "qa_heldout" in top:
            kinds += (f"; held-out wordings {top['qa_heldout']['accuracy']:.0%}, follow-up "
                      f"{top['qa_followup']['accuracy']:.0%}")
        lines += ["", "The LLM's own ceiling on the same scenes (`evaluate.slot_ceiling`: the "
                  "exact slot vectors of each scene as the visual tokens, what a perfect "
                  "projection "
                  f"would hand it): caption recall {top['caption']['object_recall']:.3f}, "
                  f"detailed failure {top['detailed']['failure_rate']:.1%}, detailed recall "
                  f"{top['detailed']['object_recall']:.3f}, Q&A {qa['accuracy']:.0%} ({kinds})."]
    return "\n".join(lines) + "\n"


def _fmt(column: str, value: float) -> str:
    return f"{value:.0f}" if column == "seconds" else f"{value:.3f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44])
    p.add_argument("--out", default="runs/demo_seeds", help="one demo folder per seed in here")
    p.add_argument("--reuse", action="store_true", help="read seeds already run in --out")
    p.add_argument("--reevaluate", action="store_true",
                   help="with --reuse: evaluate the runs found in --out again (no training)")
    harness.add_output_args(p)
    p.add_argument("--note", default="", help="a sentence printed under the table (conditions)")
    p.add_argument("--section", default=NAME,
                   help="the BENCHMARKS.md markers to write between (another machine's table)")
    p.add_argument("--title", default="", help="the section's heading (default: the seeds)")
    args = p.parse_args(argv)
    runs = {}
    for seed in args.seeds:
        folder = Path(args.out) / f"seed_{seed}"
        if args.reuse and (folder / "metrics.json").exists():
            runs[seed] = (reevaluate(folder) if args.reevaluate else
                          json.loads((folder / "metrics.json").read_text()))
        else:
            runs[seed] = run_demo(folder, seed=seed)
        print(f"seed {seed}: {json.dumps({n: get(runs[seed]) for n, get in COLUMNS.items()})}",
              flush=True)
    text = render(runs, harness.machine_line(harness.machine_info("cpu")),
                  harness.command_line("demo_seeds.py", argv), ceiling(), args.title)
    if args.note:
        text += f"\n{args.note}\n"
    print(text)
    if not args.no_write:
        targets = {str(seed): m["targets"] for seed, m in runs.items()}
        harness.write_section(Path(args.output), args.section, text, targets)
    return 0 if all(all(m["targets"].values()) for m in runs.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
