"""From the timings of `stage1_step.py` to its section of BENCHMARKS.md: FLOPs, MFU, the text.

Model FLOPs per sample follow the architecture of paper Sec. 3.1 (frozen ViT + Q-Former, one
linear projection, frozen LLM): `flops_per_sample`. MFU = those FLOPs x samples/s over the rate of
a big matmul timed in the same rounds (`path_results`). `render` draws the `stage1_step` section
from every stored run (one per preset/device, e.g. `tiny/cpu`, `minigpt4-7b/cuda`), saying
"waiting for a lent GPU" for runs not made yet. Not a benchmark itself: `stage1_step.py` imports it.
"""

from __future__ import annotations

import statistics

import harness
import torch
from harness import WAITING

from minigpt4_lite.model import MiniGPT4


# --- FLOPs and MFU --------------------------------------------------------------------------------
def _linear_weights(module: torch.nn.Module) -> int:
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, torch.nn.Linear))


def flops_per_sample(model: MiniGPT4, seq_len: int) -> dict[str, float]:
    """Model FLOPs of one sample (matmuls with weights only; attention scores not counted).

    - frozen forward, 2 x weights x tokens: ViT (patch conv + Linear weights) over the 1 + N
      image tokens; Q-Former Linear weights over the Q queries, except the cross-attention
      key/value weights, which run over the 1 + N image tokens;
    - LLM (all Linear weights, LM head included; the embedding lookup is free): forward
      2 x W x T, plus the backward into its inputs 2 x W x T (frozen: no weight gradients),
      4 x W x T in all, with T = 1 + Q + 32;
    - projection: forward 2 x W x Q, weight gradient 2 x W x Q.
    """
    v, q = model.cfg.vision, model.cfg.qformer
    n_img = v.num_patches + 1
    vit = 2 * (_linear_weights(model.vit) * n_img
               + model.vit.patch_embed.weight.numel() * v.num_patches)
    qformer = 0.0
    if model.qformer is not None:
        kv = sum(_linear_weights(layer.cross_attn.key) + _linear_weights(layer.cross_attn.value)
                 for layer in model.qformer.layers if layer.cross_attn is not None)
        qformer = 2 * ((_linear_weights(model.qformer) - kv) * q.num_query_tokens + kv * n_img)
    llm = 4 * _linear_weights(model.llm) * seq_len
    proj = 4 * _linear_weights(model.llama_proj) * model.cfg.num_visual_tokens
    return {"vision": vit + qformer, "llm": llm, "projection": proj}


def _uses_cache(name: str) -> bool:
    return name not in ("peer", "ours, no cache")


def path_results(times: dict, flops: dict, rate: float, best_rate: float, args) -> dict:
    """Per path: samples/s, ms per step, MFU, and the same for the best round; spread; vs peer."""
    results = {}
    for name, ts in times.items():
        per_step = statistics.median(ts) / args.steps
        sps = args.batch / per_step
        work = flops["llm"] + flops["projection"] + (0 if _uses_cache(name) else flops["vision"])
        results[name] = {"samples_per_s": sps, "step_ms": 1e3 * per_step,
                         "best_samples_per_s": args.batch * args.steps / min(ts),
                         "best_mfu": args.batch * args.steps / min(ts) * work / best_rate,
                         "mfu": sps * work / rate, "flops_per_sample": work,
                         "spread": (max(ts) - min(ts)) / statistics.median(ts)}
    peer_sps = results["peer"]["samples_per_s"]
    for r in results.values():
        r["vs_peer"] = r["samples_per_s"] / peer_sps
        r["best_vs_peer"] = r["best_samples_per_s"] / results["peer"]["best_samples_per_s"]
    return results


# --- the section ---------------------------------------------------------------------------------
TARGETS = {"tiny/cpu": "ours >= 1.5x the peer", "minigpt4-7b/cuda":
           "ours >= 1.3x the peer and >= 60% MFU"}


def table(run_result: dict) -> str:
    rows = ["| path | samples/s | step (ms) | vs peer | MFU | best round: samples/s, vs peer, "
            "MFU | spread | loss (check) |", "|---|---|---|---|---|---|---|---|"]
    order = ["peer", "ours", "ours, eager", "ours, no cache"]
    names = sorted(run_result["results"], key=lambda n: (order.index(n) if n in order else 9, n))
    for name in names:
        r, c = run_result["results"][name], run_result["checks"][name]
        best = (f"{r['best_samples_per_s']:.1f}, {r['best_vs_peer']:.2f}x, {r['best_mfu']:.0%}"
                if "best_mfu" in r else "")
        rows.append(f"| {name} | {r['samples_per_s']:.1f} | {r['step_ms']:.1f} | "
                    f"{r['vs_peer']:.2f}x | {r['mfu']:.1%} | {best} | {r['spread']:.0%} | "
                    f"{c['loss']:.6f} |")
    return "\n".join(rows)


def render(runs: dict) -> str:
    out = ["## Stage-1 training step: ours vs transformers' BLIP-2 (`benchmarks/stage1_step.py`)",
           "",
           "Forward + backward + AdamW on the projection only, `[BOS] [visual tokens] [32 caption "
           "tokens]`, same weights and batch in both (peer: `Blip2ForConditionalGeneration` with a "
           "LLaMA text model, built from our configs). `ours` is the library's default training "
           "path for a real stage-1 run (the paper's 20,000 steps): frozen features computed once "
           "per image (their one-time cost is given below), then `model(batch)`, with the LLM "
           "compiled (`train.compile_llm`), which `train` does by default for runs of >= 200 "
           "steps on a GPU and >= 4,000 on a CPU (where it pays for its one-time cost, see the "
           "next section); `ours, eager` is the same without compilation, the default of shorter "
           "runs such as the demo's; `ours, no cache` runs the ViT and Q-Former every step; "
           "`proposal:` rows are fast paths that are not in the library (described in "
           "`benchmarks/README.md`). Paths run interleaved (A B A B), median of the rounds.",
           "",
           "Model FLOPs per sample (attention score products not counted): frozen forward "
           "2 x weights x tokens (ViT over 1 + N image tokens; Q-Former over the Q queries, its "
           "cross-attention key/value over the image tokens); LLM 4 x W_llm x T (forward, and "
           "backward into its inputs only: no weight gradients), T = 1 + Q + 32; projection "
           "4 x W_proj x Q (forward and weight gradient). Cached paths do not count the frozen "
           "part. MFU = FLOPs x samples/s / the rate of a large matmul measured in the same run "
           "and dtype. spread = (slowest - fastest round) / median: large values mean other "
           "jobs competed for the cores.", ""]
    keys = list(runs)
    for key in ("tiny/cpu", "minigpt4-7b/cuda"):
        if key not in keys:
            keys.append(key)
    for key in keys:
        preset_name, device, *tag = key.split("/")
        r = runs.get(key)
        target = TARGETS.get("/".join(key.split("/")[:2]), "")
        if r is None:
            cmd = (f"python benchmarks/stage1_step.py --preset {preset_name} --device {device}"
                   + " --batch 64" * (preset_name == "minigpt4-7b"))
            out += [f"### {preset_name} on {device}: {WAITING}", "",
                    f"Target: {target}. Command: `{cmd}` (run by `benchmarks/gpu_all.sh`).", ""]
            continue
        f = r["flops"]
        best = max(r["results"].values(), key=lambda x: x["samples_per_s"])
        met = ""
        if key.startswith("tiny/cpu"):
            met = "met" if r["results"]["ours"]["vs_peer"] >= 1.5 else "NOT met"
        elif key.startswith("minigpt4-7b/cuda"):
            o = r["results"]["ours"]
            met = "met" if o["vs_peer"] >= 1.3 and o["mfu"] >= 0.6 else "NOT met"
        out += [f"### {preset_name} on {device} ({r['precision']}, batch {r['batch']}, "
                f"T = {r['seq_len']}){''.join(f', {t}' for t in tag)}", "",
                f"- machine: {harness.machine_line(r['machine'])}",
                f"- command: `{r['command']}`; date {r['date']}; {r['load']}",
                f"- weights: {r['weights']}; {r['rounds']} rounds x {r['steps']} steps after "
                f"{r['warmup']} warm-up steps per path",
                f"- matmul rate (timed in the same rounds): {r['matmul_flops'] / 1e12:.3f} TFLOP/s "
                f"median, {r.get('best_matmul_flops', 0) / 1e12:.3f} best; model FLOPs per sample: "
                f"LLM {f['llm'] / 1e9:.3g} G, frozen ViT + Q-Former {f['vision'] / 1e9:.3g} G, "
                f"projection {f['projection'] / 1e9:.3g} G",
                "", table(r), "",
                f"- target ({target}): **{met}** (ours {r['results']['ours']['vs_peer']:.2f}x, "
                f"MFU {r['results']['ours']['mfu']:.1%}; best path: {best['vs_peer']:.2f}x)",
                f"- frozen-feature cache, one-time: {r['cache_images_per_s']:.0f} images/s "
                "(ViT + Q-Former, no grad)" + (
                    f"; the library's `build_feature_cache` on ToyWorld (rendering included): "
                    f"{r['library_cache_images_per_s']:.0f} images/s"
                    if r.get("library_cache_images_per_s") else ""),
                f"- equivalence: {r['equivalence']}"]
        if "library_compiles" in r:
            first = r["checks"]["ours"]["first_call_s"]
            out.append("- `train` compiles the LLM by default for a 20,000-step run here: " + (
                f"yes; first compiled call (compilation) {first:.1f} s, paid once per run "
                "(runs shorter than `COMPILE_MIN_STEPS` stay eager: `ours, eager`)"
                if r["library_compiles"] else "no"))
        if r.get("peer_visual_ms"):
            peer_ms = r["results"]["peer"]["step_ms"]
            bound = peer_ms / max(peer_ms - r["peer_visual_ms"], 1e-9)
            out.append(f"- the peer's ViT + Q-Former forward takes {r['peer_visual_ms']:.1f} ms "
                       f"of its {peer_ms:.1f} ms step: skipping it (the cache) can give at most "
                       f"{bound:.2f}x; anything beyond must come from the LLM step itself")
        if r.get("make_batch_ms"):
            out.append(f"- not timed above: `train` also spends {r['make_batch_ms']:.1f} ms per "
                       "step in `make_batch` (draw samples, tokenise, stack cached features)")
        out.append("")
    return "\n".join(out)


def equivalence_line(r: dict) -> str:
    c = r["checks"]
    worst = max(v["loss_diff_vs_peer"] for v in c.values())
    gworst = max(v["grad_rel_diff_vs_peer"] for v in c.values())
    return (f"{r['precision']} loss of every path vs the peer on the same batch: max |diff| "
            f"{worst:.1e} (peer {c['peer']['loss']:.6f}); projection weight gradient max "
            f"relative diff {gworst:.1e}")
