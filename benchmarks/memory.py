"""Peak GPU memory of MiniGPT-4-7B in bf16, 8-bit and 4-bit (bitsandbytes): chat and stage 1.

Random weights: a Vicuna-7B-shaped LLaMA is saved once to a temporary folder and loaded through
the library's `load_llm` (8-bit/4-bit through the same `BitsAndBytesConfig` as `--quantization`);
ViT-g, Q-Former and projection are random and placed as `load_model` places them (on the GPU, in
float32). For each mode it records `torch.cuda.max_memory_allocated` for:
- chat: encode one image, then `chat.generate` greedy with the `Chat` prompt, batch 1;
- a stage-1 step (forward + backward + AdamW on the projection) under bf16 autocast as `train`
  does, with the frozen features precomputed (the default feature cache) and from pixels.

    python benchmarks/memory.py                  # needs CUDA; on a CPU it says so and exits 0
    python benchmarks/memory.py --smoke          # the same code at tiny shapes, no figures

Prints a table and writes the `memory` section of BENCHMARKS.md (between its markers only).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import logging
import shutil
import tempfile
import time
from pathlib import Path

import harness
import torch
from harness import WAITING, machine_line
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from minigpt4_lite import chat as C
from minigpt4_lite.checkpoints import load_llm
from minigpt4_lite.config import preset
from minigpt4_lite.model import MiniGPT4
from minigpt4_lite.prompts import CONV_VISION, IMAGE_MESSAGE

NAME = "memory"
MODES = ("none", "8bit", "4bit")
GIB = 2**30


def mem(device: str) -> float:
    return torch.cuda.memory_allocated() / GIB if device == "cuda" else float("nan")


def peak(device: str) -> float:
    return torch.cuda.max_memory_allocated() / GIB if device == "cuda" else float("nan")


def reset(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def save_random_llm(folder: Path, smoke: bool, device: str) -> None:
    """A Vicuna-7B-shaped LLaMA with random bf16 weights + the tiny tokenizer, HF layout."""
    cfg = preset("minigpt4-7b")
    arch = harness.smoke_7b_arch() if smoke else cfg.llm_arch
    torch.manual_seed(0)
    with torch.device(device):
        llm = AutoModelForCausalLM.from_config(LlamaConfig(**arch), dtype=torch.bfloat16)
    llm.save_pretrained(folder)
    del llm
    tiny, _ = harness.tiny_config()
    AutoTokenizer.from_pretrained(tiny.llm).save_pretrained(folder)


def build(folder: Path, mode: str, device: str, smoke: bool) -> tuple[MiniGPT4, dict]:
    cfg = preset("minigpt4-7b", llm=str(folder), quantization=mode, dtype="bfloat16")
    if smoke:
        harness.smoke_visual(cfg)
    before = mem(device)
    llm, tok = load_llm(str(folder), quantization=mode, dtype="bfloat16", device=device)
    llm_gib = mem(device) - before
    with torch.device(device):  # as load_model: ViT, Q-Former, projection on the device, fp32
        model = MiniGPT4(cfg, llm, tok)
    return model, {"llm_weights_gib": llm_gib,
                   "visual_weights_gib": mem(device) - before - llm_gib}


def chat_peak(model: MiniGPT4, device: str, new_tokens: int) -> float:
    reset(device)
    size = model.cfg.vision.image_size
    pixels = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    conv = CONV_VISION.copy()
    conv.append(conv.roles[0], f"{IMAGE_MESSAGE} Describe this image in detail.")
    conv.append(conv.roles[1], None)
    with torch.no_grad():
        embeds = model.encode_image(pixels)
    C.generate(model, [conv.prompt()], embeds,
               C.GenerationSettings(do_sample=False, max_new_tokens=new_tokens))
    return peak(device)


def step_peak(model: MiniGPT4, device: str, batch_size: int, cached: bool) -> float:
    """One stage-1 step under bf16 autocast (as `train` on a GPU)."""
    batch = harness.to_device(harness.random_batch(model, batch_size), device)
    model.train()
    amp = torch.autocast(device_type=device, dtype=torch.bfloat16)
    if cached:
        with torch.no_grad(), amp:
            batch["features"] = model.visual_features(batch.pop("pixels"))
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-4)
    reset(device)
    with amp:
        loss = model(batch).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    loss.item()
    result = peak(device)
    model.eval()
    return result


def measure(args) -> dict:
    device = args.device
    folder = Path(tempfile.mkdtemp(prefix="mgpt4-mem-", dir=args.tmp))
    rows = {}
    try:
        t = time.perf_counter()
        save_random_llm(folder, args.smoke, device)
        print(f"random LLM saved in {time.perf_counter() - t:.0f} s")
        reset(device)
        for mode in args.modes:
            t = time.perf_counter()
            row = {}
            try:
                model, row = build(folder, mode, device, args.smoke)
                row["chat_peak_gib"] = chat_peak(model, device, args.new_tokens)
                row["step_cache_peak_gib"] = step_peak(model, device, args.batch, cached=True)
                row["step_pixels_peak_gib"] = step_peak(model, device, args.batch,
                                                        cached=False)
            except torch.cuda.OutOfMemoryError as e:
                row["error"] = f"out of memory: {str(e).splitlines()[0][:120]}"
            except Exception as e:  # noqa: BLE001 - recorded in the table, next mode goes on
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
            row["seconds"] = time.perf_counter() - t
            rows[mode] = row
            print(mode, row, flush=True)
            model = None
            reset(device)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return rows


def table(rows: dict) -> str:
    names = {"none": "bf16", "8bit": "8-bit (LLM.int8)", "4bit": "4-bit NF4 (bf16 compute)"}
    out = ["| LLM | LLM weights | ViT + Q-Former + proj (fp32) | chat peak | stage-1 step peak, "
           "cache | stage-1 step peak, pixels |", "|---|---|---|---|---|---|"]
    for mode, r in rows.items():
        if "error" in r and "llm_weights_gib" not in r:
            out.append(f"| {names[mode]} | {r['error']} | | | | |")
            continue
        cells = [r.get(k) for k in ("llm_weights_gib", "visual_weights_gib", "chat_peak_gib",
                                    "step_cache_peak_gib", "step_pixels_peak_gib")]
        text = [f"{c:.2f} GiB" if isinstance(c, float) else (r.get("error", "-")) for c in cells]
        out.append(f"| {names[mode]} | " + " | ".join(text) + " |")
    return "\n".join(out)


def render(r: dict | None) -> str:
    out = ["## Peak GPU memory, MiniGPT-4-7B (`benchmarks/memory.py`)", "",
           "`torch.cuda.max_memory_allocated`, random weights loaded through `load_llm` "
           "(bf16 / bitsandbytes 8-bit / 4-bit); ViT-g + Q-Former + projection in float32 on the "
           "GPU as `load_model` places them. Chat: one image, greedy `chat.generate`, batch 1. "
           "Stage-1 step: forward + backward + AdamW on the projection, bf16 autocast, 32 caption "
           "tokens. Reference (official low-resource mode, ViT on the CPU): about 11.5 GB for "
           "7B in 8-bit.", ""]
    if r is None:
        return "\n".join(out + [f"**{WAITING}.** Command: `python benchmarks/memory.py` (run by "
                                "`benchmarks/gpu_all.sh`).", ""])
    out += [f"- machine: {machine_line(r['machine'])}",
            f"- command: `{r['command']}`; date {r['date']}; stage-1 batch {r['batch']}, "
            f"chat {r['new_tokens']} new tokens", "", table(r["rows"]), ""]
    return "\n".join(out)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--batch", type=int, default=64, help="stage-1 batch (default 64)")
    parser.add_argument("--new-tokens", type=int, default=32, help="chat tokens to generate")
    parser.add_argument("--tmp", default=None, help="folder for the random 7B (13.5 GB)")
    parser.add_argument("--smoke", action="store_true",
                        help="run the code at tiny shapes on any device; no figures written")
    harness.add_output_args(parser, merge_from=True)
    args = parser.parse_args(argv)
    if args.merge_from:
        data = harness.read_section_data(Path(args.merge_from), NAME)
        if not data.get("run"):
            raise SystemExit(f"{args.merge_from} holds no GPU figures for {NAME}.")
        harness.write_section(Path(args.output), NAME, render(data["run"]), data)
        print(f"merged the {NAME} figures into {args.output}")
        return
    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        print("memory.py measures GPU memory and needs CUDA; nothing to do on this machine.")
        path = Path(args.output)
        if not args.no_write and not harness.read_section_data(path, NAME):  # keep GPU results
            harness.write_section(path, NAME, render(None))
        return
    args.device = "cuda" if cuda else "cpu"
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    logging.getLogger("minigpt4_lite").setLevel(logging.ERROR)
    rows = measure(args)
    r = {"rows": rows, "machine": harness.machine_info(args.device), "batch": args.batch,
         "new_tokens": args.new_tokens, "date": datetime.date.today().isoformat(),
         "command": harness.command_line("memory.py", argv)}
    print(table(rows))
    if args.no_write or args.smoke:
        return
    harness.write_section(Path(args.output), NAME, render(r), {"run": r})
    print(f"wrote the {NAME} section of {Path(args.output)}")


if __name__ == "__main__":
    main()
