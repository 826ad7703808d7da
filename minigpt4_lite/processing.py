"""Image and caption preprocessing, matching MiniGPT-4's ``Blip2ImageTrainProcessor`` and friends.

Official MiniGPT-4 (via LAVIS) uses torchvision; we rebuild the same transforms with PIL + torch:

* train: RandomResizedCrop(size, scale=(0.5, 1.0), ratio=(3/4, 4/3), bicubic), ToTensor, Normalize
* eval:  Resize((size, size), bicubic), ToTensor, Normalize
* Normalize uses CLIP's mean/std, because the vision encoder (EVA-CLIP ViT-g) was trained with them.

On a PIL image torchvision's transforms are thin wrappers around PIL and torch, so rebuilding them
costs a few lines and spares users a torchvision that must match their torch build exactly (a
CUDA torchvision wheel does not even import beside a CPU-only torch). The result is the same bit
for bit: the tests compare both transforms with torchvision's on real photos, pixel for pixel, and
the crop sampling draw for draw. Two details matter for that: the crop is cut out *before* it is
resized (resizing with PIL's ``box=`` would let the bicubic filter read pixels just outside the
crop), and the aspect ratio is exponentiated in float32, as torchvision does.

``load_image`` turns whatever a user hands us (path, bytes, upload, PIL image) into an RGB image,
or raises :class:`ImageLoadError` with one sentence saying which file, what is wrong, what to do.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import re
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from minigpt4_lite.errors import ImageLoadError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_IMAGE_PIXELS = 64_000_000  # refuse larger images (decompression bombs) before decoding them
TRAIN_SCALE = (0.5, 1.0)  # MiniGPT-4's min_scale=0.5, max_scale=1.0
TRAIN_RATIO = (3 / 4, 4 / 3)  # torchvision's RandomResizedCrop default

ImageSource = str | os.PathLike | bytes | bytearray | memoryview | BinaryIO | Image.Image


# --------------------------------------------------------------------------- loading images
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


def _to_rgb(img: Image.Image) -> Image.Image:
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
    return _to_rgb(img)


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


# --------------------------------------------------------------------------- image -> tensor
def random_resized_crop_params(
    width: int,
    height: int,
    scale: tuple[float, float] = TRAIN_SCALE,
    ratio: tuple[float, float] = TRAIN_RATIO,
    generator: torch.Generator | None = None,
) -> tuple[int, int, int, int]:
    """torchvision's ``RandomResizedCrop.get_params``: returns ``(top, left, h, w)``.

    The same draws in the same order, so a generator seeded with ``s`` gives the crop torchvision
    gives after ``torch.manual_seed(s)`` (``generator=None`` draws from torch's global one).
    Ten tries of (area fraction ~ U(scale), aspect ratio ~ log-uniform(ratio)); the first crop
    that fits wins, else a central crop with the aspect ratio clamped into ``ratio``.
    """
    area = width * height
    log_ratio = torch.log(torch.tensor(ratio))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1], generator=generator).item()
        log_r = torch.empty(1).uniform_(*log_ratio.tolist(), generator=generator)
        aspect = torch.exp(log_r).item()  # exp in float32, as torchvision: the same rounding
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=generator).item())
            left = int(torch.randint(0, width - w + 1, (1,), generator=generator).item())
            return top, left, h, w
    in_ratio = width / height  # fallback: central crop
    if in_ratio < min(ratio):
        w, h = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        w, h = round(height * max(ratio)), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def image_to_tensor(
    img: Image.Image,
    image_size: int,
    *,
    train: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """PIL image -> normalised float tensor ``[3, image_size, image_size]``.

    eval: Resize((size, size), bicubic); train: RandomResizedCrop(size, scale=(0.5, 1.0),
    bicubic) with parameters drawn from ``generator``; then ToTensor and CLIP Normalize. Equal,
    bit for bit, to the official torchvision pipeline (LAVIS' ``Blip2ImageEvalProcessor`` /
    ``Blip2ImageTrainProcessor``, used by both training stages) on an RGB image.
    """
    if not isinstance(image_size, int) or image_size <= 0:
        raise ValueError(f"image_size must be a positive int, not {image_size!r}")
    if img.mode != "RGB":
        img = _to_rgb(img)
    if train:  # crop, then resize the crop alone: torchvision's ``resized_crop`` on PIL images
        top, left, h, w = random_resized_crop_params(*img.size, generator=generator)
        img = img.crop((left, top, left + w, top + h))
    # PIL's bicubic filter is what torchvision's Resize calls on PIL images (antialiased: when
    # shrinking, the kernel widens to cover every source pixel). Same size: left as it is.
    if img.size != (image_size, image_size):
        img = img.resize((image_size, image_size), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(CLIP_STD).view(3, 1, 1)
    return ((x - mean) / std).contiguous()


def denormalize(tensor: torch.Tensor) -> torch.Tensor:
    """Undo the CLIP Normalize of a ``[3, H, W]`` or ``[B, 3, H, W]`` tensor, clamped to [0, 1]."""
    mean = torch.tensor(CLIP_MEAN, dtype=tensor.dtype, device=tensor.device).view(3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=tensor.dtype, device=tensor.device).view(3, 1, 1)
    return (tensor * std + mean).clamp(0.0, 1.0)


@dataclass
class ImageProcessor:
    """MiniGPT-4's image processor: ``load_image`` then the train or eval transform."""

    image_size: int = 224
    train: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.image_size, int) or self.image_size <= 0:
            raise ValueError(f"image_size must be a positive int, not {self.image_size!r}")

    def __call__(
        self,
        source: ImageSource | torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Return a ``[3, S, S]`` normalised tensor; a tensor of that shape passes through."""
        if isinstance(source, torch.Tensor):
            expected = (3, self.image_size, self.image_size)
            if tuple(source.shape) != expected:
                raise ImageLoadError(
                    f"Cannot use the image tensor: its shape is {tuple(source.shape)}, not "
                    f"{expected}; pass the image file instead so it is resized."
                )
            return source.float()
        return image_to_tensor(
            load_image(source), self.image_size, train=self.train, generator=generator
        )

    @staticmethod
    def denormalize(tensor: torch.Tensor) -> torch.Tensor:
        """See :func:`denormalize` (for plotting a processed image)."""
        return denormalize(tensor)


# --------------------------------------------------------------------------- captions
_CAPTION_PUNCT = re.compile(r'[.!"()*#:;~]')


def clean_caption(text: str, max_words: int = 50) -> str:
    """MiniGPT-4's stage-1 ``pre_caption``: lowercase, ``.!"()*#:;~`` -> space, collapse
    whitespace, strip, keep at most ``max_words`` words.

    (The official regex collapses only runs of 2+ whitespace; we also turn a lone tab or newline
    into a space, which gives the same words.)
    """
    if max_words < 0:
        raise ValueError(f"max_words must be >= 0, not {max_words}")
    text = _CAPTION_PUNCT.sub(" ", text.lower())
    words = text.split()
    return " ".join(words[:max_words])
