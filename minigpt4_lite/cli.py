"""The command line: `python -m minigpt4_lite {info,demo,train,eval,chat,answer,prepare-data,...}`.

Only the CLI prints. Errors a user can cause (`MiniGPT4Error`) become one line on stderr and exit
code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from .errors import MiniGPT4Error


def cmd_info(args) -> int:
    """Build the preset on the meta device (no download, no memory) and count parameters."""
    from .checkpoints import build_meta
    from .config import preset

    counts = build_meta(preset(args.preset)).param_counts()
    if args.json:
        print(json.dumps(counts))
    else:
        print(f"MiniGPT-4 preset {args.preset!r} (built on the meta device):")
        for key, value in counts.items():
            print(f"  {key:<18} {value:>15,}")
    return 0


def _load(args, projection: str | None = None):
    """The model of `--preset`, with `--vision-qformer`, `--llm`, `--dtype`, `--projection`.

    `--projection none` asks for an untrained projection (`projection=""` in the library); without
    `--projection`, the preset's checkpoint must exist (for a real preset the error says where the
    official file is).
    """
    from .checkpoints import load_model
    from .config import preset

    given = {k: getattr(args, k, None) for k in ("vision_qformer", "llm", "quantization", "dtype")}
    overrides = {k: v for k, v in given.items() if v}
    cfg = preset(args.preset, **overrides)
    # under torchrun / accelerate launch each process loads onto its own GPU, not all onto GPU 0
    gpu = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    device = getattr(args, "device", None) or (gpu if _cuda() else "cpu")
    if projection is not None and projection.lower() == "none":
        projection = ""
    return load_model(cfg, device=device, projection=projection)


def _cuda() -> bool:
    import torch
    return torch.cuda.is_available()


def cmd_demo(args) -> int:
    """Stage 1, stage 2 and the Table-3 evaluation on the embedded ToyWorld default."""
    from .pipeline import run_demo

    metrics = run_demo(args.out, n_eval=args.n_eval, seed=args.seed)
    print(metrics["table"])
    print(f"\nseconds: {json.dumps(metrics['seconds'])}")
    for target, met in metrics["targets"].items():
        print(f"target {target}: {'met' if met else 'MISSED'}")
    print(f"metrics written to {args.out}/metrics.json")
    return 0


def cmd_train(args) -> int:
    from .data import CCSBUAlignDataset, JsonlDataset, WebDatasetCaptions
    from .toyworld import ToyWorldDataset
    from .train import recipe, train

    model = _load(args, projection=args.init_projection or "")
    template = model.cfg.template  # the stage-2 wrap of this LLM family (Vicuna or Llama-2)
    if args.mix or args.stream:
        from .stream import ShardStream, StreamConfig, parse_mix

        dataset = ShardStream(StreamConfig(parse_mix(args.mix) if args.mix else args.data,
                                           args.shuffle_buffer, workers=args.workers))
    elif args.data == "toyworld":
        dataset = ToyWorldDataset(args.stage, args.n_scenes, seed=args.seed)
    elif args.data.endswith(".jsonl"):
        dataset = JsonlDataset(args.data, stage=args.stage, skip_bad=args.skip_bad,
                               template=template)
    elif args.data.endswith(".tar") or "{" in args.data:
        dataset = WebDatasetCaptions(args.data, skip_bad=args.skip_bad)
    else:
        dataset = CCSBUAlignDataset(args.data, skip_bad=args.skip_bad, template=template)
    name = f"{args.recipe}-stage{args.stage}"
    names = ("steps", "batch_size", "lr", "grad_accum", "precision", "bucket")
    overrides = {k: getattr(args, k) for k in names if getattr(args, k) is not None}
    compile_ = {"auto": None, "on": True, "off": False}[args.compile]
    cfg = recipe(name, out_dir=args.out, seed=args.seed, save_every=args.save_every,
                 compile=compile_, **overrides)
    history = train(model, dataset, cfg)
    if history:
        print(f"stage {args.stage}: {len(history)} steps, final loss {history[-1]['loss']:.4f}; "
              f"projection saved in {args.out}")
    return 0


def cmd_eval(args) -> int:
    from . import toyworld as tw
    from .evaluate import evaluate, table3

    model = _load(args, projection=args.projection)
    scenes = tw.make_scenes("heldout", args.n_eval)
    result = evaluate(model, scenes, registers=args.registers.split(","))
    print(table3({args.projection or "preset": result}))
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


def cmd_chat(args) -> int:
    """Chat about one image: answer `--prompt` and exit, or read questions from stdin."""
    import torch

    from .chat import Chat, ChatInputError
    from .images import load_image

    if args.prompt is not None and not args.prompt.strip():
        raise ChatInputError("The --prompt is empty: give a question about the image.")
    load_image(args.image)  # a missing or broken image or bad option fails fast, before loading
    settings = _settings(args, do_sample=not args.greedy)
    model = _load(args, projection=args.projection)
    torch.manual_seed(args.seed)  # sampling is repeatable too; --greedy needs no seed
    chat = Chat(model, settings)
    chat.upload(args.image)
    if args.prompt is not None:
        chat.ask(args.prompt)
        print(chat.answer())
        return 0
    print(f"Chatting about {args.image}. Type a question and press Enter; /reset starts over, "
          "/quit (or Ctrl-D) leaves.", flush=True)
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        if line in ("/quit", "/exit"):
            break
        if line == "/reset":
            chat.reset()
            chat.upload(args.image)
            print("(conversation reset)", flush=True)
            continue
        n_notices = len(chat.notices)
        try:
            for piece in chat.stream(line):
                print(piece, end="", flush=True)
            print(flush=True)
        except ChatInputError as e:  # e.g. only "###": say so and keep chatting
            print(f"error: {e}", file=sys.stderr, flush=True)
        for notice in chat.notices[n_notices:]:
            print(f"note: {notice}", file=sys.stderr, flush=True)
    return 0


def _settings(args, do_sample: bool):
    """The `GenerationSettings` of the generation options (`_generation_options`)."""
    from .chat import GenerationSettings

    return GenerationSettings(max_new_tokens=args.max_new_tokens, num_beams=args.num_beams,
                              do_sample=do_sample, temperature=args.temperature,
                              top_p=args.top_p, repetition_penalty=args.repetition_penalty)


def cmd_answer(args) -> int:
    """Answer many images in batches; one JSON line per image, in input order."""
    import torch

    from .chat import ChatInputError
    from .infer import answer_images, read_items, write_jsonl

    if args.prompt is not None and not args.prompt.strip():
        raise ChatInputError("The --prompt is empty: give a question about the images.")
    items = read_items(args.inputs, args.prompt)  # bad inputs fail fast, before loading
    settings = _settings(args, do_sample=args.sample)
    model = _load(args, projection=args.projection)
    torch.manual_seed(args.seed)
    records = answer_images(model, items, batch_size=args.batch_size, settings=settings)
    write_jsonl(records, args.out)
    failed = sum("error" in r for r in records)
    where = "" if args.out == "-" else f" to {args.out}"
    print(f"answered {len(records) - failed} of {len(records)} images{where}"
          + (f"; {failed} failed (see their \"error\")" if failed else ""), file=sys.stderr)
    return 1 if failed else 0


def cmd_prepare_data(args) -> int:
    """Your images and captions as stage-1 webdataset shards or a stage-2 cc_sbu_align folder."""
    from .prepare import REPORT, prepare

    report = prepare(args.src, args.out, stage=args.stage, shard_size=args.shard_size,
                     max_size=args.max_size, overwrite=args.overwrite)
    skipped = ", ".join(f"{why}: {n}" for why, n in report["skipped"].items()) or "none"
    what = f"{report['shards']} shard(s)" if args.stage == 1 else "a cc_sbu_align folder"
    print(f"wrote {report['written']} pairs as {what} in {args.out} (skipped {skipped}; "
          f"details in {Path(args.out) / REPORT})")
    start = " --init-projection runs/my_stage1" if args.stage == 2 else ""
    print(f"train on them: python -m minigpt4_lite train --stage {args.stage} "
          f"--data '{report['data']}'{start} --out runs/my_stage{args.stage}")
    return 0


def cmd_curate(args) -> int:
    """The paper's stage-2 curation pipeline (Sec. 3.2) run with the stage-1 model on ToyWorld."""
    from . import toyworld as tw
    from .curate import curate

    model = _load(args, projection=args.projection)
    scenes = tw.make_scenes("train", args.n, start=args.start)
    report = curate(model, scenes, args.out)
    print(f"generated {report['generated']}, continued {report['continued']}, "
          f"kept {report['kept']} (dropped: {report['dropped'] or 'none'})")
    for name in ("raw_quality", "kept_quality"):
        q = report[name]
        if q:
            print(f"{name:>12}: object recall {q['object_recall']:.3f}, hallucination "
                  f"{q['hallucination_rate']:.3f}, repetition {q['repetition_rate']:.3f}")
    Path(args.out, "curation_report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"cc_sbu_align folder written to {args.out}")
    if args.compare:
        from .pipeline import compare_curated

        compare_curated(args.out, Path(args.out) / "comparison", n_eval=args.n_eval,
                        stage1=args.projection)
        print((Path(args.out) / "comparison" / "comparison.md").read_text())
    return 0


def cmd_ablate(args) -> int:
    """Table 5 (architectures) and Table 8 (stage-1 data amount) in miniature."""
    from .pipeline import run_ablations

    report = run_ablations(args.out, n_eval=args.n_eval, steps_scale=args.steps_scale,
                           n_train=args.n_train, seed=args.seed)
    print((Path(args.out) / "ablations.md").read_text())
    return 0 if report["rows"] else 1


def cmd_build_assets(args) -> int:
    from .toyworld.build import PLAIN, PREVIOUS, BuildConfig, build
    from .toyworld.card import write_model_card

    if args.card_only:  # re-render the model card from the files, e.g. after retraining
        print(f"model card written to {write_model_card(args.out)}")
        return 0
    recipe = PLAIN if args.plain else PREVIOUS if args.previous else {}
    seeds = {"seed": args.seed} | ({} if args.llm_seed is None else {"llm_seed": args.llm_seed})
    cfg = BuildConfig(device=args.device, steps_scale=args.steps_scale, **(recipe | seeds))
    report = build(args.out, cfg, parts=tuple(args.parts.split(",")))
    print(json.dumps({k: v for k, v in report.items() if k != "sha256"}, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .config import ASSETS, PRESETS

    parser = argparse.ArgumentParser(prog="python -m minigpt4_lite", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="parameter counts of a preset (meta device, no download)")
    p.add_argument("--preset", default="minigpt4-7b", choices=PRESETS)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("demo", help="the main job: stage 1, stage 2, Table-3 evaluation (CPU)")
    p.add_argument("--out", default="runs/demo", help="folder for projections and metrics.json")
    p.add_argument("--n-eval", type=int, default=200, help="held-out scenes to evaluate on")
    p.add_argument("--seed", type=int, default=42)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("train", help="train the projection for one stage")
    _model_options(p)
    p.add_argument("--stage", type=int, choices=(1, 2), required=True)
    p.add_argument("--data", default="toyworld",
                   help="'toyworld', a cc_sbu_align folder, a .jsonl file, or webdataset shards "
                        "(a .tar path or a brace pattern such as 'shards/{000..009}.tar')")
    p.add_argument("--recipe", default="tiny", choices=("tiny", "paper"),
                   help="step counts and learning rates: the tiny preset's or the paper's")
    p.add_argument("--out", required=True, help="folder for checkpoint.safetensors and the "
                   "exported projection; an existing checkpoint there is resumed")
    p.add_argument("--init-projection", help="start from this projection (e.g. stage 1's)")
    p.add_argument("--n-scenes", type=int, default=5000, help="ToyWorld training scenes")
    p.add_argument("--steps", type=int, help="override the recipe's number of steps")
    p.add_argument("--batch-size", type=int, help="override the per-process batch size")
    p.add_argument("--grad-accum", type=int, help="gradient accumulation steps")
    p.add_argument("--lr", type=float, help="override the peak learning rate")
    p.add_argument("--precision", choices=("auto", "no", "bf16", "fp16"))
    p.add_argument("--bucket", type=int, help="batches per length-sorted pool (default: the "
                   "recipe's, 8 for tiny, 1 = random batches for paper; BENCHMARKS.md)")
    p.add_argument("--save-every", type=int, default=100, help="steps between checkpoints")
    p.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                   help="torch.compile the frozen LLM for the run (auto: runs long enough to "
                        "pay for compiling, >= 200 steps on a GPU, >= 4,000 on a CPU; falls back "
                        "to eager if compiling fails)")
    p.add_argument("--skip-bad", action="store_true", help="skip (and count) broken samples")
    p.add_argument("--seed", type=int, default=42)
    # stage 1 at scale (docs/scale.md): shards streamed, never read into memory
    p.add_argument("--stream", action="store_true", help="stream the --data shards")
    p.add_argument("--mix", action="append", metavar="NAME=URLS:RATIO", help="a streamed source "
                   "and its sample ratio, once per source, e.g. 'laion=l/{00000..10488}.tar:115'")
    p.add_argument("--shuffle-buffer", type=int, default=1000, help="per source and worker")
    p.add_argument("--workers", type=int, default=4, help="stream decoding processes per GPU")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="evaluate on held-out ToyWorld scenes (Table-3 metrics)")
    _model_options(p)
    p.add_argument("--projection", help="projection folder/file (default: the preset's); "
                   "'none': untrained")
    p.add_argument("--n-eval", type=int, default=200)
    p.add_argument("--registers", default="caption,detailed,poem,qa",
                   help="comma-separated: caption, detailed, poem, qa")
    p.add_argument("--out", help="write the metrics JSON here")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("chat", help="chat about an image (one --prompt, or interactively)")
    _model_options(p)
    p.add_argument("--image", required=True, help="the image to talk about (a file path)")
    p.add_argument("--prompt", help="ask this, print the answer and exit (default: read stdin)")
    p.add_argument("--projection", help="our projection folder/file or an official .pth "
                   "(default: the preset's); 'none': an untrained projection, on purpose")
    p.add_argument("--greedy", action="store_true", help="greedy decoding (deterministic)")
    _generation_options(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("answer", help="answer many images in batches (JSONL of answers out)")
    _model_options(p)
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="image files, folders of images, or .jsonl files of "
                        "{\"image\": path, \"prompt\": text} lines (paths relative to the file)")
    p.add_argument("--prompt", help="the question for every image (JSONL lines may carry their "
                   "own \"prompt\")")
    p.add_argument("--projection", help="projection folder/file (default: the preset's)")
    p.add_argument("--out", default="-", help="JSONL file of {\"image\", \"prompt\", "
                   "\"answer\"} lines, in input order; an image that fails gets \"error\" "
                   "instead and the exit code is 1 (default '-': stdout)")
    p.add_argument("--batch-size", type=int, default=8, help="images per generate call")
    p.add_argument("--sample", action="store_true",
                   help="sample with --temperature / --top-p (default: greedy, repeatable)")
    _generation_options(p)
    p.set_defaults(func=cmd_answer)

    p = sub.add_parser("prepare-data", help="your images + captions as stage-1 shards or a "
                       "stage-2 cc_sbu_align folder")
    p.add_argument("src", help="a folder of images with side-car captions (cat.jpg + cat.txt), "
                   "or a .jsonl / .csv file of image,caption pairs (paths relative to the file)")
    p.add_argument("--stage", type=int, choices=(1, 2), required=True,
                   help="1: webdataset shards (jpg + json{caption}); 2: a cc_sbu_align folder "
                        "(filter_cap.json + image/{id}.jpg)")
    p.add_argument("--out", required=True, help="the folder to create")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard (stage 1)")
    p.add_argument("--max-size", type=int,
                   help="shrink images whose longer side is larger than this (pixels)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.set_defaults(func=cmd_prepare_data)

    p = sub.add_parser("curate", help="the stage-2 curation pipeline (paper Sec. 3.2) on ToyWorld")
    _model_options(p)
    p.add_argument("--projection", default=str(ASSETS / "projections" / "stage1"),
                   help="the stage-1 projection that writes the drafts")
    p.add_argument("--n", type=int, default=500, help="number of images to describe")
    p.add_argument("--start", type=int, default=50000, help="first ToyWorld train scene index")
    p.add_argument("--out", required=True, help="cc_sbu_align folder to write")
    p.add_argument("--compare", action="store_true",
                   help="then train stage 2 on the curated set and on ToyWorld's exact "
                        "descriptions of the same images, and evaluate both (DIR/comparison/)")
    p.add_argument("--n-eval", type=int, default=200,
                   help="held-out scenes for --compare's evaluation")
    p.set_defaults(func=cmd_curate)

    p = sub.add_parser("ablate", help="the paper's ablations (Tables 5 and 8) in miniature")
    p.add_argument("--out", required=True, help="folder for ablations.md and ablations.json")
    p.add_argument("--n-eval", type=int, default=100, help="held-out scenes per row")
    p.add_argument("--n-train", type=int, default=5000, help="ToyWorld training scenes")
    p.add_argument("--steps-scale", type=float, default=1.0,
                   help="scale the training steps (CI runs a reduced version)")
    p.add_argument("--seed", type=int, default=42)
    p.set_defaults(func=cmd_ablate)

    p = sub.add_parser("build-assets", help="rebuild assets/ (tokenizer, tiny LLM, ViT+Q-Former)")
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--steps-scale", type=float, default=1.0,
                   help="scale every step count (small values: a quick miniature build)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--llm-seed", type=int, help="the LLM's own seed (default: BuildConfig's)")
    p.add_argument("--parts", default="llm,vision",
                   help="what to rebuild: llm, vision or both (the rest is read from --out)")
    p.add_argument("--card-only", action="store_true",
                   help="build nothing: re-render OUT/README.md (the model card) from "
                        "OUT/build_report.json and the files, e.g. after retraining projections/")
    which = p.add_mutually_exclusive_group()  # the build recipe
    which.add_argument("--plain", action="store_true",
                        help="the earlier, slower recipe: random batches, no torch.compile, no "
                             "multi-turn Q&A dialogues (see toyworld.recipe.PLAIN)")
    which.add_argument("--previous", action="store_true",
                        help="the recipe of the assets shipped until 2026-11-27: fused attention, "
                             "no slot captions, no words objective, 38 min on a 2-core CPU (see "
                             "toyworld.recipe.PREVIOUS)")
    p.set_defaults(func=cmd_build_assets)
    return parser


def _model_options(p) -> None:
    from .config import DTYPES, PRESETS

    p.add_argument("--preset", default="tiny", choices=PRESETS)
    p.add_argument("--vision-qformer", help="HF BLIP-2 checkpoint (hub id or folder)")
    p.add_argument("--llm", help="HF causal LM with its tokenizer (hub id or folder)")
    p.add_argument("--quantization", choices=("none", "8bit", "4bit"),
                   help="load the LLM in 8/4-bit with bitsandbytes")
    p.add_argument("--device", help="cpu or cuda (default: cuda if available)")
    p.add_argument("--dtype", choices=DTYPES,
                   help="the LLM's dtype (default: the preset's; the real presets' 'auto' is "
                        "float16 on CUDA, as the official code, and float32 on a CPU)")


def _generation_options(p) -> None:
    """The generation settings (defaults: the official demo's, docs/official.md)."""
    p.add_argument("--max-new-tokens", type=int, default=300)
    p.add_argument("--num-beams", type=int, default=1)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0, help="seed for sampling")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except MiniGPT4Error as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
