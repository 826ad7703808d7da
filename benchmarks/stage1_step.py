"""Stage-1 training step: minigpt4-lite vs transformers' BLIP-2, same weights, same batch.

One step of stage 1 (paper Sec. 3.1) = forward + backward + AdamW step on the projection only, for
`[BOS] [visual tokens] [caption of 32 tokens]` (docs/official.md, "Sequence layout and loss"). The
peer (`peer.py`) is transformers' `Blip2ForConditionalGeneration` with a LLaMA text model of
identical shapes, holding the same weights: the LLM copied (tiny) or shared (7B, to fit one GPU).
Everything but the projection is frozen in both.

    python benchmarks/stage1_step.py --preset tiny                  # CPU, ToyWorld tiny model
    python benchmarks/stage1_step.py --preset minigpt4-7b --device cuda   # random bf16 weights
    python benchmarks/stage1_step.py --preset minigpt4-7b --smoke   # the 7B code path, tiny shapes

Paths timed, interleaved (peer, ours, peer, ours, ...) to cancel drift, median of the rounds:
- `peer`: HF BLIP-2 from pixels (ViT + Q-Former + LLM every step);
- `ours`: the library's default training path for a real stage-1 run (the paper's 20,000 steps):
  frozen features precomputed once per image (`build_feature_cache`), the step runs `model(batch)`
  on them with the LLM compiled by `speed.compile_llm` when `speed.should_compile` says `train`
  would (runs of >= 200 steps on a GPU, >= 4,000 on a CPU); the one-time costs (cache,
  compilation) are reported;
- `ours, eager`: the same without compilation (`--compile off`; the default of shorter runs,
  such as the demo's 800 steps);
- `ours, no cache`: `model(batch)` from pixels, eager;
- `--proposals`: fast paths that are NOT in the library (answer-only LM head, `torch.compile` of
  the whole LLM module), checked against the library's loss and gradients first.
On CUDA both models run under bf16 autocast, as `train` does through Accelerate (`precision`
"auto"); on CPU in float32. Model FLOPs (see `flops_per_sample`) over the step time, divided by a
matmul rate measured in the same run, gives the MFU.

Prints a table and writes the `stage1_step` section of BENCHMARKS.md (between its markers only;
the section's text is drawn by `stage1_report.py`).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import harness
import torch
import torch.nn.functional as F
from harness import CAPTION_TOKENS, interleaved, sync
from peer import build_peer, peer_input_ids
from stage1_report import equivalence_line, flops_per_sample, path_results, render, table

from minigpt4_lite.data import image_tensor
from minigpt4_lite.model import MiniGPT4
from minigpt4_lite.prompts import END_SYM, IGNORE_INDEX, build_example, collate, text_ids
from minigpt4_lite.speed import compile_llm, should_compile
from minigpt4_lite.toyworld import ToyWorldDataset
from minigpt4_lite.train import TrainConfig, build_feature_cache, make_batch, recipe

NAME = "stage1_step"


# --- data -----------------------------------------------------------------------------------------
def tiny_batch(model: MiniGPT4, batch_size: int) -> dict:
    """ToyWorld images + stage-1 captions made exactly 32 tokens long (repeated, then cut)."""
    ds = ToyWorldDataset(1, batch_size)
    samples = [ds[i] for i in range(batch_size)]
    tok, examples = model.tokenizer, []
    for s in samples:
        answer = s.answer
        while len(text_ids(tok, answer + END_SYM[1])) < CAPTION_TOKENS:
            answer += " " + s.answer
        examples.append(build_example(tok, None, answer,
                                      n_image_tokens=model.cfg.num_visual_tokens,
                                      max_txt_len=CAPTION_TOKENS))
    batch = collate(examples, tok.pad_token_id)
    batch["pixels"] = torch.stack([image_tensor(s, model.cfg.vision.image_size) for s in samples])
    return batch


# --- proposed fast paths (not in the library) -----------------------------------------------------
def answer_only_loss(model: MiniGPT4, batch: dict, body=None) -> torch.Tensor:
    """The same loss with the LM head and cross-entropy on the answer positions only.

    `MiniGPT4.forward` lets the LLM compute [B, T, vocab] logits (and upcast them) at every
    position, although only answer positions have labels. `body` replaces `model.llm.model`
    (e.g. a compiled one).
    """
    image_embeds = model.project(batch["features"])
    inputs_embeds = model.embed(batch["input_ids"], batch["image_mask"], image_embeds)
    body = body if body is not None else model.llm.model
    hidden = body(inputs_embeds=inputs_embeds,
                  attention_mask=batch["attention_mask"]).last_hidden_state
    labels = batch["labels"][:, 1:]
    keep = labels != IGNORE_INDEX
    logits = model.llm.get_output_embeddings()(hidden[:, :-1][keep])
    return F.cross_entropy(logits.float(), labels[keep])


def _forward_with(model: MiniGPT4, llm, batch: dict):
    """`MiniGPT4.forward` with another (e.g. compiled) LLM module."""
    image_embeds = model.project(batch["features"])
    inputs_embeds = model.embed(batch["input_ids"], batch["image_mask"], image_embeds)
    return llm(inputs_embeds=inputs_embeds, attention_mask=batch["attention_mask"],
               labels=batch["labels"])


def _amp_call(amp, fn, *args):
    with amp():
        return fn(*args)


# --- the two models and their batch ---------------------------------------------------------------
@dataclass
class Setup:
    """Ours and the peer on the same weights, and the batch in the form each one reads."""

    model: MiniGPT4
    peer: torch.nn.Module
    batch: dict  # tokens on the device (no pixels)
    pixels: torch.Tensor
    hf_ids: torch.Tensor  # the peer's input ids (`peer_input_ids`)
    device: str
    big: bool  # MiniGPT-4-7B (random weights) rather than the tiny preset
    precision: str  # "bf16" (autocast) or "fp32"
    weights: str  # where the weights come from, for the section

    def amp(self):
        """bf16 autocast on the 7B path (as `train` through Accelerate), else nothing."""
        if self.precision == "bf16":
            return torch.autocast(device_type=self.device.split(":")[0], dtype=torch.bfloat16)
        return contextlib.nullcontext()


def build_setup(args) -> Setup:
    """Our model (tiny from assets/, or random 7B), its batch, and the peer built from it."""
    device, big = args.device, args.preset == "minigpt4-7b"
    precision = "bf16" if (big and (device.startswith("cuda") or args.smoke)) else "fp32"
    llm_dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    if big:
        model = harness.build_random_7b(device, llm_dtype, args.smoke)
        source = "random weights" + (" (smoke: tiny shapes)" if args.smoke else "")
        batch = harness.random_batch(model, args.batch)
    else:
        model, source = harness.load_tiny(device)
        batch = tiny_batch(model, args.batch)
    peer = build_peer(model, share_llm=big, vision_dtype=llm_dtype)
    model.train()
    batch = harness.to_device(batch, device)
    pixels = batch.pop("pixels")
    return Setup(model, peer, batch, pixels, peer_input_ids(batch, peer), device, big, precision,
                 source)


def time_feature_cache(s: Setup) -> tuple[torch.Tensor, float]:
    """(frozen features of the batch, seconds): the one-time cost of the feature cache (ViT +
    Q-Former, no grad); no autocast, as `train` builds the cache (`build_feature_cache`) before
    entering Accelerate's autocast."""
    with torch.no_grad():
        s.model.visual_features(s.pixels)  # warm-up
        sync(s.device)
        t = time.perf_counter()
        features = s.model.visual_features(s.pixels)
        sync(s.device)
        return features, time.perf_counter() - t


def train_overheads(model: MiniGPT4, batch_size: int) -> tuple[float, float]:
    """(images/s of the library's `build_feature_cache` on ToyWorld, rendering included; ms per
    step of what `train` does besides the step: `make_batch` draws samples, tokenises, stacks)."""
    ds = ToyWorldDataset(1, 4 * batch_size)
    t = time.perf_counter()
    feature_cache = build_feature_cache(model, ds)
    library_cache = len(ds) / (time.perf_counter() - t)
    gen, tcfg = torch.Generator().manual_seed(0), TrainConfig(stage=1)
    make_batch_s = []
    for _ in range(5):
        t = time.perf_counter()
        make_batch(model, [ds[i] for i in range(batch_size)], tcfg, feature_cache, False, gen)
        make_batch_s.append(time.perf_counter() - t)
    return library_cache, 1e3 * statistics.median(make_batch_s)


# --- the paths and their losses -------------------------------------------------------------------
def library_paths(s: Setup, cached: dict, full: dict, skip_no_cache: bool):
    """({path: loss function}, whether `train` compiles here): the peer and the library's paths.

    `ours` is the library's default for a real stage-1 run (the paper's 20,000 steps): `train`
    compiles the LLM for runs long enough to pay for it; `ours, eager` is the default of short runs.
    """
    model, peer = s.model, s.peer

    def ours_loss(b):
        with s.amp():
            return model(b).loss

    def peer_loss():
        with s.amp():
            return peer(pixel_values=s.pixels.to(peer.vision_model.dtype), input_ids=s.hf_ids,
                        attention_mask=s.batch["attention_mask"], labels=s.batch["labels"]).loss

    library_compiles = should_compile(recipe("paper-stage1"), torch.device(s.device))
    compiled_forward = None
    if library_compiles:
        undo = compile_llm(model.llm)
        compiled_forward = model.llm.forward
        undo()

    def ours_default():
        if compiled_forward is None:
            return ours_loss(cached)
        model.llm.forward = compiled_forward  # the graph is built here; backward needs no swap
        try:
            return ours_loss(cached)
        finally:
            del model.llm.forward

    losses = {"peer": peer_loss, "ours": ours_default}
    if library_compiles:
        losses["ours, eager"] = lambda: ours_loss(cached)
    if not skip_no_cache:
        losses["ours, no cache"] = lambda: ours_loss(full)
    return losses, library_compiles


def add_proposals(losses: dict, s: Setup, cached: dict, proposals: str) -> None:
    """Add the `--proposals` paths (comma list), fast paths that are not in the library."""
    model, compiled = s.model, {}
    for p in [p for p in (proposals or "").split(",") if p]:
        if p == "answer_head":
            losses["proposal: answer-only LM head"] = (
                lambda: _amp_call(s.amp, answer_only_loss, model, cached))
        elif p == "compile":
            compiled["llm"] = torch.compile(model.llm)
            losses["proposal: compiled LLM"] = lambda: _amp_call(
                s.amp, lambda: _forward_with(model, compiled["llm"], cached).loss)
        elif p == "compile_answer_head":
            compiled["body"] = torch.compile(model.llm.model)
            losses["proposal: compiled LLM + answer-only head"] = lambda: _amp_call(
                s.amp, answer_only_loss, model, cached, compiled["body"])
        else:
            raise SystemExit(f"unknown proposal {p!r}")


def check_equivalence(losses: dict, s: Setup, no_check: bool) -> dict:
    """Every path's loss and projection gradient on the same batch, against the peer's (the first
    path); stops when a loss differs beyond float rounding unless `no_check`."""
    checks, reference = {}, None
    for name, loss_fn in losses.items():
        t = time.perf_counter()
        loss = loss_fn()
        loss.backward()
        first_call_s = time.perf_counter() - t
        proj = s.peer.language_projection if name == "peer" else s.model.llama_proj
        grad = proj.weight.grad.detach().float().clone()
        proj.weight.grad = None
        proj.bias.grad = None
        if reference is None:
            reference = (loss.item(), grad)
        diff = abs(loss.item() - reference[0])
        gdiff = ((grad - reference[1]).abs().max() / reference[1].abs().max().clamp_min(1e-30))
        checks[name] = {"loss": loss.item(), "loss_diff_vs_peer": diff,
                        "grad_rel_diff_vs_peer": float(gdiff), "first_call_s": first_call_s}
    tol = 1e-5 if s.precision == "fp32" else 5e-2
    bad = [n for n, c in checks.items() if c["loss_diff_vs_peer"] > tol * max(1, abs(
        reference[0]))]
    for name, c in checks.items():
        print(f"check {name:45s} loss {c['loss']:.7f}  |diff| {c['loss_diff_vs_peer']:.2e}  "
              f"grad rel diff {c['grad_rel_diff_vs_peer']:.2e}")
    if bad and not no_check:
        raise SystemExit(f"losses differ beyond {tol}: {bad}")
    return checks


# --- timing ---------------------------------------------------------------------------------------
def step_fn(loss_fn, opt, steps: int):
    """`steps` training steps of one path: loss, backward, AdamW, one host sync per step."""
    def step():
        for _ in range(steps):
            loss = loss_fn()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            loss.item()  # as `train`: one host sync per step
    return step


def time_paths(losses: dict, s: Setup, args) -> tuple[dict, list[float], float]:
    """Seconds per round of every path, plus the peer's ViT + Q-Former forward alone and a big
    matmul (its FLOPs returned too), all in the same interleaved rounds: they see the same
    conditions."""
    ours_opt = torch.optim.AdamW(s.model.trainable_parameters(), lr=1e-4)
    peer_opt = torch.optim.AdamW([p for p in s.peer.parameters() if p.requires_grad], lr=1e-4)
    fns = {name: step_fn(fn, peer_opt if name == "peer" else ours_opt, args.steps)
           for name, fn in losses.items()}

    def peer_visual():  # the part of the peer's step that the cache removes
        with torch.no_grad(), s.amp():
            for _ in range(args.steps):
                s.peer.get_image_features(pixel_values=s.pixels.to(s.peer.vision_model.dtype))

    dtype = torch.bfloat16 if s.precision == "bf16" and s.device.startswith("cuda") else (
        torch.float32)
    matmul, matmul_flops = harness.matmul_timer(s.device, dtype)
    times = interleaved({**fns, "peer visual forward": peer_visual, "matmul": matmul},
                        args.rounds, args.warmup, s.device)
    matmul_s = times.pop("matmul")
    if args.profile:
        profile_step(fns["ours"], s.device)
    return times, matmul_s, matmul_flops


def profile_step(step, device: str) -> None:
    """Print where the time of `step` goes (torch.profiler, top operators by self time)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device != "cpu" else [])
    with profile(activities=activities) as prof:
        step()
    key = "self_cuda_time_total" if device != "cpu" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=15))


def run(args) -> dict:
    """The whole measurement: set up, one-time costs, equivalence checks, interleaved timing."""
    s = build_setup(args)
    features, cache_s = time_feature_cache(s)
    cached, full = dict(s.batch, features=features), dict(s.batch, pixels=s.pixels)
    library_cache = make_batch_ms = None
    if not s.big:
        library_cache, make_batch_ms = train_overheads(s.model, args.batch)
    losses, library_compiles = library_paths(s, cached, full, args.skip_no_cache)
    add_proposals(losses, s, cached, args.proposals)
    checks = check_equivalence(losses, s, args.no_check)
    times, matmul_s, matmul_flops = time_paths(losses, s, args)
    rate = matmul_flops / statistics.median(matmul_s)
    best_rate = matmul_flops / min(matmul_s)
    peer_visual_ms = 1e3 * statistics.median(times.pop("peer visual forward")) / args.steps
    seq_len = s.batch["input_ids"].shape[1]
    f = flops_per_sample(s.model, seq_len)
    return {"preset": args.preset, "device": s.device, "precision": s.precision,
            "batch": args.batch, "seq_len": seq_len, "weights": s.weights, "matmul_flops": rate,
            "best_matmul_flops": best_rate,
            "peer_visual_ms": peer_visual_ms, "cache_images_per_s": args.batch / cache_s,
            "library_cache_images_per_s": library_cache, "make_batch_ms": make_batch_ms,
            "flops": f, "checks": checks,
            "results": path_results(times, f, rate, best_rate, args),
            "library_compiles": library_compiles,
            "steps": args.steps, "rounds": args.rounds, "warmup": args.warmup}


# --- command line ---------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=("tiny", "minigpt4-7b"), default="tiny")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if there)")
    parser.add_argument("--batch", type=int, default=None, help="default 32 tiny, 64 7B")
    parser.add_argument("--steps", type=int, default=3, help="steps per timed round")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=3, help="warm-up steps per path")
    parser.add_argument("--threads", type=int, default=2, help="torch threads on the CPU")
    parser.add_argument("--proposals", default="",
                        help="comma list: answer_head, compile, compile_answer_head")
    parser.add_argument("--skip-no-cache", action="store_true",
                        help="do not time ours from pixels")
    parser.add_argument("--tag", default="",
                        help="stored as a separate entry of the section (e.g. compiled)")
    parser.add_argument("--smoke", action="store_true",
                        help="7B code path at tiny shapes (CPU check); never written")
    parser.add_argument("--no-check", action="store_true", help="time even if losses differ")
    parser.add_argument("--profile", action="store_true",
                        help="print a torch.profiler table of one timed round of ours")
    harness.add_load_args(parser)
    harness.add_output_args(parser, merge_from=True)
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.merge_from:
        harness.merge(Path(args.merge_from), Path(args.output), NAME, render)
        return
    harness.check_device(args)
    args.batch = args.batch or (64 if args.preset == "minigpt4-7b" else 32)
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    load = harness.wait_for_quiet(args.wait_load, args.wait_max)
    r = run(args)
    harness.stamp(r, args, load, "stage1_step.py", argv)
    r["equivalence"] = equivalence_line(r)
    print(table(r))
    print(f"matmul {r['matmul_flops'] / 1e12:.3f} TFLOP/s; cache "
          f"{r['cache_images_per_s']:.0f} images/s; {r['load']}")
    print(r["equivalence"])
    if args.no_write or args.smoke:
        return
    key = f"{args.preset}/{args.device.split(':')[0]}" + (f"/{args.tag}" if args.tag else "")
    harness.store_run(Path(args.output), NAME, key, r, render)


if __name__ == "__main__":
    main()
