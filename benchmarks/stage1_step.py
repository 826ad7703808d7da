"""Stage-1 training step: minigpt4-lite vs transformers' BLIP-2, same weights, same batch.

One step = forward + backward + AdamW step on the projection only, for `[BOS] [visual tokens]
[caption of 32 tokens]` (docs/official.md, "Sequence layout and loss"). The peer is transformers'
`Blip2ForConditionalGeneration` with a LLaMA text model of identical shapes, holding the same
weights: ViT and Q-Former copied from ours through the inverse key maps (`hf_vision_keys`,
`hf_qformer_keys`), `language_projection` = our `llama_proj`, the LLM copied (tiny) or shared
(7B, to fit one GPU). Everything but the projection is frozen in both.

    python benchmarks/stage1_step.py --preset tiny                  # CPU, ToyWorld tiny model
    python benchmarks/stage1_step.py --preset minigpt4-7b --device cuda   # random bf16 weights
    python benchmarks/stage1_step.py --preset minigpt4-7b --smoke   # the 7B code path, tiny shapes

Paths timed, interleaved (peer, ours, peer, ours, ...) to cancel drift, median of the rounds:
- `peer`: HF BLIP-2 from pixels (ViT + Q-Former + LLM every step);
- `ours`: the library's default training path for a real stage-1 run (the paper's 20,000 steps):
  frozen features precomputed once per image (`build_feature_cache`), the step runs `model(batch)`
  on them with the LLM compiled by `train.compile_llm` when `train.should_compile` says `train`
  would (runs of >= 200 steps on a GPU, >= 4,000 on a CPU); the one-time costs (cache,
  compilation) are reported;
- `ours, eager`: the same without compilation (`--compile off`; the default of shorter runs,
  such as the demo's 800 steps);
- `ours, no cache`: `model(batch)` from pixels, eager;
- `--proposals`: fast paths that are NOT in the library (answer-only LM head, `torch.compile` of
  the whole LLM module), checked against the library's loss and gradients first.
On CUDA both models run under bf16 autocast, as `train` does through Accelerate (`precision`
"auto"); on CPU in float32. Model FLOPs (see `flops_per_sample`) over the step time, divided by a
matmul rate measured in the same run, gives the MFU.

Prints a table and writes the `stage1_step` section of BENCHMARKS.md (between its markers only).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import json
import logging
import os
import platform
import re
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TQDM_DISABLE", "1")

from minigpt4_lite.config import VICUNA_7B, preset  # noqa: E402
from minigpt4_lite.model import END_SYM, IGNORE_INDEX, Example, MiniGPT4  # noqa: E402
from minigpt4_lite.qformer import hf_qformer_keys  # noqa: E402
from minigpt4_lite.vision import hf_vision_keys  # noqa: E402

NAME = "stage1_step"
CAPTION_TOKENS = 32
WAITING = "waiting for a lent GPU"
TMP_ASSETS = Path("/tmp/assets_test")  # under-trained stand-in while assets/ is being built
log = logging.getLogger(NAME)


# --- shared helpers (also imported by chat_decode.py and memory.py) -----------------------------
def machine_info(device: str) -> dict:
    """Processor, cores, threads, torch version and (on CUDA) the GPU name."""
    cpu = platform.processor()
    if not cpu:  # empty on many Linux systems: read the model name
        with contextlib.suppress(OSError):
            cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo")
                        if ln.startswith("model name")), "")
    info = {"cpu": cpu or platform.machine(), "cores": os.cpu_count(),
            "threads": torch.get_num_threads(), "torch": torch.__version__}
    with contextlib.suppress(Exception):
        import transformers
        info["transformers"] = transformers.__version__
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def machine_line(info: dict) -> str:
    gpu = f"{info['gpu']}; " if info.get("gpu") else ""
    return (f"{gpu}{info['cpu']}, {info['cores']} cores ({info['threads']} torch threads); "
            f"torch {info['torch']}, transformers {info.get('transformers', '?')}")


def command_line(script: str, argv: list[str] | None) -> str:
    """How the benchmark was run, without where its output went."""
    args, out, skip = list(sys.argv[1:] if argv is None else argv), [], False
    for a in args:
        if skip:
            skip = False
        elif a in ("--output", "--merge-from", "--note"):
            skip = True
        elif not a.startswith(("--output=", "--merge-from=", "--note=")):
            out.append(a)
    return shlex.join(["python", f"benchmarks/{script}", *out])


def load_average() -> float:
    return os.getloadavg()[0]


def wait_for_quiet(max_load: float, max_wait_s: float, poll_s: float = 60.0) -> str:
    """Poll the 1-minute load average until it is below `max_load` (or give up); say how it went."""
    if max_load <= 0:
        return f"load average {load_average():.2f} (not waited for)"
    start = time.time()
    while load_average() >= max_load and time.time() - start < max_wait_s:
        print(f"load average {load_average():.2f} >= {max_load}: waiting", flush=True)
        time.sleep(poll_s)
    waited = time.time() - start
    if load_average() >= max_load:
        return (f"load average {load_average():.2f} still >= {max_load} after {waited / 60:.0f} min"
                " of waiting: measured anyway (figures are pessimistic)")
    return f"load average {load_average():.2f} at start (waited {waited / 60:.0f} min)"


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def matmul_timer(device: str, dtype: torch.dtype, n: int | None = None):
    """(call, flops): one call runs a big square matmul in `dtype` (10 of them on a GPU)."""
    n = n or (8192 if device.startswith("cuda") else 2048)
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    inner = 10 if device.startswith("cuda") else 1

    def call():
        for _ in range(inner):
            a @ b
    return call, 2 * n**3 * inner


def matmul_rate(device: str, dtype: torch.dtype, n: int | None = None, reps: int = 5) -> float:
    """FLOP/s of a big square matmul in `dtype` on `device` (median of `reps`)."""
    call, flops = matmul_timer(device, dtype, n)
    times = interleaved({"matmul": call}, reps, 2, device)["matmul"]
    return flops / statistics.median(times)


def interleaved(fns: dict, rounds: int, warmup: int, device: str) -> dict[str, list[float]]:
    """Seconds per call of each function, run A B C A B C ... after `warmup` calls each."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync(device)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            sync(device)
            t = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t)
    return times


SECTION_DATA = re.compile(r"<!-- (?P<name>[\w-]+):data (?P<json>\{.*?\}) -->", re.S)


def read_section_data(path: Path, name: str) -> dict:
    """The JSON results stored (as an HTML comment) in our section of BENCHMARKS.md, if any."""
    if not path.exists():
        return {}
    for m in SECTION_DATA.finditer(path.read_text()):
        if m.group("name") == name:
            with contextlib.suppress(json.JSONDecodeError):
                return json.loads(m.group("json"))
    return {}


def write_section(path: Path, name: str, body: str, data: dict | None = None) -> None:
    """Replace (or append) the `name` section of BENCHMARKS.md; nothing else is touched."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    stored = f"\n<!-- {name}:data {json.dumps(data)} -->" if data else ""
    section = f"{start}\n{body.strip()}{stored}\n{end}"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else (
        text.rstrip("\n") + "\n\n" + section + "\n")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def tiny_config():
    """`preset("tiny")`, or the under-trained stand-in in /tmp while assets/ is being built."""
    cfg = preset("tiny")
    if (Path(cfg.llm) / "config.json").exists():
        return cfg, "assets/ (preset tiny)"
    if (TMP_ASSETS / "llm" / "config.json").exists():
        return preset("tiny", llm=str(TMP_ASSETS / "llm"),
                      vision_qformer=str(TMP_ASSETS / "vision_qformer"),
                      projection_checkpoint=""), f"{TMP_ASSETS} (stand-in, same architecture)"
    raise SystemExit("No tiny assets: build them with `python -m minigpt4_lite build-assets`.")


def load_tiny(device: str = "cpu"):
    from minigpt4_lite.checkpoints import load_model
    cfg, source = tiny_config()
    logging.getLogger("minigpt4_lite").setLevel(logging.ERROR)  # "projection untrained" warning
    torch.manual_seed(0)  # a missing projection checkpoint leaves a seeded random projection
    return load_model(cfg, device=device), source


class IdTokenizer:
    """The two ids `collate` needs, for models built with random weights and no tokenizer."""

    def __init__(self, bos_token_id: int, pad_token_id: int):
        self.bos_token_id, self.pad_token_id = bos_token_id, pad_token_id


def smoke_7b_arch() -> dict:
    """The 7B code path at tiny shapes (to check it on a CPU)."""
    return dict(VICUNA_7B, vocab_size=1024, hidden_size=64, intermediate_size=192,
                num_hidden_layers=2, num_attention_heads=4)


def build_random_7b(device: str, dtype: torch.dtype, smoke: bool) -> MiniGPT4:
    """MiniGPT-4-7B with random weights: LLM in `dtype`, ViT/Q-Former/projection in float32 (as
    `load_model` leaves them). `smoke` shrinks every part (same code path)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from minigpt4_lite.config import QFormerConfig, VisionConfig

    cfg = preset("minigpt4-7b", dtype={torch.bfloat16: "bfloat16", torch.float16: "float16"}.get(
        dtype, "float32"))
    if smoke:
        cfg.llm_arch = smoke_7b_arch()
        cfg.vision = VisionConfig(image_size=28, patch_size=14, width=32, layers=2, heads=4, mlp=64)
        cfg.qformer = QFormerConfig(hidden=32, layers=2, heads=4, mlp=64)
    torch.manual_seed(0)
    with torch.device(device):
        llm = AutoModelForCausalLM.from_config(LlamaConfig(**cfg.llm_arch), dtype=dtype)
        model = MiniGPT4(cfg, llm, IdTokenizer(cfg.llm_arch["bos_token_id"],
                                               cfg.llm_arch["pad_token_id"]))
    with torch.no_grad():  # zero-initialised in our modules: make them random too
        for p in (model.vit.cls_token, model.vit.pos_embed, model.qformer.query_tokens):
            p.normal_(0, 0.02)
    llm.eval()
    return model


# --- the peer -------------------------------------------------------------------------------------
def build_peer(model: MiniGPT4, share_llm: bool, vision_dtype: torch.dtype):
    """`Blip2ForConditionalGeneration` holding our weights (built on meta, tensors assigned).

    As `from_pretrained(dtype=...)` would: the ViT in `vision_dtype`, the Q-Former and query
    tokens in float32 (`_keep_in_fp32_modules`); the projection float32 (it is trained).
    """
    from transformers import Blip2Config, Blip2ForConditionalGeneration

    v, q = model.cfg.vision, model.cfg.qformer
    llm_cfg = model.llm.config
    cfg = Blip2Config(
        vision_config=dict(hidden_size=v.width, intermediate_size=v.mlp,
                           num_hidden_layers=v.layers, num_attention_heads=v.heads,
                           image_size=v.image_size, patch_size=v.patch_size,
                           layer_norm_eps=v.layer_norm_eps, qkv_bias=True),
        qformer_config=dict(hidden_size=q.hidden, num_hidden_layers=q.layers,
                            num_attention_heads=q.heads, intermediate_size=q.mlp,
                            cross_attention_frequency=q.cross_attention_every,
                            encoder_hidden_size=v.width, layer_norm_eps=q.layer_norm_eps),
        text_config=llm_cfg.to_dict(), num_query_tokens=q.num_query_tokens,
        image_token_index=model.tokenizer.pad_token_id)  # never in our unpadded batches
    with torch.device("meta"):
        peer = Blip2ForConditionalGeneration(cfg)
    vit, qformer = model.vit.state_dict(), model.qformer.state_dict()
    state = {hf: vit[ours].detach().to(vision_dtype, copy=True)
             for ours, hf in hf_vision_keys(v).items()}
    state.update({hf: qformer[ours].detach().float().clone()
                  for ours, hf in hf_qformer_keys(q).items()})
    state["language_projection.weight"] = model.llama_proj.weight.detach().float().clone()
    state["language_projection.bias"] = model.llama_proj.bias.detach().float().clone()
    missing, unexpected = peer.load_state_dict(state, strict=False, assign=True)
    if unexpected or any(not k.startswith("language_model.") for k in missing):
        raise RuntimeError(f"peer weights: missing {missing[:3]}, unexpected {unexpected[:3]}")
    peer.language_model = model.llm if share_llm else copy.deepcopy(model.llm)
    meta = [n for n, t in [*peer.named_parameters(), *peer.named_buffers()] if t.is_meta]
    if meta:
        raise RuntimeError(f"peer tensors left on the meta device: {meta[:3]}")
    peer.eval()
    for p in peer.parameters():
        p.requires_grad_(False)
    peer.language_projection.requires_grad_(True)
    return peer


# --- data -----------------------------------------------------------------------------------------
def tiny_batch(model: MiniGPT4, batch_size: int) -> dict:
    """ToyWorld images + stage-1 captions made exactly 32 tokens long (repeated, then cut)."""
    from minigpt4_lite.data import ToyWorldDataset, image_tensor

    ds = ToyWorldDataset(1, batch_size)
    samples = [ds[i] for i in range(batch_size)]
    examples = []
    for s in samples:
        answer = s.answer
        while len(model.text_ids(answer + END_SYM[1])) < CAPTION_TOKENS:
            answer += " " + s.answer
        examples.append(model.build_example(None, answer, max_txt_len=CAPTION_TOKENS))
    batch = model.collate(examples)
    batch["pixels"] = torch.stack([image_tensor(s, model.cfg.vision.image_size) for s in samples])
    return batch


def random_batch(model: MiniGPT4, batch_size: int) -> dict:
    """Random pixels and random caption ids (ids >= 3: no BOS/EOS/pad), 32 tokens each."""
    g = torch.Generator().manual_seed(0)
    vocab, q = model.llm.config.vocab_size, model.cfg.num_visual_tokens
    bos = model.tokenizer.bos_token_id
    examples = []
    for _ in range(batch_size):
        caption = torch.randint(3, vocab, (CAPTION_TOKENS,), generator=g).tolist()
        examples.append(Example([bos] + [-1] * q + caption, [IGNORE_INDEX] * (1 + q) + caption))
    batch = model.collate(examples)
    size = model.cfg.vision.image_size
    batch["pixels"] = torch.randn(batch_size, 3, size, size, generator=g)
    return batch


def to_device(batch: dict, device: str) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


# --- FLOPs ----------------------------------------------------------------------------------------
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


# --- proposed fast paths (not in the library) -----------------------------------------------------
def answer_only_loss(model: MiniGPT4, batch: dict, body=None) -> torch.Tensor:
    """The same loss with the LM head and cross-entropy on the answer positions only.

    `MiniGPT4.forward` lets the LLM compute [B, T, vocab] logits (and upcast them) at every
    position, although only answer positions have labels. `body` replaces `model.llm.model`
    (e.g. a compiled one).
    """
    image_embeds = model.project(batch["features"])
    inputs_embeds = model.embed(batch["input_ids"], batch["image_mask"], image_embeds)
    body = body if body is not None else model.llm.model
    hidden = body(inputs_embeds=inputs_embeds,
                  attention_mask=batch["attention_mask"]).last_hidden_state
    labels = batch["labels"][:, 1:]
    keep = labels != IGNORE_INDEX
    logits = model.llm.get_output_embeddings()(hidden[:, :-1][keep])
    return F.cross_entropy(logits.float(), labels[keep])


# --- the benchmark --------------------------------------------------------------------------------
def autocast_context(device: str, precision: str):
    if precision == "bf16":
        return torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16)
    return contextlib.nullcontext()


def run(args) -> dict:
    device = args.device
    big = args.preset == "minigpt4-7b"
    precision = "bf16" if (big and (device.startswith("cuda") or args.smoke)) else "fp32"
    llm_dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    if big:
        model, source = build_random_7b(device, llm_dtype, args.smoke), "random weights"
        if args.smoke:
            source += " (smoke: tiny shapes)"
        batch = random_batch(model, args.batch)
    else:
        model, source = load_tiny(device)
        batch = tiny_batch(model, args.batch)
    peer = build_peer(model, share_llm=big, vision_dtype=llm_dtype)
    model.train()
    batch = to_device(batch, device)
    pixels = batch.pop("pixels")
    hf_ids = batch["input_ids"].clone()
    image_token = peer.config.image_token_index
    if (hf_ids[~batch["image_mask"]] == image_token).any():
        raise RuntimeError("the peer's image token id occurs in the text")
    hf_ids[batch["image_mask"]] = image_token
    seq_len = batch["input_ids"].shape[1]

    def amp():
        return autocast_context(device, precision)

    # the one-time cost of the frozen-feature cache (ViT + Q-Former, no grad); no autocast, as
    # `train` builds the cache (`build_feature_cache`) before entering Accelerate's autocast
    with torch.no_grad():
        model.visual_features(pixels)  # warm-up
        sync(device)
        t = time.perf_counter()
        features = model.visual_features(pixels)
        sync(device)
        cache_s = time.perf_counter() - t
    cached = dict(batch, features=features)
    full = dict(batch, pixels=pixels)
    library_cache = make_batch_ms = None
    if not big:  # the library's own `build_feature_cache` (ToyWorld rendering included)
        from minigpt4_lite.data import ToyWorldDataset
        from minigpt4_lite.train import build_feature_cache
        ds = ToyWorldDataset(1, 4 * args.batch)
        t = time.perf_counter()
        feature_cache = build_feature_cache(model, ds)
        library_cache = len(ds) / (time.perf_counter() - t)
        # what `train` does per step besides the step: draw samples, tokenise, stack features
        from minigpt4_lite.train import TrainConfig, make_batch
        gen, tcfg = torch.Generator().manual_seed(0), TrainConfig(stage=1)
        make_batch_s = []
        for _ in range(5):
            t = time.perf_counter()
            make_batch(model, [ds[i] for i in range(args.batch)], tcfg, feature_cache, False, gen)
            make_batch_s.append(time.perf_counter() - t)
        make_batch_ms = 1e3 * statistics.median(make_batch_s)

    ours_opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-4)
    peer_opt = torch.optim.AdamW([p for p in peer.parameters() if p.requires_grad], lr=1e-4)

    def ours_loss(b):
        with amp():
            return model(b).loss

    def peer_loss():
        with amp():
            return peer(pixel_values=pixels.to(peer.vision_model.dtype), input_ids=hf_ids,
                        attention_mask=batch["attention_mask"], labels=batch["labels"]).loss

    # the library's default for a real stage-1 run (the paper's 20,000 steps): `train` compiles
    # the LLM for runs long enough to pay for it; "ours, eager" is the default of short runs
    from minigpt4_lite.train import compile_llm, recipe, should_compile
    default_cfg = recipe("paper-stage1")
    library_compiles = should_compile(default_cfg, torch.device(device))
    compiled_forward = None
    if library_compiles:
        undo = compile_llm(model.llm)
        compiled_forward = model.llm.forward
        undo()

    def ours_default():
        if compiled_forward is None:
            return ours_loss(cached)
        model.llm.forward = compiled_forward  # the graph is built here; backward needs no swap
        try:
            return ours_loss(cached)
        finally:
            del model.llm.forward

    losses: dict[str, callable] = {"peer": peer_loss, "ours": ours_default}
    if library_compiles:
        losses["ours, eager"] = lambda: ours_loss(cached)
    if not args.skip_no_cache:
        losses["ours, no cache"] = lambda: ours_loss(full)
    proposals = [p for p in (args.proposals or "").split(",") if p]
    compiled = {}
    for p in proposals:
        if p == "answer_head":
            losses["proposal: answer-only LM head"] = (
                lambda: _amp_call(amp, answer_only_loss, model, cached))
        elif p == "compile":
            compiled["llm"] = torch.compile(model.llm)
            losses["proposal: compiled LLM"] = lambda: _amp_call(
                amp, lambda: _forward_with(model, compiled["llm"], cached).loss)
        elif p == "compile_answer_head":
            compiled["body"] = torch.compile(model.llm.model)
            losses["proposal: compiled LLM + answer-only head"] = lambda: _amp_call(
                amp, answer_only_loss, model, cached, compiled["body"])
        else:
            raise SystemExit(f"unknown proposal {p!r}")

    # equivalence: the same loss and projection gradient on the same batch
    checks, reference = {}, None
    for name, loss_fn in losses.items():
        t = time.perf_counter()
        loss = loss_fn()
        loss.backward()
        first_call_s = time.perf_counter() - t
        params = (peer.language_projection if name == "peer" else model.llama_proj).weight
        grad = params.grad.detach().float().clone()
        params.grad = None
        if name == "peer":
            peer.language_projection.bias.grad = None
        else:
            model.llama_proj.bias.grad = None
        if reference is None:
            reference = (loss.item(), grad)
        diff = abs(loss.item() - reference[0])
        gdiff = ((grad - reference[1]).abs().max() / reference[1].abs().max().clamp_min(1e-30))
        checks[name] = {"loss": loss.item(), "loss_diff_vs_peer": diff,
                        "grad_rel_diff_vs_peer": float(gdiff), "first_call_s": first_call_s}
    tol = 1e-5 if precision == "fp32" else 5e-2
    bad = [n for n, c in checks.items() if c["loss_diff_vs_peer"] > tol * max(1, abs(
        reference[0]))]
    for name, c in checks.items():
        print(f"check {name:45s} loss {c['loss']:.7f}  |diff| {c['loss_diff_vs_peer']:.2e}  "
              f"grad rel diff {c['grad_rel_diff_vs_peer']:.2e}")
    if bad and not args.no_check:
        raise SystemExit(f"losses differ beyond {tol}: {bad}")

    def step_fn(loss_fn, opt):
        def step():
            for _ in range(args.steps):
                loss = loss_fn()
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                loss.item()  # as `train`: one host sync per step
        return step

    fns = {name: step_fn(fn, peer_opt if name == "peer" else ours_opt)
           for name, fn in losses.items()}

    def peer_visual():  # the part of the peer's step that the cache removes
        with torch.no_grad(), amp():
            for _ in range(args.steps):
                peer.get_image_features(pixel_values=pixels.to(peer.vision_model.dtype))

    dtype = llm_dtype if device.startswith("cuda") else torch.float32
    # the matmul rate is timed in the same interleaved rounds: it sees the same conditions
    matmul, matmul_flops = matmul_timer(device, dtype)
    times = interleaved({**fns, "peer visual forward": peer_visual, "matmul": matmul},
                        args.rounds, args.warmup, device)
    matmul_s = times.pop("matmul")
    rate = matmul_flops / statistics.median(matmul_s)
    best_rate = matmul_flops / min(matmul_s)
    peer_visual_ms = 1e3 * statistics.median(times.pop("peer visual forward")) / args.steps
    if args.profile:
        profile_step(fns["ours"], device)
    f = flops_per_sample(model, seq_len)
    results = {}
    for name, ts in times.items():
        per_step = statistics.median(ts) / args.steps
        sps = args.batch / per_step
        work = f["llm"] + f["projection"] + (0 if _uses_cache(name) else f["vision"])
        results[name] = {"samples_per_s": sps, "step_ms": 1e3 * per_step,
                         "best_samples_per_s": args.batch * args.steps / min(ts),
                         "best_mfu": args.batch * args.steps / min(ts) * work / best_rate,
                         "mfu": sps * work / rate, "flops_per_sample": work,
                         "spread": (max(ts) - min(ts)) / statistics.median(ts)}
    peer_sps = results["peer"]["samples_per_s"]
    for r in results.values():
        r["vs_peer"] = r["samples_per_s"] / peer_sps
        r["best_vs_peer"] = r["best_samples_per_s"] / results["peer"]["best_samples_per_s"]
    return {"preset": args.preset, "device": device, "precision": precision, "batch": args.batch,
            "seq_len": seq_len, "weights": source, "matmul_flops": rate,
            "best_matmul_flops": best_rate,
            "peer_visual_ms": peer_visual_ms, "cache_images_per_s": args.batch / cache_s,
            "library_cache_images_per_s": library_cache, "make_batch_ms": make_batch_ms,
            "flops": f, "checks": checks, "results": results,
            "library_compiles": library_compiles,
            "steps": args.steps, "rounds": args.rounds, "warmup": args.warmup}


def profile_step(step, device: str) -> None:
    """Print where the time of `step` goes (torch.profiler, top operators by self time)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device != "cpu" else [])
    with profile(activities=activities) as prof:
        step()
    key = "self_cuda_time_total" if device != "cpu" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=15))


def _uses_cache(name: str) -> bool:
    return name not in ("peer", "ours, no cache")


def _amp_call(amp, fn, *args):
    with amp():
        return fn(*args)


def _forward_with(model: MiniGPT4, llm, batch: dict):
    """`MiniGPT4.forward` with another (e.g. compiled) LLM module."""
    image_embeds = model.project(batch["features"])
    inputs_embeds = model.embed(batch["input_ids"], batch["image_mask"], image_embeds)
    return llm(inputs_embeds=inputs_embeds, attention_mask=batch["attention_mask"],
               labels=batch["labels"])


# --- output ---------------------------------------------------------------------------------------
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
                f"- machine: {machine_line(r['machine'])}",
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


def merge(source: Path, path: Path, name: str = NAME, render_fn=None) -> None:
    """Copy the GPU runs stored in `source`'s `name` section (e.g. from gpu_all.sh) into `path`.

    Shared by the benchmarks that keep several runs per section (`render_fn` redraws it).
    """
    gpu = {k: v for k, v in read_section_data(source, name).items() if "/cuda" in k}
    if not gpu:
        raise SystemExit(f"{source} holds no GPU results for {name}.")
    runs = read_section_data(path, name)
    runs.update(gpu)
    write_section(path, name, (render_fn or render)(runs), runs)
    print(f"merged {', '.join(sorted(gpu))} into the {name} section of {path}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=("tiny", "minigpt4-7b"), default="tiny")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if there)")
    parser.add_argument("--batch", type=int, default=None, help="default 32 tiny, 64 7B")
    parser.add_argument("--steps", type=int, default=3, help="steps per timed round")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=3, help="warm-up steps per path")
    parser.add_argument("--threads", type=int, default=2, help="torch threads on the CPU")
    parser.add_argument("--proposals", default="",
                        help="comma list: answer_head, compile, compile_answer_head")
    parser.add_argument("--skip-no-cache", action="store_true",
                        help="do not time ours from pixels")
    parser.add_argument("--tag", default="",
                        help="stored as a separate entry of the section (e.g. compiled)")
    parser.add_argument("--smoke", action="store_true",
                        help="7B code path at tiny shapes (CPU check); never written")
    parser.add_argument("--wait-load", type=float, default=0.0,
                        help="wait until the 1-min load average is below this (0: no wait)")
    parser.add_argument("--note", default="", help="added to the load line of the section")
    parser.add_argument("--wait-max", type=float, default=2400.0, help="seconds to wait at most")
    parser.add_argument("--no-check", action="store_true", help="time even if losses differ")
    parser.add_argument("--profile", action="store_true",
                        help="print a torch.profiler table of one timed round of ours")
    parser.add_argument("--output", default=str(ROOT / "BENCHMARKS.md"))
    parser.add_argument("--merge-from", metavar="FILE",
                        help="copy the GPU results of FILE's section into --output and exit")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)
    if args.merge_from:
        merge(Path(args.merge_from), Path(args.output))
        return
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.batch = args.batch or (64 if args.preset == "minigpt4-7b" else 32)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here.")
    if args.preset == "minigpt4-7b" and args.device == "cpu" and not args.smoke:
        raise SystemExit("minigpt4-7b needs CUDA (or --smoke for the same code at tiny shapes).")
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    load = wait_for_quiet(args.wait_load, args.wait_max)
    r = run(args)
    r["load"] = load + f"; {load_average():.2f} at the end" + (
        f"; {args.note}" if args.note else "")
    r["machine"] = machine_info(args.device)
    r["date"] = datetime.date.today().isoformat()
    r["command"] = command_line("stage1_step.py", argv)
    r["equivalence"] = equivalence_line(r)
    print(table(r))
    print(f"matmul {r['matmul_flops'] / 1e12:.3f} TFLOP/s; cache "
          f"{r['cache_images_per_s']:.0f} images/s; {r['load']}")
    print(r["equivalence"])
    if args.no_write or args.smoke:
        return
    path = Path(args.output)
    runs = read_section_data(path, NAME)
    key = f"{args.preset}/{args.device.split(':')[0]}" + (f"/{args.tag}" if args.tag else "")
    runs[key] = r
    write_section(path, NAME, render(runs), runs)
    print(f"wrote the {NAME} section of {path}")


if __name__ == "__main__":
    main()
