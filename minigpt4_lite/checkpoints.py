"""Reading and writing weights: HF BLIP-2 parts, any HF causal LM, the official projection `.pth`,
and our own safetensors folders (files are found by `hub.resolve_file`).

Loading is frugal, for a free Colab T4 (15 GB GPU, about 12 GB of RAM): the LLM goes shard by
shard straight to its device (optionally in 8/4 bit), the visual tensors one by one in their
dtype. Loading is strict (nanoGPT style): every tensor of ours must be found with the right
shape, and every tensor of the source under the prefixes we read must be used; anything else is
a `CheckpointError` that names the tensor. User files are read as safetensors or with
`torch.load(weights_only=True)`, which refuses pickles that would run code.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import DTYPES, MiniGPT4Config, QFormerConfig, VisionConfig
from .errors import CheckpointError, ConfigError
from .hub import load_tokenizer, missing_projection_message, resolve_file
from .model import MiniGPT4
from .qformer import hf_qformer_keys
from .vision import hf_vision_keys

log = logging.getLogger(__name__)

VISUAL_PREFIXES = ("vision_model.", "qformer.", "query_tokens")
PROJECTION_FILE = "projection.safetensors"


def _visual_shards(source: str) -> list[Path]:
    """The safetensors files of an HF BLIP-2 checkpoint that hold the visual tensors only.

    With a sharded checkpoint, the index says which shard holds which tensor, so the 11B language
    model of `blip2-flan-t5-xxl` is never downloaded or read.
    """
    index = resolve_file(source, "model.safetensors.index.json")
    if index is not None:
        weight_map = json.loads(index.read_text())["weight_map"]
        names = sorted({f for k, f in weight_map.items() if k.startswith(VISUAL_PREFIXES)})
        files = [resolve_file(source, n) for n in names]
        missing = [n for n, f in zip(names, files) if f is None]
        if missing:
            raise CheckpointError(f"{source!r}: {missing[0]} is missing, but its "
                                  "model.safetensors.index.json lists it for the visual tensors.")
        return files
    single = resolve_file(source, "model.safetensors")
    if single is None:
        raise CheckpointError(
            f"No BLIP-2 safetensors in {source!r}: it has neither model.safetensors nor "
            "model.safetensors.index.json (an HF BLIP-2 checkpoint such as "
            "Salesforce/blip2-flan-t5-xxl has them).")
    return [single]


def read_tensors(files: list[Path], prefixes: tuple[str, ...] | None = None,
                 device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> dict:
    """Read the tensors whose names start with one of `prefixes` from safetensors files.

    Each tensor is moved to `device` and its floats cast to `dtype` as soon as it is read, so a
    file's tensors never all sit in RAM in the file's dtype (float32 for BLIP-2's ViT: 3.9 GB).
    """
    tensors = {}
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    if prefixes is None or key.startswith(prefixes):
                        t = f.get_tensor(key)
                        tensors[key] = t.to(device or t.device, dtype if dtype is not None
                                            and t.is_floating_point() else t.dtype)
        except Exception as e:  # truncated or not a safetensors file
            raise CheckpointError(f"Cannot read {path}: it is not a complete safetensors file "
                                  f"({e}).") from e
    return tensors


def load_with_key_map(module: torch.nn.Module, tensors: dict, key_map: dict[str, str],
                      source: str) -> None:
    """Copy `tensors[key_map[ours]]` into each parameter of `module`; fail loudly on mismatch."""
    ours = dict(module.state_dict())
    missing = sorted(set(ours) - set(key_map))
    if missing:  # our module has a tensor the map does not cover: a bug in the map
        raise CheckpointError(f"Key map has no entry for {missing[0]} ({len(missing)} in all).")
    wanted = set(key_map.values())
    unexpected = sorted(set(tensors) - wanted)
    if unexpected:
        raise CheckpointError(f"{source}: unexpected tensor {unexpected[0]!r} "
                              f"({len(unexpected)} unexpected in all); is it a BLIP-2 checkpoint "
                              "of the architecture in the config?")
    new_state = {}
    for name, theirs in key_map.items():
        if theirs not in tensors:
            raise CheckpointError(f"{source}: tensor {theirs!r} is missing (needed for {name}).")
        t = tensors[theirs]
        if t.shape != ours[name].shape:
            raise CheckpointError(f"{source}: tensor {theirs!r} has shape {list(t.shape)}, "
                                  f"expected {list(ours[name].shape)}.")
        new_state[name] = t
    # assign: the module takes the tensors read (already in its dtype, on its device) instead of
    # copying them into its own, so the weights are never twice in memory
    module.load_state_dict(new_state, strict=True, assign=True)


def visual_configs_from_hf(source: str) -> tuple[VisionConfig, QFormerConfig] | None:
    """Read the ViT and Q-Former architecture from an HF BLIP-2 `config.json`, if there is one."""
    path = resolve_file(source, "config.json")
    if path is None:
        return None
    cfg = json.loads(path.read_text())
    v, q = cfg.get("vision_config", {}), cfg.get("qformer_config", {})
    vision = VisionConfig(image_size=v.get("image_size", 224), patch_size=v.get("patch_size", 14),
                          width=v.get("hidden_size", 1408), layers=v.get("num_hidden_layers", 39),
                          heads=v.get("num_attention_heads", 16),
                          mlp=v.get("intermediate_size", 6144),
                          layer_norm_eps=v.get("layer_norm_eps", 1e-6))
    qformer = QFormerConfig(hidden=q.get("hidden_size", 768), layers=q.get("num_hidden_layers", 12),
                            heads=q.get("num_attention_heads", 12),
                            mlp=q.get("intermediate_size", 3072),
                            cross_attention_every=q.get("cross_attention_frequency", 2),
                            num_query_tokens=cfg.get("num_query_tokens", 32),
                            layer_norm_eps=q.get("layer_norm_eps", 1e-12))
    return vision, qformer


def load_blip2_visual(model: MiniGPT4, source: str, device: torch.device | str | None = None,
                      dtype: torch.dtype | None = None) -> None:
    """Load ViT + ln_vision + Q-Former + query tokens from an HF BLIP-2 checkpoint (folder or id).

    Reads only `vision_model.*`, `qformer.*` and `query_tokens` (docs/official.md), each tensor
    moved to `device` in `dtype` as it is read (default: the ViT's own). Without a Q-Former only
    `vision_model.*` is read. With `ln_vision="fresh"` the checkpoint's trained `post_layernorm`
    is not used: ln_vision keeps weight 1 and bias 0, as in the official Llama-2 model.
    """
    own = next(model.vit.parameters())
    device, dtype = device or own.device, dtype or own.dtype
    prefixes = VISUAL_PREFIXES if model.qformer is not None else ("vision_model.",)
    tensors = read_tensors(_visual_shards(source), prefixes, device, dtype)
    if model.cfg.ln_vision == "fresh":  # never loaded officially (docs/official.md, "Llama-2")
        for key, value in model.vit.ln_vision.state_dict().items():
            tensors[f"vision_model.post_layernorm.{key}"] = value.to(device, dtype)
    vit_t = {k: v for k, v in tensors.items() if k.startswith("vision_model.")}
    load_with_key_map(model.vit, vit_t, hf_vision_keys(model.cfg.vision), source)
    if model.qformer is not None:
        q_t = {k: v for k, v in tensors.items() if not k.startswith("vision_model.")}
        load_with_key_map(model.qformer, q_t, hf_qformer_keys(model.cfg.qformer), source)


# --- the LLM ------------------------------------------------------------------------------------
def resolve_dtype(dtype: str, device: str) -> str:
    """The LLM's (or the ViT's) dtype: `auto` is float16 on CUDA (the official code's choice) and
    float32 elsewhere (a CPU computes float16 slowly and rounds it differently at every layer, so a
    float16 answer drifts from the float32 one within a few tokens)."""
    if dtype not in DTYPES:
        raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}.")
    if dtype == "auto":
        return "float16" if str(device).startswith("cuda") else "float32"
    return dtype


def _torch_dtype(name: str) -> torch.dtype:
    try:
        return {"float32": torch.float32, "float16": torch.float16,
                "bfloat16": torch.bfloat16}[name]
    except KeyError:
        raise ConfigError(f"dtype must be float32, float16 or bfloat16, got {name!r}.") from None


def quantization_config(quantization: str, device: str, dtype: str):
    """A `BitsAndBytesConfig` for "8bit"/"4bit", or a one-line `ConfigError` if impossible."""
    if quantization == "none":
        return None
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError:
        raise ConfigError(f"{quantization} loading needs bitsandbytes: pip install "
                          "'minigpt4-lite[quant]'.") from None
    if not device.startswith("cuda") and quantization == "4bit":
        log.warning("4-bit on the CPU is for inference only: its CPU backward is unreliable.")
    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    compute = torch.bfloat16 if dtype == "float32" else _torch_dtype(dtype)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                              bnb_4bit_compute_dtype=compute)


def load_llm(source: str, *, quantization: str = "none", dtype: str = "float32",
             device: str = "cpu"):
    """Any transformers causal LM + its tokenizer, optionally 8/4-bit (bitsandbytes).

    `dtype` is float32, float16, bfloat16 or `auto` (see `resolve_dtype`). `device_map=device`
    makes transformers read the checkpoint shard by shard, tensor by tensor, straight onto the
    device (quantising on the way): the whole LLM is never in CPU RAM (a T4 machine has ~12 GB).
    """
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    dtype = resolve_dtype(dtype, device)
    if dtype == "float16" and not str(device).startswith("cuda") and quantization == "none":
        log.warning("float16 on %s is slow and its answers drift from float32's after a few "
                    "tokens; --dtype auto (float32 there) is exact.", device)
    log.info("Loading the LLM %s in %s on %s", source, dtype, device)
    qcfg = quantization_config(quantization, device, dtype)
    kwargs = {"dtype": _torch_dtype(dtype), "device_map": device}
    if qcfg is not None:
        kwargs["quantization_config"] = qcfg
        logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    tokenizer = load_tokenizer(source)
    try:
        llm = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except OSError as e:
        raise CheckpointError(f"Cannot load the LLM {source!r}: {str(e).splitlines()[0]}") from e
    except (RuntimeError, ValueError) as e:
        if qcfg is not None:
            raise ConfigError(f"bitsandbytes could not load {source!r} in {quantization} on "
                              f"{device}: {str(e).splitlines()[0]}") from e
        raise
    if tokenizer.pad_token is None:  # LLaMA has none; official MiniGPT-4 pads with EOS...
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token  # ...labels mask it anyway
    llm.eval()
    return llm, tokenizer


# --- the projection -----------------------------------------------------------------------------
def _load_user_pickle(path: Path) -> dict:
    """`torch.load` a user file with `weights_only=True`: code in the pickle is refused, not run."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, AttributeError, EOFError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"Refused to load {path}: it is not a plain weights file ({first}); only tensors "
            "and plain containers are accepted, nothing in it was executed.") from e


def read_projection(path: str | Path) -> dict[str, torch.Tensor]:
    """Projection tensors from our folder/safetensors file or an official MiniGPT-4 `.pth`.

    Official checkpoints are `{"model": {"llama_proj.weight": [d, 768], ...}, ...}`, possibly with
    optimizer state and other keys: only `llama_proj.*` (and `qformer.*` if saved by us) is kept.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / PROJECTION_FILE
    if not path.exists():
        raise CheckpointError(f"Projection checkpoint {path} does not exist.")
    if path.suffix == ".safetensors":
        state = read_tensors([path])
    else:
        ckpt = _load_user_pickle(path)
        state = ckpt.get("model", ckpt) if isinstance(ckpt, dict) else None
        if not isinstance(state, dict):
            raise CheckpointError(f"{path} holds no state dict (expected {{'model': {{...}}}}).")
    picked = {k: v for k, v in state.items()
              if k.startswith(("llama_proj.", "qformer.")) and isinstance(v, torch.Tensor)}
    if not any(k.startswith("llama_proj.") for k in picked):
        raise CheckpointError(f"{path} has no llama_proj.* tensors; keys found: "
                              f"{', '.join(sorted(state)[:5])}.")
    return picked


def load_projection(model: MiniGPT4, path: str | Path) -> None:
    """Load the trained projection (and a finetuned Q-Former, if saved) into `model`, strictly."""
    state = read_projection(path)
    own = {f"llama_proj.{k}": v for k, v in model.llama_proj.state_dict().items()}
    if not model.cfg.freeze_qformer and model.qformer is not None:
        own.update({f"qformer.{k}": v for k, v in model.qformer.state_dict().items()})
    for name, tensor in own.items():
        if name not in state:
            raise CheckpointError(f"{path}: tensor {name!r} is missing (projection "
                                  f"'{model.cfg.projection}' expects it).")
        if state[name].shape != tensor.shape:
            got, want = list(state[name].shape), list(tensor.shape)
            hint = ""
            if name == "llama_proj.weight" and len(got) == 2 and got[1] == want[1]:
                hint = (f" The checkpoint was trained for an LLM of width {got[0]}, but the "
                        f"loaded LLM has width {want[0]} (7B: 4096, 13B: 5120); use the "
                        "matching LLM or checkpoint.")
            raise CheckpointError(f"{path}: tensor {name!r} has shape {got}, expected {want}."
                                  + hint)
    extra = sorted(set(state) - set(own))
    if extra:
        raise CheckpointError(f"{path}: unexpected tensor {extra[0]!r} for this model "
                              f"(projection '{model.cfg.projection}').")
    with torch.no_grad():
        for name, tensor in own.items():
            tensor.copy_(state[name])


def atomic_save_file(tensors: dict, path: Path, metadata: dict | None = None) -> None:
    """Write safetensors to a temp file in the same folder, then rename: never half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=path.suffix)
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp,
                  metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_pretrained(model: MiniGPT4, folder: str | Path) -> Path:
    """Save what was trained (projection, and Q-Former if finetuned) + the config, HF style."""
    folder = Path(folder)
    state = {f"llama_proj.{k}": v for k, v in model.llama_proj.state_dict().items()}
    if not model.cfg.freeze_qformer and model.qformer is not None:
        state.update({f"qformer.{k}": v for k, v in model.qformer.state_dict().items()})
    atomic_save_file(state, folder / PROJECTION_FILE)
    model.cfg.save(folder / "config.json")
    return folder


# --- building a whole model ---------------------------------------------------------------------
def build_meta(cfg: MiniGPT4Config) -> MiniGPT4:
    """The model on the meta device: shapes and parameter counts without memory or download."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    if not cfg.llm_arch:
        raise ConfigError(f"Preset {cfg.name!r} stores no LLM architecture (llm_arch).")
    with torch.device("meta"):
        llm = AutoModelForCausalLM.from_config(LlamaConfig(**cfg.llm_arch))
        return MiniGPT4(cfg, llm)


def load_model(cfg: MiniGPT4Config, *, device: str = "cpu", projection: str | None = None,
               load_projection_weights: bool = True) -> MiniGPT4:
    """Build `MiniGPT4` with real weights: BLIP-2 visual parts, the LLM, and the projection.

    `cfg.vision_qformer` and `cfg.llm` are local folders or hub ids; the LLM is loaded in
    `cfg.dtype`, the frozen ViT and Q-Former in `cfg.vision_dtype` (`auto`: float16 on CUDA, as
    the official `vit_precision: fp16`, float32 elsewhere), all straight onto `device`. The
    projection (float32) comes from `projection`, else `cfg.projection_checkpoint`. A named file
    that does not exist is a `CheckpointError` (for a real preset it says where the official file
    is), raised before anything large is loaded; `projection=""` asks for an untrained projection.
    """
    source = projection if projection is not None else cfg.projection_checkpoint
    if load_projection_weights and source and not Path(source).expanduser().exists():
        raise CheckpointError(missing_projection_message(cfg.name, source))
    hf_arch = visual_configs_from_hf(cfg.vision_qformer) if cfg.vision_qformer else None
    if hf_arch is not None:
        cfg.vision, qformer = hf_arch
        cfg.qformer = qformer
    llm, tokenizer = load_llm(cfg.llm, quantization=cfg.quantization, dtype=cfg.dtype,
                              device=device)
    model = MiniGPT4(cfg, llm, tokenizer)
    vision_dtype = _torch_dtype(resolve_dtype(cfg.vision_dtype, device))
    load_blip2_visual(model, cfg.vision_qformer, device, vision_dtype)
    if model.qformer is not None and not cfg.freeze_qformer:  # a trained Q-Former learns in fp32
        model.qformer.float()
    model.llama_proj.to(device)
    if load_projection_weights and source:
        load_projection(model, source)
    else:
        log.info("llama_proj is left untrained (randomly initialised), as asked.")
    return model
