"""Opening any image file safely: the one door through which user images enter the library.

`load_image` turns whatever a user hands us (path, bytes, upload, PIL image) into an upright RGB
image, or raises `ImageLoadError` with one sentence saying which file, what is wrong and what to
do. It handles the odd files real folders hold (EXIF rotation, transparency, palettes, CMYK,
16-bit greyscale, several frames) and refuses broken, empty and oversized ones before decoding
them. Not an idea of the paper; what `processing.ImageProcessor` (BLIP-2's transforms) reads.
"""

from __future__ import annotations

import contextlib
import io
import os
import stat
import warnings
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ImageLoadError

MAX_IMAGE_PIXELS = 64_000_000  # refuse larger images (decompression bombs) before decoding them

ImageSource = str | os.PathLike | bytes | bytearray | memoryview | BinaryIO | Image.Image


def _quote(name: str) -> str:
    """A file name for a message: quoted, control characters escaped (the message is one line)."""
    return "'" + "".join(c if c.isprintable() else repr(c)[1:-1] for c in name) + "'"


def _fail(name: str, reason: str, advice: str) -> ImageLoadError:
    """The one-sentence error: which file, what is wrong, what to do."""
    return ImageLoadError(f"Cannot load image {name}: {reason}; {advice}.")


def _detail(exc: BaseException) -> str:
    """PIL's own words for an error, without its full stop (it goes inside our sentence)."""
    return " ".join(str(exc).split()).rstrip(".") or type(exc).__name__


def _high_bit_depth_to_l(img: Image.Image) -> Image.Image:
    """16-bit (I;16*, I) and float (F) greyscale to 8-bit L, scaled rather than clipped.

    PIL's own ``convert("L")`` clips: a 16-bit value of 32768 becomes 255, not 128. Rules:
    I;16 divides by 257 (65535 -> 255); I is read as 8-bit if its max is <= 255, as 16-bit if
    it fits 0..65535, else min-max scaled; F is read as 0..1 if it fits, as 0..255 if it fits,
    else min-max scaled. NaN/inf become 0.
    """
    x = np.nan_to_num(np.asarray(img, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = (float(x.min()), float(x.max())) if x.size else (0.0, 0.0)
    if img.mode.startswith("I;16") or (img.mode == "I" and lo >= 0 and 255 < hi <= 65535):
        x = x / 257.0
    elif img.mode == "F" and lo >= 0 and hi <= 1:
        x = x * 255.0
    elif (lo < 0 or hi > 255) and hi > lo:
        x = (x - lo) / (hi - lo) * 255.0
    return Image.fromarray(np.clip(np.rint(x), 0, 255).astype(np.uint8), mode="L")


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode to a new RGB image.

    Transparent images (RGBA, LA, PA, P/L/RGB with a ``transparency`` entry) are composited onto
    white: the colour stored under a transparent pixel is arbitrary (often black), so dropping the
    alpha channel can turn a logo's background black; white matches what a viewer or browser
    shows, which is what a caption describes.
    """
    if img.mode.startswith("I") or img.mode == "F":
        return _high_bit_depth_to_l(img).convert("RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")  # L, 1, P, CMYK, YCbCr, RGB (a copy) ...


def _decode(img: Image.Image, name: str) -> Image.Image:
    """Check the size from the header, then decode the first frame and make it upright RGB."""
    width, height = img.size
    if width <= 0 or height <= 0:
        raise _fail(name, f"it has zero size ({width}x{height} pixels)", "re-export the image")
    if width * height > MAX_IMAGE_PIXELS:
        raise _fail(
            name,
            f"it has {width}x{height} = {width * height:,} pixels, more than the limit of "
            f"{MAX_IMAGE_PIXELS:,} (it may be a decompression bomb)",
            "shrink it first",
        )
    img.load()  # force a full decode of the current (first, after open) frame: finds truncation
    with contextlib.suppress(Exception):  # unreadable EXIF is no reason to refuse the pixels
        img = ImageOps.exif_transpose(img)  # EXIF orientation tag -> pixels the right way up
    return to_rgb(img)


def _decode_guarded(opener, name: str) -> Image.Image:
    """Open with ``opener()`` and decode, turning every PIL failure into one ImageLoadError."""
    try:
        with warnings.catch_warnings():  # we load or refuse: PIL's own warnings add nothing
            warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with opener() as img:
                return _decode(img, name)
    except ImageLoadError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise _fail(name, f"it has too many pixels ({_detail(exc)})", "shrink it first") from exc
    except UnidentifiedImageError as exc:
        why = "PIL cannot identify it as an image (unknown format or broken header)"
        raise _fail(name, why, "use a PNG, JPEG, GIF, WebP, BMP or TIFF file") from exc
    except PermissionError as exc:
        raise _fail(name, "permission denied", "check the file's permissions") from exc
    except Exception as exc:  # PIL plugins raise OSError, SyntaxError, struct.error, IndexError...
        why = f"it is corrupt or truncated ({_detail(exc)})"
        raise _fail(name, why, "re-download or re-export it") from exc


def _load_path(path: Path) -> Image.Image:
    name = _quote(str(path))
    try:
        info = path.stat()
    except (FileNotFoundError, NotADirectoryError) as exc:
        raise _fail(name, "no such file", "check the path and its spelling") from exc
    except (OSError, ValueError) as exc:  # permission denied, name too long, NUL byte...
        raise _fail(name, f"it cannot be read ({_detail(exc)})", "check the path") from exc
    if stat.S_ISDIR(info.st_mode):
        raise _fail(name, "it is a directory, not a file", "give the path of an image file")
    if info.st_size == 0:
        raise _fail(name, "the file is empty (0 bytes)", "re-download or re-export it")
    return _decode_guarded(lambda: Image.open(path), name)  # closes the file, even on error


def _load_bytes(data: bytes, name: str) -> Image.Image:
    if not data:
        raise _fail(name, "no data (0 bytes)", "upload or read the image again")
    return _decode_guarded(lambda: Image.open(io.BytesIO(data)), name)


def load_image(source: ImageSource) -> Image.Image:
    """Load ``source`` (path, bytes, binary file-like object, or PIL image) as a new RGB image.

    Handles EXIF orientation, multi-frame files (first frame), palette and transparent images
    (composited onto white), CMYK, 16-bit/float greyscale (scaled, not clipped), 1-bit and L.
    Refuses missing/empty/corrupt/truncated/non-image files and images of more than
    ``MAX_IMAGE_PIXELS`` pixels (checked from the header, before any pixel is decoded) with an
    :class:`ImageLoadError` whose message is one line naming the file. No file is left open.
    """
    if isinstance(source, Image.Image):
        return _decode_guarded(lambda: contextlib.nullcontext(source), "<image>")  # not closed
    if isinstance(source, (str, os.PathLike)):
        return _load_path(Path(source))
    if isinstance(source, (bytes, bytearray, memoryview)):
        return _load_bytes(bytes(source), "<bytes>")
    if hasattr(source, "read"):
        raw_name = getattr(source, "name", None)
        name = _quote(raw_name) if isinstance(raw_name, str) else "<upload>"
        try:
            data = source.read()
        except (OSError, ValueError) as exc:  # ValueError: the file is closed
            raise _fail(name, f"reading failed ({_detail(exc)})", "upload it again") from exc
        if isinstance(data, str):
            raise _fail(name, "the file was opened in text mode", "open it with mode 'rb'")
        return _load_bytes(bytes(data), name)
    kind = type(source).__name__
    raise TypeError(f"load_image expects a path, bytes, a binary file or a PIL image, not {kind}")
