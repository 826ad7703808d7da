"""Streamed stage-1 runs for tests/test_streaming.py, in their own processes; one JSON file each.

`stream_worker.py memory LLAMA_DIR SHARDS OUT`: trains on a `ShardStream` of the shard pattern
SHARDS with 2 DataLoader workers, recording the memory (PSS) of the process and its workers after
every step.
`stream_worker.py ddp LLAMA_DIR SHARDS_DIR OUT` (under `torchrun --nproc_per_node=2`, gloo):
trains uninterrupted, then interrupted after `INTERRUPT_AT` steps and resumed (twice, from copies
of the same checkpoint), recording the samples each process trained on.
`write_shards` makes the shards both use (and the in-process tests).
"""

import io
import json
import os
import shutil
import sys

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from transformers import AutoTokenizer, LlamaForCausalLM

from minigpt4_lite.config import MiniGPT4Config, QFormerConfig, VisionConfig
from minigpt4_lite.model import MiniGPT4
from minigpt4_lite.stream import ShardStream, StreamConfig
from minigpt4_lite.train import TrainConfig, train

STEPS, INTERRUPT_AT, BATCH = 6, 3, 3
WORDS = ["red", "blue", "green", "circle", "star", "square", "small", "a", "and"]


def write_shards(folder, prefix: str, n_shards: int, per_shard: int, size: int = 16,
                 quality: int = 90, seed: int = 0) -> str:
    """`n_shards` tars of `per_shard` noise JPEGs (`size` px) + captions; returns the url pattern.

    Noise does not compress: a 256 px JPEG at quality 95 is about 80 KB, as a LAION image.
    """
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(16):  # a few distinct images, cycled: writing stays fast
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(
            buf, "JPEG", quality=quality)
        images.append(buf.getvalue())
    os.makedirs(folder, exist_ok=True)
    with wds.ShardWriter(f"{folder}/{prefix}-%05d.tar", maxcount=per_shard, verbose=0) as sink:
        for i in range(n_shards * per_shard):
            words = " ".join(rng.choice(WORDS, 4))
            sink.write({"__key__": f"{prefix}{i:06d}", "jpg": images[i % len(images)],
                        "json": json.dumps({"caption": f"A {words}."}).encode()})
    return f"{folder}/{prefix}-{{00000..{n_shards - 1:05d}}}.tar"


def tiny_model(llama_dir) -> MiniGPT4:
    torch.manual_seed(0)  # identical replicas on every rank
    cfg = MiniGPT4Config(
        vision=VisionConfig(image_size=20, patch_size=10, width=16, layers=1, heads=2, mlp=32),
        qformer=QFormerConfig(hidden=16, layers=2, heads=2, mlp=32, num_query_tokens=4))
    return MiniGPT4(cfg, LlamaForCausalLM.from_pretrained(llama_dir),
                    AutoTokenizer.from_pretrained(llama_dir))


def pss_mb(pid: int) -> float:
    """Proportional set size of `pid` and its children (the DataLoader workers), in MB: pages
    the workers share with the parent after the fork are counted once."""
    pids = [pid] + [int(c) for c in open(f"/proc/{pid}/task/{pid}/children").read().split()]
    total = 0
    for p in pids:
        try:
            for line in open(f"/proc/{p}/smaps_rollup"):
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
        except FileNotFoundError:  # a worker that just exited
            pass
    return total / 1024


def memory(llama_dir, shards, out) -> None:
    torch.set_num_threads(1)  # 2 cores: the workers decode while this process trains
    model = tiny_model(llama_dir)
    stream = ShardStream(StreamConfig(shards, shuffle_buffer=32, workers=2))
    steps = int(os.environ.get("STREAM_STEPS", "80"))
    cfg = TrainConfig(steps=steps, batch_size=16, lr=1e-2, min_lr=1e-3, warmup_steps=5)
    pss = []
    train(model, stream, cfg, callback=lambda record: pss.append(pss_mb(os.getpid())))
    with open(f"{out}/memory.json", "w") as f:
        json.dump({"pss_mb": pss, "samples": steps * cfg.batch_size}, f)


class Recorded:
    """A stream that notes the samples of each batch it gives `train`, and where it started."""

    def __init__(self, stream: ShardStream, stop_at: int | None = None):
        self.stream, self.stop_at, self.batches_seen, self.starts = stream, stop_at, [], []

    def batches(self, model, cfg, rank=0, world=1, start_step=0):
        self.starts.append([rank, world, start_step])
        for batch in self.stream.batches(model, cfg, rank, world, start_step):
            self.batches_seen.append(batch["stream"])
            yield batch

    def callback(self, record):
        if record["step"] == self.stop_at:
            raise KeyboardInterrupt  # as a Ctrl-C right after that step


def ddp(llama_dir, shards_dir, out) -> None:
    import torch.distributed as dist
    from accelerate import Accelerator

    acc = Accelerator(cpu=True)
    rank = acc.process_index
    stream = ShardStream(StreamConfig(
        {"laion": (f"{shards_dir}/laion-{{00000..00023}}.tar", 115),
         "ccsbu": (f"{shards_dir}/ccsbu-{{00000..00007}}.tar", 14)}, shuffle_buffer=8, workers=1))
    cfg = dict(stage=1, steps=STEPS, batch_size=BATCH, lr=1e-2, min_lr=1e-3, warmup_steps=2)

    def gather(t: torch.Tensor) -> list[torch.Tensor]:
        ts = [torch.zeros_like(t) for _ in range(acc.num_processes)]
        dist.all_gather(ts, t.contiguous())
        return ts

    def run(folder: str, stop_at: int | None = None) -> tuple[Recorded, list, torch.Tensor]:
        model, data = tiny_model(llama_dir), Recorded(stream, stop_at)
        history = []
        try:
            history = train(model, data, TrainConfig(**cfg, out_dir=f"{out}/{folder}"),
                            callback=data.callback)
        except KeyboardInterrupt:
            dist.barrier()  # every process has saved its part before anyone resumes
        return data, history, model.llama_proj.weight.detach().clone()

    full, full_history, full_weight = run("full")
    first, _, _ = run("part", stop_at=INTERRUPT_AT)
    if rank == 0:
        shutil.copytree(f"{out}/part", f"{out}/part2")
    dist.barrier()
    resumed, history, weight = run("part")
    again, _, weight_again = run("part2")
    model = tiny_model(llama_dir)  # the stream alone, as the resumed run must have read it
    alone = stream.batches(model, TrainConfig(**cfg), rank, acc.num_processes, INTERRUPT_AT)
    expected = [next(alone)["stream"]["keys"] for _ in range(STEPS - INTERRUPT_AT)]
    alone.close()

    def keys(data):
        return [b["keys"] for b in data.batches_seen]

    result = {
        "rank": rank, "world": acc.num_processes, "main_pid": os.getpid(),
        "full": keys(full), "interrupted": keys(first), "resumed": keys(resumed),
        "again": keys(again), "alone": expected,
        "starts": full.starts + first.starts + resumed.starts + again.starts,
        "sources": [s for b in full.batches_seen for s in b["sources"]],
        "pids": sorted({b["pid"] for b in full.batches_seen}),
        "losses": [h["loss"] for h in full_history],
        "resumed_steps": [h["step"] for h in history],
        "replica_diff": float(max((w - full_weight).abs().max() for w in gather(full_weight))),
        "resumed_replica_diff": float(max((w - weight).abs().max() for w in gather(weight))),
        "resume_twice_diff": float((weight - weight_again).abs().max()),
        "moved": float((weight - tiny_model(llama_dir).llama_proj.weight).abs().max()),
    }
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump(result, f)
    dist.barrier()  # a gloo group alive at interpreter exit can abort the process
    dist.destroy_process_group()


if __name__ == "__main__":
    mode, *args = sys.argv[1:]
    {"memory": memory, "ddp": ddp}[mode](*args)
