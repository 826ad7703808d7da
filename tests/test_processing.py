"""Tests for minigpt4_lite.processing: transforms, captions, and every kind of bad input image."""

from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from minigpt4_lite import images
from minigpt4_lite.errors import ImageLoadError
from minigpt4_lite.images import load_image
from minigpt4_lite.processing import (
    CLIP_MEAN,
    CLIP_STD,
    ImageProcessor,
    clean_caption,
    denormalize,
    image_to_tensor,
    random_resized_crop_params,
)

MEAN = np.array(CLIP_MEAN, dtype=np.float32)
STD = np.array(CLIP_STD, dtype=np.float32)


# --------------------------------------------------------------------------- helpers
def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def save(img: Image.Image, path: Path, **kwargs) -> Path:
    img.save(path, **kwargs)
    return path


def encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A valid PNG signature + IHDR claiming ``width x height`` RGB, with no real pixel data."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(tag + data)
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b""))
        + chunk(b"IEND", b"")
    )


def refused(source, match: str = "") -> str:
    """Load ``source``, expect ImageLoadError, check the message is one line; return it."""
    with pytest.raises(ImageLoadError) as info:
        load_image(source)
    message = str(info.value)
    assert "\n" not in message and "\r" not in message
    assert message.startswith("Cannot load image ") and message.endswith(".")
    assert match.lower() in message.lower()
    return message


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


# --------------------------------------------------------------------------- eval transform
def test_eval_solid_colour_is_exact_normalised_value():
    colour = (10, 200, 30)
    out = image_to_tensor(Image.new("RGB", (50, 30), colour), 24)
    assert out.shape == (3, 24, 24) and out.dtype == torch.float32
    expected = (np.array(colour) / 255 - MEAN) / STD
    for c in range(3):
        assert torch.allclose(out[c], torch.full((24, 24), float(expected[c])), atol=1e-6)


@pytest.mark.parametrize("size", [(37, 23), (23, 37), (224, 224), (5, 300)])
def test_eval_matches_reference_formula(size):
    img = noise(*size)
    s = 32
    reference = (np.asarray(img.resize((s, s), Image.BICUBIC)) / 255 - MEAN) / STD
    ours = image_to_tensor(img, s).permute(1, 2, 0).numpy()
    np.testing.assert_allclose(ours, reference, atol=1e-5)


def test_eval_bicubic_resize_of_non_square_image():
    img = Image.new("RGB", (40, 10))  # left half black, right half white
    img.paste((255, 255, 255), (20, 0, 40, 10))
    out = denormalize(image_to_tensor(img, 16))
    assert out.shape == (3, 16, 16)
    assert torch.all(out[:, :, 0] < 0.01) and torch.all(out[:, :, -1] > 0.99)
    edge = out[0, 0, 7:9]  # bicubic: a smooth ramp across the middle, not a hard step
    assert 0.05 < edge[0] < 0.95 or 0.05 < edge[1] < 0.95


def test_image_to_tensor_converts_non_rgb_and_rejects_bad_size():
    out = image_to_tensor(Image.new("L", (8, 8), 128), 8)
    assert out.shape == (3, 8, 8)
    with pytest.raises(ValueError, match="image_size"):
        image_to_tensor(Image.new("RGB", (8, 8)), 0)


def test_denormalize_inverts_normalize():
    out = denormalize(image_to_tensor(Image.new("RGB", (8, 8), (0, 128, 255)), 8))
    assert torch.allclose(out[:, 0, 0], torch.tensor([0, 128 / 255, 1.0]), atol=1e-6)
    batch = torch.stack([image_to_tensor(noise(8, 8), 8)] * 2)
    assert denormalize(batch).shape == (2, 3, 8, 8)


# --------------------------------------------------------------------------- train transform
def test_train_deterministic_for_seed_and_varies_across_seeds():
    img = noise(80, 60)

    def run(seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return image_to_tensor(img, 32, train=True, generator=g)

    a, b, c = run(1), run(1), run(2)
    assert a.shape == (3, 32, 32) and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a, image_to_tensor(img, 32))  # eval = no crop


def test_crop_params_within_scale_and_ratio_bounds():
    width, height = 200, 120
    for seed in range(300):
        g = torch.Generator().manual_seed(seed)
        top, left, h, w = random_resized_crop_params(width, height, generator=g)
        assert 0 <= top and top + h <= height and 0 <= left and left + w <= width
        fraction = (h * w) / (width * height)
        assert 0.5 * 0.95 <= fraction <= 1.0  # scale=(0.5, 1.0), slack for rounding w and h
        assert 3 / 4 * 0.95 <= w / h <= 4 / 3 * 1.05


def test_crop_params_fall_back_to_central_crop():
    g = torch.Generator().manual_seed(0)
    assert random_resized_crop_params(100, 1, generator=g) == (0, 49, 1, 1)  # too wide: 1x1
    assert random_resized_crop_params(4, 400, generator=g) == (197, 0, 5, 4)  # too tall: 4x5


def test_crop_params_deterministic():
    p1 = random_resized_crop_params(300, 200, generator=torch.Generator().manual_seed(7))
    p2 = random_resized_crop_params(300, 200, generator=torch.Generator().manual_seed(7))
    assert p1 == p2


# --------------------------------------------------------------------------- = torchvision
# The official code preprocesses with torchvision (LAVIS' Blip2ImageEvalProcessor and
# Blip2ImageTrainProcessor). We compare ours, bit for bit, on real photos (the PNGs that ship in
# scikit-image), with a transcription of what torchvision does on a PIL image:
#   Resize((s, s), BICUBIC)       -> img.resize((s, s), Image.BICUBIC), skipped if already s x s
#   RandomResizedCrop.get_params  -> the loop below, drawing from torch's global generator
#   resized_crop                  -> img.crop(box), then the Resize above
#   ToTensor, Normalize           -> uint8 HWC -> float32 CHW / 255, then (x - mean) / std
# The crop parameters are also pinned to values recorded from torchvision 0.28's own get_params,
# and, where torchvision imports, the last test compares with it directly.
OFFICIAL_MEAN = (0.48145466, 0.4578275, 0.40821073)  # written out: not taken from the module
OFFICIAL_STD = (0.26862954, 0.26130258, 0.27577711)
PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png")  # 512x512, 451x300, 600x400


def photo(name: str) -> Path:
    """The path of one of scikit-image's sample photos (in the test extra; not imported)."""
    import importlib.util

    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("scikit-image is missing: install the test extra, pip install -e '.[test]'")
    return Path(spec.submodule_search_locations[0]) / "data" / name


def tv_get_params(width: int, height: int, scale=(0.5, 1.0), ratio=(3 / 4, 4 / 3)):
    """torchvision's RandomResizedCrop.get_params (global generator): (top, left, h, w)."""
    area = height * width
    log_ratio = torch.log(torch.tensor(ratio))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1]).item()
        aspect_ratio = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1])).item()
        w = int(round(np.sqrt(target_area * aspect_ratio)))
        h = int(round(np.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            i = torch.randint(0, height - h + 1, size=(1,)).item()
            j = torch.randint(0, width - w + 1, size=(1,)).item()
            return i, j, h, w
    in_ratio = float(width) / float(height)
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def tv_resize(img: Image.Image, size: int) -> Image.Image:
    return img if img.size == (size, size) else img.resize((size, size), Image.BICUBIC)


def tv_to_tensor_normalize(img: Image.Image) -> torch.Tensor:
    x = torch.from_numpy(np.array(img, np.uint8, copy=True)).permute(2, 0, 1).contiguous()
    x = x.to(torch.float32).div(255)
    mean = torch.as_tensor(OFFICIAL_MEAN, dtype=torch.float32).view(-1, 1, 1)
    std = torch.as_tensor(OFFICIAL_STD, dtype=torch.float32).view(-1, 1, 1)
    return x.sub_(mean).div_(std)


def tv_eval(img: Image.Image, size: int = 224) -> torch.Tensor:
    return tv_to_tensor_normalize(tv_resize(img, size))


def tv_train(img: Image.Image, seed: int, size: int = 224) -> torch.Tensor:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        top, left, h, w = tv_get_params(*img.size)
    return tv_to_tensor_normalize(tv_resize(img.crop((left, top, left + w, top + h)), size))


def assert_same_pixels(ours: torch.Tensor, reference: torch.Tensor) -> None:
    assert ours.shape == reference.shape and ours.dtype == reference.dtype == torch.float32
    diff = (ours - reference).abs().max().item()
    assert torch.equal(ours, reference), f"differs from torchvision by up to {diff}"


@pytest.mark.parametrize("name", PHOTOS)
def test_eval_transform_equals_torchvision_on_real_photos(name):
    """Blip2ImageEvalProcessor: the processor's output is torchvision's, bit for bit."""
    img = Image.open(photo(name)).convert("RGB")
    assert img.size[0] > 224 and img.size[1] > 224  # a real downscale, as in the chat
    assert_same_pixels(ImageProcessor(224)(photo(name)), tv_eval(img))
    assert_same_pixels(image_to_tensor(img, 224), tv_eval(img))
    assert_same_pixels(image_to_tensor(img, 600), tv_eval(img, 600))  # an upscale too


@pytest.mark.parametrize("name", PHOTOS)
def test_train_crops_equal_torchvision_on_real_photos(name):
    """Blip2ImageTrainProcessor: the same crop and the same pixels for the same seed."""
    img = Image.open(photo(name)).convert("RGB")
    proc = ImageProcessor(224, train=True)
    for seed in range(12):
        ours = proc(photo(name), generator=torch.Generator().manual_seed(seed))
        assert_same_pixels(ours, tv_train(img, seed))


@pytest.mark.parametrize(("width", "height"), [(512, 512), (451, 300), (300, 451), (640, 10),
                                               (10, 640), (3, 2), (1, 1), (224, 224)])
def test_crop_params_equal_torchvision_sampling(width, height):
    """A generator seeded with s gives the crops torchvision draws after torch.manual_seed(s)."""
    for seed in range(100):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            expected = tv_get_params(width, height)
            torch.manual_seed(seed)
            assert random_resized_crop_params(width, height) == expected  # global generator
        g = torch.Generator().manual_seed(seed)
        assert random_resized_crop_params(width, height, generator=g) == expected


def test_crop_params_equal_values_recorded_from_torchvision():
    """Recorded with torchvision 0.28: torch.manual_seed(0), then get_params three times."""
    recorded = {
        (512, 512): [(8, 30, 410, 478), (22, 50, 398, 430), (77, 18, 420, 454)],
        (451, 300): [(5, 24, 295, 344), (7, 77, 286, 309), (10, 179, 289, 239)],
        (640, 10): [(0, 313, 10, 13)] * 3,  # every try fails: the central fallback crop
        (3, 2): [(0, 0, 2, 2), (0, 1, 2, 2), (0, 0, 2, 2)],
    }
    for (width, height), crops in recorded.items():
        g = torch.Generator().manual_seed(0)
        assert [random_resized_crop_params(width, height, generator=g) for _ in crops] == crops


def test_equals_torchvision_itself_where_it_imports():
    """Where torchvision works beside this torch, compare with its transforms directly."""
    try:
        from torchvision import transforms as T
    except Exception as exc:  # noqa: BLE001 - absent, or a build for another torch (CUDA/CPU)
        pytest.skip(f"torchvision cannot be imported here ({type(exc).__name__}: {exc})")
    bicubic = T.InterpolationMode.BICUBIC
    normalize = T.Normalize(OFFICIAL_MEAN, OFFICIAL_STD)
    evaluate = T.Compose([T.Resize((224, 224), interpolation=bicubic), T.ToTensor(), normalize])
    train = T.Compose([T.RandomResizedCrop(224, scale=(0.5, 1.0), interpolation=bicubic),
                       T.ToTensor(), normalize])
    for name in PHOTOS:
        img = Image.open(photo(name)).convert("RGB")
        assert_same_pixels(ImageProcessor(224)(photo(name)), evaluate(img))
        for seed in range(3):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                expected = train(img)
            ours = ImageProcessor(224, train=True)(img, torch.Generator().manual_seed(seed))
            assert_same_pixels(ours, expected)


# --------------------------------------------------------------------------- ImageProcessor
def test_processor_from_path_and_tensor_passthrough(tmp_path):
    path = save(noise(30, 20), tmp_path / "x.png")
    proc = ImageProcessor(image_size=16)
    out = proc(path)
    assert out.shape == (3, 16, 16)
    assert torch.equal(proc(out), out)
    assert proc(out.double()).dtype == torch.float32
    with pytest.raises(ValueError, match=r"\(3, 16, 16\)"):
        proc(torch.zeros(3, 8, 8))
    assert torch.allclose(proc.denormalize(out), denormalize(out))


def test_processor_train_uses_generator(tmp_path):
    path = save(noise(64, 48), tmp_path / "x.png")
    proc = ImageProcessor(image_size=16, train=True)
    a = proc(path, generator=torch.Generator().manual_seed(3))
    b = proc(path, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    with pytest.raises(ValueError):
        ImageProcessor(image_size=0)


# --------------------------------------------------------------------------- captions
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('A Dog!! running  (fast)... on the "beach";  ~#*:', "a dog running fast on the beach"),
        ("  Two\tCATS\n\non a sofa.  ", "two cats on a sofa"),
        ("it's a well-known, big cat?", "it's a well-known, big cat?"),
        ("...", ""),
        ("", ""),
    ],
)
def test_clean_caption(text, expected):
    assert clean_caption(text) == expected


def test_clean_caption_word_cap():
    text = " ".join(f"W{i}." for i in range(60))
    assert clean_caption(text) == " ".join(f"w{i}" for i in range(50))
    assert clean_caption(text, max_words=3) == "w0 w1 w2"
    with pytest.raises(ValueError):
        clean_caption("a", max_words=-1)


# --------------------------------------------------------------------------- refused inputs
def test_missing_path(tmp_path):
    path = tmp_path / "nope.jpg"
    assert str(path) in refused(path, "no such file")
    assert "nope.jpg" in refused(str(path))


def test_directory(tmp_path):
    assert str(tmp_path) in refused(tmp_path, "directory")


def test_empty_file(tmp_path):
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    assert "empty.png" in refused(path, "empty")
    refused(b"", "0 bytes")


def test_text_file_named_jpg(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("this is not a picture\n")
    assert "notes.jpg" in refused(path, "cannot identify")


def test_corrupt_bytes(tmp_path):
    data = bytearray(encode(noise(64, 64), "PNG"))
    data[200] ^= 0xFF  # inside the compressed pixel data: the CRC check fails on decode
    path = tmp_path / "corrupt.png"
    path.write_bytes(bytes(data))
    assert "corrupt.png" in refused(path, "corrupt")
    assert "<bytes>" in refused(bytes(data), "corrupt")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_file(tmp_path, fmt):
    data = encode(noise(64, 64), fmt)
    path = tmp_path / f"half.{fmt.lower()}"
    path.write_bytes(data[: len(data) // 2])
    assert path.name in refused(path, "truncated")


@pytest.mark.parametrize(("width", "height"), [(9000, 9000), (10_000, 10_000), (20_000, 20_000)])
def test_decompression_bomb_header(tmp_path, width, height):
    # 81M: over our 64M limit; 100M: PIL's DecompressionBombWarning; 400M: PIL's Error.
    path = tmp_path / "bomb.png"
    path.write_bytes(png_header_only(width, height))
    assert "bomb.png" in refused(path, "pixels")


def test_max_image_pixels_is_checked_before_decoding(tmp_path, monkeypatch):
    path = save(noise(20, 20), tmp_path / "small.png")
    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", 399)
    assert "small.png" in refused(path, "400 pixels")
    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", 400)
    assert load_image(path).size == (20, 20)


def test_zero_size_image(tmp_path):
    refused(Image.new("RGB", (0, 0)), "zero size")
    path = tmp_path / "zero.png"
    path.write_bytes(png_header_only(0, 5))
    assert "zero.png" in refused(path)


def test_text_mode_file_object(tmp_path):
    path = tmp_path / "x.txt"
    path.write_text("hello")
    with open(path) as fh:
        refused(fh, "text mode")


def test_wrong_type():
    with pytest.raises(TypeError):
        load_image(42)


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")
def test_no_file_left_open(tmp_path):
    good = save(noise(16, 16), tmp_path / "good.png")
    bad = tmp_path / "bad.png"
    bad.write_bytes(encode(noise(64, 64), "PNG")[:300])
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_header_only(20_000, 20_000))
    before = open_fds()
    for _ in range(5):
        load_image(good)
        for path in (bad, bomb):
            with pytest.raises(ImageLoadError):
                load_image(path)
    assert open_fds() == before


# --------------------------------------------------------------------------- accepted inputs
def test_huge_but_allowed(tmp_path):
    path = save(Image.new("RGB", (3000, 3000), (1, 2, 3)), tmp_path / "big.png")
    img = load_image(path)
    assert img.size == (3000, 3000) and img.getpixel((2999, 2999)) == (1, 2, 3)
    assert image_to_tensor(img, 16).shape == (3, 16, 16)


def test_one_pixel(tmp_path):
    img = load_image(save(Image.new("RGB", (1, 1), (9, 8, 7)), tmp_path / "one.png"))
    assert img.size == (1, 1) and img.getpixel((0, 0)) == (9, 8, 7)
    for train in (False, True):
        assert image_to_tensor(img, 8, train=train).shape == (3, 8, 8)


def test_all_source_kinds(tmp_path):
    src = noise(12, 10)
    path = save(src, tmp_path / "x.png")
    data = path.read_bytes()
    with open(path, "rb") as fh:
        from_file = load_image(fh)
    for img in (
        load_image(path),
        load_image(str(path)),
        load_image(data),
        load_image(bytearray(data)),
        load_image(io.BytesIO(data)),
        from_file,
        load_image(src),
    ):
        assert img.mode == "RGB" and np.array_equal(np.asarray(img), np.asarray(src))
    assert load_image(src) is not src


def test_cmyk_jpeg(tmp_path):
    path = save(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), tmp_path / "cmyk.jpg", quality=95)
    r, g, b = load_image(path).getpixel((8, 8))
    assert r > 240 and g < 15 and b < 15


def test_rgba_png_transparent_becomes_white(tmp_path):
    img = Image.new("RGBA", (3, 1))
    img.putdata([(10, 20, 30, 0), (10, 20, 30, 255), (0, 0, 0, 128)])
    out = load_image(save(img, tmp_path / "rgba.png"))
    assert out.getpixel((0, 0)) == (255, 255, 255)
    assert out.getpixel((1, 0)) == (10, 20, 30)
    assert all(126 <= v <= 128 for v in out.getpixel((2, 0)))  # half-transparent black on white


def test_la_png(tmp_path):
    img = Image.new("LA", (2, 1))
    img.putdata([(0, 0), (50, 255)])
    out = load_image(save(img, tmp_path / "la.png"))
    assert out.getpixel((0, 0)) == (255, 255, 255) and out.getpixel((1, 0)) == (50, 50, 50)


def test_palette_png_with_and_without_transparency(tmp_path):
    img = Image.new("P", (2, 1))
    img.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    img.putdata([0, 1])
    plain = load_image(save(img, tmp_path / "p.png"))
    assert plain.getpixel((0, 0)) == (255, 0, 0) and plain.getpixel((1, 0)) == (0, 0, 255)
    clear = load_image(save(img, tmp_path / "pt.png", transparency=0))
    assert clear.getpixel((0, 0)) == (255, 255, 255) and clear.getpixel((1, 0)) == (0, 0, 255)


def test_16bit_grayscale_png_is_scaled_not_clipped(tmp_path):
    img = Image.fromarray(np.array([[65535, 32768, 0, 257]], dtype=np.uint16))
    assert img.mode == "I;16"
    out = np.asarray(load_image(save(img, tmp_path / "g16.png")))
    assert out.shape == (1, 4, 3)
    assert out[0, 0, 0] == 255 and abs(int(out[0, 1, 0]) - 128) <= 1
    assert out[0, 2, 0] == 0 and out[0, 3, 0] == 1


def test_32bit_int_grayscale():
    img = Image.fromarray(np.array([[0, 1000, 65535]], dtype=np.int32))
    assert img.mode == "I"
    assert np.asarray(load_image(img))[0, :, 0].tolist() == [0, 4, 255]


def test_float_tiff(tmp_path):
    img = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    assert img.mode == "F"
    out = np.asarray(load_image(save(img, tmp_path / "f.tiff")))
    assert out[0, 0, 0] == 0 and abs(int(out[0, 1, 0]) - 128) <= 1 and out[0, 2, 0] == 255
    wide = Image.fromarray(np.array([[-1.0, 1000.0, np.nan]], dtype=np.float32))
    assert np.asarray(load_image(wide))[0, :2, 0].tolist() == [0, 255]


def test_grayscale_and_1bit(tmp_path):
    grey = load_image(save(Image.new("L", (4, 4), 77), tmp_path / "l.png"))
    assert grey.mode == "RGB" and grey.getpixel((0, 0)) == (77, 77, 77)
    bits = Image.new("1", (4, 4), 0)
    bits.putpixel((1, 1), 1)
    out = load_image(save(bits, tmp_path / "b.png"))
    assert out.getpixel((0, 0)) == (0, 0, 0) and out.getpixel((1, 1)) == (255, 255, 255)


def test_exif_rotated_jpeg(tmp_path):
    img = Image.new("RGB", (40, 20), (255, 0, 0))  # left half red, right half blue
    img.paste((0, 0, 255), (20, 0, 40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    out = load_image(save(img, tmp_path / "rot.jpg", exif=exif, quality=95))
    assert out.size == (20, 40)
    top, bottom = out.getpixel((10, 5)), out.getpixel((10, 35))
    assert top[0] > 200 and top[2] < 50  # the left (red) half is now on top
    assert bottom[2] > 200 and bottom[0] < 50


def test_animated_gif_first_frame(tmp_path):
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert load_image(path).getpixel((4, 4)) == (255, 0, 0)


def test_animated_png_first_frame(tmp_path):
    frames = [Image.new("RGBA", (8, 8), c) for c in ((0, 255, 0, 255), (255, 0, 0, 255))]
    path = tmp_path / "anim.png"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50)
    assert load_image(path).getpixel((4, 4)) == (0, 255, 0)


# --------------------------------------------------------------------------- properties
BYTES_PER_PIXEL = {"L": 1, "RGB": 3, "RGBA": 4, "P": 1, "CMYK": 4, "I;16": 2}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    mode=st.sampled_from(sorted(BYTES_PER_PIXEL)),
    width=st.integers(1, 64),
    height=st.integers(1, 64),
    seed=st.integers(0, 2**32 - 1),
    via_tiff=st.booleans(),
    train=st.booleans(),
)
def test_random_images_always_load(mode, width, height, seed, via_tiff, train):
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, width * height * BYTES_PER_PIXEL[mode], dtype=np.uint8).tobytes()
    img = Image.frombytes(mode, (width, height), data)
    rgb = load_image(encode(img, "TIFF") if via_tiff else img)
    assert rgb.mode == "RGB" and rgb.size == (width, height)
    out = image_to_tensor(rgb, 16, train=train, generator=torch.Generator().manual_seed(seed))
    assert out.shape == (3, 16, 16) and torch.isfinite(out).all()


def _valid_samples() -> list[bytes]:
    img = noise(6, 5)
    return [encode(img, f) for f in ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP")]


VALID = _valid_samples()
MAGIC = [b"", b"\x89PNG\r\n\x1a\n", b"GIF89a", b"\xff\xd8\xff\xe0", b"BM", b"II*\x00", b"RIFF"]


@st.composite
def messy_bytes(draw) -> bytes:
    if draw(st.booleans()):
        return draw(st.sampled_from(MAGIC)) + draw(st.binary(max_size=300))
    data = bytearray(draw(st.sampled_from(VALID)))
    for _ in range(draw(st.integers(1, 8))):  # flip a few bytes of a valid file
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    return bytes(data[: draw(st.integers(0, len(data)))])


@settings(max_examples=200, deadline=None)
@given(data=messy_bytes())
def test_random_bytes_load_or_raise_image_load_error(data):
    try:
        img = load_image(data)
    except ImageLoadError as exc:
        assert "\n" not in str(exc) and "<bytes>" in str(exc)
    else:
        assert isinstance(img, Image.Image) and img.mode == "RGB"


def test_message_escapes_control_characters_in_names():
    upload = io.BytesIO(b"not an image")
    upload.name = "evil\nname.png"
    message = refused(upload, "cannot identify")
    assert "evil\\nname.png" in message
    assert "<upload>" in refused(io.BytesIO(b"junk"))
