"""Answering many images from a script or the command line: the chat of paper Sec. 4, in batches.

`answer_images(model, items)` takes items `{"image": path, "prompt": text}` (any other keys are
passed through, e.g. an id) and returns one dict per item, in input order: the item with an
`"answer"`, or with an `"error"` when its image cannot be loaded or its prompt cannot be asked;
the other items are answered all the same. Items that share a prompt are answered together by
`chat.answer_batch`, `batch_size` images per `generate` call. Every row gets the prompt a `Chat`
builds for one uploaded image and one question (`###Human: <Img><ImageHere></Img> {prompt}###
Assistant:` after the system text), so with greedy decoding (the default) each answer is the one
a `Chat` about that image alone gives. `read_items` turns command-line inputs (image files,
folders, JSONL files) into items; `write_jsonl` writes the answers.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from tqdm.auto import tqdm

from .chat import GREEDY, ChatInputError, GenerationSettings, answer_batch
from .errors import ConfigError, DataError, ImageLoadError
from .images import load_image
from .prepare import IMAGE_SUFFIXES, jsonl_records, list_images


def _jsonl_items(path: Path, prompt: str | None) -> list[dict]:
    """`{"image", "prompt"}` lines; image paths are relative to the file, `prompt` is a default."""
    items = []
    for n, rec in jsonl_records(path, "{\"image\": path, \"prompt\": text}"):
        if not isinstance(rec, dict) or not isinstance(rec.get("image"), str):
            raise DataError(f"{path}, line {n}: needs an \"image\" path; each line must be "
                            "{\"image\": path, \"prompt\": text}.")
        rec.setdefault("prompt", prompt)
        if not isinstance(rec["prompt"], str):
            raise DataError(f"{path}, line {n}: no \"prompt\"; add one to the line or give "
                            "--prompt for the lines without.")
        items.append({**rec, "image": str(path.parent / rec["image"])})
    return items


def read_items(inputs: list[str | Path], prompt: str | None = None) -> list[dict]:
    """Items from image files, folders of images (sorted by name) and `.jsonl` files, in order.

    Images and folders are asked `prompt`; JSONL lines carry their own `"prompt"` (or get
    `prompt`). A missing file or folder is kept as an item: its answer line will say so.
    """
    items = []
    for entry in map(Path, inputs):
        if entry.suffix.lower() == ".jsonl":
            items += _jsonl_items(entry, prompt)
            continue
        if prompt is None:
            raise DataError(f"{entry} needs a question: give --prompt (JSONL lines may carry "
                            "their own \"prompt\").")
        if entry.is_dir():
            found = list_images(entry)
            if not found:
                raise DataError(f"{entry} holds no image files ({', '.join(IMAGE_SUFFIXES)}).")
            items += [{"image": str(p), "prompt": prompt} for p in found]
        else:
            items.append({"image": str(entry), "prompt": prompt})
    if not items:
        raise DataError("No images to answer: give image files, folders or JSONL files.")
    return items


def _load(item: dict):
    """The item's image, or the sentence that says why it cannot be used."""
    try:
        return load_image(item["image"]), None
    except ImageLoadError as e:
        return None, str(e)
    except TypeError:  # not a path, bytes, file or PIL image at all
        return None, f"Cannot use a {type(item['image']).__name__} as an image."


def _answer_chunk(model, items: list[dict], chunk: list[int], prompt: str,
                  settings: GenerationSettings, results: list) -> None:
    """Answer `items[chunk]` (all asking `prompt`) in one batch; errors go in their lines."""
    loaded = []
    for i in chunk:
        image, error = _load(items[i])
        results[i] = {**items[i], "error": error} if error else None
        if image is not None:
            loaded.append((i, image))
    if not loaded:
        return
    try:
        answers = answer_batch(model, [image for _, image in loaded], prompt, settings)
        outcomes = [("answer", answer) for answer in answers]
    except ChatInputError as e:  # e.g. an empty prompt: every item asking it gets the sentence
        outcomes = [("error", str(e))] * len(loaded)
    for (i, _), (key, value) in zip(loaded, outcomes):
        results[i] = {**items[i], key: value}


def answer_images(model, items: list[dict], batch_size: int = 8,
                  settings: GenerationSettings | None = None, progress: bool = True) -> list[dict]:
    """Answer every item `{"image", "prompt"}`; one dict per item, in input order.

    Greedy decoding with the chat's other settings by default (`chat.GREEDY`); pass
    `settings` to sample or to change `max_new_tokens`. Items sharing a prompt are batched.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a whole number >= 1, got {batch_size!r}.")
    groups: dict[str, list[int]] = {}  # prompt -> item indices, in order of first appearance
    for i, item in enumerate(items):
        if not isinstance(item, dict) or "image" not in item or not isinstance(
                item.get("prompt"), str):
            raise DataError(f"Item {i} must be a dict with \"image\" and a \"prompt\" text, got "
                            f"{item!r:.80}.")
        groups.setdefault(item["prompt"], []).append(i)
    results: list[dict | None] = [None] * len(items)
    with tqdm(total=len(items), desc="answer", unit="image", disable=not progress) as bar:
        for prompt, indices in groups.items():
            for start in range(0, len(indices), batch_size):
                chunk = indices[start:start + batch_size]
                _answer_chunk(model, items, chunk, prompt, settings or GREEDY, results)
                bar.update(len(chunk))
    return [{**r, "image": _name(r["image"])} for r in results]


def _name(image) -> object:
    """A path as text for the JSONL line; other image objects as they came."""
    return os.fspath(image) if isinstance(image, os.PathLike) else image


def write_jsonl(records: list[dict], path: str | Path) -> None:
    """One JSON object a line, written to a temporary file renamed into place (all or nothing);
    `"-"` prints them to standard output instead."""
    if str(path) == "-":
        for record in records:
            print(json.dumps(record, ensure_ascii=False), flush=True)
        return
    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        with tmp.open("w", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
