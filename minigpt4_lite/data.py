"""Datasets for both stages in the official formats for real data (paper Sec. 3.1-3.2).

Every dataset yields `Sample`s: an image (a path, bytes, or a synthetic scene that draws itself),
an optional prompt with `<ImageHere>`, and the answer text. Stage 1 has no prompt (`[BOS] [image]
caption\\n`); stage 2 wraps one instruction per sample in `###Human: <Img><ImageHere></Img> ...
###Assistant: ` (`prompts.stage2_prompt`; `template="llama2"` for `[INST] ... [/INST] `). The
ToyWorld dataset is `toyworld.ToyWorldDataset`.

Real formats read unchanged:
- stage 1: webdataset tar shards of `jpg` + `json{"caption"}` (LAION / CC / SBU as released);
- stage 2: the `cc_sbu_align` folder, `filter_cap.json` `{"annotations": [{"image_id", "caption"}]}`
  + `image/{image_id}.jpg`;
- either stage: JSONL lines `{"image": path, "caption": text}` (paths relative to the file).
"""

from __future__ import annotations

import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import DataError, ImageLoadError
from .processing import ImageProcessor, clean_caption, image_to_tensor
from .prompts import pick_instruction, stage2_prompt

log = logging.getLogger(__name__)


@dataclass
class Sample:
    """One training pair. `image_id` names the image for the frozen-feature cache."""

    image_id: str
    image: object  # Path | bytes | a scene with `.render(size)` (ToyWorld)
    prompt: str | None
    answer: str


def draws_itself(image) -> bool:
    """Whether a sample's image is a synthetic scene that renders itself (a ToyWorld `Scene`).

    Such an image is drawn directly at the model's size and never cropped: a crop would move the
    grid cells that its text talks about. Real images are paths or bytes.
    """
    return callable(getattr(image, "render", None))


class CCSBUAlignDataset:
    """The official stage-2 folder: `filter_cap.json` + `image/{image_id}.jpg`."""

    def __init__(self, root: str | Path, seed: int = 0, skip_bad: bool = False,
                 template: str = "vicuna"):
        self.root, self.seed, self.template = Path(root), seed, template
        path = self.root / "filter_cap.json"
        try:
            annotations = json.loads(path.read_text())["annotations"]
        except FileNotFoundError:
            raise DataError(f"{path} does not exist: a cc_sbu_align folder holds filter_cap.json "
                            "and image/.") from None
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise DataError(f"{path} is not valid: expected {{\"annotations\": [{{\"image_id\", "
                            f"\"caption\"}}, ...]}} ({e}).") from None
        self.items, skipped = [], 0
        for k, ann in enumerate(annotations):
            problem = _check_annotation(ann, self.root)
            if problem and not skip_bad:
                raise DataError(f"{path}, entry {k}: {problem} (pass skip_bad=True to skip).")
            if problem:
                skipped += 1
                continue
            self.items.append((str(ann["image_id"]), ann["caption"]))
        if skipped:
            log.warning("%s: skipped %d bad entries of %d", path, skipped, len(annotations))
        self.skipped = skipped
        _check_not_empty(self.items, path)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Sample:
        image_id, caption = self.items[i]
        prompt = stage2_prompt(pick_instruction(image_id, self.seed), template=self.template)
        return Sample(f"ccsbu-{image_id}", self.root / "image" / f"{image_id}.jpg", prompt, caption)


def _check_annotation(ann, root: Path) -> str | None:
    if not isinstance(ann, dict) or "image_id" not in ann or "caption" not in ann:
        return "needs 'image_id' and 'caption'"
    if not isinstance(ann["caption"], str) or not ann["caption"].strip():
        return "the caption is empty"
    if not (root / "image" / f"{ann['image_id']}.jpg").is_file():
        return f"image/{ann['image_id']}.jpg is missing"
    return None


def _check_not_empty(items, source) -> None:
    if not items:
        raise DataError(f"{source} holds no usable samples: refusing to train on nothing.")


class JsonlDataset:
    """Lines of `{"image": path, "caption": text}`; stage 1 (no prompt) or stage 2 (template)."""

    def __init__(self, path: str | Path, stage: int = 1, seed: int = 0, skip_bad: bool = False,
                 template: str = "vicuna"):
        self.path, self.stage, self.seed, self.template = Path(path), stage, seed, template
        self.items, self.skipped = [], 0
        try:
            lines = self.path.read_text().splitlines()
        except OSError as e:
            raise DataError(f"Cannot read {self.path}: {e.strerror}.") from None
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                image, text = self.path.parent / rec["image"], rec["caption"]
                if not isinstance(text, str) or not text.strip():
                    raise ValueError("empty caption")
                if not image.is_file():
                    raise ValueError(f"image {rec['image']} is missing")
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                if not skip_bad:
                    raise DataError(f"{self.path}, line {n}: bad record ({e}); expected "
                                    "{\"image\": path, \"caption\": text}.") from None
                self.skipped += 1
                continue
            self.items.append((image, text))
        if self.skipped:
            log.warning("%s: skipped %d bad lines", self.path, self.skipped)
        _check_not_empty(self.items, self.path)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Sample:
        image, text = self.items[i]
        if self.stage == 1:
            return Sample(f"jsonl-{image}", image, None, clean_caption(text))
        prompt = stage2_prompt(pick_instruction(str(image), self.seed), template=self.template)
        return Sample(f"jsonl-{image}", image, prompt, text)


def webdataset_sample(raw: dict) -> Sample:
    """One raw webdataset sample (`jpg` + `json{"caption"}`) as a stage-1 `Sample` (image bytes,
    cleaned caption); a `DataError` naming the shard and key when the caption or image is missing.
    """
    key, shard = raw.get("__key__"), raw.get("__url__")
    try:
        caption = json.loads(raw["json"])["caption"]
        image = raw.get("jpg") or raw.get("jpeg") or raw.get("png")
        if image is None:
            raise KeyError("jpg")
        if not isinstance(caption, str) or not caption.strip():
            raise ValueError("empty caption")
    except (KeyError, ValueError, TypeError) as e:
        raise DataError(f"{shard}, sample {key}: no usable caption/image ({e}).") from None
    return Sample(f"wds-{shard}-{key}", bytes(image), None, clean_caption(caption))


def webdataset_samples(urls: str | list[str], skip_bad: bool = False):
    """Stage-1 samples read in order from webdataset shards (`jpg` + `json{"caption"}`).

    A sample without a caption or image is an error naming the shard and key, or is skipped and
    counted with `skip_bad=True` (the count is logged at the end of each pass).
    """
    import webdataset as wds

    skipped = 0
    for raw in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        try:
            sample = webdataset_sample(raw)
        except DataError as e:
            if not skip_bad:
                raise DataError(f"{e} Pass skip_bad=True to skip such samples.") from None
            skipped += 1
            continue
        yield sample
    if skipped:
        log.warning("webdataset %s: skipped %d samples without caption/image", urls, skipped)


class WebDatasetCaptions:
    """A webdataset source read into memory (for small sets and tests; stream big ones)."""

    def __init__(self, urls: str | list[str], skip_bad: bool = False):
        self.samples = list(webdataset_samples(urls, skip_bad=skip_bad))
        _check_not_empty(self.samples, urls)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> Sample:
        return self.samples[i]


def image_tensor(sample: Sample, image_size: int, train: bool = False,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """The sample's image as a normalised tensor (eval transform, or train augmentation)."""
    if draws_itself(sample.image):  # ToyWorld: rendered at the model's size, no crop
        return image_to_tensor(sample.image.render(image_size), image_size)
    source = io.BytesIO(sample.image) if isinstance(sample.image, bytes) else sample.image
    try:
        return ImageProcessor(image_size, train=train)(source, generator=generator)
    except ImageLoadError as e:
        raise DataError(f"Sample {sample.image_id}: {e}") from None
