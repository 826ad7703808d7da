"""The chat widget, driven from Python as a student would drive it with the mouse."""

import datetime
import html
import io
from pathlib import Path

import ipywidgets as w
import pytest
from PIL import Image

from minigpt4_lite.config import ASSETS, preset
from minigpt4_lite.widgets import ChatWidget, chat_widget, png_bytes, render_transcript

SAMPLES = sorted((ASSETS / "samples").glob("*.png"))


@pytest.fixture(scope="module")
def model():
    from minigpt4_lite.checkpoints import load_model

    cfg = preset("tiny")
    if not Path(cfg.llm).exists():
        pytest.skip("assets/ is not built: python -m minigpt4_lite build-assets --out assets")
    return load_model(cfg)


@pytest.fixture()
def widget(model):
    widget = chat_widget(model)
    widget.max_new_tokens.value = 24
    return widget


def upload(widget, name: str, data: bytes) -> None:
    """What the browser does when a file is chosen in the FileUpload button."""
    widget.upload.value = ({"name": name, "type": "image/png", "size": len(data),
                            "content": memoryview(data),
                            "last_modified": datetime.datetime.now(datetime.timezone.utc)},)


def test_layout_has_the_parts_a_student_needs(widget):
    assert isinstance(widget, w.VBox)
    assert widget.text.placeholder == "Ask about the image"
    assert widget.text.continuous_update is False  # Enter sends (the value changes on submit)
    assert widget.send_button.description == "Send" and widget.reset_button.description == "Reset"
    assert widget.image_view.value  # the first sample is chosen and shown
    assert len(widget.samples) == min(8, len(SAMPLES))
    assert widget.history == [("image", f"New chat about {SAMPLES[0].name}")]
    for slider in (widget.temperature, widget.max_new_tokens, widget.num_beams):
        assert slider.description


def test_send_answers_in_the_transcript(widget):
    widget.text.value = "What colour is the star?"  # as pressing Enter
    kinds = [kind for kind, _ in widget.history]
    assert kinds == ["image", "user", "assistant"]
    answer = widget.history[-1][1]
    assert answer == widget.chat.conv.messages[-1][1]
    assert html.escape(answer) in widget.transcript.value
    assert "What colour is the star?" in widget.transcript.value
    assert widget.text.value == ""  # the box is cleared for the next question
    widget.text.value = "How many objects are there?"
    widget.send()  # the Send button after Enter: nothing is asked twice
    assert [k for k, _ in widget.history].count("user") == 2
    assert len(widget.chat.conv.messages) == 4  # a multi-turn conversation


def test_a_list_answer_is_shown_line_by_line(widget, scripted_answer):
    """The transcript shows the answer as generated: a list keeps its lines."""
    answer = "Objects:\n1. a red star\n2. <b>a blue circle</b>"
    scripted_answer(widget.chat.model, answer + "###")
    widget.text.value = "List the objects."
    assert widget.history[-1] == ("assistant", answer)
    assert "Objects:<br>1. a red star<br>2. &lt;b&gt;a blue circle&lt;/b&gt;" in \
        widget.transcript.value


def test_send_button_and_greedy_is_repeatable(model):
    a, b = chat_widget(model), chat_widget(model)
    for widget in (a, b):
        widget.max_new_tokens.value = 24
        widget.text.value = ""
        widget.send("Where is the star?")
    assert a.history == b.history
    assert a.settings().do_sample is False


def test_bad_upload_shows_an_error_and_the_widget_still_answers(widget):
    image_before = widget.image_view.value
    upload(widget, "holiday.png", b"this is not a png")
    kind, text = widget.history[-1]
    assert kind == "error" and "holiday.png" in text
    assert "holiday.png" in widget.transcript.value and "error" in widget.transcript.value
    assert widget.image_view.value == image_before  # the previous image is still discussed
    widget.text.value = "What colour is the star?"
    assert widget.history[-1][0] == "assistant"


def test_good_upload_starts_a_new_chat(widget):
    widget.text.value = "What colour is the star?"
    upload(widget, "mine.png", SAMPLES[1].read_bytes())
    assert widget.history == [("image", "New chat about mine.png")]
    assert widget.chat.conv.messages == [["Human", "<Img><ImageHere></Img>"]]
    widget.text.value = "How many objects are there?"
    assert widget.history[-1][0] == "assistant"


def test_gallery_reset_and_bad_questions(widget):
    widget.choose(SAMPLES[2])
    assert widget.history[-1][1].endswith(SAMPLES[2].name)
    assert [b.button_style for b in widget.sample_buttons][:4] == ["", "", "info", ""]
    widget.text.value = "###"
    assert widget.history[-1][0] == "error"  # a question of markers only: said, not crashed
    widget.text.value = "Where is the star?"
    widget.reset_chat()
    assert widget.history == [("image", f"New chat about {SAMPLES[2].name}")]
    assert len(widget.chat.images) == 1


def test_generation_failure_is_shown_and_recovered(widget, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("the LLM fell over")

    monkeypatch.setattr(widget.chat.model.llm, "generate", broken)
    widget.text.value = "What colour is the star?"
    assert widget.history[-1] == ("error", "No answer: RuntimeError: the LLM fell over")
    assert widget.send_button.disabled is False
    monkeypatch.undo()
    widget.text.value = "What colour is the star?"
    assert widget.history[-1][0] == "assistant"


def test_sliders_become_settings(widget):
    widget.temperature.value, widget.num_beams.value = 0.7, 2
    s = widget.settings()
    assert s.do_sample and s.temperature == 0.7 and s.num_beams == 2
    widget.text.value = "How many objects are there?"  # beams: one piece, still answered
    assert widget.history[-1][0] == "assistant"


def test_transcript_escapes_html_and_images_are_upscaled():
    page = render_transcript([("user", "<script>alert(1)</script>"), ("assistant", "")])
    assert "<script>" not in page and "&lt;script&gt;" in page
    data = png_bytes(Image.new("RGB", (60, 60)), 240)
    assert Image.open(io.BytesIO(data)).size == (240, 240)


def test_no_samples_folder(model, tmp_path):
    widget = ChatWidget(model, samples_dir=tmp_path)
    assert widget.samples == [] and widget.history == []
    upload(widget, "scene.png", SAMPLES[0].read_bytes())
    widget.text.value = "What colour is the star?"
    assert widget.history[-1][0] == "assistant"
