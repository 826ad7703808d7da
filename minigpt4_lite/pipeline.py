"""The whole two-stage story on the embedded default: the `demo` main job (paper Sec. 3 and 4).

Stage 1 aligns the projection on short captions; stage 2 finetunes it on detailed answers in the
conversation template; both models are evaluated on the same held-out scenes with the detailed
description prompt, a poem prompt, captions and Q&A, and reported like the paper's Table 3.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import time
from pathlib import Path

import torch

from . import toyworld as tw
from .checkpoints import load_model
from .config import preset
from .data import CCSBUAlignDataset
from .evaluate import evaluate, qa_table, scene_features, table3
from .toyworld import ToyWorldDataset
from .train import recipe, train

log = logging.getLogger(__name__)


# What the demo must show on a 2-core CPU (the paper's Table 3 in miniature): the stage-1 model
# aligned (captions name the objects), and stage 2 at least halving the detailed failures.
DEMO_TARGETS = {
    "stage-1 caption recall >= 0.95": lambda m: m["stage1"]["caption"]["object_recall"] >= 0.95,
    "stage-2 detailed recall >= 0.95": lambda m: m["stage2"]["detailed"]["object_recall"] >= 0.95,
    "stage-2 hallucination <= 0.03":
        lambda m: m["stage2"]["detailed"]["hallucination_rate"] <= 0.03,
    "stage-2 failure <= 0.10": lambda m: m["stage2"]["detailed"]["failure_rate"] <= 0.10,
    "stage-2 failure <= half of stage 1's": lambda m: (
        m["stage2"]["detailed"]["failure_rate"] <= m["stage1"]["detailed"]["failure_rate"] / 2),
    "total <= 300 s": lambda m: m["seconds"]["total"] <= 300,
}


STAGE1_REGISTERS = ("caption", "detailed", "poem", "qa")
STAGE2_REGISTERS = (*STAGE1_REGISTERS, "qa_heldout", "qa_followup")


def demo_targets(metrics: dict) -> dict[str, bool]:
    """Which of `DEMO_TARGETS` a demo run's metrics meet."""
    return {name: bool(check(metrics)) for name, check in DEMO_TARGETS.items()}


def demo_table(stage1: dict, stage2: dict) -> str:
    """The demo's report: Table 3 in miniature, then stage 2's short answers by kind."""
    return (table3({"stage 1 only": stage1, "stage 1 + stage 2": stage2})
            + "\n\nStage 2, short questions (strict scoring):\n\n" + qa_table(stage2))


def run_demo(out: str | Path = "runs/demo", n_eval: int = 200, seed: int = 42,
             n_train: int = 5000, device: str = "cpu", bucket: int | None = None) -> dict:
    """Train stage 1 then stage 2 on ToyWorld, evaluate both, write `out/metrics.json`.

    `bucket`: batches per length-sorted pool (`TrainConfig.bucket`); None = the recipes' own (8),
    1 = independent random batches."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    torch.manual_seed(seed)  # the untrained projection's initialisation
    model = load_model(preset("tiny"), device=device, projection="")
    pools = {} if bucket is None else {"bucket": bucket}  # None: the recipes' own pools
    stage1_cfg, stage2_cfg = (recipe(f"tiny-stage{n}", seed=seed, out_dir=str(out / f"stage{n}"),
                                     **pools) for n in (1, 2))
    train(model, ToyWorldDataset(1, n_train, seed=seed), stage1_cfg, resume=False)
    t1 = time.time()
    scenes = tw.make_scenes("heldout", n_eval)
    features = scene_features(model, scenes)
    stage1 = evaluate(model, scenes, features=features, registers=STAGE1_REGISTERS)
    t2 = time.time()
    train(model, ToyWorldDataset(2, n_train, seed=seed), stage2_cfg, resume=False)
    t3 = time.time()
    # stage 2 also answers questions worded as no training text words them, and a follow-up
    stage2 = evaluate(model, scenes, features=features, registers=STAGE2_REGISTERS)
    t4 = time.time()
    metrics = {
        "seconds": {"stage1": round(t1 - t0, 1), "stage2": round(t3 - t2, 1),
                    "eval": round((t2 - t1) + (t4 - t3), 1), "total": round(t4 - t0, 1)},
        "stage1": stage1, "stage2": stage2, "n_eval": n_eval, "seed": seed,
        "device": device, "torch_threads": torch.get_num_threads(), "bucket": stage2_cfg.bucket,
    }
    metrics["table"] = demo_table(stage1, stage2)
    metrics["targets"] = demo_targets(metrics)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


# --- the paper's ablations in miniature (Table 5 and Table 8) ---------------------------------
ARCHITECTURES = {  # name -> config overrides (paper Table 5 rows)
    "linear (MiniGPT-4)": {},
    "3-layer MLP": {"projection": "mlp"},
    "no Q-Former": {"use_qformer": False},
    "finetuned Q-Former": {"freeze_qformer": False},
}
PAPER_TABLE5 = {"linear (MiniGPT-4)": "58.2 / 32.2", "no Q-Former": "56.9 / 33.4",
                "3-layer MLP": "49.7 / 31.0", "finetuned Q-Former": "52.1 / 28.0"}
PAPER_TABLE8 = {0.1: 1.62, 0.3: 2.15, 0.5: 2.26, 1.0: 2.22}


def train_and_evaluate(overrides: dict, scenes, n_train: int = 5000, fraction: float = 1.0,
                       steps_scale: float = 1.0, seed: int = 42) -> dict:
    """Stage 1 (on `fraction` of the caption data) + stage 2, then evaluate on `scenes`."""
    torch.manual_seed(seed)
    model = load_model(preset("tiny", **overrides), projection="")
    t0 = time.time()
    steps = lambda name: max(2, int(recipe(name).steps * steps_scale))  # noqa: E731
    train(model, ToyWorldDataset(1, max(8, int(n_train * fraction)), seed=seed),
          recipe("tiny-stage1", seed=seed, steps=steps("tiny-stage1")), resume=False)
    train(model, ToyWorldDataset(2, n_train, seed=seed),
          recipe("tiny-stage2", seed=seed, steps=steps("tiny-stage2")), resume=False)
    seconds = time.time() - t0
    result = evaluate(model, scenes, registers=("caption", "detailed", "qa"))
    return {**result, "train_seconds": round(seconds, 1),
            "trainable_params": model.param_counts()["trainable_params"]}


def run_ablations(out: str | Path = "runs/ablations", n_eval: int = 100,
                  steps_scale: float = 1.0, n_train: int = 5000, seed: int = 42,
                  architectures: tuple[str, ...] = tuple(ARCHITECTURES),
                  fractions: tuple[float, ...] = (0.1, 0.3, 0.5)) -> dict:
    """Every Table-5 architecture and the Table-8 stage-1 data fractions, same budget and scenes.

    The linear row doubles as the 100% data row; `architectures`/`fractions` pick a subset.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    scenes = tw.make_scenes("heldout", n_eval)
    rows = {}
    for name in architectures:
        log.info("ablation: %s", name)
        rows[name] = train_and_evaluate(ARCHITECTURES[name], scenes, n_train, 1.0, steps_scale,
                                        seed)
    for fraction in fractions:
        rows[f"stage-1 data {fraction:.0%}"] = train_and_evaluate(
            {}, scenes, n_train, fraction, steps_scale, seed)
    if "linear (MiniGPT-4)" in rows:
        rows["stage-1 data 100%"] = rows["linear (MiniGPT-4)"]
    report = {"rows": rows, "n_eval": n_eval, "steps_scale": steps_scale, "seed": seed,
              "n_train": n_train}
    (out / "ablations.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "ablations.md").write_text(ablation_markdown(report))
    return report


def ablation_markdown(report: dict) -> str:
    """The ablation tables next to the paper's numbers."""
    lines = ["| architecture | Q&A acc. | detailed recall | hallucination | detailed failure "
             "| trainable params | train s | paper AOK-VQA / GQA |",
             "|---|---|---|---|---|---|---|---|"]
    rows = report["rows"]
    for name in (n for n in ARCHITECTURES if n in rows):
        r = rows[name]
        lines.append(f"| {name} | {r['qa']['accuracy']:.3f} | {r['detailed']['object_recall']:.3f}"
                     f" | {r['detailed']['hallucination_rate']:.3f} | "
                     f"{r['detailed']['failure_rate']:.3f} | {r['trainable_params']:,} | "
                     f"{r['train_seconds']:.0f} | {PAPER_TABLE5[name]} |")
    lines += ["", "| stage-1 data | caption recall (final model) | detailed recall | Q&A acc. "
              "| detailed failure | train s "
              "| paper #GT captions covered |", "|---|---|---|---|---|---|---|"]
    for fraction, paper in PAPER_TABLE8.items():
        r = rows.get(f"stage-1 data {fraction:.0%}")
        if r is None:
            continue
        lines.append(f"| {fraction:.0%} | {r['caption']['object_recall']:.3f} | "
                     f"{r['detailed']['object_recall']:.3f} | {r['qa']['accuracy']:.3f} | "
                     f"{r['detailed']['failure_rate']:.3f} | {r['train_seconds']:.0f} | {paper} |")
    se = 0.5 / max(1, report["n_eval"]) ** 0.5  # the largest standard error of a share
    lines.append(f"\n{report['n_eval']} held-out scenes, steps scale {report['steps_scale']}, "
                 f"seed {report['seed']}. A share measured on {report['n_eval']} scenes has a "
                 f"standard error of up to {se:.2f}: read smaller gaps as ties.\n")
    discussion = ablation_discussion(report)
    if discussion:
        lines += ["## Where ToyWorld agrees with the paper, and where not", "", *discussion, ""]
    return "\n".join(lines)


def _verdict(row: dict, base: dict, tie: float) -> str:
    """"better than" / "worse than" / "about equal to" / "mixed against" the base row, judged on
    Q&A accuracy (the paper's tables are VQA scores) and the detailed-description failure rate
    (which folds in recall and hallucination); differences under `tie` (the largest standard
    error of a share measured on the evaluated scenes) count as equal."""
    dq = row["qa"]["accuracy"] - base["qa"]["accuracy"]
    df = base["detailed"]["failure_rate"] - row["detailed"]["failure_rate"]  # > 0: fewer failures
    better = [d > 0 for d in (dq, df) if abs(d) >= tie]
    if not better:
        return "about equal to"
    if all(better):
        return "better than"
    return "worse than" if not any(better) else "mixed against"


# The paper's Table 5 verdicts against the linear projection, in `_verdict`'s words and numbers.
PAPER_VERDICTS = {
    "3-layer MLP": ("worse than", "worse on both (49.7 / 31.0 vs 58.2 / 32.2)"),
    "no Q-Former": ("mixed against", "mixed (-1.3 on AOK-VQA, +1.2 on GQA)"),
    "finetuned Q-Former": ("worse than", "worse on both (52.1 / 28.0 vs 58.2 / 32.2)"),
}
# Possible reasons for a row that came out *worse* than the linear one here. They are not
# measured, so `ablation_discussion` prints them only for a worse (or mixed) row, and labelled.
COMMENTARY_IF_WORSE = {
    "3-layer MLP": "the extra layers are learnt from the same small data and steps as the "
                   "linear one",
    "no Q-Former": "the projection then reads 4 concatenated ViT patches per token and must "
                   "rebuild from raw patches the one-slot-per-cell inputs our LLM was pretrained "
                   "on; the paper's Vicuna had no such prior",
    "finetuned Q-Former": "the Q-Former then trains at the projection's learning rate, which "
                          "moves the features the rest was built on",
}
COMMENTARY = "*Commentary, not measured*"


def _fraction_rows(rows: dict) -> list[tuple[float, dict]]:
    """The `stage-1 data N%` rows as (fraction, row), smallest fraction first."""
    return sorted((float(k.split()[-1].rstrip("%")) / 100, r)
                  for k, r in rows.items() if k.startswith("stage-1 data"))


def ablation_discussion(report: dict) -> list[str]:
    """Sentences comparing each ablation with the linear row, against the paper's direction.

    Every figure and verdict is computed from the measured rows (paper Table 5 and Table 8 give
    the paper's side). Explanations that are not measured are printed only where they fit the
    measured verdict, and are marked as commentary.
    """
    rows, base_name = report["rows"], "linear (MiniGPT-4)"
    if base_name not in rows:
        return []
    base = rows[base_name]
    tie = 0.5 / max(1, report["n_eval"]) ** 0.5
    out = []
    for name in ("3-layer MLP", "no Q-Former", "finetuned Q-Former"):
        if name not in rows:
            continue
        r = rows[name]
        ours = _verdict(r, base, tie)
        paper_verdict, paper_words = PAPER_VERDICTS[name]
        ratio = r["trainable_params"] / max(1, base["trainable_params"])
        line = (
            f"- **{name}**: {ours} the linear projection here (Q&A {r['qa']['accuracy']:.2f} vs "
            f"{base['qa']['accuracy']:.2f}, detailed failure {r['detailed']['failure_rate']:.2f} "
            f"vs {base['detailed']['failure_rate']:.2f}, hallucination "
            f"{r['detailed']['hallucination_rate']:.3f} vs "
            f"{base['detailed']['hallucination_rate']:.3f}); the paper found it {paper_words}: "
            f"{'agrees' if ours == paper_verdict else 'differs'}. It trains "
            f"{r['trainable_params']:,} parameters ({ratio:.1f}x the linear layer's) in "
            f"{r['train_seconds']:.0f} s (linear: {base['train_seconds']:.0f} s).")
        if ours in ("worse than", "mixed against"):
            line += f" {COMMENTARY}: {COMMENTARY_IF_WORSE[name]}."
        out.append(line)
    fractions = _fraction_rows(rows)
    if len(fractions) >= 2:
        (small_f, small), (full_f, full) = fractions[0], fractions[-1]
        ours = _verdict(full, small, tie)
        curve = ", ".join(f"{f:.0%}: caption recall {r['caption']['object_recall']:.2f} / Q&A "
                          f"{r['qa']['accuracy']:.2f} / failure {r['detailed']['failure_rate']:.2f}"
                          for f, r in fractions)
        grows = ours == "better than"
        line = (f"- **Stage-1 data** ({curve}): after stage 2, the model aligned on {full_f:.0%} "
                f"of the captions is {ours} the one aligned on {small_f:.0%}; the paper's "
                "captions improve from 10% to 50% and are flat after (1.62, 2.15, 2.26, 2.22): "
                f"{'agrees' if grows else 'differs'}.")
        if not grows:
            n_train = report.get("n_train")
            seen = (f" ({max(8, int(n_train * small_f)):,} scenes, seen many times)"
                    if n_train else "")
            line += (f" {COMMENTARY}: ToyWorld's captions are simple and repetitive, so "
                     f"{small_f:.0%} of them{seen} may already be enough for the alignment, and "
                     "stage 2, the same in every row, does the rest.")
        out.append(line)
    return out


# --- curated vs ground-truth stage-2 data (paper Sec. 3.2) ---------------------------------------
def ground_truth_twin(curated: str | Path, out: str | Path, seed: int = 42) -> Path:
    """A `cc_sbu_align` folder with the curated folder's images and exact descriptions of them.

    Same JPEG files, same layout, one text per image: the only difference from the curated set is
    who wrote the text (ToyWorld's ground truth instead of the stage-1 model), so that stage 2
    reads both through the same image path (the same crops, the same lack of a feature cache).
    """
    curated, out = Path(curated), Path(out)
    annotations = []
    for image_id, _ in CCSBUAlignDataset(curated).items:  # curate names an image by its scene seed
        scene = tw.make_scene(int(image_id), exclude_combos=tw.HELDOUT_COMBOS)
        text = tw.detailed_description(scene, random.Random(f"{seed}:{image_id}"))
        annotations.append({"image_id": image_id, "caption": text})
    if (out / "image").exists():
        shutil.rmtree(out / "image")
    shutil.copytree(curated / "image", out / "image")
    (out / "filter_cap.json").write_text(json.dumps({"annotations": annotations}, indent=1))
    return out


def compare_curated(curated: str | Path, out: str | Path, n_eval: int = 200, seed: int = 42,
                    stage1: str | Path | None = None, steps: int | None = None) -> dict:
    """Stage 2 on the curated `cc_sbu_align` folder vs on ToyWorld's exact descriptions.

    Both start from the same stage-1 projection, read the same image files (the curated set's kept
    scenes, see `ground_truth_twin`) the same way (resized, never cropped) for the same number of
    steps, and are evaluated
    on the same held-out scenes. The gap is the price of writing the stage-2 data with the
    stage-1 model instead of by hand.
    """
    from .config import ASSETS

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stage1 = stage1 or ASSETS / "projections" / "stage1"
    truth = ground_truth_twin(curated, out / "ground_truth", seed=seed)
    scenes = tw.make_scenes("heldout", n_eval)
    rows = {}
    for name, folder in (("curated by the stage-1 model", curated),
                         ("ground-truth descriptions", truth)):
        ds = CCSBUAlignDataset(folder, seed=seed)
        torch.manual_seed(seed)
        model = load_model(preset("tiny"), projection=str(stage1))
        t0 = time.time()
        # No random crops for either row: a crop moves ToyWorld's grid cells, so the positions in
        # the texts would no longer match the image (`train.uses_augmentation` spares rendered
        # scenes for the same reason); both rows then reuse their frozen features.
        cfg = recipe("tiny-stage2", seed=seed, augment=False,
                     **({"steps": steps} if steps else {}))
        train(model, ds, cfg, resume=False)
        rows[name] = {**evaluate(model, scenes, registers=("detailed", "poem", "qa")),
                      "train_seconds": round(time.time() - t0, 1), "n_train": len(ds)}
    report = {"rows": rows, "n_eval": n_eval, "seed": seed, "curated": str(curated)}
    (out / "comparison.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "comparison.md").write_text(comparison_markdown(report))
    return report


def comparison_markdown(report: dict) -> str:
    lines = ["| stage-2 data | images | detailed: failure | recall | hallucination | repetition "
             "| poem: failure | Q&A acc. |", "|---|---|---|---|---|---|---|---|"]
    for name, r in report["rows"].items():
        d = r["detailed"]
        lines.append(f"| {name} | {r['n_train']} | {d['failure_rate']:.1%} | "
                     f"{d['object_recall']:.3f} | {d['hallucination_rate']:.3f} | "
                     f"{d['repetition_rate']:.3f} | {r['poem']['failure_rate']:.1%} | "
                     f"{r['qa']['accuracy']:.1%} |")
    lines.append(f"\n{report['n_eval']} held-out scenes, seed {report['seed']}; both rows start "
                 "from the same stage-1 projection, read the same image files the same way "
                 "(resized, not cropped: a crop would move ToyWorld's grid cells) and train the "
                 "same steps.\n")
    return "\n".join(lines)
