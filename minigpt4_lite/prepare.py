"""Your own images and captions in the two formats MiniGPT-4 trains on (paper Sec. 3.1-3.2).

Stage 1 reads image-text pairs as webdataset shards (`jpg` + `json{"caption"}`, the way LAION, CC
and SBU were released); stage 2 reads a `cc_sbu_align` folder (`filter_cap.json` `{"annotations":
[{"image_id", "caption"}]}` + `image/{image_id}.jpg`). `prepare` writes either one from what a
user usually has:

- a JSONL file of `{"image": path, "caption": text}` lines, or a CSV file with `image` and
  `caption` columns (paths relative to the file), or
- a folder of images with side-car captions: `cat.jpg` + `cat.txt`.

Every image enters through `images.load_image` (EXIF rotation, transparency, CMYK... handled,
broken files refused), is shrunk if asked so that its longer side is at most `max_size`, and is
re-encoded as JPEG. A pair whose image is missing or unreadable, or whose caption is empty, is
skipped and counted; `prepare_report.json` in the output lists each one with its reason. The
output is built in a hidden folder next to `out` and renamed into place only when complete: an
interrupted run leaves no half-written shards behind. An existing `out` is replaced only when asked.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from PIL import Image
from tqdm.auto import tqdm

from .errors import ConfigError, DataError, ImageLoadError
from .images import load_image
from .processing import clean_caption

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
REPORT = "prepare_report.json"
JPEG_QUALITY = 95


@dataclass
class Pair:
    """One image and its caption; `where` names its origin in messages (file, line)."""

    image: Path | None
    caption: str
    where: str


def list_images(folder: str | Path) -> list[Path]:
    """The image files directly in `folder` (not its subfolders), sorted by name."""
    return sorted(p for p in Path(folder).iterdir()
                  if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                  and not p.name.startswith("."))


# --- reading the source ---------------------------------------------------------------------------
def _sidecar_pairs(folder: Path) -> list[Pair]:
    """`cat.jpg` + `cat.txt`; a caption file without an image is a pair with a missing image."""
    pairs, images = [], list_images(folder)
    for image in images:
        txt = image.with_suffix(".txt")
        caption = txt.read_text(encoding="utf-8-sig", errors="replace") if txt.is_file() else ""
        pairs.append(Pair(image, caption, image.name))
    stems = {p.stem for p in images}
    pairs += [Pair(None, "", txt.name) for txt in sorted(folder.glob("*.txt"))
              if txt.stem not in stems]
    return pairs


def _record_pair(rec, base: Path, where: str, form: str) -> Pair:
    """A pair from a JSONL object or a CSV row; a wrong layout is a `DataError`."""
    if not isinstance(rec, dict) or "image" not in rec or "caption" not in rec:
        raise DataError(f"{where}: expected {form}; fix the file.")
    image, caption = rec["image"], rec["caption"]
    path = base / image if isinstance(image, str) and image.strip() else None
    return Pair(path, caption if isinstance(caption, str) else "", where)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")  # -sig: a spreadsheet's byte-order mark
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"Cannot read {path}: {getattr(e, 'strerror', None) or e}.") from None


def jsonl_records(path: Path, form: str):
    """`(line number, parsed object)` of each non-blank line of a JSONL file; a line that is not
    JSON is a `DataError` naming the line and the expected `form`."""
    for n, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield n, json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}, line {n}: not JSON ({e.msg}); each line must be "
                            f"{form}.") from None


def _jsonl_pairs(path: Path) -> list[Pair]:
    form = "{\"image\": path, \"caption\": text}"
    return [_record_pair(rec, path.parent, f"{path.name}, line {n}", form)
            for n, rec in jsonl_records(path, form)]


def _csv_pairs(path: Path) -> list[Pair]:
    rows = list(csv.DictReader(io.StringIO(_read_text(path), newline="")))
    # line numbers count the header as line 1, as a spreadsheet shows them
    return [_record_pair(row, path.parent, f"{path.name}, line {n}",
                         "a header with 'image' and 'caption' columns")
            for n, row in enumerate(rows, 2)]


def read_pairs(src: str | Path, stage: int = 2) -> tuple[list[Pair], list[dict]]:
    """The usable pairs of `src` (a folder, `.jsonl` or `.csv`) and the skipped ones with reasons.

    A pair is skipped when its image file is missing or its caption is empty (for stage 1: empty
    after the caption cleaning stage 1 applies). Loading the image comes later (`prepare`).
    """
    src = Path(src)
    if src.is_dir():
        pairs = _sidecar_pairs(src)
    elif src.suffix.lower() in (".jsonl", ".csv") and src.is_file():
        pairs = _jsonl_pairs(src) if src.suffix.lower() == ".jsonl" else _csv_pairs(src)
    elif not src.exists():
        raise DataError(f"{src} does not exist: give a folder of images with .txt captions, "
                        "a .jsonl or a .csv file.")
    else:
        raise DataError(f"{src} is neither a folder nor a .jsonl/.csv file: give a folder of "
                        "images with .txt captions, a .jsonl or a .csv file.")
    usable, skipped = [], []
    for pair in pairs:
        pair.caption = pair.caption.strip()
        text = clean_caption(pair.caption) if stage == 1 else pair.caption
        reason = ("missing image" if pair.image is None or not pair.image.is_file() else
                  "empty caption" if not text else None)
        if reason:
            skipped.append({"where": pair.where, "reason": reason})
        else:
            usable.append(pair)
    return usable, skipped


# --- encoding and writing -------------------------------------------------------------------------
def encode_jpeg(image, max_size: int | None = None, quality: int = JPEG_QUALITY) -> bytes:
    """`image` (any file `load_image` reads) as JPEG bytes, shrunk to `max_size` if larger."""
    img = load_image(image)
    if max_size and max(img.size) > max_size:
        img.thumbnail((max_size, max_size), Image.Resampling.BICUBIC)  # keeps the aspect ratio
    buffer = io.BytesIO()
    img.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def _encoded(pairs: list[Pair], skipped: list[dict], max_size: int | None, quality: int):
    """(pair, JPEG bytes) for each pair whose image loads; the others go to `skipped`."""
    for pair in tqdm(pairs, desc="prepare", unit="image"):
        try:
            yield pair, encode_jpeg(pair.image, max_size, quality)
        except ImageLoadError as e:
            skipped.append({"where": pair.where, "reason": "unreadable image", "detail": str(e)})


def _write_shards(encoded, folder: Path, shard_size: int) -> int:
    """Stage 1: tar shards `000000.tar, 000001.tar, ...` of `shard_size` samples each."""
    import webdataset as wds

    pattern = str(folder.resolve()).replace("%", "%%") + "/%06d.tar"  # ShardWriter uses `%`
    n = 0
    with wds.ShardWriter(pattern, maxcount=shard_size, verbose=0, mtime=0) as sink:
        for pair, jpeg in encoded:
            meta = {"caption": pair.caption, "source": str(pair.image)}
            sink.write({"__key__": f"{n:09d}", "jpg": jpeg,
                        "json": json.dumps(meta, ensure_ascii=False).encode()})
            n += 1
    return n


def _write_ccsbu(encoded, folder: Path) -> int:
    """Stage 2: `image/{id}.jpg` and `filter_cap.json` (ids 0, 1, ... as in the official set)."""
    (folder / "image").mkdir()
    annotations = []
    for pair, jpeg in encoded:
        image_id = str(len(annotations))
        (folder / "image" / f"{image_id}.jpg").write_bytes(jpeg)
        annotations.append({"image_id": image_id, "caption": pair.caption,
                            "source": str(pair.image)})  # extra key: the loaders ignore it
    text = json.dumps({"annotations": annotations}, indent=1, ensure_ascii=False)
    (folder / "filter_cap.json").write_text(text + "\n", encoding="utf-8")
    return len(annotations)


def shard_pattern(out: str | Path, n_shards: int) -> str:
    """What `train --data` takes for `n_shards` shards in `out`: a brace pattern, or the file."""
    if n_shards == 1:
        return f"{Path(out).as_posix()}/000000.tar"
    return f"{Path(out).as_posix()}/{{000000..{n_shards - 1:06d}}}.tar"


# --- the whole job --------------------------------------------------------------------------------
def _check_out(src: Path, out: Path, overwrite: bool) -> None:
    if out.is_file():
        raise DataError(f"{out} is a file: --out must be a folder to create.")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise DataError(f"{out} already exists: pass --overwrite (overwrite=True) to replace it, "
                        "or choose another --out.")
    if src.resolve().is_relative_to(out.resolve()):
        raise DataError(f"{src} is inside {out}: writing there would delete your source; choose "
                        "another --out.")


def _move_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished `tmp` to `out`; an old `out` is removed only after that."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old)


def prepare(src: str | Path, out: str | Path, stage: int, shard_size: int = 1000,
            max_size: int | None = None, overwrite: bool = False,
            quality: int = JPEG_QUALITY) -> dict:
    """Write `src`'s pairs as stage-1 shards (`stage=1`) or a `cc_sbu_align` folder (`stage=2`).

    Returns (and stores in `out/prepare_report.json`) what was done: `written`, `skipped` (counts
    by reason), `skipped_items` (each with its reason), `shards` for stage 1, and `data`, what to
    pass to `train --data`. No usable pair at all is a `DataError`, and nothing is written.
    """
    if stage not in (1, 2):
        raise ConfigError(f"stage must be 1 (webdataset shards) or 2 (cc_sbu_align), got "
                          f"{stage!r}.")
    if shard_size < 1 or (max_size is not None and max_size < 1) or not 1 <= quality <= 100:
        raise ConfigError(f"Invalid setting: shard_size ({shard_size}) and max_size ({max_size}) "
                          f"must be >= 1 and quality ({quality}) between 1 and 100.")
    src, out = Path(src), Path(out)
    _check_out(src, out, overwrite)
    pairs, skipped = read_pairs(src, stage)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        encoded = _encoded(pairs, skipped, max_size, quality)
        written = _write_shards(encoded, tmp, shard_size) if stage == 1 else _write_ccsbu(
            encoded, tmp)
        counts = Counter(s["reason"] for s in skipped)
        if not written:
            found = ", ".join(f"{n} {why}" for why, n in counts.items()) or "no pairs"
            raise DataError(f"{src} holds no usable image-caption pair ({found}); nothing was "
                            "written.")
        n_shards = len(list(tmp.glob("*.tar")))
        report = {"stage": stage, "source": str(src), "written": written,
                  "skipped": dict(counts), "max_size": max_size,
                  "data": shard_pattern(out, n_shards) if stage == 1 else out.as_posix(),
                  **({"shards": n_shards} if stage == 1 else {}), "skipped_items": skipped}
        (tmp / REPORT).write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")
        _move_into_place(tmp, out)
    except BaseException:  # interrupted or failed: leave nothing half-valid behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return report
