"""What every benchmark shares: the machine line, interleaved timing, the BENCHMARKS.md sections,
common options, and the models the benchmarks measure. Not a benchmark itself.

A benchmark script imports it as a sibling module (`python benchmarks/x.py` puts `benchmarks/` on
`sys.path`): `import harness`. Importing it puts the repository on `sys.path` and keeps everything
offline (no model hub), so `minigpt4_lite` imports work from a plain checkout.

- machine: `machine_info` / `machine_line` (processor, cores, threads, torch, transformers, GPU);
- timing: `interleaved` runs the compared paths A B C A B C ... (drift hits every path alike),
  `matmul_timer` gives the reference rate for MFU, `wait_for_quiet` waits for a quiet machine;
- BENCHMARKS.md: each script owns one section between `<!-- name:start -->` and
  `<!-- name:end -->`, with its figures as JSON in a `<!-- name:data {...} -->` comment, so a CPU
  run and a GPU run of the same script sit side by side (`write_section`, `read_section_data`,
  `store_run`, `merge`);
- options: `add_output_args`, `add_load_args`, `check_device`, `command_line`, `stamp`;
- models: the tiny preset from `assets/` (`load_tiny`) and MiniGPT-4-7B with random weights
  (`build_random_7b`), plus a random stage-1 batch (`random_batch`, paper Sec. 3.1 layout).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import logging
import os
import platform
import re
import shlex
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TQDM_DISABLE", "1")

import transformers  # noqa: E402
from transformers import AutoModelForCausalLM, LlamaConfig  # noqa: E402

from minigpt4_lite.checkpoints import load_model  # noqa: E402
from minigpt4_lite.config import VICUNA_7B, QFormerConfig, VisionConfig, preset  # noqa: E402
from minigpt4_lite.model import MiniGPT4  # noqa: E402
from minigpt4_lite.prompts import IGNORE_INDEX, Example, collate  # noqa: E402

BENCHMARKS_MD = ROOT / "BENCHMARKS.md"
WAITING = "waiting for a lent GPU"  # what a section says for a figure not measured yet
CAPTION_TOKENS = 32  # stage-1 captions in the step benchmarks (the official max_txt_len)


# --- the machine ----------------------------------------------------------------------------------
def machine_info(device: str) -> dict:
    """Processor, cores, threads, torch version and (on CUDA) the GPU name."""
    cpu = platform.processor()
    if not cpu:  # empty on many Linux systems: read the model name
        with contextlib.suppress(OSError):
            cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo")
                        if ln.startswith("model name")), "")
    info = {"cpu": cpu or platform.machine(), "cores": os.cpu_count(),
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "transformers": transformers.__version__}
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def machine_line(info: dict) -> str:
    """One line for a section: `GPU; CPU, N cores (T torch threads); torch x, transformers y`."""
    gpu = f"{info['gpu']}; " if info.get("gpu") else ""
    return (f"{gpu}{info['cpu']}, {info['cores']} cores ({info['threads']} torch threads); "
            f"torch {info['torch']}, transformers {info.get('transformers', '?')}")


# --- timing ---------------------------------------------------------------------------------------
def load_average() -> float:
    return os.getloadavg()[0]


def wait_for_quiet(max_load: float, max_wait_s: float, poll_s: float = 60.0) -> str:
    """Poll the 1-minute load average until it is below `max_load` (or give up); say how it went."""
    if max_load <= 0:
        return f"load average {load_average():.2f} (not waited for)"
    start = time.time()
    while load_average() >= max_load and time.time() - start < max_wait_s:
        print(f"load average {load_average():.2f} >= {max_load}: waiting", flush=True)
        time.sleep(poll_s)
    waited = time.time() - start
    if load_average() >= max_load:
        return (f"load average {load_average():.2f} still >= {max_load} after {waited / 60:.0f} min"
                " of waiting: measured anyway (figures are pessimistic)")
    return f"load average {load_average():.2f} at start (waited {waited / 60:.0f} min)"


def sync(device: str) -> None:
    """Wait for the GPU's queued work (a no-op on a CPU), so a timer reads finished work."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def matmul_timer(device: str, dtype: torch.dtype, n: int | None = None):
    """(call, flops): one call runs a big square matmul in `dtype` (10 of them on a GPU)."""
    n = n or (8192 if device.startswith("cuda") else 2048)
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    inner = 10 if device.startswith("cuda") else 1

    def call():
        for _ in range(inner):
            a @ b
    return call, 2 * n**3 * inner


def interleaved(fns: dict, rounds: int, warmup: int, device: str) -> dict[str, list[float]]:
    """Seconds per call of each function, run A B C A B C ... after `warmup` calls each."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync(device)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            sync(device)
            t = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t)
    return times


# --- BENCHMARKS.md sections -----------------------------------------------------------------------
SECTION_DATA = re.compile(r"<!-- (?P<name>[\w-]+):data (?P<json>\{.*?\}) -->", re.S)


def read_section_data(path: Path, name: str) -> dict:
    """The JSON results stored (as an HTML comment) in the `name` section of `path`, if any."""
    if not path.exists():
        return {}
    for m in SECTION_DATA.finditer(path.read_text()):
        if m.group("name") == name:
            with contextlib.suppress(json.JSONDecodeError):
                return json.loads(m.group("json"))
    return {}


def write_section(path: Path, name: str, body: str, data: dict | None = None) -> None:
    """Replace (or append) the `name` section of `path`; nothing else is touched."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    stored = f"\n<!-- {name}:data {json.dumps(data)} -->" if data else ""
    section = f"{start}\n{body.strip()}{stored}\n{end}"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else (
        text.rstrip("\n") + "\n\n" + section + "\n")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def publish(args: argparse.Namespace, name: str, body: str) -> None:
    """Print a section and, unless `--no-write`, write it into `--output` (`write_section`)."""
    print(body)
    if not args.no_write:
        write_section(Path(args.output), name, body)
        print(f"updated {args.output}")


def store_run(path: Path, name: str, key: str, run: dict, render_fn) -> None:
    """Keep `run` as the `key` entry of a section that holds several runs, and redraw it."""
    runs = read_section_data(path, name)
    runs[key] = run
    write_section(path, name, render_fn(runs), runs)
    print(f"wrote the {name} section of {path}")


def merge(source: Path, path: Path, name: str, render_fn) -> None:
    """Copy the GPU runs stored in `source`'s `name` section (e.g. from gpu_all.sh) into `path`.

    For the benchmarks that keep several runs per section (`render_fn` redraws it).
    """
    gpu = {k: v for k, v in read_section_data(source, name).items() if "/cuda" in k}
    if not gpu:
        raise SystemExit(f"{source} holds no GPU results for {name}.")
    runs = read_section_data(path, name)
    runs.update(gpu)
    write_section(path, name, render_fn(runs), runs)
    print(f"merged {', '.join(sorted(gpu))} into the {name} section of {path}")


# --- options --------------------------------------------------------------------------------------
def add_output_args(parser: argparse.ArgumentParser, merge_from: bool = False) -> None:
    """`--output FILE` (default BENCHMARKS.md), `--no-write`, and optionally `--merge-from FILE`."""
    parser.add_argument("--output", default=str(BENCHMARKS_MD))
    if merge_from:
        parser.add_argument("--merge-from", metavar="FILE",
                            help="copy the GPU results of FILE's section into --output and exit")
    parser.add_argument("--no-write", action="store_true", help="print only")


def add_load_args(parser: argparse.ArgumentParser) -> None:
    """`--wait-load`, `--wait-max` (see `wait_for_quiet`) and `--note` for the load line."""
    parser.add_argument("--wait-load", type=float, default=0.0,
                        help="wait until the 1-min load average is below this (0: no wait)")
    parser.add_argument("--wait-max", type=float, default=2400.0, help="seconds to wait at most")
    parser.add_argument("--note", default="", help="added to the load line of the section")


def check_device(args: argparse.Namespace) -> None:
    """Default `args.device` to CUDA if there; refuse CUDA without one, and 7B on a CPU unless
    `--smoke` (the same code path at tiny shapes)."""
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here.")
    if args.preset == "minigpt4-7b" and args.device == "cpu" and not args.smoke:
        raise SystemExit("minigpt4-7b needs CUDA (or --smoke for the same code at tiny shapes).")


def command_line(script: str, argv: list[str] | None) -> str:
    """How the benchmark was run, without where its output went."""
    args, out, skip = list(sys.argv[1:] if argv is None else argv), [], False
    for a in args:
        if skip:
            skip = False
        elif a in ("--output", "--merge-from", "--note"):
            skip = True
        elif not a.startswith(("--output=", "--merge-from=", "--note=")):
            out.append(a)
    return shlex.join(["python", f"benchmarks/{script}", *out])


def footer(script: str, argv: list[str] | None, seconds: float, device: str = "cpu") -> str:
    """The closing lines of a section: machine, command and date of the run."""
    return (f"- machine: {machine_line(machine_info(device))}; {seconds:.0f} s\n"
            f"- command: `{command_line(script, argv)}`\n"
            f"- date: {datetime.date.today().isoformat()}\n")


def stamp(run: dict, args: argparse.Namespace, load: str, script: str, argv) -> None:
    """Record the conditions of a run: load (start, end, note), machine, date, command."""
    run["load"] = load + f"; {load_average():.2f} at the end" + (
        f"; {args.note}" if args.note else "")
    run["machine"] = machine_info(args.device)
    run["date"] = datetime.date.today().isoformat()
    run["command"] = command_line(script, argv)


# --- the models measured --------------------------------------------------------------------------
def tiny_config():
    """(`preset("tiny")`, where its weights come from); a clear error if assets/ is missing."""
    cfg = preset("tiny")
    if not (Path(cfg.llm) / "config.json").exists():
        raise SystemExit(f"No tiny model in {cfg.llm}: the assets ship with the repository "
                         "(restore assets/ from git) or rebuild them with "
                         "`python -m minigpt4_lite build-assets`.")
    return cfg, "assets/ (preset tiny)"


def load_tiny(device: str = "cpu"):
    """(the tiny preset's model from assets/, where its weights come from)."""
    cfg, source = tiny_config()
    logging.getLogger("minigpt4_lite").setLevel(logging.ERROR)  # "projection untrained" warning
    torch.manual_seed(0)  # a missing projection checkpoint leaves a seeded random projection
    return load_model(cfg, device=device), source


class IdTokenizer:
    """The two ids `collate` needs, for models built with random weights and no tokenizer."""

    def __init__(self, bos_token_id: int, pad_token_id: int):
        self.bos_token_id, self.pad_token_id = bos_token_id, pad_token_id


def smoke_7b_arch() -> dict:
    """The 7B code path at tiny shapes (to check it on a CPU)."""
    return dict(VICUNA_7B, vocab_size=1024, hidden_size=64, intermediate_size=192,
                num_hidden_layers=2, num_attention_heads=4)


def smoke_visual(cfg) -> None:
    """Shrink `cfg`'s ViT and Q-Former to tiny shapes (the 7B code path, checked on a CPU)."""
    cfg.vision = VisionConfig(image_size=28, patch_size=14, width=32, layers=2, heads=4, mlp=64)
    cfg.qformer = QFormerConfig(hidden=32, layers=2, heads=4, mlp=64)


def build_random_7b(device: str, dtype: torch.dtype, smoke: bool) -> MiniGPT4:
    """MiniGPT-4-7B with random weights: LLM in `dtype`, ViT/Q-Former/projection in float32 (as
    `load_model` leaves them). `smoke` shrinks every part (same code path)."""
    cfg = preset("minigpt4-7b", dtype={torch.bfloat16: "bfloat16", torch.float16: "float16"}.get(
        dtype, "float32"))
    if smoke:
        cfg.llm_arch = smoke_7b_arch()
        smoke_visual(cfg)
    torch.manual_seed(0)
    with torch.device(device):
        llm = AutoModelForCausalLM.from_config(LlamaConfig(**cfg.llm_arch), dtype=dtype)
        model = MiniGPT4(cfg, llm, IdTokenizer(cfg.llm_arch["bos_token_id"],
                                               cfg.llm_arch["pad_token_id"]))
    with torch.no_grad():  # zero-initialised in our modules: make them random too
        for p in (model.vit.cls_token, model.vit.pos_embed, model.qformer.query_tokens):
            p.normal_(0, 0.02)
    llm.eval()
    return model


def random_batch(model: MiniGPT4, batch_size: int) -> dict:
    """A stage-1 batch `[BOS] [image] [caption]` (Sec. 3.1): random pixels and random caption ids
    (ids >= 3: no BOS/EOS/pad), `CAPTION_TOKENS` each."""
    g = torch.Generator().manual_seed(0)
    vocab, q = model.llm.config.vocab_size, model.cfg.num_visual_tokens
    bos = model.tokenizer.bos_token_id
    examples = []
    for _ in range(batch_size):
        caption = torch.randint(3, vocab, (CAPTION_TOKENS,), generator=g).tolist()
        examples.append(Example([bos] + [-1] * q + caption, [IGNORE_INDEX] * (1 + q) + caption))
    batch = collate(examples, model.tokenizer.pad_token_id)
    size = model.cfg.vision.image_size
    batch["pixels"] = torch.randn(batch_size, 3, size, size, generator=g)
    return batch


def to_device(batch: dict, device: str) -> dict:
    return {k: v.to(device) for k, v in batch.items()}
