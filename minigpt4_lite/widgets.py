"""A chat widget for notebooks: pick or upload an image and talk about it (paper Sec. 4, Fig. 2-4).

Core ipywidgets only, so it works in JupyterLab, classic Notebook, VS Code and Colab. The
transcript is an `HTML` widget re-rendered from `history` (a list of `(kind, text)`): callbacks
never `print` into an `Output` (docs/toolchain.md: under nbval that leaks into the cell).
Answers stream in word by word from `Chat.stream`; errors become a red line in the transcript and
the widget stays usable.
"""

from __future__ import annotations

import html
import io
import time
from pathlib import Path

import ipywidgets as w
from PIL import Image

from .chat import Chat, GenerationSettings
from .config import ASSETS
from .errors import MiniGPT4Error
from .images import load_image

DISPLAY_PX = 240  # ToyWorld images are 60 px: upscaled (nearest) so that shapes stay crisp
THUMB_PX = 52
FONT = 'font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; font-size: 14px;'
BUBBLE = "padding: 8px 12px; margin: 4px 0; border-radius: 14px; max-width: 78%; line-height: 1.4;"
STYLES = {  # kind -> (row alignment, bubble style, label)
    "user": ("flex-end", "background: #2563eb; color: white; border-bottom-right-radius: 4px;",
             "You"),
    "assistant": ("flex-start", "background: #f1f5f9; color: #0f172a; border: 1px solid "
                  "#e2e8f0; border-bottom-left-radius: 4px;", "MiniGPT-4"),
    "image": ("center", "background: none; color: #64748b; font-size: 12px;", ""),
    "notice": ("center", "background: #fef9c3; color: #713f12; font-size: 12px;", "note"),
    "error": ("center", "background: #fee2e2; color: #991b1b; font-size: 13px;", "error"),
}


def png_bytes(image: Image.Image, size: int) -> bytes:
    """`image` scaled to `size` px on its long side (nearest when enlarging), as PNG bytes."""
    scale = size / max(image.size)
    new = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    image = image.resize(new, Image.NEAREST if scale >= 1 else Image.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def render_transcript(history: list[tuple[str, str]], height: int = 360) -> str:
    """The transcript as HTML: chat bubbles with inline CSS, newest message at the bottom.

    `flex-direction: column-reverse` keeps the scroll position at the bottom without JavaScript.
    """
    rows = []
    for kind, text in history:
        align, style, label = STYLES[kind]
        head = (f"<div style='font-size: 11px; opacity: .7; margin-bottom: 2px'>{label}</div>"
                if kind in ("user", "assistant") else (f"<b>{label}:</b> " if label else ""))
        body = html.escape(text).replace("\n", "<br>") or "&hellip;"
        rows.append(f"<div style='display: flex; justify-content: {align}'><div "
                    f"class='mg4-{kind}' style='{BUBBLE} {style}'>{head}{body}</div></div>")
    if not history:
        rows.append("<div style='color: #94a3b8; text-align: center; margin-top: 40%'>Pick an "
                    "image, then ask about it: colours, counts, positions...</div>")
    return (f"<div class='mg4-transcript' style='{FONT} height: {height}px; overflow-y: auto; "
            "display: flex; flex-direction: column-reverse; border: 1px solid #e2e8f0; "
            f"border-radius: 12px; padding: 8px 12px; background: white'><div>{''.join(rows)}"
            "</div></div>")


class ChatWidget(w.VBox):
    """Image gallery + upload, the chosen image, a streaming transcript, a question box, settings.

    Drive it from code as a user would: `widget.text.value = "..."` (sends, like Enter), or
    `widget.send()`, `widget.choose(path)`, `widget.reset_chat()`; read `widget.history`.
    """

    def __init__(self, model, samples_dir: str | Path | None = None,
                 settings: GenerationSettings | None = None):
        self.chat = Chat(model, settings or GenerationSettings(do_sample=False, max_new_tokens=60))
        self.history: list[tuple[str, str]] = []
        self.current: tuple[str, Image.Image] | None = None  # (name, image) being discussed
        self.transcript = w.HTML(render_transcript([]), layout=w.Layout(width="auto"))
        self.image_view = w.Image(format="png", layout=w.Layout(
            width=f"{DISPLAY_PX}px", height=f"{DISPLAY_PX}px", border="1px solid #e2e8f0"))
        self.image_caption = w.HTML()
        self.upload = w.FileUpload(accept="image/*", multiple=False, description="Upload your own",
                                   layout=w.Layout(width=f"{DISPLAY_PX}px"))
        self.upload.observe(self._on_upload, "value")
        self.text = w.Text(placeholder="Ask about the image", continuous_update=False,
                           layout=w.Layout(flex="1 1 auto"))
        self.text.observe(lambda change: self.send(), "value")  # Enter (or leaving the box)
        self.send_button = w.Button(description="Send", button_style="primary", icon="paper-plane",
                                    layout=w.Layout(width="90px"))
        self.send_button.on_click(lambda _: self.send())
        self.reset_button = w.Button(description="Reset", icon="refresh", tooltip="New chat, "
                                     "same image", layout=w.Layout(width="90px"))
        self.reset_button.on_click(lambda _: self.reset_chat())
        look = dict(style={"description_width": "initial"}, layout=w.Layout(width="232px"))
        self.temperature = w.FloatSlider(0.0, min=0.0, max=2.0, step=0.1, readout_format=".1f",
                                         description="temperature", **look)
        self.max_new_tokens = w.IntSlider(60, min=8, max=300, step=4, description="max tokens",
                                          **look)
        self.num_beams = w.IntSlider(1, min=1, max=4, description="beams", **look)
        self.status = w.HTML(f"<span style='{FONT} color: #64748b; font-size: 12px'>"
                             "temperature 0 = greedy (deterministic)</span>")
        self.samples = self._samples(samples_dir)
        self.sample_buttons: list[w.Button] = []
        super().__init__(self._layout(), layout=w.Layout(width="100%", max_width="980px"))
        if self.samples:
            self.choose(self.samples[0])

    def _layout(self) -> list[w.Widget]:
        """Title; left: image, gallery, upload; right: transcript, question, sliders, status."""
        gallery = [self._thumbnail(path, i + 1) for i, path in enumerate(self.samples)]
        left = w.VBox([self.image_view, self.image_caption,
                       w.HBox(gallery, layout=w.Layout(flex_flow="row wrap",
                                                       width=f"{DISPLAY_PX + 8}px")),
                       self.upload], layout=w.Layout(width=f"{DISPLAY_PX + 12}px", flex="0 0 auto"))
        sliders = w.HBox([self.temperature, self.max_new_tokens, self.num_beams],
                         layout=w.Layout(flex_flow="row wrap"))
        right = w.VBox([self.transcript, w.HBox([self.text, self.send_button, self.reset_button]),
                        sliders, self.status], layout=w.Layout(flex="1 1 auto", min_width="360px"))
        title = w.HTML(f"<div style='{FONT} font-size: 18px; font-weight: 600; color: #0f172a'>"
                       "MiniGPT-4 <span style='font-weight: 400; color: #64748b'>lite &middot; "
                       "chat about an image</span></div>")
        return [title, w.HBox([left, right], layout=w.Layout(grid_gap="16px"))]

    # --- images ---------------------------------------------------------------------------------
    @staticmethod
    def _samples(samples_dir) -> list[Path]:
        folder = Path(samples_dir) if samples_dir is not None else ASSETS / "samples"
        return sorted(folder.glob("*.png"))[:8] if folder.is_dir() else []

    def _thumbnail(self, path: Path, number: int) -> w.VBox:
        """A small image with a button under it that starts a chat about it."""
        button = w.Button(description=str(number), tooltip=f"Chat about {path.name}",
                          layout=w.Layout(width=f"{THUMB_PX}px", height="22px", padding="0",
                                          margin="0"))
        button.on_click(lambda _: self.choose(path))
        self.sample_buttons.append(button)
        return w.VBox([w.Image(value=png_bytes(load_image(path), THUMB_PX), format="png",
                               layout=w.Layout(width=f"{THUMB_PX}px", height=f"{THUMB_PX}px")),
                       button], layout=w.Layout(align_items="center"))

    def choose(self, source, name: str | None = None) -> bool:
        """Start a new chat about `source` (path, bytes, PIL image); errors go to the transcript."""
        name = name or (Path(source).name if isinstance(source, (str, Path)) else "upload")
        try:
            image = load_image(source)
        except MiniGPT4Error as e:  # the message names the file, says what is wrong and what to do
            self._add("error", str(e))
            return False
        self.current = (name, image)
        for button, path in zip(self.sample_buttons, self.samples):  # highlight the chosen one
            button.button_style = "info" if Path(path).name == name else ""
        self.image_view.value = png_bytes(image, DISPLAY_PX)
        self.image_caption.value = (f"<div style='{FONT} color: #64748b; font-size: 12px; "
                                    f"text-align: center'>{html.escape(name)}</div>")
        self.reset_chat()
        return True

    def _on_upload(self, change) -> None:
        if change["new"]:
            item = change["new"][0]
            data = io.BytesIO(bytes(item["content"]))
            data.name = item["name"]  # so that an error message names the uploaded file
            self.choose(data, name=item["name"])

    # --- chatting -------------------------------------------------------------------------------
    def reset_chat(self) -> None:
        """Clear the conversation; keep (and re-upload) the current image."""
        self.chat.reset()
        self.history = []
        if self.current is not None:
            self.chat.upload(self.current[1])
            self.history.append(("image", f"New chat about {self.current[0]}"))
        self._render()

    def settings(self) -> GenerationSettings:
        """The sliders as `GenerationSettings` (temperature 0 = greedy)."""
        t = self.temperature.value
        return GenerationSettings(max_new_tokens=self.max_new_tokens.value, top_p=0.9,
                                  num_beams=self.num_beams.value, do_sample=t > 0,
                                  temperature=t if t > 0 else 1.0)

    def send(self, question: str | None = None) -> str | None:
        """Ask the text box's question (or `question`) and stream the answer into the transcript."""
        question = self.text.value if question is None else question
        if not question.strip():  # also the echo of clearing the box below: nothing to do
            return None
        self.text.value = ""
        self.history.append(("user", question))
        self.history.append(("assistant", ""))
        n_notices, start, answer = len(self.chat.notices), time.perf_counter(), None
        self._set_busy(True)
        try:
            for piece in self.chat.stream(question, self.settings()):
                self.history[-1] = ("assistant", self.history[-1][1] + piece)
                self._render()
            answer = self.chat.conv.messages[-1][1]
            self.history[-1] = ("assistant", answer)
        except Exception as e:  # noqa: BLE001 - shown to the student, the widget stays usable
            self.history.pop()
            message = str(e) if isinstance(e, MiniGPT4Error) else f"{type(e).__name__}: {e}"
            self.history.append(("error", f"No answer: {message}"))
        self.history += [("notice", n) for n in self.chat.notices[n_notices:]]
        self._set_busy(False, time.perf_counter() - start if answer is not None else None)
        self._render()
        return answer

    def _set_busy(self, busy: bool, seconds: float | None = None) -> None:
        self.send_button.disabled = self.reset_button.disabled = busy
        self.send_button.description = "…" if busy else "Send"
        if seconds is not None:
            self.status.value = (f"<span style='{FONT} color: #64748b; font-size: 12px'>answered "
                                 f"in {seconds:.1f} s &middot; temperature 0 = greedy</span>")

    def _add(self, kind: str, text: str) -> None:
        self.history.append((kind, text))
        self._render()

    def _render(self) -> None:
        self.transcript.value = render_transcript(self.history)


def chat_widget(model, samples_dir: str | Path | None = None, **kwargs) -> ChatWidget:
    """A ready-to-display `ChatWidget` (a VBox): `display(chat_widget(model))`."""
    return ChatWidget(model, samples_dir=samples_dir, **kwargs)
