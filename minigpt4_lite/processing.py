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

Images enter through ``images.load_image`` (any file, safely); this module turns them into tensors.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from .errors import ImageLoadError
from .images import ImageSource, load_image, to_rgb

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
TRAIN_SCALE = (0.5, 1.0)  # MiniGPT-4's min_scale=0.5, max_scale=1.0
TRAIN_RATIO = (3 / 4, 4 / 3)  # torchvision's RandomResizedCrop default


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
        img = to_rgb(img)
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
