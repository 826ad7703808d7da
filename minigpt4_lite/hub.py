"""Where the weights come from: a local folder or the Hugging Face hub, with errors said plainly.

Not an idea of the paper: the plumbing every real preset needs before anything is loaded.

- `resolve_file`: a file of a local folder or of a hub repository, or `None` when it is really
  absent; every other failure (offline, private, gated, a bad id) is one `CheckpointError`;
- `load_tokenizer`: a tokenizer, naming the two packages a SentencePiece-only folder needs;
- `OFFICIAL_LLMS`, `OFFICIAL_PROJECTIONS` and `missing_projection_message`: where the official
  MiniGPT-4 weights are published (docs/official.md, "Weights a user needs").
"""

from __future__ import annotations

from pathlib import Path

from .errors import CheckpointError, ConfigError

# Where the weights of the real presets come from (the official MiniGPT-4 README). Vicuna v0 was
# published by LMSYS only as a delta over LLaMA; the README points to merged v0 weights on the
# hub, `Vision-CAIR/vicuna-7b` and `Vision-CAIR/vicuna` (13B): HF LLaMA folders (config, sharded
# pytorch_model-*.bin with their index, a SentencePiece tokenizer.model). The Llama-2 variant uses
# Meta's `meta-llama/Llama-2-7b-chat-hf` (a gated repository: accept its licence on the hub).
OFFICIAL_LLMS = {"minigpt4-7b": "Vision-CAIR/vicuna-7b", "minigpt4-13b": "Vision-CAIR/vicuna",
                 "minigpt4-llama2": "meta-llama/Llama-2-7b-chat-hf"}
# The projection checkpoints are Google Drive downloads linked from that README, without names
# there: the 7B file is "prerained_minigpt4_7b.pth" (sic), the Llama-2 one is commonly saved as
# "pretrained_minigpt4_llama2_7b.pth"; only a stage-2 checkpoint exists for Llama-2.
OFFICIAL_PROJECTIONS = {
    "minigpt4-7b": ("prerained_minigpt4_7b.pth",
                    "https://drive.google.com/file/d/1RY9jV0dyqLX-o38LrumkKRh6Jtaop58R/view"),
    "minigpt4-13b": ("pretrained_minigpt4.pth",
                     "https://drive.google.com/file/d/1a4zLvaiDBr-36pasffmgpvH5P7CKmpze/view"),
    "minigpt4-llama2": ("pretrained_minigpt4_llama2_7b.pth",
                        "https://drive.google.com/file/d/11nAPjEok8eAGGEG1N2vXo3kBLCg0WgUk/view"),
}


def missing_projection_message(preset: str, source: str) -> str:
    """What to do when the projection file is not there; for a real preset, where to get it."""
    if preset not in OFFICIAL_PROJECTIONS:
        return (f"Projection checkpoint {source} does not exist: pass an existing folder or file "
                "(CLI: --projection PATH; --projection none for an untrained projection).")
    name, url = OFFICIAL_PROJECTIONS[preset]
    return (f"Projection checkpoint {source} does not exist. The {preset} preset needs the "
            f"official MiniGPT-4 projection {name}: download it from {url} (linked from the "
            f"official README) and pass --projection /path/to/{name} (library: "
            "load_model(cfg, projection=...)); --projection none (projection=\"\") chats through "
            "an untrained, random projection instead.")


def resolve_file(source: str, filename: str) -> Path | None:
    """`source/filename` for a local folder, else the file `filename` of hub repository `source`.

    Returns None only when the file is really absent: a local folder without it, or a hub
    repository that answers "no such file". Anything else that stops the download (no network or
    offline mode with the file not cached, a private or gated repository, an id that is neither a
    folder nor a repository) is a `CheckpointError` that says what failed.
    """
    local = Path(source).expanduser()
    if local.is_dir():
        path = local / filename
        return path if path.exists() else None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import (
        EntryNotFoundError,
        GatedRepoError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    where = f"{source}/{filename}"
    try:
        return Path(hf_hub_download(source, filename))
    except LocalEntryNotFoundError as e:  # offline or no network, and not in the local cache
        raise CheckpointError(
            f"Cannot download {where}: the hub cannot be reached from here ({_first_line(e)}) "
            "and the file is not in the local cache. Go online (unset HF_HUB_OFFLINE), or "
            "download the files elsewhere and pass their local folder.") from e
    except EntryNotFoundError:  # the repository exists and has no such file
        return None
    except GatedRepoError as e:
        raise CheckpointError(
            f"{source!r} is a gated hub repository: accept its conditions on "
            f"https://huggingface.co/{source} and log in (`hf auth login`, or set HF_TOKEN) "
            f"({_first_line(e)}).") from e
    except RepositoryNotFoundError as e:
        raise CheckpointError(
            f"{source!r} is neither a folder on this machine nor a hub repository you can "
            "access: check the path or id, and log in for a private one (`hf auth login`, or "
            f"set HF_TOKEN) ({_first_line(e)}).") from e
    except HFValidationError as e:
        raise CheckpointError(f"{source!r} is neither a folder on this machine nor a valid hub "
                              f"id ({_first_line(e)}).") from e
    except (OSError, ValueError) as e:  # any other HTTP error, a full disk...
        raise CheckpointError(f"Downloading {where} failed: {_first_line(e)}") from e


def _first_line(e: BaseException) -> str:
    """The first line of an exception's message, with that of its cause (hub errors wrap the
    network error that made them)."""
    lines = [str(x).strip().splitlines()[0] for x in (e, e.__cause__) if x and str(x).strip()]
    return "; ".join(lines) or type(e).__name__


def load_tokenizer(source: str):
    """`AutoTokenizer.from_pretrained`, with the one missing piece a Vicuna v0 folder needs named.

    The merged Vicuna v0 folders ship a SentencePiece `tokenizer.model` and no `tokenizer.json`:
    transformers converts it, which needs the `sentencepiece` and `protobuf` packages.
    """
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source)
    except OSError as e:
        raise CheckpointError(f"Cannot load the tokenizer of {source!r}: "
                              f"{str(e).splitlines()[0]}") from e
    except (ImportError, ValueError) as e:
        if not _installed("sentencepiece") or not _installed("google.protobuf"):
            raise ConfigError(
                f"Cannot read the tokenizer of {source!r}: converting a SentencePiece "
                "tokenizer.model (the Vicuna v0 folders have one, and no tokenizer.json) needs "
                "two more packages: pip install sentencepiece protobuf.") from e
        raise CheckpointError(f"Cannot load the tokenizer of {source!r}: "
                              f"{str(e).splitlines()[0]}") from e


def _installed(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # its parent package is missing
        return False
