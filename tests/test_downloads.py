"""Downloads of the real weights (`minigpt4_lite.downloads`), offline, against a stand-in hub.

The stand-in is a small HTTP server that answers the two kinds of request huggingface_hub makes
here, the way huggingface.co does: a repository's file list with sizes (`/api/models/<repo>`) and
a file (`/<repo>/resolve/<revision>/<file>`), and the hub's error answers (`X-Error-Code` headers)
for a gated or an unknown repository. The real huggingface_hub client talks to it, so the test
covers what a user's notebook runs, except the network itself.
"""

import hashlib
import json
import re
import sys
import threading
import types
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest
import torch
from huggingface_hub import constants as hub_constants

from conftest import tiny_blip2
from minigpt4_lite import downloads
from minigpt4_lite.checkpoints import VISUAL_PREFIXES, build_meta, load_llm, load_model
from minigpt4_lite.config import ASSETS, preset
from minigpt4_lite.errors import CheckpointError, ConfigError
from minigpt4_lite.hub import OFFICIAL_PROJECTIONS

COMMIT = "0123456789abcdef0123456789abcdef01234567"  # the one revision the stand-in serves


class StandInHub(BaseHTTPRequestHandler):
    """Serves `repos` ({"org/name": folder}); `gated` repositories refuse their files."""

    repos: dict[str, Path] = {}
    gated: set[str] = set()

    def log_message(self, *args):  # keep the test output quiet
        pass

    def do_GET(self):
        self.answer(send_body=True)

    def do_HEAD(self):
        self.answer(send_body=False)

    def answer(self, send_body: bool):
        path = unquote(urlparse(self.path).path)
        info = re.match(r"^/api/models/([^/]+/[^/]+)$", path)
        resolve = re.match(r"^/([^/]+/[^/]+)/resolve/[^/]+/(.+)$", path)
        repo = (info or resolve).group(1) if (info or resolve) else None
        if repo not in self.repos:
            return self.send(404, b"", {"X-Error-Code": "RepoNotFound"}, send_body)
        files = {p.relative_to(self.repos[repo]).as_posix(): p
                 for p in sorted(self.repos[repo].rglob("*")) if p.is_file()}
        if info:
            body = json.dumps({"id": repo, "sha": COMMIT, "siblings": [
                {"rfilename": n, "size": p.stat().st_size} for n, p in files.items()]})
            return self.send(200, body.encode(), {"Content-Type": "application/json"}, send_body)
        if repo in self.gated:
            return self.send(403, b"", {"X-Error-Code": "GatedRepo", "X-Error-Message":
                                        "Access to this model is restricted."}, send_body)
        if resolve.group(2) not in files:
            return self.send(404, b"", {"X-Error-Code": "EntryNotFound"}, send_body)
        data = files[resolve.group(2)].read_bytes()
        return self.send(200, data, {"X-Repo-Commit": COMMIT,
                                     "ETag": f'"{hashlib.sha256(data).hexdigest()}"'}, send_body)

    def send(self, code: int, body: bytes, headers: dict, send_body: bool):
        self.send_response(code)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if send_body:
            self.wfile.write(body)


@pytest.fixture
def stand_in(monkeypatch, tmp_path):
    """(endpoint, repos, gated): a running stand-in hub, with the hub cache in a temp folder."""
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    repos, gated = {}, set()
    handler = type("Handler", (StandInHub,), {"repos": repos, "gated": gated})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}", repos, gated
    server.shutdown()


@pytest.fixture
def blip2_repo(tmp_path):
    """A sharded HF BLIP-2 checkpoint, laid out like Salesforce/blip2-flan-t5-xxl: its language
    model is the largest part, and some shards hold nothing else."""
    model = tiny_blip2(text_hidden=256)
    folder = tmp_path / "blip2"
    model.save_pretrained(folder, max_shard_size="100KB")
    return folder, model


def test_visual_download_fetches_only_the_shards_that_hold_the_visual_tensors(stand_in,
                                                                              blip2_repo):
    endpoint, repos, _ = stand_in
    folder, blip2 = blip2_repo
    repos["Salesforce/blip2-flan-t5-xxl"] = folder
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    visual = {f for k, f in index.items() if k.startswith(VISUAL_PREFIXES)}
    text_only = set(index.values()) - visual
    assert visual and text_only  # the layout tests something: some shards hold no visual tensor

    plan = downloads.visual_download(endpoint=endpoint)
    assert set(plan.sizes) == {"config.json", "model.safetensors.index.json"} | visual
    assert plan.sizes == {n: (folder / n).stat().st_size for n in plan.sizes}
    assert f"{plan.total / 1e9:.1f} GB in {len(plan.sizes)} files" in str(plan)

    local = downloads.fetch(plan)
    assert {p.name for p in local.iterdir()} == set(plan.sizes)  # no text-only shard came
    assert downloads.fetch(plan) == local  # a second run finds everything in the cache
    model = load_model(preset("minigpt4-7b", vision_qformer=str(local), llm=str(ASSETS / "llm")),
                       projection="")
    theirs = blip2.vision_model.embeddings.patch_embedding.weight
    assert torch.equal(model.vit.state_dict()["patch_embed.weight"], theirs)


def test_llm_download_takes_one_weight_format(stand_in, tmp_path, llama_dir):
    """Llama-2-chat's repository holds its weights twice (safetensors and .bin): one copy comes."""
    endpoint, repos, _ = stand_in
    repo = tmp_path / "llama"
    repo.mkdir()
    for f in llama_dir.iterdir():
        (repo / f.name).write_bytes(f.read_bytes())
    torch.save({"unused": torch.zeros(1)}, repo / "pytorch_model.bin")
    (repo / "README.md").write_text("a model card")
    repos["meta-llama/Llama-2-7b-chat-hf"] = repo

    plan = downloads.llm_download("meta-llama/Llama-2-7b-chat-hf", endpoint=endpoint)
    assert "model.safetensors" in plan.sizes and "pytorch_model.bin" not in plan.sizes
    assert "README.md" not in plan.sizes and "config.json" in plan.sizes
    llm, tokenizer = load_llm(str(downloads.fetch(plan)))
    assert llm.config.hidden_size == 48 and tokenizer.bos_token == "<s>"


def test_sharded_bin_weights_come_with_their_index(stand_in, tmp_path):
    """The merged Vicuna v0 folders have `.bin` shards and their index, and no safetensors."""
    endpoint, repos, _ = stand_in
    repo = tmp_path / "vicuna"
    repo.mkdir()
    (repo / "config.json").write_text("{}")
    (repo / "tokenizer.model").write_bytes(b"x" * 10)
    shards = ["pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"]
    for i, name in enumerate(shards):
        (repo / name).write_bytes(b"w" * (100 + i))
    (repo / "pytorch_model.bin.index.json").write_text(json.dumps(
        {"weight_map": {"a.weight": shards[0], "b.weight": shards[1]}}))
    repos["Vision-CAIR/vicuna-7b"] = repo
    plan = downloads.llm_download("Vision-CAIR/vicuna-7b", endpoint=endpoint)
    assert list(plan.sizes) == ["config.json", "tokenizer.model", "pytorch_model.bin.index.json",
                                *shards]
    assert plan.total == 2 + 10 + (repo / "pytorch_model.bin.index.json").stat().st_size + 201


def test_a_gated_repository_says_how_to_get_access(stand_in, tmp_path):
    endpoint, repos, gated = stand_in
    (tmp_path / "g").mkdir()
    (tmp_path / "g" / "model.safetensors").write_bytes(b"0" * 8)
    repos["meta-llama/Llama-2-7b-chat-hf"] = tmp_path / "g"
    gated.add("meta-llama/Llama-2-7b-chat-hf")
    # its file list and sizes are public; its files are not
    plan = downloads.llm_download("meta-llama/Llama-2-7b-chat-hf", endpoint=endpoint)
    with pytest.raises(CheckpointError) as e:
        downloads.fetch(plan)
    message = str(e.value)
    assert "gated" in message and "https://huggingface.co/meta-llama/Llama-2-7b-chat-hf" in message
    assert "hf auth login" in message and "HF_TOKEN" in message


def test_an_unknown_repository_is_named(stand_in):
    endpoint, _, _ = stand_in
    with pytest.raises(CheckpointError, match="Vision-CAIR/vicuna-8b is not a hub repository"):
        downloads.llm_download("Vision-CAIR/vicuna-8b", endpoint=endpoint)


def test_no_network_says_what_failed_and_what_to_do(stand_in, monkeypatch):
    """A hub that cannot be reached (here: a port nobody listens on), and offline mode."""
    closed = ThreadingHTTPServer(("127.0.0.1", 0), StandInHub)
    port = closed.server_port
    closed.server_close()  # now nothing answers on that port
    with pytest.raises(CheckpointError) as e:
        downloads.visual_download(endpoint=f"http://127.0.0.1:{port}")
    assert "the file list of Salesforce/blip2-flan-t5-xxl" in str(e.value)
    assert "cannot be reached" in str(e.value) and "local folder" in str(e.value)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(CheckpointError, match="hub cannot be reached") as e:
        downloads.fetch(downloads.Download("LLM", "Vision-CAIR/vicuna-7b", {"config.json": 10}))
    assert "Vision-CAIR/vicuna-7b/config.json" in str(e.value)


def test_a_full_disk_is_refused_before_downloading(tmp_path):
    with pytest.raises(CheckpointError, match=r"Not enough disk space for LLM: 1000000000.0 GB"):
        downloads.check_disk_space(tmp_path / "not" / "yet", 10**18, "LLM")
    downloads.check_disk_space(tmp_path, 1, "LLM")  # one byte fits


def test_memory_of_the_weights_by_dtype():
    """From the parameter counts (docs/official.md): the visual part in float16 and the LLM's
    linear layers in 2, 1 or 0.5625 bytes; embeddings, norms and lm_head stay float16."""
    model = build_meta(preset("minigpt4-7b"))
    fp16, int8, nf4 = (downloads.weight_gb(model, d) for d in ("fp16", "8bit", "4bit"))
    assert fp16["visual"] == pytest.approx((985_952_256 + 105_137_664 + 24_576) * 2 / 1e9)
    assert fp16["llm"] == pytest.approx(6_738_423_808 * 2 / 1e9)
    assert fp16["projection"] == pytest.approx(3_149_824 * 4 / 1e9)
    unquantized = 2 * 32001 * 4096 + 65 * 4096  # embeddings + lm_head, 65 RMSNorm weights
    linear = 6_738_423_808 - unquantized
    assert int8["llm"] == pytest.approx((linear + 2 * unquantized) / 1e9)
    assert nf4["llm"] == pytest.approx((linear * 0.5625 + 2 * unquantized) / 1e9)
    assert downloads.kv_cache_gb(model, 2000) == pytest.approx(2 * 32 * 4096 * 2 * 2000 / 1e9)
    with pytest.raises(ConfigError, match="llm must be one of"):
        downloads.weight_gb(model, "int3")


@pytest.mark.parametrize("quantization", ["8bit", "4bit"])
def test_the_memory_estimate_matches_a_quantized_llm(quantization):
    """bitsandbytes on the CPU: the bytes of the loaded tiny LLM (its parameters and the scales
    of the quantized layers) against the estimate made from the float model's counts."""
    pytest.importorskip("bitsandbytes")
    model = load_model(preset("tiny"), projection="")
    llm, _ = load_llm(str(ASSETS / "llm"), quantization=quantization, dtype="float16")
    measured = llm.get_memory_footprint()
    for module in llm.modules():
        weight = getattr(module, "weight", None)
        for scale in (getattr(weight, "SCB", None),
                      getattr(getattr(weight, "quant_state", None), "absmax", None)):
            if scale is not None:
                measured += scale.numel() * scale.element_size()
    estimate = downloads.weight_gb(model, quantization)["llm"] * 1e9
    assert measured == pytest.approx(estimate, rel=0.02)


def _fake_gdown(monkeypatch, writes: bytes | None = None, error: Exception | None = None):
    """Stand in for gdown (Google Drive): write `writes` to the output, or raise `error`."""

    def download(id, output, quiet):
        if error is not None:
            Path(output).write_bytes(b"partial")
            raise error
        Path(output).write_bytes(writes)
        return output

    monkeypatch.setitem(sys.modules, "gdown", types.SimpleNamespace(
        download=download))


def test_fetch_projection_keeps_only_a_real_checkpoint(monkeypatch, tmp_path):
    name, url = OFFICIAL_PROJECTIONS["minigpt4-7b"]
    _fake_gdown(monkeypatch, writes=b"<html>Google Drive - Quota exceeded</html>")
    with pytest.raises(CheckpointError, match="is not the checkpoint") as e:
        downloads.fetch_projection("minigpt4-7b", tmp_path)
    assert url in str(e.value) and not (tmp_path / name).exists()

    _fake_gdown(monkeypatch, error=ConnectionError("Failed to resolve drive.google.com"))
    with pytest.raises(CheckpointError, match="Failed to resolve drive.google.com") as e:
        downloads.fetch_projection("minigpt4-7b", tmp_path)
    assert url in str(e.value) and not (tmp_path / name).exists()

    good = tmp_path / "good.pth"
    torch.save({"model": {"llama_proj.weight": torch.zeros(4096, 768),
                          "llama_proj.bias": torch.zeros(4096)}}, good)
    _fake_gdown(monkeypatch, writes=good.read_bytes())
    assert downloads.fetch_projection("minigpt4-7b", tmp_path) == tmp_path / name
    _fake_gdown(monkeypatch, error=AssertionError("a file already there is not fetched again"))
    assert downloads.fetch_projection("minigpt4-7b", tmp_path) == tmp_path / name


def test_fetch_projection_without_gdown_says_how_to_install_it(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "gdown", None)  # import gdown fails
    with pytest.raises(ConfigError, match="pip install gdown"):
        downloads.fetch_projection("minigpt4-7b", tmp_path)
    with pytest.raises(ConfigError, match="No official projection for preset 'tiny'"):
        downloads.fetch_projection("tiny", tmp_path)
