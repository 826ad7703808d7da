"""Two processes on CPU (gloo) through torchrun: gradients are averaged, replicas stay equal."""

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_two_process_training_averages_gradients(llama_dir, tmp_path):
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
                           "--master_addr=127.0.0.1", worker,
                           str(llama_dir), str(tmp_path)], env=env, capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for r in ranks:
        assert r["world"] == 2
        assert r["local_differs"] > 0  # the ranks saw different batches...
        assert r["ddp_grad_error"] < 1e-6  # ...and DDP gave each the average of both gradients
        assert r["replica_diff"] == 0.0  # after training steps the replicas are identical
    assert ranks[0]["losses"] != ranks[1]["losses"]  # each process drew its own batches
