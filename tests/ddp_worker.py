"""Run by tests/test_distributed.py under `torchrun --nproc_per_node=2` (gloo, CPU).

Checks that DDP averages the projection's gradients over processes, and that `train` keeps the
replicas identical while each process draws its own batches. Writes one JSON line per rank.
"""

import json
import sys

import torch
import torch.distributed as dist
from accelerate import Accelerator
from transformers import AutoTokenizer, LlamaForCausalLM

from minigpt4_lite.config import MiniGPT4Config, QFormerConfig, VisionConfig
from minigpt4_lite.data import ToyWorldDataset
from minigpt4_lite.model import MiniGPT4
from minigpt4_lite.train import TrainConfig, make_batch, train

llama_dir, out = sys.argv[1], sys.argv[2]
acc = Accelerator(cpu=True)
rank = acc.process_index


def tiny_model() -> MiniGPT4:
    torch.manual_seed(0)  # identical replicas on every rank
    cfg = MiniGPT4Config(
        vision=VisionConfig(image_size=20, patch_size=10, width=16, layers=1, heads=2, mlp=32),
        qformer=QFormerConfig(hidden=16, layers=2, heads=2, mlp=32, num_query_tokens=4))
    return MiniGPT4(cfg, LlamaForCausalLM.from_pretrained(llama_dir),
                    AutoTokenizer.from_pretrained(llama_dir))


model = tiny_model()
ds = ToyWorldDataset(1, 40)
tcfg = TrainConfig(stage=1, steps=2, batch_size=3, lr=1e-2, warmup_steps=0)

# 1. the local gradient of this rank's own batch, without DDP
gen = torch.Generator().manual_seed(100 + rank)
batch = make_batch(model, [ds[int(i)] for i in torch.randint(len(ds), (3,), generator=gen)],
                   tcfg, None, False, gen)
model.train()
model(batch).loss.backward()
local = model.llama_proj.weight.grad.clone()
model.zero_grad(set_to_none=True)
gathered = [torch.zeros_like(local) for _ in range(2)]
dist.all_gather(gathered, local)
expected = sum(gathered) / 2

# 2. the same batch through DDP: the gradient must be the average over ranks
ddp = acc.prepare(model)
acc.backward(ddp(batch).loss)
averaged = model.llama_proj.weight.grad.clone()
model.zero_grad(set_to_none=True)

# 3. the training loop itself (a fresh replica, not wrapped twice): replicas stay identical
model = tiny_model()
history = train(model, ds, tcfg)
w = model.llama_proj.weight.detach()
ws = [torch.zeros_like(w) for _ in range(2)]
dist.all_gather(ws, w.contiguous())
with open(f"{out}/rank{rank}.json", "w") as f:
    json.dump({"rank": rank, "world": acc.num_processes,
               "ddp_grad_error": float((averaged - expected).abs().max()),
               "local_differs": float((gathered[0] - gathered[1]).abs().max()),
               "replica_diff": float((ws[0] - ws[1]).abs().max()),
               "losses": [h["loss"] for h in history]}, f)
# Tear the process group down before exiting: a gloo group still alive at interpreter exit can
# abort the process ("terminate called without an active exception").
dist.barrier()
dist.destroy_process_group()
