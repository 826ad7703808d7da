"""Two processes on CPU (gloo) through torchrun: gradients are averaged, replicas stay equal, and
an interrupted run resumes with each process drawing the batches it would have drawn."""

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from minigpt4_lite.config import MiniGPT4Config, QFormerConfig, VisionConfig
from minigpt4_lite.errors import CheckpointError
from minigpt4_lite.model import MiniGPT4
from minigpt4_lite.toyworld import ToyWorldDataset
from minigpt4_lite.train import TrainConfig, train


def _torchrun(llama_dir, out, mode) -> list[dict]:
    """`tests/ddp_worker.py` in 2 processes; returns what each rank wrote."""
    torchrun = shutil.which("torchrun") or os.path.join(os.path.dirname(sys.executable),
                                                        "torchrun")
    worker = os.path.join(os.path.dirname(__file__), "ddp_worker.py")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    with socket.socket() as sock:  # a free port (torchrun's --master_port=0 hangs here)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.run([torchrun, "--nproc_per_node=2", f"--master_port={port}",
                           "--master_addr=127.0.0.1", worker, str(llama_dir), str(out), mode],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2]
    return ranks


@pytest.mark.slow
def test_two_process_training_averages_gradients(llama_dir, tmp_path):
    ranks = _torchrun(llama_dir, tmp_path, "averaging")
    for r in ranks:
        assert r["local_differs"] > 0  # the ranks saw different batches...
        assert r["ddp_grad_error"] < 1e-6  # ...and DDP gave each the average of both gradients
        assert r["replica_diff"] == 0.0  # after training steps the replicas are identical
    assert ranks[0]["losses"] != ranks[1]["losses"]  # each process drew its own batches


@pytest.mark.slow
def test_two_process_run_interrupted_and_resumed_draws_the_same_batches(llama_dir, tmp_path):
    ranks = _torchrun(llama_dir, tmp_path, "resume")
    for r in ranks:
        assert len(r["interrupted"]) == 3 and len(r["full"]) == 6
        # each process goes on with its *own* random stream: the batches of the uninterrupted run
        assert r["interrupted"] + r["resumed"] == r["full"], f"rank {r['rank']}"
        assert r["weight_diff_to_full"] == 0.0  # and ends with the same projection
    assert ranks[0]["full"] != ranks[1]["full"]  # the two processes drew different batches
    assert all(a != b for a, b in zip(ranks[0]["resumed"], ranks[1]["resumed"]))
    assert (tmp_path / "part" / "rng-rank1.safetensors").exists()

    # resuming that 2-process run in 1 process would draw other batches: refused, clearly
    torch.manual_seed(0)
    cfg = MiniGPT4Config(
        vision=VisionConfig(image_size=20, patch_size=10, width=16, layers=1, heads=2, mlp=32),
        qformer=QFormerConfig(hidden=16, layers=2, heads=2, mlp=32, num_query_tokens=4))
    model = MiniGPT4(cfg, LlamaForCausalLM.from_pretrained(llama_dir),
                     AutoTokenizer.from_pretrained(llama_dir))
    tcfg = TrainConfig(stage=1, steps=8, batch_size=3, lr=1e-2, min_lr=1e-3, warmup_steps=2,
                       out_dir=str(tmp_path / "part"))
    with pytest.raises(CheckpointError, match=r"a run of 2 process\(es\) and this run has 1: "
                                              r"resume it with 2"):
        train(model, ToyWorldDataset(1, 40), tcfg)
