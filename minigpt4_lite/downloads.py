"""Getting the real MiniGPT-4's weights (paper Sec. 3 and 4): what to download, how big it is, how
much memory it takes, and one clear sentence when a download fails.

The real model comes from three places (docs/official.md, "Weights a user needs"):

- BLIP-2's ViT-g and Q-Former, from `Salesforce/blip2-flan-t5-xxl`. That repository is mostly
  FlanT5-XXL (about 49 GB in all); `visual_download` lists only the safetensors shards whose index
  holds `vision_model.*`, `qformer.*` or `query_tokens`.
- The LLM (merged Vicuna v0, or Llama-2-chat): `llm_download` lists its config, its tokenizer and
  one copy of its weights (safetensors if the repository has them, else the `.bin` shards).
- The official projection checkpoint, a Google Drive file linked from the official README:
  `fetch_projection` gets it with `gdown` and checks that what arrived is the checkpoint.

A `Download` knows its files' sizes before anything large is fetched (one hub call), so a notebook
can say what it is about to download; `fetch` then downloads into the hub cache and returns the
local folder, which `checkpoints.load_model` reads like a hub id. `weight_gb` says how much memory
the weights take in each dtype, from the parameter counts of the model built on the meta device.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import huggingface_hub
import torch
from huggingface_hub import constants as hub_constants
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
)

from .checkpoints import VISUAL_PREFIXES, read_projection
from .errors import CheckpointError, ConfigError
from .hub import OFFICIAL_PROJECTIONS
from .model import MiniGPT4

GB = 1e9  # sizes are given in GB (10^9 bytes), as the hub shows them
# Next to the weights, what `AutoTokenizer` / `AutoModelForCausalLM` read from an LLM folder.
LLM_SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.model", "tokenizer.json",
                  "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")
# Bytes per parameter of the LLM's linear layers. bitsandbytes adds one float32 scale per row
# (8-bit: negligible) or per block of 64 weights (4-bit NF4, its default): 4 / 64 bytes a weight.
LLM_BYTES = {"fp16": 2.0, "8bit": 1.0, "4bit": 0.5 + 4 / 64}


@dataclass
class Download:
    """Files of one hub repository to fetch, with their sizes in bytes (as the hub reports them)."""

    what: str
    repo: str
    sizes: dict[str, int]
    endpoint: str | None = None  # the hub's address; None: huggingface.co (or HF_ENDPOINT)

    @property
    def total(self) -> int:
        return sum(self.sizes.values())

    def __str__(self) -> str:
        parts = [f"{name} {size / GB:.2f} GB" for name, size in self.sizes.items()
                 if size >= GB / 10]
        small = len(self.sizes) - len(parts)
        parts += [f"{small} small file{'s' * (small > 1)}"] if small else []
        return (f"{self.what}: {self.repo}, {self.total / GB:.1f} GB in {len(self.sizes)} files "
                f"({', '.join(parts)})")


# --- talking to the hub -------------------------------------------------------------------------
def _hub_error(e: Exception, where: str, repo: str) -> CheckpointError | None:
    """The one-sentence error for a failed hub call on `where`, or None if `e` is not one."""
    cause = _first_line(e)
    if isinstance(e, GatedRepoError):  # before RepositoryNotFoundError, its parent class
        return CheckpointError(
            f"{repo} is a gated repository ({where}: {cause}): accept its conditions on "
            f"https://huggingface.co/{repo} with your account, then log in here "
            "(`hf auth login`, `huggingface_hub.login()`, or set HF_TOKEN) and run this again.")
    if isinstance(e, RepositoryNotFoundError):
        return CheckpointError(
            f"{repo} is not a hub repository you can access ({where}: {cause}): check the id, "
            "and log in (`hf auth login` or HF_TOKEN) if it is private.")
    if isinstance(e, HFValidationError):
        return CheckpointError(f"{repo!r} is not a valid hub id ({cause}).")
    if isinstance(e, (OfflineModeIsEnabled, LocalEntryNotFoundError)) or _is_network_error(e):
        return CheckpointError(
            f"Cannot download {where}: the hub cannot be reached from here ({cause}). Check the "
            "network connection (and unset HF_HUB_OFFLINE), or download the files on another "
            "machine and pass their local folder instead of the hub id.")
    if isinstance(e, EntryNotFoundError):
        return CheckpointError(f"{repo} has no file {where.split('/')[-1]!r} ({cause}); the "
                               "repository may have changed: check its file list on the hub.")
    if isinstance(e, HfHubHTTPError):
        return CheckpointError(f"The hub refused {where}: {cause}. Try again later.")
    if isinstance(e, OSError) and e.errno == 28:  # ENOSPC: the disk filled up while writing
        return CheckpointError(f"The disk is full while downloading {where}: free space in "
                               f"{hub_constants.HF_HUB_CACHE} (or set HF_HOME).")
    return None


def _is_network_error(e: Exception) -> bool:
    """A failure to reach the server. huggingface_hub's HTTP client differs between its versions
    (httpx, httpx2), so its transport errors are recognised by the module that defines them."""
    module = type(e).__module__.split(".")[0]
    return module in ("httpx", "httpx2", "requests", "urllib3") or isinstance(
        e, (ConnectionError, TimeoutError))


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def _call(fn, where: str, repo: str):
    """Run one hub call; a failure a user can meet becomes a `CheckpointError` saying what to do."""
    try:
        return fn()
    except Exception as e:  # mapped to a sentence below, or re-raised unchanged
        error = _hub_error(e, where, repo)
        if error is None:
            raise
        raise error from e


def repo_file_sizes(repo: str, endpoint: str | None = None) -> dict[str, int]:
    """Every file of hub repository `repo` with its size in bytes (one metadata call)."""
    api = huggingface_hub.HfApi(endpoint=endpoint)
    info = _call(lambda: api.model_info(repo, files_metadata=True),
                 f"the file list of {repo}", repo)
    return {s.rfilename: s.size or 0 for s in info.siblings or []}


def _download_file(repo: str, name: str, endpoint: str | None = None,
                   cache_dir: str | None = None) -> Path:
    return Path(_call(lambda: huggingface_hub.hf_hub_download(
        repo, name, cache_dir=cache_dir, endpoint=endpoint), f"{repo}/{name}", repo))


def _shards(repo: str, index: str, endpoint: str | None, keep=lambda key: True) -> list[str]:
    """The weight files that a sharded checkpoint's index lists for the tensors `keep` accepts."""
    weight_map = json.loads(_download_file(repo, index, endpoint).read_text())["weight_map"]
    return sorted({f for key, f in weight_map.items() if keep(key)})


# --- what to download ---------------------------------------------------------------------------
def visual_download(repo: str = "Salesforce/blip2-flan-t5-xxl",
                    endpoint: str | None = None) -> Download:
    """BLIP-2's ViT-g + Q-Former: `config.json`, the index and the shards holding the visual
    tensors (the index says which), never the shards that hold only FlanT5."""
    sizes = repo_file_sizes(repo, endpoint)
    index = "model.safetensors.index.json"
    if index in sizes:
        names = ["config.json", index] + _shards(repo, index, endpoint,
                                                 lambda key: key.startswith(VISUAL_PREFIXES))
    elif "model.safetensors" in sizes:
        names = ["config.json", "model.safetensors"]
    else:
        raise CheckpointError(f"{repo} has no safetensors weights (model.safetensors or "
                              f"{index}); an HF BLIP-2 checkpoint such as "
                              "Salesforce/blip2-flan-t5-xxl has them.")
    return Download("BLIP-2 ViT-g + Q-Former", repo, _sized(repo, names, sizes), endpoint)


def llm_download(repo: str, endpoint: str | None = None) -> Download:
    """A causal LM's config, tokenizer and weights, in one format: safetensors if the repository
    has them (Llama-2-chat has both formats, 13.5 GB each), else PyTorch `.bin` (Vicuna v0)."""
    sizes = repo_file_sizes(repo, endpoint)
    for single, index in (("model.safetensors", "model.safetensors.index.json"),
                          ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        if index in sizes:
            weights = [index] + _shards(repo, index, endpoint)
            break
        if single in sizes:
            weights = [single]
            break
    else:
        raise CheckpointError(f"{repo} has no model weights (model.safetensors, "
                              "pytorch_model.bin or their sharded index).")
    side = [name for name in LLM_SIDE_FILES if name in sizes]
    return Download("LLM", repo, _sized(repo, side + weights, sizes), endpoint)


def _sized(repo: str, names: list[str], sizes: dict[str, int]) -> dict[str, int]:
    missing = [n for n in names if n not in sizes]
    if missing:
        raise CheckpointError(f"{repo}: its index lists {missing[0]}, which the repository does "
                              "not have; the repository may be changing: try again later.")
    return {n: sizes[n] for n in names}


# --- downloading --------------------------------------------------------------------------------
def fetch(download: Download, cache_dir: str | None = None) -> Path:
    """Download the files of `download` into the hub cache (files already there are not fetched
    again); returns the local folder that holds them, usable wherever a hub id is."""
    todo = sum(size for name, size in download.sizes.items()
               if not isinstance(huggingface_hub.try_to_load_from_cache(
                   download.repo, name, cache_dir=cache_dir), str))
    check_disk_space(Path(cache_dir or hub_constants.HF_HUB_CACHE), todo, download.what)
    paths = [_download_file(download.repo, name, download.endpoint, cache_dir)
             for name in download.sizes]
    return paths[0].parent  # a snapshot folder: every file of one revision sits in it


def check_disk_space(folder: Path, needed: int, what: str) -> None:
    """Raise before downloading `needed` bytes into `folder` if its disk has no room for them."""
    existing = folder
    while not existing.exists():
        existing = existing.parent
    free = shutil.disk_usage(existing).free
    if free < needed:
        raise CheckpointError(
            f"Not enough disk space for {what}: {needed / GB:.1f} GB to download, "
            f"{free / GB:.1f} GB free in {existing}. Free some space, or point HF_HOME "
            "at a larger disk.")


def fetch_projection(preset_name: str, folder: str | Path = ".") -> Path:
    """The official projection checkpoint of a real preset, from its Google Drive link (with
    `gdown`), saved as `folder/<official file name>`; a file already there is kept.

    Google Drive sometimes answers with an HTML page (a quota or virus-scan notice) instead of the
    file: what arrived is read back with `checkpoints.read_projection`, and removed if it is not
    the checkpoint, so that a broken file never stays behind under the right name.
    """
    if preset_name not in OFFICIAL_PROJECTIONS:
        raise ConfigError(f"No official projection for preset {preset_name!r}; presets with one: "
                          f"{', '.join(OFFICIAL_PROJECTIONS)}.")
    name, url = OFFICIAL_PROJECTIONS[preset_name]
    path = Path(folder) / name
    if path.exists():
        return path
    try:
        import gdown
    except ImportError:
        raise ConfigError("Downloading from Google Drive needs gdown: pip install gdown "
                          f"(or download {url} in a browser and save it as {path}).") from None
    file_id = url.split("/d/")[1].split("/")[0]
    advice = (f"Download it in a browser from {url} (linked from the official MiniGPT-4 README) "
              f"and save it as {path}.")
    try:
        got = gdown.download(id=file_id, output=str(path), quiet=False)
    except Exception as e:  # gdown raises many kinds (network, quota, parsing)
        path.unlink(missing_ok=True)
        raise CheckpointError(f"Google Drive did not give {name} ({_first_line(e)}). "
                              + advice) from e
    if got is None or not path.exists():
        raise CheckpointError(f"Google Drive did not give {name}. " + advice)
    try:
        read_projection(path)
    except CheckpointError as e:
        path.unlink()
        raise CheckpointError(f"What Google Drive sent for {name} is not the checkpoint (often a "
                              "'quota exceeded' page when many people download it). "
                              + advice) from e
    return path


# --- memory -------------------------------------------------------------------------------------
def weight_gb(model: MiniGPT4, llm: str = "fp16") -> dict[str, float]:
    """GB of weights on the GPU, by part, with the LLM in `llm` ("fp16", "8bit" or "4bit").

    The ViT, Q-Former and query tokens in float16 (the official `vit_precision: fp16`), the
    projection in float32; bitsandbytes quantizes the LLM's linear layers and keeps its
    embeddings, norms and output layer (`lm_head`) in float16. Works on the meta device.
    """
    if llm not in LLM_BYTES:
        raise ConfigError(f"llm must be one of {', '.join(LLM_BYTES)}, got {llm!r}.")
    counts = model.param_counts()
    linear = sum(m.weight.numel() for name, m in model.llm.named_modules()
                 if isinstance(m, torch.nn.Linear) and name.split(".")[-1] != "lm_head")
    rest = counts["llm_params"] - linear
    visual = counts["vision_params"] + counts["qformer_params"] + counts["query_tokens"]
    return {"visual": visual * 2 / GB, "projection": counts["projection_params"] * 4 / GB,
            "llm": (linear * LLM_BYTES[llm] + rest * 2) / GB}


def kv_cache_gb(model: MiniGPT4, tokens: int = 2000) -> float:
    """GB of the float16 key/value cache for `tokens` positions (the demo's `max_length` 2000):
    a key and a value vector in every layer, for every position."""
    cfg = model.llm.config
    kv_width = cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads)
    return 2 * cfg.num_hidden_layers * kv_width * 2 * tokens / GB
