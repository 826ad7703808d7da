"""Whether this CPU computes bf16 natively: what the build's `recipe.native_bf16` decides.

The asset build runs under bf16 autocast only where bf16 is native (`BuildConfig.precision =
"auto"`). oneDNN reports bf16 support on any AVX-512 CPU, but without AVX-512 BF16 or AMX it
emulates it, so `native_bf16` reads the CPU's flags. This times the matmul the decision is about
(`[1024, 256] x [256, 688]`, one thread, the size of the tiny LLM's MLP on a batch) in float32,
bf16 and under bf16 autocast, next to the CPU's bf16 flags, oneDNN's answer and the build's.

    python benchmarks/bf16_native.py        # seconds

Writes the `bf16_native` section of BENCHMARKS.md; each machine keeps its own row (by CPU name).
"""

from __future__ import annotations

import argparse
import datetime
import time
from pathlib import Path

import harness
import torch

from minigpt4_lite.toyworld.recipe import BuildConfig, build_precision, cpu_flags

NAME = "bf16_native"


def ms_per_matmul(dtype: torch.dtype | None, n: int = 200) -> float:
    """Median milliseconds of `n` matmuls after 5 warm-up ones (the median: a 2-core machine's
    other work shows up as outliers); `dtype` None = float32 inputs under bf16 autocast (what the
    build does)."""
    a, b = torch.randn(1024, 256), torch.randn(256, 688)
    if dtype is not None:
        a, b = a.to(dtype), b.to(dtype)
    times = []
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is None):
        for i in range(n + 5):
            t0 = time.perf_counter()
            a @ b
            if i >= 5:
                times.append((time.perf_counter() - t0) * 1000)
    return sorted(times)[n // 2]


def render(runs: dict) -> str:
    lines = ["## Native bf16 on this CPU (`benchmarks/bf16_native.py`)", "",
             "One `[1024, 256] x [256, 688]` matmul on one thread (median of 200), the CPU's bf16 "
             "flags, oneDNN's answer (`_is_mkldnn_bf16_supported`) and the precision the build "
             "picks (`recipe.build_precision`).", "",
             "| CPU | bf16 flags | oneDNN says bf16 | build runs | float32 ms | bf16 ms | "
             "bf16 autocast ms | date |", "|---|---|---|---|---|---|---|---|"]
    for cpu, r in runs.items():
        lines.append(f"| {cpu} | {r['flags']} | {r['onednn']} | {r['build']} | "
                     f"{r['fp32']:.1f} | {r['bf16']:.1f} | {r['autocast']:.1f} | {r['date']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    harness.add_output_args(p)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    flags = cpu_flags()
    info = harness.machine_info("cpu")
    run = {"flags": ", ".join(sorted(flags & {"avx512_bf16", "amx_bf16", "avx512f"}))
           if flags is not None else "(not listed)",
           "onednn": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()),
           "build": build_precision(BuildConfig()),
           "fp32": ms_per_matmul(torch.float32), "bf16": ms_per_matmul(torch.bfloat16),
           "autocast": ms_per_matmul(None), "date": datetime.date.today().isoformat()}
    key = f"{info['cpu']}, {info['cores']} cores"
    if args.no_write:
        print(render({key: run}))
        return
    path = Path(args.output)
    harness.store_run(path, NAME, key, run, render)
    print(render(harness.read_section_data(path, NAME)))


if __name__ == "__main__":
    main()
