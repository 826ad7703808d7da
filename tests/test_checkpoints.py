"""The official projection checkpoint, our safetensors folders, and unsafe or broken files."""

import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from minigpt4_lite.checkpoints import (
    load_projection,
    quantization_config,
    read_projection,
    save_pretrained,
)
from minigpt4_lite.config import MiniGPT4Config, QFormerConfig, VisionConfig
from minigpt4_lite.errors import CheckpointError, ConfigError
from minigpt4_lite.model import MiniGPT4


@pytest.fixture()
def model(llama_dir):
    cfg = MiniGPT4Config(
        vision=VisionConfig(image_size=20, patch_size=10, width=16, layers=1, heads=2, mlp=32),
        qformer=QFormerConfig(hidden=16, layers=2, heads=2, mlp=32, num_query_tokens=4))
    return MiniGPT4(cfg, LlamaForCausalLM.from_pretrained(llama_dir),
                    AutoTokenizer.from_pretrained(llama_dir))


def _official(path, d_llm=48, width=16):
    """A file in the official format: {"model": {...}, "optimizer": ..., "epoch": ...}."""
    w, b = torch.randn(d_llm, width), torch.randn(d_llm)
    torch.save({"model": {"llama_proj.weight": w, "llama_proj.bias": b,
                          "Qformer.bert.embeddings.position_ids": torch.arange(4)},
                "optimizer": {"state": {0: {"exp_avg": torch.zeros(3)}}, "param_groups": []},
                "epoch": 3, "config": {"lr": 1e-4}}, path)
    return w, b


def test_official_projection_checkpoint_loads(model, tmp_path):
    w, b = _official(tmp_path / "prerained_minigpt4_7b.pth")
    load_projection(model, tmp_path / "prerained_minigpt4_7b.pth")
    assert torch.equal(model.llama_proj.weight, w) and torch.equal(model.llama_proj.bias, b)


def test_width_mismatch_names_both_widths(model, tmp_path):
    _official(tmp_path / "p13b.pth", d_llm=40)
    with pytest.raises(CheckpointError, match=r"LLM of width 40.*width 48"):
        load_projection(model, tmp_path / "p13b.pth")


def test_our_folder_round_trip(model, tmp_path):
    save_pretrained(model, tmp_path / "proj")
    assert (tmp_path / "proj" / "config.json").exists()
    before = model.llama_proj.weight.detach().clone()
    with torch.no_grad():
        model.llama_proj.weight.zero_()
    load_projection(model, tmp_path / "proj")
    assert torch.equal(model.llama_proj.weight, before)
    assert set(read_projection(tmp_path / "proj")) == {"llama_proj.weight", "llama_proj.bias"}


class _Payload:
    """Unpickling this calls `os.system`: a checkpoint that would run code."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_that_would_run_code_is_refused(model, tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"model": {"llama_proj.weight": _Payload(marker)}}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="nothing in it was executed"):
        load_projection(model, tmp_path / "evil.pth")
    assert not marker.exists()


def test_truncated_and_missing_files(model, tmp_path):
    save_pretrained(model, tmp_path / "proj")
    data = (tmp_path / "proj" / "projection.safetensors").read_bytes()
    (tmp_path / "proj" / "projection.safetensors").write_bytes(data[:40])
    with pytest.raises(CheckpointError, match="not a complete safetensors"):
        load_projection(model, tmp_path / "proj")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_projection(model, tmp_path / "nope.pth")
    torch.save({"model": {"something.else": torch.zeros(2)}}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="no llama_proj"):
        load_projection(model, tmp_path / "other.pth")


def test_quantization_errors_are_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if not installed
    with pytest.raises(ConfigError, match="needs bitsandbytes"):
        quantization_config("8bit", "cpu", "float32")


def test_8bit_llm_on_cpu_forward_and_backward(llama_dir):
    """bitsandbytes 8-bit on the CPU: forward, generate and backward into inputs_embeds work."""
    pytest.importorskip("bitsandbytes")
    from minigpt4_lite.checkpoints import load_llm

    llm, tok = load_llm(str(llama_dir), quantization="8bit", device="cpu")
    ids = tok("a red circle", return_tensors="pt").input_ids
    emb = llm.get_input_embeddings()(ids).detach().requires_grad_(True)
    llm(inputs_embeds=emb, labels=ids).loss.backward()
    assert emb.grad is not None and torch.isfinite(emb.grad).all()


def test_cli_info_prints_exact_counts():
    out = subprocess.run([sys.executable, "-m", "minigpt4_lite", "info", "--preset",
                          "minigpt4-7b", "--json"], capture_output=True, text=True, check=True)
    import json
    counts = json.loads(out.stdout)
    assert counts == {"vision_params": 985952256, "qformer_params": 105137664,
                      "query_tokens": 24576, "llm_params": 6738423808,
                      "projection_params": 3149824, "trainable_params": 3149824}
    out13 = subprocess.run([sys.executable, "-m", "minigpt4_lite", "info", "--preset",
                            "minigpt4-13b", "--json"], capture_output=True, text=True, check=True)
    assert json.loads(out13.stdout)["projection_params"] == 3937280


def test_cli_bad_checkpoint_is_one_line_error(tmp_path):
    (tmp_path / "bad.pth").write_bytes(b"garbage")
    out = subprocess.run([sys.executable, "-m", "minigpt4_lite", "eval", "--projection",
                          str(tmp_path / "bad.pth"), "--n-eval", "2"],
                         capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr.strip().startswith("error:") and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
