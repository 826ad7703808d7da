"""Batch inference (`infer.answer_images`, the `answer` command) on the tiny model from assets/.

The batched answers must be the answers of a `Chat` about each image alone (greedy), in input
order, with a bad image reported in its own line while the others are answered.
"""

import dataclasses
import json
from pathlib import Path

import pytest

from minigpt4_lite.chat import GREEDY, Chat
from minigpt4_lite.cli import main
from minigpt4_lite.config import ASSETS, preset
from minigpt4_lite.errors import ConfigError, DataError
from minigpt4_lite.infer import answer_images, read_items, write_jsonl

SAMPLES = sorted((ASSETS / "samples").glob("*.png"))
SHORT = dataclasses.replace(GREEDY, max_new_tokens=16)
COLOUR, COUNT = "What colour is the star?", "How many objects are there?"


@pytest.fixture(scope="module")
def model():
    from minigpt4_lite.checkpoints import load_model

    cfg = preset("tiny")
    if not Path(cfg.llm).exists():
        pytest.skip("assets/ is not built: python -m minigpt4_lite build-assets --out assets")
    return load_model(cfg)


def chat_answer(model, image, prompt: str) -> str:
    chat = Chat(model, SHORT)
    chat.upload(image)
    chat.ask(prompt)
    return chat.answer()


def test_batched_answers_equal_one_by_one_chat_answers_in_input_order(model, tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    items = [{"image": str(SAMPLES[0]), "prompt": COLOUR, "id": 0},
             {"image": str(SAMPLES[1]), "prompt": COUNT, "id": 1},
             {"image": str(broken), "prompt": COLOUR, "id": 2},
             {"image": SAMPLES[2], "prompt": COLOUR, "id": 3},
             {"image": str(SAMPLES[3]), "prompt": COUNT, "id": 4},
             {"image": str(tmp_path / "missing.png"), "prompt": COUNT, "id": 5},
             {"image": str(SAMPLES[4]), "prompt": COLOUR, "id": 6}]
    results = answer_images(model, items, batch_size=2, settings=SHORT, progress=False)
    assert [r["id"] for r in results] == list(range(7))  # input order, extra keys kept
    assert [r["image"] for r in results] == [str(item["image"]) for item in items]
    for item, result in zip(items, results):
        if item["id"] in (2, 5):
            assert "answer" not in result and "Cannot load image" in result["error"]
            assert Path(item["image"]).name in result["error"]
        else:
            assert "error" not in result and result["prompt"] == item["prompt"]
            assert result["answer"] == chat_answer(model, item["image"], item["prompt"])


def test_the_default_is_greedy_with_the_chats_other_settings(model):
    items = [{"image": str(SAMPLES[5]), "prompt": COLOUR}]
    greedy = answer_images(model, items, progress=False)[0]["answer"]
    chat = Chat(model, GREEDY)  # max_new_tokens 300, max_length 2000: the chat's defaults
    chat.upload(SAMPLES[5])
    chat.ask(COLOUR)
    assert greedy == chat.answer()


def test_a_prompt_that_cannot_be_asked_is_reported_in_its_lines(model):
    items = [{"image": str(SAMPLES[0]), "prompt": "###"},
             {"image": str(SAMPLES[1]), "prompt": COUNT},
             {"image": str(SAMPLES[2]), "prompt": "  "}]
    results = answer_images(model, items, settings=SHORT, progress=False)
    assert "template markers" in results[0]["error"] and "empty" in results[2]["error"]
    assert results[1]["answer"] == chat_answer(model, SAMPLES[1], COUNT)


def test_bad_arguments_are_errors_before_any_generation(model):
    with pytest.raises(ConfigError, match="batch_size"):
        answer_images(model, [{"image": str(SAMPLES[0]), "prompt": COLOUR}], batch_size=0)
    with pytest.raises(DataError, match="Item 1"):
        answer_images(model, [{"image": str(SAMPLES[0]), "prompt": COLOUR},
                              {"image": str(SAMPLES[1])}])


def test_read_items_from_files_folders_and_jsonl(tmp_path):
    (tmp_path / "imgs").mkdir()
    for name in ("b.png", "a.jpg", "notes.txt"):
        (tmp_path / "imgs" / name).write_bytes(b"x")
    lines = [{"image": "imgs/a.jpg", "prompt": "Own question?", "qid": 7}, {"image": "x.png"}]
    (tmp_path / "q.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    items = read_items([tmp_path / "one.png", tmp_path / "imgs", tmp_path / "q.jsonl"], "Q?")
    assert items == [
        {"image": str(tmp_path / "one.png"), "prompt": "Q?"},  # missing: its line will say so
        {"image": str(tmp_path / "imgs" / "a.jpg"), "prompt": "Q?"},
        {"image": str(tmp_path / "imgs" / "b.png"), "prompt": "Q?"},
        {"image": str(tmp_path / "imgs" / "a.jpg"), "prompt": "Own question?", "qid": 7},
        {"image": str(tmp_path / "x.png"), "prompt": "Q?"}]
    with pytest.raises(DataError, match="line 2: no \"prompt\""):
        read_items([tmp_path / "q.jsonl"])
    with pytest.raises(DataError, match="needs a question: give --prompt"):
        read_items([tmp_path / "imgs"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no image files"):
        read_items([tmp_path / "empty"], "Q?")
    (tmp_path / "bad.jsonl").write_text('{"image": "a.jpg", "prompt": "x"}\n{"image": \n')
    with pytest.raises(DataError, match="bad.jsonl, line 2: not JSON"):
        read_items([tmp_path / "bad.jsonl"])


def test_write_jsonl_is_all_or_nothing(tmp_path):
    out = tmp_path / "answers.jsonl"
    write_jsonl([{"image": "a.png", "answer": "ünïcode"}], out)
    assert json.loads(out.read_text()) == {"image": "a.png", "answer": "ünïcode"}
    with pytest.raises(TypeError):
        write_jsonl([{"image": "b.png"}, {"image": object()}], out)
    assert json.loads(out.read_text())["image"] == "a.png"  # the old file stays whole
    assert [p.name for p in tmp_path.iterdir()] == ["answers.jsonl"]


@pytest.mark.slow
def test_answer_command_writes_one_line_per_image(model, tmp_path, capsys):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for path in SAMPLES[:3]:
        (folder / path.name).write_bytes(path.read_bytes())
    (folder / "zz_broken.png").write_bytes(b"broken")
    out = tmp_path / "answers.jsonl"
    argv = ["answer", str(folder), "--prompt", COLOUR, "--max-new-tokens", "16",
            "--batch-size", "2", "--device", "cpu"]
    assert main([*argv, "--out", str(out)]) == 1  # one image failed: exit code 1
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [Path(r["image"]).name for r in lines] == [p.name for p in SAMPLES[:3]] + [
        "zz_broken.png"]
    assert [r.get("answer") for r in lines[:3]] == [chat_answer(model, p, COLOUR)
                                                    for p in SAMPLES[:3]]
    assert "error" in lines[3]
    assert "answered 3 of 4 images" in capsys.readouterr().err
    (folder / "zz_broken.png").unlink()
    assert main(argv) == 0  # stdout: the same lines
    assert [json.loads(line) for line in capsys.readouterr().out.splitlines()] == lines[:3]
    assert main(["answer", str(folder), "--prompt", ""]) == 2  # refused before loading a model
    assert "--prompt is empty" in capsys.readouterr().err
