"""The official projection checkpoint, our safetensors folders, and unsafe or broken files."""

import dataclasses
import http.server
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from minigpt4_lite.checkpoints import (
    load_model,
    load_projection,
    quantization_config,
    read_projection,
    resolve_dtype,
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


def test_the_t4_path_reads_tensor_by_tensor_straight_to_the_device(blip2_dir, llama_dir,
                                                                    tmp_path, monkeypatch):
    """What a free Colab T4 (15 GB GPU, ~12 GB RAM) needs, checked on a CPU with sharded files.

    transformers gets `device_map=device`, so each LLM tensor goes from its shard straight to the
    device (on a GPU the LLM never sits in CPU RAM); no loader ever reads a whole file at once;
    the ViT and Q-Former arrive in `vision_dtype` (the real presets: float16 on CUDA, as the
    official `vit_precision: fp16`), the projection stays float32, a Q-Former being trained too.
    """
    import safetensors.torch
    import transformers.modeling_utils as hf_modeling
    from transformers import AutoModelForCausalLM

    blip2_dir[1].save_pretrained(tmp_path / "blip2", max_shard_size="100KB")
    LlamaForCausalLM.from_pretrained(llama_dir).save_pretrained(tmp_path / "llm",
                                                                max_shard_size="50KB")
    AutoTokenizer.from_pretrained(llama_dir).save_pretrained(tmp_path / "llm")
    assert len(list((tmp_path / "llm").glob("model-*.safetensors"))) > 2

    def whole_file(*args, **kwargs):
        raise AssertionError("a whole checkpoint file was read at once")

    for module, name in [(safetensors.torch, "load_file"), (safetensors.torch, "load"),
                         (hf_modeling, "_safe_load_bytes"), (hf_modeling, "load_state_dict")]:
        if hasattr(module, name):  # transformers < 5.2 has no `_safe_load_bytes`
            monkeypatch.setattr(module, name, whole_file)
    asked, real = {}, AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained",
                        lambda source, **kw: (asked.update(kw), real(source, **kw))[1])

    assert resolve_dtype("auto", "cuda") == "float16" and resolve_dtype("auto", "cpu") == "float32"
    cfg = MiniGPT4Config(vision_qformer=str(tmp_path / "blip2"), llm=str(tmp_path / "llm"),
                         vision_dtype="bfloat16")
    model = load_model(cfg, projection="")
    assert asked["device_map"] == "cpu"
    assert {p.dtype for p in [*model.vit.parameters(), *model.qformer.parameters()]} == {
        torch.bfloat16}
    assert model.llama_proj.weight.dtype == model.llm.dtype == torch.float32
    hf_fc1 = blip2_dir[1].vision_model.encoder.layers[0].mlp.fc1.weight
    assert torch.equal(model.vit.blocks[0].fc1.weight, hf_fc1.to(torch.bfloat16))
    reference = load_model(dataclasses.replace(cfg, vision_dtype="float32"), projection="")
    with torch.no_grad():
        reference.llama_proj.load_state_dict(model.llama_proj.state_dict())
        pixels = torch.randn(2, 3, cfg.vision.image_size, cfg.vision.image_size)
        torch.testing.assert_close(model.encode_image(pixels), reference.encode_image(pixels),
                                   rtol=0.05, atol=0.05)
    trained = load_model(dataclasses.replace(cfg, freeze_qformer=False), projection="")
    assert trained.qformer.query_tokens.dtype == torch.float32  # learns in float32


def test_cli_info_prints_exact_counts():
    out = subprocess.run([sys.executable, "-m", "minigpt4_lite", "info", "--preset",
                          "minigpt4-7b", "--json"], capture_output=True, text=True, check=True)
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


# --- hub failures say what failed ---------------------------------------------------------------
class _HubAnswers(http.server.BaseHTTPRequestHandler):
    """Answers as the hub sends them (status + `X-Error-Code`) for a few repositories."""

    ANSWERS = {"org/private": (401, "RepoNotFound"), "org/gated": (403, "GatedRepo"),
               "org/empty": (404, "EntryNotFound")}

    def do_HEAD(self):
        repo = "/".join(self.path.strip("/").split("/")[:2])
        status, code = self.ANSWERS.get(repo, (404, "RepoNotFound"))
        self.send_response(status)
        self.send_header("X-Error-Code", code)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_HEAD

    def log_message(self, *args):
        pass


def test_hub_failures_say_what_failed(tmp_path):
    """Auth, gated and missing-file answers of a hub endpoint, each with its own sentence."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _HubAnswers)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    script = (
        "import json\n"
        "from minigpt4_lite.checkpoints import _visual_shards\n"
        "out = {}\n"
        "for source in ('org/private', 'org/gated', 'org/empty'):\n"
        "    try:\n"
        "        _visual_shards(source)\n"
        "    except Exception as e:\n"
        "        out[source] = f'{type(e).__name__}: {e}'\n"
        "print(json.dumps(out))\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HUB_OFFLINE="0", HF_ENDPOINT=f"http://127.0.0.1:{server.server_port}",
               HF_HOME=str(tmp_path / "hf"), HF_HUB_DISABLE_TELEMETRY="1")
    try:
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                             env=env, timeout=120, cwd=Path(__file__).resolve().parent.parent)
    finally:
        server.shutdown()
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got["org/private"].startswith("CheckpointError: 'org/private' is neither a folder")
    assert "log in" in got["org/private"] and "401" in got["org/private"]
    assert got["org/gated"].startswith("CheckpointError: 'org/gated' is a gated hub repository")
    assert got["org/empty"].startswith("CheckpointError: No BLIP-2 safetensors in 'org/empty'")
    assert not any("No BLIP-2" in got[s] for s in ("org/private", "org/gated"))


def test_offline_and_bad_sources_are_named():
    from huggingface_hub import constants

    from minigpt4_lite.checkpoints import _visual_shards, resolve_file

    if not constants.HF_HUB_OFFLINE:
        pytest.skip("this test runs offline (HF_HUB_OFFLINE=1, set by conftest)")
    with pytest.raises(CheckpointError, match=r"Cannot download .*config.json: the hub cannot be "
                                              r"reached.*not in the local cache"):
        resolve_file("Salesforce/blip2-flan-t5-xxl-not-cached", "config.json")
    with pytest.raises(CheckpointError, match="neither a folder on this machine nor a valid hub"):
        resolve_file("/models/blip2-flan-t5-xxl", "config.json")  # a folder that is not there
    with pytest.raises(CheckpointError, match="the hub cannot be reached") as e:
        _visual_shards("Salesforce/blip2-flan-t5-xxl-not-cached")  # what load_blip2_visual reads
    assert "No BLIP-2" not in str(e.value)


def test_saved_configs_name_assets_relative_to_the_package(tmp_path):
    # a config saved in one clone must mean the same in another: no machine-specific paths
    from minigpt4_lite.config import ASSETS, MiniGPT4Config, preset

    cfg = preset("tiny")
    cfg.save(tmp_path / "config.json")
    text = (tmp_path / "config.json").read_text()
    assert str(ASSETS) not in text and '"{assets}/llm"' in text
    assert MiniGPT4Config.load(tmp_path / "config.json") == cfg
    for shipped in (ASSETS / "projections").glob("*/config.json"):
        assert str(ASSETS.parent) not in shipped.read_text(), shipped
