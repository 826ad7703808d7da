"""Run by tests/test_distributed.py under `torchrun --nproc_per_node=2` (gloo, CPU).

`ddp_worker.py LLAMA_DIR OUT averaging`: checks that DDP averages the projection's gradients over
processes, and that `train` keeps the replicas identical while each process draws its own batches.
`ddp_worker.py LLAMA_DIR OUT resume`: trains uninterrupted, then again interrupted (Ctrl-C after
`INTERRUPT_AT` steps) and resumed, recording the batches each process drew.
Writes one JSON file per rank.
"""

import json
import sys

import torch
import torch.distributed as dist
from accelerate import Accelerator
from transformers import AutoTokenizer, LlamaForCausalLM

from minigpt4_lite.config import MiniGPT4Config, QFormerConfig, VisionConfig
from minigpt4_lite.model import MiniGPT4
from minigpt4_lite.toyworld import ToyWorldDataset
from minigpt4_lite.train import TrainConfig, make_batch, train

llama_dir, out, mode = sys.argv[1], sys.argv[2], sys.argv[3]
acc = Accelerator(cpu=True)
rank = acc.process_index
STEPS, INTERRUPT_AT, BATCH = 6, 3, 3


def tiny_model() -> MiniGPT4:
    torch.manual_seed(0)  # identical replicas on every rank
    cfg = MiniGPT4Config(
        vision=VisionConfig(image_size=20, patch_size=10, width=16, layers=1, heads=2, mlp=32),
        qformer=QFormerConfig(hidden=16, layers=2, heads=2, mlp=32, num_query_tokens=4))
    return MiniGPT4(cfg, LlamaForCausalLM.from_pretrained(llama_dir),
                    AutoTokenizer.from_pretrained(llama_dir))


def gather(t: torch.Tensor) -> list[torch.Tensor]:
    ts = [torch.zeros_like(t) for _ in range(acc.num_processes)]
    dist.all_gather(ts, t.contiguous())
    return ts


def averaging() -> dict:
    model = tiny_model()
    ds = ToyWorldDataset(1, 40)
    tcfg = TrainConfig(stage=1, steps=2, batch_size=BATCH, lr=1e-2, warmup_steps=0)

    # 1. the local gradient of this rank's own batch, without DDP
    gen = torch.Generator().manual_seed(100 + rank)
    batch = make_batch(model, [ds[int(i)] for i in torch.randint(len(ds), (BATCH,), generator=gen)],
                       tcfg, None, False, gen)
    model.train()
    model(batch).loss.backward()
    local = model.llama_proj.weight.grad.clone()
    model.zero_grad(set_to_none=True)
    gathered = gather(local)
    expected = sum(gathered) / 2

    # 2. the same batch through DDP: the gradient must be the average over ranks
    ddp = acc.prepare(model)
    acc.backward(ddp(batch).loss)
    averaged = model.llama_proj.weight.grad.clone()
    model.zero_grad(set_to_none=True)

    # 3. the training loop itself (a fresh replica, not wrapped twice): replicas stay identical
    model = tiny_model()
    history = train(model, ds, tcfg)
    ws = gather(model.llama_proj.weight.detach())
    return {"ddp_grad_error": float((averaged - expected).abs().max()),
            "local_differs": float((gathered[0] - gathered[1]).abs().max()),
            "replica_diff": float((ws[0] - ws[1]).abs().max()),
            "losses": [h["loss"] for h in history]}


class Recorded:
    """The dataset, noting which samples are read: the last BATCH reads of a step are its batch."""

    def __init__(self, dataset, stop_at: int | None = None):
        self.dataset, self.stop_at, self.reads, self.batches = dataset, stop_at, [], []

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        self.reads.append(int(i))
        return self.dataset[i]

    def callback(self, record):
        self.batches.append(self.reads[-BATCH:])
        if record["step"] == self.stop_at:
            raise KeyboardInterrupt  # as a Ctrl-C right after that step


def resume() -> dict:
    ds = ToyWorldDataset(1, 40)

    def run(folder: str, stop_at: int | None = None) -> tuple[list, torch.Tensor]:
        model, data = tiny_model(), Recorded(ds, stop_at)
        cfg = TrainConfig(stage=1, steps=STEPS, batch_size=BATCH, lr=1e-2, min_lr=1e-3,
                          warmup_steps=2, out_dir=f"{out}/{folder}")
        try:
            train(model, data, cfg, callback=data.callback)
        except KeyboardInterrupt:
            dist.barrier()  # every process has saved its part before anyone resumes
        return data.batches, model.llama_proj.weight.detach().clone()

    full, full_weight = run("full")
    first, _ = run("part", stop_at=INTERRUPT_AT)
    resumed, weight = run("part")
    return {"full": full, "interrupted": first, "resumed": resumed,
            "weight_diff_to_full": float((weight - full_weight).abs().max())}


result = {"averaging": averaging, "resume": resume}[mode]()
with open(f"{out}/rank{rank}.json", "w") as f:
    json.dump({"rank": rank, "world": acc.num_processes, **result}, f)
# Tear the process group down before exiting: a gloo group still alive at interpreter exit can
# abort the process ("terminate called without an active exception").
dist.barrier()
dist.destroy_process_group()
