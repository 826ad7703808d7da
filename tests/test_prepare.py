"""`prepare-data`: a folder / JSONL / CSV of images and captions -> stage-1 shards or cc_sbu_align.

The images are real files written here (ToyWorld scenes saved as JPEG and PNG); the outputs are
read back by the loaders training uses, and the end-to-end test trains both stages on them.
"""

import csv
import io
import json
import random
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from minigpt4_lite import prepare as prep
from minigpt4_lite import toyworld as tw
from minigpt4_lite.cli import main
from minigpt4_lite.data import CCSBUAlignDataset, WebDatasetCaptions
from minigpt4_lite.errors import ConfigError, DataError
from minigpt4_lite.processing import clean_caption
from minigpt4_lite.resume import CHECKPOINT


def write_photos(folder: Path, n: int, size: int = 120) -> list[tuple[Path, str]]:
    """`n` ToyWorld scenes as real image files (JPEG and PNG by turns) with side-car captions."""
    folder.mkdir(parents=True, exist_ok=True)
    pairs = []
    for k, scene in enumerate(tw.make_scenes("train", n, start=3000)):
        image = folder / f"scene_{k:02d}.{'png' if k % 2 else 'jpg'}"
        scene.render(size).save(image)
        caption = tw.detailed_description(scene, random.Random(k))
        image.with_suffix(".txt").write_text(caption + "\n")
        pairs.append((image, caption))
    return pairs


def is_jpeg(data: bytes) -> bool:
    return data[:3] == b"\xff\xd8\xff"


def test_a_folder_a_jsonl_and_a_csv_give_the_same_pairs(tmp_path):
    expected = write_photos(tmp_path / "photos", 4)
    with (tmp_path / "list.jsonl").open("w") as f:
        for image, caption in expected:
            f.write(json.dumps({"image": f"photos/{image.name}", "caption": caption}) + "\n\n")
    with (tmp_path / "list.csv").open("w", newline="", encoding="utf-8-sig") as f:  # Excel's BOM
        writer = csv.writer(f)
        writer.writerow(["caption", "image"])  # any column order
        writer.writerows([caption, f"photos/{image.name}"] for image, caption in expected)
    for src in ("photos", "list.jsonl", "list.csv"):
        pairs, skipped = prep.read_pairs(tmp_path / src)
        assert [(p.image.resolve(), p.caption) for p in pairs] == [
            (image.resolve(), caption) for image, caption in expected], src
        assert skipped == []


def test_stage1_shards_are_read_by_the_stage1_loader(tmp_path):
    expected = write_photos(tmp_path / "photos", 7, size=200)
    report = prep.prepare(tmp_path / "photos", tmp_path / "shards", stage=1, shard_size=3,
                          max_size=64)
    assert report["written"] == 7 and report["shards"] == 3
    assert sorted(p.name for p in (tmp_path / "shards").glob("*.tar")) == [
        "000000.tar", "000001.tar", "000002.tar"]
    assert report["data"] == f"{(tmp_path / 'shards').as_posix()}/{{000000..000002}}.tar"
    samples = WebDatasetCaptions(report["data"])
    assert [s.answer for s in samples] == [clean_caption(c) for _, c in expected]
    for s in samples:  # PNGs re-encoded as JPEG, shrunk to 64 pixels
        assert is_jpeg(s.image)
        assert Image.open(io.BytesIO(s.image)).size == (64, 64)
    with tarfile.open(tmp_path / "shards" / "000000.tar") as tar:  # the released layout
        names = tar.getnames()
        meta = json.load(tar.extractfile(names[1]))
    assert names[:2] == ["000000000.jpg", "000000000.json"]
    assert meta["caption"] == expected[0][1]  # stored raw: stage 1 cleans it when it reads


def test_stage2_folder_is_read_by_the_cc_sbu_align_loader(tmp_path):
    expected = write_photos(tmp_path / "photos", 3)
    report = prep.prepare(tmp_path / "photos", tmp_path / "align", stage=2)
    assert report["data"] == (tmp_path / "align").as_posix() and "shards" not in report
    dataset = CCSBUAlignDataset(tmp_path / "align")
    assert [s.answer for s in dataset] == [c for _, c in expected]
    annotations = json.loads((tmp_path / "align" / "filter_cap.json").read_text())["annotations"]
    assert [a["image_id"] for a in annotations] == ["0", "1", "2"]
    for k, (image, _) in enumerate(expected):
        written = tmp_path / "align" / "image" / f"{k}.jpg"
        assert is_jpeg(written.read_bytes())
        assert Image.open(written).size == Image.open(image).size  # no max_size: kept


def test_a_large_image_keeps_its_aspect_ratio_and_transparency_lands_on_white(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.new("RGBA", (300, 150), (255, 0, 0, 0)).save(folder / "clear.png")  # transparent red
    (folder / "clear.txt").write_text("a transparent picture")
    prep.prepare(folder, tmp_path / "align", stage=2, max_size=100)
    out = Image.open(tmp_path / "align" / "image" / "0.jpg")
    assert out.size == (100, 50) and out.mode == "RGB"
    assert min(out.getpixel((50, 25))) > 245  # white, as a viewer shows it, not black or red


def test_bad_pairs_are_skipped_counted_and_listed(tmp_path):
    write_photos(tmp_path / "photos", 2)
    photos = tmp_path / "photos"
    (photos / "broken.jpg").write_bytes(b"this is not a jpeg")
    (photos / "broken.txt").write_text("a broken file")
    Image.new("RGB", (20, 20)).save(photos / "no_caption.jpg")
    Image.new("RGB", (20, 20)).save(photos / "blank.jpg")
    (photos / "blank.txt").write_text("  \n")
    (photos / "orphan.txt").write_text("a caption without its image")
    report = prep.prepare(photos, tmp_path / "align", stage=2)
    assert report["written"] == 2
    assert report["skipped"] == {"empty caption": 2, "missing image": 1, "unreadable image": 1}
    stored = json.loads((tmp_path / "align" / prep.REPORT).read_text())
    assert {(s["where"], s["reason"]) for s in stored["skipped_items"]} == {
        ("blank.jpg", "empty caption"), ("no_caption.jpg", "empty caption"),
        ("orphan.txt", "missing image"), ("broken.jpg", "unreadable image")}
    assert "broken.jpg" in next(s["detail"] for s in stored["skipped_items"] if "detail" in s)


def test_a_caption_that_stage1_cleaning_empties_is_skipped_for_stage1_only(tmp_path):
    write_photos(tmp_path / "photos", 1)
    (tmp_path / "photos" / "scene_00.txt").write_text("...!!")
    with pytest.raises(DataError, match="1 empty caption"):
        prep.prepare(tmp_path / "photos", tmp_path / "shards", stage=1)
    assert prep.prepare(tmp_path / "photos", tmp_path / "align", stage=2)["written"] == 1


def test_nothing_usable_is_an_error_and_nothing_is_written(tmp_path):
    (tmp_path / "list.jsonl").write_text(json.dumps({"image": "gone.jpg", "caption": "x"}) + "\n")
    with pytest.raises(DataError, match="no usable image-caption pair .1 missing image"):
        prep.prepare(tmp_path / "list.jsonl", tmp_path / "out", stage=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["list.jsonl"]


@pytest.mark.parametrize("name, text, message", [
    ("list.jsonl", '{"image": "a.jpg", "caption": "x"}\n{"image": "b.jpg"\n', "list.jsonl, line 2"),
    ("list.jsonl", '{"image": "a.jpg", "text": "x"}\n', "line 1: expected"),
    ("list.csv", "image,text\na.jpg,x\n", "list.csv, line 2: expected a header with"),
    ("list.txt", "a.jpg,x\n", "neither a folder nor a .jsonl/.csv"),
])
def test_a_malformed_listing_is_a_data_error(tmp_path, name, text, message):
    (tmp_path / name).write_text(text)
    with pytest.raises(DataError, match=message):
        prep.prepare(tmp_path / name, tmp_path / "out", stage=2)
    with pytest.raises(DataError, match="does not exist"):
        prep.read_pairs(tmp_path / "missing")


def test_an_existing_output_is_replaced_only_when_asked(tmp_path):
    write_photos(tmp_path / "photos", 2)
    out = tmp_path / "align"
    prep.prepare(tmp_path / "photos", out, stage=2)
    before = (out / "filter_cap.json").read_text()
    (tmp_path / "photos" / "scene_00.txt").write_text("a new caption")
    with pytest.raises(DataError, match="already exists: pass --overwrite"):
        prep.prepare(tmp_path / "photos", out, stage=2)
    assert (out / "filter_cap.json").read_text() == before
    prep.prepare(tmp_path / "photos", out, stage=2, overwrite=True)
    assert CCSBUAlignDataset(out)[0].answer == "a new caption"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["align", "photos"]  # no leftovers
    (tmp_path / "empty").mkdir()  # an empty folder made beforehand is fine
    assert prep.prepare(tmp_path / "photos", tmp_path / "empty", stage=1)["written"] == 2


def test_an_output_that_holds_the_source_is_refused_even_with_overwrite(tmp_path):
    write_photos(tmp_path / "data" / "photos", 1)
    with pytest.raises(DataError, match="would delete your source"):
        prep.prepare(tmp_path / "data" / "photos", tmp_path / "data", stage=2, overwrite=True)
    assert (tmp_path / "data" / "photos" / "scene_00.jpg").is_file()


def test_an_interrupted_run_leaves_nothing_half_written(tmp_path, monkeypatch):
    write_photos(tmp_path / "photos", 4)
    prep.prepare(tmp_path / "photos", tmp_path / "old", stage=1, shard_size=1)
    calls = []

    def interrupted(*args, **kwargs):  # the real encoder, until Ctrl-C on the third image
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    real = prep.encode_jpeg
    monkeypatch.setattr(prep, "encode_jpeg", interrupted)
    for stage in (1, 2):
        calls.clear()
        with pytest.raises(KeyboardInterrupt):
            prep.prepare(tmp_path / "photos", tmp_path / "new", stage=stage, shard_size=1)
        assert not (tmp_path / "new").exists()
    calls.clear()
    with pytest.raises(KeyboardInterrupt):  # replacing an old output: the old one stays whole
        prep.prepare(tmp_path / "photos", tmp_path / "old", stage=1, shard_size=1,
                     overwrite=True)
    assert len(WebDatasetCaptions(f"{tmp_path}/old/{{000000..000003}}.tar")) == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old", "photos"]


def test_invalid_settings_are_config_errors(tmp_path):
    write_photos(tmp_path / "photos", 1)
    for kwargs in ({"stage": 3}, {"stage": 1, "shard_size": 0}, {"stage": 2, "max_size": 0}):
        with pytest.raises(ConfigError):
            prep.prepare(tmp_path / "photos", tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def test_shard_pattern_names_every_shard():
    assert prep.shard_pattern("shards", 1) == "shards/000000.tar"
    assert prep.shard_pattern("shards/", 4) == "shards/{000000..000003}.tar"


@pytest.mark.slow
def test_own_data_to_stage1_and_stage2_training_from_the_command_line(tmp_path, monkeypatch,
                                                                     capsys):
    """The README's path: folder -> shards -> stage 1 -> cc_sbu_align -> stage 2 (2 steps each)."""
    monkeypatch.chdir(tmp_path)
    write_photos(tmp_path / "my_photos", 8)
    assert main(["prepare-data", "my_photos/", "--stage", "1", "--out", "shards/",
                 "--shard-size", "2", "--max-size", "64"]) == 0
    assert "--data 'shards/{000000..000003}.tar'" in capsys.readouterr().out
    cheap = ["--steps", "2", "--batch-size", "4", "--save-every", "0"]
    assert main(["train", "--stage", "1", "--data", "shards/{000000..000003}.tar",
                 "--out", "runs/s1", *cheap]) == 0
    assert main(["prepare-data", "my_photos/", "--stage", "2", "--out", "my_align/"]) == 0
    assert main(["train", "--stage", "2", "--data", "my_align/", "--init-projection", "runs/s1",
                 "--out", "runs/s2", *cheap]) == 0
    out = capsys.readouterr().out
    assert "stage 2: 2 steps" in out
    for run in ("runs/s1", "runs/s2"):
        assert (tmp_path / run / CHECKPOINT).is_file()
    assert main(["prepare-data", "my_photos/", "--stage", "2", "--out", "my_align/"]) == 2
    assert "already exists" in capsys.readouterr().err
